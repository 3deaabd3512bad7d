"""The OpenAI-compatible HTTP API (aiohttp), health, metrics and the admin endpoint."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from typing import Any, Awaitable, Callable, Dict, List, Optional

from aiohttp import web

from . import openai
from .args import EngineArgs
from .engine import QueueFull
from .metrics import Metrics
from .openai import ApiError, Parsed
from .settings import Faults, Latency, SettingsError

log = logging.getLogger("pd_emu.api")

_dumps = json.JSONEncoder(separators=(",", ":")).encode
_enc = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]
_OPEN_PATHS = ("/health", "/metrics", "/version", "/ping")


class State:
    """Readiness of the process: start-up delay done, DP group complete, not draining."""

    def __init__(self) -> None:
        self.loaded = False
        self.dp_ok = True
        self.draining = False
        self.inflight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.answered = 0
        self.on_ready: List[Callable[[], Any]] = []
        self._was_ready = False

    @property
    def ready(self) -> bool:
        return self.loaded and self.dp_ok and not self.draining

    def changed(self) -> None:
        if self.ready and not self._was_ready:
            self._was_ready = True
            for cb in self.on_ready:
                cb()

    def enter(self) -> None:
        self.inflight += 1
        self.idle.clear()

    def leave(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self.idle.set()


class Router:
    """Picks the least-loaded rank (local RankEngine or a headless process's RemoteRank)."""

    def __init__(self, handles: Callable[[], List[Any]]) -> None:
        self.handles = handles
        self._rr = 0

    def pick(self) -> Any:
        hs = self.handles()
        if not hs:
            raise ApiError(503, "no data parallel rank available")
        self._rr = (self._rr + 1) % len(hs)
        best = None
        for i in range(len(hs)):
            h = hs[(self._rr + i) % len(hs)]
            if best is None or h.load() < best.load():
                best = h
        return best


def _json(status: int, body: Any, rid: Optional[str] = None) -> web.Response:
    resp = web.Response(status=status, body=_dumps(body), content_type="application/json")
    if rid:
        resp.headers["X-Request-Id"] = rid
    return resp


class Api:
    def __init__(self, args: EngineArgs, lat: Latency, faults: Faults, metrics: Metrics,
                 state: State, router: Router) -> None:
        self.args, self.lat, self.faults, self.metrics = args, lat, faults, metrics
        self.state, self.router = state, router
        self.created = int(time.time())
        self.exit_scheduled = False

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=64 << 20)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/ping", self.health)
        app.router.add_get("/metrics", self.metrics_text)
        app.router.add_get("/version", self.version)
        app.router.add_get("/admin/faults", self.get_faults)
        app.router.add_post("/admin/faults", self.set_faults)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                          ) -> web.StreamResponse:
        key = self.args.api_key
        if key and not request.path.startswith(_OPEN_PATHS):
            if request.headers.get("Authorization", "") != "Bearer " + key:
                return _json(401, {"error": "Unauthorized"})
        return await handler(request)

    # -- simple endpoints --------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.state.ready else 503)

    async def version(self, request: web.Request) -> web.Response:
        return _json(200, {"version": "0.33.0+pd-emulator"})

    async def metrics_text(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render().encode(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def models(self, request: web.Request) -> web.Response:
        data = [{"id": name, "object": "model", "created": self.created, "owned_by": "vllm",
                 "root": self.args.model, "parent": None,
                 "max_model_len": self.args.max_model_len, "permission": []}
                for name in self.args.served_model_names]
        return _json(200, {"object": "list", "data": data})

    async def get_faults(self, request: web.Request) -> web.Response:
        return _json(200, self.faults.as_dict())

    async def set_faults(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise SettingsError("body must be a JSON object")
            self.faults.update(body)
        except (ValueError, SettingsError) as exc:
            return _json(400, openai.error_body(400, str(exc)))
        log.warning("faults changed through /admin/faults: %s", body)
        return _json(200, self.faults.as_dict())

    # -- generation ----------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        rid = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        self.state.enter()
        try:
            resp = await self._generate_inner(request, chat, rid)
        except ApiError as exc:
            self.metrics.errors.inc(self.metrics.lv(self.args.ranks[0]) + (str(exc.status),))
            resp = _json(exc.status, exc.body(), rid)
        finally:
            self.state.leave()
        if resp.status != 499:  # not aborted by the client
            self._count_answer()
        return resp

    def _count_answer(self) -> None:
        self.state.answered += 1
        limit = self.faults.exit_after
        if limit and self.state.answered >= limit and not self.exit_scheduled:
            self.exit_scheduled = True
            self.metrics.faults.inc(("exit_after",))
            log.error("fault: exiting after %d requests (exit_after)", self.state.answered)
            asyncio.get_running_loop().call_later(0.05, os._exit, 1)

    async def _generate_inner(self, request: web.Request, chat: bool,
                              rid: str) -> web.StreamResponse:
        t0 = time.monotonic()
        if self.state.draining:
            raise ApiError(503, "the engine is shutting down")
        if not self.state.ready:
            raise ApiError(503, "the engine is not ready (starting or DP group incomplete)")
        try:
            body = await request.json(loads=json.loads)
        except ValueError as exc:
            raise ApiError(400, f"invalid JSON body: {exc}") from None
        p = openai.parse(body, chat, self.args.served_model_names, self.args.max_model_len,
                         self.lat.default_max_tokens)
        if self.faults.hang:
            self.metrics.faults.inc(("hang",))
            await asyncio.Event().wait()
        if self.faults.roll(self.faults.error_rate):
            self.metrics.faults.inc(("error",))
            raise ApiError(500, "injected fault: internal error (error_rate)")
        kv = self.args.kv
        if p.stream and p.kv_params and p.kv_params.get("do_remote_decode") and kv and kv.producer:
            raise ApiError(400, "streaming is not supported on a prefill request "
                           "(kv_transfer_params.do_remote_decode=true)", "stream")
        handle = self.router.pick()
        job = {"request_id": rid, "model": p.model, "key": p.key,
               "prompt_tokens": p.prompt_tokens, "max_tokens": p.max_tokens,
               "kv_params": p.kv_params}
        run = _Run(self.metrics, handle.rank, p, t0, request)
        agen = handle.execute(job)
        try:
            first = await run.next_event(agen)
            if first["t"] == "error":
                run.finish_error(first)
                raise ApiError(first["status"], first["message"])
            if p.stream:
                return await self._stream(request, p, rid, agen, run, first)
            return await self._collect(p, rid, agen, run, first)
        except QueueFull as exc:
            raise ApiError(503, str(exc)) from None
        except asyncio.CancelledError:  # client gone (aiohttp >= 3.9) or shutdown
            run.abort()
            raise
        except ConnectionError:  # client gone, noticed by a write or between tokens
            run.abort()
            return web.Response(status=499)
        finally:
            await agen.aclose()

    async def _collect(self, p: Parsed, rid: str, agen: Any, run: _Run,
                       ev: Dict[str, Any]) -> web.Response:
        parts: List[str] = []
        while ev["t"] == "tok":
            parts.extend(ev["texts"])
            ev = await run.next_event(agen)
        if ev["t"] == "error":
            run.finish_error(ev)
            raise ApiError(ev["status"], ev["message"])
        run.finish(ev)
        body = openai.full_response(p, rid, int(time.time()), "".join(parts), ev["n"],
                                    ev["finish"], ev["cached"], ev["kv_transfer_params"])
        return _json(200, body, rid)

    async def _stream(self, request: web.Request, p: Parsed, rid: str, agen: Any, run: _Run,
                      ev: Dict[str, Any]) -> web.StreamResponse:
        resp = _SSEResponse(headers={"Content-Type": "text/event-stream",
                                     "Cache-Control": "no-cache", "X-Request-Id": rid})
        await resp.prepare(request)
        created = int(time.time())
        n = 0

        def sse(obj: Dict[str, Any]) -> bytes:
            if p.continuous_usage and "usage" not in obj:
                obj["usage"] = openai.usage(p.prompt_tokens, n)
            return b"data: " + _dumps(obj).encode() + b"\n\n"

        head, tail = openai.chunk_template(p, rid, created)
        out: List[bytes] = []
        if p.chat:
            out.append(sse(openai.chunk(p, rid, created, "", None, first=True)))
        while ev["t"] == "tok":
            for text in ev["texts"]:  # tokens of one step go out in one write
                n += 1
                if p.continuous_usage:
                    out.append(sse(openai.chunk(p, rid, created, text, None)))
                else:
                    out.append(b"data: " + head + _enc(text).encode() + tail + b"\n\n")
            if not ev.get("last"):  # more tokens will come later: send these now
                await resp.write(b"".join(out))
                out = []
            ev = await run.next_event(agen)
        if ev["t"] == "error":
            run.finish_error(ev)
            out.append(sse(openai.error_body(ev["status"], ev["message"])))
        else:
            run.finish(ev)
            out.append(sse(openai.chunk(p, rid, created, None if p.chat else "", ev["finish"])))
            if p.include_usage:
                out.append(sse(openai.usage_chunk(p, rid, created, ev["n"], ev["cached"])))
        out.append(b"data: [DONE]\n\n")
        await resp.write_eof(b"".join(out))
        return resp


class _SSEResponse(web.StreamResponse):
    """Headers go out with the first body bytes (aiohttp >= 3.10 honours this; older
    versions send them at prepare()): one send for a whole zero-latency stream."""

    _send_headers_immediately = False


class _Run:
    """Per-request timing and metrics."""

    __slots__ = ("metrics", "lv", "p", "t0", "last_tok", "ntok", "done", "request")

    def __init__(self, metrics: Metrics, rank: int, p: Parsed, t0: float,
                 request: web.Request) -> None:
        self.metrics, self.lv, self.p, self.t0 = metrics, metrics.lv(rank), p, t0
        self.request = request
        self.last_tok = 0.0
        self.ntok = 0
        self.done = False

    async def next_event(self, agen: Any) -> Dict[str, Any]:
        while True:
            ev = await agen.__anext__()
            tr = self.request.transport
            if tr is None or tr.is_closing():
                raise ConnectionResetError("client disconnected")
            t = ev["t"]
            if t == "start":
                continue
            if t == "tok":
                now = time.monotonic()
                k = len(ev["texts"])
                if self.ntok == 0:
                    self.metrics.ttft.observe(self.lv, now - self.t0)
                else:
                    self.metrics.itl.observe(self.lv, now - self.last_tok)
                self.metrics.itl.observe_many(self.lv, 0.0, k - 1)  # same-step tokens
                self.last_tok = now
                self.ntok += k
            return ev

    def _kv(self, info: Dict[str, Any]) -> None:
        m, lv = self.metrics, self.lv
        if info.get("pulled"):
            m.kv_transfers.inc(lv)
            m.kv_bytes.inc(lv, info.get("bytes", 0))
            m.kv_transfer_time.observe(lv, info.get("seconds", 0.0))
        if info.get("failure"):
            m.kv_transfer_failures.inc(lv + (info["failure"],))
        if info.get("recomputed"):
            m.kv_recomputes.inc(lv)

    def finish(self, ev: Dict[str, Any]) -> None:
        self.done = True
        m, lv = self.metrics, self.lv
        self._kv(ev.get("kv") or {})
        if ev.get("kv_transfer_params"):
            m.prefills.inc(lv)
        m.prompt_tokens.inc(lv, self.p.prompt_tokens)
        m.generation_tokens.inc(lv, ev["n"])
        m.e2e.observe(lv, time.monotonic() - self.t0)
        m.success.inc(lv + (ev["finish"],))

    def finish_error(self, ev: Dict[str, Any]) -> None:
        self.done = True
        self._kv(ev.get("kv") or {})

    def abort(self) -> None:
        if not self.done:
            self.done = True
            self.metrics.aborts.inc(self.lv)
            self.metrics.success.inc(self.lv + ("abort",))
