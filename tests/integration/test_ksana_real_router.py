"""The REAL KsanaLLM simple_router, started the way pd-deploy starts it
(``python -m pd_launcher.ksana_router <tree>/.../simple_router/main.py --workers 2
--config INI``), on 127.0.30.x:

* every ini setting takes effect in both uvicorn workers: cluster_name (a wrong cluster
  gets 400 and the ini's cluster is accepted, in calls served by both workers), log_dir
  (both workers log into ``simple_router.log`` there), sqlite_path (the file is where the
  ini says, nothing is written into the tree) and heartbeat_timeout_seconds (a silent
  node goes offline after ~3 s, not 60);
* the protocol checks of tests/emulator/test_ksana_router.py run against the real
  router and against the stand-in (same statuses, bodies, database values, fan-out
  bytes), so the stand-in is checked against the real thing;
* python -m pd_launcher.ksana_pairs reads the real router's database.

Skipped unless PD_KSANA_HOME (a KsanaLLM tree) and PD_KSANA_PYTHON (a Python with
fastapi, uvicorn, sqlalchemy, httpx, pydantic) are set.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, List, Set

import pytest

from tests.emulator.helpers import ROOT, EmuProc, free_port
from tests.emulator.test_ksana_router import (
    PROXY_VARS,
    FakeNodes,
    RouterClient,
    check_database,
    check_failures,
    check_fanout_generate,
    check_fanout_json,
    check_fanout_stream,
    check_liveness,
    check_pair_answers,
    check_register_validation,
    check_unknown_nodes,
    form_pair,
    heartbeat,
    node_body,
    start_standin,
    wait_up,
    write_ini,
)

HOME = os.environ.get("PD_KSANA_HOME", "")
ROUTER_PY = os.environ.get("PD_KSANA_PYTHON", "")
TREE = Path(HOME) / "src" / "ksana_llm" / "python" / "simple_router"
MAIN_PY = TREE / "main.py"
NET = "127.0.30"
CLUSTER = "pd-ksana-real"
TIMEOUT_S = 3

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (HOME and ROUTER_PY and MAIN_PY.is_file() and os.access(ROUTER_PY, os.X_OK)),
        reason="the real simple_router: set PD_KSANA_HOME to a KsanaLLM tree (with "
        "src/ksana_llm/python/simple_router/main.py) and PD_KSANA_PYTHON to a Python with "
        "fastapi, uvicorn, sqlalchemy, httpx and pydantic (make ksana-router-venv, then "
        "PD_KSANA_PYTHON=$PWD/.venv-ksana-router/bin/python)"),
]


class RealRouter:
    """The real router through the boot wrapper, in its own process group."""

    def __init__(self, tmp: Path, host: str, workers: int = 2) -> None:
        self.tmp = tmp
        self.ini = write_ini(tmp / "conf", CLUSTER, TIMEOUT_S, log_dir=str(tmp / "router-logs"),
                             sqlite_path="../state/router.db")
        self.port = free_port(host)
        self.log_path = tmp / "router.out"
        env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
        env.update({"PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1",
                    "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": "python"})
        self._out = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [ROUTER_PY, "-m", "pd_launcher.ksana_router", str(MAIN_PY), "--host", host,
             "--port", str(self.port), "--workers", str(workers), "--config", str(self.ini)],
            cwd=tmp, env=env, stdout=self._out, stderr=subprocess.STDOUT,
            start_new_session=True)
        self.client = RouterClient(host, self.port, tmp / "state" / "router.db", CLUSTER,
                                   TIMEOUT_S)
        wait_up(host, self.port, self.proc, self.output, timeout=60)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def router_log(self) -> str:
        path = self.tmp / "router-logs" / "simple_router.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """SIGTERM to the uvicorn supervisor's group (this test started it), then KILL."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._out.close()


@pytest.fixture
def real(tmp_path) -> Iterator[RealRouter]:
    tree_sqlite = TREE / "sqlite"
    existed = tree_sqlite.exists()
    router = RealRouter(tmp_path, f"{NET}.30")
    yield router
    router.stop()
    assert tree_sqlite.exists() == existed, "a worker used the tree's config.ini"


@pytest.fixture
def fakes() -> Iterator[FakeNodes]:
    nodes = FakeNodes()
    yield nodes
    nodes.close()


def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if pred():
            return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def pids(log: str) -> Set[int]:
    """Process ids of simple_router.log lines (``time | pid | level | name | message``)."""
    return {int(m.group(1)) for m in re.finditer(r"^[^|\n]+\| (\d+) \|", log, re.M)}


def _register_burst(rc: RouterClient, start: int, cluster: str) -> List[int]:
    bodies = [node_body("decode", f"{NET}.31:{7000 + i}", f"{NET}.31:{17000 + i}",
                        cluster=cluster) for i in range(start, start + 8)]
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda b: rc.post("/RegisterNode", b)[0], bodies))


def test_every_ini_setting_takes_effect_in_both_workers(real):
    rc = real.client
    # log_dir: both workers (not only the supervisor) log their start-up there
    wait_for(lambda: len(pids(real.router_log()) - {real.proc.pid}) == 2, 20,
             "both workers' start-up in simple_router.log")
    assert not (real.tmp / "log").exists()  # config.ini's ./log
    # sqlite_path, relative to the ini's directory
    assert rc.db.is_file() and not (real.ini.parent / "state").exists()
    # cluster_name: refused in every call, accepted by both workers (each registration
    # is logged by the worker that served it)
    before = len(real.router_log())
    for n in range(10):
        assert _register_burst(rc, 16 * n, "default_cluster") == [400] * 8
        assert _register_burst(rc, 16 * n + 8, CLUSTER) == [201] * 8
        if len(pids(real.router_log()[before:])) == 2:
            break
    assert len(pids(real.router_log()[before:])) == 2, real.router_log()
    status, _, data = rc.post("/RegisterNode", node_body("decode", f"{NET}.31:1",
                                                         f"{NET}.31:2", cluster="x"))
    assert (status, data) == (400, {"detail": f"Cluster 'x' is not allowed; expecting "
                                              f"'{CLUSTER}'"})
    # heartbeat_timeout_seconds: a silent decode goes offline after ~3 s (never 60)
    p = rc.post("/RegisterNode", node_body("prefill", f"{NET}.32:8067", f"{NET}.32:13569"))
    d = rc.post("/RegisterNode", node_body("decode", f"{NET}.33:6890", f"{NET}.33:13571"))
    p_id, d_id = p[2]["node_id"], d[2]["node_id"]
    for node_id in (p_id, d_id):  # visible once the worker has committed
        rc.settled("SELECT COUNT(*) FROM node_info WHERE node_id = ?", (node_id,), 1)
    heartbeat(rc, d_id)

    def decode_offline() -> bool:
        heartbeat(rc, p_id)  # staleness is evaluated on another node's heartbeat
        return rc.rows("SELECT is_online FROM node_info WHERE node_id = ?",
                       (d_id,))[0][0] == 0

    took = wait_for(decode_offline, 15, "the silent decode to go offline")
    assert TIMEOUT_S - 0.5 <= took <= TIMEOUT_S + 3, took


@pytest.mark.parametrize("which", ["real", "stand-in"])
def test_same_protocol_as_the_stand_in(which, tmp_path, fakes):
    procs: List[EmuProc] = []
    router = None
    try:
        if which == "real":
            router = RealRouter(tmp_path, f"{NET}.40")
            rc = router.client
        else:
            rc = start_standin(procs, tmp_path, "router", f"{NET}.41", CLUSTER, TIMEOUT_S)
        check_liveness(rc)
        check_register_validation(rc)
        check_unknown_nodes(rc)
        p, d = fakes.start("prefill", f"{NET}.42"), fakes.start("decode", f"{NET}.43")
        info = form_pair(rc, p, d, f"{NET}.42:13569", f"{NET}.43:13571")
        check_pair_answers(rc, info)
        check_database(rc, info)
        out = pairs(rc, "--expect-pair", "--explain")
        assert out.returncode == 0 and f"pair {info.key} can take requests" in out.stdout
        check_fanout_json(rc, info)
        check_fanout_stream(rc, info)
        check_fanout_generate(rc, info)
        check_failures(rc, fakes, info)
        out = pairs(rc, "--expect-pair")
        assert out.returncode == 1 and f"decode {d.addr} (rank 0" in out.stdout
    finally:
        if router is not None:
            router.stop()
        for proc in procs:
            proc.stop()


def pairs(rc: RouterClient, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pd_launcher.ksana_pairs", "--db",
                           str(rc.db), "--cluster", rc.cluster, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
