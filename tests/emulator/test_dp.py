"""Data-parallel rendezvous: external DP ranks and internal DP with headless nodes."""
from __future__ import annotations

import socket
import time

import pytest

from tests.emulator.helpers import free_port, kvcfg, metric


def connectable(host: str, port: int) -> bool:
    s = socket.socket()
    s.settimeout(1)
    try:
        s.connect((host, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


@pytest.mark.slow
def test_external_dp_rendezvous_duplicate_and_lost_rank(emu_factory):
    h0, h1, h2 = "127.0.1.30", "127.0.1.31", "127.0.1.32"
    rpc, api, kv = free_port(h0), free_port(h0), free_port(h0)

    def rank(name, host, r, env=None):
        return emu_factory(name, host, api, [
            "--served-model-name", "demo", "--data-parallel-size", "2",
            "--data-parallel-rank", str(r), "--data-parallel-address", h0,
            "--data-parallel-rpc-port", str(rpc),
            "--kv-transfer-config", kvcfg("kv_producer", kv, pdp=2, engine_id="pre")],
            env=env)

    r1 = rank("rank1", h1, 1)
    r1.wait_log(rf"ranks \[1\] waiting for DP master at {h0}:{rpc}: Connection refused")
    assert r1.health() == 503
    t0 = time.monotonic()
    r0 = rank("rank0", h0, 0, env={"PD_EMU_STARTUP_S": "1.0"})
    r0.wait_log("DP master listening")
    assert r0.health() == 503 and r1.health() == 503  # rank 0 still "loading"
    r0.wait_ready()
    assert time.monotonic() - t0 >= 1.0
    r1.wait_ready()
    r0.wait_log("DP rendezvous complete: all 2 ranks joined")
    r1.wait_log("DP group complete")
    # each rank serves its own API and holds KV under <engine_id>_dp<rank>
    for r, e in ((0, r0), (1, r1)):
        out = e.post("/v1/completions", {"prompt": "x", "max_tokens": 1,
                                         "kv_transfer_params": {"do_remote_decode": True}})[2]
        assert out["kv_transfer_params"]["remote_engine_id"] == f"pre_dp{r}"
        assert out["kv_transfer_params"]["remote_host"] == e.host
    # a second process claiming rank 1 is refused and exits
    dup = rank("dup-rank1", h2, 1)
    assert dup.wait_exit() == 1
    assert f"duplicate rank 1: already registered by {h1}" in dup.log()
    r0.wait_log(f"DP master refused {h2}")
    assert r0.health() == 200 and r1.health() == 200
    # losing a rank (crash) makes the group (and rank 0) unready until it is back
    r1.proc.kill()
    r0.wait_log(rf"WARNING .*DP master: lost ranks \[1\] \({h1} pid")
    r0.wait_log(r"WARNING .*DP group incomplete, missing ranks \[1\]")
    assert r0.health() == 503
    r1b = rank("rank1-again", h1, 1)
    r1b.wait_ready()
    r0.wait_ready()


@pytest.mark.slow
def test_internal_dp_with_headless_node_moves_kv_from_the_headless_rank(emu_factory):
    master, worker, dec, agg = "127.0.1.33", "127.0.1.34", "127.0.1.35", "127.0.1.36"
    rpc, api, kv = free_port(master), free_port(master), free_port(master)
    common = ["--served-model-name", "demo", "--data-parallel-size", "4",
              "--data-parallel-size-local", "2", "--data-parallel-address", master,
              "--data-parallel-rpc-port", str(rpc),
              "--kv-transfer-config", kvcfg("kv_producer", kv, pdp=4, engine_id="pre")]
    m = emu_factory("master", master, api, common)
    m.wait_log(r"DP master: local ranks \[0, 1\] joined \(2/4\)")
    assert m.health() == 503
    h = emu_factory("headless", worker, api, common + [
        "--headless", "--data-parallel-start-rank", "2"], env={"PD_EMU_STARTUP_S": "0.8"})
    h.wait_log("headless: no API server")
    # ranks 2 and 3 listen on kv_port + rank (tp 1), as vLLM-Ascend's Mooncake does
    assert not connectable(worker, kv + 2)  # the headless readiness probe: closed until ready
    m.wait_ready()
    h.wait_log(rf"ready: headless; KV listeners \[{kv + 2}, {kv + 3}\] open")
    assert connectable(worker, kv + 2) and connectable(worker, kv + 3)
    assert not connectable(worker, api)  # headless never binds --port
    d = emu_factory("decode", dec, api, [
        "--served-model-name", "demo",
        "--kv-transfer-config", kvcfg("kv_consumer", kv, pdp=4)]).wait_ready()
    a = emu_factory("agg", agg, api, ["--served-model-name", "demo"]).wait_ready()
    seen = set()
    for i in range(8):
        body = {"prompt": f"request number {i} for the DP group", "max_tokens": 5}
        kvp = m.post("/v1/completions", dict(body, max_tokens=1, kv_transfer_params={
            "do_remote_decode": True}))[2]["kv_transfer_params"]
        rank = int(kvp["remote_engine_id"].rsplit("_dp", 1)[1])
        assert kvp["remote_host"] == (master if rank < 2 else worker)
        assert kvp["remote_port"] == kv + rank
        seen.add(rank)
        got = d.post("/v1/completions", dict(body, kv_transfer_params=kvp))[2]
        assert got["choices"][0]["text"] == a.post("/v1/completions", body)[2][
            "choices"][0]["text"]
    assert seen == {0, 1, 2, 3}
    mm = m.metrics()
    for r in range(4):
        assert metric(mm, "vllm:prompt_tokens_total", engine=str(r)) > 0
    assert metric(d.metrics(), "pd_emu:kv_transfers_total") == 8
    # the headless node stopping makes the master unready (a planned stop: INFO, not WARNING)
    assert h.terminate() == 0
    m.wait_log(rf"INFO .*DP master: ranks \[2, 3\] \({worker} pid \d+\) left \(shutting down\)")
    assert m.health() == 503
    assert "WARNING" not in m.log()
