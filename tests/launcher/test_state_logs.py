"""Atomic state file, log rotation, /proc identity and secret masking (units)."""
from __future__ import annotations

import json
import os
import subprocess
import threading

import pytest

from pd_launcher.launcher import logs, procinfo, state
from pd_launcher.launcher.common import mask_argv, mask_env, mask_text
from pd_launcher.launcher.stop import verify_recorded


def test_atomic_write_readers_never_see_partial_content(tmp_path):
    sd = str(tmp_path)
    big = {"processes": [{"name": f"p{i}", "argv": ["x" * 200]} for i in range(200)]}
    state.write_state(sd, {"n": -1, **big})
    stop = threading.Event()
    errors = []

    def writer():
        n = 0
        while not stop.is_set():
            state.write_state(sd, {"n": n, **big})
            n += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(300):
            data = state.read_state(sd)  # raises on a torn read
            if data is None or len(data["processes"]) != 200:
                errors.append(data)
    finally:
        stop.set()
        t.join()
    assert not errors
    assert [p.name for p in tmp_path.iterdir()] == ["launcher.json"]  # no temp files left
    assert oct(os.stat(tmp_path / "launcher.json").st_mode & 0o777) == "0o600"  # not world-readable


def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "f"
    state.atomic_write(str(target), b"old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        state.atomic_write(str(target), b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_read_state_rejects_foreign_file(tmp_path):
    (tmp_path / "launcher.json").write_text(json.dumps({"schema": 99}))
    with pytest.raises(ValueError):
        state.read_state(str(tmp_path))
    assert state.read_state(str(tmp_path / "nope")) is None


def test_rotation_copy_truncate_keeps_backups(tmp_path):
    path = str(tmp_path / "a.log")
    with open(path, "ab") as f:  # a writer that keeps its O_APPEND fd open, like a child
        for gen in range(4):
            f.write(f"gen{gen}\n".encode() * 300)
            f.flush()
            assert logs.rotate_if_needed(path, 1000, 2)
        f.write(b"after\n")
        f.flush()
    assert open(path, "rb").read() == b"after\n"  # writes after truncate land at offset 0
    assert open(path + ".1", "rb").read().startswith(b"gen3")
    assert open(path + ".2", "rb").read().startswith(b"gen2")
    assert not os.path.exists(path + ".3")
    assert not logs.rotate_if_needed(path, 1000, 2)  # under the cap: nothing


def test_masking():
    assert mask_argv(["vllm", "--api-key", "k", "--hf-token=t", "--max-num-batched-tokens",
                      "256", "--tokenizer", "x"]) == [
        "vllm", "--api-key", "***", "--hf-token=***", "--max-num-batched-tokens", "256",
        "--tokenizer", "x"]
    assert mask_env({"HF_TOKEN": "t", "API_KEY": "k", "DB_PASSWORD": "p", "HOME": "/root"}) == {
        "HF_TOKEN": "***", "API_KEY": "***", "DB_PASSWORD": "***", "HOME": "/root"}
    assert mask_text("nginx: master --api-key k -p /x") == "nginx: master --api-key *** -p /x"


def test_proc_stat_and_cmdline_of_self():
    me = procinfo.read_stat(os.getpid())
    assert me is not None and me.start_time > 0 and not me.zombie
    assert procinfo.read_stat(2 ** 22 + 5) is None  # above pid_max
    p = subprocess.Popen(["sleep", "30"])
    try:
        assert procinfo.cmdline_after_exec(p.pid) == ["sleep", "30"]
    finally:
        p.kill()
        p.wait()


def test_cmdline_matches_titles_and_shebang():
    argv = ["nginx", "-p", "/d", "-c", "/d/nginx.conf", "-g", "daemon off;"]
    title = ["nginx: master process nginx -p /d -c /d/nginx.conf -g daemon off;"]
    assert procinfo.cmdline_matches(argv, argv, title)
    assert procinfo.cmdline_matches(["vllm", "serve", "/m"], ["/usr/bin/python3",
                                    "/usr/local/bin/vllm", "serve", "/m"],
                                    ["/usr/bin/python3", "/usr/local/bin/vllm", "serve", "/m"])
    assert procinfo.cmdline_matches(["x", "--api-key", "***"], ["x", "--api-key", "***"],
                                    ["x", "--api-key", "real-secret"])
    assert not procinfo.cmdline_matches(["sleep", "100"], ["sleep", "100"], ["bash"])
    assert not procinfo.cmdline_matches(["sleep", "100"], ["sleep", "100"], [])


def test_verify_recorded_detects_reuse_and_other_commands():
    p = subprocess.Popen(["sleep", "30"])
    try:
        procinfo.cmdline_after_exec(p.pid)
        st = procinfo.read_stat(p.pid)
        rec = {"pid": p.pid, "start_time": st.start_time, "argv": ["sleep", "30"],
               "cmdline": ["sleep", "30"]}
        assert verify_recorded(rec)[0] == "ours"
        verdict, detail = verify_recorded(dict(rec, start_time=st.start_time - 1))
        assert verdict == "mismatch" and "PID reused" in detail
        verdict, detail = verify_recorded(dict(rec, argv=["sleep", "31"], cmdline=["sleep", "31"]))
        assert verdict == "mismatch" and "command line" in detail
    finally:
        p.kill()
        p.wait()
    assert verify_recorded(rec)[0] == "gone"
