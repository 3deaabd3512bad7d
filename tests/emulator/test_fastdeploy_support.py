"""Helpers of the FastDeploy emulator tests (no tests here): real `python -m
pd_launcher.emulator fastdeploy | fd-router` processes and a throwaway redis-server on
loopback addresses (127.0.1.x), each stopped by its own PID."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import pytest

from pd_launcher.emulator import textgen
from tests.emulator.helpers import EmuProc, free_port, parse_metrics, request

REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_MISSING = (None if os.path.exists(REDIS)
                 else "redis-server not installed (Debian package redis-server)")
MODEL = "/models/ernie"
PROMPT = "Disaggregated serving splits prefill and decode across engines."
MSGS = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Explain KV cache transfer."}]
BASE_ENV = {"PD_EMU_ZERO_LATENCY": "1", "KVCACHE_RDMA_NICS": "mlx5_0,mlx5_1",
            "PD_EMU_FD_REGISTER_S": "0.2", "PD_EMU_FD_HEALTH_S": "0.2"}
SLOW = {"PD_EMU_ZERO_LATENCY": "0", "PD_EMU_PREFILL_OVERHEAD_S": "0",
        "PD_EMU_PREFILL_S_PER_TOKEN": "0", "PD_EMU_ITL_S": "0.05"}


class FDProc(EmuProc):
    """One `python -m pd_launcher.emulator fastdeploy | fd-router` process."""

    base_env = BASE_ENV
    drop_env = ("FD_LOG_DIR", "CUDA_VISIBLE_DEVICES", "ENABLE_V1_KVCACHE_SCHEDULER")

    def __init__(self, name: str, cmd: str, argv: List[str], logdir: Path,
                 env: Optional[Dict[str, str]] = None) -> None:
        super().__init__(name, cmd, argv, logdir, env)
        self.ports: Dict[str, Any] = {}

    def get(self, path: str, port: Optional[int] = None) -> Any:
        status, _, data = request(self.host, port or self.port, "GET", path, timeout=5)
        try:
            return status, json.loads(data)
        except ValueError:
            return status, data

    def health(self) -> int:
        try:
            return request(self.host, self.port, "GET", "/health", timeout=2)[0]
        except OSError:
            return -1

    def metrics(self) -> Dict:
        status, _, data = request(self.host, self.port, "GET", "/metrics")
        assert status == 200
        return parse_metrics(data.decode())


Factory = Callable[..., FDProc]


def _factory(logdir: Path, started: List[FDProc]) -> Factory:
    def start(name: str, cmd: str, argv: List[str],
              env: Optional[Dict[str, str]] = None) -> FDProc:
        p = FDProc(name, cmd, argv, logdir, env)
        started.append(p)
        return p
    return start


def stop_all(started: List[FDProc]) -> None:
    for p in started:
        p.signal(signal.SIGTERM)
    for p in started:
        p.stop()


@pytest.fixture
def procs(tmp_path_factory):
    started: List[FDProc] = []
    yield _factory(tmp_path_factory.mktemp("fd"), started)
    stop_all(started)


@pytest.fixture(scope="module")
def module_procs(tmp_path_factory):
    started: List[FDProc] = []
    yield _factory(tmp_path_factory.mktemp("fd"), started)
    stop_all(started)


def start_router(procs: Factory, name: str, host: str, splitwise: bool = True,
                 env: Optional[Dict[str, str]] = None, extra: tuple = ()) -> FDProc:
    port = free_port(host)
    r = procs(name, "fd-router", ["--port", str(port), "--host", host]
              + (["--splitwise"] if splitwise else []) + list(extra), env)
    r.host, r.port = host, port
    return r


def start_instance(procs: Factory, name: str, host: str, role: str, mode: List[str],
                   tp: int = 1, env: Optional[Dict[str, str]] = None,
                   extra: tuple = ()) -> FDProc:
    """The guide's instance argv (ports from free_port) plus ``mode`` (router or
    scheduler flags)."""
    port, metrics, ewq, cq, pd = (free_port(host) for _ in range(5))
    rdma = [free_port(host) for _ in range(tp)]
    argv = ["--model", MODEL, "--port", str(port), "--metrics-port", str(metrics),
            "--engine-worker-queue-port", str(ewq), "--cache-queue-port", str(cq),
            "--tensor-parallel-size", str(tp), "--quantization", "wint4",
            "--cache-transfer-protocol", "rdma,ipc",
            "--rdma-comm-ports", ",".join(map(str, rdma)), "--pd-comm-port", str(pd),
            "--splitwise-role", role, "--host", host] + mode + list(extra)
    full = {"CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(tp))}
    full.update(env or {})
    p = procs(name, "fastdeploy", argv, full)
    p.host, p.port = host, port
    p.ports = {"metrics": metrics, "ewq": ewq, "cq": cq, "pd": pd, "rdma": rdma}
    return p


def wait_for(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def wait_ready(p: FDProc, timeout: float = 20.0) -> FDProc:
    wait_for(lambda: p.health() == 200 or p.proc.poll() is not None, timeout,
             f"{p.name} /health 200")
    assert p.health() == 200, p.log()
    return p


def expected_text(n: int, chat: bool) -> str:
    key = textgen.prompt_key("text", textgen.render_chat(MSGS) if chat else PROMPT)
    return textgen.text(MODEL, key, n)


def body_for(chat: bool, stream: bool, max_tokens: int = 7) -> Dict[str, Any]:
    body: Dict[str, Any] = {"model": MODEL, "max_tokens": max_tokens, "stream": stream}
    body.update({"messages": MSGS} if chat else {"prompt": PROMPT})
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


# ----------------------------------------------------------------------- redis-server


class RedisServer:
    def __init__(self, host: str, port: int, password: Optional[str], proc: subprocess.Popen,
                 log: Path) -> None:
        self.host, self.port, self.password, self.proc, self.log = (host, port, password, proc,
                                                                    log)

    def client(self):
        import redis

        return redis.Redis(host=self.host, port=self.port, password=self.password,
                           socket_timeout=5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_redis(tmpdir: Path, host: str, password: Optional[str] = None) -> RedisServer:
    port = free_port(host)
    data = tmpdir / f"redis-{port}"
    data.mkdir(parents=True, exist_ok=True)
    log = data / "redis.log"
    argv = [REDIS, "--port", str(port), "--bind", host, "--save", "", "--appendonly", "no",
            "--dir", str(data), "--logfile", str(log)]
    if password:
        argv += ["--requirepass", password]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = RedisServer(host, port, password, proc, log)
    deadline = time.monotonic() + 10
    while True:
        try:
            if server.client().ping():
                return server
        except Exception:  # not up yet
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"redis-server did not start: {log.read_text()[-2000:]}")
        time.sleep(0.05)


def redis_mode(r: RedisServer, topic: str, expire_ms: int = 3000) -> List[str]:
    """The guide's scheduler flags for ``r``."""
    argv = ["--scheduler-name", "splitwise", "--scheduler-host", r.host, "--scheduler-port",
            str(r.port), "--scheduler-topic", topic, "--scheduler-ttl", "9000",
            "--scheduler-sync-period", "100", "--scheduler-expire-period", str(expire_ms)]
    if r.password:
        argv += ["--scheduler-password", r.password]
    return argv
