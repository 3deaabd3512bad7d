"""The KsanaLLM node personality (`python -m pd_launcher.emulator ksana`): real processes on
loopback (127.0.31.x) against a small in-test fake of simple_router that records
RegisterNode / Heartbeat / RegisterCommId and hands out comm_group_to_address / ids; the
test plays the router's fan-out (the same request to P and D with kv-comm-group-key and
kv-comm-request-id) and checks that the KV bytes moved and D answered."""
from __future__ import annotations

import asyncio
import base64
import json
import re
import signal
import socket
import statistics
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
import yaml
from aiohttp import web

from pd_launcher.emulator import textgen
from pd_launcher.emulator.ksana import nodeconfig
from pd_launcher.emulator.ksana.nodeconfig import ConfigError
from tests.emulator.helpers import EmuProc, free_port, request

R_HOST, P_HOST, D_HOST = "127.0.31.1", "127.0.31.2", "127.0.31.3"
MODEL_NAME = "demo-llm"
PROMPT = "Disaggregated serving moves the KV cache from prefill to decode."
MSGS = [{"role": "user", "content": "Explain KV cache transfer."}]
MANDATORY = {"SELECT_ALL_REDUCE_BY_SIZE": "1",
             "PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync", "ENABLE_LAYER_TRACKER": "1"}
INTERVAL_MS = 200
GROUP_KEY, REQUEST_ID = "kv-comm-group-key", "kv-comm-request-id"


# --------------------------------------------------------------------------- fake router


class FakeRouter:
    """simple_router's three node endpoints, in memory, in a thread of the test process."""

    def __init__(self, host: str, store_ids: bool = True, port: Optional[int] = None) -> None:
        self.host, self.port = host, port or free_port(host)
        self.store_ids = store_ids  # False: every RegisterCommId is answered, none kept
        self.saw_empty_id: set = set()  # node ids that were handed an empty comm id
        self.registers: List[Dict[str, Any]] = []
        self.heartbeats: List[Tuple[str, float]] = []
        self.comm_calls: List[Dict[str, Any]] = []
        self.nodes: Dict[str, Dict[str, Any]] = {}  # coordinator_addr -> node
        self.ids: Dict[str, str] = {}
        self.lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.started.wait(10)

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_post("/RegisterNode", self._register)
        app.router.add_post("/Heartbeat", self._heartbeat)
        app.router.add_post("/RegisterCommId", self._comm_id)
        self.runner = web.AppRunner(app, access_log=None)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.TCPSite(self.runner, self.host, self.port).start())
        self.started.set()
        self.loop.run_forever()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    def forget(self) -> None:
        """As if the router's database had been removed."""
        with self.lock:
            self.nodes.clear()
            self.ids.clear()

    def by_id(self, node_id: str) -> Optional[Dict[str, Any]]:
        return next((n for n in self.nodes.values() if n["node_id"] == node_id), None)

    def node_ids(self, **match: Any) -> List[str]:
        with self.lock:
            return [n["node_id"] for n in self.nodes.values()
                    if all(n[k] == v for k, v in match.items())]

    async def _register(self, request: web.Request) -> web.Response:
        body = await request.json()
        with self.lock:
            self.registers.append(body)
            if body.get("group_role") not in ("prefill", "decode"):
                return web.json_response({"detail": [{"msg": "group_role must be 'prefill' "
                                                      "or 'decode'"}]}, status=422)
            old = self.nodes.get(body["coordinator_addr"])
            node = dict(body, node_id=old["node_id"] if old else uuid.uuid4().hex)
            self.nodes[body["coordinator_addr"]] = node
        return web.json_response({"node_id": node["node_id"], "is_online": True,
                                  "last_heartbeat": "2026-01-01T00:00:00"}, status=201)

    def _entries(self, key: str) -> List[List[Any]]:
        p_addr, d_addr = key.split("__", 1)
        out = []
        for role, addr in (("prefill", p_addr), ("decode", d_addr)):
            rows = sorted((n for n in self.nodes.values()
                           if n["group_role"] == role and n["inference_addr"] == addr),
                          key=lambda n: n["node_rank"])
            for n in rows:
                out += [[n["node_rank"], d["device_id"], n["coordinator_addr"]]
                        for d in n["devices"]]
        return out

    async def _heartbeat(self, request: web.Request) -> web.Response:
        body = await request.json()
        with self.lock:
            self.heartbeats.append((body.get("node_id"), time.monotonic()))
            node = self.by_id(body.get("node_id"))
            if node is None:  # simple_router raises ValueError here: a 500
                return web.Response(status=500, text="Internal Server Error")
            other = "decode" if node["group_role"] == "prefill" else "prefill"
            peers = {n["inference_addr"] for n in self.nodes.values()
                     if n["group_role"] == other}
            keys = [f"{node['inference_addr']}__{p}" if other == "decode"
                    else f"{p}__{node['inference_addr']}" for p in peers]
            ids = {k: self.ids.get(k, "") for k in keys}
            if "" in ids.values():
                self.saw_empty_id.add(node["node_id"])
            addrs = {k: self._entries(k) if ids[k] else [] for k in keys}
        return web.json_response({
            "node_id": node["node_id"], "is_online": True, "group_ready": True,
            "coordinator_addr": node["coordinator_addr"], "node_role": node["group_role"],
            "timestamp": "2026-01-01T00:00:00", "comm_group_to_address": addrs,
            "comm_group_to_id": ids})

    async def _comm_id(self, request: web.Request) -> web.Response:
        body = await request.json()
        with self.lock:
            self.comm_calls.append(body)
            node = self.by_id(body.get("node_id"))
            if node is None:
                return web.Response(status=500, text="Internal Server Error")
            if node["group_role"] != "prefill" or node["node_rank"] != 0:
                return web.json_response({"detail": "Only prefill rank-0 nodes may register "
                                          "comm ids"}, status=403)
            if self.store_ids:
                self.ids[body["comm_key"]] = body["comm_id"]
        return web.json_response({"status": "OK", "comm_id": body["comm_id"]})


# --------------------------------------------------------------------------- nodes


class KsanaProc(EmuProc):
    base_env = dict(MANDATORY, PD_EMU_ZERO_LATENCY="1", CUDA_VISIBLE_DEVICES="0,1")
    drop_env = ("WORLD_SIZE", "NODE_RANK", "MASTER_HOST", "MASTER_PORT", "KLLM_LOG_FILE",
                "DECODE_NODE_BENCHMARK", "http_proxy", "https_proxy", "HTTP_PROXY",
                "HTTPS_PROXY")

    def __init__(self, name: str, host: str, port: int, config: Path, logdir: Path,
                 env: Optional[Dict[str, Optional[str]]] = None,
                 extra: Tuple[str, ...] = ()) -> None:
        argv = ["--config_file", str(config), "--port", str(port), "--host", host,
                *extra]
        env = dict(env or {})
        unset = tuple(k for k, v in env.items() if v is None)  # None: not in the environment
        if unset:
            self.base_env = {k: v for k, v in self.base_env.items() if k not in unset}
            self.drop_env = self.drop_env + unset
        super().__init__(name, "ksana", argv, logdir,
                         {k: v for k, v in env.items() if v is not None})
        self.host, self.port = host, port
        self.infer = f"{host}:{port}"
        self.coord = ""

    def health(self) -> Tuple[int, Any]:
        status, _, data = request(self.host, self.port, "GET", "/health", timeout=2)
        return status, json.loads(data)

    def wait_healthy(self, timeout: float = 15.0) -> KsanaProc:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.health()[0] == 200:
                    return self
            except OSError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{self.name} not healthy (exit {self.proc.poll()}):\n{self.log()}")


def write_config(path: Path, model_dir: Path, role: Optional[str], router: str = "",
                 infer: str = "", coord: str = "", tp: int = 2, **connector: Any) -> Path:
    conn: Dict[str, Any] = {}
    if role is not None:
        conn = {"router_addr": router, "inference_addr": infer, "coordinator_addr": coord,
                "heartbeat_interval_ms": INTERVAL_MS, "connector_waiting_sec": 1800,
                "communication_type": "nccl", "group_role": role, "transfer_batch": 1048576}
    conn.update(connector)
    cfg = {"setting": {"global": {"tensor_para_size": tp, "pipeline_para_size": 1},
                       "batch_scheduler": {"max_token_len": 65536, "max_batch_size": 256},
                       "endpoint_type": "python"},
           "model_spec": {"base_model": {"model_dir": str(model_dir)}}}
    if conn:
        cfg["setting"]["connector"] = conn
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ksana")
    (d / MODEL_NAME).mkdir()
    (d / MODEL_NAME / "config.json").write_text('{"model_type": "llama"}')
    return d


class Started:
    """Processes and routers of a test, stopped at teardown (SIGTERM, then SIGKILL)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: List[EmuProc] = []
        self.routers: List[FakeRouter] = []

    def router(self, host: str, store_ids: bool = True,
               port: Optional[int] = None) -> FakeRouter:
        r = FakeRouter(host, store_ids, port)
        self.routers.append(r)
        return r

    def node(self, name: str, host: str, role: Optional[str], router: str,
             env: Optional[Dict[str, Optional[str]]] = None, port: Optional[int] = None,
             coord_host: Optional[str] = None, **connector: Any) -> KsanaProc:
        port = port or free_port(host)
        coord_host = coord_host or host
        coord = f"{coord_host}:{free_port(host)}"
        infer = connector.pop("infer", f"{host}:{port}")
        cfg = write_config(self.workdir / f"{name}.yaml", self.workdir / MODEL_NAME, role,
                           router, infer, coord, **connector)
        p = KsanaProc(name, host, port, cfg, self.workdir, env)
        p.infer, p.coord = infer, coord
        self.procs.append(p)
        return p

    def stop(self) -> None:
        for p in self.procs:
            p.signal(signal.SIGTERM)
        for p in self.procs:
            p.stop()
        for r in self.routers:
            r.close()


@pytest.fixture(scope="module")
def pair(workdir):
    """A fake router, a prefill (tp 2) and a decode (tp 2), linked."""
    s = Started(workdir)
    r = s.router(R_HOST)
    env = {"PD_EMU_KV_TIMEOUT_S": "2"}
    dead_proxy = {"http_proxy": "http://127.0.31.99:9", "HTTP_PROXY": "http://127.0.31.99:9"}
    p = s.node("prefill", P_HOST, "prefill", r.addr,
               dict(env, CUDA_VISIBLE_DEVICES="0,1", **dead_proxy))
    d = s.node("decode", D_HOST, "decode", r.addr, dict(env, CUDA_VISIBLE_DEVICES="4,5"))
    key = f"{p.infer}__{d.infer}"
    for node in (p, d):
        node.wait_healthy()
        node.wait_log(rf"NCCL communication group {re.escape(key)} initialized")
    yield {"r": r, "p": p, "d": d, "key": key}
    s.stop()


@pytest.fixture
def started(workdir):
    s = Started(workdir)
    yield s
    s.stop()


def wait_for(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def expected(chat: bool, n: int) -> Tuple[str, int]:
    """(text, prompt tokens) the emulator generates for PROMPT / MSGS."""
    prompt = textgen.render_chat(MSGS) if chat else PROMPT
    key = textgen.prompt_key("text", prompt)
    return textgen.text(MODEL_NAME, key, n), textgen.count_tokens(prompt)


def sse_events(data: bytes) -> List[str]:
    return [part[6:].decode() for part in data.split(b"\n\n") if part.startswith(b"data: ")]


def fan_out(p: KsanaProc, d: KsanaProc, path: str, body: Any, rid: str,
            key: Optional[str] = None) -> Dict[str, Tuple[int, Dict[str, str], bytes]]:
    """What simple_router does: the same request to P and D at once, with the headers."""
    headers = {GROUP_KEY: key or f"{p.infer}__{d.infer}", REQUEST_ID: rid}
    out: Dict[str, Any] = {}

    def call(name: str, node: KsanaProc) -> None:
        out[name] = request(node.host, node.port, "POST", path, body, headers, timeout=20)

    threads = [threading.Thread(target=call, args=(n, x)) for n, x in (("p", p), ("d", d))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(25)
    return out


# --------------------------------------------------------------------------- the pair


def test_registration_bodies(pair):
    r, p, d = pair["r"], pair["p"], pair["d"]
    bodies = {b["group_role"]: b for b in r.registers}
    assert set(bodies) == {"prefill", "decode"}
    for node, role in ((p, "prefill"), (d, "decode")):
        b = bodies[role]
        assert list(b) == ["inference_addr", "coordinator_addr", "cluster_name", "group_role",
                           "node_rank", "world_size", "devices", "start_time", "job_id"]
        assert b["inference_addr"] == node.infer and b["coordinator_addr"] == node.coord
        assert b["cluster_name"] == "" and b["node_rank"] == 0 and b["world_size"] == 2
        assert [x["device_id"] for x in b["devices"]] == [0, 1]
        assert all(set(x) == {"device_id", "device_type", "device_ip"} and x["device_ip"]
                   for x in b["devices"])
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", b["start_time"])
        assert re.fullmatch(r"\d{16}_\d{6}", b["job_id"])
        node.wait_log("Node successfully registered with ID: ")
    assert p.health() == (200, {"status": "healthy"})
    # router calls never go through http_proxy (the prefill has a dead one set)
    assert "http_proxy, HTTP_PROXY set: KsanaLLM's libcurl would send router calls" in p.log()


def test_heartbeats_every_interval(pair):
    r = pair["r"]
    (pid,) = r.node_ids(group_role="prefill")
    time.sleep(1.2)
    with r.lock:
        times = [t for n, t in r.heartbeats if n == pid]
    gaps = [b - a for a, b in zip(times[-6:], times[-5:])]
    assert len(gaps) == 5 and 0.15 < statistics.median(gaps) < 0.4, gaps


def test_only_prefill_rank0_registers_the_comm_id(pair):
    r, p, d, key = pair["r"], pair["p"], pair["d"], pair["key"]
    (pid,) = r.node_ids(group_role="prefill")
    assert r.comm_calls and {c["node_id"] for c in r.comm_calls} == {pid}
    assert {c["comm_key"] for c in r.comm_calls} == {key}
    assert len(base64.b64decode(r.ids[key])) == 128
    for node in (p, d):
        node.wait_log(rf"ZeroMQ communication group {re.escape(key)} initialized")
        assert node.log().count(f"NCCL communication group {key} initialized") == 1


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("chat", [False, True])
def test_fan_out_moves_the_kv_and_the_decode_answers(pair, chat, stream):
    p, d = pair["p"], pair["d"]
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body: Dict[str, Any] = {"max_tokens": 7, "stream": stream}
    body.update({"messages": MSGS} if chat else {"prompt": PROMPT})
    rid = str(1000 + 2 * chat + stream)
    out = fan_out(p, d, path, body, rid)
    text, ptoks = expected(chat, 7)
    (ps, ph, pb), (ds, _, db) = out["p"], out["d"]
    assert ps == 200 and ds == 200, out
    if stream:
        assert ph.get("transfer-encoding") == "chunked"  # the router streams then
        events = sse_events(db)
        assert events[-1] == "[DONE]" and db.endswith(b"data: [DONE]\n\n")
        chunks = [json.loads(e) for e in events[:-1]]
        got = "".join(c["choices"][0].get("text") or c["choices"][0].get("delta", {})
                      .get("content") or "" for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert len(sse_events(pb)) >= 2  # one token, then [DONE]
    else:
        assert "content-length" in ph and "transfer-encoding" not in ph
        res = json.loads(db)
        choice = res["choices"][0]
        got = choice["message"]["content"] if chat else choice["text"]
        assert res["model"] == MODEL_NAME
        assert res["usage"]["prompt_tokens_details"] == {"cached_tokens": ptoks}
        assert json.loads(pb)["usage"]["completion_tokens"] == 1  # the prefill: one token
    assert got == text
    nbytes = ptoks * 512
    d.wait_log(rf"request {rid}: received KV of {ptoks} prompt tokens \({nbytes} bytes\) from "
               rf"the prefill coordinator {re.escape(p.coord)}")
    p.wait_log(rf"request {rid}: prefilled {ptoks} prompt tokens; sent their KV \(\d+ blocks, "
               rf"{nbytes} bytes\) to the decode coordinator {re.escape(d.coord)}")


def test_generate_fan_out_streams_ksana_chunks(pair):
    p, d = pair["p"], pair["d"]
    body = {"prompt": PROMPT, "sampling_config": {"max_new_tokens": 5}}  # stream: default
    out = fan_out(p, d, "/generate", body, "2001")
    (ps, _, pb), (ds, _, db) = out["p"], out["d"]
    assert ps == 200 and ds == 200
    chunks = [json.loads(c) for c in db.split(b"\0") if c]
    assert len(chunks) == 5 and chunks[-1]["texts"] == [expected(False, 5)[0]]
    assert len(chunks[-1]["output_token_ids"][0]) == 5
    assert len(chunks[-1]["input_token_ids"]) == expected(False, 5)[1]
    (first,) = [json.loads(c) for c in pb.split(b"\0") if c]  # the prefill: one token
    assert first["texts"] == [expected(False, 1)[0]]


def test_decode_without_kv_times_out_with_an_openai_error(pair):
    d = pair["d"]
    headers = {GROUP_KEY: pair["key"], REQUEST_ID: "3001"}
    t0 = time.monotonic()
    status, _, data = request(d.host, d.port, "POST", "/v1/completions",
                              {"prompt": PROMPT, "max_tokens": 3}, headers)
    err = json.loads(data)["error"]
    assert status == 500 and err["code"] == 500 and "did not arrive" in err["message"]
    assert 1.5 < time.monotonic() - t0 < 6


def test_requests_without_headers_and_with_a_foreign_key(pair):
    p, d = pair["p"], pair["d"]
    body = {"prompt": PROMPT, "max_tokens": 4}
    status, _, data = request(p.host, p.port, "POST", "/v1/completions", body)
    assert status == 200 and json.loads(data)["usage"]["completion_tokens"] == 1
    p.wait_log("a prefill node answers one token and sends no KV")
    status, _, data = request(d.host, d.port, "POST", "/v1/completions", body)
    res = json.loads(data)
    assert status == 200 and res["choices"][0]["text"] == expected(False, 4)[0]
    assert res["usage"]["prompt_tokens_details"] is None
    out = fan_out(p, d, "/v1/completions", body, "4001", key=f"127.0.31.9:1__{d.infer}")
    assert out["p"][0] == 400 and "does not name this prefill" in out["p"][2].decode()
    assert out["d"][0] == 500  # D waits for KV that P never sends


def test_the_models_and_health(pair):
    p = pair["p"]
    for path in ("/v1/models", "/models"):
        status, _, data = request(p.host, p.port, "GET", path)
        assert status == 200 and json.loads(data)["data"][0]["id"] == MODEL_NAME
    status, _, data = request(p.host, p.port, "POST", "/v1/completions",
                              {"prompt": "x", "model": "other"})
    assert status == 404 and json.loads(data)["error"]["code"] == 404


def test_a_forgotten_node_registers_again(pair):
    r, p, d, key = pair["r"], pair["p"], pair["d"], pair["key"]
    before = len(r.registers)
    r.forget()
    wait_for(lambda: len(r.node_ids()) == 2, 5, "both nodes registered again")
    assert len(r.registers) >= before + 2
    for node in (p, d):
        node.wait_log("the router no longer knows node .* registering again")
    # the prefill registers a fresh id for the pair, both sides see it, requests work again
    for node in (p, d):
        wait_for(lambda n=node: n.log().count(f"NCCL communication group {key} "
                                              "initialized") == 2, 5, "a new comm id")
    out = fan_out(p, d, "/v1/completions", {"prompt": PROMPT, "max_tokens": 3}, "5001")
    assert out["d"][0] == 200 and json.loads(out["d"][2])["choices"][0]["text"] == \
        expected(False, 3)[0]


def test_through_the_router_stand_in(started, workdir):
    """The same nodes behind the ksana-router stand-in (simple_router's endpoints)."""
    host = "127.0.31.50"
    rport = free_port(host)
    ini = workdir / "router.ini"
    ini.write_text(f"[general]\nlog_dir = {workdir}/rlog\ncluster_name = default_cluster\n"
                   "[name_service]\nname_service_provider = name_service.auto_provider\n"
                   f"[database]\nstorage_mode = sqlite\nsqlite_path = {workdir}/router.db\n")
    router = EmuProc("router", "ksana-router", ["--host", host, "--port", str(rport),
                                                 "--workers", "1", "--config", str(ini)],
                     workdir)
    started.procs.append(router)
    p = started.node("sp", "127.0.31.51", "prefill", f"{host}:{rport}")
    d = started.node("sd", "127.0.31.52", "decode", f"{host}:{rport}")
    key = f"{p.infer}__{d.infer}"
    for node in (p, d):
        node.wait_healthy()
        node.wait_log(rf"NCCL communication group {re.escape(key)} initialized")
    body = {"prompt": PROMPT, "max_tokens": 5}

    def answered() -> Optional[bytes]:
        status, _, data = request(host, rport, "POST", "/v1/completions", body)
        return data if status == 200 else None

    res = json.loads(wait_for(answered, 10, "an active pair at the router"))
    assert res["choices"][0]["text"] == expected(False, 5)[0]
    assert res["usage"]["prompt_tokens_details"]["cached_tokens"] == expected(False, 5)[1]
    status, _, data = request(host, rport, "POST", "/v1/chat/completions",
                              {"messages": MSGS, "max_tokens": 4, "stream": True})
    assert status == 200 and data.endswith(b"data: [DONE]\n\n[DONE]\0"), data[-60:]
    chunks = [json.loads(e) for e in sse_events(data.rsplit(b"[DONE]\0", 1)[0])[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == \
        expected(True, 4)[0]
    d.wait_log(r"request \d+: received KV of \d+ prompt tokens")


# --------------------------------------------------------------------------- start-up


def test_health_only_after_load_and_sigterm_exits_0(started):
    node = started.node("slow", "127.0.31.20", None, "",
                        env={"PD_EMU_STARTUP_S": "1.5"})
    node.wait_log("loading the model")
    with pytest.raises(OSError):  # the HTTP port listens only once the model is loaded
        socket.create_connection((node.host, node.port), timeout=1).close()
    node.wait_healthy()
    assert node.health() == (200, {"status": "healthy"})
    assert "Uvicorn running on http://127.0.31.20" in node.log()
    node.signal(signal.SIGTERM)
    assert node.wait_exit() == 0


def test_refusals_at_start_up(started):
    r = started.router("127.0.31.30")
    missing = started.node("noenv", "127.0.31.31", "prefill", r.addr,
                           env={"SELECT_ALL_REDUCE_BY_SIZE": None, "ENABLE_LAYER_TRACKER": "0"})
    foreign = started.node("foreign", "127.0.31.32", "decode", r.addr, coord_host="192.0.2.7")
    assert missing.wait_exit() == 1
    assert "SELECT_ALL_REDUCE_BY_SIZE is not set; ENABLE_LAYER_TRACKER='0': KsanaLLM's PD " \
        "guide makes" in missing.log()
    assert foreign.wait_exit() == 1
    assert "coordinator_addr 192.0.2.7:" in foreign.log()
    assert "is not an address of this host" in foreign.log()
    assert r.registers == []
    # group_role both goes out as "none" (GroupRoleToString), which the router refuses:
    # the node logs the router's reason, keeps trying and serves locally meanwhile
    both = started.node("both", "127.0.31.33", "both", r.addr)
    both.wait_log(r"refused the registration: HTTP 422 .*group_role must be")
    assert [b["group_role"] for b in r.registers][:1] == ["none"]
    status, _, data = request(both.host, both.port, "POST", "/v1/completions",
                              {"prompt": PROMPT, "max_tokens": 2},
                              {GROUP_KEY: "a:1__b:2", REQUEST_ID: "1"})
    assert status == 200 and json.loads(data)["choices"][0]["text"] == expected(False, 2)[0]


def test_a_router_started_after_the_nodes(started):
    """The emulator retries until the router answers; with PD_EMU_KSANA_REGISTER_ONCE=1 it
    tries once, as KsanaLLM does, and then serves unregistered."""
    host = "127.0.31.60"
    addr = f"{host}:{free_port(host)}"
    retry = started.node("retry", "127.0.31.61", "prefill", addr)
    once = started.node("once", "127.0.31.62", "decode", addr,
                        env={"PD_EMU_KSANA_REGISTER_ONCE": "1"})
    retry.wait_log("RegisterNode: cannot reach the router")
    once.wait_log("is not tried again: this node sends no heartbeats")
    once.wait_healthy()  # it serves all the same
    r = started.router(host, port=int(addr.rsplit(":", 1)[1]))
    wait_for(lambda: r.node_ids(group_role="prefill"), 5, "the retrying node registered")
    time.sleep(3 * INTERVAL_MS / 1000)
    assert [b["group_role"] for b in r.registers] == ["prefill"]
    assert len(r.heartbeats) >= 2 and not r.node_ids(group_role="decode")


def test_multi_node_rank_1_registers_but_serves_no_http(started):
    # the router keeps no comm id, so every heartbeat shows both prefill ranks an empty one
    r = started.router("127.0.31.40", store_ids=False)
    # a decode group the router knows about, so the prefill ranks see a pair
    r.nodes["127.0.31.49:1"] = {"node_id": "d0", "group_role": "decode", "node_rank": 0,
                                "inference_addr": "127.0.31.49:6890",
                                "coordinator_addr": "127.0.31.49:1",
                                "devices": [{"device_id": 0}, {"device_id": 1}]}
    master_port = free_port("127.0.31.41")
    port = free_port("127.0.31.41")
    env = {"WORLD_SIZE": "2", "MASTER_HOST": "127.0.31.41", "MASTER_PORT": str(master_port),
           "CUDA_VISIBLE_DEVICES": "0"}
    infer = f"127.0.31.41:{port}"
    rank0 = started.node("rank0", "127.0.31.41", "prefill", r.addr, dict(env, NODE_RANK="0"),
                         port=port, tp=1)
    rank0.wait_log(r"waiting for node rank\(s\) 1 of the pipeline group")
    with pytest.raises(OSError):  # rank 0 serves only once the whole group is there
        socket.create_connection((rank0.host, port), timeout=1).close()
    rank1 = started.node("rank1", "127.0.31.42", "prefill", r.addr, dict(env, NODE_RANK="1"),
                         port=port, tp=1, infer=infer)
    rank0.wait_healthy()
    rank1.wait_log("Uvicorn running on NONE.")
    rank0.wait_log("node rank 1 joined from 127.0.31.42")
    wait_for(lambda: len(r.node_ids(group_role="prefill")) == 2, 5, "both ranks registered")
    bodies = {b["node_rank"]: b for b in r.registers}
    assert bodies[0]["coordinator_addr"] == rank0.coord
    assert bodies[1]["coordinator_addr"] == rank1.coord
    for b in bodies.values():
        assert b["inference_addr"] == infer and b["world_size"] == 2
        assert b["group_role"] == "prefill" and len(b["devices"]) == 1
    with pytest.raises(OSError):
        socket.create_connection(("127.0.31.42", port), timeout=1).close()
    # an empty id makes rank 0 register one, every heartbeat; rank 1 never does
    (rank0_id,) = r.node_ids(node_rank=0, group_role="prefill")
    (rank1_id,) = r.node_ids(node_rank=1, group_role="prefill")
    wait_for(lambda: len(r.comm_calls) >= 3 and rank1_id in r.saw_empty_id, 5,
             "repeated RegisterCommId calls")
    assert {c["node_id"] for c in r.comm_calls} == {rank0_id}
    rank0.signal(signal.SIGTERM)
    assert rank0.wait_exit() == 0 and rank1.wait_exit() == 0
    assert "rank 0 (127.0.31.41:" in rank1.log() and "stopped; this node stops too" in \
        rank1.log()


# --------------------------------------------------------------------------- config


def _cfg(tmp_path: Path, model_dir: Optional[Path], **setting: Any) -> Path:
    data: Dict[str, Any] = {"setting": {"batch_scheduler": {"max_token_len": 4096}}}
    data["setting"].update(setting)
    if model_dir is not None:
        data["model_spec"] = {"base_model": {"model_dir": str(model_dir)}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


PD_CONN = {"group_role": "Decode", "router_addr": "127.0.0.1:9080",
           "inference_addr": "127.0.0.1:6890", "coordinator_addr": "127.0.0.1:13571"}


@pytest.mark.parametrize("case, env, message", [
    ("missing-file", {}, "does not exist"),
    ("not-yaml", {}, "must be in YAML format"),
    ("no-model", {}, "model_spec.base_model is missing"),
    ("no-devices", {"CUDA_VISIBLE_DEVICES": None}, "CUDA_VISIBLE_DEVICES is not set"),
    ("tp-too-big", {"CUDA_VISIBLE_DEVICES": "0"}, "2 tensor_parallel_size should not bigger "
                                                  "than devices num: 1"),
    ("no-master", {"WORLD_SIZE": "2"}, "MASTER_HOST and MASTER_PORT must be set"),
    ("bad-interval", {}, "setting.connector.heartbeat_interval_ms must be an integer"),
    ("no-coordinator", {}, "setting.connector.coordinator_addr is empty"),
    ("hostname-coordinator", {}, "must be a literal IP address"),
])
def test_config_errors_name_the_field(tmp_path, workdir, case, env, message):
    model = workdir / MODEL_NAME
    conn = dict(PD_CONN)
    path = _cfg(tmp_path, model, connector=conn, **{"global": {"tensor_para_size": 2}})
    if case == "missing-file":
        path = tmp_path / "nope.yaml"
    elif case == "not-yaml":
        path = path.rename(tmp_path / "c.yml")
    elif case == "no-model":
        path = _cfg(tmp_path, None)
    elif case == "bad-interval":
        path = _cfg(tmp_path, model, connector=dict(conn, heartbeat_interval_ms="2s"))
    elif case == "no-coordinator":
        path = _cfg(tmp_path, model, connector=dict(conn, coordinator_addr=""))
    elif case == "hostname-coordinator":
        path = _cfg(tmp_path, model, connector=dict(conn, coordinator_addr="node1:13571"))
    full = dict(MANDATORY, CUDA_VISIBLE_DEVICES="0,1")
    full.update(env)
    full = {k: v for k, v in full.items() if v is not None}
    with pytest.raises(ConfigError) as exc:
        nodeconfig.load(["--config_file", str(path)], full)
    assert message in str(exc.value) and exc.value.code == 1


def test_a_missing_model_dir_is_only_reported(tmp_path):
    path = _cfg(tmp_path, tmp_path / "missing", connector=dict(PD_CONN))
    cfg = nodeconfig.load(["--config_file", str(path)],
                          dict(MANDATORY, CUDA_VISIBLE_DEVICES="0"))
    assert cfg.model_name == "missing"
    assert any("is not a directory" in w for w in cfg.warnings), cfg.warnings


def test_config_defaults_and_the_connector_parse(tmp_path, workdir):
    conn = dict(PD_CONN, router_addr="10.0.0.1:9080")
    path = _cfg(tmp_path, workdir / MODEL_NAME, connector=conn)
    cfg = nodeconfig.load(["--config_file", str(path), "--unknown", "x"],
                          dict(MANDATORY, CUDA_VISIBLE_DEVICES="0,1,2"))
    c = cfg.connector
    assert (cfg.host, cfg.port, cfg.tp, cfg.world_size, cfg.node_rank) == \
        ("localhost", 8080, 3, 1, 0)
    assert cfg.flags.unknown == ["--unknown", "x"] and cfg.model_name == MODEL_NAME
    assert (c.role, c.router_addr, c.heartbeat_interval_ms, c.communication_type,
            c.connector_waiting_sec) == ("decode", "http://10.0.0.1:9080", 5000, "tcp", 1800)
    assert cfg.connector_world_size == 3
    assert any("communication_type tcp" in w for w in cfg.warnings)
    # an unknown role is NONE (no PD), so the mandatory variables are not needed
    path = _cfg(tmp_path, workdir / MODEL_NAME, connector=dict(conn, group_role="mixed"))
    cfg = nodeconfig.load(["--config_file", str(path)], {"CUDA_VISIBLE_DEVICES": "0"})
    assert cfg.connector.role == "none" and not cfg.connector.pd
    with pytest.raises(SystemExit) as exc:  # a bad value of a known flag: argparse, exit 2
        nodeconfig.load(["--config_file", str(path), "--port", "eighty"], {})
    assert exc.value.code == 2
