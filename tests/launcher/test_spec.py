"""Spec validation: every error names its field; the CLI exits 2 on a bad spec."""
from __future__ import annotations

import json

import pytest

from pd_launcher.launcher.spec import SpecError, parse_spec

from .conftest import PY


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
