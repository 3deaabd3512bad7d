"""The KsanaLLM node personality: ``python -m pd_launcher.emulator ksana [flags]``, a
stand-in for ``python src/ksana_llm/python/serving_server.py`` (KsanaLLM c451219c).

Start-up, in the real engine's order:

1. argv as ``ksana_llm/arg_utils.py`` parses it (argparse ``parse_known_args``: unknown
   flags are printed as ``Unknown arguments: [...]``, never refused; a bad value of a
   known flag exits 2): ``--config_file`` (default ``examples/ksana_llm.yaml``),
   ``--port`` (8080), ``--host`` (``localhost``), ``--endpoint``, ``--ssl_keyfile``,
   ``--ssl_certfile``, and the accepted-but-unused ``--tokenizer_path``, ``--access_log``,
   ``--root_path``, ``--tool-call-parser``, ``--reasoning-parser``,
   ``--enable-auto-tool-choice``, ``--tool-parser-plugin``, ``--chat-template``,
   ``--chat-template-content-format``.
2. The YAML (nodeconfig.py): it must exist and end in ``.yaml``; ``setting``,
   ``setting.batch_scheduler`` (``max_token_len``, default 2048, is the context limit)
   and ``model_spec.base_model.model_dir`` (never opened: a missing directory is only
   reported, as in every personality; its last component is the model's name in
   /v1/models and the accepted ``model``) are required;
   ``setting.global.tensor_para_size`` (0: every device) and ``attn_data_para_size`` are
   checked as schedule_config_parser.cpp does; ``setting.connector`` with its parser's
   defaults (group_role prefill|decode|both, case-insensitive, anything else none;
   heartbeat_interval_ms 5000; connector_waiting_sec 1800; communication_type nccl |
   zmq | anything else tcp; ``http://`` prepended to router_addr).
3. The environment: ``CUDA_VISIBLE_DEVICES`` (the device count; it must be >=
   tensor_para_size), ``WORLD_SIZE`` / ``NODE_RANK`` / ``MASTER_HOST`` / ``MASTER_PORT``
   (the last two required when WORLD_SIZE > 1) and, on a prefill/decode/both node, the
   guide's ``SELECT_ALL_REDUCE_BY_SIZE=1``, ``PYTORCH_CUDA_ALLOC_CONF=backend:
   cudaMallocAsync``, ``ENABLE_LAYER_TRACKER=1``. ``DECODE_NODE_BENCHMARK=1`` forces the
   decode role without a router. ``KLLM_LOG_FILE`` adds a log file. ``PD_EMU_*`` as in the
   other personalities (latency, KV size and timing, faults);
   ``PD_EMU_KSANA_REGISTER_ONCE=1`` makes registration as unforgiving as KsanaLLM's.
4. Bind: the HTTP port (not listening yet), ``coordinator_addr`` (a TCP listener where
   the real engine binds ZMQ: it must be an address of this host) and, on rank 0 of a
   multi-node group, MASTER_HOST:MASTER_PORT.
5. "Load the model" (PD_EMU_STARTUP_S + PD_EMU_SLOW_START_S). Rank 0 of a multi-node
   group then waits until ranks 1..WORLD_SIZE-1 have joined; a rank > 0 joins rank 0
   (retrying every second).
6. Register with simple_router and heartbeat (noderouter.py), every rank with its own
   node_rank and coordinator_addr. The registration body::

       {"inference_addr", "coordinator_addr", "cluster_name",
        "group_role": "prefill" | "decode" ("none" for both),
        "node_rank": NODE_RANK, "world_size": WORLD_SIZE x tensor_para_size,
        "devices": [{"device_id": 0..tp-1, "device_type": "pd-emu GPU",
                     "device_ip": <this host's IP>}, ...],
        "start_time": "YYYY-mm-dd HH:MM:SS", "job_id": "<unix us>_<6 digits>"}

7. Rank 0 with ``endpoint_type`` python listens on --host:--port (logging ``Uvicorn
   running on http://host:port``); a rank > 0 logs ``Uvicorn running on NONE.`` and
   blocks. Endpoints: ``GET /health`` -> ``{"status": "healthy"}``; ``POST
   /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models`` (and KsanaLLM's
   own ``/models``, ``/models/{id}``), ``POST /generate``; ``/forward`` and
   ``/v1/embeddings`` answer 501.

Requests (the router's fan-out sends the same JSON to P and D with ``kv-comm-group-key:
<P inference_addr>__<D inference_addr>`` and ``kv-comm-request-id: <int>``):

* prefill: prefill time, builds the prompt's KV (kvstore's bytes), waits until the pair
  is linked (the heartbeat's comm_group_to_address holds 2 x world_size entries and,
  with nccl, an id; at most min(connector_waiting_sec, PD_EMU_KV_TIMEOUT_S)), pushes the
  KV to the decode rank 0's coordinator_addr (kvlink.py), then answers ONE token
  (KsanaLLM forces max_new_tokens=1 on a prefill): a chunked SSE stream for a stream
  request, a JSON body with content-length otherwise (the router decides by the
  prefill's transfer-encoding).
* decode: waits for the KV tagged with that request id (PD_EMU_KV_TIMEOUT_S, else a
  500 OpenAI error), verifies it against its own copy of the prompt, then generates
  every token: SSE ``data: {...}\\n\\n`` ... ``data: [DONE]\\n\\n`` or JSON, with
  ``usage.prompt_tokens_details.cached_tokens`` = the prompt tokens received.
* ``/generate`` takes KsanaLLM's body (``prompt`` or ``input_tokens``,
  ``sampling_config.max_new_tokens``, ``stream``, default true) and answers
  ``{"texts", "output_token_ids", "logprobs", "input_token_ids"}``, streamed as such
  objects each followed by ``\\0``, with the text so far.
* Without the two headers: a prefill answers one token and sends no KV (KsanaLLM:
  nothing to send to); a decode generates the whole answer itself (KsanaLLM would decode
  over a KV cache nobody filled, i.e. garbage); a node without PD role serves normally.
  A header pair naming another node's inference_addr is a 400.

SIGTERM/SIGINT: stop listening, give in-flight requests PD_EMU_SHUTDOWN_GRACE_S, tell the
other ranks, exit 0. Exit 2: a bad flag value or PD_EMU_* value; exit 1: every start-up
refusal (config, environment, a port that cannot be bound, a lost pipeline rank).

Differences from the real engine:

* No model, tokenizer, GPU, NCCL, ZMQ or pipeline parallelism. Tokens and text are the
  emulator's deterministic ones (README "Deterministic text"); there is no EOS, so
  generation runs to max_tokens (or ``sampling_config.max_new_tokens``; default
  PD_EMU_DEFAULT_MAX_TOKENS where KsanaLLM runs to EOS / max_token_len); chat uses the
  emulator's fixed template; tool calls, reasoning parsers, chat templates, logprobs,
  beams and ``n`` > 1 are not modelled; /generate's token ids are synthetic (input ids
  from the prompt's hash, output ids = vocabulary indices).
* KV moves over plain TCP as one PUSH of the whole prompt from prefill rank 0 to decode
  rank 0 after the prefill (KsanaLLM: layer by layer over NCCL, or ZMQ/TCP, between
  every device pair, with control messages over ZMQ). The comm id is 128 random bytes,
  not a real ncclUniqueId, and is only checked for size; the ``NCCL communication group
  <key> initialized`` line is logged when the id is known (KsanaLLM logs it when
  ncclCommInitRank returns, i.e. when both sides have joined). A rank > 0 binds its
  coordinator but never receives KV.
* Registration is retried every heartbeat interval until the router answers with a
  node_id, also after a 4xx. KsanaLLM tries ONCE, while its batch scheduler is built
  (TransferEngine::Initialize, call_once): when that fails the status is ignored, no
  heartbeat thread starts, and the node serves (/health 200) but is never registered or
  paired, so the real router must be up before the nodes. PD_EMU_KSANA_REGISTER_ONCE=1
  restores that behaviour (and the next point's). A 4xx answer leaves the node
  serving, unregistered, with the router's reason logged (KsanaLLM takes any JSON answer
  as success and heartbeats an empty node_id).
* A heartbeat answered 404/500 (simple_router's answer for an unknown node_id, e.g.
  after its database was removed) makes the node register again; KsanaLLM's
  HTTPRouterClient does not re-register and keeps heartbeating a dead node_id.
* Router calls ignore http_proxy/https_proxy (KsanaLLM's libcurl honours them, which is
  why the guide says to unset them); a warning is logged when they are set.
* Strictness: the three mandatory variables must be set to the guide's values on a PD
  node (KsanaLLM starts without them and misbehaves later); CUDA_VISIBLE_DEVICES must
  be set (KsanaLLM would use every visible GPU); coordinator_addr must be a literal IP
  of this host (KsanaLLM's ZMQ bind fails, the failure is ignored and the node runs,
  registered, without a KV link: the guide's decode example, whose coordinator_addr is
  the prefill's IP, does exactly that); an empty router_addr, inference_addr or
  coordinator_addr on a PD node and NODE_RANK >= WORLD_SIZE are refused.
* Only warnings: --port differing from inference_addr's port; a model_dir that is no
  directory or has no config.json (the real engine would fail to load it);
  communication_type zmq/tcp (no id is registered, so simple_router never hands out
  the pair's addresses and it never links, as in the real system); group_role both
  (registered as "none", which simple_router refuses: it serves locally).
* The HTTP port is bound before the load and listens after it (uvicorn binds after
  the load: a port clash is reported earlier here). Registration happens after the load,
  just before HTTP starts listening. Rank 0 waits for every rank before it registers.
* A lost pipeline rank makes rank 0 exit 1; a rank > 0 exits 1 when rank 0 goes away,
  0 when rank 0 stopped as planned (KsanaLLM: NCCL errors or a hang).
* ``--ssl_certfile`` / ``--ssl_keyfile`` serve TLS; ``--root_path``, ``--access_log`` (the
  access log is always on), ``--tokenizer_path`` and the OpenAI adapter flags are
  accepted and ignored; ``/forward`` and ``/v1/embeddings`` are 501; errors of the
  OpenAI endpoints use the emulator's OpenAI shape, /generate errors are 500
  ``{"detail": message}``.
* Faults: PD_EMU_ERROR_RATE, PD_EMU_HANG and PD_EMU_EXIT_AFTER apply to /v1/* and
  /generate; PD_EMU_KV_CORRUPT_RATE flips a byte of a prefill's push (the decode
  reports it). There is no /metrics and no /admin/faults.
"""
from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import logging
import os
import signal
import socket
import ssl
import sys
import time
import uuid
from typing import Any, AsyncIterator, Dict, List, Optional, Tuple

import aiohttp
from aiohttp import web

from .. import kvnet, openai, textgen
from ..endpoints import OpenAIEndpoints
from ..fastdeploy.common import Job
from ..kvconfig import StartupError
from ..kvstore import KVError, build
from ..openai import ApiError
from ..runtime import _runner_kwargs, bind
from ..settings import Faults, Latency, SettingsError, _flag, from_environ
from ..xllm.common import (
    Item,
    Outcome,
    error_response,
    json_response,
    read_json,
    respond,
    setup_logging,
)
from . import kvlink, nodeconfig
from .kvlink import Coordinator, Inbox
from .nodeconfig import PROG, ConfigError, NodeConfig
from .nodegroup import GroupMaster, GroupWorker
from .noderouter import Links, RouterClient

log = logging.getLogger("pd_emu.ksana")
access_log = logging.getLogger("pd_emu.ksana.access")

#: 1: register like KsanaLLM's client (one attempt, never again); see noderouter.py
REGISTER_ONCE = "PD_EMU_KSANA_REGISTER_ONCE"
GROUP_KEY = "kv-comm-group-key"
REQUEST_ID = "kv-comm-request-id"
_VOCAB_ID = {w: i for i, w in enumerate(textgen.VOCAB)}

#: (kv-comm-group-key, kv-comm-request-id) of a routed request
PD = Tuple[str, str]


def _detail(status: int, message: str) -> web.Response:
    """An error of /generate: FastAPI's HTTPException body."""
    return json_response(status, {"detail": message})


class Node(OpenAIEndpoints):
    def __init__(self, cfg: NodeConfig, lat: Latency, faults: Faults,
                 register_once: bool = False) -> None:
        self.cfg, self.lat, self.faults = cfg, lat, faults
        self.register_once = register_once
        self.conn = cfg.connector
        self.stop = asyncio.Event()
        self.exit_code = 0
        self.stopping = False
        self.loaded = False
        self.running = 0
        self.answered = 0
        self._init_inflight()
        self.tasks: List[asyncio.Task] = []
        self.inbox = Inbox(lat.kv_lease_s)
        self.links = Links()
        self.coordinator: Optional[Coordinator] = None
        self.master: Optional[GroupMaster] = None
        self.worker: Optional[GroupWorker] = None
        self.router: Optional[RouterClient] = None
        self.session: Optional[aiohttp.ClientSession] = None
        self.runner: Optional[web.AppRunner] = None
        self.http_server: Optional[asyncio.AbstractServer] = None

    # -- lifecycle ----------------------------------------------------------------------
    def fail(self, code: int, message: str) -> None:
        log.error("%s", message)
        if not self.stop.is_set():
            self.exit_code = code
            self.stop.set()

    def _on_signal(self, sig: int) -> None:
        if not self.stop.is_set():
            log.info("received %s: stopping", signal.Signals(sig).name)
            self.stop.set()

    def _group_end(self, code: int, message: str) -> None:
        if self.stopping:
            return
        if code:
            self.fail(code, message)
        else:
            log.info("%s", message)
            self.stop.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            tls = _tls(self.cfg)
            socks = self._bind_all()
        except (StartupError, ConfigError) as exc:
            log.error("%s", exc)
            return 1
        self._describe()
        self.session = aiohttp.ClientSession(trust_env=False)
        try:
            await self._start_listeners(socks)
            self.tasks.append(asyncio.ensure_future(self._startup(socks.get("http"), tls)))
            await self.stop.wait()
            await self._shutdown()
        finally:
            await self.session.close()
            for s in socks.values():
                s.close()
        log.info("stopped (exit %d)", self.exit_code)
        return self.exit_code

    def _bind_all(self) -> Dict[str, socket.socket]:
        c = self.cfg
        socks: Dict[str, socket.socket] = {}
        try:
            if c.serves_http:
                socks["http"] = bind(c.host, c.port, "HTTP (--host/--port)", listen=False)
            if self.conn.pd:
                socks["coordinator"] = _bind_coordinator(self.conn.coordinator_addr)
            if c.world_size > 1 and c.node_rank == 0:
                socks["master"] = _bind_master(c.master_host, c.master_port)
        except (StartupError, ConfigError):
            for s in socks.values():
                s.close()
            raise
        return socks

    async def _start_listeners(self, socks: Dict[str, socket.socket]) -> None:
        if "coordinator" in socks:
            self.coordinator = Coordinator(self.inbox, self.lat.kv_timeout_s)
            await self.coordinator.start(socks["coordinator"])
        if "master" in socks:
            self.master = GroupMaster(self.cfg.world_size, lambda m: self.fail(1, m))
            await self.master.start(socks["master"])

    def _describe(self) -> None:
        c, n = self.cfg, self.conn
        log.info("KsanaLLM emulator: model %s (%s, model_type %s), %s node, tensor_para_size "
                 "%d, devices %s, node rank %d of %d, endpoint %s, max_token_len %d",
                 c.model_name, c.model_dir, c.model_type or "-", n.role, c.tp,
                 ",".join(c.devices), c.node_rank, c.world_size, c.endpoint, c.max_token_len)
        if n.pd:
            log.info("connector: router %s, inference_addr %s, coordinator_addr %s (bound; the "
                     "emulator's KV link over TCP stands in for communication_type %s), "
                     "cluster_name %r, heartbeat every %d ms", n.router_addr or "-",
                     n.inference_addr, n.coordinator_addr, n.communication_type,
                     n.cluster_name, n.heartbeat_interval_ms)
        if c.world_size > 1:
            log.info("pipeline group: WORLD_SIZE=%d NODE_RANK=%d MASTER=%s:%d", c.world_size,
                     c.node_rank, c.master_host, c.master_port)
        for w in c.warnings:
            log.warning("%s", w)

    async def _startup(self, http_sock: Optional[socket.socket],
                       tls: Optional[ssl.SSLContext]) -> None:
        delay = self.lat.startup_s + self.faults.slow_start_s
        if delay > 0:
            log.info("loading the model (start-up delay %gs)", delay)
            await asyncio.sleep(delay)
        if self.master is not None:
            await self.master.wait_complete()
        elif self.cfg.node_rank > 0:
            self.worker = GroupWorker(self.cfg.master_host, self.cfg.master_port,
                                      self.cfg.node_rank, self.cfg.world_size,
                                      self.cfg.host, self._group_end)
            self.tasks.append(asyncio.ensure_future(self.worker.run()))
            await self.worker.joined.wait()
        self.loaded = True
        log.info("model loaded")
        if self.conn.registers:
            assert self.session is not None
            self.router = RouterClient(self.cfg, self.links, self.session,
                                       self.register_once)
            self.tasks.append(asyncio.ensure_future(self.router.run()))
        if http_sock is not None:
            await self._serve_http(http_sock, tls)
        elif self.cfg.node_rank > 0:
            log.info("Uvicorn running on NONE.")
        else:
            log.info("endpoint %s: no HTTP server (RPC endpoint plugins are not modelled)",
                     self.cfg.endpoint)

    async def _serve_http(self, sock: socket.socket, tls: Optional[ssl.SSLContext]) -> None:
        self.runner = web.AppRunner(self._app(), access_log=access_log,
                                    access_log_format='%a - "%r" %s', **_runner_kwargs())
        await self.runner.setup()
        self.http_server = await asyncio.get_running_loop().create_server(
            self.runner.server, sock=sock, backlog=1024, ssl=tls)
        scheme = "https" if tls else "http"
        log.info("Uvicorn running on %s://%s:%d (/health answers from now on)", scheme,
                 self.cfg.host, self.cfg.port)

    async def _shutdown(self) -> None:
        self.stopping = True
        if self.http_server is not None:
            self.http_server.close()
        if self.inflight:
            log.info("waiting for %d in-flight requests", self.inflight)
            try:
                await asyncio.wait_for(self.idle.wait(), self.lat.shutdown_grace_s)
            except asyncio.TimeoutError:
                log.warning("grace period over: aborting %d requests", self.inflight)
        if self.master is not None:
            self.master.close()
        if self.worker is not None:
            self.worker.leave()
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            try:
                await t
            except BaseException:  # cancelled, or failed in the background
                pass
        if self.runner is not None:
            await self.runner.cleanup()
        if self.coordinator is not None:
            self.coordinator.close()

    # -- HTTP -----------------------------------------------------------------------------
    def _app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_get("/health", self._health)
        app.router.add_post("/generate", self._generate_native)
        app.router.add_post("/forward", self._not_modelled)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/embeddings", self._not_modelled)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/models", self._models)
        app.router.add_get("/models/{model_id}", self._model)
        return app

    async def _health(self, request: web.Request) -> web.Response:
        return json_response(200, {"status": "healthy"})

    async def _not_modelled(self, request: web.Request) -> web.Response:
        return _detail(501, f"{request.path} is not modelled by the emulator")

    def _model_object(self) -> Dict[str, Any]:
        name = self.cfg.model_name
        return {"id": name, "object": "model", "created": int(time.time()),
                "owned_by": "ksana-llm", "root": name, "parent": None}

    async def _models(self, request: web.Request) -> web.Response:
        return json_response(200, {"object": "list", "data": [self._model_object()]})

    async def _model(self, request: web.Request) -> web.Response:
        if request.match_info["model_id"] != self.cfg.model_name:
            return error_response(404, f"The model '{request.match_info['model_id']}' does "
                                  "not exist")
        return json_response(200, self._model_object())

    def _pd_headers(self, request: web.Request) -> Optional[PD]:
        """(group key, request id) of a routed request on a prefill/decode node."""
        key = request.headers.get(GROUP_KEY)
        rid = request.headers.get(REQUEST_ID)
        if not self.conn.pd or self.conn.role == "both" or (key is None and rid is None):
            return None
        if not key or not rid:
            raise ApiError(400, f"a routed request needs both {GROUP_KEY} and {REQUEST_ID}")
        try:
            int(rid)
        except ValueError:
            raise ApiError(400, f"{REQUEST_ID} {rid!r} is not an integer") from None
        p_addr, sep, d_addr = key.partition("__")
        own = p_addr if self.conn.role == "prefill" else d_addr
        if not sep or own != self.conn.inference_addr:
            raise ApiError(400, f"{GROUP_KEY} {key!r} does not name this {self.conn.role} "
                           f"node ({self.conn.inference_addr}) as '<prefill>__<decode>'")
        return key, rid

    def _faults_before(self) -> None:
        if self.faults.roll(self.faults.error_rate):
            raise ApiError(500, "injected fault: internal error (error_rate)")

    def _count_answer(self) -> None:
        self.answered += 1
        limit = self.faults.exit_after
        if limit and self.answered >= limit:
            log.error("fault: exiting after %d requests (exit_after)", self.answered)
            asyncio.get_running_loop().call_later(0.05, os._exit, 1)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        self._enter()
        try:
            try:
                resp = await self._openai(request, chat)
            except ApiError as exc:
                if exc.status >= 500:
                    log.warning("request failed (%d): %s", exc.status, exc.message)
                resp = error_response(exc.status, exc.message)
        finally:
            self._leave()
        self._count_answer()
        return resp

    async def _openai(self, request: web.Request, chat: bool) -> web.StreamResponse:
        body = await read_json(request)
        if self.faults.hang:
            await asyncio.Event().wait()
        self._faults_before()
        p = openai.parse(body, chat, [self.cfg.model_name], self.cfg.max_token_len,
                         self.lat.default_max_tokens)
        pd = self._pd_headers(request)
        rid = pd[1] if pd else uuid.uuid4().hex
        job = Job(rid, p.model, p.key, p.prompt_tokens, p.max_tokens)
        items = self._items(job, pd)
        out = Outcome()
        try:
            resp = await respond(request, p, rid, items, out)
        finally:
            await items.aclose()
        if out.status >= 500:
            log.warning("request %s failed (%d): %s", rid, out.status, out.error)
        return resp

    # -- /generate (KsanaLLM's own API) -----------------------------------------------------
    async def _generate_native(self, request: web.Request) -> web.StreamResponse:
        self._enter()
        try:
            try:
                resp = await self._native(request)
            except ApiError as exc:
                if exc.status >= 500:
                    log.warning("/generate failed (%d): %s", exc.status, exc.message)
                resp = _detail(exc.status, exc.message)
        finally:
            self._leave()
        self._count_answer()
        return resp

    def _native_job(self, body: Any) -> Tuple[Job, List[int], bool]:
        """(job, input token ids, stream) of a /generate body."""
        if not isinstance(body, dict):
            raise ApiError(500, "the request body must be a JSON object")
        tokens = body.get("input_tokens")
        prompt = body.get("prompt")
        if tokens:
            if not isinstance(tokens, list) or not all(
                    isinstance(t, int) and not isinstance(t, bool) for t in tokens):
                raise ApiError(500, "input_tokens must be a list of token ids")
            key, ids = textgen.prompt_key("ids", tokens), list(tokens)
        elif isinstance(prompt, str) and prompt:
            key = textgen.prompt_key("text", prompt)
            n = textgen.count_tokens(prompt)
            ids = list(hashlib.shake_256(f"ids\0{key}".encode()).digest(n))
        elif body.get("messages"):
            raise ApiError(500, "messages input requires a plugin or use "
                           "'/v1/chat/completions' API")
        else:
            raise ApiError(500, "the request needs prompt or input_tokens")
        limit = self.cfg.max_token_len - len(ids)
        if limit < 1:
            raise ApiError(500, f"the input ({len(ids)} tokens) leaves no room under "
                           f"max_token_len {self.cfg.max_token_len}")
        sampling = body.get("sampling_config") or {}
        if not isinstance(sampling, dict):
            raise ApiError(500, "sampling_config must be an object")
        want = sampling.get("max_new_tokens", -1)
        if isinstance(want, bool) or not isinstance(want, int):
            raise ApiError(500, "sampling_config.max_new_tokens must be an integer")
        max_new = self.lat.default_max_tokens if want < 1 else want
        stream = body.get("stream", True)
        job = Job(uuid.uuid4().hex, self.cfg.model_name, key, len(ids), min(max_new, limit))
        return job, ids, bool(stream)

    async def _native(self, request: web.Request) -> web.StreamResponse:
        try:
            body = json.loads(await request.read())
        except ValueError as exc:
            raise ApiError(500, f"invalid JSON body: {exc}") from None
        if self.faults.hang:
            await asyncio.Event().wait()
        self._faults_before()
        job, ids, stream = self._native_job(body)
        pd = self._pd_headers(request)
        if pd:
            job.rid = pd[1]
        items = self._items(job, pd)
        try:
            if stream:
                return await self._native_stream(request, job, ids, items)
            return await self._native_json(job, ids, items)
        finally:
            await items.aclose()

    @staticmethod
    def _native_body(texts: List[str], ids: List[int]) -> Dict[str, Any]:
        out_ids = [_VOCAB_ID[t[1:]] for t in texts]
        return {"texts": ["".join(texts)], "output_token_ids": [out_ids], "logprobs": [],
                "input_token_ids": ids}

    async def _native_json(self, job: Job, ids: List[int],
                           items: AsyncIterator[Item]) -> web.Response:
        texts: List[str] = []
        async for ev in items:
            if ev["t"] == "tok":
                texts.extend(ev["texts"])
            elif ev["t"] == "error":
                return _detail(ev["status"], ev["message"])
        return json_response(200, self._native_body(texts, ids))

    async def _native_stream(self, request: web.Request, job: Job, ids: List[int],
                             items: AsyncIterator[Item]) -> web.StreamResponse:
        first = await items.__anext__()
        if first["t"] == "error":
            return _detail(first["status"], first["message"])
        resp = web.StreamResponse()
        await resp.prepare(request)
        texts: List[str] = []
        ev = first
        while True:
            if ev["t"] == "tok":
                chunks = []
                for text in ev["texts"]:
                    texts.append(text)
                    chunks.append(json.dumps(self._native_body(texts, ids)).encode() + b"\0")
                await resp.write(b"".join(chunks))
            elif ev["t"] == "error":
                await resp.write(json.dumps({"detail": ev["message"]}).encode() + b"\0")
                break
            else:
                break
            ev = await items.__anext__()
        await resp.write_eof()
        return resp

    # -- the engine -------------------------------------------------------------------------
    def _items(self, job: Job, pd: Optional[PD]) -> AsyncIterator[Item]:
        role = self.conn.role
        if pd is not None and role == "prefill":
            return self._prefill_items(job, pd[0])
        if pd is not None and role == "decode":
            return self._decode_items(job, pd[0])
        if role == "prefill":
            log.warning("request %s has no %s/%s: a prefill node answers one token and sends "
                        "no KV", job.rid, GROUP_KEY, REQUEST_ID)
            return self._prefill_only_items(job)
        if role == "decode" and not self.conn.benchmark:
            log.warning("request %s has no %s/%s: generated here (KsanaLLM would decode over a "
                        "KV cache nobody filled)", job.rid, GROUP_KEY, REQUEST_ID)
        return self._local_items(job)

    async def _prefill_delay(self, job: Job) -> None:
        delay = self.lat.prefill_s(job.prompt_tokens, self.running)
        if delay > 0:
            await asyncio.sleep(delay)

    async def _tokens(self, job: Job, cached: int) -> AsyncIterator[Item]:
        toks = textgen.tokens(job.model, job.key, 0, job.max_tokens)
        if self.lat.itl(self.running) <= 0:
            yield {"t": "tok", "texts": toks}
        else:
            for i, tok in enumerate(toks):
                if i:
                    await asyncio.sleep(self.lat.itl(self.running))
                yield {"t": "tok", "texts": [tok]}
        yield {"t": "end", "finish": "length", "cached": cached}

    async def _local_items(self, job: Job) -> AsyncIterator[Item]:
        self.running += 1
        try:
            await self._prefill_delay(job)
            async for item in self._tokens(job, 0):
                yield item
        finally:
            self.running -= 1

    async def _prefill_only_items(self, job: Job) -> AsyncIterator[Item]:
        self.running += 1
        try:
            await self._prefill_delay(job)
        finally:
            self.running -= 1
        yield {"t": "tok", "texts": textgen.tokens(job.model, job.key, 0, 1)}
        yield {"t": "end", "finish": "length", "cached": 0}

    async def _prefill_items(self, job: Job, key: str) -> AsyncIterator[Item]:
        """P: prefill, push the prompt's KV to the pair's decode, answer one token."""
        self.running += 1
        try:
            await self._prefill_delay(job)
            error = await self._send_kv(job, key)
        finally:
            self.running -= 1
        if error:
            yield {"t": "error", "status": 500, "message": error}
            return
        yield {"t": "tok", "texts": textgen.tokens(job.model, job.key, 0, 1)}
        yield {"t": "end", "finish": "length", "cached": 0}

    async def _send_kv(self, job: Job, key: str) -> str:
        """Push the KV of ``job`` to the decode of pair ``key``; "" or the error."""
        n, lat = self.conn, self.lat
        blocks, tokens = build(job.model, job.key, job.prompt_tokens, lat.kv_block_tokens,
                               lat.kv_bytes_per_token)
        wait_s = min(float(n.connector_waiting_sec), lat.kv_timeout_s)
        try:
            addr = await self.links.wait_peer(key, n.coordinator_addr,
                                              self.cfg.connector_world_size,
                                              n.communication_type == "nccl", wait_s)
        except LookupError as exc:
            return (f"no KV link to the decode of {GROUP_KEY} {key} after {wait_s:g}s: "
                    f"{exc}")
        corrupt = self.faults.roll(self.faults.kv_corrupt_rate)
        try:
            nbytes = await kvlink.push(addr, job.rid, key, n.coordinator_addr, blocks, tokens,
                                       lat.kv_timeout_s, lat.transfer_s, corrupt)
        except KVError as exc:
            return f"KV transfer to the decode coordinator {addr} failed ({exc.cause}): {exc}"
        log.info("request %s: prefilled %d prompt tokens; sent their KV (%d blocks, %d bytes%s) "
                 "to the decode coordinator %s (%s %s)", job.rid, job.prompt_tokens,
                 len(blocks), nbytes, ", one byte flipped by PD_EMU_KV_CORRUPT_RATE"
                 if corrupt else "", addr, GROUP_KEY, key)
        return ""

    async def _decode_items(self, job: Job, key: str) -> AsyncIterator[Item]:
        """D: wait for the KV pushed under this request id, verify it, generate."""
        self.running += 1
        try:
            try:
                got = await self.inbox.take(job.rid, self.lat.kv_timeout_s)
            except KVError as exc:
                yield {"t": "error", "status": 500, "message": f"KV transfer failed "
                       f"({exc.cause}): {exc} ({GROUP_KEY} {key})"}
                return
            problem = kvnet._verify(got.header, got.payload, got.crc_ok, job.model, job.key,
                                    job.prompt_tokens)
            if problem is not None:
                yield {"t": "error", "status": 500, "message": f"KV of request {job.rid} from "
                       f"{got.sender} failed verification ({problem.cause}): {problem}"}
                return
            log.info("request %s: received KV of %d prompt tokens (%d bytes) from the prefill "
                     "coordinator %s (%s %s)", job.rid, got.prompt_tokens, len(got.payload),
                     got.sender, GROUP_KEY, got.comm_key)
            async for item in self._tokens(job, job.prompt_tokens):
                yield item
        finally:
            self.running -= 1


# --------------------------------------------------------------------------- helpers


def _bind_coordinator(addr: str) -> socket.socket:
    """The coordinator listener; a clear refusal when ``addr`` is not on this host."""
    host, _, port = addr.rpartition(":")
    host = host.strip("[]")
    probe = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        probe.bind((host, 0))
    except OSError as exc:
        if exc.errno == errno.EADDRNOTAVAIL:
            raise ConfigError(
                f"setting.connector.coordinator_addr {addr} is not an address of this host: "
                "KsanaLLM binds its ZMQ socket there, so it must be this node's own IP (the "
                "guide's decode example wrongly points it at the prefill's IP)") from None
        raise ConfigError(f"setting.connector.coordinator_addr {addr}: {exc}") from None
    finally:
        probe.close()
    return bind(host, int(port), "coordinator (setting.connector.coordinator_addr)")


def _bind_master(host: str, port: int) -> socket.socket:
    try:
        return bind(host, port, "MASTER_HOST:MASTER_PORT")
    except StartupError as exc:
        raise StartupError(f"{exc} (rank 0 of a pipeline group listens there: MASTER_HOST "
                           "must be this host's address)") from None


def _tls(cfg: NodeConfig) -> Optional[ssl.SSLContext]:
    f = cfg.flags
    if not f.ssl_certfile:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(f.ssl_certfile, f.ssl_keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"--ssl_certfile {f.ssl_certfile} / --ssl_keyfile {f.ssl_keyfile}: "
                          f"{exc}") from None
    return ctx


def _start_logging(cfg: NodeConfig) -> None:
    n = cfg.connector
    where = n.inference_addr if n.pd else f"{cfg.host}:{cfg.port}"
    setup_logging(f"ksana {n.role} {where} rank {cfg.node_rank}")
    logging.getLogger("pd_emu.ksana.access").setLevel(logging.INFO)
    path = os.environ.get("KLLM_LOG_FILE", "").strip()
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.getLogger().handlers[0].formatter)
        logging.getLogger().addHandler(handler)


def main(argv: List[str]) -> int:
    try:
        flags = nodeconfig.parse_flags(argv)
    except SystemExit as exc:  # argparse: --help (0) or a bad value (2)
        return exc.code if isinstance(exc.code, int) else 2
    print(f"Arguments: {flags}", flush=True)
    if flags.unknown:
        print(f"Unknown arguments: {flags.unknown}", flush=True)
    try:
        cfg = nodeconfig.build(flags)
        lat, faults = from_environ()
        register_once = _flag(os.environ, REGISTER_ONCE)
    except ConfigError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return exc.code
    except SettingsError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 2
    _start_logging(cfg)
    try:
        return asyncio.run(Node(cfg, lat, faults, register_once).run())
    except KeyboardInterrupt:
        return 130
