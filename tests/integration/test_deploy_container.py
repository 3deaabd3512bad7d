"""pd_runtime: container, for real: podman with one image store per emulated node.

site --check -> site (the image tarball copied to ONE node by the controller, passed
on node to node over HTTP with its sha256 checked, loaded, removed) -> requests
through the proxy -> site again (changed=0, nothing loaded) -> status -> podman kill
one engine container -> status -> site recreates it -> cleanup (only this cluster's
labelled containers; decoys survive) -> cleanup again (no-op) -> site again -> cleanup.

Needs root, podman + runc + catatonit (.ci/setup-podman.sh) and the test image
(built once by .ci/build-test-image.sh into var/images/, ~1.5 min; cached after).
"""
from __future__ import annotations

import json
import os

import pytest

from tests.fixtures.podman_env import (
    TEST_IMAGE,
    NodeStore,
    ensure_test_image,
    podman_env,
    podman_missing,
    tarball_image_id,
)

from .deploy import (
    LAYOUT,
    Cluster,
    exercise_proxy,
    make_cluster,
    port_open,
    recap,
    start_decoy,
    status_rows,
    task_hosts,
    wait_until,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.podman,
    pytest.mark.skipif(podman_missing() is not None, reason=str(podman_missing())),
]

SUBNET = "127.0.7"
CLUSTER = "t7"  # make_cluster: t<last octet of the subnet>
HOSTS = [h for members in LAYOUT.values() for h, *_ in members]


def _ours(store: NodeStore) -> list[dict]:
    return store.containers(label=f"pd.cluster={CLUSTER}")


def test_container_runtime_full_cycle(tmp_path):
    tarball = ensure_test_image()
    image_id = tarball_image_id(tarball).split(":", 1)[1]
    root = tmp_path / "ctr"
    stores = {h: NodeStore(root / "nodes" / h) for h in HOSTS}
    cluster = make_cluster(
        root, SUBNET, runtime="container",
        host_vars={h: {"pd_container_cli_args": s.cli_args} for h, s in stores.items()},
        extra_vars={
            "pd_python": "python3",  # the image's (it has aiohttp); the host's for `wait`
            "pd_image": TEST_IMAGE,
            "pd_image_tarball": str(tarball),
            "pd_container_cli": "podman",
            "pd_container_env": podman_env(),
            "pd_image_fanout": 2,  # 6 nodes: seed, then 2 rounds node to node
        })
    decoy = None
    try:
        # decoys: a container with a look-alike name and no labels, one of another
        # cluster with our unit's name pattern, a host process with an engine's argv
        stores["d1b"].podman("load", "-q", "-i", str(tarball))
        stores["d1b"].run_detached(f"pd-{CLUSTER}-d1b-d-old", TEST_IMAGE, ["sleep", "900"])
        stores["d1b"].run_detached(f"pd-{CLUSTER}x-d1b-d", TEST_IMAGE, ["sleep", "900"],
                                   labels={"pd.cluster": f"{CLUSTER}x", "pd.node": "d1b",
                                           "pd.role": "D"})
        decoy = start_decoy(["-m", "pd_launcher.emulator", "serve", "/models/demo",
                             "--host", cluster.hosts["d1a"], "--port", "7100"])
        _cycle(cluster, stores, tarball, image_id, decoy.pid)
        assert decoy.poll() is None, "cleanup killed a process it did not start"
    finally:
        if decoy is not None:
            decoy.kill()
            decoy.wait()
        cluster.playbook("cleanup.yml", check=False)
        for store in stores.values():
            store.destroy()


def _cycle(cluster: Cluster, stores: dict[str, NodeStore], tarball, image_id: str,
           decoy_pid: int) -> None:
    # check mode on fresh nodes: changes nothing, fails nothing
    dry = cluster.playbook("site.yml", "--check")
    assert "changed=" in dry.stdout
    for host, store in stores.items():
        if host != "d1b":  # d1b holds the decoys' image
            assert store.image_id(TEST_IMAGE) is None, host
        assert _ours(store) == [], host
    assert list(cluster.root.glob("nodes/*/images/*")) == []
    assert cluster.listening() == []

    first = cluster.playbook("site.yml")
    assert "answered 200" in first.stdout  # the proxy role's smoke request
    # fan-out: the controller copied the tarball to exactly one node; the others that
    # lack the image (not d1b: the decoys' load gave it the same image ID) fetched it
    # over HTTP (sha256 checked by get_url) from a node that had it, in round 2 also
    # from holders other than the seed
    copied = task_hosts(first.stdout, "Copy the tarball from the controller to the seed node")
    assert copied.get("changed") == ["p1a"], copied
    fetched = task_hosts(first.stdout, "Fetch the tarball from its holder and verify its sha256")
    assert sorted(fetched.get("changed", [])) == sorted(set(HOSTS) - {"p1a", "d1b"}), fetched
    served = task_hosts(first.stdout, "Serve the tarball to this round's fetchers")
    assert set(served.get("changed", [])) > {"p1a"}, served
    assert "round 2: " in first.stdout
    loaded = task_hosts(first.stdout, "Load the image from the tarball")
    assert sorted(loaded.get("changed", [])) == sorted(set(HOSTS) - {"d1b"}), loaded
    for host, store in stores.items():
        assert store.image_id(TEST_IMAGE) == image_id, host
        units = _ours(store)
        assert len(units) == 1 and units[0]["State"] == "running", (host, units)
        labels = units[0]["Labels"]
        assert labels["pd.node"] == host and len(labels["pd.spec-sha256"]) == 64
    assert list(cluster.root.glob("nodes/*/images/*")) == [], "tarballs left on the nodes"

    exercise_proxy(cluster)

    ids = {h: _ours(s)[0]["Id"] for h, s in stores.items()}
    again = cluster.playbook("site.yml")
    changed = {h: r["changed"] for h, r in recap(again.stdout).items()}
    assert set(changed.values()) == {0}, changed
    assert "changed" not in task_hosts(again.stdout, "Load the image from the tarball")
    assert "every node already has its image" in again.stdout
    assert {h: _ours(s)[0]["Id"] for h, s in stores.items()} == ids, "containers recreated"

    rows = status_rows(cluster.playbook("status.yml").stdout)
    assert len(rows) == 6, rows
    for key, row in rows.items():
        assert row[4] == "running", (key, row)
        ready, total = row[5].split("/")
        assert ready == total, (key, row)
        assert row[-1] == TEST_IMAGE and row[-2] != "-", (key, row)

    # kill one engine container: the restart policy does not bring back a killed
    # container, and status shows it
    stores["d1b"].podman("kill", f"pd-{CLUSTER}-d1b-d")
    assert wait_until(lambda: not port_open(cluster.hosts["d1b"], 7100))
    rows = status_rows(cluster.playbook("status.yml").stdout)
    assert rows["d1b/D"][4].startswith("exited"), rows["d1b/D"]
    assert rows["d1b/D"][5].startswith("0/"), rows["d1b/D"]
    assert rows["d1a/D"][4] == "running", rows["d1a/D"]

    # converge: site removes the exited container and starts a new one, nothing else
    fix = cluster.playbook("site.yml", "--limit", "localhost,d1b")
    assert "is exited (exit code 137)" in fix.stdout
    now = {h: _ours(s)[0]["Id"] for h, s in stores.items()}
    assert now["d1b"] != ids["d1b"] and _ours(stores["d1b"])[0]["State"] == "running"
    assert {h: i for h, i in now.items() if h != "d1b"} == {
        h: i for h, i in ids.items() if h != "d1b"}

    # rolling restart of the P instances (restart.yml): their containers are recreated,
    # one instance at a time; the decode and the front door are left alone
    cluster.playbook("restart.yml", "-e", "pd_restart_scope=P")
    rolled = {h: _ours(s)[0]["Id"] for h, s in stores.items()}
    assert all(rolled[h] != now[h] for h in ("p1a", "p1b", "p2")), (rolled, now)
    assert all(rolled[h] == now[h] for h in ("d1a", "d1b", "c1")), (rolled, now)
    assert all(_ours(stores[h])[0]["State"] == "running" for h in stores)
    exercise_proxy(cluster)

    # a change of the front door's configuration only (here its overload limit) is
    # reloaded inside the running container (pd_launcher reload), not recreated
    conf = cluster.root / "nodes" / "c1" / "run" / "C" / "nginx.conf"
    assert "limit_conn pd_inflight" not in conf.read_text()
    cluster.playbook("site.yml", "-e", "pd_proxy_max_inflight=64")
    assert "limit_conn pd_inflight 64" in conf.read_text()
    assert _ours(stores["c1"])[0]["Id"] == rolled["c1"], "front door container recreated"
    state = json.loads((cluster.root / "nodes/c1/state/C/launcher.json").read_text())
    assert state["reloads"] >= 1, state
    exercise_proxy(cluster)
    cluster.playbook("site.yml")  # back to no limit: reloaded again

    cluster.playbook("cleanup.yml")
    for host, store in stores.items():
        assert _ours(store) == [], host
    names = {c["Names"][0]: c for c in stores["d1b"].containers()}
    assert {f"pd-{CLUSTER}-d1b-d-old", f"pd-{CLUSTER}x-d1b-d"} <= set(names), names
    assert all(names[n]["State"] == "running"
               for n in (f"pd-{CLUSTER}-d1b-d-old", f"pd-{CLUSTER}x-d1b-d")), names
    assert os.path.exists(f"/proc/{decoy_pid}")
    assert wait_until(lambda: cluster.listening() == [], 10), cluster.listening()
    assert cluster.state_files() == []
    assert list(cluster.root.glob("nodes/*/logs/*/*.log")), "cleanup removed the logs"
    rerun = cluster.playbook("cleanup.yml")
    assert {r["changed"] for r in recap(rerun.stdout).values()} == {0}

    # redeploy on nodes that keep the image: nothing loaded, units come back
    back = cluster.playbook("site.yml")
    assert "changed" not in task_hosts(back.stdout, "Load the image from the tarball")
    exercise_proxy(cluster)
    for host, store in stores.items():
        assert [c["State"] for c in _ours(store)] == ["running"], host
