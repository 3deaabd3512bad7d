"""`wait SPEC --timeout S`: poll every process's readiness probe until all are ready.

Probes (spec processes[].ready): ``http`` -> GET url (optional headers), ready on
status 200; ``tcp`` -> a TCP connect succeeds; no probe -> ready once the state file
lists it as running (at once when no state directory is known). The probes are
``pd_launcher.nodeutil.probe_ready`` (shared with the pd_unit_info module): direct
connections, whatever http_proxy, https_proxy, ALL_PROXY or no_proxy say.

Exit 0 when all are ready; 4 on timeout (prints the processes not ready, the last
probe error and the tail of their logs); 1 early when the state file shows that the
launcher has stopped or failed (checked only when --state-dir is given or the spec's
state dir exists; a missing state file just means "not started yet", and a state
file older than the `wait` itself gets STALE_GRACE seconds to be replaced by a
launcher that is just starting).

A launcher restarting its set after a crash (status ``restarting``, see the spec's
``restart``) is neither ready nor failed: `wait` keeps waiting, and every process
has to be ready again after the restart (probes that passed before it, or while it
was under way, no longer count).
"""
from __future__ import annotations

import concurrent.futures
import os
import sys
import time
from typing import Any, Dict, List, Optional, TextIO, Tuple

from ..nodeutil import probe_ready, read_state, same_pid_namespace, verify_recorded
from .common import EXIT_CHILD, EXIT_OK, EXIT_TIMEOUT, tail_lines
from .logs import process_log_path
from .spec import NodeSpec, Process

LOG_TAIL = 20
STALE_GRACE = 5.0


def launcher_gone(state_dir: Optional[str], since: float = 0.0) -> Optional[str]:
    """A reason when the state file shows the launcher is not (or no longer) running.

    A state file last written before `since` (when `wait` started) may be left over
    from an earlier run that a new launcher is about to replace; it only counts once
    STALE_GRACE seconds have passed without a fresh one.
    """
    if not state_dir:
        return None
    try:
        state = read_state(state_dir)
    except (OSError, ValueError):
        return None
    if state is None:
        return None
    reason = _gone_reason(state)
    if reason is None:
        return None
    try:
        updated = float(state.get("updated_at") or 0.0)
    except (TypeError, ValueError):
        updated = 0.0
    if updated < since and time.time() - since < STALE_GRACE:
        return None
    return reason


def _gone_reason(state: Dict[str, Any]) -> Optional[str]:
    status = state.get("status")
    failure = state.get("failure")
    if status in ("failed", "stopping"):
        what = f"launcher status {status}"
        if failure and failure.get("process"):
            what += f": process {failure.get('process')} exited ({failure.get('status')})"
        elif failure:
            what += f": {failure.get('error') or failure.get('status')}"
        return what
    if not same_pid_namespace(state):
        return None  # PIDs from a container's namespace cannot be checked from here
    launcher = state.get("launcher") or {}
    verdict, detail = verify_recorded(launcher)
    if verdict != "ours":
        return f"launcher is not running ({detail})"
    return None


def restart_mark(state_dir: Optional[str]) -> Tuple[Optional[str], int]:
    """(status, restarts) of the state file; (None, 0) without one. Old state files
    have no `restarts` (0)."""
    if not state_dir:
        return None, 0
    try:
        state = read_state(state_dir)
    except (OSError, ValueError):
        return None, 0
    if not state:
        return None, 0
    try:
        restarts = int(state.get("restarts") or 0)
    except (TypeError, ValueError):
        restarts = 0
    return state.get("status"), restarts


def running_per_state(state_dir: Optional[str], name: str) -> Tuple[bool, str]:
    """Readiness of a process without a probe: the launcher says it is running."""
    if not state_dir:
        return True, "no probe"
    try:
        state = read_state(state_dir)
    except (OSError, ValueError):
        state = None
    if not state or state.get("status") != "running":
        return False, "no probe; launcher not running yet"
    for rec in state.get("processes") or []:
        if rec.get("name") == name and rec.get("exit") is None:
            if same_pid_namespace(state) and verify_recorded(rec)[0] != "ours":
                return False, "no probe; recorded process is not running"
            return True, "no probe, running"
    return False, "no probe; not in the state file"


def wait_ready(spec: NodeSpec, timeout: float, interval: float, log_dir: Optional[str],
               state_dir: Optional[str], out: TextIO = sys.stdout,
               err: TextIO = sys.stderr) -> int:
    start = time.monotonic()
    since = time.time()
    deadline = start + timeout
    pending: Dict[str, Process] = {p.name: p for p in spec.processes}
    last: Dict[str, str] = {}
    workers = max(1, min(16, len(pending)))
    restarts_seen = restart_mark(state_dir)[1]
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        while True:
            gone = launcher_gone(state_dir, since)
            if gone:
                names = ", ".join(sorted(pending))
                err.write(f"pd-launcher wait: {gone}; not ready: {names}\n")
                _tails(pending, log_dir, last, err)
                return EXIT_CHILD
            status, restarts = restart_mark(state_dir)
            if status == "restarting" or restarts != restarts_seen:
                # the set is (or was) restarted: what was ready before counts no more
                if len(pending) < len(spec.processes) or restarts != restarts_seen:
                    out.write(f"launcher restarting its processes (restart {restarts}); "
                              "waiting for all of them again\n")
                    out.flush()
                pending = {p.name: p for p in spec.processes}
                restarts_seen = restarts
                for name in pending:
                    last[name] = f"launcher {status} (restart {restarts})"
            if status != "restarting":
                probe_timeout = max(0.2, min(2.0, deadline - time.monotonic()))
                futures = {name: pool.submit(probe_ready, p.ready, probe_timeout)
                           for name, p in pending.items() if p.ready is not None}
                results = {name: futures[name].result() if name in futures
                           else running_per_state(state_dir, name) for name in pending}
                after = restart_mark(state_dir)
                if after[0] != "restarting" and after[1] == restarts:  # no restart meanwhile
                    for name, (ok, detail) in results.items():
                        last[name] = detail
                        if ok:
                            out.write(f"ready: {name} ({detail}) after "
                                      f"{time.monotonic() - start:.1f}s\n")
                            out.flush()
                            del pending[name]
            if not pending:
                out.write(f"all {len(spec.processes)} process(es) ready\n")
                return EXIT_OK
            now = time.monotonic()
            if now >= deadline:
                break
            time.sleep(max(0.0, min(interval, deadline - now)))
    names = ", ".join(sorted(pending))
    err.write(f"pd-launcher wait: timed out after {timeout:.1f}s; {len(pending)} process(es) "
              f"not ready: {names}\n")
    _tails(pending, log_dir, last, err)
    return EXIT_TIMEOUT


def _tails(pending: Dict[str, Process], log_dir: Optional[str], last: Dict[str, str],
           err: TextIO) -> None:
    for name in sorted(pending):
        err.write("--- {}: {}\n".format(name, last.get(name, "not probed")))
        if not log_dir:
            continue
        path = process_log_path(log_dir, name)
        lines: List[str] = tail_lines(path, LOG_TAIL)
        if not os.path.exists(path):
            err.write(f"    (no log file {path})\n")
        elif not lines:
            err.write(f"    (log {path} is empty)\n")
        else:
            err.write(f"    last {len(lines)} lines of {path}:\n")
            for line in lines:
                err.write(f"    | {line}\n")
    err.flush()


EXPLAIN_TIMEOUT = 15.0


def explain_gate(argv: List[str], timeout: float = EXPLAIN_TIMEOUT) -> str:
    """The output of a gate's `explain` command (what is missing), never raising."""
    import subprocess

    if not argv:
        return ""
    try:
        done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=timeout, check=False, env=_no_proxy_env())
    except (OSError, subprocess.SubprocessError) as exc:
        return f"(cannot run {argv[0]}: {exc})"
    return done.stdout.decode("utf-8", "replace").rstrip()


def _no_proxy_env() -> Dict[str, str]:
    env = dict(os.environ)
    for key in list(env):
        if key.lower() in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
            del env[key]
    return env


def _gate_open(gate: Any, timeout: float) -> Tuple[bool, str]:
    detail = "open"
    if gate.ready is not None:
        ok, detail = probe_ready(gate.ready, timeout)
        if not ok:
            return False, f"{gate.ready.describe()}: {detail}"
    if gate.check:
        import subprocess

        try:
            done = subprocess.run(gate.check, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  timeout=max(2.0, timeout * 5), check=False,
                                  env=_no_proxy_env())
        except (OSError, subprocess.SubprocessError) as exc:
            return False, f"cannot run {gate.check[0]}: {exc}"
        last = (done.stdout.decode("utf-8", "replace").strip().splitlines() or [""])[-1]
        if done.returncode != 0:
            return False, f"check exited {done.returncode}: {last}"[:300]
        return True, "check passed"
    return True, detail


def wait_gate(spec: NodeSpec, timeout: float, interval: float, state_dir: Optional[str],
              out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """`wait --gate`: poll the spec's gate (probe and/or check command); on timeout say
    what is missing (its explain command, or its check's output)."""
    gate = spec.gate
    if gate is None:
        out.write("no gate in this spec: nothing to wait for\n")
        return EXIT_OK
    what = gate.what or (gate.ready.describe() if gate.ready else " ".join(gate.check))
    start = time.monotonic()
    since = time.time()
    deadline = start + timeout
    detail = "not probed"
    while True:
        gone = launcher_gone(state_dir, since)
        if gone:
            err.write(f"pd-launcher wait: {gone}; {what} never opened\n")
            return EXIT_CHILD
        ok, detail = _gate_open(gate, max(0.2, min(2.0, deadline - time.monotonic())))
        if ok:
            out.write(f"ready: {what} ({detail}) after {time.monotonic() - start:.1f}s\n")
            return EXIT_OK
        now = time.monotonic()
        if now >= deadline:
            break
        time.sleep(max(0.0, min(interval, deadline - now)))
    err.write(f"pd-launcher wait: timed out after {timeout:.1f}s: {what} is not ready "
              f"({detail})\n")
    told = explain_gate(gate.explain or gate.check)
    if told:
        err.write("what is missing:\n" + "".join(f"  {line}\n" for line in told.splitlines()))
    err.flush()
    return EXIT_TIMEOUT
