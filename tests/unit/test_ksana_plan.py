"""The KsanaLLM backend's plan: the PD guide's single-host and multi-host examples
(commands, env and the rendered YAML fields: router 9080, prefill 8067, decode 6890,
coordinators 13569/13571) and its decode-example coordinator defect, multi-host groups,
the router service, argument conformance, and bad input."""
from __future__ import annotations

import configparser
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from pd_deploy.cli import plan_document, render_text
from pd_deploy.engines.ksana_flags import (
    CONNECTOR_KEYS,
    MANDATORY_ENV,
    SERVING_FLAGS,
    unknown_flags,
)
from tests.unit.planfix import assert_error, errors_of, mutate, specs_of

# The guide's commands (docs/pd_separation_startup.md §3), as typed from the tree's root.
GUIDE_ROUTER = "python src/ksana_llm/python/simple_router/main.py --port 9080"
GUIDE_PREFILL = ("python src/ksana_llm/python/serving_server.py --config_file "
                 "examples/ksana_llm_disaggregating_prefill.yaml --port 8067 --host 0.0.0.0")
GUIDE_DECODE = ("python src/ksana_llm/python/serving_server.py --config_file "
                "examples/ksana_llm_disaggregating_decode.yaml --port 6890 --host 0.0.0.0")
# The connector sections of the examples (engines-facts.md §2.4), placeholders as shipped.
GUIDE_CONNECTOR = {
    "prefill": {"router_addr": "{ROUTER_IP}:9080", "inference_addr": "{PREFILL_IP}:8067",
                "coordinator_addr": "{PREFILL_IP}:13569", "heartbeat_interval_ms": 2000,
                "connector_waiting_sec": 1800, "communication_type": "nccl",
                "group_role": "prefill", "transfer_batch": 1048576, "send_thread_num": 8,
                "circular_bucket_num": 8, "circular_thread_num": 8},
    "decode": {"router_addr": "{ROUTER_IP}:9080", "inference_addr": "{DECODE_IP}:6890",
               "coordinator_addr": "{PREFILL_IP}:13571", "heartbeat_interval_ms": 2000,
               "connector_waiting_sec": 1800, "communication_type": "nccl",
               "group_role": "decode", "transfer_batch": 1048576, "send_thread_num": 8,
               "circular_bucket_num": 8, "circular_thread_num": 8},
}
HOME = "/workspace/KsanaLLM"
ROLE = {"P": "prefill", "D": "decode"}


def guide(single_host: bool = False, **extra: Any) -> tuple[dict, dict]:
    """The guide's examples: multi-host (router 192.168.1.100, prefill .101, decode .102)
    or single-host (everything on 127.0.0.1, P on GPUs 0-7, D on GPUs 8-15)."""
    common = {"pd_cluster_name": "ks", "pd_engine": "ksana", "pd_ksana_home": HOME,
              "pd_model_path": "/models/DeepSeek-R1-0528-W4AFP8/", "pd_tp": 8,
              "pd_bind_host": "0.0.0.0", **extra}
    ips = ("127.0.0.1",) * 3 if single_host else ("192.168.1.100", "192.168.1.101",
                                                  "192.168.1.102")
    groups = {"P": ["prefill"], "D": ["decode"], "C": ["router"]}
    hostvars = {
        "router": dict(common, ansible_host=ips[0]),
        "prefill": dict(common, ansible_host=ips[1], devices="0,1,2,3,4,5,6,7",
                        pd_api_port=8067),
        "decode": dict(common, ansible_host=ips[2], pd_api_port=6890,
                       devices="8,9,10,11,12,13,14,15" if single_host else "0,1,2,3,4,5,6,7"),
    }
    return groups, hostvars


def small(**extra: Any) -> tuple[dict, dict]:
    common = {"pd_cluster_name": "k", "pd_engine": "ksana", "pd_ksana_home": HOME,
              "pd_model_path": "/models/m", "pd_tp": 2, "pd_devices_per_node": 2, **extra}
    groups = {"P": ["p1"], "D": ["d1"], "C": ["c1"]}
    hostvars = {"p1": dict(common, ansible_host="10.0.0.1"),
                "d1": dict(common, ansible_host="10.0.0.2"),
                "c1": dict(common, ansible_host="10.0.0.9")}
    return groups, hostvars



def node_yaml(spec: dict) -> dict:
    (f,) = [f for f in spec["files"] if f["path"].endswith("/ksana.yaml")]
    return yaml.safe_load(f["content"])


def substitute(connector: dict, ips: dict[str, str]) -> dict:
    out = {}
    for k, v in connector.items():
        if isinstance(v, str):
            for name, ip in ips.items():
                v = v.replace("{" + name + "}", ip)
        out[k] = v
    return out


# ---------------------------------------------------------------- golden


@pytest.mark.parametrize("single_host", [False, True])
@pytest.mark.parametrize("host,unit", [("prefill", "P"), ("decode", "D")])
def test_guide_node_commands(single_host, host, unit):
    specs = specs_of(guide(single_host))
    (proc,) = specs[host][unit]["processes"]
    want = shlex.split(GUIDE_PREFILL if unit == "P" else GUIDE_DECODE)
    argv = proc["argv"]
    assert argv[0] == "python" and argv[1] == f"{HOME}/{want[1]}"
    # the same flags and values, except the config file, which is the node's rendered YAML
    assert argv[2:] == [specs[host][unit]["dirs"]["run"] + "/ksana.yaml"
                        if a.endswith(".yaml") else a for a in want[2:]]
    for key, value in MANDATORY_ENV.items():
        assert proc["env"][key] == value
    assert proc["env"]["CUDA_VISIBLE_DEVICES"] == specs[host][unit]["processes"][0][
        "env"]["CUDA_VISIBLE_DEVICES"]
    assert not {"WORLD_SIZE", "NODE_RANK", "MASTER_HOST", "MASTER_PORT"} & set(proc["env"])
    assert proc["ready"]["url"].endswith(f":{want[want.index('--port') + 1]}/health")


def test_guide_devices_per_node():
    specs = specs_of(guide(single_host=True))
    assert specs["prefill"]["P"]["processes"][0]["env"]["CUDA_VISIBLE_DEVICES"] == \
        "0,1,2,3,4,5,6,7"
    assert specs["decode"]["D"]["processes"][0]["env"]["CUDA_VISIBLE_DEVICES"] == \
        "8,9,10,11,12,13,14,15"


@pytest.mark.parametrize("single_host", [False, True])
def test_guide_yaml_fields(single_host):
    specs = specs_of(guide(single_host))
    ips = ({"ROUTER_IP": "127.0.0.1", "PREFILL_IP": "127.0.0.1", "DECODE_IP": "127.0.0.1"}
           if single_host else {"ROUTER_IP": "192.168.1.100", "PREFILL_IP": "192.168.1.101",
                                "DECODE_IP": "192.168.1.102"})
    for host, unit in (("prefill", "P"), ("decode", "D")):
        cfg = node_yaml(specs[host][unit])
        got = cfg["setting"]["connector"]
        want = substitute(GUIDE_CONNECTOR[ROLE[unit]], ips)
        if unit == "D":  # the guide's defect, fixed: the decode's own IP
            want["coordinator_addr"] = f"{ips['DECODE_IP']}:13571"
        for key in ("router_addr", "inference_addr", "coordinator_addr", "group_role",
                    "communication_type", "heartbeat_interval_ms", "connector_waiting_sec",
                    "transfer_batch"):
            assert got[key] == want[key], key
        assert got["cluster_name"] == "ks"
        assert cfg["setting"]["global"]["tensor_para_size"] == 8
        assert cfg["model_spec"]["base_model"]["model_dir"] == "/models/DeepSeek-R1-0528-W4AFP8/"
        assert cfg["setting"]["batch_scheduler"]["max_batch_size"] == (256 if unit == "P"
                                                                       else 768)


def test_the_guides_decode_example_binds_the_prefills_ip():
    """Filled in as the guide says, the decode example's coordinator_addr is the prefill's
    IP: ZMQ binds it on the decode node, which does not have that address. pd-deploy
    gives every node its own IP, and refuses a base config that writes the guide's value."""
    filled = substitute(GUIDE_CONNECTOR["decode"], {"ROUTER_IP": "192.168.1.100",
                                                    "PREFILL_IP": "192.168.1.101",
                                                    "DECODE_IP": "192.168.1.102"})
    assert filled["coordinator_addr"].split(":")[0] == "192.168.1.101"  # not the decode's
    cfg = node_yaml(specs_of(guide())["decode"]["D"])
    assert cfg["setting"]["connector"]["coordinator_addr"] == "192.168.1.102:13571"


def test_guide_router_service():
    specs = specs_of(guide())
    router = specs["router"]["ksana-router"]
    assert router["phase"] == "before-engines"  # a node registers once, at start-up
    (proc,) = router["processes"]
    guide_argv = shlex.split(GUIDE_ROUTER)
    assert proc["argv"][:4] == ["python", "-m", "pd_launcher.ksana_router",
                                f"{HOME}/{guide_argv[1]}"]
    assert proc["argv"][4:] == ["--host", "0.0.0.0", "--port", "9080", "--workers", "4",
                                "--config", router["dirs"]["run"] + "/config.ini"]
    assert proc["env"] == {"PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": "python"}
    assert proc["ready"] == {"type": "http", "url": "http://192.168.1.100:9080/openapi.json"}
    ini = configparser.ConfigParser()
    ini.read_string(router["files"][0]["content"])
    assert ini["general"]["cluster_name"] == "ks"
    assert ini["general"]["heartbeat_timeout_seconds"] == "60"
    assert ini["general"]["log_dir"] == router["dirs"]["log"]
    assert ini["database"]["storage_mode"] == "sqlite"
    assert ini["database"]["sqlite_path"] == router["dirs"]["state"] + "/simple_router.db"
    gate = router["gate"]
    assert gate["check"][1:3] == ["-m", "pd_launcher.ksana_pairs"]
    assert "--expect-pair" in gate["check"] and "--explain" in gate["explain"]
    assert ini["database"]["sqlite_path"] in gate["check"]
    doc = plan_document(*guide())
    assert doc["front_door"]["router"] == ["192.168.1.100:9080"]
    assert doc["units"]["router"] == {"ksana-router": "before-engines", "C": "front-door"}
    assert "ksana-router" in render_text(doc)


def test_front_door_cleans_the_routers_stream():
    specs = specs_of(guide())
    c = specs["router"]["C"]
    conf = next(f["content"] for f in c["files"] if f["path"].endswith("nginx.conf"))
    assert "js_body_filter pdfix.body;" in conf and "js_header_filter pdfix.headers;" in conf
    assert any(f["path"].endswith("pd_stream_fix.js") for f in c["files"])
    agent = next(f["content"] for f in c["files"] if f["path"].endswith("proxy_agent.json"))
    assert '"path": "/openapi.json"' in agent


def test_default_binds_the_nodes_own_ip():
    specs = specs_of(small())
    argv = specs["p1"]["P"]["processes"][0]["argv"]
    assert argv[argv.index("--host") + 1] == "10.0.0.1"
    assert specs["c1"]["ksana-router"]["processes"][0]["argv"][5] == "10.0.0.9"


def test_settings_reach_the_yaml_and_the_ini():
    specs = specs_of(small(pd_ksana_router_port=9999,
                           pd_ksana_heartbeat_interval_ms=500, pd_ksana_heartbeat_timeout=7,
                           pd_ksana_router_workers=2))
    conn = node_yaml(specs["d1"]["D"])["setting"]["connector"]
    assert conn["communication_type"] == "nccl" and conn["heartbeat_interval_ms"] == 500
    assert conn["router_addr"] == "10.0.0.9:9999"
    router = specs["c1"]["ksana-router"]
    assert "heartbeat_timeout_seconds = 7" in router["files"][0]["content"]
    argv = router["processes"][0]["argv"]
    assert argv[argv.index("--workers") + 1] == "2"


def test_coordinator_port_per_instance():
    specs = specs_of(mutate(small(), "d1", pd_ksana_coordinator_port=20001))
    assert node_yaml(specs["p1"]["P"])["setting"]["connector"]["coordinator_addr"] == \
        "10.0.0.1:13569"
    assert node_yaml(specs["d1"]["D"])["setting"]["connector"]["coordinator_addr"] == \
        "10.0.0.2:20001"
    assert {"host": "10.0.0.2", "port": 20001, "use": "coordinator"} in \
        specs["d1"]["D"]["processes"][0]["ports"]


def test_base_config_from_the_controller(tmp_path):
    base = {"setting": {"global": {"tensor_para_size": 99, "enable_cuda_graph": True},
                        "connector": dict(GUIDE_CONNECTOR["decode"]),
                        "batch_scheduler": {"max_batch_size": 12}},
            "model_spec": {"base_model": {"model_dir": "{MODEL_DIR}"}}}
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(base))
    specs = specs_of(small(pd_ksana_config=str(path)))
    for host, unit in (("p1", "P"), ("d1", "D")):
        cfg = node_yaml(specs[host][unit])
        assert cfg["setting"]["global"] == {"tensor_para_size": 2, "enable_cuda_graph": True}
        assert cfg["setting"]["batch_scheduler"] == {"max_batch_size": 12}
        assert cfg["setting"]["connector"]["group_role"] == ROLE[unit]
        assert cfg["setting"]["connector"]["send_thread_num"] == 8
        assert cfg["model_spec"]["base_model"]["model_dir"] == "/models/m"
    assert yaml.safe_load(path.read_text()) == base  # the operator's file is untouched


def test_multi_host_group():
    groups = {"P": ["p1a", "p1b"], "D": ["d1"], "C": ["c1"]}
    common = {"pd_cluster_name": "k", "pd_engine": "ksana", "pd_ksana_home": HOME,
              "pd_model_path": "/models/m", "pd_tp": 8, "pd_devices_per_node": 8,
              "pd_dp_mode": "internal", "pd_dp_rpc_port": 29500}
    hostvars = {"p1a": dict(common, ansible_host="10.0.0.1"),
                "p1b": dict(common, ansible_host="10.0.0.2", host_ip="10.0.0.1"),
                # the same world size (16) as the prefill group: 16 GPUs in one node
                "d1": dict(common, ansible_host="10.0.0.3", pd_tp=16, pd_devices_per_node=16,
                           pd_dp_mode="external"),
                "c1": dict(common, ansible_host="10.0.0.9")}
    specs = specs_of((groups, hostvars))
    a, b = specs["p1a"]["P"], specs["p1b"]["P"]
    for rank, spec in enumerate((a, b)):
        env = spec["processes"][0]["env"]
        assert env["WORLD_SIZE"] == "2" and env["NODE_RANK"] == str(rank)
        assert env["MASTER_HOST"] == "10.0.0.1" and env["MASTER_PORT"] == "29500"
        conn = node_yaml(spec)["setting"]["connector"]
        assert conn["inference_addr"] == "10.0.0.1:7100"  # the group's rank 0
        assert conn["coordinator_addr"] == f"10.0.0.{rank + 1}:13569"  # each its own
    assert a["processes"][0]["ready"]["url"] == "http://10.0.0.1:7100/health"
    assert b["processes"][0]["ready"] is None  # rank 1 serves no HTTP
    assert {p["use"] for p in a["processes"][0]["ports"]} == {"api", "coordinator", "master"}
    assert {p["use"] for p in b["processes"][0]["ports"]} == {"coordinator"}
    assert "WORLD_SIZE" not in specs["d1"]["D"]["processes"][0]["env"]


# ---------------------------------------------------------------- emulation


def test_emulated_nodes_get_the_same_argv_after_the_emulators_program():
    real = specs_of(small())
    emu = specs_of(small(pd_engine="emulator", pd_emulate="ksana", pd_ksana_home=None))
    r, e = real["p1"]["P"]["processes"][0], emu["p1"]["P"]["processes"][0]
    assert e["argv"][1:4] == ["-m", "pd_launcher.emulator", "ksana"]
    assert e["argv"][4:] == r["argv"][2:]
    assert e["env"] == r["env"]
    assert node_yaml(emu["p1"]["P"]) == node_yaml(real["p1"]["P"])
    assert emu["p1"]["P"]["checks"]["paths"] == [] and emu["p1"]["P"]["checks"]["devices"] == []


def test_emulated_router_is_the_stand_in_unless_a_tree_is_given():
    stand_in = specs_of(small(pd_engine="emulator", pd_emulate="ksana", pd_ksana_home=None))
    argv = stand_in["c1"]["ksana-router"]["processes"][0]["argv"]
    assert argv[1:4] == ["-m", "pd_launcher.emulator", "ksana-router"]
    real = specs_of(small(pd_engine="emulator", pd_emulate="ksana"))
    argv = real["c1"]["ksana-router"]["processes"][0]["argv"]
    assert argv[1:4] == ["-m", "pd_launcher.ksana_router", f"{HOME}/src/ksana_llm/python/"
                         "simple_router/main.py"]
    # the rest of the argv is the same either way
    assert argv[4:] == stand_in["c1"]["ksana-router"]["processes"][0]["argv"][4:]


# ---------------------------------------------------------------- conformance


def _planned_inputs(tmp_path: Path) -> list[tuple[dict, dict]]:
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"setting": {"connector": GUIDE_CONNECTOR["prefill"]},
                                    "model_spec": {}}))
    return [guide(), guide(single_host=True), small(), small(pd_ksana_config=str(base)),
            small(pd_extra_args=["--access_log", "--tokenizer_path", "/models/tok",
                                 "--endpoint", "python"]),
            small(pd_engine="emulator", pd_emulate="ksana", pd_ksana_home=None)]


def test_every_planned_flag_and_key_is_known(tmp_path):
    for inp in _planned_inputs(tmp_path):
        for host, units in specs_of(inp).items():
            for unit, spec in units.items():
                if unit in ("P", "D"):
                    argv = spec["processes"][0]["argv"]
                    start = 4 if argv[1] == "-m" else 2
                    assert unknown_flags(argv[start:]) == [], (host, argv)
                    conn = node_yaml(spec)["setting"]["connector"]
                    assert set(conn) <= set(CONNECTOR_KEYS), set(conn) - set(CONNECTOR_KEYS)
                    for key, value in conn.items():
                        assert isinstance(value, CONNECTOR_KEYS[key][0]), key
    assert "--config_file" in SERVING_FLAGS and "--port" in SERVING_FLAGS


# ---------------------------------------------------------------- bad input


def test_relative_home():
    assert_error(small(pd_ksana_home="KsanaLLM"), "p1", "pd_ksana_home", "absolute")


def test_empty_home():
    assert_error(small(pd_ksana_home=""), "p1", "pd_ksana_home", "absolute")


def test_home_required_for_the_real_engine():
    assert_error(small(pd_ksana_home=None), "p1", "pd_ksana_home", "required")


def test_base_without_setting_or_model_spec(tmp_path):
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump({"setting": {"global": {}}}))
    errors = errors_of(small(pd_ksana_config=str(path)))
    assert any(e.startswith("p1: pd_ksana_config:") and "`model_spec`" in e for e in errors)
    path.write_text(yaml.safe_dump({"model_spec": {}}))
    assert_error(small(pd_ksana_config=str(path)), "d1", "pd_ksana_config", "`setting`")


def test_base_with_unknown_group_role(tmp_path):
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump({"setting": {"connector": {"group_role": "mixed"}},
                                    "model_spec": {}}))
    assert_error(small(pd_ksana_config=str(path)), "p1", "pd_ksana_config",
                 "group_role 'mixed'")


def test_base_with_unknown_connector_key_and_bad_type(tmp_path):
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump({"setting": {"connector": {
        "heartbeat_interval": 2000, "transfer_batch": "big"}}, "model_spec": {}}))
    errors = errors_of(small(pd_ksana_config=str(path)))
    assert any("unknown connector key 'heartbeat_interval'" in e for e in errors), errors
    assert any("connector.transfer_batch must be an integer" in e for e in errors), errors


def test_unreadable_and_invalid_base(tmp_path):
    assert_error(small(pd_ksana_config=str(tmp_path / "missing.yaml")), "p1",
                 "pd_ksana_config", "cannot read")
    bad = tmp_path / "bad.yaml"
    bad.write_text("setting: [\n")
    assert_error(small(pd_ksana_config=str(bad)), "p1", "pd_ksana_config", "not valid YAML")


def test_port_differs_from_the_inference_addr_port(tmp_path):
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump({"setting": {"connector": {
        "inference_addr": "10.0.0.1:8067"}}, "model_spec": {}}))
    # P's --port is 7100 (pd_api_port): the router would call 8067 where nothing listens
    assert_error(small(pd_ksana_config=str(path)), "p1", "pd_ksana_config",
                 "is not the node's --port 7100")


def test_guides_decode_coordinator_in_a_base_is_refused(tmp_path):
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump({"setting": {"connector": {
        "coordinator_addr": "10.0.0.1:13571"}}, "model_spec": {}}))
    inp = small(pd_ksana_config=str(path))
    assert_error(inp, "d1", "pd_ksana_config", "the guide's decode example")


def test_coordinator_port_clash_with_the_api_port():
    assert_error(mutate(small(), "p1", pd_ksana_coordinator_port=7100), "p1",
                 "pd_ksana_coordinator_port", "also bound by")


def test_coordinator_port_clash_between_nodes_on_one_machine():
    inp = mutate(small(), "d1", ansible_host="10.0.0.1", devices="2,3",
                 pd_ksana_coordinator_port=13569, pd_api_port=7200)
    assert_error(inp, "d1", "pd_ksana_coordinator_port", "13569")


def test_router_port_clash_with_the_front_door():
    assert_error(small(pd_ksana_router_port=7000), "c1", "pd_ksana_router_port",
                 "also bound by")


def test_different_models():
    assert_error(mutate(small(), "d1", pd_model_path="/models/other"), "d1",
                 "pd_model_path", "same model")


def test_tp_must_cover_the_node():
    assert_error(small(pd_tp=1), "p1", "pd_tp", "set pd_tp 2")


def test_multi_host_group_needs_internal_dp():
    groups = {"P": ["p1a", "p1b"], "D": ["d1"], "C": ["c1"]}
    common = small()[1]["p1"]
    hostvars = {"p1a": dict(common, ansible_host="10.0.0.1"),
                "p1b": dict(common, ansible_host="10.0.0.2", host_ip="10.0.0.1"),
                "d1": dict(common, ansible_host="10.0.0.3"),
                "c1": dict(common, ansible_host="10.0.0.9")}
    assert_error((groups, hostvars), "p1a", "pd_dp_mode", "internal")


def test_unknown_serving_server_flag():
    assert_error(small(pd_extra_args=["--tensor-parallel-size", "2"]), "p1", "pd_extra_args",
                 "--tensor-parallel-size is not a serving_server.py flag")


def test_owned_flag_in_extra_args():
    assert_error(small(pd_extra_args=["--port", "1"]), "p1", "pd_extra_args",
                 "set by the planner")


def test_bad_communication_type_and_workers():
    errors = errors_of(small(pd_ksana_communication_type="rdma", pd_ksana_router_workers=0))
    assert any(e.startswith("p1: pd_ksana_communication_type:") for e in errors), errors
    assert any(e.startswith("p1: pd_ksana_router_workers:") for e in errors), errors


@pytest.mark.parametrize("kind", ["zmq", "tcp"])
def test_channels_that_never_link_through_simple_router(kind):
    assert_error(small(pd_ksana_communication_type=kind), "p1", "pd_ksana_communication_type",
                 "/RegisterCommId")


def test_prefill_and_decode_world_sizes_must_match():
    inp = mutate(small(), "d1", pd_tp=1, devices="0")
    assert_error(inp, "d1", "pd_tp", "equal world sizes")


def test_engine_api_key_refused():
    assert_error(small(pd_engine_api_key="sk-x"), "p1", "pd_engine_api_key",
                 "pd_proxy_api_key")


def test_every_error_is_collected(tmp_path):
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump({"setting": {}}))
    inp = mutate(small(pd_ksana_communication_type="rdma"), "p1", pd_ksana_config=str(path))
    inp = mutate(inp, "d1", pd_tp=1, pd_extra_args=["--tp", "2"])
    errors = errors_of(inp)
    assert {(e.split(":")[0], e.split(":")[1].strip()) for e in errors} >= {
        ("p1", "pd_ksana_config"), ("p1", "pd_ksana_communication_type"), ("d1", "pd_tp"),
        ("d1", "pd_extra_args")}, errors
