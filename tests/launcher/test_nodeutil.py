"""pd_launcher/nodeutil.py, the node facts shared with the Ansible modules (which import
it as ansible.module_utils.pd_node): PID identity, port holders, direct probes."""
from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading

import pytest

from pd_launcher import nodeutil
from pd_launcher.launcher.spec import Ready

PROXY_VARS = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
              "all_proxy")


@pytest.fixture
def web():
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            ok = self.path == "/health?x=1" and self.headers.get("X-Key") == "k"
            self.send_response(200 if ok else 403)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.1.8", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def test_http_probe_is_direct_whatever_the_proxy_variables_say(web, monkeypatch):
    for var in PROXY_VARS:
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.setenv("no_proxy", "example.org")
    monkeypatch.setenv("NO_PROXY", "example.org")
    url = f"http://127.0.1.8:{web}/health?x=1"
    assert nodeutil.http_status(url, {"X-Key": "k"}) == 200
    assert nodeutil.probe_ready({"type": "http", "url": url, "headers": {"X-Key": "k"}}) == (
        True, f"GET {url}: 200")
    # the launcher's Ready objects and the modules' dicts take the same path
    assert nodeutil.probe_ready(Ready(type="http", url=url, headers={"X-Key": "k"}))[0]
    assert nodeutil.probe_ready({"type": "http", "url": url}) == (False, f"GET {url}: HTTP 403")


def test_probe_failures_say_why():
    port = socket.socket()
    port.bind(("127.0.1.8", 0))
    number = port.getsockname()[1]
    port.close()
    ok, detail = nodeutil.probe_ready({"type": "http", "url": f"http://127.0.1.8:{number}/"})
    assert not ok and "refused" in detail.lower()
    ok, detail = nodeutil.probe_ready({"type": "tcp", "host": "127.0.1.8", "port": number})
    assert not ok and detail.startswith(f"tcp 127.0.1.8:{number}: ")
    assert nodeutil.probe_ready({"type": "http", "url": "ftp://x/"})[0] is False
    assert nodeutil.probe_ready({"type": "udp"}) == (False, "unknown probe type 'udp'")
    assert nodeutil.probe_ready(None) == (True, "no probe")


def test_port_holder_is_named_with_a_masked_command_line():
    code = ("import socket, sys, time\n"
            "s = socket.socket(); s.bind(('127.0.1.8', 0)); s.listen()\n"
            "print(s.getsockname()[1], flush=True); time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code, "--api-key", "s3cret"],
                         stdout=subprocess.PIPE, text=True)
    try:
        port = int(p.stdout.readline())
        holders = nodeutil.port_holders("127.0.1.8", port)
        assert [pid for pid, _ in holders] == [p.pid]
        assert holders[0][1][-2:] == ["--api-key", "***"]
        problem = nodeutil.port_problem("127.0.1.8", port)
        assert problem.startswith(f"port 127.0.1.8:{port} is already in use by pid {p.pid} (")
        assert "s3cret" not in problem
        # a wildcard listener holds the port on every address
        assert nodeutil.port_holders("0.0.0.0", port) == holders
    finally:
        p.kill()
        p.wait()
        p.stdout.close()
    assert nodeutil.port_problem("127.0.1.8", port) is None
    assert nodeutil.port_holders("127.0.1.8", port) == []


def test_verify_recorded():
    cmd = nodeutil.read_cmdline(os.getpid())
    me = {"pid": os.getpid(), "start_time": nodeutil.start_time(os.getpid()), "argv": cmd,
          "cmdline": cmd}
    assert nodeutil.verify_recorded(me) == ("ours", f"pid {os.getpid()}")
    verdict, detail = nodeutil.verify_recorded(dict(me, start_time=me["start_time"] - 1))
    assert verdict == "mismatch" and "PID reused" in detail
    verdict, detail = nodeutil.verify_recorded(dict(me, argv=["vllm", "serve"], cmdline=None))
    assert verdict == "mismatch" and "does not match" in detail
    assert nodeutil.verify_recorded(dict(me, argv=None, cmdline=None))[0] == "mismatch"
    assert nodeutil.verify_recorded({"pid": 2 ** 22 + 3, "start_time": 1})[0] == "gone"
    assert nodeutil.verify_recorded({"name": "x"})[0] == "mismatch"
    age = nodeutil.seconds_since_start(me["start_time"])
    assert age is not None and 0 <= age < 24 * 3600


def test_same_pid_namespace():
    assert nodeutil.same_pid_namespace({"pid_namespace": nodeutil.pid_namespace()})
    assert nodeutil.same_pid_namespace({})  # unknown: assume ours
    assert not nodeutil.same_pid_namespace({"pid_namespace": "pid:[1]"})
