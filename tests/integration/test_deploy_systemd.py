"""The systemd services of process-runtime units (roles/node_unit/tasks/systemd.yml,
pd_unit_remove's systemd_unit in the cleanup role, docs/systemd.md), for real on a small
emulated cluster (1 P, 1 D, C on 127.0.79.x).

systemd is not PID 1 here, so the role runs with pd_systemd: true, pd_systemd_enable:
false and a temporary pd_systemd_dir per node: the files land with the content
pd_deploy/systemd.py renders, a re-run changes nothing, `systemd-analyze verify`
accepts them, a launcher started the way the unit's ExecStart= says (what systemd does
at boot) is found running by the next site.yml and kept, and cleanup.yml removes the
files that carry our marker line and nothing else. Boot itself is not tested here.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pd_deploy.cli import plan_document
from pd_deploy.inventory import load_inventory
from pd_deploy.systemd import render_unit

from .deploy import REPO, make_cluster, recap, task_hosts, unit_ready, wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"),
                       reason="nginx is not installed (make deps)"),
]

LAYOUT = {"P": [("p1", 1, None, "0")], "D": [("d1", 2, None, "0")], "C": [("c1", 9, None, None)]}
ANALYZE = "/usr/bin/systemd-analyze"
#: the PATH systemd gives a system service (what a launcher started at boot sees)
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _unquote(word: str) -> str:
    return word.replace("$$", "$").replace("%%", "%")


def _boot_start(unit_file: Path) -> subprocess.Popen:
    """Start the launcher as systemd would from the unit file: ExecStart= in
    WorkingDirectory= with only Environment= (and systemd's PATH), its own session."""
    env = {"PATH": SYSTEMD_PATH}
    argv: list[str] = []
    cwd = "/"
    for line in unit_file.read_text().splitlines():
        key, _, value = line.partition("=")
        if key == "Environment":
            k, _, v = _unquote(shlex.split(value)[0]).partition("=")
            env[k] = v
        elif key == "ExecStart":
            argv = [_unquote(w) for w in shlex.split(value)]
        elif key == "WorkingDirectory":
            cwd = value.replace("%%", "%")
    assert argv, unit_file.read_text()
    return subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def test_unit_files_installed_kept_after_a_boot_start_and_removed(tmp_path):
    root = tmp_path / "sd"
    sd_dirs = {h: root / "systemd" / h for _, members in LAYOUT.items() for h, *_ in members}
    for d in sd_dirs.values():
        d.mkdir(parents=True)
    cluster = make_cluster(root, "127.0.79", layout=LAYOUT,
                           extra_vars={"pd_systemd": True, "pd_systemd_enable": False},
                           host_vars={h: {"pd_systemd_dir": str(d)} for h, d in sd_dirs.items()})
    plan = plan_document(*load_inventory(str(cluster.inventory)))
    no_proxy = yaml.safe_load((REPO / "roles/pd_defaults/vars/main.yml").read_text())[
        "pd_no_proxy_env"]
    user = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
    want: dict[Path, str] = {}
    for host, by_unit in plan["specs"].items():
        for spec in by_unit.values():
            unit = render_unit(spec, sys.executable, spec["base_dir"] + "/lib",
                               spec["dirs"]["run"] + "/spec.json", spec["dirs"]["state"],
                               spec["dirs"]["log"], no_proxy, user, plan["units"][host])
            want[sd_dirs[host] / unit["name"]] = unit["content"]
    assert len(want) == 3
    booted = None
    try:
        cluster.playbook("site.yml")
        landed = sorted(p for d in sd_dirs.values() for p in d.iterdir())
        assert landed == sorted(want), landed
        for path, content in want.items():
            assert path.read_text() == content, path
            assert oct(path.stat().st_mode & 0o777) == "0o644", path
        if os.access(ANALYZE, os.X_OK):
            for path in want:
                res = subprocess.run([ANALYZE, "verify", "--man=no", str(path)],
                                     capture_output=True, text=True, timeout=120,
                                     env=dict(os.environ, SYSTEMD_LOG_LEVEL="notice"))
                assert res.returncode == 0 and path.name not in res.stdout + res.stderr, (
                    path, res.stdout, res.stderr)

        again = cluster.playbook("site.yml")
        changed = {h: r["changed"] for h, r in recap(again.stdout).items()}
        assert set(changed.values()) == {0}, changed
        writes = task_hosts(again.stdout, "Write the unit file")
        assert sorted(writes.get("ok", [])) == ["c1", "d1", "p1"], writes

        checked = cluster.playbook("site.yml", "--check")
        writes = task_hosts(checked.stdout, "Write the unit file")
        assert "changed" not in writes and sorted(writes.get("ok", [])) == ["c1", "d1", "p1"]

        # "boot": the P unit's launcher stopped, then started the way systemd starts it
        # from the unit file; the next site.yml finds it running (its state file) and
        # keeps it: same launcher PID, nothing changed
        spec = plan["specs"]["p1"]["P"]
        subprocess.run([sys.executable, "-m", "pd_launcher", "stop", "--state-dir",
                        spec["dirs"]["state"]], cwd=spec["base_dir"] + "/lib", check=True,
                       env=dict(os.environ, PYTHONPATH=spec["base_dir"] + "/lib"),
                       capture_output=True)
        state_file = Path(spec["dirs"]["state"]) / "launcher.json"
        assert wait_until(lambda: not state_file.exists(), 20)
        booted = _boot_start(next(p for p in want if p.parent == sd_dirs["p1"]))
        assert unit_ready(cluster, "p1", "P", 60)
        pid = json.loads(state_file.read_text())["launcher"]["pid"]
        assert pid == booted.pid
        kept = cluster.playbook("site.yml")
        changed = {h: r["changed"] for h, r in recap(kept.stdout).items()}
        assert set(changed.values()) == {0}, changed
        assert json.loads(state_file.read_text())["launcher"]["pid"] == booted.pid
        assert booted.poll() is None

        # cleanup removes the files with our marker line only: d1's has lost it, and a
        # file of another cluster under a name of ours stays too
        d1_file = next(p for p in want if p.parent == sd_dirs["d1"])
        d1_file.write_text("\n".join(d1_file.read_text().splitlines()[1:]) + "\n")
        c1_other = sd_dirs["c1"] / "pd-deploy-t79-unrelated.service"
        c1_other.write_text("# pd-deploy: cluster=other unit=unrelated\n[Unit]\n")
        cluster.playbook("cleanup.yml")
        left = sorted(p for d in sd_dirs.values() for p in d.iterdir())
        assert left == sorted([d1_file, c1_other]), left
        assert booted.wait(30) is not None  # cleanup stopped the "booted" launcher
    finally:
        cluster.playbook("cleanup.yml", check=False)
        if booted is not None and booted.poll() is None:
            os.killpg(booted.pid, signal.SIGTERM)
            booted.wait(30)
