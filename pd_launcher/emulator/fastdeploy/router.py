"""A stand-in for FastDeploy's router: ``python -m pd_launcher.emulator fd-router
--port P --splitwise [--config_path FILE] [--host IP]`` (the argv of the Go ``fd-router``,
plus the Python router's ``--host`` and ``--request-timeout-secs``).

Instances POST /register (the router GETs their /health first); the router health-checks
every instance every 5 s and drops one after 3 consecutive failures; a client request
goes to a prefill and a decode at once (the same body plus ``disaggregate_info`` and
``request_id``) and the decode's answer (JSON or SSE) is returned.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import sys
import uuid
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import aiohttp
from aiohttp import web

from ..kvconfig import StartupError
from ..openai import ApiError
from ..runtime import _runner_kwargs, bind
from ..xllm.common import Registry, cancel_all, error_response, json_response, sse_bytes
from . import flags as F
from .common import ConfigError, Timings, start_logging

log = logging.getLogger("pd_emu.fd_router")

PROG = "python -m pd_launcher.emulator fd-router"
ROLES = ("mixed", "prefill", "decode")
REGISTER_HEALTH_TIMEOUT_S = 3.0  # the router's check of a registering instance

SPECS: Dict[str, F.Opt] = {
    "port": F.Opt("int", 9000, "listen port", F.port),
    "host": F.Opt("str", "0.0.0.0", "bind address"),
    "splitwise": F.Opt("bool", False, "PD mode: prefill and decode instances (else mixed)"),
    "config-path": F.Opt("str", None, "JSON (JSON-syntax YAML) with server.{host,port,"
                         "splitwise}; flags given on the command line win"),
    "request-timeout-secs": F.Opt("int", 1800, "upstream request timeout (s)", F.at_least(1)),
    "version": F.Opt("bool", False, "print the version and exit"),
}


@dataclass
class RouterConfig:
    host: str
    port: int
    splitwise: bool
    timeout_s: int
    config_path: Optional[str]
    log_dir: Optional[str]
    ignored: List[str]
    stray: List[str]
    version: bool = False


def _read_config(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except OSError as exc:
        raise F.FlagError(f"argument --config_path: cannot read {path}: "
                          f"{exc.strerror or exc}") from None
    except ValueError as exc:
        raise F.FlagError(f"argument --config_path: {path} is not JSON (the emulator reads "
                          f"the JSON subset of YAML): {exc}") from None
    server = data.get("server", {}) if isinstance(data, dict) else None
    if not isinstance(server, dict):
        raise F.FlagError(f"argument --config_path: {path}: expected an object with a "
                          "'server' object")
    return server


def parse_args(argv: List[str], env: Optional[Dict[str, str]] = None) -> RouterConfig:
    """Raises F.FlagError (exit 2)."""
    env = dict(os.environ) if env is None else env
    p = F.parse(argv, SPECS)
    given = set(p.given)
    host, port, splitwise = p.host, p.port, p.splitwise
    if p.config_path:
        server = _read_config(p.config_path)
        if "host" in server and "host" not in given:
            if not isinstance(server["host"], str) or not server["host"]:
                raise F.FlagError("argument --config_path: server.host must be a string")
            host = server["host"]
        if "port" in server and "port" not in given:
            value = server["port"]
            if isinstance(value, bool) or not isinstance(value, int) or F.port(value):
                raise F.FlagError(f"argument --config_path: server.port: not a TCP port: "
                                  f"{value!r}")
            port = value
        if "splitwise" in server and "splitwise" not in given:
            if not isinstance(server["splitwise"], bool):
                raise F.FlagError("argument --config_path: server.splitwise must be true or "
                                  "false")
            splitwise = server["splitwise"]
    return RouterConfig(host=host, port=port, splitwise=splitwise,
                        timeout_s=p.request_timeout_secs, config_path=p.config_path,
                        log_dir=env.get("FD_LOG_DIR") or None, ignored=p.ignored,
                        stray=p.stray, version=p.version)


@dataclass
class Inst:
    role: str
    host_ip: str
    port: str
    tp: int
    protocols: List[str]
    info: Dict[str, Any]
    failures: int = 0
    inflight: int = 0

    @property
    def key(self) -> str:
        return f"{self.host_ip}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.key}"

    def public(self) -> Dict[str, Any]:
        d = dict(self.info)
        d.update({"role": self.role, "host_ip": self.host_ip, "port": self.port,
                  "tp_size": self.tp, "transfer_protocol": self.protocols,
                  "health_failures": self.failures, "inflight": self.inflight})
        return d


def _instance(body: Any) -> Inst:
    """Validate a /register body (ApiError 400 when it is not usable)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the register body must be a JSON object")
    for name in ("role", "host_ip", "port"):
        if body.get(name) in (None, ""):
            raise ApiError(400, f"Missing required field '{name}' in instance info dict",
                           name)
    role = str(body["role"]).lower()
    if role not in ROLES:
        raise ApiError(400, f"Invalid role string: {body['role']}", "role")
    tp = body.get("tp_size", 1)
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ApiError(400, f"tp_size must be a positive integer, got {tp!r}", "tp_size")
    protos = body.get("transfer_protocol") or []
    if not isinstance(protos, list) or any(t not in ("ipc", "rdma") for t in protos):
        raise ApiError(400, f"Invalid transfer_protocol: {protos!r}", "transfer_protocol")
    port = str(body["port"])
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ApiError(400, f"port must be a TCP port, got {body['port']!r}", "port")
    info = dict(body)
    for k in ("port", "metrics_port", "connector_port", "engine_worker_queue_port"):
        if info.get(k) is not None:
            info[k] = str(info[k])  # as the Python router's InstanceInfo
    for k in ("rdma_ports", "device_ids"):
        if isinstance(info.get(k), list):
            info[k] = [str(v) for v in info[k]]
    return Inst(role, str(body["host_ip"]), port, tp, list(protos), info)


class _Upstream(Exception):
    pass


class Router:
    def __init__(self, cfg: RouterConfig, timings: Timings) -> None:
        self.cfg, self.timings = cfg, timings
        self.instances: Dict[str, Inst] = {}
        self.stop = asyncio.Event()
        self.tasks: List[asyncio.Task] = []
        self.bg: set = set()
        self.session: Optional[aiohttp.ClientSession] = None
        m = self.metrics = Registry()
        self.m_instances = m.gauge("pd_emu:fdrouter_instances", "Registered instances, by "
                                   "role.", ("role",))
        self.m_requests = m.counter("pd_emu:fdrouter_requests", "Client requests answered, by "
                                    "HTTP status.", ("status",))
        self.m_routed = m.counter("pd_emu:fdrouter_routed_requests", "Requests sent to a "
                                  "(prefill, decode) pair or a mixed instance.",
                                  ("prefill", "decode"))
        self.m_checks = m.counter("pd_emu:fdrouter_health_checks", "Health checks of "
                                  "registered instances, by outcome.", ("outcome",))
        self.m_removed = m.counter("pd_emu:fdrouter_removed_instances", "Instances dropped "
                                   "after failed health checks.")
        self.m_removed.values[()] = 0.0
        self._count()

    def _count(self) -> None:
        for role in ROLES:
            self.m_instances.set((role,), len(self._of(role)))

    def _of(self, role: str) -> List[Inst]:
        return [i for i in self.instances.values() if i.role == role]

    def numbers(self) -> Dict[str, int]:
        return {role: len(self._of(role)) for role in ROLES}

    # -- lifecycle -------------------------------------------------------------------
    async def run(self) -> int:
        c = self.cfg
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            sock = bind(c.host, c.port, "router (--port)")
        except StartupError as exc:
            log.error("%s", exc)
            return 1
        if c.ignored:
            log.info("ignoring router flags the emulator does not model: %s",
                     " ".join(c.ignored))
        for s in c.stray:
            log.warning("stray argument %r ignored", s)
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=c.timeout_s, connect=5),
            connector=aiohttp.TCPConnector(limit=0), trust_env=False)
        runner = web.AppRunner(self._app(), access_log=None, **_runner_kwargs())
        try:
            await runner.setup()
            server = await loop.create_server(runner.server, sock=sock, backlog=1024)
            log.info("Router started at http://%s:%d (%s; health checks every %gs, %d "
                     "failures drop an instance)", c.host, c.port,
                     "splitwise" if c.splitwise else "mixed", self.timings.health_s,
                     self.timings.health_failures)
            self.tasks.append(asyncio.ensure_future(self._health_loop()))
            await self.stop.wait()
            server.close()
            await cancel_all(self.tasks + list(self.bg))
            await runner.cleanup()
        finally:
            await self.session.close()
        log.info("stopped")
        return 0

    def _on_signal(self, sig: int) -> None:
        if not self.stop.is_set():
            log.info("received %s: stopping", signal.Signals(sig).name)
            self.stop.set()

    async def _healthy(self, inst: Inst, timeout: float) -> bool:
        assert self.session is not None
        try:
            async with self.session.get(f"{inst.url}/health",
                                        timeout=aiohttp.ClientTimeout(total=timeout)) as rsp:
                await rsp.read()
                return rsp.status == 200
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
            return False

    async def _health_loop(self) -> None:
        t = self.timings
        while True:
            await asyncio.sleep(t.health_s)
            insts = list(self.instances.values())
            results = await asyncio.gather(*(self._healthy(i, t.health_timeout_s)
                                             for i in insts))
            for inst, ok in zip(insts, results):
                self.m_checks.inc(("ok" if ok else "failed",))
                if self.instances.get(inst.key) is not inst:
                    continue
                if ok:
                    if inst.failures:
                        log.info("%s instance %s is healthy again", inst.role, inst.key)
                    inst.failures = 0
                    continue
                inst.failures += 1
                log.warning("%s instance %s failed its health check (%d/%d)", inst.role,
                            inst.key, inst.failures, t.health_failures)
                if inst.failures >= t.health_failures:
                    del self.instances[inst.key]
                    self.m_removed.inc(())
                    self._count()
                    log.warning("removed unhealthy %s instance %s; registered now: %s",
                                inst.role, inst.key, self.numbers())

    # -- HTTP --------------------------------------------------------------------------
    def _app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/register", self._register)
        app.router.add_get("/registered_number", self._registered_number)
        app.router.add_get("/registered", self._registered)
        app.router.add_get("/health", self._health)
        app.router.add_get("/health_generate", self._health_generate)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        return app

    async def _health(self, request: web.Request) -> web.Response:
        return json_response(200, {"status": "ok"})

    async def _health_generate(self, request: web.Request) -> web.Response:
        n = self.numbers()
        ok = (n["prefill"] and n["decode"]) if self.cfg.splitwise else n["mixed"]
        return json_response(200 if ok else 503, {"status": "ok" if ok else "unavailable",
                                                  **n})

    async def _metrics(self, request: web.Request) -> web.Response:
        return self.metrics.response()

    async def _registered_number(self, request: web.Request) -> web.Response:
        return json_response(200, self.numbers())

    async def _registered(self, request: web.Request) -> web.Response:
        return json_response(200, {role: [i.public() for i in self._of(role)]
                                   for role in ROLES})

    async def _register(self, request: web.Request) -> web.Response:
        try:
            try:
                body = await request.json(loads=json.loads)
            except ValueError as exc:
                raise ApiError(400, f"invalid JSON body: {exc}") from None
            inst = _instance(body)
            if (inst.role == "mixed") == self.cfg.splitwise:
                raise ApiError(400, f"Invalid instance role: {inst.role}, splitwise: "
                               f"{self.cfg.splitwise}", "role")
            if not await self._healthy(inst, REGISTER_HEALTH_TIMEOUT_S):
                raise ApiError(503, f"Instance {inst.role} {inst.key} is not healthy")
        except ApiError as exc:
            log.warning("register refused: %s", exc.message)
            return error_response(exc.status, exc.message)
        old = self.instances.get(inst.key)
        if old is not None and old.role == inst.role:
            old.info, old.tp, old.protocols, old.failures = (inst.info, inst.tp,
                                                             inst.protocols, 0)
            return json_response(200, {"status": "success"})
        if old is not None:
            log.info("instance %s re-registered as %s (was %s)", inst.key, inst.role, old.role)
        self.instances[inst.key] = inst
        self._count()
        n = self.numbers()
        log.info("Register %s instance success: %s (tp %d, %s), prefill: %d, decode: %d, "
                 "mixed: %d", inst.role, inst.key, inst.tp, ",".join(inst.protocols) or "-",
                 n["prefill"], n["decode"], n["mixed"])
        return json_response(200, {"status": "success"})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "/v1/completions")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "/v1/chat/completions")

    async def _handle(self, request: web.Request, path: str) -> web.StreamResponse:
        try:
            resp = await self._route(request, path)
        except ApiError as exc:
            if exc.status >= 500:
                log.warning("request failed (%d): %s", exc.status, exc.message)
            resp = error_response(exc.status, exc.message)
        self.m_requests.inc((str(resp.status),))
        return resp

    @staticmethod
    def _least(insts: List[Inst]) -> Inst:
        low = min(i.inflight for i in insts)
        return random.choice([i for i in insts if i.inflight == low])

    def _pick(self, body: Dict[str, Any]) -> Tuple[List[Inst], Dict[str, Any]]:
        """(targets, body to send): [prefill, decode] or [mixed]."""
        n = self.numbers()
        if not self.cfg.splitwise:
            if not n["mixed"]:
                raise ApiError(503, "No mixed servers available. Registered mixed servers: 0")
            return [self._least(self._of("mixed"))], body
        if not n["prefill"] or not n["decode"]:
            which = "prefill" if not n["prefill"] else "decode"
            raise ApiError(503, f"No {which} servers available. Registered servers: "
                           f"prefill={n['prefill']}, decode={n['decode']}")
        p, d = self._least(self._of("prefill")), self._least(self._of("decode"))
        if p.tp != d.tp and d.tp != 1:
            raise ApiError(400, "The tp_size of prefill and decode should be equal or the "
                           "tp_size of decode is 1")
        use_ipc = (p.host_ip == d.host_ip and "ipc" in p.protocols and "ipc" in d.protocols
                   and p.tp == d.tp)
        fwd = dict(body)
        fwd["disaggregate_info"] = {
            "prefill_ip": p.host_ip, "decode_ip": d.host_ip,
            "prefill_connector_port": p.info.get("connector_port"),
            "decode_connector_port": d.info.get("connector_port"),
            "decode_device_ids": d.info.get("device_ids") or [],
            "decode_rdma_ports": d.info.get("rdma_ports") or [],
            "transfer_protocol": "ipc" if use_ipc else "rdma", "decode_tp_size": d.tp,
        }
        if "request_id" not in fwd:
            fwd["request_id"] = str(uuid.uuid4())
        return [p, d], fwd

    async def _post(self, inst: Inst, path: str, body: Dict[str, Any]
                    ) -> aiohttp.ClientResponse:
        assert self.session is not None
        try:
            return await self.session.post(f"{inst.url}{path}", json=body)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            raise _Upstream(f"{inst.role} instance {inst.key} failed: "
                            f"{exc or type(exc).__name__}") from None

    async def _route(self, request: web.Request, path: str) -> web.StreamResponse:
        try:
            body = await request.json(loads=json.loads)
        except ValueError as exc:
            raise ApiError(400, f"invalid JSON body: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object")
        targets, fwd = self._pick(body)
        pre, dec = (targets[0], targets[-1]) if len(targets) == 2 else (None, targets[0])
        self.m_routed.inc((pre.key if pre else "", dec.key))
        for t in targets:
            t.inflight += 1
        calls = [asyncio.ensure_future(self._post(t, path, fwd)) for t in targets]
        p_call = calls[0] if pre is not None else None
        d_call = calls[-1]
        handed_off = False
        try:
            pending = set(calls)
            while d_call in pending:
                done, pending = await asyncio.wait(pending,
                                                   return_when=asyncio.FIRST_COMPLETED)
                if p_call is not None and p_call in done:
                    await self._check_prefill(p_call, pre)
            if d_call.exception() is not None:
                raise ApiError(502, str(d_call.exception()))
            d_resp = d_call.result()
            if p_call is not None and not p_call.done():
                self._background(self._drain_prefill(p_call, pre))
            handed_off = True
            return await self._relay(request, d_resp, dec, bool(fwd.get("stream")))
        finally:
            for t in targets:
                t.inflight -= 1
            if not handed_off:
                for call in calls:
                    _discard(call)

    async def _check_prefill(self, call: asyncio.Future, pre: Optional[Inst]) -> None:
        """The prefill answered (its body is discarded): an error there fails the request
        at once instead of leaving the decode waiting for KV that will not come."""
        assert pre is not None
        exc = call.exception()
        if exc is not None:
            raise ApiError(502, str(exc))
        rsp: aiohttp.ClientResponse = call.result()
        if rsp.status == 200:
            self._background(_read_and_release(rsp))
            return
        try:
            data = await rsp.read()
            message = json.loads(data)["error"]["message"]
        except (aiohttp.ClientError, ValueError, KeyError, TypeError, OSError):
            message = f"HTTP {rsp.status}"
        finally:
            rsp.release()
        status = rsp.status if 400 <= rsp.status < 500 else 502
        raise ApiError(status, f"prefill instance {pre.key}: {message}")

    async def _drain_prefill(self, call: asyncio.Future, pre: Optional[Inst]) -> None:
        try:
            rsp = await call
        except _Upstream as exc:
            log.warning("%s", exc)
            return
        await _read_and_release(rsp)
        if rsp.status != 200 and pre is not None:
            log.warning("prefill instance %s answered %d", pre.key, rsp.status)

    def _background(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.bg.add(task)
        task.add_done_callback(self.bg.discard)

    async def _relay(self, request: web.Request, rsp: aiohttp.ClientResponse, dec: Inst,
                     stream: bool) -> web.StreamResponse:
        """The decode's answer to the client: SSE streamed through, else the whole body."""
        ctype = rsp.headers.get("Content-Type", "application/json")
        try:
            if not (stream and rsp.status == 200 and ctype.startswith("text/event-stream")):
                try:
                    data = await rsp.read()
                except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                    raise ApiError(502, f"decode instance {dec.key} failed: "
                                   f"{exc or type(exc).__name__}") from None
                out = web.Response(status=rsp.status, body=data)
                out.headers["Content-Type"] = ctype
                return out
            resp = web.StreamResponse(status=200, headers={
                "Content-Type": ctype, "Cache-Control": "no-cache"})
            await resp.prepare(request)
            tail = b""
            try:
                async for chunk in rsp.content.iter_any():
                    await resp.write(chunk)
                    tail = (tail + chunk)[-64:]
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                log.warning("decode instance %s failed mid-stream: %s", dec.key,
                            exc or type(exc).__name__)
            if b"data: [DONE]" not in tail:
                await resp.write(sse_bytes({"error": {
                    "message": f"decode instance {dec.key} failed mid-stream",
                    "type": "APIError", "param": None, "code": 502}}) + b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        finally:
            rsp.release()


async def _read_and_release(rsp: aiohttp.ClientResponse) -> None:
    try:
        await rsp.read()
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
        pass
    finally:
        rsp.release()


def _discard(call: asyncio.Future) -> None:
    if not call.done():
        call.cancel()
        return
    if not call.cancelled() and call.exception() is None:
        call.result().release()


async def run(cfg: RouterConfig, timings: Timings) -> int:
    return await Router(cfg, timings).run()


def main(argv: List[str]) -> int:
    from ..settings import SettingsError

    if any(a in ("--help", "-h", "-help") for a in argv):
        sys.stdout.write(F.usage(PROG, SPECS))
        return 0
    try:
        cfg = parse_args(argv)
        timings = Timings.from_env(os.environ)
    except (F.FlagError, SettingsError) as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return F.EXIT_BAD_FLAG
    except ConfigError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return exc.code
    if cfg.version:
        sys.stdout.write("fd-router (pd-deploy emulator)\n")
        return 0
    path = start_logging(f"fd-router {cfg.host}:{cfg.port}", cfg.log_dir, "router.log")
    if path:
        log.info("logging to %s (FD_LOG_DIR)", path)
    try:
        return asyncio.run(run(cfg, timings))
    except KeyboardInterrupt:
        return 130
