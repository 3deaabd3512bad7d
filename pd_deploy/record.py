"""The deployment record: what pd-deploy started, where, and how to reach it again.

Kept on the controller beside the inventory (`pd-deploy-record.<cluster>.json` in the
inventory's directory, or `pd_record_file`), written by site.yml after preflight (the
units it is about to run) and after scale in (the units it removed). It is what lets
site.yml reach a host that is no longer in the inventory to drain and stop its units,
and status.yml show such units as orphans (docs/day2.md).

    {"pd_deploy_record": 1, "cluster": "local",
     "hosts": {"p1a": {"connection": {"ansible_host": "127.0.1.1", ...},
                       "python": "python3", "runtime": "process",
                       "units": {"P": {"role": "P", "instance": "P1", "phase": "engines",
                                       "base_dir": "...", "spec_sha256": "...",
                                       "image": null, "deployed_at": "...",
                                       "state": "deployed"}}}}}

Secrets never go in: no password variable is recorded (a removed host is reached with
keys, an agent or group_vars of the `pd_removed` group).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from typing import Any, Mapping

from pd_deploy.settings import default_of

VERSION = 1
# how Ansible reaches a host; passwords (ansible_password, ansible_become_password,
# ansible_ssh_pass ...) are deliberately absent
CONNECTION_VARS = ("ansible_host", "ansible_port", "ansible_user", "ansible_connection",
                   "ansible_python_interpreter", "ansible_ssh_private_key_file",
                   "ansible_ssh_common_args", "ansible_ssh_extra_args", "ansible_become",
                   "ansible_become_user", "ansible_become_method")
# per-host knobs the removal play needs on a host the inventory no longer describes
HOST_KNOBS = ("pd_python", "pd_runtime", "pd_container_cli", "pd_container_cli_args",
              "pd_container_env")


class RecordError(ValueError):
    """The record file cannot be read or is not a pd-deploy record."""


def record_file(sources: list[str] | tuple[str, ...], cluster: str, override: str = "") -> str:
    """Where the record of CLUSTER lives: `override`, else beside the first inventory
    source (in it when the source is a directory)."""
    if override:
        return override
    if not sources:
        raise RecordError("no inventory source to keep the deployment record beside; "
                          "set pd_record_file")
    src = os.path.abspath(sources[0])
    where = src if os.path.isdir(src) else os.path.dirname(src)
    return os.path.join(where, f"pd-deploy-record.{cluster}.json")


def empty(cluster: str) -> dict[str, Any]:
    return {"pd_deploy_record": VERSION, "cluster": cluster, "hosts": {}}


def load(path: str, cluster: str) -> dict[str, Any]:
    """The record at PATH (an empty one when there is no file yet)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return empty(cluster)
    except (OSError, ValueError) as exc:
        raise RecordError(f"deployment record {path}: cannot read it: {exc}; fix or move "
                          "it aside (without it, hosts removed from the inventory are "
                          "not found)") from None
    problems = check(data, cluster)
    if problems:
        raise RecordError(f"deployment record {path}: " + "; ".join(problems))
    return data


def check(data: Any, cluster: str) -> list[str]:
    """Every problem of a record's shape (empty when it is usable)."""
    if not isinstance(data, dict) or data.get("pd_deploy_record") != VERSION:
        return [f"not a pd-deploy record of version {VERSION}"]
    out = []
    if data.get("cluster") != cluster:
        out.append(f"it records cluster {data.get('cluster')!r}, not {cluster!r}")
    hosts = data.get("hosts")
    if not isinstance(hosts, dict):
        return out + ["hosts must be an object"]
    for host, entry in hosts.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("units"), dict) \
                or not isinstance(entry.get("connection"), dict):
            out.append(f"host {host}: needs objects connection and units")
            continue
        for unit, u in entry["units"].items():
            if not isinstance(u, dict) or u.get("state") not in ("deployed", "removed") \
                    or not isinstance(u.get("base_dir"), str):
                out.append(f"host {host}, unit {unit}: needs state deployed|removed and "
                           "base_dir")
    return out


def _get(hv: Any, name: str) -> Any:
    value = hv.get(name) if hasattr(hv, "get") else None
    return default_of(name) if value is None else value


def spec_sha256(spec: Mapping[str, Any]) -> str:
    """sha256 of the unit's spec.json as the node writes it (canonical JSON)."""
    return hashlib.sha256((json.dumps(spec, indent=2, sort_keys=True) + "\n").encode()
                          ).hexdigest()


def with_log_knobs(spec: Mapping[str, Any], log_max_mb: Any, log_backups: Any
                   ) -> dict[str, Any]:
    """A plan spec plus the log rotation knobs (spec `logs`), as node_unit writes it."""
    out = dict(spec)
    out["logs"] = dict(out.get("logs") or {}, max_bytes=int(log_max_mb) * 1048576,
                       backups=int(log_backups))
    return out


def unit_spec(plan: Mapping[str, Any], host: str, unit: str, hv: Any) -> dict[str, Any]:
    """The unit's spec as node_unit writes it (plan spec + the host's log knobs)."""
    return with_log_knobs(plan["specs"][host][unit], _get(hv, "pd_log_max_mb"),
                          _get(hv, "pd_log_backups"))


def update(record: Mapping[str, Any], plan: Mapping[str, Any], hostvars: Mapping[str, Any],
           now: str) -> dict[str, Any]:
    """The record after this run deploys the plan: every planned unit `deployed` with
    its spec hash. A unit whose hash is unchanged keeps its deployed_at (a converged
    re-run writes the same bytes). Recorded units the plan no longer has stay as they
    are until the removal marks them (mark_removed)."""
    out = copy.deepcopy(dict(record))
    if not preflight_passed(plan, hostvars):
        return out  # nothing starts after a failed preflight: nothing to record
    hosts = out.setdefault("hosts", {})
    for host, units in plan["specs"].items():
        hv = hostvars[host]
        old = hosts.get(host) or {}
        entry = {
            "connection": {k: hv[k] for k in CONNECTION_VARS
                           if hasattr(hv, "get") and hv.get(k) is not None},
            "knobs": {k: _get(hv, k) for k in HOST_KNOBS},
            "units": dict(old.get("units") or {}),
        }
        for name, spec in units.items():
            sha = spec_sha256(unit_spec(plan, host, name, hv))
            prev = entry["units"].get(name) or {}
            container = entry["knobs"]["pd_runtime"] == "container"
            unit = {"role": spec.get("role"), "instance": spec.get("instance"),
                    "phase": plan["units"][host][name], "base_dir": spec["base_dir"],
                    "spec_sha256": sha, "image": _get(hv, "pd_image") if container else None,
                    "state": "deployed"}
            same = all(prev.get(k) == v for k, v in unit.items())
            unit["deployed_at"] = prev["deployed_at"] if same and prev.get("deployed_at") \
                else now
            entry["units"][name] = unit
        hosts[host] = entry
    return out


def preflight_passed(plan: Mapping[str, Any], hostvars: Mapping[str, Any]) -> bool:
    """Preflight passed on every planned host, or did not run at all (site.yml --tags
    engines). A host without a report when others have one failed or was unreachable
    (the play is any_errors_fatal: the others stopped there too)."""
    reports = []
    for host in plan["specs"]:
        hv = hostvars[host] if host in hostvars else {}
        reports.append(hv.get("pd_preflight_report") if hasattr(hv, "get") else None)
    if all(r is None for r in reports):
        return True
    return all(isinstance(r, Mapping) and not r.get("failed") for r in reports)


def removals(record: Mapping[str, Any], plan: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Recorded `deployed` units the plan no longer has, by host: what scale in stops
    (and what status shows as orphans). A host still in the inventory is reached with
    its inventory variables; one that is gone with the recorded ones."""
    out = []
    for host, entry in sorted((record.get("hosts") or {}).items()):
        planned = plan["specs"].get(host) or {}
        gone = [dict(u, name=name) for name, u in sorted(entry["units"].items())
                if u.get("state") == "deployed" and name not in planned]
        if not gone:
            continue
        # the removal play stops engines after the front door and services that need them
        gone.sort(key=lambda u: ({"front-door": 0, "after-engines": 1, "engines": 2,
                                  "before-engines": 3}.get(u.get("phase"), 2), u["name"]))
        out.append({"host": host, "in_inventory": host in plan["specs"],
                    "connection": entry.get("connection") or {},
                    "knobs": entry.get("knobs") or {}, "units": gone})
    return out


def mark_removed(record: Mapping[str, Any], removed: Mapping[str, list[str]],
                 now: str) -> dict[str, Any]:
    """The record after scale in removed REMOVED (host -> unit names)."""
    out = copy.deepcopy(dict(record))
    for host, names in removed.items():
        units = (out.get("hosts", {}).get(host) or {}).get("units") or {}
        for name in names:
            if name in units and units[name].get("state") == "deployed":
                units[name] = dict(units[name], state="removed", removed_at=now)
    return out


def dumps(record: Mapping[str, Any]) -> str:
    return json.dumps(record, indent=2, sort_keys=True) + "\n"
