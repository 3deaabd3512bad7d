"""The xLLM instance personality: ``python -m pd_launcher.emulator xllm [gflags]``.

One process per device, as xLLM. ``--node_rank 0`` is the instance's master: it serves
HTTP on ``--port`` (``/health``, the OpenAI endpoints the service calls), the
DisaggPD endpoints on ``--disagg_pd_port`` (HTTP standing in for brpc), the worker
link on ``--master_node_addr`` and the KV listener on ``--transfer_listen_port``;
after its workers joined it registers in etcd (XServiceClient::init) and keeps the
lease alive. Other ranks bind their KV port, join the master and live as long as it.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import socket
import sys
import time
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Dict, List, Optional

import aiohttp
from aiohttp import web

from .. import kvnet, openai, textgen
from ..endpoints import OpenAIEndpoints
from ..kvconfig import StartupError
from ..kvnet import KVServer
from ..kvstore import BlockStore, KVError, build
from ..metrics import KV_BUCKETS
from ..openai import ApiError
from ..runtime import _runner_kwargs, bind
from ..settings import Faults, Latency
from . import flags as F
from .common import (
    DROPPED_IN_0_10,
    MASTER_KEY,
    MAX_MODEL_LEN,
    ROLE_TYPES,
    Item,
    Outcome,
    Registry,
    cancel_all,
    error_response,
    json_response,
    local_ip,
    read_json,
    respond,
    setup_logging,
)
from .etcd import Etcd, EtcdError, namespaced

log = logging.getLogger("pd_emu.xllm")

PROG = "python -m pd_launcher.emulator xllm"
MASTER_POLL_S = 0.25  # how often the MASTER key is read while waiting (the log says 2 s)
MASTER_LOG_S = 2.0
WORKER_RETRY_S = 0.5
WAIT_LOG_S = 5.0
REGISTER_RETRIES = 30
REGISTER_RETRY_S = 2.0
_DEVICE_RE = re.compile(r"(npu|mlu|dcu|cuda|gpu|cpu):\d+")


def _device_check(value: Any) -> Optional[str]:
    if value == "" or _DEVICE_RE.fullmatch(value):
        return None
    return "expected one device such as npu:0"


SPECS: Dict[str, F.Flag] = {
    "model": F.Flag("string", "", "model path (never opened; its basename is the model name)"),
    "devices": F.Flag("string", "", "v0.9: the device, npu:N", _device_check),
    "device_id": F.Flag("int32", -1, "v0.10+: the device number", F.non_negative),
    "host": F.Flag("string", "", "address of every server of this process (empty: local IP)"),
    "port": F.Flag("int32", 8010, "HTTP port (rank 0)", F.port_check),
    "master_node_addr": F.Flag("string", "127.0.0.1:19888",
                               "rank 0's worker link, host:port", F.addr_check),
    "nnodes": F.Flag("int32", 1, "device processes of the instance", F.positive),
    "node_rank": F.Flag("int32", 0, "this process's rank", F.non_negative),
    "enable_disagg_pd": F.Flag("bool", False, "PD mode (implies service routing)"),
    "enable_service_routing": F.Flag("bool", False, "register with xllm-service"),
    "instance_role": F.Flag("string", "DEFAULT", "DEFAULT | PREFILL | DECODE | MIX",
                            F.one_of(*ROLE_TYPES)),
    "etcd_addr": F.Flag("string", "", "etcd client host:port", F.addr_check),
    "etcd_namespace": F.Flag("string", "", "key prefix /<ns>/"),
    "etcd_ttl": F.Flag("int32", 3, "lease TTL of the instance key (s)", F.positive),
    "heart_beat_interval": F.Flag("double", 0.5, "lease refresh and heartbeat period (s)",
                                  F.positive),
    "disagg_pd_port": F.Flag("int32", 7777, "DisaggPD endpoints (rank 0)", F.port_check),
    "transfer_listen_port": F.Flag("int32", 26000, "KV listener of this device", F.port_check),
    "kv_cache_transfer_mode": F.Flag("string", "PUSH", "PUSH | PULL (the emulator pulls)",
                                     F.one_of("PUSH", "PULL")),
    "kv_cache_transfer_type": F.Flag("string", "LlmDataDist", "logged only"),
    "dp_size": F.Flag("int32", 1, "dp_size in the instance JSON", F.positive),
    "rank_tablefile": F.Flag("string", "", "HCCL rank table (checked to exist)"),
    "communication_backend": F.Flag("string", "hccl", "hccl | lccl", F.one_of("hccl", "lccl")),
    "enable_prefix_cache": F.Flag("bool", True, "checked, unused"),
    "enable_chunked_prefill": F.Flag("bool", True, "checked, unused"),
    "enable_schedule_overlap": F.Flag("bool", False, "checked, unused"),
    "disable_ttft_profiling": F.Flag("bool", False, "checked, unused"),
}


class ConfigError(Exception):
    """A start-up refusal with exit status ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class InstanceConfig:
    model: str
    device: str
    host: str
    port: int
    master_host: str
    master_port: int
    nnodes: int
    node_rank: int
    routing: bool
    role: str
    etcd_addr: str
    namespace: str
    etcd_ttl: int
    heart_beat_interval: float
    disagg_pd_port: int
    transfer_port: int
    transfer_mode: str
    transfer_type: str
    dp_size: int
    rank_tablefile: str
    json_version: str = "0.9"
    ignored: List[str] = field(default_factory=list)
    stray: List[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def model_name(self) -> str:
        return os.path.basename(self.model.rstrip("/")) or self.model

    @property
    def key(self) -> str:
        return namespaced(self.namespace, f"XLLM:{self.role}:{self.name}")


def parse_args(argv: List[str], env: Optional[Dict[str, str]] = None) -> InstanceConfig:
    """Raises F.FlagError (exit 2) or ConfigError (exit 1)."""
    env = dict(os.environ) if env is None else env
    p = F.parse(argv, SPECS)
    if not p.model:
        raise ConfigError("--model is required (the model path); see --help")
    given = set(p.given)
    has_devices = "devices" in given and p.devices != ""
    has_id = "device_id" in given
    if has_devices == has_id:
        raise ConfigError("give exactly one of --devices=npu:N (xLLM 0.9) and --device_id=N "
                          "(xLLM 0.10+)" + ("" if has_id else ", got neither"))
    device = p.devices if has_devices else f"npu:{p.device_id}"
    if p.node_rank >= p.nnodes:
        raise ConfigError(f"--node_rank={p.node_rank} must be < --nnodes={p.nnodes}")
    mhost, mport = F.split_addr(p.master_node_addr)
    if p.rank_tablefile and not os.path.isfile(p.rank_tablefile):
        raise ConfigError(f"--rank_tablefile={p.rank_tablefile}: no such file")
    version = env.get("PD_EMU_XLLM_INSTANCE_JSON", "0.9").strip() or "0.9"
    if version not in ("0.9", "0.10"):
        raise F.FlagError(f"PD_EMU_XLLM_INSTANCE_JSON={version!r}: expected 0.9 or 0.10")
    return InstanceConfig(
        model=p.model, device=device, host=p.host or local_ip(), port=p.port,
        master_host=mhost, master_port=mport, nnodes=p.nnodes, node_rank=p.node_rank,
        routing=p.enable_disagg_pd or p.enable_service_routing, role=p.instance_role,
        etcd_addr=p.etcd_addr, namespace=p.etcd_namespace, etcd_ttl=p.etcd_ttl,
        heart_beat_interval=p.heart_beat_interval, disagg_pd_port=p.disagg_pd_port,
        transfer_port=p.transfer_listen_port, transfer_mode=p.kv_cache_transfer_mode,
        transfer_type=p.kv_cache_transfer_type, dp_size=p.dp_size,
        rank_tablefile=p.rank_tablefile, json_version=version, ignored=p.ignored,
        stray=p.stray)


def _dump(msg: Dict[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


def _oserror(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno else str(exc)


class GenError(Exception):
    """The service could not be told about generated tokens."""


class _Base:
    """What rank 0 and the workers share: signals, the KV listener, start-up delay."""

    def __init__(self, cfg: InstanceConfig, lat: Latency, faults: Faults) -> None:
        self.cfg, self.lat, self.faults = cfg, lat, faults
        self.stop = asyncio.Event()
        self.exit_code = 0
        self.stopping = False
        self.tasks: List[asyncio.Task] = []
        self.kv_server: Optional[KVServer] = None
        self.engine_id = f"{cfg.host}:{cfg.transfer_port}"
        self.metrics = Registry()
        lab = ("instance", "role")
        self.lv = (cfg.name, cfg.role)
        m = self.metrics
        self.kv_served = m.counter("pd_emu:kv_pulls_served",
                                   "KV pulls answered by this device's KV listener, by outcome.",
                                   lab + ("outcome",))
        self.kv_held_blocks = m.gauge("pd_emu:kv_held_blocks",
                                      "KV blocks held for a decode instance.", lab)
        self.kv_held_bytes = m.gauge("pd_emu:kv_held_bytes",
                                     "KV bytes held for a decode instance.", lab)
        self.kv_expired = m.counter("pd_emu:kv_lease_expired_blocks",
                                    "Held KV blocks freed because their lease expired.", lab)
        for fam in (self.kv_held_blocks, self.kv_held_bytes, self.kv_expired):
            fam.values[self.lv] = 0.0
        self.store = BlockStore(lat.kv_lease_s, self._kv_changed)

    def _kv_changed(self, blocks: int, nbytes: int, expired: int) -> None:
        self.kv_held_blocks.set(self.lv, blocks)
        self.kv_held_bytes.set(self.lv, nbytes)
        if expired:
            self.kv_expired.inc(self.lv, expired)

    def fail(self, code: int, message: str, *args: Any) -> None:
        log.error(message, *args)
        if not self.stop.is_set():
            self.exit_code = code
            self.stop.set()

    def _signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: int) -> None:
        if not self.stop.is_set():
            log.info("received %s: stopping", signal.Signals(sig).name)
            self.stop.set()

    async def _start_kv(self, sock: socket.socket) -> None:
        def record(outcome: str) -> None:
            self.kv_served.inc(self.lv + (outcome,))

        self.kv_server = KVServer(self.cfg.node_rank, self.engine_id, self.store,
                                  self.lat.kv_timeout_s,
                                  lambda: self.faults.roll(self.faults.kv_corrupt_rate), record)
        await self.kv_server.start(sock)

    async def _load(self) -> None:
        delay = self.lat.startup_s + self.faults.slow_start_s
        if delay > 0:
            log.info("loading the model (start-up delay %gs)", delay)
            await asyncio.sleep(delay)
        log.info("model loaded")

    def _describe(self) -> None:
        c = self.cfg
        log.info("xLLM emulator: node_rank %d of %d, %s, device %s, model %s; KV listener "
                 "%s:%d (transfer %s/%s, emulated as a pull by the decode)", c.node_rank,
                 c.nnodes, c.role, c.device, c.model, c.host, c.transfer_port,
                 c.transfer_type, c.transfer_mode)
        if c.ignored:
            log.info("ignoring flags the emulator does not model: %s", " ".join(c.ignored))
        for s in c.stray:
            if s.lower() in ("true", "false", "1", "0", "yes", "no"):
                log.warning("stray argument %r ignored: gflags does not take a separate value "
                            "for a bool flag (write --flag=%s)", s, s)
            else:
                log.warning("stray argument %r ignored", s)


# ------------------------------------------------------------------------- workers


class Worker(_Base):
    """node_rank > 0: binds its KV port, joins the master, exits when it goes away."""

    async def run(self) -> int:
        c = self.cfg
        self._signals()
        try:
            kv_sock = bind(c.host, c.transfer_port, "transfer_listen")
        except StartupError as exc:
            log.error("%s", exc)
            return 1
        self._describe()
        await self._start_kv(kv_sock)
        task = asyncio.ensure_future(self._join())
        await self.stop.wait()
        self.stopping = True
        task.cancel()
        try:
            await task
        except BaseException:  # cancelled
            pass
        if self.kv_server is not None and self.kv_server.server is not None:
            self.kv_server.server.close()
        log.info("stopped (exit %d)", self.exit_code)
        return self.exit_code

    async def _join(self) -> None:
        c = self.cfg
        await self._load()
        last = 0.0
        while True:
            try:
                reader, writer = await asyncio.open_connection(c.master_host, c.master_port)
                break
            except OSError as exc:
                now = time.monotonic()
                if now - last >= WAIT_LOG_S:
                    last = now
                    log.info("waiting for the instance master at %s:%d: %s (retrying every "
                             "%gs)", c.master_host, c.master_port, _oserror(exc),
                             WORKER_RETRY_S)
                await asyncio.sleep(WORKER_RETRY_S)
        planned = False
        try:
            writer.write(_dump({"op": "hello", "node_rank": c.node_rank, "nnodes": c.nnodes,
                                "host": c.host, "transfer_port": c.transfer_port,
                                "device": c.device, "pid": os.getpid()}))
            await writer.drain()
            reply = json.loads(await reader.readline() or b"null")
            if not isinstance(reply, dict):
                raise ConnectionError("the master closed the connection")
            if reply.get("op") == "refused":
                self.fail(1, "the instance master refused node_rank %d: %s", c.node_rank,
                          reply.get("error"))
                return
            log.info("joined the instance master %s:%d as node_rank %d of %d", c.master_host,
                     c.master_port, c.node_rank, c.nnodes)
            while True:
                line = await reader.readline()
                if not line:
                    break
                if json.loads(line).get("op") == "bye":
                    planned = True
        except (ConnectionError, ValueError, asyncio.IncompleteReadError) as exc:
            log.warning("link to the instance master broke: %s", exc)
        except asyncio.CancelledError:
            if not writer.is_closing():
                writer.write(_dump({"op": "bye"}))
            raise
        finally:
            writer.close()
        if planned:
            log.info("the instance master %s:%d stopped", c.master_host, c.master_port)
            self.stopping = True
            self.stop.set()
        else:
            self.fail(1, "the instance master %s:%d went away: this device process cannot "
                      "run on its own", c.master_host, c.master_port)


# --------------------------------------------------------------------------- rank 0


@dataclass
class _Joined:
    rank: int
    host: str
    transfer_port: int
    device: str
    pid: Any
    writer: asyncio.StreamWriter
    leaving: bool = False


@dataclass
class _Pending:
    """A request AddNewRequests announced, waiting for its FirstGeneration."""

    job: Dict[str, Any]
    block_ids: List[int]
    timer: Optional[asyncio.TimerHandle] = None


class Master(_Base, OpenAIEndpoints):
    """node_rank 0: the instance."""

    def __init__(self, cfg: InstanceConfig, lat: Latency, faults: Faults) -> None:
        super().__init__(cfg, lat, faults)
        self.engine_id = f"{cfg.name}/{cfg.host}:{cfg.transfer_port}"
        self.incarnation = uuid.uuid4().hex[:12]
        self.workers: Dict[int, _Joined] = {}
        self.all_joined = asyncio.Event()
        if cfg.nnodes == 1:
            self.all_joined.set()
        self.loaded = False
        self.registered = False
        self.etcd: Optional[Etcd] = None
        self.lease = 0
        self.service_addr = ""
        self.session: Optional[aiohttp.ClientSession] = None
        self.runners: List[web.AppRunner] = []
        self.servers: List[asyncio.AbstractServer] = []
        self.link_server: Optional[asyncio.AbstractServer] = None
        self.pending: Dict[str, _Pending] = {}
        self.next_block = 1
        self.linked: Dict[str, str] = {}  # prefill name -> rpc address (LinkInstance)
        self.decode_rpc: Dict[str, str] = {}  # decode name -> rpc address (GetInstanceInfo)
        self.running = 0
        self._init_inflight()
        self.answered = 0
        self._instance_json: Dict[str, Any] = {}
        self._bg: set = set()
        m, lab = self.metrics, ("instance", "role")
        self.m_registered = m.gauge("pd_emu:xllm_registered",
                                    "1 while the instance key is in etcd.", lab)
        self.m_workers = m.gauge("pd_emu:xllm_workers_connected",
                                 "Device processes joined (rank 0 counts itself).", lab)
        self.m_running = m.gauge("pd_emu:xllm_running_requests",
                                 "Requests being prefilled or decoded here.", lab)
        self.m_requests = m.counter("pd_emu:xllm_requests",
                                    "Requests handled, by part (prefill = handed to a decode "
                                    "instance, decode, local).", lab + ("part",))
        self.m_tokens = m.counter("pd_emu:xllm_generation_tokens",
                                  "Tokens generated here (a prefill generates the first).", lab)
        self.m_errors = m.counter("pd_emu:xllm_request_errors",
                                  "Requests that failed here, by HTTP status.", lab + ("status",))
        self.m_kv = m.counter("pd_emu:kv_transfers",
                              "KV transfers received by this decode instance.", lab)
        self.m_kv_bytes = m.counter("pd_emu:kv_transfer_bytes",
                                    "KV bytes received by this decode instance.", lab)
        self.m_kv_time = m.histogram("pd_emu:kv_transfer_seconds", "Time of KV transfers.",
                                     lab, KV_BUCKETS)
        self.m_kv_fail = m.counter("pd_emu:kv_transfer_failures",
                                   "KV transfers that failed, by cause.", lab + ("cause",))
        self.m_heartbeats = m.counter("pd_emu:xllm_heartbeats",
                                      "Heartbeats sent to xllm-service, by outcome.",
                                      lab + ("outcome",))
        for fam in (self.m_registered, self.m_running, self.m_tokens, self.m_kv,
                    self.m_kv_bytes):
            fam.values[self.lv] = 0.0
        self.m_workers.set(self.lv, 1)

    # -- readiness -------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return (self.loaded and self.all_joined.is_set() and not self.stopping
                and (self.registered or not self.cfg.routing))

    # -- lifecycle -------------------------------------------------------------------
    async def run(self) -> int:
        c = self.cfg
        self._signals()
        try:
            kv_sock = bind(c.host, c.transfer_port, "transfer_listen")
            api_sock = bind(c.host, c.port, "HTTP (--port)")
            pd_sock = bind(c.host, c.disagg_pd_port, "disagg_pd")
            link_sock = bind(c.master_host, c.master_port, "master_node_addr")
        except StartupError as exc:
            log.error("%s", exc)
            return 1
        self._describe()
        loop = asyncio.get_running_loop()
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, connect=self.lat.kv_timeout_s),
            connector=aiohttp.TCPConnector(limit=0), trust_env=False)
        try:
            await self._start_kv(kv_sock)
            self.link_server = await asyncio.start_server(self._worker_link, sock=link_sock)
            for sock, app in ((api_sock, self._api_app()), (pd_sock, self._pd_app())):
                runner = web.AppRunner(app, access_log=None, **_runner_kwargs())
                await runner.setup()
                self.runners.append(runner)
                self.servers.append(await loop.create_server(runner.server, sock=sock,
                                                             backlog=1024))
            log.info("HTTP on %s:%d (/health is 503 until ready), DisaggPD on %s:%d, worker "
                     "link on %s:%d", c.host, c.port, c.host, c.disagg_pd_port, c.master_host,
                     c.master_port, )
            self.tasks.append(asyncio.ensure_future(self._startup()))
            await self.stop.wait()
            await self._shutdown()
        finally:
            await self.session.close()
        log.info("stopped (exit %d)", self.exit_code)
        return self.exit_code

    async def _startup(self) -> None:
        c = self.cfg
        await self._load()
        self.loaded = True
        if not self.all_joined.is_set():
            log.info("waiting for %d worker(s) to join on %s:%d", c.nnodes - 1, c.master_host,
                     c.master_port)
            while not self.all_joined.is_set():
                try:
                    await asyncio.wait_for(self.all_joined.wait(), WAIT_LOG_S)
                except asyncio.TimeoutError:
                    missing = sorted(set(range(1, c.nnodes)) - set(self.workers))
                    log.info("still waiting for node_rank(s) %s", missing)
            log.info("all %d device processes joined", c.nnodes)
        if c.routing:
            if not await self._xservice_init():
                return
        log.info("Application startup complete.")

    async def _xservice_init(self) -> bool:
        """XServiceClient::init: etcd, wait for the master service, register."""
        c = self.cfg
        if not c.etcd_addr:
            log.error("etcd_addr address is empty")
            self.fail(1, "XServiceClient init fail!")
            return False
        assert self.session is not None
        etcd = self.etcd = Etcd(c.etcd_addr, self.session)
        try:
            await etcd.put(namespaced(c.namespace, "XLLM_PING"), "PING")
        except EtcdError as exc:
            self.fail(1, "cannot connect to etcd at %s: %s", c.etcd_addr, exc)
            return False
        last = -MASTER_LOG_S
        master_key = namespaced(c.namespace, MASTER_KEY)
        while True:
            try:
                addr = await etcd.get(master_key)
            except EtcdError as exc:
                log.warning("%s", exc)
                addr = None
            if addr:
                break
            now = time.monotonic()
            if now - last >= MASTER_LOG_S:
                last = now
                log.info("Master service not set, wait 2s!")
            await asyncio.sleep(MASTER_POLL_S)
        self.service_addr = addr
        log.info("xllm-service master is %s", addr)
        for attempt in range(1, REGISTER_RETRIES + 1):
            try:
                await self._register()
                break
            except EtcdError as exc:
                log.warning("register instance to etcd failed (attempt %d/%d): %s", attempt,
                            REGISTER_RETRIES, exc)
                await asyncio.sleep(REGISTER_RETRY_S)
        else:
            self.fail(1, "register instance to etcd failed %d times", REGISTER_RETRIES)
            return False
        log.info("Success register instance to etcd.")
        log.info("registered %s = %s", c.key, json.dumps(self._instance_json))
        self.registered = True
        self.m_registered.set(self.lv, 1)
        self.tasks.append(asyncio.ensure_future(self._lease_loop()))
        self.tasks.append(asyncio.ensure_future(self._heartbeat_loop()))
        return True

    def instance_json(self) -> Dict[str, Any]:
        """The value of the instance key (xLLM v0.9.0 InstanceInfo::serialize_to_json)."""
        c = self.cfg
        devices = [(c.host, c.transfer_port)] + [
            (w.host, w.transfer_port) for _, w in sorted(self.workers.items())]
        ids = [zlib.crc32(f"{h}:{p}".encode()) & 0x7FFFFFFF for h, p in devices]
        lengths = (128, 256, 512, 1024, 2048, 4096, 8192)
        info: Dict[str, Any] = {
            "name": c.name,
            "rpc_address": f"{c.host}:{c.disagg_pd_port}",
            "incarnation_id": self.incarnation,
            "register_ts_ms": int(time.time() * 1000),
            "type": ROLE_TYPES[c.role],
            "cluster_ids": ids,
            "addrs": [(i << 20) | 0x1000 for i in ids],
            "k_cache_ids": [2 * i for i in range(len(devices))],
            "v_cache_ids": [2 * i + 1 for i in range(len(devices))],
            "dp_size": c.dp_size,
            "device_ips": [h for h, _ in devices],
            "ports": [p for _, p in devices],
            "ttft_profiling_data": [[n, round(self.lat.prefill_s(n, 1) * 1000, 3)]
                                    for n in lengths],
            "tpot_profiling_data": [[bs, n, round(self.lat.itl(bs) * 1000, 3)]
                                    for bs in (1, 8, 32) for n in (1024, 4096)],
            "worker_free_phy_pages": [],
            "total_phy_pages": 0,
            "model_weight_segments": {},
            # not in xLLM: the model name the emulated service accepts besides the
            # tokenizer's (xLLM's JSON has no model field; readers ignore extra keys)
            "x_emulator": {"model": c.model_name, "device": c.device, "pid": os.getpid()},
        }
        if c.json_version == "0.10":
            for f in DROPPED_IN_0_10:
                info.pop(f)
            info["kv_split_size"] = 1
        return info

    async def _register(self) -> None:
        assert self.etcd is not None
        self.lease = await self.etcd.grant(self.cfg.etcd_ttl)
        self._instance_json = self.instance_json()
        await self.etcd.put(self.cfg.key, json.dumps(self._instance_json), self.lease)

    async def _lease_loop(self) -> None:
        """Keep the lease alive; put the key again if it vanished or the lease was lost."""
        assert self.etcd is not None
        etcd, key = self.etcd, self.cfg.key
        healthy = True
        while True:
            await asyncio.sleep(self.cfg.heart_beat_interval)
            try:
                ttl = await etcd.keepalive(self.lease)
                if ttl <= 0:
                    log.warning("etcd lease of %s lost; registering again", key)
                    await self._register()
                elif await etcd.get(key) is None:
                    log.warning("instance key %s vanished from etcd; putting it again", key)
                    await etcd.put(key, json.dumps(self._instance_json), self.lease)
                if not healthy:
                    log.info("etcd reachable again")
                healthy = True
            except EtcdError as exc:
                if healthy:
                    log.warning("cannot refresh the instance key: %s", exc)
                healthy = False

    async def _heartbeat_loop(self) -> None:
        """Heartbeat RPC to the master service (best effort)."""
        assert self.session is not None and self.etcd is not None
        c = self.cfg
        failing = False
        last_lookup = 0.0
        while True:
            await asyncio.sleep(c.heart_beat_interval)
            body = {"name": c.name, "incarnation_id": self.incarnation,
                    "load_metrics": {"waiting_requests_num": len(self.pending),
                                     "running_requests_num": self.running,
                                     "gpu_cache_usage_perc": 0.0},
                    "latency_metrics": {"recent_max_ttft": 0, "recent_max_tbt": 0}}
            try:
                async with self.session.post(
                        f"http://{self.service_addr}/rpc/Heartbeat", json=body,
                        timeout=aiohttp.ClientTimeout(total=max(1.0, c.heart_beat_interval))
                ) as rsp:
                    ok = rsp.status == 200
                    await rsp.read()
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
                ok = False
            self.m_heartbeats.inc(self.lv + ("ok" if ok else "failed",))
            if ok and failing:
                log.info("heartbeats to xllm-service %s work again", self.service_addr)
            elif not ok and not failing:
                log.warning("heartbeat to xllm-service %s failed", self.service_addr)
            failing = not ok
            now = time.monotonic()
            if not ok and now - last_lookup >= 2.0:
                last_lookup = now
                try:
                    addr = await self.etcd.get(namespaced(c.namespace, MASTER_KEY))
                except EtcdError:
                    addr = None
                if addr and addr != self.service_addr:
                    log.info("xllm-service master is now %s", addr)
                    self.service_addr = addr

    async def _deregister(self) -> None:
        if self.etcd is None or not self.lease:
            return
        lease, self.lease = self.lease, 0
        self.registered = False
        self.m_registered.set(self.lv, 0)
        try:
            await self.etcd.revoke(lease)
            log.info("deregistered: etcd lease revoked, %s deleted", self.cfg.key)
        except EtcdError as exc:
            log.warning("could not revoke the etcd lease (the key expires in %ds): %s",
                        self.cfg.etcd_ttl, exc)

    async def _shutdown(self) -> None:
        self.stopping = True
        for s in self.servers:
            s.close()  # no new connections; requests on open ones finish below
        await cancel_all(self.tasks)
        await self._deregister()
        if self.inflight:
            log.info("waiting for %d in-flight requests", self.inflight)
            try:
                await asyncio.wait_for(self.idle.wait(), self.lat.shutdown_grace_s)
            except asyncio.TimeoutError:
                log.warning("grace period over: aborting %d requests", self.inflight)
        for w in self.workers.values():
            if not w.writer.is_closing():
                w.writer.write(_dump({"op": "bye"}))
                w.writer.close()
        if self.link_server is not None:
            self.link_server.close()
        for r in self.runners:
            await r.cleanup()
        if self.kv_server is not None and self.kv_server.server is not None:
            self.kv_server.server.close()
        for p in self.pending.values():
            if p.timer is not None:
                p.timer.cancel()
        freed = self.store.free_all()
        if freed:
            log.info("freed %d held KV blocks", freed)

    # -- worker link ------------------------------------------------------------------
    async def _worker_link(self, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> None:
        c = self.cfg
        joined: Optional[_Joined] = None
        try:
            hello = json.loads(await reader.readline() or b"null")
            if not isinstance(hello, dict) or hello.get("op") != "hello":
                return
            rank = hello.get("node_rank")
            error = None
            if not isinstance(rank, int) or not 0 < rank < c.nnodes:
                error = f"node_rank {rank!r} out of range 1..{c.nnodes - 1}"
            elif hello.get("nnodes") != c.nnodes:
                error = f"--nnodes={hello.get('nnodes')} differs from the master's {c.nnodes}"
            elif rank in self.workers:
                error = f"duplicate node_rank {rank}"
            elif self.stopping:
                error = "the master is stopping"
            if error:
                log.error("refused a worker from %s: %s", hello.get("host"), error)
                writer.write(_dump({"op": "refused", "error": error}))
                await writer.drain()
                return
            joined = _Joined(rank, str(hello.get("host")), int(hello.get("transfer_port", 0)),
                             str(hello.get("device")), hello.get("pid"), writer)
            self.workers[rank] = joined
            self.m_workers.set(self.lv, 1 + len(self.workers))
            writer.write(_dump({"op": "welcome"}))
            log.info("worker node_rank %d joined from %s (device %s, KV port %d): %d/%d",
                     rank, joined.host, joined.device, joined.transfer_port,
                     1 + len(self.workers), c.nnodes)
            if len(self.workers) == c.nnodes - 1:
                self.all_joined.set()
            while True:
                line = await reader.readline()
                if not line:
                    break
                if json.loads(line).get("op") == "bye":
                    joined.leaving = True
        except (ConnectionError, ValueError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            writer.close()
            if joined is not None and self.workers.get(joined.rank) is joined:
                del self.workers[joined.rank]
                self.m_workers.set(self.lv, 1 + len(self.workers))
                if not self.stopping:
                    task = asyncio.ensure_future(self._worker_lost(joined))
                    self._bg.add(task)
                    task.add_done_callback(self._bg.discard)

    async def _worker_lost(self, w: _Joined) -> None:
        how = "stopped" if w.leaving else "disconnected"
        log.error("worker node_rank %d (%s, pid %s) %s: the instance cannot run without "
                  "it; deregistering and exiting", w.rank, w.host, w.pid, how)
        self.stopping = True
        await self._deregister()
        self.fail(1, "instance %s is down: lost node_rank %d", self.cfg.name, w.rank)

    # -- HTTP apps ---------------------------------------------------------------------
    def _api_app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        return app

    def _pd_app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/disagg/AddNewRequests", self._add_new_requests)
        app.router.add_post("/disagg/FirstGeneration", self._first_generation)
        app.router.add_post("/disagg/LinkInstance", self._link)
        app.router.add_post("/disagg/UnlinkInstance", self._unlink)
        app.router.add_post("/disagg/{method}", self._not_modelled)
        app.router.add_get("/health", self._health)
        return app

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.ready else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        self.m_running.set(self.lv, self.running)
        return self.metrics.response()

    async def _models(self, request: web.Request) -> web.Response:
        return json_response(200, {"object": "list", "data": [
            {"id": self.cfg.model_name, "object": "model", "created": 0, "owned_by": "xllm",
             "root": self.cfg.model}]})

    async def _not_modelled(self, request: web.Request) -> web.Response:
        return error_response(501, f"DisaggPDService.{request.match_info['method']} is not "
                              "modelled by the emulator")

    # -- requests ----------------------------------------------------------------------
    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        self._enter()
        try:
            resp = await self._generate_inner(request, chat)
        except ApiError as exc:
            if exc.status >= 500:
                log.warning("request failed (%d): %s", exc.status, exc.message)
            resp = error_response(exc.status, exc.message)
        finally:
            self._leave()
        if resp.status >= 400:
            self.m_errors.inc(self.lv + (str(resp.status),))
        self._count_answer()
        return resp

    def _count_answer(self) -> None:
        self.answered += 1
        limit = self.faults.exit_after
        if limit and self.answered >= limit:
            log.error("fault: exiting after %d requests (exit_after)", self.answered)
            asyncio.get_running_loop().call_later(0.05, os._exit, 1)

    async def _generate_inner(self, request: web.Request, chat: bool) -> web.StreamResponse:
        if not self.ready:
            raise ApiError(503, "the instance is not ready (starting, workers missing, not "
                           "registered, or stopping)")
        body = await read_json(request)
        if self.faults.hang:
            await asyncio.Event().wait()
        if self.faults.roll(self.faults.error_rate):
            raise ApiError(500, "injected fault: internal error (error_rate)")
        if isinstance(body, dict) and "service_request_id" in body:
            return await self._routed(body)
        # a client talking to the instance directly: generate here
        served = [self.cfg.model_name, self.cfg.model]
        p = openai.parse(body, chat, served, MAX_MODEL_LEN, self.lat.default_max_tokens)
        rid = uuid.uuid4().hex
        job = {"model": p.model, "key": p.key, "prompt_tokens": p.prompt_tokens,
               "max_tokens": p.max_tokens}
        self.m_requests.inc(self.lv + ("local",))
        items = self._local_items(job)
        try:
            return await respond(request, p, rid, items, Outcome())
        finally:
            await items.aclose()

    async def _local_items(self, job: Dict[str, Any]) -> AsyncIterator[Item]:
        self.running += 1
        try:
            await self._prefill(job["prompt_tokens"])
            toks = textgen.tokens(job["model"], job["key"], 0, job["max_tokens"])
            self.m_tokens.inc(self.lv, len(toks))
            if self.lat.itl(self.running) <= 0:
                yield {"t": "tok", "texts": toks}
            else:
                for i, tok in enumerate(toks):
                    if i:
                        await asyncio.sleep(self.lat.itl(self.running))
                    yield {"t": "tok", "texts": [tok]}
            yield {"t": "end", "finish": "length", "cached": 0}
        finally:
            self.running -= 1

    async def _prefill(self, prompt_tokens: int) -> None:
        delay = self.lat.prefill_s(prompt_tokens, self.running)
        if delay > 0:
            await asyncio.sleep(delay)

    @staticmethod
    def _job(body: Dict[str, Any]) -> Dict[str, Any]:
        """The request the service sent (its stand-in for the tokenized brpc request)."""
        try:
            info = body["emu_prompt"]
            job = {"srid": str(body["service_request_id"]),
                   "source": str(body["source_xservice_addr"]),
                   "model": str(info["model"]), "key": str(info["key"]),
                   "prompt_tokens": int(info["prompt_tokens"]),
                   "max_tokens": int(info["max_tokens"])}
            routing = body.get("routing") or {}
            job["prefill_name"] = routing.get("prefill_name") or ""
            job["decode_name"] = routing.get("decode_name") or ""
        except (KeyError, TypeError, ValueError) as exc:
            raise ApiError(400, f"not a routed xllm-service request: {exc!r}") from None
        if job["prompt_tokens"] < 1 or job["max_tokens"] < 1:
            raise ApiError(400, "prompt_tokens and max_tokens must be >= 1")
        return job

    async def _send_gen(self, job: Dict[str, Any], texts: List[str], finished: bool = False,
                        cached: int = 0) -> bool:
        """Generations RPC to the service: False when it no longer knows the request."""
        assert self.session is not None
        gen: Dict[str, Any] = {"service_request_id": job["srid"], "texts": texts,
                               "finished": finished, "instance": self.cfg.name}
        if finished:
            gen["finish_reason"] = "length"
            gen["usage"] = {"prompt_tokens": job["prompt_tokens"],
                            "completion_tokens": job["max_tokens"], "cached_tokens": cached}
        try:
            async with self.session.post(f"http://{job['source']}/rpc/Generations",
                                         json={"gens": [gen]}) as rsp:
                data = await rsp.json(content_type=None)
                if rsp.status != 200:
                    raise GenError(f"HTTP {rsp.status}")
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise GenError(f"Generations RPC to {job['source']} failed: "
                           f"{exc or type(exc).__name__}") from None
        self.m_tokens.inc(self.lv, len(texts))
        return bool((data.get("results") or [False])[0])

    async def _decode_loop(self, job: Dict[str, Any], start: int, cached: int) -> bool:
        """Tokens start.. of the request to the service, then the finish. False if the
        service dropped the request."""
        toks = textgen.tokens(job["model"], job["key"], start, job["max_tokens"] - start)
        if self.lat.itl(self.running) <= 0 or not toks:
            return await self._send_gen(job, toks, True, cached)
        for i, tok in enumerate(toks):
            await asyncio.sleep(self.lat.itl(self.running))
            if not await self._send_gen(job, [tok], i == len(toks) - 1, cached):
                return False
        return True

    async def _routed(self, body: Dict[str, Any]) -> web.Response:
        """A request from xllm-service: prefill here, decode here or on the routed decode."""
        job = self._job(body)
        dname = job["decode_name"]
        try:
            if not dname or dname == self.cfg.name:
                self.m_requests.inc(self.lv + ("local",))
                self.running += 1
                try:
                    await self._prefill(job["prompt_tokens"])
                    if not await self._decode_loop(job, 0, 0):
                        raise ApiError(410, "the service dropped the request")
                finally:
                    self.running -= 1
                return json_response(200, {"ok": True})
            return await self._prefill_for(job, dname)
        except GenError as exc:
            raise ApiError(502, str(exc)) from None

    async def _rpc_address(self, job: Dict[str, Any], dname: str) -> str:
        """GetInstanceInfo(decode) on the service, cached."""
        assert self.session is not None
        addr = self.decode_rpc.get(dname)
        if addr:
            return addr
        try:
            async with self.session.post(f"http://{job['source']}/rpc/GetInstanceInfo",
                                         json={"name": dname}) as rsp:
                data = await rsp.json(content_type=None)
                if rsp.status != 200:
                    raise ApiError(503, f"xllm-service does not know decode instance {dname}")
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise ApiError(502, f"GetInstanceInfo({dname}) on {job['source']} failed: "
                           f"{exc or type(exc).__name__}") from None
        addr = str(data.get("rpc_address", ""))
        if not addr:
            raise ApiError(503, f"decode instance {dname} has no rpc_address")
        self.decode_rpc[dname] = addr
        return addr

    async def _call_decode(self, addr: str, dname: str, method: str,
                           body: Dict[str, Any]) -> Dict[str, Any]:
        assert self.session is not None
        try:
            async with self.session.post(f"http://{addr}/disagg/{method}", json=body) as rsp:
                data = await rsp.json(content_type=None)
                status = rsp.status
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            self.decode_rpc.pop(dname, None)
            raise ApiError(502, f"{method} on decode instance {dname} ({addr}) failed: "
                           f"{exc or type(exc).__name__}") from None
        if status != 200:
            err = (data.get("error") or {}) if isinstance(data, dict) else {}
            raise ApiError(status if status in (502, 503, 504) else 502,
                           f"decode instance {dname}: {err.get('message', f'HTTP {status}')}")
        return data

    async def _prefill_for(self, job: Dict[str, Any], dname: str) -> web.Response:
        """P's side of the PD flow (facts 1.7 steps 4-6)."""
        if self.cfg.role == "DECODE":
            raise ApiError(400, f"{self.cfg.name} is a DECODE instance, not a prefill")
        addr = await self._rpc_address(job, dname)
        c = self.cfg
        announce = {k: job[k] for k in ("srid", "source", "model", "key", "prompt_tokens",
                                        "max_tokens")}
        announce["prefill_name"] = c.name
        await self._call_decode(addr, dname, "AddNewRequests", announce)
        self.m_requests.inc(self.lv + ("prefill",))
        ids: List[int] = []
        self.running += 1
        try:
            await self._prefill(job["prompt_tokens"])
            blocks, tokens = build(job["model"], job["key"], job["prompt_tokens"],
                                   self.lat.kv_block_tokens, self.lat.kv_bytes_per_token)
            ids = self.store.hold(job["srid"], blocks, tokens)
            first = textgen.tokens(job["model"], job["key"], 0, 1)
            if not await self._send_gen(job, first):
                raise ApiError(410, "the service dropped the request")
            await self._call_decode(addr, dname, "FirstGeneration", {
                "srid": job["srid"],
                "kv": {"remote_host": c.host, "remote_port": c.transfer_port,
                       "remote_engine_id": self.engine_id, "remote_block_ids": ids,
                       "remote_request_id": job["srid"]}})
        finally:
            self.running -= 1
            if ids:
                self.store.free(ids)  # no-op once the decode pulled them
        return json_response(200, {"ok": True})

    # -- DisaggPD (decode side) -----------------------------------------------------------
    async def _add_new_requests(self, request: web.Request) -> web.Response:
        try:
            body = await read_json(request)
            if self.stopping or not self.ready:
                raise ApiError(503, f"decode instance {self.cfg.name} is not ready")
            if self.cfg.role == "PREFILL":
                raise ApiError(400, f"{self.cfg.name} is a PREFILL instance, not a decode")
            job = {k: body[k] for k in ("srid", "source", "model", "key", "prompt_tokens",
                                        "max_tokens", "prefill_name")}
        except ApiError as exc:
            return error_response(exc.status, exc.message)
        except (KeyError, TypeError) as exc:
            return error_response(400, f"bad AddNewRequests: {exc!r}")
        n = -(-int(job["prompt_tokens"]) // self.lat.kv_block_tokens)
        ids = list(range(self.next_block, self.next_block + n))
        self.next_block += n
        pend = _Pending(job, ids)
        if self.lat.kv_lease_s > 0:
            pend.timer = asyncio.get_running_loop().call_later(
                self.lat.kv_lease_s, self._pending_expired, job["srid"])
        self.pending[job["srid"]] = pend
        return json_response(200, {"ok": True, "block_ids": ids})

    def _pending_expired(self, srid: str) -> None:
        if self.pending.pop(srid, None) is not None:
            log.warning("request %s: no FirstGeneration within %gs; dropped", srid,
                        self.lat.kv_lease_s)

    async def _first_generation(self, request: web.Request) -> web.Response:
        try:
            body = await read_json(request)
            srid = str(body["srid"])
            params = body["kv"]
        except ApiError as exc:
            return error_response(exc.status, exc.message)
        except (KeyError, TypeError) as exc:
            return error_response(400, f"bad FirstGeneration: {exc!r}")
        pend = self.pending.pop(srid, None)
        if pend is None:
            return error_response(502, f"request {srid} unknown on decode {self.cfg.name} "
                                  "(no AddNewRequests, or it expired)")
        if pend.timer is not None:
            pend.timer.cancel()
        job = pend.job
        self._enter()
        self.running += 1
        try:
            try:
                res = await kvnet.pull(params, self.engine_id, job["model"], job["key"],
                                       int(job["prompt_tokens"]), self.lat.kv_timeout_s,
                                       self.lat.transfer_s)
            except KVError as exc:
                self.m_kv_fail.inc(self.lv + (exc.cause,))
                log.warning("request %s: KV transfer from %s failed (%s): %s", srid,
                            job["prefill_name"], exc.cause, exc)
                self.m_errors.inc(self.lv + ("502",))
                return error_response(502, f"KV transfer failed ({exc.cause}): {exc}")
            self.m_kv.inc(self.lv)
            self.m_kv_bytes.inc(self.lv, res.nbytes)
            self.m_kv_time.observe(self.lv, res.seconds)
            self.m_requests.inc(self.lv + ("decode",))
            log.info("request %s: received KV of %d prompt tokens from %s (%d blocks, %d "
                     "bytes from %s:%s in %.1f ms)", srid, job["prompt_tokens"],
                     job["prefill_name"], res.blocks, res.nbytes, params.get("remote_host"),
                     params.get("remote_port"), res.seconds * 1000)
            try:
                if not await self._decode_loop(job, 1, int(job["prompt_tokens"])):
                    return error_response(502, "the service dropped the request")
            except GenError as exc:
                return error_response(502, str(exc))
            return json_response(200, {"ok": True, "kv_bytes": res.nbytes})
        finally:
            self.running -= 1
            self._leave()

    async def _link(self, request: web.Request) -> web.Response:
        try:
            body = await read_json(request)
            name, addr = str(body["name"]), str(body.get("rpc_address", ""))
        except (ApiError, KeyError, TypeError):
            return error_response(400, "LinkInstance needs the prefill's instance info")
        if name not in self.linked:
            log.info("linked prefill instance %s (%s)", name, addr)
        self.linked[name] = addr
        return json_response(200, {"ok": True})

    async def _unlink(self, request: web.Request) -> web.Response:
        try:
            body = await read_json(request)
            name = str(body["name"])
        except (ApiError, KeyError, TypeError):
            return error_response(400, "UnlinkInstance needs the prefill's name")
        if self.linked.pop(name, None) is not None:
            log.info("unlinked prefill instance %s", name)
        return json_response(200, {"ok": True})


async def run(cfg: InstanceConfig, lat: Latency, faults: Faults) -> int:
    proc = Master(cfg, lat, faults) if cfg.node_rank == 0 else Worker(cfg, lat, faults)
    return await proc.run()


def main(argv: List[str]) -> int:
    from ..settings import SettingsError, from_environ

    if any(a in ("--help", "-help", "-h", "--helpfull") for a in argv):
        sys.stdout.write(F.usage(PROG, SPECS))
        return 0
    try:
        cfg = parse_args(argv)
        lat, faults = from_environ()
    except (F.FlagError, SettingsError) as exc:
        sys.stderr.write(f"{PROG}: {exc}\n")
        return F.EXIT_BAD_FLAG
    except ConfigError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return exc.code
    setup_logging(f"xllm {cfg.role.lower()} {cfg.host}:{cfg.port} rank {cfg.node_rank}")
    try:
        return asyncio.run(run(cfg, lat, faults))
    except KeyboardInterrupt:
        return 130
