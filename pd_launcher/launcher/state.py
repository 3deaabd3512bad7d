"""The state file `<state dir>/launcher.json`, written atomically.

Format (schema 1)::

    {
      "schema": 1,
      "status": "starting" | "running" | "stopping" | "failed",
      "spec": "/abs/path/spec.json",
      "cluster": "demo", "node": "p1a", "role": "P",
      "grace_seconds": 30.0,
      "pid_namespace": "pid:[4026531836]",     # PIDs below are only meaningful in it
      "launcher": {"pid": 123, "start_time": 456789, "cmdline": [...]},
      "processes": [
        {"name": "engine-dp0", "pid": 130, "pgid": 130, "start_time": 456800,
         "argv": [...], "cmdline": [...], "ports": [{"host": "...", "port": 7100, "use": "api"}],
         "log": "/.../engine-dp0.log", "started_at": 1700000000.0}
      ],
      "failure": null | {"process": "engine-dp0", "status": "exit code 1", "at": 1700000100.0},
      "updated_at": 1700000000.0
    }

`argv` and `cmdline` are stored masked (``--api-key ***``): the file holds no secrets.
`start_time` is field 22 of /proc/PID/stat (clock ticks since boot).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any, Dict, Optional

from .common import STATE_FILE

SCHEMA = 1


def state_path(state_dir: str) -> str:
    return os.path.join(state_dir, STATE_FILE)


def atomic_write(path: str, data: bytes, mode: int = 0o644) -> None:
    """Write `path` so readers see either the old or the new content, never a mix."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def write_state(state_dir: str, state: Dict[str, Any]) -> None:
    state = dict(state)
    state["schema"] = SCHEMA
    state["updated_at"] = time.time()
    data = (json.dumps(state, indent=2, sort_keys=True) + "\n").encode("utf-8")
    atomic_write(state_path(state_dir), data, 0o644)


def read_state(state_dir: str) -> Optional[Dict[str, Any]]:
    """The state dict, or None when there is no state file.

    Raises ValueError when the file exists but is not a valid state file.
    """
    path = state_path(state_dir)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        schema = data.get("schema") if isinstance(data, dict) else None
        raise ValueError(f"{path} is not a pd-launcher state file (schema {schema!r})")
    return data


def remove_state(state_dir: str) -> None:
    try:
        os.unlink(state_path(state_dir))
    except FileNotFoundError:
        pass
