"""Stopping: SIGTERM to each child's process group, grace period, SIGKILL; and `stop`.

Every child is started with ``start_new_session=True``, so its PID is also its
process group id and session id. Stopping a child means signalling every process
group of that session (normally just one) until no live process of the session is
left. A session id cannot be handed to a new process while any member of the
session is alive, so the members found are descendants of what we started.

`python -m pd_launcher stop --state-dir DIR [--grace S]`:
  * no state file: "nothing to stop", exit 0;
  * the recorded launcher is alive (PID, start time and command line match): SIGTERM
    it and wait (its grace + 15 s) for its own shutdown, which removes the state
    file; if it does not finish, SIGKILL it and continue as below;
  * otherwise each recorded child is checked: PID gone -> nothing to do; start time
    or command line differs -> the PID was reused: refuse to signal it, say so;
    match -> SIGTERM its groups, wait the grace period, SIGKILL what is left.
    Leftovers of a child that already exited (same session, started no earlier than
    the child) are stopped the same way.
  * exit 0 when nothing recorded is left (state file removed), 1 otherwise.
"""
from __future__ import annotations

import errno
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Set

from ..nodeutil import (
    LOCK_FILE,
    describe_state_damage,
    launcher_by_lock,
    same_pid_namespace,
    verify_recorded,
)
from . import procinfo
from .common import EXIT_CHILD, EXIT_OK
from .state import read_state, remove_state, state_path

POLL = 0.05


@dataclass
class Target:
    name: str
    sid: int  # session id == pgid == PID of the child we started
    min_start: int = 0  # ignore session members that started before this (ticks)


def _members(targets: List[Target]) -> Dict[int, Set[int]]:
    """sid -> set of live process groups in that session (only for the targets)."""
    wanted = {t.sid: t for t in targets}
    found: Dict[int, Set[int]] = {}
    for st in procinfo.live_processes():
        if st.session in wanted and st.start_time >= wanted[st.session].min_start:
            found.setdefault(st.session, set()).add(st.pgrp)
    return found


def _signal_groups(pgids: Set[int], sig: int, log: logging.Logger, name: str) -> None:
    for pgid in sorted(pgids):
        try:
            os.killpg(pgid, sig)
        except OSError as exc:
            if exc.errno != errno.ESRCH:
                log.warning("cannot send %s to process group %d of %s: %s",
                            signal.Signals(sig).name, pgid, name, exc)


def terminate(targets: List[Target], grace: float, log: logging.Logger,
              reap: Optional[Callable[[], Any]] = None,
              escalate: Optional[Callable[[], bool]] = None,
              kill_wait: float = 10.0) -> List[Target]:
    """SIGTERM every target session's groups, wait `grace`, SIGKILL the rest.

    `reap` is called while waiting (the launcher reaps its children there);
    `escalate()` returning True cuts the grace period short.
    Returns the targets that still have live processes (normally none).
    """
    if reap:
        reap()
    pending = {t.sid: t for t in targets}
    live = _members(list(pending.values()))
    for sid in list(pending):
        groups = live.get(sid, set()) | {sid}
        _signal_groups(groups, signal.SIGTERM, log, pending[sid].name)
    for sig, limit in ((signal.SIGTERM, grace), (signal.SIGKILL, kill_wait)):
        if sig == signal.SIGKILL:
            if not pending:
                break
            for t in pending.values():
                log.warning("%s (pgid %d) still running after %.1fs grace: SIGKILL",
                            t.name, t.sid, grace)
                _signal_groups(live.get(t.sid, set()) | {t.sid}, signal.SIGKILL, log, t.name)
        deadline = time.monotonic() + limit
        while True:
            if reap:
                reap()
            live = _members(list(pending.values()))
            for sid in list(pending):
                if sid not in live:
                    log.info("%s (pgid %d) stopped", pending[sid].name, sid)
                    del pending[sid]
            if not pending:
                return []
            if time.monotonic() >= deadline:
                break
            if sig == signal.SIGTERM and escalate is not None and escalate():
                log.warning("second stop request: not waiting for the grace period")
                break
            time.sleep(POLL)
    return list(pending.values())


def stop_recorded_processes(state: Dict[str, Any], grace: float,
                            log: logging.Logger) -> bool:
    """Stop the recorded children that are still ours. True when nothing of ours is left."""
    targets: List[Target] = []
    for rec in state.get("processes") or []:
        name = str(rec.get("name", "?"))
        verdict, detail = verify_recorded(rec)
        if verdict == "mismatch":
            log.warning("%s: %s; not touching it", name, detail)  # reported as damage too
            continue
        try:
            sid = int(rec.get("pgid") or rec["pid"])
            start = int(rec.get("start_time") or 0)
        except (KeyError, TypeError, ValueError):
            continue
        if verdict == "ours":
            log.info("%s: stopping %s (pgid %d)", name, detail, sid)
            targets.append(Target(name=name, sid=sid, min_start=0))
        else:
            # The child itself is gone; processes left in its session are its descendants.
            left = [m for m in procinfo.session_members(sid) if m.start_time >= start]
            if left:
                log.info("%s: %s, but %d process(es) of its session remain: %s", name, detail,
                         len(left), " ".join(str(m.pid) for m in left))
                targets.append(Target(name=name, sid=sid, min_start=start))
    if not targets:
        return True
    remaining = terminate(targets, grace, log)
    for t in remaining:
        log.error("%s (pgid %d) survived SIGKILL", t.name, t.sid)
    return not remaining


DAMAGE = "damage: "  # prefix of the messages about a damaged state file (roles show them)


def _stop_launcher(launcher: Dict[str, Any], wait: float, log: logging.Logger) -> None:
    """SIGTERM a launcher proven ours and wait for its own shutdown (it stops its
    processes, then removes its state file); SIGKILL it after `wait` seconds."""
    pid = int(launcher["pid"])
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if verify_recorded(launcher)[0] != "ours":
            return
        time.sleep(POLL)
    log.warning("launcher pid %d did not finish within %.0fs: SIGKILL", pid, wait)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    time.sleep(0.2)


def _set_aside(path: str, log: logging.Logger) -> None:
    aside = f"{path}.damaged-{int(time.time())}"
    try:
        os.replace(path, aside)
        log.warning("%smoved %s to %s", DAMAGE, path, aside)
    except FileNotFoundError:
        pass


def _stop_unreadable(state_dir: str, error: str, grace: Optional[float],
                     log: logging.Logger) -> int:
    """The state file cannot be read: only the launcher proven by its lock is stopped
    (it stops its own processes); no other PID is signalled."""
    path = state_path(state_dir)
    log.warning("%s%s cannot be read (%s): no recorded PID can be proven ours", DAMAGE,
                path, error)
    launcher = launcher_by_lock(state_dir)
    if launcher is None:
        log.warning("%sno live launcher holds %s: nothing is signalled (processes it "
                    "started got SIGTERM when it died)", DAMAGE,
                    os.path.join(state_dir, LOCK_FILE))
        _set_aside(path, log)
        return EXIT_OK
    wait = (30.0 if grace is None else grace) + 15.0
    log.warning("%sthe launcher holding the lock is pid %d (%s): SIGTERM, it stops its own "
                "processes", DAMAGE, launcher["pid"], " ".join(launcher["cmdline"])[:120])
    _stop_launcher(launcher, wait, log)
    if verify_recorded(launcher)[0] == "ours":
        log.error("the launcher pid %d survived SIGKILL", launcher["pid"])
        return EXIT_CHILD
    if os.path.exists(path):
        _set_aside(path, log)  # the launcher rewrote it (e.g. failed) or could not remove it
    log.info("launcher stopped")
    return EXIT_OK


def stop_command(state_dir: str, grace: Optional[float], log: logging.Logger) -> int:
    try:
        state = read_state(state_dir)
    except (OSError, ValueError) as exc:
        return _stop_unreadable(state_dir, str(exc), grace, log)
    if state is None:
        log.info("nothing to stop (no state file %s)", state_path(state_dir))
        return EXIT_OK
    if not same_pid_namespace(state):
        log.error("%s was written in another PID namespace (%s, this is %s): its PIDs mean "
                  "nothing here; stop it where it runs (container stop / exec)",
                  state_path(state_dir), state.get("pid_namespace"), procinfo.pid_namespace())
        return EXIT_CHILD
    for problem in describe_state_damage(state_dir, state):
        log.warning("%s%s", DAMAGE, problem)
    try:
        recorded_grace = float(state.get("grace_seconds") or 30.0)
    except (TypeError, ValueError):
        recorded_grace = 30.0
    use_grace = recorded_grace if grace is None else grace
    launcher = state.get("launcher") or {}
    verdict, detail = verify_recorded(launcher) if launcher else ("gone", "no launcher entry")
    if verdict != "ours":
        # the recorded entry may be damaged while the launcher runs: its lock proves it
        by_lock = launcher_by_lock(state_dir)
        if by_lock is not None:
            if verdict == "mismatch":
                log.warning("%sthe launcher holding the lock is pid %d, not the recorded "
                            "one", DAMAGE, by_lock["pid"])
            launcher, verdict, detail = by_lock, "ours", f"pid {by_lock['pid']} (lock holder)"
    if verdict == "ours":
        log.info("sending SIGTERM to the launcher (%s)", detail)
        _stop_launcher(launcher, recorded_grace + 15.0, log)
        try:
            state = read_state(state_dir)
        except (OSError, ValueError):
            state = None
        if state is None:
            log.info("launcher stopped everything")
            return EXIT_OK
    ok = stop_recorded_processes(state, use_grace, log)
    if ok:
        remove_state(state_dir)
        log.info("stopped; state file removed")
        return EXIT_OK
    return EXIT_CHILD
