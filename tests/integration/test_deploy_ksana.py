"""KsanaLLM end to end on loopback: the emulator's KsanaLLM personality (exactly the
serving_server.py argv, env and rendered YAML pd_engine: ksana gets) registering with
the simple_router stand-in, or with the real simple_router when PD_KSANA_HOME names a
KsanaLLM tree and PD_KSANA_PYTHON a Python with its dependencies (make
ksana-router-venv); nginx in front.

site.yml serves plain, streaming and chat requests, and SSE clients see a clean stream;
a re-run changes nothing; status.yml shows the router and every node; a killed decode
(pd_restart_policy never: no restart) goes offline at the router and the front door
answers with an OpenAI error at once, not a hang; cleanup.yml leaves nothing (a decoy
of the same program survives).
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
HOME = os.environ.get("PD_KSANA_HOME")
ROUTER_PYTHON = os.environ.get("PD_KSANA_PYTHON")
HEARTBEAT_TIMEOUT = 3


def ksana_cluster(root: Path, subnet: str, real_router: bool) -> Cluster:
    extra = {"pd_emulate": "ksana", "pd_ready_timeout": 60,
             "pd_ksana_heartbeat_interval_ms": 300,
             "pd_ksana_heartbeat_timeout": HEARTBEAT_TIMEOUT, "pd_ksana_router_workers": 1,
             # nodes register once, as the real engine does: the router must be up first
             "pd_env": {"PD_EMU_KSANA_REGISTER_ONCE": "1"},
             # the test looks at a dead decode (offline at the router, errors from the
             # front door); with on-failure (the default) its launcher would start it again
             # after 1 s (test_deploy_process and tests/faults row 12 cover the restart)
             "pd_restart_policy": "never"}
    if real_router:
        extra.update(pd_ksana_home=HOME, pd_ksana_python=ROUTER_PYTHON,
                     pd_ksana_router_workers=2)
    return make_cluster(root, subnet, layout=LAYOUT, extra_vars=extra,
                        host_vars={"p1": {"pd_api_port": 8067}, "d1": {"pd_api_port": 6890}})



def start_decoy(host: str) -> tuple[subprocess.Popen, int]:
    """A Python HTTP server on the C host that the toolkit did not start."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "http.server", "--bind", host, str(port)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), port


def request(url: str, body: dict, timeout: float = 20) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as rsp:
            return rsp.status, json.loads(rsp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def raw_stream(url: str, body: dict) -> tuple[str, bytes]:
    req = urllib.request.Request(url, data=json.dumps(dict(body, stream=True)).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as rsp:
        return rsp.headers.get("Content-Type", ""), rsp.read()


def pairs(cluster: Cluster, *args: str) -> subprocess.CompletedProcess:
    db = cluster.root / "nodes/c1/state/ksana-router/simple_router.db"
    return subprocess.run([sys.executable, "-m", "pd_launcher.ksana_pairs", "--db", str(db),
                           "--cluster", f"t{cluster.subnet.split('.')[-1]}", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=30)


CASES = [pytest.param(False, "127.0.32", id="stand-in-router"),
         pytest.param(True, "127.0.33", id="real-router", marks=pytest.mark.skipif(
             not (HOME and ROUTER_PYTHON), reason="set PD_KSANA_HOME (a KsanaLLM tree) and "
             "PD_KSANA_PYTHON (a Python with fastapi, uvicorn, sqlalchemy, httpx: make "
             "ksana-router-venv) to run the real simple_router"))]


@pytest.mark.parametrize("real_router,subnet", CASES)
def test_ksana_deploy_serve_status_fail_cleanup(tmp_path, real_router, subnet):
    cluster = ksana_cluster(tmp_path / "ks", subnet, real_router)
    decoy, decoy_port = start_decoy(cluster.hosts["c1"])
    try:
        first = cluster.playbook("site.yml")
        assert "answered 200" in first.stdout
        exercise_proxy(cluster)
        # SSE clients see a clean stream: no octet-stream, nothing after data: [DONE]
        ctype, data = raw_stream(f"http://{cluster.proxy}/v1/chat/completions",
                                 {"model": "demo", "max_tokens": 6,
                                  "messages": [{"role": "user", "content": "hi"}]})
        assert ctype.startswith("text/event-stream"), ctype
        assert data.endswith(b"data: [DONE]\n\n") and b"\x00" not in data, data[-40:]

        again = cluster.playbook("site.yml")
        changed = {h: r["changed"] for h, r in recap(again.stdout).items()}
        assert set(changed.values()) == {0}, changed

        status = cluster.playbook("status.yml").stdout
        rows = status_rows(status)
        assert set(rows) == {"p1/P", "d1/D", "c1/ksana-router", "c1/C"}, rows
        for row in rows.values():
            assert row[4] == "running" and row[5].split("/")[0] == row[5].split("/")[1], row
        assert "c1/ksana-router gate: ok" in status
        for addr in (f"{cluster.hosts['p1']}:8067", f"{cluster.hosts['d1']}:6890"):
            assert addr in status, status  # the router's node table

        # the decode dies (and stays down: policy never): offline at the router, then an
        # OpenAI error from the front door
        state = json.loads((cluster.root / "nodes/d1/state/D/launcher.json").read_text())
        os.kill(state["processes"][0]["pid"], signal.SIGKILL)
        url = f"http://{cluster.proxy}/v1/completions"
        started = time.monotonic()
        code, body = request(url, {"model": "demo", "prompt": "hello", "max_tokens": 4})
        assert time.monotonic() - started < 10
        assert code >= 500 and "error" in body, (code, body)  # refused connection: 500
        assert wait_until(lambda: pairs(cluster, "--expect-pair").returncode != 0,
                          HEARTBEAT_TIMEOUT + 15, interval=0.5)
        started = time.monotonic()
        code, body = request(url, {"model": "demo", "prompt": "hello", "max_tokens": 4})
        assert time.monotonic() - started < 10
        assert code == 503 and body["error"]["code"] == 503, (code, body)
        status = cluster.playbook("status.yml", check=False).stdout
        assert status_rows(status)["d1/D"][4] != "running"
        d1 = json.loads((cluster.root / "nodes/d1/state/D/launcher.json").read_text())
        assert d1["status"] == "failed" and not d1.get("restarts"), d1
        decode_row = next(line for line in status.splitlines()
                          if f"{cluster.hosts['d1']}:6890" in line and "decode" in line)
        assert " no " in decode_row, decode_row  # offline at the router
        assert "not ready" in status, status

        assert_cleanup_spares(cluster, decoy, {f"{cluster.hosts['c1']}:{decoy_port}"})
    finally:
        cluster.playbook("cleanup.yml", check=False)
        stop_leftovers(cluster)
        decoy.terminate()
        decoy.wait(10)

