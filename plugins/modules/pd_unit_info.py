#!/usr/bin/python
"""Report the state of one pd-deploy launcher unit on a node (read-only)."""
from __future__ import annotations

DOCUMENTATION = r"""
module: pd_unit_info
short_description: State of a pd-deploy launcher unit (launcher + processes) on a node
description:
  - Reads the launcher state file C(<state_dir>/launcher.json), checks every recorded
    PID the way the launcher does (same start time and a matching command line, so a
    reused PID is never taken for ours) and optionally probes each process's readiness
    as the node spec describes it (HTTP GET ready on 200, or TCP connect).
  - Probes are direct connections to the node; C(http_proxy), C(https_proxy),
    C(ALL_PROXY) and C(no_proxy) are ignored.
  - Never changes anything; safe in check mode.
author: pd-deploy
options:
  state_dir:
    description: The unit's state directory (the spec's C(dirs.state)); or O(units).
    type: path
  units:
    description:
      - Several units of the node in one run (status.yml), each a dict with C(name),
        C(state_dir) and C(spec_path); the result then has RV(units) keyed by name
        (each as the single-unit result) and RV(damage) of them all.
    type: list
    elements: dict
    suboptions:
      name: {description: The unit's name (key of RV(units)), type: str, required: true}
      state_dir: {description: The unit's state directory, type: path, required: true}
      spec_path: {description: The unit's node spec, type: path}
  spec_path:
    description:
      - The unit's node spec, for the process list and readiness probes.
      - Without it (or while it is missing) the processes are the recorded ones and
        nothing is probed.
    type: path
  probe:
    description: Probe the readiness of every process that is not known to be dead.
    type: bool
    default: true
  timeout:
    description: Seconds per probe.
    type: float
    default: 2
  check_pids:
    description:
      - Verify the recorded PIDs. Set to false for units in a container (their PIDs
        belong to the container's PID namespace); a state file written in another PID
        namespace is never checked.
    type: bool
    default: true
"""

EXAMPLES = r"""
- name: Look at the prefill unit
  pd_unit_info:
    state_dir: /opt/pd/state/P
    spec_path: /opt/pd/run/P/spec.json
  register: unit

- name: Processes only, no probes (a unit in a container)
  pd_unit_info:
    state_dir: /opt/pd/state/D
    probe: false
    check_pids: false
"""

RETURN = r"""
spec_sha256:
  description: sha256 of the unit's spec file on the node (null without one); status.yml
    compares it with the spec planned now (a unit whose spec changed is stale).
  type: str
  returned: always
running_spec_sha256:
  description: sha256 of the spec file the unit's launcher runs (its state file), when
    the launcher records it; differs from RV(spec_sha256) until it restarts or reloads.
  type: str
  returned: always
units:
  description: With O(units), the single-unit result of each unit, keyed by its name.
  type: dict
  returned: with units
deployed:
  description: The spec file exists.
  type: bool
  returned: always
recorded:
  description: A state file exists (the launcher started, or failed and left it).
  type: bool
  returned: always
status:
  description: The launcher's status in the state file (starting, running, restarting,
    stopping, failed).
  type: str
  returned: always
  sample: running
restarts:
  description: How often the launcher restarted the unit after a crash (its restart
    policy; 0 without a state file).
  type: int
  returned: always
state_error:
  description: Why the state file could not be read (then it counts as recorded).
  type: str
  returned: when the state file is unreadable
damage:
  description:
    - What in the state file cannot be proven ours, each naming the node, unit and file
      (unreadable file, a recorded PID that now belongs to another process); also
      issued as warnings. Such PIDs are never signalled by stop or cleanup.
  type: list
  elements: str
  returned: always
launcher_pid:
  description: The recorded launcher PID.
  type: int
  returned: always
launcher_alive:
  description: The recorded launcher still runs (null when PIDs are not checked).
  type: bool
  returned: always
uptime_s:
  description: Seconds since the launcher started (null when not running or not checked).
  type: float
  returned: always
running:
  description: The launcher and every process are alive.
  type: bool
  returned: always
healthy:
  description: Every process answered its readiness probe.
  type: bool
  returned: always
processes:
  description: One entry per process of the spec (or of the state file without a spec).
  type: list
  elements: dict
  returned: always
  sample:
    - name: engine-dp0
      pid: 4242
      alive: true
      ready: true
      probe: "GET http://10.0.0.1:8000/health: 200"
      ports: ["10.0.0.1:8000/api"]
      dp_ranks: [0]
probe_seconds:
  description: Time spent probing.
  type: float
  returned: always
now:
  description: The node's clock (seconds since the epoch).
  type: float
  returned: always
"""

import hashlib
import json
import os

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.pd_unit import UnitError, unit_info


def spec_hashes(state_dir: str, spec_path: str | None) -> dict:
    """The spec file's sha256 and the one the launcher recorded it runs (both None when
    absent or unreadable: status then cannot call the unit stale)."""
    out = {"spec_sha256": None, "running_spec_sha256": None}
    if spec_path:
        try:
            with open(spec_path, "rb") as f:
                out["spec_sha256"] = hashlib.sha256(f.read()).hexdigest()
        except OSError:
            pass
    try:
        with open(os.path.join(state_dir, "launcher.json"), encoding="utf-8") as f:
            sha = json.load(f).get("spec_sha256")
        out["running_spec_sha256"] = sha if isinstance(sha, str) else None
    except (OSError, ValueError, AttributeError):
        pass
    return out


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "state_dir": {"type": "path"},
            "units": {"type": "list", "elements": "dict", "options": {
                "name": {"type": "str", "required": True},
                "state_dir": {"type": "path", "required": True},
                "spec_path": {"type": "path"},
            }},
            "spec_path": {"type": "path"},
            "probe": {"type": "bool", "default": True},
            "timeout": {"type": "float", "default": 2.0},
            "check_pids": {"type": "bool", "default": True},
        },
        required_one_of=[("state_dir", "units")],
        mutually_exclusive=[("state_dir", "units")],
        supports_check_mode=True,
    )
    p = module.params
    try:
        if p["units"] is not None:
            units = {}
            for u in p["units"]:
                units[u["name"]] = dict(
                    unit_info(u["state_dir"], u.get("spec_path"), p["probe"], p["timeout"],
                              p["check_pids"]),
                    **spec_hashes(u["state_dir"], u.get("spec_path")))
            result = {"changed": False, "units": units,
                      "damage": [d for r in units.values() for d in r["damage"]]}
        else:
            result = dict(unit_info(p["state_dir"], p["spec_path"], p["probe"], p["timeout"],
                                    p["check_pids"]),
                          **spec_hashes(p["state_dir"], p["spec_path"]))
    except UnitError as exc:
        module.fail_json(msg=str(exc))
    for d in result["damage"]:
        module.warn(d)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
