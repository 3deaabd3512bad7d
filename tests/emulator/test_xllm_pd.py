"""xLLM personalities against a real etcd: the service's readiness gate, registration
(keys, JSON, lease), the PD request flow with KV bytes moving, failures, lifecycles."""
from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import pytest

from pd_launcher.emulator import textgen
from pd_launcher.emulator.xllm.common import REQUIRED_FIELDS
from pd_launcher.emulator.xllm.etcd import prefix_end
from tests.emulator.helpers import (
    EmuProc,
    free_port,
    metric,
    parse_metrics,
    request,
    sse,
    sse_text,
)
from tests.fixtures.etcd import ETCD_MISSING, running_etcd

pytestmark = pytest.mark.skipif(ETCD_MISSING is not None, reason=str(ETCD_MISSING))

ETCD_HOST = "127.0.1.9"
SVC, P_HOST, D_HOST, D10_HOST = "127.0.1.60", "127.0.1.61", "127.0.1.62", "127.0.1.63"
NS = "mycluster"
PROMPT = "Disaggregated serving splits prefill and decode across engines."
MSGS = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Explain KV cache transfer."}]
SLOW = {"PD_EMU_ZERO_LATENCY": "0", "PD_EMU_PREFILL_OVERHEAD_S": "0",
        "PD_EMU_PREFILL_S_PER_TOKEN": "0", "PD_EMU_ITL_S": "0.05"}


# ------------------------------------------------------------------------ helpers


class XProc(EmuProc):
    """One `python -m pd_launcher.emulator xllm | xllm_master_serving` process."""

    base_env = {"PD_EMU_ZERO_LATENCY": "1"}

    def __init__(self, name: str, cmd: str, argv: List[str], logdir: Path,
                 env: Optional[Dict[str, str]] = None) -> None:
        super().__init__(name, cmd, argv, logdir, env)
        self.transfer_port = 0
        self.key = ""


def _factory(logdir: Path, started: List[XProc]) -> Callable[..., XProc]:
    def start(name: str, cmd: str, argv: List[str],
              env: Optional[Dict[str, str]] = None) -> XProc:
        p = XProc(name, cmd, argv, logdir, env)
        started.append(p)
        return p
    return start


def _stop_all(started: List[XProc]) -> None:
    for p in started:
        p.signal(signal.SIGTERM)
    for p in started:
        p.stop()


@pytest.fixture
def procs(tmp_path_factory):
    started: List[XProc] = []
    yield _factory(tmp_path_factory.mktemp("xllm"), started)
    _stop_all(started)


@pytest.fixture(scope="module")
def module_procs(tmp_path_factory):
    started: List[XProc] = []
    yield _factory(tmp_path_factory.mktemp("xllm"), started)
    _stop_all(started)


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    with running_etcd(str(tmp_path_factory.mktemp("etcd")), ETCD_HOST) as e:
        yield e


def _etcd(etcd, path: str, body: Dict[str, Any]) -> Dict[str, Any]:
    import base64

    enc = {k: (base64.b64encode(v.encode()).decode() if k in ("key", "value") else v)
           for k, v in body.items()}
    req = urllib.request.Request(etcd.endpoint + path, data=json.dumps(enc).encode(),
                                 headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=5) as rsp:
        return json.load(rsp)


def etcd_keys(etcd, prefix: str) -> Dict[str, str]:
    import base64

    data = _etcd(etcd, "/v3/kv/range", {"key": prefix, "range_end": prefix_end(prefix)})
    return {base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", "")).decode()
            for kv in data.get("kvs", [])}


def etcd_put(etcd, key: str, value: str) -> None:
    _etcd(etcd, "/v3/kv/put", {"key": key, "value": value})


def etcd_delete(etcd, key: str) -> None:
    _etcd(etcd, "/v3/kv/deleterange", {"key": key})


def wait_for(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def tcp_open(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except ConnectionRefusedError:
        return False


def start_service(procs, name: str, host: str, ns: str, etcd,
                  flags: tuple = ("--tokenizer_path=/models/m",)) -> XProc:
    http, rpc = free_port(host), free_port(host)
    s = procs(name, "xllm_master_serving", [
        f"--etcd_addr={etcd.addr}", f"--etcd_namespace={ns}", f"--http_server_port={http}",
        f"--rpc_server_port={rpc}", f"--server_host={host}", "--load_balance_policy=RR"]
        + list(flags))
    s.host, s.port, s.transfer_port = host, http, rpc  # transfer_port: the RPC port here
    return s


def start_instance(procs, name: str, host: str, role: str, ns: str, etcd, nnodes: int = 1,
                   env: Optional[Dict[str, str]] = None, extra: tuple = ()) -> List[XProc]:
    master = free_port(host)
    ranks = []
    for r in range(nnodes):
        port, dport, tport = free_port(host), free_port(host), free_port(host)
        argv = ["--model=/models/m", f"--port={port}", f"--devices=npu:{r}",
                f"--master_node_addr={host}:{master}", "--enable_prefix_cache=false",
                "--enable_chunked_prefill=false", "--enable_disagg_pd=true",
                f"--instance_role={role}", f"--etcd_addr={etcd.addr}",
                f"--transfer_listen_port={tport}", f"--disagg_pd_port={dport}",
                f"--node_rank={r}", f"--nnodes={nnodes}", f"--host={host}",
                f"--etcd_namespace={ns}"] + list(extra)
        p = procs(f"{name}-rank{r}", "xllm", argv, env)
        p.host, p.port, p.transfer_port = host, port, tport
        p.key = f"/{ns}/XLLM:{role}:{host}:{ranks[0].port if ranks else port}"
        ranks.append(p)
    return ranks


def metrics_of(host: str, port: int) -> Dict:
    status, _, data = request(host, port, "GET", "/metrics")
    assert status == 200
    return parse_metrics(data.decode())


def expected_text(n: int, chat: bool) -> str:
    key = textgen.prompt_key("text", textgen.render_chat(MSGS) if chat else PROMPT)
    return textgen.text("m", key, n)


# ------------------------------------------------------------------ the cluster


@pytest.fixture(scope="module")
def cluster(etcd, module_procs):
    """Service first, then a 2-device prefill, then a decode; what the service's ports
    did at each stage is recorded for the gate test."""
    seen: Dict[str, Any] = {}
    svc = start_service(module_procs, "service", SVC, NS, etcd)
    svc.wait_log(r"Xllm rpc server started on: ")
    seen["rpc_open_at_start"] = tcp_open(SVC, svc.transfer_port)
    seen["http_open_at_start"] = tcp_open(SVC, svc.port)
    p = start_instance(module_procs, "prefill", P_HOST, "PREFILL", NS, etcd, nnodes=2)
    wait_for(lambda: p[0].key in etcd_keys(etcd, f"/{NS}/"), 20, "the prefill's key")
    svc.wait_log(r"instance \S+ registered: PREFILL")
    seen["http_open_with_prefill_only"] = tcp_open(SVC, svc.port)
    (d,) = start_instance(module_procs, "decode", D_HOST, "DECODE", NS, etcd)
    svc.wait_log(r"HTTP server started, instances available")
    seen["http_open_with_both"] = tcp_open(SVC, svc.port)
    return {"svc": svc, "p": p, "d": d, "seen": seen}


def test_service_opens_rpc_at_once_and_http_only_with_a_prefill_and_a_decode(cluster, etcd):
    svc, seen = cluster["svc"], cluster["seen"]
    assert seen == {"rpc_open_at_start": True, "http_open_at_start": False,
                    "http_open_with_prefill_only": False, "http_open_with_both": True}
    log = svc.log()
    rpc = f"{SVC}:{svc.transfer_port}"
    assert f"Xllm rpc server started on: {rpc}" in log
    assert f"HTTP server started, instances available, endpoint: {SVC}:{svc.port}" in log
    keys = etcd_keys(etcd, f"/{NS}/XLLM:SERVICE:")
    assert keys == {f"/{NS}/XLLM:SERVICE:{rpc}": rpc, f"/{NS}/XLLM:SERVICE:MASTER": rpc}
    status, _, body = request(SVC, svc.transfer_port, "POST", "/rpc/Hello", {})
    assert status == 200 and json.loads(body)["master"] is True


def test_instance_keys_hold_the_v0_9_json(cluster, etcd):
    p0, p1 = cluster["p"]
    d = cluster["d"]
    keys = etcd_keys(etcd, f"/{NS}/XLLM:")
    assert set(keys) >= {p0.key, d.key} and f"/{NS}/XLLM:PREFILL:{P_HOST}:{p1.port}" not in keys
    pj, dj = json.loads(keys[p0.key]), json.loads(keys[d.key])
    for info in (pj, dj):
        assert set(REQUIRED_FIELDS) <= set(info)
        assert {"incarnation_id", "register_ts_ms", "worker_free_phy_pages", "total_phy_pages",
                "model_weight_segments"} <= set(info)
        assert info["dp_size"] == 1 and isinstance(info["register_ts_ms"], int)
    assert pj["name"] == f"{P_HOST}:{p0.port}" and pj["type"] == 1
    assert pj["ports"] == [p0.transfer_port, p1.transfer_port]  # every device's KV port
    assert pj["device_ips"] == [P_HOST, P_HOST] and len(pj["k_cache_ids"]) == 2
    assert pj["rpc_address"].startswith(f"{P_HOST}:")
    assert dj["type"] == 2 and dj["ports"] == [d.transfer_port]
    assert request(P_HOST, p0.port, "GET", "/health")[0] == 200
    assert tcp_open(P_HOST, p1.transfer_port)  # the worker's KV listener
    assert "Success register instance to etcd." in p0.log()
    assert "joined the instance master" in p1.log()
    m = metrics_of(P_HOST, p0.port)
    assert metric(m, "pd_emu:xllm_workers_connected") == 2
    # the service linked the decode to the prefill (LinkInstance on the decode)
    d.wait_log(rf"linked prefill instance {P_HOST}:{p0.port}")


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("chat", [False, True])
def test_requests_through_the_service_move_the_kv(cluster, chat, stream):
    svc, (p0, _), d = cluster["svc"], cluster["p"], cluster["d"]
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body: Dict[str, Any] = {"model": "m", "max_tokens": 7, "stream": stream}
    body.update({"messages": MSGS} if chat else {"prompt": PROMPT})
    if stream:
        body["stream_options"] = {"include_usage": True}
    before_d, before_p = metrics_of(D_HOST, d.port), metrics_of(P_HOST, p0.port)
    if stream:
        status, events = sse(SVC, svc.port, path, body)
        assert status == 200 and events[-1][1] == "[DONE]"
        text = sse_text(events)
        usage = json.loads(events[-2][1])["usage"]
        first = json.loads(events[0][1])
        assert first["object"] == ("chat.completion.chunk" if chat else "text_completion")
    else:
        status, _, data = request(SVC, svc.port, "POST", path, body)
        assert status == 200, data
        out = json.loads(data)
        choice = out["choices"][0]
        text = choice["message"]["content"] if chat else choice["text"]
        usage = out["usage"]
        assert choice["finish_reason"] == "length"
        assert out["id"].startswith("chatcmpl-" if chat else "cmpl-")
    assert text == expected_text(7, chat)
    assert usage["completion_tokens"] == 7
    # the decode instance received the prompt's KV: vLLM-style cached tokens
    assert usage["prompt_tokens_details"] == {"cached_tokens": usage["prompt_tokens"]}
    after_d, after_p = metrics_of(D_HOST, d.port), metrics_of(P_HOST, p0.port)
    nbytes = usage["prompt_tokens"] * 512
    assert metric(after_d, "pd_emu:kv_transfers_total") - metric(
        before_d, "pd_emu:kv_transfers_total") == 1
    assert metric(after_d, "pd_emu:kv_transfer_bytes_total") - metric(
        before_d, "pd_emu:kv_transfer_bytes_total") == nbytes
    assert metric(after_p, "pd_emu:kv_pulls_served_total", outcome="ok") - metric(
        before_p, "pd_emu:kv_pulls_served_total", outcome="ok") == 1
    assert metric(after_p, "pd_emu:kv_held_blocks") == 0  # freed once pulled
    d.wait_log(rf"received KV of {usage['prompt_tokens']} prompt tokens from "
               rf"{P_HOST}:{p0.port} \(\d+ blocks, {nbytes} bytes")


def test_models_hello_metrics_and_errors(cluster):
    svc = cluster["svc"]
    status, _, data = request(SVC, svc.port, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in json.loads(data)["data"]] == ["m"]
    assert request(SVC, svc.port, "GET", "/hello")[0] == 200
    m = metrics_of(SVC, svc.port)
    assert metric(m, "pd_emu:xservice_instances", type="PREFILL") == 1
    assert metric(m, "pd_emu:xservice_instances", type="DECODE") == 1
    assert metric(m, "pd_emu:xservice_http_server_listening") == 1
    assert metric(m, "pd_emu:xservice_cached_tokens_total") > 0
    for body, code in (({"prompt": "x", "model": "other"}, 404), ({"max_tokens": 3}, 400),
                       ("{not json", 400), ({"prompt": "x", "max_tokens": "many"}, 400)):
        status, _, data = request(SVC, svc.port, "POST", "/v1/completions", body)
        err = json.loads(data)["error"]
        assert status == code and err["code"] == code and err["message"], data


def test_a_value_the_service_cannot_parse_is_ignored(cluster, etcd, procs):
    svc, d = cluster["svc"], cluster["d"]
    bogus = f"/{NS}/XLLM:PREFILL:127.0.1.99:1"
    info = {"name": "127.0.1.99:1", "rpc_address": "127.0.1.99:2", "type": 1,
            "cluster_ids": [1], "addrs": [1], "v_cache_ids": [1], "dp_size": 1,
            "device_ips": ["127.0.1.99"], "ports": [3], "ttft_profiling_data": [],
            "tpot_profiling_data": []}  # no k_cache_ids
    etcd_put(etcd, bogus, json.dumps(info))
    svc.wait_log(rf"Parse instance json failed, key: {re.escape(bogus)} \(missing k_cache_ids\)")
    # an xLLM >= 0.10 instance (no k_cache_ids, v_cache_ids, device_ips) never becomes routable
    (new,) = start_instance(procs, "decode-0.10", D10_HOST, "DECODE", NS, etcd,
                            env={"PD_EMU_XLLM_INSTANCE_JSON": "0.10"})
    new.wait_log("Success register instance to etcd.")
    assert "k_cache_ids" not in json.loads(etcd_keys(etcd, new.key)[new.key])
    svc.wait_log(rf"Parse instance json failed, key: {re.escape(new.key)} "
                 r"\(missing k_cache_ids, v_cache_ids, device_ips\)")
    m = metrics_of(SVC, svc.port)
    assert metric(m, "pd_emu:xservice_instances", type="PREFILL") == 1
    assert metric(m, "pd_emu:xservice_instances", type="DECODE") == 1
    for _ in range(2):  # RR over the decodes the service knows: only the 0.9 one
        status, _, data = request(SVC, svc.port, "POST", "/v1/completions",
                                  {"prompt": "hi", "max_tokens": 2})
        assert status == 200, data
    m = metrics_of(SVC, svc.port)
    assert metric(m, "pd_emu:xservice_routed_requests_total", decode=f"{D_HOST}:{d.port}") \
        == metric(m, "pd_emu:xservice_routed_requests_total")
    etcd_delete(etcd, bogus)


# ------------------------------------------------------------- failures, lifecycle


def test_decode_or_prefill_dying_mid_request_is_an_error_not_a_hang(etcd, procs):
    ns, host = "failures", "127.0.1.64"
    svc = start_service(procs, "service", host, ns, etcd)
    (p,) = start_instance(procs, "prefill", "127.0.1.65", "PREFILL", ns, etcd, env=SLOW,
                          extra=("--etcd_ttl=1",))
    d1, d2 = (start_instance(procs, f"decode{i}", f"127.0.1.{66 + i}", "DECODE", ns, etcd,
                             env=SLOW, extra=("--etcd_ttl=1",))[0] for i in (1, 2))
    svc.wait_log(r"HTTP server started")
    wait_for(lambda: svc.log().count("registered: DECODE") == 2, 10, "both decodes")
    # 1. a decode dies while it streams: the stream ends with an error chunk
    body = {"prompt": PROMPT, "max_tokens": 60, "stream": True}
    conn = socket.create_connection((host, svc.port))
    raw = json.dumps(body).encode()
    conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                 b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(raw), raw))
    buf = b""
    while buf.count(b"data: ") < 3:
        chunk = conn.recv(65536)
        assert chunk, buf
        buf += chunk
    victim = d1 if "received KV" in d1.log() else d2
    survivor = d2 if victim is d1 else d1
    t0 = time.monotonic()
    victim.signal(signal.SIGKILL)
    conn.settimeout(10)
    while b"data: [DONE]" not in buf:
        chunk = conn.recv(65536)
        assert chunk, buf
        buf += chunk
    conn.close()
    assert time.monotonic() - t0 < 5
    err = json.loads(buf.split(b"data: ")[-2])["error"]
    assert err["code"] == 502 and victim.host in err["message"], err
    svc.wait_log(rf"instance {victim.host}:\d+ \(DECODE\) removed", timeout=10)
    # 2. the prefill dies while the surviving decode generates: 502, not a hang
    result: Dict[str, Any] = {}

    def call():
        result["r"] = request(host, svc.port, "POST", "/v1/completions",
                              {"prompt": PROMPT, "max_tokens": 60}, timeout=15)

    t = threading.Thread(target=call)
    t.start()
    survivor.wait_log("received KV")
    p.signal(signal.SIGKILL)
    t.join(15)
    assert not t.is_alive()
    status, _, data = result["r"]
    err = json.loads(data)["error"]
    assert status == 502 and err["code"] == 502, data
    # 3. no prefill left: the service stops listening on its HTTP port
    svc.wait_log("No available instances, stopping HTTP server.", timeout=10)
    assert not tcp_open(host, svc.port)
    assert tcp_open(host, svc.transfer_port)  # RPC stays up


def test_losing_a_device_process_stops_the_instance(etcd, procs):
    ns = "devices"
    etcd_put(etcd, f"/{ns}/XLLM:SERVICE:MASTER", "127.0.1.99:1")  # no service needed
    a = start_instance(procs, "inst-a", "127.0.1.70", "PREFILL", ns, etcd, nnodes=2)
    b = start_instance(procs, "inst-b", "127.0.1.71", "DECODE", ns, etcd, nnodes=2,
                       extra=("--etcd_ttl=1",))
    for inst in (a, b):
        wait_for(lambda inst=inst: inst[0].key in etcd_keys(etcd, f"/{ns}/"), 20, "keys")
    # a worker dies: the master deregisters and exits 1
    a[1].signal(signal.SIGKILL)
    t0 = time.monotonic()
    assert a[0].wait_exit(10) == 1
    wait_for(lambda: a[0].key not in etcd_keys(etcd, f"/{ns}/"), 5, "key removal")
    assert time.monotonic() - t0 < 3 + 2  # etcd_ttl + 2 s
    assert "worker node_rank 1" in a[0].log() and "deregistering and exiting" in a[0].log()
    # the master dies: its worker exits 1 (its key expires with the lease)
    b[0].signal(signal.SIGKILL)
    assert b[1].wait_exit(10) == 1
    assert "went away" in b[1].log()
    wait_for(lambda: b[0].key not in etcd_keys(etcd, f"/{ns}/"), 3 + 2, "lease expiry")


def test_registration_waits_for_the_master_keeps_the_key_and_sigterm_revokes_it(etcd, procs):
    ns = "lifecycle"
    (d,) = start_instance(procs, "decode", "127.0.1.72", "DECODE", ns, etcd,
                          extra=("--etcd_ttl=10", "--heart_beat_interval=0.2"))
    d.wait_log("Master service not set, wait 2s!")
    assert request(d.host, d.port, "GET", "/health")[0] == 503
    assert d.key not in etcd_keys(etcd, f"/{ns}/")
    etcd_put(etcd, f"/{ns}/XLLM:SERVICE:MASTER", "127.0.1.99:1")
    d.wait_log("Success register instance to etcd.")
    wait_for(lambda: request(d.host, d.port, "GET", "/health")[0] == 200, 5, "/health 200")
    # the key vanishes: put again within a heartbeat interval or two
    etcd_delete(etcd, d.key)
    wait_for(lambda: d.key in etcd_keys(etcd, f"/{ns}/"), 2, "the key to come back")
    d.wait_log("vanished from etcd; putting it again")
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    assert d.key not in etcd_keys(etcd, f"/{ns}/")  # revoked, not expired (TTL 10 s)
    assert time.monotonic() - t0 < 3
    assert "deregistered: etcd lease revoked" in d.log()


def test_kv_corruption_is_a_502_and_a_standby_service_takes_over(etcd, procs):
    ns, host = "kvfail", "127.0.1.73"
    s1 = start_service(procs, "service1", host, ns, etcd)
    s1.wait_log("this service is the master")
    s2 = start_service(procs, "service2", host, ns, etcd)
    s2.wait_log(rf"master service is {host}:{s1.transfer_port}; this one stands by")
    (p,) = start_instance(procs, "prefill", "127.0.1.74", "PREFILL", ns, etcd,
                          env={"PD_EMU_KV_CORRUPT_RATE": "1"})
    (d,) = start_instance(procs, "decode", "127.0.1.75", "DECODE", ns, etcd)
    s1.wait_log("HTTP server started")
    status, _, data = request(host, s1.port, "POST", "/v1/completions",
                              {"prompt": PROMPT, "max_tokens": 4})
    err = json.loads(data)["error"]
    assert status == 502 and "KV transfer failed (corrupted)" in err["message"], data
    assert metric(metrics_of(d.host, d.port), "pd_emu:kv_transfer_failures_total",
                  cause="corrupted") == 1
    # the master service stops: the standby takes the master key, instances follow it
    s1.signal(signal.SIGTERM)
    assert s1.wait_exit() == 0
    s2.wait_log("this service is the master")
    rpc2 = f"{host}:{s2.transfer_port}"
    assert etcd_keys(etcd, f"/{ns}/XLLM:SERVICE:") == {f"/{ns}/XLLM:SERVICE:{rpc2}": rpc2,
                                                      f"/{ns}/XLLM:SERVICE:MASTER": rpc2}
    d.wait_log(rf"xllm-service master is now {rpc2}", timeout=10)
    s2.wait_log("HTTP server started")
    assert request(host, s2.port, "GET", "/v1/models")[0] == 200


def test_a_default_instance_serves_alone_and_timeout_ms_bounds_a_request(etcd, procs):
    ns, host = "default", "127.0.1.76"
    svc = start_service(procs, "service", host, ns, etcd, flags=("--timeout_ms=400",))
    (inst,) = start_instance(procs, "default", "127.0.1.77", "DEFAULT", ns, etcd, env=SLOW)
    svc.wait_log("HTTP server started")
    status, _, data = request(host, svc.port, "POST", "/v1/completions",
                              {"prompt": PROMPT, "max_tokens": 3})
    out = json.loads(data)
    assert status == 200 and out["choices"][0]["text"] == expected_text(3, False), data
    assert out["usage"]["prompt_tokens_details"] is None  # no KV moved: generated in place
    assert out["model"] == "m"  # no --tokenizer_path: the instance's model name
    t0 = time.monotonic()
    status, _, data = request(host, svc.port, "POST", "/v1/completions",
                              {"prompt": PROMPT, "max_tokens": 60})
    assert status == 504 and "--timeout_ms" in json.loads(data)["error"]["message"]
    assert time.monotonic() - t0 < 2
    # a client may also talk to the instance directly
    status, _, data = request(inst.host, inst.port, "POST", "/v1/completions",
                              {"prompt": PROMPT, "max_tokens": 3})
    assert status == 200 and json.loads(data)["choices"][0]["text"] == expected_text(3, False)
