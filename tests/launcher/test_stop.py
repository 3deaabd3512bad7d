"""`stop --state-dir`: through the launcher, directly, decoys, PID reuse, stale state."""
from __future__ import annotations

import os

import pytest

from pd_launcher.launcher.state import write_state

from .conftest import (
    IGNORE_TERM,
    PY,
    TERM_MARKER,
    has_line,
    pid_alive,
    proc_start_time,
    py_proc,
    wait_for,
)

pytestmark = pytest.mark.slow  # real child processes


def test_stop_without_state_is_idempotent(node):
    r = node.cli("stop", "--state-dir", str(node.tmp / "nothing-here"))
    assert r.returncode == 0 and "nothing to stop" in r.stderr


def test_stop_through_live_launcher_spares_decoy(node):
    argv = ["sleep", "4242"]
    spec = node.spec([{"name": "s", "argv": argv}, py_proc("t", TERM_MARKER)])
    spec["processes"][1]["argv"].append(str(node.tmp / "t"))
    p = node.start(node.write_spec(spec))
    st = node.wait_running(p)
    decoy = node.decoy(argv)  # same command line, not started by the launcher
    r = node.cli("stop", "--state-dir", str(node.state_dir))
    assert r.returncode == 0, r.stderr
    assert "sending SIGTERM to the launcher" in r.stderr
    assert p.wait(10) == 0
    assert not any(pid_alive(x["pid"]) for x in st["processes"])
    assert (node.tmp / "t").read_text() == "TERM"
    assert decoy.poll() is None
    assert not (node.state_dir / "launcher.json").exists()
    r = node.cli("stop", "--state-dir", str(node.state_dir))
    assert r.returncode == 0 and "nothing to stop" in r.stderr


def test_stop_directly_when_launcher_is_dead_spares_decoy(node):
    spec = node.spec([py_proc("stubborn", IGNORE_TERM)])
    p = node.start(node.write_spec(spec))
    st = node.wait_running(p)
    child = st["processes"][0]
    wait_for(lambda: has_line(node.log_dir / "stubborn.log", "ignoring SIGTERM"))
    decoy = node.decoy(spec["processes"][0]["argv"])  # identical argv, also ignores SIGTERM
    p.kill()  # the launcher dies without cleaning up; the child ignores PDEATHSIG's SIGTERM
    p.wait()
    assert pid_alive(child["pid"])
    r = node.cli("stop", "--state-dir", str(node.state_dir), "--grace", "0.5")
    assert r.returncode == 0, r.stderr
    assert "stubborn: stopping pid" in r.stderr and "SIGKILL" in r.stderr
    assert not pid_alive(child["pid"])
    assert decoy.poll() is None
    assert not (node.state_dir / "launcher.json").exists()


def test_launcher_death_sends_sigterm_to_children(node):
    marker = node.tmp / "m"
    spec = node.spec([{**py_proc("t", TERM_MARKER),
                       "argv": [PY, "-u", "-c", TERM_MARKER, str(marker)]}])
    p = node.start(node.write_spec(spec))
    st = node.wait_running(p)
    wait_for(lambda: has_line(node.log_dir / "t.log", "up"))
    p.kill()
    p.wait()
    wait_for(lambda: marker.exists(), timeout=5, what="PDEATHSIG SIGTERM")
    wait_for(lambda: not pid_alive(st["processes"][0]["pid"]), timeout=5)


def _fake_state(node, records, launcher=None):
    write_state(str(node.state_dir), {
        "status": "running", "spec": "x", "grace_seconds": 1.0,
        "pid_namespace": os.readlink("/proc/self/ns/pid"),
        "launcher": launcher or {"pid": 999999, "start_time": 1, "cmdline": ["x"]},
        "processes": records,
    })


def test_pid_reuse_is_detected_and_refused(node):
    decoy = node.decoy(["sleep", "3131"])
    wait_for(lambda: open(f"/proc/{decoy.pid}/cmdline").read().startswith("sleep"))
    start = proc_start_time(decoy.pid)
    # Recorded entry with the decoy's PID but another start time: the PID was reused.
    _fake_state(node, [{"name": "old", "pid": decoy.pid, "pgid": decoy.pid,
                        "start_time": start - 7, "argv": ["sleep", "3131"],
                        "cmdline": ["sleep", "3131"]}],
                # a launcher entry pointing at the same live PID, also with a wrong start time
                launcher={"pid": decoy.pid, "start_time": start + 3, "cmdline": ["sleep", "3131"]})
    r = node.cli("stop", "--state-dir", str(node.state_dir))
    assert r.returncode == 0, r.stderr
    assert "PID reused" in r.stderr and "not touching" in r.stderr
    assert decoy.poll() is None
    assert not (node.state_dir / "launcher.json").exists()


def test_same_pid_and_start_time_but_other_command_is_refused(node):
    decoy = node.decoy(["sleep", "3132"])
    wait_for(lambda: open(f"/proc/{decoy.pid}/cmdline").read().startswith("sleep"))
    _fake_state(node, [{"name": "eng", "pid": decoy.pid, "pgid": decoy.pid,
                        "start_time": proc_start_time(decoy.pid),
                        "argv": ["vllm", "serve", "/m"], "cmdline": ["vllm", "serve", "/m"]}])
    r = node.cli("stop", "--state-dir", str(node.state_dir))
    assert r.returncode == 0
    assert "does not match" in r.stderr
    assert decoy.poll() is None


def test_state_from_another_pid_namespace_is_not_acted_on(node):
    decoy = node.decoy(["sleep", "3133"])
    wait_for(lambda: open(f"/proc/{decoy.pid}/cmdline").read().startswith("sleep"))
    write_state(str(node.state_dir), {
        "status": "running", "pid_namespace": "pid:[1]", "grace_seconds": 1,
        "launcher": {"pid": decoy.pid, "start_time": proc_start_time(decoy.pid),
                     "cmdline": ["sleep", "3133"]},
        "processes": []})
    r = node.cli("stop", "--state-dir", str(node.state_dir))
    assert r.returncode == 1 and "another PID namespace" in r.stderr
    assert decoy.poll() is None
    assert (node.state_dir / "launcher.json").exists()


def test_run_after_crashed_launcher_stops_its_leftovers_first(node):
    spec = node.spec([py_proc("stubborn", IGNORE_TERM)], grace_seconds=0.5)
    spec_path = node.write_spec(spec)
    p = node.start(spec_path)
    old = node.wait_running(p)["processes"][0]
    wait_for(lambda: has_line(node.log_dir / "stubborn.log", "ignoring SIGTERM"))
    p.kill()
    p.wait()
    assert pid_alive(old["pid"])
    p2 = node.start(spec_path)
    new = node.wait_running(p2)
    assert new["launcher"]["pid"] == p2.pid
    assert new["processes"][0]["pid"] != old["pid"]
    assert not pid_alive(old["pid"])
    assert "stale state file" in node.output(p2)


def test_corrupt_state_file(node):
    node.state_dir.mkdir()
    (node.state_dir / "launcher.json").write_text("{garbage")
    spec_path = node.write_spec(node.spec([{"name": "a", "argv": ["sleep", "1"]}]))
    r = node.cli("run", str(spec_path))
    assert r.returncode == 5 and "cannot read state file" in r.stderr
    # stop: no launcher holds the lock, nothing can be proven: reported, set aside, exit 0
    r = node.cli("stop", "--state-dir", str(node.state_dir))
    assert r.returncode == 0, r.stderr
    assert "damage: " in r.stderr and "cannot be read" in r.stderr
    assert "no live launcher holds" in r.stderr
    assert not (node.state_dir / "launcher.json").exists()
    assert list(node.state_dir.glob("launcher.json.damaged-*"))


def test_stop_waits_for_launcher_grace(node):
    spec = node.spec([py_proc("stubborn", IGNORE_TERM)], grace_seconds=1)
    p = node.start(node.write_spec(spec))
    st = node.wait_running(p)
    wait_for(lambda: has_line(node.log_dir / "stubborn.log", "ignoring SIGTERM"))
    r = node.cli("stop", "--state-dir", str(node.state_dir))
    assert r.returncode == 0, r.stderr
    assert p.wait(5) == 0
    assert not pid_alive(st["processes"][0]["pid"])
    assert "SIGKILL" in node.output(p)
