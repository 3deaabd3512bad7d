"""Row 10: a KV transfer fails (the P->D link is cut: the prefill's KV listener drops
every pull, emulator fault kv_cut_rate). The decode follows kv_load_failure_policy
(planned from pd_kv_load_failure_policy): `fail` -> a clear OpenAI 500, `recompute`
-> a valid answer (decode prefills locally). Real emulated engines, through the
front door; the emulator's metrics count it."""
from __future__ import annotations

import json
import time

import pytest

from tests.proxy.harness import (
    NGINX,
    EmuEngine,
    Proxy,
    post,
    proxy_metrics,
    sse_events,
)
from tests.unit.planfix import kv_config, small, specs_of

pytestmark = [pytest.mark.fault_row(10),
              pytest.mark.skipif(NGINX is None, reason="nginx is not installed "
                                 "(apt-get install nginx libnginx-mod-http-js)")]

PROXY_HOST = "127.0.53.1"
P_HOST = "127.0.53.11"
D_HOSTS = {"fail": "127.0.53.21", "recompute": "127.0.53.22"}
MODEL = "demo-model"


def planned_policy(engine: str, policy: str) -> dict:
    """The D engine's kv_transfer_config as the planner writes it."""
    specs = specs_of(small(engine, pd_kv_load_failure_policy=policy))
    (spec,) = specs["d1"].values()
    return kv_config(next(p["argv"] for p in spec["processes"]
                          if "--kv-transfer-config" in p["argv"]))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("row10")
    p = EmuEngine("prefill", P_HOST, "kv_producer", tmp)
    ds = {pol: EmuEngine(f"decode-{pol}", h, "kv_consumer", tmp,
                         kv={"kv_load_failure_policy": planned_policy("vllm-ascend", pol)
                             ["kv_load_failure_policy"]})
          for pol, h in D_HOSTS.items()}
    pxs: dict[str, Proxy] = {}
    try:
        for e in [p, *ds.values()]:
            e.wait_ready()
        for pol, d in ds.items():
            pxs[pol] = Proxy(tmp / pol, [p.addr], [d.addr], {}, host=PROXY_HOST)
        yield p, ds, pxs
    finally:
        for px in pxs.values():
            px.stop()
        for e in [p, *ds.values()]:
            e.stop()


def total(e: EmuEngine, name: str, **labels) -> float:
    return sum(v for (n, lab), v in e.metrics().items()
               if n == name and all(dict(lab).get(k) == x for k, x in labels.items()))


def set_cut(p: EmuEngine, rate: float) -> None:
    st, _, data = post(f"http://{p.addr}/admin/faults", {"kv_cut_rate": rate})
    assert st == 200, data


def ask(px: Proxy, i: int, stream: bool) -> tuple[int, bytes, float]:
    body = {"model": MODEL, "prompt": f"explain item {i} in detail " * 6, "max_tokens": 6,
            "stream": stream}
    t0 = time.monotonic()
    st, _, data = post(px.url + "/v1/completions", body)
    return st, data, time.monotonic() - t0


def text_of(data: bytes, stream: bool) -> str:
    if stream:
        ev = sse_events(data)
        assert ev[-1] == "[DONE]"
        return "".join(e["choices"][0]["text"] for e in ev[:-1] if e.get("choices"))
    return json.loads(data)["choices"][0]["text"]


def test_planner_sends_the_policy_to_decode_only():
    for engine in ("vllm-ascend", "vllm"):
        assert planned_policy(engine, "recompute")["kv_load_failure_policy"] == "recompute"
        specs = specs_of(small(engine, pd_kv_load_failure_policy="recompute"))
        (pspec,) = specs["p1"].values()
        for proc in pspec["processes"]:
            if "--kv-transfer-config" in proc["argv"]:
                assert "kv_load_failure_policy" not in kv_config(proc["argv"])
        (dspec,) = specs_of(small(engine))["d1"].values()    # unset: not sent
        for proc in dspec["processes"]:
            if "--kv-transfer-config" in proc["argv"]:
                assert "kv_load_failure_policy" not in kv_config(proc["argv"])


def test_kv_link_cut_follows_policy(cluster, fault_report):
    p, ds, pxs = cluster
    # baseline: KV really moves; remember the texts (deterministic per prompt)
    want = {}
    for pol, px in pxs.items():
        pulls = total(ds[pol], "pd_emu:kv_transfers_total")
        for i, stream in enumerate((False, True)):
            st, data, _ = ask(px, i, stream)
            assert st == 200, data
            want[(pol, i)] = text_of(data, stream)
        assert total(ds[pol], "pd_emu:kv_transfers_total") == pulls + 2

    set_cut(p, 1.0)
    try:
        before = {pol: (total(d, "pd_emu:kv_transfer_failures_total", cause="protocol_error"),
                        total(d, "pd_emu:kv_recomputes_total")) for pol, d in ds.items()}
        got = {pol: [ask(px, i, stream) for i, stream in enumerate((False, True))]
               for pol, px in pxs.items()}
        held = total(p, "pd_emu:kv_held_blocks")
    finally:
        set_cut(p, 0.0)

    # fail: a clear OpenAI error, before any byte of a stream
    for st, data, _ in got["fail"]:
        assert st == 500, data
        err = json.loads(data)["error"]
        assert "KV transfer failed (protocol_error)" in err["message"] and err["code"] == 500
    # recompute: the same answers as with the KV
    for i, (st, data, _) in enumerate(got["recompute"]):
        assert st == 200, data
        assert text_of(data, bool(i)) == want[("recompute", i)]
    for pol, d in ds.items():
        f0, r0 = before[pol]
        assert total(d, "pd_emu:kv_transfer_failures_total", cause="protocol_error") == f0 + 2
        assert total(d, "pd_emu:kv_recomputes_total") == r0 + (2 if pol == "recompute" else 0)
    assert total(p, "pd_emu:kv_pulls_served_total", outcome="cut") == 4
    assert held > 0           # the prefill still holds the unpulled KV (until its lease)
    n500 = proxy_metrics(pxs["fail"], "pd_proxy_requests_total", want=2,
                         route="/v1/completions", status="500")
    assert n500 == 2
    lines = pxs["fail"].pd_lines(4)
    assert [x["decode_status"] for x in lines[-2:]] == ["500", "500"]
    assert all(x["mode"] == "pd" for x in lines)

    # the link is back: KV moves again on both
    for pol, px in pxs.items():
        pulls = total(ds[pol], "pd_emu:kv_transfers_total")
        st, data, _ = ask(px, 7, False)
        assert st == 200, data
        assert total(ds[pol], "pd_emu:kv_transfers_total") == pulls + 1

    t_fail = max(x[2] for x in got["fail"])
    t_rec = max(x[2] for x in got["recompute"])
    fault_report(
        observed=(f"P->D KV link cut (every pull dropped): policy fail -> 2/2 requests got "
                  f"HTTP 500 'KV transfer failed (protocol_error)' in <= "
                  f"{t_fail * 1000:.0f} ms, counted as pd_emu:kv_transfer_failures_total"
                  f"{{cause=protocol_error}} and pd_proxy_requests_total{{status=500}}; "
                  f"policy recompute -> 2/2 got 200 with the same text as with KV "
                  f"(<= {t_rec * 1000:.0f} ms, pd_emu:kv_recomputes_total +2); the prefill "
                  f"kept {held:.0f} unpulled KV blocks held until its lease ran out; link "
                  f"back -> KV moves again"),
        lost=2)
