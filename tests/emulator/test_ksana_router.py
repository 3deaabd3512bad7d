"""The simple_router stand-in (``python -m pd_launcher.emulator ksana-router``) as a real
process on 127.0.30.x: registration and its 400/422s, heartbeats, pair creation and
activation, comm ids (403 for a decode), the sqlite file in the real router's formats,
fan-out to two fake aiohttp nodes (same body, both headers, the ``[DONE]\\0`` trailer,
/generate merging the prefill's first chunk), a dead decode (500), a silent node going
offline after heartbeat_timeout_seconds (503), the ini and argv handling.

The check functions here are also run against the real simple_router by
tests/integration/test_ksana_real_router.py.
"""
from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
from aiohttp import web

from tests.emulator.helpers import ROOT, EmuProc, free_port, request

NET = "127.0.30"
CLUSTER = "pd-ksana-emu"
COMM_ID = "UEQtZGVwbG95IG5jY2wgaWQ="  # what a prefill's rank 0 registers (base64)
PROXY_VARS = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
              "ALL_PROXY")
STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}$")
SERVER_STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$")
SSE_D = [b'data: {"node":"decode","n":1}\n\n', b'data: {"node":"decode","n":2}\n\n',
         b"data: [DONE]\n\n"]
GEN_P = [b'{"text":"P"}\0']
GEN_D = [b'{"text":"D1"}\0', b'{"text":"D2"}\0']


# =========================================================================== the ini

def write_ini(where: Path, cluster: str, timeout_s: int, log_dir: str = "logs",
              sqlite_path: str = "state/router.db") -> Path:
    """A router ini (relative paths: sqlite_path to the ini's dir, log_dir to the cwd)."""
    where.mkdir(parents=True, exist_ok=True)
    ini = where / "router.ini"
    ini.write_text(
        "[general]\nlog_level = INFO\n"
        f"log_dir = {log_dir}\ncluster_name = {cluster}\n"
        f"heartbeat_timeout_seconds = {timeout_s}\n\n"
        "[name_service]\nname_service_provider = name_service.auto_provider\n\n"
        f"[database]\nstorage_mode = sqlite\nsqlite_path = {sqlite_path}\n")
    return ini


# =========================================================================== HTTP client

@dataclass
class RouterClient:
    """A router under test: where it listens, its database, its cluster."""

    host: str
    port: int
    db: Path
    cluster: str
    timeout_s: int

    def post(self, path: str, body: Any, headers: Optional[Dict[str, str]] = None
             ) -> Tuple[int, Dict[str, str], Any]:
        status, hdrs, data = request(self.host, self.port, "POST", path, body, headers, 20)
        try:
            return status, hdrs, json.loads(data)
        except ValueError:
            return status, hdrs, data

    def raw(self, method: str, path: str, body: Any = None,
            headers: Optional[Dict[str, str]] = None) -> Tuple[int, Dict[str, str], bytes]:
        return request(self.host, self.port, method, path, body, headers, 20)

    def rows(self, sql: str, args: Tuple[Any, ...] = ()) -> List[sqlite3.Row]:
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5)
        conn.row_factory = sqlite3.Row
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    def settled(self, sql: str, args: Tuple[Any, ...], want: Any, timeout: float = 5.0
                ) -> None:
        """Until the first column of the first row is ``want``. The real router commits
        just after it has sent its answer (FastAPI runs the session dependency's exit
        then), so a write is not always visible the moment the answer arrives; the
        stand-in commits first."""
        deadline = time.monotonic() + timeout
        got: Any = None
        while time.monotonic() < deadline:
            found = self.rows(sql, args)
            got = found[0][0] if found else None
            if got == want:
                return
            time.sleep(0.02)
        raise AssertionError(f"{sql} {args}: {got!r}, expected {want!r}")


def wait_up(host: str, port: int, proc: subprocess.Popen, log: Any, timeout: float = 20.0
            ) -> None:
    """Until GET /openapi.json answers 200 (the router's liveness probe)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if request(host, port, "GET", "/openapi.json", timeout=2)[0] == 200:
                return
        except OSError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"router on {host}:{port} not up (exit {proc.poll()}):\n{log()}")


def node_body(role: str, infer: str, coord: str, cluster: Optional[str] = "",
              rank: int = 0, world: int = 1, devices: int = 1, **extra: Any
              ) -> Dict[str, Any]:
    """A /RegisterNode body as KsanaLLM's C++ client sends it."""
    body: Dict[str, Any] = {
        "inference_addr": infer, "coordinator_addr": coord, "cluster_name": cluster,
        "group_role": role, "node_rank": rank, "world_size": world,
        "devices": [{"device_id": i, "device_type": "GPU", "device_ip": infer.split(":")[0]}
                    for i in range(devices)],
        "start_time": "2026-01-01 00:00:00", "job_id": "pd-deploy-test"}
    body.update(extra)
    return body


# =========================================================================== fake nodes

class FakeNode:
    """A KsanaLLM node's HTTP side: records every request; answers JSON (no stream) or a
    chunked stream (SSE for /v1, \\0-separated JSON for /generate). A prefill keeps its
    stream open 0.5 s after its first chunk; a decode starts /generate 0.4 s late."""

    def __init__(self, role: str, host: str) -> None:
        self.role, self.host, self.port = role, host, free_port(host)
        self.requests: List[Tuple[str, Dict[str, str], bytes]] = []
        self.runner: Optional[web.AppRunner] = None

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, self.host, self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def pieces(self, generate: bool) -> List[bytes]:
        if self.role == "prefill":
            return GEN_P if generate else [b'data: {"node":"prefill"}\n\n']
        return GEN_D if generate else SSE_D

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self.requests.append((request.path, {k.lower(): v for k, v in request.headers.items()},
                              raw))
        body = json.loads(raw)
        if not body.get("stream"):
            status = int(body.get("status_code", 200)) if self.role == "decode" else 200
            return web.json_response({"node": self.role, "path": request.path,
                                      "prompt": body.get("prompt")}, status=status,
                                     headers={"X-Fake-Node": self.role})
        generate = request.path == "/generate"
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"
                                           if generate else "text/event-stream"})
        try:
            await resp.prepare(request)
            if generate and self.role == "decode":
                await asyncio.sleep(0.4)
            for piece in self.pieces(generate):
                await resp.write(piece)
                await asyncio.sleep(0.05)
            if self.role == "prefill":
                await asyncio.sleep(0.5)
            await resp.write_eof()
        except ConnectionResetError:
            pass  # the router closes a prefill's stream after its first chunk
        return resp


class FakeNodes:
    """Fake nodes served by one event loop in a background thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.nodes: List[FakeNode] = []

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def start(self, role: str, host: str) -> FakeNode:
        node = FakeNode(role, host)
        self._run(node.start())
        self.nodes.append(node)
        return node

    def stop(self, node: FakeNode) -> None:
        self._run(node.stop())

    def close(self) -> None:
        for node in self.nodes:
            self._run(node.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def fakes() -> Iterator[FakeNodes]:
    nodes = FakeNodes()
    yield nodes
    nodes.close()


# =========================================================================== the stand-in

class RouterProc(EmuProc):
    drop_env = PROXY_VARS


def start_standin(procs: List[EmuProc], tmp: Path, name: str, host: str, cluster: str,
                  timeout_s: int) -> RouterClient:
    ini = write_ini(tmp / name, cluster, timeout_s, log_dir=str(tmp / name / "logs"))
    port = free_port(host)
    proc = RouterProc(name, "ksana-router", ["--host", host, "--port", str(port),
                                             "--config", str(ini)], tmp)
    procs.append(proc)
    wait_up(host, port, proc.proc, proc.log)
    return RouterClient(host, port, tmp / name / "state" / "router.db", cluster, timeout_s)


@pytest.fixture(scope="module")
def procs() -> Iterator[List[EmuProc]]:
    started: List[EmuProc] = []
    yield started
    for p in started:
        p.stop()


# =========================================================================== checks
# (each runs against any router: the stand-in here, the real one in tests/integration)

def check_liveness(rc: RouterClient) -> None:
    assert rc.raw("GET", "/health")[0] == 404  # simple_router has no /health
    status, hdrs, data = rc.raw("GET", "/openapi.json")
    assert status == 200 and json.loads(data)["openapi"].startswith("3.")
    assert json.loads(data)["info"]["title"] == "Prefill-Decode Router"
    assert rc.raw("GET", "/docs")[0] == 200
    status, hdrs, data = rc.raw("GET", "/v1/models")
    assert status == 405 and json.loads(data) == {"detail": "Method Not Allowed"}
    status, _, data = rc.raw("GET", "/no/such/path")
    assert status == 404 and json.loads(data) == {"detail": "Not Found"}
    status, hdrs, _ = rc.raw("POST", "/v1", {})
    assert status == 307 and hdrs["location"].endswith("/v1/")


def check_register_validation(rc: RouterClient) -> None:
    coord = f"{NET}.200:13000"
    cases = [
        (node_body("prefill", f"{NET}.200:8000", coord, cluster="someone-else"), 400,
         f"Cluster 'someone-else' is not allowed; expecting '{rc.cluster}'"),
        (node_body("prefill", f"{NET}.200:8000", coord, devices=0), 400,
         "world_size or devices must be provided"),
        (node_body("prefill", f"{NET}.200:8000", coord, world=None), 400,
         "world_size or devices must be provided"),
        (node_body("prefill", f"{NET}.200:8000", coord, world=1, devices=2), 400,
         "World size must match the number of devices"),
        (node_body("prefill", f"{NET}.200:8000", "localhost:13000"), 400,
         "coordinator_addr host must be a valid IP address"),
        (node_body("prefill", f"{NET}.200:8000", f"tcp://{coord}"), 400,
         "coordinator_addr must be in 'ip:port' format without prefixes"),
        (node_body("prefill", f"{NET}.200:8000", f"{NET}.200:0"), 400,
         "coordinator_addr port must be between 1 and 65535"),
        (node_body("prefill", f"{NET}.200:8000", None), 400, "coordinator_addr is required"),
    ]
    for body, status, text in cases:
        got, _, data = rc.post("/RegisterNode", body)
        assert (got, data) == (status, {"detail": text}), body
    got, _, data = rc.post("/RegisterNode", node_body("both", f"{NET}.200:8000", coord))
    assert got == 422 and data["detail"][0]["loc"] == ["body", "group_role"]
    assert data["detail"][0]["type"] == "value_error"
    got, _, data = rc.post("/RegisterNode", node_body("prefill", "8000", coord))
    assert got == 422 and data["detail"][0]["loc"] == ["body", "inference_addr"]
    got, _, data = rc.post("/RegisterNode", {"inference_addr": f"{NET}.200:8000"})
    assert got == 422
    assert [e["loc"] for e in data["detail"]] == [["body", "group_role"],
                                                   ["body", "node_rank"]]
    assert all(e["type"] == "missing" for e in data["detail"])
    got, _, data = rc.post("/RegisterNode", node_body("prefill", f"{NET}.200:8000", coord,
                                                      world=0, node_rank=-1))
    assert got == 422 and {e["type"] for e in data["detail"]} == {"greater_than",
                                                                  "greater_than_equal"}
    got, _, data = rc.post("/RegisterNode", "{not json")
    assert got == 422 and data["detail"][0]["type"] == "json_invalid"
    assert rc.rows("SELECT * FROM node_info WHERE coordinator_addr = ?", (coord,)) == []


def check_unknown_nodes(rc: RouterClient) -> None:
    status, hdrs, data = rc.raw("POST", "/Heartbeat", {"node_id": "no-such-node"})
    assert (status, data) == (500, b"Internal Server Error")  # ValueError escapes
    assert hdrs["content-type"].startswith("text/plain")
    status, _, data = rc.raw("POST", "/RegisterCommId", {"node_id": "no-such-node",
                                                         "comm_key": "a__b", "comm_id": "x"})
    assert (status, data) == (500, b"Internal Server Error")  # NodeNotFoundError escapes
    status, _, data = rc.post("/Heartbeat", {})
    assert status == 422 and data["detail"][0]["loc"] == ["body", "node_id"]


@dataclass
class PairInfo:
    p: FakeNode
    d: FakeNode
    p_coord: str
    d_coord: str
    p_id: str = ""
    d_id: str = ""
    answers: Dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.p.addr}__{self.d.addr}"


def heartbeat(rc: RouterClient, node_id: str) -> Dict[str, Any]:
    status, _, data = rc.post("/Heartbeat", {"node_id": node_id})
    assert status == 200, data
    return data


def form_pair(rc: RouterClient, p: FakeNode, d: FakeNode, p_coord: str, d_coord: str
              ) -> PairInfo:
    """Register P and D, heartbeat until the router shows the pair, register its id (what
    the prefill's rank 0 does), and keep every answer for the checks."""
    info = PairInfo(p, d, p_coord, d_coord)
    status, _, reg = rc.post("/RegisterNode", node_body("prefill", p.addr, p_coord))
    assert status == 201, reg
    info.answers["register_p"] = reg
    status, _, reg_d = rc.post("/RegisterNode", node_body("decode", d.addr, d_coord,
                                                          cluster=rc.cluster))
    assert status == 201, reg_d
    info.p_id, info.d_id = reg["node_id"], reg_d["node_id"]
    for node_id in (info.p_id, info.d_id):
        rc.settled("SELECT COUNT(*) FROM node_info WHERE node_id = ?", (node_id,), 1)
    groups = "SELECT COUNT(*) FROM inference_group_status WHERE inference_addr = ?"
    info.answers["hb_p1"] = heartbeat(rc, info.p_id)  # no decode group yet
    rc.settled(groups, (p.addr,), 1)
    info.answers["hb_d1"] = heartbeat(rc, info.d_id)  # creates the pair, no id
    rc.settled(groups, (d.addr,), 1)
    rc.settled("SELECT is_active FROM comm_group_pair WHERE comm_key = ?", (info.key,), 1)
    info.answers["hb_p2"] = heartbeat(rc, info.p_id)  # the prefill sees the empty id
    status, _, data = rc.post("/RegisterCommId", {"node_id": info.d_id, "comm_key": info.key,
                                                  "comm_id": COMM_ID})
    info.answers["comm_d"] = (status, data)
    status, _, data = rc.post("/RegisterCommId", {"node_id": info.p_id, "comm_key": "no-key",
                                                  "comm_id": COMM_ID})
    info.answers["comm_bad_key"] = (status, data)
    status, _, data = rc.post("/RegisterCommId", {"node_id": info.p_id, "comm_key": info.key,
                                                  "comm_id": COMM_ID})
    info.answers["comm_p"] = (status, data)
    rc.settled("SELECT data_channel_meta FROM comm_group_pair WHERE comm_key = ?",
               (info.key,), json.dumps(COMM_ID))
    info.answers["hb_d2"] = heartbeat(rc, info.d_id)
    return info


def check_pair_answers(rc: RouterClient, info: PairInfo) -> None:
    a = info.answers
    reg = a["register_p"]
    assert set(reg) == {"node_id", "is_online", "last_heartbeat"} and reg["is_online"] is True
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", reg["last_heartbeat"])
    hb = a["hb_p1"]
    assert set(hb) == {"node_id", "is_online", "group_ready", "coordinator_addr",
                       "node_role", "timestamp", "comm_group_to_address", "comm_group_to_id"}
    assert (hb["node_id"], hb["is_online"], hb["group_ready"], hb["coordinator_addr"],
            hb["node_role"]) == (info.p_id, True, True, info.p_coord, "prefill")
    assert hb["comm_group_to_address"] == {} and hb["comm_group_to_id"] == {}
    for name in ("hb_d1", "hb_p2"):
        assert a[name]["comm_group_to_address"] == {info.key: []}
        assert a[name]["comm_group_to_id"] == {info.key: ""}
    assert a["comm_d"] == (403, {"detail": "Only prefill rank-0 nodes may register comm ids"})
    assert a["comm_bad_key"] == (400, {"detail": "comm_key must follow 'prefill__decode' "
                                                 "format"})
    assert a["comm_p"] == (200, {"status": "OK", "comm_id": COMM_ID})
    hb = a["hb_d2"]
    assert hb["node_role"] == "decode" and hb["group_ready"] is True
    assert hb["comm_group_to_address"] == {info.key: [[0, 0, info.p_coord],
                                                      [0, 0, info.d_coord]]}
    assert hb["comm_group_to_id"] == {info.key: COMM_ID}
    # registering the same coordinator_addr again updates that node
    status, _, again = rc.post("/RegisterNode", node_body("decode", info.d.addr, info.d_coord))
    assert status == 201 and again["node_id"] == info.d_id


def check_database(rc: RouterClient, info: PairInfo) -> None:
    """The file the ini names, with SQLAlchemy's value formats."""
    assert rc.db.is_file()
    (p,) = rc.rows("SELECT * FROM node_info WHERE node_id = ?", (info.p_id,))
    assert (p["cluster_name"], p["role"], p["inference_addr"], p["coordinator_addr"],
            p["node_rank"], p["world_size"], p["device_num"], p["is_online"]) == \
        (rc.cluster, "prefill", info.p.addr, info.p_coord, 0, 1, 1, 1)
    for col in ("last_heartbeat", "start_time", "created_at", "updated_at"):
        assert STAMP.match(p[col]), (col, p[col])
    (pair,) = rc.rows("SELECT * FROM comm_group_pair WHERE comm_key = ?", (info.key,))
    assert (pair["is_active"], pair["cluster_name"], pair["prefill_addr"],
            pair["decode_addr"]) == (1, rc.cluster, info.p.addr, info.d.addr)
    assert pair["data_channel_meta"] == json.dumps(COMM_ID)  # a JSON string, as text
    assert pair["control_channel_meta"] == \
        f'[[0, 0, "{info.p_coord}"], [0, 0, "{info.d_coord}"]]'
    assert SERVER_STAMP.match(pair["updated_at"])
    groups = rc.rows("SELECT * FROM inference_group_status WHERE inference_addr IN (?, ?) "
                     "ORDER BY role DESC", (info.p.addr, info.d.addr))
    assert [(g["role"], g["world_size_expected"], g["online_device_sum"],
             g["online_node_count"], g["is_ready"]) for g in groups] == \
        [("prefill", 1, 1, 1, 1), ("decode", 1, 1, 1, 1)]
    assert STAMP.match(groups[0]["last_computed_at"])
    assert SERVER_STAMP.match(groups[0]["updated_at"])


def _sent(node: FakeNode, since: int) -> List[Tuple[str, Dict[str, str], bytes]]:
    return node.requests[since:]


def check_fanout_json(rc: RouterClient, info: PairInfo) -> None:
    p0, d0 = len(info.p.requests), len(info.d.requests)
    body = {"model": "m", "prompt": "héllo", "max_tokens": 4, "stream": False}
    status, hdrs, data = rc.post("/v1/completions?x=1", body,
                                 headers={"Authorization": "Bearer secret"})
    assert status == 200 and data == {"node": "decode", "path": "/v1/completions",
                                      "prompt": "héllo"}
    assert hdrs["x-fake-node"] == "decode"
    assert hdrs["content-type"].startswith("application/json")
    ((pp, ph, pb),), ((dp, dh, db),) = _sent(info.p, p0), _sent(info.d, d0)
    assert pp == dp == "/v1/completions"  # no query string
    assert pb == db == json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    assert ph["kv-comm-group-key"] == dh["kv-comm-group-key"] == info.key
    assert ph["kv-comm-request-id"] == dh["kv-comm-request-id"]
    assert 0 < int(ph["kv-comm-request-id"]) < 2 ** 31
    assert ph["content-type"] == "application/json" and "authorization" not in ph
    # the decode's status is passed on
    status, _, data = rc.post("/v2/anything", dict(body, status_code=418))
    assert status == 418 and data["path"] == "/v2/anything"
    ids = {h["kv-comm-request-id"] for _, h, _ in info.d.requests[d0:]}
    assert len(ids) == 2  # one id per request


def check_fanout_stream(rc: RouterClient, info: PairInfo) -> None:
    p0 = len(info.p.requests)
    status, hdrs, data = rc.raw("POST", "/v1/chat/completions",
                                {"model": "m", "messages": [], "stream": True})
    assert status == 200 and hdrs["content-type"] == "application/octet-stream"
    assert hdrs.get("transfer-encoding") == "chunked"
    assert data == b"".join(SSE_D) + b"[DONE]\0"  # only the decode's stream + the trailer
    assert data.endswith(b"data: [DONE]\n\n[DONE]\x00")
    assert len(_sent(info.p, p0)) == 1  # the prefill was asked too


def check_fanout_generate(rc: RouterClient, info: PairInfo) -> None:
    status, hdrs, data = rc.raw("POST", "/generate", {"prompt": "x", "stream": True})
    assert status == 200 and hdrs["content-type"] == "application/octet-stream"
    assert data == b"".join(GEN_P + GEN_D) + b"[DONE]\0"


def check_failures(rc: RouterClient, fakes: FakeNodes, info: PairInfo) -> None:
    """A dead decode: 500 while the router still has it online; silent past
    heartbeat_timeout_seconds: offline (at the next heartbeat of another node), 503."""
    fakes.stop(info.d)
    status, hdrs, data = rc.raw("POST", "/v1/completions", {"prompt": "x"})
    assert (status, data) == (500, b"Internal Server Error")
    assert rc.rows("SELECT is_online FROM node_info WHERE node_id = ?",
                   (info.d_id,))[0][0] == 1
    time.sleep(rc.timeout_s + 0.5)
    assert heartbeat(rc, info.p_id)["group_ready"] is True
    rc.settled("SELECT is_online FROM node_info WHERE node_id = ?", (info.d_id,), 0)
    status, _, data = rc.post("/v1/completions", {"prompt": "x"})
    assert (status, data) == (503, {"detail": "No available nodes for processing"})
    # the prefill's rank 0 registering again clears its pairs' ids
    status, _, again = rc.post("/RegisterNode", node_body("prefill", info.p.addr,
                                                          info.p_coord))
    assert status == 201 and again["node_id"] == info.p_id
    rc.settled("SELECT data_channel_meta FROM comm_group_pair WHERE comm_key = ?",
               (info.key,), '""')
    (pair,) = rc.rows("SELECT is_active, data_channel_meta, control_channel_meta FROM "
                      "comm_group_pair WHERE comm_key = ?", (info.key,))
    assert tuple(pair) == (0, '""', "[]")


# =========================================================================== tests

@pytest.fixture(scope="module")
def cluster(procs, fakes, tmp_path_factory) -> Tuple[RouterClient, PairInfo]:
    tmp = tmp_path_factory.mktemp("ksana-router")
    rc = start_standin(procs, tmp, "router", f"{NET}.1", CLUSTER, 2)
    p, d = fakes.start("prefill", f"{NET}.2"), fakes.start("decode", f"{NET}.3")
    return rc, form_pair(rc, p, d, f"{NET}.2:13569", f"{NET}.3:13571")


def test_liveness_is_openapi_not_health(cluster):
    check_liveness(cluster[0])


def test_register_validation(cluster):
    check_register_validation(cluster[0])


def test_unknown_nodes_get_500(cluster):
    check_unknown_nodes(cluster[0])


def test_pair_forms_through_heartbeats_and_comm_id(cluster):
    check_pair_answers(*cluster)


def test_database_and_log_where_the_ini_says(cluster, procs):
    rc, info = cluster
    check_database(rc, info)
    log = rc.db.parent.parent / "logs" / "simple_router.log"
    assert log.is_file() and "registered node" in log.read_text()
    out = subprocess.run([sys.executable, "-m", "pd_launcher.ksana_pairs", "--db",
                          str(rc.db), "--cluster", rc.cluster, "--expect-pair"],
                         capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert out.returncode == 0 and f"pair {info.key} can take requests" in out.stdout


def test_fanout_json(cluster):
    check_fanout_json(*cluster)


def test_fanout_stream_has_the_trailer(cluster):
    check_fanout_stream(*cluster)


def test_fanout_generate_merges_the_first_prefill_chunk(cluster):
    check_fanout_generate(*cluster)


def test_dead_decode_then_stale(procs, fakes, tmp_path):
    rc = start_standin(procs, tmp_path, "router2", f"{NET}.4", CLUSTER, 2)
    p, d = fakes.start("prefill", f"{NET}.5"), fakes.start("decode", f"{NET}.6")
    info = form_pair(rc, p, d, f"{NET}.5:13569", f"{NET}.6:13571")
    assert rc.post("/v1/completions", {"prompt": "x"})[0] == 200
    check_failures(rc, fakes, info)
    proc = procs[-1]
    assert "is stale" in proc.log() and "--workers 6 not forked" in proc.log()
    proc.stop()
    assert proc.proc.returncode == 0 and "received SIGTERM" in proc.log()


def test_no_pair_gives_503_before_reading_the_body(procs, tmp_path):
    rc = start_standin(procs, tmp_path, "router3", f"{NET}.7", "other", 60)
    status, _, data = rc.post("/generate", "not json")
    assert (status, data) == (503, {"detail": "No available nodes for processing"})


def _run(argv: List[str], cwd: Path, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pd_launcher.emulator", "ksana-router",
                           *argv], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("ini, message", [
    (None, "Failed to load configuration file"),
    ("[general]\ncluster_name = x\n", "no [database] section"),
    ("[database]\nsqlite_path = a.db\n", "name_service_provider is not set"),
    ("[database]\nstorage_mode = mysql\n[name_service]\nname_service_provider = "
     "name_service.auto_provider\n", "sqlite only"),
    ("[general]\nheartbeat_timeout_seconds = soon\n[database]\n[name_service]\n"
     "name_service_provider = name_service.auto_provider\n", "heartbeat_timeout_seconds"),
    ("[database]\nsqlite_path = :memory:\n[name_service]\nname_service_provider = "
     "name_service.auto_provider\n", "in-memory"),
])
def test_bad_ini_exits_2(tmp_path, ini, message):
    path = tmp_path / "bad.ini"
    if ini is not None:
        path.write_text(ini)
    out = _run(["--port", "1", "--config", str(path)], tmp_path)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert str(path) in out.stderr


def test_argv_errors_and_help(tmp_path):
    out = _run(["--workers", "many"], tmp_path)
    assert out.returncode == 2 and "--workers" in out.stderr
    out = _run(["--unknown"], tmp_path)
    assert out.returncode == 2 and "unrecognized arguments" in out.stderr
    out = _run(["--help"], tmp_path)
    assert out.returncode == 0 and "--config" in out.stdout


def test_without_config_uses_the_shipped_defaults_in_the_cwd(tmp_path):
    host = f"{NET}.8"
    port = free_port(host)
    log = tmp_path / "out.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "pd_launcher.emulator", "ksana-router",
                                 "--host", host, "--port", str(port), "--workers", "1"],
                                cwd=tmp_path, stdout=fh, stderr=subprocess.STDOUT,
                                env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    try:
        wait_up(host, port, proc, log.read_text)
        status, _, data = request(host, port, "POST", "/RegisterNode",
                                  node_body("decode", f"{NET}.9:1", f"{NET}.9:2",
                                            cluster="default_cluster"))
        assert status == 201, data
    finally:
        proc.terminate()
        proc.wait(10)
    assert (tmp_path / "sqlite" / "simple_router.db").is_file()
    assert (tmp_path / "log" / "simple_router.log").is_file()
    assert "the built-in defaults" in log.read_text()


def test_port_in_use_exits_1(procs, tmp_path):
    rc = start_standin(procs, tmp_path, "router4", f"{NET}.10", CLUSTER, 60)
    ini = write_ini(tmp_path / "again", CLUSTER, 60)
    out = _run(["--host", rc.host, "--port", str(rc.port), "--config", str(ini)], tmp_path)
    assert out.returncode == 1 and "cannot bind" in out.stderr
