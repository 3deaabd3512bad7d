"""argparse-style argv for the FastDeploy personalities.

Syntax (as FastDeploy's argparse parser): ``--flag value`` or ``--flag=value``; a
switch is ``--flag`` (and ``--no-flag`` for the BooleanOptionalAction ones); names take
``-`` or ``_`` (``--rdma_comm_ports`` = ``--rdma-comm-ports``); a single dash works too
(``-tp``, and Go-style ``-port`` for the router). Unknown flags are accepted and returned
in ``Parsed.ignored``: ``--flag=value`` is one token; ``--flag value`` takes the next
token unless the flag looks like a switch (``--enable-*``, ``--disable-*``, ``--no-*``,
``--use-*``, or a known FastDeploy switch) or the next token is itself a flag.

A malformed value of a flag the emulator uses raises ``FlagError`` (exit status 2) with a
message naming the flag, as argparse's ``argument --flag: invalid ... value``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

EXIT_BAD_FLAG = 2

# FastDeploy store_true flags that do not follow the enable-/disable-/no-/use- pattern
_SWITCHES = {
    "dynamic-load-weight", "lm-head-fp32", "splitwise", "trust-remote-code", "enforce-eager",
    "graph-optimization", "load-strategy-fast",
}
_SWITCH_RE = re.compile(r"(enable|disable|no|use)-.+")
_NUM_RE = re.compile(r"-\d+(\.\d+)?")


class FlagError(ValueError):
    """A malformed argv (exit status 2)."""


@dataclass(frozen=True)
class Opt:
    kind: str  # str | int | float | bool | ints | strs
    default: Any
    help: str = ""
    check: Optional[Callable[[Any], Optional[str]]] = None  # value -> why it is bad, or None
    aliases: Tuple[str, ...] = ()
    negatable: bool = False  # bool only: --no-<name> sets False


@dataclass
class Parsed:
    values: Dict[str, Any]
    given: List[str] = field(default_factory=list)  # known flags present on the argv
    ignored: List[str] = field(default_factory=list)  # unknown flags, as written
    stray: List[str] = field(default_factory=list)  # positional arguments

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name.replace("_", "-")]
        except KeyError:
            raise AttributeError(name) from None


def _norm(name: str) -> str:
    return name.lstrip("-").replace("_", "-")


def _is_flag(tok: str) -> bool:
    return tok.startswith("-") and len(tok) > 1 and not _NUM_RE.fullmatch(tok)


def _int(text: str) -> int:
    t = text.strip()
    if not re.fullmatch(r"[+-]?\d+", t):
        raise ValueError(f"invalid int value: {text!r}")
    return int(t)


def convert(name: str, opt: Opt, raw: str) -> Any:
    """The value of ``--name raw``; FlagError naming the flag when it is malformed."""
    try:
        if opt.kind == "int":
            value: Any = _int(raw)
        elif opt.kind == "float":
            try:
                value = float(raw)
            except ValueError:
                raise ValueError(f"invalid float value: {raw!r}") from None
            if value != value:
                raise ValueError(f"invalid float value: {raw!r}")
        elif opt.kind in ("ints", "strs"):
            parts = [p.strip() for p in raw.split(",")]
            if not raw.strip() or any(not p for p in parts):
                raise ValueError(f"expected a comma-separated list, got {raw!r}")
            value = [_int(p) for p in parts] if opt.kind == "ints" else parts
        else:
            value = raw
    except ValueError as exc:
        raise FlagError(f"argument --{name}: {exc}") from None
    if opt.check is not None:
        why = opt.check(value)
        if why:
            raise FlagError(f"argument --{name}: {why}")
    return value


def parse(argv: Sequence[str], specs: Mapping[str, Opt],
          removed: Optional[Mapping[str, str]] = None) -> Parsed:
    """Parse ``argv`` against ``specs`` (dashed name -> Opt). ``removed``: flags that
    FastDeploy no longer has (name -> what to say); giving one is a FlagError."""
    names: Dict[str, str] = {}
    for name, opt in specs.items():
        names[name] = name
        for alias in opt.aliases:
            names[_norm(alias)] = name
    out = Parsed({name: opt.default for name, opt in specs.items()})
    toks = list(argv)
    i = 0
    while i < len(toks):
        tok = toks[i]
        i += 1
        if tok == "--":
            out.stray.extend(toks[i:])
            break
        if not _is_flag(tok):
            out.stray.append(tok)
            continue
        body, has_eq, raw = tok.partition("=")
        key = _norm(body)
        if removed and key in removed:
            raise FlagError(f"argument --{key}: {removed[key]}")
        name = names.get(key)
        if name is None and key.startswith("no-") and not has_eq:
            neg = names.get(key[3:])
            if neg is not None and specs[neg].kind == "bool" and specs[neg].negatable:
                out.values[neg] = False
                out.given.append(neg)
                continue
        if name is None:
            if (has_eq or i >= len(toks) or _is_flag(toks[i]) or key in _SWITCHES
                    or _SWITCH_RE.fullmatch(key)):
                out.ignored.append(tok)
            else:
                out.ignored.append(f"{tok} {toks[i]}")
                i += 1
            continue
        opt = specs[name]
        if opt.kind == "bool":
            if has_eq:
                raise FlagError(f"argument --{name}: ignored explicit argument {raw!r}")
            out.values[name] = True
        else:
            if not has_eq:
                if i >= len(toks) or _is_flag(toks[i]):
                    raise FlagError(f"argument --{name}: expected one argument")
                raw = toks[i]
                i += 1
            out.values[name] = convert(name, opt, raw)
        out.given.append(name)
    return out


# -- checks ---------------------------------------------------------------------------


def port(value: Any) -> Optional[str]:
    return None if 0 < value < 65536 else f"not a TCP port (1-65535): {value}"


def ports(value: Any) -> Optional[str]:
    bad = [p for p in value if not 0 < p < 65536]
    return f"not TCP ports (1-65535): {bad}" if bad else None


def at_least(minimum: int) -> Callable[[Any], Optional[str]]:
    def check(value: Any) -> Optional[str]:
        return None if value >= minimum else f"must be >= {minimum}, got {value}"
    return check


def choice(*choices: str) -> Callable[[Any], Optional[str]]:
    def check(value: Any) -> Optional[str]:
        if value in choices:
            return None
        return "invalid choice: {!r} (choose from {})".format(
            value, ", ".join(repr(c) for c in choices))
    return check


def each_of(*choices: str) -> Callable[[Any], Optional[str]]:
    def check(value: Any) -> Optional[str]:
        bad = [v for v in value if v not in choices]
        if bad:
            return "invalid value(s) {} (each one of {})".format(
                ", ".join(repr(b) for b in bad), ", ".join(choices))
        return None
    return check


def split_addr(value: str) -> Tuple[str, int]:
    """(host, port) of ``host:port`` or ``http://host:port[/]``; ValueError if malformed."""
    text = value.strip()
    for scheme in ("http://", "https://"):
        if text.startswith(scheme):
            text = text[len(scheme):]
    text = text.rstrip("/")
    host, sep, port_s = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ValueError(f"expected ip:port, got {value!r}")
    return host, int(port_s)


def addr(value: Any) -> Optional[str]:
    try:
        split_addr(value)
    except ValueError as exc:
        return str(exc)
    return None


def usage(prog: str, specs: Mapping[str, Opt]) -> str:
    lines = [f"usage: {prog} [--flag value ...]", "", "flags the emulator uses:"]
    for name, opt in specs.items():
        names = ", ".join([f"--{name}"] + list(opt.aliases))
        lines.append(f"  {names} ({opt.kind}, default {opt.default!r}) {opt.help}".rstrip())
    lines.append("")
    lines.append("Other flags are accepted and ignored. See pd_launcher/emulator/README.md.")
    return "\n".join(lines) + "\n"
