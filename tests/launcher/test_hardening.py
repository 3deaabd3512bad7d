"""Fault-matrix hardening of the launcher: file modes, damaged state files, log rotation of
extra files (spec `logs`), a full log filesystem."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pd_launcher.launcher import logs
from pd_launcher.launcher.spec import parse_spec, relocate, spec_to_dict

from .conftest import PY, has_line, pid_alive, py_proc, wait_for

SLEEPER = "import time\nprint('up', flush=True)\nwhile True:\n    time.sleep(1)\n"
# prints ~2 KB per 10 ms to stdout; a write error is counted, never fatal (like the
# emulator's logging); answers "alive" in a marker file every loop
CHATTY = (
    "import sys, time, os\n"
    "errors = 0\n"
    "while True:\n"
    "    try:\n"
    "        sys.stdout.write('x' * 2000 + '\\n'); sys.stdout.flush()\n"
    "    except OSError:\n"
    "        errors += 1\n"
    "    open(sys.argv[1], 'w').write(str(errors))\n"
    "    time.sleep(0.01)\n"
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.slow
def test_state_lock_and_log_files_are_not_world_readable(node):
    os.umask(0o022)
    spec = node.spec([py_proc("a", SLEEPER)])
    p = node.start(node.write_spec(spec))
    node.wait_running(p)
    assert _mode(node.state_dir) == 0o700
    assert _mode(node.state_dir / "launcher.json") == 0o600
    assert _mode(node.state_dir / "launcher.lock") == 0o600
    assert _mode(node.log_dir) == 0o750
    assert _mode(node.log_dir / "a.log") == 0o640
    assert _mode(node.log_dir / "launcher.log") == 0o640


def test_spec_logs_block_round_trips_and_relocates():
    raw = {"schema": 1, "cluster": "c", "node": "n", "role": "C", "ip": "127.0.1.1",
           "dirs": {"log": "/x/logs/C", "state": "/x/state/C"},
           "processes": [{"name": "a", "argv": ["true"]}],
           "logs": {"max_bytes": 1000, "backups": 2, "files": ["/x/logs/C/access.log"]}}
    spec = parse_spec(raw)
    assert spec.logs is not None and spec.logs.files == ["/x/logs/C/access.log"]
    assert parse_spec(spec_to_dict(spec)) == spec
    moved = relocate(spec, {"log": "/y/log"})
    assert moved.logs is not None and moved.logs.files == ["/y/log/access.log"]
    with pytest.raises(Exception) as err:
        parse_spec(dict(raw, logs={"max_bytes": -1, "files": ["rel.log"]}))
    assert "logs.max_bytes" in str(err.value) and "logs.files[0]" in str(err.value)
    assert "logs" not in spec_to_dict(parse_spec({k: v for k, v in raw.items() if k != "logs"}))


@pytest.mark.slow
def test_spec_logs_rotates_extra_files_and_process_logs(node):
    access = node.log_dir / "access.log"
    # the process appends to a file of its own (like nginx's access log), O_APPEND
    writer = ("import sys, time\n"
              "f = open(sys.argv[1], 'ab', buffering=0)\n"
              "while True:\n"
              "    f.write(b'y' * 1000 + b'\\n'); sys.stdout.write('z' * 1000 + '\\n')\n"
              "    sys.stdout.flush(); time.sleep(0.005)\n")
    proc = py_proc("w", writer)
    proc["argv"].append(str(access))
    spec = node.spec([proc], logs={"max_bytes": 20000, "backups": 2, "files": [str(access)]})
    p = node.start(node.write_spec(spec))
    node.wait_running(p)
    wait_for(lambda: (node.log_dir / "access.log.2").exists()
             and (node.log_dir / "w.log.2").exists(), 20, what="two rotations of each")
    for name in ("access.log", "w.log"):
        for suffix in ("", ".1", ".2"):
            # the cap, plus what a writer adds within one check interval (~1 s)
            assert (node.log_dir / (name + suffix)).stat().st_size < 20000 + 250_000
        assert not (node.log_dir / (name + ".3")).exists()
    assert p.poll() is None


def _count(path: Path) -> int:
    try:
        return int(path.read_text() or 0)
    except (OSError, ValueError):
        return 0


@contextlib.contextmanager
def tiny_tmpfs(path: Path, size: str = "1m") -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fill(path: Path) -> None:
    with open(path / "filler", "ab") as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()


def test_rotation_on_a_full_filesystem_truncates_without_backup(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    with tiny_tmpfs(tmp_path / "fs", "256k") as fs:
        log = fs / "a.log"
        log.write_bytes(b"a" * 100_000)
        _fill(fs)
        done = logs.rotate_if_needed(str(log), 50_000, 2)
        assert done == "truncated without a backup (no space left)"
        assert log.stat().st_size == 0 and not (fs / "a.log.1").exists()
        assert not (fs / "a.log.1.tmp").exists()
        _fill(fs)
        assert logs.write_banner(str(fs / "b.log"), "x" * 300_000) is False  # no raise


@pytest.mark.slow
def test_full_log_filesystem_stops_nothing(node):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    marker = node.tmp / "errors"
    proc = py_proc("chatty", CHATTY)
    proc["argv"].append(str(marker))
    spec = node.spec([proc], logs={"max_bytes": 10**9, "backups": 1})
    with tiny_tmpfs(node.log_dir, "1m"):
        p = node.start(node.write_spec(spec))
        st = node.wait_running(p)
        wait_for(lambda: _count(marker) > 5, 30, what="write errors on the full filesystem")
        time.sleep(2)  # two supervise loops on a full filesystem
        assert p.poll() is None, node.output(p)
        assert pid_alive(st["processes"][0]["pid"])
        assert json.loads((node.state_dir / "launcher.json").read_text())["status"] == "running"
        r = node.cli("stop", "--state-dir", str(node.state_dir))
        assert r.returncode == 0, r.stderr
        assert p.wait(15) == 0
        assert not pid_alive(st["processes"][0]["pid"])


@pytest.mark.slow
def test_stop_with_truncated_state_stops_the_lock_holder_only(node):
    spec = node.spec([py_proc("a", SLEEPER)])
    p = node.start(node.write_spec(spec))
    st = node.wait_running(p)
    wait_for(lambda: has_line(node.log_dir / "a.log", "up"))
    decoy = node.decoy(spec["processes"][0]["argv"])
    (node.state_dir / "launcher.json").write_text('{"schema": 1, "launcher": {"pi')
    r = node.cli("stop", "--state-dir", str(node.state_dir))
    assert r.returncode == 0, r.stderr
    assert "damage: " in r.stderr and "launcher.json cannot be read" in r.stderr
    assert f"lock is pid {p.pid}" in r.stderr
    assert p.wait(15) == 0
    assert not pid_alive(st["processes"][0]["pid"])
    assert decoy.poll() is None
    assert not (node.state_dir / "launcher.json").exists()


@pytest.mark.slow
def test_stop_with_pids_swapped_for_a_decoy_spares_it(node):
    spec = node.spec([py_proc("a", SLEEPER), py_proc("b", SLEEPER)])
    p = node.start(node.write_spec(spec))
    st = node.wait_running(p)
    decoy = node.decoy([PY, "-c", "import time; time.sleep(600)"])
    bad = json.loads((node.state_dir / "launcher.json").read_text())
    bad["launcher"]["pid"] = decoy.pid
    bad["processes"][0]["pid"] = decoy.pid
    (node.state_dir / "launcher.json").write_text(json.dumps(bad))
    r = node.cli("stop", "--state-dir", str(node.state_dir))
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("damage: ") >= 3, r.stderr  # launcher, processes[0], lock holder
    assert f"pid {decoy.pid} now belongs to another process" in r.stderr
    assert p.wait(15) == 0
    assert not any(pid_alive(x["pid"]) for x in st["processes"])
    assert decoy.poll() is None
