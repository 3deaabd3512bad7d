"""The proxy agent's config reload (SIGHUP) and operator drains (drain_file), against a
real nginx on 127.0.78.x; and the rules behind them on an Agent object."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pd_deploy.proxy_config import proxy_unit
from pd_launcher.proxy_agent import Agent
from tests.proxy.harness import Backend, Proxy, http, metric, needs_nginx, parse_metrics, post
from tests.unit.unitnode import wait_for

PROXY_HOST = "127.0.78.10"
PREFILL = "127.0.78.11"
DECODE = ["127.0.78.21", "127.0.78.22", "127.0.78.23"]


@pytest.fixture
def rig(aloop, tmp_path):
    made: dict = {"backends": [], "proxies": []}

    def make(n_decode: int = 2, **options):
        p = Backend(aloop, PREFILL, "prefill").start()
        ds = [Backend(aloop, DECODE[i], "decode").start() for i in range(n_decode)]
        made["backends"] += [p] + ds
        px = Proxy(tmp_path / f"px{len(made['proxies'])}", [p.addr], [d.addr for d in ds],
                   options, host=PROXY_HOST)
        made["proxies"].append(px)
        return px, p, ds

    yield make
    for px in made["proxies"]:
        px.stop()
    for b in made["backends"]:
        b.stop()


def agent_cfg(px: Proxy) -> dict:
    return json.loads((Path(px.dirs["run"]) / "proxy_agent.json").read_text())


def rerender(px: Proxy, decode: list[str]) -> None:
    """The files of the spec after a scale-out, as the launcher's reload writes them."""
    block = dict(px.block, decode=decode)
    for f in proxy_unit(block, px.dirs, nginx_bin=px.unit["processes"][0]["argv"][0])["files"]:
        Path(f["path"]).write_text(f["content"])


def health(px: Proxy) -> dict:
    return json.loads(http("GET", px.url + "/health")[2])


def decode_hits(ds: list[Backend]) -> list[int]:
    return [len(d.gen_requests()) for d in ds]


def send(px: Proxy, n: int) -> list[int]:
    return [post(px.url + "/v1/completions", {"model": "demo-model", "prompt": "hi",
                                              "max_tokens": 2})[0] for _ in range(n)]


@needs_nginx
def test_sighup_rereads_the_config_and_nginx_gets_the_new_pool(rig):
    px, _p, ds = rig(n_decode=2)
    extra = Backend(ds[0].loop, DECODE[2], "decode").start()
    try:
        assert all(st == 200 for st in send(px, 2))
        rerender(px, [d.addr for d in ds] + [extra.addr])
        px.procs["proxy-agent"].send_signal(signal.SIGHUP)
        m = lambda: parse_metrics(http("GET", px.url + "/metrics")[2].decode())  # noqa: E731
        wait_for(lambda: metric(m(), "pd_proxy_config_reloads_total") == 1, what="reload")
        assert px.procs["proxy-agent"].poll() is None  # SIGHUP did not end it
        assert extra.addr in (Path(px.dirs["run"]) / "pd_upstreams.conf").read_text()
        wait_for(lambda: health(px)["pools"]["decode"]["total"] == 3, what="3 decode")
        # nginx was reloaded: the new peer gets requests (least_conn, equal counts: turns)
        time.sleep(0.5)
        assert all(st == 200 for st in send(px, 9))
        assert len(extra.gen_requests()) > 0, decode_hits(ds)
        assert metric(m(), "pd_proxy_reloads_total") >= 1
        log = px.logs["proxy-agent"].read_text()
        assert "config reloaded from" in log and "decode 3" in log
    finally:
        extra.stop()


@needs_nginx
def test_drain_file_marks_peers_down_and_confirms(rig):
    px, _p, ds = rig(n_decode=2)
    run = Path(px.dirs["run"])
    drain, applied = run / "drain.json", run / "drain.applied.json"
    assert agent_cfg(px)["drain_file"] == str(drain)
    assert health(px)["drain"] == {"id": None, "peers": [], "applied": True,
                                   "applied_at": None}

    def write(doc) -> None:
        tmp = drain.with_suffix(".tmp")
        tmp.write_text(doc if isinstance(doc, str) else json.dumps(doc))
        os.replace(tmp, drain)

    def applied_id(want):
        try:
            doc = json.loads(applied.read_text())
        except (FileNotFoundError, ValueError):
            return None
        return doc if doc["id"] == want else None

    t0 = time.time()
    write({"id": "a1", "peers": [ds[0].addr]})
    doc = wait_for(lambda: applied_id("a1"), what="drain a1 applied")
    assert doc["peers"] == [ds[0].addr] and t0 <= doc["applied_at"] <= time.time()
    assert f"server {ds[0].addr} " in (conf := (run / "pd_upstreams.conf").read_text())
    assert [x for x in conf.splitlines() if ds[0].addr in x][0].endswith(" down;")
    before = decode_hits(ds)
    assert all(st == 200 for st in send(px, 4))
    assert decode_hits(ds)[0] == before[0] and decode_hits(ds)[1] == before[1] + 4
    h = health(px)
    assert h["drain"]["id"] == "a1" and h["drain"]["peers"] == [ds[0].addr]
    assert h["drain"]["applied"] is True and h["pools"]["decode"]["drained"] == 1
    assert [u["drained"] for u in h["pools"]["decode"]["upstreams"]] == [True, False]

    # every decode peer: an operator drain takes out even the last one
    write({"id": "a2", "peers": [d.addr for d in ds]})
    wait_for(lambda: applied_id("a2"), what="drain a2 applied")
    conf = (run / "pd_upstreams.conf").read_text()
    assert all(f"server {d.addr} max_fails=1 fail_timeout=10s down;" in conf for d in ds)
    before = decode_hits(ds)
    assert send(px, 1) == [502]
    assert decode_hits(ds) == before

    # an invalid file: logged, the drains stay
    write("{not json")
    wait_for(lambda: "drain file" in px.logs["proxy-agent"].read_text(), what="logged")
    assert health(px)["drain"]["id"] == "a2"

    # the agent restarts: the drain survives (applied again at its startup)
    write({"id": "a3", "peers": [ds[1].addr]})
    wait_for(lambda: applied_id("a3"), what="drain a3 applied")
    agent = px.procs["proxy-agent"]
    agent.terminate()
    agent.wait(5)
    applied.unlink()
    (run / "pd_upstreams.conf").write_text(
        proxy_unit(px.block, px.dirs)["files"][-2]["content"])  # what a restart writes
    argv = [sys.executable] + list(px.unit["processes"][1]["argv"][1:])
    px.procs["proxy-agent"] = subprocess.Popen(
        argv, stdout=px.logs["proxy-agent"].open("ab"), stderr=subprocess.STDOUT,
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2])),
        start_new_session=True)
    wait_for(lambda: applied_id("a3"), what="drain a3 applied after a restart")
    assert [x for x in (run / "pd_upstreams.conf").read_text().splitlines()
            if ds[1].addr in x][0].endswith(" down;")
    px.wait_ready(agent=True)
    before = decode_hits(ds)
    assert all(st == 200 for st in send(px, 3))
    assert decode_hits(ds) == [before[0] + 3, before[1]]

    # an empty file: no drains (confirmed with a null id)
    write("")
    wait_for(lambda: health(px)["drain"]["peers"] == [], what="undrained")
    wait_for(lambda: applied.exists() and json.loads(applied.read_text())["peers"] == [],
             what="undrain applied")
    assert " down;" not in (run / "pd_upstreams.conf").read_text()


# ------------------------------------------------------------ rules, without nginx

POOLS = {
    "prefill": {"name": "pd_prefill", "servers": ["10.0.0.1:1", "10.0.0.2:1"], "zone_kb": 64,
                "balance": "", "params": "", "keepalive": 0, "keepalive_timeout_s": 4},
    "decode": {"name": "pd_decode", "servers": ["10.0.0.5:1", "10.0.0.6:1"], "zone_kb": 64,
               "balance": "", "params": "", "keepalive": 0, "keepalive_timeout_s": 4},
}


def make_agent(tmp_path, pools=POOLS) -> tuple[Agent, Path]:
    cfg = {"listen": "127.0.78.10:1", "access_log": str(tmp_path / "a.log"),
           "pid_path": str(tmp_path / "nginx.pid"),
           "upstreams_path": str(tmp_path / "up.conf"), "pools": pools,
           "fail_timeout_s": 10, "max_fails": 1, "drain_file": str(tmp_path / "drain.json"),
           "health": {"enabled": True, "path": "/health", "interval_s": 5, "timeout_s": 2,
                      "fails": 1, "passes": 1}}
    path = tmp_path / "agent.json"
    path.write_text(json.dumps(cfg))
    return Agent(cfg, str(path)), path


def test_reload_keeps_the_state_of_peers_still_present(tmp_path, monkeypatch):
    a, path = make_agent(tmp_path)
    monkeypatch.setattr(a, "probe", lambda addr: "refused" if addr == "10.0.0.2:1" else None)
    assert a.check_once() and a.down["prefill"] == {"10.0.0.2:1"}
    cfg = json.loads(path.read_text())
    cfg["pools"] = json.loads(json.dumps(POOLS))
    cfg["pools"]["prefill"]["servers"] = ["10.0.0.2:1", "10.0.0.3:1"]   # .1 gone, .3 new
    path.write_text(json.dumps(cfg))
    assert a.reload_config()
    assert set(a.state) == {("prefill", "10.0.0.2:1"), ("prefill", "10.0.0.3:1"),
                            ("decode", "10.0.0.5:1"), ("decode", "10.0.0.6:1")}
    assert a.down["prefill"] == {"10.0.0.2:1"}          # its down-mark kept
    assert a.state[("prefill", "10.0.0.3:1")]["checked"] is None
    assert "server 10.0.0.2:1  down;" in (tmp_path / "up.conf").read_text()
    assert "10.0.0.1:1" not in (tmp_path / "up.conf").read_text()
    assert a.metrics.config_reloads == 1
    assert "pd_proxy_config_reloads_total 1" in a.metrics_text()
    # an unreadable config changes nothing
    path.write_text("{")
    assert not a.reload_config() and a.metrics.config_reloads == 1
    assert ("prefill", "10.0.0.3:1") in a.state


def test_drained_peers_stay_down_and_health_never_takes_the_rest(tmp_path, monkeypatch):
    a, _ = make_agent(tmp_path)
    bad: set = set()
    monkeypatch.setattr(a, "probe", lambda addr: "refused" if addr in bad else None)
    (tmp_path / "drain.json").write_text(json.dumps({"id": "x", "peers": ["10.0.0.5:1"]}))
    a.poll_drain()
    assert a.down == {"prefill": set(), "decode": {"10.0.0.5:1"}}
    assert not a.check_once()                       # healthy, still drained
    assert a.down["decode"] == {"10.0.0.5:1"}
    bad.add("10.0.0.6:1")                           # the last live decode peer fails:
    a.check_once()                                  # health does not take it out
    assert a.down["decode"] == {"10.0.0.5:1"}
    (tmp_path / "drain.json").write_text(json.dumps({"id": "y", "peers": ["10.0.0.5:1",
                                                                          "10.0.0.6:1"]}))
    a.poll_drain()
    assert a.down["decode"] == {"10.0.0.5:1", "10.0.0.6:1"}   # an operator drain does
    (tmp_path / "drain.json").write_text(json.dumps({"peers": "10.0.0.5:1"}))
    a.poll_drain()                                  # invalid: drains kept
    assert a.drain_id == "y" and a.down["decode"] == {"10.0.0.5:1", "10.0.0.6:1"}
    (tmp_path / "drain.json").unlink()
    a.poll_drain()                                  # missing: no drains; health
    assert a.drained == set() and a.down["decode"] == {"10.0.0.6:1"}   # rules again
