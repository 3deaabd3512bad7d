"""plugins/modules/pd_unit_remove.py with stop_python (cleanup.yml: stop and remove a
unit in one module run) against real launchers; a process the state file names but
cannot prove its own is never signalled."""
from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile

import pytest

from pd_launcher.nodeutil import start_time

from .modharness import failed, load, ok
from .unitnode import PY, bundle, pid_alive, pids

pytestmark = pytest.mark.slow  # real launcher processes


@pytest.fixture(scope="module")
def mod():
    return load("pd_unit_remove")


def test_running_units_are_stopped_and_removed(mod, node):
    converge = load("pd_unit_converge")
    node.ship()
    for unit in ("P", "D"):
        ok(converge, node.args(node.spec(unit)))
    p, d = node.wait("P"), node.wait("D")
    base = str(node.base)

    r = ok(mod, {"base_dir": base, "unit": "P", "stop_python": PY}, check_mode=True)
    assert r["changed"] and r["stopped"]
    assert all(pid_alive(pid) for pid in pids(p)) and node.state("P")  # nothing stopped
    assert node.spec_path("P").exists()  # nor removed

    r = ok(mod, {"base_dir": base, "unit": "P", "stop_python": PY})
    assert r["changed"] and r["stopped"] is True and r["damage"] == [] and r["warnings"] == []
    assert r["removed"] == [f"{base}/run/P", f"{base}/state/P"]
    assert not any(pid_alive(pid) for pid in pids(p))
    assert (node.base / "logs" / "P" / "engine-dp0.log").exists()  # logs kept unless asked
    assert all(pid_alive(pid) for pid in pids(d)) and node.state("D")  # the other unit runs

    again = ok(mod, {"base_dir": base, "unit": "P", "stop_python": PY})
    assert not again["changed"] and not again["stopped"] and again["removed"] == []

    r = ok(mod, {"base_dir": base, "unit": "D", "stop_python": PY, "remove_logs": True})
    assert r["stopped"] is True
    assert not any(pid_alive(pid) for pid in pids(d))
    assert set(r["removed"]) == {f"{base}/{x}" for x in
                                 ("run/D", "state/D", "logs/D", "lib", "run", "state", "logs")}
    assert not node.base.exists() or list(node.base.iterdir()) == []


def test_a_process_that_is_not_ours_is_never_signalled(mod, node):
    """The state file names a live PID that now is another program (start time or command
    line differ): stop leaves it alone, reports the damage, the files go."""
    with tarfile.open(fileobj=io.BytesIO(bundle()[0]), mode="r:gz") as tar:
        tar.extractall(node.lib)  # the launcher package, as installed (our own bundle)
    other = subprocess.Popen([PY, "-c", "import time; time.sleep(60)"],
                             start_new_session=True)
    try:
        for d in ("run", "state", "logs"):
            (node.base / d / "P").mkdir(parents=True)
        theirs = {"pid": other.pid, "pgid": other.pid, "argv": ["vllm", "serve"],
                  "cmdline": ["vllm", "serve"], "start_time": start_time(other.pid)}
        reused = dict(theirs, argv=[PY, "-c", "import time; time.sleep(60)"],
                      start_time=start_time(other.pid) - 1)  # same PID, earlier process
        reused["cmdline"] = reused["argv"]
        state = {"schema": 1, "status": "running", "grace_seconds": 1,
                 "launcher": dict(reused, cmdline=[PY, "-m", "pd_launcher", "run", "x"]),
                 "processes": [dict(theirs, name="engine-dp0"), dict(reused, name="kv")],
                 "pid_namespace": os.readlink("/proc/self/ns/pid")}
        (node.base / "state" / "P" / "launcher.json").write_text(json.dumps(state))
        r = ok(mod, {"base_dir": str(node.base), "unit": "P", "stop_python": PY})
        assert other.poll() is None and pid_alive(other.pid)
        assert r["stopped"] is True and str(node.base / "run" / "P") in r["removed"]
        assert not (node.base / "state" / "P").exists()
        assert len(r["damage"]) == 3, r["damage"]
        assert all("never signalled" in d for d in r["damage"])
        # the cleanup role shows r["damage"] under "<host>/<unit>: DAMAGED STATE"
        assert r["warnings"] == []
    finally:
        other.kill()
        other.wait()


def test_check_mode_with_stop_python_lists_what_would_be_removed(mod, tmp_path):
    base = tmp_path / "pd"
    for d in ("run", "state", "logs"):
        (base / d / "P").mkdir(parents=True)
    (base / "run" / "D").mkdir()
    (base / "state" / "P" / "launcher.json").write_text("{}")  # not stopped yet
    r = ok(mod, {"base_dir": str(base), "unit": "P", "stop_python": PY}, check_mode=True)
    assert r["changed"] and r["stopped"]
    assert r["removed"] == [str(base / "run" / "P"), str(base / "state" / "P")]


def test_a_failing_stop_fails_the_task_and_removes_nothing(mod, node):
    converge = load("pd_unit_converge")
    node.ship()
    ok(converge, node.args(node.spec("P")))
    p = node.wait("P")
    try:
        r = failed(mod, {"base_dir": str(node.base), "unit": "P", "stop_python": "/bin/false"})
        assert r["msg"].startswith("stopping unit P failed (exit 1)"), r["msg"]
        assert node.spec_path("P").exists() and node.state("P")  # nothing removed
        assert all(pid_alive(pid) for pid in pids(p))
    finally:
        node.stop("P")
