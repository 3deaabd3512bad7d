"""Read an inventory the way ansible-playbook does (group_vars/ and host_vars/ count)."""
from __future__ import annotations

import os
from typing import Any


def load_inventory(path: str, extra_vars: dict[str, Any] | None = None
                   ) -> tuple[dict[str, list[str]], dict[str, dict[str, Any]]]:
    """Return (groups, hostvars) for the P, D and C groups of an inventory.

    Uses Ansible's own InventoryManager and VariableManager, so the precedence of
    inventory vars, group_vars/ and host_vars/ files is exactly ansible-playbook's.
    Values are templated ("{{ ... }}" in inventory vars works as in a play).
    """
    from ansible.inventory.manager import InventoryManager
    from ansible.parsing.dataloader import DataLoader
    from ansible.template import Templar
    from ansible.vars.manager import VariableManager

    from pd_deploy.topology import HOST_KEYS

    if not os.path.exists(path):
        raise FileNotFoundError(f"inventory {path} does not exist")
    loader = DataLoader()
    inventory = InventoryManager(loader=loader, sources=[path])
    variables = VariableManager(loader=loader, inventory=inventory)
    if extra_vars:
        variables._extra_vars = dict(extra_vars)  # what -e does
    groups = {
        name: [h.name for h in inventory.groups[name].get_hosts()]
        for name in ("P", "D", "C") if name in inventory.groups
    }
    hostvars: dict[str, dict[str, Any]] = {}
    for name in {h for hosts in groups.values() for h in hosts}:
        host = inventory.get_host(name)
        raw = variables.get_vars(host=host, include_hostvars=False)
        templar = Templar(loader=loader, variables=raw)
        hostvars[name] = {
            k: _plain(templar.template(v)) for k, v in raw.items()
            if k.startswith("pd_") or k in HOST_KEYS
        }
    return groups, hostvars


def _plain(value: Any) -> Any:
    """Strip Ansible's tagged/unsafe wrappers so the planner sees plain Python data."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    return value
