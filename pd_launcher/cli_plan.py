"""`python -m pd_launcher plan -i INVENTORY [--format text|json] [--node HOST [--role R]]`."""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import Any

from pd_launcher.settings import PlanInvalid

SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD")


def plan_document(groups: dict[str, list[str]], hostvars: dict[str, dict[str, Any]]
                  ) -> dict[str, Any]:
    """The JSON contract: nodes (every process of every host), instances, proxy, specs."""
    from pd_launcher.engines import node_specs, proxy_block
    from pd_launcher.topology import build_plan

    plan = build_plan(groups, hostvars)
    specs = node_specs(plan)
    nodes: dict[str, Any] = {}
    for host, by_role in specs.items():
        roles = [r for r in ("P", "D", "C") if r in by_role]
        main = by_role[roles[0]]
        node = plan.nodes.get(host)
        nodes[host] = {
            "role": roles[0],
            "roles": roles,
            "ip": main["ip"],
            "instance": main["instance"],
            "master": main["master"],
            "dp_ranks": [r.rank for r in node.ranks] if node else [],
            "devices": node.devices if node else [],
            "processes": [dict(p, role=r) for r in roles for p in by_role[r]["processes"]],
        }
    proxy = proxy_block(plan, plan.proxies[0])
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
            "prefill": proxy["prefill"],
            "decode": proxy["decode"],
            "options": _masked(proxy["options"]),
        },
        "specs": specs,
    }


def _masked(options: dict[str, Any]) -> dict[str, Any]:
    return {k: ("***" if "key" in k and v else v) for k, v in options.items()}


def mask_argv(argv: list[str]) -> list[str]:
    out, hide = [], False
    for arg in argv:
        if hide:
            out.append("***")
            hide = False
        elif arg == "--api-key":
            out.append(arg)
            hide = True
        elif arg.startswith("--api-key="):
            out.append("--api-key=***")
        else:
            out.append(arg)
    return out


def mask_env(env: dict[str, str]) -> dict[str, str]:
    return {k: ("***" if any(w in k.upper() for w in SECRET_WORDS) else v) for k, v in env.items()}


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
                     f"({inst['master_ip']}), hosts {', '.join(inst['hosts'])}, "
                     f"kv_port {inst['kv_port']}")
    p = doc["proxy"]
    lines += [f"# proxy {', '.join(p['listens'])}",
              f"#   prefill upstreams: {' '.join(p['prefill'])}",
              f"#   decode upstreams:  {' '.join(p['decode'])}", ""]
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


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m pd_launcher plan",
                                     description="Show the deployment plan of an inventory.")
    parser.add_argument("-i", "--inventory", required=True)
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument("--node", help="print this host's node spec (launcher input) as JSON")
    parser.add_argument("--role", choices=("P", "D", "C"),
                        help="with --node: which spec of a host that is both engine and proxy")
    parser.add_argument("-e", "--extra-vars", action="append", default=[],
                        help="KEY=VALUE overrides, as ansible-playbook -e")
    args = parser.parse_args(argv)

    from pd_launcher.inventory import load_inventory

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
        role = args.role or doc["nodes"][args.node]["role"]
        if role not in by_role:
            sys.stderr.write(f"plan: {args.node} has no {role} role ({'/'.join(by_role)})\n")
            return 2
        print(json.dumps(by_role[role], indent=2))
        return 0
    if args.format == "json":
        print(json.dumps(public_document(doc), indent=2))
    else:
        print(render_text(doc))
    return 0
