"""The xllm-service personality: ``python -m pd_launcher.emulator xllm_master_serving``.

Registers ``XLLM:SERVICE:<ip>:<rpc_port>`` and (create-if-absent) ``XLLM:SERVICE:MASTER``
in etcd with a 3 s lease, opens its RPC port at once (HTTP standing in for brpc:
Heartbeat, Generations, GetInstanceInfo, ...), watches the instance keys, and opens
its client HTTP port only while a DEFAULT instance, or a prefill and a decode, are
registered. Client requests go to the prefill instance, which hands them to the decode
instance; the tokens come back to this process through the Generations RPC.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Dict, List, Optional, Tuple

import aiohttp
from aiohttp import web

from .. import openai
from ..endpoints import OpenAIEndpoints
from ..kvconfig import StartupError
from ..metrics import E2E_BUCKETS, TTFT_BUCKETS
from ..openai import ApiError
from ..runtime import _runner_kwargs, bind
from ..settings import Latency
from . import flags as F
from .common import (
    MASTER_KEY,
    MAX_MODEL_LEN,
    ROLE_TYPES,
    TYPE_ROLES,
    Item,
    Outcome,
    Registry,
    cancel_all,
    error_response,
    json_response,
    local_ip,
    parse_instance,
    read_json,
    respond,
    setup_logging,
)
from .etcd import Etcd, EtcdError, namespaced

log = logging.getLogger("pd_emu.xservice")

PROG = "python -m pd_launcher.emulator xllm_master_serving"
SERVICE_TTL = 3  # kHeartbeatInterval of xllm-service
KEEPALIVE_S = 1.0
RESYNC_S = 0.5
CALL_TAIL_S = 2.0  # how long a finished request waits for the prefill's answer
INSTANCE_ROLES = tuple(ROLE_TYPES)

SPECS: Dict[str, F.Flag] = {
    "etcd_addr": F.Flag("string", "0.0.0.0:2379", "etcd client host:port", F.addr_check),
    "etcd_namespace": F.Flag("string", "", "key prefix /<ns>/"),
    "http_server_port": F.Flag("int32", 8888, "client HTTP port", F.port_check),
    "rpc_server_port": F.Flag("int32", 8889, "RPC port (HTTP in the emulator)", F.port_check),
    "server_host": F.Flag("string", "", "bind address of both servers (empty: all)"),
    "tokenizer_path": F.Flag("string", "", "its basename is the served model name"),
    "load_balance_policy": F.Flag("string", "RR", "RR | CAR | SLO_AWARE (all act as RR)",
                                  F.one_of("RR", "CAR", "SLO_AWARE")),
    "block_size": F.Flag("int32", 128, "checked, unused", F.positive),
    "readiness_check_interval_s": F.Flag("int32", 3, "checked, unused (event driven)",
                                         F.positive),
    "detect_disconnected_instance_interval": F.Flag("int32", 15, "checked, unused",
                                                    F.positive),
    "lease_lost_heartbeat_timeout_ms": F.Flag("int32", 3000, "checked, unused", F.positive),
    "instance_delete_probe_timeout_ms": F.Flag("int32", 1000, "checked, unused", F.positive),
    "instance_delete_probe_attempts": F.Flag("int32", 2, "checked, unused", F.positive),
    "target_ttft": F.Flag("int32", 1000, "checked, unused"),
    "target_tpot": F.Flag("int32", 50, "checked, unused"),
    "http_server_num_threads": F.Flag("int32", 32, "checked, unused", F.positive),
    "http_server_max_concurrency": F.Flag("int32", 128, "checked, unused"),
    "rpc_server_num_threads": F.Flag("int32", 32, "checked, unused", F.positive),
    "rpc_server_max_concurrency": F.Flag("int32", 128, "checked, unused"),
    "timeout_ms": F.Flag("int32", -1, "> 0: a request taking longer gets 504"),
    "connect_timeout_ms": F.Flag("int32", -1, "> 0: connect timeout to instances"),
    "reasoning_parser": F.Flag("string", "", "logged only"),
    "tool_call_parser": F.Flag("string", "", "logged only"),
    "enable_request_trace": F.Flag("bool", False, "checked, unused"),
}


@dataclass
class ServiceConfig:
    etcd_addr: str
    namespace: str
    http_port: int
    rpc_port: int
    server_host: str
    tokenizer_path: str
    policy: str
    timeout_ms: int
    connect_timeout_ms: int
    ignored: List[str]
    stray: List[str]

    @property
    def bind_host(self) -> str:
        return self.server_host or "0.0.0.0"

    @property
    def ip(self) -> str:
        """The IP in the service name: --server_host, or the local IP when that is empty
        or a wildcard (xllm-service always uses get_local_ip())."""
        if self.server_host and self.server_host not in ("0.0.0.0", "::"):
            return self.server_host
        return local_ip()

    def key(self, rest: str) -> str:
        return namespaced(self.namespace, rest)


def parse_args(argv: List[str]) -> ServiceConfig:
    p = F.parse(argv, SPECS)
    return ServiceConfig(
        etcd_addr=p.etcd_addr, namespace=p.etcd_namespace, http_port=p.http_server_port,
        rpc_port=p.rpc_server_port, server_host=p.server_host,
        tokenizer_path=p.tokenizer_path, policy=p.load_balance_policy,
        timeout_ms=p.timeout_ms, connect_timeout_ms=p.connect_timeout_ms,
        ignored=p.ignored, stray=p.stray)


@dataclass
class _Inst:
    key: str
    info: Dict[str, Any]
    current: str  # PREFILL | DECODE | DEFAULT (a MIX instance's current_type)
    last_heartbeat: float = 0.0

    @property
    def name(self) -> str:
        return self.info["name"]

    @property
    def role(self) -> str:
        return TYPE_ROLES[self.info["type"]]


class Pool:
    """Registered instances and the RR choice of a (prefill, decode) pair."""

    def __init__(self) -> None:
        self.by_name: Dict[str, _Inst] = {}
        self.by_key: Dict[str, str] = {}
        self._rr_p = 0
        self._rr_d = 0

    def prefills(self) -> List[_Inst]:
        return [i for i in self.by_name.values() if i.current in ("PREFILL", "DEFAULT")]

    def decodes(self) -> List[_Inst]:
        return [i for i in self.by_name.values() if i.current == "DECODE"]

    def available(self) -> bool:
        """has_available_instances(): a DEFAULT instance, or a prefill and a decode
        (MIX instances count as their current type)."""
        ps = self.prefills()
        return any(i.current == "DEFAULT" for i in ps) or (bool(ps) and bool(self.decodes()))

    def pick(self) -> Tuple[_Inst, Optional[_Inst]]:
        ps = self.prefills()
        if not ps:
            raise ApiError(503, "No available instances")
        p = ps[self._rr_p % len(ps)]
        self._rr_p += 1
        if p.current == "DEFAULT":
            return p, None
        ds = self.decodes()
        if not ds:
            raise ApiError(503, "No available decode instances")
        d = ds[self._rr_d % len(ds)]
        self._rr_d += 1
        return p, d

    def mix_current(self) -> str:
        mixed = [i for i in self.by_name.values() if i.role == "MIX"]
        as_p = sum(1 for i in mixed if i.current == "PREFILL")
        return "PREFILL" if as_p <= len(mixed) - as_p else "DECODE"

    def counts(self) -> Dict[str, int]:
        out = {r: 0 for r in INSTANCE_ROLES}
        for i in self.by_name.values():
            out[i.role] += 1
        return out


class _Upstream(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class Service(OpenAIEndpoints):
    def __init__(self, cfg: ServiceConfig, lat: Latency) -> None:
        self.cfg, self.lat = cfg, lat
        self.name = f"{cfg.ip}:{cfg.rpc_port}"
        self.stop = asyncio.Event()
        self.exit_code = 0
        self.stopping = False
        self.pool = Pool()
        self.requests: Dict[str, asyncio.Queue] = {}
        self.session: Optional[aiohttp.ClientSession] = None
        self.etcd: Optional[Etcd] = None
        self.lease = 0
        self.is_master = False
        self.tasks: List[asyncio.Task] = []
        self.rpc_runner: Optional[web.AppRunner] = None
        self.http_runner: Optional[web.AppRunner] = None
        self.rpc_server: Optional[asyncio.AbstractServer] = None
        self.http_server: Optional[asyncio.AbstractServer] = None
        self.http_sock: Optional[socket.socket] = None
        self.changed = asyncio.Event()
        self._init_inflight()
        m = self.metrics = Registry()
        self.m_instances = m.gauge("pd_emu:xservice_instances",
                                   "Registered (routable) instances, by type.", ("type",))
        self.m_http = m.gauge("pd_emu:xservice_http_server_listening",
                              "1 while the client HTTP port accepts connections.")
        self.m_requests = m.counter("pd_emu:xservice_requests",
                                    "Client requests answered, by HTTP status.", ("status",))
        self.m_prompt = m.counter("pd_emu:xservice_prompt_tokens", "Prompt tokens.")
        self.m_gen = m.counter("pd_emu:xservice_generation_tokens", "Generated tokens.")
        self.m_cached = m.counter("pd_emu:xservice_cached_tokens",
                                  "Prompt tokens whose KV a decode instance received.")
        self.m_ttft = m.histogram("pd_emu:xservice_time_to_first_token_seconds",
                                  "Time to first token.", (), TTFT_BUCKETS)
        self.m_e2e = m.histogram("pd_emu:xservice_e2e_request_latency_seconds",
                                 "End-to-end request latency.", (), E2E_BUCKETS)
        self.m_routed = m.counter("pd_emu:xservice_routed_requests",
                                  "Requests sent to a (prefill, decode) pair.",
                                  ("prefill", "decode"))
        self.m_generations = m.counter("pd_emu:xservice_generations_rpcs",
                                       "Generations RPCs received from instances.")
        self.m_heartbeats = m.counter("pd_emu:xservice_heartbeats",
                                      "Heartbeat RPCs received, by instance.", ("instance",))
        self.m_parse_fail = m.counter("pd_emu:xservice_instance_parse_failures",
                                      "Instance values that failed to parse (ignored).")
        for fam in (self.m_http, self.m_prompt, self.m_gen, self.m_cached, self.m_generations,
                    self.m_parse_fail):
            fam.values[()] = 0.0
        self._count()

    # -- lifecycle -------------------------------------------------------------------
    def fail(self, code: int, message: str, *args: Any) -> None:
        log.error(message, *args)
        if not self.stop.is_set():
            self.exit_code = code
            self.stop.set()

    async def run(self) -> int:
        c = self.cfg
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            rpc_sock = bind(c.bind_host, c.rpc_port, "rpc_server", listen=False)
            # reserved now (a clash is a start-up error); it listens once instances exist
            self.http_sock = bind(c.bind_host, c.http_port, "http_server", listen=False)
        except StartupError as exc:
            log.error("%s (xllm_master_serving exits when a port is taken)", exc)
            return 1
        log.info("xllm-service emulator %s: etcd %s, namespace %r, policy %s%s", self.name,
                 c.etcd_addr, c.namespace, c.policy,
                 "" if c.policy == "RR" else " (routed as RR by the emulator)")
        if c.ignored:
            log.info("ignoring flags the emulator does not model: %s", " ".join(c.ignored))
        for s in c.stray:
            log.warning("stray argument %r ignored", s)
        connect = c.connect_timeout_ms / 1000 if c.connect_timeout_ms > 0 else 5.0
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, connect=connect),
            connector=aiohttp.TCPConnector(limit=0), trust_env=False)
        try:
            self.rpc_runner = web.AppRunner(self._rpc_app(), access_log=None,
                                            **_runner_kwargs())
            await self.rpc_runner.setup()
            self.rpc_server = await loop.create_server(self.rpc_runner.server, sock=rpc_sock,
                                                       backlog=1024)
            log.info("Xllm rpc server started on: %s", self.name)
            self.http_runner = web.AppRunner(self._http_app(), access_log=None,
                                             **_runner_kwargs())
            await self.http_runner.setup()
            if await self._etcd_init():
                self.tasks.append(asyncio.ensure_future(self._keepalive_loop()))
                self.tasks.append(asyncio.ensure_future(self._watch_loop()))
                self.tasks.append(asyncio.ensure_future(self._http_lifecycle()))
            await self.stop.wait()
            await self._shutdown()
        finally:
            await self.session.close()
        log.info("stopped (exit %d)", self.exit_code)
        return self.exit_code

    def _on_signal(self, sig: int) -> None:
        if not self.stop.is_set():
            log.info("received %s: stopping", signal.Signals(sig).name)
            self.stop.set()

    async def _etcd_init(self) -> bool:
        c = self.cfg
        assert self.session is not None
        etcd = self.etcd = Etcd(c.etcd_addr, self.session)
        try:
            await etcd.put(c.key("XLLM_PING"), "PING")
            await self._register()
        except EtcdError as exc:
            self.fail(1, "cannot use etcd at %s: %s", c.etcd_addr, exc)
            return False
        return True

    async def _register(self) -> None:
        """Lease, service key, and the master key if nobody holds it."""
        assert self.etcd is not None
        c = self.cfg
        self.lease = await self.etcd.grant(SERVICE_TTL)
        await self.etcd.put(c.key(f"XLLM:SERVICE:{self.name}"), self.name, self.lease)
        await self._try_master()

    async def _try_master(self) -> None:
        assert self.etcd is not None
        created, holder = await self.etcd.create_if_absent(
            self.cfg.key(MASTER_KEY), self.name, self.lease)
        was = self.is_master
        self.is_master = created or holder == self.name
        if self.is_master and not was:
            log.info("this service is the master (%s = %s)", self.cfg.key(MASTER_KEY),
                     self.name)
        elif not self.is_master:
            log.info("master service is %s; this one stands by", holder)

    async def _keepalive_loop(self) -> None:
        assert self.etcd is not None
        healthy = True
        while True:
            await asyncio.sleep(KEEPALIVE_S)
            try:
                if await self.etcd.keepalive(self.lease) <= 0:
                    log.warning("etcd lease of the service keys lost; registering again")
                    self.is_master = False
                    await self._register()
                if not healthy:
                    log.info("etcd reachable again")
                healthy = True
            except EtcdError as exc:
                if healthy:
                    log.warning("cannot refresh the service lease: %s", exc)
                healthy = False

    async def _shutdown(self) -> None:
        self.stopping = True
        await cancel_all(self.tasks)
        if self.http_server is not None:
            self.http_server.close()
        if self.etcd is not None and self.lease:
            try:
                await self.etcd.revoke(self.lease)
                log.info("etcd lease revoked: service keys deleted")
            except EtcdError as exc:
                log.warning("could not revoke the etcd lease: %s", exc)
        if self.inflight:
            try:
                await asyncio.wait_for(self.idle.wait(), self.lat.shutdown_grace_s)
            except asyncio.TimeoutError:
                log.warning("grace period over: aborting %d requests", self.inflight)
        if self.rpc_server is not None:
            self.rpc_server.close()
        for r in (self.http_runner, self.rpc_runner):
            if r is not None:
                await r.cleanup()
        if self.http_sock is not None:
            self.http_sock.close()

    # -- instances ---------------------------------------------------------------------
    async def _watch_loop(self) -> None:
        """Range the XLLM: prefix, then watch it from the next revision; on any break,
        resync after RESYNC_S."""
        assert self.etcd is not None
        prefix = self.cfg.key("XLLM:")
        healthy = True
        while True:
            try:
                rev, kvs = await self.etcd.range_prefix(prefix)
                self._resync(kvs)
                if not healthy:
                    log.info("etcd watch resumed")
                healthy = True
                async for ev in self.etcd.watch(prefix, rev + 1):
                    self._apply(ev.kind, ev.key, ev.value)
            except EtcdError as exc:
                if healthy:
                    log.warning("%s; resyncing every %gs", exc, RESYNC_S)
                healthy = False
            await asyncio.sleep(RESYNC_S)

    def _split(self, key: str) -> Tuple[str, str]:
        """(kind, rest) of a namespaced XLLM:<kind>:<rest> key."""
        plain = key[len(self.cfg.key("")):]
        _, _, tail = plain.partition(":")
        kind, _, rest = tail.partition(":")
        return kind, rest

    def _resync(self, kvs: List[Tuple[str, str]]) -> None:
        present = set()
        for key, value in kvs:
            present.add(key)
            self._apply("PUT", key, value)
        for key in list(self.pool.by_key):
            if key not in present:
                self._apply("DELETE", key, "")

    def _apply(self, kind: str, key: str, value: str) -> None:
        what, rest = self._split(key)
        if what == "SERVICE":
            if rest == "MASTER" and kind == "DELETE" and not self.stopping:
                self.is_master = False
                self._bg(self._takeover())
            return
        if what not in INSTANCE_ROLES:
            return  # LOADMETRICS, CACHE, ...
        if kind == "DELETE":
            name = self.pool.by_key.pop(key, None)
            inst = self.pool.by_name.pop(name, None) if name else None
            if inst is not None:
                log.info("instance %s (%s) removed: %s deleted", inst.name, inst.role, key)
                self._unlink(inst)
                self._count()
            return
        info, why = parse_instance(value)
        if info is None:
            self.m_parse_fail.inc(())
            log.error("Parse instance json failed, key: %s (%s); the instance is ignored",
                      key, why)
            return
        old = self.pool.by_name.get(info["name"])
        if old is not None and old.info.get("incarnation_id") == info.get("incarnation_id"):
            old.info = info
            old.key = key
            self.pool.by_key[key] = info["name"]
            return
        if old is not None:
            log.info("instance %s replaced (incarnation %s -> %s)", info["name"],
                     old.info.get("incarnation_id"), info.get("incarnation_id"))
            self.pool.by_name.pop(info["name"], None)
            self.pool.by_key.pop(old.key, None)
        role = TYPE_ROLES[info["type"]]
        current = self.pool.mix_current() if role == "MIX" else role
        inst = _Inst(key, info, current)
        self.pool.by_name[inst.name] = inst
        self.pool.by_key[key] = inst.name
        log.info("instance %s registered: %s, rpc %s, KV ports %s%s", inst.name, role,
                 info["rpc_address"], info["ports"],
                 f" (MIX, acting as {current})" if role == "MIX" else "")
        self._link(inst)
        self._count()

    async def _takeover(self) -> None:
        try:
            await self._try_master()
        except EtcdError as exc:
            log.warning("master takeover failed: %s", exc)

    def _count(self) -> None:
        for role, n in self.pool.counts().items():
            self.m_instances.set((role,), n)
        self.changed.set()

    def _pairs(self, inst: _Inst) -> List[Tuple[_Inst, _Inst]]:
        """(prefill, decode) pairs the instance takes part in."""
        if inst.current == "PREFILL":
            return [(inst, d) for d in self.pool.decodes()]
        if inst.current == "DECODE":
            return [(p, inst) for p in self.pool.prefills() if p.current == "PREFILL"]
        return []

    def _link(self, inst: _Inst) -> None:
        for p, d in self._pairs(inst):
            self._bg(self._link_call(d, "LinkInstance", p.info))

    def _unlink(self, inst: _Inst) -> None:
        if inst.current == "PREFILL":
            for d in self.pool.decodes():
                self._bg(self._link_call(d, "UnlinkInstance", {"name": inst.name}))

    def _bg(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.append(task)
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task) -> None:
        if task in self.tasks:
            self.tasks.remove(task)

    async def _link_call(self, d: _Inst, method: str, body: Dict[str, Any]) -> None:
        assert self.session is not None
        try:
            async with self.session.post(f"http://{d.info['rpc_address']}/disagg/{method}",
                                         json=body, timeout=aiohttp.ClientTimeout(total=5)
                                         ) as rsp:
                await rsp.read()
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            log.warning("%s on %s failed: %s", method, d.name, exc or type(exc).__name__)

    async def _http_lifecycle(self) -> None:
        """Listen on the HTTP port while instances are available (master.cpp's
        manage_http_server_lifecycle, driven by registry events)."""
        c = self.cfg
        loop = asyncio.get_running_loop()
        while True:
            await self.changed.wait()
            self.changed.clear()
            avail = self.pool.available()
            if avail and self.http_server is None:
                if self.http_sock is None:
                    try:
                        self.http_sock = bind(c.bind_host, c.http_port, "http_server",
                                              listen=False)
                    except StartupError as exc:
                        log.error("%s; retrying when instances change", exc)
                        continue
                assert self.http_runner is not None
                self.http_server = await loop.create_server(
                    self.http_runner.server, sock=self.http_sock, backlog=1024)
                self.http_sock = None
                self.m_http.set((), 1)
                log.info("HTTP server started, instances available, endpoint: %s:%d",
                         c.ip, c.http_port)
            elif not avail and self.http_server is not None:
                self.http_server.close()
                self.http_server = None
                self.m_http.set((), 0)
                log.info("No available instances, stopping HTTP server.")
                try:
                    self.http_sock = bind(c.bind_host, c.http_port, "http_server",
                                          listen=False)
                except StartupError as exc:
                    log.warning("%s", exc)

    # -- RPC (HTTP standing in for brpc) ------------------------------------------------
    def _rpc_app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/rpc/Hello", self._hello)
        app.router.add_get("/rpc/Hello", self._hello)
        app.router.add_post("/rpc/Heartbeat", self._heartbeat)
        app.router.add_post("/rpc/Generations", self._generations)
        app.router.add_post("/rpc/GetInstanceInfo", self._instance_info)
        app.router.add_post("/rpc/GetStaticDecodeList", self._decode_list)
        app.router.add_post("/rpc/GetStaticPrefillList", self._prefill_list)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def _hello(self, request: web.Request) -> web.Response:
        return json_response(200, {"ok": True, "name": self.name, "master": self.is_master})

    async def _heartbeat(self, request: web.Request) -> web.Response:
        try:
            body = await read_json(request)
            name = str(body["name"])
        except (ApiError, KeyError, TypeError):
            return error_response(400, "Heartbeat needs the instance name")
        inst = self.pool.by_name.get(name)
        self.m_heartbeats.inc((name,))
        if inst is None:
            return json_response(200, {"ok": False, "error": f"unknown instance {name}"})
        inst.last_heartbeat = time.monotonic()
        return json_response(200, {"ok": True})

    async def _generations(self, request: web.Request) -> web.Response:
        try:
            body = await read_json(request)
            gens = body["gens"]
            if not isinstance(gens, list):
                raise TypeError("gens must be a list")
        except (ApiError, KeyError, TypeError) as exc:
            return error_response(400, f"bad Generations: {exc}")
        self.m_generations.inc(())
        results = []
        for gen in gens:
            q = self.requests.get(str(gen.get("service_request_id"))) if isinstance(
                gen, dict) else None
            if q is None:
                results.append(False)
                continue
            q.put_nowait(gen)
            results.append(True)
        return json_response(200, {"results": results})

    async def _instance_info(self, request: web.Request) -> web.Response:
        try:
            name = str((await read_json(request))["name"])
        except (ApiError, KeyError, TypeError):
            return error_response(400, "GetInstanceInfo needs a name")
        inst = self.pool.by_name.get(name)
        if inst is None:
            return error_response(404, f"unknown instance {name}")
        return json_response(200, inst.info)

    async def _decode_list(self, request: web.Request) -> web.Response:
        return json_response(200, {"names": [i.name for i in self.pool.decodes()]})

    async def _prefill_list(self, request: web.Request) -> web.Response:
        return json_response(200, {"names": [i.name for i in self.pool.prefills()]})

    async def _metrics(self, request: web.Request) -> web.Response:
        return self.metrics.response()

    # -- client HTTP API ---------------------------------------------------------------
    def _http_app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/hello", self._hello_text)
        return app

    async def _hello_text(self, request: web.Request) -> web.Response:
        return web.Response(text="hello, xllm-service (emulator)\n")

    def served_names(self) -> List[str]:
        names: List[str] = []
        if self.cfg.tokenizer_path:
            names.append(os.path.basename(self.cfg.tokenizer_path.rstrip("/"))
                         or self.cfg.tokenizer_path)
        for inst in self.pool.by_name.values():
            extra = inst.info.get("x_emulator")
            model = extra.get("model") if isinstance(extra, dict) else None
            if isinstance(model, str) and model and model not in names:
                names.append(model)
        return names or ["default"]

    async def _models(self, request: web.Request) -> web.Response:
        return json_response(200, {"object": "list", "data": [
            {"id": n, "object": "model", "created": 0, "owned_by": "xllm"}
            for n in self.served_names()]})

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        srid = rid = uuid.uuid4().hex  # the response id is cmpl-<rid> / chatcmpl-<rid>
        out = Outcome()
        self._enter()
        try:
            try:
                resp = await self._generate_inner(request, chat, srid, rid, out)
            except ApiError as exc:
                out.status, out.error = exc.status, exc.message
                resp = error_response(exc.status, exc.message, rid)
        finally:
            self.requests.pop(srid, None)
            self._leave()
        status = out.status or resp.status
        self.m_requests.inc((str(status),))
        if status >= 500:
            log.warning("request %s failed (%d): %s", srid, status, out.error)
        return resp

    async def _generate_inner(self, request: web.Request, chat: bool, srid: str, rid: str,
                              out: Outcome) -> web.StreamResponse:
        if self.stopping:
            raise ApiError(503, "the service is shutting down")
        body = await read_json(request)
        p = openai.parse(body, chat, self.served_names(), MAX_MODEL_LEN,
                         self.lat.default_max_tokens)
        pre, dec = self.pool.pick()
        self.m_routed.inc((pre.name, dec.name if dec else ""))
        fwd = dict(body)
        fwd.update({
            "service_request_id": srid,
            "source_xservice_addr": self.name,
            "routing": {"prefill_name": pre.name, "decode_name": dec.name if dec else ""},
            # stands in for the token ids the real service sends after tokenizing
            "emu_prompt": {"model": p.model, "key": p.key, "prompt_tokens": p.prompt_tokens,
                           "max_tokens": p.max_tokens},
        })
        queue: asyncio.Queue = asyncio.Queue()
        self.requests[srid] = queue
        path = "/v1/chat/completions" if chat else "/v1/completions"
        call = asyncio.ensure_future(self._call(pre, path, fwd))
        call.add_done_callback(_consume)
        timeout = self.cfg.timeout_ms / 1000 if self.cfg.timeout_ms > 0 else None
        items = self._items(queue, call, pre, dec, timeout)
        try:
            resp = await respond(request, p, rid, items, out)
            if out.status == 200 and not call.done():
                # the last tokens arrived; the prefill answers right after the decode
                # did: let it, so that the connections stay reusable
                await asyncio.wait({call}, timeout=CALL_TAIL_S)
        finally:
            call.cancel()
            await items.aclose()
        if out.status == 200:
            self.m_prompt.inc((), p.prompt_tokens)
            self.m_gen.inc((), out.n)
            self.m_cached.inc((), out.cached)
            if out.ttft is not None:
                self.m_ttft.observe((), out.ttft)
            self.m_e2e.observe((), time.monotonic() - out.t0)
        return resp

    async def _call(self, inst: _Inst, path: str, body: Dict[str, Any]) -> None:
        """The request to the prefill instance; returns when the instance is done with it
        (its decode has sent every token), raises _Upstream on failure."""
        assert self.session is not None
        try:
            async with self.session.post(f"http://{inst.name}{path}", json=body) as rsp:
                data = await rsp.read()
                status = rsp.status
        except (aiohttp.ClientError, OSError) as exc:
            raise _Upstream(502, f"prefill instance {inst.name} failed: "
                            f"{exc or type(exc).__name__}") from None
        if status != 200:
            try:
                message = json.loads(data)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = data[:200].decode("utf-8", "replace")
            raise _Upstream(status if status in (502, 503, 504) else 502,
                            f"prefill instance {inst.name}: {message}")

    async def _items(self, queue: asyncio.Queue, call: asyncio.Future, pre: _Inst,
                     dec: Optional[_Inst], timeout: Optional[float]) -> AsyncIterator[Item]:
        """Generation items from the Generations RPCs; an error when the call chain
        fails, ends without a finished output, or takes longer than --timeout_ms."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            getter = asyncio.ensure_future(queue.get())
            left = None if deadline is None else max(0.0, deadline - loop.time())
            try:
                await asyncio.wait({getter, call}, timeout=left,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not getter.done():
                    getter.cancel()
            if getter.done() and not getter.cancelled():
                gen = getter.result()
            elif not queue.empty():
                gen = queue.get_nowait()
            elif not call.done():
                yield {"t": "error", "status": 504, "message":
                       f"request timed out after {self.cfg.timeout_ms} ms (--timeout_ms)"}
                return
            else:
                exc = call.exception() if not call.cancelled() else None
                if isinstance(exc, _Upstream):
                    yield {"t": "error", "status": exc.status, "message": exc.message}
                elif exc is not None:
                    yield {"t": "error", "status": 502, "message": f"request failed: {exc}"}
                else:
                    who = f"{pre.name} -> {dec.name}" if dec else pre.name
                    yield {"t": "error", "status": 502, "message":
                           f"instances {who} ended the request without its last tokens"}
                return
            texts = [str(t) for t in gen.get("texts") or []]
            if texts:
                yield {"t": "tok", "texts": texts}
            if gen.get("finished"):
                usage = gen.get("usage") or {}
                yield {"t": "end", "finish": gen.get("finish_reason") or "length",
                       "cached": int(usage.get("cached_tokens") or 0)}
                return


def _consume(fut: asyncio.Future) -> None:
    """Retrieve a finished call's exception (it may end after its response was sent)."""
    if not fut.cancelled():
        fut.exception()


async def run(cfg: ServiceConfig, lat: Latency) -> int:
    return await Service(cfg, lat).run()


def main(argv: List[str]) -> int:
    from ..settings import SettingsError, from_environ

    if any(a in ("--help", "-help", "-h", "--helpfull") for a in argv):
        sys.stdout.write(F.usage(PROG, SPECS))
        return 0
    try:
        cfg = parse_args(argv)
        lat, _ = from_environ()
    except (F.FlagError, SettingsError) as exc:
        sys.stderr.write(f"{PROG}: {exc}\n")
        return F.EXIT_BAD_FLAG
    setup_logging(f"xllm-service {cfg.server_host or '*'}:{cfg.rpc_port}")
    try:
        return asyncio.run(run(cfg, lat))
    except KeyboardInterrupt:
        return 130
