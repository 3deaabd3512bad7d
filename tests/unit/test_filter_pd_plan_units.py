"""The unit filters of plugins/filter/pd_plan.py on real planned specs: pd_spec_sha256
hashes the very bytes the unit modules write, pd_unit_spec adds the log rotation knobs
(or fails naming host and knobs), pd_unit_locations feeds pd_unit_info's units,
pd_container_hosts picks the container-runtime hosts of P, D and C."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pytest
from ansible.errors import AnsibleFilterError

from . import modharness  # noqa: F401  (puts plugins/module_utils on ansible.module_utils)
from .planfix import small, tutorial
from .unitnode import filters


def canonical_spec(spec):
    from ansible.module_utils.pd_unit import canonical_spec as canonical

    return canonical(spec)


@pytest.fixture(scope="module")
def plan():
    return filters()["pd_cluster_plan"](*tutorial())


def unit_spec(plan, host, unit, mb=100, backups=4):
    return filters()["pd_unit_spec"](plan, host, unit, mb, backups)


def all_units(plan):
    return [(h, u) for h, units in plan["specs"].items() for u in units]


def test_spec_sha256_is_the_sha256_of_the_canonical_spec(plan):
    sha = filters()["pd_spec_sha256"]
    units = all_units(plan)
    assert len(units) >= 5
    for host, unit in units:
        spec = unit_spec(plan, host, unit)
        assert sha(spec) == hashlib.sha256(canonical_spec(spec)).hexdigest(), (host, unit)
        # what the module gets: the spec through to_json / json.loads
        assert sha(json.loads(json.dumps(spec))) == sha(spec)
    specs = [unit_spec(plan, h, u) for h, u in units]
    assert len({sha(s) for s in specs}) == len(specs)  # every unit its own spec


def test_spec_sha256_matches_the_spec_file_pd_unit_install_writes(plan, tmp_path):
    from ansible.module_utils.pd_unit import install_unit

    spec = unit_spec(plan, "d1", "D")
    spec["dirs"] = {k: str(tmp_path / k / "D") for k in ("run", "state", "log")}
    bundle = io.BytesIO()
    with tarfile.open(fileobj=bundle, mode="w:gz") as tar:
        info = tarfile.TarInfo("pd_launcher/__main__.py")
        tar.addfile(info, io.BytesIO(b""))
    (tmp_path / "b.tar.gz").write_bytes(bundle.getvalue())
    r = install_unit(json.dumps(spec), str(tmp_path / "b.tar.gz"), str(tmp_path / "lib"), False)
    written = (tmp_path / "run" / "D" / "spec.json").read_bytes()
    assert r["spec_path"] == str(tmp_path / "run" / "D" / "spec.json")
    assert hashlib.sha256(written).hexdigest() == filters()["pd_spec_sha256"](spec)


def test_unit_spec_adds_the_log_knobs(plan):
    from pd_launcher.launcher.spec import parse_spec

    spec = unit_spec(plan, "p1", "P", "8", "3")  # inventory values may be strings
    assert spec["logs"] == {"max_bytes": 8 * 1048576, "backups": 3}
    assert {k: v for k, v in spec.items() if k != "logs"} == plan["specs"]["p1"]["P"]
    assert "logs" not in plan["specs"]["p1"]["P"]  # the plan is left as it was
    parsed = parse_spec(spec)  # the launcher takes it
    assert (parsed.logs.max_bytes, parsed.logs.backups) == (8 * 1048576, 3)
    assert unit_spec(plan, "p1", "P", 1, 0)["logs"] == {"max_bytes": 1048576, "backups": 0}
    assert unit_spec(plan, "p1", "P", 1, 100)["logs"]["backups"] == 100
    # a spec's own logs (files a process writes itself) are kept
    mine = {"specs": {"c1": {"C": {"logs": {"files": ["/l/access.log"], "backups": 9}}}}}
    assert filters()["pd_unit_spec"](mine, "c1", "C", 2, 1)["logs"] == {
        "files": ["/l/access.log"], "max_bytes": 2 * 1048576, "backups": 1}


@pytest.mark.parametrize("mb,backups,bad", [
    (0, 4, ["pd_log_max_mb"]),
    (-1, 4, ["pd_log_max_mb"]),
    ("1.5", 4, ["pd_log_max_mb"]),
    ("lots", 4, ["pd_log_max_mb"]),
    (100, 101, ["pd_log_backups"]),
    (100, -1, ["pd_log_backups"]),
    (100, "x", ["pd_log_backups"]),
    (0, 101, ["pd_log_max_mb", "pd_log_backups"]),
])
def test_unit_spec_names_host_and_knobs_when_out_of_range(plan, mb, backups, bad):
    with pytest.raises(AnsibleFilterError) as info:
        unit_spec(plan, "p2", "P", mb, backups)
    msg = str(info.value)
    assert msg.startswith("p2: "), msg
    for knob in ("pd_log_max_mb", "pd_log_backups"):
        assert (knob in msg) == (knob in bad), msg
    if "pd_log_max_mb" in bad:
        assert f"pd_log_max_mb must be an integer >= 1 (MiB), got {mb!r}" in msg
    if "pd_log_backups" in bad:
        assert f"pd_log_backups must be an integer in 0..100, got {backups!r}" in msg


def test_unit_locations_name_each_units_state_and_spec(plan):
    specs = plan["specs"]["p1"]
    assert filters()["pd_unit_locations"](specs) == [
        {"name": u, "state_dir": s["dirs"]["state"], "spec_path": s["dirs"]["run"] + "/spec.json"}
        for u, s in specs.items()]
    assert filters()["pd_unit_locations"]({}) == []


def test_container_hosts_are_the_container_runtime_hosts_of_p_d_and_c():
    groups, hostvars = small()
    groups = dict(groups, etcd=["e1"], all=["p1", "d1", "d2", "c1", "e1"])
    hostvars = {h: dict(v) for h, v in hostvars.items()}
    hostvars["e1"] = {"pd_runtime": "container"}  # not P, D or C
    pick = filters()["pd_container_hosts"]
    assert pick(groups, hostvars) == []  # the default is process
    hostvars["d2"]["pd_runtime"] = "container"
    hostvars["c1"]["pd_runtime"] = "container"
    hostvars["d1"]["pd_runtime"] = "process"
    assert pick(groups, hostvars) == ["d2", "c1"]
    # a host in two groups is listed once, groups missing from the inventory are fine
    assert pick({"P": ["d2"], "D": ["d1", "d2"]}, hostvars) == ["d2"]
    assert pick({}, hostvars) == []
