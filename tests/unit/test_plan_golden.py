"""Golden plans: the tutorial topology flag for flag, Omni-Infer shape, internal DP, NIXL."""
from __future__ import annotations

import json

from pd_deploy.engines.ascend_rules import mooncake_extra_config_errors
from pd_deploy.specs import node_specs
from pd_deploy.topology import build_plan

from .planfix import flag, kv_config, mutate, small, tutorial

EXTRA = {"prefill": {"dp_size": 2, "tp_size": 8}, "decode": {"dp_size": 32, "tp_size": 1}}


def proc(specs, host, role, name):
    return next(p for p in specs[host][role]["processes"] if p["name"] == name)


def test_tutorial_prefill_rank_command_flag_for_flag():
    specs = node_specs(build_plan(*tutorial()))
    p = proc(specs, "p2", "P", "engine-dp1")
    assert p["argv"] == [
        "vllm", "serve", "/models/m",
        "--host", "10.0.0.2", "--port", "7101",
        "--served-model-name", "m",
        "--tensor-parallel-size", "8",
        "--data-parallel-size", "2", "--data-parallel-rank", "1",
        "--data-parallel-address", "10.0.0.2", "--data-parallel-rpc-port", "12321",
        "--kv-transfer-config", json.dumps({
            "kv_connector": "MooncakeConnectorV1", "kv_role": "kv_producer",
            "engine_id": "t-P2", "kv_port": 36000,  # own node address: same range as P1
            "kv_connector_extra_config": EXTRA}, separators=(",", ":")),
        "--enable-expert-parallel", "--max-num-batched-tokens", "16384",
        "--max-num-seqs", "8", "--enforce-eager", "--no-enable-prefix-caching",
    ]
    assert p["env"]["ASCEND_RT_VISIBLE_DEVICES"] == "8,9,10,11,12,13,14,15"
    assert p["env"]["HCCL_IF_IP"] == "10.0.0.2"
    assert p["env"]["OMP_PROC_BIND"] == "false"
    assert p["env"]["PYTORCH_NPU_ALLOC_CONF"] == "expandable_segments:True"
    assert specs["p2"]["P"]["nic"]["env"] == [
        "GLOO_SOCKET_IFNAME", "TP_SOCKET_IFNAME", "HCCL_SOCKET_IFNAME"]


def test_tutorial_decode_second_node_rank_17():
    specs = node_specs(build_plan(*tutorial()))
    p = proc(specs, "d2", "D", "engine-dp17")
    argv = p["argv"]
    assert flag(argv, "--port") == "7101"
    assert flag(argv, "--host") == "10.0.0.4"
    assert flag(argv, "--data-parallel-size") == "32"
    assert flag(argv, "--data-parallel-rank") == "17"
    assert flag(argv, "--data-parallel-address") == "10.0.0.3"
    assert flag(argv, "--tensor-parallel-size") == "1"
    assert argv[-4:] == ["--max-num-batched-tokens", "256", "--max-num-seqs", "40"]
    cfg = kv_config(argv)
    assert cfg["kv_role"] == "kv_consumer" and cfg["kv_port"] == 36000
    assert cfg["kv_connector_extra_config"] == EXTRA
    assert "kv_rank" not in cfg and "kv_parallel_size" not in cfg
    assert p["env"]["ASCEND_RT_VISIBLE_DEVICES"] == "1"
    # MooncakeConnectorV1: the decode pulls and binds no KV port (only producers listen,
    # on kv_port + global DP rank * tp + tp worker)
    assert [x for x in p["ports"] if x["use"] == "kv"] == []
    prod = proc(specs, "p2", "P", "engine-dp1")
    assert {"host": "10.0.0.2", "port": 36000 + 1 * 8 + 7, "use": "kv"} in prod["ports"]
    assert p["env"]["VLLM_HOST_IP"] == "10.0.0.4"


def test_tutorial_ranks_ports_and_upstreams():
    plan = build_plan(*tutorial())
    assert [(i.name, i.dp_size, i.tp, i.kv_port) for i in plan.instances] == [
        ("P1", 2, 8, 36000), ("P2", 2, 8, 36000), ("D1", 32, 1, 36000)]  # no shared address
    assert plan.nodes["d2"].start_rank == 16
    assert plan.prefill_upstreams == ["10.0.0.1:7100", "10.0.0.1:7101",
                                      "10.0.0.2:7100", "10.0.0.2:7101"]
    assert len(plan.decode_upstreams) == 32
    assert plan.decode_upstreams[16] == "10.0.0.4:7100"
    assert plan.proxies[0].listen == "10.0.0.9:7000"


def test_every_planned_engine_passes_the_ascend_startup_rule():
    specs = node_specs(build_plan(*tutorial()))
    for host, by_role in specs.items():
        for role, spec in by_role.items():
            for p in spec["processes"] if role != "C" else []:
                argv = p["argv"]
                errs = mooncake_extra_config_errors(
                    kv_config(argv), int(flag(argv, "--tensor-parallel-size")),
                    int(flag(argv, "--data-parallel-size") or 1))
                assert errs == [], (host, p["name"], errs)


def test_ascend_startup_rule_catches_mismatch():
    cfg = {"kv_connector": "MooncakeConnectorV1", "kv_role": "kv_consumer",
           "kv_connector_extra_config": EXTRA}
    assert mooncake_extra_config_errors(cfg, 1, 32) == []
    errs = mooncake_extra_config_errors(cfg, 2, 16)
    assert len(errs) == 2 and "decode.tp_size=1" in errs[0]
    assert mooncake_extra_config_errors(dict(cfg, kv_role="kv_producer"), 1, 32)
    assert mooncake_extra_config_errors({"kv_connector": "MooncakeConnectorV1",
                                         "kv_role": "kv_producer"}, 1, 1)


def omni_infer():
    """Omni-Infer 1P32_1D32-like: 4 P nodes = one instance, 4 D nodes = one instance, 1 C."""
    common = {"pd_cluster_name": "omni", "pd_engine": "vllm-ascend", "pd_model_path": "/m",
              "devices": "0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15", "pd_kv_port": 36000}
    groups = {"P": [f"p{i}" for i in range(4)], "D": [f"d{i}" for i in range(4)], "C": ["c"]}
    hostvars = {}
    for i in range(4):
        hostvars[f"p{i}"] = dict(common, ansible_host=f"10.1.0.{i + 1}", host_ip="10.1.0.1",
                                 pd_tp=16, pd_dp_mode="internal")
        hostvars[f"d{i}"] = dict(common, ansible_host=f"10.2.0.{i + 1}", host_ip="10.2.0.1",
                                 pd_tp=1)
    hostvars["c"] = dict(common, ansible_host="10.3.0.1")
    return groups, hostvars


def test_omni_infer_shape():
    plan = build_plan(*omni_infer())
    p, d = plan.instances
    assert (p.dp_size, p.tp, p.dp_mode, len(p.hosts)) == (4, 16, "internal", 4)
    assert (d.dp_size, d.tp, len(d.hosts)) == (64, 1, 4)
    # prefill: one upstream per instance (internal DP); decode: one per DP rank
    assert plan.prefill_upstreams == ["10.1.0.1:7100"]
    assert len(plan.decode_upstreams) == 64
    assert [plan.nodes[f"d{i}"].start_rank for i in range(4)] == [0, 16, 32, 48]
    assert d.kv_port == 36000  # not on P's addresses: the same range


def test_internal_dp_master_and_headless():
    specs = node_specs(build_plan(*omni_infer()))
    master = specs["p0"]["P"]["processes"]
    assert len(master) == 1
    argv = master[0]["argv"]
    assert flag(argv, "--data-parallel-size") == "4"
    assert flag(argv, "--data-parallel-size-local") == "1"
    assert "--headless" not in argv and "--data-parallel-rank" not in argv
    assert master[0]["ready"] == {"type": "http", "url": "http://10.1.0.1:7100/health"}
    worker = specs["p2"]["P"]["processes"][0]
    wargv = worker["argv"]
    assert worker["name"] == "engine-headless"
    assert "--headless" in wargv and "--port" not in wargv
    assert flag(wargv, "--data-parallel-start-rank") == "2"
    assert flag(wargv, "--data-parallel-address") == "10.1.0.1"
    assert worker["ready"]["type"] == "tcp"
    assert worker["env"]["ASCEND_RT_VISIBLE_DEVICES"] == ",".join(str(i) for i in range(16))
    assert [q["use"] for q in worker["ports"]].count("api") == 0


def test_vllm_nixl_flavour():
    plan = build_plan(*mutate(small("vllm"), pd_kv_port=5600))
    specs = node_specs(plan)
    p = proc(specs, "d2", "D", "engine-dp3")
    cfg = kv_config(p["argv"])
    assert cfg == {"kv_connector": "NixlConnector", "kv_role": "kv_consumer",
                   "engine_id": "t-D1"}
    assert p["env"]["CUDA_VISIBLE_DEVICES"] == "1"
    assert p["env"]["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "127.0.1.3"
    # D1 shares base 5600 with P1 but no node address: the same range; vLLM adds the
    # global DP rank
    assert p["env"]["VLLM_NIXL_SIDE_CHANNEL_PORT"] == "5600"
    assert {"host": "127.0.1.3", "port": 5603, "use": "nixl"} in p["ports"]
    assert "ASCEND_RT_VISIBLE_DEVICES" not in p["env"]
    assert specs["d2"]["D"]["checks"]["devices"] == ["/dev/nvidia0", "/dev/nvidia1",
                                                    "/dev/nvidiactl"]


def test_emulator_gets_exactly_the_vllm_flags():
    real = node_specs(build_plan(*small("vllm")))
    emu = node_specs(build_plan(*mutate(small("emulator"), pd_python="/venv/bin/python")))
    for host in ("p1", "d1", "d2"):
        role = "P" if host == "p1" else "D"
        for a, b in zip(real[host][role]["processes"], emu[host][role]["processes"]):
            assert b["argv"][:5] == ["/venv/bin/python", "-m", "pd_launcher.emulator", "serve",
                                     "/models/m"]
            assert a["argv"][3:] == b["argv"][5:]
            assert a["ports"] == b["ports"]
        assert emu[host][role]["checks"]["devices"] == []


def test_kv_rank_and_buffer_device_are_never_sent():
    # vLLM-Ascend 0.23 reads neither kv_rank/kv_parallel_size (vLLM >= 0.32 refuses them)
    # nor kv_buffer_device (the platform's default, "npu", is used); its tutorial omits them
    specs = node_specs(build_plan(*small()))
    for host, role in (("p1", "P"), ("d1", "D")):
        cfg = kv_config(specs[host][role]["processes"][0]["argv"])
        assert not {"kv_rank", "kv_parallel_size", "kv_buffer_device"} & set(cfg)


def test_api_key_goes_to_engines_not_headless():
    specs = node_specs(build_plan(*mutate(small(), pd_engine_api_key="s3cret")))
    # in the environment (VLLM_API_KEY), never in argv: argv shows in `ps`
    proc = specs["p1"]["P"]["processes"][0]
    assert flag(proc["argv"], "--api-key") is None and proc["env"]["VLLM_API_KEY"] == "s3cret"
