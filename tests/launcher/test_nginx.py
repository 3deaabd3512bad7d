"""Proxy role with the real nginx: files + `nginx -t` pre_start + nginx in the foreground."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from pd_launcher.launcher import procinfo
from pd_launcher.launcher.stop import verify_recorded

from .conftest import free_port, pid_alive

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("nginx") is None,
                       reason="nginx is not installed (apt-get install nginx)"),
]

CONF = """\
pid {d}/nginx.pid;
worker_processes 1;
error_log {d}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen {host}:{port};
        location = /health {{ return 200 "ok\\n"; }}
    }}
    {extra}
}}
"""


def proxy_spec(node, host, port, extra=""):
    d = str(node.run_dir)
    conf = os.path.join(d, "nginx.conf")
    base = ["nginx", "-p", d + "/", "-e", d + "/error.log", "-c", conf]
    return node.spec(
        [{"name": "proxy", "argv": base + ["-g", "daemon off;"],
          "ports": [{"host": host, "port": port, "use": "proxy"}],
          "ready": {"type": "http", "url": f"http://{host}:{port}/health"}}],
        role="C", ip=host, engine="nginx", instance=None, master=False,
        checks={"paths": [], "devices": [], "commands": ["nginx"]},
        files=[{"path": conf, "content": CONF.format(d=d, host=host, port=port, extra=extra),
                "mode": "0644"}],
        pre_start=[base + ["-t"]],
    )


def session_members(sid):
    return [m.pid for m in procinfo.session_members(sid)]


def test_nginx_proxy_runs_is_ready_and_stops(node):
    host = "127.0.1.9"
    port = free_port(host)
    spec_path = node.write_spec(proxy_spec(node, host, port))
    p = node.start(spec_path)
    st = node.wait_running(p)
    r = node.cli("wait", str(spec_path), "--timeout", "20", "--interval", "0.2")
    assert r.returncode == 0, r.stdout + r.stderr + node.output(p)
    assert "syntax is ok" in (node.log_dir / "pre_start.log").read_text()
    rec = st["processes"][0]
    master = rec["pid"]
    # nginx rewrites its title ("nginx: master process nginx -p ..."); still recognised
    assert procinfo.read_cmdline(master)[0].startswith("nginx: master process")
    assert verify_recorded(rec)[0] == "ours"
    members = session_members(master)
    assert len(members) >= 2  # master + worker, both in the session we created
    r = node.cli("stop", "--state-dir", str(node.state_dir))
    assert r.returncode == 0, r.stderr
    assert p.wait(20) == 0
    assert not any(pid_alive(pid) for pid in members)
    assert not (node.state_dir / "launcher.json").exists()


def test_nginx_bad_config_refused_by_pre_start(node):
    host = "127.0.1.9"
    port = free_port(host)
    spec = proxy_spec(node, host, port, extra="this_is_not_a_directive on;")
    r = node.cli("run", str(node.write_spec(spec)))
    assert r.returncode == 3, r.stderr
    assert "pre_start[0]" in r.stderr and "this_is_not_a_directive" in r.stderr
    assert not (node.log_dir / "proxy.log").exists()
    st = json.loads((node.state_dir / "launcher.json").read_text())
    assert st["status"] == "failed" and st["processes"] == []
