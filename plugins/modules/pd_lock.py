#!/usr/bin/python
"""The cluster lock of site.yml and cleanup.yml (docs/failure-modes.md, row 4)."""
from __future__ import annotations

DOCUMENTATION = r"""
module: pd_lock
short_description: Take, release or show the pd-deploy cluster lock, or name this run
description:
  - The lock is a directory (C(path), created with one atomic mkdir) on the cluster's
    lock host, holding C(holder.json) (who: id, user, controller, the ansible-playbook
    PID and its start time, playbook, start time). One run of site.yml or cleanup.yml
    holds it at a time, whichever controller it runs from.
  - C(whoami) runs on the controller and names this run (the ansible-playbook process
    above the module); with C(pid) and C(pid_start) it also says whether that process
    still runs on this controller (stale-lock detection).
  - C(acquire) takes a free lock, keeps one this run already holds, and takes over a
    held lock only when C(break_id) equals the holder's id (the previous holder is
    renamed away first, so two runs breaking the same lock cannot both win).
  - C(release) removes the lock if C(id) holds it; C(info) reads it.
author: pd-deploy
options:
  state:
    description: What to do.
    type: str
    choices: [whoami, acquire, release, info]
    required: true
  path:
    description: The lock directory (acquire, release, info).
    type: path
  holder:
    description: This run's holder record (from whoami), for acquire.
    type: dict
  id:
    description: This run's lock id, for release.
    type: str
  break_id:
    description: Take the lock over if its holder's id is exactly this.
    type: str
    default: ""
  pid:
    description: With whoami, a PID of this controller to check.
    type: int
  pid_start:
    description: With whoami, that PID's recorded start time (clock ticks since boot).
    type: int
"""

EXAMPLES = r"""
- name: Name this run
  pd_lock:
    state: whoami
  register: me

- name: Take the lock
  pd_lock:
    state: acquire
    path: /opt/pd/pd-deploy.lock
    holder: "{{ me.holder }}"
"""

RETURN = r"""
holder:
  description: whoami, this run; acquire, release and info, the lock's holder (or null).
  type: dict
  returned: always
acquired:
  description: acquire, the lock is now this run's.
  type: bool
  returned: always
"""

import getpass
import json
import os
import shutil
import socket
import time
import uuid

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.pd_node import alive, atomic_write, read_cmdline, read_stat, start_time

HOLDER = "holder.json"


def _playbook_process() -> tuple[int, int | None, str]:
    """The outermost ansible-playbook process above this module (forks included)."""
    pid, found = os.getpid(), None
    while pid > 1:
        cmd = read_cmdline(pid) or []
        if any(os.path.basename(a) == "ansible-playbook" for a in cmd[:2]):
            found = (pid, " ".join(os.path.basename(a) for a in cmd[1:3]))
        stat = read_stat(pid)
        if stat is None:
            break
        pid = stat.ppid
    if found is None:
        found = (os.getppid(), "")
    return found[0], start_time(found[0]), found[1]


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def whoami(module: AnsibleModule) -> None:
    pid, start, _cmd = _playbook_process()
    user = getpass.getuser()
    host = socket.gethostname()
    holder = {"id": f"{user}@{host}:{pid}:{uuid.uuid4().hex[:8]}", "user": user,
              "controller": host, "boot_id": _boot_id(), "pid": pid, "pid_start": start,
              "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "started_ts": time.time()}
    out = {"changed": False, "holder": holder, "acquired": False}
    if module.params["pid"] is not None:
        other = module.params["pid"]
        out["pid_alive"] = alive(other) and (module.params["pid_start"] is None
                                             or start_time(other) == module.params["pid_start"])
    module.exit_json(**out)


def _read(path: str) -> dict | None:
    try:
        with open(os.path.join(path, HOLDER), encoding="utf-8") as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) else {"id": "unknown"}
    except FileNotFoundError:
        # a lock directory without its record: mkdir won, the writer died (or is
        # writing right now); its id is the directory's own mtime, so it can be broken
        if os.path.isdir(path):
            return {"id": f"unrecorded-{int(os.stat(path).st_mtime)}", "user": "?",
                    "controller": "?", "started": time.strftime(
                        "%Y-%m-%d %H:%M:%S %z", time.localtime(os.stat(path).st_mtime))}
        return None
    except (OSError, ValueError):
        return {"id": "unreadable", "user": "?", "controller": "?", "started": "?"}


def _take(path: str, holder: dict) -> bool:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return False
    atomic_write(os.path.join(path, HOLDER), json.dumps(holder).encode(), 0o600)
    return True


def acquire(module: AnsibleModule) -> None:
    path, holder = module.params["path"], module.params["holder"] or {}
    if not holder.get("id"):
        module.fail_json(msg="acquire needs holder (from state=whoami)")
    if _take(path, holder):
        module.exit_json(changed=True, acquired=True, holder=holder)
    current = _read(path)
    if current and current.get("id") == holder["id"]:
        module.exit_json(changed=False, acquired=True, holder=current)
    wanted = module.params["break_id"]
    if current and wanted and wanted == current.get("id"):
        tomb = f"{path}.broken-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(path, tomb)  # only one breaker wins this rename
        except FileNotFoundError:
            tomb = ""
        if tomb:
            shutil.rmtree(tomb, ignore_errors=True)
        if _take(path, holder):
            module.exit_json(changed=True, acquired=True, holder=holder, broken=current)
        current = _read(path)
    module.exit_json(changed=False, acquired=False, holder=current)


def release(module: AnsibleModule) -> None:
    path, me = module.params["path"], module.params["id"]
    current = _read(path)
    if current is None or current.get("id") != me:
        module.exit_json(changed=False, acquired=False, holder=current)
    if not module.check_mode:
        shutil.rmtree(path, ignore_errors=True)
    module.exit_json(changed=True, acquired=False, holder=None)


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "state": {"type": "str", "required": True,
                      "choices": ["whoami", "acquire", "release", "info"]},
            "path": {"type": "path"},
            "holder": {"type": "dict"},
            "id": {"type": "str"},
            "break_id": {"type": "str", "default": "", "no_log": False},
            "pid": {"type": "int"},
            "pid_start": {"type": "int"},
        },
        required_if=[("state", "acquire", ["path", "holder"]),
                     ("state", "release", ["path", "id"]), ("state", "info", ["path"])],
        supports_check_mode=True,
    )
    state = module.params["state"]
    if state == "whoami":
        whoami(module)
    elif state == "info":
        module.exit_json(changed=False, acquired=False, holder=_read(module.params["path"]))
    elif module.check_mode and state == "acquire":
        current = _read(module.params["path"])
        module.exit_json(changed=current is None, acquired=current is None, holder=current)
    elif state == "acquire":
        acquire(module)
    else:
        release(module)


if __name__ == "__main__":
    main()
