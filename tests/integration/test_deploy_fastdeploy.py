"""FastDeploy end to end on loopback, both PD modes: the emulator's FastDeploy
personality (exactly the argv pd_engine: fastdeploy gets) with its router stand-in, or
with the real redis-server (Debian) as the splitwise scheduler; nginx in front.

site.yml serves plain, streaming and chat requests; a re-run changes nothing;
status.yml lists the router or Redis and every instance; a killed decode
(pd_restart_policy never: no restart) is dropped
(router) or goes stale (Redis) and the front door answers with an OpenAI error at once,
not a hang; cleanup.yml leaves nothing (a decoy of the same program survives).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from .deploy import (
    REPO,
    Cluster,
    assert_cleanup_spares,
    exercise_proxy,
    make_cluster,
    recap,
    status_rows,
    stop_leftovers,
    wait_until,
)

REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"),
                       reason="nginx is not installed (make deps)"),
]
LAYOUT = {
    "P": [("p1", 1, None, "0")],
    "D": [("d1", 4, None, "0")],
    "C": [("c1", 9, None, None)],
}


def fd_cluster(root: Path, subnet: str, scheduler: str) -> Cluster:
    # pd_restart_policy never: the test looks at what a dead decode does to the router,
    # Redis and the front door; with on-failure (the default) its launcher would start it
    # again after 1 s (test_deploy_process and tests/faults row 12 cover the restart)
    return make_cluster(root, subnet, layout=LAYOUT, extra_vars={
        "pd_emulate": "fastdeploy", "pd_fastdeploy_scheduler": scheduler,
        "pd_kv_port": 7671, "pd_ready_timeout": 60, "rdma_nics": "mlx5_0",
        "pd_restart_policy": "never",
        **({"pd_redis_password": "pw-not-in-logs"} if scheduler == "redis" else {})})



def start_decoy(scheduler: str, host: str, tmp: Path) -> tuple[subprocess.Popen, int]:
    """A process of the same program that the toolkit did not start."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    if scheduler == "redis":
        argv = [REDIS, "--bind", host, "--port", str(port), "--save", "", "--appendonly",
                "no", "--dir", str(tmp)]
    else:
        argv = [sys.executable, "-m", "http.server", "--bind", host, str(port)]
    tmp.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), port


def request(url: str, timeout: float = 20) -> tuple[int, dict]:
    body = json.dumps({"model": "demo", "prompt": "hello there", "max_tokens": 4}).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as rsp:
            return rsp.status, json.loads(rsp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@pytest.mark.parametrize("scheduler,subnet", [("router", "127.0.28"), ("redis", "127.0.29")])
def test_fastdeploy_deploy_serve_status_fail_cleanup(tmp_path, scheduler, subnet):
    if scheduler == "redis" and not os.path.exists(REDIS):
        pytest.skip("redis-server is not installed (make deps)")
    cluster = fd_cluster(tmp_path / "fd", subnet, scheduler)
    decoy, decoy_port = start_decoy(scheduler, cluster.hosts["c1"], tmp_path / "decoy")
    service = "fd-router" if scheduler == "router" else "redis"
    try:
        first = cluster.playbook("site.yml")
        assert "answered 200" in first.stdout
        exercise_proxy(cluster)

        again = cluster.playbook("site.yml")
        changed = {h: r["changed"] for h, r in recap(again.stdout).items()}
        assert set(changed.values()) == {0}, changed

        status = cluster.playbook("status.yml").stdout
        rows = status_rows(status)
        assert set(rows) == {"p1/P", "d1/D", f"c1/{service}", "c1/C"}, rows
        for row in rows.values():
            assert row[4] == "running" and row[5].split("/")[0] == row[5].split("/")[1], row
        assert f"c1/{service} gate: ok" in status
        if scheduler == "redis":
            assert "pw-not-in-logs" not in first.stdout + again.stdout + status

        # the decode dies (and stays down: policy never): the front door answers with an
        # OpenAI error, never a hang
        state = json.loads((cluster.root / "nodes/d1/state/D/launcher.json").read_text())
        os.kill(state["processes"][0]["pid"], signal.SIGKILL)
        url = f"http://{cluster.proxy}/v1/completions"
        if scheduler == "router":  # the router drops it after its health checks
            gate = [sys.executable, "-m", "pd_launcher.http_check", "--url",
                    f"http://{cluster.hosts['c1']}:9000/registered_number",
                    "--expect", "decode==0"]
            assert wait_until(lambda: subprocess.run(gate, cwd=REPO, capture_output=True)
                              .returncode == 0, 40, interval=1)
        started = time.monotonic()
        code, body = request(url)
        assert time.monotonic() - started < 10
        assert code in (502, 503) and "error" in body, (code, body)
        status = cluster.playbook("status.yml", check=False).stdout
        assert status_rows(status)["d1/D"][4] != "running"
        d1 = json.loads((cluster.root / "nodes/d1/state/D/launcher.json").read_text())
        assert d1["status"] == "failed" and not d1.get("restarts"), d1
        if scheduler == "redis":  # its entry in <topic>.cluster is stale, so skipped
            # stale = no heartbeat for 3 s (--scheduler-expire-period): status.yml may
            # run sooner than that after the kill; look again until it is
            def stale() -> bool:
                nonlocal status
                if "STALE" not in status:
                    status = cluster.playbook("status.yml", check=False).stdout
                return "STALE" in status
            assert wait_until(stale, 30, interval=0.5), status[-3000:]
            assert "missing: decode" in status
            assert "pw-not-in-logs" not in status

        assert_cleanup_spares(cluster, decoy, {f"{cluster.hosts['c1']}:{decoy_port}"})
    finally:
        cluster.playbook("cleanup.yml", check=False)
        stop_leftovers(cluster)
        decoy.terminate()
        decoy.wait(10)

