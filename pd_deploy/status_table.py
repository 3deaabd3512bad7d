"""The cluster status table of status.yml, from the plan and what each host reported.

One row per unit: P and D engines, the cluster services of a C host (the ROLE column
shows the service's name, e.g. `registry`) and the front door (C).
"""
from __future__ import annotations

from typing import Any, Mapping

from pd_deploy.containers import LABEL_ROLE, LABEL_UNIT, UNIT_ROLES, image_id, parse_ps
from pd_deploy.record import spec_sha256, unit_spec

COLUMNS = ("node", "role", "instance", "dp ranks", "state", "health", "restarts", "ports",
           "uptime", "image")


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
    """The host's containers from `<cli> ps --all --format '{{json .}}'` (docker or
    podman; pd_deploy.containers.ps_argv)."""
    if not report or report.get("skipped") or not report.get("stdout"):
        return []
    return parse_ps(report["stdout"])


def _container_state(c: Mapping[str, Any]) -> str:
    state = c.get("state") or "?"
    if state in ("exited", "dead", "stopped") and c.get("exit_code") is not None:
        return f"{state}({c['exit_code']})"
    return state


def _container_uptime(c: Mapping[str, Any], now: float | None) -> str:
    if c.get("state") != "running":
        return "-"
    if c.get("started_at") and now:
        return _uptime(max(0.0, now - float(c["started_at"])))
    return _docker_up(str(c.get("status") or ""))


_UNITS = {"second": "s", "minute": "m", "hour": "h", "day": "d", "week": "w", "month": "mo",
          "year": "y"}


def _docker_up(status: str) -> str:
    """docker ps Status "Up 5 minutes" / "Up About an hour" -> "5m" / "~1h"."""
    words = status.replace("(", " ").split()
    if len(words) < 3 or words[0] != "Up":
        return "-"
    if words[1] == "Less":
        return "0s"
    about = words[1] == "About"
    count, unit = ("1", words[3] if len(words) > 3 else "") if about else (words[1], words[2])
    short = _UNITS.get(unit.rstrip("s"))
    if not short or not count.isdigit():
        return "-"
    return ("~" if about else "") + count + short


def _image(c: Mapping[str, Any]) -> str:
    image = str(c.get("image") or "")
    if not image or image.startswith("sha256:") or len(image) == 64:
        return (image_id(image or c.get("image_id")) or "-")[:12]
    return image


def _restarts(unit: Mapping[str, Any] | None) -> str:
    """How often the unit's launcher restarted its set after a crash (the state file's
    `restarts`, which pd_unit_info reports); 0 for a state file without the field,
    "-" when there is no state file."""
    if not unit or not unit.get("recorded"):
        return "-"
    try:
        return str(int(unit.get("restarts") or 0))
    except (TypeError, ValueError):
        return "?"


def _is_service(name: str) -> bool:
    return name not in UNIT_ROLES


def unit_row(host: str, name: str, spec: Mapping[str, Any], unit: Mapping[str, Any] | None,
             containers: list[dict[str, Any]], runtime: str) -> dict[str, str]:
    """The row of unit NAME (P, D, C or a service) of HOST; `unit` is what pd_unit_info
    reported, `containers` the host's containers (container runtime)."""
    procs = (unit or {}).get("processes") or []
    ranks = [r for p in spec.get("processes", []) for r in p.get("dp_ranks", [])]
    ready = sum(1 for p in procs if p.get("ready"))
    if runtime == "container":
        # the unit's own container: same role, and pd.unit only for a service
        mine = [c for c in containers if c["labels"].get(LABEL_ROLE) == spec["role"]
                and c["labels"].get(LABEL_UNIT) == (name if _is_service(name) else None)]
        # the newest first: a unit has one container, but show a running one if any
        mine.sort(key=lambda c: (c.get("state") == "running", c.get("started_at") or 0),
                  reverse=True)
        state = _container_state(mine[0]) if mine else "absent"
        image = _image(mine[0]) if mine else "-"
        uptime = _container_uptime(mine[0], (unit or {}).get("now")) if mine else "-"
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
    restarting = ((unit or {}).get("status") == "restarting"
                  and (unit or {}).get("launcher_alive") is not False)
    if restarting and (runtime != "container" or state == "running"):
        state = "restarting"  # the launcher waits out its backoff, then starts the set again
    # engines and the front door: their client-facing ports; a service: all of them
    ports = ",".join(str(q["port"]) for proc in spec.get("processes", []) for q in proc["ports"]
                     if _is_service(name) or q["use"] in ("api", "proxy"))
    health = f"{ready}/{len(procs)} ready" if procs else "-"
    return {"node": host, "role": name, "instance": spec.get("instance") or "-",
            "dp ranks": _ranks(ranks), "state": state, "health": health,
            "restarts": _restarts(unit), "ports": ports or "-", "uptime": uptime, "image": image}


def is_stale(expected: str, unit: Mapping[str, Any] | None) -> bool:
    """The unit runs (or has installed) another spec than the one planned now: what its
    launcher recorded it runs, else its spec file on the node."""
    if not unit or not unit.get("recorded"):
        return False
    have = unit.get("running_spec_sha256") or unit.get("spec_sha256")
    return bool(have) and have != expected


def orphan_rows(removals: list[Mapping[str, Any]], hostvars: Mapping[str, Any]
                ) -> list[dict[str, str]]:
    """Rows of the units the deployment record has and the inventory no longer does
    (status.yml looked at them with the recorded connection)."""
    rows = []
    for entry in removals:
        host = entry["host"]
        hv = hostvars[host] if host in hostvars else {}
        report = (hv.get("pd_status_orphans") if hasattr(hv, "get") else None) or {}
        units = dict(report.get("units") or {})
        for u in entry["units"]:
            got = units.get(u["name"]) or {}
            procs = got.get("processes") or []
            if report.get("unreachable"):
                state = "ORPHAN (unreachable)"
            elif not report:
                state = "ORPHAN (not looked at)"
            elif got.get("running"):
                state = "ORPHAN running"
            elif got.get("recorded"):
                state = "ORPHAN degraded"
            else:
                state = "ORPHAN stopped"
            ports = ",".join(sorted({p.split("/")[0].rsplit(":", 1)[-1] for proc in procs
                                     for p in proc.get("ports", [])
                                     if p.endswith(("/api", "/proxy"))}))
            ready = sum(1 for p in procs if p.get("ready"))
            rows.append({"node": host, "role": u["name"], "instance": u.get("instance") or "-",
                         "dp ranks": _ranks(sorted(r for p in procs
                                                   for r in p.get("dp_ranks", []))),
                         "state": state,
                         "health": f"{ready}/{len(procs)} ready" if procs else "-",
                         "restarts": _restarts(got), "ports": ports or "-",
                         "uptime": _uptime(got.get("uptime_s")), "image": u.get("image") or "-"})
    return rows


def pd_status_table(plan: Mapping[str, Any], hostvars: Mapping[str, Any],
                    removals: list[Mapping[str, Any]] | None = None) -> list[str]:
    rows, stale = [], []
    for host, by_role in plan["specs"].items():  # per host: P/D, services, C
        hv = hostvars[host]
        runtime = hv.get("pd_runtime", "process") if hasattr(hv, "get") else "process"
        report = (hv.get("pd_status_units") if hasattr(hv, "get") else None) or {}
        units = dict(report.get("units") or {})  # pd_unit_info with `units`: by name
        containers = _containers(hv.get("pd_status_containers") if hasattr(hv, "get") else None)
        reach = report
        for name, spec in by_role.items():
            row = unit_row(host, name, spec, units.get(name), containers, runtime)
            if (reach or {}).get("unreachable"):  # status.yml could not reach the host
                row.update(state="unreachable", health="-", uptime="-")
            elif is_stale(spec_sha256(unit_spec(plan, host, name, hv)), units.get(name)):
                row.update(state=f"STALE {row['state']}")
                stale.append(f"{host}/{name}")
            rows.append(row)
    orphans = orphan_rows(removals or [], hostvars)
    lines = format_table(rows + orphans)
    if stale:
        lines.append(f"{len(stale)} stale unit(s), running another spec than the inventory "
                     f"gives now: {', '.join(stale)} (site.yml restarts them; with "
                     "-e pd_rolling=true one instance at a time)")
    if orphans:
        lines.append(f"{len(orphans)} orphan unit(s) on hosts or units the inventory no "
                     f"longer has: {', '.join(r['node'] + '/' + r['role'] for r in orphans)} "
                     "(the deployment record has them; site.yml drains and removes them)")
    for host in plan["specs"]:
        hv = hostvars[host]
        report = hv.get("pd_status_gates") if hasattr(hv, "get") else None
        lines += gate_lines(host, report)
    return lines


def gate_lines(host: str, report: Mapping[str, Any] | None) -> list[str]:
    """What each gated service of HOST says is registered or missing (status.yml ran
    the gate's explain command)."""
    out: list[str] = []
    for res in (report or {}).get("results", []):
        if res.get("skipped"):
            continue
        text = str(res.get("stdout") or res.get("msg") or "").rstrip()
        verdict = "ok" if res.get("rc") == 0 else "NOT READY"
        out.append(f"{host}/{res.get('pd_gate_unit') or res.get('item')} gate: {verdict}")
        out += [f"  {line}" for line in text.splitlines()]
    return out


def format_table(rows: list[dict[str, str]]) -> list[str]:
    widths = {c: max([len(c)] + [len(r[c]) for r in rows]) for c in COLUMNS}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in COLUMNS)]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in COLUMNS) for r in rows]
    healthy = sum(1 for r in rows if r["health"].split("/")[0] == r["health"].split("/")[-1]
                  .split()[0] and r["health"] != "-")
    lines.append(f"{healthy}/{len(rows)} units healthy")
    return lines
