"""Find the node's RDMA NICs for FastDeploy (KVCACHE_RDMA_NICS), then exec the engine.

    python -m pd_launcher.rdma_env [--sys-root /] [--device gpu|cpu] -- PROGRAM ARGS...
    python -m pd_launcher.rdma_env --print [--sys-root /] [--device gpu|cpu]

The first form sets KVCACHE_RDMA_NICS=<comma list> and replaces itself with PROGRAM
(os.execvp: the process keeps its PID, so the launcher supervises the engine itself).
A non-empty KVCACHE_RDMA_NICS already in the environment is kept and PROGRAM is
exec'd at once, without looking at the hardware. ``--print`` prints
``KVCACHE_RDMA_NICS=...`` (always detected; the environment is not consulted).

What counts as a NIC mirrors FastDeploy's ``scripts/get_rdma_nics.sh`` (``gpu``:
RDMA devices that share a PCI root port with a GPU and whose network interface is
up; its ``cpu_ib``: those that do not), read from sysfs instead of lspci, ethtool,
ibdev2netdev and ``ip link``. An RDMA device under <sys-root>/sys/class/infiniband is
used when

* it is a PCI function (virtual devices such as rxe/siw are skipped, as the script
  skips interfaces without a PCI bus address);
* ``gpu``: its PCI root port (the bridge right below the host bridge, what the script
  takes from ``readlink /sys/bus/pci/devices/...``) is the root port of a GPU: an
  NVIDIA (vendor 0x10de) display controller (class 0x03xxxx) or any "Communication
  controller" (class 0x0780xx) - the two kinds the script's ``lspci | grep`` keeps;
  ``cpu``: it is not;
* one of its network interfaces (device/net/*, what ibdev2netdev maps) has operstate
  ``up`` (the script's ``ip link show ... | grep "state UP"``);
* and, a check the script does not make, one of its ports (ports/*/state) is ACTIVE.

The link layer (InfiniBand or Ethernet/RoCE) is not checked, as in the script.
Deliberate differences from the script: interface names are not limited to
eth*/ib*/xgbe* with consecutive numbers; ``cpu`` does not require an IPv4 address on
the interface and ignores bonds; the list is one line, in natural name order
(mlx5_2 before mlx5_10). When nothing is found, set the inventory host variable
``rdma_nics`` (the toolkit then passes KVCACHE_RDMA_NICS itself).

Exit codes: 1 no NIC found (the message names the directory searched), 2 bad
arguments, 126/127 PROGRAM cannot be executed; otherwise PROGRAM's own.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass, field

ENV_VAR = "KVCACHE_RDMA_NICS"
DEVICES = ("gpu", "cpu")
EXIT_NONE = 1
EXIT_USAGE = 2
NVIDIA_VENDOR = 0x10DE
DISPLAY_CLASS = 0x03  # base class: display controller (VGA, 3D)
COMMUNICATION_CLASS = 0x0780  # base + subclass: "Communication controller"

_ROOT_PORT = re.compile(r"/devices/pci[0-9a-fA-F]{4}:[0-9a-fA-F]{2}/([^/]+)")


@dataclass
class RdmaDevice:
    """One entry of <sys-root>/sys/class/infiniband as this module sees it."""

    name: str
    root_port: str | None  # None: not a PCI device
    netdevs: dict[str, str] = field(default_factory=dict)  # interface -> operstate
    ports: dict[str, tuple[str, str]] = field(default_factory=dict)  # port -> (state, layer)

    @property
    def link_up(self) -> bool:
        return any(state == "up" for state in self.netdevs.values())

    @property
    def port_active(self) -> bool:
        return any("ACTIVE" in state for state, _ in self.ports.values())

    def rejected(self, device: str, gpu_ports: set[str]) -> str | None:
        """Why the device is not used for `device` ("gpu"/"cpu"); None when it is."""
        if self.root_port is None:
            return "not a PCI device"
        near_gpu = self.root_port in gpu_ports
        if device == "gpu" and not near_gpu:
            return f"no GPU on its PCI root port {self.root_port}"
        if device == "cpu" and near_gpu:
            return f"a GPU shares its PCI root port {self.root_port}"
        if not self.netdevs:
            return "no network interface"
        if not self.link_up:
            names = ", ".join(f"{n} {s or '?'}" for n, s in sorted(self.netdevs.items()))
            return f"interface not up ({names})"
        if not self.port_active:
            states = ", ".join(f"port {p} {s or '?'}" for p, (s, _) in sorted(self.ports.items()))
            return f"no ACTIVE port ({states or 'no port'})"
        return None


# --------------------------------------------------------------------------- sysfs


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def _hex(text: str) -> int | None:
    try:
        return int(text, 16)
    except ValueError:
        return None


def natural_key(name: str) -> list[tuple[int, int, str]]:
    """Sort key that orders the numbers in a name by value (mlx5_2 < mlx5_10)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part)
            for part in re.split(r"(\d+)", name) if part]


def root_port(path: str) -> str | None:
    """The PCI root port of the sysfs device at `path` (resolved): the component right
    after ``devices/pciDDDD:BB``; None when it is not below a PCI host bridge."""
    m = _ROOT_PORT.search(os.path.realpath(path).replace(os.sep, "/"))
    return m.group(1) if m else None


def infiniband_dir(sys_root: str) -> str:
    return os.path.join(sys_root, "sys", "class", "infiniband")


def gpu_root_ports(sys_root: str) -> set[str]:
    """Root ports of the GPUs in <sys-root>/sys/bus/pci/devices."""
    base = os.path.join(sys_root, "sys", "bus", "pci", "devices")
    ports: set[str] = set()
    for name in _listdir(base):
        dev = os.path.join(base, name)
        vendor = _hex(_read(os.path.join(dev, "vendor")))
        cls = _hex(_read(os.path.join(dev, "class")))
        if cls is None:
            continue
        if (vendor == NVIDIA_VENDOR and cls >> 16 == DISPLAY_CLASS) or \
                cls >> 8 == COMMUNICATION_CLASS:
            port = root_port(dev)
            if port:
                ports.add(port)
    return ports


def scan(sys_root: str) -> list[RdmaDevice]:
    """Every RDMA device of <sys-root>/sys/class/infiniband, in natural name order."""
    base = infiniband_dir(sys_root)
    found: list[RdmaDevice] = []
    for name in sorted(_listdir(base), key=natural_key):
        ib = os.path.join(base, name)
        dev = os.path.join(ib, "device")
        port = root_port(dev) if os.path.isdir(dev) else None
        item = RdmaDevice(name=name, root_port=port)
        net = os.path.join(dev, "net")
        for ifname in _listdir(net):
            item.netdevs[ifname] = _read(os.path.join(net, ifname, "operstate")).lower()
        ports = os.path.join(ib, "ports")
        for num in _listdir(ports):
            item.ports[num] = (_read(os.path.join(ports, num, "state")),
                               _read(os.path.join(ports, num, "link_layer")))
        found.append(item)
    return found


def detect(sys_root: str, device: str) -> list[str]:
    """The RDMA NIC names for `device` ("gpu" or "cpu") under `sys_root`, in natural
    order; [] when there is none. ValueError for another `device`."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
    gpus = gpu_root_ports(sys_root)
    return [d.name for d in scan(sys_root) if d.rejected(device, gpus) is None]


def not_found_message(sys_root: str, device: str) -> str:
    """Why detect() found nothing: the directory, each device and its reason, the fix."""
    base = infiniband_dir(sys_root)
    devices = scan(sys_root)
    gpus = gpu_root_ports(sys_root)
    if not devices:
        why = "no RDMA device there"
    else:
        why = "; ".join(f"{d.name}: {d.rejected(device, gpus) or 'usable'}" for d in devices)
        if device == "gpu" and not gpus:
            pci = os.path.join(sys_root, "sys", "bus", "pci", "devices")
            why += f"; no GPU found in {pci}"
    return (f"no usable RDMA NIC for {device} in {base} ({why}); set the inventory host "
            f"variable rdma_nics (e.g. rdma_nics=mlx5_0,mlx5_1), which the toolkit passes "
            f"as {ENV_VAR}")


# --------------------------------------------------------------------------- command


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pd_launcher.rdma_env",
        usage="%(prog)s [--sys-root DIR] [--device gpu|cpu] -- PROGRAM ARGS...\n"
              "       %(prog)s --print [--sys-root DIR] [--device gpu|cpu]",
        description=f"Set {ENV_VAR} to the node's RDMA NICs (as FastDeploy's "
                    "get_rdma_nics.sh finds them) and exec PROGRAM.")
    p.add_argument("--sys-root", default="/", metavar="DIR",
                   help="where sys/ is (default /; tests use a fake tree)")
    p.add_argument("--device", choices=DEVICES, default="gpu",
                   help="NICs next to the GPUs (default) or the others")
    p.add_argument("--print", action="store_true", dest="print_only",
                   help=f"print {ENV_VAR}=... and exit instead of running PROGRAM")
    return p


def _err(message: str) -> None:
    sys.stderr.write(f"rdma_env: {message}\n")


def _exec(program: list[str]) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvp(program[0], program)
    except OSError as exc:
        _err(f"cannot execute {program[0]!r}: {exc.strerror or exc}")
        return 127 if isinstance(exc, FileNotFoundError) else 126
    return 0  # not reached: execvp returns only by raising


def main(argv: list[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    program: list[str] = []
    if "--" in args_in:
        cut = args_in.index("--")
        args_in, program = args_in[:cut], args_in[cut + 1:]
    parser = _parser()
    args = parser.parse_args(args_in)
    if args.print_only and program:
        parser.error("--print takes no PROGRAM")
    if not args.print_only and not program:
        parser.error("missing -- PROGRAM ARGS...")
    if not args.print_only:
        preset = os.environ.get(ENV_VAR, "").strip()
        if preset:
            return _exec(program)
    nics = detect(args.sys_root, args.device)
    if not nics:
        _err(not_found_message(args.sys_root, args.device))
        return EXIT_NONE
    line = f"{ENV_VAR}={','.join(nics)}"
    if args.print_only:
        sys.stdout.write(line + "\n")
        return 0
    os.environ[ENV_VAR] = ",".join(nics)
    _err(f"{line} (detected, {args.device})")
    return _exec(program)


if __name__ == "__main__":
    sys.exit(main())
