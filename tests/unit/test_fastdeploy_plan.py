"""The FastDeploy backend's plan: the PD guide's prefill and decode commands flag for
flag (and its missing-backslash defect), the router mode, multi-node --ips, Redis and
router services, and bad input."""
from __future__ import annotations

import shlex
from typing import Any

import pytest

from pd_deploy.cli import plan_document, public_document, render_text
from pd_deploy.topology import build_plan
from tests.unit.planfix import assert_error, errors_of, mutate, specs_of

# The FastDeploy PD guide (docs/zh/features/disaggregated.md), verbatim.
GUIDE_PREFILL = """python -m fastdeploy.entrypoints.openai.api_server \\
       --model ERNIE-4.5-300B-A47B-BF16 \\
       --port 8180 --metrics-port 8181 \\
       --engine-worker-queue-port 8182 \\
       --cache-queue-port 8183 \\
       --tensor-parallel-size 4 \\
       --quantization wint4 \\
       --cache-transfer-protocol "rdma,ipc" \\
       --rdma-comm-ports "7671,7672,7673,7674" \\
       --pd-comm-port "2334" \\
       --splitwise-role "prefill" \\
       --scheduler-name "splitwise" \\
       --scheduler-host "127.0.0.1" \\
       --scheduler-port 6379 \\
       --scheduler-topic "test" \\
       --scheduler-ttl 9000"""
GUIDE_DECODE = """python -m fastdeploy.entrypoints.openai.api_server \\
       --model ERNIE-4.5-300B-A47B-BF16 \\
       --port 8184 --metrics-port 8185 \\
       --engine-worker-queue-port 8186 \\
       --cache-queue-port 8187 \\
       --tensor-parallel-size 4 \\
       --quantization wint4 \\
       --scheduler-name "splitwise" \\
       --cache-transfer-protocol "rdma,ipc" \\
       --rdma-comm-ports "7671,7672,7673,7674" \\
       --pd-comm-port "2334" \\
       --scheduler-host "127.0.0.1" \\
       --scheduler-port 6379 \\
       --scheduler-ttl 9000
       --scheduler-topic "test" \\
       --splitwise-role "decode\""""
GUIDE_ENV = {"CUDA_VISIBLE_DEVICES": ("0,1,2,3", "4,5,6,7"),
             "ENABLE_V1_KVCACHE_SCHEDULER": ("0", "0")}


def flags(argv: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    i = 0
    while i < len(argv):
        if argv[i].startswith("--"):
            if "=" in argv[i]:
                k, v = argv[i][2:].split("=", 1)
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                k, v = argv[i][2:], argv[i + 1]
                i += 1
            else:
                k, v = argv[i][2:], "true"
            out[k] = v
        i += 1
    return out


def guide_commands(text: str) -> list[list[str]]:
    """What a shell runs from the guide's block: a line without a trailing backslash
    ends the command."""
    commands, current = [], ""
    for line in text.splitlines():
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
        else:
            commands.append(shlex.split(current + line))
            current = ""
    return commands


def guide_inventory(**extra: Any) -> tuple[dict, dict]:
    """The guide's multi-machine case: P (GPUs 0-3) beside Redis on 127.0.0.1, D (GPUs
    4-7) on another machine; its ports pinned per group."""
    common = {"pd_cluster_name": "fd", "pd_engine": "fastdeploy",
              "pd_model_path": "ERNIE-4.5-300B-A47B-BF16", "pd_tp": 4,
              "pd_fastdeploy_scheduler": "redis", "pd_fastdeploy_topic": "test",
              "pd_fastdeploy_scheduler_ttl": 9000, "pd_kv_port": 7671,
              "pd_kv_port_stride": 0, "pd_extra_args": ["--quantization", "wint4"],
              "rdma_nics": "mlx5_0,mlx5_1", **extra}
    groups = {"P": ["prefill"], "D": ["decode"], "C": ["svc"]}
    hostvars = {
        "prefill": dict(common, ansible_host="127.0.0.1", devices="0,1,2,3", pd_api_port=8180),
        "decode": dict(common, ansible_host="10.0.0.2", devices="4,5,6,7", pd_api_port=8184),
        "svc": dict(common, ansible_host="127.0.0.1"),
    }
    return groups, hostvars


def small(scheduler: str = "router", engine: str = "fastdeploy", **extra: Any
          ) -> tuple[dict, dict]:
    common = {"pd_cluster_name": "f", "pd_engine": engine, "pd_model_path": "/models/e",
              "pd_fastdeploy_scheduler": scheduler, "pd_devices_per_node": 2, **extra}
    groups = {"P": ["p1"], "D": ["d1"], "C": ["c1"]}
    hostvars = {"p1": dict(common, ansible_host="10.0.0.1"),
                "d1": dict(common, ansible_host="10.0.0.2"),
                "c1": dict(common, ansible_host="10.0.0.9")}
    return groups, hostvars



# ---------------------------------------------------------------- golden


def test_the_guides_decode_command_loses_its_role_and_topic():
    """The guide's decode block has no backslash after --scheduler-ttl 9000: the shell
    runs a decode without --scheduler-topic and --splitwise-role (a `mixed` instance
    on topic `default`), then tries to run `--scheduler-topic ...` as a command."""
    (prefill,) = guide_commands(GUIDE_PREFILL)
    decode, stray = guide_commands(GUIDE_DECODE)
    assert flags(prefill[3:])["splitwise-role"] == "prefill"
    assert "splitwise-role" not in flags(decode[3:])
    assert "scheduler-topic" not in flags(decode[3:])
    assert stray[0] == "--scheduler-topic"


@pytest.mark.parametrize("host,unit,guide,env", [
    ("prefill", "P", GUIDE_PREFILL, 0), ("decode", "D", GUIDE_DECODE, 1)])
def test_guide_commands_flag_for_flag(host, unit, guide, env):
    want = flags(shlex.split(guide.replace("\n", " \\\n"))[3:])  # the intended command
    specs = specs_of(guide_inventory())
    (proc,) = specs[host][unit]["processes"]
    argv = proc["argv"]
    assert argv[:3] == ["python", "-m", "fastdeploy.entrypoints.openai.api_server"]
    got = flags(argv[3:])
    assert {k: got[k] for k in want} == want
    assert got["splitwise-role"] == ROLE[unit] and got["scheduler-topic"] == "test"
    # pd-deploy adds only the bind address
    assert {k: v for k, v in got.items() if k not in want} == {"host": specs[host][unit]["ip"]}
    for key, values in GUIDE_ENV.items():
        assert proc["env"][key] == values[env]
    assert proc["env"]["KVCACHE_RDMA_NICS"] == "mlx5_0,mlx5_1"
    assert proc["env"]["FD_LOG_DIR"].endswith(f"/logs/{unit}/fastdeploy-dp0")


ROLE = {"P": "prefill", "D": "decode"}


def test_guide_redis_service():
    specs = specs_of(guide_inventory())
    redis = specs["svc"]["redis"]
    assert redis["phase"] == "before-engines"
    (proc,) = redis["processes"]
    conf = redis["files"][0]
    assert proc["argv"] == ["redis-server", conf["path"]]
    assert conf["mode"] == "0600"
    lines = conf["content"].splitlines()
    assert "bind 127.0.0.1" in lines and "port 6379" in lines
    assert 'save ""' in lines and "appendonly no" in lines
    assert any(line.startswith("dir ") and line.endswith("/state/redis") for line in lines)
    (check,) = redis["pre_start"]  # Redis >= 6.2, as FastDeploy's scheduler asserts
    assert check[1:] == ["-m", "pd_launcher.version_check", "--min", "6.2.0", "--name",
                         "redis-server", "--", "redis-server", "--version"]
    assert proc["ready"] == {"type": "tcp", "host": "127.0.0.1", "port": 6379}
    gate = redis["gate"]
    assert gate["check"][1:3] == ["-m", "pd_launcher.redis_nodes"]
    assert "test" in gate["check"]
    doc = plan_document(*guide_inventory())
    # redis mode: nginx fronts the decode instances
    assert doc["front_door"]["router"] == ["10.0.0.2:8184"]
    assert doc["units"]["svc"] == {"redis": "before-engines", "C": "front-door"}


def test_router_mode_golden():
    specs = specs_of(mutate(guide_inventory(), pd_fastdeploy_scheduler="router"))
    for host, unit in (("prefill", "P"), ("decode", "D")):
        got = flags(specs[host][unit]["processes"][0]["argv"][3:])
        assert got["router"] == "127.0.0.1:9000"
        assert not any(k.startswith("scheduler-") for k in got)
        assert specs[host][unit]["processes"][0]["env"]["ENABLE_V1_KVCACHE_SCHEDULER"] == "1"
    router = specs["svc"]["fd-router"]
    assert router["phase"] == "after-engines"
    argv = router["processes"][0]["argv"]
    assert argv[:4] == ["fd-router", "--port", "9000", "--splitwise"]
    config = router["files"][0]
    assert argv[-2:] == ["--config_path", config["path"]]
    assert '"host": "127.0.0.1"' in config["content"]
    assert router["gate"]["check"][-4:] == ["--expect", "prefill>=1", "--expect", "decode>=1"]
    python_router = specs_of(mutate(guide_inventory(), pd_fastdeploy_scheduler="router",
                                    pd_fastdeploy_router_cmd=["python", "-m",
                                                              "fastdeploy.router.launch"]))
    assert python_router["svc"]["fd-router"]["processes"][0]["argv"] == [
        "python", "-m", "fastdeploy.router.launch", "--host", "127.0.0.1", "--port", "9000",
        "--splitwise"]
    assert plan_document(*mutate(guide_inventory(), pd_fastdeploy_scheduler="router"))[
        "front_door"]["router"] == ["127.0.0.1:9000"]


def test_dp_ranks_get_port_blocks_and_rdma_ranges():
    specs = specs_of(small(pd_devices_per_node=4, pd_tp=2))
    procs = specs["p1"]["P"]["processes"]
    got = [flags(p["argv"][3:]) for p in procs]
    assert [g["port"] for g in got] == ["7100", "7104"]
    assert [g["metrics-port"] for g in got] == ["7101", "7105"]
    assert [g["cache-queue-port"] for g in got] == ["7103", "7107"]
    assert [g["pd-comm-port"] for g in got] == ["2334", "2335"]
    assert [g["rdma-comm-ports"] for g in got] == ["7671,7672", "7673,7674"]
    assert [g["local-data-parallel-id"] for g in got] == ["0", "1"]
    assert {g["data-parallel-size"] for g in got} == {"2"}
    assert [p["env"]["CUDA_VISIBLE_DEVICES"] for p in procs] == ["0,1", "2,3"]
    # no rdma_nics: detected on the node, then exec
    assert procs[0]["argv"][:6] == ["python3", "-m", "pd_launcher.rdma_env", "--device", "gpu",
                                    "--"]


def test_multi_node_ips_instance():
    inp = small(pd_tp=8, pd_devices_per_node=8, pd_dp_mode="internal")
    groups, hostvars = inp
    groups["P"].append("p2")
    hostvars["p2"] = dict(hostvars["p1"], ansible_host="10.0.0.3", host_ip="10.0.0.1")
    specs = specs_of((groups, hostvars))
    a, b = specs["p1"]["P"]["processes"][0], specs["p2"]["P"]["processes"][0]
    fa, fb = flags(a["argv"][3:]), flags(b["argv"][3:])
    assert fa["ips"] == fb["ips"] == "10.0.0.1,10.0.0.3"
    assert {k: v for k, v in fa.items() if k != "host"} == {
        k: v for k, v in fb.items() if k != "host"}  # the same command on every node
    assert fa["data-parallel-size"] == "2" and "local-data-parallel-id" not in fa
    assert a["ready"] is not None and b["ready"] is None  # only the master serves
    doc = plan_document(*mutate((groups, hostvars), pd_fastdeploy_scheduler="redis"))
    assert doc["front_door"]["router"] == ["10.0.0.2:7100"]


def test_emulator_gets_exactly_the_fastdeploy_argv():
    for scheduler in ("router", "redis"):
        real = specs_of(small(scheduler, rdma_nics="mlx5_0"))
        emu = specs_of(small(scheduler, "emulator", pd_emulate="fastdeploy", rdma_nics="mlx5_0"))
        for host, unit in (("p1", "P"), ("d1", "D")):
            r, e = real[host][unit]["processes"][0], emu[host][unit]["processes"][0]
            assert e["argv"][:4] == ["python3", "-m", "pd_launcher.emulator", "fastdeploy"]
            assert e["argv"][4:] == r["argv"][3:]
            assert e["env"] == r["env"]
        assert emu["p1"]["P"]["checks"]["devices"] == []
        assert "/dev/nvidia1" in real["p1"]["P"]["checks"]["devices"]


def test_redis_password_never_shows():
    inp = small("redis", pd_redis_password="s3cr3t-pw")
    specs = specs_of(inp)
    argv = specs["p1"]["P"]["processes"][0]["argv"]
    assert argv[argv.index("--scheduler-password") + 1] == "s3cr3t-pw"
    conf = specs["c1"]["redis"]["files"][0]
    assert 'requirepass "s3cr3t-pw"' in conf["content"] and conf["mode"] == "0600"
    assert "s3cr3t-pw" not in " ".join(specs["c1"]["redis"]["gate"]["check"])
    doc = plan_document(*inp)
    assert "s3cr3t-pw" not in render_text(public_document(doc))
    assert "s3cr3t-pw" not in str(public_document(doc))


# ---------------------------------------------------------------- bad input


def test_rdma_comm_ports_count_must_match_devices():
    assert_error(small(pd_fastdeploy_rdma_comm_ports=[7671]), "p1",
                 "pd_fastdeploy_rdma_comm_ports", "1 ports for 2 devices")


def test_port_block_clash_on_a_shared_machine():
    inp = mutate(small(), "d1", ansible_host="10.0.0.1", devices="1", pd_api_port=7102)
    inp = mutate(inp, "p1", devices="0")
    errors = errors_of(inp)
    assert any(e.startswith("d1: pd_api_port:") and "10.0.0.1:7102" in e for e in errors), errors


def test_pd_comm_port_clash():
    inp = mutate(mutate(small(), "d1", ansible_host="10.0.0.1", devices="1",
                        pd_api_port=7200, pd_kv_port=7800), "p1", devices="0")
    assert_error(inp, "d1", "pd_fastdeploy_pd_comm_port", "10.0.0.1:2334")


def test_tp_of_prefill_and_decode_must_be_compatible():
    inp = mutate(mutate(small(pd_devices_per_node=4), "p1", pd_tp=4), "d1", pd_tp=2)
    assert_error(inp, "d1", "pd_tp", "equal TP or decode TP 1")
    build_plan(*mutate(mutate(small(pd_devices_per_node=4), "p1", pd_tp=4), "d1", pd_tp=1))


def test_ips_nodes_with_more_than_eight_devices():
    groups, hostvars = small(pd_tp=16, pd_devices_per_node=16, pd_dp_mode="internal")
    groups["P"].append("p2")
    hostvars["p2"] = dict(hostvars["p1"], ansible_host="10.0.0.3", host_ip="10.0.0.1")
    assert_error((groups, hostvars), "p2", "devices", "at most 8 per node")


def test_redis_password_with_quotes_is_refused_without_echoing_it():
    errors = errors_of(small("redis", pd_redis_password='bad"pw'))
    assert any(e.startswith("c1: pd_redis_password:") or
               e.startswith("p1: pd_redis_password:") for e in errors), errors
    assert not any('bad"pw' in e for e in errors)


def test_scheduler_password_in_extra_args_is_refused():
    assert_error(small("redis", pd_extra_args=["--scheduler-password", "x"]), "p1",
                 "pd_extra_args", "--scheduler-password is set by the planner")


def test_topic_redis_would_reject():
    assert_error(small("redis", pd_fastdeploy_topic="my topic\n"), "p1",
                 "pd_fastdeploy_topic", "cannot name FastDeploy's Redis keys")


def test_removed_flag_is_refused():
    assert_error(small(pd_extra_args=["--innode-prefill-ports", "8182"]), "p1",
                 "pd_extra_args", "was removed from FastDeploy 2.x")


def test_unknown_scheduler_and_protocol():
    errors = errors_of(small("kafka", pd_fastdeploy_cache_transfer_protocol="tcp"))
    assert any("pd_fastdeploy_scheduler: unknown value 'kafka'" in e for e in errors), errors
    assert any("pd_fastdeploy_cache_transfer_protocol: unknown protocol(s) tcp" in e
               for e in errors), errors


def test_bad_rdma_nics():
    assert_error(small(rdma_nics="mlx5_0;rm -rf"), "p1", "rdma_nics", "NIC names")


def test_router_port_clashes_with_the_front_door():
    assert_error(small(pd_fastdeploy_router_port=7000), "c1", "pd_fastdeploy_router_port",
                 "also bound by c1/proxy")


# ---------------------------------------------------------------- flag conformance


@pytest.mark.parametrize("inputs", [
    guide_inventory(),
    mutate(guide_inventory(), pd_fastdeploy_scheduler="router"),
    small("redis", pd_redis_password="pw", pd_devices_per_node=4, pd_tp=2),
    small(pd_devices_per_node=4, pd_tp=1, pd_dp_mode="external"),
], ids=["guide-redis", "guide-router", "redis-dp", "router-dp4"])
def test_every_planned_flag_exists_and_parses(inputs):
    from pd_deploy.engines.fastdeploy_flags import check_argv, table_for

    specs = specs_of(inputs)
    api = table_for("api_server", "2")
    for by_unit in specs.values():
        for unit, spec in by_unit.items():
            for proc in spec["processes"]:
                argv = proc["argv"]
                if unit in ("P", "D"):
                    start = argv.index("fastdeploy.entrypoints.openai.api_server") + 1
                    assert check_argv(argv[start:], api) == [], proc["name"]
                elif unit == "fd-router":
                    assert check_argv(argv[1:], table_for("golang_router", "2")) == []


def test_conformance_catches_removed_and_bad_flags():
    from pd_deploy.engines.fastdeploy_flags import check_argv, table_for

    errors = check_argv(["--innode-prefill-ports", "8182", "--splitwise-role", "both"],
                        table_for("api_server", "2"))
    assert any("removed" in e for e in errors) and any("both" in e for e in errors)


def test_internal_dp_on_one_node_is_refused():
    assert_error(small(pd_dp_mode="internal", pd_devices_per_node=2), "p1", "pd_dp_mode",
                 "use external")


def test_ips_node_with_two_dp_ranks_is_refused():
    groups, hostvars = small(pd_tp=2, pd_devices_per_node=4, pd_dp_mode="internal")
    groups["P"].append("p2")
    hostvars["p2"] = dict(hostvars["p1"], ansible_host="10.0.0.3", host_ip="10.0.0.1")
    assert_error((groups, hostvars), "p1", "devices", "holds one DP rank")


def test_redis_password_without_redis():
    errors = errors_of(small("router", pd_redis_password="pw"))
    assert any("pd_redis_password: is set but pd_fastdeploy_scheduler is router" in e
               for e in errors), errors


def test_rdma_comm_ports_that_are_not_ports():
    assert_error(small(pd_fastdeploy_rdma_comm_ports="7671,x"), "p1",
                 "pd_fastdeploy_rdma_comm_ports", "'x' is not a port")
