"""Prefill -> decode through real processes: same output as aggregated, every KV failure."""
from __future__ import annotations

import time

import pytest

from tests.emulator.helpers import free_port, kvcfg, metric, sse, sse_text

A_HOST, P_HOST, DF_HOST, DR_HOST = "127.0.1.20", "127.0.1.21", "127.0.1.22", "127.0.1.23"
PROMPT = "Disaggregated serving splits prefill and decode across engines."
MSGS = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Explain KV cache transfer."}]


@pytest.fixture(scope="module")
def cluster(module_emus):
    kv_port = free_port(P_HOST)  # the same kv_port on every node, as in the reference topology
    api = free_port(A_HOST)
    base = ["--served-model-name", "demo", "--max-num-seqs", "8"]
    a = module_emus("agg", A_HOST, api, base)
    p = module_emus("prefill", P_HOST, api, base + [
        "--kv-transfer-config", kvcfg("kv_producer", kv_port, engine_id="pre-1")],
        env={"PD_EMU_KV_LEASE_S": "0.8"})
    df = module_emus("decode-fail", DF_HOST, api, base + [
        "--kv-transfer-config", kvcfg("kv_consumer", kv_port, engine_id="dec-fail")])
    dr = module_emus("decode-recompute", DR_HOST, api, base + [
        "--kv-transfer-config", kvcfg("kv_consumer", kv_port, engine_id="dec-rec",
                                      kv_load_failure_policy="recompute")])
    for e in (a, p, df, dr):
        e.wait_ready()
    return {"agg": a, "p": p, "fail": df, "recompute": dr, "kv_port": kv_port}


def prefill(p, body, path="/v1/completions", rid=None):
    leg = dict(body, stream=False, max_tokens=1,
               kv_transfer_params={"do_remote_decode": True, "do_remote_prefill": False,
                                   "remote_engine_id": None, "remote_block_ids": None,
                                   "remote_host": None, "remote_port": None})
    leg.pop("stream_options", None)
    status, hdrs, out = p.post(path, leg, headers={"X-Request-Id": rid} if rid else None)
    assert status == 200, out
    return out


def test_prefill_answer_points_at_its_own_kv_listener(cluster):
    p = cluster["p"]
    out = prefill(p, {"model": "demo", "prompt": PROMPT}, rid="pd-1")
    kvp = out["kv_transfer_params"]
    assert kvp["do_remote_prefill"] is True and kvp["do_remote_decode"] is False
    assert kvp["remote_host"] == P_HOST and kvp["remote_port"] == cluster["kv_port"]
    assert kvp["remote_engine_id"] == "pre-1" and kvp["tp_size"] == 1
    assert kvp["remote_request_id"] == "pd-1" and out["id"] == "cmpl-pd-1"
    nblocks = -(-out["usage"]["prompt_tokens"] // 16)
    assert len(kvp["remote_block_ids"]) == nblocks
    assert out["usage"]["completion_tokens"] == 1
    m = p.metrics()
    assert metric(m, "pd_emu:kv_held_blocks") >= nblocks
    assert metric(m, "pd_emu:remote_prefills_total") >= 1


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("chat", [False, True])
def test_prefill_then_decode_equals_aggregated(cluster, chat, stream):
    a, p, d = cluster["agg"], cluster["p"], cluster["fail"]
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = {"model": "demo", "max_tokens": 12, "stream": stream}
    body.update({"messages": MSGS} if chat else {"prompt": PROMPT})
    if stream:
        body["stream_options"] = {"include_usage": True}
    rid = f"eq-{int(chat)}{int(stream)}"
    before_p, before_d = p.metrics(), d.metrics()
    kvp = prefill(p, body, path, rid=rid)["kv_transfer_params"]
    dbody = dict(body, kv_transfer_params=kvp)
    if stream:
        _, ref = sse(A_HOST, a.port, path, body)
        status, got = sse(DF_HOST, d.port, path, dbody, headers={"X-Request-Id": rid})
        assert status == 200 and got[-1][1] == "[DONE]"
        assert sse_text(got) == sse_text(ref) and len(sse_text(ref).split()) == 12
    else:
        ref = a.post(path, body)[2]
        status, hdrs, got = d.post(path, dbody, headers={"X-Request-Id": rid})
        assert status == 200, got
        assert hdrs["x-request-id"] == rid
        field = (lambda o: o["choices"][0]["message"]["content"]) if chat else (
            lambda o: o["choices"][0]["text"])
        assert field(got) == field(ref) and len(field(ref).split()) == 12
        assert got["usage"]["prompt_tokens"] == ref["usage"]["prompt_tokens"]
        assert got["usage"]["prompt_tokens_details"] == {
            "cached_tokens": ref["usage"]["prompt_tokens"]}
    after_p, after_d = p.metrics(), d.metrics()
    assert metric(after_d, "pd_emu:kv_transfers_total") - metric(
        before_d, "pd_emu:kv_transfers_total") == 1
    assert metric(after_d, "pd_emu:kv_transfer_bytes_total") > metric(
        before_d, "pd_emu:kv_transfer_bytes_total")
    assert metric(after_p, "pd_emu:kv_pulls_served_total", outcome="ok") - metric(
        before_p, "pd_emu:kv_pulls_served_total", outcome="ok") == 1
    # the decode freed the blocks on the prefill side
    assert metric(after_p, "pd_emu:kv_held_blocks") == metric(before_p, "pd_emu:kv_held_blocks")


def test_streaming_prefill_request_is_400(cluster):
    status, _, body = cluster["p"].post("/v1/completions", {
        "prompt": "x", "stream": True, "kv_transfer_params": {"do_remote_decode": True}})
    assert status == 400 and "streaming is not supported" in body["error"]["message"]


def test_consumer_without_kv_params_serves_alone(cluster):
    a, d = cluster["agg"], cluster["fail"]
    before = metric(d.metrics(), "pd_emu:kv_transfers_total")
    body = {"prompt": "local prefill please", "max_tokens": 5}
    assert d.post("/v1/completions", body)[2]["choices"] == a.post(
        "/v1/completions", body)[2]["choices"]
    assert metric(d.metrics(), "pd_emu:kv_transfers_total") == before


def _break(mode, kvp, cluster, engine_id):
    if mode == "wrong_host":
        kvp["remote_host"] = A_HOST  # a node where nothing listens on that port
    elif mode == "wrong_port":
        kvp["remote_port"] = cluster["kv_port"] + 1
    elif mode == "unknown_blocks":
        kvp["remote_block_ids"] = [7, 8, 9]
    elif mode == "expired":
        time.sleep(1.1)  # lease is 0.8 s
    elif mode == "same_engine":
        kvp["remote_engine_id"] = engine_id
    elif mode == "engine_mismatch":
        kvp["remote_engine_id"] = "pre-2"
    elif mode == "missing_fields":
        del kvp["remote_host"]
    return kvp


CAUSES = {
    "wrong_host": ("connect_failed", f"cannot connect to KV listener {A_HOST}:"),
    "wrong_port": ("connect_failed", f"cannot connect to KV listener {P_HOST}:"),
    "unknown_blocks": ("unknown_blocks", "block 7 is not held"),
    "expired": ("expired_blocks", "expired (lease 0.8s)"),
    "same_engine": ("same_engine", "is this engine's own id"),
    "engine_mismatch": ("engine_mismatch", "serves engine pre-1, not pre-2"),
    "missing_fields": ("invalid_params", "need remote_host and remote_port"),
    "corrupted": ("corrupted", "failed its checksum"),
    "prompt_mismatch": ("prompt_mismatch", "this request has"),
}


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["fail", "recompute"])
@pytest.mark.parametrize("mode", sorted(CAUSES))
def test_kv_failure_modes(cluster, mode, policy):
    a, p, d = cluster["agg"], cluster["p"], cluster[policy]
    engine_id = "dec-fail" if policy == "fail" else "dec-rec"
    cause, needle = CAUSES[mode]
    body = {"model": "demo", "prompt": f"{PROMPT} {mode} {policy}", "max_tokens": 6}
    kvp = _break(mode, prefill(p, body)["kv_transfer_params"], cluster, engine_id)
    dbody = dict(body, kv_transfer_params=kvp)
    if mode == "prompt_mismatch":
        dbody["prompt"] = body["prompt"] + " but different"
    before = d.metrics()
    if mode == "corrupted":  # the prefill's KV listener flips a byte on the wire
        assert p.post("/admin/faults", {"kv_corrupt_rate": 1.0})[0] == 200
    try:
        status, _, out = d.post("/v1/completions", dbody)
    finally:
        if mode == "corrupted":
            assert p.post("/admin/faults", {"kv_corrupt_rate": 0.0})[0] == 200
    after = d.metrics()
    failures = metric(after, "pd_emu:kv_transfer_failures_total", cause=cause) - metric(
        before, "pd_emu:kv_transfer_failures_total", cause=cause)
    recomputes = metric(after, "pd_emu:kv_recomputes_total") - metric(
        before, "pd_emu:kv_recomputes_total")
    assert failures == 1
    if policy == "fail":
        assert status == 500, out
        msg = out["error"]["message"]
        assert msg.startswith(f"KV transfer failed ({cause}): ") and needle in msg, msg
        assert recomputes == 0
    else:
        assert status == 200, out
        ref = a.post("/v1/completions", dict(dbody, kv_transfer_params=None))[2]
        assert out["choices"][0]["text"] == ref["choices"][0]["text"]
        assert out["usage"]["prompt_tokens_details"] is None  # nothing came from the cache
        assert recomputes == 1
    assert needle in d.log()


def test_ttft_reflects_the_transfer(emu_factory):
    """8 MB of KV over a 20 MB/s link: the decode's first token waits ~0.4 s for it."""
    kv_port = free_port("127.0.1.24")
    api = free_port("127.0.1.24")
    lat = {"PD_EMU_ZERO_LATENCY": "0", "PD_EMU_PREFILL_S_PER_TOKEN": "0",
           "PD_EMU_PREFILL_OVERHEAD_S": "0", "PD_EMU_ITL_S": "0",
           "PD_EMU_KV_BYTES_PER_TOKEN": "100000", "PD_EMU_KV_BANDWIDTH_MBPS": "20"}
    p = emu_factory("p-slow-link", "127.0.1.24", api, [
        "--kv-transfer-config", kvcfg("kv_producer", kv_port)], env=lat)
    d = emu_factory("d-slow-link", "127.0.1.25", api, [
        "--kv-transfer-config", kvcfg("kv_consumer", kv_port)], env=lat)
    p.wait_ready()
    d.wait_ready()
    prompt = " ".join(["word"] * 80)  # 80 tokens -> 8 MB
    kvp = prefill(p, {"prompt": prompt})["kv_transfer_params"]
    t0 = time.monotonic()
    status, events = sse("127.0.1.25", d.port, "/v1/completions",
                         {"prompt": prompt, "max_tokens": 3, "stream": True,
                          "kv_transfer_params": kvp})
    ttft = events[0][0] - t0
    assert status == 200 and ttft >= 0.39, ttft
    m = d.metrics()
    assert metric(m, "pd_emu:kv_transfer_bytes_total") == 8_000_000
    assert metric(m, "pd_emu:kv_transfer_seconds_sum") >= 0.39
    assert metric(m, "vllm:time_to_first_token_seconds_sum") >= 0.39
    # local prefill on the same engine has no transfer to wait for
    t0 = time.monotonic()
    status, events = sse("127.0.1.25", d.port, "/v1/completions",
                         {"prompt": prompt, "max_tokens": 3, "stream": True})
    assert events[0][0] - t0 < 0.3
