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
    free, so a re-run converges), and free disk space under the unit's base directory.
options:
  spec: {description: the node spec (pd_spec_checks view, no secrets), type: dict, required: true}
  state_dir: {description: the unit's state directory, type: path, required: true}
  python: {description: the node Python that runs the launcher (must be >= 3.9), type: str}
  min_free_mb: {description: free space needed under the base directory, type: int, default: 512}
  skip_commands:
    description: do not look for the process commands (they live in the image)
    type: bool
    default: false
  skip_paths:
    description: do not look for the spec's checks.paths (the proxy's live in its image)
    type: bool
    default: false
  extra_paths:
    description: more host paths that must exist (e.g. driver files a container mounts)
    type: list
    elements: str
    default: []
  container_cli:
    description:
      - the container CLI with its global arguments (e.g. [podman, --root, DIR]) when
        the unit runs in a container; then ports recorded in the unit's state file count
        as free while the container named O(container_name) runs with labels
        O(container_labels) (so a re-run converges)
    type: list
    elements: str
  container_name: {description: the unit's container name, type: str}
  container_labels: {description: labels the unit's container must carry, type: dict, default: {}}
"""

import errno
import json
import os
import shutil
import socket

from ansible.module_utils.basic import AnsibleModule


def _own_alive_ports(state_dir: str) -> set:
    path = os.path.join(state_dir, "launcher.json")
    try:
        with open(path) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return set()
    owned = set()
    for proc in state.get("processes", []):
        try:
            with open(f"/proc/{proc['pid']}/stat") as f:
                start = int(f.read().rsplit(")", 1)[1].split()[19])
        except (OSError, KeyError, ValueError):
            continue
        if start == proc.get("start_time"):
            owned.update((p["host"], int(p["port"])) for p in proc.get("ports", []))
    return owned


def _state_ports(state_dir: str) -> set:
    try:
        with open(os.path.join(state_dir, "launcher.json")) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return set()
    return {(p["host"], int(p["port"])) for proc in state.get("processes", [])
            for p in proc.get("ports", [])}


def _own_container_ports(module: AnsibleModule, state_dir: str) -> set:
    """Ports of our own unit container: it runs, and its labels are the unit's."""
    p = module.params
    rc, out, _ = module.run_command(list(p["container_cli"]) + ["container", "inspect",
                                                                p["container_name"]])
    if rc != 0:
        return set()
    try:
        info = json.loads(out)[0]
    except (ValueError, IndexError, KeyError):
        return set()
    status = str((info.get("State") or {}).get("Status") or "").lower()
    labels = (info.get("Config") or {}).get("Labels") or {}
    wanted = p["container_labels"] or {}
    if status != "running" or any(labels.get(k) != str(v) for k, v in wanted.items()):
        return set()
    return _state_ports(state_dir)


def _port_busy(host: str, port: int) -> str | None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    # as the servers themselves do: connections in TIME_WAIT from a previous run
    # must not make a restart refuse; a listener still makes the bind fail
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return "in use"
        if exc.errno == errno.EADDRNOTAVAIL:
            return "address not on this node"
        return str(exc)
    finally:
        sock.close()
    return None


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
    if module.params["python"]:
        rc, out, err = module.run_command(
            [module.params["python"], "-c", "import sys; print(sys.version_info >= (3, 9))"])
        if rc != 0 or out.strip() != "True":
            errors.append(f"python {module.params['python']} is missing or older than 3.9 "
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
            problem = _port_busy(*key)
            if problem:
                errors.append(f"port {key[0]}:{key[1]} ({proc['name']}/{p['use']}) {problem}")
    base = spec.get("base_dir") or "/"
    probe = base
    while not os.path.exists(probe):
        probe = os.path.dirname(probe) or "/"
    free_mb = shutil.disk_usage(probe).free // (1024 * 1024)
    if free_mb < module.params["min_free_mb"]:
        errors.append(f"only {free_mb} MiB free under {probe}, need {module.params['min_free_mb']}")
    if errors:
        module.fail_json(msg=f"{spec.get('node')} ({spec.get('role')}): " + "; ".join(errors),
                         errors=errors, free_mb=free_mb)
    module.exit_json(changed=False, free_mb=free_mb, owned_ports=len(owned))


if __name__ == "__main__":
    main()
