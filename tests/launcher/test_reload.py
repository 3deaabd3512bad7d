"""`pd_launcher reload` (SIGUSR1 to the launcher): real launcher, real processes on
127.0.78.x. A spec that changed only in `files` is applied without a restart: the files
are written, only processes with a `reload_signal` get it, every PID stays; any other
difference is refused (exit 3) and changes nothing; a crash-restart after a reload
starts the set with the new files."""
from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import pytest

from .conftest import HUP_READER, PY, free_port, has_line, pid_alive, wait_for

pytestmark = pytest.mark.slow  # real child processes

HOST = "127.0.78.1"


# reports any of the reload signals it gets (it must get none)
WATCHER = (
    "import signal, socket, sys, time\n"
    "s = socket.socket()\n"
    "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind((sys.argv[1], int(sys.argv[2])))\n"
    "s.listen()\n"
    "def h(n, f):\n"
    "    print('GOT', n, flush=True)\n"
    "for n in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):\n"
    "    signal.signal(n, h)\n"
    "print('watching', flush=True)\n"
    "while True:\n"
    "    time.sleep(1)\n"
)


def reload_spec(node, content: str, port: int, **over) -> dict:
    conf = node.run_dir / "conf.txt"
    spec = node.spec([
        {"name": "agent", "argv": [PY, "-u", "-c", HUP_READER, str(conf)], "env": {},
         "ports": [], "ready": None, "reload_signal": "HUP"},
        {"name": "other", "argv": [PY, "-u", "-c", WATCHER, HOST, str(port)], "env": {},
         "ports": [{"host": HOST, "port": port, "use": "api"}],
         "ready": {"type": "tcp", "host": HOST, "port": port}},
    ], files=[{"path": str(conf), "content": content + "\n", "mode": "0644"}], **over)
    return spec


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pids(st: dict) -> list:
    return [st["launcher"]["pid"]] + [p["pid"] for p in st["processes"]]


def start(node, spec: dict):
    path = node.write_spec(spec)
    p = node.start(path)
    st = node.wait_running(p)
    wait_for(lambda: has_line(node.log_dir / "agent.log", "up gen1"), what="agent up")
    wait_for(lambda: has_line(node.log_dir / "other.log", "watching"), what="other up")
    return path, p, st


def test_reload_writes_files_and_signals_only_reload_signal_processes(node):
    port = free_port(HOST)
    path, p, st = start(node, reload_spec(node, "gen1", port))
    assert st["spec_sha256"] == sha(path)
    assert (st["reloads"], st["reload_failures"], st["reload_error"]) == (0, 0, None)

    extra = node.run_dir / "sub" / "extra.conf"
    spec = reload_spec(node, "gen2", port)
    spec["files"].append({"path": str(extra), "content": "x", "mode": "0600"})
    node.write_spec(spec)
    r = node.cli("reload", str(path), "--state-dir", str(node.state_dir))
    assert r.returncode == 0, (r.stdout, r.stderr, node.output(p))
    assert r.stdout.startswith("reloaded (reload 1): spec sha256 "), r.stdout
    assert "signalled agent" in r.stdout

    assert (node.run_dir / "conf.txt").read_text() == "gen2\n"
    assert extra.read_text() == "x" and extra.stat().st_mode & 0o777 == 0o600
    wait_for(lambda: has_line(node.log_dir / "agent.log", "HUP gen2"), what="agent HUP")
    after = node.state()
    assert pids(after) == pids(st) and all(pid_alive(x) for x in pids(after))
    assert after["status"] == "running" and p.poll() is None
    assert after["reloads"] == 1 and after["last_reload"] >= st["updated_at"]
    assert after["spec_sha256"] == sha(path) != st["spec_sha256"]
    assert after["last_reload_signaled"] == ["agent"]
    assert (after["reload_failures"], after["reload_error"]) == (0, None)
    # the process without reload_signal got nothing (give a stray signal time to land)
    wait_for(lambda: "reload 1 done" in (node.log_dir / "launcher.log").read_text())
    assert not [x for x in (node.log_dir / "other.log").read_text().splitlines()
                if x.startswith("GOT")]

    # the same spec again: a reload is idempotent (files rewritten, signal sent again)
    r = node.cli("reload", str(path))  # --state-dir defaults to the spec's dirs.state
    assert r.returncode == 0, r.stderr
    assert node.state()["reloads"] == 2 and pids(node.state()) == pids(st)


def test_a_change_beyond_files_is_refused_and_changes_nothing(node):
    port = free_port(HOST)
    path, p, st = start(node, reload_spec(node, "gen1", port))
    conf = node.run_dir / "conf.txt"

    spec = reload_spec(node, "gen2", port)
    spec["processes"][1]["argv"].append("--more")
    spec["grace_seconds"] = 7
    node.write_spec(spec)
    r = node.cli("reload", str(path), "--state-dir", str(node.state_dir))
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert "processes[1].argv differs" in r.stderr and "grace_seconds differs" in r.stderr
    assert r.stderr.rstrip().endswith("restart needed"), r.stderr
    now = node.state()
    assert conf.read_text() == "gen1\n"
    assert pids(now) == pids(st) and all(pid_alive(x) for x in pids(now))
    assert (now["reloads"], now["reload_failures"]) == (0, 1)
    assert now["reload_restart_needed"] is True
    assert "processes[1].argv differs" in now["reload_error"]
    assert now["spec_sha256"] == st["spec_sha256"] and now["status"] == "running"
    assert not [x for x in (node.log_dir / "agent.log").read_text().splitlines()
                if x.startswith("HUP")]

    # a reload_signal added to a process is a process change too
    spec = reload_spec(node, "gen2", port)
    spec["processes"][1]["reload_signal"] = "USR1"
    node.write_spec(spec)
    r = node.cli("reload", str(path))
    assert r.returncode == 3 and "processes[1].reload_signal differs" in r.stderr, r.stderr

    # an invalid spec: exit 1 (a restart would not help), nothing signalled
    bad = reload_spec(node, "gen2", port)
    bad["processes"][0]["reload_signal"] = "KILL"
    node.write_spec(bad)
    r = node.cli("reload", str(path))
    assert r.returncode == 1 and "processes[0].reload_signal" in r.stderr, r.stderr
    assert node.state()["reload_failures"] == 2  # refused by the command, not the launcher

    # fixed: the next reload goes through and clears the error
    node.write_spec(reload_spec(node, "gen2", port))
    r = node.cli("reload", str(path))
    assert r.returncode == 0, r.stderr
    now = node.state()
    assert (now["reloads"], now["reload_failures"], now["reload_error"]) == (1, 2, None)
    assert now["reload_restart_needed"] is False and conf.read_text() == "gen2\n"
    assert pids(now) == pids(st)


def test_a_crash_restart_after_a_reload_uses_the_new_files(node):
    port = free_port(HOST)
    restart = {"policy": "on-failure", "max": 5, "window_s": 600, "backoff_s": 0.2,
               "backoff_max_s": 1}
    path, p, st = start(node, reload_spec(node, "gen1", port, restart=restart))
    node.write_spec(reload_spec(node, "gen2", port, restart=restart))
    r = node.cli("reload", str(path))
    assert r.returncode == 0, r.stderr
    conf = node.run_dir / "conf.txt"
    conf.write_text("tampered\n")  # the restart writes the files from the reloaded spec
    agent_pid = st["processes"][0]["pid"]
    os.kill(agent_pid, signal.SIGKILL)

    def restarted():
        now = node.state()
        return (now if now and now["status"] == "running" and now.get("restarts") == 1
                and now["processes"][0]["pid"] != agent_pid else None)

    now = wait_for(restarted, 20, what="the set restarted")
    assert conf.read_text() == "gen2\n"
    wait_for(lambda: has_line(node.log_dir / "agent.log", "up gen2"), what="agent restarted")
    assert now["reloads"] == 1 and now["spec_sha256"] == sha(path)
    assert now["launcher"]["pid"] == st["launcher"]["pid"]


def test_reload_without_a_live_launcher_or_of_another_spec_exits_1(node):
    port = free_port(HOST)
    spec = reload_spec(node, "gen1", port)
    path = node.write_spec(spec)
    r = node.cli("reload", str(path), "--timeout", "2")
    assert r.returncode == 1 and "no launcher runs on" in r.stderr, r.stderr
    p = node.start(path)
    node.wait_running(p)
    other = node.write_spec(spec, name="other.json")
    r = node.cli("reload", str(other))
    assert r.returncode == 1 and f"runs {path}, not {other}" in r.stderr, r.stderr
    # a state file whose launcher is gone (and no lock holder): nothing is signalled
    p.send_signal(signal.SIGTERM)
    p.wait(15)
    st = json.loads(json.dumps({"schema": 1, "status": "running", "spec": str(path),
                                "launcher": {"pid": 999999, "start_time": 1,
                                             "cmdline": ["x"]}, "processes": [],
                                "spec_sha256": "0"}))
    (node.state_dir / "launcher.json").write_text(json.dumps(st))
    r = node.cli("reload", str(path))
    assert r.returncode == 1 and "no live launcher" in r.stderr, r.stderr
    (node.state_dir / "launcher.json").unlink()
