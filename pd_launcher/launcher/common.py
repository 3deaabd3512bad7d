"""Shared bits of the node launcher: exit codes, secret masking, small helpers.

Secret masking and the state file name live in ``pd_launcher.nodeutil`` (shared
with the Ansible modules) and are re-exported here.
Standard library only, Python >= 3.9.
"""
from __future__ import annotations

import os
from typing import Iterable, List, Optional

from ..nodeutil import (  # noqa: F401  (re-exported)
    MASK,
    STATE_FILE,
    is_secret_env,
    is_secret_flag,
    mask_argv,
    mask_env,
    mask_text,
)

# Exit codes (also documented in README.md and cli.py).
EXIT_OK = 0  # ok / clean stop / nothing to stop
EXIT_CHILD = 1  # a supervised child exited (or `wait`: the launcher is gone; `stop`: left over)
EXIT_USAGE = 2  # usage error or invalid spec
EXIT_NODE = 3  # node check failed: port busy, path/device/command missing, NIC, pre_start
EXIT_TIMEOUT = 4  # `wait` timed out
EXIT_RUNNING = 5  # a launcher is already running on this state directory

LAUNCHER_LOG = "launcher.log"


class LauncherError(Exception):
    """An error with an exit code and a message meant for the operator."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def shell_quote_argv(argv: Iterable[str]) -> str:
    """Shell-like rendering; masked values stay readable: `--api-key ***`."""
    import shlex

    def q(a: str) -> str:
        if a == MASK:
            return a
        if a.endswith("=" + MASK):
            return shlex.quote(a[: -len(MASK)]) + MASK
        return shlex.quote(a)

    return " ".join(q(a) for a in argv)


def tail_lines(path: Optional[str], n: int = 20, max_bytes: int = 64 * 1024) -> List[str]:
    """Last `n` lines of a text file (reads at most `max_bytes` from its end)."""
    if not path:
        return []
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return []
    lines = data.decode("utf-8", "replace").splitlines()
    return lines[-n:]


def describe_status(status: int) -> str:
    """Human text for an os.waitpid status."""
    if os.WIFEXITED(status):
        return f"exit code {os.WEXITSTATUS(status)}"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            import signal

            name = signal.Signals(sig).name
        except (ValueError, ImportError):
            name = f"signal {sig}"
        return f"killed by {name}"
    return f"status {status}"
