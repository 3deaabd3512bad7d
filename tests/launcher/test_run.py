"""`run` with real child processes: signals, supervision, grace, state file, logs."""
from __future__ import annotations

import os
import signal
import time

import pytest

from .conftest import (
    IGNORE_TERM,
    PY,
    TERM_MARKER,
    free_port,
    has_line,
    pid_alive,
    proc_start_time,
    py_proc,
    wait_for,
)

pytestmark = pytest.mark.slow  # real child processes


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_is_forwarded_and_exit_0(node, sig):
    m1, m2 = node.tmp / "t1", node.tmp / "t2"
    spec = node.spec([
        {**py_proc("a", TERM_MARKER), "argv": [PY, "-u", "-c", TERM_MARKER, str(m1)]},
        {**py_proc("b", TERM_MARKER), "argv": [PY, "-u", "-c", TERM_MARKER, str(m2)]},
    ])
    p = node.start(node.write_spec(spec))
    st = node.wait_running(p)
    pids = [r["pid"] for r in st["processes"]]
    wait_for(lambda: all(has_line(node.log_dir / f"{n}.log", "up") for n in "ab"),
             what="children up")
    p.send_signal(sig)
    assert p.wait(20) == 0, node.output(p)
    assert m1.read_text() == "TERM" and m2.read_text() == "TERM"
    assert not any(pid_alive(pid) for pid in pids)
    assert not (node.state_dir / "launcher.json").exists()
    out = node.output(p)
    assert "state file removed" in out
    assert "launcher.log" in os.listdir(node.log_dir)
    assert "a (pgid" in (node.log_dir / "launcher.log").read_text()


def test_child_crash_stops_siblings_and_exits_1(node):
    sib_marker = node.tmp / "sib"
    spec = node.spec([
        {**py_proc("sib", TERM_MARKER), "argv": [PY, "-u", "-c", TERM_MARKER, str(sib_marker)]},
        py_proc("crasher", "import sys, time\nprint('line-one')\nprint('boom:', 'bad model',"
                " flush=True)\ntime.sleep(1.5)\nsys.exit(7)"),
    ])
    p = node.start(node.write_spec(spec))
    st = node.wait_running(p)
    sib_pid = st["processes"][0]["pid"]
    assert p.wait(20) == 1, node.output(p)
    out = node.output(p)
    assert "process crasher" in out and "exited: exit code 7" in out
    assert "boom: bad model" in out  # tail of its log
    assert sib_marker.read_text() == "TERM"  # the sibling got SIGTERM
    assert not pid_alive(sib_pid)
    final = node.state()
    assert final["status"] == "failed"
    assert final["failure"]["process"] == "crasher"
    assert final["failure"]["status"] == "exit code 7"
    assert {r["name"]: r["exit"] for r in final["processes"]}["crasher"] == "exit code 7"
    # stop on a failed node: nothing left, removes the state file
    r = node.cli("stop", "--state-dir", str(node.state_dir))
    assert r.returncode == 0, r.stderr
    assert not (node.state_dir / "launcher.json").exists()


def test_child_killed_by_signal_is_reported(node):
    spec = node.spec([py_proc("victim", "import time\ntime.sleep(100)"),
                      py_proc("other", "import time\ntime.sleep(100)")])
    p = node.start(node.write_spec(spec))
    st = node.wait_running(p)
    os.kill(st["processes"][0]["pid"], signal.SIGKILL)
    assert p.wait(20) == 1
    assert "process victim" in node.output(p) and "killed by SIGKILL" in node.output(p)


def test_child_ignoring_sigterm_is_killed_after_grace(node):
    spec = node.spec([py_proc("stubborn", IGNORE_TERM), py_proc("polite", TERM_MARKER)],
                     grace_seconds=1.5)
    spec["processes"][1]["argv"].append(str(node.tmp / "polite"))
    p = node.start(node.write_spec(spec))
    st = node.wait_running(p)
    wait_for(lambda: has_line(node.log_dir / "stubborn.log", "ignoring SIGTERM"),
             what="stubborn up")
    pids = [r["pid"] for r in st["processes"]]
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    assert p.wait(20) == 0
    elapsed = time.monotonic() - t0
    assert 1.4 <= elapsed < 8, elapsed
    assert not any(pid_alive(pid) for pid in pids)
    out = node.output(p)
    assert "stubborn (pgid" in out and "SIGKILL" in out
    assert f"polite (pgid {pids[1]}) stopped" in out


def test_grace_flag_overrides_spec(node):
    spec = node.spec([py_proc("stubborn", IGNORE_TERM)], grace_seconds=60)
    p = node.start(node.write_spec(spec), "--grace", "0.5")
    node.wait_running(p)
    wait_for(lambda: has_line(node.log_dir / "stubborn.log", "ignoring SIGTERM"))
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    assert p.wait(20) == 0
    assert time.monotonic() - t0 < 6


def test_second_signal_cuts_grace_short(node):
    spec = node.spec([py_proc("stubborn", IGNORE_TERM)], grace_seconds=60)
    p = node.start(node.write_spec(spec))
    node.wait_running(p)
    wait_for(lambda: has_line(node.log_dir / "stubborn.log", "ignoring SIGTERM"))
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    wait_for(lambda: node.state() and node.state()["status"] == "stopping")
    p.send_signal(signal.SIGINT)
    assert p.wait(20) == 0
    assert time.monotonic() - t0 < 6


def test_grandchildren_in_the_group_are_stopped(node):
    # sh starts a background sleep in the same session, then waits: both must go.
    spec = node.spec([{"name": "shell", "argv": ["sh", "-c", "sleep 321 & wait"]}])
    p = node.start(node.write_spec(spec))
    st = node.wait_running(p)
    sid = st["processes"][0]["pid"]

    def sleeper():
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    if open(f"/proc/{name}/cmdline").read() == "sleep\x00321\x00":
                        return int(name)
                except OSError:
                    pass
        return None

    gc = wait_for(sleeper, what="grandchild")
    assert os.getsid(gc) == sid
    p.send_signal(signal.SIGTERM)
    assert p.wait(20) == 0
    assert not pid_alive(gc)


def test_state_file_contents(node):
    port = free_port("127.0.1.5")
    spec = node.spec([
        py_proc("api", "import time\ntime.sleep(100)", ports=[("127.0.1.5", port)]),
        {"name": "kv", "argv": ["sleep", "100", "--api-key", "sk-live"], "ports": []},
    ])
    spec["processes"][1]["argv"] = [PY, "-c", "import time; time.sleep(100)", "--api-key",
                                    "sk-live"]
    spec_path = node.write_spec(spec)
    p = node.start(spec_path)
    st = node.wait_running(p)
    raw = (node.state_dir / "launcher.json").read_text()
    assert "sk-live" not in raw
    assert st["schema"] == 1 and st["status"] == "running"
    assert st["spec"] == str(spec_path)
    assert (st["cluster"], st["node"], st["role"]) == ("test", "n1", "P")
    assert st["launcher"]["pid"] == p.pid
    assert st["launcher"]["start_time"] == proc_start_time(p.pid)
    assert "run" in st["launcher"]["cmdline"]
    assert st["pid_namespace"] == os.readlink("/proc/self/ns/pid")
    assert [r["name"] for r in st["processes"]] == ["api", "kv"]
    for rec in st["processes"]:
        assert pid_alive(rec["pid"])
        assert rec["pgid"] == rec["pid"] == os.getpgid(rec["pid"]) == os.getsid(rec["pid"])
        assert rec["start_time"] == proc_start_time(rec["pid"])
        assert rec["log"] == str(node.log_dir / (rec["name"] + ".log"))
        assert rec["exit"] is None
    api, kv = st["processes"]
    assert api["ports"] == [{"host": "127.0.1.5", "port": port, "use": "api"}]
    assert api["argv"] == spec["processes"][0]["argv"]
    assert kv["argv"][-2:] == ["--api-key", "***"] and kv["cmdline"][-1] == "***"
    assert st["grace_seconds"] == 5.0


def test_env_and_nic_reach_the_child(node):
    code = ("import os\nprint('ENV', os.environ.get('GLOO_SOCKET_IFNAME'), "
            "os.environ.get('MINE'), os.environ.get('FROM_LAUNCHER'), flush=True)\n"
            "import time\ntime.sleep(100)")
    spec = node.spec([py_proc("a", code, env={"MINE": "m1"})],
                     nic={"ip": "127.0.1.5", "name": None, "env": ["GLOO_SOCKET_IFNAME"]})
    os.environ["FROM_LAUNCHER"] = "yes"
    try:
        p = node.start(node.write_spec(spec))
    finally:
        del os.environ["FROM_LAUNCHER"]
    node.wait_running(p)
    wait_for(lambda: "ENV lo m1 yes" in (node.log_dir / "a.log").read_text(), what="env line")


def test_files_written_and_pre_start_runs_first(node):
    conf = node.run_dir / "sub" / "app.conf"
    spec = node.spec(
        [py_proc("a", f"print(open({str(conf)!r}).read(), flush=True)\n"
                      "import time\ntime.sleep(100)")],
        files=[{"path": str(conf), "content": "hello-conf", "mode": "0600"}],
        pre_start=[["sh", "-c", f"grep -q hello-conf {conf} && echo pre-ok"]],
    )
    p = node.start(node.write_spec(spec))
    node.wait_running(p)
    assert oct(conf.stat().st_mode & 0o777) == "0o600"
    assert "pre-ok" in (node.log_dir / "pre_start.log").read_text()
    wait_for(lambda: "hello-conf" in (node.log_dir / "a.log").read_text())


def test_pre_start_failure_refuses_to_start(node):
    marker = node.tmp / "started"
    spec = node.spec([py_proc("a", f"open({str(marker)!r}, 'w')")],
                     pre_start=[["sh", "-c", "echo 'config error on line 3'; exit 1"]])
    r = node.cli("run", str(node.write_spec(spec)))
    assert r.returncode == 3, r.stderr
    assert "pre_start[0]" in r.stderr and "config error on line 3" in r.stderr
    assert not marker.exists()
    st = node.state()
    assert st["status"] == "failed" and st["processes"] == []
    assert "config error on line 3" in st["failure"]["error"]
    # `wait` does not sit out its timeout for a node that failed to start
    r = node.cli("wait", str(node.tmp / "spec.json"), "--timeout", "60")
    assert r.returncode == 1 and "launcher status failed: pre_start[0]" in r.stderr


def test_second_run_on_same_state_dir_is_refused(node):
    spec_path = node.write_spec(node.spec([py_proc("a", "import time\ntime.sleep(100)")]))
    p = node.start(spec_path)
    node.wait_running(p)
    r = node.cli("run", str(spec_path))
    assert r.returncode == 5, r.stderr
    assert "already running" in r.stderr
    assert p.poll() is None


def test_log_rotation_while_child_writes(node):
    code = ("import sys, time\nline = 'x' * 99 + '\\n'\n"
            "for i in range(4000):\n    sys.stdout.write(line)\n    sys.stdout.flush()\n"
            "    time.sleep(0.0005)\n"
            "print('done-writing', flush=True)\ntime.sleep(100)")
    spec = node.spec([py_proc("chatty", code)])
    p = node.start(node.write_spec(spec), "--log-max-bytes", "50000", "--log-backups", "2")
    node.wait_running(p)
    log = node.log_dir / "chatty.log"
    wait_for(lambda: (node.log_dir / "chatty.log.2").exists(), timeout=20, what="2 rotations")
    wait_for(lambda: "done-writing" in log.read_text(), timeout=20, what="child not blocked")
    time.sleep(1.2)  # one more check interval: the file is back under the cap
    assert log.stat().st_size <= 50000
    assert not (node.log_dir / "chatty.log.3").exists()
    assert (node.log_dir / "chatty.log.1").stat().st_size > 0
    assert "rotated" in (node.log_dir / "launcher.log").read_text()
    assert p.poll() is None
