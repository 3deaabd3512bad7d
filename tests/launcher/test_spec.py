"""Spec validation: every error names its field; the CLI exits 2 on a bad spec.
spec_to_dict is parse_spec's inverse. --state-dir/--log-dir/--run-dir move every path
of the spec, for real with the front door's spec of inventories/local."""
from __future__ import annotations

import copy
import json
import shutil
import urllib.request
from pathlib import Path

import pytest

from pd_launcher.launcher.common import LauncherError
from pd_launcher.launcher.spec import SpecError, parse_spec, relocate, spec_to_dict

from .conftest import PY, REPO, free_port, wait_for


def good_spec():
    return {
        "schema": 1, "cluster": "c", "node": "n", "role": "D", "ip": "127.0.1.5",
        "dirs": {"state": "/tmp/s", "log": "/tmp/l"}, "grace_seconds": 2,
        "checks": {"paths": [], "devices": [], "commands": []},
        "nic": {"ip": "127.0.1.5", "name": None, "env": ["GLOO_SOCKET_IFNAME"]},
        "files": [{"path": "/tmp/x.conf", "content": "x", "mode": "0600"}],
        "pre_start": [["true"]],
        "processes": [{
            "name": "engine-dp0", "argv": ["sleep", "1"], "env": {"A": "1"},
            "ports": [{"host": "127.0.1.5", "port": 7100, "use": "api"}],
            "ready": {"type": "http", "url": "http://127.0.1.5:7100/health",
                      "headers": {"Authorization": "Bearer x"}},
        }, {
            "name": "headless", "argv": ["sleep", "1"],
            "ports": [{"host": "127.0.1.5", "port": 36000, "use": "kv"}],
            "ready": {"type": "tcp", "host": "127.0.1.5", "port": 36000},
        }],
        "proxy": None, "some_future_key": {"ignored": True},
    }


def errors_of(spec) -> list:
    with pytest.raises(SpecError) as exc:
        parse_spec(spec, "t.json")
    return exc.value.errors


def test_good_spec_parses():
    spec = parse_spec(good_spec())
    assert [p.name for p in spec.processes] == ["engine-dp0", "headless"]
    assert spec.files[0].mode == 0o600
    assert spec.grace_seconds == 2.0
    assert spec.nic is not None and spec.nic.env == ["GLOO_SOCKET_IFNAME"]
    assert spec.processes[0].ready.headers == {"Authorization": "Bearer x"}
    assert spec.processes[1].ready.port == 36000


@pytest.mark.parametrize("mutate, field", [
    (lambda s: s.update(schema=2), "schema"),
    (lambda s: s.update(role="X"), "role"),
    (lambda s: s.pop("node"), "node"),
    (lambda s: s.update(grace_seconds=-1), "grace_seconds"),
    (lambda s: s.update(processes=[]), "processes"),
    (lambda s: s["processes"][0].update(argv=[]), "processes[0].argv"),
    (lambda s: s["processes"][0].update(argv=["x", 3]), "processes[0].argv[1]"),
    (lambda s: s["processes"][1].update(name="a/b"), "processes[1].name"),
    (lambda s: s["processes"][1].update(name="launcher"), "processes[1].name"),
    (lambda s: s["processes"][1].update(name="engine-dp0"), "processes[1].name"),
    (lambda s: s["processes"][0]["ports"][0].update(port=70000), "processes[0].ports[0].port"),
    (lambda s: s["processes"][0]["ports"][0].update(port="7100"), "processes[0].ports[0].port"),
    (lambda s: s["processes"][0]["ports"][0].pop("host"), "processes[0].ports[0].host"),
    (lambda s: s["processes"][1]["ports"][0].update(port=7100), "processes[1].ports[0]"),
    (lambda s: s["processes"][0]["env"].update(B=1), "processes[0].env.B"),
    (lambda s: s["processes"][0]["ready"].update(type="grpc"), "processes[0].ready.type"),
    (lambda s: s["processes"][0]["ready"].update(url="ftp://x/"), "processes[0].ready.url"),
    (lambda s: s["processes"][1]["ready"].update(port=0), "processes[1].ready.port"),
    (lambda s: s["files"][0].update(path="rel/x"), "files[0].path"),
    (lambda s: s["files"][0].update(mode="rw"), "files[0].mode"),
    (lambda s: s.update(pre_start=[[]]), "pre_start[0]"),
    (lambda s: s["nic"].update(env="GLOO"), "nic.env"),
    (lambda s: s["checks"].update(paths="/models"), "checks.paths"),
    (lambda s: s["dirs"].update(state=5), "dirs.state"),
])
def test_error_names_field(mutate, field):
    spec = good_spec()
    mutate(spec)
    errs = errors_of(spec)
    assert any(e.startswith(field + ":") for e in errs), errs


def test_all_errors_reported_at_once():
    spec = good_spec()
    spec["role"] = "Q"
    spec["processes"][0]["ports"][0]["port"] = 0
    spec["files"][0]["path"] = "x"
    errs = errors_of(spec)
    assert len(errs) == 3, errs


def test_cli_bad_spec_exits_2(node, tmp_path):
    bad = tmp_path / "bad.json"
    spec = good_spec()
    spec["processes"][0]["argv"] = "sleep 1"
    bad.write_text(json.dumps(spec))
    r = node.cli("run", str(bad), "--check")
    assert r.returncode == 2, r.stderr
    assert "processes[0].argv" in r.stderr
    (tmp_path / "notjson.json").write_text("{nope")
    r = node.cli("run", str(tmp_path / "notjson.json"))
    assert r.returncode == 2 and "(json)" in r.stderr
    r = node.cli("run", str(tmp_path / "missing.json"))
    assert r.returncode == 2 and "cannot read node spec" in r.stderr
    r = node.cli("wait", str(bad))  # --timeout missing
    assert r.returncode == 2 and "--timeout" in r.stderr
    r = node.cli("frobnicate")
    assert r.returncode == 2


def test_cli_needs_state_and_log_dirs(node):
    spec = node.spec([{"name": "a", "argv": [PY, "-c", "0"]}])
    spec["dirs"] = {}
    path = node.write_spec(spec)
    r = node.cli("run", str(path), "--check")
    assert r.returncode == 2 and "--state-dir" in r.stderr, r.stderr
    r = node.cli("run", str(path), "--check", "--state-dir", str(node.state_dir),
                 "--log-dir", str(node.log_dir))
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------ the one contract


def test_spec_to_dict_is_the_inverse_of_parse_spec():
    spec = parse_spec(good_spec(), "t.json")
    data = spec_to_dict(spec)
    assert parse_spec(data) == spec
    assert spec_to_dict(parse_spec(data)) == data  # canonical form is a fixed point
    assert data["some_future_key"] == {"ignored": True}  # unknown keys are kept
    assert "raw" not in data and "source" not in data and "extra" not in data
    assert data["files"][0]["mode"] == "0600"
    assert data["processes"][0]["ready"]["headers"] == {"Authorization": "Bearer x"}
    assert "dp_ranks" not in data["processes"][1] and "unit" not in data


def test_service_keys_and_dp_ranks_round_trip():
    raw = dict(good_spec(), role="C", unit="registry", phase="before-engines",
               instance=None, master=False, engine="toy", base_dir="/b")
    raw["processes"][0]["dp_ranks"] = [0, 1]
    spec = parse_spec(raw)
    assert (spec.unit, spec.phase, spec.processes[0].dp_ranks) == (
        "registry", "before-engines", [0, 1])
    assert list(spec_to_dict(spec))[:6] == ["schema", "cluster", "node", "role", "unit",
                                            "phase"]


@pytest.mark.parametrize("mutate, field", [
    (lambda s: s.update(master="yes"), "master"),
    (lambda s: s.update(unit="a b"), "unit"),
    (lambda s: s.update(proxy=[1]), "proxy"),
    (lambda s: s["processes"][0].update(dp_ranks=[-1]), "processes[0].dp_ranks"),
])
def test_new_keys_are_type_checked(mutate, field):
    spec = good_spec()
    mutate(spec)
    assert any(e.startswith(field + ":") for e in errors_of(spec))


# ------------------------------------------------------------ relocation


def moved_spec(**dirs):
    old = {"state": "/x/state/C", "log": "/x/logs/C", "run": "/x/run/C"}
    content = ("access_log /x/logs/C/proxy_access.log; pid /x/run/C/nginx.pid;\n"
               "keep /x/logs/C2/a /y/x/logs/C/b /x/logs/Cx /x/logs/C.bak\n"
               '{"log": "/x/logs/C", "run": "/x/run/C/"}\n')
    spec = parse_spec(dict(
        good_spec(), dirs=old,
        files=[{"path": "/x/run/C/nginx.conf", "content": content, "mode": "0644"}],
        pre_start=[["nginx", "-t", "-p", "/x/run/C/", "-c", "/x/run/C/nginx.conf"]],
        processes=[{"name": "a", "argv": ["serve", "--log=/x/logs/C/a.log"],
                    "env": {"LOGS": "/x/logs/C:/x/state/C", "OTHER": "/x/logs/C2"},
                    "ready": {"type": "http", "url": "http://h:1/x/run/C?d=/x/run/C"}}]))
    return relocate(spec, dirs)


def test_relocate_rewrites_paths_on_boundaries_only():
    spec = moved_spec(log="/n/log", run="/n/run")
    assert spec.dirs == {"state": "/x/state/C", "log": "/n/log", "run": "/n/run"}
    f = spec.files[0]
    assert f.path == "/n/run/nginx.conf"
    assert f.content == (
        "access_log /n/log/proxy_access.log; pid /n/run/nginx.pid;\n"
        "keep /x/logs/C2/a /y/x/logs/C/b /x/logs/Cx /x/logs/C.bak\n"
        '{"log": "/n/log", "run": "/n/run/"}\n')
    assert spec.pre_start == [["nginx", "-t", "-p", "/n/run/", "-c", "/n/run/nginx.conf"]]
    proc = spec.processes[0]
    assert proc.argv == ["serve", "--log=/n/log/a.log"]
    assert proc.env == {"LOGS": "/n/log:/x/state/C", "OTHER": "/x/logs/C2"}
    assert proc.ready.url == "http://h:1/x/run/C?d=/n/run"  # a URL path is no file


def test_relocate_is_one_pass():
    # the new log dir is the old state dir: it must not be moved again to the new state
    spec = moved_spec(state="/n/state", log="/x/state/C")
    assert spec.processes[0].env["LOGS"] == "/x/state/C:/n/state"
    assert spec.dirs["state"] == "/n/state" and spec.dirs["log"] == "/x/state/C"


def test_relocate_without_change_is_identity_and_rejects_unsafe_dirs():
    spec = parse_spec(good_spec())
    assert relocate(spec, {"state": "/tmp/s/", "log": None}) == spec
    with pytest.raises(LauncherError) as exc:
        moved_spec(log="/n/my logs")
    assert exc.value.code == 2 and "--log-dir" in str(exc.value)


def test_check_shows_the_run_dir_following_the_state_dir(node, tmp_path):
    spec = node.spec([{"name": "a", "argv": [PY, "-c", "0"]}],
                     files=[{"path": f"{node.run_dir}/a.conf", "content": "x"}])
    path = node.write_spec(spec)
    new_state = tmp_path / "elsewhere"
    r = node.cli("run", str(path), "--check", "--state-dir", str(new_state))
    assert r.returncode == 0, r.stderr
    assert f"run dir {new_state}/run," in r.stdout
    assert f"would write {new_state}/run/a.conf" in r.stdout
    r = node.cli("run", str(path), "--check", "--state-dir", str(new_state),
                 "--run-dir", str(tmp_path / "r2"))
    assert f"would write {tmp_path}/r2/a.conf" in r.stdout, r.stdout
    # the spec's own directories (what the roles pass) change nothing
    r = node.cli("run", str(path), "--check", "--state-dir", str(node.state_dir),
                 "--log-dir", str(node.log_dir))
    assert f"would write {node.run_dir}/a.conf" in r.stdout, r.stdout


# ------------------------------------------------------------ the C spec, moved, for real


@pytest.fixture(scope="module")
def local_inventory():
    pytest.importorskip("ansible")
    from pd_deploy.inventory import load_inventory

    return load_inventory(str(REPO / "inventories" / "local" / "inventory.yml"))


def c_spec(local_inventory, base: Path):
    """The C spec of inventories/local with its base dir and ports moved to free ones."""
    from pd_deploy.cli import plan_document

    groups, hostvars = copy.deepcopy(local_inventory)
    port = free_port("127.0.1.9")
    admin = free_port("127.0.1.9")
    hostvars["c1"].update(pd_base_dir=str(base), pd_proxy_port=port,
                          pd_proxy_admin_port=admin)
    return plan_document(groups, hostvars)["specs"]["c1"]["C"], port


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
@pytest.mark.parametrize("moved", [("log", "state"), ("log",), ("state",)])
def test_front_door_spec_runs_in_other_directories(node, tmp_path, local_inventory, moved):
    spec, port = c_spec(local_inventory, tmp_path / "base")
    old = {k: Path(v) for k, v in spec["dirs"].items()}
    path = node.write_spec(spec, "c.json")
    flags = []
    for key in moved:
        flags += [f"--{key}-dir", str(tmp_path / f"new-{key}")]
    p = node.start(path, *flags)
    state_dir = tmp_path / "new-state" if "state" in moved else old["state"]
    log_dir = tmp_path / "new-log" if "log" in moved else old["log"]
    run_dir = state_dir / "run" if "state" in moved else old["run"]
    node.wait_running(p, state_dir=state_dir)
    r = node.cli("wait", str(path), "--timeout", "20", "--interval", "0.2", *flags)
    assert r.returncode == 0, r.stdout + r.stderr + node.output(p)
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
            f"http://127.0.1.9:{port}/health", timeout=5) as resp:
        assert resp.status == 200
    agent_cfg = json.loads((run_dir / "proxy_agent.json").read_text())
    assert agent_cfg["access_log"] == str(log_dir / "proxy_access.log")
    assert f"access_log {log_dir}/proxy_access.log" in (run_dir / "nginx.conf").read_text()
    wait_for(lambda: (log_dir / "proxy_access.log").exists(), what="the access log")
    for key in moved:  # nothing lands where the spec said
        assert not old[key].exists(), f"{old[key]} was used"
    if "state" in moved:
        assert not old["run"].exists()
    r = node.cli("stop", "--state-dir", str(state_dir))
    assert r.returncode == 0, r.stderr
    assert p.wait(20) == 0, node.output(p)


def test_a_gate_needs_a_probe_or_a_check_and_round_trips():
    from pd_launcher.launcher.spec import SpecError, parse_spec, spec_to_dict

    base = {"schema": 1, "cluster": "c", "node": "n", "role": "C", "ip": "127.0.0.1",
            "unit": "svc", "phase": "before-engines",
            "processes": [{"name": "p", "argv": ["sleep", "1"]}]}
    with pytest.raises(SpecError) as info:
        parse_spec(dict(base, gate={"what": "nothing to wait for"}))
    assert "gate: needs a ready probe, a check command or both" in str(info.value)
    with pytest.raises(SpecError) as info:
        parse_spec(dict(base, gate={"check": "not an argv"}))
    assert "gate.check" in str(info.value)
    spec = parse_spec(dict(base, gate={"check": ["true"], "what": "w"}))
    assert spec.gate.ready is None and spec.gate.check == ["true"]
    assert parse_spec(spec_to_dict(spec)) == spec
