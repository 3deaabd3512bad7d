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

import json
from dataclasses import replace
from typing import Any, Iterable

from pd_deploy.engines.base import PHASES, FrontDoor, Service
from pd_deploy.topology import ClusterPlan, Node, ProxyHost
from pd_launcher.launcher.spec import (
    SCHEMA,
    LogPolicy,
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
        restart=node.restart,
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
        gate=svc.gate,
        restart=proxy.restart,
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
    if door.mode == "router" and door.health_path:
        block["options"]["router_health_path"] = door.health_path
    if door.mode == "router" and door.stream_fix:
        block["options"]["router_stream_fix"] = True
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
        logs=LogPolicy(files=list((unit.get("logs") or {}).get("files") or [])),
        restart=proxy.restart,
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
        if spec.restart is None:  # a backend that builds its NodeSpec by itself
            spec = replace(spec, restart=node.restart)
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


# ---------------------------------------------------------------- docs/node-spec.md
# The example of docs/node-spec.md is printed from this inventory by
# `python -m pd_deploy.specs`; tests/unit/test_spec_contract.py checks that the
# document holds exactly that text.

EXAMPLE_INVENTORY: tuple[dict[str, list[str]], dict[str, dict[str, Any]]] = (
    {"P": ["p1"], "D": ["d1", "d2"], "C": ["c1"]},
    {
        "p1": {"ansible_host": "10.0.0.1"},
        "d1": {"ansible_host": "10.0.0.3", "pd_dp_mode": "internal"},
        "d2": {"ansible_host": "10.0.0.4", "host_ip": "10.0.0.3", "pd_dp_mode": "internal"},
        "c1": {"ansible_host": "10.0.0.9"},
    },
)
EXAMPLE_VARS = {"pd_cluster_name": "demo", "pd_engine": "vllm-ascend",
                "pd_model_path": "/models/demo-model", "pd_devices_per_node": 2}

_NOTES: dict[tuple[Any, ...], str] = {
    ("schema",): "always 1",
    ("cluster",): "pd_cluster_name",
    ("node",): "inventory hostname",
    ("role",): "P | D | C (C: front door and services)",
    ("unit",): "service units only: the unit's name",
    ("phase",): "service units only: before-engines | after-engines",
    ("ip",): "node (data-plane) IP; services bind here",
    ("instance",): "engine instance (null on C hosts)",
    ("master",): "this node is its instance's master",
    ("engine",): "pd_engine (service units: the backend; C: nginx)",
    ("base_dir",): "pd_base_dir (informative)",
    ("dirs",): "run --state-dir/--log-dir/--run-dir move them",
    ("grace_seconds",): "SIGTERM -> SIGKILL grace",
    ("checks",): "checked before anything starts",
    ("checks", "paths"): "must exist (model path; empty for the emulator)",
    ("checks", "devices"): "must exist",
    ("checks", "commands"): "must be on PATH",
    ("nic",): "null when no variable needs the NIC name",
    ("nic", "ip"): "the launcher finds the interface holding it",
    ("nic", "name"): "`nic` of the inventory: no lookup",
    ("nic", "env"): "set to the NIC name in every process",
    ("files",): "written atomically before pre_start",
    ("files", 0, "mode"): "octal string; default 0644",
    ("pre_start",): "argv lists run in order; non-zero exit: no start",
    ("processes",): "at least one",
    ("processes", 0, "name"): "unique in the spec; log <log>/<name>.log",
    ("processes", 0, "argv"): "run as is (no shell)",
    ("processes", 0, "env"): "added to the launcher's environment",
    ("processes", 0, "ports"): "every port it binds: checked free before start",
    ("processes", 0, "ready"): "http: GET url == 200 (optional headers) | tcp",
    ("processes", 0, "dp_ranks"): "informative: global DP ranks it serves",
    ("processes", 0, "reload_signal"): "HUP | USR1 | USR2: sent on a reload (files only)",
    ("proxy",): "C only: the front door block (below)",
    ("restart",): "pd_restart_*: restart of the set after a crash",
}


def _jsonc(value: Any, notes: dict[tuple[Any, ...], str], path: tuple[Any, ...] = (),
           indent: int = 0, prefix: str = "", width: int = 88) -> list[list[Any]]:
    """[text, note] lines of JSON: a container on one line when it fits, lists of
    scalars filled like a paragraph; note: a // comment for that key's line."""
    pad = " " * indent
    note = notes.get(path)
    flat = json.dumps(value)
    if not isinstance(value, (dict, list)) or not value or len(pad + prefix + flat) <= width:
        return [[pad + prefix + flat, note]]
    if isinstance(value, list) and not any(isinstance(x, (dict, list)) for x in value):
        lines: list[list[Any]] = [[pad + prefix + "[", note]]
        cur = ""
        for i, item in enumerate(value):
            piece = json.dumps(item) + ("," if i < len(value) - 1 else "")
            if cur and len(pad) + 2 + len(cur) + 1 + len(piece) > width:
                lines.append([pad + "  " + cur, None])
                cur = ""
            cur = f"{cur} {piece}" if cur else piece
        return lines + [[pad + "  " + cur, None], [pad + "]", None]]
    is_dict = isinstance(value, dict)
    lines = [[pad + prefix + ("{" if is_dict else "["), note]]
    entries = list(value.items()) if is_dict else list(enumerate(value))
    for n, (k, v) in enumerate(entries):
        sub = _jsonc(v, notes, path + (k,), indent + 2, f"{json.dumps(k)}: " if is_dict else "",
                     width)
        if n < len(entries) - 1:
            sub[-1][0] += ","
        lines += sub
    return lines + [[pad + ("}" if is_dict else "]"), None]]


_C_NOTES: dict[tuple[Any, ...], str] = {
    ("checks", "paths"): "the njs module",
    ("files",): "the front door's configuration (docs/proxy.md)",
    ("pre_start",): "nginx -t: a bad configuration starts nothing",
    ("processes", 0, "name"): "nginx in the foreground",
    ("processes", 1, "name"): "health checks, metrics, upstream updates",
    ("processes", 1, "reload_signal"): "pd_launcher reload: files changed, no restart",
    ("proxy",): "the front door block (below)",
}


def _jsonc_lines(value: Any, notes: dict[tuple[Any, ...], str] | None = None
                 ) -> list[list[Any]]:
    return _jsonc(value, notes or {})


def _jsonc_text(lines: list[list[Any]]) -> str:
    """A note goes after its line, or on a line of its own above a long one."""
    out = []
    for text, note in lines:
        if not note:
            out.append(text)
        elif len(text) <= 40:
            out.append(f"{text.ljust(40)} // {note}")
        else:
            out.append(" " * (len(text) - len(text.lstrip())) + f"// {note}")
            out.append(text)
    return "\n".join(out)


def example_markdown() -> str:
    """The generated part of docs/node-spec.md (between its BEGIN/END markers)."""
    from pd_deploy.topology import build_plan

    groups, hostvars = EXAMPLE_INVENTORY
    plan = build_plan(groups, {h: dict(EXAMPLE_VARS, **v) for h, v in hostvars.items()})
    specs = node_specs(plan)
    c1 = specs["c1"]["C"]
    c1 = dict(c1, files=[dict(f, content="...") for f in c1["files"]])
    svc = Service(name="registry", phase="before-engines", processes=[Process(
        name="registry", argv=["etcd", "--listen-client-urls", "http://10.0.0.9:2379"])])
    svc_spec = spec_to_dict(service_spec(plan, plan.proxies[0], svc))
    head = _jsonc_lines({k: svc_spec[k] for k in ("schema", "cluster", "node", "role",
                                                   "unit", "phase", "ip")}, _NOTES)
    head[-2][0] += ","
    head.insert(-1, ["  ...", None])
    parts = [
        "A prefill node with two DP ranks (vLLM-Ascend, external DP), "
        "`--node p1 --role P`:",
        "",
        "```jsonc", _jsonc_text(_jsonc_lines(specs["p1"]["P"], _NOTES)), "```",
        "",
        "A non-master node of an internal-DP instance runs one `--headless` process, "
        "ready when its first KV port accepts connections (`--node d2`, `processes` only):",
        "",
        "```jsonc", _jsonc_text(_jsonc_lines({"processes": specs["d2"]["D"]["processes"]})),
        "```",
        "",
        "The front door, `--node c1 --role C` (file contents left out):",
        "",
        "```jsonc", _jsonc_text(_jsonc_lines(c1, _C_NOTES)), "```",
        "",
        "A service unit (a unit that a backend's `services()` adds on C hosts, here a "
        "made-up `registry`) also has `unit` and `phase`:",
        "",
        "```jsonc", _jsonc_text(head), "```",
    ]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    import sys

    sys.stdout.write(example_markdown())
