"""The state file `<state dir>/launcher.json`, written atomically.

Format (schema 1)::

    {
      "schema": 1,
      "status": "starting" | "running" | "restarting" | "stopping" | "failed",
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
      "restart_policy": "on-failure" | "never",   # the spec's restart.policy
      "restarts": 0,                              # restarts of the set so far
      "last_restart": null | 1700000100.2,        # when the last restart began
      "last_failure": null | {...},               # its cause, shaped like `failure`
      "next_restart_at": null | 1700000101.2,     # while "restarting"
      "spec_sha256": "ab12...",                   # sha256 of the spec file it runs
      "reloads": 0,                               # reloads applied (SIGUSR1, `reload`)
      "last_reload": null | 1700000200.0,         # when the last one was applied
      "last_reload_signaled": ["proxy-agent"],    # processes it sent reload_signal to
      "reload_failures": 0,                       # reloads refused or failed
      "reload_error": null | "processes[0].argv differs: restart needed",
      "reload_restart_needed": false,             # that failure: other fields differ
      "updated_at": 1700000000.0
    }

`argv` and `cmdline` are stored masked (``--api-key ***``): the file holds no secrets.
State files written before the restart or reload fields existed lack them (readers
take 0 / null; `reload` takes a missing `spec_sha256` as "this launcher cannot reload").
`reload_error` is cleared by the next successful reload.
`start_time` is field 22 of /proc/PID/stat (clock ticks since boot).
Reading the file (``read_state``) and the atomic write are in ``pd_launcher.nodeutil``,
shared with the Ansible modules; they are re-exported here.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Dict

from ..nodeutil import (  # noqa: F401  (re-exported: shared with the Ansible modules)
    STATE_SCHEMA,
    atomic_write,
    read_state,
    state_path,
)

SCHEMA = STATE_SCHEMA
#: the state file and the lock are the launcher's alone: 0600, in a 0700 directory
STATE_FILE_MODE = 0o600
STATE_DIR_MODE = 0o700
LOCK_FILE = "launcher.lock"


def write_state(state_dir: str, state: Dict[str, Any]) -> None:
    state = dict(state)
    state["schema"] = SCHEMA
    state["updated_at"] = time.time()
    data = (json.dumps(state, indent=2, sort_keys=True) + "\n").encode("utf-8")
    if not os.path.isdir(state_dir):
        os.makedirs(state_dir, mode=STATE_DIR_MODE, exist_ok=True)
    atomic_write(state_path(state_dir), data, STATE_FILE_MODE)


def remove_state(state_dir: str) -> None:
    try:
        os.unlink(state_path(state_dir))
    except FileNotFoundError:
        pass
