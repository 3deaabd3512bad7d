"""bench/image_fanout's smoke run in CI (stream A, after the podman tests built the
cached test image): N=2 podman nodes on 127.0.75.x get one image tarball through the
image role's fan-out, a second run changes nothing, and the naive copy baseline runs;
nothing is written. Needs podman (skipped without it, like the podman tests)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed")
def test_image_fanout_bench_smoke_run():
    res = subprocess.run([sys.executable, str(REPO / "bench" / "image_fanout" / "run.py"),
                          "--smoke"], cwd=REPO, capture_output=True, text=True, timeout=1200,
                         check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
