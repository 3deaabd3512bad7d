"""Row 12: a coordination service restarts (xLLM's etcd).

The real etcd of an xLLM cluster (emulated xLLM and xllm-service, nginx in front) is
SIGKILLed. Its launcher stops the unit; `site.yml --tags services` starts it again the
way a first deploy does (engines are not touched). The instances' lease loops register
again, xllm-service's watch resumes, and requests through the front door succeed again
within a bounded time, with the same engine PIDs (nothing restarted by hand).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
import urllib.error
from pathlib import Path

import pytest

from pd_launcher.etcd_gateway import EtcdGateway
from tests.fixtures.etcd import ETCD_MISSING
from tests.integration.deploy import (
    Cluster,
    make_cluster,
    pid_alive,
    port_open,
    post,
    stop_leftovers,
    wait_until,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"),
                       reason="nginx is not installed (make deps)"),
    pytest.mark.skipif(ETCD_MISSING is not None, reason=ETCD_MISSING or ""),
]

SUBNET = "127.0.63"
LAYOUT = {
    "P": [("p1", 1, None, "0")],
    "D": [("d1", 4, None, "0")],
    "C": [("c1", 9, None, None)],
}
RECOVER_S = 30  # bound on "serving again" after etcd is back


def xllm_cluster(root: Path) -> Cluster:
    hccn = root / "hccn"
    hccn.mkdir(parents=True, exist_ok=True)
    host_vars = {}
    for name, last, _, _ in LAYOUT["P"] + LAYOUT["D"]:
        path = hccn / f"{name}.conf"
        path.write_text(f"address_0=192.168.{last}.10\nnetmask_0=255.255.255.0\n")
        host_vars[name] = {"pd_hccn_conf": str(path)}
    return make_cluster(root, SUBNET, layout=LAYOUT, host_vars=host_vars, extra_vars={
        "pd_emulate": "xllm", "pd_kv_port": 26300, "pd_ready_timeout": 60})


def _ok(cluster: Cluster) -> bool:
    try:
        status, _, raw = post(f"http://{cluster.proxy}/v1/completions",
                              {"model": "demo", "prompt": "hello", "max_tokens": 4}, timeout=10)
        return status == 200 and b'"text"' in raw
    except (urllib.error.URLError, OSError):
        return False


def _engine_pids(cluster: Cluster) -> dict[str, list[int]]:
    out = {}
    for path in cluster.state_files():
        if path.parent.name in ("P", "D", "xllm-service"):
            state = json.loads(path.read_text())
            out[f"{path.parts[-4]}/{path.parent.name}"] = [state["launcher"]["pid"]] + [
                p["pid"] for p in state["processes"]]
    return out


@pytest.mark.fault_row(12)
def test_etcd_restart_engines_reregister_without_restart(tmp_path, fault_report):
    cluster = xllm_cluster(tmp_path / "x")
    try:
        cluster.playbook("site.yml")
        assert _ok(cluster)
        before = _engine_pids(cluster)
        assert set(before) == {"p1/P", "d1/D", "c1/xllm-service"}, before

        etcd_state = cluster.root / "nodes/c1/state/etcd/launcher.json"
        (etcd,) = json.loads(etcd_state.read_text())["processes"]
        t0 = time.monotonic()
        os.kill(etcd["pid"], signal.SIGKILL)
        assert wait_until(lambda: not port_open(cluster.hosts["c1"], 2379), 10)
        # nothing restarts etcd behind our back (its launcher reports the unit failed).
        # Worst case: etcd comes back empty (its data dir lost), so every lease and key
        # is gone and the engines must register again (with its data, etcd restores the
        # leases and the engines' keepalives simply resume).
        spec = json.loads((cluster.root / "nodes/c1/run/etcd/spec.json").read_text())
        argv = spec["processes"][0]["argv"]
        shutil.rmtree(argv[argv.index("--data-dir") + 1])
        time.sleep(4)  # > --etcd_ttl (3 s)
        down_ok = _ok(cluster)

        t1 = time.monotonic()
        res = cluster.playbook("site.yml", "--tags", "services")
        rerun_s = time.monotonic() - t1
        assert "Wait until this gate opens: xllm-service" in res.stdout
        assert port_open(cluster.hosts["c1"], 2379)
        t2 = time.monotonic()
        assert wait_until(lambda: _ok(cluster), RECOVER_S, interval=0.5), \
            "requests never succeeded again after etcd came back"
        serving_s = time.monotonic() - t2
        total_s = time.monotonic() - t0
        assert _engine_pids(cluster) == before, "an engine or the service was restarted"
        assert all(pid_alive(p) for pids in before.values() for p in pids)
        for _ in range(5):
            assert _ok(cluster)
        logs = {h: (cluster.root / f"nodes/{h}/logs/{u}").glob("*.log")
                for h, u in (("p1", "P"), ("d1", "D"))}
        text = "".join(p.read_text(errors="replace") for g in logs.values() for p in g)
        assert "registering again" in text, text[-2000:]
        keys = EtcdGateway(f"http://{cluster.hosts['c1']}:2379").range_prefix(
            f"/t{SUBNET.split('.')[-1]}/XLLM:")
        assert {k.split("XLLM:")[1].split(":")[0] for k in keys} >= {"PREFILL", "DECODE"}, keys
    finally:
        cluster.playbook("cleanup.yml", check=False)
        stop_leftovers(cluster)
    fault_report(observed=(
        f"etcd SIGKILLed and its data dir removed (requests while down: "
        f"{'served' if down_ok else 'failed'}); `site.yml --tags services` restarted it in "
        f"{rerun_s:.0f}s without touching the engines; requests through nginx succeeded "
        f"again {serving_s:.1f}s later ({total_s:.0f}s after the kill), same PIDs for "
        f"prefill, decode and xllm-service; the instances re-registered (lease loop)"),
        lost=None)
