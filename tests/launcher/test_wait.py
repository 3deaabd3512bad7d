"""`wait SPEC --timeout S`: readiness probes, timeout with log tails, early exit."""
from __future__ import annotations

import http.server
import json
import socket
import subprocess
import threading
import time

import pytest

from pd_launcher.launcher.spec import Ready
from pd_launcher.nodeutil import probe_ready as probe

from .conftest import HTTP_SERVER, PY, free_port, py_env, py_proc

pytestmark = pytest.mark.slow  # real child processes

SLOW_TCP = (  # listens only after a delay, like a headless rank getting ready
    "import socket, sys, time\n"
    "time.sleep(1.0)\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind((sys.argv[1], int(sys.argv[2]))); s.listen()\n"
    "print('listening', flush=True)\n"
    "while True:\n"
    "    c, _ = s.accept(); c.close()\n"
)


def http_proc(name, host, port):
    return {"name": name, "argv": [PY, "-u", "-c", HTTP_SERVER, host, str(port)],
            "ports": [{"host": host, "port": port, "use": "api"}],
            "ready": {"type": "http", "url": f"http://{host}:{port}/health"}}


def test_wait_succeeds_when_every_process_is_ready(node):
    host = "127.0.1.5"
    api, kv = free_port(host), free_port(host)
    spec = node.spec([
        http_proc("engine", host, api),
        {"name": "headless", "argv": [PY, "-u", "-c", SLOW_TCP, host, str(kv)],
         "ports": [{"host": host, "port": kv, "use": "kv"}],
         "ready": {"type": "tcp", "host": host, "port": kv}},
        {"name": "noprobe", "argv": ["sleep", "100"]},
    ])
    spec_path = node.write_spec(spec)
    p = node.start(spec_path)
    t0 = time.monotonic()
    r = node.cli("wait", str(spec_path), "--timeout", "30", "--interval", "0.2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert time.monotonic() - t0 >= 1.0  # really waited for the slow listener
    lines = r.stdout.splitlines()
    assert any(line.startswith("ready: engine (GET http://") for line in lines)
    assert any(line.startswith(f"ready: headless (tcp {host}:{kv} open)") for line in lines)
    assert any(line.startswith("ready: noprobe (no probe, running)") for line in lines)
    assert lines[-1] == "all 3 process(es) ready"
    assert p.poll() is None


def test_wait_times_out_with_not_ready_list_and_log_tail(node):
    host = "127.0.1.5"
    api, dead = free_port(host), free_port(host)
    spec = node.spec([
        http_proc("engine", host, api),
        {**py_proc("stuck", "import time\nfor i in range(30):\n    print('loading shard', i)\n"
                            "print('waiting', 'for', 'rendezvous', flush=True)\n"
                            "time.sleep(100)"),
         "ready": {"type": "tcp", "host": host, "port": dead}},
    ])
    spec_path = node.write_spec(spec)
    node.start(spec_path)
    t0 = time.monotonic()
    r = node.cli("wait", str(spec_path), "--timeout", "2", "--interval", "0.2")
    elapsed = time.monotonic() - t0
    assert r.returncode == 4, r.stdout + r.stderr
    assert 2 <= elapsed < 10
    assert "timed out after 2.0s; 1 process(es) not ready: stuck" in r.stderr
    assert f"--- stuck: tcp {host}:{dead}" in r.stderr
    assert "| waiting for rendezvous" in r.stderr
    assert "| loading shard 29" in r.stderr and "| loading shard 5" not in r.stderr  # last 20
    assert "ready: engine" in r.stdout


def test_wait_without_any_launcher_times_out(node):
    port = free_port("127.0.1.5")
    spec_path = node.write_spec(node.spec([http_proc("engine", "127.0.1.5", port)]))
    r = node.cli("wait", str(spec_path), "--timeout", "0.5", "--interval", "0.1")
    assert r.returncode == 4
    assert "engine" in r.stderr and "no log file" in r.stderr


def test_wait_fails_early_when_the_launcher_is_gone(node):
    port = free_port("127.0.1.5")
    spec = node.spec([
        {**http_proc("engine", "127.0.1.5", port),
         "argv": [PY, "-u", "-c", "import sys, time\ntime.sleep(1)\n"
                  "print('fatal:', 'no NPU', flush=True)\nsys.exit(3)"]},
    ])
    spec_path = node.write_spec(spec)
    p = node.start(spec_path)
    node.wait_running(p)
    t0 = time.monotonic()
    r = node.cli("wait", str(spec_path), "--timeout", "60", "--interval", "0.2")
    assert r.returncode == 1, r.stdout + r.stderr
    assert time.monotonic() - t0 < 20
    assert "process engine exited (exit code 3)" in r.stderr
    assert "| fatal: no NPU" in r.stderr
    assert p.wait(10) == 1


def test_wait_reports_launcher_not_running_from_stale_state(node):
    port = free_port("127.0.1.5")
    spec_path = node.write_spec(node.spec([http_proc("engine", "127.0.1.5", port)]))
    p = node.start(spec_path)
    node.wait_running(p)
    p.kill()  # no cleanup: the state file still says "running"
    p.wait()
    r = node.cli("wait", str(spec_path), "--timeout", "60", "--interval", "0.2",
                 "--state-dir", str(node.state_dir))
    # the engine died with it (PDEATHSIG); wait must not sit out its 60 s
    assert r.returncode == 1, r.stdout + r.stderr
    assert "launcher is not running (pid" in r.stderr


@pytest.fixture
def auth_server():
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            ok = self.headers.get("Authorization") == "Bearer s3cret"
            self.send_response(200 if ok else 401)
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.HTTPServer(("127.0.1.6", 0), H)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def test_http_probe_sends_headers_and_needs_200(auth_server):
    url = f"http://127.0.1.6:{auth_server}/health"
    ok, detail = probe(Ready(type="http", url=url))
    assert not ok and "HTTP 401" in detail
    ok, detail = probe(Ready(type="http", url=url, headers={"Authorization": "Bearer s3cret"}))
    assert ok, detail


def test_http_probe_ignores_proxy_env(auth_server, monkeypatch):
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # would fail if used
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    ok, detail = probe(Ready(type="http", url=f"http://127.0.1.6:{auth_server}/",
                             headers={"Authorization": "Bearer s3cret"}))
    assert ok, detail


def test_tcp_probe():
    s = socket.socket()
    s.bind(("127.0.1.7", 0))
    s.listen()
    port = s.getsockname()[1]
    try:
        assert probe(Ready(type="tcp", host="127.0.1.7", port=port))[0]
    finally:
        s.close()
    ok, detail = probe(Ready(type="tcp", host="127.0.1.7", port=port))
    assert not ok and "refused" in detail.lower()


def test_wait_tolerates_a_failed_state_file_that_a_new_launcher_replaces(node):
    # Restart after a failure: `wait` may start before the new launcher rewrote the
    # old "failed" state file; it must not give up on the node because of it.
    port = free_port("127.0.1.5")
    spec_path = node.write_spec(node.spec([http_proc("engine", "127.0.1.5", port)]))
    node.state_dir.mkdir()
    (node.state_dir / "launcher.json").write_text(json.dumps({
        "schema": 1, "status": "failed", "updated_at": time.time() - 60,
        "failure": {"process": "engine", "status": "exit code 1"},
        "launcher": {"pid": 999999, "start_time": 1, "cmdline": ["x"]}, "processes": []}))
    waiter = subprocess.Popen([PY, "-m", "pd_launcher", "wait", str(spec_path), "--timeout",
                               "30", "--interval", "0.2"], env=py_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    node.start(spec_path)
    out, err = waiter.communicate(timeout=40)
    assert waiter.returncode == 0, out + err
    assert "all 1 process(es) ready" in out


def test_wait_gate_opens_after_the_processes_and_explains_a_timeout(node):
    """`wait --gate`: the unit's own processes are ready; the gate (a port that only
    opens later, like xllm-service's HTTP port) is waited for separately, and a gate
    that never opens times out printing what its explain command says."""
    host = "127.0.1.5"
    rpc, http_port = free_port(host), free_port(host)
    spec = node.spec([{"name": "svc", "argv": [PY, "-u", "-c", SLOW_TCP, host, str(rpc)],
                       "ports": [{"host": host, "port": rpc, "use": "rpc"}],
                       "ready": {"type": "tcp", "host": host, "port": rpc}}])
    spec["unit"], spec["phase"] = "svc", "before-engines"
    spec["gate"] = {"ready": {"type": "tcp", "host": host, "port": http_port},
                    "what": "the test gate",
                    "explain": [PY, "-c", "print('missing: D1 (never registered)')"]}
    spec_path = node.write_spec(spec)
    node.start(spec_path)
    r = node.cli("wait", str(spec_path), "--timeout", "20", "--interval", "0.2")
    assert r.returncode == 0, r.stdout + r.stderr  # the processes, not the gate
    r = node.cli("wait", str(spec_path), "--gate", "--timeout", "1.5", "--interval", "0.2")
    assert r.returncode == 4, r.stdout + r.stderr
    assert "the test gate is not ready" in r.stderr
    assert "  missing: D1 (never registered)" in r.stderr
    listener = socket.socket()
    listener.bind((host, http_port))
    listener.listen()
    try:
        r = node.cli("wait", str(spec_path), "--gate", "--timeout", "10", "--interval", "0.2")
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.startswith("ready: the test gate (tcp ")
    finally:
        listener.close()


def test_wait_gate_with_a_check_command(node, tmp_path):
    """A gate may be a command (e.g. a router's count of registered instances): open
    when it exits 0; on timeout its own output says what is missing."""
    flag = tmp_path / "open"
    check = [PY, "-c", "import os, sys; ok = os.path.exists(sys.argv[1]); "
             "print('present: decode' if ok else 'missing: decode'); sys.exit(0 if ok else 1)",
             str(flag)]
    spec = node.spec([{"name": "svc", "argv": ["sleep", "100"]}])
    spec["unit"], spec["phase"] = "svc", "after-engines"
    spec["gate"] = {"check": check, "what": "the router"}
    spec_path = node.write_spec(spec)
    node.start(spec_path)
    r = node.cli("wait", str(spec_path), "--gate", "--timeout", "1.5", "--interval", "0.2")
    assert r.returncode == 4, r.stdout + r.stderr
    assert "check exited 1: missing: decode" in r.stderr
    assert "  missing: decode" in r.stderr.split("what is missing:")[1]
    flag.write_text("")
    r = node.cli("wait", str(spec_path), "--gate", "--timeout", "10", "--interval", "0.2")
    assert r.returncode == 0 and r.stdout.startswith("ready: the router (check passed)")
