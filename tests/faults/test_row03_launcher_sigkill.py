"""Row 3: the launcher is SIGKILLed. Its engines die within seconds (parent-death
signal), no orphan keeps a port, status.yml shows the unit as down."""
from __future__ import annotations

import json
import os
import shutil
import signal
import time

import pytest

from tests.integration.deploy import make_cluster, pid_alive, port_open, status_rows, wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"),
                       reason="nginx is not installed (make deps)"),
]

LAYOUT = {"P": [("p1", 1, None, "0")], "D": [("d1", 4, None, "0,1")], "C": [("c1", 9, None, None)]}


@pytest.mark.fault_row(3)
def test_launcher_sigkill_takes_its_engines_down(tmp_path, fault_report):
    cluster = make_cluster(tmp_path / "c", "127.0.55", layout=LAYOUT)
    try:
        cluster.playbook("site.yml")
        state_file = next(p for p in cluster.state_files() if "/d1/" in str(p))
        state = json.loads(state_file.read_text())
        launcher = state["launcher"]["pid"]
        engines = [p["pid"] for p in state["processes"]]
        ports = [(q["host"], q["port"]) for p in state["processes"] for q in p["ports"]]
        assert len(engines) == 2 and all(pid_alive(p) for p in engines)
        assert any(port_open(h, p) for h, p in ports)

        killed = time.monotonic()
        os.kill(launcher, signal.SIGKILL)
        assert wait_until(lambda: not any(pid_alive(p) for p in engines), 15, 0.05), \
            [p for p in engines if pid_alive(p)]
        engines_gone = time.monotonic() - killed
        assert wait_until(lambda: not any(port_open(h, p) for h, p in ports), 15, 0.05)
        ports_free = time.monotonic() - killed
        assert engines_gone < 10 and ports_free < 10
        # no orphan of the unit anywhere: nothing listens on d1's address
        assert not [a for a in cluster.listening() if a.startswith(cluster.hosts["d1"] + ":")]

        rows = status_rows(cluster.playbook("status.yml").stdout)
        d1 = " ".join(rows["d1/D"])
        assert rows["d1/D"][4] != "running" and "down" in d1, rows["d1/D"]
        assert "0/2" in d1, rows["d1/D"]  # neither engine process is alive or ready
        assert rows["p1/P"][4] == "running" and rows["c1/C"][4] == "running"
        fault_report(
            observed=f"SIGKILL of d1's launcher: both engine processes gone after "
                     f"{engines_gone:.2f}s (PDEATHSIG SIGTERM), all {len(ports)} of its ports "
                     f"free after {ports_free:.2f}s; status.yml shows d1/D as "
                     f"'{' '.join(rows['d1/D'][4:6])}' while p1/P and c1/C stay running",
            lost=None)
    finally:
        cluster.playbook("cleanup.yml", check=False)
