"""FastDeploy personalities, argv: the guide's commands, argparse syntax, malformed values
(exit 2 naming the flag), FastDeploy's start-up refusals (exit 1), the router's argv and
config file, the Redis version check, the router's choice of P/D and protocol."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from pd_launcher.emulator.fastdeploy import flags as F
from pd_launcher.emulator.fastdeploy import instance as I
from pd_launcher.emulator.fastdeploy import router as R
from pd_launcher.emulator.fastdeploy.common import Timings
from pd_launcher.emulator.fastdeploy.scheduler import version_problem
from pd_launcher.emulator.openai import ApiError
from tests.emulator.helpers import ROOT, free_port

ENV = {"KVCACHE_RDMA_NICS": "mlx5_0,mlx5_1", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}

# the PD guide's prefill command, flag for flag
GUIDE_PREFILL = [
    "--model", "ERNIE-4.5-300B-A47B-BF16", "--port", "8180", "--metrics-port", "8181",
    "--engine-worker-queue-port", "8182", "--cache-queue-port", "8183",
    "--tensor-parallel-size", "4", "--quantization", "wint4",
    "--cache-transfer-protocol", "rdma,ipc", "--rdma-comm-ports", "7671,7672,7673,7674",
    "--pd-comm-port", "2334", "--splitwise-role", "prefill", "--scheduler-name", "splitwise",
    "--scheduler-host", "127.0.0.1", "--scheduler-port", "6379", "--scheduler-topic", "test",
    "--scheduler-ttl", "9000",
]


def run(cmd, argv, env=None, timeout=20):
    full = dict(os.environ, PYTHONPATH=str(ROOT), PD_EMU_ZERO_LATENCY="1")
    for var in ("FD_LOG_DIR", "KVCACHE_RDMA_NICS", "CUDA_VISIBLE_DEVICES"):
        full.pop(var, None)
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "pd_launcher.emulator", cmd] + argv,
                          capture_output=True, text=True, env=full, timeout=timeout,
                          cwd=str(ROOT))


def test_the_guides_prefill_command():
    c = I.parse_args(GUIDE_PREFILL, env=dict(ENV, ENABLE_V1_KVCACHE_SCHEDULER="0"))
    assert (c.role, c.scheduler, c.redis_mode, c.router) == ("prefill", "splitwise", True, None)
    assert (c.port, c.metrics_port, c.ewq_port, c.cq_port, c.pd_port) == (
        8180, 8181, 8182, 8183, 2334)
    assert c.tp == 4 and c.rdma_ports == [7671, 7672, 7673, 7674]
    assert c.protocols == ["rdma", "ipc"] and c.rdma_nics == ["mlx5_0", "mlx5_1"]
    assert c.device_ids == ["0", "1", "2", "3"] and c.v1_kvcache == 0
    r = c.redis
    assert (r.host, r.port, r.db, r.password, r.topic, r.ttl, r.sync_ms, r.expire_ms) == (
        "127.0.0.1", 6379, 0, None, "test", 9000, 5, 3000)
    assert c.ignored == ["--quantization wint4"] and c.served[0] == "ERNIE-4.5-300B-A47B-BF16"
    assert c.host == "0.0.0.0" and c.master


def test_the_guides_decode_command_loses_its_last_flags():
    # the guide's decode command lacks a "\" after --scheduler-ttl 9000: the shell runs
    # the rest (--scheduler-topic "test" --splitwise-role "decode") as another command
    argv = GUIDE_PREFILL[:GUIDE_PREFILL.index("--splitwise-role")] + [
        "--scheduler-name", "splitwise", "--scheduler-ttl", "9000"]
    c = I.parse_args(argv, env=ENV)
    assert c.role == "mixed" and c.redis.topic == "default"
    assert c.pd_port == 2334 and c.rdma_ports == []  # a mixed instance has no connector


def test_argparse_syntax_router_mode_and_unknown_flags():
    argv = ["--model=/m/x/", "-tp", "2", "--port=9100", "--splitwise_role", "decode",
            "--router", "http://10.0.0.5:30000/", "--rdma_comm_ports=7001,7002",
            "--pd-comm-port", "2335", "--no-enable-prefix-caching", "--enable-chunked-prefill",
            "--max-num-batched-tokens", "384", "--use-cudagraph", "--graph-optimization-config",
            '{"use_cudagraph":false}', "--dynamic-load-weight", "--load-choices=default_v1",
            "--data-parallel-size", "2", "--host", "127.0.1.5", "--ips", "127.0.1.5,127.0.1.6"]
    c = I.parse_args(argv, env={"KVCACHE_RDMA_NICS": "eth0"})
    assert (c.role, c.tp, c.port, c.metrics_port, c.dp) == ("decode", 2, 9100, 9100, 2)
    assert c.router == "http://10.0.0.5:30000" and not c.redis_mode
    assert c.rdma_ports == [7001, 7002] and c.pd_port == 2335
    assert c.served == ["/m/x/", "x"] and c.device_ids == ["0", "1"]
    assert (c.host_ip, c.ips, c.node_rank, c.master) == (
        "127.0.1.5", ["127.0.1.5", "127.0.1.6"], 0, True)
    assert c.ignored == ["--enable-chunked-prefill", "--max-num-batched-tokens 384",
                         "--use-cudagraph", "--graph-optimization-config "
                         '{"use_cudagraph":false}', "--dynamic-load-weight",
                         "--load-choices=default_v1"]
    p = F.parse(["--no-enable-prefix-caching"], I.SPECS)
    assert p.enable_prefix_caching is False
    c = I.parse_args(argv[:-2] + ["--ips", "127.0.1.4,127.0.1.5", "--host", "127.0.1.5"],
                     env={"KVCACHE_RDMA_NICS": "eth0"})
    assert c.node_rank == 1 and not c.master


def test_a_dp_rank_takes_its_share_of_the_port_lists():
    argv = ["--splitwise-role", "prefill", "--router", "127.0.0.1:9000", "-tp", "2",
            "--data-parallel-size", "2", "--local-data-parallel-id", "1",
            "--rdma-comm-ports", "7001,7002,7003,7004", "--pd-comm-port", "2334,2335",
            "--engine-worker-queue-port", "8182,8282", "--cache-queue-port", "8183,8283"]
    c = I.parse_args(argv, env=ENV)
    assert (c.rdma_ports, c.pd_port, c.ewq_port, c.cq_port) == ([7003, 7004], 2335, 8282, 8283)
    assert c.device_ids == ["2", "3"]
    c = I.parse_args(argv, env={"KVCACHE_RDMA_NICS": "x"})
    assert c.device_ids == ["2", "3"]  # no CUDA_VISIBLE_DEVICES: the rank's device numbers


@pytest.mark.parametrize("argv, flag, why", [
    (["--port", "abc"], "port", "invalid int value"),
    (["--port=70000"], "port", "not a TCP port"),
    (["--port"], "port", "expected one argument"),
    (["--splitwise-role", "prefil"], "splitwise-role", "invalid choice"),
    (["--cache-transfer-protocol", "rdma,tcp"], "cache-transfer-protocol", "'tcp'"),
    (["--rdma-comm-ports", "7671,x"], "rdma-comm-ports", "invalid int value"),
    (["--rdma-comm-ports", "7671,"], "rdma-comm-ports", "comma-separated"),
    (["--router", "nohost"], "router", "expected ip:port"),
    (["--scheduler-name", "redis"], "scheduler-name", "invalid choice"),
    (["--tensor-parallel-size", "0"], "tensor-parallel-size", "must be >= 1"),
    (["--scheduler-ttl", "-1"], "scheduler-ttl", "must be >= 1"),
    (["--enable-prefix-caching=yes"], "enable-prefix-caching", "ignored explicit argument"),
])
def test_malformed_values_exit_2_naming_the_flag(capsys, argv, flag, why):
    assert I.main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: argument --{flag}: " in err and why in err, err


def test_removed_flag_and_bad_env_exit_2(capsys, monkeypatch):
    for flag in ("--innode-prefill-ports", "--innode_prefill_ports", "--inner-prefill-ports"):
        assert I.main(["--splitwise-role", "decode", flag, "8180"]) == 2
        err = capsys.readouterr().err
        name = flag.lstrip("-").replace("_", "-")
        assert f"argument --{name}: was removed from FastDeploy" in err, err
    monkeypatch.setenv("ENABLE_V1_KVCACHE_SCHEDULER", "yes")
    assert I.main([]) == 2
    assert "ENABLE_V1_KVCACHE_SCHEDULER='yes'" in capsys.readouterr().err
    monkeypatch.delenv("ENABLE_V1_KVCACHE_SCHEDULER")
    monkeypatch.setenv("PD_EMU_FD_HEALTH_S", "soon")
    assert R.main([]) == 2 and "PD_EMU_FD_HEALTH_S" in capsys.readouterr().err


@pytest.mark.parametrize("argv, env, needle", [
    (["--splitwise-role", "prefill"], ENV,
     "When using prefill role and the local scheduler, please provide --router argument."),
    (["--splitwise-role", "decode", "--router", "127.0.0.1:9000"], ENV,
     "Please set --rdma_comm_ports argument when using rdma cache transfer protocol."),
    (["--splitwise-role", "decode", "--router", "127.0.0.1:9000", "-tp", "4",
      "--rdma-comm-ports", "7671,7672"], ENV,
     "The number of rdma_comm_ports must equal tensor_parallel_size * (data_parallel_size / "
     "num_nodes) = 4 * (1 / 1) = 4, but got 2."),
    (["--splitwise-role", "decode", "--router", "127.0.0.1:9000", "--rdma-comm-ports",
      "7671"], {}, "KVCACHE_RDMA_NICS is not set"),
    (["--data-parallel-size", "2", "--local-data-parallel-id", "2"], ENV,
     "--local-data-parallel-id 2 must be < --data-parallel-size 2"),
    (["--host", "127.0.1.9", "--ips", "127.0.1.1,127.0.1.2"], ENV,
     "this node's IP 127.0.1.9 (--host, or the local IP) is not in --ips"),
    (["--splitwise-role", "decode", "--router", "127.0.0.1:9000", "--rdma-comm-ports", "1",
      "--ips", "127.0.1.1,127.0.1.2", "--host", "127.0.1.1"], ENV,
     "data_parallel_size (1) must be divisible by num_nodes (2)."),
    (["--scheduler-name", "global"], ENV, "--scheduler-name global is not modelled"),
    (["--splitwise-role", "prefill", "--router", "127.0.0.1:9000", "--data-parallel-size",
      "2", "--local-data-parallel-id", "1", "--pd-comm-port", "2334",
      "--cache-transfer-protocol", "ipc"], ENV, "--pd-comm-port lists 1 port(s)"),
])
def test_fastdeploys_startup_refusals_exit_1(capsys, monkeypatch, argv, env, needle):
    for var in ("KVCACHE_RDMA_NICS", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert I.main(argv) == 1
    assert needle in capsys.readouterr().err


def test_mixed_needs_no_rdma_nics_and_ipc_needs_no_rdma_ports():
    c = I.parse_args(["--splitwise-role", "prefill", "--router", "127.0.0.1:9000",
                      "--cache-transfer-protocol", "ipc"], env={})
    assert c.rdma_ports == [] and c.rdma_nics == [] and c.pd_port == 0  # 0: any free port
    assert I.parse_args([], env={}).role == "mixed"


def test_help_and_version(capsys):
    assert I.main(["--help"]) == 0 and "--rdma-comm-ports" in capsys.readouterr().out
    assert R.main(["-h"]) == 0 and "--config-path" in capsys.readouterr().out
    assert R.main(["--version"]) == 0 and "fd-router" in capsys.readouterr().out


def test_router_argv_and_config_file(tmp_path):
    cfg = R.parse_args(["--port", "9001", "--splitwise"], env={})
    assert (cfg.host, cfg.port, cfg.splitwise, cfg.timeout_s) == ("0.0.0.0", 9001, True, 1800)
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps({"server": {"host": "127.0.1.7", "port": 9002, "splitwise": True,
                                           "mode": "release"},
                                "scheduler": {"policy": "random"}}))
    cfg = R.parse_args([f"--config_path={path}"], env={"FD_LOG_DIR": "/tmp/x"})
    assert (cfg.host, cfg.port, cfg.splitwise, cfg.log_dir) == ("127.0.1.7", 9002, True,
                                                                "/tmp/x")
    cfg = R.parse_args(["-port", "9003", "--config_path", str(path), "--host", "127.0.1.8",
                        "--request-timeout-secs", "30", "--workers", "2"], env={})
    assert (cfg.host, cfg.port, cfg.timeout_s) == ("127.0.1.8", 9003, 30)  # flags win
    assert cfg.ignored == ["--workers 2"]
    for content, needle in (("server:\n  port: 9000\n", "is not JSON"),
                            ('{"server": {"port": "x"}}', "server.port"),
                            ('{"server": {"splitwise": "yes"}}', "server.splitwise"),
                            ('{"server": []}', "a 'server' object")):
        path.write_text(content)
        with pytest.raises(F.FlagError, match="--config_path"):
            R.parse_args(["--config_path", str(path)], env={})
        try:
            R.parse_args(["--config_path", str(path)], env={})
        except F.FlagError as exc:
            assert needle in str(exc)
    with pytest.raises(F.FlagError, match="cannot read"):
        R.parse_args(["--config_path", str(tmp_path / "missing.yaml")], env={})


def test_redis_version_check():
    assert version_problem("7.0.15") is None and version_problem("6.2.0") is None
    assert version_problem("10.0") is None
    for old in ("6.0.16", "5.0.7", "3.2"):
        assert "too low. Please upgrade to Redis 6.2+" in version_problem(old)
    assert "cannot parse" in version_problem("x.y")


def _router(splitwise: bool = True) -> R.Router:
    cfg = R.RouterConfig("127.0.0.1", 9000, splitwise, 1800, None, None, [], [])
    return R.Router(cfg, Timings())


def _inst(role: str, host: str, port: int, tp: int = 1, protos=("ipc", "rdma")) -> R.Inst:
    return R._instance({"role": role, "host_ip": host, "port": port, "tp_size": tp,
                        "transfer_protocol": list(protos), "connector_port": port + 1,
                        "rdma_ports": [port + 2], "device_ids": [0]})


def test_router_picks_builds_disaggregate_info_and_checks_tp():
    rt = _router()
    p, d = _inst("prefill", "10.0.0.1", 8180), _inst("decode", "10.0.0.1", 8184)
    rt.instances = {i.key: i for i in (p, d)}
    targets, fwd = rt._pick({"prompt": "x"})
    assert targets == [p, d] and len(fwd["request_id"]) == 36
    assert fwd["disaggregate_info"] == {
        "prefill_ip": "10.0.0.1", "decode_ip": "10.0.0.1", "prefill_connector_port": "8181",
        "decode_connector_port": "8185", "decode_device_ids": ["0"],
        "decode_rdma_ports": ["8186"], "transfer_protocol": "ipc", "decode_tp_size": 1}
    assert rt._pick({"prompt": "x", "request_id": "abc"})[1]["request_id"] == "abc"
    d2 = _inst("decode", "10.0.0.2", 8184)  # another host: rdma
    rt.instances = {i.key: i for i in (p, d2)}
    assert rt._pick({})[1]["disaggregate_info"]["transfer_protocol"] == "rdma"
    d3 = _inst("decode", "10.0.0.1", 8184, protos=("rdma",))  # no ipc on one side: rdma
    rt.instances = {i.key: i for i in (p, d3)}
    assert rt._pick({})[1]["disaggregate_info"]["transfer_protocol"] == "rdma"
    p4, d4 = _inst("prefill", "10.0.0.1", 8180, tp=4), _inst("decode", "10.0.0.1", 8184, tp=2)
    rt.instances = {i.key: i for i in (p4, d4)}
    with pytest.raises(ApiError, match="tp_size of prefill and decode should be equal"):
        rt._pick({})
    d5 = _inst("decode", "10.0.0.1", 8184, tp=1)  # decode TP 1 is allowed: rdma
    rt.instances = {i.key: i for i in (p4, d5)}
    assert rt._pick({})[1]["disaggregate_info"]["transfer_protocol"] == "rdma"
    rt.instances = {p.key: p}
    with pytest.raises(ApiError, match="No decode servers available") as exc:
        rt._pick({})
    assert exc.value.status == 503
    busy, idle = _inst("prefill", "10.0.0.3", 1000), _inst("prefill", "10.0.0.4", 1000)
    busy.inflight = 3
    rt.instances = {i.key: i for i in (busy, idle, d)}
    assert all(rt._pick({})[0][0] is idle for _ in range(5))  # least in flight


def test_register_body_validation():
    for body, needle in (([], "JSON object"), ({"role": "prefill", "host_ip": "h"}, "'port'"),
                         ({"role": "x", "host_ip": "h", "port": 1}, "Invalid role"),
                         ({"role": "decode", "host_ip": "h", "port": 1, "tp_size": 0},
                          "tp_size"),
                         ({"role": "decode", "host_ip": "h", "port": "p"}, "port")):
        with pytest.raises(ApiError, match=needle):
            R._instance(body)
    inst = R._instance({"role": "PREFILL", "host_ip": "h", "port": 8180,
                        "connector_port": 2334, "rdma_ports": [7671], "extra": 1})
    assert inst.role == "prefill" and inst.info["connector_port"] == "2334"
    assert inst.info["rdma_ports"] == ["7671"] and inst.info["extra"] == 1


def test_taken_port_exits_1_and_fd_log_dir_gets_a_log(tmp_path):
    host = "127.0.1.86"
    with socket.socket() as s:
        s.bind((host, 0))
        s.listen(1)
        taken = s.getsockname()[1]
        r = run("fastdeploy", ["--host", host, "--port", str(free_port(host)),
                               "--cache-queue-port", str(taken)],
                env={"FD_LOG_DIR": str(tmp_path / "log")})
        assert r.returncode == 1 and f"--cache-queue-port port {host}:{taken}" in r.stderr
        assert "cannot bind" in (tmp_path / "log" / "fastdeploy.log").read_text()
        r = run("fd-router", ["--host", host, "--port", str(taken)])
        assert r.returncode == 1 and "cannot bind the router (--port)" in r.stderr


def test_a_non_master_node_serves_nothing_and_waits(tmp_path):
    host = "127.0.1.87"
    api, rdma = free_port(host), free_port(host)
    full = dict(os.environ, PYTHONPATH=str(ROOT), PD_EMU_ZERO_LATENCY="1",
                KVCACHE_RDMA_NICS="mlx5_0")
    log = open(tmp_path / "node1.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pd_launcher.emulator", "fastdeploy", "--host", host,
         "--port", str(api), "--ips", f"127.0.1.88,{host}", "--splitwise-role", "decode",
         "--router", "127.0.1.88:9000", "--data-parallel-size", "2",
         "--rdma-comm-ports", str(rdma)],
        stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT), env=full)
    try:
        deadline = time.monotonic() + 15
        while b"only the master" not in (tmp_path / "node1.log").read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, (
                tmp_path / "node1.log").read_text()
            time.sleep(0.05)
        socket.create_connection((host, rdma), timeout=2).close()  # its RDMA stand-in
        with pytest.raises(OSError):
            socket.create_connection((host, api), timeout=2).close()  # no API
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        log.close()
    text = (tmp_path / "node1.log").read_text()
    assert "node rank 1 of 2" in text and "only the master 127.0.1.88 serves" in text
