"""Row 12: a coordination service restarts (xLLM's etcd).

The real etcd of an xLLM cluster (emulated xLLM and xllm-service, nginx in front) is
SIGKILLed after its data dir was removed (the worst case: it comes back empty, every
lease and key gone, so the engines must register again). With the default
pd_restart_policy (on-failure) its launcher starts it again by itself after a 1 s
backoff; the instances' lease loops register again, xllm-service's watch resumes, and
requests through the front door succeed again within a bounded time, with the same
engine PIDs (nothing restarted by hand, no playbook run). With pd_restart_policy never
the unit stays failed until `site.yml --tags services` starts it again the way a first
deploy does (engines are not touched).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import threading
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
    recap,
    row_restarts,
    status_rows,
    stop_leftovers,
    wait_restarted,
    wait_until,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"),
                       reason="nginx is not installed (make deps)"),
    pytest.mark.skipif(ETCD_MISSING is not None, reason=ETCD_MISSING or ""),
]

SUBNET = "127.0.63"        # on-failure (the default)
SUBNET_NEVER = "127.0.66"  # pd_restart_policy never
LAYOUT = {
    "P": [("p1", 1, None, "0")],
    "D": [("d1", 4, None, "0")],
    "C": [("c1", 9, None, None)],
}
RECOVER_S = 30  # bound on "serving again" after etcd is back
ETCD_BACK_S = 10  # bound on the launcher's own restart of etcd (1 s backoff + start)


def xllm_cluster(root: Path, subnet: str = SUBNET, **extra: object) -> Cluster:
    hccn = root / "hccn"
    hccn.mkdir(parents=True, exist_ok=True)
    host_vars = {}
    for name, last, _, _ in LAYOUT["P"] + LAYOUT["D"]:
        path = hccn / f"{name}.conf"
        path.write_text(f"address_0=192.168.{last}.10\nnetmask_0=255.255.255.0\n")
        host_vars[name] = {"pd_hccn_conf": str(path)}
    return make_cluster(root, subnet, layout=LAYOUT, host_vars=host_vars, extra_vars={
        "pd_emulate": "xllm", "pd_kv_port": 26300, "pd_ready_timeout": 60, **extra})


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


class Sampler:
    """Requests through the front door every 0.25 s on a thread: (seconds since start,
    served) per request."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.t0 = time.monotonic()
        self.results: list[tuple[float, bool]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            sent = time.monotonic() - self.t0
            self.results.append((sent, _ok(self.cluster)))
            self._stop.wait(0.25)

    def stop(self) -> list[tuple[float, bool]]:
        self._stop.set()
        self._thread.join(30)
        return self.results


def _kill_etcd_and_its_data(cluster: Cluster) -> tuple[dict, float]:
    """Remove etcd's data dir, then SIGKILL etcd: it comes back empty (worst case). The
    data dir goes first: after the kill the launcher starts etcd again within ~1 s.
    Returns the etcd unit's state before the kill and the kill's monotonic time."""
    etcd_state = cluster.root / "nodes/c1/state/etcd/launcher.json"
    before = json.loads(etcd_state.read_text())
    (etcd,) = before["processes"]
    spec = json.loads((cluster.root / "nodes/c1/run/etcd/spec.json").read_text())
    argv = spec["processes"][0]["argv"]
    shutil.rmtree(argv[argv.index("--data-dir") + 1])
    os.kill(etcd["pid"], signal.SIGKILL)
    return before, time.monotonic()


def _registered_again(cluster: Cluster, subnet: str) -> bool:
    try:
        keys = EtcdGateway(f"http://{cluster.hosts['c1']}:2379").range_prefix(
            f"/t{subnet.split('.')[-1]}/XLLM:")
    except OSError:
        return False
    return {k.split("XLLM:")[1].split(":")[0] for k in keys} >= {"PREFILL", "DECODE"}


def _engine_logs(cluster: Cluster) -> str:
    logs = {h: (cluster.root / f"nodes/{h}/logs/{u}").glob("*.log")
            for h, u in (("p1", "P"), ("d1", "D"))}
    return "".join(p.read_text(errors="replace") for g in logs.values() for p in g)


@pytest.mark.fault_row(12)
def test_etcd_restart_engines_reregister_without_restart(tmp_path, fault_report):
    cluster = xllm_cluster(tmp_path / "x")
    etcd_state = cluster.root / "nodes/c1/state/etcd/launcher.json"
    sampler = None
    try:
        cluster.playbook("site.yml")
        assert _ok(cluster)
        before = _engine_pids(cluster)
        assert set(before) == {"p1/P", "d1/D", "c1/xllm-service"}, before

        etcd_before, t0 = _kill_etcd_and_its_data(cluster)
        sampler = Sampler(cluster)
        # nothing to do by hand: etcd's launcher (pd_restart_policy on-failure) starts
        # it again after its 1 s backoff, empty; the engines register again
        after = wait_restarted(etcd_state, etcd_before, ETCD_BACK_S + 20)
        assert after is not None, etcd_state.read_text()
        etcd_back_s = time.monotonic() - t0
        assert wait_until(lambda: port_open(cluster.hosts["c1"], 2379), 10, 0.05)
        etcd_port_s = time.monotonic() - t0
        assert etcd_port_s <= ETCD_BACK_S, etcd_port_s
        assert after["restarts"] == 1 and after["last_failure"]["process"] == "etcd", after
        assert wait_until(lambda: _registered_again(cluster, SUBNET), RECOVER_S, 0.1), \
            "the engines never registered again"
        keys_s = time.monotonic() - t0
        assert wait_until(lambda: _ok(cluster), RECOVER_S, interval=0.25), \
            "requests never succeeded again after etcd came back"
        serving_s = time.monotonic() - t0
        time.sleep(3)  # the sampler goes on a little after the engines are back
        samples = sampler.stop()
        failed = [t for t, ok in samples if not ok]

        assert _engine_pids(cluster) == before, "an engine or the service was restarted"
        assert all(pid_alive(p) for pids in before.values() for p in pids)
        for _ in range(5):
            assert _ok(cluster)
        assert "registering again" in _engine_logs(cluster), _engine_logs(cluster)[-2000:]

        status = cluster.playbook("status.yml").stdout
        rows = status_rows(status)
        etcd_row = rows["c1/etcd"]
        assert etcd_row[4] == "running" and row_restarts(etcd_row) == 1, etcd_row
        for key in ("p1/P", "d1/D", "c1/xllm-service", "c1/C"):
            assert rows[key][4] == "running" and row_restarts(rows[key]) == 0, rows[key]
        assert "c1/xllm-service gate: ok" in status
        # and a re-run finds nothing to do (the restarted unit is what site.yml wants)
        rerun = cluster.playbook("site.yml", "--tags", "services")
        assert recap(rerun.stdout)["c1"]["changed"] == 0, rerun.stdout[-3000:]
        assert _engine_pids(cluster) == before
    finally:
        if sampler is not None:
            sampler.stop()
        cluster.playbook("cleanup.yml", check=False)
        stop_leftovers(cluster)
    print(f"etcd back (new PID) {etcd_back_s:.1f}s, port {etcd_port_s:.1f}s, keys "
          f"{keys_s:.1f}s, a request served {serving_s:.1f}s after the kill; {len(failed)}/"
          f"{len(samples)} sampled requests failed {failed}")
    fault_report(observed=(
        f"etcd SIGKILLed with its data dir removed: its launcher started it again by "
        f"itself after the 1 s backoff (restart 1; new PID after {etcd_back_s:.1f}s, port "
        f"open after {etcd_port_s:.1f}s), empty; the instances registered again "
        f"{keys_s:.1f}s after the kill; {len(samples) - len(failed)} of {len(samples)} "
        f"requests sent through nginx from the kill to 3 s after that were served; same "
        f"PIDs for prefill, decode and xllm-service; status.yml: c1/etcd running, "
        f"RESTARTS 1; `site.yml --tags services` afterwards: changed=0"),
        lost=len(failed))


@pytest.mark.fault_row(12)
def test_etcd_restart_policy_never_site_services_restarts_it(tmp_path, fault_report):
    cluster = xllm_cluster(tmp_path / "n", SUBNET_NEVER, pd_restart_policy="never")
    etcd_state = cluster.root / "nodes/c1/state/etcd/launcher.json"
    try:
        cluster.playbook("site.yml")
        assert _ok(cluster)
        before = _engine_pids(cluster)

        _, t0 = _kill_etcd_and_its_data(cluster)
        assert wait_until(lambda: not port_open(cluster.hosts["c1"], 2379), 10)
        # policy never: the unit is left failed, nothing starts etcd again
        assert wait_until(lambda: json.loads(etcd_state.read_text())["status"] == "failed",
                          10, 0.1), etcd_state.read_text()
        time.sleep(4)  # > --etcd_ttl (3 s): every lease has expired
        assert not port_open(cluster.hosts["c1"], 2379)
        assert not json.loads(etcd_state.read_text()).get("restarts")
        down_ok = _ok(cluster)
        rows = status_rows(cluster.playbook("status.yml", check=False).stdout)
        etcd_row = rows["c1/etcd"]
        assert etcd_row[4] != "running" and row_restarts(etcd_row) == 0, etcd_row

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
        assert "registering again" in _engine_logs(cluster), _engine_logs(cluster)[-2000:]
        assert _registered_again(cluster, SUBNET_NEVER)
    finally:
        cluster.playbook("cleanup.yml", check=False)
        stop_leftovers(cluster)
    fault_report(observed=(
        f"pd_restart_policy never: etcd SIGKILLed with its data dir removed stays down "
        f"(unit failed; requests while down: {'served' if down_ok else 'failed'}); "
        f"`site.yml --tags services` restarted it in {rerun_s:.0f}s without touching the "
        f"engines; requests through nginx succeeded again {serving_s:.1f}s later "
        f"({total_s:.0f}s after the kill), same PIDs for prefill, decode and "
        f"xllm-service; the instances re-registered (lease loop)"),
        lost=None)
