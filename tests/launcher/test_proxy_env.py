"""Proxy settings: never inherited by what the launcher starts unless the spec asks,
and never used by the launcher's own readiness probes (real processes)."""
from __future__ import annotations

import json
from typing import Optional

import pytest

from .conftest import HTTP_SERVER, PY, free_port, has_line, py_proc, wait_for

pytestmark = pytest.mark.slow  # real child processes

DEAD = "http://127.0.0.1:9"  # discard port: nothing listens, a proxied request fails
PROXY_ENV = {k: DEAD for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                               "ALL_PROXY", "all_proxy")}
PROXY_ENV.update(no_proxy="example.org", NO_PROXY="example.org")

PRINT_PROXY_ENV = (
    "import json, os, time\n"
    "seen = {k: v for k, v in os.environ.items() if 'proxy' in k.lower()}\n"
    "print('PROXY ' + json.dumps(seen, sort_keys=True), flush=True)\n"
    "time.sleep(100)\n"
)


def _proxy_line(path) -> Optional[dict]:
    for line in path.read_text().splitlines():
        if line.startswith("PROXY "):
            return json.loads(line[len("PROXY "):])
    return None


def test_children_and_pre_start_get_no_proxy_unless_their_env_sets_one(node):
    asked = {"https_proxy": "http://proxy.example:3128", "NO_PROXY": "10.0.0.0/8"}
    spec = node.spec(
        [py_proc("plain", PRINT_PROXY_ENV), py_proc("asks", PRINT_PROXY_ENV, env=asked)],
        pre_start=[["sh", "-c", "env | grep -i _proxy= || echo no-proxy-vars"]],
    )
    p = node.start(node.write_spec(spec), env=PROXY_ENV)
    node.wait_running(p)
    for name in ("plain", "asks"):
        wait_for(lambda n=name: _proxy_line(node.log_dir / f"{n}.log") is not None,
                 what=f"{name}'s environment")
    assert _proxy_line(node.log_dir / "plain.log") == {}
    # exactly what the spec set, nothing inherited besides
    assert _proxy_line(node.log_dir / "asks.log") == asked
    assert has_line(node.log_dir / "pre_start.log", "no-proxy-vars")
    launcher_log = (node.log_dir / "launcher.log").read_text()
    assert "not passing ALL_PROXY, HTTPS_PROXY, HTTP_PROXY, NO_PROXY" in launcher_log


def test_wait_probes_directly_whatever_the_proxy_env_says(node):
    port = free_port("127.0.1.5")
    ready = {"type": "http", "url": f"http://127.0.1.5:{port}/health"}
    web = py_proc("web", HTTP_SERVER, ports=[("127.0.1.5", port)], ready=ready)
    web["argv"] = [PY, "-u", "-c", HTTP_SERVER, "127.0.1.5", str(port)]
    spec_path = node.write_spec(node.spec([web]))
    p = node.start(spec_path, env=PROXY_ENV)
    node.wait_running(p)
    r = node.cli("wait", str(spec_path), "--timeout", "20", env=PROXY_ENV)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"ready: web (GET http://127.0.1.5:{port}/health: 200)" in r.stdout
