"""pd_unit_converge's `reload` action against a real launcher on 127.0.78.x: a spec that
changed only in `files`, with a `reload_signal` process, is applied by `pd_launcher
reload` (same PIDs, files written, signal sent); check mode only reports it; a change
beyond files falls back to the restart and says why."""
from __future__ import annotations

import json

import pytest

from tests.launcher.conftest import HUP_READER

from .modharness import load, ok
from .unitnode import PY, pid_alive, pids, wait_for

pytestmark = pytest.mark.slow  # real launcher processes

IP = "127.0.78.5"



@pytest.fixture(scope="module")
def mod():
    return load("pd_unit_converge")


def spec_with(node, content: str, port=None) -> dict:
    spec = node.spec(ip=IP, port=port)
    conf = node.base / "run" / "P" / "conf.txt"
    spec["files"] = [{"path": str(conf), "content": content + "\n", "mode": "0644"}]
    spec["processes"].append({"name": "agent", "argv": [PY, "-u", "-c", HUP_READER, str(conf)],
                              "env": {}, "ports": [], "ready": None, "reload_signal": "HUP"})
    return spec


def lines(node, name: str) -> list:
    path = node.base / "logs" / "P" / f"{name}.log"
    return path.read_text().splitlines() if path.exists() else []


def test_reload_action_then_fallback_to_restart(mod, node):
    node.ship()
    spec = spec_with(node, "gen1")
    port = spec["processes"][0]["ports"][0]["port"]
    r = ok(mod, node.args(spec))
    assert r["action"] == "start"
    first = node.wait()
    conf = node.base / "run" / "P" / "conf.txt"
    assert conf.read_text() == "gen1\n"

    # only files changed: reloaded in place
    spec = spec_with(node, "gen2", port)
    r = ok(mod, node.args(spec))
    assert (r["action"], r["changed"], r["spec_changed"], r["healthy"]) == (
        "reload", True, True, True), r
    assert "reload_refused" not in r
    now = node.state()
    assert pids(now) == pids(first) and all(pid_alive(x) for x in pids(now))
    assert now["reloads"] == 1 and now["last_reload_signaled"] == ["agent"]
    assert conf.read_text() == "gen2\n"
    wait_for(lambda: "HUP gen2" in lines(node, "agent"), what="agent got SIGHUP")
    assert json.loads(node.spec_path().read_text()) == spec

    # check mode: reported, nothing done
    before = node.spec_path().read_bytes()
    r = ok(mod, node.args(spec_with(node, "gen3", port)), check_mode=True)
    assert (r["action"], r["changed"]) == ("reload", True)
    assert node.spec_path().read_bytes() == before and conf.read_text() == "gen2\n"
    assert node.state()["reloads"] == 1

    # unchanged: keep
    r = ok(mod, node.args(spec))
    assert (r["action"], r["changed"]) == ("keep", False)

    # files and an env changed: the launcher refuses (exit 3), the unit is restarted
    spec = spec_with(node, "gen4", port)
    spec["processes"][0]["env"] = {"PD_TEST_GENERATION": "2"}
    r = ok(mod, node.args(spec))
    assert r["action"] == "restart" and r["healthy"] is False, r
    assert r["reload_refused"] == "processes[0].env.PD_TEST_GENERATION differs: restart needed"
    second = node.wait()
    assert second["launcher"]["pid"] != first["launcher"]["pid"]
    assert not any(pid_alive(x) for x in pids(first))
    assert conf.read_text() == "gen4\n" and second["reloads"] == 0

    # force_restart wins over a reload
    r = ok(mod, node.args(spec_with(node, "gen5", port) | {"processes": [
        dict(spec["processes"][0]), spec_with(node, "gen5", port)["processes"][1]]},
        force_restart=True))
    assert r["action"] == "restart" and "reload_refused" not in r
    third = node.wait()
    assert third["launcher"]["pid"] != second["launcher"]["pid"]
    node.stop()


def test_a_spec_without_reload_signal_is_restarted(mod, node):
    node.ship()
    spec = node.spec(ip=IP)
    ok(mod, node.args(spec))
    first = node.wait()
    spec["files"] = [{"path": str(node.base / "run" / "P" / "x.conf"), "content": "x"}]
    r = ok(mod, node.args(spec))
    assert r["action"] == "restart" and "reload_refused" not in r
    assert node.wait()["launcher"]["pid"] != first["launcher"]["pid"]
    node.stop()
