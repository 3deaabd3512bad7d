"""Row 1: a host is unreachable when site.yml runs.

d1b's connection is SSH to a closed port on the cluster's subnet. Preflight runs on
every host with any_errors_fatal, and Ansible counts UNREACHABLE towards it (linear
strategy), so the run stops before any unit starts anywhere: the choice is "all or
nothing", since a PD instance with a node missing never forms. status.yml then reports
that host as unreachable, at once, and still shows the others.
"""
from __future__ import annotations

import os
import shutil
import time

import pytest

from tests.integration.deploy import make_cluster, recap, status_rows

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"),
                       reason="nginx is not installed (make deps)"),
]

CLOSED_PORT = 9  # nothing listens on 127.0.60.5:9
DEAD = {"ansible_connection": "ssh", "ansible_port": CLOSED_PORT, "ansible_user": "nobody",
        "ansible_ssh_common_args": "-o ConnectTimeout=3 -o BatchMode=yes",
        "ansible_python_interpreter": "/usr/bin/python3"}


@pytest.mark.fault_row(1)
def test_unreachable_host_stops_site_before_anything_starts(tmp_path, fault_report):
    cluster = make_cluster(tmp_path / "c", "127.0.60", host_vars={"d1b": DEAD})
    try:
        t0 = time.monotonic()
        res = cluster.playbook("site.yml", check=False, timeout=180)
        (cluster.root / "site.out").write_text(res.stdout + res.stderr)
        site_s = time.monotonic() - t0
        out = res.stdout + res.stderr
        assert res.returncode != 0, out[-3000:]
        assert "fatal: [d1b]: UNREACHABLE!" in out, out[-3000:]
        assert f"{cluster.hosts['d1b']} port {CLOSED_PORT}" in out, out[-3000:]
        # the run stopped at preflight: no later play, no unit started on any host
        # (the later plays are listed, but with every node failed they have no host left)
        after = out.split("PLAY [Preflight every node]")[1]
        after = after.split("PLAY [Provide the unit image]")[1]
        # only the lock's release ran; the controller's other plays (roll planning,
        # scale-in record) skipped their tasks
        blocks = after.split("TASK [")[1:]
        acted = [b.splitlines()[0] for b in blocks if "lock" not in b.splitlines()[0]
                 and any(line.startswith(("ok:", "changed:", "fatal:"))
                         for line in b.splitlines()[1:])]
        assert blocks and acted == [], acted
        assert cluster.state_files() == []
        assert not list(cluster.root.glob("nodes/*/run/*/spec.json"))
        assert cluster.listening() == []
        assert not (cluster.root / "nodes/c1/pd-deploy.lock").exists()  # released anyway
        r = recap(res.stdout)
        assert r["d1b"]["unreachable"] == 1, r
        assert all(r[h]["failed"] == 0 for h in ("p1a", "d1a", "c1")), r

        t1 = time.monotonic()
        st = cluster.playbook("status.yml", timeout=120)
        status_s = time.monotonic() - t1
        rows = status_rows(st.stdout)
        assert rows["d1b/D"][4] == "unreachable", rows
        others = {k: v for k, v in rows.items() if not k.startswith("d1b/")}
        assert len(others) == 5 and all(v[4] == "stopped" for v in others.values()), rows
    finally:
        cluster.playbook("cleanup.yml", check=False)
    fault_report(observed=(
        f"site.yml stopped at preflight after {site_s:.0f}s with 'fatal: [d1b]: "
        f"UNREACHABLE!' (ssh to {cluster.hosts['d1b']}:{CLOSED_PORT} refused); no unit, "
        f"spec or socket on any of the 6 hosts; status.yml took {status_s:.0f}s and showed "
        f"d1b unreachable, the 5 others stopped"), lost=None)
