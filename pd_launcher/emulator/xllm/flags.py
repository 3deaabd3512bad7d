"""gflags-style argv for the two xLLM personalities.

Syntax (as gflags): ``--flag=value`` or ``--flag value`` (one or two dashes); a bool is
``--flag`` (true), ``--noflag`` (false) or ``--flag=true|false|1|0|yes|no|t|f|y|n``;
``--flag value`` never takes the next token for a bool (gflags leaves it as a stray
argument, and so do we, with a warning when it looks like a bool). ``--`` ends the
flags. Unknown flags are accepted (``--flag=value``, or ``--flag value`` when the next
token is not a flag) and reported in ``Parsed.ignored``.

A malformed value of a known flag raises ``FlagError`` (exit status 2), with a message
naming the flag, like gflags' ``ERROR: illegal value ...``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

EXIT_BAD_FLAG = 2

_TRUE = {"true", "t", "yes", "y", "1"}
_FALSE = {"false", "f", "no", "n", "0"}
_INT_RE = re.compile(r"[+-]?(0[xX][0-9a-fA-F]+|\d+)")


class FlagError(ValueError):
    """A malformed flag value (exit status 2)."""


@dataclass(frozen=True)
class Flag:
    kind: str  # string | int32 | double | bool
    default: Any
    help: str = ""
    check: Optional[Callable[[Any], Optional[str]]] = None  # value -> error or None


@dataclass
class Parsed:
    values: Dict[str, Any]
    given: List[str] = field(default_factory=list)  # known flags present on the argv
    ignored: List[str] = field(default_factory=list)  # unknown flags, as written
    stray: List[str] = field(default_factory=list)  # non-flag arguments (ignored)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None


def _illegal(kind: str, name: str, raw: str, why: str = "") -> FlagError:
    extra = f" ({why})" if why else ""
    return FlagError(f"ERROR: illegal value '{raw}' specified for {kind} flag '{name}'{extra}")


def convert(name: str, spec: Flag, raw: str) -> Any:
    if spec.kind == "bool":
        low = raw.strip().lower()
        if low in _TRUE:
            value: Any = True
        elif low in _FALSE:
            value = False
        else:
            raise _illegal("bool", name, raw)
    elif spec.kind == "int32":
        text = raw.strip()
        if not _INT_RE.fullmatch(text):
            raise _illegal("int32", name, raw)
        value = int(text, 0) if "x" in text.lower() else int(text, 10)
        if not -(1 << 31) <= value < (1 << 31):
            raise _illegal("int32", name, raw, "out of range")
    elif spec.kind == "double":
        try:
            value = float(raw)
        except ValueError:
            raise _illegal("double", name, raw) from None
        if value != value:
            raise _illegal("double", name, raw)
    else:
        value = raw
    if spec.check is not None:
        why = spec.check(value)
        if why:
            raise _illegal(spec.kind, name, raw, why)
    return value


def _is_flag(tok: str) -> bool:
    return tok.startswith("-") and len(tok) > 1 and not re.fullmatch(r"-\d+(\.\d+)?", tok)


def parse(argv: Sequence[str], specs: Mapping[str, Flag]) -> Parsed:
    """Parse ``argv`` against ``specs`` (name without dashes -> Flag)."""
    out = Parsed({name: spec.default for name, spec in specs.items()})
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
        body = tok.lstrip("-")
        name, has_eq, raw = body.partition("=")
        spec = specs.get(name)
        if spec is None and name.startswith("no") and not has_eq:
            neg = specs.get(name[2:])
            if neg is not None and neg.kind == "bool":
                out.values[name[2:]] = False
                out.given.append(name[2:])
                continue
        if spec is None:
            if has_eq or i >= len(toks) or _is_flag(toks[i]):
                out.ignored.append(tok)
            else:
                out.ignored.append(f"{tok} {toks[i]}")
                i += 1
            continue
        if not has_eq:
            if spec.kind == "bool":
                raw = "true"
            else:
                if i >= len(toks):
                    raise FlagError(f"ERROR: flag '{name}' is missing its argument")
                raw = toks[i]
                i += 1
        out.values[name] = convert(name, spec, raw)
        out.given.append(name)
    return out


# -- common checks -------------------------------------------------------------------


def port_check(value: Any) -> Optional[str]:
    return None if 0 < value < 65536 else "not a TCP port (1-65535)"


def positive(value: Any) -> Optional[str]:
    return None if value > 0 else "must be > 0"


def non_negative(value: Any) -> Optional[str]:
    return None if value >= 0 else "must be >= 0"


def addr_check(value: Any) -> Optional[str]:
    """``host:port`` (empty allowed: the caller decides what empty means)."""
    if value == "":
        return None
    host, sep, port = str(value).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return "expected host:port"
    return None


def split_addr(value: str) -> tuple:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def one_of(*choices: str) -> Callable[[Any], Optional[str]]:
    def check(value: Any) -> Optional[str]:
        return None if value in choices else "expected one of " + ", ".join(choices)
    return check


def usage(prog: str, specs: Mapping[str, Flag]) -> str:
    lines = [f"usage: {prog} [--flag=value ...]", "", "flags the emulator uses:"]
    for name, spec in specs.items():
        lines.append(f"  --{name} ({spec.kind}, default {spec.default!r}) {spec.help}".rstrip())
    lines.append("")
    lines.append("Other flags are accepted and ignored. See pd_launcher/emulator/README.md.")
    return "\n".join(lines) + "\n"
