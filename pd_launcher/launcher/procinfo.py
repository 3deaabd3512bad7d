"""What /proc says about a PID: start time, command line, state, process group, session.

A PID is only trusted to be "ours" when its start time (field 22 of
/proc/PID/stat, clock ticks since boot) equals the recorded one and its command
line still matches what we started (see ``cmdline_matches``).

The readers shared with the Ansible modules (``read_stat``, ``start_time``,
``read_cmdline``, ``cmdline_matches``, ``pid_namespace``, ``alive``) live in
``pd_launcher.nodeutil`` and are re-exported here; the launcher-only scans of
sessions and process groups are below.
"""
from __future__ import annotations

import os
import time
from typing import List, Optional

from ..nodeutil import (  # noqa: F401  (re-exported)
    ProcStat,
    alive,
    cmdline_matches,
    pid_namespace,
    read_cmdline,
    read_stat,
    start_time,
)


def cmdline_after_exec(pid: int, timeout: float = 1.0) -> Optional[List[str]]:
    """The command line of a process we just spawned.

    Popen returns once execve() has replaced the child's memory, but the kernel sets
    up the new argument area a moment later: until then /proc/PID/cmdline is empty.
    """
    deadline = time.monotonic() + timeout
    while True:
        cmd = read_cmdline(pid)
        if cmd or cmd is None or time.monotonic() >= deadline:
            return cmd or None
        st = read_stat(pid)
        if st is None or st.zombie:
            return None
        time.sleep(0.005)


def live_processes() -> List[ProcStat]:
    """Every live (non-zombie) process readable in /proc."""
    out: List[ProcStat] = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if name.isdigit():
            st = read_stat(int(name))
            if st is not None and not st.zombie:
                out.append(st)
    return out


def session_members(sid: int) -> List[ProcStat]:
    """Live (non-zombie) processes whose session id is `sid`."""
    return [st for st in live_processes() if st.session == sid]


def group_members(pgid: int) -> List[ProcStat]:
    """Live (non-zombie) processes in process group `pgid`."""
    return [st for st in live_processes() if st.pgrp == pgid]
