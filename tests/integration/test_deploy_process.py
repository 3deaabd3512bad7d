"""site -> requests -> site (changed=0) -> status -> kill -> the launcher restarts the
set by itself -> status -> requests -> cleanup -> site, for real.

Process runtime over a local connection and over SSH (a throwaway sshd on the node
addresses). Each cluster is the local inventory's shape on its own loopback subnet.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from .deploy import (
    Cluster,
    exercise_proxy,
    make_cluster,
    port_open,
    recap,
    row_restarts,
    start_decoy,
    status_rows,
    unit_ready,
    wait_restarted,
    wait_until,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"),
                       reason="nginx is not installed (make deps)"),
]


def full_cycle(cluster: Cluster) -> None:
    decoy = start_decoy(["-m", "pd_launcher.emulator", "serve", "/models/demo",
                         "--host", cluster.hosts["d1a"], "--port", "7100"])
    try:
        _cycle(cluster, decoy.pid)
        assert decoy.poll() is None, "cleanup killed a process it did not start"
    finally:
        decoy.kill()
        decoy.wait()
        cluster.playbook("cleanup.yml", check=False)


def _cycle(cluster: Cluster, decoy_pid: int) -> None:
    first = cluster.playbook("site.yml")
    assert "answered 200" in first.stdout  # the proxy role's smoke request

    exercise_proxy(cluster)

    again = cluster.playbook("site.yml")
    changed = {h: r["changed"] for h, r in recap(again.stdout).items()}
    assert set(changed.values()) == {0}, changed

    rows = status_rows(cluster.playbook("status.yml").stdout)
    assert len(rows) == 6, rows
    for key, row in rows.items():
        assert row[4] == "running", (key, row)
        ready, total = row[5].split("/")
        assert ready == total, (key, row)

    # kill one engine process: its launcher (pd_restart_policy on-failure, the default)
    # stops the node's whole set and starts it again by itself after a 1 s backoff;
    # the other node of the instance is not touched, status counts the restart
    state_file = next(p for p in cluster.state_files() if "/d1b/" in str(p))
    before = json.loads(state_file.read_text())
    assert before.get("restart_policy") == "on-failure" and not before.get("restarts"), before
    others = {str(p): json.loads(p.read_text()) for p in cluster.state_files()
              if p != state_file}
    victim = before["processes"][0]["pid"]
    killed = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    after = wait_restarted(state_file, before, 30)
    assert after is not None, state_file.read_text()
    back_s = time.monotonic() - killed
    assert after["restarts"] == 1 and after["last_failure"]["pid"] == victim, after
    assert "SIGKILL" in after["last_failure"]["status"], after["last_failure"]
    assert unit_ready(cluster, "d1b", "D", 60)
    ready_s = time.monotonic() - killed
    print(f"d1b/D restarted by its launcher: new PIDs after {back_s:.1f}s, "
          f"ready again after {ready_s:.1f}s")
    assert port_open(cluster.hosts["d1b"], 7100)
    assert back_s < 10, back_s
    for path, st in others.items():  # nothing else restarted
        now = json.loads(Path(path).read_text())
        assert [q["pid"] for q in now["processes"]] == [q["pid"] for q in st["processes"]], path
        assert not now.get("restarts"), path
    rows = status_rows(cluster.playbook("status.yml").stdout)
    assert rows["d1b/D"][4] == "running", rows["d1b/D"]
    ready, total = rows["d1b/D"][5].split("/")
    assert ready == total, rows["d1b/D"]
    assert (row_restarts(rows["d1b/D"]) or 0) >= 1, rows["d1b/D"]
    assert rows["d1a/D"][4] == "running" and row_restarts(rows["d1a/D"]) == 0, rows["d1a/D"]
    exercise_proxy(cluster)  # the instance serves again

    pids = cluster.recorded_pids()
    cluster.playbook("cleanup.yml")
    assert cluster.state_files() == []
    assert wait_until(lambda: cluster.listening() == [], 10), cluster.listening()
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or _zombie(pid), pid
    assert os.path.exists(f"/proc/{decoy_pid}")
    logs = list(cluster.root.glob("nodes/*/logs/*/*.log"))
    assert logs, "cleanup removed the logs without pd_cleanup_logs"
    rerun = cluster.playbook("cleanup.yml")
    assert {r["changed"] for r in recap(rerun.stdout).values()} == {0}

    cluster.playbook("site.yml")
    exercise_proxy(cluster)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_process_runtime_local_connection(tmp_path):
    full_cycle(make_cluster(tmp_path / "local", "127.0.3"))


def test_process_runtime_over_ssh(tmp_path):
    sshd_mod = pytest.importorskip("tests.fixtures.sshd")
    if not os.path.exists(sshd_mod.SSHD):
        pytest.skip("openssh-server is not installed (make deps)")
    addrs = [f"127.0.4.{i}" for i in (1, 2, 3, 4, 5, 9)]
    sshd = sshd_mod.start_sshd(tmp_path / "sshd", port=2222, addrs=addrs)
    try:
        conn = sshd.ansible_vars()
        cluster = make_cluster(tmp_path / "ssh", "127.0.4", connection=conn)
        full_cycle(cluster)
        assert "ansible_connection" in cluster.inventory.read_text()
    finally:
        sshd.stop()


def test_cleanup_logs_and_check_mode(tmp_path):
    cluster = make_cluster(tmp_path / "c", "127.0.5")
    dry = cluster.playbook("site.yml", "--check", "--diff")
    assert cluster.state_files() == [] and cluster.listening() == []
    assert not (cluster.root / "nodes").exists() or not list(
        (cluster.root / "nodes").glob("*/run/*/spec.json"))
    assert "changed=" in dry.stdout
    cluster.playbook("site.yml")
    try:
        cluster.playbook("cleanup.yml", "-e", "pd_cleanup_logs=true")
        assert list(cluster.root.glob("nodes/*/logs/*/*.log")) == []
    finally:
        cluster.playbook("cleanup.yml", check=False)


def test_logs_playbook_fetches_one_folder_per_node(tmp_path):
    cluster = make_cluster(tmp_path / "l", "127.0.6")
    cluster.playbook("site.yml")
    try:
        cluster.playbook("logs.yml")
        fetched = cluster.root / "fetched-logs"
        assert sorted(p.name for p in fetched.iterdir()) == sorted(cluster.hosts)
        assert list((fetched / "d1a" / "D").glob("engine-dp*.log"))
        assert list((fetched / "c1" / "C").glob("*.log"))
    finally:
        cluster.playbook("cleanup.yml", check=False)
