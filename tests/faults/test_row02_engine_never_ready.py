"""Row 2: an engine that never becomes ready.

One prefill instance (p2) starts but never answers /health 200 (the emulator's
PD_EMU_SLOW_START_S, through pd_env). site.yml must fail after pd_ready_timeout naming
the host and showing the last lines of that process's log; what stays running is the
engines of the failed play (their launchers, the stuck one still starting), no front
door; cleanup.yml removes all of it.
"""
from __future__ import annotations

import os
import shutil
import time

import pytest

from tests.integration.deploy import make_cluster, pid_alive, port_open, wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"),
                       reason="nginx is not installed (make deps)"),
]

READY_TIMEOUT = 6


@pytest.mark.fault_row(2)
def test_engine_never_ready_fails_site_and_cleanup_removes_it(tmp_path, fault_report):
    cluster = make_cluster(tmp_path / "c", "127.0.61",
                           extra_vars={"pd_ready_timeout": READY_TIMEOUT},
                           host_vars={"p2": {"pd_env": {"PD_EMU_SLOW_START_S": "900"}}})
    try:
        t0 = time.monotonic()
        res = cluster.playbook("site.yml", check=False)
        took = time.monotonic() - t0
        out = res.stdout + res.stderr
        assert res.returncode != 0, out[-3000:]
        # the failure names the host and says why, with the tail of the engine's log
        fatal = [line for line in out.splitlines() if line.startswith("fatal: [p2]")]
        assert fatal, out[-4000:]
        assert "timed out after" in out and "process(es) not ready" in out, out[-4000:]
        assert "last " in out and "lines of" in out and "/p2/logs/" in out, out[-4000:]
        # the front door was never started
        assert not port_open(cluster.hosts["c1"], 7000)
        # what stays running: every engine's launcher, the stuck one included
        left = {p.parts[-4] for p in cluster.state_files()}
        assert "p2" in left, left
        pids = cluster.recorded_pids()
        alive = [pid for pid in pids if pid_alive(pid)]
        assert alive, "the stuck engine was not left running (nothing to clean up?)"
        assert not any("/c1/" in str(p) for p in cluster.state_files())

        cluster.playbook("cleanup.yml")
        assert cluster.state_files() == []
        assert wait_until(lambda: not any(pid_alive(p) for p in pids), 15)
        assert wait_until(lambda: cluster.listening() == [], 10), cluster.listening()
    finally:
        cluster.playbook("cleanup.yml", check=False)
    fault_report(observed=(
        f"site.yml failed after {took:.0f}s (pd_ready_timeout {READY_TIMEOUT}s) with "
        f"'fatal: [p2]' and the last lines of p2's engine log; {len(left)} engine units "
        f"({len(alive)} processes) were left running and no front door; cleanup.yml "
        f"stopped all of them and left no listening socket"), lost=None)
