"""Every failure case of the proxy, triggered against recording backends."""
from __future__ import annotations

import json
import socket
import time

import pytest

from tests.proxy.harness import closed_addr, http, needs_nginx, open_stream, post, read_chunk

pytestmark = needs_nginx

BODY = {"model": "demo-model", "prompt": "Once upon a time", "max_tokens": 3}
ERR_400 = json.dumps({"object": "error", "message": "max_tokens too large",
                      "type": "BadRequestError", "param": None, "code": 400}).encode()


def is_openai_error(data: bytes, code: int) -> dict:
    err = json.loads(data)["error"]
    assert err["code"] == code and err["type"] and err["message"], err
    return err


# ------------------------------------------------------------------ prefill


def test_prefill_4xx_returned_as_is(backends, proxy_factory):
    (p,), (d,) = backends(1, 1)
    p.fault_always = {"kind": "status", "status": 400, "body": ERR_400}
    px = proxy_factory([p.addr], [d.addr])
    st, h, data = post(px.url + "/v1/completions", BODY, {"X-Request-Id": "r4"})
    assert st == 400
    assert data == ERR_400
    assert h["content-type"].startswith("application/json")
    assert h["x-request-id"] == "r4"
    assert d.gen_requests() == []
    assert len(p.gen_requests()) == 1          # a 4xx is not retried
    (line,) = px.pd_lines(1)
    assert line["mode"] == "prefill_error" and line["status"] == 400


def test_prefill_5xx_retried_on_another_upstream(backends, proxy_factory):
    (p0, p1), (d,) = backends(2, 1)
    p0.fault_always = {"kind": "status", "status": 500, "body": b"{}"}
    px = proxy_factory([p0.addr, p1.addr], [d.addr], prefill_balance="round_robin")
    for _ in range(4):
        st, _, data = post(px.url + "/v1/completions", BODY)
        assert st == 200, data
    assert len(p0.gen_requests()) == 1          # then out for fail_timeout (passive health)
    assert len(p1.gen_requests()) == 4
    # the retry carries the same rewritten body and request id
    first = p0.gen_requests()[0]
    retry = next(r for r in p1.gen_requests()
                 if r["headers"]["x-request-id"] == first["headers"]["x-request-id"])
    assert retry["raw"] == first["raw"] and retry["json"]["max_tokens"] == 1
    # every decode got p1's kv_transfer_params: no fallback
    assert all(r["json"]["kv_transfer_params"]["remote_port"] == p1.port
               for r in d.gen_requests())
    lines = px.pd_lines(4)
    retried = [x for x in lines if x["prefill_retries"]]
    assert len(retried) == 1
    assert retried[0]["prefill_status"] == "500, 200"
    assert retried[0]["prefill_upstream"] == f"{p0.addr}, {p1.addr}"
    assert retried[0]["retries"] == 1 and retried[0]["fallback"] is False


def test_prefill_connect_error_retried(backends, proxy_factory):
    (p,), (d,) = backends(1, 1)
    dead = closed_addr("127.0.1.114")
    px = proxy_factory([dead, p.addr], [d.addr], prefill_balance="round_robin")
    for _ in range(3):
        st, _, data = post(px.url + "/v1/completions", BODY)
        assert st == 200, data
    assert len(p.gen_requests()) == 3
    statuses = [x["prefill_status"] for x in px.pd_lines(3)]
    assert "502, 200" in statuses


def test_prefill_timeout_retried(backends, proxy_factory):
    (p0, p1), (d,) = backends(2, 1)
    p0.fault_always = {"kind": "sleep", "s": 4}
    px = proxy_factory([p0.addr, p1.addr], [d.addr], prefill_balance="round_robin",
                       prefill_timeout_s=1)
    t0 = time.monotonic()
    st, _, data = post(px.url + "/v1/completions", BODY)
    assert st == 200, data
    (line,) = px.pd_lines(1)
    if line["prefill_retries"]:                 # p0 was tried first
        assert line["prefill_status"] == "504, 200"
        assert 0.9 < time.monotonic() - t0 < 3.5
    st, _, data = post(px.url + "/v1/completions", BODY)
    assert st == 200
    assert len(p1.gen_requests()) == 2


def test_all_prefills_fail_fallback_to_decode_only(backends, proxy_factory):
    (p0, p1), (d,) = backends(2, 1)
    for p in (p0, p1):
        p.fault_always = {"kind": "status", "status": 503, "body": b"overloaded"}
    px = proxy_factory([p0.addr, p1.addr], [d.addr])
    st, h, data = post(px.url + "/v1/completions", BODY, {"X-Request-Id": "fb1"})
    assert st == 200, data
    assert json.loads(data)["choices"][0]["text"] == "t0 t1 t2 "
    (dreq,) = d.gen_requests()
    assert dreq["raw"] == json.dumps(BODY).encode()      # no kv_transfer_params
    assert dreq["headers"]["x-request-id"] == "fb1"
    assert len(p0.gen_requests()) + len(p1.gen_requests()) == 2   # bounded: one each
    (line,) = px.pd_lines(1)
    assert line["fallback"] is True and line["mode"] == "fallback"
    assert line["prefill_status"] == "503, 503"


def test_prefill_attempts_bound(backends, proxy_factory):
    (p0, p1, p2), (d,) = backends(3, 1)
    for p in (p0, p1, p2):
        p.fault_always = {"kind": "status", "status": 500, "body": b"x"}
    px = proxy_factory([p0.addr, p1.addr, p2.addr], [d.addr], prefill_attempts=2)
    st, _, _ = post(px.url + "/v1/completions", BODY)
    assert st == 200
    assert sum(len(p.gen_requests()) for p in (p0, p1, p2)) == 2


def test_all_prefills_fail_without_fallback(backends, proxy_factory):
    _, (d,) = backends(0, 1)
    dead = [closed_addr("127.0.1.114"), closed_addr("127.0.1.115")]
    px = proxy_factory(dead, [d.addr], fallback=False)
    st, h, data = post(px.url + "/v1/completions", BODY)
    assert st == 502, data
    is_openai_error(data, 502)
    assert h["content-type"] == "application/json"
    # both peers are now out (max_fails=1): no live upstream -> 503
    st, _, data = post(px.url + "/v1/chat/completions",
                       {"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert st == 503, data
    is_openai_error(data, 503)
    assert d.gen_requests() == []
    assert [x["mode"] for x in px.pd_lines(2)] == ["error", "error"]


# ------------------------------------------------------------------ decode


def test_decode_connect_error_retried(backends, proxy_factory):
    (p,), (d,) = backends(1, 1)
    dead = closed_addr("127.0.1.124")
    px = proxy_factory([p.addr], [dead, d.addr], decode_balance="round_robin")
    for stream in (False, True, False):
        st, _, data = post(px.url + "/v1/completions", dict(BODY, stream=stream))
        assert st == 200, data
        assert data
    assert len(d.gen_requests()) == 3
    lines = px.pd_lines(3)
    assert any(x["decode_status"] == "502, 200" and x["decode_retries"] == 1 for x in lines)


def test_decode_error_status_and_body_go_to_client(backends, proxy_factory):
    (p,), (d0, d1) = backends(1, 2)
    body = json.dumps({"object": "error", "message": "engine exploded", "code": 500}).encode()
    d0.fault_always = {"kind": "status", "status": 500, "body": body}
    d1.fault_always = {"kind": "status", "status": 500, "body": body}
    px = proxy_factory([p.addr], [d0.addr, d1.addr])
    st, h, data = post(px.url + "/v1/completions", BODY)
    assert st == 500
    assert data == body
    assert len(d0.gen_requests()) + len(d1.gen_requests()) == 1    # not retried


def test_decode_dropped_before_header_is_502_not_empty_200(backends, proxy_factory):
    (p,), (d0, d1) = backends(1, 2)
    for d in (d0, d1):
        d.fault_always = {"kind": "drop"}
    # max_fails=0: no passive health, so only the retry rule decides what is tried
    px = proxy_factory([p.addr], [d0.addr, d1.addr], max_fails=0)
    for stream in (False, True):
        st, h, data = post(px.url + "/v1/completions", dict(BODY, stream=stream))
        assert st == 502, (st, data)
        is_openai_error(data, 502)
        assert h["x-request-id"]
    # the request reached an engine: not retried elsewhere
    assert len(d0.gen_requests()) + len(d1.gen_requests()) == 2
    assert [x["decode_retries"] for x in px.pd_lines(2)] == [0, 0]


def test_decode_timeout_before_header(backends, proxy_factory):
    (p,), (d,) = backends(1, 1)
    d.fault_always = {"kind": "sleep", "s": 4}
    px = proxy_factory([p.addr], [d.addr], decode_timeout_s=1)
    st, _, data = post(px.url + "/v1/completions", BODY)
    assert st == 504
    is_openai_error(data, 504)


def test_client_disconnect_closes_decode_connection(backends, proxy_factory):
    (p,), (d,) = backends(1, 1)
    import threading

    d.gate = threading.Event()        # the backend holds the stream after chunk 1
    px = proxy_factory([p.addr], [d.addr])
    body = dict(BODY, stream=True, max_tokens=50)
    s, f, status, _ = open_stream(px.url + "/v1/completions", body)
    assert b" 200 " in status
    assert b"t0" in read_chunk(f)
    s.shutdown(socket.SHUT_RDWR)
    s.close()
    t0 = time.monotonic()
    deadline = t0 + 5
    while not d.closed_by_peer and time.monotonic() < deadline:
        time.sleep(0.02)
    assert d.closed_by_peer, "the decode connection stayed open after the client left"
    assert len(d.chunk_times) == 1        # the engine produced nothing more
    # the proxy still serves afterwards
    d.gate.set()
    st, _, _ = post(px.url + "/v1/completions", BODY)
    assert st == 200


# ------------------------------------------------------------------ client errors


@pytest.fixture
def strict(backends, proxy_factory):
    (p,), (d,) = backends(1, 1)
    px = proxy_factory([p.addr], [d.addr], max_body_size="2k", api_key="sk-test.1+23",
                       engine_api_key="engine-key-9")
    return px, p, d


AUTH = {"Authorization": "Bearer sk-test.1+23"}


def test_malformed_json_400(strict):
    px, p, d = strict
    for raw in (b'{"model": "m", "prompt": ', b"[1, 2]", b"", b"null", b"\xff\xfe"):
        st, h, data = post(px.url + "/v1/completions", raw, AUTH)
        assert st == 400, (raw, st, data)
        is_openai_error(data, 400)
    assert p.gen_requests() == [] and d.gen_requests() == []


def test_body_over_limit_413(strict):
    px, p, d = strict
    big = dict(BODY, prompt="x" * 4000)
    st, _, data = post(px.url + "/v1/completions", big, AUTH)
    assert st == 413
    is_openai_error(data, 413)
    # chunked upload over the limit, too
    s = socket.create_connection((px.host, px.port), timeout=5)
    payload = json.dumps(big).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH['Authorization']}"
            "\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
            "Connection: close\r\n\r\n").encode()
    s.sendall(head + b"%x\r\n" % len(payload) + payload + b"\r\n0\r\n\r\n")
    resp = b""
    while chunk := s.recv(65536):
        resp += chunk
    s.close()
    assert resp.startswith(b"HTTP/1.1 413"), resp[:100]
    assert b'"RequestTooLargeError"' in resp
    assert p.gen_requests() == [] and d.gen_requests() == []


def test_api_key(strict):
    px, p, d = strict
    wrong = ["", "Bearer wrong", "sk-test.1+23", "Bearer SK-TEST.1+23", "bearer sk-test.1+23",
             "Bearer sk-test.1+234", "Bearer sk-test.1+2", "Bearer sk-testX1+23",
             "Bearer sk-test.1123", "Bearer sk-test.11123", "Bearer  sk-test.1+23"]
    for hdrs in [{"Authorization": w} if w else {} for w in wrong]:
        for path in ("/v1/completions", "/v1/chat/completions"):
            st, _, data = post(px.url + path, BODY, hdrs)
            assert st == 401, (hdrs, path)
            is_openai_error(data, 401)
        st, _, _ = http("GET", px.url + "/v1/models", headers=hdrs)
        assert st == 401
    assert p.gen_requests() == [] and d.gen_requests() == []
    st, _, data = post(px.url + "/v1/completions", BODY, AUTH)
    assert st == 200, data
    assert http("GET", px.url + "/v1/models", headers=AUTH)[0] == 200
    assert http("GET", px.url + "/health")[0] == 200        # no key needed
    # engines get the engine key, never the client's
    for r in p.gen_requests() + d.gen_requests():
        assert r["headers"]["authorization"] == "Bearer engine-key-9"
    # the keys are nowhere but in the 0600 config file
    px.log_lines(len(px.log_lines()) + 1, timeout=0.5)
    for f in px.logs.values():
        text = f.read_text()
        assert "sk-test.1+23" not in text and "engine-key-9" not in text
    assert "sk-test" not in px.access_log.read_text()
    import os
    import stat

    conf = px.unit["files"][0]
    assert conf["path"].endswith("nginx.conf") and conf["mode"] == "0600"
    assert stat.S_IMODE(os.stat(conf["path"]).st_mode) == 0o600
    assert "sk-test" not in json.dumps({k: v for k, v in px.unit.items() if k != "files"})
    for f in px.unit["files"][1:]:
        assert "sk-test" not in f["content"] and "engine-key" not in f["content"]


def test_large_prefill_response_fits_by_default(backends, proxy_factory):
    """kv_transfer_params with many blocks (or echo / prompt logprobs) make big
    prefill responses: the default buffer is max(16m, 2 x max_body_size)."""
    (p,), (d,) = backends(1, 1)
    kvp = {"do_remote_prefill": True, "remote_block_ids": list(range(300000)),
           "remote_engine_id": "e", "remote_host": "h", "remote_port": 1}
    big = json.dumps({"choices": [], "kv_transfer_params": kvp}).encode()
    assert len(big) > 2 << 20
    p.fault_always = {"kind": "status", "status": 200, "body": big}
    px = proxy_factory([p.addr], [d.addr])
    st, _, data = post(px.url + "/v1/completions", BODY)
    assert st == 200, data
    (dreq,) = d.gen_requests()
    assert dreq["json"]["kv_transfer_params"] == kvp


def test_prefill_response_over_buffer_limit(backends, proxy_factory):
    """Known limit (docs/proxy.md): nginx ends the client connection when a prefill
    response exceeds prefill_response_buffer; njs cannot catch it. The proxy keeps
    serving and the access log line stays valid JSON."""
    import http.client

    (p,), (d,) = backends(1, 1)
    big = json.dumps({"kv_transfer_params": {"remote_block_ids": list(range(3000))}})
    p.faults = [{"kind": "status", "status": 200, "body": big.encode()}]
    px = proxy_factory([p.addr], [d.addr], prefill_response_buffer="4k")
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        post(px.url + "/v1/completions", BODY)
    assert post(px.url + "/v1/completions", BODY)[0] == 200
    first, second = px.pd_lines(2)
    assert first["status"] == 0 and second["status"] == 200
