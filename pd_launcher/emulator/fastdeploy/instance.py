"""The FastDeploy instance personality: ``python -m pd_launcher.emulator fastdeploy [flags]``
(the argv of ``python -m fastdeploy.entrypoints.openai.api_server``).

One process is one instance (one DP rank). It binds ``--port`` (OpenAI API, /health,
/metrics), ``--metrics-port``, ``--engine-worker-queue-port`` and ``--cache-queue-port``
(plain TCP stand-ins), and for a prefill or decode ``--pd-comm-port`` (the connector: a
kvnet KV listener the decode pulls from) and ``--rdma-comm-ports`` (TCP stand-ins for
RDMA). PD mode v1: with ``--router`` it registers with the router every 5 s once its own
/health is 200, and serves the router's requests (``disaggregate_info``). PD mode v0:
with ``--scheduler-name splitwise`` it joins the Redis scheduler (scheduler.py).
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Dict, List, Optional

import aiohttp
from aiohttp import web
from redis.exceptions import RedisError

from .. import kvnet, openai, textgen
from ..endpoints import OpenAIEndpoints
from ..kvconfig import StartupError
from ..kvstore import BlockStore, KVError, build, layout
from ..metrics import E2E_BUCKETS, KV_BUCKETS, TTFT_BUCKETS
from ..openai import ApiError
from ..runtime import _runner_kwargs, bind
from ..settings import Faults, Latency
from ..xllm.common import (
    Item,
    Outcome,
    Registry,
    cancel_all,
    error_response,
    json_response,
    read_json,
    respond,
)
from . import flags as F
from .common import (
    VERSION,
    ConfigError,
    Connector,
    Job,
    Timings,
    advertised_ip,
    connect_host,
    plain_listener,
    start_logging,
)
from .scheduler import RedisConfig, RedisScheduler, SchedulerError

log = logging.getLogger("pd_emu.fastdeploy")

PROG = "python -m pd_launcher.emulator fastdeploy"
REDIS_SCHEDULERS = ("splitwise", "dp")

_REMOVED_WHY = ("was removed from FastDeploy (single-host PD now goes through --router, or "
                "the splitwise scheduler with --pd-comm-port and --rdma-comm-ports)")
REMOVED = {"innode-prefill-ports": _REMOVED_WHY, "inner-prefill-ports": _REMOVED_WHY}

SPECS: Dict[str, F.Opt] = {
    "model": F.Opt("str", "default", "model path (never opened; reported in /v1/models)"),
    "served-model-name": F.Opt("str", None, "the served name (default: --model)"),
    "host": F.Opt("str", "0.0.0.0", "bind address of every port; reported as host_ip "
                  "(the local IP for a wildcard)"),
    "port": F.Opt("int", 8000, "OpenAI API, /health, /metrics", F.port),
    "metrics-port": F.Opt("int", None, "/metrics (default: --port)", F.port),
    "workers": F.Opt("int", 4, "checked, unused", F.at_least(1)),
    "max-model-len": F.Opt("int", 2048, "prompt + max_tokens limit", F.at_least(1)),
    "max-num-seqs": F.Opt("int", 8, "checked, unused", F.at_least(1)),
    "tensor-parallel-size": F.Opt("int", 1, "tp_size; RDMA ports per DP rank",
                                  F.at_least(1), aliases=("-tp",)),
    "data-parallel-size": F.Opt("int", 1, "DP ranks of the deployment", F.at_least(1)),
    "local-data-parallel-id": F.Opt("int", 0, "this process's DP rank", F.at_least(0)),
    "enable-expert-parallel": F.Opt("bool", False, "checked, unused"),
    "enable-prefix-caching": F.Opt("bool", True, "checked, unused", negatable=True),
    "engine-worker-queue-port": F.Opt("ints", None, "one per local DP rank (TCP stand-in)",
                                      F.ports),
    "cache-queue-port": F.Opt("ints", None, "one per local DP rank (TCP stand-in)", F.ports),
    "pd-comm-port": F.Opt("ints", None, "connector port, one per local DP rank", F.ports),
    "rdma-comm-ports": F.Opt("ints", None, "tp x local DP ports (TCP stand-ins)", F.ports),
    "cache-transfer-protocol": F.Opt("strs", ["ipc", "rdma"], "ipc and/or rdma",
                                     F.each_of("ipc", "rdma")),
    "splitwise-role": F.Opt("str", "mixed", "mixed | prefill | decode",
                            F.choice("mixed", "prefill", "decode")),
    "router": F.Opt("str", None, "v1: the router's ip:port", F.addr),
    "scheduler-name": F.Opt("str", "local", "local | splitwise | dp (v0 Redis) | global",
                            F.choice("local", "global", "splitwise", "dp")),
    "scheduler-host": F.Opt("str", "127.0.0.1", "v0: Redis host"),
    "scheduler-port": F.Opt("int", 6379, "v0: Redis port", F.port),
    "scheduler-db": F.Opt("int", 0, "v0: Redis db", F.at_least(0)),
    "scheduler-password": F.Opt("str", None, "v0: Redis password (AUTH)"),
    "scheduler-topic": F.Opt("str", "default", "v0: key namespace"),
    "scheduler-ttl": F.Opt("int", 900, "v0: request and result TTL (s)", F.at_least(1)),
    "scheduler-sync-period": F.Opt("int", 5, "v0: report period (ms)", F.at_least(1)),
    "scheduler-expire-period": F.Opt("int", 3000, "v0: a node not reporting for this long "
                                     "is not scheduled (ms)", F.at_least(1)),
    "ips": F.Opt("strs", None, "multi-node: the nodes' IPs, master first"),
}


@dataclass
class InstanceConfig:
    model: str
    served: List[str]
    host: str
    host_ip: str
    port: int
    metrics_port: int
    max_model_len: int
    tp: int
    dp: int
    local_id: int
    role: str
    protocols: List[str]
    router: Optional[str]  # http://ip:port
    scheduler: str
    redis: RedisConfig
    ewq_port: int  # 0: any free port
    cq_port: int
    pd_port: int
    rdma_ports: List[int]
    device_ids: List[str]
    rdma_nics: List[str]
    ips: List[str]
    node_rank: int
    v1_kvcache: int
    log_dir: Optional[str]
    ignored: List[str] = field(default_factory=list)
    stray: List[str] = field(default_factory=list)

    @property
    def pd(self) -> bool:
        return self.role != "mixed"

    @property
    def redis_mode(self) -> bool:
        return self.scheduler in REDIS_SCHEDULERS

    @property
    def master(self) -> bool:
        return self.node_rank == 0

    @property
    def mode(self) -> str:
        parts = []
        if self.router:
            parts.append(f"v1 router {self.router}")
        if self.redis_mode:
            parts.append(f"v0 Redis scheduler {self.redis.where} topic {self.redis.topic!r}")
        return " + ".join(parts) or "standalone"


def _rank_port(values: Optional[List[int]], idx: int, flag: str) -> int:
    if not values:
        return 0
    if idx >= len(values):
        raise ConfigError(f"--{flag} lists {len(values)} port(s); local DP rank {idx} needs "
                          "one port per local DP rank")
    return values[idx]


def parse_args(argv: List[str], env: Optional[Dict[str, str]] = None) -> InstanceConfig:
    """Raises F.FlagError (exit 2) or ConfigError (exit 1)."""
    env = dict(os.environ) if env is None else env
    p = F.parse(argv, SPECS, REMOVED)
    raw_v1 = env.get("ENABLE_V1_KVCACHE_SCHEDULER", "1").strip() or "1"
    try:
        v1 = int(raw_v1)
    except ValueError:
        raise F.FlagError(f"ENABLE_V1_KVCACHE_SCHEDULER={raw_v1!r} is not an integer") from None
    tp, dp, local_id = p.tensor_parallel_size, p.data_parallel_size, p.local_data_parallel_id
    if local_id >= dp:
        raise ConfigError(f"--local-data-parallel-id {local_id} must be < "
                          f"--data-parallel-size {dp}")
    role, sched = p.splitwise_role, p.scheduler_name
    if role != "mixed" and sched == "local" and p.router is None:
        raise ConfigError(f"When using {role} role and the {sched} scheduler, please provide "
                          "--router argument.")
    if sched == "global":
        raise ConfigError("--scheduler-name global is not modelled by the emulator (use "
                          "splitwise for the v0 Redis PD mode, or local with --router)")
    ips: List[str] = list(p.ips or [])
    nnodes = len(ips) or 1
    idx = local_id % max(1, dp // nnodes)  # this rank's index among the node's DP ranks
    protocols = list(p.cache_transfer_protocol)
    rdma_all: Optional[List[int]] = p.rdma_comm_ports
    rdma_ports: List[int] = []
    nics: List[str] = []
    if role != "mixed" and "rdma" in protocols:
        if rdma_all is None:
            raise ConfigError("Please set --rdma_comm_ports argument when using rdma cache "
                              "transfer protocol.")
        if dp % nnodes:
            raise ConfigError(f"data_parallel_size ({dp}) must be divisible by num_nodes "
                              f"({nnodes}).")
        want = tp * (dp // nnodes)
        if len(rdma_all) != want:
            raise ConfigError(f"The number of rdma_comm_ports must equal tensor_parallel_size "
                              f"* (data_parallel_size / num_nodes) = {tp} * ({dp} / {nnodes}) "
                              f"= {want}, but got {len(rdma_all)}.")
        rdma_ports = rdma_all[idx * tp:(idx + 1) * tp]
        nics = [n.strip() for n in env.get("KVCACHE_RDMA_NICS", "").split(",") if n.strip()]
        if not nics:
            raise ConfigError("KVCACHE_RDMA_NICS is not set: the rdma cache transfer protocol "
                              "needs the RDMA NICs of this host (export $(bash "
                              "scripts/get_rdma_nics.sh gpu))")
    host = p.host
    host_ip = advertised_ip(host)
    node_rank = 0
    if ips:
        if host_ip not in ips:
            raise ConfigError(f"this node's IP {host_ip} (--host, or the local IP) is not in "
                              f"--ips {','.join(ips)}")
        node_rank = ips.index(host_ip)
    cuda = [d.strip() for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if len(cuda) >= (idx + 1) * tp:
        devices = cuda[idx * tp:(idx + 1) * tp]
    elif cuda:
        devices = cuda
    else:
        devices = [str(i) for i in range(idx * tp, (idx + 1) * tp)]
    served = [p.served_model_name or p.model]
    for name in (p.model, os.path.basename(p.model.rstrip("/"))):
        if name and name not in served:
            served.append(name)
    router = None
    if p.router is not None:
        rhost, rport = F.split_addr(p.router)
        router = f"http://{rhost}:{rport}"
    return InstanceConfig(
        model=p.model, served=served, host=host, host_ip=host_ip, port=p.port,
        metrics_port=p.metrics_port or p.port, max_model_len=p.max_model_len, tp=tp, dp=dp,
        local_id=local_id, role=role, protocols=protocols, router=router, scheduler=sched,
        redis=RedisConfig(p.scheduler_host, p.scheduler_port, p.scheduler_db,
                          p.scheduler_password, p.scheduler_topic, p.scheduler_ttl,
                          p.scheduler_sync_period, p.scheduler_expire_period),
        ewq_port=_rank_port(p.engine_worker_queue_port, idx, "engine-worker-queue-port"),
        cq_port=_rank_port(p.cache_queue_port, idx, "cache-queue-port"),
        pd_port=_rank_port(p.pd_comm_port, idx, "pd-comm-port"),
        rdma_ports=rdma_ports, device_ids=devices, rdma_nics=nics, ips=ips,
        node_rank=node_rank, v1_kvcache=v1, log_dir=env.get("FD_LOG_DIR") or None,
        ignored=p.ignored, stray=p.stray)


class Instance(OpenAIEndpoints):
    def __init__(self, cfg: InstanceConfig, lat: Latency, faults: Faults,
                 timings: Timings) -> None:
        self.cfg, self.lat, self.faults, self.timings = cfg, lat, faults, timings
        self.stop = asyncio.Event()
        self.exit_code = 0
        self.stopping = False
        self.loaded = False
        self.tasks: List[asyncio.Task] = []
        self.jobs: set = set()  # requests popped from the Redis queue
        self.servers: List[asyncio.AbstractServer] = []
        self.api_server: Optional[asyncio.AbstractServer] = None
        self.runners: List[web.AppRunner] = []
        self.session: Optional[aiohttp.ClientSession] = None
        self.connector: Optional[Connector] = None
        self.scheduler: Optional[RedisScheduler] = None
        self.registered = False
        self.running = 0
        self.load_tokens = 0
        self._init_inflight()
        self.answered = 0
        self.ports: Dict[str, int] = {}  # actual ports (after binding port 0)
        self.engine_id = ""
        m = self.metrics = Registry()
        self.m_running = m.gauge("fastdeploy:num_requests_running",
                                 "Requests being prefilled or decoded here.")
        self.m_waiting = m.gauge("fastdeploy:num_requests_waiting",
                                 "Requests waiting (always 0: no queue is modelled).")
        self.m_success = m.counter("fastdeploy:request_success",
                                   "Requests answered successfully.")
        self.m_prompt = m.counter("fastdeploy:prompt_tokens", "Prompt tokens of answered "
                                  "requests.")
        self.m_gen = m.counter("fastdeploy:generation_tokens", "Tokens generated here.")
        self.m_ttft = m.histogram("fastdeploy:time_to_first_token_seconds",
                                  "Time to first token.", (), TTFT_BUCKETS)
        self.m_e2e = m.histogram("fastdeploy:e2e_request_latency_seconds",
                                 "End-to-end request latency.", (), E2E_BUCKETS)
        self.m_parts = m.counter("pd_emu:fd_requests", "Requests handled, by part (prefill, "
                                 "decode, local, scheduled = sent through Redis).", ("part",))
        self.m_errors = m.counter("pd_emu:fd_request_errors",
                                  "Requests answered with an error, by HTTP status.",
                                  ("status",))
        self.m_registered = m.gauge("pd_emu:fd_router_registered",
                                    "1 once the router accepted a /register.")
        self.m_register = m.counter("pd_emu:fd_register_attempts",
                                    "POST /register to the router, by outcome.", ("outcome",))
        self.m_reports = m.gauge("pd_emu:fd_scheduler_reports",
                                 "HSETs of this node's entry in <topic>.cluster.")
        self.m_kv = m.counter("pd_emu:kv_transfers", "KV pulls completed (decode side).")
        self.m_kv_bytes = m.counter("pd_emu:kv_transfer_bytes", "KV bytes pulled.")
        self.m_kv_time = m.histogram("pd_emu:kv_transfer_seconds", "Time of KV pulls.", (),
                                     KV_BUCKETS)
        self.m_kv_fail = m.counter("pd_emu:kv_transfer_failures", "KV pulls that failed, by "
                                   "cause.", ("cause",))
        self.m_served = m.counter("pd_emu:kv_pulls_served", "KV pulls answered by the "
                                  "connector, by outcome.", ("outcome",))
        self.m_held_blocks = m.gauge("pd_emu:kv_held_blocks", "KV blocks held for a decode.")
        self.m_held_bytes = m.gauge("pd_emu:kv_held_bytes", "KV bytes held for a decode.")
        self.m_expired = m.counter("pd_emu:kv_lease_expired_blocks",
                                   "Held KV blocks freed because their lease expired.")
        for fam in (self.m_running, self.m_waiting, self.m_success, self.m_prompt, self.m_gen,
                    self.m_registered, self.m_reports, self.m_kv, self.m_kv_bytes,
                    self.m_held_blocks, self.m_held_bytes, self.m_expired):
            fam.values[()] = 0.0
        self.store = BlockStore(lat.kv_lease_s, self._kv_changed)

    def _kv_changed(self, blocks: int, nbytes: int, expired: int) -> None:
        self.m_held_blocks.set((), blocks)
        self.m_held_bytes.set((), nbytes)
        if expired:
            self.m_expired.inc((), expired)

    @property
    def ready(self) -> bool:
        if not self.loaded or self.stopping:
            return False
        return self.scheduler is None or self.scheduler.reported.is_set()

    def fail(self, code: int, message: str, *args: Any) -> None:
        log.error(message, *args)
        if not self.stop.is_set():
            self.exit_code = code
            self.stop.set()

    def _on_signal(self, sig: int) -> None:
        if not self.stop.is_set():
            log.info("received %s: stopping", signal.Signals(sig).name)
            self.stop.set()

    # -- what the instance tells the router and the scheduler ----------------------------
    def register_info(self) -> Dict[str, Any]:
        """The body of POST /register (FastDeploy's FDConfig.register_info)."""
        c = self.cfg
        return {
            "role": c.role, "host_ip": c.host_ip, "port": self.ports["port"],
            "metrics_port": self.ports["metrics"], "connector_port": self.ports.get("pd", 0),
            "rdma_ports": list(c.rdma_ports), "engine_worker_queue_port": self.ports["ewq"],
            "device_ids": list(c.device_ids), "transfer_protocol": list(c.protocols),
            "tp_size": c.tp, "is_paused": False, "version": VERSION, "connected_decodes": [],
            # not in FastDeploy's body: KVCACHE_RDMA_NICS of this host
            "rdma_nics": list(c.rdma_nics),
        }

    def disaggregated(self) -> Dict[str, Any]:
        """``disaggregated`` of this node's entry in ``<topic>.cluster`` (v0)."""
        c = self.cfg
        return {"role": c.role, "transfer_protocol": list(c.protocols), "host_ip": c.host_ip,
                "connector_port": self.ports.get("pd", 0), "rdma_ports": list(c.rdma_ports),
                "engine_worker_queue_port": self.ports["ewq"],
                "device_ids": list(c.device_ids), "tp_size": c.tp,
                "rdma_nics": list(c.rdma_nics)}

    def load(self) -> int:
        """FastDeploy's node load: prompt tokens in flight (prefill, mixed), requests in
        flight (decode)."""
        return self.running if self.cfg.role == "decode" else self.load_tokens

    # -- lifecycle -------------------------------------------------------------------
    def _describe(self) -> None:
        c = self.cfg
        log.info("FastDeploy emulator: %s, model %s (served as %s), %s; tp %d, DP rank %d "
                 "of %d; devices %s; ENABLE_V1_KVCACHE_SCHEDULER=%d", c.role, c.model,
                 c.served[0], c.mode, c.tp, c.local_id, c.dp, ",".join(c.device_ids),
                 c.v1_kvcache)
        if c.ignored:
            log.info("ignoring FastDeploy flags the emulator does not model: %s",
                     " ".join(c.ignored))
        for s in c.stray:
            log.warning("stray argument %r ignored", s)

    def _bind_all(self) -> Dict[str, socket.socket]:
        c = self.cfg
        socks: Dict[str, socket.socket] = {}
        try:
            socks["port"] = bind(c.host, c.port, "API (--port)")
            if c.metrics_port != c.port:
                socks["metrics"] = bind(c.host, c.metrics_port, "metrics (--metrics-port)")
            socks["ewq"] = bind(c.host, c.ewq_port, "--engine-worker-queue-port")
            socks["cq"] = bind(c.host, c.cq_port, "--cache-queue-port")
            if c.pd:
                socks["pd"] = bind(c.host, c.pd_port, "--pd-comm-port")
            for i, port in enumerate(c.rdma_ports):
                socks[f"rdma{i}"] = bind(c.host, port, "--rdma-comm-ports")
        except StartupError:
            for s in socks.values():
                s.close()
            raise
        for name, s in socks.items():
            self.ports[name] = s.getsockname()[1]
        self.ports.setdefault("metrics", self.ports["port"])
        return socks

    async def run(self) -> int:
        c = self.cfg
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        if not c.master:
            return await self._run_non_master()
        try:
            socks = self._bind_all()
        except StartupError as exc:
            log.error("%s", exc)
            return 1
        self._describe()
        if c.redis_mode:
            self.scheduler = RedisScheduler(c.redis, self.timings, c.role, c.host_ip,
                                            {}, self.load, self._queued)
            try:
                await self.scheduler.connect()
            except SchedulerError as exc:
                for s in socks.values():
                    s.close()
                log.error("%s", exc)
                return 1
            self.scheduler.disaggregated = self.disaggregated()
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, connect=self.lat.kv_timeout_s),
            connector=aiohttp.TCPConnector(limit=0), trust_env=False)
        try:
            await self._serve(socks)
            log.info("API on %s:%d (/health is 503 until ready), metrics on %d, engine worker "
                     "queue %d, cache queue %d%s", c.host, self.ports["port"],
                     self.ports["metrics"], self.ports["ewq"], self.ports["cq"],
                     f", connector {self.ports['pd']} (KV over TCP), RDMA stand-ins "
                     f"{c.rdma_ports} (NICs {','.join(c.rdma_nics) or '-'})" if c.pd else "")
            self.tasks.append(asyncio.ensure_future(self._startup()))
            await self.stop.wait()
            await self._shutdown()
        finally:
            await self.session.close()
            if self.scheduler is not None:
                await self.scheduler.close()
        log.info("stopped (exit %d)", self.exit_code)
        return self.exit_code

    async def _run_non_master(self) -> int:
        c = self.cfg
        socks: List[socket.socket] = []
        try:
            for port in c.rdma_ports:
                socks.append(bind(c.host, port, "--rdma-comm-ports"))
        except StartupError as exc:
            for s in socks:
                s.close()
            log.error("%s", exc)
            return 1
        self._describe()
        for s in socks:
            self.servers.append(await plain_listener(s))
        log.info("node rank %d of %d (--ips %s): only the master %s serves; this node holds "
                 "its RDMA stand-in ports %s and waits", c.node_rank, len(c.ips),
                 ",".join(c.ips), c.ips[0], c.rdma_ports)
        await self.stop.wait()
        for srv in self.servers:
            srv.close()
        log.info("stopped (exit %d)", self.exit_code)
        return self.exit_code

    async def _serve(self, socks: Dict[str, socket.socket]) -> None:
        loop = asyncio.get_running_loop()
        api = web.AppRunner(self._api_app(), access_log=None, **_runner_kwargs())
        await api.setup()
        self.runners.append(api)
        self.api_server = await loop.create_server(api.server, sock=socks["port"],
                                                   backlog=1024)
        if "metrics" in socks:
            app = web.Application()
            app.router.add_get("/metrics", self._metrics)
            runner = web.AppRunner(app, access_log=None, **_runner_kwargs())
            await runner.setup()
            self.runners.append(runner)
            self.servers.append(await loop.create_server(runner.server, sock=socks["metrics"]))
        for name, sock in socks.items():
            if name in ("ewq", "cq") or name.startswith("rdma"):
                self.servers.append(await plain_listener(sock))
        if "pd" in socks:
            self.engine_id = f"{self.cfg.host_ip}:{self.ports['pd']}"

            def record(outcome: str) -> None:
                self.m_served.inc((outcome,))

            self.connector = Connector(self.engine_id, self.store, self.lat.kv_timeout_s,
                                       self.lat.kv_lease_s,
                                       lambda: self.faults.roll(self.faults.kv_corrupt_rate),
                                       record)
            await self.connector.start(socks["pd"])

    async def _startup(self) -> None:
        delay = self.lat.startup_s + self.faults.slow_start_s
        if delay > 0:
            log.info("loading the model (start-up delay %gs)", delay)
            await asyncio.sleep(delay)
        if self.scheduler is not None:
            self.scheduler.start()
            await self.scheduler.reported.wait()
        self.loaded = True
        log.info("Application startup complete.")
        if self.cfg.router:
            self.tasks.append(asyncio.ensure_future(self._register_loop()))

    async def _register_loop(self) -> None:
        """FastDeploy's register thread: POST /register every period, once /health is 200."""
        assert self.session is not None and self.cfg.router is not None
        c = self.cfg
        own = f"http://{connect_host(c.host)}:{self.ports['port']}/health"
        timeout = aiohttp.ClientTimeout(total=max(1.0, min(5.0, self.timings.register_s * 2)))
        failing = False
        while True:
            try:
                async with self.session.get(own, timeout=timeout) as rsp:
                    healthy = rsp.status == 200
                    await rsp.read()
                if not healthy:
                    log.info("Wait for API service health and then register to router")
                else:
                    async with self.session.post(f"{c.router}/register",
                                                 json=self.register_info(),
                                                 timeout=timeout) as rsp:
                        text = await rsp.text()
                        ok = 200 <= rsp.status < 300
                    self.m_register.inc(("ok" if ok else "refused",))
                    if ok:
                        if not self.registered:
                            self.registered = True
                            self.m_registered.set((), 1)
                            log.info("Register to router successfully")
                        failing = False
                    else:
                        log.error("Send server info to router failed: %d, %s", rsp.status,
                                  text.strip()[:300])
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                self.m_register.inc(("unreachable",))
                if not failing:
                    log.warning("Unexpected error during router registration: %s",
                                exc or type(exc).__name__)
                failing = True
            await asyncio.sleep(self.timings.register_s)

    async def _shutdown(self) -> None:
        self.stopping = True
        await cancel_all(self.tasks)
        if self.scheduler is not None:
            await self.scheduler.leave()
        if self.api_server is not None:
            self.api_server.close()
        if self.inflight:
            log.info("waiting for %d in-flight requests", self.inflight)
            try:
                await asyncio.wait_for(self.idle.wait(), self.lat.shutdown_grace_s)
            except asyncio.TimeoutError:
                log.warning("grace period over: aborting %d requests", self.inflight)
        await cancel_all(list(self.jobs))
        for runner in self.runners:
            await runner.cleanup()
        for srv in self.servers:
            srv.close()
        if self.connector is not None and self.connector.server is not None:
            self.connector.server.close()
        freed = self.store.free_all()
        if freed:
            log.info("freed %d held KV blocks", freed)

    # -- HTTP --------------------------------------------------------------------------
    def _api_app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        return app

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.ready else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        self.m_running.set((), self.running)
        if self.scheduler is not None:
            self.m_reports.set((), self.scheduler.reports)
        return self.metrics.response()

    async def _models(self, request: web.Request) -> web.Response:
        return json_response(200, {"object": "list", "data": [
            {"id": self.cfg.served[0], "object": "model", "created": 0,
             "owned_by": "FastDeploy", "root": self.cfg.model, "parent": None,
             "max_model_len": self.cfg.max_model_len}]})

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        self._enter()
        out = Outcome()
        try:
            try:
                resp = await self._generate_inner(request, chat, out)
            except ApiError as exc:
                out.status, out.error = exc.status, exc.message
                resp = error_response(exc.status, exc.message)
        finally:
            self._leave()
        status = out.status or resp.status
        if status >= 400:
            self.m_errors.inc((str(status),))
            if status >= 500:
                log.warning("request failed (%d): %s", status, out.error)
        else:
            self.m_success.inc(())
            if out.ttft is not None:
                self.m_ttft.observe((), out.ttft)
            self.m_e2e.observe((), time.monotonic() - out.t0)
        self.answered += 1
        limit = self.faults.exit_after
        if limit and self.answered >= limit:
            log.error("fault: exiting after %d requests (exit_after)", self.answered)
            asyncio.get_running_loop().call_later(0.05, os._exit, 1)
        return resp

    async def _generate_inner(self, request: web.Request, chat: bool, out: Outcome
                              ) -> web.StreamResponse:
        if not self.ready:
            raise ApiError(503, "the instance is not ready (starting, or stopping)")
        body = await read_json(request)
        if self.faults.hang:
            await asyncio.Event().wait()
        if self.faults.roll(self.faults.error_rate):
            raise ApiError(500, "injected fault: internal error (error_rate)")
        p = openai.parse(body, chat, self.cfg.served, self.cfg.max_model_len,
                         self.lat.default_max_tokens)
        rid = str(body.get("request_id") or uuid.uuid4())
        job = Job(rid, p.model, p.key, p.prompt_tokens, p.max_tokens)
        info = body.get("disaggregate_info")
        items: AsyncIterator[Item]
        if info is not None:
            if not isinstance(info, dict):
                raise ApiError(400, "disaggregate_info must be an object", "disaggregate_info")
            if self.cfg.role == "prefill":
                items = self._prefill_items(job)
            elif self.cfg.role == "decode":
                items = self._decode_items(job, info)
            else:
                raise ApiError(400, "a mixed instance does not serve disaggregated requests",
                               "disaggregate_info")
        elif self.scheduler is not None:
            self.m_parts.inc(("scheduled",))
            items = self.scheduler.submit(job, chat)
        else:
            items = self._local_items(job)
        try:
            resp = await respond(request, p, rid, items, out)
        finally:
            await items.aclose()
        if out.status == 200:
            self.m_prompt.inc((), p.prompt_tokens)
        return resp

    # -- the engine ----------------------------------------------------------------------
    async def _prefill(self, job: Job) -> None:
        delay = self.lat.prefill_s(job.prompt_tokens, self.running)
        if delay > 0:
            await asyncio.sleep(delay)

    async def _tokens(self, job: Job, cached: int) -> AsyncIterator[Item]:
        toks = textgen.tokens(job.model, job.key, 0, job.max_tokens)
        if self.lat.itl(self.running) <= 0:
            self.m_gen.inc((), len(toks))
            yield {"t": "tok", "texts": toks}
        else:
            for i, tok in enumerate(toks):
                if i:
                    await asyncio.sleep(self.lat.itl(self.running))
                self.m_gen.inc((), 1)
                yield {"t": "tok", "texts": [tok]}
        yield {"t": "end", "finish": "length", "cached": cached}

    async def _local_items(self, job: Job) -> AsyncIterator[Item]:
        """A mixed instance, or a client talking to an instance directly."""
        self.m_parts.inc(("local",))
        self.running += 1
        self.load_tokens += job.prompt_tokens
        try:
            await self._prefill(job)
            async for item in self._tokens(job, 0):
                yield item
        finally:
            self.running -= 1
            self.load_tokens -= job.prompt_tokens

    async def _prefill_items(self, job: Job) -> AsyncIterator[Item]:
        """P: prefill, hold the prompt's KV on the connector for the decode, answer with
        the first token (the router discards this answer)."""
        assert self.connector is not None
        self.m_parts.inc(("prefill",))
        self.running += 1
        self.load_tokens += job.prompt_tokens
        try:
            await self._prefill(job)
            blocks, tokens = build(job.model, job.key, job.prompt_tokens,
                                   self.lat.kv_block_tokens, self.lat.kv_bytes_per_token)
            ids = self.store.hold(job.rid, blocks, tokens)
            self.connector.offer(job.rid, ids)
            log.info("request %s: prefilled %d prompt tokens; KV held (%d blocks, %d bytes) "
                     "for the decode", job.rid, job.prompt_tokens, len(ids),
                     sum(len(b) for b in blocks))
        finally:
            self.running -= 1
            self.load_tokens -= job.prompt_tokens
        first = textgen.tokens(job.model, job.key, 0, 1)
        self.m_gen.inc((), 1)
        yield {"t": "tok", "texts": first}
        yield {"t": "end", "finish": "length", "cached": 0}

    async def _decode_items(self, job: Job, info: Dict[str, Any]) -> AsyncIterator[Item]:
        """D: pull the prompt's KV from the prefill's connector, then generate."""
        try:
            phost = str(info["prefill_ip"])
            pport = int(info["prefill_connector_port"])
        except (KeyError, TypeError, ValueError):
            yield {"t": "error", "status": 400, "message": "disaggregate_info needs prefill_ip "
                   "and prefill_connector_port"}
            return
        proto = info.get("transfer_protocol") or "rdma"
        params = {"remote_host": phost, "remote_port": pport,
                  "remote_engine_id": f"{phost}:{pport}", "remote_block_ids": [],
                  "remote_request_id": job.rid}
        self.m_parts.inc(("decode",))
        self.running += 1
        try:
            try:
                res = await kvnet.pull(params, self.engine_id, job.model, job.key,
                                       job.prompt_tokens, self.lat.kv_timeout_s,
                                       self.lat.transfer_s)
            except KVError as exc:
                self.m_kv_fail.inc((exc.cause,))
                log.warning("request %s: KV transfer from %s:%d failed (%s): %s", job.rid,
                            phost, pport, exc.cause, exc)
                yield {"t": "error", "status": 502,
                       "message": f"KV transfer failed ({exc.cause}): {exc}"}
                return
            self.m_kv.inc(())
            self.m_kv_bytes.inc((), res.nbytes)
            self.m_kv_time.observe((), res.seconds)
            log.info("request %s: received KV of %d prompt tokens from %s:%d (%d blocks, %d "
                     "bytes over TCP standing in for %s, in %.1f ms)", job.rid,
                     job.prompt_tokens, phost, pport,
                     len(layout(job.prompt_tokens, self.lat.kv_block_tokens)), res.nbytes,
                     proto, res.seconds * 1000)
            async for item in self._tokens(job, job.prompt_tokens):
                yield item
        finally:
            self.running -= 1

    # -- v0: a request popped from this node's Redis queue -------------------------------
    def _queued(self, env: Dict[str, Any]) -> None:
        task = asyncio.ensure_future(self._run_queued(env))
        self.jobs.add(task)
        task.add_done_callback(self.jobs.discard)

    async def _run_queued(self, env: Dict[str, Any]) -> None:
        assert self.scheduler is not None
        rid = str(env.get("request_id") or "")
        group = str(env.get("group") or "")
        try:
            job = Job.from_dict(rid, env["emu_prompt"])
        except (KeyError, TypeError, ValueError) as exc:
            log.error("ignoring a malformed request %s: %r", rid, exc)
            return
        info = env.get("disaggregate_info")
        self._enter()
        try:
            if isinstance(info, dict) and self.cfg.role == "prefill":
                items = self._prefill_items(job)
                async for _ in items:  # the prefill writes no results (README)
                    pass
                return
            if isinstance(info, dict) and self.cfg.role == "decode":
                items = self._decode_items(job, info)
            elif info is None:
                items = self._local_items(job)
            else:
                items = _one_error(400, f"a {self.cfg.role} instance cannot serve this part")
            try:
                async for item in items:
                    await self.scheduler.push_result(group, rid, item)
            except RedisError as exc:  # Redis gone: the API node notices the silence
                log.warning("request %s: cannot write results to %s: %s", rid, group, exc)
            finally:
                await items.aclose()
        finally:
            self._leave()


async def _one_error(status: int, message: str) -> AsyncIterator[Item]:
    yield {"t": "error", "status": status, "message": message}


async def run(cfg: InstanceConfig, lat: Latency, faults: Faults, timings: Timings) -> int:
    return await Instance(cfg, lat, faults, timings).run()


def main(argv: List[str]) -> int:
    from ..settings import SettingsError, from_environ

    if any(a in ("--help", "-h") for a in argv):
        sys.stdout.write(F.usage(PROG, SPECS))
        return 0
    try:
        cfg = parse_args(argv)
        lat, faults = from_environ()
        timings = Timings.from_env(os.environ)
    except (F.FlagError, SettingsError) as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return F.EXIT_BAD_FLAG
    except ConfigError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return exc.code
    node = f" node {cfg.node_rank}" if cfg.ips else ""
    path = start_logging(f"fastdeploy {cfg.role} {cfg.host_ip}:{cfg.port}{node}", cfg.log_dir,
                         "fastdeploy.log")
    if path:
        log.info("logging to %s (FD_LOG_DIR)", path)
    try:
        return asyncio.run(run(cfg, lat, faults, timings))
    except KeyboardInterrupt:
        return 130
