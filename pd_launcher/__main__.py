"""`python -m pd_launcher <command>`.

Controller commands (need PyYAML, Jinja2, ansible-core): plan.
Node commands (standard library only, Python >= 3.9): run, stop, wait.
Imports are lazy so the node path never touches a third-party module.
"""
from __future__ import annotations

import sys

USAGE = """usage: python -m pd_launcher {plan,run,stop,wait} ...

  plan   -i INVENTORY [--format text|json] [--node HOST [--role P|D|C]]
  run    SPEC.json [--log-dir DIR] [--state-dir DIR] [--check]
  stop   --state-dir DIR [--grace SECONDS]
  wait   SPEC.json --timeout SECONDS
"""


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0 if args else 2
    cmd, rest = args[0], args[1:]
    if cmd == "plan":
        from pd_launcher.cli_plan import main as plan_main

        return plan_main(rest)
    if cmd in ("run", "stop", "wait"):
        from pd_launcher.launcher.cli import main as node_main

        return node_main([cmd] + rest)
    sys.stderr.write(f"pd_launcher: unknown command {cmd!r}\n{USAGE}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
