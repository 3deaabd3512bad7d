"""Load and validate a node spec (docs/node-spec.md).

Every problem is collected and reported at once; each message names the field,
e.g. ``processes[1].ports[0].port: must be an integer in 1..65535``.
Unknown keys are accepted (the contract may grow); known keys are type-checked.
"""
from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import urlsplit

from .common import EXIT_USAGE, LauncherError

SCHEMA = 1
ROLES = ("P", "D", "C")
DEFAULT_GRACE = 30.0
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_RESERVED_NAMES = ("launcher", "pre_start")  # launcher.log, pre_start.log


class SpecError(LauncherError):
    def __init__(self, path: str, errors: List[str]) -> None:
        msg = f"invalid node spec {path}:\n" + "\n".join("  - " + e for e in errors)
        super().__init__(msg, EXIT_USAGE)
        self.errors = errors


@dataclass
class Port:
    host: str
    port: int
    use: str = ""

    def label(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass
class Ready:
    type: str  # "http" | "tcp"
    url: Optional[str] = None
    headers: Dict[str, str] = field(default_factory=dict)
    host: Optional[str] = None
    port: Optional[int] = None

    @classmethod
    def http(cls, url: str, headers: Optional[Dict[str, str]] = None) -> Ready:
        return cls(type="http", url=url, headers=dict(headers or {}))

    @classmethod
    def tcp(cls, host: str, port: int) -> Ready:
        return cls(type="tcp", host=host, port=port)

    def describe(self) -> str:
        if self.type == "http":
            return f"GET {self.url}"
        return f"tcp {self.host}:{self.port}"


@dataclass
class Process:
    name: str
    argv: List[str]
    env: Dict[str, str] = field(default_factory=dict)
    ports: List[Port] = field(default_factory=list)
    ready: Optional[Ready] = None
    #: informative: the global DP ranks this process serves (engines only)
    dp_ranks: Optional[List[int]] = None
    #: the signal (RELOAD_SIGNALS: "HUP", "USR1", "USR2") that makes the process re-read
    #: the spec's files; the launcher's reload (SIGUSR1 to it, `pd_launcher reload`)
    #: sends it after writing them. None: the process is left alone on a reload
    reload_signal: Optional[str] = None
    #: keys this launcher does not know, kept as they came (the contract may grow)
    extra: Dict[str, Any] = field(default_factory=dict)
    #: the decoded JSON object it was parsed from (never serialised)
    raw: Dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass
class Gate:
    """A service's readiness that needs other units (e.g. xllm-service opens its HTTP
    port only once a prefill and a decode registered): `wait --gate` waits for it after
    those units started, not when this unit starts. It is open when its `ready` probe
    passes (if any) and its `check` command (argv, if any) exits 0, e.g. a router's
    count of registered instances. `what` names it in messages; `explain` (argv,
    optional; default: `check`) prints what is missing on a timeout, and in status."""

    ready: Optional[Ready] = None
    what: str = ""
    explain: List[str] = field(default_factory=list)
    check: List[str] = field(default_factory=list)


@dataclass
class LogPolicy:
    """`logs`: rotation of the unit's log files (run's --log-max-bytes/--log-backups
    override it). `files`: files the processes open themselves (nginx's access log),
    rotated like the processes' own logs (copy-truncate; their writers must open them
    O_APPEND). None: the launcher's default."""

    max_bytes: Optional[int] = None
    backups: Optional[int] = None
    files: List[str] = field(default_factory=list)


@dataclass
class RestartPolicy:
    """`restart`: what the launcher does when a process of the unit exits on its own.

    `on-failure`: stop the whole set (siblings too), wait a backoff (`backoff_s`,
    doubling per restart within the window, at most `backoff_max_s`), start the set
    again; after `max` restarts within `window_s` seconds give up (status failed,
    exit 1). `never`: give up at once. Absent from a spec: `never` (the launcher's
    behaviour before the field existed); the planner always writes it
    (pd_restart_policy, pd_restart_max, pd_restart_window_s, pd_restart_backoff_max_s).
    """

    policy: str = "never"
    max: int = 5
    window_s: float = 600.0
    backoff_s: float = 1.0
    backoff_max_s: float = 30.0


RESTART_POLICIES = ("on-failure", "never")


@dataclass
class SpecFile:
    path: str
    content: str
    mode: int = 0o644


@dataclass
class Nic:
    ip: str
    name: Optional[str] = None
    env: List[str] = field(default_factory=list)


@dataclass
class NodeSpec:
    """One unit's spec. Build it in code (the planner) or with parse_spec; turn it
    into JSON with spec_to_dict. Field <-> key: check_* are checks.{paths,devices,
    commands}; everything else has the key's name."""

    cluster: str
    node: str
    role: str
    ip: str
    processes: List[Process]
    #: service units only: the unit's name and when it starts (before-engines |
    #: after-engines); None (absent from the JSON) for P, D and C units
    unit: Optional[str] = None
    phase: Optional[str] = None
    instance: Optional[str] = None
    master: bool = False
    engine: Optional[str] = None
    base_dir: Optional[str] = None
    dirs: Dict[str, str] = field(default_factory=dict)
    grace_seconds: float = DEFAULT_GRACE
    check_paths: List[str] = field(default_factory=list)
    check_devices: List[str] = field(default_factory=list)
    check_commands: List[str] = field(default_factory=list)
    nic: Optional[Nic] = None
    files: List[SpecFile] = field(default_factory=list)
    pre_start: List[List[str]] = field(default_factory=list)
    #: C units: the front door's block (docs/node-spec.md), opaque to the launcher
    proxy: Optional[Dict[str, Any]] = None
    #: service units: readiness that needs the engines (see Gate); None: no gate
    gate: Optional[Gate] = None
    #: log rotation and the extra log files to rotate; None (absent): the defaults
    logs: Optional[LogPolicy] = None
    #: restart of the set when a process exits on its own; None (absent): never
    restart: Optional[RestartPolicy] = None
    #: top-level keys this launcher does not know, kept as they came
    extra: Dict[str, Any] = field(default_factory=dict)
    #: where it was read from and the decoded JSON (never serialised, not compared)
    source: str = field(default="<spec>", compare=False)
    raw: Dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def all_ports(self) -> List[Tuple[str, Port]]:
        return [(p.name, port) for p in self.processes for port in p.ports]


# Keys in the order spec_to_dict writes them (unit and phase only when set).
SPEC_KEYS = ("schema", "cluster", "node", "role", "unit", "phase", "ip", "instance",
             "master", "engine", "base_dir", "dirs", "grace_seconds", "checks", "nic",
             "files", "pre_start", "processes", "proxy", "gate", "logs", "restart")
PROCESS_KEYS = ("name", "argv", "env", "ports", "ready", "dp_ranks", "reload_signal")
#: what a process's `reload_signal` may be (signal names without SIG)
RELOAD_SIGNALS = ("HUP", "USR1", "USR2")
#: the top-level keys a reload may change: `files`, and `proxy` (the front door's
#: block, opaque to the launcher: it describes what the files say). Any other
#: difference needs a restart of the set.
RELOADABLE_KEYS = ("files", "proxy")


class _V:
    """Collects errors while walking the JSON."""

    def __init__(self) -> None:
        self.errors: List[str] = []

    def err(self, where: str, msg: str) -> None:
        self.errors.append(f"{where}: {msg}")

    def str_(self, obj: Dict[str, Any], key: str, where: str, required: bool = True,
             nonempty: bool = True) -> Optional[str]:
        if key not in obj or obj[key] is None:
            if required:
                self.err(where + key, "required string is missing")
            return None
        val = obj[key]
        if not isinstance(val, str) or (nonempty and not val):
            self.err(where + key, f"must be a non-empty string, got {val!r}")
            return None
        return val

    def str_list(self, val: Any, where: str) -> List[str]:
        if val is None:
            return []
        if not isinstance(val, list):
            self.err(where, f"must be a list of strings, got {type(val).__name__}")
            return []
        out: List[str] = []
        for i, item in enumerate(val):
            if not isinstance(item, str) or not item:
                self.err(f"{where}[{i}]", f"must be a non-empty string, got {item!r}")
            else:
                out.append(item)
        return out

    def argv(self, val: Any, where: str) -> List[str]:
        if not isinstance(val, list) or not val:
            self.err(where, "must be a non-empty list of strings (argv)")
            return []
        out: List[str] = []
        for i, item in enumerate(val):
            if not isinstance(item, str):
                self.err(f"{where}[{i}]", f"must be a string, got {item!r}")
            else:
                out.append(item)
        if out and not out[0]:
            self.err(where + "[0]", "program name must not be empty")
        return out

    def port_num(self, val: Any, where: str) -> Optional[int]:
        if isinstance(val, bool) or not isinstance(val, int) or not 1 <= val <= 65535:
            self.err(where, f"must be an integer in 1..65535, got {val!r}")
            return None
        return val


def _parse_mode(v: _V, val: Any, where: str) -> int:
    if val is None:
        return 0o644
    if isinstance(val, int) and not isinstance(val, bool) and 0 <= val <= 0o7777:
        return val
    if isinstance(val, str) and re.match(r"^0?[0-7]{3,4}$", val):
        return int(val, 8)
    v.err(where, f"must be an octal string such as \"0644\", got {val!r}")
    return 0o644


def _parse_ready(v: _V, val: Any, where: str) -> Optional[Ready]:
    if val is None:
        return None
    if not isinstance(val, dict):
        v.err(where, "must be an object or null")
        return None
    typ = val.get("type")
    if typ == "http":
        url = v.str_(val, "url", where + ".")
        if url is not None:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                v.err(where + ".url", f"must be an http:// or https:// URL, got {url!r}")
        headers = val.get("headers") or {}
        if not isinstance(headers, dict) or not all(
            isinstance(k, str) and isinstance(x, str) for k, x in headers.items()
        ):
            v.err(where + ".headers", "must be an object of string values")
            headers = {}
        return Ready(type="http", url=url, headers=dict(headers))
    if typ == "tcp":
        host = v.str_(val, "host", where + ".")
        port = v.port_num(val.get("port"), where + ".port")
        return Ready(type="tcp", host=host, port=port)
    v.err(where + ".type", f"must be \"http\" or \"tcp\", got {typ!r}")
    return None


def _parse_process(v: _V, val: Any, where: str) -> Optional[Process]:
    if not isinstance(val, dict):
        v.err(where, "must be an object")
        return None
    name = v.str_(val, "name", where + ".") or ""
    if name and (not _NAME_RE.match(name) or name in _RESERVED_NAMES):
        v.err(where + ".name", "must match [A-Za-z0-9][A-Za-z0-9._-]* and not be "
              f"{'/'.join(_RESERVED_NAMES)}, got {name!r}")
    argv = v.argv(val.get("argv"), where + ".argv")
    env_raw = val.get("env") or {}
    env: Dict[str, str] = {}
    if not isinstance(env_raw, dict):
        v.err(where + ".env", "must be an object of strings")
    else:
        for k, x in env_raw.items():
            if not isinstance(k, str) or not k or "=" in k:
                v.err(where + ".env", f"invalid variable name {k!r}")
            elif not isinstance(x, str):
                v.err(f"{where}.env.{k}", f"must be a string, got {x!r}")
            else:
                env[k] = x
    ports: List[Port] = []
    ports_raw = val.get("ports") or []
    if not isinstance(ports_raw, list):
        v.err(where + ".ports", "must be a list")
        ports_raw = []
    for j, pr in enumerate(ports_raw):
        pw = f"{where}.ports[{j}]"
        if not isinstance(pr, dict):
            v.err(pw, "must be an object {host, port, use}")
            continue
        host = v.str_(pr, "host", pw + ".")
        num = v.port_num(pr.get("port"), pw + ".port")
        use = pr.get("use") or ""
        if not isinstance(use, str):
            v.err(pw + ".use", "must be a string")
            use = ""
        if host is not None and num is not None:
            ports.append(Port(host=host, port=num, use=use))
    ready = _parse_ready(v, val.get("ready"), where + ".ready")
    dp_ranks = val.get("dp_ranks")
    if dp_ranks is not None and (not isinstance(dp_ranks, list) or not all(
            isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in dp_ranks)):
        v.err(where + ".dp_ranks", f"must be a list of integers >= 0, got {dp_ranks!r}")
        dp_ranks = None
    reload_signal = val.get("reload_signal")
    if reload_signal is not None and reload_signal not in RELOAD_SIGNALS:
        v.err(where + ".reload_signal", "must be one of {} or null, got {!r}".format(
            " | ".join(RELOAD_SIGNALS), reload_signal))
        reload_signal = None
    extra = {k: x for k, x in val.items() if k not in PROCESS_KEYS}
    return Process(name=name, argv=argv, env=env, ports=ports, ready=ready,
                   dp_ranks=None if dp_ranks is None else list(dp_ranks),
                   reload_signal=reload_signal, extra=extra, raw=val)


def _parse_file(v: _V, val: Any, where: str) -> Optional[SpecFile]:
    if not isinstance(val, dict):
        v.err(where, "must be an object {path, content, mode}")
        return None
    fpath = v.str_(val, "path", where + ".")
    if fpath is not None and not fpath.startswith("/"):
        v.err(where + ".path", f"must be an absolute path, got {fpath!r}")
    content = val.get("content")
    if not isinstance(content, str):
        v.err(where + ".content", "must be a string")
        content = ""
    mode = _parse_mode(v, val.get("mode"), where + ".mode")
    return SpecFile(path=fpath, content=content, mode=mode) if fpath else None


def _one(parse: Any, val: Any, where: str) -> Any:
    v = _V()
    out = parse(v, val, where)
    if v.errors:
        raise SpecError(where, v.errors)
    return out


def parse_process(val: Any, where: str = "process") -> Process:
    """One `processes[]` entry (a dict as in docs/node-spec.md) -> Process; raises
    SpecError naming the field. For builders that hold processes as plain dicts."""
    return _one(_parse_process, val, where)


def parse_file(val: Any, where: str = "file") -> SpecFile:
    """One `files[]` entry -> SpecFile; raises SpecError naming the field."""
    return _one(_parse_file, val, where)


def parse_spec(raw: Any, source: str = "<spec>") -> NodeSpec:
    """Validate a decoded spec; raise SpecError listing every problem."""
    v = _V()
    if not isinstance(raw, dict):
        raise SpecError(source, ["(top level): must be a JSON object"])
    if raw.get("schema") != SCHEMA:
        v.err("schema", f"must be {SCHEMA}, got {raw.get('schema')!r}")
    cluster = v.str_(raw, "cluster", "") or ""
    node = v.str_(raw, "node", "") or ""
    role = raw.get("role")
    if role not in ROLES:
        v.err("role", "must be one of {}, got {!r}".format("|".join(ROLES), role))
        role = ""
    ip = v.str_(raw, "ip", "") or ""
    unit = v.str_(raw, "unit", "", required=False)
    if unit is not None and not _NAME_RE.match(unit):
        v.err("unit", f"must match [A-Za-z0-9][A-Za-z0-9._-]*, got {unit!r}")
    phase = v.str_(raw, "phase", "", required=False)
    instance = v.str_(raw, "instance", "", required=False)
    engine = v.str_(raw, "engine", "", required=False)
    base_dir = v.str_(raw, "base_dir", "", required=False)
    master = raw.get("master")
    if master is None:
        master = False
    if not isinstance(master, bool):
        v.err("master", f"must be true or false, got {master!r}")
        master = False

    dirs: Dict[str, str] = {}
    dirs_raw = raw.get("dirs")
    if dirs_raw is not None and not isinstance(dirs_raw, dict):
        v.err("dirs", "must be an object {state, log, run}")
    elif isinstance(dirs_raw, dict):
        for k, x in dirs_raw.items():
            if x is None:
                continue
            if not isinstance(x, str) or not x:
                v.err("dirs." + str(k), f"must be a non-empty path string, got {x!r}")
            else:
                dirs[str(k)] = x

    grace = raw.get("grace_seconds", DEFAULT_GRACE)
    if grace is None:
        grace = DEFAULT_GRACE
    if isinstance(grace, bool) or not isinstance(grace, (int, float)) or grace < 0:
        v.err("grace_seconds", f"must be a number >= 0, got {grace!r}")
        grace = DEFAULT_GRACE

    checks = raw.get("checks") or {}
    if not isinstance(checks, dict):
        v.err("checks", "must be an object {paths, devices, commands}")
        checks = {}
    check_paths = v.str_list(checks.get("paths"), "checks.paths")
    check_devices = v.str_list(checks.get("devices"), "checks.devices")
    check_commands = v.str_list(checks.get("commands"), "checks.commands")

    nic: Optional[Nic] = None
    nic_raw = raw.get("nic")
    if nic_raw is not None:
        if not isinstance(nic_raw, dict):
            v.err("nic", "must be an object {ip, name, env} or null")
        else:
            nic_ip = v.str_(nic_raw, "ip", "nic.", required=nic_raw.get("name") is None)
            nic_name = v.str_(nic_raw, "name", "nic.", required=False)
            nic_env = v.str_list(nic_raw.get("env"), "nic.env")
            nic = Nic(ip=nic_ip or "", name=nic_name, env=nic_env)

    files: List[SpecFile] = []
    files_raw = raw.get("files") or []
    if not isinstance(files_raw, list):
        v.err("files", "must be a list")
        files_raw = []
    for i, fr in enumerate(files_raw):
        sf = _parse_file(v, fr, f"files[{i}]")
        if sf is not None:
            files.append(sf)

    pre_start: List[List[str]] = []
    pre_raw = raw.get("pre_start") or []
    if not isinstance(pre_raw, list):
        v.err("pre_start", "must be a list of argv lists")
        pre_raw = []
    for i, pr in enumerate(pre_raw):
        argv = v.argv(pr, f"pre_start[{i}]")
        if argv:
            pre_start.append(argv)

    processes: List[Process] = []
    procs_raw = raw.get("processes")
    if not isinstance(procs_raw, list) or not procs_raw:
        v.err("processes", "must be a non-empty list")
        procs_raw = []
    for i, pr in enumerate(procs_raw):
        proc = _parse_process(v, pr, f"processes[{i}]")
        if proc is not None:
            processes.append(proc)

    seen_names: Dict[str, int] = {}
    seen_ports: Dict[Tuple[str, int], str] = {}
    for i, proc in enumerate(processes):
        if proc.name in seen_names:
            v.err(f"processes[{i}].name",
                  f"duplicate name {proc.name!r} (also processes[{seen_names[proc.name]}])")
        seen_names.setdefault(proc.name, i)
        for j, port in enumerate(proc.ports):
            key = (port.host, port.port)
            if key in seen_ports:
                v.err(f"processes[{i}].ports[{j}]",
                      f"{port.label()} is also declared by {seen_ports[key]}")
            else:
                seen_ports[key] = f"process {proc.name!r}"

    proxy = raw.get("proxy")
    if proxy is not None and not isinstance(proxy, dict):
        v.err("proxy", f"must be an object or null, got {type(proxy).__name__}")
        proxy = None

    gate = _parse_gate(v, raw.get("gate"))
    log_policy = _parse_logs(v, raw.get("logs"))
    restart = _parse_restart(v, raw.get("restart"))

    if v.errors:
        raise SpecError(source, v.errors)
    return NodeSpec(
        cluster=cluster, node=node, role=str(role), ip=ip, processes=processes, unit=unit,
        phase=phase, instance=instance, master=master, engine=engine, base_dir=base_dir,
        dirs=dirs, grace_seconds=grace, check_paths=check_paths, check_devices=check_devices,
        check_commands=check_commands, nic=nic, files=files, pre_start=pre_start,
        proxy=proxy, gate=gate, logs=log_policy, restart=restart,
        extra={k: x for k, x in raw.items() if k not in SPEC_KEYS},
        source=source, raw=raw,
    )


def _parse_logs(v: _V, val: Any) -> Optional[LogPolicy]:
    if val is None:
        return None
    if not isinstance(val, dict):
        v.err("logs", "must be an object {max_bytes, backups, files} or null")
        return None
    nums: Dict[str, Optional[int]] = {}
    for key in ("max_bytes", "backups"):
        x = val.get(key)
        if x is not None and (isinstance(x, bool) or not isinstance(x, int) or x < 0):
            v.err("logs." + key, f"must be an integer >= 0, got {x!r}")
            x = None
        nums[key] = x
    files = v.str_list(val.get("files"), "logs.files")
    for i, f in enumerate(files):
        if not f.startswith("/"):
            v.err(f"logs.files[{i}]", f"must be an absolute path, got {f!r}")
    return LogPolicy(max_bytes=nums["max_bytes"], backups=nums["backups"], files=files)


def _parse_restart(v: _V, val: Any) -> Optional[RestartPolicy]:
    if val is None:
        return None
    if not isinstance(val, dict):
        v.err("restart", "must be an object {policy, max, window_s, backoff_s, "
              "backoff_max_s} or null")
        return None
    out = RestartPolicy()
    policy = val.get("policy", out.policy)
    if policy not in RESTART_POLICIES:
        v.err("restart.policy", "must be one of {}, got {!r}".format(
            " | ".join(RESTART_POLICIES), policy))
    else:
        out.policy = policy
    count = val.get("max", out.max)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        v.err("restart.max", f"must be an integer >= 0, got {count!r}")
    else:
        out.max = count
    for key in ("window_s", "backoff_s", "backoff_max_s"):
        x = val.get(key, getattr(out, key))
        if isinstance(x, bool) or not isinstance(x, (int, float)) or x < 0:
            v.err("restart." + key, f"must be a number >= 0, got {x!r}")
        else:
            setattr(out, key, x)
    return out


def _parse_gate(v: _V, val: Any) -> Optional[Gate]:
    if val is None:
        return None
    if not isinstance(val, dict):
        v.err("gate", "must be an object {ready, what, explain} or null")
        return None
    ready = _parse_ready(v, val.get("ready"), "gate.ready")
    what = v.str_(val, "what", "gate.", required=False, nonempty=False) or ""
    explain = val.get("explain") or []
    explain = v.argv(explain, "gate.explain") if explain else []
    check = val.get("check") or []
    check = v.argv(check, "gate.check") if check else []
    if ready is None and not check and val.get("ready") is None and not val.get("check"):
        v.err("gate", "needs a ready probe, a check command or both")
    return Gate(ready=ready, what=what, explain=explain, check=check)


def load_spec(path: str) -> NodeSpec:
    return load_spec_file(path)[0]


def load_spec_file(path: str) -> Tuple[NodeSpec, str]:
    """load_spec, and the sha256 (hex) of the bytes it was parsed from."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise LauncherError(f"cannot read node spec {path}: {exc}", EXIT_USAGE) from exc
    try:
        raw = json.loads(data.decode("utf-8"))
    except ValueError as exc:
        raise SpecError(path, [f"(json): {exc}"]) from exc
    return parse_spec(raw, path), hashlib.sha256(data).hexdigest()


def reload_differences(old: NodeSpec, new: NodeSpec, limit: int = 5) -> List[str]:
    """What differs between two specs besides RELOADABLE_KEYS, as field paths
    (`processes[0].argv`, `dirs.run`, `processes` for a list of another length);
    empty: `new` can be applied to a running set by a reload. At most `limit` paths
    (the last one then says how many more there are)."""
    a, b = spec_to_dict(old), spec_to_dict(new)
    for key in RELOADABLE_KEYS:
        a.pop(key, None)
        b.pop(key, None)
    out: List[str] = []
    _diff(a, b, "", out)
    if len(out) > limit:
        out = out[:limit - 1] + [f"... and {len(out) - limit + 1} more"]
    return out


def _diff(a: Any, b: Any, where: str, out: List[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            _diff(a.get(k, _MISSING), b.get(k, _MISSING), f"{where}.{k}" if where else str(k),
                  out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            _diff(x, y, f"{where}[{i}]", out)
    elif a != b:
        out.append(where or "(top level)")


_MISSING = object()


# ----------------------------------------------------------------- serialising


def _ready_to_dict(ready: Ready) -> Dict[str, Any]:
    if ready.type == "tcp":
        return {"type": "tcp", "host": ready.host, "port": ready.port}
    out: Dict[str, Any] = {"type": ready.type, "url": ready.url}
    if ready.headers:
        out["headers"] = dict(ready.headers)
    return out


def _process_to_dict(proc: Process) -> Dict[str, Any]:
    out: Dict[str, Any] = {
        "name": proc.name,
        "argv": list(proc.argv),
        "env": dict(proc.env),
        "ports": [{"host": p.host, "port": p.port, "use": p.use} for p in proc.ports],
        "ready": None if proc.ready is None else _ready_to_dict(proc.ready),
    }
    if proc.dp_ranks is not None:
        out["dp_ranks"] = list(proc.dp_ranks)
    if proc.reload_signal is not None:
        out["reload_signal"] = proc.reload_signal
    out.update(proc.extra)
    return out


def spec_to_dict(spec: NodeSpec) -> Dict[str, Any]:
    """The JSON form of a spec: what the planner emits and parse_spec reads back.

    The one serialiser of the contract. Keys come in SPEC_KEYS order; `unit` and
    `phase` only when set (service units), `dp_ranks`, `reload_signal` and
    `ready.headers` only when set, `gate`, `logs` and `restart` only when set, unknown
    keys kept from parsing come last.
    `source` and `raw` never appear.
    parse_spec(spec_to_dict(s)) == s, and spec_to_dict(parse_spec(d)) == d for every
    d in this canonical form (what the planner emits).
    """
    out: Dict[str, Any] = {
        "schema": SCHEMA,
        "cluster": spec.cluster,
        "node": spec.node,
        "role": spec.role,
    }
    if spec.unit is not None:
        out["unit"] = spec.unit
    if spec.phase is not None:
        out["phase"] = spec.phase
    out.update({
        "ip": spec.ip,
        "instance": spec.instance,
        "master": spec.master,
        "engine": spec.engine,
        "base_dir": spec.base_dir,
        "dirs": dict(spec.dirs),
        "grace_seconds": spec.grace_seconds,
        "checks": {"paths": list(spec.check_paths), "devices": list(spec.check_devices),
                   "commands": list(spec.check_commands)},
        "nic": None if spec.nic is None else {
            "ip": spec.nic.ip or None, "name": spec.nic.name, "env": list(spec.nic.env)},
        "files": [{"path": f.path, "content": f.content, "mode": format(f.mode, "04o")}
                  for f in spec.files],
        "pre_start": [list(a) for a in spec.pre_start],
        "processes": [_process_to_dict(p) for p in spec.processes],
        "proxy": None if spec.proxy is None else copy.deepcopy(spec.proxy),
    })
    if spec.gate is not None:
        out["gate"] = {"ready": None if spec.gate.ready is None
                       else _ready_to_dict(spec.gate.ready), "what": spec.gate.what,
                       "explain": list(spec.gate.explain), "check": list(spec.gate.check)}
    if spec.logs is not None:
        out["logs"] = {"max_bytes": spec.logs.max_bytes, "backups": spec.logs.backups,
                       "files": list(spec.logs.files)}
    if spec.restart is not None:
        out["restart"] = {"policy": spec.restart.policy, "max": spec.restart.max,
                          "window_s": spec.restart.window_s,
                          "backoff_s": spec.restart.backoff_s,
                          "backoff_max_s": spec.restart.backoff_max_s}
    out.update(copy.deepcopy(spec.extra))
    return out


def dump_spec(spec: NodeSpec) -> str:
    """spec_to_dict as the JSON text the planner prints (indent 2)."""
    return json.dumps(spec_to_dict(spec), indent=2)


# ----------------------------------------------------------------- relocating

# What a relocated directory may contain: it is substituted into rendered files
# (nginx.conf, JSON) where quotes, blanks or ; { } $ # would change their meaning.
_SAFE_DIR_RE = re.compile(r"^/[A-Za-z0-9._/+@,=~:%-]*$")
_PATH_CHARS = r"A-Za-z0-9._\-"


def relocate(spec: NodeSpec, new_dirs: Dict[str, Optional[str]]) -> NodeSpec:
    """The spec with some of its directories moved (run --state-dir/--log-dir/--run-dir).

    Every occurrence of an old directory (`dirs.<key>`) as a whole path or a path
    prefix is replaced by the new one, everywhere the spec can name it: file paths
    and contents, pre_start, argv, env values, ready probes, checks.paths and the
    other dirs. "Whole path" means on path boundaries: the old directory is neither
    preceded by a path character or `/` nor followed by a name character, so
    /x/logs/C matches in `/x/logs/C/proxy_access.log` or `"/x/logs/C"` but not in
    /x/logs/C2 or /y/x/logs/C. All replacements happen in one pass (longest old
    directory first), so a new directory never gets replaced again. Raises
    LauncherError (usage) for a new directory that cannot be substituted safely.
    """
    mapping: Dict[str, str] = {}
    explicit: Dict[str, str] = {}
    for key, new in new_dirs.items():
        if not new:
            continue
        new = _norm_dir(new)
        explicit[key] = new
        old = spec.dirs.get(key)
        if old is None or not old.startswith("/") or _norm_dir(old) == new:
            continue  # nothing to rewrite (a relative dirs.* names no path in the spec)
        old = _norm_dir(old)
        if old == "/":
            raise LauncherError(f"cannot relocate dirs.{key} = / (every path is under it)",
                                EXIT_USAGE)
        if not _SAFE_DIR_RE.match(new):
            raise LauncherError(
                f"--{key}-dir {new!r}: only A-Z a-z 0-9 and . _ / + @ , = ~ : % - can be "
                "substituted into the spec's files", EXIT_USAGE)
        mapping[old] = new
    if not mapping:
        return replace(spec, dirs=dict(spec.dirs, **explicit))
    olds = sorted(mapping, key=len, reverse=True)
    alternatives = "|".join(re.escape(o) for o in olds)
    pattern = re.compile(f"(?<![{_PATH_CHARS}/])({alternatives})(?![{_PATH_CHARS}])")

    def sub(text: str) -> str:
        return pattern.sub(lambda m: mapping[m.group(1)], text)

    def sub_ready(ready: Optional[Ready]) -> Optional[Ready]:
        if ready is None:
            return None
        return replace(ready, url=None if ready.url is None else sub(ready.url),
                       headers={k: sub(x) for k, x in ready.headers.items()})

    dirs = {k: explicit.get(k, sub(x)) for k, x in spec.dirs.items()}
    dirs.update(explicit)
    return replace(
        spec,
        dirs=dirs,
        logs=None if spec.logs is None else replace(
            spec.logs, files=[sub(f) for f in spec.logs.files]),
        check_paths=[sub(x) for x in spec.check_paths],
        files=[replace(f, path=sub(f.path), content=sub(f.content)) for f in spec.files],
        pre_start=[[sub(a) for a in argv] for argv in spec.pre_start],
        processes=[replace(p, argv=[sub(a) for a in p.argv],
                           env={k: sub(x) for k, x in p.env.items()},
                           ready=sub_ready(p.ready))
                   for p in spec.processes],
    )


def _norm_dir(path: str) -> str:
    return path.rstrip("/") or "/"
