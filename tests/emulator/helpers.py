"""Helpers for the emulator tests: real `python -m pd_launcher.emulator` processes on
loopback addresses (127.0.1.x), plain stdlib HTTP clients, Prometheus parsing."""
from __future__ import annotations

import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[2]
_used_ports: set = set()


def free_port(host: str, span: int = 1) -> int:
    """A port P such that P .. P+span-1 are free on ``host`` (and not handed out before)."""
    for _ in range(500):
        port = random.randint(20000, 60000 - span)
        if any(p in _used_ports for p in range(port, port + span)):
            continue
        ok = True
        for p in range(port, port + span):
            s = socket.socket()
            try:
                s.bind((host, p))
            except OSError:
                ok = False
            finally:
                s.close()
        if ok:
            _used_ports.update(range(port, port + span))
            return port
    raise RuntimeError("no free port")


def kvcfg(role: str, port: int, pdp: int = 1, ptp: int = 1, ddp: int = 1, dtp: int = 1,
          connector: str = "MooncakeConnectorV1", **extra: Any) -> str:
    cfg: Dict[str, Any] = {
        "kv_connector": connector, "kv_role": role, "kv_port": port,
        "kv_connector_extra_config": {"prefill": {"dp_size": pdp, "tp_size": ptp},
                                      "decode": {"dp_size": ddp, "tp_size": dtp}},
    }
    cfg.update(extra)
    return json.dumps(cfg)


class Emu:
    """One emulator process."""

    def __init__(self, name: str, host: str, port: Optional[int], flags: List[str],
                 env: Dict[str, str], logdir: Path) -> None:
        self.name, self.host, self.port = name, host, port
        self.log_path = logdir / f"{name}.log"
        argv = [sys.executable, "-m", "pd_launcher.emulator", "serve", "/models/demo",
                "--host", host]
        if port is not None:
            argv += ["--port", str(port)]
        self.argv = argv + flags
        full_env = dict(os.environ)
        full_env.pop("VLLM_NIXL_SIDE_CHANNEL_PORT", None)
        full_env.pop("VLLM_NIXL_SIDE_CHANNEL_HOST", None)
        full_env.update({"PYTHONPATH": str(ROOT), "PD_EMU_ZERO_LATENCY": "1"})
        full_env.update(env)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=str(ROOT), env=full_env)

    # -- process -------------------------------------------------------------------
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, pattern: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.log())
            if m:
                return m.group(0)
            if self.proc.poll() is not None and not re.search(pattern, self.log()):
                break
            time.sleep(0.05)
        raise AssertionError(f"{self.name}: no {pattern!r} in log:\n{self.log()}")

    def wait_exit(self, timeout: float = 10.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} did not exit:\n{self.log()}") from None

    def terminate(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._log.close()

    # -- HTTP ------------------------------------------------------------------------
    def health(self) -> int:
        try:
            return request(self.host, self.port, "GET", "/health", timeout=2)[0]
        except OSError:
            return -1

    def wait_ready(self, timeout: float = 15.0) -> Emu:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.health() == 200:
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{self.name} not ready (exit {self.proc.poll()}):\n{self.log()}")

    def post(self, path: str, body: Any, headers: Optional[Dict[str, str]] = None,
             timeout: float = 20.0) -> Tuple[int, Dict[str, str], Any]:
        status, hdrs, data = request(self.host, self.port, "POST", path, body, headers, timeout)
        try:
            parsed = json.loads(data)
        except ValueError:
            parsed = data
        return status, hdrs, parsed

    def metrics(self) -> Dict[Tuple[str, Tuple], float]:
        status, _, data = request(self.host, self.port, "GET", "/metrics")
        assert status == 200
        return parse_metrics(data.decode())


def request(host: str, port: Optional[int], method: str, path: str, body: Any = None,
            headers: Optional[Dict[str, str]] = None, timeout: float = 20.0
            ) -> Tuple[int, Dict[str, str], bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        payload = body if isinstance(body, (bytes, str)) or body is None else json.dumps(body)
        hdrs = {"Content-Type": "application/json"}
        hdrs.update(headers or {})
        conn.request(method, path, body=payload, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def sse(host: str, port: int, path: str, body: Any, timeout: float = 20.0,
        headers: Optional[Dict[str, str]] = None) -> Tuple[int, List[Tuple[float, str]]]:
    """Stream a request; returns (status, [(arrival time, data payload)])."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    hdrs = {"Content-Type": "application/json"}
    hdrs.update(headers or {})
    conn.request("POST", path, body=json.dumps(body), headers=hdrs)
    resp = conn.getresponse()
    events: List[Tuple[float, str]] = []
    if resp.status != 200:
        events.append((time.monotonic(), resp.read().decode()))
        conn.close()
        return resp.status, events
    while True:
        line = resp.fp.readline()
        if not line:
            break
        line = line.strip()
        if line.startswith(b"data: "):
            events.append((time.monotonic(), line[6:].decode()))
            if line == b"data: [DONE]":
                break
    conn.close()
    return resp.status, events


def sse_text(events: List[Tuple[float, str]]) -> str:
    out = []
    for _, data in events:
        if data == "[DONE]":
            continue
        obj = json.loads(data)
        for ch in obj.get("choices", []):
            if "text" in ch:
                out.append(ch["text"])
            else:
                out.append(ch.get("delta", {}).get("content") or "")
    return "".join(out)


def parse_metrics(text: str) -> Dict[Tuple[str, Tuple], float]:
    """{(sample name, sorted label items): value} via prometheus_client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    out: Dict[Tuple[str, Tuple], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(samples: Dict[Tuple[str, Tuple], float], name: str, **labels: str) -> float:
    """Sum of the samples named ``name`` whose labels include ``labels``."""
    total = 0.0
    for (n, lv), v in samples.items():
        if n == name and all(dict(lv).get(k) == val for k, val in labels.items()):
            total += v
    return total


class EmuProc:
    """One `python -m pd_launcher.emulator <cmd> ARGV` process (a personality: xllm,
    xllm_master_serving, fastdeploy, fd-router) with its own log, stopped by its PID.
    Subclasses set `base_env` (added) and `drop_env` (removed from os.environ)."""

    base_env: Dict[str, str] = {}
    drop_env: Tuple[str, ...] = ()

    def __init__(self, name: str, cmd: str, argv: List[str], logdir: Path,
                 env: Optional[Dict[str, str]] = None) -> None:
        self.name = name
        self.argv = [sys.executable, "-m", "pd_launcher.emulator", cmd] + argv
        self.log_path = logdir / f"{name}.log"
        full = dict(os.environ, PYTHONPATH=str(ROOT))
        for var in self.drop_env:
            full.pop(var, None)
        full.update(self.base_env)
        full.update(env or {})
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=str(ROOT), env=full)
        self.host = ""
        self.port = 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, pattern: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.log())
            if m:
                return m.group(0)
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        m = re.search(pattern, self.log())
        if m:
            return m.group(0)
        raise AssertionError(f"{self.name}: no {pattern!r} in log:\n{self.log()}")

    def wait_exit(self, timeout: float = 10.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} did not exit:\n{self.log()}") from None

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL, of this process only."""
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._log.close()
