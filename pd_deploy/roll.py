"""The order of a rolling restart (restart.yml, and site.yml -e pd_rolling=true): one
instance at a time, the upstreams the front door drains for it, and why a roll would
leave a role with nothing serving."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

POOL_OF = {"P": "prefill", "D": "decode"}


def _names(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, Iterable):
        return [str(v).strip() for v in value if str(v).strip()]
    return [str(value)]


def instance_upstreams(plan: Mapping[str, Any], inst: Mapping[str, Any]) -> list[str]:
    """The front door's upstreams (ip:port) served by the instance's API ports (none in
    router mode, where the front door sends to the engine's router)."""
    pool = set((plan.get("proxy") or {}).get(POOL_OF.get(inst["role"], ""), []) or [])
    out = []
    for host in inst["hosts"]:
        spec = plan["specs"][host][inst["role"]]
        for proc in spec["processes"]:
            for port in proc["ports"]:
                addr = f"{port['host']}:{port['port']}"
                if port["use"] == "api" and addr in pool and addr not in out:
                    out.append(addr)
    return out


def roll_plan(plan: Mapping[str, Any], scope: str = "all", instances: Any = None,
              only: Any = None, allow_outage: bool = False) -> dict[str, Any]:
    """{"instances": [{name, role, hosts, upstreams}, ...], "errors": [...]}: P instances
    first, then D, in plan order. `instances` (comma list) picks some; `only` (used by
    site.yml -e pd_rolling=true: the instances whose units changed) narrows further."""
    errors: list[str] = []
    if scope not in ("P", "D", "all"):
        errors.append(f"pd_restart_scope: must be P, D or all, got {scope!r}")
    roles = ("P", "D") if scope == "all" else (scope,)
    by_name = {i["name"]: i for i in plan["instances"]}
    wanted = _names(instances)
    for name in wanted:
        if name not in by_name:
            errors.append(f"pd_restart_instances: no instance {name!r} (the plan has "
                          f"{', '.join(by_name) or 'none'})")
        elif by_name[name]["role"] not in roles:
            errors.append(f"pd_restart_instances: {name} is a {by_name[name]['role']} "
                          f"instance, outside pd_restart_scope {scope}")
    picked = [i for role in roles for i in plan["instances"] if i["role"] == role
              and (not wanted or i["name"] in wanted)]
    if only is not None:
        keep = set(_names(only))
        picked = [i for i in picked if i["name"] in keep]
    out = []
    for inst in picked:
        ups = instance_upstreams(plan, inst)
        peers = [i for i in plan["instances"] if i["role"] == inst["role"]]
        router = (plan.get("front_door") or {}).get("mode") != "pd"
        alone = len(peers) == 1 if router or not ups else \
            set(ups) >= set((plan.get("proxy") or {}).get(POOL_OF[inst["role"]], []))
        # a prefill pool drained whole still serves when the front door falls back to
        # the decode (pd_proxy_fallback)
        fallback = inst["role"] == "P" and not router and bool(
            ((plan.get("proxy") or {}).get("options") or {}).get("fallback"))
        if alone and not fallback and not allow_outage:
            errors.append(f"{inst['name']}: the only {inst['role']} instance serving; "
                          "rolling it leaves no "
                          f"{POOL_OF[inst['role']]} (add an instance first, or set "
                          "pd_roll_allow_outage=true)")
        out.append({"name": inst["name"], "role": inst["role"], "hosts": list(inst["hosts"]),
                    "upstreams": ups})
    return {"instances": out, "errors": errors}


def pending_instances(plan: Mapping[str, Any], hostvars: Mapping[str, Any]) -> list[str]:
    """Instances with an engine unit that site.yml -e pd_rolling=true left to the roll:
    preflight found its launcher alive (`running`) but not running the planned spec and
    launcher (`converged`); node_unit skipped it for the same reason. In plan order."""
    out = []
    for inst in plan["instances"]:
        for host in inst["hosts"]:
            hv = hostvars[host] if host in hostvars else {}
            report = hv.get("pd_preflight_report") if hasattr(hv, "get") else None
            results = (report or {}).get("results") or []
            if any(r.get("item") == inst["role"] and r.get("running")
                   and not r.get("converged") for r in results if isinstance(r, Mapping)):
                out.append(inst["name"])
                break
    return out
