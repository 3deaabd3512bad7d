"""Row 4: two site.yml (or site + cleanup) at once on one cluster.

The cluster lock (roles/lock, plugins/modules/pd_lock.py) is a directory made with one
atomic mkdir in the first C host's pd_base_dir. While a site.yml holds it, a second
site.yml and a cleanup.yml stop at once naming user, controller and start time. A lock
left by a SIGKILLed ansible-playbook on this controller is taken over by the next run by
itself; a lock from another controller only with -e pd_lock_break=<its id>.
"""
from __future__ import annotations

import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

from tests.integration.deploy import PLAYBOOK, REPO, make_cluster, wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"),
                       reason="nginx is not installed (make deps)"),
]


def _start(cluster, name: str) -> subprocess.Popen:
    return subprocess.Popen([PLAYBOOK, "-i", str(cluster.inventory), name], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True,
                            env=dict(os.environ, ANSIBLE_FORCE_COLOR="0"))


@pytest.mark.fault_row(4)
def test_lock_refuses_second_run_and_stale_lock_is_taken_over(tmp_path, fault_report):
    cluster = make_cluster(tmp_path / "c", "127.0.62",
                           host_vars={"p2": {"pd_env": {"PD_EMU_SLOW_START_S": "12"}}})
    lock = cluster.root / "nodes" / "c1" / "pd-deploy.lock"
    holder_file = lock / "holder.json"
    first = _start(cluster, "site.yml")
    try:
        assert wait_until(holder_file.exists, 60), "site.yml never took the lock"
        holder = json.loads(holder_file.read_text())
        assert holder["pid"] == first.pid and holder["playbook"] == "site.yml"
        assert oct(lock.stat().st_mode & 0o777) == "0o700"
        # a second site.yml and a cleanup.yml, both at once, while the first one runs
        t0 = time.monotonic()
        others = [_start(cluster, "site.yml"), _start(cluster, "cleanup.yml")]
        outs = [p.communicate(timeout=120)[0] for p in others]
        refused_in = time.monotonic() - t0
        assert first.poll() is None, "the first run ended before the others were refused"
        for proc, out in zip(others, outs):
            assert proc.returncode != 0, out[-3000:]
            assert "the cluster is locked by" in out, out[-3000:]
            assert getpass.getuser() in out and socket.gethostname() in out, out[-3000:]
            assert holder["started"] in out and f"pid {first.pid}" in out, out[-3000:]
            assert f"pd_lock_break={holder['id']}" in out, out[-3000:]
            assert "Preflight every node" not in out and "Remove the front door" not in out
        assert holder_file.exists() and json.loads(holder_file.read_text())["id"] == holder["id"]

        # SIGKILL the first run (the whole ansible-playbook process group): its lock stays
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
        assert json.loads(holder_file.read_text())["id"] == holder["id"]
        status = cluster.playbook("status.yml").stdout
        assert f"cluster lock: held by {getpass.getuser()}" in status, status[-2000:]

        # the next run from this controller sees that pid is gone and takes the lock over
        t1 = time.monotonic()
        again = cluster.playbook("site.yml", timeout=300)
        converge_s = time.monotonic() - t1
        assert "Take over the stale lock" in again.stdout
        assert "answered 200" in again.stdout
        assert not lock.exists(), "site.yml did not release the lock at its end"

        # a lock held from another controller is never taken over without pd_lock_break
        lock.mkdir(mode=0o700)
        foreign = dict(holder, id="bob@ctl-far:4242:deadbeef", user="bob",
                       controller="ctl-far", boot_id="x", pid=4242)
        holder_file.write_text(json.dumps(foreign))
        refused = cluster.playbook("cleanup.yml", check=False)
        assert refused.returncode != 0 and "locked by bob on controller ctl-far" in refused.stdout
        assert cluster.state_files(), "a refused cleanup removed something"
        cluster.playbook("cleanup.yml", "-e", f"pd_lock_break={foreign['id']}")
        assert cluster.state_files() == [] and not lock.exists()
    finally:
        for proc in [first]:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        cluster.playbook("cleanup.yml", "-e", "pd_lock_break=" + _lock_id(holder_file),
                         check=False)
    fault_report(observed=(
        f"with site.yml holding the lock, a second site.yml and a cleanup.yml were both "
        f"refused within {refused_in:.1f}s naming user, controller, pid and start time; "
        f"after SIGKILL of the holder, the next site.yml took the stale lock over by itself "
        f"and converged in {converge_s:.0f}s; a foreign controller's lock needed "
        f"-e pd_lock_break=<id>"), lost=None)


def _lock_id(holder_file) -> str:
    try:
        return json.loads(holder_file.read_text())["id"]
    except (OSError, ValueError, KeyError):
        return ""
