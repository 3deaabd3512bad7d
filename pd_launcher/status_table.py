"""The cluster status table of status.yml, from the plan and what each host reported."""
from __future__ import annotations

import json
from typing import Any, Mapping

COLUMNS = ("node", "role", "instance", "dp ranks", "state", "health", "ports", "uptime", "image")


def _ranks(ranks: list[int]) -> str:
    if not ranks:
        return "-"
    return f"{ranks[0]}..{ranks[-1]}" if len(ranks) > 1 else str(ranks[0])


def _uptime(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _containers(report: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    if not report or report.get("skipped") or not report.get("stdout"):
        return []
    text = report["stdout"].strip()
    data = json.loads(text) if text.startswith("[") else [json.loads(x) for x in text.splitlines()]
    return data or []


def _label(container: Mapping[str, Any], key: str) -> str | None:
    labels = container.get("Labels") or {}
    if isinstance(labels, str):  # docker: "a=b,c=d"
        labels = dict(kv.split("=", 1) for kv in labels.split(",") if "=" in kv)
    return labels.get(key)


def unit_row(host: str, role: str, spec: Mapping[str, Any], unit: Mapping[str, Any] | None,
             containers: list[dict[str, Any]], runtime: str) -> dict[str, str]:
    procs = (unit or {}).get("processes") or []
    ranks = [r for p in spec.get("processes", []) for r in p.get("dp_ranks", [])]
    ready = sum(1 for p in procs if p.get("ready"))
    if runtime == "container":
        mine = [c for c in containers if _label(c, "pd.role") == role]
        state = (mine[0].get("State") or mine[0].get("Status") or "?") if mine else "absent"
        image = (mine[0].get("Image") or "-") if mine else "-"
        uptime = "-"
        if mine and isinstance(mine[0].get("StartedAt"), (int, float)):
            uptime = "since " + str(mine[0]["StartedAt"])
    else:
        alive = sum(1 for p in procs if p.get("alive"))
        if not (unit or {}).get("recorded"):
            state = "stopped"
        elif unit.get("running"):
            state = "running"
        else:
            dead = [p["name"] for p in procs if not p.get("alive")]
            state = f"degraded {alive}/{len(procs)} ({', '.join(dead)} down)"
        image, uptime = "(host)", _uptime((unit or {}).get("uptime_s"))
    ports = ",".join(p.split("/")[0].rsplit(":", 1)[1] for proc in spec.get("processes", [])
                     for p in [f"{q['host']}:{q['port']}/{q['use']}" for q in proc["ports"]]
                     if p.endswith(("/api", "/proxy")))
    health = f"{ready}/{len(procs)} ready" if procs else "-"
    return {"node": host, "role": role, "instance": spec.get("instance") or "-",
            "dp ranks": _ranks(ranks), "state": state, "health": health,
            "ports": ports or "-", "uptime": uptime, "image": image}


def pd_status_table(plan: Mapping[str, Any], hostvars: Mapping[str, Any]) -> list[str]:
    rows = []
    for host, by_role in plan["specs"].items():
        hv = hostvars[host]
        runtime = hv.get("pd_runtime", "process") if hasattr(hv, "get") else "process"
        units = {}
        for key in ("pd_status_units", "pd_status_units_c"):
            report = hv.get(key) if hasattr(hv, "get") else None
            for res in (report or {}).get("results", []):
                if not res.get("skipped"):
                    units[res["item"]] = res
        containers = _containers(hv.get("pd_status_containers") if hasattr(hv, "get") else None)
        for role, spec in by_role.items():
            rows.append(unit_row(host, role, spec, units.get(role), containers, runtime))
    return format_table(rows)


def format_table(rows: list[dict[str, str]]) -> list[str]:
    widths = {c: max([len(c)] + [len(r[c]) for r in rows]) for c in COLUMNS}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in COLUMNS)]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in COLUMNS) for r in rows]
    healthy = sum(1 for r in rows if r["health"].split("/")[0] == r["health"].split("/")[-1]
                  .split()[0] and r["health"] != "-")
    lines.append(f"{healthy}/{len(rows)} units healthy")
    return lines
