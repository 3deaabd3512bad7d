"""End to end: the proxy in front of emulated engines (`python -m pd_launcher.emulator
serve`, KV really moved from prefill to decode over TCP)."""
from __future__ import annotations

import json
import time

import pytest

from tests.proxy.harness import (
    EmuEngine,
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

P_HOSTS = ["127.0.1.131", "127.0.1.132"]
D_HOST = "127.0.1.135"
MODEL = "demo-model"


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    try:
        import pd_launcher.emulator.cli  # noqa: F401
    except ImportError as e:  # pragma: no cover
        pytest.skip(f"emulator not importable: {e}")
    logdir = tmp_path_factory.mktemp("emu")
    es = {"p": EmuEngine("prefill", P_HOSTS[0], "kv_producer", logdir),
          "bad": EmuEngine("prefill-bad", P_HOSTS[1], "kv_producer", logdir,
                        env={"PD_EMU_ERROR_RATE": "1"}),
          "d": EmuEngine("decode", D_HOST, "kv_consumer", logdir)}
    try:
        for e in es.values():
            e.wait_ready()
        yield es
    finally:
        for e in es.values():
            e.stop()


@pytest.fixture
def px(engines, proxy_factory):
    return proxy_factory([engines["p"].addr], [engines["d"].addr])


def kv_pulls(d) -> float:
    return sum(v for (name, _), v in d.metrics().items()
               if name in ("pd_emu:kv_transfers_total", "pd_emu:kv_transfers"))


def test_completion_through_proxy_moves_kv_and_fixes_usage(engines, px):
    p, d = engines["p"], engines["d"]
    body = {"model": MODEL, "prompt": "The quick brown fox jumps over the lazy dog " * 8,
            "max_tokens": 12, "temperature": 0}
    before = kv_pulls(d)
    st, h, data = post(px.url + "/v1/completions", body, {"X-Request-Id": "emu-1"})
    assert st == 200, data
    assert h["x-request-id"] == "emu-1"
    out = json.loads(data)
    assert kv_pulls(d) == before + 1                  # decode pulled the prefill's KV
    # what the prefill engine computes for this prompt
    st, _, pdata = post(f"http://{p.addr}/v1/completions",
                        dict(body, max_tokens=1, kv_transfer_params={"do_remote_decode": True}))
    pre_usage = json.loads(pdata)["usage"]
    # what the decode engine says on its own when it receives KV (the bug class)
    assert out["usage"]["prompt_tokens"] == pre_usage["prompt_tokens"]
    assert out["usage"]["prompt_tokens_details"] == pre_usage.get("prompt_tokens_details")
    assert out["usage"]["completion_tokens"] == 12
    assert out["usage"]["total_tokens"] == pre_usage["prompt_tokens"] + 12
    # same text as a decode-only request of the same body (the emulator is deterministic)
    st, _, local = post(f"http://{d.addr}/v1/completions", body)
    assert json.loads(local)["choices"][0]["text"] == out["choices"][0]["text"]


def test_decode_engine_alone_reports_whole_prompt_cached(engines):
    """Guard: the emulator does have the bug the proxy corrects (else the test above
    proves nothing)."""
    p, d = engines["p"], engines["d"]
    body = {"model": MODEL, "prompt": "tell me a story " * 10, "max_tokens": 3}
    st, _, pdata = post(f"http://{p.addr}/v1/completions",
                        dict(body, max_tokens=1, kv_transfer_params={"do_remote_decode": True}))
    kvp = json.loads(pdata)["kv_transfer_params"]
    st, _, ddata = post(f"http://{d.addr}/v1/completions", dict(body, kv_transfer_params=kvp))
    u = json.loads(ddata)["usage"]
    assert u["prompt_tokens_details"]["cached_tokens"] == u["prompt_tokens"]


def test_streaming_chat_through_proxy(engines, px):
    d = engines["d"]
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello " * 20}],
            "max_tokens": 16, "stream": True, "stream_options": {"include_usage": True}}
    before = kv_pulls(d)
    s, f, status, hdrs = open_stream(px.url + "/v1/chat/completions", body)
    try:
        assert b" 200 " in status, status
        assert hdrs["content-type"].startswith("text/event-stream")
        raw = b""
        while True:
            c = read_chunk(f)
            if not c:
                break
            raw += c
    finally:
        s.close()
    ev = sse_events(raw)
    assert ev[-1] == "[DONE]"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in ev[:-1]
                   if e.get("choices"))
    assert text
    (usage,) = [e["usage"] for e in ev[:-1] if e.get("usage")]
    assert usage["completion_tokens"] == 16
    assert not (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    assert kv_pulls(d) == before + 1


def test_models_and_metrics(engines, px):
    st, _, data = http("GET", px.url + "/v1/models")
    assert st == 200 and json.loads(data)["data"][0]["id"] == MODEL
    body = {"model": MODEL, "prompt": "metrics please", "max_tokens": 4, "stream": True}
    assert post(px.url + "/v1/completions", body)[0] == 200
    px.pd_lines(1)
    deadline = time.monotonic() + 5
    while True:
        m = parse_metrics(http("GET", px.url + "/metrics")[2].decode())
        n = metric(m, "pd_proxy_requests_total", route="/v1/completions", status="200")
        if n == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert n == 1
    assert metric(m, "pd_proxy_pd_requests_total", mode="pd") == 1
    assert metric(m, "pd_proxy_prefill_duration_seconds_count") == 1


def test_failing_prefill_engine_falls_back(engines, proxy_factory):
    bad, d = engines["bad"], engines["d"]
    px = proxy_factory([bad.addr], [d.addr])
    body = {"model": MODEL, "prompt": "fallback " * 10, "max_tokens": 5}
    before = kv_pulls(d)
    st, _, data = post(px.url + "/v1/completions", body)
    assert st == 200, data
    assert kv_pulls(d) == before                     # decode prefilled locally
    (line,) = px.pd_lines(1)
    assert line["fallback"] is True and line["prefill_status"].startswith("5")
    px_off = proxy_factory([bad.addr], [d.addr], fallback=False)
    st, _, data = post(px_off.url + "/v1/completions", body)
    assert st == 502 and json.loads(data)["error"]["code"] == 502
