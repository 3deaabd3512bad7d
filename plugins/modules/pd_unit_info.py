#!/usr/bin/python
"""Report the state of one pd-deploy launcher unit on a node (read-only)."""
from __future__ import annotations

DOCUMENTATION = r"""
module: pd_unit_info
short_description: State of a pd-deploy launcher unit (launcher + processes) on a node
description:
  - Reads the launcher state file, checks every recorded PID against its start time
    (no PID reuse confusion) and optionally probes each process's readiness.
  - Never changes anything; safe in check mode.
options:
  state_dir: {description: the unit's state directory, type: path, required: true}
  spec_path: {description: the unit's node spec (for readiness probes), type: path}
  probe: {description: probe readiness of every process, type: bool, default: true}
  timeout: {description: seconds per probe, type: float, default: 2}
  check_pids:
    description: verify recorded PIDs (false for units in a container PID namespace)
    type: bool
    default: true
"""

import json
import os
import socket
import time
import urllib.request

from ansible.module_utils.basic import AnsibleModule


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    return int(data.rsplit(")", 1)[1].split()[19])


def _alive(entry: dict) -> bool:
    pid = entry.get("pid")
    return bool(pid) and _start_time(int(pid)) == entry.get("start_time")


def _uptime(entry: dict) -> float | None:
    if not _alive(entry):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    with open("/proc/uptime") as f:
        boot_uptime = float(f.read().split()[0])
    return round(boot_uptime - entry["start_time"] / ticks, 1)


def _probe(ready: dict, timeout: float) -> bool:
    try:
        if ready.get("type") == "tcp":
            with socket.create_connection((ready["host"], int(ready["port"])), timeout):
                return True
        req = urllib.request.Request(ready["url"], headers=ready.get("headers") or {})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status == 200
    except Exception:
        return False


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "state_dir": {"type": "path", "required": True},
            "spec_path": {"type": "path"},
            "probe": {"type": "bool", "default": True},
            "timeout": {"type": "float", "default": 2.0},
            "check_pids": {"type": "bool", "default": True},
        },
        supports_check_mode=True,
    )
    p = module.params
    state = None
    state_file = os.path.join(p["state_dir"], "launcher.json")
    if os.path.exists(state_file):
        with open(state_file) as f:
            state = json.load(f)
    spec = None
    if p["spec_path"] and os.path.exists(p["spec_path"]):
        with open(p["spec_path"]) as f:
            spec = json.load(f)
    launcher = (state or {}).get("launcher") or {}
    recorded = {e["name"]: e for e in (state or {}).get("processes", [])}
    names = [q["name"] for q in (spec or {}).get("processes", [])] or list(recorded)
    procs = []
    started = time.monotonic()
    for name in names:
        entry = recorded.get(name, {})
        spec_proc = next((q for q in (spec or {}).get("processes", []) if q["name"] == name), {})
        alive = (_alive(entry) if entry else False) if p["check_pids"] else None
        ready = _probe(spec_proc["ready"], p["timeout"]) if (
            p["probe"] and alive is not False and spec_proc.get("ready")) else False
        procs.append({
            "name": name,
            "pid": entry.get("pid"),
            "alive": alive,
            "ready": ready,
            "ports": [f"{x['host']}:{x['port']}/{x['use']}" for x in spec_proc.get("ports", [])],
            "dp_ranks": spec_proc.get("dp_ranks", []),
        })
    launcher_alive = (bool(launcher) and _alive(launcher)) if p["check_pids"] else None
    module.exit_json(
        changed=False,
        deployed=spec is not None,
        recorded=state is not None,
        launcher_pid=launcher.get("pid"),
        launcher_alive=launcher_alive,
        uptime_s=_uptime(launcher) if launcher and p["check_pids"] else None,
        running=bool(launcher_alive) and bool(procs) and all(x["alive"] for x in procs),
        healthy=bool(procs) and all(x["ready"] for x in procs),
        processes=procs,
        probe_seconds=round(time.monotonic() - started, 3),
        now=time.time(),
    )


if __name__ == "__main__":
    main()
