"""Load and validate a node spec (docs/node-spec.md).

Every problem is collected and reported at once; each message names the field,
e.g. ``processes[1].ports[0].port: must be an integer in 1..65535``.
Unknown keys are accepted (the contract may grow); known keys are type-checked.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
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

    def describe(self) -> str:
        if self.type == "http":
            return f"GET {self.url}"
        return f"tcp {self.host}:{self.port}"


@dataclass
class Process:
    name: str
    argv: List[str]
    env: Dict[str, str]
    ports: List[Port]
    ready: Optional[Ready]
    raw: Dict[str, Any]


@dataclass
class SpecFile:
    path: str
    content: str
    mode: int


@dataclass
class Nic:
    ip: str
    name: Optional[str]
    env: List[str]


@dataclass
class NodeSpec:
    source: str
    raw: Dict[str, Any]
    cluster: str
    node: str
    role: str
    ip: str
    dirs: Dict[str, str]
    grace_seconds: float
    check_paths: List[str]
    check_devices: List[str]
    check_commands: List[str]
    nic: Optional[Nic]
    files: List[SpecFile]
    pre_start: List[List[str]]
    processes: List[Process]

    def all_ports(self) -> List[Tuple[str, Port]]:
        return [(p.name, port) for p in self.processes for port in p.ports]


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
    return Process(name=name, argv=argv, env=env, ports=ports, ready=ready, raw=val)


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
        fw = f"files[{i}]"
        if not isinstance(fr, dict):
            v.err(fw, "must be an object {path, content, mode}")
            continue
        fpath = v.str_(fr, "path", fw + ".")
        if fpath is not None and not fpath.startswith("/"):
            v.err(fw + ".path", f"must be an absolute path, got {fpath!r}")
        content = fr.get("content")
        if not isinstance(content, str):
            v.err(fw + ".content", "must be a string")
            content = ""
        mode = _parse_mode(v, fr.get("mode"), fw + ".mode")
        if fpath:
            files.append(SpecFile(path=fpath, content=content, mode=mode))

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

    if v.errors:
        raise SpecError(source, v.errors)
    return NodeSpec(
        source=source, raw=raw, cluster=cluster, node=node, role=str(role), ip=ip, dirs=dirs,
        grace_seconds=float(grace), check_paths=check_paths, check_devices=check_devices,
        check_commands=check_commands, nic=nic, files=files, pre_start=pre_start,
        processes=processes,
    )


def load_spec(path: str) -> NodeSpec:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise LauncherError(f"cannot read node spec {path}: {exc}", EXIT_USAGE) from exc
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise SpecError(path, [f"(json): {exc}"]) from exc
    return parse_spec(raw, path)
