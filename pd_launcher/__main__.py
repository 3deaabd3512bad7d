"""`python -m pd_launcher {run,stop,wait,reload,quiesce}` on a node.

Standard library only, Python >= 3.9.

The controller's commands (plan) live in the pd_deploy package: `pd-deploy plan`.
"""
from __future__ import annotations

import sys

USAGE = """usage: python -m pd_launcher {run,stop,wait,reload,quiesce} ...

  run     SPEC.json [--log-dir DIR] [--state-dir DIR] [--run-dir DIR] [--check]
  stop    --state-dir DIR [--grace SECONDS]
  wait    SPEC.json --timeout SECONDS [--log-dir DIR] [--state-dir DIR] [--run-dir DIR]
  reload  SPEC.json [--state-dir DIR] [--timeout SECONDS]
  quiesce SPEC.json [--timeout SECONDS] [--use USE]

The plan is a controller command: pd-deploy plan -i INVENTORY (python -m pd_deploy plan).
"""


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0 if args else 2
    cmd, rest = args[0], args[1:]
    if cmd in ("run", "stop", "wait", "reload", "quiesce"):
        from pd_launcher.launcher.cli import main as node_main

        return node_main([cmd] + rest)
    sys.stderr.write(f"pd_launcher: unknown command {cmd!r}\n{USAGE}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
