"""The xLLM backend: etcd + xllm-service (xllm_master_serving) + one xLLM process per
device (reference: engines-facts.md section 1).

* C services, before the engines: etcd (the distribution's binary, client and peer
  URLs on the C node's IP, data under the unit's state dir) and xllm_master_serving.
  The service opens its RPC port at once (its unit's readiness) and its HTTP port only
  once a prefill and a decode registered in etcd: that is the cluster-ready gate
  site.yml waits for after the engines (Service.gate), naming what never registered.
* Instances: xLLM counts a device as a node, so an instance of N devices is N
  processes sharing --master_node_addr and --nnodes=N, with a global --node_rank and
  their own --port, --transfer_listen_port and --disagg_pd_port. The planner's ranks
  are exactly those processes (pd_tp 1, external DP: one rank per device); rank r's
  API port is --port, its KV port --transfer_listen_port. Multi-host instances get an
  HCCL rank table (--rank_tablefile), from the inventory's device_ips or built on the
  nodes from /etc/hccn.conf in a pre-start step that meets the other hosts in etcd.
* Front door: nginx in front of the service's HTTP port (router mode).

Every flag is `--flag=value` (gflags reads `--bool false` as true plus a stray
argument). With pd_engine emulator + pd_emulate xllm the emulator's xLLM personality
gets exactly this argv after its own program prefix.
"""
from __future__ import annotations

import ipaddress
from typing import Any, Mapping

from pd_deploy.engines.base import Backend, FrontDoor, Service
from pd_deploy.settings import Reader, Variable
from pd_deploy.specs import dirs_for, engine_spec_base
from pd_deploy.topology import ClusterPlan, Instance, Node, Rank, version_tuple
from pd_launcher.launcher.spec import Gate, NodeSpec, Port, Process, Ready, SpecFile
from pd_launcher.ranktable import build_rank_table, render

ROLE_NAMES = {"P": "PREFILL", "D": "DECODE"}
LB_POLICIES = ("RR", "CAR", "SLO_AWARE")
RANK_TABLE_MODES = ("auto", "inventory", "hccn")
ASCEND_DEVICE_FILES = ["/dev/davinci_manager", "/dev/devmm_svm", "/dev/hisi_hdc"]
#: flags xLLM's PD guides turn off; emitted unless pd_extra_args sets them
PD_DEFAULT_FLAGS = (("--enable_prefix_cache", "false"), ("--enable_chunked_prefill", "false"))
OWNED_FLAGS = (
    "--model", "--devices", "--device_id", "--host", "--port", "--enable_disagg_pd",
    "--instance_role", "--etcd_addr", "--etcd_namespace", "--disagg_pd_port",
    "--transfer_listen_port", "--master_node_addr", "--nnodes", "--node_rank",
    "--rank_tablefile",
)
#: etcd key prefix under which the hosts of a multi-host instance meet (hccn mode)
RANK_TABLE_KEY = "PD:RANKTABLE"
RANK_TABLE_FILE = "rank_table.json"
RANK_TABLE_TIMEOUT = 600


def _flag(name: str, value: Any) -> str:
    return f"--{name}={value}"


def namespace(plan: ClusterPlan) -> str:
    """--etcd_namespace of the service and every instance: the cluster name (xLLM strips
    slashes and prefixes every key with /<ns>/)."""
    return plan.cluster.strip("/")


def etcd_addr(plan: ClusterPlan) -> str:
    return f"{plan.proxies[0].ip}:{plan.options['etcd_port']}"


def registration_key(plan: ClusterPlan, inst: Instance) -> str:
    """The etcd key rank 0 of an instance registers (XServiceClient::register_instance)."""
    node = plan.nodes[inst.master]
    return (f"/{namespace(plan)}/XLLM:{ROLE_NAMES[inst.role]}:"
            f"{node.ip}:{node.ranks[0].api_port}")


# ---------------------------------------------------------------- instances


def _program(plan: ClusterPlan, inst: Instance, node: Node) -> list[str]:
    if inst.engine == "emulator":
        return [node.python, "-m", "pd_launcher.emulator", "xllm"]
    return [inst.opts["bin"]]


def rank_table_path(node: Node) -> str:
    return f"{dirs_for(node.base_dir, node.role)['run']}/{RANK_TABLE_FILE}"


def _argv(plan: ClusterPlan, inst: Instance, node: Node, rank: Rank) -> list[str]:
    master = plan.nodes[inst.master]
    device = rank.devices[0]
    new_flags = plan.options["xllm_version"] >= (0, 10)
    argv = _program(plan, inst, node) + [
        _flag("model", inst.model_path),
        _flag("port", rank.api_port),
        _flag("device_id", device) if new_flags else _flag("devices", f"npu:{device}"),
        _flag("master_node_addr", f"{master.ip}:{inst.opts['master_port']}"),
    ]
    extra_names = {a.split("=", 1)[0] for a in inst.extra_args}
    argv += [_flag(k[2:], v) for k, v in PD_DEFAULT_FLAGS if k not in extra_names]
    argv += [
        _flag("enable_disagg_pd", "true"),
        _flag("instance_role", ROLE_NAMES[inst.role]),
        _flag("etcd_addr", etcd_addr(plan)),
        _flag("transfer_listen_port", rank.kv_port),
        _flag("disagg_pd_port", inst.opts["disagg_pd_port"] + rank.local),
        _flag("node_rank", rank.rank),
        _flag("nnodes", inst.dp_size),
        _flag("host", node.ip),
        _flag("etcd_namespace", namespace(plan)),
    ]
    if len(inst.hosts) > 1:
        argv += [_flag("rank_tablefile", rank_table_path(node)),
                 _flag("communication_backend", "hccl")]
    return argv + inst.extra_args


def _process(plan: ClusterPlan, inst: Instance, node: Node, rank: Rank) -> Process:
    ip = node.ip
    ports = [Port(host=ip, port=rank.api_port, use="api"),
             Port(host=ip, port=inst.opts["disagg_pd_port"] + rank.local, use="disagg_pd"),
             Port(host=ip, port=rank.kv_port, use="kv")]
    if rank.rank == 0:
        ports.append(Port(host=ip, port=inst.opts["master_port"], use="xllm_master"))
    # only node rank 0 serves HTTP; its /health stays unhealthy until every worker of
    # the instance joined, so the other ranks need no probe of their own
    ready = Ready.http(f"http://{ip}:{rank.api_port}/health") if rank.rank == 0 else None
    return Process(name=f"xllm-rank{rank.rank}", argv=_argv(plan, inst, node, rank),
                   env=dict(inst.env), ports=ports, ready=ready, dp_ranks=[rank.rank])


def _rank_table(plan: ClusterPlan, inst: Instance, node: Node
                ) -> tuple[list[SpecFile], list[list[str]], list[str]]:
    """(files, pre_start, paths to check) that give a multi-host instance its HCCL rank
    table: written from the inventory's device_ips, or built on the nodes from their
    hccn.conf files, exchanged through etcd."""
    if len(inst.hosts) <= 1:
        return [], [], []
    path = rank_table_path(node)
    if inst.opts["rank_table"] == "inventory":
        servers = [(plan.nodes[h].ip, list(zip(plan.nodes[h].devices, inst.opts["device_ips"][h])))
                   for h in inst.hosts]
        return [SpecFile(path=path, content=render(build_rank_table(servers)))], [], []
    hccn = inst.opts["hccn_conf"][node.host]
    prefix = f"/{namespace(plan)}/{RANK_TABLE_KEY}:{inst.name}/"
    step = [node.python, "-m", "pd_launcher.ranktable", "exchange",
            "--etcd", f"http://{etcd_addr(plan)}", "--prefix", prefix,
            "--server-ip", node.ip, "--devices", ",".join(node.devices),
            "--servers", ",".join(plan.nodes[h].ip for h in inst.hosts),
            "--hccn", hccn, "--out", path, "--timeout", str(RANK_TABLE_TIMEOUT)]
    return [], [step], [hccn]


def engine_spec(plan: ClusterPlan, node: Node) -> NodeSpec:
    inst = plan.instance(node.instance)
    processes = [_process(plan, inst, node, r) for r in node.ranks]
    files, pre_start, paths = _rank_table(plan, inst, node)
    real = inst.engine != "emulator"
    devices = ([f"/dev/davinci{d}" for d in node.devices] + ASCEND_DEVICE_FILES) if real else []
    return engine_spec_base(
        plan, node, processes,
        checks={"paths": ([inst.model_path] if real else []) + paths, "devices": devices,
                "commands": [processes[0].argv[0]]},
        nic=None, files=files, pre_start=pre_start,
    )


# ---------------------------------------------------------------- services


def etcd_service(plan: ClusterPlan) -> Service:
    c = plan.proxies[0]
    o = plan.options
    client, peer = f"http://{c.ip}:{o['etcd_port']}", f"http://{c.ip}:{o['etcd_peer_port']}"
    listen_client = f"http://{c.bind}:{o['etcd_port']}"
    listen_peer = f"http://{c.bind}:{o['etcd_peer_port']}"
    name = f"{plan.cluster}-etcd"
    data = f"{dirs_for(c.base_dir, 'etcd')['state']}/data"
    argv = [o["etcd_bin"], "--name", name, "--data-dir", data,
            "--listen-client-urls", listen_client, "--advertise-client-urls", client,
            "--listen-peer-urls", listen_peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{name}={peer}"]
    return Service(
        name="etcd", phase="before-engines",
        processes=[Process(
            name="etcd", argv=argv, env={},
            ports=[Port(host=c.bind, port=o["etcd_port"], use="etcd_client"),
                   Port(host=c.bind, port=o["etcd_peer_port"], use="etcd_peer")],
            ready=Ready.http(f"{client}/health"))],
        checks={"commands": [o["etcd_bin"]]},
        port_vars={o["etcd_port"]: "pd_etcd_port", o["etcd_peer_port"]: "pd_etcd_peer_port"},
    )


def service_argv(plan: ClusterPlan) -> list[str]:
    c = plan.proxies[0]
    o = plan.options
    program = ([c.python, "-m", "pd_launcher.emulator", "xllm_master_serving"]
               if plan.instances[0].engine == "emulator" else [o["service_bin"]])
    return program + [
        _flag("etcd_addr", etcd_addr(plan)),
        _flag("http_server_port", o["http_port"]),
        _flag("rpc_server_port", o["rpc_port"]),
        _flag("tokenizer_path", o["tokenizer_path"] or plan.instances[0].model_path),
        _flag("load_balance_policy", o["lb_policy"]),
        _flag("etcd_namespace", namespace(plan)),
        _flag("server_host", c.bind),
    ]


def xllm_service(plan: ClusterPlan) -> Service:
    c = plan.proxies[0]
    o = plan.options
    argv = service_argv(plan)
    emulated = plan.instances[0].engine == "emulator"
    http_host = c.ip if c.bind in ("0.0.0.0", "::") else c.bind
    expect = []
    for inst in plan.instances:
        expect += ["--expect", f"{inst.name}={registration_key(plan, inst)}"]
    explain = [c.python, "-m", "pd_launcher.etcd_keys",
               "--endpoint", f"http://{etcd_addr(plan)}",
               "--prefix", f"/{namespace(plan)}/XLLM:"] + expect
    tokenizer = o["tokenizer_path"] or plan.instances[0].model_path
    return Service(
        name="xllm-service", phase="before-engines",
        processes=[Process(
            name="xllm_master_serving", argv=argv, env={},
            ports=[Port(host=c.bind, port=o["http_port"], use="http"),
                   Port(host=c.bind, port=o["rpc_port"], use="rpc")],
            # the HTTP port opens only once P and D registered: the gate, below
            ready=Ready.tcp(http_host, o["rpc_port"]))],
        checks={"commands": [argv[0]], "paths": [] if emulated else [tokenizer]},
        port_vars={o["http_port"]: "pd_xllm_service_http_port",
                   o["rpc_port"]: "pd_xllm_service_rpc_port"},
        gate=Gate(ready=Ready.tcp(http_host, o["http_port"]),
                  what=f"xllm-service HTTP port {http_host}:{o['http_port']} (it opens once "
                       "a prefill and a decode instance registered in etcd)",
                  explain=explain),
    )


# ---------------------------------------------------------------- the backend


class XllmBackend(Backend):
    name = "xllm"
    title = "xLLM (+ xllm-service + etcd)"
    engines = ("xllm",)
    emulates = ("xllm",)
    owned_flags = OWNED_FLAGS
    instance_wide = ("pd_xllm_bin", "pd_xllm_disagg_pd_port", "pd_xllm_master_port",
                     "pd_xllm_nnodes", "pd_xllm_rank_table")
    variables = (
        Variable("pd_xllm_version", "0.9.2", "cluster", "xLLM version of the image: 0.9 gets "
                 "--devices=npu:N, 0.10+ --device_id=N. xLLM >= 0.10 cannot register with "
                 "xllm-service 0.9 (refused)."),
        Variable("pd_xllm_service_version", "0.9.1", "cluster", "xllm-service version."),
        Variable("pd_xllm_bin", "/usr/local/bin/xllm", "instance", "The xLLM binary."),
        Variable("pd_xllm_service_bin", "/usr/local/bin/xllm_master_serving", "cluster",
                 "The xllm-service binary (checked by preflight)."),
        Variable("pd_tokenizer_path", None, "cluster", "--tokenizer_path of xllm-service "
                 "(checked by preflight). Default: pd_model_path."),
        Variable("pd_xllm_lb_policy", "RR", "cluster", "--load_balance_policy: RR | CAR | "
                 "SLO_AWARE."),
        Variable("pd_xllm_service_http_port", 8888, "cluster", "--http_server_port: the "
                 "service's OpenAI API (the front door forwards to it)."),
        Variable("pd_xllm_service_rpc_port", 8889, "cluster", "--rpc_server_port: heartbeats "
                 "and generations from the instances."),
        Variable("pd_etcd_port", 2379, "cluster", "etcd client port on the first C host; the "
                 "one port the service and every instance use (--etcd_addr)."),
        Variable("pd_etcd_peer_port", 2380, "cluster", "etcd peer port."),
        Variable("pd_etcd_bin", "etcd", "cluster", "The etcd binary (Debian: etcd-server)."),
        Variable("pd_xllm_disagg_pd_port", 7777, "instance", "First --disagg_pd_port on a "
                 "node; device j of the node uses + j."),
        Variable("pd_xllm_master_port", 18888, "instance", "Port of --master_node_addr on the "
                 "instance master (rank 0)."),
        Variable("pd_xllm_nnodes", None, "instance", "Expected device count of the instance "
                 "(--nnodes); an error when the inventory gives another. Default: not checked."),
        Variable("pd_xllm_rank_table", "auto", "instance", "HCCL rank table of a multi-host "
                 "instance: inventory (from device_ips) | hccn (built on the nodes from "
                 "pd_hccn_conf, exchanged through etcd) | auto (inventory when every host has "
                 "device_ips)."),
        Variable("pd_hccn_conf", "/etc/hccn.conf", "host", "The node's hccn.conf (device IPs; "
                 "mounted into xLLM containers)."),
        Variable("device_ips", None, "host", "Device IPs of the host's devices, in `devices` "
                 "order (list or \"a,b\"): the rank table of a multi-host xLLM instance."),
    )

    # ------------------------------------------------------------ reading

    def cluster_options(self, r: Reader) -> dict[str, Any]:
        versions = {}
        for var, fallback in (("pd_xllm_version", (0, 9, 2)),
                              ("pd_xllm_service_version", (0, 9, 1))):
            v = version_tuple(r.raw(var))
            if v is None:
                r.fail(var, f"cannot read version {r.raw(var)!r}")
                v = fallback
            v = (tuple(v) + (0, 0))[:3]
            if v < (0, 9, 1):
                r.fail(var, f"{r.raw(var)} is too old: --etcd_namespace, which keeps each "
                       "cluster's keys apart in etcd, first appears in xLLM 0.9.1 and "
                       "xllm-service 0.9.1 (release/v0.9 heads); use 0.9.1 or later")
            versions[var] = v
        if versions["pd_xllm_version"] >= (0, 10) and versions["pd_xllm_service_version"] < (0, 10):
            r.fail("pd_xllm_version", (
                f"xLLM {r.raw('pd_xllm_version')} cannot register with xllm-service "
                f"{r.raw('pd_xllm_service_version')}: xLLM 0.10+ no longer writes k_cache_ids, "
                "v_cache_ids and device_ips into its etcd instance JSON, which xllm-service "
                "0.9 requires (it logs 'Parse instance json failed' and never routes to the "
                "instance); pin pd_xllm_version to 0.9.x"))
        return {
            "xllm_version": versions["pd_xllm_version"],
            "service_version": versions["pd_xllm_service_version"],
            "service_bin": r.text("pd_xllm_service_bin") or "xllm_master_serving",
            "tokenizer_path": r.text("pd_tokenizer_path"),
            "lb_policy": r.text("pd_xllm_lb_policy", LB_POLICIES) or "RR",
            "http_port": r.port("pd_xllm_service_http_port") or 8888,
            "rpc_port": r.port("pd_xllm_service_rpc_port") or 8889,
            "etcd_port": r.port("pd_etcd_port") or 2379,
            "etcd_peer_port": r.port("pd_etcd_peer_port") or 2380,
            "etcd_bin": r.text("pd_etcd_bin") or "etcd",
        }

    def instance_options(self, engine: str, r: Reader) -> dict[str, Any] | None:
        opts = {
            "bin": r.text("pd_xllm_bin"),
            "disagg_pd_port": r.port("pd_xllm_disagg_pd_port"),
            "master_port": r.port("pd_xllm_master_port"),
            "nnodes": r.integer("pd_xllm_nnodes", 1, 65536),
            "rank_table": r.text("pd_xllm_rank_table", RANK_TABLE_MODES),
        }
        if None in (opts["bin"], opts["disagg_pd_port"], opts["master_port"],
                    opts["rank_table"]):
            return None
        return opts

    def kv_port_base(self, inst: Instance) -> int | None:
        return 26000  # --transfer_listen_port; one per device (rank)

    def uses_dp_rpc(self, inst: Instance) -> bool:
        return False

    def node_bindings(self, inst: Instance, node: Node) -> list[tuple[str, int, str, str]]:
        out = [(node.ip, inst.opts["disagg_pd_port"] + r.local, "disagg_pd",
                "pd_xllm_disagg_pd_port") for r in node.ranks]
        if node.master:
            out.append((node.ip, inst.opts["master_port"], "xllm_master", "pd_xllm_master_port"))
        return out

    # ------------------------------------------------------------ rules

    def validate(self, plan: ClusterPlan, readers: Mapping[str, Reader]) -> None:
        first = plan.instances[0] if plan.instances else None
        for inst in plan.instances:
            r = readers[inst.master]
            if inst.tp != 1:
                r.fail("pd_tp", f"is {inst.tp}, but xLLM runs one process per device (the "
                       "instance's devices are its --nnodes); set pd_tp 1 and pass xLLM's own "
                       "parallel flags (e.g. --dp_size=, --ep_size=) in pd_extra_args")
            if inst.dp_mode != "external":
                r.fail("pd_dp_mode", "xLLM runs one process per device: only 'external'")
            if inst.opts["nnodes"] is not None and inst.opts["nnodes"] != inst.dp_size:
                r.fail("pd_xllm_nnodes", f"instance {inst.name} expects {inst.opts['nnodes']} "
                       f"devices (--nnodes) but its hosts ({', '.join(inst.hosts)}) give "
                       f"{inst.dp_size}")
            if first is not None and inst.model_path != first.model_path:
                r.fail("pd_model_path", f"{inst.model_path!r} differs from "
                       f"{first.model_path!r} of {first.name}: every prefill and decode "
                       "instance behind one xllm-service must serve the same model")
            self._rank_table_inputs(plan, inst, readers)
        if plan.engine_api_key:
            readers[plan.instances[0].master if plan.instances else next(iter(readers))].fail(
                "pd_engine_api_key", "xLLM and xllm-service take no API key; protect the "
                "front door with pd_proxy_api_key")

    def _rank_table_inputs(self, plan: ClusterPlan, inst: Instance,
                           readers: Mapping[str, Reader]) -> None:
        """device_ips (inventory mode) or hccn.conf paths (hccn mode) per host."""
        ips: dict[str, list[str]] = {}
        hccn: dict[str, str] = {}
        for host in inst.hosts:
            r = readers[host]
            hccn[host] = r.text("pd_hccn_conf") or "/etc/hccn.conf"
            raw = r.raw("device_ips")
            if raw is None or raw == "":
                continue
            items = [x.strip() for x in raw.split(",")] if isinstance(raw, str) else raw
            if not isinstance(items, (list, tuple)):
                r.fail("device_ips", f"must be a list or a comma-separated string, got {raw!r}")
                continue
            devices = plan.nodes[host].devices
            if len(items) != len(devices):
                r.fail("device_ips", f"{len(items)} device IPs for {len(devices)} devices "
                       f"({','.join(devices)}): give one per device, in `devices` order")
                continue
            bad = [str(x) for x in items if not _ipv4(str(x))]
            if bad:
                r.fail("device_ips", f"not IPv4 addresses: {', '.join(bad)}")
                continue
            ips[host] = [str(x) for x in items]
        mode = inst.opts["rank_table"]
        if mode == "auto":
            mode = "inventory" if len(ips) == len(inst.hosts) else "hccn"
        if mode == "inventory" and len(inst.hosts) > 1:
            for host in inst.hosts:
                if host not in ips and readers[host].raw("device_ips") in (None, ""):
                    readers[host].fail("device_ips", f"pd_xllm_rank_table is inventory but "
                                       f"{host} (instance {inst.name}) has no device_ips")
        inst.opts.update(rank_table=mode, device_ips=ips, hccn_conf=hccn)

    # ------------------------------------------------------------ what runs

    def node_spec(self, plan: ClusterPlan, node: Node) -> NodeSpec:
        return engine_spec(plan, node)

    def services(self, plan: ClusterPlan) -> list[Service]:
        return [etcd_service(plan), xllm_service(plan)]

    def front_door(self, plan: ClusterPlan) -> FrontDoor:
        c = plan.proxies[0]
        host = c.ip if c.bind in ("0.0.0.0", "::") else c.bind
        entry = f"{host}:{plan.options['http_port']}"
        # xllm-service has no /health: the agent probes its HTTP port with a TCP connect
        return FrontDoor(mode="router", router=[entry], entry=entry, health_path=None)


def _ipv4(text: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv4Address)
    except ValueError:
        return False
