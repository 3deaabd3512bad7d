"""bench/day2's smoke run in CI: a loopback cluster (127.0.77.x, the bench's own subnet)
under constant streaming load (4 streams) while the real playbooks scale it out, scale
it in and roll its P and D pools; short phases, nothing written. It fails when a
playbook fails or a single request of the load fails."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PHASES = ("baseline", "scale-out", "after-out", "scale-in", "after-in", "roll-P", "roll-D",
          "after")


def test_day2_bench_smoke_run_loses_no_request_while_scaling_and_rolling():
    res = subprocess.run([sys.executable, str(REPO / "bench" / "day2" / "run.py"), "--smoke"],
                         cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-3000:]
    # every phase was measured, each playbook passed, no request failed
    for phase in PHASES:
        assert f"| {phase} |" in res.stdout, phase
        assert f"FAIL: {phase}:" not in res.stdout, phase
    assert "FAIL: playbook" not in res.stdout
