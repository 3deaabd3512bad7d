"""FastDeploy v0 "splitwise" mode against a real redis-server: the node registry hash,
requests through the decode's (and the prefill's) port with KV bytes moving, a killed
decode going stale and being skipped, SIGTERM removing the entry, AUTH."""
from __future__ import annotations

import json
import signal
import threading
import time
from typing import Any, Dict

import pytest

from tests.emulator.helpers import free_port, metric, request, sse, sse_text
from tests.emulator.test_fastdeploy_support import (
    REDIS_MISSING,
    SLOW,
    body_for,
    expected_text,
    module_procs,  # noqa: F401  (fixture)
    procs,  # noqa: F401  (fixture)
    redis_mode,
    start_instance,
    start_redis,
    wait_for,
    wait_ready,
)

pytestmark = pytest.mark.skipif(REDIS_MISSING is not None, reason=str(REDIS_MISSING))

REDIS_HOST, P_HOST, D_HOST = "127.0.1.90", "127.0.1.91", "127.0.1.92"
PASSWORD = "Pw-9f3a7c-secret"
TOPIC = "test"


@pytest.fixture(scope="module")
def redis_pw(tmp_path_factory):
    r = start_redis(tmp_path_factory.mktemp("redis"), REDIS_HOST, PASSWORD)
    yield r
    r.stop()


@pytest.fixture(scope="module")
def redis_open(tmp_path_factory):
    r = start_redis(tmp_path_factory.mktemp("redis"), "127.0.1.93")
    yield r
    r.stop()


def entries(r, topic: str) -> Dict[str, Dict[str, Any]]:
    return {k.decode(): json.loads(v) for k, v in r.client().hgetall(f"{topic}.cluster").items()}


@pytest.fixture(scope="module")
def cluster(redis_pw, module_procs):  # noqa: F811
    mode = redis_mode(redis_pw, TOPIC)
    env = {"ENABLE_V1_KVCACHE_SCHEDULER": "0"}
    p = start_instance(module_procs, "prefill", P_HOST, "prefill", mode, env=env)
    d = start_instance(module_procs, "decode", D_HOST, "decode", mode, env=env)
    for inst in (p, d):
        wait_ready(inst)
    return {"p": p, "d": d, "redis": redis_pw}


def test_both_instances_report_in_the_cluster_hash(cluster):
    p, d, r = cluster["p"], cluster["d"], cluster["redis"]
    nodes = entries(r, TOPIC)
    by_role = {v["role"]: (k, v) for k, v in nodes.items()}
    assert set(by_role) == {"prefill", "decode"} and len(nodes) == 2
    for role, inst in (("prefill", p), ("decode", d)):
        nodeid, v = by_role[role]
        assert len(nodeid) == 36 and nodeid.count("-") == 4  # uuid4
        assert set(v) == {"ts", "role", "load", "host", "disaggregated"}
        assert v["host"] == inst.host and time.time() - v["ts"] < 3 and v["load"] == 0
        dis = v["disaggregated"]
        assert dis["transfer_protocol"] == ["rdma", "ipc"]
        assert dis["connector_port"] == inst.ports["pd"]
        assert dis["rdma_ports"] == inst.ports["rdma"]
        assert f"node id {nodeid}" in inst.log()
        assert "Redis version 7." in inst.log()
        assert "ENABLE_V1_KVCACHE_SCHEDULER=0" in inst.log()
    # the entry is refreshed every sync period (100 ms)
    ts = entries(r, TOPIC)[by_role["decode"][0]]["ts"]
    wait_for(lambda: entries(r, TOPIC)[by_role["decode"][0]]["ts"] > ts, 2, "a new report")


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("chat", [False, True])
def test_requests_through_the_decode_move_the_kv(cluster, chat, stream):
    p, d = cluster["p"], cluster["d"]
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = body_for(chat, stream)
    before_d, before_p = d.metrics(), p.metrics()
    if stream:
        status, events = sse(D_HOST, d.port, path, body)
        assert status == 200 and events[-1][1] == "[DONE]", events
        text = sse_text(events)
        usage = json.loads(events[-2][1])["usage"]
    else:
        status, _, data = request(D_HOST, d.port, "POST", path, body)
        assert status == 200, data
        out = json.loads(data)
        choice = out["choices"][0]
        text = choice["message"]["content"] if chat else choice["text"]
        usage = out["usage"]
    assert text == expected_text(7, chat)
    assert usage["prompt_tokens_details"] == {"cached_tokens": usage["prompt_tokens"]}
    nbytes = usage["prompt_tokens"] * 512
    after_d, after_p = d.metrics(), p.metrics()
    assert metric(after_d, "pd_emu:kv_transfers_total") - metric(
        before_d, "pd_emu:kv_transfers_total") == 1
    assert metric(after_d, "pd_emu:kv_transfer_bytes_total") - metric(
        before_d, "pd_emu:kv_transfer_bytes_total") == nbytes
    assert metric(after_p, "pd_emu:kv_pulls_served_total", outcome="ok") - metric(
        before_p, "pd_emu:kv_pulls_served_total", outcome="ok") == 1
    assert "Schedule Req" in d.log() and "Infer Scheduler Get Req" in p.log()


def test_the_prefill_port_is_an_entry_too_and_the_password_stays_secret(cluster):
    p, d, r = cluster["p"], cluster["d"], cluster["redis"]
    status, _, data = request(P_HOST, p.port, "POST", "/v1/completions",
                              {"prompt": "hello there", "max_tokens": 3})
    out = json.loads(data)
    usage = out["usage"]
    assert status == 200 and usage["prompt_tokens"] == 4, data  # "hell", "o", "ther", "e"
    assert usage["prompt_tokens_details"] == {"cached_tokens": 4}
    for inst in (p, d):
        assert PASSWORD not in inst.log()
    # results are JSON chunks in the API node's reply lists, which expire (ttl)
    assert not [k for k in r.client().keys("*") if k.startswith(b"ReqQ_")
                and r.client().llen(k)]


def test_stale_decode_is_skipped_sigterm_removes_the_entry_and_none_left_is_503(
        redis_open, procs):  # noqa: F811
    topic = "failover"
    mode = redis_mode(redis_open, topic, expire_ms=1000)
    p = start_instance(procs, "prefill", "127.0.1.94", "prefill", mode)
    d1 = start_instance(procs, "decode1", "127.0.1.95", "decode", mode, env=SLOW)
    d2 = start_instance(procs, "decode2", "127.0.1.96", "decode", mode)
    for inst in (p, d1, d2):
        wait_ready(inst)
    ids = {v["host"]: k for k, v in entries(redis_open, topic).items()}
    # 1. a decode killed mid-request: 502 once its entry is stale, not a hang
    result: Dict[str, Any] = {}
    target = None

    def call() -> None:
        result["r"] = request(p.host, p.port, "POST", "/v1/completions",
                              {"prompt": "x " * 200, "max_tokens": 80}, timeout=15)

    for _ in range(10):  # the scheduler picks the least loaded decode: retry until d1
        t = threading.Thread(target=call)
        t.start()
        if wait_for(lambda t=t: "received KV" in d1.log() or not t.is_alive(), 10, "a pick"):
            if t.is_alive():
                target = t
                break
        t.join(10)
    assert target is not None, "the slow decode was never picked"
    t0 = time.monotonic()
    d1.signal(signal.SIGKILL)
    target.join(10)
    assert not target.is_alive()
    status, _, data = result["r"]
    err = json.loads(data)["error"]
    assert status == 502 and err["code"] == 502 and "127.0.1.95" in err["message"], data
    assert time.monotonic() - t0 < 4
    # 2. its entry stays (no HDEL after SIGKILL) but is stale: every request goes to d2
    assert ids["127.0.1.95"] in entries(redis_open, topic)
    before = d2.log().count("received KV")
    for _ in range(3):
        status, _, data = request(p.host, p.port, "POST", "/v1/completions",
                                  {"prompt": "hello", "max_tokens": 2})
        assert status == 200, data
    assert d2.log().count("received KV") == before + 3
    # 3. the last decode killed too: stale after 1 s, then 503 at once (none left)
    d2.signal(signal.SIGKILL)
    d2.wait_exit()
    time.sleep(1.2)
    assert ids["127.0.1.96"] in entries(redis_open, topic)
    t0 = time.monotonic()
    status, _, data = request(p.host, p.port, "POST", "/v1/chat/completions",
                              {"messages": [{"role": "user", "content": "hi"}]})
    assert time.monotonic() - t0 < 1
    err = json.loads(data)["error"]
    assert status == 503 and err["type"] == "ServiceUnavailableError", data
    assert "No Schedule Nodes: mixed:0, prefill:1, decode:0" in err["message"]
    # 4. SIGTERM: the instance HDELs its own entry at once
    p.signal(signal.SIGTERM)
    assert p.wait_exit() == 0
    assert ids["127.0.1.94"] not in entries(redis_open, topic)
    assert f"removed node {ids['127.0.1.94']} from {topic}.cluster" in p.log()


def test_wrong_or_missing_password_exits_1_without_printing_it(redis_pw, procs):  # noqa: F811
    host = "127.0.1.97"
    mode = redis_mode(redis_pw, TOPIC)
    wrong = [a if a != PASSWORD else "Wrong-7d1e-secret" for a in mode]
    inst = start_instance(procs, "wrongpw", host, "decode", wrong)
    assert inst.wait_exit() == 1
    assert f"cannot use Redis at {REDIS_HOST}:{redis_pw.port}/0" in inst.log()
    assert "Wrong-7d1e-secret" not in inst.log() and PASSWORD not in inst.log()
    nopw = mode[:mode.index("--scheduler-password")]
    inst = start_instance(procs, "nopw", host, "prefill", nopw)
    assert inst.wait_exit() == 1 and "cannot use Redis" in inst.log()
    # nothing listens: exit 1 too
    dead = ["--scheduler-name", "splitwise", "--scheduler-host", host, "--scheduler-port",
            str(free_port(host))]
    inst = start_instance(procs, "noredis", host, "prefill", dead)
    assert inst.wait_exit() == 1 and "cannot use Redis" in inst.log()
