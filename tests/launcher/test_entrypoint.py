"""Container-entrypoint duties (PID 1 in its own PID namespace) and Python 3.9 compatibility."""
from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import time

import pytest

from pd_launcher.launcher import procinfo

from .conftest import PY, TERM_MARKER, has_line, pid_alive, py_proc, wait_for

pytestmark = pytest.mark.slow  # real child processes


def _can_unshare() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    r = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                       capture_output=True, timeout=20)
    return r.returncode == 0


def _children(ppid: int):
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = procinfo.read_stat(int(name))
            if st is not None and st.ppid == ppid:
                out.append(st)
    return out


@pytest.mark.skipif(not _can_unshare(), reason="needs root and unshare --pid (a PID namespace)")
def test_pid1_reaps_orphans_and_handles_sigterm(node):
    # `sh` leaves an orphan (sleep 0.77) behind; in a PID namespace it is re-parented
    # to PID 1, the launcher, which must reap it when it exits.
    marker = node.tmp / "term"
    spec = node.spec([
        {"name": "orphaner", "argv": ["sh", "-c", "(sleep 0.77 &); exec sleep 1000"]},
        {**py_proc("t", TERM_MARKER), "argv": [PY, "-u", "-c", TERM_MARKER, str(marker)]},
    ])
    p = node.start(node.write_spec(spec), prefix=["unshare", "--pid", "--fork", "--mount-proc"])
    st = wait_for(lambda: (node.state() or {}).get("status") == "running" and node.state(),
                  timeout=20, what="launcher in namespace running")
    assert st["launcher"]["pid"] == 1  # PID 1 inside its namespace
    assert st["pid_namespace"] != os.readlink("/proc/self/ns/pid")
    launcher = wait_for(lambda: [c.pid for c in _children(p.pid)], what="launcher host pid")[0]
    orphan = wait_for(lambda: [c.pid for c in _children(launcher)
                               if procinfo.read_cmdline(c.pid) == ["sleep", "0.77"]],
                      timeout=10, what="orphan adopted by the launcher")[0]
    wait_for(lambda: procinfo.read_stat(orphan) is None, timeout=10,
             what="orphan exited and reaped (no zombie left)")
    assert not [c for c in _children(launcher) if c.zombie]

    # From outside the namespace the recorded PIDs mean nothing: stop refuses.
    r = node.cli("stop", "--state-dir", str(node.state_dir))
    assert r.returncode == 1 and "another PID namespace" in r.stderr
    assert p.poll() is None

    # `docker stop` / `podman stop`: SIGTERM to the container's PID 1.
    wait_for(lambda: has_line(node.log_dir / "t.log", "up"))
    os.kill(launcher, signal.SIGTERM)
    assert p.wait(20) == 0, node.output(p)
    assert marker.read_text() == "TERM"
    assert not (node.state_dir / "launcher.json").exists()


def _python39():
    cands = [shutil.which("python3.9")]
    cands += sorted(glob.glob("/root/.pyenv/versions/3.9*/bin/python3.9"))
    for c in cands:
        if not c:
            continue
        try:
            r = subprocess.run([c, "-c", "import sys; print(sys.version_info[:2] == (3, 9))"],
                               capture_output=True, text=True, timeout=20)
        except OSError:
            continue
        if r.stdout.strip() == "True":
            return c
    return None


PY39 = _python39()


@pytest.mark.skipif(PY39 is None, reason="no Python 3.9 interpreter found")
def test_runs_on_python39(node):
    marker = node.tmp / "term"
    spec = node.spec([{**py_proc("t", TERM_MARKER),
                       "argv": [PY39, "-u", "-c", TERM_MARKER, str(marker)]}],
                     nic={"ip": "127.0.1.5", "name": None, "env": ["GLOO_SOCKET_IFNAME"]})
    spec_path = node.write_spec(spec)
    r = node.cli("run", str(spec_path), "--check", py=PY39)
    assert r.returncode == 0, r.stderr
    assert "GLOO_SOCKET_IFNAME=lo" in r.stdout
    p = node.start(spec_path, py=PY39)
    st = node.wait_running(p)
    assert pid_alive(st["processes"][0]["pid"])
    r = node.cli("wait", str(spec_path), "--timeout", "10", py=PY39)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: has_line(node.log_dir / "t.log", "up"))
    t0 = time.monotonic()
    r = node.cli("stop", "--state-dir", str(node.state_dir), py=PY39)
    assert r.returncode == 0, r.stderr
    assert p.wait(10) == 0 and time.monotonic() - t0 < 10
    assert marker.read_text() == "TERM"
