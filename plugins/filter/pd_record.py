"""Filters of the deployment record (pd_deploy/record.py) and of rolling restarts
(pd_deploy/roll.py): thin wrappers that turn their errors into Ansible errors."""
from __future__ import annotations

from typing import Any

from ansible.errors import AnsibleFilterError

from pd_deploy import record, roll


def pd_record_file(sources: Any, cluster: str, override: str = "") -> str:
    try:
        return record.record_file(list(sources or []), cluster, override or "")
    except record.RecordError as exc:
        raise AnsibleFilterError(f"pd-deploy: {exc}") from None


def pd_record_load(path: str, cluster: str) -> dict[str, Any]:
    try:
        return record.load(path, cluster)
    except record.RecordError as exc:
        raise AnsibleFilterError(f"pd-deploy: {exc}") from None


def pd_record_update(rec: dict[str, Any], plan: dict[str, Any], hostvars: Any,
                     now: str) -> dict[str, Any]:
    return record.update(rec, plan, hostvars, now)


def pd_record_removals(rec: dict[str, Any], plan: dict[str, Any]) -> list[dict[str, Any]]:
    return record.removals(rec, plan)


def pd_record_mark_removed(rec: dict[str, Any], hosts: Any, hostvars: Any,
                           now: str) -> dict[str, Any]:
    """The record after the removal play: each host's `pd_scale_in_removed` (the unit
    names it stopped and removed) is recorded as removed."""
    removed = {}
    for host in hosts or []:
        hv = hostvars[host] if host in hostvars else {}
        names = hv.get("pd_scale_in_removed") if hasattr(hv, "get") else None
        if names:
            removed[host] = [str(n) for n in names]
    return record.mark_removed(rec, removed, now)


def pd_record_json(rec: dict[str, Any]) -> str:
    return record.dumps(rec)


def pd_roll_plan(plan: dict[str, Any], scope: str = "all", instances: Any = None,
                 only: Any = None, allow_outage: Any = False) -> dict[str, Any]:
    return roll.roll_plan(plan, str(scope), instances, only,
                          str(allow_outage).lower() in ("true", "1", "yes"))


def pd_record_unit_locations(units: list[dict[str, Any]]) -> list[dict[str, str]]:
    """pd_unit_info's `units` for recorded units (by their base dir)."""
    return [{"name": u["name"], "state_dir": f"{u['base_dir']}/state/{u['name']}",
             "spec_path": f"{u['base_dir']}/run/{u['name']}/spec.json"} for u in units]


def pd_roll_pending(plan: dict[str, Any], hostvars: Any) -> list[str]:
    return roll.pending_instances(plan, hostvars)


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "pd_record_file": pd_record_file,
            "pd_record_load": pd_record_load,
            "pd_record_update": pd_record_update,
            "pd_record_removals": pd_record_removals,
            "pd_record_mark_removed": pd_record_mark_removed,
            "pd_record_json": pd_record_json,
            "pd_roll_plan": pd_roll_plan,
            "pd_roll_pending": pd_roll_pending,
            "pd_record_unit_locations": pd_record_unit_locations,
        }
