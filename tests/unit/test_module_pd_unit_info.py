"""plugins/modules/pd_unit_info.py with a mocked AnsibleModule: state file, PID checks,
probes (direct, whatever the proxy environment says)."""
from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading

import pytest

from pd_launcher.nodeutil import read_cmdline, start_time

from .modharness import failed, load, ok

DEAD_PROXY = "http://127.0.0.1:9"
PROXY_VARS = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
              "all_proxy")


@pytest.fixture(scope="module")
def mod():
    return load("pd_unit_info")


@pytest.fixture
def health():
    """A local HTTP server: /health -> 200, anything else 503."""
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def listener():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    yield s.getsockname()[1]
    s.close()


def me(name: str, **over) -> dict:
    """A state entry that really is this test process."""
    cmd = read_cmdline(os.getpid())
    entry = {"name": name, "pid": os.getpid(), "start_time": start_time(os.getpid()),
             "argv": cmd, "cmdline": cmd, "exit": None}
    entry.update(over)
    return entry


def write_unit(tmp_path, processes, launcher=None, spec_procs=None, **state_over):
    state_dir = tmp_path / "state"
    state_dir.mkdir(exist_ok=True)
    state = {"schema": 1, "status": "running", "launcher": launcher or me("launcher"),
             "processes": processes, "pid_namespace": os.readlink("/proc/self/ns/pid")}
    state.update(state_over)
    (state_dir / "launcher.json").write_text(json.dumps(state))
    args = {"state_dir": str(state_dir)}
    if spec_procs is not None:
        spec = tmp_path / "spec.json"
        spec.write_text(json.dumps({"processes": spec_procs}))
        args["spec_path"] = str(spec)
    return args


def test_nothing_deployed(mod, tmp_path):
    r = ok(mod, {"state_dir": str(tmp_path / "state"), "spec_path": str(tmp_path / "no.json")})
    assert r["changed"] is False
    assert (r["deployed"], r["recorded"], r["running"], r["healthy"]) == (False,) * 4
    assert r["processes"] == [] and r["launcher_pid"] is None and r["status"] is None


def test_running_and_healthy_through_a_dead_proxy(mod, tmp_path, health, listener,
                                                   monkeypatch):
    for var in PROXY_VARS:
        monkeypatch.setenv(var, DEAD_PROXY)  # a probe that used it could not connect
    monkeypatch.setenv("no_proxy", "example.org")
    spec_procs = [
        {"name": "api", "ports": [{"host": "127.0.0.1", "port": health, "use": "api"}],
         "dp_ranks": [0, 1],
         "ready": {"type": "http", "url": f"http://127.0.0.1:{health}/health"}},
        {"name": "kv", "ready": {"type": "tcp", "host": "127.0.0.1", "port": listener}},
    ]
    args = write_unit(tmp_path, [me("api"), me("kv")], spec_procs=spec_procs)
    r = ok(mod, args)
    assert r["deployed"] and r["recorded"] and r["status"] == "running"
    assert r["launcher_alive"] is True and r["launcher_pid"] == os.getpid()
    assert r["running"] is True and r["healthy"] is True, r["processes"]
    assert r["uptime_s"] is not None and r["uptime_s"] >= 0
    api, kv = r["processes"]
    assert api == {"name": "api", "pid": os.getpid(), "alive": True, "ready": True,
                   "probe": f"GET http://127.0.0.1:{health}/health: 200",
                   "ports": [f"127.0.0.1:{health}/api"], "dp_ranks": [0, 1]}
    assert kv["ready"] and kv["probe"] == f"tcp 127.0.0.1:{listener} open"


def test_a_probe_needs_200(mod, tmp_path, health):
    spec_procs = [{"name": "api",
                   "ready": {"type": "http", "url": f"http://127.0.0.1:{health}/starting"}}]
    r = ok(mod, write_unit(tmp_path, [me("api")], spec_procs=spec_procs))
    assert r["running"] is True and r["healthy"] is False
    assert r["processes"][0]["probe"].endswith(": HTTP 503")


def test_dead_and_reused_pids_are_not_ours(mod, tmp_path, listener):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = {"name": "dead", "pid": int(gone.stdout), "start_time": 1, "argv": ["x"]}
    reused = me("reused", start_time=start_time(os.getpid()) - 1)  # same PID, other start
    spec_procs = [{"name": n, "ready": {"type": "tcp", "host": "127.0.0.1", "port": listener}}
                  for n in ("dead", "reused", "ok")]
    args = write_unit(tmp_path, [dead, reused, me("ok")], spec_procs=spec_procs)
    r = ok(mod, args)
    by = {p["name"]: p for p in r["processes"]}
    assert by["dead"]["alive"] is False and by["reused"]["alive"] is False
    # a process known to be dead is not probed, even if something answers on its port
    assert by["dead"]["ready"] is False and by["dead"]["probe"] == "not probed"
    assert by["ok"]["alive"] is True and by["ok"]["ready"] is True
    assert r["running"] is False and r["healthy"] is False


def test_launcher_gone(mod, tmp_path):
    args = write_unit(tmp_path, [me("api")], launcher=me("launcher", start_time=1),
                      spec_procs=[{"name": "api"}])
    r = ok(mod, args)
    assert r["launcher_alive"] is False and r["uptime_s"] is None and r["running"] is False


def test_without_a_spec_the_recorded_processes_are_listed(mod, tmp_path):
    r = ok(mod, write_unit(tmp_path, [me("a"), me("b")]))
    assert r["deployed"] is False
    assert [p["name"] for p in r["processes"]] == ["a", "b"]
    assert all(p["alive"] and not p["ready"] for p in r["processes"])  # nothing to probe


def test_check_pids_false_and_a_foreign_pid_namespace(mod, tmp_path, listener):
    spec_procs = [{"name": "a", "ready": {"type": "tcp", "host": "127.0.0.1",
                                          "port": listener}}]
    args = write_unit(tmp_path, [me("a", start_time=1)], spec_procs=spec_procs)
    r = ok(mod, dict(args, check_pids=False))
    assert r["launcher_alive"] is None and r["processes"][0]["alive"] is None
    assert r["processes"][0]["ready"] is True and r["healthy"] is True
    # a state file from a container's PID namespace is not checked against our PIDs
    args = write_unit(tmp_path, [me("a", start_time=1)], spec_procs=spec_procs,
                      pid_namespace="pid:[1]")
    r = ok(mod, args)
    assert r["launcher_alive"] is None and r["processes"][0]["alive"] is None


def test_probe_false_probes_nothing(mod, tmp_path, listener):
    spec_procs = [{"name": "a", "ready": {"type": "tcp", "host": "127.0.0.1",
                                          "port": listener}}]
    r = ok(mod, dict(write_unit(tmp_path, [me("a")], spec_procs=spec_procs), probe=False))
    assert r["processes"][0]["ready"] is False and r["healthy"] is False
    assert r["running"] is True


def test_check_mode_is_the_same_read_only_report(mod, tmp_path, listener):
    spec_procs = [{"name": "a", "ready": {"type": "tcp", "host": "127.0.0.1",
                                          "port": listener}}]
    args = write_unit(tmp_path, [me("a")], spec_procs=spec_procs)
    r = ok(mod, args, check_mode=True)
    assert r["changed"] is False and r["healthy"] is True


def test_unreadable_state_file_is_reported_not_fatal(mod, tmp_path):
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "launcher.json").write_text("{not json")
    r = ok(mod, {"state_dir": str(state_dir)})
    assert r["recorded"] is True and r["running"] is False
    assert "cannot read" in r["state_error"] and str(state_dir) in r["state_error"]
    assert r["warnings"] == [r["state_error"]]
    (state_dir / "launcher.json").write_text(json.dumps({"schema": 99}))
    assert "not a pd-launcher state file" in ok(mod, {"state_dir": str(state_dir)})[
        "state_error"]


def test_a_broken_spec_fails_with_its_path(mod, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text("{")
    r = failed(mod, {"state_dir": str(tmp_path), "spec_path": str(spec)})
    assert r["msg"].startswith(f"cannot read the node spec {spec}: ")


def test_a_process_without_a_probe_is_ready_while_it_runs(mod, tmp_path):
    """xLLM's ranks > 0 have no probe of their own (rank 0's /health covers them):
    ready while alive, as `pd_launcher wait` counts them; a dead one is not."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = {"name": "dead", "pid": int(gone.stdout), "start_time": 1, "argv": ["x"]}
    args = write_unit(tmp_path, [me("worker"), dead],
                      spec_procs=[{"name": "worker"}, {"name": "dead"}])
    by = {p["name"]: p for p in ok(mod, args)["processes"]}
    assert by["worker"]["ready"] is True and by["worker"]["probe"] == "no probe, running"
    assert by["dead"]["ready"] is False and by["dead"]["probe"] == "no probe, not running"
