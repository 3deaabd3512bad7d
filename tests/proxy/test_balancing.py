"""Balancing policies, upstream keepalive, passive and active health."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from tests.proxy.harness import http, needs_nginx, open_stream, post, read_chunk

pytestmark = needs_nginx

BODY = {"model": "demo-model", "prompt": "balance me", "max_tokens": 2}


def test_round_robin_spreads_evenly(backends, proxy_factory):
    (p0, p1), (d0, d1) = backends(2, 2)
    px = proxy_factory([p0.addr, p1.addr], [d0.addr, d1.addr],
                       prefill_balance="round_robin", decode_balance="round_robin")
    for _ in range(6):
        assert post(px.url + "/v1/completions", BODY)[0] == 200
    assert [len(b.gen_requests()) for b in (p0, p1, d0, d1)] == [3, 3, 3, 3]


@pytest.mark.parametrize("policy", ["least_conn", "random_two_least_conn"])
def test_least_conn_avoids_busy_decode(backends, proxy_factory, policy):
    (p,), (d0, d1) = backends(1, 2)
    for d in (d0, d1):
        d.gate = threading.Event()
    px = proxy_factory([p.addr], [d0.addr, d1.addr], decode_balance=policy)
    s, f, status, _ = open_stream(px.url + "/v1/completions", dict(BODY, stream=True))
    try:
        assert b" 200 " in status and read_chunk(f)
        busy = d0 if d0.gen_requests() else d1
        idle = d1 if busy is d0 else d0
        for _ in range(4):
            assert post(px.url + "/v1/completions", BODY)[0] == 200
        assert len(busy.gen_requests()) == 1 and len(idle.gen_requests()) == 4
    finally:
        d0.gate.set()
        d1.gate.set()
        s.close()


def test_upstream_keepalive(backends, proxy_factory):
    (p,), (d,) = backends(1, 1)
    px = proxy_factory([p.addr], [d.addr])
    for i in range(10):
        assert post(px.url + "/v1/completions", dict(BODY, stream=bool(i % 2)))[0] == 200
    assert len({r["peer"] for r in p.gen_requests()}) == 1
    assert len({r["peer"] for r in d.gen_requests()}) == 1
    # keepalive 0: a new connection per request
    px0 = proxy_factory([p.addr], [d.addr], keepalive=0)
    n = len(d.gen_requests())
    for _ in range(3):
        assert post(px0.url + "/v1/completions", BODY)[0] == 200
    assert len({r["peer"] for r in d.gen_requests()[n:]}) == 3


def test_active_health_takes_peer_out_and_back(backends, proxy_factory):
    (p0, p1), (d,) = backends(2, 1)
    px = proxy_factory([p0.addr, p1.addr], [d.addr], prefill_balance="round_robin",
                       active_health=True, health_interval_s=1, health_fails=1,
                       health_passes=1)
    upstreams = Path(px.dirs["run"]) / "pd_upstreams.conf"
    p0.health_ok = False

    def health():
        return json.loads(http("GET", px.url + "/health")[2])

    deadline = time.monotonic() + 10
    while health()["pools"]["prefill"]["healthy"] != 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    hv = health()
    assert hv["pools"]["prefill"]["healthy"] == 1
    (down,) = [u for u in hv["pools"]["prefill"]["upstreams"] if not u["healthy"]]
    assert down["upstream"] == p0.addr and down["active"] == "down"
    assert f"server {p0.addr} max_fails=1 fail_timeout=10s down;" in upstreams.read_text()
    time.sleep(0.5)                      # the reload is graceful; let new workers start
    n0 = len(p0.gen_requests())
    for _ in range(6):
        assert post(px.url + "/v1/completions", BODY)[0] == 200
    assert len(p0.gen_requests()) == n0          # nginx no longer sends it anything
    assert px.procs["proxy"].poll() is None
    # back up
    p0.health_ok = True
    deadline = time.monotonic() + 10
    while health()["pools"]["prefill"]["healthy"] != 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert health()["pools"]["prefill"]["healthy"] == 2
    assert " down;" not in upstreams.read_text()
    time.sleep(0.5)
    for _ in range(4):
        assert post(px.url + "/v1/completions", BODY)[0] == 200
    assert len(p0.gen_requests()) > n0
