"""Cluster services end to end, with the toy backend (tests/fixtures/toy_backend.py: a
`registry` before the engines, a `router` after them, nginx as the front door).

site.yml starts them in phase order, each after the previous phase was ready (checked
from the launchers' own records: state/<unit>/launcher.json start times and the
engines' "ready" log lines); status.yml shows the services as rows; a re-run changes
nothing; cleanup.yml removes every unit. With pd_front_door: none there is no nginx.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from .deploy import (
    REPO,
    Cluster,
    make_cluster,
    pid_alive,
    recap,
    status_rows,
    stop_leftovers,
    wait_until,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"),
                       reason="nginx is not installed (make deps)"),
]

TOY = "tests.fixtures.toy_backend:ToyBackend"
ENGINES = ("p1a", "p1b", "p2", "d1a", "d1b")
READY_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) INFO .*\] ready: ")


def toy_cluster(root: Path, subnet: str, **extra) -> Cluster:
    cluster = make_cluster(root, subnet, extra_vars={"pd_engine": "toy", **extra})
    # the filter plugin puts the repository on sys.path; PYTHONPATH also serves the
    # controller-side commands (the validate role's bundle build)
    cluster.env = {"PD_DEPLOY_BACKENDS": TOY, "PYTHONPATH": str(REPO)}
    return cluster


def state(cluster: Cluster, host: str, unit: str) -> dict:
    return json.loads((cluster.root / "nodes" / host / "state" / unit / "launcher.json")
                      .read_text())


def started(cluster: Cluster, host: str, unit: str) -> list[float]:
    """When the launcher started each process of the unit (epoch seconds)."""
    return [p["started_at"] for p in state(cluster, host, unit)["processes"]]


def engines_ready(cluster: Cluster) -> list[float]:
    """When each engine process said it was ready (its /health turned 200), from the
    emulator's log lines (local time, millisecond resolution)."""
    out = []
    for host in ENGINES:
        unit = "P" if host.startswith("p") else "D"
        for log in (cluster.root / "nodes" / host / "logs" / unit).glob("engine-*.log"):
            stamps = [m for m in map(READY_LINE.match, log.read_text().splitlines()) if m]
            assert stamps, f"{log} has no ready line"
            day, ms = stamps[-1].groups()
            out.append(time.mktime(time.strptime(day, "%Y-%m-%d %H:%M:%S")) + int(ms) / 1000)
    return out



def unit_dirs(cluster: Cluster) -> list[Path]:
    return sorted(p for kind in ("run", "state") for p in cluster.root.glob(f"nodes/*/{kind}/*"))


def test_services_start_in_phase_order_show_in_status_and_are_removed(tmp_path):
    cluster = toy_cluster(tmp_path / "svc", "127.0.23")
    try:
        first = cluster.playbook("site.yml")
        assert "answered 200" in first.stdout
        registry = started(cluster, "c1", "registry")
        router = started(cluster, "c1", "router")
        door = started(cluster, "c1", "C")
        engine_starts = [t for h in ENGINES for t in started(cluster, h, h[0].upper())]
        ready = engines_ready(cluster)
        assert len(engine_starts) == len(ready) == 8
        # before-engines: the registry runs before any engine starts
        assert max(registry) < min(engine_starts)
        # after-engines: the router starts once every engine is ready
        assert min(router) > max(ready), (router, sorted(ready)[-3:])
        # the front door last
        assert min(door) > max(router)

        rows = status_rows(cluster.playbook("status.yml").stdout)
        assert set(rows) == {f"{h}/{h[0].upper()}" for h in ENGINES} | {
            "c1/registry", "c1/router", "c1/C"}, rows
        for name, port in (("registry", "7300"), ("router", "7301")):
            row = rows[f"c1/{name}"]
            assert row[4] == "running" and row[5] == "1/1" and port in row, row

        again = cluster.playbook("site.yml")
        changed = {h: r["changed"] for h, r in recap(again.stdout).items()}
        assert set(changed.values()) == {0}, changed

        pids = cluster.recorded_pids()
        # 8 engine processes and 5 launchers; registry and router with theirs; C: 2 + 1
        assert len(pids) == 8 + 5 + 2 + 2 + 3, pids
        cleanup = cluster.playbook("cleanup.yml")
        assert cleanup.stdout.index("Remove the front door") < cleanup.stdout.index(
            "Remove the services that need the engines") < cleanup.stdout.index(
            "Remove the engines") < cleanup.stdout.index("Remove the services the engines")
        assert cluster.state_files() == []
        assert unit_dirs(cluster) == []
        assert not list(cluster.root.glob("nodes/*/lib"))
        assert wait_until(lambda: cluster.listening() == [], 10), cluster.listening()
        for pid in pids:
            assert not pid_alive(pid), pid
    finally:
        cluster.playbook("cleanup.yml", check=False)
        stop_leftovers(cluster)


def test_no_front_door_deploys_no_nginx(tmp_path):
    cluster = toy_cluster(tmp_path / "none", "127.0.24", pd_front_door="none")
    try:
        site = cluster.playbook("site.yml")
        assert "answered" not in site.stdout  # no front door, no smoke request
        nodes = cluster.root / "nodes"
        assert (nodes / "c1" / "state" / "router" / "launcher.json").exists()
        assert not (nodes / "c1" / "run" / "C").exists()
        assert not any(addr.endswith(":7000") for addr in cluster.listening())
        rows = status_rows(cluster.playbook("status.yml").stdout)
        assert "c1/C" not in rows and rows["c1/router"][4] == "running", rows
        cluster.playbook("cleanup.yml")
        assert cluster.state_files() == [] and unit_dirs(cluster) == []
    finally:
        cluster.playbook("cleanup.yml", check=False)
        stop_leftovers(cluster)

