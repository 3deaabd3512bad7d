"""`wait SPEC --timeout S`: poll every process's readiness probe until all are ready.

Probes (spec processes[].ready): ``http`` -> GET url (optional headers), ready on
status 200; ``tcp`` -> a TCP connect succeeds; no probe -> ready at once. Proxies
from the environment (http_proxy, ...) are ignored: probes go straight to the node.

Exit 0 when all are ready; 4 on timeout (prints the processes not ready, the last
probe error and the tail of their logs); 1 early when the state file shows that the
launcher has stopped or failed (checked only when --state-dir is given or the spec's
state dir exists; a missing state file just means "not started yet").
"""
from __future__ import annotations

import concurrent.futures
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from typing import Dict, List, Optional, TextIO, Tuple

from .common import EXIT_CHILD, EXIT_OK, EXIT_TIMEOUT, tail_lines
from .logs import process_log_path
from .spec import NodeSpec, Process, Ready
from .state import read_state
from .stop import same_pid_namespace, verify_recorded

LOG_TAIL = 20


def probe(ready: Optional[Ready], timeout: float = 2.0) -> Tuple[bool, str]:
    """(ready?, detail)."""
    if ready is None:
        return True, "no probe"
    if ready.type == "tcp":
        try:
            with socket.create_connection((str(ready.host), int(ready.port or 0)),
                                          timeout=timeout):
                return True, f"tcp {ready.host}:{ready.port} open"
        except OSError as exc:
            return False, f"tcp {ready.host}:{ready.port}: {exc}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(str(ready.url), headers=dict(ready.headers), method="GET")
    try:
        with opener.open(req, timeout=timeout) as resp:
            code = resp.status
    except urllib.error.HTTPError as exc:
        code = exc.code
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return False, f"GET {ready.url}: {reason}"
    if code == 200:
        return True, f"GET {ready.url}: 200"
    return False, f"GET {ready.url}: HTTP {code}"


def launcher_gone(state_dir: Optional[str]) -> Optional[str]:
    """A reason when the state file shows the launcher is not (or no longer) running."""
    if not state_dir:
        return None
    try:
        state = read_state(state_dir)
    except (OSError, ValueError):
        return None
    if state is None:
        return None
    status = state.get("status")
    failure = state.get("failure")
    if status in ("failed", "stopping"):
        what = f"launcher status {status}"
        if failure:
            what += ": process {} exited ({})".format(failure.get("process"), failure.get("status"))
        return what
    if not same_pid_namespace(state):
        return None  # PIDs from a container's namespace cannot be checked from here
    launcher = state.get("launcher") or {}
    verdict, detail = verify_recorded(launcher)
    if verdict != "ours":
        return f"launcher is not running ({detail})"
    return None


def wait_ready(spec: NodeSpec, timeout: float, interval: float, log_dir: Optional[str],
               state_dir: Optional[str], out: TextIO = sys.stdout,
               err: TextIO = sys.stderr) -> int:
    start = time.monotonic()
    deadline = start + timeout
    pending: Dict[str, Process] = {p.name: p for p in spec.processes}
    last: Dict[str, str] = {}
    workers = max(1, min(16, len(pending)))
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        while True:
            probe_timeout = max(0.2, min(2.0, deadline - time.monotonic()))
            futures = {name: pool.submit(probe, p.ready, probe_timeout)
                       for name, p in pending.items()}
            for name, fut in futures.items():
                ok, detail = fut.result()
                last[name] = detail
                if ok:
                    out.write(f"ready: {name} ({detail}) after {time.monotonic() - start:.1f}s\n")
                    out.flush()
                    del pending[name]
            if not pending:
                out.write(f"all {len(spec.processes)} process(es) ready\n")
                return EXIT_OK
            gone = launcher_gone(state_dir)
            if gone:
                names = ", ".join(sorted(pending))
                err.write(f"pd-launcher wait: {gone}; not ready: {names}\n")
                _tails(pending, log_dir, last, err)
                return EXIT_CHILD
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
