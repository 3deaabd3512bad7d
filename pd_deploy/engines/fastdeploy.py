"""The FastDeploy backend: splitwise prefill/decode api_servers with FastDeploy's
router (v1, default) or the Redis splitwise scheduler (v0, the PD guide's mode).
Reference: engines-facts.md section 3.

* Ports: rank j of a node (external DP: one api_server per DP rank) takes a block of
  four from pd_api_port + 4j: --port, --metrics-port, --engine-worker-queue-port,
  --cache-queue-port (the guide's 8180..8183), --pd-comm-port pd_fastdeploy_pd_comm_port
  + j and one --rdma-comm-ports port per device: the planner's KV range (pd_kv_port
  + rank * tp + t, default base 7671).
* DP: external DP runs one api_server per DP rank with --data-parallel-size and
  --local-data-parallel-id <global DP rank> (not multi_api_server, so every rank is a
  unit process with its own log, readiness and registration). Internal DP over several
  hosts is FastDeploy's multi-node mode: the identical command on every node with
  --ips <master first>; a node holds one DP rank (devices == pd_tp, at most 8); only
  the master accepts requests (the one upstream).
* router mode: `fd-router --port P --splitwise` (or pd_fastdeploy_router_cmd) on the
  first C host after the engines; instances get --router and register every 5 s.
  Its gate: GET /registered_number shows a prefill and a decode. nginx fronts it.
* redis mode: redis-server (the distribution's, >= 6.2 checked before start) on the
  first C host before the engines: bind address, port, data dir under its state dir,
  no persistence by default, an optional password (only in a 0600 config file and the
  masked --scheduler-password). Instances get the --scheduler-* flags; every instance
  can take requests, and nginx fronts the decode instances (FastDeploy's guide sends
  clients to the decode; a decode that receives a request also serves as its D, so no
  extra hop). Its gate: live prefill and decode entries in <topic>.cluster.
* KVCACHE_RDMA_NICS: the host variable rdma_nics, else detected on the node by
  `python -m pd_launcher.rdma_env` (what FastDeploy's get_rdma_nics.sh does), which
  then execs the api_server.
"""
from __future__ import annotations

import json
import re
from typing import Any, Mapping

from pd_deploy.engines.base import Backend, FrontDoor, Service
from pd_deploy.settings import Reader, Variable
from pd_deploy.specs import dirs_for, engine_spec_base
from pd_deploy.topology import ClusterPlan, Instance, Node, Rank
from pd_launcher.launcher.spec import Gate, NodeSpec, Port, Process, Ready, SpecFile

SCHEDULERS = ("router", "redis")
ROLES = {"P": "prefill", "D": "decode"}
API_BLOCK = 4  # --port, --metrics-port, --engine-worker-queue-port, --cache-queue-port
MAX_IPS_DEVICES = 8  # FastDeploy's multi-node limit per node (GPU)
REDIS_MIN = "6.2.0"
TOPIC_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}$")
API_SERVER = "fastdeploy.entrypoints.openai.api_server"
OWNED_FLAGS = (
    "--model", "--port", "--host", "--metrics-port", "--engine-worker-queue-port",
    "--cache-queue-port", "--tensor-parallel-size", "-tp", "--data-parallel-size",
    "--local-data-parallel-id", "--cache-transfer-protocol", "--rdma-comm-ports",
    "--pd-comm-port", "--splitwise-role", "--router", "--scheduler-name", "--scheduler-host",
    "--scheduler-port", "--scheduler-topic", "--scheduler-ttl", "--scheduler-password",
    "--ips",
)


def _csv(items: list[int] | list[str]) -> str:
    return ",".join(str(i) for i in items)


def topic(plan: ClusterPlan) -> str:
    return plan.options["topic"] or plan.cluster


def redis_conf_path(plan: ClusterPlan) -> str:
    return f"{dirs_for(plan.proxies[0].base_dir, 'redis')['run']}/redis.conf"


# ---------------------------------------------------------------- instances


def _ips_mode(inst: Instance) -> bool:
    return inst.dp_mode == "internal" and len(inst.hosts) > 1


def rdma_ports(inst: Instance, node: Node, rank: Rank) -> list[int]:
    explicit = inst.opts["rdma_ports"].get(node.host)
    if explicit:
        return explicit[rank.local * inst.tp:(rank.local + 1) * inst.tp]
    if _ips_mode(inst):  # the same command on every node: the node-local range
        return [inst.kv_port + t for t in range(inst.tp)]
    return [rank.kv_port + t for t in range(inst.tp)]


def _program(inst: Instance, node: Node) -> list[str]:
    if inst.engine == "emulator":
        program = [node.python, "-m", "pd_launcher.emulator", "fastdeploy"]
    else:
        program = [inst.opts["python"], "-m", API_SERVER]
    if "rdma" in inst.opts["protocol"].split(",") and not inst.opts["rdma_nics"].get(node.host):
        # KVCACHE_RDMA_NICS as FastDeploy's get_rdma_nics.sh finds it, then exec
        program = [node.python, "-m", "pd_launcher.rdma_env", "--device", "gpu", "--"] + program
    return program


def _api_port(inst: Instance, rank: Rank) -> int:
    return rank.api_port if rank.api_port is not None else inst.api_port


def _argv(plan: ClusterPlan, inst: Instance, node: Node, rank: Rank) -> list[str]:
    port = _api_port(inst, rank)
    argv = _program(inst, node) + [
        "--model", inst.model_path,
        "--port", str(port), "--metrics-port", str(port + 1),
        "--engine-worker-queue-port", str(port + 2), "--cache-queue-port", str(port + 3),
        "--tensor-parallel-size", str(inst.tp),
    ]
    if inst.dp_size > 1:
        argv += ["--data-parallel-size", str(inst.dp_size)]
        if not _ips_mode(inst):
            argv += ["--local-data-parallel-id", str(rank.rank)]
    argv += [
        "--cache-transfer-protocol", inst.opts["protocol"],
        "--rdma-comm-ports", _csv(rdma_ports(inst, node, rank)),
        "--pd-comm-port", str(inst.opts["pd_comm_port"] + rank.local),
        "--splitwise-role", ROLES[inst.role],
    ]
    o = plan.options
    c = plan.proxies[0]
    if o["scheduler"] == "router":
        argv += ["--router", f"{c.ip}:{o['router_port']}"]
    else:
        argv += ["--scheduler-name", "splitwise", "--scheduler-host", c.ip,
                 "--scheduler-port", str(o["redis_port"]), "--scheduler-topic", topic(plan),
                 "--scheduler-ttl", str(o["ttl"])]
        if o["redis_password"]:
            argv += ["--scheduler-password", str(o["redis_password"])]
    if _ips_mode(inst):
        argv += ["--ips", _csv([plan.nodes[h].ip for h in inst.hosts])]
    argv += ["--host", node.bind]
    return argv + inst.extra_args


def _env(plan: ClusterPlan, inst: Instance, node: Node, rank: Rank, name: str) -> dict:
    env = {
        "FD_LOG_DIR": f"{dirs_for(node.base_dir, node.role)['log']}/{name}",
        "CUDA_VISIBLE_DEVICES": ",".join(rank.devices),
        "ENABLE_V1_KVCACHE_SCHEDULER": "1" if plan.options["scheduler"] == "router" else "0",
    }
    nics = inst.opts["rdma_nics"].get(node.host)
    if nics:
        env["KVCACHE_RDMA_NICS"] = nics
    env.update(inst.env)
    return env


def _process(plan: ClusterPlan, inst: Instance, node: Node, rank: Rank) -> Process:
    name = f"fastdeploy-dp{rank.rank}"
    port = _api_port(inst, rank)
    ip = node.bind
    ports = [Port(host=ip, port=port + k, use=use) for k, use in enumerate(
        ("api", "metrics", "worker_queue", "cache_queue"))]
    ports.append(Port(host=ip, port=inst.opts["pd_comm_port"] + rank.local, use="pd_comm"))
    ports += [Port(host=ip, port=p, use="kv") for p in rdma_ports(inst, node, rank)]
    serves = rank.api_port is not None  # --ips: only the master accepts requests
    probe_host = node.ip if ip in ("0.0.0.0", "::") else ip
    ready = Ready.http(f"http://{probe_host}:{port}/health") if serves else None
    return Process(name=name, argv=_argv(plan, inst, node, rank),
                   env=_env(plan, inst, node, rank, name), ports=ports, ready=ready,
                   dp_ranks=[rank.rank])


def engine_spec(plan: ClusterPlan, node: Node) -> NodeSpec:
    inst = plan.instance(node.instance)
    processes = [_process(plan, inst, node, r) for r in node.ranks]
    real = inst.engine != "emulator"
    devices = [f"/dev/nvidia{d}" for d in node.devices] + ["/dev/nvidiactl"] if real else []
    return engine_spec_base(
        plan, node, processes,
        checks={"paths": [inst.model_path] if real else [], "devices": devices,
                "commands": [processes[0].argv[0]]},
        nic=None,
    )


# ---------------------------------------------------------------- services


def router_service(plan: ClusterPlan) -> Service:
    c = plan.proxies[0]
    o = plan.options
    port = o["router_port"]
    run = dirs_for(c.base_dir, "fd-router")["run"]
    files = []
    cmd = list(o["router_cmd"])
    if plan.instances and plan.instances[0].engine == "emulator":
        cmd = [c.python, "-m", "pd_launcher.emulator", "fd-router"]
    if any(part.endswith("fastdeploy.router.launch") for part in cmd):
        argv = cmd + ["--host", c.bind, "--port", str(port), "--splitwise"]
    else:  # the Go router: its bind address lives in its YAML (JSON is YAML)
        config = f"{run}/fd-router.yaml"
        files.append(SpecFile(path=config, content=json.dumps(
            {"server": {"host": c.bind, "port": port, "splitwise": True}}, indent=2) + "\n"))
        argv = cmd + ["--port", str(port), "--splitwise", "--config_path", config]
    host = c.ip if c.bind in ("0.0.0.0", "::") else c.bind
    check = [c.python, "-m", "pd_launcher.http_check",
             "--url", f"http://{host}:{port}/registered_number",
             "--expect", "prefill>=1", "--expect", "decode>=1"]
    return Service(
        name="fd-router", phase="after-engines",
        processes=[Process(name="fd-router", argv=argv, env={},
                           ports=[Port(host=c.bind, port=port, use="router")],
                           ready=Ready.tcp(host, port))],
        files=files, checks={"commands": [argv[0]]},
        port_vars={port: "pd_fastdeploy_router_port"},
        gate=Gate(check=check, what=f"FastDeploy router {host}:{port} with a registered "
                  "prefill and decode (GET /registered_number)"),
    )


def redis_conf(plan: ClusterPlan) -> str:
    c = plan.proxies[0]
    o = plan.options
    lines = [
        "# written by pd-deploy: the FastDeploy splitwise scheduler's Redis",
        f"bind {c.bind}",
        f"port {o['redis_port']}",
        f"dir {dirs_for(c.base_dir, 'redis')['state']}",
        "daemonize no",
        "set-proc-title no",  # keep the argv the launcher recorded (its PID checks)
        "protected-mode no",  # bound to the node's own address; requirepass when set
    ]
    if not o["redis_persistence"]:
        lines += ['save ""', "appendonly no"]
    else:
        lines += ["appendonly yes"]
    if o["redis_password"]:
        lines.append(f'requirepass "{o["redis_password"]}"')
    return "\n".join(lines) + "\n"


def redis_service(plan: ClusterPlan) -> Service:
    c = plan.proxies[0]
    o = plan.options
    conf = redis_conf_path(plan)
    host = c.ip if c.bind in ("0.0.0.0", "::") else c.bind
    check = [c.python, "-m", "pd_launcher.redis_nodes", "--config", conf, "--host", host,
             "--topic", topic(plan), "--expect", "prefill", "--expect", "decode"]
    return Service(
        name="redis", phase="before-engines",
        processes=[Process(name="redis-server", argv=[o["redis_bin"], conf], env={},
                           ports=[Port(host=c.bind, port=o["redis_port"], use="redis")],
                           ready=Ready.tcp(host, o["redis_port"]))],
        files=[SpecFile(path=conf, content=redis_conf(plan), mode=0o600)],
        pre_start=[[c.python, "-m", "pd_launcher.version_check", "--min", REDIS_MIN,
                    "--name", "redis-server", "--", o["redis_bin"], "--version"]],
        checks={"commands": [o["redis_bin"]]},
        port_vars={o["redis_port"]: "pd_redis_port"},
        gate=Gate(check=check, what=f"live prefill and decode entries in {topic(plan)}.cluster "
                  f"(Redis {host}:{o['redis_port']})"),
    )


# ---------------------------------------------------------------- the backend


def _int_list(r: Reader, name: str) -> list[int] | None:
    raw = r.raw(name)
    if raw is None or raw == "" or raw == []:
        return None
    items = raw.split(",") if isinstance(raw, str) else raw
    if not isinstance(items, (list, tuple)):
        r.fail(name, f"must be a list or a comma-separated string, got {raw!r}")
        return None
    out = []
    for item in items:
        text = str(item).strip()
        if isinstance(item, bool) or not text.isdigit() or not 1 <= int(text) <= 65535:
            r.fail(name, f"{item!r} is not a port (1..65535)")
            return None
        out.append(int(text))
    return out


class FastDeployBackend(Backend):
    name = "fastdeploy"
    title = "FastDeploy (router or Redis splitwise scheduler)"
    engines = ("fastdeploy",)
    emulates = ("fastdeploy",)
    owned_flags = OWNED_FLAGS
    instance_wide = ("pd_fastdeploy_python", "pd_fastdeploy_cache_transfer_protocol",
                     "pd_fastdeploy_pd_comm_port")
    variables = (
        Variable("pd_fastdeploy_scheduler", "router", "cluster", "router: FastDeploy's router "
                 "(v1), started after the engines, which register with it | redis: the "
                 "splitwise scheduler over Redis (v0, the PD guide's mode)."),
        Variable("pd_fastdeploy_python", "python", "instance", "Python of the FastDeploy image "
                 "(runs -m fastdeploy.entrypoints.openai.api_server)."),
        Variable("pd_fastdeploy_router_cmd", ["fd-router"], "cluster", "The router program "
                 "(argv list): the Go router fd-router (gets --port --splitwise --config_path) "
                 "or [python, -m, fastdeploy.router.launch] (gets --host --port --splitwise)."),
        Variable("pd_fastdeploy_router_port", 9000, "cluster", "Router port on the first C "
                 "host (router mode)."),
        Variable("pd_fastdeploy_cache_transfer_protocol", "rdma,ipc", "instance",
                 "--cache-transfer-protocol."),
        Variable("pd_fastdeploy_pd_comm_port", 2334, "instance", "First --pd-comm-port on a "
                 "node; DP rank j of the node uses + j."),
        Variable("pd_fastdeploy_rdma_comm_ports", None, "host", "Explicit --rdma-comm-ports "
                 "of the host (one per device, list or \"a,b\"). Default: the KV range "
                 "(pd_kv_port, default 7671, + rank * tp)."),
        Variable("pd_fastdeploy_topic", None, "cluster", "--scheduler-topic (redis mode). "
                 "Default: pd_cluster_name."),
        Variable("pd_fastdeploy_scheduler_ttl", 900, "cluster", "--scheduler-ttl seconds "
                 "(redis mode)."),
        Variable("pd_redis_port", 6379, "cluster", "Redis port on the first C host (redis "
                 "mode)."),
        Variable("pd_redis_password", None, "cluster", "Redis password (requirepass and "
                 "--scheduler-password). Optional; never logged; in a 0600 file."),
        Variable("pd_redis_bin", "redis-server", "cluster", "The redis-server binary "
                 "(>= 6.2, checked before start)."),
        Variable("pd_redis_persistence", False, "cluster", "Keep Redis' AOF persistence on "
                 "(off: the scheduler's data is transient)."),
        Variable("rdma_nics", None, "host", "KVCACHE_RDMA_NICS of the host (\"mlx5_0,mlx5_1\"). "
                 "Default: detected on the node as FastDeploy's get_rdma_nics.sh does."),
    )

    # ------------------------------------------------------------ reading

    def cluster_options(self, r: Reader) -> dict[str, Any]:
        cmd = r.typed("pd_fastdeploy_router_cmd", list) or ["fd-router"]
        password = r.raw("pd_redis_password")
        if password is not None and (not isinstance(password, str) or not password
                                     or any(ch in password for ch in "\"'\\\n\r\t ")):
            # never echo it: the message names the variable only
            r.fail("pd_redis_password", "must be a non-empty string without quotes, "
                   "backslashes or whitespace (it goes into redis.conf); value not shown")
            password = None
        return {
            "scheduler": r.text("pd_fastdeploy_scheduler", SCHEDULERS) or "router",
            "router_cmd": [str(x) for x in cmd],
            "router_port": r.port("pd_fastdeploy_router_port") or 9000,
            "topic": r.text("pd_fastdeploy_topic"),
            "ttl": r.integer("pd_fastdeploy_scheduler_ttl", 1, 10**7) or 900,
            "redis_port": r.port("pd_redis_port") or 6379,
            "redis_password": password,
            "redis_bin": r.text("pd_redis_bin") or "redis-server",
            "redis_persistence": r.boolean("pd_redis_persistence"),
        }

    def instance_options(self, engine: str, r: Reader) -> dict[str, Any] | None:
        opts = {
            "python": r.text("pd_fastdeploy_python"),
            "protocol": r.text("pd_fastdeploy_cache_transfer_protocol"),
            "pd_comm_port": r.port("pd_fastdeploy_pd_comm_port"),
            "rdma_ports": {}, "rdma_nics": {},
        }
        if None in opts.values():
            return None
        bad = [p for p in opts["protocol"].split(",") if p not in ("rdma", "ipc")]
        if bad or not opts["protocol"]:
            r.fail("pd_fastdeploy_cache_transfer_protocol", f"unknown protocol(s) "
                   f"{','.join(bad) or '(empty)'}; FastDeploy knows rdma and ipc")
            return None
        return opts

    def kv_port_base(self, inst: Instance) -> int | None:
        return 7671  # --rdma-comm-ports, one per device

    def kv_ports_per_rank(self, inst: Instance) -> int:
        return inst.tp

    def api_ports_per_rank(self, opts: Mapping[str, Any]) -> int:
        return API_BLOCK

    def uses_dp_rpc(self, inst: Instance) -> bool:
        return False

    def node_bindings(self, inst: Instance, node: Node) -> list[tuple[str, int, str, str]]:
        out = []
        for rank in node.ranks:
            port = _api_port(inst, rank)
            first = 0 if rank.api_port is None else 1  # the API port is the planner's
            out += [(node.bind, port + k, use, "pd_api_port") for k, use in enumerate(
                ("api", "metrics", "worker_queue", "cache_queue")) if k >= first]
            out.append((node.bind, inst.opts["pd_comm_port"] + rank.local, "pd_comm",
                         "pd_fastdeploy_pd_comm_port"))
        return out

    # ------------------------------------------------------------ rules

    def validate(self, plan: ClusterPlan, readers: Mapping[str, Reader]) -> None:
        o = plan.options
        cluster_r = next(iter(readers.values()))
        if o["scheduler"] == "redis" and not TOPIC_RE.match(topic(plan)):
            field = "pd_fastdeploy_topic" if o["topic"] else "pd_cluster_name"
            cluster_r.fail(field, f"topic {topic(plan)!r} cannot name FastDeploy's Redis keys "
                           "(<topic>.cluster, ReqQ_*): use letters, digits and _ . : - "
                           "(at most 200), starting with a letter or digit")
        if o["scheduler"] == "router" and o["redis_password"]:
            cluster_r.fail("pd_redis_password", "is set but pd_fastdeploy_scheduler is router "
                           "(no Redis)")
        for inst in plan.instances:
            self._host_inputs(plan, inst, readers)
            if _ips_mode(inst):
                for host in inst.hosts:
                    node = plan.nodes[host]
                    if len(node.devices) > MAX_IPS_DEVICES:
                        readers[host].fail("devices", f"{len(node.devices)} devices: "
                                           f"FastDeploy's multi-node mode (--ips) allows at "
                                           f"most {MAX_IPS_DEVICES} per node")
                    if len(node.ranks) != 1:
                        readers[host].fail("devices", f"{len(node.devices)} devices with "
                                           f"pd_tp {inst.tp}: a node of a multi-node (--ips) "
                                           "instance holds one DP rank (devices == pd_tp)")
            elif inst.dp_mode == "internal" and len(plan.nodes[inst.master].ranks) > 1:
                readers[inst.master].fail("pd_dp_mode", "internal DP on one node: use "
                                          "external (one api_server per DP rank)")
        prefill = [i for i in plan.instances if i.role == "P"]
        for d in (i for i in plan.instances if i.role == "D"):
            for p in prefill:
                if d.tp not in (p.tp, 1):
                    readers[d.master].fail("pd_tp", f"decode {d.name} has tp {d.tp} but "
                                           f"prefill {p.name} has tp {p.tp}: FastDeploy's "
                                           "router needs equal TP or decode TP 1")
        for inst in plan.instances:
            for arg in inst.extra_args:
                if arg.split("=", 1)[0] in ("--innode-prefill-ports", "--inner-prefill-ports"):
                    readers[inst.master].fail("pd_extra_args", f"{arg.split('=', 1)[0]} was "
                                              "removed from FastDeploy 2.x (the guide's "
                                              "single-host flag); remove it")

    def _host_inputs(self, plan: ClusterPlan, inst: Instance,
                     readers: Mapping[str, Reader]) -> None:
        for host in inst.hosts:
            r = readers[host]
            node = plan.nodes[host]
            ports = _int_list(r, "pd_fastdeploy_rdma_comm_ports")
            if ports is not None:
                if len(ports) != len(node.devices):
                    r.fail("pd_fastdeploy_rdma_comm_ports", f"{len(ports)} ports for "
                           f"{len(node.devices)} devices: --rdma-comm-ports needs one per "
                           "device")
                else:
                    inst.opts["rdma_ports"][host] = ports
            nics = r.raw("rdma_nics")
            if nics:
                text = ",".join(nics) if isinstance(nics, (list, tuple)) else str(nics)
                if not re.match(r"^[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*$", text):
                    r.fail("rdma_nics", f"{text!r} is not a comma-separated list of NIC names")
                else:
                    inst.opts["rdma_nics"][host] = text

    # ------------------------------------------------------------ what runs

    def node_spec(self, plan: ClusterPlan, node: Node) -> NodeSpec:
        return engine_spec(plan, node)

    def services(self, plan: ClusterPlan) -> list[Service]:
        if plan.options["scheduler"] == "router":
            return [router_service(plan)]
        return [redis_service(plan)]

    def front_door(self, plan: ClusterPlan) -> FrontDoor:
        c = plan.proxies[0]
        if plan.options["scheduler"] == "router":
            host = c.ip if c.bind in ("0.0.0.0", "::") else c.bind
            entry = f"{host}:{plan.options['router_port']}"
            # the Go router has no /health: the agent probes it with a TCP connect
            return FrontDoor(mode="router", router=[entry], entry=entry, health_path=None)
        decode = plan.upstreams("D")
        return FrontDoor(mode="router", router=decode, entry=decode[0] if decode else None,
                         health_path="/health")
