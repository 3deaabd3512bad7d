"""What /proc says about a PID: start time, command line, state, process group, session.

A PID is only trusted to be "ours" when its start time (field 22 of
/proc/PID/stat, clock ticks since boot) equals the recorded one and its command
line still matches what we started (see ``cmdline_matches``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, List, Optional

from .common import mask_argv, mask_text


@dataclass
class ProcStat:
    pid: int
    state: str  # R S D Z T ...
    ppid: int
    pgrp: int
    session: int
    start_time: int  # clock ticks since boot

    @property
    def zombie(self) -> bool:
        return self.state in ("Z", "X", "x")


def read_stat(pid: int) -> Optional[ProcStat]:
    """Parse /proc/PID/stat; None when the process does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("utf-8", "replace")
    except (OSError, ValueError):
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    rparen = data.rfind(")")
    if rparen < 0:
        return None
    rest = data[rparen + 2:].split()
    # rest[0] is field 3 (state); field N is rest[N - 3].
    try:
        return ProcStat(
            pid=pid,
            state=rest[0],
            ppid=int(rest[1]),
            pgrp=int(rest[2]),
            session=int(rest[3]),
            start_time=int(rest[19]),
        )
    except (IndexError, ValueError):
        return None


def start_time(pid: int) -> Optional[int]:
    st = read_stat(pid)
    return st.start_time if st else None


def read_cmdline(pid: int) -> Optional[List[str]]:
    """argv of a process as the kernel shows it (may be rewritten by setproctitle)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            data = f.read()
    except OSError:
        return None
    parts = data.split(b"\0")
    while parts and parts[-1] == b"":
        parts.pop()
    return [p.decode("utf-8", "surrogateescape") for p in parts]


def cmdline_after_exec(pid: int, timeout: float = 1.0) -> Optional[List[str]]:
    """The command line of a process we just spawned.

    Popen returns once execve() has replaced the child's memory, but the kernel sets
    up the new argument area a moment later: until then /proc/PID/cmdline is empty.
    """
    import time

    deadline = time.monotonic() + timeout
    while True:
        cmd = read_cmdline(pid)
        if cmd or cmd is None or time.monotonic() >= deadline:
            return cmd or None
        st = read_stat(pid)
        if st is None or st.zombie:
            return None
        time.sleep(0.005)


def pid_namespace() -> Optional[str]:
    """Identity of our PID namespace ("pid:[4026531836]"), None when unknown."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _norm(tokens: Iterable[str]) -> str:
    # setproctitle-style titles put the whole command in one NUL-padded string.
    return " ".join(" ".join(t.split()) for t in tokens if t.strip())


def cmdline_matches(argv: List[str], recorded_cmdline: Optional[List[str]],
                    current: Optional[List[str]]) -> bool:
    """Does the current /proc cmdline still belong to the process we started?

    `argv` is what we executed and `recorded_cmdline` what /proc showed right after
    the start (differs for shebang scripts: ``/usr/bin/python3 /usr/bin/vllm serve``);
    both are stored masked (no secrets in the state file), so the current command
    line is masked the same way before comparing. Accepted:
      * exactly the recorded command line, or exactly argv;
      * a rewritten title (nginx: "nginx: master process nginx -p ... -c ...") that
        still contains the program's base name and all of argv[1:] in order.
    """
    if not current or not argv:
        return False
    cur_masked = mask_argv(current)
    if recorded_cmdline is not None and cur_masked == list(recorded_cmdline):
        return True
    if cur_masked == mask_argv(argv):
        return True
    text = mask_text(_norm(current))
    prog = os.path.basename(argv[0])
    args = mask_text(_norm(mask_argv(argv)[1:]))
    if prog not in text:
        return False
    return (not args) or args in text


def alive(pid: int) -> bool:
    st = read_stat(pid)
    return st is not None and not st.zombie


def _live_processes() -> List[ProcStat]:
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
    return [st for st in _live_processes() if st.session == sid]


def group_members(pgid: int) -> List[ProcStat]:
    """Live (non-zombie) processes in process group `pgid`."""
    return [st for st in _live_processes() if st.pgrp == pgid]
