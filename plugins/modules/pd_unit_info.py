#!/usr/bin/python
"""Report the state of one pd-deploy launcher unit on a node (read-only)."""
from __future__ import annotations

DOCUMENTATION = r"""
module: pd_unit_info
short_description: State of a pd-deploy launcher unit (launcher + processes) on a node
description:
  - Reads the launcher state file C(<state_dir>/launcher.json), checks every recorded
    PID the way the launcher does (same start time and a matching command line, so a
    reused PID is never taken for ours) and optionally probes each process's readiness
    as the node spec describes it (HTTP GET ready on 200, or TCP connect).
  - Probes are direct connections to the node; C(http_proxy), C(https_proxy),
    C(ALL_PROXY) and C(no_proxy) are ignored.
  - Never changes anything; safe in check mode.
author: pd-deploy
options:
  state_dir:
    description: The unit's state directory (the spec's C(dirs.state)).
    type: path
    required: true
  spec_path:
    description:
      - The unit's node spec, for the process list and readiness probes.
      - Without it (or while it is missing) the processes are the recorded ones and
        nothing is probed.
    type: path
  probe:
    description: Probe the readiness of every process that is not known to be dead.
    type: bool
    default: true
  timeout:
    description: Seconds per probe.
    type: float
    default: 2
  check_pids:
    description:
      - Verify the recorded PIDs. Set to false for units in a container (their PIDs
        belong to the container's PID namespace); a state file written in another PID
        namespace is never checked.
    type: bool
    default: true
"""

EXAMPLES = r"""
- name: Look at the prefill unit
  pd_unit_info:
    state_dir: /opt/pd/state/P
    spec_path: /opt/pd/run/P/spec.json
  register: unit

- name: Processes only, no probes (a unit in a container)
  pd_unit_info:
    state_dir: /opt/pd/state/D
    probe: false
    check_pids: false
"""

RETURN = r"""
deployed:
  description: The spec file exists.
  type: bool
  returned: always
recorded:
  description: A state file exists (the launcher started, or failed and left it).
  type: bool
  returned: always
status:
  description: The launcher's status in the state file (starting, running, stopping, failed).
  type: str
  returned: always
  sample: running
state_error:
  description: Why the state file could not be read (then it counts as recorded).
  type: str
  returned: when the state file is unreadable
damage:
  description:
    - What in the state file cannot be proven ours, each naming the node, unit and file
      (unreadable file, a recorded PID that now belongs to another process); also
      issued as warnings. Such PIDs are never signalled by stop or cleanup.
  type: list
  elements: str
  returned: always
launcher_pid:
  description: The recorded launcher PID.
  type: int
  returned: always
launcher_alive:
  description: The recorded launcher still runs (null when PIDs are not checked).
  type: bool
  returned: always
uptime_s:
  description: Seconds since the launcher started (null when not running or not checked).
  type: float
  returned: always
running:
  description: The launcher and every process are alive.
  type: bool
  returned: always
healthy:
  description: Every process answered its readiness probe.
  type: bool
  returned: always
processes:
  description: One entry per process of the spec (or of the state file without a spec).
  type: list
  elements: dict
  returned: always
  sample:
    - name: engine-dp0
      pid: 4242
      alive: true
      ready: true
      probe: "GET http://10.0.0.1:8000/health: 200"
      ports: ["10.0.0.1:8000/api"]
      dp_ranks: [0]
probe_seconds:
  description: Time spent probing.
  type: float
  returned: always
now:
  description: The node's clock (seconds since the epoch).
  type: float
  returned: always
"""

import concurrent.futures
import json
import os
import time

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.pd_node import (
    describe_state_damage,
    launcher_by_lock,
    probe_ready,
    read_state,
    same_pid_namespace,
    seconds_since_start,
    state_path,
    verify_recorded,
)


def _ours(entry: dict) -> bool:
    return bool(entry) and verify_recorded(entry)[0] == "ours"


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
    state, read_error = None, None
    try:
        state = read_state(p["state_dir"])
    except (OSError, ValueError) as exc:
        read_error = f"cannot read {state_path(p['state_dir'])}: {exc}"
    spec = None
    if p["spec_path"] and os.path.exists(p["spec_path"]):
        try:
            with open(p["spec_path"], encoding="utf-8") as f:
                spec = json.load(f)
        except (OSError, ValueError) as exc:
            module.fail_json(msg=f"cannot read the node spec {p['spec_path']}: {exc}")
    check = p["check_pids"] and (state is None or same_pid_namespace(state))
    where = "{}/{}".format((spec or {}).get("node") or "?",
                           (spec or {}).get("unit") or (spec or {}).get("role") or "?")
    damage, state_error = [], None
    if read_error:
        state_error = f"{where}: damaged state file: {read_error}; no recorded PID can be " \
                      "proven ours"
        damage.append(state_error)
    elif check:
        damage += [f"{where}: damaged state file: {d}"
                   for d in describe_state_damage(p["state_dir"], state)]
    for d in damage:
        module.warn(d)
    launcher = (state or {}).get("launcher") or {}
    if check and (state_error or (launcher and not _ours(launcher))):
        launcher = launcher_by_lock(p["state_dir"]) or launcher  # the lock proves it
    recorded = {e.get("name"): e for e in (state or {}).get("processes", [])}
    spec_procs = {q["name"]: q for q in (spec or {}).get("processes", [])}
    names = list(spec_procs) or list(recorded)
    alive = {n: (_ours(recorded.get(n, {})) if check else None) for n in names}
    started = time.monotonic()
    wanted = {n: spec_procs[n]["ready"] for n in names
              if p["probe"] and alive[n] is not False and (spec_procs.get(n) or {}).get("ready")}
    results = {}
    if wanted:
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, len(wanted))) as pool:
            futures = {n: pool.submit(probe_ready, r, p["timeout"]) for n, r in wanted.items()}
            results = {n: f.result() for n, f in futures.items()}
    procs = []
    for name in names:
        entry = recorded.get(name, {})
        spec_proc = spec_procs.get(name, {})
        ok, detail = results.get(name, (False, "not probed"))
        if p["probe"] and name in spec_procs and not spec_proc.get("ready") and name in recorded:
            # no probe of its own (e.g. xLLM's ranks > 0, covered by rank 0's /health):
            # ready while it runs, as `pd_launcher wait` counts it
            running = alive[name] if check else entry.get("exit") is None
            ok, detail = bool(running), "no probe, running" if running else "no probe, not running"
        procs.append({
            "name": name,
            "pid": entry.get("pid"),
            "alive": alive[name],
            "ready": ok,
            "probe": detail,
            "ports": [f"{x['host']}:{x['port']}/{x['use']}" for x in spec_proc.get("ports", [])],
            "dp_ranks": spec_proc.get("dp_ranks", []),
        })
    launcher_alive = _ours(launcher) if check else None
    uptime = None
    if launcher_alive:
        since = seconds_since_start(launcher["start_time"])
        uptime = None if since is None else round(since, 1)
    result = {
        "changed": False,
        "deployed": spec is not None,
        "recorded": state is not None or state_error is not None,
        "status": (state or {}).get("status"),
        "launcher_pid": launcher.get("pid"),
        "launcher_alive": launcher_alive,
        "uptime_s": uptime,
        "running": bool(launcher_alive) and bool(procs) and all(x["alive"] for x in procs),
        "healthy": bool(procs) and all(x["ready"] for x in procs),
        "processes": procs,
        "probe_seconds": round(time.monotonic() - started, 3),
        "now": time.time(),
    }
    if state_error:
        result["state_error"] = state_error
    result["damage"] = damage
    module.exit_json(**result)


if __name__ == "__main__":
    main()
