"""`quiesce`: wait until no client is connected to a unit's serving ports any more.

    python -m pd_launcher quiesce SPEC.json [--timeout S] [--use api] [--interval S]

After the front door stopped sending new requests to an engine (an operator drain:
docs/proxy.md, "Draining an upstream"), the requests already in flight finish on
their own. This waits for that: until no ESTABLISHED TCP connection has as its LOCAL
end one of the spec's ports whose `use` is one of --use (default: `api`, the engines'
OpenAI API port), read from /proc/net/tcp and /proc/net/tcp6 (the network namespace
of the caller: run it on the node, or in the unit's container). A port on a wildcard
host (0.0.0.0, ::) matches every local address.

Exit 0 with `drained after X.X s`, or, when the timeout is reached first, exit 0 with
`drain timeout after S s: N connections left on HOST:PORT (n), ...` (the timeout bounds
the drain; the caller proceeds); exit 1 on errors (spec unreadable, no port with that
use, /proc/net/tcp unreadable). Standard library only.
"""
from __future__ import annotations

import ipaddress
import socket
import sys
import time
from typing import Dict, Iterable, List, Optional, TextIO, Tuple

from .spec import NodeSpec

#: /proc/net/tcp `st` of an established connection
TCP_ESTABLISHED = "01"
PROC_NET = ("/proc/net/tcp", "/proc/net/tcp6")
_WILDCARD = ("", "0.0.0.0", "::", "*", "[::]")

Addr = Tuple[str, int]


def _decode(hexaddr: str) -> Tuple[Optional[ipaddress._BaseAddress], int]:
    """'0100007F:1F90' -> (127.0.0.1, 8080); IPv6 in 4 little-endian words; an
    IPv4-mapped IPv6 address comes back as the IPv4 address."""
    host, _, port = hexaddr.partition(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        ip: ipaddress._BaseAddress = ipaddress.IPv4Address(raw[::-1])
    elif len(raw) == 16:
        words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
        ip6 = ipaddress.IPv6Address(words)
        ip = ip6.ipv4_mapped or ip6
    else:
        return None, int(port, 16)
    return ip, int(port, 16)


def _local_ends(paths: Iterable[str] = PROC_NET) -> List[Tuple[ipaddress._BaseAddress, int]]:
    """Local (address, port) of every ESTABLISHED TCP connection. A missing
    /proc/net/tcp6 (no IPv6) is fine; a missing /proc/net/tcp is an OSError."""
    out = []
    for path in paths:
        try:
            with open(path, encoding="ascii") as f:
                lines = f.read().splitlines()[1:]
        except FileNotFoundError:
            if path.endswith("6"):
                continue
            raise
        for line in lines:
            fields = line.split()
            if len(fields) < 4 or fields[3] != TCP_ESTABLISHED:
                continue
            try:
                ip, port = _decode(fields[1])
            except ValueError:
                continue
            if ip is not None:
                out.append((ip, port))
    return out


def connections(ports: List[Addr], paths: Iterable[str] = PROC_NET) -> Dict[Addr, int]:
    """Established connections per (host, port) of `ports` (local end), zero counts
    included."""
    counts: Dict[Addr, int] = {p: 0 for p in ports}
    wanted: Dict[int, List[Tuple[Addr, Optional[ipaddress._BaseAddress]]]] = {}
    for host, port in ports:
        h = host.strip("[]")
        if h in _WILDCARD:
            ip = None
        else:
            try:
                ip = ipaddress.ip_address(h)
            except ValueError:
                ip = ipaddress.ip_address(socket.gethostbyname(h))
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
                ip = ip.ipv4_mapped
        wanted.setdefault(port, []).append(((host, port), ip))
    for ip, port in _local_ends(paths):
        for key, want in wanted.get(port, ()):
            if want is None or want == ip:
                counts[key] += 1
                break
    return counts


def _label(addr: Addr) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def ports_of(spec: NodeSpec, uses: List[str]) -> List[Addr]:
    return [(p.host, p.port) for _, p in spec.all_ports() if p.use in uses]


def quiesce(spec: NodeSpec, uses: List[str], timeout: float, interval: float = 0.2,
            out: TextIO = sys.stdout, paths: Iterable[str] = PROC_NET) -> int:
    """Wait (at most `timeout` s) for the connections to the spec's `uses` ports to end;
    prints the outcome, returns the exit code (0 drained or timed out, 1 error)."""
    ports = ports_of(spec, uses)
    if not ports:
        sys.stderr.write("pd-launcher quiesce: {} has no port with use {}\n".format(
            spec.source, " / ".join(uses)))
        return 1
    paths = list(paths)
    started = time.monotonic()
    deadline = started + timeout
    while True:
        try:
            counts = connections(ports, paths)
        except OSError as exc:
            sys.stderr.write(f"pd-launcher quiesce: cannot read the TCP table: {exc}\n")
            return 1
        left = {a: n for a, n in counts.items() if n}
        now = time.monotonic()
        if not left:
            out.write(f"drained after {now - started:.1f} s\n")
            out.flush()
            return 0
        if now >= deadline:
            out.write("drain timeout after {:g} s: {} connections left on {}\n".format(
                timeout, sum(left.values()),
                ", ".join(f"{_label(a)} ({n})" for a, n in left.items())))
            out.flush()
            return 0
        time.sleep(max(0.0, min(interval, deadline - now)))
