"""Node facts shared by the node launcher and the Ansible modules: one copy of each.

* /proc: start time, command line, PID namespace; is a recorded PID still the
  process we recorded (``verify_recorded``: start time, then command line);
* ports: can a server bind host:port now, and if not, who holds it;
* readiness probes: HTTP GET and TCP connect, always direct (never through a proxy
  from http_proxy / https_proxy / ALL_PROXY / no_proxy: they are node-local);
* atomic file writes;
* reading the launcher's state file ``<state dir>/launcher.json``;
* secret masking (the state file holds masked command lines, so whoever compares
  a live command line with a recorded one masks it the same way).

This file is also ``plugins/module_utils/pd_node.py`` (a symlink to it): the modules
import it as ``ansible.module_utils.pd_node`` and Ansible ships it with them, while
the launcher imports it as ``pd_launcher.nodeutil``. Hence: standard library only,
no relative imports, no import of the rest of pd_launcher, Python >= 3.8 syntax
(the modules run with whatever Python Ansible finds on the node).
"""
from __future__ import annotations

import errno
import http.client
import ipaddress
import json
import os
import re
import socket
import sys
import tempfile
from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Tuple
from urllib.parse import urlsplit

STATE_FILE = "launcher.json"
STATE_SCHEMA = 1

# --------------------------------------------------------------------------- secrets

MASK = "***"
_SECRET_ENV_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD")
# whole words of a name split at - _ . (so --max-num-batched-tokens and --tokenizer_path
# are not secrets, --hf-token, HF_TOKEN and api_key are); pd_deploy.masking uses the same
_SECRET_WORDS = frozenset({"key", "apikey", "token", "secret", "password", "passwd",
                           "credential", "credentials"})
_NAME_WORDS = re.compile(r"[-_.]+")
_SECRET_IN_TEXT = re.compile(r"(?P<flag>--?[A-Za-z0-9_-]+)(?P<sep>[ =])(?P<value>\S+)")


def is_secret_env(name: str) -> bool:
    upper = name.upper()
    return any(word in upper for word in _SECRET_ENV_WORDS)


def mask_env(env: Mapping[str, str]) -> Dict[str, str]:
    return {k: (MASK if is_secret_env(k) else v) for k, v in env.items()}


def is_secret_flag(flag: str) -> bool:
    """`--api-key`, `--hf-token`, `--db_password`: a dash/underscore separated word is secret.

    `--tokenizer` or `--max-num-batched-tokens` are not.
    """
    return flag.startswith("-") and is_secret_name(flag)


def is_secret_name(name: str) -> bool:
    """True for a flag, env variable or option name one of whose words is a secret word."""
    return any(w.lower() in _SECRET_WORDS for w in _NAME_WORDS.split(name.lstrip("-")) if w)


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


def mask_text(text: str) -> str:
    """Mask secret flag values inside one string (a process title such as nginx's)."""

    def repl(m: re.Match) -> str:
        if is_secret_flag(m.group("flag")):
            return m.group("flag") + m.group("sep") + MASK
        return m.group(0)

    return _SECRET_IN_TEXT.sub(repl, text)


# --------------------------------------------------------------------------- /proc


class ProcStat(NamedTuple):
    """The fields of /proc/PID/stat we use."""

    pid: int
    state: str  # R S D Z T ...
    ppid: int
    pgrp: int
    session: int
    start_time: int  # field 22: clock ticks since boot

    @property
    def zombie(self) -> bool:
        return self.state in ("Z", "X", "x")


def read_stat(pid: int) -> Optional[ProcStat]:
    """Parse /proc/PID/stat; None when the process does not exist."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            data = f.read().decode("utf-8", "replace")
    except (OSError, ValueError, TypeError):
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    rparen = data.rfind(")")
    if rparen < 0:
        return None
    rest = data[rparen + 2:].split()
    # rest[0] is field 3 (state); field N is rest[N - 3].
    try:
        return ProcStat(pid=int(pid), state=rest[0], ppid=int(rest[1]), pgrp=int(rest[2]),
                        session=int(rest[3]), start_time=int(rest[19]))
    except (IndexError, ValueError):
        return None


def start_time(pid: int) -> Optional[int]:
    """Start time of PID in clock ticks since boot (field 22 of /proc/PID/stat)."""
    st = read_stat(pid)
    return st.start_time if st else None


def alive(pid: int) -> bool:
    """PID exists and is not a zombie."""
    st = read_stat(pid)
    return st is not None and not st.zombie


def read_cmdline(pid: int) -> Optional[List[str]]:
    """argv of a process as the kernel shows it (may be rewritten by setproctitle)."""
    try:
        with open(f"/proc/{int(pid)}/cmdline", "rb") as f:
            data = f.read()
    except (OSError, ValueError, TypeError):
        return None
    parts = data.split(b"\0")
    while parts and parts[-1] == b"":
        parts.pop()
    return [p.decode("utf-8", "surrogateescape") for p in parts]


def pid_namespace() -> Optional[str]:
    """Identity of our PID namespace ("pid:[4026531836]"), None when unknown."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def same_pid_namespace(state: Mapping[str, Any]) -> bool:
    """The PIDs of a state file mean something here (same PID namespace, or unknown)."""
    recorded = state.get("pid_namespace")
    mine = pid_namespace()
    return not recorded or not mine or recorded == mine


def seconds_since_start(ticks: int) -> Optional[float]:
    """Seconds since a process with start time `ticks` started (None if unknown)."""
    try:
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - int(ticks) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, TypeError):
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


def verify_recorded(rec: Mapping[str, Any]) -> Tuple[str, str]:
    """Is the PID of a state-file entry (process or launcher) still that process?

    ("ours" | "gone" | "mismatch", detail). "ours" needs the same start time and a
    command line that still matches (``cmdline_matches``) the entry's ``argv`` /
    ``cmdline``; an entry without either is a "mismatch" (never signalled).
    """
    try:
        pid = int(rec["pid"])
        start = int(rec["start_time"])
    except (KeyError, TypeError, ValueError):
        return "mismatch", "state entry without pid/start_time"
    st = read_stat(pid)
    if st is None or st.zombie:
        return "gone", f"pid {pid} is not running"
    if st.start_time != start:
        return "mismatch", (f"pid {pid} now belongs to another process (start time "
                            f"{st.start_time}, recorded {start}): PID reused")
    argv = rec.get("argv") or rec.get("cmdline") or []
    current = read_cmdline(pid)
    if not cmdline_matches(list(argv), rec.get("cmdline"), current):
        recorded = rec.get("cmdline") or argv
        shown = mask_argv(current) if current else current
        return "mismatch", (f"pid {pid} command line {shown!r} does not match the "
                            f"recorded {recorded!r}")
    return "ours", f"pid {pid}"


# --------------------------------------------------------------------------- the lock

LOCK_FILE = "launcher.lock"


def lock_holders(path: str) -> List[int]:
    """PIDs holding a lock (flock or POSIX) on the file `path`, from /proc/locks."""
    try:
        st = os.stat(path)
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    out: List[int] = []
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 00:2a:56789 0 EOF" ("->" marks a waiter)
        if "->" in fields:
            continue
        try:
            pid = int(fields[4])
            major, minor, ino = fields[5].split(":")
            dev = os.makedev(int(major, 16), int(minor, 16))
        except (IndexError, ValueError):
            continue
        if int(ino) == st.st_ino and dev == st.st_dev and pid not in out:
            out.append(pid)
    return out


def launcher_by_lock(state_dir: str) -> Optional[Dict[str, Any]]:
    """The launcher of `state_dir` proven by its lock, without the state file: the live
    process holding ``<state_dir>/launcher.lock`` (only a launcher running on that state
    directory takes it; the fd is close-on-exec, no child inherits it) whose command
    line is a ``pd_launcher run``. A state entry ({"pid", "start_time", "cmdline"}) or
    None. Used when the state file is unreadable or names another process."""
    for pid in lock_holders(os.path.join(state_dir, LOCK_FILE)):
        st = read_stat(pid)
        cmd = read_cmdline(pid) or []
        if st is None or st.zombie or "pd_launcher" not in " ".join(cmd) or "run" not in cmd:
            continue
        return {"pid": pid, "start_time": st.start_time, "cmdline": mask_argv(cmd)}
    return None


def describe_state_damage(state_dir: str, state: Optional[Mapping[str, Any]]) -> List[str]:
    """What in a readable state file cannot be proven: entries whose PID now belongs to
    another process (start time or command line differ), entries without pid or start
    time. Each names the file and the entry."""
    if not state:
        return []
    path = state_path(state_dir)
    out: List[str] = []
    entries = [("launcher", state.get("launcher"))] + [
        (f"processes[{i}] ({(e or {}).get('name', '?')})", e)
        for i, e in enumerate(state.get("processes") or [])]
    for where, entry in entries:
        if not isinstance(entry, Mapping):
            out.append(f"{path}: {where} is not an object")
            continue
        verdict, detail = verify_recorded(entry)
        if verdict == "mismatch":
            out.append(f"{path}: {where}: {detail}; not ours, never signalled")
    return out


# --------------------------------------------------------------------------- state file


def state_path(state_dir: str) -> str:
    return os.path.join(state_dir, STATE_FILE)


def read_state(state_dir: str) -> Optional[Dict[str, Any]]:
    """The launcher's state dict, or None when there is no state file.

    Raises ValueError when the file exists but is not a valid state file, OSError
    when it cannot be read.
    """
    path = state_path(state_dir)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("schema") != STATE_SCHEMA:
        schema = data.get("schema") if isinstance(data, dict) else None
        raise ValueError(f"{path} is not a pd-launcher state file (schema {schema!r})")
    return data


# --------------------------------------------------------------------------- files


def atomic_write(path: str, data: bytes, mode: int = 0o644) -> None:
    """Write `path` so readers see either the old or the new content, never a mix.

    Temp file in the same directory (created if missing), fsync, chmod, rename, then
    fsync of the directory.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


# --------------------------------------------------------------------------- ports

_TCP_LISTEN = "0A"
_TCP_TIME_WAIT = "06"


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def port_problem(host: str, port: int) -> Optional[str]:
    """None when a server could bind host:port now; else why not, as a sentence
    naming the port: ``port 127.0.1.1:7100 is already in use by pid 42 (nginx: ...)``,
    ``port 192.0.2.9:7100 cannot be bound: address 192.0.2.9 is not on this node``.

    The test socket sets SO_REUSEADDR like the servers we start (vLLM/uvicorn,
    nginx, the emulator) do, so connections of a previous run lingering in
    TIME_WAIT do not make a restart refuse; a listening or bound socket does.
    """
    label = "port " + _hostport(host, port)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, int(port)))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            who = ", ".join(f"pid {pid} ({' '.join(cmd)[:120]})"
                            for pid, cmd in port_holders(host, port))
            return f"{label} is already in use" + (f" by {who}" if who else "")
        if exc.errno == errno.EADDRNOTAVAIL:
            return f"{label} cannot be bound: address {host} is not on this node"
        if exc.errno == errno.EACCES:
            return f"{label} cannot be bound: permission denied"
        return f"{label} cannot be bound: {exc.strerror or exc}"
    finally:
        s.close()
    return None


def _proc_net_addr(hexaddr: str) -> Optional[Any]:
    """An address of /proc/net/tcp{,6} (32-bit words in host byte order)."""
    try:
        raw = bytes.fromhex(hexaddr)
    except ValueError:
        return None
    if sys.byteorder == "little":
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    try:
        addr = ipaddress.ip_address(raw)
    except ValueError:
        return None
    if addr.version == 6 and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _socket_inodes(host: str, port: int) -> List[str]:
    """Inodes of the TCP sockets bound to host:port (or to the wildcard address),
    listeners first; TIME_WAIT entries (no owner) are skipped."""
    try:
        want = ipaddress.ip_address(host)
    except ValueError:
        return []
    listen: List[str] = []
    other: List[str] = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] == _TCP_TIME_WAIT or fields[9] == "0":
                continue
            hexaddr, _, hexport = fields[1].partition(":")
            try:
                if int(hexport, 16) != int(port):
                    continue
            except ValueError:
                continue
            addr = _proc_net_addr(hexaddr)
            if addr is None:
                continue
            if addr == want or addr.is_unspecified or want.is_unspecified:
                (listen if fields[3] == _TCP_LISTEN else other).append(fields[9])
    return listen + [i for i in other if i not in listen]


def port_holders(host: str, port: int, limit: int = 3) -> List[Tuple[int, List[str]]]:
    """Who holds TCP host:port: [(pid, masked command line)], best effort.

    Looks the socket up in /proc/net/tcp{,6}, then the processes whose fds point at
    it; processes we may not inspect (another user's, when not root) are missed.
    """
    inodes = _socket_inodes(host, port)
    if not inodes:
        return []
    targets = {f"socket:[{i}]" for i in inodes}
    found: List[Tuple[int, List[str]]] = []
    try:
        pids = sorted(int(n) for n in os.listdir("/proc") if n.isdigit())
    except OSError:
        return found
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(os.path.join(fd_dir, fd)) in targets:
                    found.append((pid, mask_argv(read_cmdline(pid) or ["?"])))
                    break
            except OSError:
                continue
        if len(found) >= limit:
            break
    return found


# --------------------------------------------------------------------------- probes


def http_status(url: str, headers: Optional[Mapping[str, str]] = None,
                timeout: float = 2.0) -> int:
    """Status code of GET `url`, over a direct connection.

    http.client never looks at http_proxy / https_proxy / ALL_PROXY / no_proxy: a
    node-local probe must reach the node itself, not a proxy. Raises OSError,
    ValueError (bad URL) or http.client.HTTPException.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http:// or https:// URL: {url!r}")
    conn_cls = http.client.HTTPSConnection if parts.scheme == "https" else \
        http.client.HTTPConnection
    conn = conn_cls(parts.hostname, parts.port, timeout=timeout)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        conn.request("GET", path, headers=dict(headers or {}))
        resp = conn.getresponse()
        status = resp.status
        resp.close()
        return status
    finally:
        conn.close()


def probe_tcp(host: str, port: int, timeout: float = 2.0) -> Tuple[bool, str]:
    label = _hostport(str(host), int(port))
    try:
        with socket.create_connection((str(host), int(port)), timeout=timeout):
            return True, f"tcp {label} open"
    except OSError as exc:
        return False, f"tcp {label}: {exc}"


def probe_http(url: str, headers: Optional[Mapping[str, str]] = None,
               timeout: float = 2.0) -> Tuple[bool, str]:
    """Ready when GET `url` answers 200 (direct connection, see ``http_status``)."""
    try:
        code = http_status(url, headers, timeout)
    except (OSError, ValueError, http.client.HTTPException) as exc:
        return False, f"GET {url}: {str(exc) or type(exc).__name__}"
    if code == 200:
        return True, f"GET {url}: 200"
    return False, f"GET {url}: HTTP {code}"


def _get(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)


def probe_ready(ready: Any, timeout: float = 2.0) -> Tuple[bool, str]:
    """Run a spec's readiness probe: (ready?, detail).

    `ready` is a spec's ``processes[].ready`` (a dict, or any object with the same
    attributes): ``{"type": "http", "url": ..., "headers": {...}}`` -> GET, ready on
    200; ``{"type": "tcp", "host": ..., "port": ...}`` -> connect. None: no probe.
    """
    if ready is None:
        return True, "no probe"
    kind = _get(ready, "type")
    if kind == "tcp":
        return probe_tcp(_get(ready, "host"), _get(ready, "port") or 0, timeout)
    if kind == "http":
        return probe_http(str(_get(ready, "url")), _get(ready, "headers") or {}, timeout)
    return False, f"unknown probe type {kind!r}"
