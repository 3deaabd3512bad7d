"""`pd-deploy import omni-infer`: Omni-Infer inventories (legacy one-file layout and the
role-based layout) -> a pd-deploy inventory directory that loads through Ansible and plans.

Fixtures: tests/fixtures/omni/ (written for these tests, shaped like Omni-Infer's files).
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from pd_deploy.cli import plan_document
from pd_deploy.inventory import load_inventory
from pd_deploy.omni_import import Finding, ImportRefused, import_omni
from pd_deploy.topology import ClusterPlan, build_plan

REPO = Path(__file__).resolve().parents[2]
FIX = REPO / "tests" / "fixtures" / "omni"
LEGACY = FIX / "legacy_1p32_1d32.yml"
ROLES = FIX / "roles_2p16_1d32.yml"
SINGLE = FIX / "single_node_1p1d.yml"
MODEL = "/data/models/deepseek"
DEVICES16 = ",".join(str(i) for i in range(16))


def fixture(path: Path = LEGACY) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def write(tmp: Path, doc: Any, name: str = "omni.yml") -> Path:
    path = tmp / name
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    return path


def load_plan(out: Path) -> tuple[dict[str, list[str]], dict[str, dict[str, Any]], ClusterPlan]:
    """The written directory as ansible-playbook reads it, planned."""
    groups, hostvars = load_inventory(str(out / "inventory.yml"))
    return groups, hostvars, build_plan(groups, hostvars)


def host(doc: dict[str, Any], group: str, name: str) -> dict[str, Any]:
    return doc["all"]["children"][group]["hosts"][name]


def keys(findings: list[Finding]) -> list[tuple[str, str]]:
    return [(f.where, f.field) for f in findings]


def refused(tmp: Path, doc: Any, **kw: Any) -> list[Finding]:
    """Import must fail; nothing may be written (no output, no staging directory)."""
    before = sorted(os.listdir(tmp))
    out = tmp / "out"
    with pytest.raises(ImportRefused) as exc:
        import_omni(str(write(tmp, doc)), str(out), **{"model_path": MODEL, **kw})
    assert not out.exists()
    assert sorted(os.listdir(tmp)) == sorted(set(before) | {"omni.yml"})
    return exc.value.errors


# ---------------------------------------------------------------- golden


def test_golden_1p32_1d32_plans_one_p_one_d_and_the_proxy_on_p0(tmp_path):
    out = tmp_path / "cluster"
    result, _ = import_omni(str(LEGACY), str(out), model_path=MODEL)
    assert sorted(result.files) == ["group_vars/D.yml", "group_vars/P.yml",
                                    "group_vars/all.yml", "inventory.yml"]
    groups, hostvars, plan = load_plan(out)
    shape = [(i.name, i.role, i.master, i.hosts, i.dp_size, i.tp, i.engine)
             for i in plan.instances]
    assert shape == [
        ("P1", "P", "p0", ["p0", "p1", "p2", "p3"], 4, 16, "vllm-ascend"),
        ("D1", "D", "d0", ["d0", "d1", "d2", "d3"], 64, 1, "vllm-ascend"),
    ]
    assert groups["C"] == ["p0"]
    assert [(p.host, p.listen) for p in plan.proxies] == [("p0", "192.0.2.10:7000")]
    assert plan.prefill_upstreams == [f"192.0.2.1{i}:9000" for i in range(4)]
    decode = plan.decode_upstreams
    assert len(decode) == 64 and decode[0] == "192.0.2.20:9100" and decode[-1] == \
        "192.0.2.23:9115"
    assert [i.dp_rpc_port for i in plan.instances] == [8000, 8100]
    assert all(hostvars[f"p{i}"]["host_ip"] == "192.0.2.10" for i in range(4))
    assert all(hostvars[f"d{i}"]["host_ip"] == "192.0.2.20" for i in range(4))
    assert hostvars["d3"]["devices"] == DEVICES16
    assert plan.nodes["d1"].start_rank == 16
    assert plan.instances[0].model_path == MODEL
    doc = plan_document(groups, hostvars)  # the full node-spec contract builds too
    assert doc["nodes"]["p0"]["roles"] == ["P", "C"]


def test_written_files_carry_the_import_header(tmp_path):
    out = tmp_path / "cluster"
    import_omni(str(LEGACY), str(out), model_path=MODEL)
    text = (out / "inventory.yml").read_text()
    assert text.startswith("# pd-deploy inventory")
    assert f"# Imported from the Omni-Infer inventory {LEGACY}\n" in text
    assert "#   d1: api_port: 9101 not kept" in text
    for name in ("all", "P", "D"):
        gv = (out / "group_vars" / f"{name}.yml").read_text()
        assert f"Imported from the Omni-Infer inventory {LEGACY}" in gv
    all_yml = yaml.safe_load((out / "group_vars" / "all.yml").read_text())
    assert all_yml["pd_engine"] == "vllm-ascend" and all_yml["pd_proxy_port"] == 7000
    assert all_yml["ansible_user"] == "root"  # connection variables are kept
    assert oct(out.stat().st_mode & 0o777) != oct(0o700)


def test_dropped_field_report_of_the_golden_inventory(tmp_path):
    result, _ = import_omni(str(LEGACY), str(tmp_path / "o"), model_path=MODEL)
    assert keys(result.dropped) == [("c0", "role"), ("d1", "api_port"), ("d2", "api_port"),
                                    ("d3", "api_port")]
    d1 = next(f for f in result.dropped if f.where == "d1")
    assert "9101" in d1.text and "9100" in d1.text
    assert "group" in result.dropped[0].text
    assert any("TP64" in n and "DP4 x TP16" in n for n in result.notes)


# ---------------------------------------------------------------- the newer layout


def test_role_based_layout_with_subgroups(tmp_path):
    out = tmp_path / "o"
    result, _ = import_omni(str(ROLES), str(out), model_path=MODEL)
    groups, hostvars, plan = load_plan(out)
    assert [(i.name, i.hosts, i.dp_size, i.tp, i.api_port, i.dp_rpc_port)
            for i in plan.instances] == [
        ("P1", ["p0", "p1"], 2, 8, 9600, 8600),
        ("P2", ["p2", "p3"], 2, 8, 9610, 8610),
        ("D1", ["d0", "d1"], 16, 1, 9700, 8700),
    ]
    assert [(p.host, p.port) for p in plan.proxies] == [("p0", 7300)]
    assert hostvars["p3"]["pd_api_port"] == 9610  # instances differ: per host
    dropped = keys(result.dropped)
    for item in [("all", "etcd_port"), ("p2", "e_api_port"), ("d0", "kv_rank"),
                 ("c0", "host_ip"), ("c0", "ascend_rt_visible_devices"), ("p1", "api_port"),
                 ("p3", "api_port"), ("d1", "api_port")]:
        assert item in dropped, item
    assert len(dropped) == 8
    assert not any(f.startswith("ansible_") or f in ("global_port_base", "port_offset")
                   for _, f in dropped)


def test_one_machine_layout_keeps_templated_addresses(tmp_path):
    out = tmp_path / "o"
    import_omni(str(SINGLE), str(out), model_path=MODEL)
    groups, hostvars, plan = load_plan(out)
    assert groups["C"] == ["p0"]
    assert {h: hostvars[h]["ansible_host"] for h in ("p0", "d0")} == \
        {"p0": "203.0.113.7", "d0": "203.0.113.7"}
    assert [(i.name, i.dp_size, i.tp) for i in plan.instances] == [("P1", 1, 8), ("D1", 8, 1)]
    all_yml = yaml.safe_load((out / "group_vars" / "all.yml").read_text())
    assert all_yml["ansible_python_interpreter"] == "{{ ansible_playbook_python }}"


def test_two_prefill_instances_on_one_machine(tmp_path):
    """Omni-Infer's 1machine2p shape: two one-node P instances per machine on split
    devices (subgroups PA/PB, distinct kv_ranks)."""
    doc = fixture()
    hosts = doc["all"]["children"]["P"]["hosts"]
    for name, ip, kv, dev in (("p0", ".10", 0, "0,1,2,3,4,5,6,7"),
                              ("p1", ".11", 1, "0,1,2,3,4,5,6,7"),
                              ("p2", ".10", 2, "8,9,10,11,12,13,14,15"),
                              ("p3", ".11", 3, "8,9,10,11,12,13,14,15")):
        hosts[name].update(ansible_host=f"192.0.2{ip}", host_ip=f"192.0.2{ip}", kv_rank=kv,
                           node_rank=0, ascend_rt_visible_devices=dev)
    doc["all"]["children"]["P"] = {"children": {
        "PA": {"hosts": {"p0": hosts["p0"], "p1": hosts["p1"]}},
        "PB": {"hosts": {"p2": hosts["p2"], "p3": hosts["p3"]}},
    }}
    out = tmp_path / "o"
    import_omni(str(write(tmp_path, doc)), str(out), model_path=MODEL)
    _, hostvars, plan = load_plan(out)
    assert [(i.name, i.hosts, i.api_port) for i in plan.instances if i.role == "P"] == [
        ("P1", ["p0"], 9000), ("P2", ["p1"], 9001), ("P3", ["p2"], 9002), ("P4", ["p3"], 9003)]
    assert hostvars["p2"]["pd_dp_rpc_port"] == 8002


# ---------------------------------------------------------------- playbooks


def test_legacy_playbook_gives_model_path_decode_tp_and_max_model_len(tmp_path):
    out = tmp_path / "o"
    result, _ = import_omni(str(SINGLE), str(out), playbook=str(FIX / "legacy_playbook.yml"))
    _, hostvars, plan = load_plan(out)
    p1, d1 = plan.instances
    assert p1.model_path == d1.model_path == "/data/models/deepseek-v3-w8a8"
    assert (d1.tp, d1.dp_size) == (2, 4)
    assert p1.extra_args == ["--max-model-len", "32000"]
    assert d1.extra_args == ["--max-model-len", "16384"]
    dropped = keys(result.dropped)
    for field in ("environment.LOG_PATH", "environment.DOCKER_IMAGE_ID",
                  "vars.ranktable_save_path", "vars.run_vllm_server_decode_cmd"):
        assert ("playbook", field) in dropped, field
    assert ("playbook", "environment.MODEL_PATH") not in dropped
    assert "its playbook" in (out / "inventory.yml").read_text()


def test_role_based_playbook_and_model_path_override(tmp_path):
    out = tmp_path / "o"
    result, _ = import_omni(str(SINGLE), str(out), playbook=str(FIX / "roles_playbook.yml"),
                            model_path="/override")
    _, _, plan = load_plan(out)
    assert plan.instances[1].extra_args == ["--max-model-len", "16384"]
    assert plan.instances[0].model_path == "/override"
    assert any("not the playbook's /data/models/pangu" in n for n in result.notes)


# ---------------------------------------------------------------- refusals


def _mutate(fn: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    doc = copy.deepcopy(fixture())
    fn(doc)
    return doc


def _set(group: str, name: str, **values: Any) -> Callable[[dict[str, Any]], None]:
    return lambda doc: host(doc, group, name).update(values)


def _drop(group: str, name: str, key: str) -> Callable[[dict[str, Any]], None]:
    return lambda doc: host(doc, group, name).pop(key)


BAD: list[tuple[str, Callable[[dict[str, Any]], None], tuple[str, str]]] = [
    ("host_ip of no host", _set("P", "p2", host_ip="192.0.2.99"), ("p2", "host_ip")),
    ("host_ip of a non-master", lambda d: (host(d, "P", "p2").update(host_ip="192.0.2.11"),
                                           host(d, "P", "p1").update(host_ip="192.0.2.10")),
     ("p2", "host_ip")),
    ("host_ip not an IP", _set("D", "d2", host_ip="decode-master"), ("d2", "host_ip")),
    ("missing host_ip", _drop("D", "d3", "host_ip"), ("d3", "host_ip")),
    ("missing ansible_host", _drop("D", "d1", "ansible_host"), ("d1", "ansible_host")),
    ("missing devices", _drop("P", "p3", "ascend_rt_visible_devices"),
     ("p3", "ascend_rt_visible_devices")),
    ("empty device id", _set("P", "p1", ascend_rt_visible_devices="0,1,,3"),
     ("p1", "ascend_rt_visible_devices")),
    ("device not a number", _set("P", "p1", ascend_rt_visible_devices="0,npu1"),
     ("p1", "ascend_rt_visible_devices")),
    ("device twice", _set("D", "d0", ascend_rt_visible_devices="0,1,1"),
     ("d0", "ascend_rt_visible_devices")),
    ("group missing", lambda d: d["all"]["children"].pop("D"), ("all", "children.D")),
    ("unknown group", lambda d: d["all"]["children"].update(
        E={"hosts": {"e0": {"ansible_host": "192.0.2.30"}}}), ("all", "children.E")),
    ("undefined template variable", _set("P", "p0", node_port="{{ master_port_base + 1 }}"),
     ("p0", "node_port")),
    ("port out of range", _set("D", "d0", api_port=70000), ("d0", "api_port")),
    ("kv_rank differs in an instance", _set("P", "p1", kv_rank=1), ("p1", "kv_rank")),
    ("node_rank twice", _set("D", "d2", node_rank=1), ("d2", "node_rank")),
    ("master node_rank not 0", _set("D", "d0", node_rank=5), ("d0", "node_rank")),
    ("unequal prefill nodes", _set("P", "p2", ascend_rt_visible_devices="0,1,2,3"),
     ("p2", "ascend_rt_visible_devices")),
    ("host in P and D", lambda d: d["all"]["children"]["D"]["hosts"].update(
        p1=host(d, "P", "p1")), ("p1", "groups")),
    ("two proxies on one host", lambda d: d["all"]["children"]["C"]["hosts"].update(
        c1={"ansible_host": "192.0.2.10", "node_port": 7001}), ("c1", "ansible_host")),
    # the guide's own template puts p2 and p3 on one address: pd-deploy's planner refuses
    # the shared devices, and the import passes its error on
    ("planner refuses", _set("P", "p3", ansible_host="192.0.2.12"), ("p3", "devices")),
]


@pytest.mark.parametrize("mutation,where", [(m, w) for _, m, w in BAD],
                         ids=[name for name, _, _ in BAD])
def test_bad_input_names_host_and_field_and_writes_nothing(tmp_path, mutation, where):
    errors = refused(tmp_path, _mutate(mutation))
    assert where in keys(errors), errors


def test_every_error_is_reported_at_once(tmp_path):
    def many(doc: dict[str, Any]) -> None:
        _set("P", "p2", host_ip="192.0.2.99")(doc)
        _set("D", "d3", ascend_rt_visible_devices="x")(doc)
        _drop("D", "d1", "ansible_host")(doc)
        doc["all"]["children"]["E"] = {"hosts": {"e0": {"ansible_host": "192.0.2.30"}}}

    errors = refused(tmp_path, _mutate(many), model_path=None)
    assert set(keys(errors)) >= {("p2", "host_ip"), ("d3", "ascend_rt_visible_devices"),
                                 ("d1", "ansible_host"), ("all", "children.E"),
                                 ("all", "model_path")}


def test_invalid_and_unreadable_files(tmp_path):
    errors = refused(tmp_path, "all:\n  children: [P\n")
    assert keys(errors) == [(str(tmp_path / "omni.yml"), "yaml")]
    assert keys(refused(tmp_path, "- just\n- a list\n")) == [("all", "all")]
    missing = tmp_path / "nowhere.yml"
    with pytest.raises(ImportRefused) as exc:
        import_omni(str(missing), str(tmp_path / "out"), model_path=MODEL)
    assert keys(exc.value.errors) == [(str(missing), "file")]
    assert not (tmp_path / "out").exists()


def test_playbook_errors(tmp_path):
    book = [{"hosts": "all", "vars": {"run_server_decode_profile": {
        "args": ["--tp REPLACE_WITH_DECODE_TENSOR_PARALLEL_SIZE"]}}}]
    path = write(tmp_path, book, "book.yml")
    errors = refused(tmp_path, fixture(), playbook=str(path))
    assert ("playbook", "vars.run_server_decode_profile.args") in keys(errors)
    assert ("all", "model_path") not in keys(errors)  # --model-path given


def test_existing_output_directory_needs_force(tmp_path):
    out = tmp_path / "out"
    (out / "group_vars").mkdir(parents=True)
    (out / "inventory.yml").write_text("old\n")
    (out / "group_vars" / "P.yml").write_text("pd_tp: 3\n")
    (out / "host_vars").mkdir()
    (out / "host_vars" / "p0.yml").write_text("---\nnic: eth9\n")
    with pytest.raises(ImportRefused) as exc:
        import_omni(str(LEGACY), str(out), model_path=MODEL)
    assert keys(exc.value.errors) == [(str(out), "-o")]
    assert (out / "inventory.yml").read_text() == "old\n"
    assert sorted(p.name for p in out.rglob("*")) == ["P.yml", "group_vars", "host_vars",
                                                       "inventory.yml", "p0.yml"]
    result, _ = import_omni(str(LEGACY), str(out), model_path=MODEL, force=True)
    assert (out / "inventory.yml").read_text().startswith("# pd-deploy inventory")
    assert yaml.safe_load((out / "group_vars" / "P.yml").read_text())["pd_tp"] == 16
    assert (out / "host_vars" / "p0.yml").exists()
    assert any("host_vars/p0.yml" in n for n in result.notes)
    assert [p for p in tmp_path.iterdir() if ".import-" in p.name] == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(ImportRefused) as exc:
        import_omni(str(LEGACY), str(tmp_path / "file"), model_path=MODEL, force=True)
    assert keys(exc.value.errors) == [(str(tmp_path / "file"), "-o")]


# ---------------------------------------------------------------- the CLI


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pd_deploy", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli_end_to_end(tmp_path):
    out = tmp_path / "imported"
    run = cli("import", "omni-infer", str(LEGACY), "-o", str(out), "--model-path", MODEL)
    assert run.returncode == 0, run.stderr
    assert "P1: master p0 (192.0.2.10), hosts p0, p1, p2, p3: DP4 x TP16" in run.stdout
    assert "proxy on p0: 192.0.2.10:7000" in run.stdout
    assert "Omni-Infer fields not carried over (4):" in run.stdout
    assert "  c0: role: " in run.stdout and "  d3: api_port: 9103 not kept" in run.stdout
    planned = cli("plan", "-i", str(out / "inventory.yml"), "--format", "json")
    assert planned.returncode == 0, planned.stderr
    doc = json.loads(planned.stdout)
    assert [(i["name"], i["master"], len(i["hosts"])) for i in doc["instances"]] == \
        [("P1", "p0", 4), ("D1", "d0", 4)]
    assert doc["proxy"]["listen"] == "192.0.2.10:7000"
    assert doc["nodes"]["p0"]["roles"] == ["P", "C"]


def test_cli_refusal_and_usage(tmp_path):
    bad = write(tmp_path, _mutate(_set("P", "p2", host_ip="192.0.2.99")))
    out = tmp_path / "imported"
    run = cli("import", "omni-infer", str(bad), "-o", str(out), "--model-path", MODEL)
    assert run.returncode == 1
    assert "nothing written" in run.stderr and "  - p2: host_ip: 192.0.2.99" in run.stderr
    assert not out.exists() and run.stdout == ""
    assert cli("import", "omni-infer", str(LEGACY)).returncode == 2  # no -o
    assert cli("import", "kubernetes", str(LEGACY), "-o", str(out)).returncode == 2
    assert "import omni-infer" in cli("--help").stdout
