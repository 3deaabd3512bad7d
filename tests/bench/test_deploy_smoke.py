"""bench/deploy's smoke run in CI: a 9-node emulated cluster (loopback 127.0.8.x, the
bench's own subnet) deployed, re-run, shown and removed through the real playbooks. It
fails when a step fails or the re-run changes anything; nothing is written."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_deploy_bench_smoke_run_converges_with_nothing_changed_on_rerun():
    res = subprocess.run([sys.executable, str(REPO / "bench" / "deploy" / "run.py"), "--smoke"],
                         cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "changed on re-run: 9: 0" in res.stdout
    # every step of the table was measured
    for step in ("site from clean", "site re-run", "status", "cleanup"):
        assert f"| 9 | {step} |" in res.stdout
