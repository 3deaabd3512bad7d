"""Row 6: log disk filling. Every log of a unit, nginx's access log included, rotates
under pd_log_max_mb; a full log filesystem stops neither the launchers, the engines nor
nginx, and requests still succeed."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time

import pytest

from tests.integration.deploy import make_cluster, pid_alive, post, wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"),
                       reason="nginx is not installed (make deps)"),
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None,
                       reason="mounting a tmpfs needs root"),
]

LAYOUT = {"P": [("p1", 1, None, "0")], "D": [("d1", 4, None, "0")], "C": [("c1", 9, None, None)]}
MIB = 1024 * 1024


def _fill(directory: os.PathLike) -> None:
    with open(os.path.join(directory, "filler"), "ab") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()


@pytest.mark.fault_row(6)
def test_logs_rotate_and_a_full_log_disk_stops_nothing(tmp_path, fault_report):
    cluster = make_cluster(tmp_path / "c", "127.0.59", layout=LAYOUT,
                           extra_vars={"pd_log_max_mb": 1, "pd_log_backups": 1})
    mounts = [cluster.root / "nodes" / h / "logs" for h in ("c1", "d1")]
    for m in mounts:
        m.mkdir(parents=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(m)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    url = f"http://{cluster.proxy}/v1/completions"
    body = {"model": "demo", "prompt": "The quick brown fox", "max_tokens": 4}
    try:
        cluster.playbook("site.yml")
        spec = json.loads((cluster.root / "nodes/c1/run/C/spec.json").read_text())
        access = cluster.root / "nodes/c1/logs/C/proxy_access.log"
        assert spec["logs"]["max_bytes"] == MIB and spec["logs"]["backups"] == 1
        assert str(access) in spec["logs"]["files"]

        # rotation under the cap: the access log grows past 1 MiB (padding stands in for
        # weeks of traffic); the launcher copies it to .1 and truncates it, nginx goes on
        # writing into it
        with open(access, "ab") as f:
            f.write(b"#" * (MIB + 4096) + b"\n")
        assert wait_until(lambda: (access.parent / "proxy_access.log.1").exists()
                          and access.stat().st_size < MIB, 10)
        assert post(url, body)[0] == 200
        # truncated to 0 by the rotation: whatever is in it now is nginx's new line
        assert wait_until(lambda: access.stat().st_size > 0, 5)
        assert b"#" * 64 not in access.read_bytes()

        # the log filesystems fill up: nothing stops, requests still succeed
        states = [json.loads(p.read_text()) for p in cluster.state_files()]
        pids = [s["launcher"]["pid"] for s in states] + [
            p["pid"] for s in states for p in s["processes"]]
        for m in mounts:
            _fill(m)
            assert shutil.disk_usage(m).free < 64 * 1024
        started = time.monotonic()
        codes = [post(url, body)[0] for _ in range(30)]
        elapsed = time.monotonic() - started
        time.sleep(2.5)  # two supervise loops (rotation checks) on the full filesystems
        assert codes == [200] * 30, codes
        dead = [p for p in pids if not pid_alive(p)]
        assert not dead, dead
        rows = cluster.playbook("status.yml").stdout
        assert "3/3 units healthy" in rows, rows[-2000:]
        fault_report(
            observed=f"pd_log_max_mb=1: nginx's access log padded to 1 MiB was rotated to .1 "
                     f"within ~1 s and nginx kept writing into it; with c1's and d1's log "
                     f"filesystems full (3 MiB tmpfs, <64 KiB free) 30/30 completions "
                     f"answered 200 in {elapsed:.1f}s, all {len(pids)} launcher and engine "
                     f"processes stayed alive and status.yml showed 3/3 units healthy",
            lost=0)
    finally:
        cluster.playbook("cleanup.yml", check=False)
        for m in mounts:
            subprocess.run(["umount", "-l", str(m)], capture_output=True)
