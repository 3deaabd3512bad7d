"""The one model of the cluster: inventory data -> validated ClusterPlan.

Pure: takes the groups and hostvars Ansible has, returns a ClusterPlan or raises
PlanInvalid with every error found (each naming the host and the field). The
engine-neutral arithmetic of pd-deploy lives here: instances and their masters, DP
ranks, device slices, API/RPC/KV port ranges, upstream lists and clash checks. What
differs per engine (defaults, rules, processes) is asked of the instance's backend
(pd_deploy/engines/, docs/engines.md).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from pd_deploy.settings import (
    BALANCE_POLICIES,
    DP_MODES,
    PER_RANK_API_MODES,
    PlanError,
    PlanInvalid,
    Reader,
    declared,
    unknown_variable,
)
from pd_launcher.launcher.spec import RESTART_POLICIES, RestartPolicy

if TYPE_CHECKING:  # pragma: no cover (the backends import this module)
    from pd_deploy.engines.base import Backend

ROLES = ("P", "D")
# non-pd_ inventory variables the planner reads
HOST_KEYS = ("ansible_host", "host_ip", "node_ip", "devices", "nic", "device_ips",
             "rdma_nics")
FRONT_DOORS = ("nginx", "none")
INSTANCE_WIDE = ("pd_engine", "pd_emulate", "pd_dp_mode", "pd_tp", "pd_model_path")


@dataclass
class Rank:
    rank: int  # global DP rank within the instance
    local: int  # index among the node's ranks
    devices: list[str]
    api_port: int | None  # external DP: every rank; internal: only local 0 on the master
    kv_port: int  # KV side-channel port of this rank (Mooncake: base + rank*tp; NIXL: base + rank)


@dataclass
class Node:
    host: str
    role: str
    ip: str
    bind: str
    instance: str
    master: bool
    devices: list[str]
    nic: str | None
    start_rank: int
    ranks: list[Rank]
    python: str
    base_dir: str
    grace: int
    restart: RestartPolicy | None = None  # pd_restart_* of the host


@dataclass
class Instance:
    name: str
    role: str
    master: str
    master_ip: str
    hosts: list[str]
    engine: str  # the pd_engine value; the backend is ClusterPlan.backend
    dp_mode: str
    tp: int
    dp_size: int
    model_path: str
    served_model_name: str
    api_port: int
    dp_rpc_port: int
    kv_port: int
    extra_args: list[str]
    env: dict[str, str]
    opts: dict[str, Any] = field(default_factory=dict)  # the backend's instance settings

    @property
    def engine_id(self) -> str:
        return self.name


@dataclass
class ProxyHost:
    host: str
    ip: str
    bind: str
    port: int
    admin_port: int  # the proxy agent (metrics, health, active checks)
    python: str
    base_dir: str
    grace: int
    restart: RestartPolicy | None = None  # pd_restart_* of the host

    @property
    def listen(self) -> str:
        return f"{self.bind}:{self.port}"


@dataclass
class ClusterPlan:
    cluster: str
    backend: Backend
    options: dict[str, Any]  # the backend's cluster settings
    instances: list[Instance]
    nodes: dict[str, Node]
    proxies: list[ProxyHost]
    proxy_options: dict[str, Any]
    front_door: str = "nginx"
    engine_api_key: str | None = field(default=None, repr=False)

    def instance(self, name: str) -> Instance:
        return next(i for i in self.instances if i.name == name)

    def shape(self, role: str) -> tuple[int, int]:
        """(dp_size, tp) of the role's first instance."""
        first = next(i for i in self.instances if i.role == role)
        return first.dp_size, first.tp

    def upstreams(self, role: str) -> list[str]:
        """host:port of every API-serving rank of the role's instances, in plan order."""
        return _upstreams(role, self.instances, self.nodes)

    @property
    def prefill_upstreams(self) -> list[str]:
        return self.upstreams("P")

    @property
    def decode_upstreams(self) -> list[str]:
        return self.upstreams("D")


# ---------------------------------------------------------------- helpers


def _parse_devices(r: Reader) -> list[str] | None:
    value = r.vars.get("devices") if hasattr(r.vars, "get") else None
    if value is None or value == "":
        count = r.integer("pd_devices_per_node", 1, 1024)
        return [str(i) for i in range(count)] if count else None
    items: list[Any]
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",")]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        items = [value]
    else:
        r.fail("devices", f"must be a comma-separated string or a list, got {value!r}")
        return None
    out: list[str] = []
    for item in items:
        text = str(item).strip()
        if isinstance(item, bool) or not text.isdigit():
            r.fail("devices", f"malformed device id {item!r} (expected non-negative integers)")
            return None
        if str(int(text)) in out:
            r.fail("devices", f"device id {int(text)} listed twice")
            return None
        out.append(str(int(text)))
    if not out:
        r.fail("devices", "no device ids")
        return None
    return out


def version_tuple(text: str) -> tuple[int, ...] | None:
    """(major, minor[, patch]) of a release version "[v]X.Y[.Z][.postN]"; None for anything
    else, pre-releases included ("0.23.0rc1" is not 0.23.1)."""
    pieces = str(text).strip().removeprefix("v").split(".")
    if len(pieces) == 4 and pieces[3].startswith("post") and pieces[3][4:].isdigit():
        pieces = pieces[:3]
    if not 2 <= len(pieces) <= 3 or not all(p.isdigit() for p in pieces):
        return None
    return tuple(int(p) for p in pieces)


def _own_flag(arg: str, owned: tuple[str, ...]) -> str | None:
    name = arg.split("=", 1)[0]
    return name if name in owned else None


@dataclass
class _HostIn:
    host: str
    role: str
    r: Reader
    ip: str | None
    master_ip: str | None


# ---------------------------------------------------------------- build


def build_plan(
    groups: Mapping[str, Sequence[str]], hostvars: Mapping[str, Mapping[str, Any]]
) -> ClusterPlan:
    errors: list[PlanError] = []
    groups = {k: list(v or []) for k, v in groups.items()}
    for g in ("P", "D", "C"):
        if not groups.get(g):
            errors.append(PlanError(None, f"groups.{g}", f"group {g} is empty or missing"))
    for host in sorted(set(groups.get("P", [])) & set(groups.get("D", []))):
        errors.append(PlanError(host, "groups", "host is in both P and D"))

    readers = {h: Reader(h, hostvars.get(h, {}) or {}, errors) for h in _all_hosts(groups)}
    _check_declared(readers)
    cluster_r = readers[next(iter(readers))] if readers else Reader("cluster", {}, errors)
    cluster = cluster_r.text("pd_cluster_name") or "pd"
    front_door = cluster_r.text("pd_front_door", FRONT_DOORS) or "nginx"
    backend = _cluster_backend(groups, readers, cluster_r)
    options = backend.cluster_options(cluster_r) if backend else {}

    node_ips: dict[str, str] = {}
    for host, r in readers.items():
        ansible_host = r.raw("ansible_host") or host
        ip = r.ip("node_ip", r.raw("node_ip") or ansible_host)
        if ip:
            node_ips[host] = ip

    instances: list[Instance] = []
    nodes: dict[str, Node] = {}
    for role in ROLES:
        hosts = groups.get(role, [])
        members = [_HostIn(h, role, readers[h], node_ips.get(h),
                           readers[h].ip("host_ip") or node_ips.get(h)) for h in hosts]
        instances += _group_instances(role, members, nodes, errors, backend)
    _check_shared_machines(groups, node_ips, nodes, readers)

    proxies = [_proxy_host(h, readers[h], node_ips.get(h)) for h in groups.get("C", [])]
    proxies = [p for p in proxies if p is not None]
    if backend is not None:
        _assign_kv_ports(instances, nodes, readers, cluster_r, backend)
        _check_ports(instances, nodes, proxies if front_door != "none" else [], readers,
                     backend)

    if backend is None or not groups.get("C"):
        raise PlanInvalid(_dedupe(errors))
    proxy_r = readers[groups["C"][0]]
    plan = ClusterPlan(
        cluster=cluster,
        backend=backend,
        options=options,
        instances=instances,
        nodes=nodes,
        proxies=proxies,
        proxy_options=proxy_options(proxy_r),
        front_door=front_door,
        engine_api_key=cluster_r.raw("pd_engine_api_key"),
    )
    backend.validate(plan, readers)  # also on a plan with errors: report them all at once
    if not errors:
        _check_service_ports(plan, readers)
    if errors:
        raise PlanInvalid(_dedupe(errors))
    return plan


def _all_hosts(groups: Mapping[str, list[str]]) -> list[str]:
    seen: list[str] = []
    for g in ("P", "D", "C"):
        for h in groups.get(g, []):
            if h not in seen:
                seen.append(h)
    return seen


def _dedupe(errors: list[PlanError]) -> list[PlanError]:
    out: list[PlanError] = []
    for e in errors:
        if e not in out:
            out.append(e)
    return out


def _check_declared(readers: Mapping[str, Reader]) -> None:
    """A pd_ variable no backend, core table or role declares is a typo or a knob that
    does not exist: an error naming the host, the variable and the closest known name
    (once per variable; the other hosts that have it are listed)."""
    known = declared()
    where: dict[str, list[str]] = {}
    for host, r in readers.items():
        names = r.vars.keys() if hasattr(r.vars, "keys") else ()
        for name in sorted(str(n) for n in names):
            if name.startswith("pd_") and name not in known:
                where.setdefault(name, []).append(host)
    for name, hosts in where.items():
        also = ""
        if len(hosts) > 1:
            shown = ", ".join(hosts[1:6]) + (", ..." if len(hosts) > 6 else "")
            also = f" (also set for {shown})"
        readers[hosts[0]].fail(name, unknown_variable(name) + also)


def _engine_backend(r: Reader) -> tuple[str, Backend] | None:
    """(pd_engine, its backend) of a host; the emulator's backend is the one of the
    engine it emulates (pd_emulate)."""
    from pd_deploy.engines import EMULATOR, backend_for, emulated_names, engine_names

    engine = r.text("pd_engine", engine_names())
    if engine is None:
        return None
    if engine == EMULATOR:
        emulate = r.text("pd_emulate", emulated_names())
        if emulate is None:
            return None
        return f"{engine} ({emulate})", backend_for(engine, emulate)
    return engine, backend_for(engine)


def _cluster_backend(groups: Mapping[str, list[str]], readers: Mapping[str, Reader],
                     cluster_r: Reader) -> Backend | None:
    """The one backend of the cluster: every P/D host's pd_engine must belong to it."""
    chosen: tuple[Backend, str, str] | None = None
    for host in groups.get("P", []) + groups.get("D", []):
        r = readers[host]
        found = _engine_backend(r)
        if found is None:
            continue
        engine, backend = found
        if chosen is None:
            chosen = (backend, host, engine)
        elif backend is not chosen[0]:
            r.fail("pd_engine", f"{engine!r} needs the {backend.name} backend but {chosen[1]} "
                   f"runs {chosen[2]!r} ({chosen[0].name}); one cluster runs one engine family")
    if chosen is None:
        found = _engine_backend(cluster_r)
        return found[1] if found else None
    return chosen[0]


def _check_shared_machines(
    groups: Mapping[str, list[str]], node_ips: dict[str, str], nodes: Mapping[str, Node],
    readers: Mapping[str, Reader],
) -> None:
    """Several inventory hosts may share one machine (node_ip), as the guides' one-host
    1P1D layouts do, when their devices do not overlap (ports: _check_ports)."""
    owner: dict[tuple[str, str], str] = {}
    for host in _all_hosts({"P": groups.get("P", []), "D": groups.get("D", [])}):
        ip, node = node_ips.get(host), nodes.get(host)
        if ip is None or node is None:
            continue
        taken = sorted({owner[(ip, d)] for d in node.devices if (ip, d) in owner},
                       key=list(owner.values()).index)
        for other in taken:
            shared = [d for d in node.devices if owner.get((ip, d)) == other]
            readers[host].fail("devices", f"device(s) {','.join(shared)} on {ip} are also "
                               f"used by {other}, which shares this node IP")
        for d in node.devices:
            owner.setdefault((ip, d), host)


def _group_instances(
    role: str, members: list[_HostIn], nodes: dict[str, Node], errors: list[PlanError],
    backend: Backend | None,
) -> list[Instance]:
    by_ip: dict[str, list[_HostIn]] = {}
    for m in members:
        if m.ip:
            by_ip.setdefault(m.ip, []).append(m)
    order: list[str] = []
    grouped: dict[str, list[_HostIn]] = {}
    for m in members:
        if m.master_ip is None or m.ip is None:
            continue
        if m.master_ip == m.ip:
            master = m  # its own master (another host may share the machine)
        elif m.master_ip not in by_ip:
            m.r.fail("host_ip", f"{m.master_ip} is not the IP of any host in group {role}")
            continue
        else:
            masters = [c for c in by_ip[m.master_ip] if c.master_ip == c.ip]
            if not masters:
                other = by_ip[m.master_ip][0]
                m.r.fail("host_ip", f"instance {m.master_ip} has no master: {other.host} has "
                         f"that IP but its own host_ip is {other.master_ip}")
                continue
            if len(masters) > 1:
                m.r.fail("host_ip", f"{m.master_ip} is the IP of several masters in group "
                         f"{role} ({', '.join(c.host for c in masters)}); an instance that "
                         "spans machines needs a master with a machine of its own")
                continue
            master = masters[0]
        if master.host not in grouped:
            order.append(master.host)
            grouped[master.host] = []
        grouped[master.host].append(m)

    instances = []
    for index, master_host in enumerate(order, start=1):
        members_i = grouped[master_host]
        # the master first, the others in inventory order
        members_i.sort(key=lambda m: m.host != master_host)
        inst = _instance(f"{role}{index}", role, members_i, nodes, backend)
        if inst:
            instances.append(inst)
    return instances


def _instance(
    name: str, role: str, members: list[_HostIn], nodes: dict[str, Node],
    backend: Backend | None,
) -> Instance | None:
    from pd_deploy.engines import engine_names

    mr = members[0].r
    engine = mr.text("pd_engine", engine_names())
    found = _engine_backend(mr)
    dp_mode = mr.text("pd_dp_mode", DP_MODES)
    if dp_mode and found is not None and dp_mode not in found[1].dp_modes:
        mr.fail("pd_dp_mode", f"{dp_mode!r} is not supported by the {found[1].title} backend "
                f"(it plans {', '.join(found[1].dp_modes)})")
        dp_mode = None
    tp = mr.integer("pd_tp", 1, 1024)
    model = mr.text("pd_model_path")
    if not model:
        mr.fail("pd_model_path", "is required (the model directory on the nodes)")
    default_name = os.path.basename(model.rstrip("/")) if model else ""
    served = mr.text("pd_served_model_name") or default_name
    api_port = mr.port("pd_api_port")
    rpc_port = mr.port("pd_dp_rpc_port")
    opts = None
    if backend is not None and found is not None and found[1] is backend:
        opts = backend.instance_options(engine, mr)
    extra = mr.typed("pd_extra_args", list) or []
    extra = [str(a) for a in extra]
    for arg in extra:
        flag = _own_flag(arg, backend.owned_flags if backend else ())
        if flag:
            mr.fail("pd_extra_args", f"{flag} is set by the planner; remove it from pd_extra_args")
    env = mr.typed("pd_env", dict) or {}
    env = {str(k): str(v) for k, v in env.items()}

    # every node of an instance must agree with its master on instance-wide settings
    wide = INSTANCE_WIDE + (backend.instance_wide if backend else ())
    for m in members[1:]:
        for var in wide:
            if m.r.raw(var) != mr.raw(var):
                m.r.fail(var, f"{m.r.raw(var)!r} differs from {mr.raw(var)!r} on the instance "
                         f"master {members[0].host}")

    if None in (engine, dp_mode, tp, api_port, rpc_port, opts) or not model:
        return None
    start = 0
    inst_hosts = []
    ok = True
    stride = backend.api_ports_per_rank(opts) if backend is not None else 1
    for m in members:
        devices = _parse_devices(m.r)
        if devices is None:
            ok = False
            continue
        if len(devices) % tp:
            m.r.fail("devices", f"{len(devices)} devices are not divisible by pd_tp={tp}")
            ok = False
            continue
        local_n = len(devices) // tp
        master = m is members[0]
        ranks = []
        for j in range(local_n):
            external = dp_mode in PER_RANK_API_MODES
            ranks.append(Rank(
                rank=start + j,
                local=j,
                devices=devices[j * tp:(j + 1) * tp],
                api_port=(api_port + j * stride) if external else (
                    api_port if master and j == 0 else None),
                kv_port=0,  # assigned once the instance's KV base is known
            ))
        nodes[m.host] = Node(
            host=m.host, role=role, ip=m.ip or "", bind=m.r.ip("pd_bind_host") or m.ip or "",
            instance=name, master=master, devices=devices, nic=m.r.text("nic"),
            start_rank=start, ranks=ranks, python=m.r.text("pd_python") or "python3",
            base_dir=_base_dir(m.r), grace=m.r.integer("pd_grace_seconds", 0, 3600) or 0,
            restart=restart_policy(m.r),
        )
        inst_hosts.append(m.host)
        start += local_n
    if not ok:
        return None
    return Instance(
        name=name, role=role, master=members[0].host, master_ip=members[0].ip or "",
        hosts=inst_hosts, engine=engine, dp_mode=dp_mode, tp=tp, dp_size=start,
        model_path=model, served_model_name=served, api_port=api_port, dp_rpc_port=rpc_port,
        kv_port=0, extra_args=extra, env=env, opts=opts,
    )


def _base_dir(r: Reader) -> str:
    return r.text("pd_base_dir") or f"/var/lib/pd-deploy/{r.text('pd_cluster_name') or 'pd'}"


def _assign_kv_ports(
    instances: list[Instance], nodes: Mapping[str, Node], readers: Mapping[str, Reader],
    cluster_r: Reader, backend: Backend,
) -> None:
    """KV side-channel ranges: an instance gets base + k * stride with the smallest k that
    no earlier instance with the same base and a node address in common uses (instances
    on different addresses share a range); rank r of an instance starts at its base +
    r * (the backend's ports per rank). Only earlier instances count, so appending an
    instance to the inventory never moves the ranges of the ones already there (scale
    out restarts nothing else)."""
    stride = cluster_r.integer("pd_kv_port_stride", 0, 10000)
    if stride is None:
        return
    used: dict[tuple[int, int], set[str]] = {}  # (base, k) -> node addresses using it
    for inst in instances:
        r = readers[inst.master]
        default = backend.kv_port_base(inst)
        base = r.port("pd_kv_port") if r.raw("pd_kv_port") is not None else default
        if base is None:
            continue
        ips = {nodes[h].ip for h in inst.hosts}
        k = 0
        while stride and used.get((base, k), set()) & ips:
            k += 1
        used.setdefault((base, k), set()).update(ips)
        inst.kv_port = base + k * stride
        per_rank = backend.kv_ports_per_rank(inst)
        for host in inst.hosts:
            for rank in nodes[host].ranks:
                rank.kv_port = inst.kv_port + rank.rank * per_rank
            ranks = nodes[host].ranks
            low = ranks[0].kv_port if ranks else inst.kv_port
            top = (ranks[-1].kv_port + per_rank - 1) if ranks else inst.kv_port
            if top > 65535:
                readers[host].fail("pd_kv_port", f"KV range {low}..{top} of instance "
                                   f"{inst.name} goes past 65535")


def _proxy_host(host: str, r: Reader, ip: str | None) -> ProxyHost | None:
    port = r.port("pd_proxy_port")
    admin = r.integer("pd_proxy_admin_port", 0, 65535) if r.raw("pd_proxy_admin_port") else None
    if ip is None or port is None:
        return None
    return ProxyHost(host=host, ip=ip, bind=r.ip("pd_bind_host") or ip, port=port,
                     admin_port=admin or port + 1,
                     python=r.text("pd_python") or "python3", base_dir=_base_dir(r),
                     grace=r.integer("pd_grace_seconds", 0, 3600) or 0,
                     restart=restart_policy(r))


def restart_policy(r: Reader) -> RestartPolicy:
    """The host's pd_restart_* knobs (the launcher's `restart` block; errors name the
    host and the variable)."""
    out = RestartPolicy(policy="on-failure")
    policy = r.text("pd_restart_policy", RESTART_POLICIES)
    count = r.integer("pd_restart_max", 0, 1000)
    window = r.integer("pd_restart_window_s", 1, 7 * 86400)
    backoff_max = r.integer("pd_restart_backoff_max_s", 1, 3600)
    return RestartPolicy(
        policy=policy or out.policy, max=out.max if count is None else count,
        window_s=out.window_s if window is None else window,
        backoff_s=out.backoff_s,
        backoff_max_s=out.backoff_max_s if backoff_max is None else backoff_max)


def proxy_options(r: Reader) -> dict[str, Any]:
    def policy(name: str) -> str:
        return r.text(name, BALANCE_POLICIES) or "least_conn"

    return {
        "prefill_balance": policy("pd_proxy_prefill_balance"),
        "decode_balance": policy("pd_proxy_decode_balance"),
        "keepalive": r.integer("pd_proxy_keepalive", 0, 100000),
        "max_fails": r.integer("pd_proxy_max_fails", 0, 1000),
        "fail_timeout_s": r.integer("pd_proxy_fail_timeout_s", 1, 86400),
        "prefill_attempts": r.integer("pd_proxy_prefill_attempts", 1, 100),
        "decode_attempts": r.integer("pd_proxy_decode_attempts", 1, 100),
        "fallback": r.boolean("pd_proxy_fallback"),
        "max_body_size": r.text("pd_proxy_max_body_size"),
        "api_key": r.raw("pd_proxy_api_key"),
        "engine_api_key": r.raw("pd_engine_api_key"),
        "min_prefill_chars": r.integer("pd_proxy_min_prefill_chars", 0, 10**9),
        "connect_timeout_s": r.integer("pd_proxy_connect_timeout_s", 1, 3600),
        "prefill_timeout_s": r.integer("pd_proxy_prefill_timeout_s", 1, 86400),
        "decode_timeout_s": r.integer("pd_proxy_decode_timeout_s", 1, 86400),
        "worker_processes": r.integer("pd_proxy_worker_processes", 1, 256),
        "max_inflight": r.integer("pd_proxy_max_inflight", 0, 10**6),
    }


@dataclass
class Binding:
    ip: str
    port: int
    use: str
    owner: str  # "host/what"
    field: str | None = None  # the variable that sets it (default: by use)


def bindings(plan_instances: Iterable[Instance], nodes: Mapping[str, Node],
             proxies: Iterable[ProxyHost], backend: Backend) -> list[Binding]:
    """Every port every planned process binds, per address (the clash check's input)."""
    out: list[Binding] = []
    insts = {i.name: i for i in plan_instances}
    for node in nodes.values():
        inst = insts[node.instance]
        width = backend.kv_ports_per_rank(inst) if inst.kv_port else 0
        for rank in node.ranks:
            who = f"{node.host}/dp{rank.rank}"
            if rank.api_port is not None:
                out.append(Binding(node.bind, rank.api_port, "api", who))
            for t in range(width):
                out.append(Binding(node.ip, rank.kv_port + t, "kv", who))
        if node.master and backend.uses_dp_rpc(inst):
            out.append(Binding(node.ip, inst.dp_rpc_port, "dp_rpc", f"{node.host}/dp-master"))
        for ip, port, use, var in backend.node_bindings(inst, node):
            out.append(Binding(ip, port, use, f"{node.host}/{use}", var))
    for p in proxies:
        out.append(Binding(p.bind, p.port, "proxy", f"{p.host}/proxy"))
        out.append(Binding(p.bind, p.admin_port, "admin", f"{p.host}/proxy-agent"))
    return out


def _check_ports(
    instances: list[Instance], nodes: Mapping[str, Node], proxies: list[ProxyHost],
    readers: Mapping[str, Reader], backend: Backend,
) -> None:
    seen: dict[tuple[str, int], Binding] = {}
    field_of = {"api": "pd_api_port", "kv": "pd_kv_port", "dp_rpc": "pd_dp_rpc_port",
                "proxy": "pd_proxy_port", "admin": "pd_proxy_admin_port"}
    for b in bindings(instances, nodes, proxies, backend):
        host = b.owner.split("/")[0]
        if not 1 <= b.port <= 65535:
            readers[host].fail(b.field or field_of[b.use],
                               f"{b.use} port {b.port} is outside 1..65535")
            continue
        wildcard = [(ip, b.port) for ip in (b.ip, "0.0.0.0", "::")]
        clash = next((seen[k] for k in wildcard if k in seen), None)
        if clash is None and b.ip in ("0.0.0.0", "::"):
            clash = next((v for (ip, port), v in seen.items() if port == b.port), None)
        if clash is not None:
            readers[host].fail(
                b.field or field_of[b.use], f"{b.use} port {b.ip}:{b.port} ({b.owner}) is "
                f"also bound by {clash.owner} ({clash.use})")
            continue
        seen[(b.ip, b.port)] = b


def service_ports(svc: Any) -> list[tuple[str, int, str]]:
    """(host, port, use) of every process of a Service, whether its processes are the
    launcher's Process objects or the dicts of docs/node-spec.md."""
    out = []
    for proc in svc.processes:
        ports = proc.get("ports", []) if isinstance(proc, dict) else proc.ports
        for q in ports:
            if isinstance(q, dict):
                out.append((q["host"], int(q["port"]), q.get("use", "")))
            else:
                out.append((q.host, int(q.port), q.use))
    return out


def _check_service_ports(plan: ClusterPlan, readers: Mapping[str, Reader]) -> None:
    """Ports of the backend's services on C hosts against every planned binding."""
    doors = plan.proxies if plan.front_door != "none" else []
    seen = {(b.ip, b.port): b for b in bindings(plan.instances, plan.nodes, doors,
                                                plan.backend)}
    first_c = plan.proxies[0].host if plan.proxies else None
    for svc in plan.backend.services(plan):
        for host in svc.hosts or ([first_c] if first_c else []):
            for host_ip, port, use in service_ports(svc):
                b = Binding(host_ip, port, use, f"{host}/{svc.name}")
                wildcard = [(ip, b.port) for ip in (b.ip, "0.0.0.0", "::")]
                clash = next((seen[k] for k in wildcard if k in seen), None)
                if clash is not None:
                    readers[host].fail(
                        svc.port_vars.get(b.port, f"{svc.name} port"),
                        f"service {svc.name} port {b.ip}:{b.port} is also bound by "
                        f"{clash.owner} ({clash.use})")
                    continue
                seen[(b.ip, b.port)] = b


def _upstreams(role: str, instances: list[Instance], nodes: Mapping[str, Node]) -> list[str]:
    out = []
    for inst in instances:
        if inst.role != role:
            continue
        for host in inst.hosts:
            node = nodes[host]
            for rank in node.ranks:
                if rank.api_port is not None:
                    out.append(f"{node.ip if node.bind in ('0.0.0.0', '::') else node.bind}"
                               f":{rank.api_port}")
    return out
