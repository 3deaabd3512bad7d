"""plugins/modules/pd_unit_info.py `units` mode (status.yml: every unit of a host in one
module run) against real launchers: results keyed by unit name, damage of them all,
mutually exclusive with state_dir."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from pd_launcher.nodeutil import read_cmdline, start_time

from .modharness import failed, load, ok
from .unitnode import PY, filters

pytestmark = pytest.mark.slow  # real launcher processes


@pytest.fixture(scope="module")
def mod():
    return load("pd_unit_info")


def test_units_are_keyed_by_name(mod, node):
    converge = load("pd_unit_converge")
    node.ship()
    specs = {u: node.spec(u) for u in ("P", "D")}
    for spec in specs.values():
        assert ok(converge, node.args(spec))["action"] == "start"
    states = {u: node.wait(u) for u in specs}
    # a third unit planned for the host but never deployed (e.g. after a failed start)
    specs["etcd"] = node.spec("etcd")
    units = filters()["pd_unit_locations"](specs)
    r = ok(mod, {"units": units, "timeout": 1})
    assert r["changed"] is False and r["damage"] == [] and r["warnings"] == []
    assert set(r["units"]) == {"P", "D", "etcd"}
    for u in ("P", "D"):
        got = r["units"][u]
        assert got["deployed"] and got["recorded"] and got["status"] == "running"
        assert got["running"] is True and got["healthy"] is True, got["processes"]
        assert got["launcher_pid"] == states[u]["launcher"]["pid"]
        port = specs[u]["processes"][0]["ports"][0]["port"]
        assert [p["pid"] for p in got["processes"]] == [states[u]["processes"][0]["pid"]]
        assert got["processes"][0]["probe"] == f"GET http://127.0.76.1:{port}/health: 200"
    etcd = r["units"]["etcd"]
    assert (etcd["deployed"], etcd["recorded"], etcd["running"], etcd["healthy"]) == (
        False, False, False, False)
    # one unit's view is the single-unit result
    single = ok(mod, {"state_dir": units[0]["state_dir"], "spec_path": units[0]["spec_path"]})
    assert {k: single[k] for k in ("deployed", "running", "healthy", "launcher_pid")} == {
        k: r["units"]["P"][k] for k in ("deployed", "running", "healthy", "launcher_pid")}
    node.stop("P")
    r = ok(mod, {"units": units, "probe": False})
    assert r["units"]["P"]["recorded"] is False and r["units"]["P"]["running"] is False
    assert r["units"]["D"]["running"] is True and r["units"]["D"]["healthy"] is False
    node.stop("D")


def test_the_damage_of_every_unit_is_reported(mod, tmp_path):
    """A state file naming a PID that now belongs to another process: damage (and a
    warning) naming that unit's file, in the one list of the host."""
    other = subprocess.Popen([PY, "-c", "import time; time.sleep(60)"])
    try:
        units = []
        for name in ("P", "D"):
            state_dir = tmp_path / "state" / name
            state_dir.mkdir(parents=True)
            cmd = read_cmdline(os.getpid())
            me = {"name": "engine-dp0", "pid": os.getpid(), "start_time": start_time(os.getpid()),
                  "argv": cmd, "cmdline": cmd}
            if name == "D":  # recorded with its own command line, now another program's PID
                me = dict(me, pid=other.pid, start_time=start_time(other.pid),
                          argv=["vllm", "serve"], cmdline=["vllm", "serve"])
            (state_dir / "launcher.json").write_text(json.dumps(
                {"schema": 1, "status": "running", "launcher": me, "processes": [me],
                 "pid_namespace": os.readlink("/proc/self/ns/pid")}))
            units.append({"name": name, "state_dir": str(state_dir),
                          "spec_path": str(tmp_path / "run" / name / "spec.json")})
        r = ok(mod, {"units": units, "probe": False})
        assert r["units"]["P"]["damage"] == [] and r["units"]["P"]["running"] is True
        assert r["units"]["D"]["running"] is False
        assert len(r["damage"]) == 2 and r["damage"] == r["units"]["D"]["damage"]
        assert all(str(tmp_path / "state" / "D" / "launcher.json") in d
                   and "not ours, never signalled" in d for d in r["damage"])
        assert r["warnings"] == r["damage"]
        assert other.poll() is None  # looked at, never signalled
    finally:
        other.kill()
        other.wait()


def test_units_and_state_dir_are_mutually_exclusive(mod, tmp_path):
    units = [{"name": "P", "state_dir": str(tmp_path / "P")}]
    r = failed(mod, {"units": units, "state_dir": str(tmp_path / "P")})
    assert "mutually exclusive" in r["msg"] and "state_dir" in r["msg"] and "units" in r["msg"]
    r = failed(mod, {})
    assert "one of the following is required" in r["msg"]
    assert ok(mod, {"units": []})["units"] == {}


def test_a_broken_spec_of_one_unit_fails_naming_it(mod, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text("{")
    units = [{"name": "P", "state_dir": str(tmp_path / "P")},
             {"name": "D", "state_dir": str(tmp_path / "D"), "spec_path": str(spec)}]
    r = failed(mod, {"units": units})
    assert r["msg"].startswith(f"cannot read the node spec {spec}: ")
