"""Row 11: overload. Past pd_proxy_max_inflight the front door answers 429 with
Retry-After at once instead of queueing; oversized bodies get 413; the requests in
flight are not harmed. Real emulated engines, slow enough to hold streams open."""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.proxy.harness import (
    NGINX,
    EmuEngine,
    Proxy,
    http,
    open_stream,
    post,
    proxy_metrics,
    read_chunk,
    sse_events,
)

pytestmark = [pytest.mark.fault_row(11),
              pytest.mark.skipif(NGINX is None, reason="nginx is not installed "
                                 "(apt-get install nginx libnginx-mod-http-js)")]

PROXY_HOST = "127.0.51.1"
P_HOST = "127.0.51.11"
D_HOST = "127.0.51.21"
MODEL = "demo-model"
MAX_INFLIGHT = 4
EXTRA = 8
TOKENS = 30
ITL = 0.05        # 30 tokens: each held stream lives ~1.5 s


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("row11")
    p = EmuEngine("prefill", P_HOST, "kv_producer", tmp)
    d = EmuEngine("decode", D_HOST, "kv_consumer", tmp,
                  env={"PD_EMU_ZERO_LATENCY": "0", "PD_EMU_ITL_S": str(ITL)})
    px = None
    try:
        p.wait_ready()
        d.wait_ready()
        px = Proxy(tmp / "px", [p.addr], [d.addr],
                   {"max_inflight": MAX_INFLIGHT, "max_body_size": "64k"}, host=PROXY_HOST)
        yield p, d, px
    finally:
        if px is not None:
            px.stop()
        p.stop()
        d.stop()


def test_overload_429_and_413(cluster, fault_report):
    p, d, px = cluster
    body = {"model": MODEL, "prompt": "hold this stream open " * 4, "max_tokens": TOKENS,
            "stream": True}
    held = []
    for _ in range(MAX_INFLIGHT):
        s, f, status, _ = open_stream(px.url + "/v1/completions", body, timeout=15)
        assert b" 200 " in status, status
        first = read_chunk(f)             # in flight: the decode is streaming
        assert first.startswith(b"data: ")
        held.append((s, f, first))

    def extra(i: int):
        t0 = time.monotonic()
        st, h, data = post(px.url + "/v1/completions", dict(body, max_tokens=2),
                           timeout=10)
        return st, h, data, time.monotonic() - t0

    with ThreadPoolExecutor(EXTRA) as ex:
        extras = list(ex.map(extra, range(EXTRA)))
    statuses = [x[0] for x in extras]
    assert statuses == [429] * EXTRA, statuses
    worst = max(x[3] for x in extras)
    assert worst < 0.5, f"429 took {worst:.3f} s"
    for _st, h, data, _ in extras:
        assert h["retry-after"] == "1" and h["x-request-id"]
        err = json.loads(data)["error"]
        assert err["code"] == 429 and err["type"] == "RateLimitError"
    # chat is limited by the same counter
    st, h, _ = post(px.url + "/v1/chat/completions",
                    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert st == 429 and h["retry-after"] == "1"
    # not counted: other routes still answer while the completion routes are full
    assert http("GET", px.url + "/v1/models")[0] == 200
    # oversized body: 413 at once, whatever the load
    t0 = time.monotonic()
    st, _, data = post(px.url + "/v1/completions",
                       dict(body, prompt="x" * (100 << 10)), timeout=10)
    t413 = time.monotonic() - t0
    assert st == 413 and json.loads(data)["error"]["code"] == 413

    # the held streams complete, whole and correct
    for s, f, first in held:
        raw = first
        try:
            while True:
                c = read_chunk(f)
                if not c:
                    break
                raw += c
        finally:
            # both: the file object keeps the socket open (nginx would keep the
            # request, and its max_inflight slot, in lingering close until then)
            f.close()
            s.close()
        ev = sse_events(raw)
        assert ev[-1] == "[DONE]"
        assert not any(isinstance(e, dict) and "error" in e for e in ev)
        toks = [e for e in ev[:-1] if e.get("choices") and e["choices"][0].get("text")]
        assert len(toks) == TOKENS
    # capacity is back once they are done
    st, _, data = post(px.url + "/v1/completions", dict(body, stream=False, max_tokens=2))
    assert st == 200, data

    rejected = proxy_metrics(px, "pd_proxy_rejected_total", want=EXTRA + 1,
                             reason="max_inflight")
    assert rejected == EXTRA + 1
    lines = px.pd_lines(MAX_INFLIGHT + EXTRA + 3)
    assert sum(1 for x in lines if x["inflight_limit"] == "REJECTED") == EXTRA + 1
    assert sum(1 for x in lines if x["status"] == 413) == 1
    # the rejected ones never reached an engine
    assert not any(x["decode_upstream"] or x["prefill_upstream"] for x in lines
                   if x["status"] == 429)

    fault_report(
        observed=(f"max_inflight={MAX_INFLIGHT}: with {MAX_INFLIGHT} streams held open, "
                  f"{EXTRA} concurrent extra completions + 1 chat all got 429 + "
                  f"Retry-After: 1 (slowest {worst * 1000:.0f} ms), never reaching an "
                  f"engine; a 100 KB body over max_body_size 64k got 413 in "
                  f"{t413 * 1000:.0f} ms; all {MAX_INFLIGHT} held streams completed with "
                  f"{TOKENS} tokens and [DONE]; pd_proxy_rejected_total="
                  f"{rejected:.0f}"),
        lost=0)
