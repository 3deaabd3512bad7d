"""`pd-deploy plan -i INVENTORY [--format text|json] [--node HOST [--role R]]` and
`pd-deploy import omni-infer OMNI_INVENTORY -o DIR` (also `python -m pd_deploy ...`)."""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import Any

from pd_deploy.masking import mask_argv, mask_env, mask_options
from pd_deploy.settings import PlanInvalid


def plan_document(groups: dict[str, list[str]], hostvars: dict[str, dict[str, Any]]
                  ) -> dict[str, Any]:
    """The JSON contract: nodes (every process of every host), instances, proxy, specs."""
    from pd_deploy.specs import front_door, node_specs, proxy_block, services, unit_phase
    from pd_deploy.topology import build_plan, service_ports

    plan = build_plan(groups, hostvars)
    specs = node_specs(plan)
    nodes: dict[str, Any] = {}
    for host, by_unit in specs.items():
        roles = [r for r in ("P", "D", "C") if any(s["role"] == r for s in by_unit.values())]
        engine_units = [u for u in ("P", "D") if u in by_unit]
        main = by_unit[engine_units[0] if engine_units else next(iter(by_unit))]
        node = plan.nodes.get(host)
        nodes[host] = {
            "role": roles[0],
            "roles": roles,
            "ip": main["ip"],
            "instance": main["instance"],
            "master": main["master"],
            "dp_ranks": [r.rank for r in node.ranks] if node else [],
            "devices": node.devices if node else [],
            "processes": [_row(u, s, p) for u, s in _by_start(by_unit) for p in s["processes"]],
        }
    proxy = proxy_block(plan, plan.proxies[0])
    door = front_door(plan)
    return {
        "cluster": plan.cluster,
        "instances": [
            {"name": i.name, "role": i.role, "master": i.master, "master_ip": i.master_ip,
             "hosts": i.hosts, "engine": i.engine, "dp_mode": i.dp_mode, "dp_size": i.dp_size,
             "tp": i.tp, "kv_port": i.kv_port, "dp_rpc_port": i.dp_rpc_port}
            for i in plan.instances
        ],
        "nodes": nodes,
        "proxy": {
            "listen": plan.proxies[0].listen,
            "listens": [p.listen for p in plan.proxies],
            "prefill": proxy.get("prefill", []),
            "decode": proxy.get("decode", []),
            "options": mask_options(proxy["options"]),
        },
        "engine": plan.backend.name,
        "front_door": {"mode": door.mode, "router": door.router, "entry": door.entry},
        "services": [
            {"name": s.name, "phase": s.phase, "hosts": s.hosts,
             "ports": [{"host": h, "port": p, "use": u} for h, p, u in service_ports(s)]}
            for s in services(plan)
        ],
        "units": {host: {u: unit_phase(s) for u, s in by_unit.items()}
                  for host, by_unit in specs.items()},
        # service units whose readiness needs the engines (site.yml waits after them)
        "gates": {host: [u for u, s in by_unit.items() if s.get("gate")]
                  for host, by_unit in specs.items()},
        "specs": specs,
    }


def _by_start(by_unit: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """A host's units in start order: before-engines services, engines, after-engines
    services, the front door."""
    from pd_deploy.specs import unit_phase

    order = ("before-engines", "engines", "after-engines", "front-door")
    return sorted(by_unit.items(), key=lambda kv: order.index(unit_phase(kv[1])))


def _row(unit: str, spec: dict[str, Any], proc: dict[str, Any]) -> dict[str, Any]:
    row = dict(proc, role=spec["role"])
    if unit not in ("P", "D", "C"):
        row["unit"] = unit
    return row


def public_document(doc: dict[str, Any]) -> dict[str, Any]:
    """The plan without secrets: argv and env masked, no raw node specs."""
    nodes = {
        host: dict(node, processes=[
            dict(p, argv=mask_argv(p["argv"]), env=mask_env(p["env"])) for p in node["processes"]
        ])
        for host, node in doc["nodes"].items()
    }
    return {k: v for k, v in doc.items() if k != "specs"} | {"nodes": nodes}


def render_text(doc: dict[str, Any]) -> str:
    lines = [f"# cluster {doc['cluster']}", ""]
    for inst in doc["instances"]:
        lines.append(f"# instance {inst['name']} ({inst['role']}): DP{inst['dp_size']} x "
                     f"TP{inst['tp']}, {inst['dp_mode']} DP, master {inst['master']} "
                     f"({inst['master_ip']}), hosts {', '.join(inst['hosts'])}"
                     + (f", kv_port {inst['kv_port']}" if inst["kv_port"] else ""))
    p = doc["proxy"]
    door = doc.get("front_door") or {"mode": "pd"}
    if door["mode"] == "pd":
        lines += [f"# proxy {', '.join(p['listens'])}",
                  f"#   prefill upstreams: {' '.join(p['prefill'])}",
                  f"#   decode upstreams:  {' '.join(p['decode'])}"]
    elif door["mode"] == "router":
        lines += [f"# proxy {', '.join(p['listens'])} in front of the engine's router "
                  f"{' '.join(door['router'])}"]
    else:
        lines += [f"# no front door: clients use the engine's router {door['entry']}"]
    for svc in doc.get("services") or []:
        ports = ", ".join(f"{q['host']}:{q['port']}/{q['use']}" for q in svc["ports"])
        lines.append(f"# service {svc['name']} ({svc['phase']}) on {', '.join(svc['hosts'])}: "
                     f"{ports}")
    lines.append("")
    for host, node in doc["nodes"].items():
        dp = node["dp_ranks"]
        ranks = f" dp ranks {dp[0]}..{dp[-1]}" if dp else ""
        master = " (master)" if node["master"] else ""
        lines.append(f"## {host} {node['ip']} role {'+'.join(node['roles'])} "
                     f"instance {node['instance'] or '-'}{master}{ranks}")
        for proc in node["processes"]:
            ports = ", ".join(f"{q['host']}:{q['port']}/{q['use']}" for q in proc["ports"])
            lines.append(f"# {proc['name']} binds {ports}")
            env = " ".join(f"{k}={shlex.quote(v)}" for k, v in mask_env(proc["env"]).items())
            cmd = " ".join(shlex.quote(a) for a in mask_argv(proc["argv"]))
            lines.append(f"env {env} \\\n  {cmd}" if env else cmd)
        lines.append("")
    return "\n".join(lines)


def plan_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pd-deploy plan",
                                     description="Show the deployment plan of an inventory.")
    parser.add_argument("-i", "--inventory", required=True)
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument("--node", help="print this host's node spec (launcher input) as JSON")
    parser.add_argument("--role", "--unit", dest="role", metavar="UNIT",
                        help="with --node: which unit of the host: P, D, C (the front door) "
                        "or a service name (default: its engine unit, else its first)")
    parser.add_argument("-e", "--extra-vars", action="append", default=[],
                        help="KEY=VALUE overrides, as ansible-playbook -e")
    args = parser.parse_args(argv)

    from pd_deploy.inventory import load_inventory

    extra = dict(kv.split("=", 1) for kv in args.extra_vars if "=" in kv)
    try:
        groups, hostvars = load_inventory(args.inventory, extra)
        doc = plan_document(groups, hostvars)
    except PlanInvalid as exc:
        sys.stderr.write(f"plan: {len(exc.errors)} error(s) in {args.inventory}:\n")
        for err in exc.errors:
            sys.stderr.write(f"  - {err}\n")
        return 1
    except FileNotFoundError as exc:
        sys.stderr.write(f"plan: {exc}\n")
        return 2
    if args.node:
        by_role = doc["specs"].get(args.node)
        if by_role is None:
            sys.stderr.write(f"plan: {args.node} is not a host of groups P, D or C\n")
            return 2
        role = args.role or next((u for u in ("P", "D", "C") if u in by_role), next(iter(by_role)))
        if role not in by_role:
            sys.stderr.write(f"plan: {args.node} has no {role} unit (it has: "
                             f"{'/'.join(by_role)})\n")
            return 2
        print(json.dumps(by_role[role], indent=2))
        return 0
    if args.format == "json":
        print(json.dumps(public_document(doc), indent=2))
    else:
        print(render_text(doc))
    return 0


USAGE = """usage: pd-deploy {plan,import} ...   (or python -m pd_deploy)

  plan   -i INVENTORY [--format text|json] [--node HOST [--role R]] [-e KEY=VALUE]
  import omni-infer OMNI_INVENTORY -o DIR [--playbook FILE] [--model-path PATH] [--force]

Node-side commands run on the nodes: python -m pd_launcher {run,stop,wait}.
"""


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0 if args else 2
    if args[0] == "plan":
        return plan_main(args[1:])
    if args[0] == "import":
        from pd_deploy.omni_import import import_main

        return import_main(args[1:])
    sys.stderr.write(f"pd-deploy: unknown command {args[0]!r}\n{USAGE}")
    return 2
