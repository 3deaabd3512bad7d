"""HCCL rank tables (v1.0 JSON) for instances that span several Ascend hosts.

Pure functions, also used by the controller (standard library only):

    parse_hccn(text, path="/etc/hccn.conf") -> {device id: device IP}
    build_rank_table([(server_ip, [(device_id, device_ip), ...]), ...]) -> dict
    render(table) -> str

Commands:

    python -m pd_launcher.ranktable exchange --etcd ENDPOINT --prefix KEYPREFIX
        --server-ip IP --devices 0,1,2 --servers IP1,IP2 --hccn /etc/hccn.conf
        --out FILE [--timeout 300] [--interval 0.5]
    python -m pd_launcher.ranktable build --out FILE --server IP=DEV:DEVIP,DEV:DEVIP ...
    python -m pd_launcher.ranktable hccn --hccn FILE [--devices 0,1]

``exchange`` is the pre-start step of every host of a multi-host instance: it reads
this host's device IPs from hccn.conf, publishes them in etcd as
``<KEYPREFIX><server-ip>`` = ``[["0", "29.1.1.1"], ...]`` under a lease of
timeout + 600 s (data of older runs expires; late peers can still read it), waits
until every server of --servers has published, then writes the table (servers in
--servers order, ranks counted across them) atomically with mode 0644. Put a
per-deployment token in KEYPREFIX to never read a previous run's data.
``build`` writes a table from the command line (``--out -``: standard output).
``hccn`` prints ``DEVICE IP`` lines for the devices (all when --devices is omitted).

Exit codes: 0 ok; 1 failure (servers never published before --timeout, devices
missing from hccn.conf, unreadable file, bad data from a peer, etcd errors); 2 bad
arguments.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import math
import re
import sys
import time
from typing import Any, Sequence

from pd_launcher.etcd_gateway import EtcdError, EtcdGateway
from pd_launcher.nodeutil import atomic_write

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2
LEASE_MARGIN_S = 600
TABLE_VERSION = "1.0"

_ADDRESS = re.compile(r"^address_(?P<dev>\d+)\s*=\s*(?P<ip>\S+)$")

Devices = Sequence[tuple[Any, Any]]


# --------------------------------------------------------------------------- pure


def _ipv4(text: str) -> str:
    """`text` as a canonical IPv4 address; ValueError when it is not one."""
    return str(ipaddress.IPv4Address(text.strip()))


def parse_hccn(text: str, path: str = "/etc/hccn.conf") -> dict[int, str]:
    """The device IPs of an hccn.conf: {device id: IP} from its ``address_<dev>=<ip>``
    lines. netmask_/gateway_/other keys, comments and blank lines are ignored.

    ValueError naming `path` and the line for a malformed address line, a bad IPv4
    address or a device listed twice.
    """
    found: dict[int, str] = {}
    seen_at: dict[int, int] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line.startswith("address_"):
            continue
        where = f"{path} line {lineno}"
        m = _ADDRESS.match(line)
        if not m:
            raise ValueError(f"{where}: malformed address line {line!r} "
                             "(expected address_<device>=<IPv4>)")
        try:
            ip = _ipv4(m.group("ip"))
        except ValueError:
            raise ValueError(f"{where}: bad IPv4 address {m.group('ip')!r} in "
                             f"{line!r}") from None
        dev = int(m.group("dev"))
        if dev in found:
            raise ValueError(f"{where}: device {dev} already has an address "
                             f"(line {seen_at[dev]})")
        found[dev], seen_at[dev] = ip, lineno
    return found


def _check_devices(server: str, devices: Devices, seen_ips: dict[str, str]) -> None:
    ids: set[str] = set()
    if not devices:
        raise ValueError(f"server {server} has no devices")
    for dev, ip in devices:
        dev_id = str(dev).strip()
        if not dev_id.isdigit():
            raise ValueError(f"server {server}: bad device id {dev!r} (expected a number)")
        if dev_id in ids:
            raise ValueError(f"server {server}: device {dev_id} listed twice")
        ids.add(dev_id)
        try:
            dev_ip = _ipv4(str(ip))
        except ValueError:
            raise ValueError(f"server {server} device {dev_id}: bad IPv4 address "
                             f"{ip!r}") from None
        if dev_ip in seen_ips:
            raise ValueError(f"device IP {dev_ip} of server {server} device {dev_id} is "
                             f"also {seen_ips[dev_ip]}")
        seen_ips[dev_ip] = f"server {server} device {dev_id}"


def build_rank_table(servers: Sequence[tuple[str, Devices]]) -> dict[str, Any]:
    """The HCCL rank table v1.0 for `servers` = [(server_ip, [(device_id, device_ip),
    ...]), ...] in rank order: ranks are counted across servers in that order.

    Every value is a string. ValueError for no servers, a server listed twice, a
    server without devices, a device listed twice, a bad or duplicate device IP.
    """
    if not servers:
        raise ValueError("a rank table needs at least one server")
    seen_servers: set[str] = set()
    seen_ips: dict[str, str] = {}
    server_list: list[dict[str, Any]] = []
    rank = 0
    for server, devices in servers:
        server = str(server).strip()
        if not server:
            raise ValueError("empty server id")
        if server in seen_servers:
            raise ValueError(f"server {server} listed twice")
        seen_servers.add(server)
        _check_devices(server, devices, seen_ips)
        entries = []
        for dev, ip in devices:
            entries.append({"device_id": str(dev).strip(), "device_ip": _ipv4(str(ip)),
                            "rank_id": str(rank)})
            rank += 1
        server_list.append({"server_id": server, "device": entries})
    return {"version": TABLE_VERSION, "server_count": str(len(server_list)),
            "server_list": server_list, "status": "completed"}


def render(table: dict[str, Any]) -> str:
    """Stable JSON text: field order kept, indent 2, trailing newline."""
    return json.dumps(table, indent=2) + "\n"


# --------------------------------------------------------------------------- helpers


def read_hccn(path: str) -> dict[int, str]:
    """parse_hccn of a file; OSError/ValueError messages name the file."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as exc:
        raise OSError(f"cannot read {path}: {exc.strerror or exc}") from None
    return parse_hccn(text, path)


def select_devices(ips: dict[int, str], devices: Sequence[str],
                   path: str) -> list[tuple[str, str]]:
    """[(device id, IP)] for `devices`; ValueError naming `path` and every missing id."""
    missing = [d for d in devices if int(d) not in ips]
    if missing:
        raise ValueError(f"{path} has no address_<device> line for device(s) "
                         f"{', '.join(missing)} (it lists {_listed(ips)})")
    return [(str(int(d)), ips[int(d)]) for d in devices]


def _listed(ips: dict[int, str]) -> str:
    return ", ".join(str(d) for d in sorted(ips)) or "no device"


def decode_published(server: str, value: str) -> list[tuple[str, str]]:
    """A peer's published value (JSON [[device_id, device_ip], ...]); ValueError."""
    try:
        data = json.loads(value)
    except ValueError:
        data = None
    ok = isinstance(data, list) and data and all(
        isinstance(x, list) and len(x) == 2 and all(isinstance(y, str) for y in x)
        for x in data)
    if not ok:
        raise ValueError(f"server {server} published {value[:200]!r}, expected a JSON "
                         "list of [device_id, device_ip]")
    return [(x[0], x[1]) for x in data]


def _write(out: str, text: str) -> None:
    if out == "-":
        sys.stdout.write(text)
    else:
        atomic_write(out, text.encode("utf-8"), 0o644)


# --------------------------------------------------------------------------- arguments


class _Usage(Exception):
    pass


def _csv(text: str, what: str) -> list[str]:
    items = [x.strip() for x in text.split(",")]
    if not text.strip() or any(not x for x in items):
        raise _Usage(f"{what}: expected a comma-separated list, got {text!r}")
    dups = sorted({x for x in items if items.count(x) > 1})
    if dups:
        raise _Usage(f"{what}: listed twice: {', '.join(dups)}")
    return items


def _device_ids(text: str) -> list[str]:
    ids = _csv(text, "--devices")
    bad = [d for d in ids if not d.isdigit()]
    if bad:
        raise _Usage(f"--devices: not a device number: {', '.join(bad)}")
    return [str(int(d)) for d in ids]


def _server_spec(text: str) -> tuple[str, list[tuple[str, str]]]:
    """``IP=DEV:DEVIP,DEV:DEVIP`` of ``build --server``."""
    server, sep, rest = text.partition("=")
    pairs = [p.partition(":") for p in rest.split(",")] if sep else []
    if not server.strip() or not pairs or any(not d or not s or not ip for d, s, ip in pairs):
        raise _Usage(f"--server: expected IP=DEV:DEVIP,DEV:DEVIP, got {text!r}")
    return server.strip(), [(d.strip(), ip.strip()) for d, _, ip in pairs]


def _seconds(text: str) -> float:
    try:
        val = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if val <= 0 or math.isinf(val) or math.isnan(val):
        raise argparse.ArgumentTypeError(f"must be a positive number: {text!r}")
    return val


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pd_launcher.ranktable",
                                description="HCCL rank tables for multi-host instances.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{exchange,build,hccn}")
    ex = sub.add_parser("exchange", help="publish this host's device IPs in etcd, wait "
                        "for every server's, write the rank table")
    ex.add_argument("--etcd", required=True, metavar="ENDPOINT")
    ex.add_argument("--prefix", required=True, metavar="KEYPREFIX")
    ex.add_argument("--server-ip", required=True, metavar="IP")
    ex.add_argument("--devices", required=True, metavar="0,1,2")
    ex.add_argument("--servers", required=True, metavar="IP1,IP2")
    ex.add_argument("--hccn", default="/etc/hccn.conf", metavar="FILE")
    ex.add_argument("--out", required=True, metavar="FILE")
    ex.add_argument("--timeout", type=_seconds, default=300.0, metavar="S")
    ex.add_argument("--interval", type=_seconds, default=0.5, metavar="S")
    bd = sub.add_parser("build", help="write a rank table given on the command line")
    bd.add_argument("--out", required=True, metavar="FILE", help="'-': standard output")
    bd.add_argument("--server", required=True, action="extend", nargs="+",
                    metavar="IP=DEV:DEVIP,DEV:DEVIP")
    hc = sub.add_parser("hccn", help="print device IPs from an hccn.conf")
    hc.add_argument("--hccn", default="/etc/hccn.conf", metavar="FILE")
    hc.add_argument("--devices", metavar="0,1", help="default: every device of the file")
    return p


# --------------------------------------------------------------------------- commands


def _err(message: str) -> None:
    sys.stderr.write(f"ranktable: {message}\n")


def cmd_hccn(args: argparse.Namespace) -> int:
    ips = read_hccn(args.hccn)
    devices = _device_ids(args.devices) if args.devices else [str(d) for d in sorted(ips)]
    for dev, ip in select_devices(ips, devices, args.hccn):
        sys.stdout.write(f"{dev} {ip}\n")
    return EXIT_OK


def cmd_build(args: argparse.Namespace) -> int:
    servers = [_server_spec(s) for s in args.server]
    table = build_rank_table(servers)
    _write(args.out, render(table))
    if args.out != "-":
        print(_summary(args.out, table))
    return EXIT_OK


def _summary(out: str, table: dict[str, Any]) -> str:
    ranks = sum(len(s["device"]) for s in table["server_list"])
    names = ", ".join(s["server_id"] for s in table["server_list"])
    return f"rank table {out}: {table['server_count']} server(s), {ranks} rank(s) ({names})"


def _publish(gw: EtcdGateway, key: str, value: str, ttl: int, deadline: float,
             interval: float) -> None:
    """Put `key` under a new lease, retrying while etcd fails until `deadline`
    (the first failure is reported once, the last one raised)."""
    told = False
    while True:
        try:
            gw.put(key, value, lease=gw.grant(ttl))
            return
        except EtcdError as exc:
            if time.monotonic() + interval > deadline:
                raise
            if not told:
                _err(f"{exc}; retrying until the timeout")
                told = True
        time.sleep(interval)


def _poll(gw: EtcdGateway, prefix: str, servers: list[str],
          found: dict[str, list[tuple[str, str]]]) -> None:
    """Add to `found` every server of `servers` that has published under `prefix`."""
    keys = gw.range_prefix(prefix)
    for server in servers:
        value = keys.get(prefix + server)
        if server not in found and value is not None:
            found[server] = decode_published(server, value)


def _wait_all(gw: EtcdGateway, prefix: str, servers: list[str], deadline: float,
              interval: float) -> dict[str, list[tuple[str, str]]]:
    found: dict[str, list[tuple[str, str]]] = {}
    last_error = ""
    while True:
        try:
            _poll(gw, prefix, servers, found)
            last_error = ""
        except EtcdError as exc:
            last_error = str(exc)
        if len(found) == len(servers):
            return found
        if time.monotonic() >= deadline:
            raise TimeoutError(_timeout_message(gw, prefix, servers, found, last_error))
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))


def _timeout_message(gw: EtcdGateway, prefix: str, servers: list[str],
                     found: dict[str, Any], last_error: str) -> str:
    never = [s for s in servers if s not in found]
    msg = (f"server(s) {', '.join(never)} never published their device IPs under "
           f"{prefix!r} in etcd {gw.endpoint}")
    if found:
        msg += f" (published: {', '.join(s for s in servers if s in found)})"
    if last_error:
        msg += f"; last etcd error: {last_error}"
    return msg


def cmd_exchange(args: argparse.Namespace) -> int:
    servers = _csv(args.servers, "--servers")
    if args.server_ip not in servers:
        raise _Usage(f"--server-ip {args.server_ip} is not in --servers {args.servers}")
    devices = _device_ids(args.devices)
    try:
        gw = EtcdGateway(args.etcd, timeout=min(5.0, args.timeout))
    except EtcdError as exc:
        raise _Usage(str(exc)) from None
    mine = select_devices(read_hccn(args.hccn), devices, args.hccn)
    started = time.monotonic()
    deadline = started + args.timeout
    ttl = int(math.ceil(args.timeout)) + LEASE_MARGIN_S
    key = args.prefix + args.server_ip
    try:
        _publish(gw, key, json.dumps(mine), ttl, deadline, args.interval)
    except EtcdError as exc:
        _err(f"timed out after {args.timeout:g}s: could not publish {key!r}: {exc}")
        return EXIT_FAIL
    try:
        found = _wait_all(gw, args.prefix, servers, deadline, args.interval)
    except TimeoutError as exc:
        _err(f"timed out after {args.timeout:g}s: {exc}")
        return EXIT_FAIL
    found[args.server_ip] = mine  # what this host read, not a stale copy
    table = build_rank_table([(s, found[s]) for s in servers])
    _write(args.out, render(table))
    waited = time.monotonic() - started
    print(_summary(args.out, table) + f", after {waited:.1f}s")
    return EXIT_OK


COMMANDS = {"exchange": cmd_exchange, "build": cmd_build, "hccn": cmd_hccn}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.cmd](args)
    except _Usage as exc:
        _err(str(exc))
        return EXIT_USAGE
    except (OSError, ValueError, EtcdError) as exc:
        _err(str(exc))
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
