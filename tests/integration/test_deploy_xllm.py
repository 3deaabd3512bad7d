"""xLLM end to end on loopback: the real etcd, the emulator's xllm_master_serving and
xLLM personalities (exactly the argv pd_engine: xllm gets), nginx in front.

One prefill instance over two hosts (node ranks 0 and 1, a rank table built on the
nodes from fake hccn.conf files and exchanged through etcd), one decode host, C with
etcd, the service and the front door. site.yml serves plain, streaming and chat
requests; a re-run changes nothing; status.yml shows etcd, the service, every rank and
what is registered; a killed prefill process (pd_restart_policy never: no restart)
takes the instance's key out of etcd within --etcd_ttl + 2 s; cleanup.yml leaves
nothing (a decoy etcd survives); site.yml works again.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from pd_launcher.etcd_gateway import EtcdGateway
from tests.fixtures.etcd import ETCD_MISSING, start_etcd

from .deploy import (
    Cluster,
    exercise_proxy,
    make_cluster,
    pid_alive,
    recap,
    status_rows,
    stop_leftovers,
    task_hosts,
    wait_until,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"),
                       reason="nginx is not installed (make deps)"),
    pytest.mark.skipif(ETCD_MISSING is not None, reason=ETCD_MISSING or ""),
]

SUBNET = "127.0.27"
LAYOUT = {
    "P": [("p1a", 1, None, "0"), ("p1b", 2, 1, "0")],
    "D": [("d1", 4, None, "0")],
    "C": [("c1", 9, None, None)],
}
TTL = 3  # xLLM's default --etcd_ttl


def xllm_cluster(root: Path) -> Cluster:
    hccn = root / "hccn"
    hccn.mkdir(parents=True, exist_ok=True)
    host_vars = {}
    for name, last, _, _ in LAYOUT["P"] + LAYOUT["D"]:
        path = hccn / f"{name}.conf"
        path.write_text(f"# fake hccn.conf of {name}\naddress_0=192.168.{last}.10\n"
                        "netmask_0=255.255.255.0\n")
        host_vars[name] = {"pd_hccn_conf": str(path)}
    # pd_restart_policy never: the test looks at a dead prefill instance (its key leaves
    # etcd, the gate closes); with on-failure (the default) its launcher would start it
    # again after 1 s and it would register again (tests/faults row 12 and
    # test_deploy_process cover the restart)
    return make_cluster(root, SUBNET, layout=LAYOUT, host_vars=host_vars, extra_vars={
        "pd_emulate": "xllm", "pd_kv_port": 26000, "pd_ready_timeout": 60,
        "pd_restart_policy": "never"})


def registered(cluster: Cluster) -> dict[str, str]:
    gw = EtcdGateway(f"http://{cluster.hosts['c1']}:2379")
    return gw.range_prefix(f"/{cluster_name()}/XLLM:")


def cluster_name() -> str:
    return f"t{SUBNET.split('.')[-1]}"


def p_key(cluster: Cluster, role: str = "PREFILL", host: str = "p1a") -> str:
    return f"/{cluster_name()}/XLLM:{role}:{cluster.hosts[host]}:7100"



def test_xllm_deploy_serve_status_fail_cleanup(tmp_path):
    cluster = xllm_cluster(tmp_path / "x")
    decoy = start_etcd(tmp_path / "decoy", cluster.hosts["c1"])  # not ours: must survive
    try:
        first = cluster.playbook("site.yml")
        assert "answered 200" in first.stdout
        # the cluster-ready gate was waited for after the engines
        assert task_hosts(first.stdout, "Wait until this gate opens: xllm-service").get("ok") == [
            "c1"]
        keys = registered(cluster)
        assert set(keys) >= {p_key(cluster), p_key(cluster, "DECODE", "d1")}, keys
        info = json.loads(keys[p_key(cluster)])
        assert info["name"] == f"{cluster.hosts['p1a']}:7100"
        assert info["rpc_address"] == f"{cluster.hosts['p1a']}:7777"
        assert len(info["ports"]) == 2  # one transfer port per device of the instance
        # the rank table the two prefill hosts built from their hccn.conf through etcd
        tables = [json.loads((cluster.root / "nodes" / h / "run" / "P" / "rank_table.json")
                             .read_text()) for h in ("p1a", "p1b")]
        assert tables[0] == tables[1]
        assert [d["device_ip"] for s in tables[0]["server_list"] for d in s["device"]] == [
            "192.168.1.10", "192.168.2.10"]
        exercise_proxy(cluster)

        again = cluster.playbook("site.yml")
        changed = {h: r["changed"] for h, r in recap(again.stdout).items()}
        assert set(changed.values()) == {0}, changed

        status = cluster.playbook("status.yml").stdout
        rows = status_rows(status)
        assert set(rows) == {"p1a/P", "p1b/P", "d1/D", "c1/etcd", "c1/xllm-service",
                             "c1/C"}, rows
        for unit in rows.values():
            assert unit[4] == "running" and unit[5].split("/")[0] == unit[5].split("/")[1], unit
        assert rows["p1a/P"][3] == "0" and rows["p1b/P"][3] == "1", rows
        assert "c1/xllm-service gate: ok" in status
        assert "present: P1" in status and "present: D1" in status

        # a prefill process dies (and stays down: policy never): the instance (node rank
        # 0 on p1a) goes with it and its key leaves etcd within --etcd_ttl + 2 s
        state = json.loads((cluster.root / "nodes/p1b/state/P/launcher.json").read_text())
        (proc,) = state["processes"]
        killed = time.monotonic()
        os.kill(proc["pid"], signal.SIGKILL)
        assert wait_until(lambda: p_key(cluster) not in registered(cluster), TTL + 2,
                          interval=0.1), registered(cluster)
        gone_after = time.monotonic() - killed
        assert gone_after <= TTL + 2, gone_after
        status = cluster.playbook("status.yml", check=False).stdout
        rows = status_rows(status)
        assert rows["p1b/P"][4] != "running", rows["p1b/P"]
        p1b = json.loads((cluster.root / "nodes/p1b/state/P/launcher.json").read_text())
        assert p1b["status"] == "failed" and p1b["restart_policy"] == "never", p1b
        assert not p1b.get("restarts"), p1b
        assert "c1/xllm-service gate: NOT READY" in status
        assert "missing: P1" in status

        ours = cluster.recorded_pids()
        cluster.playbook("cleanup.yml")
        assert cluster.state_files() == []
        decoy_addr = {f"{decoy.host}:{decoy.port}", f"{decoy.host}:{decoy.peer_port}"}
        assert wait_until(lambda: set(cluster.listening()) <= decoy_addr, 10), \
            cluster.listening()
        for pid in ours:
            assert not pid_alive(pid), pid
        assert decoy.proc.poll() is None, "cleanup stopped an etcd it did not start"

        second = cluster.playbook("site.yml")
        assert "answered 200" in second.stdout
        exercise_proxy(cluster)
    finally:
        cluster.playbook("cleanup.yml", check=False)
        stop_leftovers(cluster)
        decoy.stop()

