"""plugins/modules/pd_unit_converge.py run in-process against a real launcher: the
need_bundle protocol, first start, keep, restart on a spec change or force_restart,
check mode, a failing `run --check`. Every launcher started is stopped at teardown."""
from __future__ import annotations

import json
import os
import socket

import pytest

from .modharness import failed, load, ok
from .unitnode import IP, bundle, free_port, pid_alive, pids

pytestmark = pytest.mark.slow  # real launcher processes


@pytest.fixture(scope="module")
def mod():
    return load("pd_unit_converge")


def files_under(path) -> list:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


def test_a_fresh_node_without_the_bundle_needs_it_and_nothing_is_written(mod, node):
    r = ok(mod, node.args(node.spec()))
    assert r["need_bundle"] is True and r["action"] == "none"
    assert r["changed"] is False and r["healthy"] is False and r["running"] is False
    assert not node.base.exists()
    # another bundle on the node (an older release) is not the wanted one either
    node.lib.mkdir(parents=True)
    node.bundle_path.write_bytes(b"an older bundle")
    r = ok(mod, node.args(node.spec()))
    assert r["need_bundle"] is True and r["action"] == "none"
    assert files_under(node.base) == ["lib", "lib/pd_launcher.tar.gz"]


def test_start_keep_restart_force_restart(mod, node):
    node.ship()
    spec = node.spec()
    r = ok(mod, node.args(spec))
    assert r["need_bundle"] is False and r["failed"] is False
    assert r["action"] == "start", r["action"]
    assert r["changed"] and r["lib_changed"] and r["spec_changed"]
    assert r["healthy"] is False and r["running"] is False
    assert (node.lib / ".bundle.sha256").read_text().strip() == bundle()[1]
    assert json.loads(node.spec_path().read_text()) == spec
    first = node.wait()
    assert all(pid_alive(pid) for pid in pids(first))

    # converged: nothing to do, and the bundle is not needed any more
    node.bundle_path.unlink()
    r = ok(mod, node.args(spec))
    assert (r["action"], r["changed"], r["healthy"], r["running"]) == ("keep", False, True, True)
    assert r["need_bundle"] is False and r["created"] == [] and r["damage"] == []
    assert node.state()["launcher"]["pid"] == first["launcher"]["pid"]

    # a spec change restarts the unit: a new launcher and new processes, the old gone
    spec["processes"][0]["env"] = {"PD_TEST_GENERATION": "2"}
    r = ok(mod, node.args(spec))
    assert r["action"] == "restart" and r["changed"] and r["spec_changed"]
    assert not r["lib_changed"] and r["healthy"] is False
    second = node.wait()
    assert second["launcher"]["pid"] != first["launcher"]["pid"]
    assert not any(pid_alive(pid) for pid in pids(first))
    assert all(pid_alive(pid) for pid in pids(second))
    with open(f"/proc/{second['processes'][0]['pid']}/environ", "rb") as f:
        assert b"PD_TEST_GENERATION=2" in f.read().split(b"\0")

    # force_restart with nothing changed
    r = ok(mod, node.args(spec, force_restart=True))
    assert r["action"] == "restart" and r["changed"]
    assert not r["spec_changed"] and not r["lib_changed"]
    third = node.wait()
    assert third["launcher"]["pid"] != second["launcher"]["pid"]
    assert not any(pid_alive(pid) for pid in pids(second))

    # another launcher on the node (an older release): the bundle is needed again, and
    # nothing is touched until it is there; then the unit restarts on the new launcher
    (node.lib / ".bundle.sha256").write_text("0" * 64 + "\n")
    r = ok(mod, node.args(spec))
    assert r["need_bundle"] is True and r["action"] == "none" and r["changed"] is False
    assert node.state()["launcher"]["pid"] == third["launcher"]["pid"]
    assert all(pid_alive(pid) for pid in pids(third))
    node.ship()
    r = ok(mod, node.args(spec))
    assert r["action"] == "restart" and r["lib_changed"] and not r["spec_changed"]
    assert (node.lib / ".bundle.sha256").read_text().strip() == bundle()[1]
    fourth = node.wait()
    assert not any(pid_alive(pid) for pid in pids(third))

    node.stop()
    assert not any(pid_alive(pid) for pid in pids(fourth))
    assert node.state() is None
    # stopped (or crashed) with nothing changed: started again
    r = ok(mod, node.args(spec))
    assert r["action"] == "start" and r["changed"] and not r["spec_changed"]
    node.wait()
    node.stop()


def test_check_mode_changes_nothing(mod, node):
    node.ship()
    spec = node.spec()
    r = ok(mod, node.args(spec), check_mode=True)
    assert r["changed"] and r["lib_changed"] and r["spec_changed"]
    assert r["action"] == "start" and r["need_bundle"] is False
    assert files_under(node.base) == ["lib", "lib/pd_launcher.tar.gz"]

    ok(mod, node.args(spec))
    before = node.wait()
    r = ok(mod, node.args(spec), check_mode=True)
    assert (r["action"], r["changed"], r["healthy"]) == ("keep", False, True)
    spec_bytes = node.spec_path().read_bytes()
    spec["processes"][0]["env"] = {"PD_TEST_GENERATION": "2"}
    for args in (node.args(spec), node.args(json.loads(spec_bytes), force_restart=True)):
        r = ok(mod, args, check_mode=True)
        assert r["action"] == "restart" and r["changed"]
        assert node.spec_path().read_bytes() == spec_bytes
        now = node.state()
        assert now["launcher"]["pid"] == before["launcher"]["pid"]
        assert all(pid_alive(pid) for pid in pids(before))
    node.stop()


def test_a_failing_check_names_the_port_and_starts_nothing(mod, node):
    node.ship()
    port = free_port()
    foreign = socket.socket()
    foreign.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    foreign.bind((IP, port))
    foreign.listen()
    try:
        r = failed(mod, node.args(node.spec(port=port)))
        assert r["msg"].startswith("checking the node for the spec failed (exit 3): "), r["msg"]
        assert f"{IP}:{port}" in r["msg"]
        assert node.state() is None
        assert not (node.base / "state" / "P" / "launcher.json").exists()
        out = node.base / "logs" / "P" / "launcher.out"
        assert not out.exists() or out.read_text() == ""
        # the foreign listener was left alone and still holds its port
        assert foreign.fileno() >= 0 and foreign.getsockname() == (IP, port)
    finally:
        foreign.close()
    # once the port is free the next run starts the unit (the spec was installed)
    r = ok(mod, node.args(node.spec(port=port)))
    assert r["action"] == "start" and not r["spec_changed"]
    node.wait()
    node.stop()


def test_without_bundle_sha256_the_bundle_must_be_on_the_node(mod, node):
    r = failed(mod, node.args(node.spec(), bundle_sha256=""))
    assert r["msg"] == f"launcher bundle {node.bundle_path} is missing on the node"
    assert not (node.base / "state").exists()


def test_a_bad_spec_fails_without_echoing_it(mod, node):
    node.ship()
    r = failed(mod, node.args(node.spec(), spec_json=json.dumps({"api_key": "s3cret"})))
    assert r["msg"].startswith("spec_json is not a node spec with dirs.run")
    assert "s3cret" not in r["msg"]
    assert os.listdir(node.lib) == ["pd_launcher.tar.gz"]


def test_a_bundle_that_is_not_base64_is_refused_and_nothing_is_written(mod, node):
    r = failed(mod, node.args(node.spec(), bundle_b64="not base64!"))
    assert r["msg"].startswith("bundle_b64 is not base64")
    assert not (node.base / "state").exists() and not node.lib.exists()
