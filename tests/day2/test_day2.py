"""Day-2 operations for real (process runtime, emulated engines, nginx, playbooks):
scale out (only the new units start, the front door reloads, nothing else restarts),
a stale unit in status, scale in (drain, stop, recorded as removed), an orphan in status
and a removed host that cannot be reached (reported, never a hang), a rolling restart
of every instance and a rolling upgrade (site.yml -e pd_rolling=true), all under a
constant streaming load with 0 failed requests."""
from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import yaml

from tests.integration.deploy import (
    Cluster,
    make_cluster,
    pid_alive,
    recap,
    status_rows,
    wait_until,
)

from .loadthread import Load

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"),
                       reason="nginx is not installed (make deps)"),
]

SUBNET = "127.0.80"
# two one-node instances per role (each DP1), so a roll always leaves one serving
LAYOUT = {"P": [("p1", 1, None, "0"), ("p2", 2, None, "0")],
          "D": [("d1", 4, None, "0"), ("d2", 5, None, "0")],
          "C": [("c1", 9, None, None)]}
SLOW = {"PD_EMU_ZERO_LATENCY": "0", "PD_EMU_ITL_S": "0.02"}


def inventory(cluster: Cluster) -> dict:
    return yaml.safe_load(cluster.inventory.read_text())


def write(cluster: Cluster, inv: dict) -> None:
    cluster.inventory.write_text(yaml.safe_dump(inv, sort_keys=False))


def add_host(cluster: Cluster, group: str, name: str, last: int, **extra) -> None:
    inv = inventory(cluster)
    inv["all"]["children"][group]["hosts"][name] = dict(
        {"ansible_host": f"{SUBNET}.{last}", "devices": "0"}, **extra)
    cluster.hosts[name] = f"{SUBNET}.{last}"
    write(cluster, inv)


def drop_host(cluster: Cluster, group: str, name: str) -> None:
    inv = inventory(cluster)
    del inv["all"]["children"][group]["hosts"][name]
    write(cluster, inv)


def pids(cluster: Cluster, host: str, unit: str) -> list[int]:
    path = cluster.root / "nodes" / host / "state" / unit / "launcher.json"
    state = json.loads(path.read_text())
    return [state["launcher"]["pid"]] + [p["pid"] for p in state["processes"]]


def all_pids(cluster: Cluster) -> dict[str, list[int]]:
    out = {}
    for path in sorted(cluster.root.glob("nodes/*/state/*/launcher.json")):
        host, unit = path.parts[-4], path.parts[-2]
        out[f"{host}/{unit}"] = pids(cluster, host, unit)
    return out


def the_record(cluster: Cluster) -> dict:
    return json.loads((cluster.root / f"pd-deploy-record.t{SUBNET.split('.')[-1]}.json")
                      .read_text())


def upstreams(cluster: Cluster) -> str:
    return (cluster.root / "nodes" / "c1" / "run" / "C" / "pd_upstreams.conf").read_text()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("day2")
    c = make_cluster(root, SUBNET, layout=LAYOUT, extra_vars={"pd_env": SLOW,
                                                             "pd_drain_timeout": 20})
    try:
        c.playbook("site.yml")
        yield c
    finally:
        c.playbook("cleanup.yml", check=False)


def test_scale_out_starts_only_new_units_and_the_front_door_reloads(cluster: Cluster):
    before = all_pids(cluster)
    rec = the_record(cluster)
    assert set(rec["hosts"]) == {"p1", "p2", "d1", "d2", "c1"}
    assert {u["state"] for h in rec["hosts"].values() for u in h["units"].values()} == {
        "deployed"}
    add_host(cluster, "P", "p3", 3)
    add_host(cluster, "D", "d3", 6)
    with Load(f"http://{cluster.proxy}", concurrency=3, max_tokens=24) as load:
        time.sleep(2)
        load.phase("scale-out")
        res = cluster.playbook("site.yml")
        load.phase("after")
        time.sleep(3)
    assert load.failed() == {}, load.failed()
    assert load.summary()["scale-out"]["ok"] > 0
    after = all_pids(cluster)
    assert {k: after[k] for k in before} == before  # nothing restarted, C included
    assert {"p3/P", "d3/D"} <= set(after)
    text = upstreams(cluster)
    assert f"{SUBNET}.3:7100" in text and f"{SUBNET}.6:7100" in text
    # the new upstreams get requests
    assert load.summary()["after"]["ok"] > 0
    c_state = json.loads((cluster.root / "nodes/c1/state/C/launcher.json").read_text())
    assert c_state["reloads"] >= 1
    assert recap(res.stdout)["c1"]["failed"] == 0
    assert {"p3", "d3"} <= set(the_record(cluster)["hosts"])


def test_status_shows_a_stale_unit(cluster: Cluster):
    inv = inventory(cluster)
    inv["all"]["children"]["P"]["hosts"]["p2"]["pd_env"] = dict(SLOW, PD_DAY2_MARK="1")
    write(cluster, inv)
    try:
        rows = status_rows(cluster.playbook("status.yml").stdout)
        assert rows["p2/P"][4] == "STALE", rows["p2/P"]
        assert rows["p1/P"][4] == "running"
    finally:
        del inv["all"]["children"]["P"]["hosts"]["p2"]["pd_env"]
        write(cluster, inv)
    rows = status_rows(cluster.playbook("status.yml").stdout)
    assert rows["p2/P"][4] == "running"


def test_scale_in_drains_stops_and_records_removed(cluster: Cluster):
    keep = {k: v for k, v in all_pids(cluster).items() if not k.startswith(("p3", "d3"))}
    gone = pids(cluster, "p3", "P") + pids(cluster, "d3", "D")
    drop_host(cluster, "P", "p3")
    drop_host(cluster, "D", "d3")
    rows = status_rows(cluster.playbook("status.yml").stdout)
    assert rows["p3/P"][4:6] == ["ORPHAN", "running"], rows["p3/P"]
    with Load(f"http://{cluster.proxy}", concurrency=3, max_tokens=24) as load:
        time.sleep(2)
        load.phase("scale-in")
        res = cluster.playbook("site.yml")
        load.phase("after")
        time.sleep(2)
    assert load.failed() == {}, load.failed()
    assert "drained after" in res.stdout
    # (a stopped process may stay a zombie for a moment, until its new parent reaps it)
    assert wait_until(lambda: not any(pid_alive(pid) for pid in gone), 10), gone
    assert {k: v for k, v in all_pids(cluster).items()} == keep
    text = upstreams(cluster)
    assert f"{SUBNET}.3:7100" not in text and f"{SUBNET}.6:7100" not in text
    rec = the_record(cluster)
    assert rec["hosts"]["p3"]["units"]["P"]["state"] == "removed"
    assert rec["hosts"]["d3"]["units"]["D"]["state"] == "removed"
    assert "ORPHAN" not in cluster.playbook("status.yml").stdout
    again = cluster.playbook("site.yml")
    assert {h: r["changed"] for h, r in recap(again.stdout).items() if r["changed"]} == {}


def test_unreachable_removed_host_is_reported_not_waited_for(cluster: Cluster):
    add_host(cluster, "D", "d4", 7)
    cluster.playbook("site.yml")
    d4 = pids(cluster, "d4", "D")
    drop_host(cluster, "D", "d4")
    path = cluster.root / f"pd-deploy-record.t{SUBNET.split('.')[-1]}.json"
    good = path.read_text()
    rec = json.loads(good)
    # the record's way to d4 now leads nowhere: SSH to a port nothing listens on
    rec["hosts"]["d4"]["connection"] = {"ansible_host": f"{SUBNET}.7", "ansible_port": 1,
                                        "ansible_connection": "ssh"}
    path.write_text(json.dumps(rec))
    try:
        t0 = time.monotonic()
        res = cluster.playbook("site.yml", timeout=300)
        took = time.monotonic() - t0
        assert "ORPHAN: d4 could not be reached" in res.stdout
        assert took < 120, took
        assert the_record(cluster)["hosts"]["d4"]["units"]["D"]["state"] == "deployed"
        rows = status_rows(cluster.playbook("status.yml").stdout)
        assert rows["d4/D"][4:6] == ["ORPHAN", "(unreachable)"], rows["d4/D"]
        assert all(pid_alive(pid) for pid in d4)  # nothing touched it
    finally:
        rec = json.loads(path.read_text())
        rec["hosts"]["d4"]["connection"] = json.loads(good)["hosts"]["d4"]["connection"]
        path.write_text(json.dumps(rec))
    cluster.playbook("site.yml")  # reachable again: drained, stopped, recorded removed
    assert wait_until(lambda: not any(pid_alive(pid) for pid in d4), 10), d4
    assert the_record(cluster)["hosts"]["d4"]["units"]["D"]["state"] == "removed"


def test_rolling_restart_of_every_instance_under_load(cluster: Cluster):
    before = all_pids(cluster)
    with Load(f"http://{cluster.proxy}", concurrency=3, max_tokens=24) as load:
        time.sleep(2)
        load.phase("roll")
        res = cluster.playbook("restart.yml", "-e", "pd_restart_scope=all")
        load.phase("after")
        time.sleep(2)
    assert load.failed() == {}, load.failed()
    assert load.summary()["roll"]["ok"] > 0
    after = all_pids(cluster)
    assert after["c1/C"] == before["c1/C"]
    for unit in ("p1/P", "p2/P", "d1/D", "d2/D"):
        assert not set(after[unit]) & set(before[unit]), f"{unit} was not restarted"
    # one instance at a time: P1, P2, D1, D2 in that order
    order = [line for line in res.stdout.splitlines() if "Roll each instance" in line]
    assert order, res.stdout[-3000:]


def test_rolling_upgrade_restarts_only_the_changed_instance(cluster: Cluster):
    before = all_pids(cluster)
    inv = inventory(cluster)
    inv["all"]["children"]["D"]["hosts"]["d2"]["pd_env"] = dict(SLOW, PD_DAY2_VERSION="2")
    write(cluster, inv)
    with Load(f"http://{cluster.proxy}", concurrency=3, max_tokens=24) as load:
        time.sleep(2)
        load.phase("upgrade")
        cluster.playbook("site.yml", "-e", "pd_rolling=true")
        load.phase("after")
        time.sleep(2)
    assert load.failed() == {}, load.failed()
    after = all_pids(cluster)
    assert not set(after["d2/D"]) & set(before["d2/D"])
    assert {k: v for k, v in after.items() if k != "d2/D"} == {
        k: v for k, v in before.items() if k != "d2/D"}
    rows = status_rows(cluster.playbook("status.yml").stdout)
    assert rows["d2/D"][4] == "running"


def test_an_instance_that_does_not_come_back_stops_the_roll(cluster: Cluster):
    # D1 never gets ready again after its restart: the roll stops there, names it, D2
    # is never touched and keeps serving; a plain site.yml afterwards clears the drain
    d2 = pids(cluster, "d2", "D")
    inv = inventory(cluster)
    inv["all"]["children"]["D"]["hosts"]["d1"].update(
        pd_env=dict(SLOW, PD_EMU_SLOW_START_S="900"), pd_ready_timeout=5)
    write(cluster, inv)
    try:
        res = cluster.playbook("restart.yml", "-e", "pd_restart_scope=D", check=False)
        assert res.returncode != 0
        assert "instance D1 did not come back on d1" in res.stdout, res.stdout[-3000:]
        assert "D1 stays drained at the front door" in res.stdout
        assert pids(cluster, "d2", "D") == d2  # the roll never reached D2
        drain = json.loads((cluster.root / "nodes/c1/run/C/drain.json").read_text())
        assert drain["peers"] == [f"{SUBNET}.4:7100"], drain
        with Load(f"http://{cluster.proxy}", concurrency=2, max_tokens=8) as load:
            time.sleep(3)
        assert load.failed() == {} and load.summary()["start"]["ok"] > 0
    finally:
        del inv["all"]["children"]["D"]["hosts"]["d1"]["pd_env"]
        del inv["all"]["children"]["D"]["hosts"]["d1"]["pd_ready_timeout"]
        write(cluster, inv)
    cluster.playbook("site.yml")
    drain = json.loads((cluster.root / "nodes/c1/run/C/drain.json").read_text())
    assert drain["peers"] == []


def test_cleanup_removes_orphans_too_and_records_it(cluster: Cluster):
    add_host(cluster, "D", "d5", 8)
    cluster.playbook("site.yml")
    d5 = pids(cluster, "d5", "D")
    drop_host(cluster, "D", "d5")  # an orphan, then a cleanup of the whole cluster
    res = cluster.playbook("cleanup.yml")
    assert recap(res.stdout)["d5"]["failed"] == 0
    assert wait_until(lambda: not any(pid_alive(pid) for pid in d5), 10), d5
    assert cluster.state_files() == []
    rec = the_record(cluster)
    assert {u["state"] for h in rec["hosts"].values() for u in h["units"].values()} == {
        "removed"}
    assert "ORPHAN" not in cluster.playbook("status.yml").stdout
