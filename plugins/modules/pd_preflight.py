#!/usr/bin/python
"""Check a node against its pd-deploy node spec before anything is changed."""
from __future__ import annotations

DOCUMENTATION = r"""
module: pd_preflight
short_description: Check a node for a pd-deploy node spec (read-only)
description:
  - Checks, and reports all at once, everything the spec needs on the node - the
    model path, accelerator device files, commands on PATH, that every port the
    spec binds is free (ports held by this unit's own recorded processes count as
    free, so a re-run converges), the node Python, and free disk space under the
    unit's base directory.
  - The port test is the launcher's own (C(pd_launcher.nodeutil), shared as
    C(ansible.module_utils.pd_node)) - a test bind with SO_REUSEADDR - and a busy port
    is reported with the PID and command line that hold it when they can be seen.
  - Never changes anything; safe in check mode.
author: pd-deploy
options:
  spec:
    description: The node spec (the C(pd_spec_checks) view, no secrets).
    type: dict
    required: true
  state_dir:
    description: The unit's state directory (its recorded processes own their ports).
    type: path
    required: true
  python:
    description: The node Python that runs the launcher (must be >= 3.9).
    type: str
  min_free_mb:
    description: Free space needed under the base directory, in MiB.
    type: int
    default: 512
  skip_commands:
    description: Do not look for the process commands (they live in the image).
    type: bool
    default: false
  skip_paths:
    description: Do not look for the spec's C(checks.paths) (the proxy's live in its image).
    type: bool
    default: false
  extra_paths:
    description: More host paths that must exist (e.g. driver files a container mounts).
    type: list
    elements: str
    default: []
  container_cli:
    description:
      - The container CLI with its global arguments (e.g. C([podman, --root, DIR])) when
        the unit runs in a container; then ports recorded in the unit's state file count
        as free while the container named O(container_name) runs with labels
        O(container_labels) (so a re-run converges).
    type: list
    elements: str
  container_name:
    description: The unit's container name (required with O(container_cli)).
    type: str
  converged:
    description:
      - Process runtime. Also report whether the unit already runs the wanted spec and
        launcher with every process ready (RV(converged)), so the engine play can skip
        it. A dict with C(spec_path), C(spec_sha256) (of the spec file's bytes),
        C(lib_dir) and C(bundle_sha256).
    type: dict
  container_labels:
    description: Labels the unit's container must carry.
    type: dict
    default: {}
"""

EXAMPLES = r"""
- name: Check the node for the decode unit
  pd_preflight:
    spec: "{{ spec | pd_spec_checks }}"
    state_dir: /opt/pd/state/D
    python: /usr/bin/python3
    min_free_mb: 1024

- name: Check a containerised unit (commands and model path are in the image)
  pd_preflight:
    spec: "{{ spec | pd_spec_checks }}"
    state_dir: /opt/pd/state/P
    skip_commands: true
    extra_paths: [/usr/local/Ascend/driver]
    container_cli: [podman]
    container_name: pd-demo-p1-P
    container_labels: {pd.cluster: demo, pd.role: P, pd.node: p1}
"""

RETURN = r"""
lib_current:
  description: With O(converged), the node's launcher package is the wanted bundle (null without).
  type: bool
  returned: always
converged:
  description: With O(converged), the unit runs the wanted spec and launcher and is ready.
  type: bool
  returned: always
running:
  description: With O(converged), the unit's launcher is alive (whatever spec it runs).
  type: bool
  returned: always
systemd:
  description: The node runs systemd (C(/run/systemd/system) exists).
  type: bool
  returned: always
free_mb:
  description: Free space under the base directory (or its nearest existing parent), MiB.
  type: int
  returned: always
owned_ports:
  description: Ports of the spec held by the unit itself (counted as free).
  type: int
  returned: success
errors:
  description: Every problem found; the message joins them.
  type: list
  elements: str
  returned: failure
  sample:
    - "port 10.0.0.1:8000 is already in use by pid 4242 (python3 -m http.server) (engine-dp0/api)"
"""

import json
import os
import shutil

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.pd_node import port_problem, read_state, verify_recorded
from ansible.module_utils.pd_unit import UnitError, lib_is, unit_converged, unit_info


def _read_state(state_dir: str) -> dict:
    try:
        return read_state(state_dir) or {}
    except (OSError, ValueError):
        return {}


def _ports(proc: dict) -> set:
    return {(p["host"], int(p["port"])) for p in proc.get("ports", [])}


def _own_alive_ports(state_dir: str) -> set:
    """Ports of the unit's recorded processes that still run (same PID check as the
    launcher's stop)."""
    owned = set()
    for proc in _read_state(state_dir).get("processes", []):
        if verify_recorded(proc)[0] == "ours":
            owned |= _ports(proc)
    return owned


def _own_container_ports(module: AnsibleModule, state_dir: str) -> set:
    """Ports of our own unit container: it runs, and its labels are the unit's."""
    p = module.params
    rc, out, _ = module.run_command(list(p["container_cli"]) + ["container", "inspect",
                                                                p["container_name"]])
    if rc != 0:
        return set()
    try:
        info = json.loads(out)[0]
    except (ValueError, IndexError, KeyError, TypeError):
        return set()
    status = str((info.get("State") or {}).get("Status") or "").lower()
    labels = (info.get("Config") or {}).get("Labels") or {}
    wanted = p["container_labels"] or {}
    if status != "running" or any(labels.get(k) != str(v) for k, v in wanted.items()):
        return set()
    owned = set()
    for proc in _read_state(state_dir).get("processes", []):
        owned |= _ports(proc)
    return owned


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "spec": {"type": "dict", "required": True},
            "state_dir": {"type": "path", "required": True},
            "min_free_mb": {"type": "int", "default": 512},
            "python": {"type": "str"},
            "skip_commands": {"type": "bool", "default": False},
            "skip_paths": {"type": "bool", "default": False},
            "extra_paths": {"type": "list", "elements": "str", "default": []},
            "container_cli": {"type": "list", "elements": "str"},
            "container_name": {"type": "str"},
            "container_labels": {"type": "dict", "default": {}},
            "converged": {"type": "dict"},
        },
        required_together=[["container_cli", "container_name"]],
        supports_check_mode=True,
    )
    spec = module.params["spec"]
    checks = spec.get("checks") or {}
    errors = []
    if not module.params["skip_paths"]:
        for path in checks.get("paths", []):
            if not os.path.exists(path):
                errors.append(f"model path {path} does not exist")
    for path in module.params["extra_paths"]:
        if not os.path.exists(path):
            errors.append(f"{path} does not exist")
    for dev in checks.get("devices", []):
        if not os.path.exists(dev):
            errors.append(f"device {dev} does not exist")
    if not module.params["skip_commands"]:
        for cmd in checks.get("commands", []):
            if not (os.path.isabs(cmd) and os.access(cmd, os.X_OK)) and not shutil.which(cmd):
                errors.append(f"command {cmd} not found")
    python = module.params["python"]
    if python and not (os.access(python, os.X_OK) if "/" in python else shutil.which(python)):
        errors.append(f"python {python} not found (the launcher needs Python >= 3.9)")
    elif python:
        rc, out, err = module.run_command(
            [python, "-c", "import sys; print(sys.version_info >= (3, 9))"])
        if rc != 0 or out.strip() != "True":
            errors.append(f"python {python} is older than 3.9 or does not run "
                          f"({(err or out).strip()[:200]})")
    if module.params["container_cli"]:
        owned = _own_container_ports(module, module.params["state_dir"])
    else:
        owned = _own_alive_ports(module.params["state_dir"])
    for proc in spec.get("processes", []):
        for p in proc.get("ports", []):
            key = (p["host"], int(p["port"]))
            if key in owned:
                continue
            problem = port_problem(*key)
            if problem:
                errors.append(f"{problem} ({proc['name']}/{p['use']})")
    where = spec.get("base_dir") or "/"
    while not os.path.exists(where):
        where = os.path.dirname(where) or "/"
    free_mb = shutil.disk_usage(where).free // (1024 * 1024)
    if free_mb < module.params["min_free_mb"]:
        errors.append(f"only {free_mb} MiB free under {where}, need {module.params['min_free_mb']}")
    if errors:
        module.fail_json(msg=f"{spec.get('node')} ({spec.get('role')}): " + "; ".join(errors),
                         errors=errors, free_mb=free_mb)
    converged, lib_current, running = False, None, False
    want = module.params["converged"]
    if want:
        try:
            lib_current = lib_is(want["lib_dir"], want["bundle_sha256"])
            converged = lib_current and unit_converged(
                want["spec_path"], want["spec_sha256"], want["lib_dir"],
                want["bundle_sha256"], module.params["state_dir"])
            # its launcher lives (site.yml -e pd_rolling=true leaves such a unit, if
            # changed, to the roll)
            running = converged or bool(unit_info(module.params["state_dir"], None,
                                                  probe=False)["launcher_alive"])
        except (UnitError, KeyError):
            converged = False
    # node_unit installs a boot-time systemd service only where systemd runs
    module.exit_json(changed=False, free_mb=free_mb, owned_ports=len(owned),
                     converged=converged, lib_current=lib_current, running=running,
                     systemd=os.path.isdir("/run/systemd/system"))


if __name__ == "__main__":
    main()
