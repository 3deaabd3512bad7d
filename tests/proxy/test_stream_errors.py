"""The decode stream ends early (engine died, closed, read timeout) after the response
header: SSE clients get an error event + [DONE] and a proper end of the chunked body;
the access log (`stream_error`) and /metrics (`pd_proxy_stream_errors_total`) record
it. Normal streams are never touched (see pd_router.js, decodeFilter)."""
from __future__ import annotations

import json
import threading
import time

import pytest

from tests.proxy.harness import (
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

BODY = {"model": "demo-model", "prompt": "hello there", "max_tokens": 8, "stream": True}


def read_body(f) -> tuple[bytes, bool]:
    raw = b""
    while True:
        try:
            c = read_chunk(f)
        except (ValueError, OSError):
            return raw, False
        if not c:
            return raw, True
        raw += c


def stream(px, body: dict) -> tuple[bytes, bool, dict]:
    s, f, status, hdrs = open_stream(px.url + "/v1/completions", body, timeout=10)
    try:
        assert b" 200 " in status, status
        raw, ended = read_body(f)
    finally:
        f.close()
        s.close()
    return raw, ended, hdrs


def errors_in(raw: bytes) -> list[dict]:
    return [e for e in sse_events(raw) if isinstance(e, dict) and "error" in e]


def stream_errors(px, want: float = 0, timeout: float = 5) -> float:
    deadline = time.monotonic() + timeout
    while True:
        v = metric(parse_metrics(http("GET", px.url + "/metrics")[2].decode()),
                   "pd_proxy_stream_errors_total")
        if v >= want or time.monotonic() > deadline:
            return v
        time.sleep(0.1)


@pytest.mark.parametrize("usage", [False, True], ids=["plain", "usage_filter"])
def test_decode_cut_mid_stream_gets_error_event(backends, proxy_factory, usage):
    (p,), (d,) = backends(1, 1)
    d.cut_after = 3
    px = proxy_factory([p.addr], [d.addr])
    body = dict(BODY, **({"stream_options": {"include_usage": True}} if usage else {}))
    raw, ended, hdrs = stream(px, body)
    assert ended, raw[-200:]
    ev = sse_events(raw)
    assert [e["choices"][0]["text"] for e in ev[:3]] == ["t0 ", "t1 ", "t2 "]
    assert ev[-1] == "[DONE]" and ev[-2]["error"]["code"] == 502
    assert ev[-2]["error"]["type"] == "BadGatewayError" and len(ev) == 5
    (line,) = px.pd_lines(1)
    assert line["stream_error"] == "decode_lost" and line["status"] == 200
    assert line["request_id"] == hdrs["x-request-id"]
    assert stream_errors(px, 1) == 1


def test_decode_read_timeout_mid_stream_gets_error_event(backends, proxy_factory):
    (p,), (d,) = backends(1, 1)
    d.gate = threading.Event()          # hold the stream after its first event
    px = proxy_factory([p.addr], [d.addr], decode_timeout_s=1)
    t0 = time.monotonic()
    raw, ended, _ = stream(px, BODY)
    dt = time.monotonic() - t0
    d.gate.set()
    assert ended and 0.9 < dt < 3, dt
    ev = sse_events(raw)
    assert ev[0]["choices"][0]["text"] == "t0 "
    assert ev[-1] == "[DONE]" and ev[-2]["error"]["code"] == 502
    assert px.pd_lines(1)[0]["stream_error"] == "decode_lost"


def test_non_streaming_cut_is_not_repaired(backends, proxy_factory):
    """A JSON answer cut after its head cannot be made whole: nginx closes the
    connection (the client sees a chunked body without its end); the log says so."""
    (p,), (d,) = backends(1, 1)
    d.cut_after = 1
    px = proxy_factory([p.addr], [d.addr])
    raw, ended, _ = stream(px, dict(BODY, stream=False))
    # (the usage filter holds a JSON answer whole until its end: nothing of it left)
    assert not ended and b'{"id": "cmpl-cut", "choices": ['.startswith(raw)
    assert px.pd_lines(1)[0]["stream_error"] == "decode_lost"
    assert stream_errors(px, 1) == 1


def test_normal_streams_untouched(backends, proxy_factory):
    """Many normal streams with small gaps between events (reads that end after a
    chunk-size line give the filter empty buffers): no error event, no stream_error,
    and the decode connection is reused (keepalive)."""
    (p,), (d,) = backends(1, 1)
    d.chunk_delay = 0.002
    px = proxy_factory([p.addr], [d.addr])
    for i in range(12):
        body = dict(BODY, **({"stream_options": {"include_usage": True}} if i % 2 else {}))
        raw, ended, _ = stream(px, body)
        assert ended and not errors_in(raw)
        assert sse_events(raw)[-1] == "[DONE]"
    lines = px.pd_lines(12)
    assert all(x["stream_error"] == "" for x in lines)
    assert len({r["peer"] for r in d.gen_requests()}) == 1
    st, _, data = post(px.url + "/v1/completions", dict(BODY, stream=False))
    assert st == 200 and json.loads(data)["choices"]
    assert stream_errors(px) == 0
