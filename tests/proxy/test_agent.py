"""The proxy agent's log accounting and health rules, without nginx."""
from __future__ import annotations

import json

from pd_launcher.proxy_agent import Agent, Metrics, _pairs
from tests.proxy.harness import metric, parse_metrics

POOLS = {
    "prefill": {"name": "pd_prefill", "servers": ["10.0.0.1:1", "10.0.0.2:1"]},
    "decode": {"name": "pd_decode", "servers": ["10.0.0.5:1"]},
}


def line(**kw) -> dict:
    base = {"route": "/v1/completions", "status": 200, "mode": "pd", "fallback": False,
            "prefill_upstream": "10.0.0.1:1", "prefill_status": "200",
            "decode_upstream": "10.0.0.5:1", "decode_status": "200", "prefill_time": 0.01,
            "decode_ttfb": 0.002, "decode_time": 0.2, "total_time": 0.22, "bytes_sent": 100,
            "prefill_retries": 0, "decode_retries": 0, "retries": 0}
    base.update(kw)
    return base


def test_pairs():
    assert _pairs("a:1, b:2", "502, 200") == [("a:1", "502"), ("b:2", "200")]
    assert _pairs("a:1, b:2 : c:3", "504, 502 : 200") == [("a:1", "504"), ("b:2", "502"),
                                                         ("c:3", "200")]
    assert _pairs("", "") == []
    assert _pairs("a:1", "") == [("a:1", "-")]


def test_passive_rule_follows_max_fails():
    m = Metrics(POOLS, max_fails=2)
    bad = line(prefill_upstream="10.0.0.1:1, 10.0.0.2:1", prefill_status="500, 200",
               prefill_retries=1, retries=1)
    m.add(bad, now=100.0)
    assert not m.passive_failing("prefill", "10.0.0.1:1", 101.0, 10, 2)   # 1 of 2
    m.add(bad, now=102.0)
    assert m.passive_failing("prefill", "10.0.0.1:1", 103.0, 10, 2)
    assert not m.passive_failing("prefill", "10.0.0.1:1", 111.0, 10, 2)   # window passed
    assert not m.passive_failing("prefill", "10.0.0.1:1", 103.0, 10, 0)   # max_fails 0
    assert len(m.recent_failures[("prefill", "10.0.0.1:1")]) <= 2          # bounded
    # decode: an engine's own 500 is not a passive failure (nginx counts only
    # connect errors and timeouts there), a 502 from nginx is
    m.add(line(decode_status="500", status=500), now=104.0)
    m.add(line(decode_status="500", status=500), now=104.0)
    assert not m.passive_failing("decode", "10.0.0.5:1", 105.0, 10, 2)
    m.add(line(decode_status="502", status=502), now=104.0)
    m.add(line(decode_status="502", status=502), now=104.0)
    assert m.passive_failing("decode", "10.0.0.5:1", 105.0, 10, 2)


def test_metrics_text_parses_and_counts(tmp_path):
    cfg = {"listen": "127.0.0.1:0", "access_log": str(tmp_path / "a.log"),
           "pid_path": "", "upstreams_path": "", "pools": POOLS, "fail_timeout_s": 10,
           "max_fails": 1, "health": {"enabled": False, "path": "/health", "interval_s": 5,
                                      "timeout_s": 2, "fails": 2, "passes": 1}}
    a = Agent(cfg)
    a.metrics.add(line(), 1.0)
    a.metrics.add(line(mode="fallback", fallback=True, prefill_upstream="pd_prefill",
                       prefill_status="502", prefill_time=0.0), 1.0)
    a.metrics.add(line(route="/v1/chat/completions", mode="decode_only", prefill_upstream="",
                       prefill_status="", prefill_time=None), 1.0)
    a.metrics.add(line(route="/nope", status=404, mode="-", decode_upstream="",
                       decode_status=""), 1.0)
    m = parse_metrics(a.metrics_text())
    assert metric(m, "pd_proxy_requests_total", route="/v1/completions", status="200") == 2
    assert metric(m, "pd_proxy_requests_total", route="other", status="404") == 1
    assert metric(m, "pd_proxy_fallbacks_total") == 1
    assert metric(m, "pd_proxy_prefill_skipped_total") == 1
    assert metric(m, "pd_proxy_no_live_upstreams_total", pool="prefill") == 1
    assert metric(m, "pd_proxy_prefill_duration_seconds_count") == 2   # failed legs too
    assert metric(m, "pd_proxy_decode_duration_seconds_count") == 3
    assert metric(m, "pd_proxy_request_duration_seconds_bucket", route="/v1/completions",
                  le="0.25") == 2
    hv = a.health_view()
    assert hv["pools"]["prefill"]["healthy"] == 2 and hv["status"] == "ok"
    json.dumps(hv)


def test_stream_errors_and_rejections_counted(tmp_path):
    cfg = {"listen": "127.0.0.1:0", "access_log": str(tmp_path / "a.log"),
           "pid_path": "", "upstreams_path": "", "pools": POOLS, "fail_timeout_s": 10,
           "max_fails": 1, "health": {"enabled": False, "path": "/health", "interval_s": 5,
                                      "timeout_s": 2, "fails": 2, "passes": 1}}
    a = Agent(cfg)
    a.metrics.add(line(stream_error="", inflight_limit="PASSED"), 1.0)
    a.metrics.add(line(stream_error="decode_lost", inflight_limit="PASSED"), 1.0)
    for _ in range(3):
        a.metrics.add(line(status=429, mode="-", prefill_upstream="", decode_upstream="",
                           prefill_status="", decode_status="", stream_error="",
                           inflight_limit="REJECTED"), 1.0)
    a.metrics.add(line(), 1.0)                 # older log lines: no such fields
    m = parse_metrics(a.metrics_text())
    assert metric(m, "pd_proxy_stream_errors_total") == 1
    assert metric(m, "pd_proxy_rejected_total", reason="max_inflight") == 3
    assert metric(m, "pd_proxy_requests_total", route="/v1/completions", status="429") == 3


# ------------------------------------------------------------------ router mode

ROUTER_POOLS = {"router": {"name": "pd_router", "servers": ["10.0.0.7:9", "10.0.0.8:9"]}}


def router_agent(tmp_path, path=None) -> Agent:
    return Agent({"listen": "127.0.0.1:0", "mode": "router",
                  "access_log": str(tmp_path / "a.log"), "pid_path": "",
                  "upstreams_path": "", "pools": ROUTER_POOLS, "fail_timeout_s": 10,
                  "max_fails": 1, "health": {"enabled": True, "path": path,
                                             "interval_s": 5, "timeout_s": 1, "fails": 1,
                                             "passes": 1}})


def router_line(**kw) -> dict:
    base = {"route": "/v1/completions", "status": 200, "mode": "router",
            "upstream": "10.0.0.7:9", "upstream_status": "200", "upstream_ttfb": 0.01,
            "upstream_time": 0.3, "total_time": 0.31, "bytes_sent": 50, "retries": 0}
    base.update(kw)
    return base


def test_router_mode_metrics(tmp_path):
    a = router_agent(tmp_path)
    a.metrics.add(router_line(), 1.0)
    a.metrics.add(router_line(route="/v1/chat/completions", status=502,
                              upstream="10.0.0.7:9, 10.0.0.8:9", upstream_status="502, 502",
                              upstream_ttfb=None, upstream_time=None, retries=1), 1.0)
    a.metrics.add(router_line(route="/v1/completions", status=502, upstream="pd_router",
                              upstream_status="502", upstream_ttfb=None,
                              upstream_time=None), 1.0)
    a.metrics.add(router_line(route="/v1/models", mode="-"), 1.0)
    a.metrics.add(router_line(route="/metrics", mode="-", upstream="127.0.0.1:1"), 1.0)
    # nginx's passive view: a 502 from nginx (connect error) counts
    assert a.metrics.passive_failing("router", "10.0.0.8:9", 2.0, 10, 1)
    m = parse_metrics(a.metrics_text())
    assert metric(m, "pd_proxy_pd_requests_total", mode="router") == 3
    assert metric(m, "pd_proxy_requests_total", route="/v1/models", status="200") == 1
    assert metric(m, "pd_proxy_router_first_byte_seconds_count") == 1
    assert metric(m, "pd_proxy_router_duration_seconds_count") == 1
    assert metric(m, "pd_proxy_retries_total", leg="router") == 1
    assert metric(m, "pd_proxy_upstream_attempts_total", pool="router",
                  upstream="10.0.0.7:9") == 3
    assert metric(m, "pd_proxy_upstream_failures_total", pool="router",
                  upstream="10.0.0.8:9") == 1
    assert metric(m, "pd_proxy_no_live_upstreams_total", pool="router") == 1
    assert not any(name.startswith(("pd_proxy_prefill", "pd_proxy_decode"))
                   for name, _ in m)
    hv = a.health_view()
    assert list(hv["pools"]) == ["router"] and hv["pools"]["router"]["total"] == 2


def test_router_probe_is_tcp_unless_a_path_is_set(tmp_path):
    import socket
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class H(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(404 if self.path == "/health" else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = HTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    up = f"127.0.0.1:{srv.server_address[1]}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    try:
        tcp = router_agent(tmp_path)
        assert tcp.probe(up) is None                        # no /health needed
        assert tcp.probe(closed).startswith("ConnectionRefusedError")
        assert router_agent(tmp_path, "/health").probe(up) == "status 404"
        assert router_agent(tmp_path, "/openapi.json").probe(up) is None
    finally:
        srv.shutdown()
        srv.server_close()


def test_last_router_is_never_written_down(tmp_path, monkeypatch):
    a = router_agent(tmp_path)
    bad = {"10.0.0.8:9"}
    monkeypatch.setattr(a, "probe", lambda addr: "refused" if addr in bad else None)
    assert a.check_once() and a.down == {"router": {"10.0.0.8:9"}}
    bad.add("10.0.0.7:9")
    assert a.check_once() and a.down == {"router": set()}    # all failing: none out
    states = a.health_view()["pools"]["router"]["upstreams"]
    assert [u["active"] for u in states] == ["down", "down"]
