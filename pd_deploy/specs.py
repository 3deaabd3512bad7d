"""ClusterPlan -> node specs: the exact input of `python -m pd_launcher run` per unit.

A unit is one launcher (one container with the container runtime) on one host:
  P / D       the host's engine processes, built by the cluster's backend;
  <service>   a cluster service on a C host (etcd, Redis, an engine's router), built
              by the backend, with a phase: before-engines or after-engines;
  C           the front door on a C host: nginx (+ proxy agent) on pd_proxy_port.
specs[host][unit] is the spec (docs/node-spec.md). Engine-neutral: what differs per
engine comes from plan.backend (pd_deploy/engines/).

One typed contract: specs are built as the launcher's own dataclasses
(pd_launcher.launcher.spec: NodeSpec, Process, Port, Ready, SpecFile, Nic) and become
JSON only through its spec_to_dict, the inverse of the parse_spec the launcher reads
them with. `python -m pd_deploy.specs` prints the example of docs/node-spec.md.
"""
from __future__ import annotations

from typing import Any, Iterable

from pd_deploy.engines.base import PHASES, FrontDoor, Service
from pd_deploy.topology import ClusterPlan, Node, ProxyHost
from pd_launcher.launcher.spec import (
    SCHEMA,
    Nic,
    NodeSpec,
    Process,
    SpecError,
    SpecFile,
    parse_file,
    parse_process,
    parse_spec,
    spec_to_dict,
)

__all__ = ["SCHEMA", "NodeSpec", "Process", "SpecFile", "Nic", "node_specs", "unit_specs"]

UNIT_ROLES = ("P", "D", "C")  # unit names that are roles; any other unit is a service


def dirs_for(base_dir: str, unit: str) -> dict[str, str]:
    return {
        "state": f"{base_dir}/state/{unit}",
        "log": f"{base_dir}/logs/{unit}",
        "run": f"{base_dir}/run/{unit}",
    }


# ------------------------------------------------ plain dicts -> the typed contract
# Backends and pd_deploy.proxy_config may hand over processes and files as the dicts
# of docs/node-spec.md; they become the launcher's dataclasses here, validated by the
# launcher's own parser (errors name the field).


def as_processes(items: Iterable[Process | dict[str, Any]], where: str) -> list[Process]:
    return [p if isinstance(p, Process) else parse_process(p, f"{where}.processes[{i}]")
            for i, p in enumerate(items)]


def as_files(items: Iterable[SpecFile | dict[str, Any]] | None, where: str) -> list[SpecFile]:
    return [f if isinstance(f, SpecFile) else parse_file(f, f"{where}.files[{i}]")
            for i, f in enumerate(items or [])]


def as_nic(nic: Nic | dict[str, Any] | None) -> Nic | None:
    if nic is None or isinstance(nic, Nic):
        return nic
    return Nic(ip=nic.get("ip") or "", name=nic.get("name"), env=list(nic.get("env") or []))


def _checks(checks: dict[str, list[str]] | None) -> dict[str, list[str]]:
    checks = checks or {}
    return {"check_paths": list(checks.get("paths") or []),
            "check_devices": list(checks.get("devices") or []),
            "check_commands": list(checks.get("commands") or [])}


def engine_spec_base(plan: ClusterPlan, node: Node,
                     processes: list[Process] | list[dict[str, Any]], *,
                     checks: dict[str, list[str]], nic: Nic | dict[str, Any] | None,
                     files: list[SpecFile] | list[dict[str, Any]] | None = None,
                     pre_start: list[list[str]] | None = None) -> NodeSpec:
    """The node spec of a P/D node around the processes a backend built."""
    inst = plan.instance(node.instance)
    where = f"{node.host}/{node.role}"
    return NodeSpec(
        cluster=plan.cluster,
        node=node.host,
        role=node.role,
        ip=node.ip,
        instance=inst.name,
        master=node.master,
        engine=inst.engine,
        base_dir=node.base_dir,
        dirs=dirs_for(node.base_dir, node.role),
        grace_seconds=node.grace,
        **_checks(checks),
        nic=as_nic(nic),
        files=as_files(files, where),
        pre_start=[list(a) for a in pre_start or []],
        processes=as_processes(processes, where),
    )


def service_spec(plan: ClusterPlan, proxy: ProxyHost, svc: Service) -> NodeSpec:
    """The unit of one cluster service on one C host."""
    where = f"{proxy.host}/{svc.name}"
    return NodeSpec(
        cluster=plan.cluster,
        node=proxy.host,
        role="C",
        unit=svc.name,
        phase=svc.phase,
        ip=proxy.ip,
        instance=None,
        master=False,
        engine=plan.backend.name,
        base_dir=proxy.base_dir,
        dirs=dirs_for(proxy.base_dir, svc.name),
        grace_seconds=proxy.grace,
        **_checks(svc.checks),
        nic=None,
        files=as_files(svc.files, where),
        pre_start=[list(a) for a in svc.pre_start],
        processes=as_processes(svc.processes, where),
    )


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


def proxy_spec(plan: ClusterPlan, proxy: ProxyHost) -> NodeSpec:
    from pd_deploy.proxy_config import proxy_unit  # Jinja2: controller side only

    block = proxy_block(plan, proxy)
    dirs = dirs_for(proxy.base_dir, "C")
    unit = proxy_unit(block, dirs, python=proxy.python)
    where = f"{proxy.host}/C"
    return NodeSpec(
        cluster=plan.cluster,
        node=proxy.host,
        role="C",
        ip=proxy.ip,
        instance=None,
        master=False,
        engine="nginx",
        base_dir=proxy.base_dir,
        dirs=dirs,
        grace_seconds=proxy.grace,
        **_checks(unit.get("checks")),
        nic=None,
        files=as_files(unit["files"], where),
        pre_start=[list(a) for a in unit["pre_start"]],
        processes=as_processes(unit["processes"], where),
        proxy=block,
    )


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


def unit_specs(plan: ClusterPlan) -> dict[str, dict[str, NodeSpec]]:
    """host -> unit -> NodeSpec, for every host of the cluster. Unit order on a C host:
    services before engines, services after engines, the front door."""
    specs: dict[str, dict[str, NodeSpec]] = {}
    for node in plan.nodes.values():
        spec = plan.backend.node_spec(plan, node)
        if not isinstance(spec, NodeSpec):  # a backend that still builds the dict
            spec = _checked(plan, spec, f"{node.host}/{node.role}")
        specs.setdefault(node.host, {})[node.role] = spec
    by_host = {p.host: p for p in plan.proxies}
    svcs = services(plan)
    for phase in PHASES:
        for svc in svcs:
            if svc.phase == phase:
                for host in svc.hosts:
                    try:
                        spec = service_spec(plan, by_host[host], svc)
                    except SpecError as exc:
                        raise ValueError(f"backend {plan.backend.name}: service "
                                         f"{svc.name}: {exc}") from None
                    specs.setdefault(host, {})[svc.name] = spec
    if plan.front_door != "none":
        for proxy in plan.proxies:
            specs.setdefault(proxy.host, {})["C"] = proxy_spec(plan, proxy)
    return specs


def node_specs(plan: ClusterPlan) -> dict[str, dict[str, dict[str, Any]]]:
    """host -> unit -> node spec as JSON-ready dicts (spec_to_dict of unit_specs), each
    checked by the launcher's own parser: what `pd-deploy plan --node` prints and the
    roles copy to the nodes."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for host, by_unit in unit_specs(plan).items():
        out[host] = {}
        for unit, spec in by_unit.items():
            data = spec_to_dict(spec)
            _checked(plan, data, f"{host}/{unit}")
            out[host][unit] = data
    return out


def _checked(plan: ClusterPlan, data: Any, where: str) -> NodeSpec:
    try:
        return parse_spec(data, where)
    except SpecError as exc:
        raise ValueError(f"backend {plan.backend.name} built a node spec the launcher "
                         f"rejects: {exc}") from None


def unit_phase(spec: dict[str, Any]) -> str:
    """engines | before-engines | after-engines | front-door: when site.yml starts it."""
    if spec["role"] in ("P", "D"):
        return "engines"
    return spec.get("phase") or "front-door"
