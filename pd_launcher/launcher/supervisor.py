"""`run`: write files, run pre_start, start every process, supervise, stop.

Signals: SIGTERM, SIGINT and SIGHUP ask for a clean stop (a second one cuts the
grace period short). SIGCHLD wakes the loop, which reaps every child with
``waitpid(-1, WNOHANG)``, including orphans adopted when the launcher is PID 1 in a
container. When any supervised child exits on its own, its siblings are stopped;
then, with the spec's restart policy `on-failure`, the launcher waits a backoff
(status `restarting`; a stop signal ends the wait at once) and starts the whole set
again, until `restart.max` restarts within `restart.window_s` have been used up;
otherwise (policy `never`, no `restart` block, or no restart left) it exits 1.

SIGUSR1 asks for a reload (`python -m pd_launcher reload`): the loop re-reads the spec
file it was started with; when it differs from the running spec only in `files` (and
the opaque `proxy` block: spec.RELOADABLE_KEYS), the new files are written atomically,
the new spec replaces the running one (a later restart of the set uses it) and every
running process with a `reload_signal` gets that signal. Anything else differing is
refused: nothing changes, `reload_error` in the state file names the fields. The set
keeps running either way.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import logs, procinfo
from .common import (
    EXIT_CHILD,
    EXIT_NODE,
    EXIT_OK,
    LauncherError,
    describe_status,
    mask_argv,
    mask_text,
    shell_quote_argv,
    tail_lines,
)
from .spec import NodeSpec, Process, RestartPolicy, SpecFile, load_spec_file, reload_differences
from .state import LOCK_FILE, STATE_DIR_MODE, atomic_write, remove_state, write_state
from .stop import Target, terminate

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: asks the launcher to re-read its spec and apply a change of its files (reload)
RELOAD_SIGNAL = signal.SIGUSR1
# Proxy settings are not passed on to what the launcher starts: engines and services
# talk to node-local and cluster addresses (KV transfer, DP rendezvous, coordinators),
# which a proxy inherited from a login shell or a container image would break. A
# process gets one only when its spec env sets it (the inventory asks via pd_env).
PROXY_ENV = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
             "all_proxy", "no_proxy", "NO_PROXY")
PRE_START_TIMEOUT = 300.0
LOOP_INTERVAL = 1.0
LOG_TAIL = 20
#: before a restart, how long the set's ports may take to become bindable again
RESTART_PORT_WAIT = 5.0


def _pdeathsig_preexec():  # -> Optional[Callable[[], None]]
    """preexec_fn asking the kernel to SIGTERM the child if the launcher dies (Linux)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (ImportError, OSError, AttributeError):
        return None
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the launcher died before prctl took effect
            os._exit(1)

    return preexec


@dataclass
class Child:
    proc: Process
    popen: subprocess.Popen  # kept only so that Popen.__del__ does not reap behind us
    pid: int
    start_time: int
    cmdline: List[str]
    log_path: str
    started_at: float
    status: Optional[int] = None
    extra: Dict[str, Any] = field(default_factory=dict)


class Supervisor:
    def __init__(self, spec: NodeSpec, spec_path: str, state_dir: str, log_dir: str,
                 grace: float, nic_name: Optional[str], log: logging.Logger,
                 log_max_bytes: int = logs.DEFAULT_MAX_BYTES,
                 log_backups: int = logs.DEFAULT_BACKUPS,
                 spec_sha256: Optional[str] = None,
                 reload_spec: Optional[Callable[[], Tuple[NodeSpec, str]]] = None) -> None:
        self.spec = spec
        self.spec_path = os.path.abspath(spec_path)
        self.spec_sha256 = spec_sha256
        # how a reload reads the spec again (cli: the file moved to the command line's
        # directories, like at the start); the parsed spec and the file's sha256
        self.reload_spec = reload_spec or (lambda: load_spec_file(self.spec_path))
        self.reload_requests = 0  # SIGUSR1s received (the handler only counts)
        self.reload_seen = 0      # ... of which handled
        self.reloads = 0
        self.last_reload: Optional[float] = None
        self.last_reload_signaled: List[str] = []
        self.reload_failures = 0
        self.reload_error: Optional[str] = None
        self.reload_restart_needed = False
        self.state_dir = state_dir
        self.log_dir = log_dir
        self.grace = grace
        self.nic_name = nic_name
        self.log = log
        self.log_max_bytes = log_max_bytes
        self.log_backups = log_backups
        self.children: List[Child] = []
        self.stop_requests = 0
        self.status = "starting"
        self.failure: Optional[Dict[str, Any]] = None
        # restarts (spec `restart`; absent: never): how many so far, when (monotonic,
        # for the window), the last one's wall time, cause and the next one's time
        self.restart = spec.restart or RestartPolicy()
        self.restarts = 0
        self.restart_times: List[float] = []
        self.last_restart: Optional[float] = None
        self.last_failure: Optional[Dict[str, Any]] = None
        self.next_restart_at: Optional[float] = None
        self._wake_r = -1
        self._wake_w = -1
        self._old_handlers: Dict[int, Any] = {}
        self._lock_fd = -1
        me = os.getpid()
        self.identity = {
            "pid": me,
            "start_time": procinfo.start_time(me),
            "cmdline": mask_argv(procinfo.read_cmdline(me) or sys.argv),
        }

    # ---- environment -------------------------------------------------------------
    def child_env(self, proc: Optional[Process] = None) -> Dict[str, str]:
        """Environment of a process (or, without one, of the pre_start commands): the
        launcher's own without proxy settings (PROXY_ENV), then the process's spec env
        (which may set a proxy on purpose), then the NIC variables."""
        env = {k: v for k, v in os.environ.items() if k not in PROXY_ENV}
        if proc is not None:
            env.update(proc.env)
        if self.nic_name and self.spec.nic is not None:
            for var in self.spec.nic.env:
                env[var] = self.nic_name
        return env

    # ---- state -------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {
            "status": self.status,
            "spec": self.spec_path,
            "cluster": self.spec.cluster,
            "node": self.spec.node,
            "role": self.spec.role,
            "grace_seconds": self.grace,
            "pid_namespace": procinfo.pid_namespace(),
            "log_dir": os.path.abspath(self.log_dir),
            "nic": self.nic_name,
            "launcher": dict(self.identity),
            "processes": [
                {
                    "name": c.proc.name,
                    "pid": c.pid,
                    "pgid": c.pid,
                    "start_time": c.start_time,
                    "argv": mask_argv(c.proc.argv),
                    "cmdline": mask_argv(c.cmdline),
                    "ports": [{"host": p.host, "port": p.port, "use": p.use}
                              for p in c.proc.ports],
                    "log": c.log_path,
                    "started_at": c.started_at,
                    "exit": None if c.status is None else describe_status(c.status),
                }
                for c in self.children
            ],
            "failure": self.failure,
            "restart_policy": self.restart.policy,
            "restarts": self.restarts,
            "last_restart": self.last_restart,
            "last_failure": self.last_failure,
            "next_restart_at": self.next_restart_at,
            "spec_sha256": self.spec_sha256,
            "reloads": self.reloads,
            "last_reload": self.last_reload,
            "last_reload_signaled": list(self.last_reload_signaled),
            "reload_failures": self.reload_failures,
            "reload_error": self.reload_error,
            "reload_restart_needed": self.reload_restart_needed,
        }

    def save_state(self) -> None:
        """Write the state file; a failure is logged, never fatal to a running set."""
        try:
            write_state(self.state_dir, self.state_dict())
        except OSError as exc:
            self.log.error("cannot write state file in %s: %s", self.state_dir, exc)

    # ---- locking (one launcher per state dir) -------------------------------------
    def acquire_lock(self) -> bool:
        os.makedirs(self.state_dir, mode=STATE_DIR_MODE, exist_ok=True)
        fd = os.open(os.path.join(self.state_dir, LOCK_FILE),
                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            raise
        self._lock_fd = fd
        return True

    # ---- signals -----------------------------------------------------------------
    def _on_stop_signal(self, signum: int, _frame: Any) -> None:
        self.stop_requests += 1

    def _on_sigchld(self, _signum: int, _frame: Any) -> None:
        pass  # the wakeup fd does the work

    def on_reload_signal(self, _signum: int, _frame: Any) -> None:
        self.reload_requests += 1  # the loop does the work (handle_reload)

    def install_signals(self) -> None:
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)
        signal.set_wakeup_fd(self._wake_w)
        for sig in STOP_SIGNALS:
            self._old_handlers[sig] = signal.signal(sig, self._on_stop_signal)
        self._old_handlers[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, self._on_sigchld)
        self._old_handlers[RELOAD_SIGNAL] = signal.signal(RELOAD_SIGNAL, self.on_reload_signal)

    def restore_signals(self) -> None:
        for sig, handler in self._old_handlers.items():
            try:
                signal.signal(sig, handler)
            except (TypeError, ValueError):
                pass
        signal.set_wakeup_fd(-1)
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def _sleep(self, timeout: float) -> None:
        try:
            ready, _, _ = select.select([self._wake_r], [], [], timeout)
        except InterruptedError:
            return
        if ready:
            try:
                while os.read(self._wake_r, 512):
                    pass
            except (BlockingIOError, InterruptedError):
                pass

    # ---- reaping -----------------------------------------------------------------
    def reap(self) -> None:
        """Collect every exited child (ours and, as PID 1, adopted orphans)."""
        by_pid = {c.pid: c for c in self.children}
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except InterruptedError:
                continue
            if pid == 0:
                return
            child = by_pid.get(pid)
            if child is None:
                self.log.debug("reaped orphan pid %d (%s)", pid, describe_status(status))
                continue
            child.status = status
            child.popen.returncode = (os.WEXITSTATUS(status) if os.WIFEXITED(status)
                                      else -os.WTERMSIG(status) if os.WIFSIGNALED(status)
                                      else status)

    # ---- start -------------------------------------------------------------------
    def write_files(self, files: Optional[List[SpecFile]] = None) -> None:
        for f in self.spec.files if files is None else files:
            atomic_write(f.path, f.content.encode("utf-8"), f.mode)
            self.log.info("wrote %s (mode %04o, %d bytes)", f.path, f.mode, len(f.content))

    def run_pre_start(self) -> None:
        base = self.child_env()
        out_path = os.path.join(self.log_dir, "pre_start.log")
        for i, argv in enumerate(self.spec.pre_start):
            if self.stop_requests:
                return
            shown = shell_quote_argv(mask_argv(argv))
            self.log.info("pre_start[%d]: %s", i, shown)
            logs.write_banner(out_path, f"pre_start[{i}]: {shown}")
            with logs.open_process_log(out_path) as out:
                try:
                    p = subprocess.Popen(argv, env=base, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)
                except OSError as exc:
                    raise LauncherError(f"pre_start[{i}] {shown}: cannot run: {exc}",
                                        EXIT_NODE) from exc
                deadline = time.monotonic() + PRE_START_TIMEOUT
                while p.poll() is None:
                    if self.stop_requests or time.monotonic() > deadline:
                        p.kill()
                        p.wait()
                        if self.stop_requests:
                            return
                        raise LauncherError(f"pre_start[{i}] {shown}: timed out after "
                                            f"{PRE_START_TIMEOUT:.0f}s", EXIT_NODE)
                    time.sleep(0.05)
            if p.returncode != 0:
                tail = "\n".join("    " + line for line in tail_lines(out_path, LOG_TAIL))
                raise LauncherError(f"pre_start[{i}] {shown} failed with exit code "
                                    f"{p.returncode}; output:\n{tail}", EXIT_NODE)

    def start_process(self, proc: Process, preexec: Any) -> Child:
        log_path = logs.process_log_path(self.log_dir, proc.name)
        shown = shell_quote_argv(mask_argv(proc.argv))
        logs.write_banner(log_path, f"starting {proc.name}: {shown}")
        out = logs.open_process_log(log_path)
        try:
            popen = subprocess.Popen(
                proc.argv, env=self.child_env(proc), stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
                preexec_fn=preexec,
            )
        finally:
            out.close()
        pid = popen.pid
        start = procinfo.start_time(pid)
        cmdline = procinfo.cmdline_after_exec(pid) or list(proc.argv)
        child = Child(proc=proc, popen=popen, pid=pid, start_time=start or 0, cmdline=cmdline,
                      log_path=log_path, started_at=time.time())
        self.log.info("started %s: pid %d, ports %s, log %s", proc.name, pid,
                      ", ".join(p.label() for p in proc.ports) or "-", log_path)
        return child

    def start_all(self) -> None:
        preexec = _pdeathsig_preexec()
        for proc in self.spec.processes:
            if self.stop_requests:
                return
            self.reap()
            try:
                child = self.start_process(proc, preexec)
            except OSError as exc:
                shown = shell_quote_argv(mask_argv(proc.argv))
                raise LauncherError(f"cannot start {proc.name} ({shown}): {exc}",
                                    EXIT_NODE) from exc
            self.children.append(child)
            self.save_state()

    # ---- stop --------------------------------------------------------------------
    def stop_children(self) -> List[Target]:
        targets = [Target(name=c.proc.name, sid=c.pid) for c in self.children]
        if not targets:
            return []
        self.log.info("stopping %d process(es): SIGTERM, grace %.1fs", len(targets), self.grace)
        left = terminate(targets, self.grace, self.log, reap=self.reap,
                         escalate=lambda: self.stop_requests > 1)
        self.reap()
        return left

    def report_exit(self, child: Child) -> None:
        status = describe_status(child.status if child.status is not None else 0)
        if self.failure is None:  # the first one to exit is the cause
            self.failure = {"process": child.proc.name, "pid": child.pid, "status": status,
                            "at": time.time()}
            if self.restarts:
                self.failure["restarts"] = self.restarts
        tail = tail_lines(child.log_path, LOG_TAIL)
        self.log.error("process %s (pid %d) exited: %s; last %d lines of %s:\n%s",
                       child.proc.name, child.pid, status, len(tail), child.log_path,
                       "\n".join("    | " + line for line in tail) or "    (empty)")

    # ---- main --------------------------------------------------------------------
    def run(self) -> int:
        self.install_signals()
        try:
            return self._run()
        except BaseException:
            # A bug must not leave the set running unsupervised.
            self.log.exception("launcher error; stopping every process")
            self.stop_children()
            raise
        finally:
            self.restore_signals()

    def _run(self) -> int:
        self.save_state()
        dropped = sorted(k for k in PROXY_ENV if k in os.environ)
        if dropped:
            self.log.info("not passing %s to the processes (set in a process's env to pass it)",
                          ", ".join(dropped))
        code = self.start_set("start failed")
        if code == EXIT_OK and not self.stop_requests:
            code = self.run_and_restart()
        if self.stop_requests and code == EXIT_OK:
            self.log.info("stop requested")
        self.status = "stopping" if code == EXIT_OK else "failed"
        self.save_state()
        left = self.stop_children()
        if left:
            self.log.error("still running after SIGKILL: %s",
                           ", ".join(f"{t.name} (pgid {t.sid})" for t in left))
            return code or EXIT_CHILD
        if code == EXIT_OK:
            remove_state(self.state_dir)
            self.log.info("all processes stopped; state file removed")
        else:
            self.save_state()  # keeps status "failed" and the failure for `wait`/`status`
            self.log.info("all processes stopped; exiting with code %d", code)
        return code

    def start_set(self, what: str) -> int:
        """Files, pre_start, every process; on an error record `failure` (status `what`)
        and return its exit code."""
        try:
            try:
                if self.spec.dirs.get("run"):
                    os.makedirs(self.spec.dirs["run"], exist_ok=True)
                self.write_files()
            except OSError as exc:
                raise LauncherError(f"cannot write spec files: {exc}", EXIT_NODE) from exc
            self.run_pre_start()
            self.start_all()
        except LauncherError as exc:
            self.log.error("%s", exc)
            self.failure = {"process": None, "status": what, "error": mask_text(str(exc)),
                            "at": time.time()}
            return exc.code
        return EXIT_OK

    def run_and_restart(self) -> int:
        """Supervise the running set; after a process exits on its own, restart the set
        while the policy allows (stop, backoff, start). EXIT_OK on a stop request,
        EXIT_CHILD when the unit is left failed (`failure` says why)."""
        while True:
            self.status = "running"
            self.next_restart_at = None
            self.save_state()
            self.log.info("running %d process(es) of %s/%s role %s%s", len(self.children),
                          self.spec.cluster, self.spec.node, self.spec.role,
                          f" (restart {self.restarts})" if self.restarts else "")
            code = self.supervise()
            while True:
                if self.stop_requests:
                    return EXIT_OK
                if code != EXIT_CHILD:
                    return code
                delay = self.restart_delay()
                if delay is None:
                    return EXIT_CHILD
                code = self.stop_and_back_off(delay)
                if code is not None:
                    return code
                code = self.wait_ports_free()
                if code == EXIT_OK:
                    code = self.start_set("restart failed")
                    code = EXIT_CHILD if code != EXIT_OK else code
                if code == EXIT_OK:
                    if self.stop_requests:
                        return EXIT_OK
                    break  # running again

    def restart_delay(self) -> Optional[float]:
        """The backoff before the next restart, or None: no restart (policy never, or
        restart.max restarts within restart.window_s already)."""
        pol = self.restart
        if pol.policy != "on-failure":
            return None
        now = time.monotonic()
        self.restart_times = [t for t in self.restart_times if now - t < pol.window_s]
        recent = len(self.restart_times)
        if recent >= pol.max:
            self.log.error("giving up: %d restart(s) within %gs already (restart.max %d); "
                           "the unit stays failed", recent, pol.window_s, pol.max)
            return None
        return float(min(pol.backoff_max_s, pol.backoff_s * 2 ** recent))

    def stop_and_back_off(self, delay: float) -> Optional[int]:
        """Status `restarting`: stop the whole set, then wait `delay` seconds (a stop
        signal ends the wait). None: go on and start again; else the exit code."""
        self.restarts += 1
        self.restart_times.append(time.monotonic())
        self.last_restart = time.time()
        self.last_failure, self.failure = self.failure, None
        self.next_restart_at = self.last_restart + delay
        self.status = "restarting"
        self.save_state()
        cause = self.last_failure or {}
        self.log.warning("restart %d of the set in %.1fs (after %s: %s; at most %d within "
                         "%gs)", self.restarts, delay, cause.get("process") or "start",
                         cause.get("status"), self.restart.max, self.restart.window_s)
        left = self.stop_children()
        if left:
            self.log.error("still running after SIGKILL: %s; not restarting",
                           ", ".join(f"{t.name} (pgid {t.sid})" for t in left))
            self.failure = self.last_failure
            return EXIT_CHILD
        self.save_state()  # every recorded process with its exit status
        # all gone: forget them, so that nothing signals their (reusable) PIDs again
        self.children = []
        deadline = time.monotonic() + delay
        while not self.stop_requests:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self._sleep(min(remaining, LOOP_INTERVAL))
            self.reap()
            if self.reload_requests != self.reload_seen and not self.stop_requests:
                self.handle_reload()  # nothing runs: the new files serve the next start
        self.log.info("stop requested during the restart backoff")
        return EXIT_OK

    def wait_ports_free(self) -> int:
        """The set's ports must be bindable again before it restarts (the node check's
        port test); they get RESTART_PORT_WAIT seconds. EXIT_CHILD (failure recorded)
        when one stays busy; EXIT_OK otherwise, or on a stop request."""
        from .nodefacts import check_ports

        deadline = time.monotonic() + RESTART_PORT_WAIT
        while True:
            busy = check_ports(self.spec)
            if not busy or self.stop_requests:
                return EXIT_OK
            if time.monotonic() >= deadline:
                msg = "ports still busy, not restarting: " + "; ".join(busy)
                self.log.error("%s", msg)
                self.failure = {"process": None, "status": "restart failed",
                                "error": mask_text(msg), "at": time.time()}
                return EXIT_CHILD
            self._sleep(0.2)

    def supervise(self) -> int:
        last_rotate = 0.0
        while True:
            self.reap()
            if self.stop_requests:
                return EXIT_OK
            exited = [c for c in self.children if c.status is not None]
            if exited:
                for c in exited:
                    self.report_exit(c)
                return EXIT_CHILD
            if self.reload_requests != self.reload_seen:
                self.handle_reload()
                continue  # reaps and looks at the children again before sleeping
            now = time.monotonic()
            if now - last_rotate >= LOOP_INTERVAL:
                last_rotate = now
                self.rotate_logs()
            self._sleep(LOOP_INTERVAL)

    def rotate_logs(self) -> None:
        """Rotate every process log and the spec's logs.files above the cap; never
        raises (a full or broken log filesystem must not stop the set)."""
        extra = list(self.spec.logs.files) if self.spec.logs is not None else []
        for path in [c.log_path for c in self.children] + extra:
            try:
                done = logs.rotate_if_needed(path, self.log_max_bytes, self.log_backups)
            except OSError as exc:
                self.log.warning("cannot rotate %s: %s", path, exc)
                continue
            if done:
                (self.log.info if done == "rotated" else self.log.warning)("%s %s", done, path)

    # ---- reload (SIGUSR1) ------------------------------------------------------------
    def handle_reload(self) -> None:
        """Apply the spec file's new `files` to the running set (see the module's doc).
        Records `reloads` / `last_reload` or `reload_failures` / `reload_error` (with
        `reload_restart_needed`: fields other than files differ) in the state file."""
        self.reload_seen = self.reload_requests  # a signal during the work: once more
        self.log.info("reload requested: reading %s", self.spec_path)
        try:
            new, sha = self.reload_spec()
        except LauncherError as exc:
            self._reload_failed(f"cannot load the spec: {exc}", restart_needed=False)
            return
        diffs = reload_differences(self.spec, new)
        if diffs:
            self._reload_failed("; ".join(f"{d} differs" for d in diffs)
                                + ": restart needed", restart_needed=True)
            return
        try:
            if new.dirs.get("run"):
                os.makedirs(new.dirs["run"], exist_ok=True)
            self.write_files(new.files)
        except OSError as exc:
            self._reload_failed(f"cannot write the spec's files: {exc}", restart_needed=False)
            return
        self.spec, self.spec_sha256 = new, sha
        by_name = {p.name: p for p in new.processes}
        signaled: List[str] = []
        for c in self.children:
            c.proc = by_name.get(c.proc.name, c.proc)
            if not c.proc.reload_signal or c.status is not None:
                continue
            sig = getattr(signal, "SIG" + c.proc.reload_signal)
            try:
                os.kill(c.pid, sig)  # our unreaped child: the PID cannot be another's
            except OSError as exc:
                self.log.warning("reload: cannot send SIG%s to %s (pid %d): %s",
                                 c.proc.reload_signal, c.proc.name, c.pid, exc)
                continue
            signaled.append(c.proc.name)
            self.log.info("reload: sent SIG%s to %s (pid %d)", c.proc.reload_signal,
                          c.proc.name, c.pid)
        self.reloads += 1
        self.last_reload = time.time()
        self.last_reload_signaled = signaled
        self.reload_error, self.reload_restart_needed = None, False
        self.log.info("reload %d done: %d file(s) written, signalled %s; spec sha256 %s",
                      self.reloads, len(new.files), ", ".join(signaled) or "no process", sha)
        self.save_state()

    def _reload_failed(self, msg: str, restart_needed: bool) -> None:
        self.reload_failures += 1
        self.reload_error = mask_text(msg)
        self.reload_restart_needed = restart_needed
        self.log.error("reload failed, the running spec stays: %s", self.reload_error)
        self.save_state()
