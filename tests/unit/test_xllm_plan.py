"""The xLLM backend's plan: the guide's commands flag for flag, multi-host instances,
rank tables, flag conformance against xLLM's own gflags, and bad input."""
from __future__ import annotations

import json
import shlex
from typing import Any

import pytest

from pd_deploy.engines.xllm_flags import check_argv, table_for, validators_for
from tests.unit.planfix import DELETE, assert_error, errors_of, mutate, specs_of

# The xLLM PD guide (docs/zh/getting_started/disagg_pd.md, "PD分离运行"), verbatim
# commands: etcd, xllm-service, then the prefill and decode instances on one host.
GUIDE_ETCD = ("./etcd-download-test/etcd --listen-peer-urls 'http://localhost:2390'  "
              "--listen-client-urls 'http://localhost:2389' "
              "--advertise-client-urls  'http://localhost:2391'")
GUIDE_SERVICE = ('ENABLE_DECODE_RESPONSE_TO_SERVICE=true ./xllm_master_serving '
                 '--etcd_addr="127.0.0.1:12389" --http_server_port 28888 '
                 '--rpc_server_port 28889 --tokenizer_path=/path/to/tokenizer_config_dir/')
GUIDE_PREFILL = """/path/to/xllm --model=path/to/Qwen2-7B-Instruct \\
       --port=8010 \\
       --devices="npu:0" \\
       --master_node_addr="127.0.0.1:18888" \\
       --enable_prefix_cache=false \\
       --enable_chunked_prefill=false \\
       --enable_disagg_pd=true \\
       --instance_role=PREFILL \\
       --etcd_addr=127.0.0.1:12389 \\
       --transfer_listen_port=26000 \\
       --disagg_pd_port=7777 \\
       --node_rank=0 \\
       --nnodes=1"""
GUIDE_DECODE = """/path/to/xllm --model=path/to/Qwen2-7B-Instruct \\
       --port=8020 \\
       --devices="npu:1" \\
       --master_node_addr="127.0.0.1:18898" \\
       --enable_prefix_cache=false \\
       --enable_chunked_prefill=false \\
       --enable_disagg_pd=true \\
       --instance_role=DECODE \\
       --etcd_addr=127.0.0.1:12389 \\
       --transfer_listen_port=26100 \\
       --disagg_pd_port=7787 \\
       --node_rank=0 \\
       --nnodes=1"""

ETCD_PORT = 2389  # the guide's etcd client port; its --etcd_addr says 12389 (a typo)


def flags(argv: list[str]) -> dict[str, str]:
    """gflags argv -> {name: value} (`--a=b` and `--a b`)."""
    out: dict[str, str] = {}
    items = [a for a in argv if a != "\\"]
    i = 0
    while i < len(items):
        item = items[i]
        if item.startswith("--"):
            if "=" in item:
                key, value = item[2:].split("=", 1)
            elif i + 1 < len(items) and not items[i + 1].startswith("--"):
                key, value = item[2:], items[i + 1]
                i += 1
            else:
                key, value = item[2:], "true"
            out[key] = value
        i += 1
    return out


def guide_inventory(**extra: Any) -> tuple[dict, dict]:
    """The guide's one-host 1P1D: P on npu:0, D on npu:1, etcd + service beside them,
    its ports pinned per host."""
    common = {"pd_cluster_name": "guide", "pd_engine": "xllm",
              "pd_model_path": "path/to/Qwen2-7B-Instruct", "ansible_host": "127.0.0.1",
              "pd_tokenizer_path": "/path/to/tokenizer_config_dir/", "pd_etcd_port": ETCD_PORT,
              "pd_etcd_peer_port": 2390, "pd_xllm_service_http_port": 28888,
              "pd_xllm_service_rpc_port": 28889, **extra}
    groups = {"P": ["prefill"], "D": ["decode"], "C": ["svc"]}
    hostvars = {
        "prefill": dict(common, devices="0", pd_api_port=8010, pd_kv_port=26000,
                        pd_xllm_disagg_pd_port=7777, pd_xllm_master_port=18888),
        "decode": dict(common, devices="1", pd_api_port=8020, pd_kv_port=26100,
                       pd_xllm_disagg_pd_port=7787, pd_xllm_master_port=18898),
        "svc": dict(common),
    }
    return groups, hostvars


def two_host(engine: str = "xllm", **extra: Any) -> tuple[dict, dict]:
    """P1 over two hosts of 8 devices (16 processes), D1 one host of 8, C apart."""
    common = {"pd_cluster_name": "x", "pd_engine": engine, "pd_model_path": "/models/q",
              "pd_devices_per_node": 8, **extra}
    groups = {"P": ["p1", "p2"], "D": ["d1"], "C": ["c1"]}
    hostvars = {
        "p1": dict(common, ansible_host="10.0.0.1",
                   device_ips=[f"192.168.1.{i}" for i in range(8)]),
        "p2": dict(common, ansible_host="10.0.0.2", host_ip="10.0.0.1",
                   device_ips=[f"192.168.2.{i}" for i in range(8)]),
        "d1": dict(common, ansible_host="10.0.0.3"),
        "c1": dict(common, ansible_host="10.0.0.9"),
    }
    return groups, hostvars



# ---------------------------------------------------------------- golden


def test_guide_prefill_and_decode_flag_for_flag():
    specs = specs_of(guide_inventory())
    for host, guide in (("prefill", GUIDE_PREFILL), ("decode", GUIDE_DECODE)):
        want = flags(shlex.split(guide)[1:])
        want["etcd_addr"] = f"127.0.0.1:{ETCD_PORT}"  # one etcd port throughout (below)
        procs = specs[host][host[0].upper()]["processes"]
        assert len(procs) == 1
        argv = procs[0]["argv"]
        assert argv[0] == "/usr/local/bin/xllm"
        assert all(a.startswith("--") and "=" in a for a in argv[1:]), argv
        got = flags(argv[1:])
        assert {k: got[k] for k in want} == want
        # what pd-deploy adds: the node's own address and the cluster's etcd namespace
        assert {k: v for k, v in got.items() if k not in want} == {
            "host": "127.0.0.1", "etcd_namespace": "guide"}


def test_guide_etcd_and_service_use_one_etcd_port():
    specs = specs_of(guide_inventory())
    etcd = specs["svc"]["etcd"]["processes"][0]["argv"]
    service = specs["svc"]["xllm-service"]["processes"][0]["argv"]
    guide_etcd, guide_service = shlex.split(GUIDE_ETCD), shlex.split(GUIDE_SERVICE)
    # the guide's own mismatch: etcd listens on 2389, every --etcd_addr says 12389
    listen = guide_etcd[guide_etcd.index("--listen-client-urls") + 1]
    assert listen.endswith(":2389")
    assert flags(guide_service[2:])["etcd_addr"].endswith(":12389")
    # the plan: etcd's client URL, its advertised URL and every --etcd_addr agree
    client = etcd[etcd.index("--listen-client-urls") + 1]
    assert client == etcd[etcd.index("--advertise-client-urls") + 1] == \
        f"http://127.0.0.1:{ETCD_PORT}"
    assert etcd[etcd.index("--listen-peer-urls") + 1] == "http://127.0.0.1:2390"
    assert etcd[etcd.index("--data-dir") + 1].endswith("/state/etcd/data")
    want = flags(guide_service[2:])
    want["etcd_addr"] = f"127.0.0.1:{ETCD_PORT}"
    got = flags(service[1:])
    assert {k: got[k] for k in want} == want
    assert {k: v for k, v in got.items() if k not in want} == {
        "load_balance_policy": "RR", "etcd_namespace": "guide", "server_host": "127.0.0.1"}
    for unit in ("prefill", "decode"):
        argv = specs[unit][unit[0].upper()]["processes"][0]["argv"]
        assert f"--etcd_addr=127.0.0.1:{ETCD_PORT}" in argv
    # the guide's ENABLE_DECODE_RESPONSE_TO_SERVICE is ignored by xllm-service since 2026-01
    assert specs["svc"]["xllm-service"]["processes"][0]["env"] == {}


def test_two_host_prefill_instance_is_sixteen_processes():
    specs = specs_of(two_host())
    procs = specs["p1"]["P"]["processes"] + specs["p2"]["P"]["processes"]
    assert len(procs) == 16
    got = [flags(p["argv"][1:]) for p in procs]
    assert [int(g["node_rank"]) for g in got] == list(range(16))
    assert {g["nnodes"] for g in got} == {"16"}
    assert {g["master_node_addr"] for g in got} == {"10.0.0.1:18888"}
    assert [g["host"] for g in got] == ["10.0.0.1"] * 8 + ["10.0.0.2"] * 8
    assert [g["port"] for g in got] == [str(7100 + j) for j in range(8)] * 2
    assert [g["disagg_pd_port"] for g in got] == [str(7777 + j) for j in range(8)] * 2
    assert [g["transfer_listen_port"] for g in got] == [str(26000 + r) for r in range(16)]
    assert [g["devices"] for g in got] == [f"npu:{j}" for j in range(8)] * 2
    assert {g["instance_role"] for g in got} == {"PREFILL"}
    assert {g["communication_backend"] for g in got} == {"hccl"}
    # only node rank 0 serves HTTP; it is the one probed and the one that binds the master port
    assert [p["ready"] is not None for p in procs] == [True] + [False] * 15
    masters = [p["name"] for p in procs if any(q["use"] == "xllm_master" for q in p["ports"])]
    assert masters == ["xllm-rank0"]
    # the decode instance: one host, no rank table
    d = [flags(p["argv"][1:]) for p in specs["d1"]["D"]["processes"]]
    assert [g["node_rank"] for g in d] == [str(r) for r in range(8)]
    assert "rank_tablefile" not in d[0] and d[0]["transfer_listen_port"] == "26000"


def test_rank_table_from_inventory_device_ips():
    specs = specs_of(two_host())
    files = {h: specs[h]["P"]["files"] for h in ("p1", "p2")}
    assert [f["path"] for f in files["p1"]] == [
        flags(specs["p1"]["P"]["processes"][0]["argv"][1:])["rank_tablefile"]]
    assert files["p1"][0]["content"] == files["p2"][0]["content"]
    table = json.loads(files["p1"][0]["content"])
    assert table["server_count"] == "2"
    assert [s["server_id"] for s in table["server_list"]] == ["10.0.0.1", "10.0.0.2"]
    devs = [d for s in table["server_list"] for d in s["device"]]
    assert [d["rank_id"] for d in devs] == [str(r) for r in range(16)]
    assert devs[9] == {"device_id": "1", "device_ip": "192.168.2.1", "rank_id": "9"}
    assert specs["p1"]["P"]["pre_start"] == [] and specs["d1"]["D"]["files"] == []


def test_rank_table_from_hccn_conf_built_on_the_nodes():
    inp = mutate(two_host(), device_ips=DELETE, pd_hccn_conf="/etc/hccn-test.conf")
    specs = specs_of(inp)
    for host in ("p1", "p2"):
        spec = specs[host]["P"]
        assert spec["files"] == []
        (step,) = spec["pre_start"]
        assert step[1:4] == ["-m", "pd_launcher.ranktable", "exchange"]
        opts = dict(zip(step[4::2], step[5::2]))
        assert opts["--etcd"] == "http://10.0.0.9:2379"
        assert opts["--servers"] == "10.0.0.1,10.0.0.2"
        assert opts["--server-ip"] == spec["ip"]
        assert opts["--devices"] == "0,1,2,3,4,5,6,7"
        assert opts["--hccn"] == "/etc/hccn-test.conf"
        assert opts["--prefix"] == "/x/PD:RANKTABLE:P1/"
        assert opts["--out"] == flags(spec["processes"][0]["argv"][1:])["rank_tablefile"]
        assert "/etc/hccn-test.conf" in spec["checks"]["paths"]


def test_version_0_10_uses_device_id():
    specs = specs_of(mutate(two_host(), pd_xllm_version="0.10.0",
                            pd_xllm_service_version="0.10.0"))
    got = flags(specs["p2"]["P"]["processes"][3]["argv"][1:])
    assert got["device_id"] == "3" and "devices" not in got


def test_emulator_gets_exactly_the_xllm_argv():
    real = specs_of(two_host())
    emu = specs_of(mutate(two_host("emulator"), pd_emulate="xllm", pd_python="/venv/python"))
    for host, unit in (("p1", "P"), ("p2", "P"), ("d1", "D")):
        for r, e in zip(real[host][unit]["processes"], emu[host][unit]["processes"]):
            assert e["argv"][:4] == ["/venv/python", "-m", "pd_launcher.emulator", "xllm"]
            assert e["argv"][4:] == r["argv"][1:]
    r_svc = real["c1"]["xllm-service"]["processes"][0]["argv"]
    e_svc = emu["c1"]["xllm-service"]["processes"][0]["argv"]
    assert e_svc[:4] == ["/venv/python", "-m", "pd_launcher.emulator", "xllm_master_serving"]
    assert e_svc[4:] == r_svc[1:]
    # the real ones are checked by preflight: binary, model, tokenizer, NPUs
    assert real["c1"]["xllm-service"]["checks"]["commands"] == [
        "/usr/local/bin/xllm_master_serving"]
    assert real["c1"]["xllm-service"]["checks"]["paths"] == ["/models/q"]
    assert "/dev/davinci7" in real["p1"]["P"]["checks"]["devices"]
    assert emu["p1"]["P"]["checks"]["devices"] == []


def test_services_phases_gate_and_front_door():
    from pd_deploy.cli import plan_document

    doc = plan_document(*two_host())
    assert doc["units"]["c1"] == {"etcd": "before-engines", "xllm-service": "before-engines",
                                 "C": "front-door"}
    assert doc["gates"]["c1"] == ["xllm-service"]
    svc = doc["specs"]["c1"]["xllm-service"]
    assert svc["processes"][0]["ready"] == {"type": "tcp", "host": "10.0.0.9", "port": 8889}
    gate = svc["gate"]
    assert gate["ready"] == {"type": "tcp", "host": "10.0.0.9", "port": 8888}
    assert "--expect" in gate["explain"]
    assert "P1=/x/XLLM:PREFILL:10.0.0.1:7100" in gate["explain"]
    assert "D1=/x/XLLM:DECODE:10.0.0.3:7100" in gate["explain"]
    assert doc["front_door"] == {"mode": "router", "router": ["10.0.0.9:8888"],
                                 "entry": "10.0.0.9:8888"}
    assert doc["specs"]["c1"]["etcd"]["processes"][0]["ready"] == {
        "type": "http", "url": "http://10.0.0.9:2379/health"}


# ---------------------------------------------------------------- flag conformance


@pytest.mark.parametrize("version", ["0.9.2", "0.10.0"])
def test_every_planned_flag_exists_and_parses(version):
    inp = mutate(two_host(), pd_xllm_version=version, pd_xllm_service_version=(
        "0.9.1" if version.startswith("0.9") else "0.10.0"),
        pd_extra_args=["--etcd_ttl=3", "--enable_schedule_overlap=false"])
    if version != "0.9.2":  # xllm-service has no 0.10 table: check the instances only
        inp = mutate(inp, pd_xllm_service_version="0.10.0")
    specs = specs_of(inp)
    vt = tuple(int(x) for x in version.split("."))
    table = table_for("xllm", vt)
    for host, unit in (("p1", "P"), ("p2", "P"), ("d1", "D")):
        for proc in specs[host][unit]["processes"]:
            assert check_argv(proc["argv"][1:], table) == [], proc["name"]
    if version == "0.9.2":
        svc = specs["c1"]["xllm-service"]["processes"][0]["argv"]
        assert check_argv(svc[1:], table_for("xllm_master_serving", (0, 9, 1)),
                          validators=validators_for("xllm_master_serving", (0, 9, 1))) == []


def test_conformance_catches_a_wrong_flag():
    table = table_for("xllm", (0, 9, 2))
    errors = check_argv(["--device_id=0", "--enable_disagg_pd", "false"], table)
    assert any("device_id" in e for e in errors)
    assert any("false" in e for e in errors)


# ---------------------------------------------------------------- bad input


def test_p_and_d_on_one_machine_with_default_ports_clash():
    inp = mutate(guide_inventory(), pd_api_port=DELETE, pd_xllm_disagg_pd_port=DELETE,
                 pd_xllm_master_port=DELETE, pd_kv_port=DELETE)
    errors = errors_of(inp)
    assert any(e.startswith("decode: pd_api_port:") and "7100" in e for e in errors), errors
    assert any(e.startswith("decode: pd_xllm_disagg_pd_port:") for e in errors), errors
    assert any(e.startswith("decode: pd_xllm_master_port:") for e in errors), errors


def test_disagg_pd_port_clash_names_the_field():
    assert_error(mutate(guide_inventory(), "decode", pd_xllm_disagg_pd_port=7777),
                 "decode", "pd_xllm_disagg_pd_port", "127.0.0.1:7777")


def test_master_port_clash_names_the_field():
    assert_error(mutate(guide_inventory(), "decode", pd_xllm_master_port=18888),
                 "decode", "pd_xllm_master_port", "18888")


def test_transfer_port_clash_names_the_field():
    # the decode's transfer port on the prefill's API port
    assert_error(mutate(guide_inventory(), "decode", pd_kv_port=8010),
                 "decode", "pd_kv_port", "127.0.0.1:8010")


def test_api_port_on_a_master_port_of_another_instance():
    assert_error(mutate(guide_inventory(), "decode", pd_api_port=18888),
                 "decode", "pd_api_port", "18888")


def test_nnodes_differs_from_the_device_count():
    assert_error(mutate(two_host(), pd_xllm_nnodes=8), "p1", "pd_xllm_nnodes",
                 "expects 8 devices (--nnodes) but its hosts (p1, p2) give 16")


def test_prefill_and_decode_with_different_models():
    assert_error(mutate(two_host(), "d1", pd_model_path="/models/other"), "d1",
                 "pd_model_path", "same model")


def test_etcd_port_clashes_with_the_front_door():
    assert_error(mutate(two_host(), pd_etcd_port=7000), "c1", "pd_etcd_port",
                 "also bound by c1/proxy")


def test_service_http_port_clashes_with_the_proxy_agent():
    assert_error(mutate(two_host(), pd_xllm_service_http_port=7001), "c1",
                 "pd_xllm_service_http_port", "also bound by c1/proxy-agent")


def test_new_xllm_with_old_service_is_refused():
    assert_error(mutate(two_host(), pd_xllm_version="0.10.0"), "p1", "pd_xllm_version",
                 "no longer writes k_cache_ids")


def test_releases_without_etcd_namespace_are_refused():
    assert_error(mutate(two_host(), pd_xllm_service_version="0.9.0"), "p1",
                 "pd_xllm_service_version", "--etcd_namespace")


def test_tensor_parallel_is_refused():
    assert_error(mutate(two_host(), pd_tp=2), "p1", "pd_tp", "one process per device")


def test_device_ips_count_and_syntax():
    errors = errors_of(mutate(mutate(two_host(), "p2", device_ips=["192.168.2.1"]),
                              "p1", device_ips="192.168.1.1,x,3,4,5,6,7,8"))
    assert any(e.startswith("p2: device_ips: 1 device IPs for 8 devices") for e in errors)
    assert any(e.startswith("p1: device_ips: not IPv4") and "x" in e for e in errors)


def test_inventory_rank_table_needs_every_hosts_device_ips():
    inp = mutate(mutate(two_host(), pd_xllm_rank_table="inventory"), "p2",
                 device_ips=DELETE)
    assert_error(inp, "p2", "device_ips", "has no device_ips")


def test_planner_owned_flags_are_refused_in_extra_args():
    assert_error(mutate(two_host(), "d1", pd_extra_args=["--port=9000", "--etcd_ttl=3"]),
                 "d1", "pd_extra_args", "--port is set by the planner")


def test_engine_api_key_is_refused():
    errors = errors_of(mutate(two_host(), pd_engine_api_key="k"))
    assert any("pd_engine_api_key: xLLM and xllm-service take no API key" in e
               for e in errors), errors
    assert not any("'k'" in e for e in errors)


def test_unknown_lb_policy():
    assert_error(mutate(two_host(), pd_xllm_lb_policy="LEAST"), "p1", "pd_xllm_lb_policy",
                 "expected one of RR, CAR, SLO_AWARE")


def test_mixing_xllm_with_another_engine_is_refused():
    assert_error(mutate(two_host(), "d1", pd_engine="vllm-ascend"), "d1", "pd_engine",
                 "one cluster runs one engine family")


def test_all_errors_at_once():
    inp = mutate(two_host(), pd_tp=2, pd_xllm_lb_policy="X", pd_etcd_port=7000)
    errors = errors_of(mutate(inp, "d1", pd_model_path="/other"))
    fields = {e.split(": ")[1] for e in errors}
    assert {"pd_tp", "pd_xllm_lb_policy", "pd_model_path"} <= fields, errors


def test_internal_dp_is_refused():
    assert_error(mutate(two_host(), pd_dp_mode="internal"), "p1", "pd_dp_mode",
                 "only 'external'")


def test_unreadable_version():
    assert_error(mutate(two_host(), pd_xllm_version="latest"), "p1", "pd_xllm_version",
                 "cannot read version 'latest'")


def test_device_ips_of_the_wrong_type():
    assert_error(mutate(two_host(), "p2", device_ips={"0": "192.168.2.1"}), "p2",
                 "device_ips", "must be a list or a comma-separated string")
