"""A stand-in for KsanaLLM's simple_router: ``python -m pd_launcher.emulator ksana-router
[--host H] [--port P] [--workers N] [--config INI]`` (the argv of simple_router's
``main.py``, same defaults: 0.0.0.0, 9080, 6 workers, no ini).

It emulates the router as pd-deploy starts it (``python -m pd_launcher.ksana_router
main.py ...``, which makes every worker apply ``--config``): the ini is read like
simple_router's ``config.py`` and ``cluster_name``, ``log_dir`` (``simple_router.log``),
``sqlite_path`` (relative: to the ini's directory) and ``heartbeat_timeout_seconds`` take
effect. Without ``--config`` the values of the ``config.ini`` shipped next to main.py
are used, relative paths taken from the current directory (``./log``,
``./sqlite/simple_router.db``).

The state lives in a sqlite file with the real router's tables, columns and value
formats (``routerdb``), so ``python -m pd_launcher.ksana_pairs`` reads either router's
database. Endpoints, bodies and status codes are simple_router's:

* ``POST /RegisterNode`` -> 201 ``{"node_id","is_online","last_heartbeat"}``; 400 for a
  cluster_name other than the router's, a coordinator_addr that is not a literal
  ``ip:port``, no devices / world_size, world_size < len(devices); 422 (FastAPI's body
  validation shape) for missing or mistyped fields, a group_role other than prefill or
  decode, an inference_addr without ``host:port``. Nodes are keyed by coordinator_addr:
  registering it again updates the row (and a prefill rank 0 doing so clears the ids of
  its pairs); a second node on the same (cluster, inference_addr, role, rank) -> 500.
* ``POST /Heartbeat`` -> the node's group readiness (sum of online ``device_num`` ==
  max ``world_size``) and, per pair with the opposite role, ``comm_group_to_address``
  (``[[rank, device, coordinator_addr], ...]``) and ``comm_group_to_id``; nodes silent
  for more than heartbeat_timeout_seconds are marked offline (only when some node of
  the cluster heartbeats, as in the real router); pairs are created here and marked
  active unless their decode group (or, seen from a prefill rank > 0, prefill group) is
  not ready. Unknown node_id -> 500 (the real code raises ValueError there).
* ``POST /RegisterCommId`` -> ``{"status":"OK","comm_id"}``; 403 unless prefill rank 0,
  400 for a comm_key without ``__``; unknown node_id -> 500 (NodeNotFoundError escapes).
* ``POST /generate``, ``/v1/{path}``, ``/v2/{path}``: a random active pair of the cluster
  whose prefill and decode rank-0 nodes are online (else 503 ``{"detail": "No available
  nodes for processing"}``); the same JSON (re-encoded compactly, as httpx does) goes to
  both nodes with ``kv-comm-group-key: <P inference_addr>__<D inference_addr>`` and
  ``kv-comm-request-id`` (crc32 of ``"<pid>:<n>"``, n counting from 110, 31 bits); no
  query string, no client header is passed on. A leg that cannot connect -> 500
  ``Internal Server Error`` (text). A prefill answer that is not chunked -> the decode's
  answer as it is (status, headers, body). A chunked one -> 200
  ``application/octet-stream``: the decode's stream (for ``/generate`` first the
  prefill's first chunk when it comes before the decode's), split on ``\\0`` and passed
  on without the empty pieces, then the trailer ``[DONE]\\0``; the prefill's connection
  is closed after its first chunk.
* ``GET /openapi.json``, ``/docs``, ``/redoc`` -> 200; ``GET /health`` -> 404 (the real
  router has none); other paths 404, other methods 405, ``{"detail": ...}``; a path that
  matches only with / without its trailing slash -> 307 to that path.

Differences from simple_router (c451219c, run with fastapi 0.165 / uvicorn 0.54):

* One process: ``--workers`` is accepted and logged, never forked. The real router runs
  N uvicorn workers sharing the sqlite file (each with its own request-id counter).
* The ini is honoured as by ``pd_launcher.ksana_router``; started directly, the real
  main.py ignores ``--config`` in its workers when --workers > 1 and never applies
  heartbeat_timeout_seconds (60 s always). An ini without ``[name_service]
  name_service_provider`` is refused (exit 2), as it fails the real router started that
  way; ``storage_mode = mysql`` and providers other than ``name_service.auto_provider``
  (Polaris) are not modelled (exit 2).
* sqlite only, through the standard library; the DDL is equivalent, not SQLAlchemy's
  text. ``updated_at`` moves on every write of a row here, only on changed values there.
  The stand-in commits before it answers; the real router commits just after its answer
  is sent (FastAPI closes the request-scoped session dependency then), so there a write
  may not be visible yet to a reader that acts the instant the answer arrives.
* Error details of unexpected database errors are shorter (the real 500 on a clashing
  registration carries SQLAlchemy's whole message). 422 bodies follow pydantic 2's
  shape for the fields' types (string, integer, list, object, bounds, the two value
  checks), not every pydantic error type.
* Fan-out uses aiohttp instead of httpx: its own User-Agent and connection pooling; like
  httpx it honours http_proxy / NO_PROXY (the guide's reason to unset them). Where the
  real router keeps the other leg running when one leg fails to connect, the stand-in
  cancels it. Chunk boundaries (where a ``\\0`` at a chunk start is dropped) are the
  network's in both, so they may differ. Hop-by-hop and length headers of a passed-on
  decode answer are not copied (the real one copies them, and uvicorn adds a second
  ``date``/``server``); the body is the same. The trailer follows the last chunk at once
  (the real loop polls every 0.1 s).
* ``/openapi.json`` is a short description of the routes and ``/docs`` / ``/redoc`` a
  static page (the real ones: FastAPI's full schema and Swagger UI / ReDoc from a CDN).
* Bodies are parsed as JSON only with an ``application/json`` (or ``+json``) content
  type, as FastAPI 0.165 does; the fastapi 0.110 of KsanaLLM's requirements.txt also
  parsed a body sent without a content type.
* Logging: its own format, no access log, a stale node logged once (the real router
  logs it on every heartbeat). Request bodies are limited to 256 MiB.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import itertools
import json
import logging
import os
import re
import signal
import sqlite3
import sys
import zlib
from datetime import datetime
from typing import Any, Dict, List, Optional, Tuple

import aiohttp
from aiohttp import web

from ..kvconfig import StartupError
from ..runtime import _runner_kwargs, bind
from ..xllm.common import cancel_all
from . import routerdb as rdb

log = logging.getLogger("pd_emu.ksana_router")

PROG = "python -m pd_launcher.emulator ksana-router"
TITLE = "Prefill-Decode Router"
DELIM = b"\0"
TRAILER = b"[DONE]\0"
NO_NODES = "No available nodes for processing"
#: decode answer headers not copied onto the passed-on answer
HOP_HEADERS = frozenset(("connection", "keep-alive", "transfer-encoding", "content-length",
                         "content-encoding", "proxy-connection", "te", "trailer", "upgrade"))
EXACT_PATHS = ("/RegisterNode", "/Heartbeat", "/RegisterCommId", "/generate",
               "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")
Errors = List[Dict[str, Any]]
OBJECT_EXPECTED = "Input should be a valid dictionary or object to extract fields from"


# -- argv ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Stand-in for KsanaLLM's "
                                "simple_router (prefill/decode router).")
    p.add_argument("--host", default="0.0.0.0", help="bind address (default: 0.0.0.0)")
    p.add_argument("--port", type=int, default=9080, help="listen port (default: 9080)")
    p.add_argument("--workers", type=int, default=6,
                   help="accepted for compatibility; the stand-in runs one process")
    p.add_argument("--config", default=None, help="simple_router config.ini; without it "
                   "the shipped config.ini's values, relative to the current directory")
    return p


# -- responses ------------------------------------------------------------------------------

def _dumps(obj: Any) -> bytes:
    """JSON as FastAPI's JSONResponse renders it."""
    return json.dumps(obj, ensure_ascii=False, allow_nan=False,
                      separators=(",", ":")).encode()


def json_response(status: int, obj: Any, headers: Optional[Dict[str, str]] = None
                  ) -> web.Response:
    resp = web.Response(status=status, body=_dumps(obj), headers=headers)
    resp.content_type = "application/json"
    return resp


def detail(status: int, text: str, headers: Optional[Dict[str, str]] = None
           ) -> web.Response:
    return json_response(status, {"detail": text}, headers)


def internal_error() -> web.Response:
    return web.Response(status=500, body=b"Internal Server Error",
                        headers={"Content-Type": "text/plain; charset=utf-8"})


class Invalid(Exception):
    """A 422 with FastAPI's body: ``{"detail": [errors]}``."""

    def __init__(self, errors: Errors) -> None:
        super().__init__(errors)
        self.errors = errors


class BadRequest(Exception):
    """A 4xx with ``{"detail": text}``."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status, self.text = status, text


# -- body validation (pydantic 2's lax mode, as far as these bodies need) --------------------

def _err(kind: str, loc: Tuple[Any, ...], msg: str, value: Any,
         ctx: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    e: Dict[str, Any] = {"type": kind, "loc": ["body", *loc], "msg": msg, "input": value}
    if ctx is not None:
        e["ctx"] = ctx
    return e


def _as_str(value: Any, loc: Tuple[Any, ...], errs: Errors) -> Optional[str]:
    if isinstance(value, str):
        return value
    errs.append(_err("string_type", loc, "Input should be a valid string", value))
    return None


def _as_int(value: Any, loc: Tuple[Any, ...], errs: Errors) -> Optional[int]:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value == value and abs(value) != float("inf"):
        if value.is_integer():
            return int(value)
        errs.append(_err("int_from_float", loc, "Input should be a valid integer, got a "
                         "number with a fractional part", value))
        return None
    if isinstance(value, str):
        if re.fullmatch(r"\s*[+-]?\d+\s*", value):
            return int(value)
        errs.append(_err("int_parsing", loc, "Input should be a valid integer, unable to "
                         "parse string as an integer", value))
        return None
    errs.append(_err("int_type", loc, "Input should be a valid integer", value))
    return None


def _bound(value: Optional[int], raw: Any, loc: Tuple[Any, ...], errs: Errors,
           gt: Optional[int] = None, ge: Optional[int] = None) -> Optional[int]:
    """A converted integer against its bounds (errors show the input as sent)."""
    if value is None:
        return None
    if gt is not None and not value > gt:
        errs.append(_err("greater_than", loc, f"Input should be greater than {gt}", raw,
                         {"gt": gt}))
        return None
    if ge is not None and not value >= ge:
        errs.append(_err("greater_than_equal", loc, f"Input should be greater than or equal "
                         f"to {ge}", raw, {"ge": ge}))
        return None
    return value


def _field(body: Dict[str, Any], name: str, kind: str, errs: Errors, required: bool,
           **bounds: int) -> Any:
    """One field: missing (required) / None (optional) / typed value / None on error."""
    if name not in body:
        if required:
            errs.append(_err("missing", (name,), "Field required", body))
        return None
    value = body[name]
    if value is None and not required:
        return None
    if kind == "str":
        return _as_str(value, (name,), errs)
    return _bound(_as_int(value, (name,), errs), value, (name,), errs, **bounds)


def _value_error(body: Dict[str, Any], name: str, text: str, errs: Errors) -> None:
    errs.append(_err("value_error", (name,), f"Value error, {text}", body[name],
                     {"error": {}}))


def _has_host_port(value: str) -> bool:
    if ":" not in value:
        return False
    host, port = value.rsplit(":", 1)
    return bool(host and port)


def _devices(body: Dict[str, Any], errs: Errors) -> Optional[List[Dict[str, Any]]]:
    value = body.get("devices")
    if value is None:
        return None
    if not isinstance(value, list):
        errs.append(_err("list_type", ("devices",), "Input should be a valid list", value))
        return None
    out = []
    for i, dev in enumerate(value):
        if not isinstance(dev, dict):
            errs.append(_err("model_attributes_type", ("devices", i), OBJECT_EXPECTED, dev))
            continue
        sub: Errors = []
        _field(dev, "device_id", "int", sub, True)
        _field(dev, "device_type", "str", sub, False)
        _field(dev, "device_ip", "str", sub, True)
        for e in sub:
            e["loc"] = ["body", "devices", i, *e["loc"][1:]]
        errs.extend(sub)
        out.append(dev)
    return out


def register_body(body: Dict[str, Any]) -> Dict[str, Any]:
    """The fields of a /RegisterNode body (RegisterNodeCompatRequest); Invalid (422)."""
    errs: Errors = []
    v: Dict[str, Any] = {}
    v["inference_addr"] = _field(body, "inference_addr", "str", errs, True)
    if v["inference_addr"] is not None and not _has_host_port(v["inference_addr"]):
        _value_error(body, "inference_addr", "inference_addr must be in 'host:port' format",
                     errs)
    v["cluster_name"] = _field(body, "cluster_name", "str", errs, False)
    v["group_role"] = _field(body, "group_role", "str", errs, True)
    if v["group_role"] is not None and v["group_role"] not in rdb.ROLES:
        _value_error(body, "group_role", "group_role must be 'prefill' or 'decode'", errs)
    v["node_rank"] = _field(body, "node_rank", "int", errs, True, ge=0)
    for name in ("hostname", "coordinator_addr"):
        v[name] = _field(body, name, "str", errs, False)
    v["world_size"] = _field(body, "world_size", "int", errs, False, gt=0)
    v["devices"] = _devices(body, errs)
    for name in ("job_id", "start_time", "comm_id", "node_id"):
        v[name] = _field(body, name, "str", errs, False)
    if errs:
        raise Invalid(errs)
    return v


def strings_body(body: Dict[str, Any], names: Tuple[str, ...]) -> Dict[str, str]:
    errs: Errors = []
    out = {name: _field(body, name, "str", errs, True) for name in names}
    if errs:
        raise Invalid(errs)
    return out


async def read_model_body(request: web.Request) -> Dict[str, Any]:
    """The JSON object of a request, the way FastAPI reads a pydantic-model body (JSON
    only with an ``application/json`` or ``+json`` content type)."""
    raw = await request.read()
    if not raw:
        raise Invalid([_err("missing", (), "Field required", None)])
    ctype = request.headers.get("Content-Type", "")
    main, _, sub = ctype.split(";", 1)[0].strip().lower().partition("/")
    if main == "application" and (sub == "json" or sub.endswith("+json")):
        try:
            body: Any = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise Invalid([_err("json_invalid", (exc.pos,), "JSON decode error", {},
                                {"error": exc.msg})]) from None
        except ValueError:
            raise BadRequest(400, "There was an error parsing the body") from None
    else:
        body = raw.decode("utf-8", "replace")
    if not isinstance(body, dict):
        raise Invalid([_err("model_attributes_type", (), OBJECT_EXPECTED, body)])
    return body


def coordinator(value: Optional[str]) -> str:
    """A literal ``ip:port`` (BadRequest 400 with simple_router's details)."""
    if not value:
        raise BadRequest(400, "coordinator_addr is required")
    if value.strip() != value:
        raise BadRequest(400, "coordinator_addr must not contain leading or trailing "
                         "whitespace")
    if "://" in value or any(c in value for c in "/?#"):
        raise BadRequest(400, "coordinator_addr must be in 'ip:port' format without "
                         "prefixes")
    if not _has_host_port(value):
        raise BadRequest(400, "coordinator_addr must be in 'host:port' format")
    host, port = value.rsplit(":", 1)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise BadRequest(400, "coordinator_addr host must be a valid IP address") from None
    try:
        number = int(port)
    except ValueError:
        raise BadRequest(400, "coordinator_addr port must be an integer") from None
    if not 1 <= number <= 65535:
        raise BadRequest(400, "coordinator_addr port must be between 1 and 65535")
    return value


# -- OpenAPI ----------------------------------------------------------------------------------

def openapi_doc() -> Dict[str, Any]:
    """A small OpenAPI 3.1 description of the routes (the liveness probe reads it)."""
    def post(summary: str, code: str = "200") -> Dict[str, Any]:
        return {"post": {"summary": summary, "responses": {code: {"description": "OK"}}}}

    return {"openapi": "3.1.0", "info": {"title": TITLE, "version": "1.0.0"}, "paths": {
        "/RegisterNode": post("Register a node (pd-deploy stand-in)", "201"),
        "/Heartbeat": post("Heartbeat of a registered node"),
        "/RegisterCommId": post("Communication id of a prefill/decode pair"),
        "/generate": post("Fan a /generate request out to a pair"),
        "/v1/{path}": post("Fan an OpenAI v1 request out to a pair"),
        "/v2/{path}": post("Fan a v2 request out to a pair"),
    }}


DOCS_HTML = (f"<!DOCTYPE html><html><head><title>{TITLE} - API docs (pd-deploy "
             "stand-in)</title></head><body><h1>" + TITLE + "</h1><p>pd-deploy's stand-in "
             "for KsanaLLM's simple_router. The OpenAPI description is at "
             "<a href=\"/openapi.json\">/openapi.json</a>.</p></body></html>")


def _routable(path: str) -> bool:
    return path in EXACT_PATHS or path.startswith(("/v1/", "/v2/"))


# -- the router --------------------------------------------------------------------------------

class Router:
    def __init__(self, args: argparse.Namespace, settings: rdb.Settings, db: rdb.RouterDB
                 ) -> None:
        self.args, self.settings, self.db = args, settings, db
        self.stop = asyncio.Event()
        self.session: Optional[aiohttp.ClientSession] = None
        self.seq = itertools.count(110)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            sock = bind(self.args.host, self.args.port, "router (--port)")
        except StartupError as exc:
            log.error("%s", exc)
            return 1
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None), trust_env=True,
            connector=aiohttp.TCPConnector(limit=0))
        runner = web.AppRunner(self.app(), access_log=None, **_runner_kwargs())
        try:
            await runner.setup()
            server = await loop.create_server(runner.server, sock=sock, backlog=1024)
            s = self.settings
            log.info("simple_router stand-in listening on http://%s:%d (cluster %s, database "
                     "%s, heartbeat timeout %ds, one process: --workers %d not forked)",
                     self.args.host, self.args.port, s.cluster_name, s.sqlite_path,
                     s.heartbeat_timeout_seconds, self.args.workers)
            await self.stop.wait()
            server.close()
            await runner.cleanup()
        finally:
            await self.session.close()
            self.db.close()
        log.info("stopped")
        return 0

    def _on_signal(self, sig: int) -> None:
        if not self.stop.is_set():
            log.info("received %s: stopping", signal.Signals(sig).name)
            self.stop.set()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=256 << 20, middlewares=[fastapi_errors])
        app.router.add_post("/RegisterNode", self.register_node)
        app.router.add_post("/Heartbeat", self.heartbeat)
        app.router.add_post("/RegisterCommId", self.register_comm_id)
        app.router.add_post("/generate", self.generate)
        app.router.add_post("/v1/{path:.*}", self.generate)
        app.router.add_post("/v2/{path:.*}", self.generate)
        app.router.add_get("/openapi.json", self.openapi)
        for path in ("/docs", "/docs/oauth2-redirect", "/redoc"):
            app.router.add_get(path, self.docs)
        return app

    async def openapi(self, request: web.Request) -> web.Response:
        return json_response(200, openapi_doc())

    async def docs(self, request: web.Request) -> web.Response:
        return web.Response(body=DOCS_HTML.encode(),
                            headers={"Content-Type": "text/html; charset=utf-8"})

    # -- node protocol ---------------------------------------------------------------------
    async def register_node(self, request: web.Request) -> web.Response:
        v = register_body(await read_model_body(request))
        s = self.settings
        cluster = v["cluster_name"] or s.cluster_name
        if cluster != s.cluster_name:
            log.warning("refused %s %s: cluster %r", v["group_role"], v["inference_addr"],
                        cluster)
            raise BadRequest(400, f"Cluster '{cluster}' is not allowed; expecting "
                             f"'{s.cluster_name}'")
        devices = v["devices"] or []
        coord = coordinator(v["coordinator_addr"])
        if v["world_size"] is None or not devices:
            raise BadRequest(400, "world_size or devices must be provided")
        if v["world_size"] < len(devices):
            raise BadRequest(400, "World size must match the number of devices")
        req = rdb.NodeRequest(v["node_id"], cluster, v["inference_addr"], coord,
                              v["group_role"], v["node_rank"], v["world_size"], len(devices))
        try:
            node_id, beat = self.db.register_node(req)
        except sqlite3.Error as exc:
            log.error("cannot register %s %s: %s", req.role, req.inference_addr, exc)
            return detail(500, f"({type(exc).__module__}.{type(exc).__name__}) {exc}")
        return json_response(201, {"node_id": node_id, "is_online": True,
                                   "last_heartbeat": rdb.iso(beat)})

    async def heartbeat(self, request: web.Request) -> web.Response:
        node_id = strings_body(await read_model_body(request), ("node_id",))["node_id"]
        out = self.db.heartbeat(node_id)
        if out is None:
            log.error("heartbeat of unknown node %s: 500 (as simple_router)", node_id)
            return internal_error()
        node = out["node"]
        return json_response(200, {
            "node_id": node["node_id"], "is_online": True, "group_ready": out["group_ready"],
            "coordinator_addr": node["coordinator_addr"], "node_role": node["role"],
            "timestamp": rdb.iso(datetime.now()),
            "comm_group_to_address": {k: [list(t) for t in v]
                                      for k, v in out["address"].items()},
            "comm_group_to_id": out["ids"]})

    async def register_comm_id(self, request: web.Request) -> web.Response:
        v = strings_body(await read_model_body(request), ("node_id", "comm_key", "comm_id"))
        node = self.db.node(v["node_id"])
        if node is None:
            log.error("RegisterCommId of unknown node %s: 500 (as simple_router)",
                      v["node_id"])
            return internal_error()
        try:
            comm_id = self.db.register_comm_id(node, v["comm_key"], v["comm_id"])
        except rdb.CommIdRefused as exc:
            log.warning("RegisterCommId from %s refused: %s", v["node_id"], exc.detail)
            raise BadRequest(exc.status, exc.detail) from None
        return json_response(200, {"status": "OK", "comm_id": comm_id})

    # -- fan-out ----------------------------------------------------------------------------
    def _request_id(self) -> int:
        rid = zlib.crc32(f"{os.getpid()}:{next(self.seq)}".encode("ascii")) & 0x7FFFFFFF
        return rid or 1

    async def generate(self, request: web.Request) -> web.StreamResponse:
        pair = self.db.pick_pair()
        if pair is None:
            log.warning("%s: no active pair with both rank-0 nodes online", request.path)
            return detail(503, NO_NODES)
        key, p_addr, d_addr = pair
        rid = self._request_id()
        body = json.loads(await request.read())
        payload = json.dumps(body, ensure_ascii=False, separators=(",", ":"),
                             allow_nan=False).encode()
        headers = {"kv-comm-group-key": key, "kv-comm-request-id": str(rid),
                   "Content-Type": "application/json", "Accept": "*/*"}
        log.info("%s -> prefill %s, decode %s (request id %d)", request.path, p_addr, d_addr,
                 rid)
        legs = [asyncio.ensure_future(self._open(f"http://{addr}{request.path}", payload,
                                                 headers)) for addr in (p_addr, d_addr)]
        try:
            p_rsp, d_rsp = await asyncio.gather(*legs)
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            for leg in legs:
                _discard(leg)
            log.error("%s: cannot reach the pair %s: %s", request.path, key,
                      exc or type(exc).__name__)
            return internal_error()
        except asyncio.CancelledError:
            for leg in legs:
                _discard(leg)
            raise
        if p_rsp.headers.get("Transfer-Encoding") != "chunked":
            return await self._whole(p_rsp, d_rsp)
        return await self._stream(request, p_rsp, d_rsp, request.path == "/generate")

    async def _open(self, url: str, payload: bytes, headers: Dict[str, str]
                    ) -> aiohttp.ClientResponse:
        assert self.session is not None
        return await self.session.post(url, data=payload, headers=headers)

    async def _whole(self, p_rsp: aiohttp.ClientResponse, d_rsp: aiohttp.ClientResponse
                     ) -> web.Response:
        """A prefill answer that is not chunked: drop it, pass the decode's on."""
        p_rsp.close()
        try:
            content = await d_rsp.read()
        finally:
            d_rsp.release()
        out = web.Response(status=d_rsp.status, body=content)
        for name, value in d_rsp.headers.items():
            if name.lower() not in HOP_HEADERS:
                out.headers.add(name, value)
        return out

    async def _stream(self, request: web.Request, p_rsp: aiohttp.ClientResponse,
                      d_rsp: aiohttp.ClientResponse, merge_prefill: bool
                      ) -> web.StreamResponse:
        out = web.StreamResponse(status=200,
                                 headers={"Content-Type": "application/octet-stream"})
        queue: asyncio.Queue = asyncio.Queue()
        decoding = asyncio.Event()
        if not merge_prefill:
            decoding.set()  # /v1, /v2: only the decode's stream
        tasks = [asyncio.ensure_future(_drain(p_rsp, queue, decoding, True)),
                 asyncio.ensure_future(_drain(d_rsp, queue, decoding, False))]
        try:
            await out.prepare(request)
            running = len(tasks)
            while running:
                piece = await queue.get()
                if piece is None:
                    running -= 1
                    continue
                await out.write(piece)
            await out.write(TRAILER)
            await out.write_eof()
        except ConnectionResetError as exc:
            log.info("client went away mid-stream: %s", exc or type(exc).__name__)
        finally:
            await cancel_all(tasks)
            p_rsp.close()
            d_rsp.close()
        return out


async def _drain(rsp: aiohttp.ClientResponse, queue: asyncio.Queue, decoding: asyncio.Event,
                 first_only: bool) -> None:
    """Queue the ``\\0``-separated pieces of one leg's stream (the prefill: its first
    piece only, and only while the decode has not started); None when done."""
    try:
        async for chunk in rsp.content.iter_any():
            if first_only and decoding.is_set():
                return
            parts = chunk.split(DELIM)
            for i, part in enumerate(parts):
                if not part:
                    continue
                await queue.put(part + (DELIM if i < len(parts) - 1 else b""))
                if first_only:
                    return
                decoding.set()
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
        log.warning("upstream %s failed mid-stream: %s", rsp.url, exc or type(exc).__name__)
    finally:
        if rsp.content.at_eof():
            rsp.release()
        else:
            rsp.close()
        queue.put_nowait(None)


def _discard(leg: asyncio.Future) -> None:
    if not leg.done():
        leg.cancel()
    elif not leg.cancelled() and leg.exception() is None:
        leg.result().close()


@web.middleware
async def fastapi_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """FastAPI's answers: ``{"detail": ...}`` for 404/405/4xx, 422 for bad bodies, a plain
    500 for anything unexpected, 307 for a path that matches with the other slash."""
    try:
        return await handler(request)
    except Invalid as exc:
        return json_response(422, {"detail": exc.errors})
    except BadRequest as exc:
        return detail(exc.status, exc.text)
    except web.HTTPMethodNotAllowed as exc:
        return detail(405, "Method Not Allowed",
                      {"Allow": ", ".join(sorted(exc.allowed_methods))})
    except web.HTTPNotFound:
        path = request.path
        other = path[:-1] if path.endswith("/") else path + "/"
        if path != "/" and _routable(other):
            url = request.url.with_path(other)
            return web.Response(status=307, headers={"Location": str(url)})
        return detail(404, "Not Found")
    except web.HTTPException:
        raise
    except Exception:  # what FastAPI answers for an unhandled exception
        log.exception("%s %s failed", request.method, request.path)
        return internal_error()


# -- entry point ----------------------------------------------------------------------------------

def start_logging(settings: rdb.Settings) -> str:
    """stderr and ``<log_dir>/simple_router.log``; returns the file's path."""
    level = getattr(logging, settings.log_level, logging.INFO)
    if not isinstance(level, int):
        level = logging.INFO
    fmt = logging.Formatter("%(asctime)s %(levelname)s [ksana-router] %(message)s")
    path = settings.log_file
    os.makedirs(os.path.dirname(path), exist_ok=True)
    root = logging.getLogger()
    root.setLevel(level)
    for handler in (logging.StreamHandler(sys.stderr), logging.FileHandler(path)):
        handler.setFormatter(fmt)
        root.addHandler(handler)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return path


def _settings(args: argparse.Namespace) -> rdb.Settings:
    if args.config is None:
        return rdb.builtin_settings()
    return rdb.load_settings(args.config)


def main(argv: List[str]) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad flag (2), message already printed
        return int(exc.code or 0)
    try:
        settings = _settings(args)
    except rdb.SettingsError as exc:
        sys.stderr.write(f"{PROG}: error: --config: {exc}\n")
        return 2
    try:
        path = start_logging(settings)
    except OSError as exc:
        sys.stderr.write(f"{PROG}: error: cannot write the log in {settings.log_dir!r}: "
                         f"{exc.strerror or exc}\n")
        return 1
    log.info("logging to %s; settings from %s", path,
             settings.ini_path or "the built-in defaults (no --config)")
    try:
        db = rdb.RouterDB(settings.sqlite_path, settings.cluster_name,
                          settings.heartbeat_timeout_seconds)
    except (OSError, sqlite3.Error) as exc:
        log.error("cannot open the database %s: %s", settings.sqlite_path, exc)
        return 1
    try:
        return asyncio.run(Router(args, settings, db).run())
    except KeyboardInterrupt:
        return 130
