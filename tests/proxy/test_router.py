"""Router mode, for real: nginx (rendered by proxy_unit from a `mode: router` block)
in front of a real HTTP server playing the engine's own PD router.

Two stand-ins: the engine emulator (`python -m pd_launcher.emulator serve`, plain
aggregated mode: it answers completions and chat, streaming or not, as the router's
decode stream would) and the recording aiohttp `Backend` of harness.py (headers,
fault injection, a gate that holds a stream after its first chunk)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.proxy.harness import (
    REPO,
    Backend,
    closed_addr,
    free_port,
    http,
    metric,
    needs_nginx,
    open_stream,
    parse_metrics,
    post,
    read_chunk,
    sse_events,
)

pytestmark = needs_nginx

ROUTER_HOSTS = ["127.0.1.141", "127.0.1.142"]   # recording backends
EMU_HOST = "127.0.1.145"                         # the emulator
MODEL = "demo-model"
ENGINE_KEY = "sk-engine.key+1"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello " * 10}],
        "max_tokens": 6}
COMPLETION = {"model": MODEL, "prompt": "The quick brown fox " * 8, "max_tokens": 6}


class Emulator:
    """`python -m pd_launcher.emulator serve` as a router stand-in (no KV config)."""

    def __init__(self, host: str, logdir: Path, api_key: str | None = None):
        self.host, self.port = host, free_port(host)
        argv = [sys.executable, "-m", "pd_launcher.emulator", "serve", "/models/demo",
                "--host", host, "--port", str(self.port), "--served-model-name", MODEL]
        if api_key:
            argv += ["--api-key", api_key]
        env = dict(os.environ, PYTHONPATH=str(REPO), PD_EMU_ZERO_LATENCY="1")
        self.log = logdir / "emulator.log"
        self.proc = subprocess.Popen(argv, stdout=self.log.open("wb"),
                                     stderr=subprocess.STDOUT, env=env, cwd=str(REPO))

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"emulator exited:\n{self.log.read_text()}")
            try:
                if http("GET", f"http://{self.addr}/health", timeout=1)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"emulator not ready:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    try:
        import pd_launcher.emulator.cli  # noqa: F401
    except ImportError as e:  # pragma: no cover
        pytest.skip(f"emulator not importable: {e}")
    e = Emulator(EMU_HOST, tmp_path_factory.mktemp("emu"), api_key=ENGINE_KEY)
    try:
        e.wait_ready()
        yield e
    finally:
        e.stop()


@pytest.fixture
def routers(aloop):
    """routers(n) -> n recording backends playing the engine's router."""
    made: list[Backend] = []

    def make(n: int = 1) -> list[Backend]:
        bs = [Backend(aloop, ROUTER_HOSTS[i], "decode").start() for i in range(n)]
        made.extend(bs)
        return bs

    yield make
    for b in made:
        b.stop()


def read_stream(f) -> bytes:
    raw = b""
    while True:
        c = read_chunk(f)
        if not c:
            return raw
        raw += c


def metrics(px) -> dict:
    return parse_metrics(http("GET", px.url + "/metrics")[2].decode())


def wait_metric(px, name: str, want: float, timeout: float = 5, **labels) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(px)
        if metric(m, name, **labels) >= want or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


def health(px) -> dict:
    return json.loads(http("GET", px.url + "/health")[2])


# ------------------------------------------------------------------ the emulator


def test_completion_and_chat_pass_through_the_router(emu, proxy_factory):
    """Client key checked by nginx, engine key sent upstream (the emulator refuses
    anything else), answers identical to the router's own."""
    px = proxy_factory(router=[emu.addr], api_key="sk-client", engine_api_key=ENGINE_KEY)
    auth = {"Authorization": "Bearer sk-client"}
    direct_auth = {"Authorization": f"Bearer {ENGINE_KEY}"}
    for path, body in (("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)):
        st, h, data = post(px.url + path, body, auth)
        assert st == 200, data
        assert len(h["x-request-id"]) == 32
        out = json.loads(data)
        st, _, ref = post(f"http://{emu.addr}{path}", body, direct_auth)
        ref = json.loads(ref)
        assert out["usage"] == ref["usage"]
        if "messages" in body:
            assert out["choices"][0]["message"] == ref["choices"][0]["message"]
        else:
            assert out["choices"][0]["text"] == ref["choices"][0]["text"]
    st, _, data = http("GET", px.url + "/v1/models", headers=auth)
    assert st == 200 and json.loads(data)["data"][0]["id"] == MODEL
    # the client key is what nginx checks; the engine key is not a client key
    assert post(px.url + "/v1/completions", COMPLETION)[0] == 401
    assert post(px.url + "/v1/completions", COMPLETION, direct_auth)[0] == 401
    # without engine_api_key the client's Authorization goes through as is
    px2 = proxy_factory(router=[emu.addr])
    assert post(px2.url + "/v1/completions", COMPLETION)[0] == 401        # emulator's 401
    assert post(px2.url + "/v1/completions", COMPLETION, direct_auth)[0] == 200


def test_streaming_chat_through_the_router(emu, proxy_factory):
    px = proxy_factory(router=[emu.addr], engine_api_key=ENGINE_KEY)
    body = dict(CHAT, stream=True, stream_options={"include_usage": True}, max_tokens=12)
    s, f, status, hdrs = open_stream(px.url + "/v1/chat/completions", body,
                                     {"X-Request-Id": "emu-stream-1"})
    try:
        assert b" 200 " in status, status
        assert hdrs["content-type"].startswith("text/event-stream")
        assert hdrs["x-request-id"] == "emu-stream-1"
        ev = sse_events(read_stream(f))
    finally:
        s.close()
    assert ev[-1] == "[DONE]"
    (usage,) = [e["usage"] for e in ev[:-1] if e.get("usage")]
    assert usage["completion_tokens"] == 12
    (line,) = px.pd_lines(1)
    assert line["mode"] == "router" and line["status"] == 200
    assert line["request_id"] == "emu-stream-1" and line["upstream"] == emu.addr


# ------------------------------------------------------------------ recording router


def test_stream_is_not_buffered(routers, proxy_factory):
    """Every event reaches the client before the router writes the next one (nginx
    1.22 passes SSE through at once even buffered; proxy_buffering off also stops
    it reading ahead of a slow client: checked in test_router_render.py)."""
    (r,) = routers(1)
    r.chunk_delay = 0.25
    px = proxy_factory(router=[r.addr])
    s, f, status, _ = open_stream(px.url + "/v1/chat/completions",
                                  dict(CHAT, stream=True, max_tokens=4))
    arrivals = []
    try:
        assert b" 200 " in status
        while read_chunk(f):
            arrivals.append(time.monotonic())
    finally:
        s.close()
    assert len(r.chunk_times) == 4 and len(arrivals) >= 4
    for i in range(3):
        assert arrivals[i] < r.chunk_times[i + 1], i
    # and a stream held by the router after its first event
    r.chunk_delay = 0.0
    r.gate = threading.Event()                    # hold the stream after chunk 1
    px = proxy_factory(router=[r.addr])
    body = dict(COMPLETION, stream=True, max_tokens=5)
    s, f, status, hdrs = open_stream(px.url + "/v1/completions", body)
    try:
        assert b" 200 " in status
        t0 = time.monotonic()
        first = read_chunk(f)                     # arrives while the router holds on
        assert time.monotonic() - t0 < 3
        assert sse_events(first)[0]["choices"][0]["text"] == "t0 "
        assert len(r.chunk_times) == 5
        r.gate.set()
        ev = sse_events(first + read_stream(f))
    finally:
        r.gate.set()
        s.close()
    assert [e["choices"][0]["text"] for e in ev[:-1]] == [f"t{i} " for i in range(5)]
    assert ev[-1] == "[DONE]"


def test_request_id_and_headers_upstream(routers, proxy_factory):
    (r,) = routers(1)
    px = proxy_factory(router=[r.addr], engine_api_key="sk-eng")
    st, h, _ = post(px.url + "/v1/chat/completions", CHAT,
                    {"X-Request-Id": "client-rid-7", "Authorization": "Bearer whatever"})
    assert st == 200 and h["x-request-id"] == "client-rid-7"
    st, h2, _ = post(px.url + "/v1/completions", COMPLETION)
    gen = h2["x-request-id"]
    assert st == 200 and len(gen) == 32 and int(gen, 16) >= 0
    first, second = r.gen_requests()
    assert first["path"] == "/v1/chat/completions" and second["path"] == "/v1/completions"
    assert first["headers"]["x-request-id"] == "client-rid-7"
    assert second["headers"]["x-request-id"] == gen
    for rec in (first, second):
        assert rec["headers"]["authorization"] == "Bearer sk-eng"
        assert rec["headers"]["content-type"] == "application/json"
        assert "accept-encoding" not in rec["headers"]
    assert first["json"] == CHAT                  # the body reaches the router untouched
    assert second["raw"] == json.dumps(COMPLETION).encode()
    lines = px.pd_lines(2)
    assert [x["request_id"] for x in lines] == ["client-rid-7", gen]


def test_api_key(routers, proxy_factory):
    (r,) = routers(1)
    px = proxy_factory(router=[r.addr], api_key="sk-c.1+x")
    for path in ("/v1/completions", "/v1/chat/completions"):
        for hdrs in ({}, {"Authorization": "Bearer wrong"},
                     {"Authorization": "bearer sk-c.1+x"}, {"Authorization": "Bearer SK-C.1+X"}):
            st, h, data = post(px.url + path, CHAT, dict(hdrs, **{"X-Request-Id": "k1"}))
            assert st == 401, (path, hdrs)
            assert json.loads(data)["error"]["type"] == "AuthenticationError"
            assert h["x-request-id"] == "k1"
        assert post(px.url + path, CHAT, {"Authorization": "Bearer sk-c.1+x"})[0] == 200
    assert http("GET", px.url + "/v1/models")[0] == 401
    assert http("GET", px.url + "/v1/models",
                headers={"Authorization": "Bearer sk-c.1+x"})[0] == 200
    assert len(r.gen_requests()) == 3             # nothing unauthorized got through
    # the client's key went upstream (no engine key set)
    assert r.gen_requests()[0]["headers"]["authorization"] == "Bearer sk-c.1+x"
    assert http("GET", px.url + "/health")[0] == 200
    assert http("GET", px.url + "/metrics")[0] == 200


def test_access_log_and_metrics(routers, proxy_factory):
    (r,) = routers(1)
    px = proxy_factory(router=[r.addr])
    assert post(px.url + "/v1/completions", COMPLETION)[0] == 200
    assert post(px.url + "/v1/chat/completions", dict(CHAT, stream=True))[0] == 200
    assert http("GET", px.url + "/v1/models")[0] == 200
    assert http("GET", px.url + "/nope")[0] == 404
    # the readiness probe /health/agent is an "other" line too, so a count of lines can
    # be reached before the 404's line is written: wait for that line itself
    deadline = time.monotonic() + 5
    lines = px.log_lines()
    while not any(x["status"] == 404 for x in lines):
        assert time.monotonic() < deadline, lines
        time.sleep(0.05)
        lines = px.log_lines()
    by_route = {x["route"]: x for x in lines if x["route"] != "other" or x["status"] == 404}
    assert set(by_route) >= {"/v1/completions", "/v1/chat/completions", "/v1/models",
                             "other"}
    keys = {"time", "request_id", "route", "method", "status", "mode", "upstream",
            "upstream_status", "upstream_ttfb", "upstream_time", "total_time",
            "bytes_sent", "request_length", "retries", "inflight_limit", "client"}
    for x in lines:
        assert set(x) == keys
    for route in ("/v1/completions", "/v1/chat/completions"):
        x = by_route[route]
        assert x["mode"] == "router" and x["status"] == 200 and x["method"] == "POST"
        assert x["upstream"] == r.addr and x["upstream_status"] == "200"
        assert isinstance(x["upstream_ttfb"], float) and isinstance(x["upstream_time"], float)
        # (millisecond clocks read at different moments: allow one tick)
        assert x["upstream_ttfb"] <= x["upstream_time"] + 0.002
        assert x["upstream_time"] <= x["total_time"] + 0.002
        assert x["bytes_sent"] > 0 and x["request_length"] > 0 and x["retries"] == 0
    assert by_route["/v1/models"]["mode"] == "-"
    assert by_route["/v1/models"]["upstream"] == r.addr
    assert by_route["other"]["status"] == 404 and by_route["other"]["upstream_ttfb"] is None
    m = wait_metric(px, "pd_proxy_requests_total", 1, route="other", status="404")
    assert metric(m, "pd_proxy_requests_total", route="/v1/completions", status="200") == 1
    assert metric(m, "pd_proxy_requests_total", route="/v1/chat/completions",
                  status="200") == 1
    assert metric(m, "pd_proxy_requests_total", route="/v1/models", status="200") == 1
    assert metric(m, "pd_proxy_pd_requests_total", mode="router") == 2
    assert metric(m, "pd_proxy_upstream_attempts_total", pool="router", upstream=r.addr) == 3
    assert metric(m, "pd_proxy_router_first_byte_seconds_count") == 2
    assert metric(m, "pd_proxy_router_duration_seconds_count") == 2
    assert metric(m, "pd_proxy_retries_total", leg="router") == 0
    assert metric(m, "pd_proxy_upstreams", pool="router") == 1
    assert metric(m, "pd_proxy_upstream_healthy", pool="router", upstream=r.addr) == 1
    assert metric(m, "pd_proxy_bytes_sent_total") > 0
    assert metric(m, "pd_proxy_log_parse_errors_total") == 0
    names = {name for name, _ in m}
    assert not any(n.startswith(("pd_proxy_prefill", "pd_proxy_decode")) for n in names)
    assert "pd_proxy_fallbacks_total" not in names


def test_limits_and_errors(routers, proxy_factory):
    (r,) = routers(1)
    px = proxy_factory(router=[r.addr], max_body_size="1k")
    big = dict(COMPLETION, prompt="x" * 2000)
    for path in ("/v1/completions", "/v1/chat/completions"):
        st, h, data = post(px.url + path, big, {"X-Request-Id": "big-1"})
        assert st == 413 and h["content-type"] == "application/json"
        assert json.loads(data)["error"]["code"] == 413 and h["x-request-id"] == "big-1"
    # chunked upload over the limit, too
    s = socket.create_connection((px.host, px.port), timeout=5)
    payload = json.dumps(big).encode()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
              b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
              b"Connection: close\r\n\r\n" + b"%x\r\n" % len(payload) + payload
              + b"\r\n0\r\n\r\n")
    resp = b""
    while chunk := s.recv(65536):
        resp += chunk
    s.close()
    assert resp.startswith(b"HTTP/1.1 413"), resp[:100]
    assert b'"RequestTooLargeError"' in resp
    assert r.gen_requests() == []
    assert post(px.url + "/v1/completions", COMPLETION)[0] == 200   # under the limit
    for path in ("/", "/v1/embeddings", "/v2/generate", "/v1/completions/x"):
        st, h, data = http("GET", px.url + path)
        assert st == 404 and json.loads(data)["error"]["type"] == "NotFoundError", path
        assert h["content-type"] == "application/json"
    st, h, data = http("GET", px.url + "/v1/completions")
    assert st == 405 and h["allow"] == "POST" and len(h["x-request-id"]) == 32
    assert json.loads(data)["error"]["type"] == "MethodNotAllowedError"
    assert len(r.gen_requests()) == 1             # only the one good request


def test_router_down_is_a_502_json(routers, proxy_factory):
    dead = [closed_addr(ROUTER_HOSTS[0]), closed_addr(ROUTER_HOSTS[1])]
    px = proxy_factory(router=dead, router_attempts=2)
    for path, body in (("/v1/completions", COMPLETION),
                       ("/v1/chat/completions", dict(CHAT, stream=True))):
        st, h, data = post(px.url + path, body, {"X-Request-Id": "dead-1"})
        assert st == 502, data
        err = json.loads(data)["error"]
        assert err["code"] == 502 and err["type"] == "BadGatewayError"
        assert h["x-request-id"] == "dead-1"
    assert http("GET", px.url + "/v1/models")[0] == 502
    first = px.pd_lines(2)[0]
    assert first["mode"] == "router" and first["status"] == 502
    assert first["upstream"].count(",") == 1 and first["retries"] == 1   # both routers
    m = wait_metric(px, "pd_proxy_requests_total", 1, route="/v1/chat/completions",
                    status="502")
    assert metric(m, "pd_proxy_retries_total", leg="router") >= 1
    assert sum(metric(m, "pd_proxy_upstream_failures_total", pool="router", upstream=a)
               for a in dead) >= 2


def test_health_reports_the_router_pool(routers, proxy_factory):
    """Default probe: TCP connect. A second router that does not listen is taken out
    (pd_upstreams.conf + reload); the last one never is."""
    (r,) = routers(1)
    dead = closed_addr(ROUTER_HOSTS[1])
    px = proxy_factory(router=[r.addr, dead], router_balance="round_robin",
                       active_health=True, health_interval_s=1, health_fails=1,
                       health_passes=1)
    upstreams = Path(px.dirs["run"]) / "pd_upstreams.conf"
    r.health_ok = False                  # a TCP probe does not look at /health
    deadline = time.monotonic() + 10
    while health(px)["pools"]["router"]["healthy"] != 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    hv = health(px)
    assert list(hv["pools"]) == ["router"] and hv["status"] == "ok"
    ups = {u["upstream"]: u for u in hv["pools"]["router"]["upstreams"]}
    assert ups[r.addr]["healthy"] and ups[r.addr]["active"] == "up"
    assert not ups[dead]["healthy"] and ups[dead]["active"] == "down"
    assert "ConnectionRefusedError" in ups[dead]["error"]
    assert f"server {dead} max_fails=1 fail_timeout=10s down;" in upstreams.read_text()
    assert not [x for x in r.requests if x["path"] == "/health"]   # TCP only
    time.sleep(0.5)                      # graceful reload
    for _ in range(4):
        assert post(px.url + "/v1/completions", COMPLETION)[0] == 200
    # the last router goes too: reported, but never written down
    r.stop()
    deadline = time.monotonic() + 10
    while health(px)["status"] != "degraded" and time.monotonic() < deadline:
        time.sleep(0.1)
    hv = health(px)
    assert hv["status"] == "degraded" and hv["pools"]["router"]["healthy"] == 0
    text = upstreams.read_text()
    assert f"server {r.addr} max_fails=1 fail_timeout=10s;" in text
    m = metrics(px)
    assert metric(m, "pd_proxy_upstreams_healthy", pool="router") == 0
    assert metric(m, "pd_proxy_reloads_total") >= 1


def test_http_probe_path(routers, proxy_factory):
    """router_health_path: the agent GETs it; non-2xx is a failure."""
    (r,) = routers(1)
    r.health_ok = False
    px = proxy_factory(router=[r.addr], active_health=True, health_interval_s=1,
                       health_fails=1, router_health_path="/health")
    deadline = time.monotonic() + 10
    while health(px)["status"] != "degraded" and time.monotonic() < deadline:
        time.sleep(0.1)
    (u,) = health(px)["pools"]["router"]["upstreams"]
    assert u["active"] == "down" and u["error"] == "status 503"
    assert [x for x in r.requests if x["path"] == "/health"]
    r.health_ok = True
    deadline = time.monotonic() + 10
    while health(px)["status"] != "ok" and time.monotonic() < deadline:
        time.sleep(0.1)
    (u,) = health(px)["pools"]["router"]["upstreams"]
    assert u["active"] == "up" and u["healthy"]
    assert post(px.url + "/v1/completions", COMPLETION)[0] == 200


def test_router_errors_pass_through_and_timeouts(routers, proxy_factory):
    """The router's own error status and body reach the client, not retried on the
    other router; no response header within router_timeout_s is a 504 JSON."""
    r0, r1 = routers(2)
    px = proxy_factory(router=[r0.addr, r1.addr], router_timeout_s=1, max_fails=0)
    for r in (r0, r1):
        r.fault_always = {"kind": "status", "status": 503,
                          "body": b'{"error": "no instance registered"}'}
    st, h, data = post(px.url + "/v1/completions", COMPLETION, {"X-Request-Id": "e-1"})
    assert st == 503 and json.loads(data) == {"error": "no instance registered"}
    assert h["x-request-id"] == "e-1"
    assert len(r0.gen_requests()) + len(r1.gen_requests()) == 1
    for r in (r0, r1):
        r.fault_always = {"kind": "sleep", "s": 2.5}
    t0 = time.monotonic()
    st, _, data = post(px.url + "/v1/chat/completions", CHAT)
    assert st == 504 and json.loads(data)["error"]["type"] == "GatewayTimeoutError"
    assert time.monotonic() - t0 < 2.5                    # one try: the POST was sent
    assert len(r0.gen_requests()) + len(r1.gen_requests()) == 2


def test_client_disconnect_closes_router_connection(routers, proxy_factory):
    (r,) = routers(1)
    r.gate = threading.Event()                    # hold the stream after chunk 1
    px = proxy_factory(router=[r.addr])
    s, f, status, _ = open_stream(px.url + "/v1/completions",
                                  dict(COMPLETION, stream=True, max_tokens=50))
    assert b" 200 " in status
    assert b"t0" in read_chunk(f)
    s.shutdown(socket.SHUT_RDWR)
    s.close()
    deadline = time.monotonic() + 5
    while not r.closed_by_peer and time.monotonic() < deadline:
        time.sleep(0.02)
    assert r.closed_by_peer, "the router connection stayed open after the client left"
    assert len(r.chunk_times) == 1
    r.gate.set()
    assert post(px.url + "/v1/completions", COMPLETION)[0] == 200
