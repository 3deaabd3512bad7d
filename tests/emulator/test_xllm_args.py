"""xLLM personalities, argv: gflags syntax, the planner's argv, malformed values (exit 2),
start-up refusals (exit 1: no --model, empty or unreachable etcd, a taken port)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from pd_launcher.emulator.xllm import flags as F
from pd_launcher.emulator.xllm import instance as I
from pd_launcher.emulator.xllm import service as S
from tests.emulator.helpers import ROOT, free_port

PLANNER_ARGV = [
    "--model=/models/m", "--port=7100", "--devices=npu:0", "--master_node_addr=127.0.1.1:18888",
    "--enable_prefix_cache=false", "--enable_chunked_prefill=false",
    "--enable_disagg_pd=true", "--instance_role=PREFILL", "--etcd_addr=127.0.1.9:2379",
    "--transfer_listen_port=26000", "--disagg_pd_port=7777", "--node_rank=0", "--nnodes=2",
    "--host=127.0.1.1", "--etcd_namespace=mycluster",
]


def run(cmd, argv, timeout=20, env=None):
    full = dict(os.environ, PYTHONPATH=str(ROOT), PD_EMU_ZERO_LATENCY="1")
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "pd_launcher.emulator", cmd] + argv,
                          capture_output=True, text=True, env=full, timeout=timeout,
                          cwd=str(ROOT))


def test_planner_argv():
    c = I.parse_args(PLANNER_ARGV, env={})
    assert (c.model, c.model_name, c.device, c.host, c.port) == (
        "/models/m", "m", "npu:0", "127.0.1.1", 7100)
    assert (c.master_host, c.master_port, c.nnodes, c.node_rank) == ("127.0.1.1", 18888, 2, 0)
    assert c.routing and c.role == "PREFILL" and c.etcd_addr == "127.0.1.9:2379"
    assert (c.transfer_port, c.disagg_pd_port, c.etcd_ttl, c.heart_beat_interval) == (
        26000, 7777, 3, 0.5)
    assert c.name == "127.0.1.1:7100"
    assert c.key == "/mycluster/XLLM:PREFILL:127.0.1.1:7100"
    assert c.ignored == [] and c.stray == []


def test_space_syntax_bools_unknown_flags_and_device_id():
    argv = ["--model", "/m/x/", "-port", "7101", "--device_id", "3", "--enable_disagg_pd",
            "--instance_role", "DECODE", "--noenable_prefix_cache", "--etcd_namespace",
            "/a/b/", "--heart_beat_interval=0.2", "--etcd_ttl", "5", "--max_seqs_per_batch",
            "64", "--enable_mla=false", "--host", "127.0.1.2", "--some_switch",
            "--communication_backend=lccl", "--rank_tablefile=" + __file__]
    c = I.parse_args(argv, env={})
    assert (c.model_name, c.port, c.device, c.role, c.routing) == ("x", 7101, "npu:3",
                                                                    "DECODE", True)
    assert c.key == "/a/b/XLLM:DECODE:127.0.1.2:7101"  # slashes stripped from ns
    assert (c.heart_beat_interval, c.etcd_ttl) == (0.2, 5)
    assert c.ignored == ["--max_seqs_per_batch 64", "--enable_mla=false", "--some_switch"]
    p = F.parse(["--enable_disagg_pd", "false", "--enable_prefix_cache=0",
                 "--enable_chunked_prefill=yes"], I.SPECS)
    # as gflags: a bool never takes the next token ("false" is a stray argument)
    assert p.enable_disagg_pd is True and p.stray == ["false"]
    assert p.enable_prefix_cache is False and p.enable_chunked_prefill is True
    assert I.parse_args(["--model=m", "--devices=npu:0", "--etcd_namespace="],
                        env={}).key == "XLLM:DEFAULT:" + I.parse_args(
        ["--model=m", "--devices=npu:0"], env={}).name


def test_service_argv():
    c = S.parse_args(["--etcd_addr=127.0.1.9:2379", "--etcd_namespace=mycluster",
                      "--http_server_port=8888", "--rpc_server_port", "8889",
                      "--server_host=127.0.1.9", "--tokenizer_path=/models/m",
                      "--load_balance_policy=CAR", "--num_threads=8", "--timeout_ms=5000"])
    assert (c.http_port, c.rpc_port, c.server_host, c.policy) == (8888, 8889, "127.0.1.9",
                                                                   "CAR")
    assert c.ip == "127.0.1.9" and c.key("XLLM:SERVICE:MASTER") == (
        "/mycluster/XLLM:SERVICE:MASTER")
    assert c.ignored == ["--num_threads=8"] and c.timeout_ms == 5000
    assert S.parse_args([]).bind_host == "0.0.0.0"


@pytest.mark.parametrize("argv, flag", [
    (["--port=abc"], "port"),
    (["--port", "70000"], "port"),
    (["--enable_disagg_pd=maybe"], "enable_disagg_pd"),
    (["--instance_role=prefill"], "instance_role"),
    (["--devices=npu0"], "devices"),
    (["--heart_beat_interval=fast"], "heart_beat_interval"),
    (["--master_node_addr=nohost"], "master_node_addr"),
    (["--kv_cache_transfer_mode=SIDEWAYS"], "kv_cache_transfer_mode"),
    (["--nnodes=0"], "nnodes"),
])
def test_bad_instance_values_exit_2_naming_the_flag(capsys, argv, flag):
    assert I.main(["--model=/m", "--devices=npu:0"] + argv) == 2
    err = capsys.readouterr().err
    assert f"flag '{flag}'" in err and "illegal value" in err


def test_bad_service_values_exit_2(capsys):
    assert S.main(["--load_balance_policy=FASTEST"]) == 2
    assert "flag 'load_balance_policy'" in capsys.readouterr().err
    assert S.main(["--rpc_server_port=x"]) == 2
    assert I.main(["--model=/m", "--devices=npu:0", "--port"]) == 2  # missing its argument
    assert "flag 'port' is missing its argument" in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["--devices=npu:0"], "--model is required"),
    (["--model=/m"], "exactly one of --devices"),
    (["--model=/m", "--devices=npu:0", "--device_id=0"], "exactly one of --devices"),
    (["--model=/m", "--device_id=1", "--node_rank=2", "--nnodes=2"], "must be < --nnodes"),
    (["--model=/m", "--device_id=1", "--rank_tablefile=/nonexistent/rt.json"], "no such file"),
])
def test_startup_refusals_exit_1(capsys, argv, needle):
    assert I.main(argv) == 1
    assert needle in capsys.readouterr().err


def test_help_exits_0(capsys):
    assert I.main(["--help"]) == 0 and "--transfer_listen_port" in capsys.readouterr().out
    assert S.main(["--help"]) == 0 and "--rpc_server_port" in capsys.readouterr().out


def test_empty_etcd_addr_fails_xservice_client_init():
    host = "127.0.1.40"
    r = run("xllm", ["--model=/m", "--devices=npu:0", f"--host={host}",
                     f"--port={free_port(host)}", f"--disagg_pd_port={free_port(host)}",
                     f"--transfer_listen_port={free_port(host)}",
                     f"--master_node_addr={host}:{free_port(host)}", "--enable_disagg_pd",
                     "--instance_role=PREFILL", "--unknown_flag=1"])
    assert r.returncode == 1, r.stderr
    assert "etcd_addr address is empty" in r.stderr and "XServiceClient init fail!" in r.stderr
    assert "ignoring flags the emulator does not model: --unknown_flag=1" in r.stderr


def test_unreachable_etcd_exits_1():
    host = "127.0.1.41"
    dead = free_port(host)  # nothing listens there
    r = run("xllm", ["--model=/m", "--device_id=0", f"--host={host}",
                     f"--port={free_port(host)}", f"--disagg_pd_port={free_port(host)}",
                     f"--transfer_listen_port={free_port(host)}",
                     f"--master_node_addr={host}:{free_port(host)}", "--enable_disagg_pd=1",
                     "--instance_role=DECODE", f"--etcd_addr={host}:{dead}"])
    assert r.returncode == 1, r.stderr
    assert f"cannot connect to etcd at {host}:{dead}" in r.stderr
    r = run("xllm_master_serving", [f"--etcd_addr={host}:{dead}", f"--server_host={host}",
                                    f"--http_server_port={free_port(host)}",
                                    f"--rpc_server_port={free_port(host)}"])
    assert r.returncode == 1 and "cannot use etcd" in r.stderr, r.stderr


def test_taken_port_exits_1():
    host = "127.0.1.42"
    with socket.socket() as s:
        s.bind((host, 0))
        s.listen(1)
        taken = s.getsockname()[1]
        r = run("xllm_master_serving", [f"--server_host={host}", f"--http_server_port={taken}",
                                        f"--rpc_server_port={free_port(host)}"])
        assert r.returncode == 1 and f"http_server port {host}:{taken}" in r.stderr, r.stderr
        r = run("xllm", ["--model=/m", "--devices=npu:0", f"--host={host}",
                         f"--port={free_port(host)}", f"--transfer_listen_port={taken}",
                         f"--master_node_addr={host}:{free_port(host)}"])
        assert r.returncode == 1 and "transfer_listen port" in r.stderr, r.stderr
