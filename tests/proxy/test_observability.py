"""/metrics (parsed with prometheus_client's parser), /health and the JSON access log."""
from __future__ import annotations

import collections
import json
import time

from tests.proxy.harness import closed_addr, http, metric, needs_nginx, parse_metrics, post

pytestmark = needs_nginx

BODY = {"model": "demo-model", "prompt": "a prompt of some length", "max_tokens": 2}
CHAT = {"model": "demo-model", "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 2, "stream": True}
LOG_FIELDS = {
    "time": str, "request_id": str, "route": str, "method": str, "status": int, "mode": str,
    "fallback": bool, "prefill_upstream": str, "prefill_status": str,
    "decode_upstream": str, "decode_status": str, "prefill_time": (float, int, type(None)),
    "decode_ttfb": (float, int, type(None)), "decode_time": (float, int, type(None)),
    "total_time": (float, int), "bytes_sent": int, "request_length": int,
    "prefill_retries": int, "decode_retries": int, "retries": int, "stream_error": str,
    "inflight_limit": str, "client": str,
}


def scrape(px, until=None, timeout: float = 5.0) -> dict:
    """Parsed /metrics; polls until `until(m)` holds (the agent tails the log)."""
    deadline = time.monotonic() + timeout
    while True:
        st, h, data = http("GET", px.url + "/metrics")
        assert st == 200
        assert h["content-type"].startswith("text/plain")
        m = parse_metrics(data.decode())
        if until is None or until(m) or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


def test_metrics_health_and_access_log(backends, proxy_factory):
    (p,), (d,) = backends(1, 1)
    dead = closed_addr("127.0.1.124")
    # max_fails=0: no passive health, so the dead decode peer is tried again and again
    px = proxy_factory([p.addr], [dead, d.addr], decode_balance="round_robin", max_fails=0)
    seen = collections.Counter()

    def call(method, path, body=None, headers=None):
        st, h, data = http(method, px.url + path, body, headers)
        seen[(path, st)] += 1
        return st, h, data

    for _ in range(4):
        assert call("POST", "/v1/completions", BODY)[0] == 200
    for _ in range(2):
        assert call("POST", "/v1/chat/completions", CHAT)[0] == 200
    p.faults = [{"kind": "status", "status": 500, "body": b"x"}]     # one fallback
    assert call("POST", "/v1/completions", BODY)[0] == 200
    assert call("POST", "/v1/completions", b"{bad json")[0] == 400
    assert call("GET", "/v1/completions")[0] == 405
    assert call("GET", "/no/such/path")[0] == 404
    assert call("GET", "/v1/models")[0] == 200
    n_pd = 9   # 4 + 2 + fallback + 400 + 405

    # ---------------------------------------------------------- access log
    lines = px.pd_lines(n_pd)
    assert len(lines) == n_pd
    for x in px.log_lines():
        assert set(x) == set(LOG_FIELDS), set(x) ^ set(LOG_FIELDS)
        for k, t in LOG_FIELDS.items():
            assert isinstance(x[k], t), (k, x[k])
    ok = [x for x in lines if x["status"] == 200]
    assert len(ok) == 7
    for x in ok:
        assert x["request_id"] and x["decode_upstream"].endswith(d.addr)
        assert x["total_time"] + 0.002 >= x["decode_time"] >= 0   # ms clocks, rounded
        assert x["decode_ttfb"] is not None and x["bytes_sent"] > 0
        assert x["retries"] == x["prefill_retries"] + x["decode_retries"]
        assert x["mode"] in ("pd", "fallback")
    pd_ok = [x for x in ok if x["mode"] == "pd"]
    assert len(pd_ok) == 6 and all(x["prefill_upstream"] == p.addr for x in pd_ok)
    assert all(x["prefill_time"] is not None for x in pd_ok)
    (fb,) = [x for x in lines if x["fallback"]]
    assert fb["mode"] == "fallback" and fb["prefill_status"] == "500"
    decode_retries = sum(x["decode_retries"] for x in lines)
    assert decode_retries >= 3          # every other request met the dead peer first

    # ---------------------------------------------------------- metrics
    def route_of(path):
        return path if path.startswith("/v1/") else "other"

    def settled(m):
        # readiness polls of /health/agent are "other" too: wait for the last call
        return metric(m, "pd_proxy_requests_total", route="/v1/models", status="200") >= 1

    m = scrape(px, settled)
    for (path, st), n in seen.items():
        assert metric(m, "pd_proxy_requests_total", route=route_of(path), status=str(st)) == n, \
            (path, st)
    assert metric(m, "pd_proxy_fallbacks_total") == 1
    assert metric(m, "pd_proxy_retries_total", leg="decode") == decode_retries
    assert metric(m, "pd_proxy_retries_total", leg="prefill") == 0
    assert metric(m, "pd_proxy_upstream_failures_total", pool="decode", upstream=dead) == \
        decode_retries
    assert metric(m, "pd_proxy_upstream_failures_total", pool="prefill", upstream=p.addr) == 1
    assert metric(m, "pd_proxy_upstream_attempts_total", pool="prefill", upstream=p.addr) == 7
    assert metric(m, "pd_proxy_pd_requests_total", mode="pd") == 6
    assert metric(m, "pd_proxy_pd_requests_total", mode="fallback") == 1
    assert metric(m, "pd_proxy_prefill_duration_seconds_count") == 7
    assert metric(m, "pd_proxy_decode_first_byte_seconds_count") == 7
    assert metric(m, "pd_proxy_decode_duration_seconds_count") == 7
    assert metric(m, "pd_proxy_request_duration_seconds_count",
                  route="/v1/completions") == 7
    assert metric(m, "pd_proxy_request_duration_seconds_bucket",
                  route="/v1/completions", le="+Inf") == 7
    assert metric(m, "pd_proxy_bytes_sent_total") > 0
    assert metric(m, "pd_proxy_log_parse_errors_total") == 0
    assert metric(m, "pd_proxy_upstreams", pool="decode") == 2
    assert metric(m, "pd_proxy_upstreams_healthy", pool="prefill") == 1

    # ---------------------------------------------------------- health
    st, _, data = http("GET", px.url + "/health")
    assert st == 200
    hv = json.loads(data)
    assert hv["proxy"] == "up" and hv["status"] == "ok"
    # max_fails=0 and no active checks: nginx never takes a peer out, nor does /health
    assert hv["pools"]["decode"]["total"] == 2 and hv["pools"]["decode"]["healthy"] == 2


def test_health_passive_view(backends, proxy_factory):
    """A peer that just failed (max_fails=1) is out for fail_timeout_s, in nginx
    and in /health."""
    (p,), (d,) = backends(1, 1)
    dead = closed_addr("127.0.1.124")
    px = proxy_factory([p.addr], [dead, d.addr], decode_balance="round_robin")
    for _ in range(3):
        assert post(px.url + "/v1/completions", BODY)[0] == 200
    px.pd_lines(3)
    deadline = time.monotonic() + 5
    while True:
        hv = json.loads(http("GET", px.url + "/health")[2])
        if hv["pools"]["decode"]["healthy"] == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert hv["pools"]["decode"]["total"] == 2 and hv["pools"]["decode"]["healthy"] == 1
    (bad,) = [u for u in hv["pools"]["decode"]["upstreams"] if not u["healthy"]]
    assert bad["upstream"] == dead and bad["recent_failure"] is True
    assert hv["pools"]["prefill"]["healthy"] == 1 and hv["status"] == "ok"
    m = scrape(px)
    assert metric(m, "pd_proxy_upstream_healthy", pool="decode", upstream=dead) == 0
    assert metric(m, "pd_proxy_upstream_healthy", pool="decode", upstream=d.addr) == 1
    # passive health: only the first request met the dead peer
    assert metric(m, "pd_proxy_upstream_failures_total", pool="decode", upstream=dead) == 1


def test_health_and_metrics_without_agent(backends, proxy_factory):
    """The proxy serves without its agent; /health says so, /metrics is a 503 JSON."""
    (p,), (d,) = backends(1, 1)
    px = proxy_factory([p.addr], [d.addr], agent=False)
    st, _, data = http("GET", px.url + "/health")
    assert st == 200
    assert json.loads(data) == {"status": "ok", "proxy": "up", "agent": "down", "pools": None}
    st, _, data = http("GET", px.url + "/metrics")
    assert st == 503 and json.loads(data)["error"]["code"] == 503
    assert post(px.url + "/v1/completions", BODY)[0] == 200
