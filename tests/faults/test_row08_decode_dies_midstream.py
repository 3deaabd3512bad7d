"""Row 8: a decode engine dies mid-stream (SIGKILL of a real emulated engine).

The client must get an SSE error event and a well-formed end of stream (not a
cut-short chunked body, not a hang); the access log and /metrics record it."""
from __future__ import annotations

import json
import socket
import time

import pytest

from tests.proxy.harness import (
    NGINX,
    EmuEngine,
    Proxy,
    open_stream,
    proxy_metrics,
    read_chunk,
    sse_events,
)

pytestmark = [pytest.mark.fault_row(8),
              pytest.mark.skipif(NGINX is None, reason="nginx is not installed "
                                 "(apt-get install nginx libnginx-mod-http-js)")]

PROXY_HOST = "127.0.50.1"
P_HOST = "127.0.50.11"
D_HOSTS = ["127.0.50.21", "127.0.50.22"]
MODEL = "demo-model"
ITL = 0.1          # decode inter-token latency: the stream is alive for seconds


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("row08")
    slow = {"PD_EMU_ZERO_LATENCY": "0", "PD_EMU_ITL_S": str(ITL)}
    p = EmuEngine("prefill", P_HOST, "kv_producer", tmp)
    ds = [EmuEngine(f"decode{i}", h, "kv_consumer", tmp, env=slow)
          for i, h in enumerate(D_HOSTS)]
    pxs: list[Proxy] = []
    try:
        for e in [p, *ds]:
            e.wait_ready()
        # one front door per decode engine: each case kills "its" decode engine
        for i, d in enumerate(ds):
            pxs.append(Proxy(tmp / f"px{i}", [p.addr], [d.addr], {}, host=PROXY_HOST))
        yield p, ds, pxs
    finally:
        for px in pxs:
            px.stop()
        for e in [p, *ds]:
            e.stop()


def read_all(f) -> tuple[bytes, bool]:
    """The rest of a chunked body: (bytes, whether the terminating chunk came)."""
    raw = b""
    while True:
        try:
            c = read_chunk(f)
        except (ValueError, OSError):      # cut short: no size line / connection closed
            return raw, False
        if not c:
            return raw, True
        raw += c


def stream_then_kill(px: Proxy, d: EmuEngine, body: dict, tokens_before_kill: int = 3):
    s, f, status, hdrs = open_stream(px.url + "/v1/completions", body, timeout=10)
    try:
        assert b" 200 " in status, status
        raw = b""
        while raw.count(b'"text"') < tokens_before_kill:
            c = read_chunk(f)
            assert c, "stream ended before the kill"
            raw += c
        t0 = time.monotonic()
        d.kill()
        rest, ended = read_all(f)
        return raw, rest, ended, time.monotonic() - t0, hdrs
    finally:
        s.close()


@pytest.mark.parametrize("usage", [False, True], ids=["plain", "include_usage"])
def test_decode_killed_mid_stream(cluster, usage, fault_report):
    p, ds, pxs = cluster
    d, px = ds[int(usage)], pxs[int(usage)]
    body = {"model": MODEL, "prompt": "tell me a long story " * 8, "max_tokens": 8,
            "stream": True}
    if usage:
        body["stream_options"] = {"include_usage": True}

    # control: a complete stream has no error event and counts no stream error
    s, f, status, _ = open_stream(px.url + "/v1/completions", body)
    try:
        whole, ended = read_all(f)
    finally:
        s.close()
    ev = sse_events(whole)
    assert ended and ev[-1] == "[DONE]" and not any(
        isinstance(e, dict) and "error" in e for e in ev)

    body = dict(body, max_tokens=200)          # 20 s of tokens: killed long before
    raw, rest, ended, dt, hdrs = stream_then_kill(px, d, body)
    assert ended, f"chunked body cut short after the kill: {rest[-200:]!r}"
    assert dt < 2.0, f"end of stream {dt:.2f}s after the kill"
    ev = sse_events(raw + rest)
    texts = [e for e in ev if isinstance(e, dict) and e.get("choices")]
    assert len(texts) >= 3
    err = ev[-2]
    assert ev[-1] == "[DONE]" and isinstance(err, dict), ev[-3:]
    assert err["error"]["code"] == 502 and err["error"]["type"] == "BadGatewayError"
    assert (raw + rest).endswith(b"data: [DONE]\n\n")

    rid = hdrs["x-request-id"]
    deadline = time.monotonic() + 5
    line = None
    while line is None and time.monotonic() < deadline:
        line = next((x for x in px.log_lines() if x["request_id"] == rid), None)
        time.sleep(0.05)
    assert line is not None, "no access log line for the killed stream"
    assert line["stream_error"] == "decode_lost" and line["mode"] == "pd"
    assert line["status"] == 200 and line["decode_status"] == "200"
    n = proxy_metrics(px, "pd_proxy_stream_errors_total", want=1)
    assert n == 1
    # the engine is gone for good: the next request is a fast clean error, no hang
    t1 = time.monotonic()
    s2, f2, status2, _ = open_stream(px.url + "/v1/completions", dict(body, max_tokens=2))
    s2.close()
    t_next = time.monotonic() - t1
    assert b" 502 " in status2, status2
    with pytest.raises(OSError):
        socket.create_connection((d.host, d.port), timeout=1).close()

    fault_report(
        observed=(f"decode engine SIGKILLed after {len(texts)} streamed tokens "
                  f"({'with' if usage else 'without'} usage filter): client got "
                  f"{json.dumps(err)[:60]}... + [DONE] and a proper chunked end "
                  f"{dt * 1000:.0f} ms after the kill; access log stream_error="
                  f"decode_lost, pd_proxy_stream_errors_total=1; the next request, with "
                  f"the only decode engine dead, got 502 in {t_next * 1000:.0f} ms"),
        lost=1)
