"""Streaming timing, queueing, SIGTERM, client disconnects, fault injection, idle CPU."""
from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest

from tests.emulator.helpers import free_port, kvcfg, metric, request, sse

SLOW = {"PD_EMU_ZERO_LATENCY": "0", "PD_EMU_PREFILL_OVERHEAD_S": "0",
        "PD_EMU_PREFILL_S_PER_TOKEN": "0"}


def start(emu_factory, name, host, env=None, flags=None):
    return emu_factory(name, host, free_port(host), ["--served-model-name", "demo"]
                       + (flags or []), env=env).wait_ready()


def test_streaming_chunks_arrive_incrementally(emu_factory):
    e = start(emu_factory, "itl", "127.0.1.50", env=dict(SLOW, PD_EMU_ITL_S="0.12"))
    t0 = time.monotonic()
    status, events = sse(e.host, e.port, "/v1/completions",
                         {"prompt": "tick tock", "max_tokens": 6, "stream": True})
    arrivals = [t - t0 for t, d in events if d != "[DONE]"]
    assert status == 200 and len(arrivals) == 7  # 6 tokens + the finish chunk
    gaps = sorted(b - a for a, b in zip(arrivals, arrivals[1:6]))
    assert gaps[2] >= 0.08, gaps  # median gap ~ ITL: not buffered until the end
    assert arrivals[5] - arrivals[0] >= 0.5
    m = e.metrics()
    assert metric(m, "vllm:inter_token_latency_seconds_sum") >= 0.5


def test_max_num_seqs_queues_the_rest(emu_factory):
    e = start(emu_factory, "queue", "127.0.1.51", env=dict(SLOW, PD_EMU_ITL_S="0.05"),
              flags=["--max-num-seqs", "1"])
    results = {}

    def run(i):
        t = time.monotonic()
        results[i] = (e.post("/v1/completions", {"prompt": "q", "max_tokens": 20})[0],
                      time.monotonic() - t)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    m = e.metrics()
    assert metric(m, "vllm:num_requests_running") == 1
    assert metric(m, "vllm:num_requests_waiting") == 1
    for t in threads:
        t.join()
    assert [r[0] for r in results.values()] == [200, 200]
    assert max(r[1] for r in results.values()) >= 1.9  # the second waited for the first
    m = e.metrics()
    assert metric(m, "vllm:num_requests_running") == 0
    assert metric(m, "vllm:num_requests_waiting") == 0


@pytest.mark.slow
def test_sigterm_lets_in_flight_stream_finish_then_exits_0(emu_factory):
    host = "127.0.1.52"
    e = emu_factory("drain", host, free_port(host), [
        "--kv-transfer-config", kvcfg("kv_producer", free_port(host))],
        env=dict(SLOW, PD_EMU_ITL_S="0.1")).wait_ready()
    held = e.post("/v1/completions", {"prompt": "hold my KV please", "max_tokens": 1,
                                      "kv_transfer_params": {"do_remote_decode": True}})[2]
    assert held["kv_transfer_params"]["remote_block_ids"]
    s = _raw_stream(host, e.port, {"prompt": "long", "max_tokens": 10, "stream": True})
    buf = b""
    while b"data: " not in buf:  # the stream is under way
        buf += s.recv(65536)
    e.proc.send_signal(15)
    e.wait_log("received SIGTERM: draining")
    time.sleep(0.1)
    with pytest.raises(OSError):  # no new connections while draining
        request(host, e.port, "GET", "/health", timeout=1)
    s.settimeout(10)
    while b"data: [DONE]" not in buf:
        chunk = s.recv(65536)
        assert chunk, buf
        buf += chunk
    s.close()
    assert buf.startswith(b"HTTP/1.1 200") and buf.count(b"data: ") == 12
    assert e.wait_exit() == 0
    log = e.log()
    assert "freed 1 held KV blocks" in log and "stopped (exit 0)" in log


@pytest.mark.slow
def test_sigterm_grace_period_bounds_a_hung_request(emu_factory):
    e = start(emu_factory, "grace", "127.0.1.53", env={"PD_EMU_SHUTDOWN_GRACE_S": "0.5"})
    assert e.post("/admin/faults", {"hang": True})[0] == 200

    def hung():
        try:
            request(e.host, e.port, "POST", "/v1/completions", json.dumps({"prompt": "x"}),
                    timeout=5)
        except OSError:
            pass

    t = threading.Thread(target=hung)
    t.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    e.proc.send_signal(15)
    assert e.wait_exit() == 0
    assert time.monotonic() - t0 < 6  # the default grace is 20 s
    assert "grace period over: aborting 1 requests" in e.log()
    t.join()


def _raw_stream(host, port, body):
    s = socket.create_connection((host, port))
    data = json.dumps(body).encode()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return s


def test_client_disconnect_aborts_the_request(emu_factory):
    e = start(emu_factory, "abort", "127.0.1.54", env=dict(SLOW, PD_EMU_ITL_S="0.05"))
    s = _raw_stream(e.host, e.port, {"prompt": "x", "max_tokens": 200, "stream": True})
    buf = b""
    while buf.count(b"data: ") < 3:
        buf += s.recv(4096)
    s.close()
    # a non-streaming request whose client gives up
    s = _raw_stream(e.host, e.port, {"prompt": "y", "max_tokens": 200})
    time.sleep(0.3)
    s.close()
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        m = e.metrics()
        if metric(m, "pd_emu:request_aborts_total") == 2:
            break
        time.sleep(0.1)
    assert metric(m, "pd_emu:request_aborts_total") == 2
    assert metric(m, "vllm:request_success_total", finished_reason="abort") == 2
    assert metric(m, "vllm:num_requests_running") == 0
    assert metric(m, "vllm:generation_tokens_total") == 0  # neither finished


def test_error_rate_and_admin_endpoint(emu_factory):
    e = start(emu_factory, "errors", "127.0.1.55", env={"PD_EMU_ERROR_RATE": "1"})
    status, _, body = e.post("/v1/completions", {"prompt": "x"})
    assert status == 500 and "injected fault" in body["error"]["message"]
    assert e.post("/admin/faults", {"error_rate": 0})[2]["error_rate"] == 0.0
    assert e.post("/v1/completions", {"prompt": "x"})[0] == 200
    assert e.post("/admin/faults", {"error_rate": 0.5, "seed": 1})[0] == 400
    assert e.post("/admin/faults", {"error_rate": 2})[0] == 400
    assert e.post("/admin/faults", {"error_rate": 0.5})[0] == 200
    codes = [e.post("/v1/completions", {"prompt": "x", "max_tokens": 1})[0] for _ in range(40)]
    assert 5 <= codes.count(500) <= 35 and codes.count(200) + codes.count(500) == 40
    assert metric(e.metrics(), "pd_emu:injected_faults_total", kind="error") >= 6


def test_exit_after_n_requests(emu_factory):
    e = start(emu_factory, "exit", "127.0.1.56", env={"PD_EMU_EXIT_AFTER": "2"})
    assert e.post("/v1/completions", {"prompt": "a"})[0] == 200
    assert e.post("/v1/completions", {"prompt": "b"})[0] == 200
    assert e.wait_exit(5) == 1
    assert "fault: exiting after 2 requests" in e.log()


def test_hang_accepts_but_never_answers(emu_factory):
    e = start(emu_factory, "hang", "127.0.1.57", env={"PD_EMU_HANG": "1"})
    with pytest.raises(socket.timeout):
        request(e.host, e.port, "POST", "/v1/completions", json.dumps({"prompt": "x"}),
                timeout=0.5)
    assert e.health() == 200
    assert e.post("/admin/faults", {"hang": False})[0] == 200
    assert e.post("/v1/completions", {"prompt": "x"})[0] == 200


def test_slow_start_keeps_health_503(emu_factory):
    host = "127.0.1.58"
    t0 = time.monotonic()
    e = emu_factory("slow", host, free_port(host), [],
                    env={"PD_EMU_STARTUP_S": "0.4", "PD_EMU_SLOW_START_S": "0.8"})
    e.wait_log("API server on")
    assert e.health() == 503
    status, _, body = e.post("/v1/completions", {"prompt": "x"})
    assert status == 503 and "not ready" in body["error"]["message"]
    e.wait_ready()
    assert time.monotonic() - t0 >= 1.2
    assert "fault: slow start" in e.log()


def test_idle_cpu_is_near_zero(emu_factory):
    host = "127.0.1.59"
    e = emu_factory("idle", host, free_port(host), [
        "--kv-transfer-config", kvcfg("kv_producer", free_port(host), pdp=2),
        "--data-parallel-size", "2", "--data-parallel-address", host,
        "--data-parallel-rpc-port", str(free_port(host))]).wait_ready()

    def cpu():
        with open(f"/proc/{e.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    time.sleep(0.3)
    before = cpu()
    time.sleep(2.0)
    assert cpu() - before <= 0.05
    rss_kb = int(next(line.split()[1] for line in open(f"/proc/{e.proc.pid}/status")
                      if line.startswith("VmRSS")))
    assert rss_kb < 100_000


def test_waiting_queue_limit_answers_503(emu_factory):
    e = start(emu_factory, "qlimit", "127.0.1.49",
              env=dict(SLOW, PD_EMU_ITL_S="0.05", PD_EMU_MAX_WAITING="1"),
              flags=["--max-num-seqs", "1"])
    codes = []

    def run():
        codes.append(e.post("/v1/completions", {"prompt": "q", "max_tokens": 10})[0])

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
        time.sleep(0.1)
    for t in threads:
        t.join()
    assert sorted(codes) == [200, 200, 503]
    assert metric(e.metrics(), "pd_emu:request_errors_total", status="503") == 1
