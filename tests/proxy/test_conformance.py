"""Proxy conformance with recording backends: what each leg receives, field by
field, and what the client gets back."""
from __future__ import annotations

import json
import re
import threading
import time

import pytest

from tests.proxy.harness import (
    needs_nginx,
    open_stream,
    post,
    read_chunk,
    sse_events,
)

pytestmark = needs_nginx

PREFILL_KV = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
              "remote_block_ids": None, "remote_host": None, "remote_port": None}

COMPLETION = {"model": "demo-model", "prompt": "The capital of France is", "max_tokens": 5,
              "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True},
              "min_tokens": 2, "logprobs": 1, "seed": 7, "n": 1, "top_p": 0.9,
              "ignore_eos": True, "extra": {"nested": [1, 2, {"x": None}]}}

CHAT = {"model": "demo-model",
        "messages": [{"role": "system", "content": "be brief"},
                     {"role": "user", "content": "What is the capital of France?"}],
        "max_completion_tokens": 6, "max_tokens": 6, "min_completion_tokens": 1,
        "min_tokens": 1, "stream": False, "temperature": 0.5, "tools": [],
        "response_format": {"type": "text"}}

def read_rest(f) -> bytes:
    """Every remaining chunk of a chunked response, until the terminating one."""
    rest = b""
    while True:
        c = read_chunk(f)
        if not c:
            return rest
        rest += c



@pytest.fixture
def pd(backends, proxy_factory):
    """One prefill, one decode, default options."""
    (p,), (d,) = backends(1, 1)
    px = proxy_factory([p.addr], [d.addr])
    return px, p, d


def expected_prefill(body: dict) -> dict:
    e = dict(body)
    e["stream"] = False
    e["max_tokens"] = 1
    if "max_completion_tokens" in body:
        e["max_completion_tokens"] = 1
    for k in ("stream_options", "min_tokens", "min_completion_tokens"):
        e.pop(k, None)
    e["kv_transfer_params"] = PREFILL_KV
    return e


def check_legs(p, d, body: dict, path: str, rid: str):
    (preq,) = p.gen_requests()
    (dreq,) = d.gen_requests()
    assert preq["path"] == path and dreq["path"] == path
    assert preq["method"] == "POST" and dreq["method"] == "POST"
    # prefill leg, field by field
    exp = expected_prefill(body)
    assert set(preq["json"]) == set(exp), set(preq["json"]) ^ set(exp)
    for k, v in exp.items():
        assert preq["json"][k] == v, k
    # decode leg: the client's body, unchanged, plus the prefill's kv_transfer_params
    kv = p.prefill_response(body, rid)["kv_transfer_params"]
    assert set(dreq["json"]) == set(body) | {"kv_transfer_params"}
    for k, v in body.items():
        assert dreq["json"][k] == v, k
    assert dreq["json"]["kv_transfer_params"] == kv
    # the same request id on both legs; Content-Length right on both
    assert preq["headers"]["x-request-id"] == rid
    assert dreq["headers"]["x-request-id"] == rid
    assert int(preq["headers"]["content-length"]) == len(preq["raw"])
    assert int(dreq["headers"]["content-length"]) == len(dreq["raw"])
    assert preq["headers"]["content-type"] == "application/json"
    return preq, dreq


def test_completions_streaming_rewrites(pd):
    px, p, d = pd
    st, h, data = post(px.url + "/v1/completions", COMPLETION,
                       {"X-Request-Id": "client-rid-1"})
    assert st == 200, data
    assert h["x-request-id"] == "client-rid-1"
    assert h["content-type"].startswith("text/event-stream")
    ev = sse_events(data)
    assert ev[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in ev[:-1] if e["choices"]) == \
        "t0 t1 t2 t3 t4 "
    _, dreq = check_legs(p, d, COMPLETION, "/v1/completions", "client-rid-1")
    # the decode body is the client's bytes plus one key (not re-serialized)
    assert dreq["raw"].startswith(json.dumps(COMPLETION).encode()[:-1])


def test_chat_non_streaming_rewrites_and_generated_request_id(pd):
    px, p, d = pd
    st, h, data = post(px.url + "/v1/chat/completions", CHAT)
    assert st == 200, data
    rid = h["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", rid)
    out = json.loads(data)
    assert out["choices"][0]["message"]["content"] == "t0 t1 t2 t3 t4 t5 "
    preq, dreq = check_legs(p, d, CHAT, "/v1/chat/completions", rid)
    assert preq["json"]["max_completion_tokens"] == 1


def test_client_kv_transfer_params_replaced_not_duplicated(pd):
    px, p, d = pd
    body = {"model": "m", "prompt": "hello there", "max_tokens": 2,
            "kv_transfer_params": {"bogus": 1}}
    st, _, data = post(px.url + "/v1/completions", body)
    assert st == 200, data
    (dreq,) = d.gen_requests()
    assert dreq["raw"].count(b'"kv_transfer_params"') == 1
    assert dreq["json"]["kv_transfer_params"]["remote_engine_id"] == f"eng-{p.port}"
    (preq,) = p.gen_requests()
    assert preq["json"]["kv_transfer_params"] == PREFILL_KV


def test_streaming_is_incremental(pd):
    """The first chunk reaches the client while the backend still holds the rest."""
    px, p, d = pd
    d.gate = threading.Event()
    body = dict(COMPLETION, stream_options=None)
    del body["stream_options"]
    s, f, status, hdrs = open_stream(px.url + "/v1/completions", body)
    try:
        assert b" 200 " in status
        assert hdrs.get("transfer-encoding") == "chunked"
        first = read_chunk(f)          # would time out if the proxy buffered
        assert b"t0" in first
        assert len(d.chunk_times) == 1  # the backend has sent only its first chunk
        t_first = time.monotonic()
        d.gate.set()
        rest = read_rest(f)
        assert d.chunk_times[-1] > d.chunk_times[0]
        assert t_first < d.chunk_times[-1]
        assert rest.endswith(b"data: [DONE]\n\n")
    finally:
        s.close()


def test_streaming_with_usage_fix_is_incremental(pd):
    """Same through the usage-fixing body filter (stream_options.include_usage)."""
    px, p, d = pd
    d.gate = threading.Event()
    s, f, status, hdrs = open_stream(px.url + "/v1/completions", COMPLETION)
    try:
        assert b" 200 " in status
        first = read_chunk(f)
        assert b"t0" in first and len(d.chunk_times) == 1
        d.gate.set()
        rest = read_rest(f)
    finally:
        s.close()
    ev = sse_events(first + rest)
    (usage,) = [e["usage"] for e in ev[:-1] if e.get("usage")]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 2}      # fixed
    assert ev[-1] == "[DONE]"


def test_streaming_usage_event_passthrough_without_include_usage(pd):
    """No usage requested: bytes go through unchanged (no body filter)."""
    px, p, d = pd
    body = {"model": "m", "prompt": "x" * 40, "max_tokens": 3, "stream": True}
    st, _, data = post(px.url + "/v1/completions", body)
    assert st == 200
    ev = sse_events(data)
    assert len(ev) == 4 and ev[-1] == "[DONE]"
    assert all("usage" not in e for e in ev[:-1])


def test_usage_fixed_from_prefill_non_streaming(pd):
    px, p, d = pd
    body = {"model": "m", "prompt": "y" * 80, "max_tokens": 3}
    st, h, data = post(px.url + "/v1/completions", body)
    assert st == 200
    assert "content-length" not in h or int(h["content-length"]) == len(data)
    usage = json.loads(data)["usage"]
    pre = p.prefill_response(body, "x")["usage"]
    assert usage["prompt_tokens"] == pre["prompt_tokens"] == 20
    assert usage["prompt_tokens_details"] == pre["prompt_tokens_details"]
    assert usage["completion_tokens"] == 3
    assert usage["total_tokens"] == 23


def test_usage_fixed_from_prefill_streaming(pd):
    px, p, d = pd
    body = {"model": "m", "prompt": "z" * 120, "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}}
    st, _, data = post(px.url + "/v1/completions", body)
    assert st == 200
    ev = sse_events(data)
    assert ev[-1] == "[DONE]"
    usage = [e["usage"] for e in ev[:-1] if e.get("usage")]
    assert usage == [{"prompt_tokens": 30, "completion_tokens": 4, "total_tokens": 34,
                      "prompt_tokens_details": {"cached_tokens": 2}}]
    # the token events are intact
    assert "".join(e["choices"][0]["text"] for e in ev[:-1] if e["choices"]) == \
        "t0 t1 t2 t3 "


def test_usage_fix_with_usage_event_split_across_reads(pd):
    px, p, d = pd
    d.split_writes = True
    body = {"model": "m", "prompt": "s" * 40, "max_tokens": 2, "stream": True,
            "stream_options": {"include_usage": True}}
    st, _, data = post(px.url + "/v1/completions", body)
    assert st == 200
    assert data.endswith(b"data: [DONE]\n\n")
    ev = sse_events(data)
    (usage,) = [e["usage"] for e in ev[:-1] if e.get("usage")]
    assert usage == {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12,
                     "prompt_tokens_details": {"cached_tokens": 2}}
    assert b"\n\ndata: {" in data and data.count(b"data: ") == 4


def test_usage_left_alone_when_right(pd):
    px, p, d = pd
    d.usage_bug = False
    body = {"model": "m", "prompt": "q" * 40, "max_tokens": 2}
    st, _, data = post(px.url + "/v1/completions", body)
    assert st == 200
    # decode's own numbers differ from prefill only in cached tokens (0 vs 2):
    # the prefill's count is what the client sees
    usage = json.loads(data)["usage"]
    assert usage["prompt_tokens"] == 10
    assert usage["prompt_tokens_details"] == {"cached_tokens": 2}


def test_short_prompt_skips_prefill(backends, proxy_factory):
    (p,), (d,) = backends(1, 1)
    px = proxy_factory([p.addr], [d.addr], min_prefill_chars=50)
    short = {"model": "m", "prompt": "short prompt", "max_tokens": 2}
    st, h, data = post(px.url + "/v1/completions", short)
    assert st == 200, data
    assert p.gen_requests() == []
    (dreq,) = d.gen_requests()
    assert dreq["raw"] == json.dumps(short).encode()
    assert dreq["headers"]["x-request-id"] == h["x-request-id"]
    # chat: content parts are counted too; long enough -> PD
    long_chat = {"model": "m", "max_tokens": 2, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "w" * 60}]}]}
    st, _, _ = post(px.url + "/v1/chat/completions", long_chat)
    assert st == 200
    assert len(p.gen_requests()) == 1
    lines = px.pd_lines(2)
    assert [x["mode"] for x in lines] == ["decode_only", "pd"]


def test_other_endpoints(pd):
    px, p, d = pd
    from tests.proxy.harness import http

    st, h, data = http("GET", px.url + "/v1/models")
    assert st == 200
    assert json.loads(data)["data"][0]["owned_by"] == d.addr
    st, h, data = http("GET", px.url + "/nope/at/all")
    assert st == 404
    err = json.loads(data)["error"]
    assert err["code"] == 404 and err["type"] == "NotFoundError" and err["message"]
    assert h["content-type"] == "application/json"
    st, h, data = http("POST", px.url + "/V1/Completions", {"prompt": "x"})
    assert st == 404                       # paths are case-sensitive, as in vLLM
    deadline = time.monotonic() + 5           # two 404s so far: /nope/at/all and this one
    while len([x for x in px.log_lines() if x["status"] == 404]) < 2 and \
            time.monotonic() < deadline:
        time.sleep(0.02)
    assert [x["route"] for x in px.log_lines() if x["status"] == 404] == ["other", "other"]
    st, h, data = http("GET", px.url + "/v1/completions")
    assert st == 405
    assert json.loads(data)["error"]["code"] == 405
    st, _, data = http("GET", px.url + "/health")
    assert st == 200
    hv = json.loads(data)
    assert hv["proxy"] == "up"
    assert hv["pools"]["prefill"]["total"] == 1 and hv["pools"]["decode"]["total"] == 1
    assert hv["pools"]["prefill"]["healthy"] == 1 and hv["pools"]["decode"]["healthy"] == 1
