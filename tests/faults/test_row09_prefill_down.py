"""Row 9: a prefill engine dies, then all of them (SIGKILL of real emulated engines),
and a prefill host that drops packets (connect timeout). Requests are retried on
another prefill; with none left the fallback (decode-only) or an OpenAI 503/502 comes
within the connect timeout, never a hang."""
from __future__ import annotations

import json
import socket
import time

import pytest

from tests.proxy.harness import (
    NGINX,
    EmuEngine,
    Proxy,
    http,
    post,
    proxy_metrics,
)

pytestmark = [pytest.mark.fault_row(9),
              pytest.mark.skipif(NGINX is None, reason="nginx is not installed "
                                 "(apt-get install nginx libnginx-mod-http-js)")]

PROXY_HOST = "127.0.52.1"
P_HOSTS = ["127.0.52.11", "127.0.52.12"]
D_HOST = "127.0.52.21"
HOLE_HOST = "127.0.52.31"
MODEL = "demo-model"
CONNECT_TIMEOUT = 1


class BlackHole:
    """A host:port whose SYNs are dropped, like a powered-off host: a listener
    with a full accept queue that never accepts."""

    def __init__(self, host: str):
        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.sock.listen(0)
        self.addr = f"{host}:{self.sock.getsockname()[1]}"
        self.fill = []
        for _ in range(3):        # fill the accept queue (backlog 0 holds one)
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(self.sock.getsockname())
            self.fill.append(c)
        time.sleep(0.2)

    def close(self) -> None:
        for c in self.fill:
            c.close()
        self.sock.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("row09")
    ps = [EmuEngine(f"prefill{i}", h, "kv_producer", tmp) for i, h in enumerate(P_HOSTS)]
    d = EmuEngine("decode", D_HOST, "kv_consumer", tmp)
    hole = BlackHole(HOLE_HOST)
    pxs: dict[str, Proxy] = {}
    try:
        for e in [*ps, d]:
            e.wait_ready()
        opts = {"connect_timeout_s": CONNECT_TIMEOUT}
        paddrs = [p.addr for p in ps]
        pxs["fb"] = Proxy(tmp / "fb", paddrs, [d.addr], opts, host=PROXY_HOST)
        pxs["nofb"] = Proxy(tmp / "nofb", paddrs, [d.addr], dict(opts, fallback=False),
                            host=PROXY_HOST)
        pxs["hole_fb"] = Proxy(tmp / "hole_fb", [hole.addr], [d.addr], opts,
                               host=PROXY_HOST)
        pxs["hole_nofb"] = Proxy(tmp / "hole_nofb", [hole.addr], [d.addr],
                                 dict(opts, fallback=False), host=PROXY_HOST)
        pxs["hole_ah"] = Proxy(tmp / "hole_ah", [hole.addr], [d.addr],
                               dict(opts, fallback=False, active_health=True,
                                    health_interval_s=1, health_timeout_s=1, health_fails=1),
                               host=PROXY_HOST)
        pxs["hole_ah"].started = time.monotonic()   # type: ignore[attr-defined]
        yield ps, d, pxs
    finally:
        for px in pxs.values():
            px.stop()
        for e in [*ps, d]:
            e.stop()
        hole.close()


def timed_post(px: Proxy, i: int) -> tuple[int, dict, float, str]:
    body = {"model": MODEL, "prompt": f"request number {i} " * 6, "max_tokens": 4}
    t0 = time.monotonic()
    st, h, data = post(px.url + "/v1/completions", body, timeout=30)
    return st, json.loads(data), time.monotonic() - t0, h["x-request-id"]


def kv_pulls(d: EmuEngine) -> float:
    return sum(v for (name, _), v in d.metrics().items() if name == "pd_emu:kv_transfers_total")


def line_of(px: Proxy, rid: str) -> dict:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for x in px.log_lines():
            if x["request_id"] == rid:
                return x
        time.sleep(0.05)
    raise AssertionError(f"no access log line for {rid}")


def test_prefill_engines_killed(cluster, fault_report):
    ps, d, pxs = cluster
    fb, nofb = pxs["fb"], pxs["nofb"]
    for i in range(2):                          # warm: both proxies work
        assert timed_post(fb, i)[0] == 200 and timed_post(nofb, i)[0] == 200

    # one prefill engine dies: every request still goes through PD, via the other
    ps[0].kill()
    pulls = kv_pulls(d)
    one_dead = [timed_post(fb, 10 + i) for i in range(6)]
    assert [r[0] for r in one_dead] == [200] * 6, one_dead
    lines = [line_of(fb, r[3]) for r in one_dead]
    assert all(x["mode"] == "pd" and x["prefill_status"].endswith("200") for x in lines)
    assert kv_pulls(d) == pulls + 6              # the decode really pulled KV each time
    retried = [x for x in lines if ps[0].addr in x["prefill_upstream"]]
    assert retried, "nginx never tried the dead prefill (balancing changed?)"
    assert all(x["prefill_retries"] >= 1 for x in retried)
    t_one = max(r[2] for r in one_dead)
    assert t_one < CONNECT_TIMEOUT, f"{t_one:.2f}s with one prefill dead"

    # all prefill engines dead: fallback (decode-only) or an OpenAI error, fast
    ps[1].kill()
    pulls = kv_pulls(d)
    fallback = [timed_post(fb, 20 + i) for i in range(4)]
    assert [r[0] for r in fallback] == [200] * 4, fallback
    assert all(line_of(fb, r[3])["mode"] == "fallback" for r in fallback)
    assert kv_pulls(d) == pulls                  # decode prefilled locally
    t_fb = max(r[2] for r in fallback)
    assert t_fb < CONNECT_TIMEOUT, f"fallback took {t_fb:.2f}s"
    fbs = proxy_metrics(fb, "pd_proxy_fallbacks_total", want=4)
    assert fbs == 4

    errors = [timed_post(nofb, 30 + i) for i in range(4)]
    sts = [r[0] for r in errors]
    # the first finds both peers failing (502 BadGateway); then nginx has both
    # marked failed (max_fails 1 / fail_timeout 10 s): no live upstream, 503
    assert set(sts) <= {502, 503} and sts[-1] == 503, sts
    for st, body, _, _ in errors:
        assert body["error"]["code"] == st
        assert body["error"]["type"] == ("ServiceUnavailableError" if st == 503
                                         else "BadGatewayError")
    t_err = max(r[2] for r in errors)
    assert t_err < CONNECT_TIMEOUT, f"error took {t_err:.2f}s"
    no_live = proxy_metrics(nofb, "pd_proxy_no_live_upstreams_total", want=1, pool="prefill")
    assert no_live >= 1

    fault_report(
        observed=(f"1 of 2 prefill engines SIGKILLed: 6/6 requests served PD via the other "
                  f"(nginx retried the dead one on {len(retried)}, slowest "
                  f"{t_one * 1000:.0f} ms); both killed: fallback on -> 4/4 served "
                  f"decode-only (slowest {t_fb * 1000:.0f} ms, pd_proxy_fallbacks_total=4); "
                  f"fallback off -> {sts} OpenAI errors in <= {t_err * 1000:.0f} ms "
                  f"(connect timeout {CONNECT_TIMEOUT} s)"),
        lost=len(errors))


def test_prefill_host_unreachable(cluster, fault_report):
    """A prefill host that drops SYNs (powered off, cable cut): the answer comes
    after connect_timeout_s, not later."""
    _, _, pxs = cluster
    st, body, t_fb, rid = timed_post(pxs["hole_fb"], 40)
    assert st == 200 and line_of(pxs["hole_fb"], rid)["mode"] == "fallback"
    st2, body2, t_err, _ = timed_post(pxs["hole_nofb"], 41)
    assert st2 == 502 and body2["error"]["type"] == "BadGatewayError"
    for t in (t_fb, t_err):
        assert CONNECT_TIMEOUT * 0.9 <= t < CONNECT_TIMEOUT + 1.5, f"{t:.2f}s"
    # a one-server group is never marked failed by nginx (max_fails is ignored
    # there): every request waits the connect timeout again
    st3, _, t_again, _ = timed_post(pxs["hole_nofb"], 42)
    assert st3 == 502 and CONNECT_TIMEOUT * 0.9 <= t_again < CONNECT_TIMEOUT + 1.5
    # with active health checks the agent writes it down and reloads nginx: then
    # the answer is immediate (503: no live prefill upstream)
    ah = pxs["hole_ah"]
    deadline = time.monotonic() + 10
    t0 = time.monotonic()
    h: dict = {}
    while time.monotonic() < deadline:
        h = json.loads(http("GET", ah.url + "/health")[2])
        if h["pools"]["prefill"]["healthy"] == 0:
            break
        time.sleep(0.2)
    t_down = time.monotonic() - ah.started
    assert time.monotonic() - t0 < 10
    assert h["pools"]["prefill"]["healthy"] == 0, h
    time.sleep(0.5)                               # the reload (SIGHUP) takes effect
    st4, body4, t_next, _ = timed_post(ah, 43)
    assert st4 == 503 and body4["error"]["type"] == "ServiceUnavailableError"
    assert t_next < 0.5, t_next
    fault_report(
        observed=(f"prefill host dropping SYNs, connect_timeout_s={CONNECT_TIMEOUT}: "
                  f"fallback on -> 200 decode-only after {t_fb:.2f} s; fallback off -> 502 "
                  f"after {t_err:.2f} s, and again {t_again:.2f} s for the next request "
                  f"(nginx ignores max_fails for a one-server pool); with active health "
                  f"(interval 1 s, fails 1) the agent had written it down (seen "
                  f"{t_down:.1f} s after that front door started) and the next request got "
                  f"503 in {t_next * 1000:.0f} ms"),
        lost=3)
