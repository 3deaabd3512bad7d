"""The deployment record (pd_deploy/record.py) and the roll plan (pd_deploy/roll.py) on
real plans: what a run records, what scale in finds to remove, stale and orphan rows in
the status table, the order and drains of a rolling restart and the roll's refusals."""
from __future__ import annotations

import json

import pytest

from pd_deploy import record, roll
from pd_deploy.status_table import is_stale, pd_status_table

from .planfix import tutorial
from .unitnode import filters

NOW = "2026-12-04T10:00:00+00:00"
LATER = "2026-12-05T10:00:00+00:00"


def plan_of(groups, hostvars):
    return filters()["pd_cluster_plan"](groups, hostvars)


def four_instances():
    """tutorial() plus a second decode instance of the same shape: d3 + d4."""
    groups, hostvars = tutorial()
    groups = dict(groups, D=groups["D"] + ["d3", "d4"])
    hostvars = dict(hostvars, d3=dict(hostvars["d1"], ansible_host="10.0.0.5",
                                      host_ip="10.0.0.5"),
                    d4=dict(hostvars["d1"], ansible_host="10.0.0.6", host_ip="10.0.0.5"))
    return groups, hostvars


def test_update_records_every_planned_unit_without_secrets():
    groups, hostvars = tutorial()
    hostvars = {h: dict(v, ansible_password="hunter2", ansible_user="ops")
                for h, v in hostvars.items()}
    plan = plan_of(groups, hostvars)
    rec = record.update(record.empty("t"), plan, hostvars, NOW)
    assert record.check(rec, "t") == []
    assert set(rec["hosts"]) == {"p1", "p2", "d1", "d2", "c1"}
    p1 = rec["hosts"]["p1"]
    assert p1["connection"] == {"ansible_host": "10.0.0.1", "ansible_user": "ops"}
    assert p1["knobs"]["pd_python"] == "python3" and p1["knobs"]["pd_runtime"] == "process"
    unit = p1["units"]["P"]
    assert unit["state"] == "deployed" and unit["instance"] == "P1"
    assert unit["phase"] == "engines" and unit["deployed_at"] == NOW
    # the hash of the very spec node_unit writes (plan spec + log knobs)
    want = filters()["pd_spec_sha256"](filters()["pd_unit_spec"](plan, "p1", "P", 100, 4))
    assert unit["spec_sha256"] == want
    assert "hunter2" not in record.dumps(rec)


def test_a_converged_rerun_writes_the_same_bytes():
    groups, hostvars = tutorial()
    plan = plan_of(groups, hostvars)
    first = record.update(record.empty("t"), plan, hostvars, NOW)
    again = record.update(first, plan, hostvars, LATER)
    assert record.dumps(again) == record.dumps(first)
    # a changed spec moves deployed_at of that unit only
    hostvars2 = dict(hostvars, p2=dict(hostvars["p2"], pd_extra_args=["--enforce-eager"]))
    changed = record.update(first, plan_of(groups, hostvars2), hostvars2, LATER)
    assert changed["hosts"]["p2"]["units"]["P"]["deployed_at"] == LATER
    assert changed["hosts"]["p1"]["units"]["P"]["deployed_at"] == NOW


def test_a_failed_preflight_records_nothing():
    groups, hostvars = tutorial()
    plan = plan_of(groups, hostvars)
    hv = {h: dict(v, pd_preflight_report={"results": []}) for h, v in hostvars.items()}
    hv["d2"] = dict(hv["d2"], pd_preflight_report={"failed": True})
    assert record.update(record.empty("t"), plan, hv, NOW)["hosts"] == {}
    hv["d2"] = {k: v for k, v in hv["d2"].items() if k != "pd_preflight_report"}
    assert record.update(record.empty("t"), plan, hv, NOW)["hosts"] == {}  # unreachable
    hv["d2"]["pd_preflight_report"] = {"results": []}
    assert len(record.update(record.empty("t"), plan, hv, NOW)["hosts"]) == 5


def test_removals_are_recorded_units_the_plan_lost_and_mark_removed():
    big = four_instances()
    rec = record.update(record.empty("t"), plan_of(*big), big[1], NOW)
    small_plan = plan_of(*tutorial())
    gone = record.removals(rec, small_plan)
    assert [(g["host"], g["in_inventory"], [u["name"] for u in g["units"]]) for g in gone] \
        == [("d3", False, ["D"]), ("d4", False, ["D"])]
    assert gone[0]["connection"]["ansible_host"] == "10.0.0.5"
    after = record.mark_removed(rec, {"d3": ["D"], "d4": ["D"]}, LATER)
    assert after["hosts"]["d3"]["units"]["D"]["state"] == "removed"
    assert record.removals(after, small_plan) == []
    # the small plan's record update keeps d3 (only the removal marks it)
    assert "d3" in record.update(rec, small_plan, tutorial()[1], LATER)["hosts"]


def test_load_names_the_file_and_what_is_wrong(tmp_path):
    path = tmp_path / "r.json"
    assert record.load(str(path), "t") == record.empty("t")
    path.write_text("{not json")
    with pytest.raises(record.RecordError, match=str(path)):
        record.load(str(path), "t")
    path.write_text(json.dumps(dict(record.empty("other"))))
    with pytest.raises(record.RecordError, match="records cluster 'other', not 't'"):
        record.load(str(path), "t")
    path.write_text(json.dumps({"pd_deploy_record": 1, "cluster": "t", "hosts": {
        "p1": {"connection": {}, "units": {"P": {"state": "running"}}}}}))
    with pytest.raises(record.RecordError, match="host p1, unit P: needs state"):
        record.load(str(path), "t")


def test_record_file_sits_beside_the_inventory(tmp_path):
    inv = tmp_path / "inv" / "inventory.yml"
    inv.parent.mkdir()
    inv.write_text("all: {}\n")
    assert record.record_file([str(inv)], "c") == str(inv.parent / "pd-deploy-record.c.json")
    assert record.record_file([str(inv.parent)], "c") == str(inv.parent
                                                             / "pd-deploy-record.c.json")
    assert record.record_file([str(inv)], "c", "/x/r.json") == "/x/r.json"
    with pytest.raises(record.RecordError, match="pd_record_file"):
        record.record_file([], "c")


def test_status_shows_stale_and_orphan_units():
    big = four_instances()
    rec = record.update(record.empty("t"), plan_of(*big), big[1], NOW)
    groups, hostvars = tutorial()
    plan = plan_of(groups, hostvars)
    want = record.spec_sha256(record.unit_spec(plan, "p1", "P", hostvars["p1"]))
    unit = {"recorded": True, "running": True, "processes": [], "spec_sha256": want}
    assert not is_stale(want, unit)
    assert is_stale(want, dict(unit, running_spec_sha256="0" * 64))
    assert not is_stale(want, dict(unit, recorded=False, spec_sha256="0" * 64))
    hv = {h: dict(v, pd_status_units={"units": {}}) for h, v in hostvars.items()}
    hv["p1"]["pd_status_units"] = {"units": {"P": dict(unit, spec_sha256="f" * 64)}}
    hv["d3"] = {"pd_status_orphans": {"units": {"D": {
        "recorded": True, "running": True, "uptime_s": 5,
        "processes": [{"ready": True, "ports": ["10.0.0.5:7100/api"], "dp_ranks": [0]}]}}}}
    lines = pd_status_table(plan, hv, record.removals(rec, plan))
    p1 = next(line for line in lines if line.startswith("p1 "))
    assert "STALE stopped" in p1 or "STALE running" in p1
    d3 = next(line for line in lines if line.startswith("d3 "))
    assert "ORPHAN running" in d3 and "7100" in d3
    assert any("2 orphan unit(s)" in line and "d3/D, d4/D" in line for line in lines)
    assert "ORPHAN (not looked at)" in next(line for line in lines if line.startswith("d4 "))
    assert any("1 stale unit(s)" in line and "p1/P" in line for line in lines)
    hv["d3"] = {"pd_status_orphans": {"unreachable": True}}
    lines = pd_status_table(plan, hv, record.removals(rec, plan))
    assert "ORPHAN (unreachable)" in next(line for line in lines if line.startswith("d3 "))


def test_roll_order_upstreams_and_picks():
    plan = plan_of(*four_instances())
    got = roll.roll_plan(plan, "all")
    assert got["errors"] == []
    assert [(i["name"], i["role"]) for i in got["instances"]] == [
        ("P1", "P"), ("P2", "P"), ("D1", "D"), ("D2", "D")]
    p1 = got["instances"][0]
    assert p1["upstreams"] == ["10.0.0.1:7100", "10.0.0.1:7101"]
    assert len(got["instances"][2]["upstreams"]) == 32  # D1: one per DP rank
    assert [i["name"] for i in roll.roll_plan(plan, "D")["instances"]] == ["D1", "D2"]
    assert [i["name"] for i in roll.roll_plan(plan, "all", "D2, P1")["instances"]] == [
        "P1", "D2"]
    assert [i["name"] for i in roll.roll_plan(plan, "all", None, ["D2"])["instances"]] \
        == ["D2"]


def test_roll_refusals_name_what_is_wrong():
    plan = plan_of(*four_instances())
    errs = roll.roll_plan(plan, "X", "P9")["errors"]
    assert any("pd_restart_scope: must be P, D or all" in e for e in errs)
    assert any("no instance 'P9'" in e for e in errs)
    assert any("P1 is a P instance, outside pd_restart_scope D" in e
               for e in roll.roll_plan(plan, "D", "P1")["errors"])
    # the tutorial has one decode instance: rolling it leaves no decode
    lone = plan_of(*tutorial())
    errs = roll.roll_plan(lone, "D")["errors"]
    assert errs and "D1: the only D instance serving" in errs[0]
    assert roll.roll_plan(lone, "D", allow_outage=True)["errors"] == []


def test_appending_an_instance_changes_only_the_front_doors_pools():
    # KV ranges do not move, so no engine restarts; the front door differs only in what
    # its launcher reloads in place (files, proxy block)
    from pd_launcher.launcher.spec import parse_spec, reload_differences

    small = plan_of(*tutorial())
    big = plan_of(*four_instances())
    for host in ("p1", "p2", "d1", "d2"):
        for unit, spec in small["specs"][host].items():
            assert big["specs"][host][unit] == spec, f"{host}/{unit} changed"
    assert big["specs"]["c1"]["C"] != small["specs"]["c1"]["C"]
    assert reload_differences(parse_spec(small["specs"]["c1"]["C"]),
                              parse_spec(big["specs"]["c1"]["C"])) == []


def test_pending_instances_are_the_ones_preflight_saw_running_another_spec():
    plan = plan_of(*four_instances())
    fresh = {"item": "D", "converged": True, "running": True}
    changed = {"item": "D", "converged": False, "running": True}
    stopped = {"item": "P", "converged": False, "running": False}
    hv = {"d1": {"pd_preflight_report": {"results": [fresh]}},
          "d4": {"pd_preflight_report": {"results": [changed]}},
          "p1": {"pd_preflight_report": {"results": [stopped]}}}
    assert roll.pending_instances(plan, hv) == ["D2"]
    assert roll.pending_instances(plan, {}) == []
