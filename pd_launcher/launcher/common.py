"""Shared bits of the node launcher: exit codes, secret masking, small helpers.

Standard library only, Python >= 3.9.
"""
from __future__ import annotations

import os
import re
from typing import Dict, Iterable, List, Mapping, Optional

# Exit codes (also documented in README.md and cli.py).
EXIT_OK = 0  # ok / clean stop / nothing to stop
EXIT_CHILD = 1  # a supervised child exited (or `wait`: the launcher is gone; `stop`: left over)
EXIT_USAGE = 2  # usage error or invalid spec
EXIT_NODE = 3  # node check failed: port busy, path/device/command missing, NIC, pre_start
EXIT_TIMEOUT = 4  # `wait` timed out
EXIT_RUNNING = 5  # a launcher is already running on this state directory

STATE_FILE = "launcher.json"
LAUNCHER_LOG = "launcher.log"

_SECRET_ENV_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD")
_SECRET_FLAG_WORDS = {"key", "token", "secret", "password", "apikey", "passwd"}
MASK = "***"


class LauncherError(Exception):
    """An error with an exit code and a message meant for the operator."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def is_secret_env(name: str) -> bool:
    upper = name.upper()
    return any(word in upper for word in _SECRET_ENV_WORDS)


def mask_env(env: Mapping[str, str]) -> Dict[str, str]:
    return {k: (MASK if is_secret_env(k) else v) for k, v in env.items()}


def is_secret_flag(flag: str) -> bool:
    """`--api-key`, `--hf-token`, `--db_password`: a dash/underscore separated word is secret.

    `--tokenizer` or `--max-num-batched-tokens` are not.
    """
    if not flag.startswith("-"):
        return False
    words = re.split(r"[-_]+", flag.lstrip("-").lower())
    return any(w in _SECRET_FLAG_WORDS for w in words)


def mask_argv(argv: Iterable[str]) -> List[str]:
    """Replace the value of secret flags: `--api-key X` and `--api-key=X` become `***`."""
    out: List[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(MASK)
            hide_next = False
            continue
        if arg.startswith("-") and "=" in arg:
            flag, _, _value = arg.partition("=")
            if is_secret_flag(flag):
                out.append(flag + "=" + MASK)
                continue
        elif is_secret_flag(arg):
            hide_next = True
        out.append(arg)
    return out


_SECRET_IN_TEXT = re.compile(r"(?P<flag>--?[A-Za-z0-9_-]+)(?P<sep>[ =])(?P<value>\S+)")


def mask_text(text: str) -> str:
    """Mask secret flag values inside one string (a process title such as nginx's)."""

    def repl(m: re.Match[str]) -> str:
        if is_secret_flag(m.group("flag")):
            return m.group("flag") + m.group("sep") + MASK
        return m.group(0)

    return _SECRET_IN_TEXT.sub(repl, text)


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
