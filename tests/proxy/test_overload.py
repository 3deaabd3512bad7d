"""max_inflight: completion requests beyond it get 429 + Retry-After at once (nginx
limit_conn, one zone for all workers); counted in /metrics; requests in flight are
not harmed. Rendering, validation, nginx -t, and behaviour against fake engines."""
from __future__ import annotations

import json
import os
import subprocess
import threading

import pytest

from pd_deploy.proxy_config import ProxyConfigError, options_of, proxy_unit
from tests.proxy.harness import (
    NGINX,
    http,
    metric,
    needs_nginx,
    open_stream,
    parse_metrics,
    post,
    proxy_metrics,
    read_chunk,
    sse_events,
)

BLOCK = {"listen": "127.0.1.9:7000", "prefill": ["127.0.1.1:7100"],
         "decode": ["127.0.1.5:7100"], "served_model_name": "demo-model", "options": {}}
BODY = {"model": "demo-model", "prompt": "hello", "max_tokens": 4, "stream": True}


def render(tmp_path, router: bool = False, **opts) -> str:
    b = json.loads(json.dumps(BLOCK))
    if router:
        b = {"listen": b["listen"], "mode": "router", "router": ["127.0.1.7:9000"],
             "served_model_name": "demo-model", "options": {}}
    b["options"].update(opts)
    d = {k: str(tmp_path / k) for k in ("state", "log", "run")}
    u = proxy_unit(b, d, nginx_bin=NGINX or "nginx")
    if NGINX:
        os.makedirs(d["log"], exist_ok=True)
        for f in u["files"]:
            os.makedirs(os.path.dirname(f["path"]), exist_ok=True)
            with open(f["path"], "w") as fh:
                fh.write(f["content"])
        r = subprocess.run(u["pre_start"][0], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    return u["files"][0]["content"]


def test_default_is_unlimited(tmp_path):
    assert options_of(BLOCK)["max_inflight"] == 0
    conf = render(tmp_path)
    assert "limit_conn_zone" not in conf and "limit_conn pd_inflight" not in conf
    assert "location @pd_e429" in conf        # the error page exists either way


@pytest.mark.parametrize("router", [False, True], ids=["pd", "router"])
def test_limit_rendered(tmp_path, router):
    conf = render(tmp_path, router=router, max_inflight=7, retry_after_s=3)
    assert "limit_conn_zone $server_name zone=pd_inflight:1m;" in conf
    assert "limit_conn_status 429;" in conf
    # on the two completion routes only (not /v1/models, /health, /metrics)
    assert conf.count("limit_conn pd_inflight 7;") == 2
    e429 = conf[conf.index("location @pd_e429"):]
    e429 = e429[:e429.index("}")]
    assert "add_header Retry-After 3 always;" in e429
    assert "add_header X-Request-Id $pd_request_id always;" in e429
    assert '"code":429' in e429 and "RateLimitError" in e429
    assert '"inflight_limit":"$limit_conn_status"' in conf


@pytest.mark.parametrize("opts,field", [
    ({"max_inflight": -1}, "max_inflight"), ({"max_inflight": "8"}, "max_inflight"),
    ({"max_inflight": True}, "max_inflight"), ({"retry_after_s": 0}, "retry_after_s"),
])
def test_invalid_values_name_the_field(opts, field):
    b = json.loads(json.dumps(BLOCK))
    b["options"].update(opts)
    with pytest.raises(ProxyConfigError, match=f"proxy.options.{field}"):
        options_of(b)


@needs_nginx
def test_over_limit_gets_429_at_once_and_held_streams_finish(backends, proxy_factory):
    (p,), (d,) = backends(1, 1)
    d.gate = threading.Event()             # hold every stream after its first event
    px = proxy_factory([p.addr], [d.addr], max_inflight=2)
    held = []
    for _ in range(2):
        s, f, status, _ = open_stream(px.url + "/v1/completions", BODY)
        assert b" 200 " in status
        assert read_chunk(f).startswith(b"data: ")
        held.append((s, f))
    n_before = len(d.gen_requests())
    for route in ("/v1/completions", "/v1/chat/completions"):
        st, h, data = post(px.url + route, dict(BODY, stream=False), timeout=5)
        assert st == 429 and h["retry-after"] == "1" and h["x-request-id"]
        assert h["content-type"] == "application/json"
        assert json.loads(data)["error"]["type"] == "RateLimitError"
    assert len(d.gen_requests()) == n_before      # never reached an engine
    assert http("GET", px.url + "/v1/models")[0] == 200
    d.gate.set()
    for s, f in held:
        raw = b""
        while True:
            c = read_chunk(f)
            if not c:
                break
            raw += c
        f.close()
        s.close()
        ev = sse_events(raw)
        assert ev[-1] == "[DONE]" and len(ev) == 4   # 3 more tokens + [DONE]
    assert post(px.url + "/v1/completions", dict(BODY, stream=False))[0] == 200
    lines = px.pd_lines(5)
    assert [x["inflight_limit"] for x in lines].count("REJECTED") == 2
    assert proxy_metrics(px, "pd_proxy_rejected_total", want=2, reason="max_inflight") == 2
    m = parse_metrics(http("GET", px.url + "/metrics")[2].decode())
    assert metric(m, "pd_proxy_requests_total", route="/v1/completions", status="429") == 1
