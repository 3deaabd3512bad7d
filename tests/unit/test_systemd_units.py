"""systemd service units of process-runtime units (pd_deploy/systemd.py, the
pd_systemd_unit filter): names, content, escaping, errors naming host and field, and
`systemd-analyze verify` on the unit of every unit of the local, xllm and FastDeploy
local inventories (offline: systemd need not run; a broken unit must be rejected)."""
from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from ansible.errors import AnsibleFilterError

from pd_deploy import systemd
from pd_deploy.cli import plan_document
from pd_deploy.inventory import load_inventory

REPO = Path(__file__).resolve().parents[2]
INVENTORIES = ("local", "xllm-local", "fastdeploy-local")
ANALYZE = "/usr/bin/systemd-analyze"
NO_PROXY = {"http_proxy": "", "https_proxy": "", "all_proxy": "",
            "HTTP_PROXY": "", "HTTPS_PROXY": "", "ALL_PROXY": ""}


def _filters() -> dict[str, Any]:
    """The filters of plugins/filter/pd_systemd.py, loaded from the file as Ansible does."""
    spec = importlib.util.spec_from_file_location(
        "pd_filter_pd_systemd", REPO / "plugins" / "filter" / "pd_systemd.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.FilterModule().filters()


FILTERS = _filters()


def _spec(**over: Any) -> dict[str, Any]:
    spec = {"cluster": "demo", "node": "p1", "role": "P", "grace_seconds": 10,
            "base_dir": "/var/lib/pd-deploy/demo",
            "dirs": {"run": "/var/lib/pd-deploy/demo/run/P",
                     "state": "/var/lib/pd-deploy/demo/state/P",
                     "log": "/var/lib/pd-deploy/demo/logs/P"},
            "processes": [{"name": "engine", "argv": ["vllm", "serve"],
                           "env": {"HF_TOKEN": "hf_secret", "VLLM_API_KEY": "sk-secret"}}]}
    spec.update(over)
    return spec


def _render(spec: dict[str, Any], python: str = "/usr/bin/python3", **kw: Any
            ) -> dict[str, str]:
    base = spec["base_dir"]
    return systemd.render_unit(spec, python, f"{base}/lib", spec["dirs"]["run"] + "/spec.json",
                               spec["dirs"]["state"], spec["dirs"]["log"],
                               kw.pop("environment", NO_PROXY), **kw)


def _settings(content: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in content.splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def _argv(line: str) -> list[str]:
    """An Exec*= line as systemd runs it (our lines: shell-like quoting, $$ and %%)."""
    return [w.replace("$$", "$").replace("%%", "%") for w in shlex.split(line)]


def test_name_content_and_the_launcher_commands():
    spec = _spec()
    unit = _render(spec, user="root")
    assert unit["name"] == "pd-deploy-demo-P.service"
    text = unit["content"]
    assert text.splitlines()[0] == "# pd-deploy: cluster=demo unit=P" == unit["marker"]
    s = _settings(text)
    assert s["Description"] == ["pd-deploy cluster demo unit P on node p1"]
    assert s["After"] == ["network-online.target"]
    assert s["Wants"] == ["network-online.target"]
    assert s["Type"] == ["simple"] and s["KillMode"] == ["mixed"]
    assert s["Restart"] == ["no"] and s["WantedBy"] == ["multi-user.target"]
    assert s["TimeoutStopSec"] == ["40"]  # grace 10 + pd_launcher stop's 15 s + 15 s
    assert s["User"] == ["root"]
    assert s["WorkingDirectory"] == ["/var/lib/pd-deploy/demo/lib"]
    assert s["ConditionPathExists"] == ["/var/lib/pd-deploy/demo/run/P/spec.json"]
    assert _argv(s["ExecStart"][0]) == [
        "/usr/bin/python3", "-m", "pd_launcher", "run", "/var/lib/pd-deploy/demo/run/P/spec.json",
        "--state-dir", "/var/lib/pd-deploy/demo/state/P",
        "--log-dir", "/var/lib/pd-deploy/demo/logs/P"]
    stop = _argv(s["ExecStop"][0])
    assert stop[:3] == ["/bin/sh", "-c", '[ -z "$MAINPID" ] || exec "$0" "$@"']
    assert stop[3:] == ["/usr/bin/python3", "-m", "pd_launcher", "stop",
                        "--state-dir", "/var/lib/pd-deploy/demo/state/P"]
    env = dict(_argv(v)[0].split("=", 1) for v in s["Environment"])
    assert env == dict(NO_PROXY, PYTHONPATH="/var/lib/pd-deploy/demo/lib")
    # why Restart=no, said inside the unit
    assert "the launcher restarts crashed processes itself" in text


def test_the_specs_environment_and_secrets_never_reach_the_unit():
    text = _render(_spec())["content"]
    for secret in ("hf_secret", "sk-secret", "HF_TOKEN", "VLLM_API_KEY", "vllm"):
        assert secret not in text
    with pytest.raises(systemd.SystemdUnitError, match=r"p1: environment.HF_TOKEN: .*secret"):
        _render(_spec(), environment={"HF_TOKEN": "x"})


def test_stop_timeout_from_grace_seconds_or_the_default():
    assert systemd.stop_timeout({"grace_seconds": 2.5}) == 33
    assert systemd.stop_timeout({}) == 60
    assert systemd.stop_timeout({"grace_seconds": None}) == 60
    assert systemd.stop_timeout({"grace_seconds": True}) == 60


def test_service_units_are_named_by_their_unit_and_start_after_earlier_phases():
    spec = _spec(cluster="xllm-local", node="c1", role="C")
    phases = {"etcd": "before-engines", "xllm-service": "after-engines", "C": "front-door"}
    unit = _render(spec, phases=phases)
    assert unit["name"] == "pd-deploy-xllm-local-C.service"
    assert _settings(unit["content"])["After"] == [
        "network-online.target pd-deploy-xllm-local-etcd.service "
        "pd-deploy-xllm-local-xllm-service.service"]
    etcd = _render(_spec(cluster="xllm-local", node="c1", role="C", unit="etcd"),
                   phases=phases)
    assert etcd["name"] == "pd-deploy-xllm-local-etcd.service"
    assert _settings(etcd["content"])["After"] == ["network-online.target"]


@pytest.mark.parametrize(("cluster", "unit", "name"), [
    ("demo", "P", "pd-deploy-demo-P.service"),
    ("my cluster", "P", "pd-deploy-my\\x20cluster-P.service"),
    ("a/b", "router", "pd-deploy-a\\x2fb-router.service"),
    (".hidden", "x", "pd-deploy-\\x2ehidden-x.service"),
    ("zürich", "D", "pd-deploy-z\\xc3\\xbcrich-D.service"),
    ("c$1%x", "P", "pd-deploy-c\\x241\\x25x-P.service"),
])
def test_odd_names_are_escaped_like_systemd_escape(cluster, unit, name):
    spec = _spec(cluster=cluster, role="C", unit=unit)
    assert systemd.unit_name(spec) == name
    rendered = _render(spec)
    assert rendered["name"] == name
    assert " " not in rendered["marker"].split(": ", 1)[1].replace(" unit=", "")
    if shutil.which("systemd-escape") and "/" not in cluster:
        # '-' is kept (valid in unit names, and the planner's names use it); '/' is
        # \x2f, not systemd-escape's '-' (which would make "a/b" and "a-b" one name)
        want = subprocess.run(["systemd-escape", "--", cluster], capture_output=True,
                              text=True, check=True).stdout.strip()
        assert systemd.escape_name(cluster) == want.replace("\\x2d", "-")


@pytest.mark.parametrize(("over", "field"), [
    ({"cluster": ""}, "cluster"),
    ({"cluster": None}, "cluster"),
    ({"cluster": "a\nb"}, "cluster"),
    ({"cluster": "c" * 250}, "cluster"),
    ({"role": "", "unit": None}, "unit"),
])
def test_bad_names_fail_naming_host_and_field(over, field):
    with pytest.raises(systemd.SystemdUnitError) as err:
        _render(_spec(**over))
    assert str(err.value).startswith(f"p1: {field}: ")


@pytest.mark.parametrize(("kw", "field"), [
    ({"python": ""}, "pd_python"),
    ({"python": "/usr/bin/py\nthon"}, "pd_python"),
    ({"lib_dir": "relative/lib"}, "lib_dir"),
    ({"state_dir": "/x/state "}, "state_dir"),
    ({"user": "bad user"}, "user"),
    ({"environment": {"BAD-KEY": "1"}}, "environment.BAD-KEY"),
    ({"environment": {"A": "x\ny"}}, "environment.A"),
])
def test_bad_inputs_fail_naming_host_and_field(kw, field):
    spec = _spec()
    args = {"python": "/usr/bin/python3", "lib_dir": "/l", "spec_path": "/r/spec.json",
            "state_dir": "/s", "log_dir": "/g", "environment": {}}
    args.update(kw)
    with pytest.raises(systemd.SystemdUnitError) as err:
        systemd.render_unit(spec, **args)
    assert str(err.value).startswith(f"p1: {field}: ")


def test_quoting_of_paths_and_values():
    spec = _spec(base_dir="/srv/my pd/100%",
                 dirs={"run": "/srv/my pd/100%/run/P", "state": "/srv/my pd/100%/state/P",
                       "log": "/srv/$HOME/logs/P"})
    unit = _render(spec, environment={"A": 'x "y" \\z %n'})
    s = _settings(unit["content"])
    assert s["WorkingDirectory"] == ["/srv/my pd/100%%/lib"]
    assert _argv(s["ExecStart"][0])[4:] == ["/srv/my pd/100%/run/P/spec.json", "--state-dir",
                                           "/srv/my pd/100%/state/P", "--log-dir",
                                           "/srv/$HOME/logs/P"]
    assert 'Environment="A=x \\"y\\" \\\\z %%n"' in unit["content"]


def test_pd_systemd_modes():
    wanted = systemd.systemd_wanted
    assert [systemd.systemd_mode(v) for v in ("auto", True, "yes", "False", 0)] == [
        "auto", "true", "true", "false", "false"]
    with pytest.raises(systemd.SystemdUnitError, match="pd_systemd: must be auto"):
        systemd.systemd_mode("sometimes")
    assert wanted("true", {"stat": {"exists": False}}) is True
    assert wanted(False, {"stat": {"exists": True, "isdir": True}}) is False
    assert wanted("auto", {"stat": {"exists": True, "isdir": True}}) is True
    assert wanted("auto", {"stat": {"exists": False}}) is False
    assert wanted("auto", {"skipped": True}) is True  # not looked: the caller looks
    # this sandbox: systemd is not PID 1, so auto installs nothing
    assert wanted("auto", os.path.isdir("/run/systemd/system")) is os.path.isdir(
        "/run/systemd/system")


def test_cleanup_removes_only_files_with_our_marker(tmp_path):
    # pd_unit_remove (cleanup's one module run per unit) removes the unit file only when
    # it carries this unit's marker line; systemd does not run here, so nothing is
    # disabled or reloaded
    from .modharness import load, ok

    mod = load("pd_unit_remove")
    specs = {"P": _spec(), "etcd": _spec(role="C", unit="etcd")}
    files = systemd.unit_files(specs, ["etcd", "P"], str(tmp_path / "units"))
    assert [f["name"] for f in files] == ["pd-deploy-demo-etcd.service",
                                          "pd-deploy-demo-P.service"]
    (tmp_path / "units").mkdir()
    ours, etcd = files[1], files[0]
    (tmp_path / "units" / ours["name"]).write_text(_render(specs["P"])["content"])
    (tmp_path / "units" / etcd["name"]).write_text(
        "[Unit]\nDescription=not ours\n# pd-deploy: cluster=demo\n")
    base = tmp_path / "pd"
    for unit in ("P", "etcd"):
        (base / "run" / unit).mkdir(parents=True)
    r = ok(mod, {"base_dir": str(base), "unit": "etcd", "systemd_unit": etcd})
    assert r["systemd_removed"] is False and (tmp_path / "units" / etcd["name"]).exists()
    # another cluster's file of the same name is not ours either
    other = dict(ours, marker=systemd.marker(_spec(cluster="other")))
    r = ok(mod, {"base_dir": str(base), "unit": "P", "systemd_unit": other})
    assert r["systemd_removed"] is False and (tmp_path / "units" / ours["name"]).exists()
    (base / "run" / "P").mkdir(parents=True)
    r = ok(mod, {"base_dir": str(base), "unit": "P", "systemd_unit": ours})
    assert r["systemd_removed"] is True and r["changed"]
    assert not (tmp_path / "units" / ours["name"]).exists()
    r = ok(mod, {"base_dir": str(base), "unit": "P", "systemd_unit": ours})  # gone: nothing
    assert r["systemd_removed"] is False


def test_filters_are_thin_and_fail_as_ansible_errors():
    spec = _spec()
    got = FILTERS["pd_systemd_unit"](spec, "/usr/bin/python3", "/var/lib/pd-deploy/demo/lib",
                                     "/var/lib/pd-deploy/demo/run/P/spec.json",
                                     "/var/lib/pd-deploy/demo/state/P",
                                     "/var/lib/pd-deploy/demo/logs/P", NO_PROXY)
    assert got == _render(spec)
    assert {"name", "content"} <= set(got)
    with pytest.raises(AnsibleFilterError, match=r"p1: cluster: must be a non-empty"):
        FILTERS["pd_systemd_unit"](_spec(cluster=""), "/p", "/l", "/s", "/t", "/g")
    with pytest.raises(AnsibleFilterError, match="pd_systemd: must be auto"):
        FILTERS["pd_systemd_wanted"]("maybe")
    assert FILTERS["pd_systemd_mode"](True) == "true"
    files = FILTERS["pd_systemd_files"]({"P": spec}, ["P"], "/etc/systemd/system")
    assert files[0]["name"] == "pd-deploy-demo-P.service"


# --- systemd-analyze verify -------------------------------------------------------------

needs_analyze = pytest.mark.skipif(not os.access(ANALYZE, os.X_OK),
                                   reason=f"{ANALYZE} is not installed (systemd)")


def verify(directory: Path, *names: str) -> subprocess.CompletedProcess:
    """`systemd-analyze verify` offline (systemd need not be PID 1): our files only,
    no man page lookups; warnings about our files count as failures (caller)."""
    env = dict(os.environ, SYSTEMD_LOG_LEVEL="notice", SYSTEMD_LOG_COLOR="0",
               SYSTEMD_PAGER="", SYSTEMD_UNIT_PATH=f"{directory}:")
    return subprocess.run([ANALYZE, "verify", "--man=no",
                           *(str(directory / n) for n in names)],
                          capture_output=True, text=True, env=env, timeout=120, check=False)


def local_units(tmp_path: Path) -> list[tuple[str, dict[str, str]]]:
    """Every unit of the three local inventories, rendered with this Python (so that
    ExecStart names an executable that exists) and the role's environment."""
    out = []
    for inv in INVENTORIES:
        plan = plan_document(*load_inventory(str(REPO / "inventories" / inv / "inventory.yml")))
        for host, by_unit in plan["specs"].items():
            for name, spec in by_unit.items():
                # the spec's base_dir may not exist here: a temp one per unit, so that
                # verify also checks WorkingDirectory= and the other paths
                base = tmp_path / "nodes" / inv / host
                for sub in ("lib", f"run/{name}", f"state/{name}", f"logs/{name}"):
                    (base / sub).mkdir(parents=True, exist_ok=True)
                unit = systemd.render_unit(
                    spec, sys.executable, str(base / "lib"), str(base / f"run/{name}/spec.json"),
                    str(base / f"state/{name}"), str(base / f"logs/{name}"), NO_PROXY,
                    "root", plan["units"][host])
                out.append((f"{inv}/{host}/{name}", unit))
    return out


@needs_analyze
def test_every_local_unit_passes_systemd_analyze_verify(tmp_path):
    units = local_units(tmp_path)
    assert len(units) == 6 + 6 + 4
    # units of different inventories and hosts share names: one directory per unit
    for where, unit in units:
        d = tmp_path / "units" / where.replace("/", "_")
        d.mkdir(parents=True)
        (d / unit["name"]).write_text(unit["content"])
        res = verify(d, unit["name"])
        ours = [line for line in (res.stdout + res.stderr).splitlines()
                if unit["name"] in line or str(d) in line]
        assert res.returncode == 0 and ours == [], (where, res.returncode, res.stdout,
                                                     res.stderr, unit["content"])


@needs_analyze
@pytest.mark.parametrize(("breakage", "expect"), [
    (("ExecStart=", "ExecStart=/nonexistent/python3 "), "is not executable"),
    (("Type=simple", "Type=simple\nExecStart=/bin/true"), "more than one ExecStart"),
    (("Type=simple", "Type=simpel"), "Failed to parse service type"),
])
def test_systemd_analyze_verify_rejects_a_broken_unit(tmp_path, breakage, expect):
    where, unit = local_units(tmp_path)[0]
    old, new = breakage
    content = unit["content"].replace(old, new, 1)
    assert content != unit["content"]
    d = tmp_path / "broken"
    d.mkdir()
    (d / unit["name"]).write_text(content)
    res = verify(d, unit["name"])
    out = res.stdout + res.stderr
    assert expect in out, out
    # what the passing test requires: rc 0 and no line about the unit
    assert res.returncode != 0 or any(unit["name"] in line or str(d) in line
                                      for line in out.splitlines()), out
