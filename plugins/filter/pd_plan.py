"""Ansible filters over pd_deploy's cluster model, so plays never redo the arithmetic.

    pd_plan: "{{ groups | pd_cluster_plan(hostvars) }}"   # full plan incl. node specs
    spec:    "{{ pd_plan.specs[inventory_hostname]['P'] }}"  # unit: P, D, C or a service
    phases:  "{{ pd_plan.units[inventory_hostname] }}"       # unit -> before-engines |
                                                             # engines | after-engines | front-door

On invalid input the filter fails with every error, each naming host and field.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Any

from ansible.errors import AnsibleFilterError

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from pd_deploy import record  # noqa: E402
from pd_deploy.cli import plan_document, public_document, render_text  # noqa: E402
from pd_deploy.inventory import _plain  # noqa: E402
from pd_deploy.settings import PlanInvalid  # noqa: E402
from pd_deploy.status_table import pd_status_table  # noqa: E402
from pd_deploy.topology import HOST_KEYS  # noqa: E402


def _vars_of(hostvars: Any, host: str) -> dict[str, Any]:
    hv = hostvars[host]
    out = {}
    for key in hv.keys():
        if key.startswith("pd_") or key in HOST_KEYS:
            out[key] = _plain(hv[key])
    return out


def _inputs(groups: Any, hostvars: Any) -> tuple[dict, dict]:
    wanted = {g: list(groups.get(g, [])) for g in ("P", "D", "C") if g in groups}
    hosts = {h for members in wanted.values() for h in members}
    return wanted, {h: _vars_of(hostvars, h) for h in hosts}


def pd_cluster_errors(groups: Any, hostvars: Any) -> list[str]:
    """Every inventory error as 'host: field: message' ([] when the plan is valid)."""
    try:
        plan_document(*_inputs(groups, hostvars))
    except PlanInvalid as exc:
        return [str(e) for e in exc.errors]
    return []


def pd_cluster_summary(plan: dict[str, Any]) -> list[str]:
    """A secret-free, human summary of a plan (for the validate role's output)."""
    return render_text(public_document(plan)).splitlines()[:64]


def pd_spec_checks(spec: dict[str, Any]) -> dict[str, Any]:
    """What preflight needs of a node spec, without argv, env or files (no secrets).
    `role` names the unit (P, D, C or a service) in preflight's messages."""
    return {
        "node": spec["node"], "role": spec.get("unit") or spec["role"],
        "base_dir": spec.get("base_dir"),
        "checks": spec.get("checks") or {},
        "processes": [{"name": p["name"], "ports": p["ports"]} for p in spec["processes"]],
    }


def pd_cluster_plan(groups: Any, hostvars: Any, on_error: str = "fail") -> dict[str, Any]:
    """The plan; on an invalid inventory, fail listing every error, or with
    on_error='return' give {"errors": ["host: field: message", ...]} (so a play builds
    the plan once and asserts on the errors)."""
    try:
        return plan_document(*_inputs(groups, hostvars))
    except PlanInvalid as exc:
        if on_error == "return":
            return {"errors": [str(e) for e in exc.errors]}
        lines = "\n".join(f"  - {e}" for e in exc.errors)
        raise AnsibleFilterError(
            f"pd-deploy: the inventory has {len(exc.errors)} error(s):\n{lines}") from None


def pd_unit_spec(plan: dict[str, Any], host: str, unit: str, log_max_mb: Any,
                 log_backups: Any) -> dict[str, Any]:
    """One unit's node spec from the plan plus the log rotation knobs (spec `logs`: the
    launcher rotates every log of the unit above max_bytes), failing with the host and
    knob when a knob is out of range. One filter call instead of an assert and two
    set_facts per host and unit (each costs a round of the play on every host)."""
    bad = []
    if not re.fullmatch(r"[0-9]+", str(log_max_mb)) or int(log_max_mb) < 1:
        bad.append(f"pd_log_max_mb must be an integer >= 1 (MiB), got {log_max_mb!r}")
    if not re.fullmatch(r"[0-9]+", str(log_backups)) or int(log_backups) > 100:
        bad.append(f"pd_log_backups must be an integer in 0..100, got {log_backups!r}")
    if bad:
        raise AnsibleFilterError(f"{host}: " + "; ".join(bad))
    return record.with_log_knobs(plan["specs"][host][unit], log_max_mb, log_backups)


def pd_unit_locations(specs: dict[str, Any]) -> list[dict[str, str]]:
    """Where each unit of a host keeps its state and spec (pd_unit_info's `units`)."""
    return [{"name": name, "state_dir": spec["dirs"]["state"],
             "spec_path": spec["dirs"]["run"] + "/spec.json"} for name, spec in specs.items()]


def pd_container_hosts(groups: Any, hostvars: Any) -> list[str]:
    """The P, D and C hosts whose units run in containers (pd_runtime: container; the
    default is process): the image play runs on these only, so a process-runtime
    cluster pays nothing for it."""
    hosts = dict.fromkeys(h for g in ("P", "D", "C") for h in groups.get(g, []))
    return [h for h in hosts if str(hostvars[h].get("pd_runtime", "process")) == "container"]


def pd_spec_sha256(spec: dict[str, Any]) -> str:
    """sha256 of the bytes pd_unit_install / pd_unit_converge write as the unit's
    spec.json (plugins/module_utils/pd_unit.py canonical_spec; a unit test keeps the
    two equal)."""
    return record.spec_sha256(spec)


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "pd_cluster_plan": pd_cluster_plan,
            "pd_cluster_errors": pd_cluster_errors,
            "pd_cluster_summary": pd_cluster_summary,
            "pd_status_table": pd_status_table,
            "pd_spec_checks": pd_spec_checks,
            "pd_unit_spec": pd_unit_spec,
            "pd_unit_locations": pd_unit_locations,
            "pd_container_hosts": pd_container_hosts,
            "pd_spec_sha256": pd_spec_sha256,
        }
