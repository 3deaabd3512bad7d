"""Run a command that prints a version and check it against a minimum.

    python -m pd_launcher.version_check --min 6.2.0 [--name redis-server]
        [--why TEXT] [--timeout S] -- COMMAND ARGS...

The first ``x.y`` or ``x.y.z`` number in the command's output (standard output, then
standard error) is its version; missing parts count as 0 (6.2 == 6.2.0). The exit
status of the command is not looked at when it printed a version. Example:
``redis-server --version`` prints ``Redis server v=7.0.15 sha=00000000:0 ...``.

Output: ``redis-server 7.0.15 >= 6.2.0`` on success; otherwise on standard error
``redis-server 5.0.7 is older than 6.2.0`` followed by `` (TEXT)`` when --why is given.
NAME defaults to the command's base name.

Exit codes: 0 new enough, 1 older, 2 the command cannot run (missing, not
executable, timed out), prints no version, or bad arguments.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

EXIT_OK = 0
EXIT_OLD = 1
EXIT_ERROR = 2

_VERSION = re.compile(r"(?<![\d.])(\d+)\.(\d+)(?:\.(\d+))?")
_MIN = re.compile(r"^\s*v?(\d+)\.(\d+)(?:\.(\d+))?\s*$")

Version = tuple[int, int, int]


def _triple(groups: tuple[str | None, ...]) -> Version:
    major, minor, patch = (int(g) if g else 0 for g in groups)
    return major, minor, patch


def parse_version(text: str) -> Version:
    """``"6.2.0"``, ``"6.2"`` or ``"v6.2"`` -> (6, 2, 0); ValueError otherwise."""
    m = _MIN.match(text)
    if not m:
        raise ValueError(f"not a version x.y[.z]: {text!r}")
    return _triple(m.groups())


def find_version(output: str) -> tuple[str, Version] | None:
    """The first x.y[.z] number in `output`: (as printed, (x, y, z)); None if none."""
    m = _VERSION.search(output)
    return (m.group(0), _triple(m.groups())) if m else None


def _min_arg(text: str) -> tuple[str, Version]:
    try:
        return text.strip(), parse_version(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> float:
    try:
        val = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not val > 0 or val == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number: {text!r}")
    return val


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pd_launcher.version_check",
        usage="%(prog)s --min X.Y[.Z] [--name NAME] [--why TEXT] [--timeout S] "
              "-- COMMAND ARGS...",
        description="Run COMMAND and check that the version it prints is >= --min.")
    p.add_argument("--min", required=True, type=_min_arg, metavar="X.Y[.Z]",
                   help="the oldest version accepted")
    p.add_argument("--name", help="what to call the program (default: COMMAND's base name)")
    p.add_argument("--why", help="appended to the too-old message, in parentheses")
    p.add_argument("--timeout", type=_positive, default=30.0, metavar="S",
                   help="seconds COMMAND may take (default 30)")
    return p


def _err(message: str) -> None:
    sys.stderr.write(f"version_check: {message}\n")


def main(argv: list[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in args_in:
        cut = args_in.index("--")
        args_in, command = args_in[:cut], args_in[cut + 1:]
    parser = _parser()
    args = parser.parse_args(args_in)
    if not command:
        parser.error("missing -- COMMAND ARGS...")
    min_text, minimum = args.min
    name = args.name or os.path.basename(command[0])
    try:
        proc = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=args.timeout)
    except subprocess.TimeoutExpired:
        _err(f"{' '.join(command)} did not finish within {args.timeout:g}s")
        return EXIT_ERROR
    except OSError as exc:
        _err(f"cannot run {command[0]!r} ({name}): {exc.strerror or exc}")
        return EXIT_ERROR
    output = (proc.stdout + b"\n" + proc.stderr).decode("utf-8", "replace")
    found = find_version(output)
    if found is None:
        excerpt = " ".join(output.split())[:200] or "nothing"
        _err(f"{' '.join(command)} (exit {proc.returncode}) printed no version x.y[.z] "
             f"of {name}: {excerpt!r}")
        return EXIT_ERROR
    text, version = found
    if version < minimum:
        why = f" ({args.why})" if args.why else ""
        _err(f"{name} {text} is older than {min_text}{why}")
        return EXIT_OLD
    sys.stdout.write(f"{name} {text} >= {min_text}\n")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
