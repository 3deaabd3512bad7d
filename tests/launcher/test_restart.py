"""`run` with a restart policy (spec `restart`, issue 14 "Recovery"): real processes.

A process that exits on its own gets the whole set stopped and, with `on-failure`,
started again after a backoff (status `restarting`); after `max` restarts within the
window the unit is left failed (exit 1), as with `never`. A stop signal during the
backoff ends the launcher at once. `wait` keeps waiting through a restart.
"""
from __future__ import annotations

import signal
import subprocess
import time

import pytest

from .conftest import (
    HTTP_SERVER,
    PY,
    TERM_MARKER,
    free_port,
    has_line,
    pid_alive,
    py_env,
    py_proc,
    wait_for,
)

pytestmark = pytest.mark.slow  # real child processes

HOST = "127.0.74.1"

# Exits with code 3 the first time (it leaves a marker), runs for good afterwards.
CRASH_ONCE = (
    "import os, sys, time\n"
    "marker = sys.argv[1]\n"
    "if not os.path.exists(marker):\n"
    "    open(marker, 'w').write('crashed')\n"
    "    print('crashing on purpose', flush=True)\n"
    "    time.sleep(float(sys.argv[2]))\n"
    "    sys.exit(3)\n"
    "print('up for good', flush=True)\n"
    "while True:\n"
    "    time.sleep(1)\n"
)

ALWAYS_CRASH = "import sys, time\nprint('crash', flush=True)\ntime.sleep(0.3)\nsys.exit(5)"


def restart(policy: str = "on-failure", max_: int = 5, backoff_s: float = 1.0,
            backoff_max_s: float = 30.0, window_s: float = 600.0) -> dict:
    return {"policy": policy, "max": max_, "window_s": window_s, "backoff_s": backoff_s,
            "backoff_max_s": backoff_max_s}


def crash_once(node, delay: float = 0.5) -> dict:
    return {**py_proc("crasher", CRASH_ONCE),
            "argv": [PY, "-u", "-c", CRASH_ONCE, str(node.tmp / "crashed"), str(delay)]}


def http_proc(name: str, port: int) -> dict:
    return {**py_proc(name, HTTP_SERVER, ports=[(HOST, port)]),
            "argv": [PY, "-u", "-c", HTTP_SERVER, HOST, str(port)],
            "ready": {"type": "http", "url": f"http://{HOST}:{port}/health"}}


def wait_status(node, p: subprocess.Popen, status: str, timeout: float = 20.0) -> dict:
    def seen():
        st = node.state()
        if st and st.get("status") == status and st["launcher"]["pid"] == p.pid:
            return st
        if p.poll() is not None:
            raise AssertionError(f"launcher exited {p.returncode}:\n{node.output(p)}")
        return None

    return wait_for(seen, timeout, interval=0.02, what=f"launcher status {status}")


def test_crash_once_restarts_the_whole_set_after_the_backoff(node):
    port = free_port(HOST)
    spec = node.spec([http_proc("web", port), crash_once(node)], restart=restart())
    p = node.start(node.write_spec(spec))
    first = node.wait_running(p)
    web_pid = first["processes"][0]["pid"]
    assert first["restarts"] == 0 and first["restart_policy"] == "on-failure"

    during = wait_status(node, p, "restarting")
    seen_restarting = time.monotonic()
    assert during["restarts"] == 1
    assert during["last_failure"]["process"] == "crasher"
    assert during["last_failure"]["status"] == "exit code 3"
    assert during["failure"] is None
    assert during["next_restart_at"] - during["last_restart"] == pytest.approx(1.0)

    again = wait_status(node, p, "running")
    waited = time.monotonic() - seen_restarting
    assert 0.8 <= waited < 10, waited  # the 1 s backoff (plus stopping and starting)
    assert again["restarts"] == 1 and again["failure"] is None
    assert again["last_failure"]["process"] == "crasher"
    assert again["next_restart_at"] is None
    new_pids = {r["name"]: r["pid"] for r in again["processes"]}
    assert set(new_pids) == {"web", "crasher"}
    assert new_pids["web"] != web_pid and not pid_alive(web_pid)  # the sibling was restarted
    assert all(pid_alive(pid) for pid in new_pids.values())
    # the unit serves again, on the same port
    r = node.cli("wait", str(node.tmp / "spec.json"), "--timeout", "15")
    assert r.returncode == 0, r.stdout + r.stderr
    assert has_line(node.log_dir / "crasher.log", "up for good")
    log = (node.log_dir / "launcher.log").read_text()
    assert "restart 1 of the set in 1.0s (after crasher: exit code 3" in log
    assert p.poll() is None
    p.send_signal(signal.SIGTERM)
    assert p.wait(20) == 0, node.output(p)
    assert not any(pid_alive(pid) for pid in new_pids.values())
    assert not (node.state_dir / "launcher.json").exists()


def test_always_crashing_gives_up_after_max_restarts(node):
    sib = node.tmp / "sib"
    spec = node.spec([
        {**py_proc("sib", TERM_MARKER), "argv": [PY, "-u", "-c", TERM_MARKER, str(sib)]},
        py_proc("crasher", ALWAYS_CRASH),
    ], restart=restart(max_=2, backoff_s=0.2))
    t0 = time.monotonic()
    p = node.start(node.write_spec(spec))
    assert p.wait(60) == 1, node.output(p)
    took = time.monotonic() - t0
    assert took >= 0.2 + 0.4, took  # two backoffs: 0.2 s, then doubled
    final = node.state()
    assert final["status"] == "failed"
    assert final["restarts"] == 2
    assert final["failure"]["process"] == "crasher"
    assert final["failure"]["status"] == "exit code 5"
    assert final["failure"]["restarts"] == 2
    assert final["last_failure"]["process"] == "crasher"
    assert not any(pid_alive(r["pid"]) for r in final["processes"])
    assert sib.read_text() == "TERM"
    out = node.output(p)
    assert "restart 1 of the set in 0.2s" in out and "restart 2 of the set in 0.4s" in out
    assert "giving up: 2 restart(s) within 600s already (restart.max 2)" in out
    assert (node.log_dir / "crasher.log").read_text().count("starting crasher") == 3
    # `wait` on a unit left failed fails early, as before
    r = node.cli("wait", str(node.tmp / "spec.json"), "--timeout", "10")
    assert r.returncode == 1 and "launcher status failed" in r.stderr, r.stderr
    r = node.cli("stop", "--state-dir", str(node.state_dir))
    assert r.returncode == 0, r.stderr


def test_sigterm_during_the_backoff_exits_at_once_and_leaves_nothing(node):
    sib = node.tmp / "sib"
    spec = node.spec([
        {**py_proc("sib", TERM_MARKER), "argv": [PY, "-u", "-c", TERM_MARKER, str(sib)]},
        py_proc("crasher", ALWAYS_CRASH),
    ], restart=restart(backoff_s=30))
    p = node.start(node.write_spec(spec))
    first = node.wait_running(p)
    pids = [r["pid"] for r in first["processes"]]
    st = wait_status(node, p, "restarting")
    wait_for(lambda: "stopping 2 process(es)" in (node.log_dir / "launcher.log").read_text()
             and not any(pid_alive(pid) for pid in pids), 15, what="the set stopped")
    assert st["next_restart_at"] - st["last_restart"] == pytest.approx(30.0)
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    assert p.wait(5) == 0, node.output(p)
    took = time.monotonic() - t0
    assert took < 1.0, took
    assert not (node.state_dir / "launcher.json").exists()
    assert not any(pid_alive(pid) for pid in pids)
    assert sib.read_text() == "TERM"
    assert "stop requested during the restart backoff" in node.output(p)
    assert (node.log_dir / "crasher.log").read_text().count("starting crasher") == 1


def test_sigterm_while_running_never_restarts(node):
    sib = node.tmp / "sib"
    spec = node.spec([
        {**py_proc("sib", TERM_MARKER), "argv": [PY, "-u", "-c", TERM_MARKER, str(sib)]},
    ], restart=restart(backoff_s=0.1))
    p = node.start(node.write_spec(spec))
    node.wait_running(p)
    wait_for(lambda: has_line(node.log_dir / "sib.log", "up"), what="sib up")
    p.send_signal(signal.SIGTERM)
    assert p.wait(20) == 0, node.output(p)
    assert sib.read_text() == "TERM"
    assert "of the set in" not in (node.log_dir / "launcher.log").read_text()
    assert not (node.state_dir / "launcher.json").exists()


@pytest.mark.parametrize("block", ["never", "absent"])
def test_policy_never_and_no_restart_block_fail_at_once(node, block):
    sib = node.tmp / "sib"
    over = {"restart": restart("never")} if block == "never" else {}
    spec = node.spec([
        {**py_proc("sib", TERM_MARKER), "argv": [PY, "-u", "-c", TERM_MARKER, str(sib)]},
        py_proc("crasher", ALWAYS_CRASH),
    ], **over)
    p = node.start(node.write_spec(spec))
    assert p.wait(30) == 1, node.output(p)
    final = node.state()
    assert final["status"] == "failed"
    assert final["restarts"] == 0 and final["last_failure"] is None
    assert final["restart_policy"] == "never"
    assert final["failure"]["process"] == "crasher"
    assert final["failure"]["status"] == "exit code 5"
    assert sib.read_text() == "TERM"
    assert "of the set in" not in node.output(p) and "giving up" not in node.output(p)
    assert (node.log_dir / "crasher.log").read_text().count("starting crasher") == 1
    node.cli("stop", "--state-dir", str(node.state_dir))


def test_wait_keeps_waiting_through_a_restart(node):
    web, port2 = free_port(HOST), free_port(HOST)
    # `late` crashes once before it serves; `web` is ready at once, then restarted
    late_code = (
        "import os, sys, time, runpy\n"
        "marker = sys.argv[1]\n"
        "if not os.path.exists(marker):\n"
        "    open(marker, 'w').write('x')\n"
        "    time.sleep(1.5)\n"
        "    sys.exit(9)\n"
        "sys.argv = ['srv', sys.argv[2], sys.argv[3]]\n"
        "exec(" + repr(HTTP_SERVER) + ")\n"
    )
    late = {**py_proc("late", late_code, ports=[(HOST, port2)]),
            "argv": [PY, "-u", "-c", late_code, str(node.tmp / "crashed"), HOST, str(port2)],
            "ready": {"type": "http", "url": f"http://{HOST}:{port2}/health"}}
    spec = node.spec([http_proc("web", web), late], restart=restart(backoff_s=1.5))
    spec_path = node.write_spec(spec)
    p = node.start(spec_path)
    t0 = time.monotonic()
    w = subprocess.Popen([PY, "-m", "pd_launcher", "wait", str(spec_path), "--timeout", "40",
                          "--interval", "0.2"], env=py_env(), cwd=str(node.tmp),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    node.others.append(w)
    wait_status(node, p, "restarting")
    assert w.poll() is None  # restarting is not a failure
    out, err = w.communicate(timeout=60)
    took = time.monotonic() - t0
    assert w.returncode == 0, out + err
    assert took >= 1.5 + 1.5, took  # the crash, then the backoff
    st = node.state()
    assert st["status"] == "running" and st["restarts"] == 1, st
    lines = out.splitlines()
    assert any(line.startswith("launcher restarting its processes (restart 1)")
               for line in lines), out
    # `web` was ready before the restart: it had to be ready again after it
    restart_at = next(i for i, line in enumerate(lines) if line.startswith("launcher restarting"))
    assert any(line.startswith("ready: web") for line in lines[restart_at:]), out
    assert lines[-1] == "all 2 process(es) ready", out
