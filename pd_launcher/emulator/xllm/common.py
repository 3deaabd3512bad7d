"""Pieces shared by the xLLM instance and xllm-service personalities: logging, local IP,
the instance JSON schema, OpenAI responses from a stream of generation items, metrics."""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
import time
from typing import Any, AsyncIterator, Dict, List, Optional, Tuple

from aiohttp import web

from .. import openai
from ..metrics import Counter, Gauge, Histogram, _Family
from ..openai import ApiError, Parsed

#: InstanceType of xLLM / xllm-service (the "type" field of the instance JSON)
ROLE_TYPES = {"DEFAULT": 0, "PREFILL": 1, "DECODE": 2, "MIX": 3}
TYPE_ROLES = {v: k for k, v in ROLE_TYPES.items()}
#: fields xllm-service 0.9 reads with json.at() (a missing one fails the whole parse)
REQUIRED_FIELDS = ("name", "rpc_address", "type", "cluster_ids", "k_cache_ids", "addrs",
                   "v_cache_ids", "dp_size", "device_ips", "ports", "ttft_profiling_data",
                   "tpot_profiling_data")
#: fields xLLM >= 0.10 no longer writes
DROPPED_IN_0_10 = ("k_cache_ids", "v_cache_ids", "device_ips")
MASTER_KEY = "XLLM:SERVICE:MASTER"
#: the emulator has no model config; this is the context limit its OpenAI checks use
MAX_MODEL_LEN = 65536

_dumps = json.JSONEncoder(separators=(",", ":")).encode


def setup_logging(tag: str) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s [{tag}] %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def local_ip() -> str:
    """What xLLM's net::get_local_ip_addr() gives: the address of the default route
    (no packet is sent), else the host name's address, else 127.0.0.1."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
    except OSError:
        pass
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def json_response(status: int, body: Any, rid: Optional[str] = None) -> web.Response:
    resp = web.Response(status=status, body=_dumps(body), content_type="application/json")
    if rid:
        resp.headers["X-Request-Id"] = rid
    return resp


def error_response(status: int, message: str, rid: Optional[str] = None) -> web.Response:
    return json_response(status, openai.error_body(status, message), rid)


def sse_bytes(obj: Any) -> bytes:
    return b"data: " + _dumps(obj).encode() + b"\n\n"


class Outcome:
    """What ``respond`` saw: status, tokens, cached tokens, time to first token."""

    __slots__ = ("status", "n", "cached", "ttft", "t0", "error")

    def __init__(self) -> None:
        self.status = 0
        self.error = ""
        self.n = 0
        self.cached = 0
        self.ttft: Optional[float] = None
        self.t0 = time.monotonic()

    def tok(self, k: int) -> None:
        if self.ttft is None and k:
            self.ttft = time.monotonic() - self.t0
        self.n += k


# Generation items (the stream ``respond`` consumes):
#   {"t": "tok", "texts": [str, ...]}
#   {"t": "end", "finish": "length", "cached": int}
#   {"t": "error", "status": int, "message": str}
Item = Dict[str, Any]


async def respond(request: web.Request, p: Parsed, rid: str, items: AsyncIterator[Item],
                  out: Outcome) -> web.StreamResponse:
    """An OpenAI completion / chat completion (JSON, or SSE when ``p.stream``)."""
    created = int(time.time())
    first = await items.__anext__()
    if first["t"] == "error":
        out.status, out.error = first["status"], first["message"]
        return error_response(first["status"], first["message"], rid)
    if not p.stream:
        parts: List[str] = []
        ev = first
        while ev["t"] == "tok":
            parts.extend(ev["texts"])
            out.tok(len(ev["texts"]))
            ev = await items.__anext__()
        if ev["t"] == "error":
            out.status, out.error = ev["status"], ev["message"]
            return error_response(ev["status"], ev["message"], rid)
        out.status, out.cached = 200, int(ev.get("cached", 0))
        body = openai.full_response(p, rid, created, "".join(parts), out.n, ev["finish"],
                                    out.cached, None)
        body.pop("kv_transfer_params", None)
        return json_response(200, body, rid)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache", "X-Request-Id": rid})
    await resp.prepare(request)
    out.status = 200

    def chunk(text: Optional[str], finish: Optional[str] = None, first: bool = False
              ) -> bytes:
        obj = openai.chunk(p, rid, created, text, finish, first)
        if p.continuous_usage:
            obj["usage"] = openai.usage(p.prompt_tokens, out.n)
        return sse_bytes(obj)

    buf: List[bytes] = []
    if p.chat:
        buf.append(chunk("", first=True))
    ev = first
    while ev["t"] == "tok":
        for text in ev["texts"]:
            out.tok(1)
            buf.append(chunk(text))
        await resp.write(b"".join(buf))
        buf = []
        ev = await items.__anext__()
    if ev["t"] == "error":
        out.status, out.error = ev["status"], ev["message"]
        buf.append(sse_bytes(openai.error_body(ev["status"], ev["message"])))
    else:
        out.cached = int(ev.get("cached", 0))
        buf.append(chunk(None if p.chat else "", ev["finish"]))
        if p.include_usage:
            buf.append(sse_bytes(openai.usage_chunk(p, rid, created, out.n, out.cached)))
    buf.append(b"data: [DONE]\n\n")
    await resp.write_eof(b"".join(buf))
    return resp


async def read_json(request: web.Request) -> Any:
    try:
        return await request.json(loads=json.loads)
    except ValueError as exc:
        raise ApiError(400, f"invalid JSON body: {exc}") from None


def parse_instance(value: str) -> Tuple[Optional[Dict[str, Any]], str]:
    """(instance info, "") or (None, why) as xllm-service 0.9's parse_from_json."""
    try:
        info = json.loads(value)
    except ValueError as exc:
        return None, f"not JSON: {exc}"
    if not isinstance(info, dict):
        return None, "not a JSON object"
    missing = [f for f in REQUIRED_FIELDS if f not in info]
    if missing:
        return None, "missing " + ", ".join(missing)
    if not isinstance(info["name"], str) or not isinstance(info["rpc_address"], str):
        return None, "name and rpc_address must be strings"
    if isinstance(info["type"], bool) or info["type"] not in TYPE_ROLES:
        return None, f"bad type {info['type']!r}"
    return info, ""


class Registry:
    """A list of metric families rendered as Prometheus text."""

    def __init__(self) -> None:
        self.families: List[_Family] = []

    def counter(self, name: str, doc: str, labels: Tuple[str, ...] = ()) -> Counter:
        c = Counter(name, doc, labels)
        self.families.append(c)
        return c

    def gauge(self, name: str, doc: str, labels: Tuple[str, ...] = ()) -> Gauge:
        g = Gauge(name, doc, labels)
        self.families.append(g)
        return g

    def histogram(self, name: str, doc: str, labels: Tuple[str, ...],
                  buckets: Tuple[float, ...]) -> Histogram:
        h = Histogram(name, doc, labels, buckets)
        self.families.append(h)
        return h

    def render(self) -> str:
        lines: List[str] = []
        for fam in self.families:
            lines.extend(fam.render())
        return "\n".join(lines) + "\n"

    def response(self) -> web.Response:
        return web.Response(body=self.render().encode(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def cancel_all(tasks: List[asyncio.Task]) -> None:
    for t in tasks:
        t.cancel()
    for t in tasks:
        try:
            await t
        except BaseException:  # cancelled, or failed in the background
            pass
