"""The one model of the cluster: inventory data -> validated ClusterPlan.

Pure: takes the groups and hostvars Ansible has, returns a ClusterPlan or raises
PlanInvalid with every error found (each naming the host and the field). All rank,
port, device-slice and upstream arithmetic of pd-deploy lives here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from pd_launcher.settings import (
    BALANCE_POLICIES,
    DP_MODES,
    ENGINES,
    PlanError,
    PlanInvalid,
    Reader,
)

ROLES = ("P", "D")
HOST_KEYS = ("ansible_host", "host_ip", "node_ip", "devices", "nic")  # non-pd_ inventory vars
MOONCAKE_RANDOM_BASE = 20000  # Mooncake takes random ports in [20000, 20000 + chips*1000)
OWNED_FLAGS = (
    "--host", "--port", "--served-model-name", "--tensor-parallel-size", "-tp",
    "--data-parallel-size", "-dp", "--data-parallel-rank", "-dpn", "--data-parallel-size-local",
    "-dpl", "--data-parallel-start-rank", "-dpr", "--data-parallel-address", "-dpa",
    "--data-parallel-rpc-port", "-dpp", "--headless", "--kv-transfer-config", "--api-key",
    "--data-parallel-external-lb", "--data-parallel-hybrid-lb",
)


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


@dataclass
class Instance:
    name: str
    role: str
    master: str
    master_ip: str
    hosts: list[str]
    engine: str
    flavour: str  # vllm-ascend | vllm: whose flags (the emulator borrows one)
    dp_mode: str
    tp: int
    dp_size: int
    model_path: str
    served_model_name: str
    connector: str
    api_port: int
    dp_rpc_port: int
    kv_port: int
    extra_args: list[str]
    env: dict[str, str]

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

    @property
    def listen(self) -> str:
        return f"{self.bind}:{self.port}"


@dataclass
class ClusterPlan:
    cluster: str
    vllm_version: tuple[int, ...]
    instances: list[Instance]
    nodes: dict[str, Node]
    proxies: list[ProxyHost]
    prefill_upstreams: list[str]
    decode_upstreams: list[str]
    proxy_options: dict[str, Any]
    engine_api_key: str | None = field(default=None, repr=False)

    def instance(self, name: str) -> Instance:
        return next(i for i in self.instances if i.name == name)

    def shape(self, role: str) -> tuple[int, int]:
        """(dp_size, tp) of the role's instances (validated equal with Mooncake)."""
        first = next(i for i in self.instances if i.role == role)
        return first.dp_size, first.tp


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
    parts = []
    for piece in str(text).split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            return None
        parts.append(int(digits))
    return tuple(parts) if parts else None


def _own_flag(arg: str) -> str | None:
    name = arg.split("=", 1)[0]
    return name if name in OWNED_FLAGS else None


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
    cluster_r = readers[next(iter(readers))] if readers else Reader("cluster", {}, errors)
    cluster = cluster_r.text("pd_cluster_name") or "pd"
    version = version_tuple(cluster_r.raw("pd_vllm_version"))
    if version is None:
        raw = cluster_r.raw("pd_vllm_version")
        cluster_r.fail("pd_vllm_version", f"cannot read version {raw!r}")
        version = (0, 33, 0)

    node_ips: dict[str, str] = {}
    for host, r in readers.items():
        ansible_host = r.raw("ansible_host") or host
        ip = r.ip("node_ip", r.raw("node_ip") or ansible_host)
        if ip:
            node_ips[host] = ip
    _check_duplicate_ips(groups, node_ips, errors)

    instances: list[Instance] = []
    nodes: dict[str, Node] = {}
    for role in ROLES:
        hosts = groups.get(role, [])
        members = [_HostIn(h, role, readers[h], node_ips.get(h),
                           readers[h].ip("host_ip") or node_ips.get(h)) for h in hosts]
        instances += _group_instances(role, members, nodes, errors)

    _assign_kv_ports(instances, nodes, readers, cluster_r)
    proxies = [_proxy_host(h, readers[h], node_ips.get(h)) for h in groups.get("C", [])]
    proxies = [p for p in proxies if p is not None]
    _check_mooncake_shapes(instances, readers, cluster_r)
    _check_ports(instances, nodes, proxies, readers)

    if errors:
        raise PlanInvalid(_dedupe(errors))

    proxy_r = readers[groups["C"][0]]
    return ClusterPlan(
        cluster=cluster,
        vllm_version=version,
        instances=instances,
        nodes=nodes,
        proxies=proxies,
        prefill_upstreams=_upstreams("P", instances, nodes),
        decode_upstreams=_upstreams("D", instances, nodes),
        proxy_options=proxy_options(proxy_r),
        engine_api_key=cluster_r.raw("pd_engine_api_key"),
    )


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


def _check_duplicate_ips(
    groups: Mapping[str, list[str]], node_ips: dict[str, str], errors: list[PlanError]
) -> None:
    owner: dict[str, str] = {}
    for host in _all_hosts({"P": groups.get("P", []), "D": groups.get("D", [])}):
        ip = node_ips.get(host)
        if ip is None:
            continue
        if ip in owner:
            errors.append(PlanError(host, "node_ip",
                                    f"{ip} is also the node IP of {owner[ip]}"))
        else:
            owner[ip] = host


def _group_instances(
    role: str, members: list[_HostIn], nodes: dict[str, Node], errors: list[PlanError]
) -> list[Instance]:
    by_ip = {m.ip: m for m in members if m.ip}
    order: list[str] = []
    grouped: dict[str, list[_HostIn]] = {}
    for m in members:
        if m.master_ip is None or m.ip is None:
            continue
        if m.master_ip not in by_ip:
            m.r.fail("host_ip", f"{m.master_ip} is not the IP of any host in group {role}")
            continue
        master = by_ip[m.master_ip]
        if master.master_ip != master.ip:
            m.r.fail("host_ip", f"instance {m.master_ip} has no master: {master.host} has that "
                     f"IP but its own host_ip is {master.master_ip}")
            continue
        if m.master_ip not in grouped:
            order.append(m.master_ip)
            grouped[m.master_ip] = []
        grouped[m.master_ip].append(m)

    instances = []
    for index, master_ip in enumerate(order, start=1):
        members_i = grouped[master_ip]
        # the master first, the others in inventory order
        members_i.sort(key=lambda m: m.ip != master_ip)
        inst = _instance(f"{role}{index}", role, members_i, nodes, errors)
        if inst:
            instances.append(inst)
    return instances


def _instance(
    name: str, role: str, members: list[_HostIn], nodes: dict[str, Node], errors: list[PlanError]
) -> Instance | None:
    mr = members[0].r
    engine = mr.text("pd_engine", ENGINES)
    emulate = mr.text("pd_emulate", ("vllm", "vllm-ascend")) if engine == "emulator" else None
    flavour = emulate if engine == "emulator" else engine
    dp_mode = mr.text("pd_dp_mode", DP_MODES)
    tp = mr.integer("pd_tp", 1, 1024)
    model = mr.text("pd_model_path")
    if not model:
        mr.fail("pd_model_path", "is required (the model directory on the nodes)")
    default_name = os.path.basename(model.rstrip("/")) if model else ""
    served = mr.text("pd_served_model_name") or default_name
    api_port = mr.port("pd_api_port")
    rpc_port = mr.port("pd_dp_rpc_port")
    connector = mr.text("pd_connector") or (
        "NixlConnector" if flavour == "vllm" else "MooncakeConnectorV1")
    extra = mr.typed("pd_extra_args", list) or []
    extra = [str(a) for a in extra]
    for arg in extra:
        flag = _own_flag(arg)
        if flag:
            mr.fail("pd_extra_args", f"{flag} is set by the planner; remove it from pd_extra_args")
    env = mr.typed("pd_env", dict) or {}
    env = {str(k): str(v) for k, v in env.items()}

    # every node of an instance must agree with its master on instance-wide settings
    for m in members[1:]:
        for var in ("pd_engine", "pd_dp_mode", "pd_tp", "pd_model_path", "pd_connector"):
            if m.r.raw(var) != mr.raw(var):
                m.r.fail(var, f"{m.r.raw(var)!r} differs from {mr.raw(var)!r} on the instance "
                         f"master {members[0].host}")

    if None in (engine, dp_mode, tp, api_port, rpc_port) or not model or (
            engine == "emulator" and emulate is None):
        return None

    start = 0
    inst_hosts = []
    ok = True
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
            external = dp_mode == "external"
            ranks.append(Rank(
                rank=start + j,
                local=j,
                devices=devices[j * tp:(j + 1) * tp],
                api_port=(api_port + j) if external else (api_port if master and j == 0 else None),
                kv_port=0,  # assigned once the instance's KV base is known
            ))
        nodes[m.host] = Node(
            host=m.host, role=role, ip=m.ip or "", bind=m.r.ip("pd_bind_host") or m.ip or "",
            instance=name, master=master, devices=devices, nic=m.r.text("nic"),
            start_rank=start, ranks=ranks, python=m.r.text("pd_python") or "python3",
            base_dir=_base_dir(m.r), grace=m.r.integer("pd_grace_seconds", 0, 3600) or 0,
        )
        inst_hosts.append(m.host)
        start += local_n
    if not ok:
        return None
    return Instance(
        name=name, role=role, master=members[0].host, master_ip=members[0].ip or "",
        hosts=inst_hosts, engine=engine, flavour=flavour or "vllm", dp_mode=dp_mode, tp=tp,
        dp_size=start, model_path=model, served_model_name=served, connector=connector,
        api_port=api_port, dp_rpc_port=rpc_port, kv_port=0, extra_args=extra, env=env,
    )


def _base_dir(r: Reader) -> str:
    return r.text("pd_base_dir") or f"/var/lib/pd-deploy/{r.text('pd_cluster_name') or 'pd'}"


def _assign_kv_ports(
    instances: list[Instance], nodes: Mapping[str, Node], readers: Mapping[str, Reader],
    cluster_r: Reader,
) -> None:
    stride = cluster_r.integer("pd_kv_port_stride", 0, 10000)
    if stride is None:
        return
    used: dict[int, int] = {}
    for inst in instances:
        r = readers[inst.master]
        default = 5600 if inst.flavour == "vllm" else 36000
        base = r.port("pd_kv_port") if r.raw("pd_kv_port") is not None else default
        if base is None:
            continue
        k = used.get(base, 0)
        used[base] = k + 1
        inst.kv_port = base + k * stride
        # As the connectors compute it, from the GLOBAL DP rank r (vLLM 0.33 nixl
        # base_scheduler; vLLM-Ascend mooncake_connector): Mooncake listens on
        # kv_port + r * tp (+ tp worker index), NIXL on kv_port + r (one per engine).
        per_rank = inst.tp if inst.connector.startswith("Mooncake") else 1
        for host in inst.hosts:
            node_chips = 0
            for rank in nodes[host].ranks:
                rank.kv_port = inst.kv_port + rank.rank * per_rank
                node_chips += inst.tp
            ranks = nodes[host].ranks
            low = ranks[0].kv_port if ranks else inst.kv_port
            top = (ranks[-1].kv_port + per_rank - 1) if ranks else inst.kv_port
            if top > 65535:
                readers[host].fail("pd_kv_port", f"KV range {low}..{top} of instance "
                                   f"{inst.name} goes past 65535")
            if inst.flavour == "vllm-ascend" and inst.connector.startswith("Mooncake"):
                hi = MOONCAKE_RANDOM_BASE + node_chips * 1000
                if low < hi and top >= MOONCAKE_RANDOM_BASE:
                    readers[host].fail(
                        "pd_kv_port",
                        f"KV range {low}..{top} of instance {inst.name} overlaps the "
                        f"ports Mooncake picks at random ({MOONCAKE_RANDOM_BASE}..{hi - 1} with "
                        f"{node_chips} chips); use pd_kv_port >= {hi}")


def _proxy_host(host: str, r: Reader, ip: str | None) -> ProxyHost | None:
    port = r.port("pd_proxy_port")
    admin = r.integer("pd_proxy_admin_port", 0, 65535) if r.raw("pd_proxy_admin_port") else None
    if ip is None or port is None:
        return None
    return ProxyHost(host=host, ip=ip, bind=r.ip("pd_bind_host") or ip, port=port,
                     admin_port=admin or port + 1,
                     python=r.text("pd_python") or "python3", base_dir=_base_dir(r),
                     grace=r.integer("pd_grace_seconds", 0, 3600) or 0)


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
    }


def _check_mooncake_shapes(
    instances: list[Instance], readers: Mapping[str, Reader], cluster_r: Reader
) -> None:
    mooncake = [i for i in instances if i.connector.startswith("Mooncake")]
    for role in ROLES:
        same = [i for i in mooncake if i.role == role]
        for inst in same[1:]:
            if (inst.dp_size, inst.tp) != (same[0].dp_size, same[0].tp):
                readers[inst.master].fail(
                    "pd_tp" if inst.tp != same[0].tp else "devices",
                    f"{role} instance {inst.name} is DP{inst.dp_size}xTP{inst.tp} but "
                    f"{same[0].name} is DP{same[0].dp_size}xTP{same[0].tp}; with {inst.connector} "
                    f"every {role} instance must have the same shape (kv_connector_extra_config)")
    prefill = [i for i in mooncake if i.role == "P"]
    decode = [i for i in mooncake if i.role == "D"]
    if prefill and decode and not cluster_r.boolean("pd_model_is_mla"):
        p, d = prefill[0], decode[0]
        if p.tp % d.tp:
            readers[p.master].fail(
                "pd_tp", f"prefill tp {p.tp} is not a multiple of decode tp {d.tp} (required by "
                f"{p.connector} for non-MLA models; set pd_model_is_mla: true if it is MLA)")


@dataclass
class Binding:
    ip: str
    port: int
    use: str
    owner: str  # "host/what"


def bindings(plan_instances: Iterable[Instance], nodes: Mapping[str, Node],
             proxies: Iterable[ProxyHost]) -> list[Binding]:
    """Every port every planned process binds, per address (the clash check's input)."""
    out: list[Binding] = []
    insts = {i.name: i for i in plan_instances}
    for node in nodes.values():
        inst = insts[node.instance]
        for rank in node.ranks:
            who = f"{node.host}/dp{rank.rank}"
            if rank.api_port is not None:
                out.append(Binding(node.bind, rank.api_port, "api", who))
            width = inst.tp if inst.connector.startswith("Mooncake") else 1
            for t in range(width):
                out.append(Binding(node.ip, rank.kv_port + t, "kv", who))
        if node.master:
            out.append(Binding(node.ip, inst.dp_rpc_port, "dp_rpc", f"{node.host}/dp-master"))
    for p in proxies:
        out.append(Binding(p.bind, p.port, "proxy", f"{p.host}/proxy"))
        out.append(Binding(p.bind, p.admin_port, "admin", f"{p.host}/proxy-agent"))
    return out


def _check_ports(
    instances: list[Instance], nodes: Mapping[str, Node], proxies: list[ProxyHost],
    readers: Mapping[str, Reader],
) -> None:
    seen: dict[tuple[str, int], Binding] = {}
    field_of = {"api": "pd_api_port", "kv": "pd_kv_port", "dp_rpc": "pd_dp_rpc_port",
                "proxy": "pd_proxy_port", "admin": "pd_proxy_admin_port"}
    for b in bindings(instances, nodes, proxies):
        host = b.owner.split("/")[0]
        if not 1 <= b.port <= 65535:
            readers[host].fail(field_of[b.use], f"{b.use} port {b.port} is outside 1..65535")
            continue
        wildcard = [(ip, b.port) for ip in (b.ip, "0.0.0.0", "::")]
        clash = next((seen[k] for k in wildcard if k in seen), None)
        if clash is None and b.ip in ("0.0.0.0", "::"):
            clash = next((v for (ip, port), v in seen.items() if port == b.port), None)
        if clash is not None:
            readers[host].fail(
                field_of[b.use], f"{b.use} port {b.ip}:{b.port} ({b.owner}) is also bound by "
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
