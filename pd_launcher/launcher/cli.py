"""Node launcher commands: run, stop, wait (standard library only, Python >= 3.9).

    python -m pd_launcher run SPEC.json [--log-dir DIR] [--state-dir DIR] [--run-dir DIR]
                                        [--grace S] [--check] [--log-max-bytes N]
                                        [--log-backups N]
    python -m pd_launcher stop --state-dir DIR [--grace S]
    python -m pd_launcher wait SPEC.json --timeout S [--interval S] [--state-dir DIR]
                                         [--log-dir DIR] [--run-dir DIR] [--gate]
    python -m pd_launcher reload SPEC.json [--state-dir DIR] [--timeout S]
    python -m pd_launcher quiesce SPEC.json [--timeout S] [--use USE] [--interval S]

wait --gate waits for the spec's gate (a service's readiness that needs the engines,
e.g. xllm-service's HTTP port) instead of its processes; on timeout it prints what the
gate's `explain` command says is missing.

--log-dir, --state-dir and --run-dir move the spec's dirs.log, dirs.state and dirs.run:
every path under the old directory in the spec (files and their contents, pre_start,
argv, env, ready probes) is rewritten to the new one (spec.relocate). Moving the state
directory moves the run directory along to <state-dir>/run unless --run-dir is given.

reload: the launcher running SPEC.json on the state directory re-reads it (SIGUSR1) and,
when only its `files` (and `proxy` block) changed, writes them and signals the processes
that have a `reload_signal`, without a restart. Exit 0 reloaded; 3 not reloadable (other
fields differ: the message names them; a restart is needed); 1 no live launcher of ours
on the state directory, it runs another spec, timeout, or the reload failed otherwise.

quiesce: waits until no ESTABLISHED TCP connection has one of the spec's ports with the
given use (default api) as its local end; exit 0 drained or timed out (the output says
which and how many connections were left), 1 on errors (pd_launcher/launcher/quiesce.py).

Exit codes:
    0  ok; clean stop; nothing to stop; --check passed; wait: all ready
    1  a supervised child exited (its siblings were stopped) and no restart is left
       (spec restart.policy never or absent, or restart.max used up within
       restart.window_s); wait: the launcher is gone; stop: something recorded could
       not be stopped
    2  usage error or invalid node spec (messages name the field)
    3  node check failed: port busy, path/device/command missing, NIC not found,
       a file could not be written, pre_start failed; nothing was started
    4  wait: timed out
    5  a launcher is already running on this state directory
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import List, Optional

from . import logs
from .common import (
    EXIT_CHILD,
    EXIT_NODE,
    EXIT_OK,
    EXIT_RUNNING,
    EXIT_USAGE,
    LauncherError,
    mask_env,
    shell_quote_argv,
)
from .spec import NodeSpec, load_spec, load_spec_file, relocate
from .state import read_state, state_path

#: reload: the launcher refused, fields other than files differ (a restart is needed)
EXIT_RELOAD_REFUSED = EXIT_NODE


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise LauncherError(f"{self.prog}: {message}\n{self.format_usage().rstrip()}",
                            EXIT_USAGE)


def _positive(text: str) -> float:
    try:
        val = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if val < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text!r}")
    return val


def _parser(cmd: str) -> _Parser:
    p = _Parser(prog=f"python -m pd_launcher {cmd}")
    if cmd == "run":
        p.add_argument("spec")
        p.add_argument("--log-dir")
        p.add_argument("--state-dir")
        p.add_argument("--run-dir")
        p.add_argument("--grace", type=_positive, help="SIGTERM->SIGKILL grace (s)")
        p.add_argument("--check", action="store_true",
                       help="validate spec and node, print what would run, start nothing")
        p.add_argument("--log-max-bytes", type=int,
                       help="rotate a log above N bytes (default: the spec's "
                       f"logs.max_bytes, else {logs.DEFAULT_MAX_BYTES}; 0: never)")
        p.add_argument("--log-backups", type=int,
                       help="rotated copies kept (default: the spec's logs.backups, else "
                       f"{logs.DEFAULT_BACKUPS})")
    elif cmd == "stop":
        p.add_argument("--state-dir", required=True)
        p.add_argument("--grace", type=_positive)
    elif cmd == "wait":
        p.add_argument("spec")
        p.add_argument("--timeout", type=_positive, required=True)
        p.add_argument("--interval", type=_positive, default=1.0)
        p.add_argument("--state-dir")
        p.add_argument("--log-dir")
        p.add_argument("--run-dir")
        p.add_argument("--gate", action="store_true",
                       help="wait for the spec's gate instead of its processes")
    elif cmd == "reload":
        p.description = (
            "Make the launcher running SPEC apply a change of the spec's files without a "
            "restart: it re-reads SPEC (SIGUSR1), writes the files and sends each process "
            "its reload_signal. Exit codes: 0 reloaded; 3 not reloadable (fields other "
            "than files differ, named on stderr: restart the unit); 1 no live launcher of "
            "ours on the state directory (or it runs another spec file), timeout, or "
            "another error.")
        p.add_argument("spec")
        p.add_argument("--state-dir", help="default: the spec's dirs.state")
        p.add_argument("--timeout", type=_positive, default=30.0,
                       help="how long to wait for the launcher's answer (s, default 30)")
    elif cmd == "quiesce":
        p.description = (
            "Wait until no established TCP connection has one of SPEC's ports (those "
            "whose use is --use) as its local end. Exit codes: 0 drained, or the timeout "
            "was reached (printed with the connections left); 1 error.")
        p.add_argument("spec")
        p.add_argument("--timeout", type=_positive, default=30.0,
                       help="give up waiting after S seconds (default 30); still exit 0")
        p.add_argument("--use", action="append",
                       help="port use to watch (repeatable; default: api)")
        p.add_argument("--interval", type=_positive, default=0.2)
    return p


def _placed(spec: NodeSpec, state_dir: Optional[str], log_dir: Optional[str],
            run_dir: Optional[str]) -> NodeSpec:
    """The spec moved to the directories of the command line (spec.relocate): a spec
    rendered for other directories (nginx.conf naming dirs.log, say) follows them."""
    new = {k: os.path.abspath(v) for k, v in
           (("state", state_dir), ("log", log_dir), ("run", run_dir)) if v}
    old_state = spec.dirs.get("state")
    if ("state" in new and "run" not in new and spec.dirs.get("run")
            and (old_state is None or os.path.abspath(old_state) != new["state"])):
        new["run"] = os.path.join(new["state"], "run")  # run-time files follow the state
    return relocate(spec, new)


def _dirs(spec: NodeSpec):
    state = spec.dirs.get("state")
    log = spec.dirs.get("log")
    missing = [n for n, v in (("state", state), ("log", log)) if not v]
    if missing:
        raise LauncherError("no {} directory: set dirs.{} in the spec or pass {}".format(
            " / ".join(missing), " / dirs.".join(missing),
            " ".join(f"--{m}-dir" for m in missing)), EXIT_USAGE)
    return os.path.abspath(str(state)), os.path.abspath(str(log))


def _print_plan(spec: NodeSpec, nic: Optional[str], state_dir: str, log_dir: str,
                grace: float, out=sys.stdout) -> None:
    from .common import mask_argv

    w = out.write
    w(f"node spec {spec.source}: cluster {spec.cluster}, node {spec.node}, "
      f"role {spec.role}, ip {spec.ip}\n")
    w(f"state dir {state_dir}, log dir {log_dir}, run dir {spec.dirs.get('run') or '-'}, "
      f"grace {grace:.1f}s\n")
    if spec.nic is not None:
        nic_env = " ".join(f"{v}={nic or '?'}" for v in spec.nic.env) or "(no env)"
        w(f"nic: {nic or '?'} holds {spec.nic.ip or '-'} -> {nic_env}\n")
    for f in spec.files:
        w(f"would write {f.path} (mode {f.mode:04o}, {len(f.content)} bytes)\n")
    for argv in spec.pre_start:
        w(f"would run before start: {shell_quote_argv(mask_argv(argv))}\n")
    for p in spec.processes:
        env = dict(p.env)
        if nic and spec.nic is not None:
            for var in spec.nic.env:
                env[var] = nic
        env_txt = " ".join("{}={}".format(*kv) for kv in sorted(mask_env(env).items()))
        w(f"would start {p.name}:\n")
        w("    env (added): %s\n" % (env_txt or "-"))
        w(f"    argv: {shell_quote_argv(mask_argv(p.argv))}\n")
        w("    ports: %s\n" % (", ".join(f"{pt.label()} {pt.use}" for pt in p.ports)
                               or "-"))
        w("    ready: %s\n" % (p.ready.describe() if p.ready else "-"))
        w(f"    log: {logs.process_log_path(log_dir, p.name)}\n")
    out.flush()


def _previous_run(state_dir: str, log: logging.Logger, check: bool, grace: float) -> None:
    """Refuse when a launcher runs on `state_dir`; clean up after a dead one.

    Stale state (the recorded launcher is gone): recorded children that are still
    alive *and* match their start time and command line are stopped (SIGTERM, grace,
    SIGKILL) before anything starts, so a re-run after a crash converges; PIDs that
    no longer match are left alone. With --check nothing is touched.
    """
    from .stop import same_pid_namespace, stop_recorded_processes, verify_recorded

    try:
        state = read_state(state_dir)
    except (OSError, ValueError) as exc:
        raise LauncherError(f"cannot read state file {state_path(state_dir)}: {exc} "
                            "(remove it if it is garbage)", EXIT_RUNNING) from exc
    if state is None:
        return
    if not same_pid_namespace(state):
        # A container restart gives a new PID namespace: the recorded PIDs are gone
        # with the old one (or cannot be checked from here, the lock decides).
        log.info("ignoring state file from another PID namespace (%s)",
                 state.get("pid_namespace"))
        return
    launcher = state.get("launcher") or {}
    if launcher and int(launcher.get("pid") or 0) != os.getpid():
        verdict, detail = verify_recorded(launcher)
        if verdict == "ours":
            raise LauncherError(f"a launcher is already running on {state_dir} ({detail}); "
                                f"stop it first: python -m pd_launcher stop --state-dir "
                                f"{state_dir}", EXIT_RUNNING)
    alive = [r for r in state.get("processes") or [] if verify_recorded(r)[0] == "ours"]
    if check:
        if alive:
            log.warning("stale state: %d recorded process(es) of a dead launcher still run: %s",
                        len(alive), ", ".join("{} (pid {})".format(r.get("name"), r.get("pid"))
                                              for r in alive))
        return
    if alive or state.get("processes"):
        log.warning("stale state file from a launcher that is gone: stopping what it left")
        if not stop_recorded_processes(state, grace, log):
            raise LauncherError("processes of the previous launcher survived SIGKILL",
                                EXIT_RUNNING)


def cmd_run(args: argparse.Namespace) -> int:
    from .nodefacts import check_node
    from .supervisor import Supervisor

    loaded, sha = load_spec_file(args.spec)
    spec = _placed(loaded, args.state_dir, args.log_dir, args.run_dir)
    state_dir, log_dir = _dirs(spec)
    grace = spec.grace_seconds if args.grace is None else args.grace

    def reload_spec() -> tuple[NodeSpec, str]:
        # the same file, moved to the same directories as at the start
        new, new_sha = load_spec_file(args.spec)
        return _placed(new, args.state_dir, args.log_dir, args.run_dir), new_sha
    policy = spec.logs
    max_bytes = next(x for x in (args.log_max_bytes, policy and policy.max_bytes,
                                 logs.DEFAULT_MAX_BYTES) if x is not None)
    backups = next(x for x in (args.log_backups, policy and policy.backups,
                               logs.DEFAULT_BACKUPS) if x is not None)
    log = logs.setup_launcher_logger(None if args.check else log_dir, max_bytes, backups)
    sup = Supervisor(spec, args.spec, state_dir, log_dir, grace, None, log,
                     log_max_bytes=max_bytes, log_backups=backups, spec_sha256=sha,
                     reload_spec=reload_spec)
    if not args.check:
        # from here on a reload request (SIGUSR1, whose default action would end the
        # launcher) is only counted; the supervision loop handles it
        signal.signal(signal.SIGUSR1, sup.on_reload_signal)
        try:
            locked = sup.acquire_lock()
        except OSError as exc:
            raise LauncherError(f"cannot create state dir {state_dir}: {exc}",
                                EXIT_NODE) from exc
        if not locked:
            lock = os.path.join(state_dir, "launcher.lock")
            raise LauncherError(f"a launcher is already running on {state_dir} (lock {lock} "
                                "is held)", EXIT_RUNNING)
    _previous_run(state_dir, log, args.check, grace)
    nic, errors = check_node(spec)
    if args.check:
        _print_plan(spec, nic, state_dir, log_dir, grace)
        if errors:
            sys.stdout.write("node check FAILED:\n" + "".join(f"  - {e}\n" for e in errors))
            return EXIT_NODE
        sys.stdout.write(f"node check ok: {len(spec.processes)} process(es) would start\n")
        return EXIT_OK
    if errors:
        raise LauncherError("node check failed, nothing started:\n"
                            + "\n".join("  - " + e for e in errors), EXIT_NODE)
    sup.nic_name = nic
    log.info("node checks passed (%s); spec %s", f"nic {nic}" if nic else "no nic needed",
             os.path.abspath(args.spec))
    return sup.run()


def cmd_stop(args: argparse.Namespace) -> int:
    from .stop import stop_command

    log = logs.setup_launcher_logger(None, 0, 0)
    return stop_command(os.path.abspath(args.state_dir), args.grace, log)


def cmd_wait(args: argparse.Namespace) -> int:
    from .ready import wait_gate, wait_ready

    spec = _placed(load_spec(args.spec), args.state_dir, args.log_dir, args.run_dir)
    # The spec's state dir counts even before the launcher has created it: `wait`
    # started right after `run` must not decide that there is no state to watch.
    state_dir = spec.dirs.get("state") or None
    log_dir = spec.dirs.get("log")
    if args.gate:
        return wait_gate(spec, args.timeout, args.interval, state_dir)
    return wait_ready(spec, args.timeout, args.interval, log_dir, state_dir)


def _reload_fail(msg: str, code: int = EXIT_CHILD) -> int:
    sys.stderr.write(f"pd-launcher reload: {msg}\n")
    return code


def cmd_reload(args: argparse.Namespace) -> int:
    """SIGUSR1 to the launcher proven ours (state file entry, or the lock holder when
    that entry is damaged), then wait for `reloads` or `reload_failures` to go up."""
    import signal as _signal
    import time

    from ..nodeutil import launcher_by_lock, same_pid_namespace, verify_recorded

    spec_path = os.path.abspath(args.spec)
    try:
        spec = load_spec(spec_path)
    except LauncherError as exc:
        return _reload_fail(str(exc))
    state_dir = args.state_dir or spec.dirs.get("state")
    if not state_dir:
        return _reload_fail("no state directory: pass --state-dir or set dirs.state")
    state_dir = os.path.abspath(state_dir)

    def current() -> Optional[dict]:
        try:
            return read_state(state_dir)
        except (OSError, ValueError):
            return None

    try:
        state = read_state(state_dir)
    except (OSError, ValueError) as exc:
        return _reload_fail(f"cannot read {state_path(state_dir)}: {exc}")
    if state is None:
        return _reload_fail(f"no launcher runs on {state_dir} (no state file)")
    if not same_pid_namespace(state):
        return _reload_fail(f"{state_path(state_dir)} comes from another PID namespace "
                            f"({state.get('pid_namespace')}): run reload where the unit runs")
    launcher = state.get("launcher") or {}
    verdict, detail = verify_recorded(launcher) if launcher else ("gone", "no launcher entry")
    if verdict != "ours":
        by_lock = launcher_by_lock(state_dir)
        if by_lock is None:
            return _reload_fail(f"no live launcher on {state_dir} ({detail})")
        launcher, detail = by_lock, f"pid {by_lock['pid']} (lock holder)"
    if os.path.abspath(str(state.get("spec") or "")) != spec_path:
        return _reload_fail(f"the launcher on {state_dir} runs {state.get('spec')}, not "
                            f"{spec_path}")
    if state.get("status") in ("stopping", "failed"):
        return _reload_fail(f"the launcher on {state_dir} is {state.get('status')}")
    if "spec_sha256" not in state:
        return _reload_fail(f"the launcher on {state_dir} ({detail}) predates reload: "
                            "restart needed", EXIT_RELOAD_REFUSED)
    reloads0 = int(state.get("reloads") or 0)
    failures0 = int(state.get("reload_failures") or 0)
    try:
        os.kill(int(launcher["pid"]), _signal.SIGUSR1)
    except OSError as exc:
        return _reload_fail(f"cannot signal the launcher ({detail}): {exc}")
    deadline = time.monotonic() + args.timeout
    while True:
        time.sleep(0.05)
        now = current()
        if now is not None:
            if int(now.get("reloads") or 0) > reloads0:
                sys.stdout.write("reloaded (reload {}): spec sha256 {}; signalled {}\n".format(
                    now.get("reloads"), now.get("spec_sha256"),
                    ", ".join(now.get("last_reload_signaled") or []) or "no process"))
                return EXIT_OK
            if int(now.get("reload_failures") or 0) > failures0:
                err = str(now.get("reload_error") or "reload failed")
                if now.get("reload_restart_needed"):
                    return _reload_fail(f"not reloadable: {err}", EXIT_RELOAD_REFUSED)
                return _reload_fail(err)
        if verify_recorded(launcher)[0] != "ours":
            return _reload_fail(f"the launcher ({detail}) ended before it reloaded")
        if time.monotonic() >= deadline:
            return _reload_fail(f"no answer from the launcher ({detail}) within "
                                f"{args.timeout:g} s")


def cmd_quiesce(args: argparse.Namespace) -> int:
    from .quiesce import quiesce

    try:
        spec = load_spec(args.spec)
    except LauncherError as exc:
        sys.stderr.write(f"pd-launcher quiesce: {exc}\n")
        return EXIT_CHILD
    return quiesce(spec, args.use or ["api"], args.timeout, args.interval)


COMMANDS = {"run": cmd_run, "stop": cmd_stop, "wait": cmd_wait, "reload": cmd_reload,
            "quiesce": cmd_quiesce}


def main(argv: List[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        sys.stderr.write("usage: python -m pd_launcher {run,stop,wait,reload,quiesce} ..."
                         f"\n{__doc__}")
        return EXIT_USAGE
    cmd = argv[0]
    try:
        args = _parser(cmd).parse_args(argv[1:])
        return COMMANDS[cmd](args)
    except LauncherError as exc:
        logger = logging.getLogger("pd_launcher.launcher")
        if logger.handlers:  # launcher.log and stderr
            logger.error("%s", exc)
        else:
            sys.stderr.write(f"pd-launcher {cmd}: {exc}\n")
        return exc.code
    except OSError as exc:  # e.g. a log or state directory that cannot be created
        sys.stderr.write(f"pd-launcher {cmd}: {exc}\n")
        return EXIT_NODE
    except KeyboardInterrupt:
        return 130
