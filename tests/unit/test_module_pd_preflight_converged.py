"""plugins/modules/pd_preflight.py `converged` (preflight.yml: a unit already running
this spec and launcher, ready, is skipped by node_unit) against real launchers."""
from __future__ import annotations

import json
import os
import signal

import pytest

from .modharness import load, ok
from .unitnode import PY, bundle, filters, pid_alive, wait_for

pytestmark = pytest.mark.slow  # real launcher processes


@pytest.fixture(scope="module")
def mod():
    return load("pd_preflight")


def preflight_args(node, spec, **want):
    f = filters()
    converged = {"spec_path": spec["dirs"]["run"] + "/spec.json",
                 "spec_sha256": f["pd_spec_sha256"](spec), "lib_dir": str(node.lib),
                 "bundle_sha256": bundle()[1]}
    converged.update(want)
    return {"spec": f["pd_spec_checks"](spec), "state_dir": spec["dirs"]["state"],
            "python": PY, "min_free_mb": 1, "converged": converged}


def test_converged_while_it_runs_this_spec_and_launcher_ready(mod, node):
    converge = load("pd_unit_converge")
    node.ship()
    spec = node.spec("P")
    args = preflight_args(node, spec)
    r = ok(mod, args)  # nothing there yet
    assert r["converged"] is False and r["owned_ports"] == 0

    ok(converge, node.args(spec))
    st = node.wait("P")
    r = ok(mod, args)
    assert r["converged"] is True and r["owned_ports"] == 1 and r["changed"] is False
    assert ok(mod, args, check_mode=True)["converged"] is True
    no_want = {k: v for k, v in args.items() if k != "converged"}
    assert ok(mod, no_want)["converged"] is False  # only asked for

    # another spec or launcher wanted: not converged
    other = dict(spec, grace_seconds=4)
    assert ok(mod, preflight_args(node, other))["converged"] is False
    assert ok(mod, dict(args, converged=dict(args["converged"], bundle_sha256="0" * 64))
              )["converged"] is False
    assert ok(mod, dict(args, converged={"spec_path": args["converged"]["spec_path"]})
              )["converged"] is False  # an incomplete dict is no error, just not converged

    # the spec file on the node changed (same JSON, other bytes)
    spec_file = node.spec_path("P")
    spec_bytes = spec_file.read_bytes()
    spec_file.write_text(json.dumps(spec))
    assert ok(mod, args)["converged"] is False
    spec_file.write_bytes(spec_bytes)
    assert ok(mod, args)["converged"] is True

    # a process died (the launcher then stops the unit: no restart policy in this spec)
    engine = st["processes"][0]["pid"]
    os.kill(engine, signal.SIGKILL)
    wait_for(lambda: not pid_alive(engine), 5, "engine gone")
    r = ok(mod, args)
    assert r["converged"] is False and r["owned_ports"] == 0
    node.stop("P")


def test_a_running_unit_that_is_not_ready_is_not_converged(mod, node):
    converge = load("pd_unit_converge")
    node.ship()
    spec = node.spec("D")
    url = spec["processes"][0]["ready"]["url"]
    spec["processes"][0]["ready"]["url"] = url.replace("/health", "/starting")  # 404
    ok(converge, node.args(spec))
    wait_for(lambda: (node.state("D") or {}).get("status") == "running", 15, "D running")
    r = ok(mod, preflight_args(node, spec))
    assert r["converged"] is False and r["owned_ports"] == 1
    node.stop("D")
