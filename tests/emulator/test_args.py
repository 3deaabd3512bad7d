"""argv handling: the planner's argv, unknown vLLM flags, malformed values, KV ports."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pd_launcher.emulator import args as A
from tests.emulator.helpers import ROOT, free_port, kvcfg

PLANNER_ARGV = [
    "/models/demo", "--host", "127.0.1.1", "--port", "7100", "--served-model-name", "demo",
    "--tensor-parallel-size", "1", "--data-parallel-size", "4", "--data-parallel-rank", "1",
    "--data-parallel-address", "127.0.1.1", "--data-parallel-rpc-port", "12321",
    "--kv-transfer-config", kvcfg("kv_producer", 36000, pdp=4, ddp=2),
    "--max-num-seqs", "8", "--enforce-eager", "--max-num-batched-tokens", "16384",
    "--no-enable-prefix-caching", "--enable-expert-parallel", "--gpu_memory_utilization=0.9",
    "--additional-config", '{"torchair_graph_config": {"enabled": false}}',
]


def run_cli(argv, env=None, timeout=20):
    import os

    full = dict(os.environ, PYTHONPATH=str(ROOT), PD_EMU_ZERO_LATENCY="1")
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "pd_launcher.emulator", "serve"] + argv,
                          capture_output=True, text=True, env=full, timeout=timeout,
                          cwd=str(ROOT))


def test_planner_argv_external_dp_rank():
    a = A.parse(PLANNER_ARGV, env={})
    assert a.model == "/models/demo" and a.served_name == "demo"
    assert (a.host, a.port, a.max_num_seqs, a.tp, a.dp) == ("127.0.1.1", 7100, 8, 1, 4)
    assert a.dp_mode == "external" and a.ranks == [1] and not a.dp_master
    assert a.kv.role == "kv_producer" and a.kv.policy == "fail"
    assert a.kv_ports == [36001] and a.kv_host == "127.0.1.1"
    assert a.rank_engine_id(1) == a.kv.engine_id + "_dp1"
    assert a.ignored == [
        "--enforce-eager", "--max-num-batched-tokens 16384", "--no-enable-prefix-caching",
        "--enable-expert-parallel", "--gpu-memory-utilization=0.9",
        '--additional-config {"torchair_graph_config": {"enabled": false}}',
    ]
    A.check_mooncake(a.kv, a.tp, a.dp)  # prefill sizes match


def test_internal_dp_master_and_headless_ranks_and_ports():
    base = ["/m", "--data-parallel-size", "4", "--data-parallel-size-local", "2",
            "--data-parallel-address", "127.0.1.5", "--data-parallel-rpc-port", "1234",
            "--tensor-parallel-size", "2",
            "--kv-transfer-config", kvcfg("kv_producer", 36200, pdp=4, ptp=2)]
    m = A.parse(base, env={})
    assert m.dp_mode == "internal" and m.ranks == [0, 1] and m.dp_master
    assert m.kv_ports == [36200, 36202]
    h = A.parse(base + ["--headless", "--data-parallel-start-rank", "2"], env={})
    assert h.ranks == [2, 3] and h.headless and not h.dp_master
    assert h.kv_ports == [36204, 36206] and h.kv_host == "127.0.1.5"  # kv_port + rank * tp
    # a Mooncake V1/Hybrid consumer pulls from the producers and listens on nothing
    for connector in ("MooncakeConnectorV1", "MooncakeHybridConnector"):
        consumer = [a if a[0] != "{" else kvcfg("kv_consumer", 36200, ddp=4, dtp=2,
                                                  connector=connector) for a in base]
        assert A.parse(consumer + ["--headless", "--data-parallel-start-rank", "2"],
                       env={}).kv_ports == []
    n = A.parse(base, env={"VLLM_NIXL_SIDE_CHANNEL_PORT": "5700",
                           "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.1.9"})
    assert n.kv_ports == [5700, 5701] and n.kv_host == "127.0.1.9"  # NIXL: base + rank


def test_single_aggregated_engine_and_flag_spellings():
    a = A.parse(["/m", "--max_num_seqs", "3", "-tp", "2", "--max-model-len", "4K",
                 "--served-model-name", "a", "b", "--trust-remote-code", "--seed", "-1"], env={})
    assert a.kv is None and a.kv_ports == [] and a.dp_mode == "single" and a.ranks == [0]
    assert (a.max_num_seqs, a.tp, a.max_model_len) == (3, 2, 4096)
    assert a.served_model_names == ["a", "b"]
    assert a.ignored == ["--trust-remote-code", "--seed -1"]


def test_dotted_kv_transfer_config():
    a = A.parse(["/m", "--kv-transfer-config.kv_connector", "NixlConnector",
                 "--kv-transfer-config.kv_role=kv_both",
                 "--kv-transfer-config.kv_load_failure_policy", "recompute"], env={})
    assert (a.kv.connector, a.kv.role, a.kv.policy) == ("NixlConnector", "kv_both", "recompute")
    assert a.kv_ports == [5600]  # NIXL default side-channel port


@pytest.mark.parametrize("cfg,needle", [
    ({"kv_connector": "MooncakeConnectorV1", "kv_role": "kv_producer", "kv_rank": 0,
      "kv_parallel_size": 2}, "kv_parallel_size, kv_rank removed in vLLM 0.32"),
    ({"kv_connector": "MooncakeConnectorV1", "kv_role": "kv_producer", "kv_ip": "1.2.3.4"},
     "kv_ip removed"),
    ({"kv_connector": "MooncakeConnectorV1", "kv_role": "kv_producer", "kv_bogus": 1},
     "unknown field(s) kv_bogus"),
    ({"kv_connector": "MooncakeConnectorV1"}, "kv_role is required"),
    ({"kv_connector": "X", "kv_role": "producer"}, "kv_role 'producer' not in"),
    ({"kv_connector": "X", "kv_role": "kv_both", "kv_load_failure_policy": "retry"},
     "kv_load_failure_policy 'retry'"),
    ({"kv_connector": "X", "kv_role": "kv_both", "kv_port": "36000"}, "kv_port must be"),
])
def test_bad_kv_transfer_config_exits_2(cfg, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        A.parse(["/m", "--kv-transfer-config", json.dumps(cfg)], env={})
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--kv-transfer-config" in err and needle in err


@pytest.mark.parametrize("argv,needle", [
    (["--max-num-seqs", "abc"], "argument --max-num-seqs: invalid int value: 'abc'"),
    (["--max-num-seqs", "0"], "argument --max-num-seqs: must be >= 1"),
    (["--port", "70000"], "port out of range"),
    (["--data-parallel-size", "two"], "argument --data-parallel-size"),
    (["--max-model-len", "lots"], "invalid human-readable int"),
    (["--kv-transfer-config", "{not json"], "invalid JSON"),
    (["--kv-transfer-config", "[1]"], "expected a JSON object"),
    (["--data-parallel-size", "2", "--data-parallel-rank", "2"], "must be < --data-parallel-size"),
    (["--data-parallel-size", "4", "--data-parallel-size-local", "2", "--headless",
      "--data-parallel-start-rank", "3"], "exceeds --data-parallel-size 4"),
])
def test_malformed_values_exit_2(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        A.parse(["/m"] + argv, env={})
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_mooncake_size_mismatch_is_a_startup_error():
    a = A.parse(["/m", "--data-parallel-size", "2", "--data-parallel-rank", "0",
                 "--kv-transfer-config", kvcfg("kv_consumer", 36000, ddp=4)], env={})
    with pytest.raises(A.StartupError, match=r"decode\.dp_size = 4 does not match "
                       r"--data-parallel-size 2"):
        A.check_mooncake(a.kv, a.tp, a.dp)
    b = A.parse(["/m", "-tp", "2", "--kv-transfer-config", kvcfg("kv_producer", 36000)],
                env={})
    with pytest.raises(A.StartupError, match=r"prefill\.tp_size = 1 does not match"):
        A.check_mooncake(b.kv, b.tp, b.dp)
    # Nixl has no such check
    c = A.parse(["/m", "-tp", "2", "--kv-transfer-config",
                 kvcfg("kv_producer", 36000, connector="NixlConnector")], env={})
    A.check_mooncake(c.kv, c.tp, c.dp)


def test_cli_exit_codes_for_bad_argv_env_and_mooncake():
    bad = run_cli(["/m", "--max-num-seqs", "many"])
    assert bad.returncode == 2 and "invalid int value: 'many'" in bad.stderr
    removed = run_cli(["/m", "--kv-transfer-config", json.dumps(
        {"kv_connector": "MooncakeConnectorV1", "kv_role": "kv_producer", "kv_rank": 0})])
    assert removed.returncode == 2 and "kv_rank removed in vLLM 0.32" in removed.stderr
    mismatch = run_cli(["/m", "--kv-transfer-config", kvcfg("kv_producer", 36000, pdp=2)])
    assert mismatch.returncode == 1 and "prefill.dp_size = 2 does not match" in mismatch.stderr
    env = run_cli(["/m"], env={"PD_EMU_ITL_S": "fast"})
    assert env.returncode == 2 and "PD_EMU_ITL_S='fast' is not a number" in env.stderr


def test_unknown_flags_accepted_by_a_running_engine(emu_factory):
    host = "127.0.1.60"
    port = free_port(host)
    e = emu_factory("flags", host, port, [
        "--served-model-name", "demo", "--enforce-eager", "--max-num-batched-tokens", "256",
        "--no-enable-prefix-caching", "--block-size", "128", "--quantization=ascend",
        "--speculative-config", '{"method": "mtp"}'])
    e.wait_ready()
    e.wait_log("ignoring vLLM flags the emulator does not model: --enforce-eager "
               "--max-num-batched-tokens 256 --no-enable-prefix-caching --block-size 128 "
               "--quantization=ascend --speculative-config")
    status, _, body = e.post("/v1/completions", {"model": "demo", "prompt": "hi"})
    assert status == 200 and body["usage"]["completion_tokens"] == 16
    assert e.log().count("ignoring vLLM flags") == 1


def test_port_clashes_are_real(emu_factory):
    host = "127.0.1.61"
    api, kv = free_port(host), free_port(host)
    cfg = kvcfg("kv_producer", kv)
    first = emu_factory("first", host, api, ["--kv-transfer-config", cfg]).wait_ready()
    same_api = emu_factory("same-api", host, api, [])
    assert same_api.wait_exit() == 1
    assert f"cannot bind the API port {host}:{api}" in same_api.log()
    same_kv = emu_factory("same-kv", host, free_port(host), ["--kv-transfer-config", cfg])
    assert same_kv.wait_exit() == 1
    assert f"cannot bind the KV port {host}:{kv}" in same_kv.log()
    # the same ports on another loopback address are fine: listeners bind their own host
    other = emu_factory("other-host", "127.0.1.62", api, ["--kv-transfer-config", cfg])
    other.wait_ready()
    assert first.health() == 200


def test_help_is_not_swallowed_as_an_unknown_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        A.parse(["--help"], env={})
    assert exc.value.code == 0 and "--kv-transfer-config" in capsys.readouterr().out
