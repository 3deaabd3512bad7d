#!/usr/bin/python
"""Remove the files one pd-deploy unit put on a node (after it was stopped)."""
from __future__ import annotations

DOCUMENTATION = r"""
module: pd_unit_remove
short_description: Remove a stopped unit's run and state files (and logs if asked)
description:
  - Removes C(<base>/run/<unit>) and C(<base>/state/<unit>), C(<base>/logs/<unit>) when
    O(remove_logs) is true, and the launcher (C(<base>/lib)) once no unit is left on
    the node.
  - Refuses while the unit's launcher state file still exists (the unit was not
    stopped; C(python -m pd_launcher stop) removes it).
  - Only these paths, which pd-deploy created; supports check mode.
author: pd-deploy
options:
  base_dir:
    description: The node's C(pd_base_dir).
    type: path
    required: true
  unit:
    description:
      - The unit's name, a directory name under the node's run, state and logs
        directories - V(P), V(D), V(C) (the front door) or a service's name.
      - Letters, digits, C(-) and C(_) only, starting with a letter or digit.
    type: str
    required: true
    aliases: [role]
  stop_python:
    description:
      - Stop the unit first (process runtime) with C(<stop_python> -m pd_launcher stop)
        from the node's launcher package, when its state file exists. Only what the
        launcher recorded and can prove its own is signalled; a damaged state file is
        reported as warnings (and in RV(damage)). Without it a unit with a state file
        is refused.
    type: str
  remove_logs:
    description: Also remove the unit's logs.
    type: bool
    default: false
  systemd_unit:
    description:
      - The unit's boot-time systemd service file (node_unit's systemd.yml), removed
        after the unit when it carries the marker line; a file without it is not ours and
        stays. Where systemd runs and O(systemd_enable), it is disabled first and systemd
        reloaded after.
    type: dict
    suboptions:
      name: {description: The service's name, type: str, required: true}
      path: {description: Its unit file, type: path, required: true}
      marker: {description: The marker line a file of ours carries, type: str, required: true}
      unit: {description: "The unit it belongs to (from C(pd_systemd_files); unused)", type: str}
  systemd_enable:
    description: Disable the service with systemctl (where systemd runs).
    type: bool
    default: true
"""

EXAMPLES = r"""
- name: Remove the decode unit's files, keep its logs
  pd_unit_remove:
    base_dir: /opt/pd
    unit: D

- name: Remove the etcd service unit with its logs
  pd_unit_remove:
    base_dir: /opt/pd
    unit: etcd
    remove_logs: true
"""

RETURN = r"""
systemd_removed:
  description: The unit's systemd service file was ours and is removed (or would be).
  type: bool
  returned: always
stopped:
  description: The unit was stopped first (O(stop_python)).
  type: bool
  returned: always
damage:
  description: What in the unit's state file could not be proven ours (not signalled).
  type: list
  elements: str
  returned: always
removed:
  description: Paths removed (or, in check mode, that would be).
  type: list
  elements: str
  returned: always
  sample: [/opt/pd/run/D, /opt/pd/state/D]
"""

import os
import re
import shutil
import subprocess

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.pd_node import state_path

UNIT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def _stop(module: AnsibleModule, base: str, unit: str) -> tuple:
    """`pd_launcher stop` on the unit's state: only processes proven ours are signalled
    (PID + start time + command line, or the launcher holding the state dir's lock)."""
    lib = os.path.join(base, "lib")
    res = subprocess.run(
        [module.params["stop_python"], "-m", "pd_launcher", "stop", "--state-dir",
         os.path.join(base, "state", unit)],
        cwd=lib if os.path.isdir(lib) else None, env=dict(os.environ, PYTHONPATH=lib),
        stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    damage = [line.split("damage: ", 1)[1] for line in res.stderr.splitlines()
              if "damage: " in line]
    if res.returncode != 0:
        module.fail_json(msg=f"stopping unit {unit} failed (exit {res.returncode}): "
                             f"{(res.stderr or res.stdout).strip()}", damage=damage)
    return True, damage


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "base_dir": {"type": "path", "required": True},
            "unit": {"type": "str", "required": True, "aliases": ["role"]},
            "remove_logs": {"type": "bool", "default": False},
            "stop_python": {"type": "str"},
            "systemd_unit": {"type": "dict", "options": {
                "name": {"type": "str", "required": True},
                "path": {"type": "path", "required": True},
                "marker": {"type": "str", "required": True},
                "unit": {"type": "str"},  # as pd_systemd_files gives it; not used
            }},
            "systemd_enable": {"type": "bool", "default": True},
        },
        supports_check_mode=True,
    )
    base, role = module.params["base_dir"], module.params["unit"]
    if not UNIT_RE.match(role):
        module.fail_json(msg=f"unit {role!r} is not a unit name (letters, digits, - and _; "
                             "it names a directory under the node's base dir)")
    state_file = state_path(os.path.join(base, "state", role))
    stopped, damage = False, []
    if module.params["stop_python"] and os.path.exists(state_file):
        if module.check_mode:
            stopped = True  # would be stopped, then removed (listed below)
        else:
            stopped, damage = _stop(module, base, role)
    if os.path.exists(state_file) and not (module.check_mode and stopped):
        module.fail_json(msg=f"{state_file} still exists: the unit is not stopped (stop it "
                             "first: python -m pd_launcher stop --state-dir "
                             f"{os.path.dirname(state_file)})")
    targets = [os.path.join(base, "run", role), os.path.join(base, "state", role)]
    if module.params["remove_logs"]:
        targets.append(os.path.join(base, "logs", role))
    run_dir = os.path.join(base, "run")
    others = [d for d in (os.listdir(run_dir) if os.path.isdir(run_dir) else []) if d != role]
    if not others:
        targets += [os.path.join(base, d) for d in ("lib", "run", "state")]
        if module.params["remove_logs"]:
            targets.append(os.path.join(base, "logs"))
    removed = [t for t in targets if os.path.lexists(t)]
    if not module.check_mode:
        for path in removed:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.unlink(path)
    systemd_removed = _remove_systemd_unit(module)
    module.exit_json(changed=bool(removed) or stopped or systemd_removed, removed=removed,
                     stopped=stopped, damage=damage, systemd_removed=systemd_removed)


def _remove_systemd_unit(module: AnsibleModule) -> bool:
    """The unit's boot-time systemd service (node_unit's systemd.yml), only when its
    file carries our marker line: disabled (where systemd runs and systemd_enable),
    removed, daemon-reloaded. In the same run as the stop, so a cleanup costs no task
    more per host for it."""
    unit = module.params["systemd_unit"]
    if not unit:
        return False
    try:
        with open(unit["path"], encoding="utf-8", errors="replace") as f:
            ours = unit["marker"] in f.read().splitlines()
    except OSError:
        return False
    if not ours or module.check_mode:
        return ours
    live = module.params["systemd_enable"] and os.path.isdir("/run/systemd/system")
    if live:
        res = subprocess.run(["systemctl", "disable", unit["name"]], capture_output=True,
                             text=True, check=False)
        if res.returncode != 0:
            module.fail_json(msg=f"systemctl disable {unit['name']} failed: "
                                 f"{(res.stderr or res.stdout).strip()}")
    os.unlink(unit["path"])
    if live:
        subprocess.run(["systemctl", "daemon-reload"], capture_output=True, check=False)
    return True


if __name__ == "__main__":
    main()
