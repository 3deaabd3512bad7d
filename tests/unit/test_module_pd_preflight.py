"""plugins/modules/pd_preflight.py with a mocked AnsibleModule: every problem reported at
once, the unit's own ports count as free, container units, check mode."""
from __future__ import annotations

import json
import os
import socket
import sys

import pytest

from pd_launcher.nodeutil import read_cmdline, start_time

from .modharness import failed, load, ok


@pytest.fixture(scope="module")
def mod():
    return load("pd_preflight")


@pytest.fixture
def busy():
    """A port held by a listener of this very process."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    yield s.getsockname()[1]
    s.close()


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def spec(tmp_path, ports=(), **checks) -> dict:
    return {"node": "n1", "role": "P", "base_dir": str(tmp_path / "base"),
            "checks": {"paths": [], "devices": [], "commands": [], **checks},
            "processes": [{"name": "engine-dp0",
                           "ports": [{"host": h, "port": p, "use": "api"} for h, p in ports]}]}


def record(tmp_path, port, **over) -> str:
    """A state file recording this process as the unit's engine holding `port`."""
    cmd = read_cmdline(os.getpid())
    proc = {"name": "engine-dp0", "pid": os.getpid(), "start_time": start_time(os.getpid()),
            "argv": cmd, "cmdline": cmd, "ports": [{"host": "127.0.0.1", "port": port}]}
    proc.update(over)
    state_dir = tmp_path / "state"
    state_dir.mkdir(exist_ok=True)
    (state_dir / "launcher.json").write_text(json.dumps({"schema": 1, "processes": [proc]}))
    return str(state_dir)


def test_a_ready_node_passes(mod, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    args = {"spec": spec(tmp_path, [("127.0.0.1", free_port())], paths=[str(model)],
                         devices=["/dev/null"], commands=["sh", sys.executable]),
            "state_dir": str(tmp_path / "state"), "python": sys.executable, "min_free_mb": 1}
    r = ok(mod, args)
    assert r["changed"] is False and r["owned_ports"] == 0 and r["free_mb"] > 0
    assert ok(mod, args, check_mode=True)["changed"] is False


def test_every_problem_is_reported_at_once(mod, tmp_path, busy):
    port = free_port()
    args = {"spec": spec(tmp_path, [("127.0.0.1", busy), ("192.0.2.254", port)],
                         paths=["/no/model"], devices=["/dev/davinci99"],
                         commands=["no-such-tool-xyz"]),
            "state_dir": str(tmp_path / "state"), "python": "/no/python3",
            "extra_paths": ["/no/driver"], "min_free_mb": 1 << 40}
    r = failed(mod, args)
    errors = r["errors"]
    assert len(errors) == 8, errors
    assert r["msg"] == "n1 (P): " + "; ".join(errors)
    assert "model path /no/model does not exist" in errors
    assert "/no/driver does not exist" in errors
    assert "device /dev/davinci99 does not exist" in errors
    assert "command no-such-tool-xyz not found" in errors
    assert any(e.startswith("python /no/python3 not found") for e in errors)
    # the busy port names its holder: this process
    assert any(e.startswith(f"port 127.0.0.1:{busy} is already in use by pid {os.getpid()} (")
               and e.endswith("(engine-dp0/api)") for e in errors), errors
    assert (f"port 192.0.2.254:{port} cannot be bound: address 192.0.2.254 is not on this "
            "node (engine-dp0/api)") in errors
    assert any(e.startswith("only ") and "MiB free under" in e for e in errors)
    assert r["free_mb"] > 0


def test_an_old_python_is_refused(mod, tmp_path):
    old = tmp_path / "python2"
    old.write_text("#!/bin/sh\necho False\n")
    old.chmod(0o755)
    r = failed(mod, {"spec": spec(tmp_path), "state_dir": str(tmp_path), "python": str(old),
                     "min_free_mb": 1})
    assert r["errors"] == [f"python {old} is older than 3.9 or does not run (False)"]


def test_skip_paths_and_commands(mod, tmp_path):
    args = {"spec": spec(tmp_path, paths=["/no/model"], commands=["no-such-tool-xyz"]),
            "state_dir": str(tmp_path), "skip_paths": True, "skip_commands": True,
            "min_free_mb": 1}
    ok(mod, args)


def test_ports_of_the_units_own_live_processes_are_free(mod, tmp_path, busy):
    args = {"spec": spec(tmp_path, [("127.0.0.1", busy)]),
            "state_dir": record(tmp_path, busy), "min_free_mb": 1}
    assert ok(mod, args)["owned_ports"] == 1  # a re-run converges


@pytest.mark.parametrize("over", [{"start_time": 1}, {"argv": ["other"], "cmdline": ["other"]},
                                  {"pid": 2 ** 22 + 3}])
def test_a_recorded_process_that_is_not_ours_owns_nothing(mod, tmp_path, busy, over):
    args = {"spec": spec(tmp_path, [("127.0.0.1", busy)]),
            "state_dir": record(tmp_path, busy, **over), "min_free_mb": 1}
    r = failed(mod, args)
    assert f"port 127.0.0.1:{busy} is already in use" in r["msg"]


def _inspect(status="running", labels=None, rc=0):
    calls = []

    def run_command(argv):
        calls.append(argv)
        info = [{"State": {"Status": status}, "Config": {"Labels": labels or {}}}]
        return rc, json.dumps(info), "" if rc == 0 else "no such container"
    return run_command, calls


LABELS = {"pd.cluster": "demo", "pd.role": "P", "pd.node": "n1"}


@pytest.mark.parametrize("inspect,owned", [
    (dict(labels=LABELS), True),
    (dict(labels=dict(LABELS, **{"pd.node": "other"})), False),
    (dict(status="exited", labels=LABELS), False),
    (dict(rc=125), False),
])
def test_container_units_own_their_recorded_ports_while_their_container_runs(
        mod, tmp_path, busy, inspect, owned):
    run_command, calls = _inspect(**inspect)
    # the PID in a container's state file means nothing here: only the container counts
    args = {"spec": spec(tmp_path, [("127.0.0.1", busy)]),
            "state_dir": record(tmp_path, busy, pid=2 ** 22 + 3),
            "container_cli": ["podman", "--root", "/x"], "container_name": "pd-demo-n1-P",
            "container_labels": LABELS, "min_free_mb": 1}
    r = (ok if owned else failed)(mod, args, run_command=run_command)
    assert calls == [["podman", "--root", "/x", "container", "inspect", "pd-demo-n1-P"]]
    if owned:
        assert r["owned_ports"] == 1


def test_container_cli_needs_a_container_name(mod, tmp_path):
    r = failed(mod, {"spec": spec(tmp_path), "state_dir": str(tmp_path),
                     "container_cli": ["podman"]})
    assert "container_cli" in r["msg"] and "container_name" in r["msg"]
