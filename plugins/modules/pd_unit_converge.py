#!/usr/bin/python
"""Converge one pd-deploy unit of the process runtime in one module run."""
from __future__ import annotations

DOCUMENTATION = r"""
module: pd_unit_converge
short_description: Install, check and start one pd-deploy unit (process runtime) in one run
description:
  - What pd_unit_install, pd_unit_info and the launcher's C(stop), C(run --check) and
    C(run) did as separate tasks, in one module run, so a converged node costs one
    round trip per unit.
  - Installs the unit's directories, launcher package and spec (as pd_unit_install).
    When O(bundle_sha256) is given and the node's launcher package already is that
    bundle, no tarball is needed on the node. When one is needed and O(bundle) is not
    that bundle, nothing is changed and RV(need_bundle) is true (ship it, call again).
  - Then looks at the unit (as pd_unit_info, with readiness probes). A unit whose spec
    or launcher changed, or with O(force_restart), is restarted; a unit that is not
    running (and whose launcher is not alive, e.g. starting or backing off before a
    restart) is started. Stopping runs C(pd_launcher stop) on the recorded state (only
    processes proven ours are signalled); starting runs C(pd_launcher run --check) and
    then C(pd_launcher run) in its own session, without waiting for readiness (the
    caller waits with C(pd_launcher wait), so all nodes of an instance start together).
  - Reload instead of a restart - when the unit is alive, its launcher package did not
    change, O(force_restart) is false, the spec changed and the new spec has a process
    with a C(reload_signal) (the front door's proxy agent), C(pd_launcher reload) runs
    after the new spec file was written. The launcher applies it when only the spec's
    C(files) (and C(proxy) block) changed - it writes them and signals those processes,
    nothing is restarted, in-flight requests go on - and RV(action) is C(reload). When
    other fields differ (its exit 3) the unit is restarted as usual and
    RV(reload_refused) says why; any other failure of the reload fails the task.
  - Supports check mode (reports what would change, runs nothing).
author: pd-deploy
options:
  spec_json:
    description: The node spec as JSON (may carry API keys; never logged).
    type: str
    required: true
  bundle:
    description: Path of the launcher bundle tarball on the node.
    type: path
    required: true
  bundle_sha256:
    description: The sha256 of the controller's launcher bundle; empty to always read O(bundle).
    type: str
    default: ""
  bundle_b64:
    description:
      - The launcher bundle itself, base64 (the validate role reads it once on the
        controller). Sent only to nodes that lack it, it saves shipping the tarball as
        a file (a copy task, two more round trips); replaces reading O(bundle).
    type: str
  lib_dir:
    description: Where the launcher package is unpacked.
    type: path
    required: true
  python:
    description: The Python that runs the launcher (pd_python).
    type: str
    required: true
  environment:
    description: Environment for the launcher commands (e.g. proxy variables cleared).
    type: dict
    default: {}
  force_restart:
    description: Restart the unit even when nothing changed.
    type: bool
    default: false
"""

EXAMPLES = r"""
- name: Converge the prefill unit
  pd_unit_converge:
    spec_json: "{{ spec | to_json }}"
    bundle: /opt/pd/lib/pd_launcher.tar.gz
    bundle_sha256: "{{ bundle_sha }}"
    lib_dir: /opt/pd/lib
    python: /usr/bin/python3
  register: unit
  no_log: true
"""

RETURN = r"""
need_bundle:
  description: The launcher package must be (re)installed and O(bundle) is not the wanted bundle.
  type: bool
  returned: always
action:
  description: What was (or would be) done, C(keep), C(start), C(restart), C(reload) (or
    C(none)). C(none) goes with need_bundle. C(reload) - the running launcher applied
    the new spec's files without a restart (check mode - would try to).
  type: str
  returned: always
reload_refused:
  description: Why the launcher refused a reload (fields other than files differ, e.g.
    C(processes[0].argv differs - restart needed)); the unit was restarted instead.
  type: str
  returned: when a reload was refused
lib_changed:
  description: The launcher package was (or would be) unpacked.
  type: bool
  returned: always
spec_changed:
  description: The spec file was (or would be) written.
  type: bool
  returned: always
created:
  description: Directories created (lib, run, state, log).
  type: list
  elements: str
  returned: always
healthy:
  description: Every process passed its readiness probe before this run and was left
    running (kept, or reloaded - the probes of before the reload).
  type: bool
  returned: always
running:
  description: The launcher and every process of the unit ran before this run.
  type: bool
  returned: always
restarts:
  description: Restarts after crashes recorded in the unit's state before this run.
  type: int
  returned: always
damage:
  description: What in the state file could not be proven ours (never signalled).
  type: list
  elements: str
  returned: always
"""

import base64
import binascii
import json
import os
import subprocess

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.pd_unit import UnitError, install_unit, unit_info

#: `pd_launcher reload`: how long to wait for the launcher (s); its "not reloadable" exit
RELOAD_TIMEOUT = 30
RELOAD_REFUSED = 3


def _launcher(module: AnsibleModule, env: dict, args: list, what: str) -> str:
    p = module.params
    res = subprocess.run([p["python"], "-m", "pd_launcher"] + args, cwd=p["lib_dir"], env=env,
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        module.fail_json(msg=f"{what} failed (exit {res.returncode}): "
                             f"{(res.stderr or res.stdout).strip()}",
                         rc=res.returncode, stdout=res.stdout, stderr=res.stderr)
    return res.stderr


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "spec_json": {"type": "str", "required": True, "no_log": True},
            "bundle": {"type": "path", "required": True},
            "bundle_sha256": {"type": "str", "default": ""},
            "bundle_b64": {"type": "str"},
            "lib_dir": {"type": "path", "required": True},
            "python": {"type": "str", "required": True},
            "environment": {"type": "dict", "default": {}},
            "force_restart": {"type": "bool", "default": False},
        },
        supports_check_mode=True,
    )
    p = module.params
    try:
        data = base64.b64decode(p["bundle_b64"], validate=True) if p["bundle_b64"] else None
    except (binascii.Error, ValueError) as exc:
        module.fail_json(msg=f"bundle_b64 is not base64: {exc}")
    try:
        inst = install_unit(p["spec_json"], p["bundle"], p["lib_dir"], module.check_mode,
                            p["bundle_sha256"], data)
        if inst["need_bundle"]:
            module.exit_json(**dict(inst, action="none", healthy=False, running=False,
                                    restarts=0, damage=[]))
        spec = json.loads(p["spec_json"])
        dirs = spec["dirs"]
        now = unit_info(dirs["state"], inst["spec_path"], probe=True)
    except UnitError as exc:
        module.fail_json(msg=str(exc))
    for d in now["damage"]:
        module.warn(d)
    # running, or still starting / backing off (the caller waits)
    alive = bool(now["running"] or now["launcher_alive"])
    reloadable = any(isinstance(q, dict) and q.get("reload_signal")
                     for q in spec.get("processes") or [])
    if (alive and inst["spec_changed"] and reloadable and not inst["lib_changed"]
            and not p["force_restart"]):
        action = "reload"  # falls back to restart when the launcher refuses
    elif alive and (inst["lib_changed"] or inst["spec_changed"] or p["force_restart"]):
        action = "restart"
    elif alive:
        action = "keep"
    else:
        action = "start"  # also a unit installed or changed while it was not running
    result = dict(inst, action=action,
                  healthy=bool(now["healthy"] and action in ("keep", "reload")),
                  running=now["running"], launcher_alive=now["launcher_alive"],
                  recorded=now["recorded"], restarts=now["restarts"], damage=now["damage"])
    result["changed"] = bool(inst["changed"] or action != "keep")
    if module.check_mode or action == "keep":
        module.exit_json(**result)
    env = dict(os.environ, **{k: str(v) for k, v in p["environment"].items()},
               PYTHONPATH=p["lib_dir"])
    state_args = ["--state-dir", dirs["state"]]
    if action == "reload":
        res = subprocess.run([p["python"], "-m", "pd_launcher", "reload", inst["spec_path"]]
                             + state_args + ["--timeout", str(RELOAD_TIMEOUT)],
                             cwd=p["lib_dir"], env=env, stdin=subprocess.DEVNULL,
                             capture_output=True, text=True, check=False)
        if res.returncode == 0:
            module.exit_json(**result)
        why = (res.stderr or res.stdout).strip()
        if res.returncode != RELOAD_REFUSED:
            module.fail_json(msg=f"reloading the unit failed (exit {res.returncode}): {why}",
                             rc=res.returncode, stdout=res.stdout, stderr=res.stderr)
        # fields other than files differ: the normal restart
        result.update(action="restart", healthy=False,
                      reload_refused=why.split("not reloadable: ", 1)[-1])
    if now["recorded"] and os.path.exists(os.path.join(dirs["state"], "launcher.json")):
        err = _launcher(module, env, ["stop"] + state_args, "stopping the unit")
        result["damage"] += [line.split("damage: ", 1)[1] for line in err.splitlines()
                             if "damage: " in line]
    run = ["run", inst["spec_path"]] + state_args + ["--log-dir", dirs["log"]]
    _launcher(module, env, run + ["--check"], "checking the node for the spec")
    out = os.open(os.path.join(dirs["log"], "launcher.out"),
                  os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        # its own session: it outlives this module run and any SSH session
        subprocess.Popen([p["python"], "-m", "pd_launcher"] + run, cwd=p["lib_dir"], env=env,
                         stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                         start_new_session=True, close_fds=True)
    except OSError as exc:
        module.fail_json(msg=f"cannot start the launcher with {p['python']}: {exc}")
    finally:
        os.close(out)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
