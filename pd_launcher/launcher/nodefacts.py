"""Node-local facts and checks: the NIC holding an IP, paths, devices, commands, free ports.

Every check returns a list of error strings (empty = fine) so that all problems
are reported at once, before anything is started.
"""
from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import struct
import subprocess
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from ..nodeutil import port_problem
from .spec import NodeSpec

# (interface, address, prefix length); the interface is the device name (labels
# such as "eth0:1" are reduced to "eth0": *_SOCKET_IFNAME wants the device).
Addr = Tuple[str, str, int]

SIOCGIFCONF = 0x8912
SIOCGIFNETMASK = 0x891B


def _addrs_from_ip_cmd() -> Optional[List[Addr]]:
    ip = shutil.which("ip") or next(
        (p for p in ("/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip") if os.path.exists(p)),
        None,
    )
    if not ip:
        return None
    try:
        out = subprocess.run([ip, "-o", "addr", "show"], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    addrs: List[Addr] = []
    for line in out.decode("utf-8", "replace").splitlines():
        # "1: lo    inet 127.0.0.1/8 scope host lo\       valid_lft ..."
        fields = line.split()
        if len(fields) < 4 or fields[2] not in ("inet", "inet6"):
            continue
        dev = fields[1].split("@", 1)[0]
        addr, _, plen = fields[3].partition("/")
        try:
            addrs.append((dev, addr, int(plen) if plen else (32 if ":" not in addr else 128)))
        except ValueError:
            continue
    return addrs


def _addrs_from_ioctl() -> List[Addr]:
    """IPv4 addresses via SIOCGIFCONF/SIOCGIFNETMASK (no `ip` binary needed)."""
    import array
    import fcntl

    addrs: List[Addr] = []
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        ifreq_size = 40 if struct.calcsize("P") == 8 else 32  # sizeof(struct ifreq)
        count = 128
        while True:
            buf = array.array("B", b"\0" * (ifreq_size * count))
            addr, _ = buf.buffer_info()
            ifconf = struct.pack("iL", len(buf), addr)
            res = fcntl.ioctl(sock.fileno(), SIOCGIFCONF, ifconf)
            used = struct.unpack("iL", res)[0]
            if used < len(buf) or count >= 8192:
                break
            count *= 4
        data = buf.tobytes()[:used]
        for off in range(0, used, ifreq_size):
            label = data[off:off + 16].split(b"\0", 1)[0].decode("utf-8", "replace")
            ip = socket.inet_ntoa(data[off + 20:off + 24])
            try:
                req = struct.pack(f"16s{ifreq_size - 16}x", label.encode())
                mask_raw = fcntl.ioctl(sock.fileno(), SIOCGIFNETMASK, req)
                mask = socket.inet_ntoa(mask_raw[20:24])
                plen = ipaddress.IPv4Network("0.0.0.0/" + mask).prefixlen
            except OSError:
                plen = 32
            addrs.append((label.split(":", 1)[0], ip, plen))
    finally:
        sock.close()
    return addrs


def _addrs_from_if_inet6() -> List[Addr]:
    addrs: List[Addr] = []
    try:
        with open("/proc/net/if_inet6", encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return addrs
    for line in lines:
        fields = line.split()
        if len(fields) < 6:
            continue
        raw = fields[0]
        addr = ":".join(raw[i:i + 4] for i in range(0, 32, 4))
        addrs.append((fields[5], str(ipaddress.IPv6Address(addr)), int(fields[2], 16)))
    return addrs


def list_addresses() -> List[Addr]:
    """Every (interface, address, prefix) on this node."""
    addrs = _addrs_from_ip_cmd()
    if addrs is None:
        try:
            addrs = _addrs_from_ioctl()
        except (OSError, ImportError, struct.error):
            addrs = []
        addrs += _addrs_from_if_inet6()
    return addrs


def find_nic(ip: str, addrs: Optional[Sequence[Addr]] = None) -> str:
    """Name of the interface holding `ip`.

    An exact address match wins; otherwise the interface whose address/prefix
    contains `ip` (longest prefix), so 127.0.1.5 belongs to `lo` (127.0.0.1/8).
    Raises LookupError with the addresses seen when nothing matches.
    """
    try:
        target = ipaddress.ip_address(ip)
    except ValueError as exc:
        raise LookupError(f"{ip!r} is not an IP address") from exc
    if addrs is None:
        addrs = list_addresses()
    best: Optional[Tuple[int, str]] = None
    for dev, addr, plen in addrs:
        try:
            net = ipaddress.ip_network(f"{addr}/{plen}", strict=False)
            a = ipaddress.ip_address(addr)
        except ValueError:
            continue
        if a.version != target.version:
            continue
        if a == target:
            return dev
        if target in net and (best is None or plen > best[0]):
            best = (plen, dev)
    if best is not None:
        return best[1]
    seen = ", ".join(f"{d}={a}/{n}" for d, a, n in addrs) or "none"
    raise LookupError(f"no interface holds {ip} (addresses on this node: {seen})")


def check_paths(paths: Iterable[str], what: str = "path") -> List[str]:
    return [f"{what} {p} does not exist" for p in paths if not os.path.exists(p)]


def resolve_command(prog: str, env: Optional[Dict[str, str]] = None) -> Optional[str]:
    """Absolute path of `prog` (as exec would find it with env's PATH), None if missing."""
    if "/" in prog:
        return prog if os.path.isfile(prog) and os.access(prog, os.X_OK) else None
    path = (env or os.environ).get("PATH", os.defpath)
    return shutil.which(prog, path=path)


def check_commands(spec: NodeSpec, base_env: Optional[Dict[str, str]] = None) -> List[str]:
    """checks.commands, argv[0] of every pre_start command and of every process."""
    base = dict(os.environ if base_env is None else base_env)
    errors: List[str] = []
    wanted: List[Tuple[str, str, Dict[str, str]]] = []
    for c in spec.check_commands:
        wanted.append((c, "checks.commands", base))
    for i, argv in enumerate(spec.pre_start):
        wanted.append((argv[0], f"pre_start[{i}]", base))
    for p in spec.processes:
        env = dict(base)
        env.update(p.env)
        wanted.append((p.argv[0], f"process {p.name}", env))
    seen = set()
    for prog, where, env in wanted:
        key = (prog, env.get("PATH"))
        if key in seen and where == "checks.commands":
            continue
        if resolve_command(prog, env) is None:
            errors.append("command {!r} ({}) not found{}".format(
                prog, where, "" if "/" in prog else " on PATH"))
        seen.add(key)
    return errors


def check_ports(spec: NodeSpec) -> List[str]:
    """Every port of the spec must be bindable now (``nodeutil.port_problem``: the same
    test as the pd_preflight module, naming the holder of a busy port when it can)."""
    errors: List[str] = []
    for name, port in spec.all_ports():
        err = port_problem(port.host, port.port)
        if err:
            use = ", " + port.use if port.use else ""
            errors.append(f"{err} (process {name}{use})")
    return errors


def resolve_nic(spec: NodeSpec) -> Tuple[Optional[str], List[str]]:
    """(NIC name, errors). The name is None when the spec needs no NIC."""
    if spec.nic is None:
        return None, []
    if spec.nic.name:
        if not os.path.exists(f"/sys/class/net/{spec.nic.name}") and os.path.isdir(
                "/sys/class/net"):
            return spec.nic.name, [f"nic.name: interface {spec.nic.name!r} does not exist "
                                   "on this node"]
        return spec.nic.name, []
    try:
        return find_nic(spec.nic.ip), []
    except LookupError as exc:
        return None, [f"nic.ip: {exc}"]


def check_node(spec: NodeSpec) -> Tuple[Optional[str], List[str]]:
    """Run every node check; return (NIC name, all errors)."""
    nic, errors = resolve_nic(spec)
    errors += check_paths(spec.check_paths, "path")
    errors += check_paths(spec.check_devices, "device")
    errors += check_commands(spec)
    errors += check_ports(spec)
    return nic, errors
