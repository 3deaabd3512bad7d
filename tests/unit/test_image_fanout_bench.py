"""bench/image_fanout/run.py without podman (issue 16, item 3; figures: bench/README.md):
the padded image tarball is a consistent docker-archive, the benchmark's inventory is a
valid plan, the timing, targets and README section are computed as documented."""
from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import tarfile
from pathlib import Path

import pytest

from pd_deploy.containers import fanout
from pd_deploy.inventory import load_inventory
from pd_deploy.topology import build_plan
from tests.fixtures.podman_env import tarball_image_id

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_image_fanout",
                                               REPO / "bench" / "image_fanout" / "run.py")
assert _spec and _spec.loader
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


def _base_archive(path: Path) -> Path:
    """A tiny docker-archive as `podman save --format docker-archive` writes it."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as lt:
        _member(lt, "etc/hello", b"hello\n")
    layer_b = layer.getvalue()
    layer_hex = hashlib.sha256(layer_b).hexdigest()
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer_hex}"]},
                         "history": [{"created_by": "import"}]}).encode()
    config_hex = hashlib.sha256(config).hexdigest()
    with tarfile.open(path, "w") as tf:
        _member(tf, f"{layer_hex}.tar", layer_b)
        _member(tf, f"{config_hex}.json", config)
        _member(tf, "manifest.json", json.dumps([{
            "Config": f"{config_hex}.json", "RepoTags": ["localhost/base:1"],
            "Layers": [f"{layer_hex}.tar"]}]).encode())
        _member(tf, "repositories", b"{}")
    return path


def test_padded_tarball_is_a_consistent_docker_archive(tmp_path):
    base = _base_archive(tmp_path / "base.tar")
    out = bench.padded_tarball(base, 1, tmp_path / "pad.tar", "localhost/pad:1m")
    with tarfile.open(out) as tf:
        manifest = json.load(tf.extractfile("manifest.json"))
        assert len(manifest) == 1 and manifest[0]["RepoTags"] == ["localhost/pad:1m"]
        config_b = tf.extractfile(manifest[0]["Config"]).read()
        config = json.loads(config_b)
        # the image ID is the config's sha256; each layer's sha256 is its diff_id
        assert manifest[0]["Config"] == hashlib.sha256(config_b).hexdigest() + ".json"
        layers = [tf.extractfile(name).read() for name in manifest[0]["Layers"]]
        assert config["rootfs"]["diff_ids"] == [
            "sha256:" + hashlib.sha256(b).hexdigest() for b in layers]
        assert len(layers) == 2 and len(config["history"]) == 2
        with tarfile.open(fileobj=io.BytesIO(layers[1])) as pad:
            data = pad.extractfile("pd-bench-pad/random.bin").read()
        assert len(data) == 1 << 20 and len(set(data)) == 256  # random, not zeros
        assert "repositories" not in tf.getnames()
    assert tarball_image_id(out) == "sha256:" + manifest[0]["Config"][:-5]
    # same size, same image (the cache and repeated runs agree); another size differs
    again = bench.padded_tarball(base, 1, tmp_path / "again.tar", "localhost/pad:1m")
    assert tarball_image_id(again) == tarball_image_id(out)
    other = bench.padded_tarball(base, 2, tmp_path / "other.tar", "localhost/pad:2m")
    assert tarball_image_id(other) != tarball_image_id(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "again.tar", "base.tar", "other.tar", "pad.tar"]  # no temporary files left


@pytest.mark.parametrize("n", [2, 5, 16])
def test_inventory_is_a_valid_plan_with_n_container_nodes(tmp_path, n):
    inv, stores = bench.inventory(tmp_path, n, tmp_path / "img.tar", "localhost/x:1", None)
    groups, hostvars = load_inventory(str(inv), {})
    plan = build_plan(groups, hostvars)
    assert len(groups["P"]) + len(groups["D"]) == n and groups["C"] == ["c1"]
    assert sorted(stores) == sorted(groups["P"] + groups["D"])
    ips = {plan.nodes[h].ip for h in stores}
    assert len(ips) == n and all(ip.startswith("127.0.75.") for ip in ips)
    for h, store in stores.items():  # one podman store per node
        assert hostvars[h]["pd_container_cli_args"] == store.cli_args
        assert hostvars[h]["pd_runtime"] == "container"
    assert len({tuple(s.cli_args) for s in stores.values()}) == n
    assert hostvars["c1"]["pd_runtime"] == "process"  # holds the lock, needs no image
    assert "pd_image_fanout" not in hostvars["c1"]
    inv2, _ = bench.inventory(tmp_path / "k", n, tmp_path / "img.tar", "localhost/x:1", 2)
    assert load_inventory(str(inv2), {})[1]["p01"]["pd_image_fanout"] == 2


def test_rounds_the_role_plans_for_the_benchmark_sizes():
    rounds = {n: len(fanout({f"h{i}": "t" for i in range(n)}, 4)["rounds"])
              for n in (2, 4, 8, 16)}
    assert rounds == {2: 1, 4: 1, 8: 2, 16: 2}
    out = "TASK [image : Show the fan-out]\nok: [localhost] =>\n  msg:\n  - 'p01: x.tar copied " \
          "from the controller'\n  - 'round 1: p01 -> p02, p03'\n  - 'round 2: p01 -> d01'\n"
    assert bench.rounds_in(out) == 2 and bench.rounds_in("nothing") == 0


def test_durations_per_play_and_task():
    events = [["play", "A", "", 0.0], ["task", "A", "image : t1", 1.0],
              ["task", "A", "image : t2", 3.0], ["play", "B", "", 6.0],
              ["task", "B", "t1", 6.5], ["task", "B", "t1", 7.0], ["end", "", "", 9.0]]
    plays, tasks = bench.durations(events)
    assert plays == {"A": 6.0, "B": 3.0}
    assert tasks == [("A", "image : t1", 2.0), ("A", "image : t2", 3.0), ("B", "t1", 0.5),
                     ("B", "t1", 2.0)]
    assert bench.task_sums(tasks, "A") == {"t1": 2.0, "t2": 3.0}  # role prefix dropped
    assert bench.task_sums(tasks, "B") == {"t1": 2.5}              # repeated: summed


def _point(n: int, fan: float, naive: float, second: float) -> dict:
    return {"n": n, "rounds": 1, "expected_rounds": 1, "fanout_width": 4,
            "fanout": {"wall_s": fan + 5, "image_play_s": fan, "transfer_s": fan / 2,
                       "load_s": fan / 2, "other_s": 0.0, "fetch_s": 1.0},
            "second": {"wall_s": second + 3, "image_play_s": second},
            "naive": {"wall_s": naive + 1, "play_s": naive, "copy_s": naive / 2,
                      "load_s": naive / 2, "other_s": 0.0}}


META = {"date": "2026-12-04", "machine": "x86_64, 2 cores", "podman": "4.3.1", "forks": 20,
        "image_desc": "test", "tarball_mib": 334.0, "load_before": 1.0, "load_after": 2.0,
        "wall_s": 60.0}


def test_targets_and_markdown():
    good = [_point(2, 10, 9, 4), _point(4, 12, 14, 4.1), _point(8, 15, 25, 4.2),
            _point(16, 20, 50, 4.5)]
    tg = bench.targets(good)
    assert tg["sublinear"]["met"] and tg["sublinear"]["time_ratio"] == 2.0
    assert tg["beats_naive_from_4"]["met"]
    assert abs(tg["slope_s_per_node"]["second"] - 0.034) < 0.01
    md = bench.markdown(META, good, tg)
    assert "| 16 | 20.0 | 50.0 | 1.25 | 3.12 | 4.5 | 0.28 | 1 |" in md
    assert "(< 8: met;" in md and "from N = 4: met" in md and "NOT met" not in md
    bad = [_point(2, 10, 9, 4), _point(4, 22, 20, 4), _point(16, 90, 80, 5)]
    tg = bench.targets(bad)
    assert not tg["sublinear"]["met"] and not tg["beats_naive_from_4"]["met"]
    md = bench.markdown(META, bad, tg)
    assert "(< 8: NOT met;" in md and "from N = 4: NOT met" in md
    assert "shared" in md and "load average 1.0" in md


def test_write_readme_inserts_before_faults_then_replaces(tmp_path, monkeypatch):
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\n## Deploy\n\nd\n\n## Faults\n\nf\n")
    monkeypatch.setattr(bench, "README", readme)
    bench.write_readme("first\n")
    assert readme.read_text() == ("# Benchmarks\n\n## Deploy\n\nd\n\n## Image fan-out\n\n"
                                  "first\n\n## Faults\n\nf\n")
    bench.write_readme("second\n")
    assert readme.read_text() == ("# Benchmarks\n\n## Deploy\n\nd\n\n## Image fan-out\n\n"
                                  "second\n\n## Faults\n\nf\n")
    readme.write_text("# Benchmarks\n\n## Deploy\n\nd\n")
    bench.write_readme("x\n")
    assert readme.read_text() == "# Benchmarks\n\n## Deploy\n\nd\n\n## Image fan-out\n\nx\n"


def test_link_model_and_reading():
    # busiest link, in tarball transfers: the seed's copy + per round the most fetchers
    # of one holder; the naive copy needs N through the controller's uplink
    assert {n: bench.link_units(n, 4) for n in (2, 4, 8, 16, 64)} == {
        2: 2, 4: 4, 8: 6, 16: 8, 64: 11}
    assert {n: bench.link_units(n, 1) for n in (2, 4, 8, 16)} == {2: 2, 4: 3, 8: 4, 16: 5}
    text = bench.reading([_point(2, 10, 9, 4), _point(16, 20, 50, 4.5)])
    flat = " ".join(text.split())
    assert text.startswith("Reading it:") and "N = 16: 16 vs 8" in flat
    assert "fan-out 96 s" in flat  # 8 units of 12 s
