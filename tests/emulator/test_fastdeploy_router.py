"""FastDeploy v1 router mode: the fd-router stand-in, a prefill and a decode on loopback;
registration, requests through the router with KV bytes moving, failures."""
from __future__ import annotations

import json
import signal
import socket
import threading
import time
from typing import Any, Dict

import pytest

from tests.emulator.helpers import metric, request, sse, sse_text
from tests.emulator.test_fastdeploy_support import (
    MODEL,
    PROMPT,
    SLOW,
    body_for,
    expected_text,
    module_procs,  # noqa: F401  (fixture)
    procs,  # noqa: F401  (fixture)
    start_instance,
    start_router,
    wait_for,
    wait_ready,
)

R_HOST, P_HOST, D_HOST = "127.0.1.80", "127.0.1.81", "127.0.1.82"


@pytest.fixture(scope="module")
def cluster(module_procs):  # noqa: F811
    r = start_router(module_procs, "router", R_HOST)
    r.wait_log("Router started at")
    mode = ["--router", f"{R_HOST}:{r.port}"]
    p = start_instance(module_procs, "prefill", P_HOST, "prefill", mode, tp=2,
                       env={"CUDA_VISIBLE_DEVICES": "0,1"})
    d = start_instance(module_procs, "decode", D_HOST, "decode", mode, tp=2,
                       env={"CUDA_VISIBLE_DEVICES": "4,5"})
    wait_for(lambda: r.get("/registered_number")[1] == {"mixed": 0, "prefill": 1,
                                                        "decode": 1}, 20, "P and D registered")
    return {"r": r, "p": p, "d": d}


def test_instances_register_with_fastdeploys_body(cluster):
    r, p, d = cluster["r"], cluster["p"], cluster["d"]
    for inst in (p, d):
        inst.wait_log("Register to router successfully")
        assert inst.log().count("Register to router successfully") == 1  # first time only
        assert wait_ready(inst).health() == 200
        assert "ignoring FastDeploy flags the emulator does not model: --quantization wint4" \
            in inst.log()
    status, reg = r.get("/registered")
    assert status == 200 and reg["mixed"] == []
    (pi,), (di,) = reg["prefill"], reg["decode"]
    for info, inst, devices in ((pi, p, ["0", "1"]), (di, d, ["4", "5"])):
        assert {"role", "host_ip", "port", "metrics_port", "connector_port", "rdma_ports",
                "engine_worker_queue_port", "device_ids", "transfer_protocol", "tp_size",
                "is_paused", "version", "connected_decodes"} <= set(info)
        assert info["host_ip"] == inst.host and info["port"] == str(inst.port)
        assert info["metrics_port"] == str(inst.ports["metrics"])
        assert info["connector_port"] == str(inst.ports["pd"])
        assert info["engine_worker_queue_port"] == str(inst.ports["ewq"])
        assert info["rdma_ports"] == [str(x) for x in inst.ports["rdma"]]
        assert info["device_ids"] == devices and info["tp_size"] == 2
        assert info["transfer_protocol"] == ["rdma", "ipc"] and info["is_paused"] is False
        assert info["rdma_nics"] == ["mlx5_0", "mlx5_1"]  # KVCACHE_RDMA_NICS
    assert pi["role"] == "prefill" and di["role"] == "decode"
    # every port of the instance is bound on --host
    for inst in (p, d):
        for port in [inst.ports["ewq"], inst.ports["cq"], inst.ports["pd"]] + inst.ports["rdma"]:
            socket.create_connection((inst.host, port), timeout=2).close()
        status, text = inst.get("/metrics", inst.ports["metrics"])
        assert status == 200 and b"fastdeploy:num_requests_running" in text
    assert r.get("/health")[0] == 200 and r.get("/health_generate")[0] == 200


def test_register_checks(cluster):
    r, p = cluster["r"], cluster["p"]
    good = {"role": "prefill", "host_ip": p.host, "port": p.port, "tp_size": 2,
            "transfer_protocol": ["rdma", "ipc"], "connector_port": p.ports["pd"]}
    for missing in ("role", "host_ip", "port"):
        bad = {k: v for k, v in good.items() if k != missing}
        status, _, data = request(R_HOST, r.port, "POST", "/register", bad)
        err = json.loads(data)["error"]
        assert status == 400 and f"'{missing}'" in err["message"], data
    status, _, data = request(R_HOST, r.port, "POST", "/register", dict(good, role="mixed"))
    assert status == 400 and "Invalid instance role: mixed" in data.decode()
    status, _, data = request(R_HOST, r.port, "POST", "/register",
                              dict(good, transfer_protocol=["tcp"]))
    assert status == 400
    # nothing answers /health there: refused
    status, _, data = request(R_HOST, r.port, "POST", "/register",
                              dict(good, host_ip="127.0.1.89", port=1))
    assert status == 503 and "is not healthy" in data.decode()
    # re-registration refreshes, it does not add
    status, _, _ = request(R_HOST, r.port, "POST", "/register", good)
    assert status == 200
    assert r.get("/registered_number")[1] == {"mixed": 0, "prefill": 1, "decode": 1}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("chat", [False, True])
def test_requests_through_the_router_move_the_kv(cluster, chat, stream):
    r, p, d = cluster["r"], cluster["p"], cluster["d"]
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = body_for(chat, stream)
    before_d, before_p = d.metrics(), p.metrics()
    if stream:
        status, events = sse(R_HOST, r.port, path, body)
        assert status == 200 and events[-1][1] == "[DONE]", events
        text = sse_text(events)
        usage = json.loads(events[-2][1])["usage"]
        first = json.loads(events[0][1])
        assert first["object"] == ("chat.completion.chunk" if chat else "text_completion")
    else:
        status, _, data = request(R_HOST, r.port, "POST", path, body)
        assert status == 200, data
        out = json.loads(data)
        choice = out["choices"][0]
        text = choice["message"]["content"] if chat else choice["text"]
        usage = out["usage"]
        assert choice["finish_reason"] == "length" and out["model"] == MODEL
        assert out["id"].startswith("chatcmpl-" if chat else "cmpl-")
    assert text == expected_text(7, chat)
    assert usage["completion_tokens"] == 7
    assert usage["prompt_tokens_details"] == {"cached_tokens": usage["prompt_tokens"]}
    nbytes = usage["prompt_tokens"] * 512
    after_d, after_p = d.metrics(), p.metrics()

    def delta(after: Dict, before: Dict, name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta(after_d, before_d, "pd_emu:kv_transfers_total") == 1
    assert delta(after_d, before_d, "pd_emu:kv_transfer_bytes_total") == nbytes
    assert delta(after_p, before_p, "pd_emu:kv_pulls_served_total", outcome="ok") == 1
    assert metric(after_p, "pd_emu:kv_held_blocks") == 0  # freed once pulled
    d.wait_log(rf"received KV of {usage['prompt_tokens']} prompt tokens from "
               rf"{P_HOST}:{p.ports['pd']} \(\d+ blocks, {nbytes} bytes over TCP standing in "
               r"for rdma")


def test_errors_are_openai_shaped(cluster):
    r = cluster["r"]
    for body, code in (({"prompt": "x", "model": "other"}, 404), ({"max_tokens": 3}, 400),
                       ("{not json", 400), ({"prompt": "x", "max_tokens": "many"}, 400)):
        status, _, data = request(R_HOST, r.port, "POST", "/v1/completions", body)
        err = json.loads(data)["error"]
        assert status == code and err["code"] == code and err["message"], data
    status, _, data = request(R_HOST, r.port, "GET", "/metrics")
    assert status == 200 and b'pd_emu:fdrouter_instances{role="decode"} 1.0' in data


def test_a_dead_decode_is_an_error_then_dropped_then_503(procs):  # noqa: F811
    r = start_router(procs, "router", "127.0.1.83")
    r.wait_log("Router started at")
    mode = ["--router", f"127.0.1.83:{r.port}"]
    start_instance(procs, "prefill", "127.0.1.84", "prefill", mode)
    d = start_instance(procs, "decode", "127.0.1.85", "decode", mode, env=SLOW)
    wait_for(lambda: r.get("/registered_number")[1] == {"mixed": 0, "prefill": 1, "decode": 1},
             20, "registration")
    # 1. the decode dies while it streams: an error chunk, then [DONE]; never a hang
    body = {"prompt": PROMPT, "max_tokens": 60, "stream": True}
    conn = socket.create_connection((r.host, r.port))
    raw = json.dumps(body).encode()
    conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                 b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(raw), raw))
    buf = b""
    conn.settimeout(10)
    while buf.count(b"data: ") < 3:
        chunk = conn.recv(65536)
        assert chunk, buf
        buf += chunk
    assert buf.startswith(b"HTTP/1.1 200"), buf
    t0 = time.monotonic()
    d.signal(signal.SIGKILL)
    while b"data: [DONE]" not in buf:
        chunk = conn.recv(65536)
        assert chunk, buf
        buf += chunk
    conn.close()
    assert time.monotonic() - t0 < 5
    err = json.loads(buf.split(b"data: ")[-2])["error"]
    assert err["code"] == 502 and "127.0.1.85" in err["message"], err
    # 2. before the health checks drop it: a quick 502
    result: Dict[str, Any] = {}

    def call() -> None:
        result["r"] = request(r.host, r.port, "POST", "/v1/completions",
                              {"prompt": PROMPT, "max_tokens": 3}, timeout=15)

    t = threading.Thread(target=call)
    t.start()
    t.join(10)
    assert not t.is_alive()
    status, _, data = result["r"]
    assert status in (502, 503) and json.loads(data)["error"]["code"] == status, data
    # 3. three failed checks (0.2 s apart) drop it; then 503 at once, OpenAI-shaped
    r.wait_log(r"removed unhealthy decode instance 127\.0\.1\.85:\d+", timeout=5)
    assert "failed its health check (3/3)" in r.log()
    assert r.get("/registered_number")[1] == {"mixed": 0, "prefill": 1, "decode": 0}
    t0 = time.monotonic()
    status, _, data = request(r.host, r.port, "POST", "/v1/chat/completions",
                              {"messages": [{"role": "user", "content": "hi"}]}, timeout=5)
    assert time.monotonic() - t0 < 1
    err = json.loads(data)["error"]
    assert status == 503 and err["code"] == 503 and err["type"] == "ServiceUnavailableError"
    assert "No decode servers available" in err["message"]
    assert r.get("/health_generate")[0] == 503
