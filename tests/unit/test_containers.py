"""Container runtime, controller side: run argv, keep/recreate decisions, docker and
podman JSON, docker-archive image IDs, the tarball fan-out, the status table rows,
and the filter plugin that exposes them to Ansible."""
from __future__ import annotations

import importlib.util
import io
import json
import tarfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pd_deploy import containers as c
from pd_deploy.cli import plan_document
from pd_deploy.status_table import unit_row

from .planfix import small

REPO = Path(__file__).resolve().parents[2]
SETTINGS = {"cli": "podman", "cli_args": ["--root", "/s"], "name": "pd-t-d1-d",
            "image": "reg/vllm:1", "spec_path": "/b/run/D/spec.json", "lib": "/b/lib",
            "python": "python3", "restart": "on-failure:3", "shm_size": "64g",
            "extra_args": ["--ulimit", "memlock=-1"], "labels": {"pd.spec-sha256": "ab"}}


def specs(engine: str = "vllm-ascend", **extra) -> dict:
    return plan_document(*small(engine, **extra))["specs"]


def pairs(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_run_argv_ascend_engine_has_devices_driver_mounts_and_the_model():
    spec = specs()["d1"]["D"]
    argv = c.run_argv(spec, dict(SETTINGS, present=["/usr/bin/hccn_tool"]))
    assert argv[:6] == ["podman", "--root", "/s", "run", "--detach", "--name"]
    assert pairs(argv, "--label") == ["pd.cluster=t", "pd.node=d1", "pd.role=D",
                                      "pd.spec-sha256=ab"]
    assert pairs(argv, "--network") == ["host"] and "--init" in argv
    assert pairs(argv, "--restart") == ["on-failure:3"]
    assert pairs(argv, "--stop-timeout") == [str(spec["grace_seconds"] + c.STOP_MARGIN_S)]
    assert pairs(argv, "--shm-size") == ["64g"]
    assert pairs(argv, "--device") == ["/dev/davinci0", "/dev/davinci1",
                                       "/dev/davinci_manager", "/dev/devmm_svm", "/dev/hisi_hdc"]
    vols = pairs(argv, "--volume")
    for d in spec["dirs"].values():
        assert f"{d}:{d}" in vols
    assert "/b/lib:/b/lib:ro" in vols
    assert "/models/m:/models/m:ro" in vols
    for path in c.ASCEND_MOUNTS + ("/usr/bin/hccn_tool",):
        assert f"{path}:{path}:ro" in vols
    assert not any(v.startswith(spec["base_dir"] + ":") for v in vols), "no whole base dir"
    assert argv[argv.index("--ulimit") + 1] == "memlock=-1"
    tail = argv[argv.index("reg/vllm:1"):]
    assert tail == ["reg/vllm:1", "python3", "-m", "pd_launcher", "run", "/b/run/D/spec.json",
                    "--state-dir", spec["dirs"]["state"], "--log-dir", spec["dirs"]["log"]]
    assert pairs(argv, "--env") == ["PYTHONPATH=/b/lib"]


def test_run_argv_xllm_gets_the_npus_driver_mounts_and_hccn_conf_once():
    from .test_xllm_plan import DELETE, mutate, two_host

    doc = plan_document(*mutate(two_host(), device_ips=DELETE))  # hccn mode: it is a check
    spec = doc["specs"]["p2"]["P"]
    assert "/etc/hccn.conf" in spec["checks"]["paths"]
    argv = c.run_argv(spec, SETTINGS)
    assert pairs(argv, "--device") == [f"/dev/davinci{d}" for d in range(8)] + [
        "/dev/davinci_manager", "/dev/devmm_svm", "/dev/hisi_hdc"]
    vols = pairs(argv, "--volume")
    assert vols.count("/etc/hccn.conf:/etc/hccn.conf:ro") == 1
    for path in c.ASCEND_MOUNTS:
        assert f"{path}:{path}:ro" in vols
    assert "/models/q:/models/q:ro" in vols
    # etcd and the service run in the C host's container without accelerators
    svc = c.run_argv(doc["specs"]["c1"]["etcd"], SETTINGS)
    assert "--device" not in svc and "--shm-size" not in svc


def test_run_argv_hccn_tool_only_when_present():
    argv = c.run_argv(specs()["d1"]["D"], SETTINGS)
    assert "/usr/bin/hccn_tool:/usr/bin/hccn_tool:ro" not in pairs(argv, "--volume")


def test_run_argv_gpus_per_cli():
    spec = specs("vllm")["p1"]["P"]
    podman = c.run_argv(spec, SETTINGS)
    assert pairs(podman, "--device") == ["nvidia.com/gpu=all"] and "--gpus" not in podman
    docker = c.run_argv(spec, dict(SETTINGS, cli="docker", cli_args=[]))
    assert pairs(docker, "--gpus") == ["all"] and "--device" not in docker
    assert docker[:3] == ["docker", "run", "--detach"]


def test_run_argv_emulator_and_proxy_get_no_devices():
    s = specs("emulator", pd_emulate="vllm-ascend")
    for spec in (s["p1"]["P"], s["c1"]["C"]):
        argv = c.run_argv(spec, SETTINGS)
        assert "--device" not in argv and "--gpus" not in argv
        assert not any("Ascend" in v for v in pairs(argv, "--volume"))
    proxy = c.run_argv(s["c1"]["C"], SETTINGS)
    # engine-only knobs: shm, extra args; the njs module path is in the image
    assert "--shm-size" not in proxy and "--ulimit" not in proxy
    assert not any(".so" in v for v in pairs(proxy, "--volume"))
    assert pairs(proxy, "--label")[:3] == ["pd.cluster=t", "pd.node=c1", "pd.role=C"]


def test_run_argv_needs_the_basics():
    with pytest.raises(c.ContainerError, match="settings.image"):
        c.run_argv(specs()["p1"]["P"], dict(SETTINGS, image=""))
    with pytest.raises(c.ContainerError, match="extra_args"):
        c.run_argv(specs()["p1"]["P"], dict(SETTINGS, extra_args="--privileged"))


def test_run_sha256_follows_how_the_container_runs_not_its_labels():
    spec = specs()["p1"]["P"]
    base = c.run_sha256(spec, SETTINGS)
    assert base == c.run_sha256(spec, dict(SETTINGS, labels={"pd.spec-sha256": "other"}))
    for change in ({"image": "reg/vllm:2"}, {"restart": "no"}, {"shm_size": "1g"},
                   {"extra_args": []}, {"cli_args": []}):
        assert c.run_sha256(spec, dict(SETTINGS, **change)) != base, change


def test_name_labels_filters():
    spec = specs()["d2"]["D"]
    assert c.container_name(spec) == "pd-t-d2-d"
    assert c.label_filters(spec) == ["--filter", "label=pd.cluster=t", "--filter",
                                     "label=pd.node=d2", "--filter", "label=pd.role=D"]
    assert c.stop_timeout(spec) == spec["grace_seconds"] + c.STOP_MARGIN_S
    assert c.host_paths(spec) == list(c.ASCEND_MOUNTS)
    assert c.host_paths(specs("vllm")["d2"]["D"]) == []


def test_node_unit_names_its_container_with_the_filter():
    paths = (REPO / "roles/node_unit/tasks/paths.yml").read_text()
    assert "pd_unit_container: \"{{ pd_unit_spec_now | pd_container_name }}\"" in paths


TOY = "tests.fixtures.toy_backend:ToyBackend"


@pytest.fixture
def toy(monkeypatch):
    """The toy backend (one service per phase) registered for this test only."""
    from pd_deploy import engines, settings

    monkeypatch.setenv(engines.EXTRA_ENV, TOY)
    monkeypatch.setattr(settings, "_DEFAULTS", None)  # default_of caches the registry's
    engines.reset()
    yield plan_document(*small("toy"))["specs"]
    monkeypatch.delenv(engines.EXTRA_ENV)
    engines.reset()


def test_service_units_have_their_own_name_and_pd_unit_label(toy):
    reg, door = toy["c1"]["registry"], toy["c1"]["C"]
    assert c.unit_name(reg) == "registry" and c.unit_name(door) == "C"
    assert c.container_name(reg) == "pd-t-c1-registry"
    assert c.container_name(door) == "pd-t-c1-c"
    assert c.unit_labels(reg) == {"pd.cluster": "t", "pd.node": "c1", "pd.role": "C",
                                  "pd.unit": "registry"}
    assert "pd.unit" not in c.unit_labels(door)  # P, D and C keep the labels they had
    assert c.label_filters(reg)[-2:] == ["--filter", "label=pd.unit=registry"]
    argv = c.run_argv(reg, dict(SETTINGS, name="pd-t-c1-registry"))
    assert "pd.unit=registry" in pairs(argv, "--label")
    assert "--shm-size" not in argv and "--device" not in argv and "--ulimit" not in argv
    vols = pairs(argv, "--volume")
    assert all(f"{d}:{d}" in vols for d in reg["dirs"].values())
    assert not any(d.endswith("/C") for v in vols for d in v.split(":")[:1])


def test_unit_containers_keep_exactly_the_units_own(toy):
    ps = json.dumps([
        {"Id": "1", "Names": ["pd-t-c1-c"], "State": "running",
         "Labels": {"pd.cluster": "t", "pd.node": "c1", "pd.role": "C"}},
        {"Id": "2", "Names": ["pd-t-c1-registry"], "State": "running",
         "Labels": {"pd.cluster": "t", "pd.node": "c1", "pd.role": "C", "pd.unit": "registry"}},
        {"Id": "3", "Names": ["pd-t-c1-router"], "State": "exited",
         "Labels": {"pd.cluster": "t", "pd.node": "c1", "pd.role": "C", "pd.unit": "router"}},
        {"Id": "4", "Names": ["other"], "State": "running",
         "Labels": {"pd.cluster": "u", "pd.node": "c1", "pd.role": "C"}},
    ])
    assert [x["id"] for x in c.unit_containers(ps, toy["c1"]["C"])] == ["1"]
    assert [x["id"] for x in c.unit_containers(ps, toy["c1"]["registry"])] == ["2"]
    assert [x["id"] for x in c.unit_containers(ps, toy["c1"]["router"])] == ["3"]


def test_decide_a_service_container_is_not_the_front_doors(toy):
    door = dict(c.unit_labels(toy["c1"]["C"]), **{"pd.spec-sha256": "s"})
    reg = dict(c.unit_labels(toy["c1"]["registry"]), **{"pd.spec-sha256": "s"})
    inspect = podman_inspect(labels=reg)
    assert c.decide(inspect, {"labels": reg})["action"] == "keep"
    out = c.decide(inspect, {"labels": door})
    assert out["action"] == "foreign" and "'pd.unit': 'registry'" in out["reason"]
    assert c.decide(podman_inspect(labels=door), {"labels": reg})["action"] == "foreign"


def test_status_rows_of_services(toy):
    ps = c.parse_ps(json.dumps([
        {"Id": "2", "Names": ["pd-t-c1-registry"], "Image": "img:1", "State": "running",
         "Labels": {"pd.role": "C", "pd.unit": "registry"}, "StartedAt": 100},
        {"Id": "1", "Names": ["pd-t-c1-c"], "Image": "img:1", "State": "exited", "ExitCode": 1,
         "Labels": {"pd.role": "C"}, "StartedAt": 50},
    ]))
    unit = {"processes": [{"name": "registry", "ready": True}], "now": 160}
    row = unit_row("c1", "registry", toy["c1"]["registry"], unit, ps, "container")
    assert (row["role"], row["state"], row["uptime"], row["ports"], row["instance"]) == (
        "registry", "running", "1m00s", "7300", "-")
    assert unit_row("c1", "router", toy["c1"]["router"], None, ps, "container")["state"] == "absent"
    assert unit_row("c1", "C", toy["c1"]["C"], None, ps, "container")["state"] == "exited(1)"
    proc = unit_row("c1", "router", toy["c1"]["router"],
                    {"recorded": True, "running": True, "uptime_s": 5,
                     "processes": [{"name": "router", "alive": True, "ready": True}]},
                    [], "process")
    assert (proc["role"], proc["state"], proc["health"], proc["ports"]) == (
        "router", "running", "1/1 ready", "7301")


# ------------------------------------------------------------------ inspect / ps

LABELS = {"pd.cluster": "t", "pd.node": "d1", "pd.role": "D", "pd.spec-sha256": "s1",
          "pd.launcher-sha256": "l1", "pd.run-sha256": "r1"}


def podman_inspect(status="running", labels=None, image="a" * 64, code=0) -> str:
    return json.dumps([{"Id": "c" * 64, "Name": "pd-t-d1-d", "Image": image,
                        "ImageName": "reg/vllm:1",
                        "State": {"Status": status, "Running": status == "running",
                                  "ExitCode": code},
                        "Config": {"Labels": labels if labels is not None else LABELS}}])


def docker_inspect(status="running", image="sha256:" + "a" * 64) -> str:
    return json.dumps([{"Id": "c" * 64, "Name": "/pd-t-d1-d", "Image": image,
                        "State": {"Status": status, "ExitCode": 0},
                        "Config": {"Image": "reg/vllm:1", "Labels": LABELS}}])


WANT = {"labels": LABELS, "image_id": "sha256:" + "a" * 64}


@pytest.mark.parametrize("text,action,reason", [
    ("", "create", "no container"),
    ("[]", "create", "no container"),
    ("Error: no such container", "create", "no container"),
    (podman_inspect(), "keep", "up to date"),
    (docker_inspect(), "keep", "up to date"),
    (podman_inspect(status="exited", code=137), "recreate", "exited (exit code 137)"),
    (podman_inspect(labels=dict(LABELS, **{"pd.spec-sha256": "s0"})), "recreate",
     "changed: pd.spec-sha256"),
    (podman_inspect(labels={k: v for k, v in LABELS.items() if k != "pd.run-sha256"}),
     "recreate", "changed: pd.run-sha256"),
    (podman_inspect(image="b" * 64), "recreate", "image changed: bbbbbbbbbbbb -> aaaaaaaaaaaa"),
    (podman_inspect(labels={}), "foreign", "exists with labels"),
    (podman_inspect(labels=dict(LABELS, **{"pd.cluster": "other"})), "foreign", "'other'"),
])
def test_decide(text, action, reason):
    out = c.decide(text, WANT)
    assert out["action"] == action and reason in out["reason"], out


def test_decide_foreign_even_when_stopped():
    # a stopped container of that name that is not ours is never removed
    out = c.decide(podman_inspect(status="exited", labels={"app": "x"}), WANT)
    assert out["action"] == "foreign"


def test_decide_without_image_id_does_not_compare_images():
    assert c.decide(podman_inspect(image="b" * 64), dict(WANT, image_id=""))["action"] == "keep"


PODMAN_PS = json.dumps([
    {"Id": "1" * 64, "Names": ["pd-t-d1-d"], "Image": "localhost/pd-test:bookworm",
     "ImageID": "a" * 64, "Labels": {"pd.role": "D"}, "State": "running",
     "Status": "Up 6 seconds ago", "StartedAt": 1795221541, "ExitCode": 0},
    {"Id": "2" * 64, "Names": ["pd-t-c1-c"], "Image": "localhost/pd-test:bookworm",
     "ImageID": "a" * 64, "Labels": {"pd.role": "C"}, "State": "exited",
     "Status": "Exited (137) 2 seconds ago", "StartedAt": 1795221544, "ExitCode": 137},
])
DOCKER_PS = "\n".join(json.dumps(x) for x in [
    {"ID": "1abc", "Names": "pd-t-d1-d", "Image": "reg/vllm:1", "Labels": "pd.role=D,pd.node=d1",
     "State": "running", "Status": "Up 5 minutes"},
])
# `docker ps --all --format '{{json .}}'` of docker.io 20.10.24 (Debian 12), verbatim
# but for the command: one object per line, labels as one string, no ExitCode, no
# StartedAt, no ImageID, a short ID
DOCKER_20_PS = (
    '{"Command":"\\"python3 -m pd_laun…\\"","CreatedAt":"2026-12-04 05:04:02 +0000 UTC",'
    '"ID":"16001412687b","Image":"localhost/pd-test:bookworm","Labels":"pd.cluster=t40,'
    'pd.node=d1,pd.role=D,pd.test-image=bookworm","LocalVolumes":"0","Mounts":"/tmp/dk1",'
    '"Names":"pd-t40-d1-d","Networks":"host","Ports":"","RunningFor":"About a minute ago",'
    '"Size":"0B (virtual 129MB)","State":"exited","Status":"Exited (137) 1 second ago"}\n'
    '{"Command":"\\"python3 -m pd_laun…\\"","CreatedAt":"2026-12-04 05:05:19 +0000 UTC",'
    '"ID":"adb463992b22","Image":"127.0.41.1:5000/pd-test:1","Labels":"pd.cluster=t40,'
    'pd.node=d1,pd.role=C","LocalVolumes":"0","Mounts":"","Names":"pd-t40-d1-c",'
    '"Networks":"host","Ports":"","RunningFor":"19 seconds ago","Size":"0B (virtual 129MB)",'
    '"State":"running","Status":"Up Less than a second"}\n')


def test_parse_ps_podman_and_docker():
    p = c.parse_ps(PODMAN_PS)
    assert [x["name"] for x in p] == ["pd-t-d1-d", "pd-t-c1-c"]
    assert p[0]["started_at"] == 1795221541 and p[1]["exit_code"] == 137
    assert p[0]["image_id"] == "a" * 64
    d = c.parse_ps(DOCKER_PS)
    assert d == [{"id": "1abc", "name": "pd-t-d1-d", "image": "reg/vllm:1", "image_id": "",
                  "labels": {"pd.role": "D", "pd.node": "d1"}, "state": "running",
                  "status": "Up 5 minutes", "started_at": None, "exit_code": None}]
    assert c.parse_ps("") == [] and c.parse_ps("[]") == []


def test_parse_ps_docker_20_10():
    exited, running = c.parse_ps(DOCKER_20_PS)
    assert (exited["id"], exited["name"], exited["state"], exited["exit_code"]) == (
        "16001412687b", "pd-t40-d1-d", "exited", 137)
    assert exited["labels"] == {"pd.cluster": "t40", "pd.node": "d1", "pd.role": "D",
                                "pd.test-image": "bookworm"}
    assert (running["image"], running["exit_code"], running["started_at"]) == (
        "127.0.41.1:5000/pd-test:1", None, None)
    assert c.parse_ps(json.dumps({"Status": "Exited (-1) 3 hours ago"}))[0]["exit_code"] == -1


def test_ps_argv_asks_both_clis_for_json_the_same_way():
    # docker 20.10 has no `--format json` keyword: it prints the word "json" per container
    argv = c.ps_argv(["docker", "-H", "unix:///s.sock"], ["--filter", "label=pd.node=d1"])
    assert argv == ["docker", "-H", "unix:///s.sock", "ps", "--all", "--format", "{{json .}}",
                    "--filter", "label=pd.node=d1"]
    assert c.ps_argv(["podman"])[-2:] == ["--format", "{{json .}}"]
    with pytest.raises(c.ContainerError, match="filters"):
        c.ps_argv(["docker"], "--filter label=x")


def test_roles_list_containers_with_ps_argv():
    for path in ("roles/node_unit/tasks/stop_container.yml", "roles/status/tasks/main.yml"):
        text = (REPO / path).read_text()
        assert "pd_container_ps_argv" in text and "'--format', 'json'" not in text, path


def test_status_rows_show_container_state_uptime_and_image():
    s = specs("emulator")
    ps = c.parse_ps(PODMAN_PS)
    unit = {"processes": [{"name": "engine-dp2", "ready": True},
                          {"name": "engine-dp3", "ready": True}], "now": 1795221541 + 75}
    row = unit_row("d1", "D", s["d1"]["D"], unit, ps, "container")
    assert (row["state"], row["uptime"], row["image"]) == (
        "running", "1m15s", "localhost/pd-test:bookworm")
    assert row["health"] == "2/2 ready"
    row = unit_row("c1", "C", s["c1"]["C"], {"processes": []}, ps, "container")
    assert (row["state"], row["uptime"]) == ("exited(137)", "-")
    row = unit_row("p1", "P", s["p1"]["P"], None, ps, "container")
    assert (row["state"], row["image"]) == ("absent", "-")
    docker20 = c.parse_ps(DOCKER_20_PS)
    row = unit_row("d1", "D", s["d1"]["D"], None, docker20[:1], "container")
    assert (row["state"], row["uptime"]) == ("exited(137)", "-")
    row = unit_row("c1", "C", s["c1"]["C"], None, docker20[1:], "container")
    assert (row["state"], row["uptime"], row["image"]) == (
        "running", "0s", "127.0.41.1:5000/pd-test:1")
    docker = unit_row("d1", "D", s["d1"]["D"], None, c.parse_ps(DOCKER_PS), "container")
    assert (docker["state"], docker["uptime"], docker["image"]) == ("running", "5m", "reg/vllm:1")


# ------------------------------------------------------------------ tarballs


def make_archive(path: Path, config: str, tags: list[str], images: int = 1) -> Path:
    manifest = [{"Config": config, "RepoTags": tags, "Layers": ["l.tar"]}] * images
    with tarfile.open(path, "w") as tf:
        for name, data in (("l.tar", b"x" * 10), ("manifest.json", json.dumps(manifest).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_archive_info_podman_and_docker_layouts(tmp_path):
    hexid = "5" * 64
    a = make_archive(tmp_path / "a.tar", f"{hexid}.json", ["localhost/x:1"])
    assert c.archive_info(a) == {"id": hexid, "tags": ["localhost/x:1"]}
    b = make_archive(tmp_path / "b.tar", f"blobs/sha256/{hexid}", ["x:1"])  # docker >= 25
    assert c.archive_info(b)["id"] == hexid


def test_archive_info_errors(tmp_path):
    with pytest.raises(c.ContainerError, match="cannot read"):
        c.archive_info(tmp_path / "missing.tar")
    oci = tmp_path / "oci.tar"
    with tarfile.open(oci, "w") as tf:
        info = tarfile.TarInfo("index.json")
        tf.addfile(info, io.BytesIO(b""))
    with pytest.raises(c.ContainerError, match="docker-archive"):
        c.archive_info(oci)
    two = make_archive(tmp_path / "two.tar", "1.json", ["a:1"], images=2)
    with pytest.raises(c.ContainerError, match="one image per"):
        c.archive_info(two)


def test_archive_info_of_the_test_image_matches_the_fixture():
    fixtures = pytest.importorskip("tests.fixtures.podman_env")
    tar = fixtures.default_image_tarball()
    if not tar.exists():
        pytest.skip("test image not built")
    assert "sha256:" + c.archive_info(tar)["id"] == fixtures.tarball_image_id(tar)


def test_fanout_one_seed_then_rounds_spread_over_holders():
    needs = {h: "/t/img.tar" for h in ("a", "b", "c", "d", "e", "f", "g")}
    needs["x"] = ""
    plan = c.fanout(needs, 2)
    assert plan["seeds"] == {"a": "/t/img.tar"}
    assert plan["rounds"] == [{"b": "a", "c": "a"}, {"d": "a", "e": "b", "f": "c", "g": "a"}]
    assert plan["summary"][0] == "a: img.tar copied from the controller"
    assert plan["summary"][2] == "round 2: a -> d, g; b -> e; c -> f"


def test_fanout_width_zero_is_a_star_and_nothing_needed_is_empty():
    plan = c.fanout({"a": "/t", "b": "/t", "c": "/t"}, 0)
    assert plan["rounds"] == [{"b": "a", "c": "a"}]
    assert c.fanout({"a": "", "b": None}, 4) == {
        "seeds": {}, "rounds": [], "summary": ["every node already has its image"]}
    with pytest.raises(c.ContainerError):
        c.fanout({"a": "/t"}, -1)


def test_fanout_two_tarballs_two_seeds():
    plan = c.fanout({"p1": "/p.tar", "d1": "/d.tar", "p2": "/p.tar", "d2": "/d.tar"}, 4)
    assert plan["seeds"] == {"p1": "/p.tar", "d1": "/d.tar"}
    assert plan["rounds"] == [{"p2": "p1", "d2": "d1"}]


@given(n=st.integers(1, 80), width=st.integers(0, 6))
def test_fanout_properties(n, width):
    hosts = [f"h{i}" for i in range(n)]
    plan = c.fanout({h: "/t" for h in hosts}, width)
    assert list(plan["seeds"]) == ["h0"]
    have = {"h0"}
    for assign in plan["rounds"]:
        assert set(assign.values()) <= have, "a holder must have the file already"
        if width:
            for holder in set(assign.values()):
                assert list(assign.values()).count(holder) <= width
        assert not set(assign) & have
        have |= set(assign)
    assert have == set(hosts)
    if width and n > 1:
        # every round at least multiplies the holders by (width + 1) until all are done
        assert len(plan["rounds"]) <= 1 + int(__import__("math").log(n, width + 1) + 1e-9)


# ------------------------------------------------------------------ the filter plugin


def load_filters():
    spec = importlib.util.spec_from_file_location(
        "pd_container_filter", REPO / "plugins" / "filter" / "pd_container.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.FilterModule().filters()


def test_filter_plugin_names_and_errors():
    from ansible.errors import AnsibleFilterError

    f = load_filters()
    assert {"pd_container_run_argv", "pd_container_run_sha256", "pd_container_decide",
            "pd_container_ps", "pd_container_ps_argv", "pd_container_unit_ps",
            "pd_container_labels",
            "pd_container_label_filters",
            "pd_container_name", "pd_container_host_paths", "pd_container_optional_paths",
            "pd_container_stop_timeout", "pd_image_id", "pd_image_archive",
            "pd_image_fanout_plan"} <= set(f)
    assert f["pd_image_id"]("sha256:" + "a" * 64) == "a" * 64
    with pytest.raises(AnsibleFilterError, match="pd_container_run_argv"):
        f["pd_container_run_argv"](specs()["p1"]["P"], {})
    with pytest.raises(AnsibleFilterError, match="pd_image_archive"):
        f["pd_image_archive"]("/nonexistent/x.tar")


def test_spec_label_of_a_reloadable_unit_leaves_out_what_a_reload_applies():
    import hashlib
    import json

    from pd_deploy.containers import reloadable, spec_sha256

    engine = {"processes": [{"name": "e"}], "files": [{"path": "/x", "content": "1"}]}
    canon = hashlib.sha256((json.dumps(engine, indent=2, sort_keys=True) + "\n").encode())
    assert not reloadable(engine)
    assert spec_sha256(engine) == canon.hexdigest()  # the spec file's own checksum
    assert spec_sha256(engine) != spec_sha256(dict(engine, files=[]))
    door = {"processes": [{"name": "proxy-agent", "reload_signal": "HUP"}],
            "files": [{"path": "/x", "content": "1"}], "proxy": {"decode": ["a:1"]}}
    assert reloadable(door)
    assert spec_sha256(door) == spec_sha256(dict(door, files=[], proxy={"decode": []}))
    assert spec_sha256(door) != spec_sha256(dict(door, processes=[
        {"name": "proxy-agent", "reload_signal": "HUP", "argv": ["x"]}]))
