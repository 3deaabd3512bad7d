"""ClusterPlan -> node specs: the exact input of `python -m pd_launcher run` per unit.

A unit is one launcher (one container with the container runtime) on one host:
  P / D       the host's engine processes, built by the cluster's backend;
  <service>   a cluster service on a C host (etcd, Redis, an engine's router), built
              by the backend, with a phase: before-engines or after-engines;
  C           the front door on a C host: nginx (+ proxy agent) on pd_proxy_port.
specs[host][unit] is the spec (docs/node-spec.md). Engine-neutral: what differs per
engine comes from plan.backend (pd_deploy/engines/).
"""
from __future__ import annotations

from typing import Any

from pd_deploy.engines.base import PHASES, FrontDoor, Service
from pd_deploy.topology import ClusterPlan, Node, ProxyHost

SCHEMA = 1
UNIT_ROLES = ("P", "D", "C")  # unit names that are roles; any other unit is a service


def dirs_for(base_dir: str, unit: str) -> dict[str, str]:
    return {
        "state": f"{base_dir}/state/{unit}",
        "log": f"{base_dir}/logs/{unit}",
        "run": f"{base_dir}/run/{unit}",
    }


def engine_spec_base(plan: ClusterPlan, node: Node, processes: list[dict[str, Any]], *,
                     checks: dict[str, list[str]], nic: dict[str, Any] | None,
                     files: list[dict[str, Any]] | None = None,
                     pre_start: list[list[str]] | None = None) -> dict[str, Any]:
    """The node spec of a P/D node around the processes a backend built."""
    inst = plan.instance(node.instance)
    return {
        "schema": SCHEMA,
        "cluster": plan.cluster,
        "node": node.host,
        "role": node.role,
        "ip": node.ip,
        "instance": inst.name,
        "master": node.master,
        "engine": inst.engine,
        "base_dir": node.base_dir,
        "dirs": dirs_for(node.base_dir, node.role),
        "grace_seconds": node.grace,
        "checks": checks,
        "nic": nic,
        "files": files or [],
        "pre_start": pre_start or [],
        "processes": processes,
        "proxy": None,
    }


def service_spec(plan: ClusterPlan, proxy: ProxyHost, svc: Service) -> dict[str, Any]:
    """The unit of one cluster service on one C host."""
    return {
        "schema": SCHEMA,
        "cluster": plan.cluster,
        "node": proxy.host,
        "role": "C",
        "unit": svc.name,
        "phase": svc.phase,
        "ip": proxy.ip,
        "instance": None,
        "master": False,
        "engine": plan.backend.name,
        "base_dir": proxy.base_dir,
        "dirs": dirs_for(proxy.base_dir, svc.name),
        "grace_seconds": proxy.grace,
        "checks": {"paths": [], "devices": [], "commands": [], **svc.checks},
        "nic": None,
        "files": svc.files,
        "pre_start": svc.pre_start,
        "processes": svc.processes,
        "proxy": None,
    }


def front_door(plan: ClusterPlan) -> FrontDoor:
    if plan.front_door == "none":
        door = plan.backend.front_door(plan)
        return FrontDoor(mode="none", entry=door.entry or (door.router[0] if door.router
                                                           else None))
    return plan.backend.front_door(plan)


def proxy_block(plan: ClusterPlan, proxy: ProxyHost) -> dict[str, Any]:
    """The `proxy` block of a C spec (docs/node-spec.md, docs/proxy.md)."""
    door = front_door(plan)
    block: dict[str, Any] = {"listen": proxy.listen}
    if door.mode == "pd":
        block["prefill"] = list(door.prefill)
        block["decode"] = list(door.decode)
    else:
        block["mode"] = door.mode
        block["router"] = list(door.router)
    block["served_model_name"] = plan.backend.served_model_name(plan)
    block["options"] = dict(plan.proxy_options, admin_port=proxy.admin_port)
    return block


def proxy_spec(plan: ClusterPlan, proxy: ProxyHost) -> dict[str, Any]:
    from pd_deploy.proxy_config import proxy_unit  # Jinja2: controller side only

    block = proxy_block(plan, proxy)
    dirs = dirs_for(proxy.base_dir, "C")
    unit = proxy_unit(block, dirs, python=proxy.python)
    return {
        "schema": SCHEMA,
        "cluster": plan.cluster,
        "node": proxy.host,
        "role": "C",
        "ip": proxy.ip,
        "instance": None,
        "master": False,
        "engine": "nginx",
        "base_dir": proxy.base_dir,
        "dirs": dirs,
        "grace_seconds": proxy.grace,
        "checks": unit.get("checks", {"paths": [], "devices": [], "commands": []}),
        "nic": None,
        "files": unit["files"],
        "pre_start": unit["pre_start"],
        "processes": unit["processes"],
        "proxy": block,
    }


def services(plan: ClusterPlan) -> list[Service]:
    """The backend's services, checked (phase, unique names that are not P/D/C), each
    placed on the first C host unless it names its hosts."""
    out = plan.backend.services(plan)
    seen: set[str] = set()
    for svc in out:
        if svc.phase not in PHASES:
            raise ValueError(f"backend {plan.backend.name}: service {svc.name}: phase "
                             f"{svc.phase!r} is not one of {', '.join(PHASES)}")
        if svc.name in UNIT_ROLES or svc.name in seen or not svc.name.replace("-", "").isalnum():
            raise ValueError(f"backend {plan.backend.name}: bad or duplicate service name "
                             f"{svc.name!r}")
        seen.add(svc.name)
        if not svc.hosts:
            svc.hosts = [plan.proxies[0].host]
    return out


def node_specs(plan: ClusterPlan) -> dict[str, dict[str, dict[str, Any]]]:
    """host -> unit -> node spec, for every host of the cluster. Unit order on a C host:
    services before engines, services after engines, the front door."""
    specs: dict[str, dict[str, dict[str, Any]]] = {}
    for node in plan.nodes.values():
        specs.setdefault(node.host, {})[node.role] = plan.backend.node_spec(plan, node)
    by_host = {p.host: p for p in plan.proxies}
    svcs = services(plan)
    for phase in PHASES:
        for svc in svcs:
            if svc.phase == phase:
                for host in svc.hosts:
                    specs.setdefault(host, {})[svc.name] = service_spec(plan, by_host[host], svc)
    if plan.front_door != "none":
        for proxy in plan.proxies:
            specs.setdefault(proxy.host, {})["C"] = proxy_spec(plan, proxy)
    return specs


def unit_phase(spec: dict[str, Any]) -> str:
    """engines | before-engines | after-engines | front-door: when site.yml starts it."""
    if spec["role"] in ("P", "D"):
        return "engines"
    return spec.get("phase") or "front-door"
