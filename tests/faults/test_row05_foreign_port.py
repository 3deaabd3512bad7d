"""Row 5: a port taken by a foreign process. site.yml refuses in preflight, before
anything starts on any node, naming the port, the host and the process holding it."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest

from tests.integration.deploy import make_cluster, task_hosts

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"),
                       reason="nginx is not installed (make deps)"),
]

LAYOUT = {"P": [("p1", 1, None, "0")], "D": [("d1", 4, None, "0")], "C": [("c1", 9, None, None)]}
LISTENER = ("import socket, sys, time\n"
            "s = socket.socket(); s.bind((sys.argv[1], int(sys.argv[2]))); s.listen()\n"
            "print('listening', flush=True)\n"
            "time.sleep(600)\n")


@pytest.mark.fault_row(5)
def test_foreign_listener_is_refused_in_preflight(tmp_path, fault_report):
    cluster = make_cluster(tmp_path / "c", "127.0.58", layout=LAYOUT)
    host = cluster.hosts["d1"]
    app = tmp_path / "foreign-app.py"
    app.write_text(LISTENER)
    foreign = subprocess.Popen([sys.executable, str(app), host, "7100"],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert foreign.stdout is not None and foreign.stdout.readline().strip() == "listening"
        res = cluster.playbook("site.yml", check=False)
        out = res.stdout
        assert res.returncode != 0
        failed = task_hosts(out, "Check devices, model path, commands, free ports")
        assert failed.get("failed") == ["d1"], failed
        want = f"port {host}:7100 is already in use by pid {foreign.pid}"
        assert want in out, out[-4000:]
        assert "foreign-app" in out  # the holder's command line
        line = next(x for x in out.splitlines() if want in x)
        assert "d1" in line and "engine-dp0/api" in line, line
        # nothing was started anywhere: no unit task ran, no state file, no listener
        assert "Start the launcher" not in out and "Install the launcher" not in out
        assert cluster.state_files() == []
        assert cluster.listening() == [f"{host}:7100"], cluster.listening()
        assert not (cluster.root / "nodes").exists() or not list(
            (cluster.root / "nodes").glob("*/run/*/spec.json"))
        fault_report(
            observed=f"a foreign listener on d1's planned port {host}:7100: site.yml failed "
                     f"in preflight with '{want} (python .../foreign-app.py ...)' for d1 "
                     f"(engine-dp0/api); 0 units started on the 3 nodes, 0 state files, the "
                     f"only listener left on the cluster's addresses is the foreign one",
            lost=None)
    finally:
        foreign.kill()
        foreign.wait()
        cluster.playbook("cleanup.yml", check=False)
        socket.setdefaulttimeout(None)
