"""pd_runtime: container with docker, for real, with the image from a registry and
from a tarball.

Three emulated nodes on 127.0.40.x (P on p1, D on d1, the front door on c1), each with
its own dockerd (docker.io 20.10, tests/fixtures/docker_env.py), and a docker-registry
2.8 on 127.0.41.1 holding the test image. One cluster, six playbook runs (CI time):

1. site with pd_image=<registry>/pd-test:1 and no pd_image_tarball on nodes without
   the image: every node pulls (registry access log), units run -> requests through
   the proxy;
2. site again: changed=0 on every host, the same containers, no request to the
   registry (pull policy "missing");
3. decoys on d1; `docker kill` of d1's engine container -> status (docker's ps) shows
   it exited(137);
4. site with pd_image_pull_policy=always: every node asks the registry again (no
   change: same image ID), p1 and c1 report changed=0 with the same containers, d1's
   exited container is recreated (the converge check);
5. cleanup: only this cluster's labelled containers go; the decoys survive;
6. site again, now from the tarball (pd_image=localhost/pd-test:bookworm): copied to
   one node, fetched node to node over HTTP, loaded by `docker load` -> requests.

The podman cycle (test_deploy_container.py) covers the same ground on six nodes with
podman; runtime-neutral checks (check mode, a second cleanup) are not repeated here.

Needs root, docker.io + docker-registry (.ci/setup-docker.sh; `make test` installs
them) and the test image (.ci/build-test-image.sh, cached in var/images/).
"""
from __future__ import annotations

import json
import time

import pytest

from tests.fixtures.docker_env import (
    DockerNode,
    Registry,
    destroy_all,
    docker_missing,
    registry_missing,
    start_all,
)
from tests.fixtures.podman_env import TEST_IMAGE, ensure_test_image, tarball_image_id

from .deploy import (
    Cluster,
    exercise_proxy,
    make_cluster,
    pid_alive,
    port_open,
    recap,
    start_decoy,
    status_rows,
    task_hosts,
    wait_until,
)

MISSING = docker_missing() or registry_missing()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.docker,
    pytest.mark.skipif(MISSING is not None, reason=str(MISSING)),
]

SUBNET = "127.0.40"
CLUSTER = "t40"  # make_cluster: t<last octet of the subnet>
REGISTRY_ADDR = "127.0.41.1"
LAYOUT = {
    "P": [("p1", 1, None, "0")],
    "D": [("d1", 4, None, "0,1")],
    "C": [("c1", 9, None, None)],
}
HOSTS = sorted(h for members in LAYOUT.values() for h, *_ in members)
DECOYS = (f"pd-{CLUSTER}-d1-d-old", f"pd-{CLUSTER}x-d1-d")
PULL = "Pull the image from its registry"


def _ours(node: DockerNode) -> list[dict]:
    return node.containers(label=f"pd.cluster={CLUSTER}")


def _ids(nodes: dict[str, DockerNode]) -> dict[str, str]:
    return {h: _ours(n)[0]["Id"] for h, n in nodes.items()}


def _changed(stdout: str) -> dict[str, int]:
    return {h: r["changed"] for h, r in recap(stdout).items()}


class Clock:
    """Wall time of each phase, printed at the end (pytest -rP shows it)."""

    def __init__(self) -> None:
        self.t = time.monotonic()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.laps[name] = round(now - self.t, 1)
        self.t = now


def test_docker_runtime_registry_and_tarball(tmp_path):
    clock = Clock()
    tarball = ensure_test_image()
    image_id = tarball_image_id(tarball).split(":", 1)[1]
    root = tmp_path / "dk"
    nodes = {h: DockerNode(root / "nodes" / h) for h in HOSTS}
    registry = Registry(root / "registry", REGISTRY_ADDR)
    cluster = decoy = None
    done = False
    try:
        clock.laps["dockerd x3 start"] = round(start_all(nodes.values()), 1)
        registry.start()
        clock.lap("test bed up")
        ref = _publish(registry, nodes["p1"], tarball, image_id)
        clock.lap("registry push")
        cluster = make_cluster(
            root, SUBNET, runtime="container", layout=LAYOUT,
            host_vars={h: n.ansible_vars() for h, n in nodes.items()},
            extra_vars={"pd_python": "python3",  # the image's; the host's for `wait`
                        "pd_image": ref, "pd_image_tarball": ""})
        decoy = start_decoy(["-m", "pd_launcher.emulator", "serve", "/models/demo",
                             "--host", cluster.hosts["d1"], "--port", "7100"])
        _pull_and_serve(cluster, nodes, registry, ref, image_id, clock)
        _rerun_changes_nothing(cluster, nodes, registry, clock)
        ids = _kill_and_look(cluster, nodes, ref, clock)
        _converge_with_pull_always(cluster, nodes, registry, ids, clock)
        _cleanup_spares_decoys(cluster, nodes, decoy.pid, clock)
        _site_from_the_tarball(cluster, nodes, tarball, image_id, clock)
        assert decoy.poll() is None, "a playbook killed a process it did not start"
        done = True
    finally:
        if decoy is not None:
            decoy.kill()
            decoy.wait()
        if cluster is not None and not done:
            cluster.playbook("cleanup.yml", check=False)
        destroy_all(nodes.values())  # rm -f every container left, stop the dockerds
        registry.destroy()
        clock.lap("teardown")
        print(f"docker test bed timings (s): {clock.laps}")
    assert not any(n.exec_root.exists() or n.base.exists() for n in nodes.values())


def _publish(registry: Registry, node: DockerNode, tarball, image_id: str) -> str:
    """Load the test image on one node, push it, then remove it there again: at the
    start no node has the image."""
    assert node.load(tarball, TEST_IMAGE) == image_id
    ref = registry.push(node, TEST_IMAGE, "pd-test:1")
    node.docker("rmi", TEST_IMAGE)
    assert registry.catalog() == ["pd-test"] and registry.tags("pd-test") == ["1"]
    return ref


def _pulls(registry: Registry) -> tuple[int, int]:
    """(manifest HEADs of the tag, blob GETs) in the registry's access log so far."""
    return (len(registry.requests("HEAD", "/v2/pd-test/manifests/1")),
            len(registry.requests("GET", "/v2/pd-test/blobs/")))


def _pull_and_serve(cluster: Cluster, nodes: dict[str, DockerNode], registry: Registry,
                    ref: str, image_id: str, clock: Clock) -> None:
    for host, node in nodes.items():
        assert node.image_id(ref) is None and node.image_id(TEST_IMAGE) is None, host
    heads, blobs = _pulls(registry)
    first = cluster.playbook("site.yml")
    clock.lap("site from the registry (3 pulls, 3 containers)")
    assert "answered 200" in first.stdout  # the proxy role's smoke request
    assert sorted(task_hosts(first.stdout, PULL).get("changed", [])) == HOSTS
    assert "Load the image from the tarball" not in first.stdout  # no tarball, no fan-out
    for host, node in nodes.items():
        assert node.image_id(ref) == image_id, host  # push + pull keep the image ID
        units = _ours(node)
        assert [(u["State"], u["Image"]) for u in units] == [("running", ref)], (host, units)
        assert units[0]["Labels"]["pd.node"] == host
        assert len(units[0]["Labels"]["pd.spec-sha256"]) == 64
    # each node asked for the tag and fetched the blobs (config and layer) itself
    now_heads, now_blobs = _pulls(registry)
    assert now_heads - heads == len(HOSTS), registry.requests("HEAD", "/v2/")
    assert now_blobs - blobs >= 2 * len(HOSTS), registry.requests("GET", "/v2/")
    exercise_proxy(cluster)


def _rerun_changes_nothing(cluster: Cluster, nodes: dict[str, DockerNode],
                           registry: Registry, clock: Clock) -> None:
    """site.yml again, nothing changed: changed=0 everywhere, the same containers, and
    no node asks the registry for the image (pull policy "missing")."""
    ids, pulls = _ids(nodes), _pulls(registry)
    again = cluster.playbook("site.yml")
    clock.lap("site again, nothing to do")
    assert set(_changed(again.stdout).values()) == {0}, _changed(again.stdout)
    assert _ids(nodes) == ids
    assert _pulls(registry) == pulls


def _kill_and_look(cluster: Cluster, nodes: dict[str, DockerNode], ref: str,
                   clock: Clock) -> dict[str, str]:
    """Decoys on d1, then docker kill its engine: restart policy "no" leaves it
    exited, and status (docker's ps output) says so. Returns the container IDs."""
    ids = _ids(nodes)
    d1 = nodes["d1"]
    # a container with a look-alike name and no labels; one of another cluster with
    # our unit's node and role labels
    d1.run_detached(DECOYS[0], ref, ["sleep", "900"])
    d1.run_detached(DECOYS[1], ref, ["sleep", "900"],
                    labels={"pd.cluster": f"{CLUSTER}x", "pd.node": "d1", "pd.role": "D"})
    d1.docker("kill", f"pd-{CLUSTER}-d1-d")
    assert wait_until(lambda: not port_open(cluster.hosts["d1"], 7100))
    rows = status_rows(cluster.playbook("status.yml").stdout)
    clock.lap("decoys, docker kill, status")
    assert len(rows) == len(HOSTS), rows
    assert rows["d1/D"][4] == "exited(137)" and rows["d1/D"][5].startswith("0/"), rows["d1/D"]
    for key in ("p1/P", "c1/C"):
        assert rows[key][4] == "running", (key, rows[key])
        ready, total = rows[key][5].split("/")
        assert ready == total, (key, rows[key])
        assert rows[key][-1] == ref and rows[key][-2] != "-", (key, rows[key])
    return ids


def _converge_with_pull_always(cluster: Cluster, nodes: dict[str, DockerNode],
                               registry: Registry, ids: dict[str, str], clock: Clock) -> None:
    heads, _ = _pulls(registry)
    run = cluster.playbook("site.yml", "-e", json.dumps({"pd_image_pull_policy": "always"}))
    clock.lap("site, pull policy always (converges d1)")
    changed = _changed(run.stdout)
    assert changed["d1"] > 0 and {changed[h] for h in ("localhost", "p1", "c1")} == {0}, changed
    assert sorted(task_hosts(run.stdout, PULL).get("ok", [])) == HOSTS  # asked, no new ID
    assert _pulls(registry)[0] - heads == len(HOSTS)
    assert "is exited (exit code 137)" in run.stdout
    now = _ids(nodes)
    assert now["d1"] != ids["d1"] and [u["State"] for u in _ours(nodes["d1"])] == ["running"]
    assert {h: now[h] for h in ("p1", "c1")} == {h: ids[h] for h in ("p1", "c1")}


def _cleanup_spares_decoys(cluster: Cluster, nodes: dict[str, DockerNode], decoy_pid: int,
                           clock: Clock) -> None:
    cluster.playbook("cleanup.yml")
    clock.lap("cleanup")
    for host, node in nodes.items():
        assert _ours(node) == [], host
    names = {c["Names"][0]: c["State"] for c in nodes["d1"].containers()}
    assert {n: names.get(n) for n in DECOYS} == dict.fromkeys(DECOYS, "running"), names
    assert pid_alive(decoy_pid), "cleanup killed a process it did not start"
    assert wait_until(lambda: cluster.listening() == [], 10), cluster.listening()
    assert cluster.state_files() == []
    assert list(cluster.root.glob("nodes/*/logs/*/*.log")), "cleanup removed the logs"


def _site_from_the_tarball(cluster: Cluster, nodes: dict[str, DockerNode], tarball,
                           image_id: str, clock: Clock) -> None:
    """Site again, with pd_image=localhost/pd-test:bookworm from the tarball: no node
    has that name, so it is copied to p1 and fetched by d1 and c1 from p1 over HTTP."""
    back = cluster.playbook("site.yml", "-e", json.dumps(
        {"pd_image": TEST_IMAGE, "pd_image_tarball": str(tarball)}))
    clock.lap("site again from the tarball (fan-out, 3 loads, 3 containers)")
    copied = task_hosts(back.stdout, "Copy the tarball from the controller to the seed node")
    assert copied.get("changed") == ["p1"], copied
    fetched = task_hosts(back.stdout, "Fetch the tarball from its holder and verify its sha256")
    assert sorted(fetched.get("changed", [])) == ["c1", "d1"], fetched
    loaded = task_hosts(back.stdout, "Load the image from the tarball")
    assert sorted(loaded.get("changed", [])) == HOSTS, loaded
    assert "changed" not in task_hosts(back.stdout, PULL)
    for host, node in nodes.items():
        assert node.image_id(TEST_IMAGE) == image_id, host
        units = _ours(node)
        assert [(u["State"], u["Image"]) for u in units] == [("running", TEST_IMAGE)], host
    assert list(cluster.root.glob("nodes/*/images/*")) == [], "tarballs left on the nodes"
    names = {c["Names"][0]: c["State"] for c in nodes["d1"].containers()}
    assert all(names.get(n) == "running" for n in DECOYS), names
    exercise_proxy(cluster)
