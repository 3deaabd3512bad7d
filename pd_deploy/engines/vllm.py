"""The vLLM family backend: vLLM-Ascend (Mooncake), vLLM (NIXL) and the emulator.

`vllm serve` per DP rank (external DP) or per node (internal DP, --headless on the
non-masters), KV handoff through the connector named in --kv-transfer-config, no
cluster services: the front door (nginx + njs) is itself the PD router. The engine
emulator takes exactly the flags of the flavour it emulates (pd_emulate).
No arithmetic here beyond reading the plan: ranks, ports and slices come from
pd_deploy.topology.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

from pd_deploy.engines.base import Backend
from pd_deploy.settings import Reader, Variable
from pd_deploy.specs import engine_spec_base
from pd_deploy.topology import ClusterPlan, Instance, Node, Rank, version_tuple
from pd_launcher.launcher.spec import Nic, NodeSpec, Port, Process, Ready

MOONCAKE_RANDOM_BASE = 20000  # Mooncake takes random ports in [20000, 20000 + chips*1000)
OWNED_FLAGS = (
    "--host", "--port", "--served-model-name", "--tensor-parallel-size", "-tp",
    "--data-parallel-size", "-dp", "--data-parallel-rank", "-dpn", "--data-parallel-size-local",
    "-dpl", "--data-parallel-start-rank", "-dpr", "--data-parallel-address", "-dpa",
    "--data-parallel-rpc-port", "-dpp", "--headless", "--kv-transfer-config", "--api-key",
    "--data-parallel-external-lb", "--data-parallel-hybrid-lb",
)
FLAVOURS = ("vllm", "vllm-ascend")
ASCEND_NIC_ENV = ["GLOO_SOCKET_IFNAME", "TP_SOCKET_IFNAME", "HCCL_SOCKET_IFNAME"]
GPU_NIC_ENV = ["GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"]
ASCEND_ENV = {
    "OMP_PROC_BIND": "false",
    "OMP_NUM_THREADS": "10",
    "PYTORCH_NPU_ALLOC_CONF": "expandable_segments:True",
    "TASK_QUEUE_ENABLE": "1",
    "HCCL_OP_EXPANSION_MODE": "AIV",
    "HCCL_CONNECT_TIMEOUT": "120",
    "HCCL_EXEC_TIMEOUT": "204",
}
ASCEND_HCCL_BUFFSIZE = {"P": "256", "D": "1024"}
ASCEND_DEVICE_FILES = ["/dev/davinci_manager", "/dev/devmm_svm", "/dev/hisi_hdc"]


# ---------------------------------------------------------------- engines


def kv_transfer_config(plan: ClusterPlan, inst: Instance) -> dict[str, Any]:
    producer = inst.role == "P"
    cfg: dict[str, Any] = {
        "kv_connector": inst.opts["connector"],
        "kv_role": "kv_producer" if producer else "kv_consumer",
        "engine_id": f"{plan.cluster}-{inst.engine_id}",
    }
    if inst.opts["flavour"] == "vllm-ascend":
        cfg["kv_buffer_device"] = "npu"
        cfg["kv_port"] = inst.kv_port
        if inst.opts["connector"].startswith("Mooncake"):
            p_dp, p_tp = plan.shape("P")
            d_dp, d_tp = plan.shape("D")
            cfg["kv_connector_extra_config"] = {
                "prefill": {"dp_size": p_dp, "tp_size": p_tp},
                "decode": {"dp_size": d_dp, "tp_size": d_tp},
            }
    if plan.options["vllm_version"] < (0, 32):
        cfg["kv_rank"] = 0 if producer else 1
        cfg["kv_parallel_size"] = 1
    return cfg


def _engine_argv(plan: ClusterPlan, inst: Instance, node: Node, rank: Rank | None) -> list[str]:
    """The `vllm serve` flags of one process: rank for external DP, None for internal."""
    if inst.engine == "emulator":
        argv = [node.python, "-m", "pd_launcher.emulator", "serve", inst.model_path]
    else:
        argv = ["vllm", "serve", inst.model_path]
    headless = rank is None and not node.master
    argv += ["--host", node.bind]
    if not headless:
        port = rank.api_port if rank else node.ranks[0].api_port
        argv += ["--port", str(port)]
    argv += ["--served-model-name", inst.served_model_name,
             "--tensor-parallel-size", str(inst.tp)]
    if inst.dp_size > 1:
        argv += ["--data-parallel-size", str(inst.dp_size)]
        if rank is not None:
            argv += ["--data-parallel-rank", str(rank.rank)]
        else:
            argv += ["--data-parallel-size-local", str(len(node.ranks))]
            if headless:
                argv += ["--headless", "--data-parallel-start-rank", str(node.start_rank)]
        argv += ["--data-parallel-address", plan.nodes[inst.master].ip,
                 "--data-parallel-rpc-port", str(inst.dp_rpc_port)]
    argv += ["--kv-transfer-config",
             json.dumps(kv_transfer_config(plan, inst), separators=(",", ":"))]
    if plan.engine_api_key and not headless:
        argv += ["--api-key", str(plan.engine_api_key)]
    return argv + inst.extra_args


def _engine_env(plan: ClusterPlan, inst: Instance, node: Node, ranks: list[Rank]) -> dict:
    devices = ",".join(d for r in ranks for d in r.devices)
    env: dict[str, str] = {}
    if inst.opts["flavour"] == "vllm-ascend":
        env.update(ASCEND_ENV)
        env["HCCL_BUFFSIZE"] = ASCEND_HCCL_BUFFSIZE[inst.role]
        env["HCCL_IF_IP"] = node.ip
        env["ASCEND_RT_VISIBLE_DEVICES"] = devices
    else:
        env["CUDA_VISIBLE_DEVICES"] = devices
        if inst.opts["connector"] == "NixlConnector":
            env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = node.ip
            env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(inst.kv_port)  # vLLM adds the DP rank
    env["VLLM_HOST_IP"] = node.ip  # vLLM-Ascend's Mooncake advertises get_ip()
    env.update(inst.env)
    return env


def _ports(inst: Instance, node: Node, ranks: list[Rank], headless: bool) -> list[Port]:
    ports = []
    for rank in ranks:
        if rank.api_port is not None and not headless:
            ports.append(Port(host=node.bind, port=rank.api_port, use="api"))
    if node.master and ranks[0].rank == 0 and inst.dp_size > 1:
        ports.append(Port(host=node.ip, port=inst.dp_rpc_port, use="dp_rpc"))
    use = "nixl" if inst.opts["connector"] == "NixlConnector" else "kv"
    # Mooncake: every tp worker of a rank has a port (the emulator binds the first);
    # NIXL: one side channel per engine
    mooncake = inst.opts["connector"].startswith("Mooncake")
    width = inst.tp if mooncake and inst.engine != "emulator" else 1
    for rank in ranks:
        for t in range(width):
            ports.append(Port(host=node.ip, port=rank.kv_port + t, use=use))
    return ports


def _process(plan: ClusterPlan, inst: Instance, node: Node, ranks: list[Rank],
             rank: Rank | None, name: str) -> Process:
    headless = rank is None and not node.master
    ready_host = node.ip if node.bind in ("0.0.0.0", "::") else node.bind
    if headless:
        ready = Ready.tcp(node.ip, ranks[0].kv_port)
    else:
        ready = Ready.http(f"http://{ready_host}:{ranks[0].api_port}/health")
    return Process(
        name=name,
        argv=_engine_argv(plan, inst, node, rank),
        env=_engine_env(plan, inst, node, ranks),
        ports=_ports(inst, node, ranks, headless),
        ready=ready,
        dp_ranks=[r.rank for r in ranks],
    )


def engine_spec(plan: ClusterPlan, node: Node) -> NodeSpec:
    inst = plan.instance(node.instance)
    if inst.dp_mode == "external":
        processes = [_process(plan, inst, node, [r], r, f"engine-dp{r.rank}") for r in node.ranks]
    else:
        what = "engine" if node.master else "engine-headless"
        processes = [_process(plan, inst, node, node.ranks, None, what)]
    real = inst.engine != "emulator"
    devices: list[str] = []
    if real and inst.opts["flavour"] == "vllm-ascend":
        devices = [f"/dev/davinci{d}" for d in node.devices] + ASCEND_DEVICE_FILES
    elif real:
        devices = [f"/dev/nvidia{d}" for d in node.devices] + ["/dev/nvidiactl"]
    nic_env = ASCEND_NIC_ENV if inst.opts["flavour"] == "vllm-ascend" else GPU_NIC_ENV
    return engine_spec_base(
        plan, node, processes,
        checks={"paths": [inst.model_path] if real else [], "devices": devices,
                "commands": [processes[0].argv[0]]},
        nic=Nic(ip=node.ip, name=node.nic, env=list(nic_env)),
    )


# ---------------------------------------------------------------- the backend


class VllmBackend(Backend):
    name = "vllm"
    title = "vLLM family (vLLM-Ascend, vLLM, emulator)"
    engines = ("vllm-ascend", "vllm")
    emulates = FLAVOURS
    owned_flags = OWNED_FLAGS
    instance_wide = ("pd_connector",)
    variables = (
        Variable("pd_connector", None, "instance", "KV connector. Default MooncakeConnectorV1 "
                 "(vllm-ascend), NixlConnector (vllm). Its KV ports: Mooncake base + rank * tp "
                 "(+ tp worker), NIXL base + rank; defaults 36000 (Mooncake), 5600 (NIXL)."),
        Variable("pd_model_is_mla", False, "cluster", "The model uses MLA: lifts the rule that "
                 "prefill tp must be a multiple of decode tp (Mooncake)."),
        Variable("pd_vllm_version", "0.33.0", "cluster", "vLLM version of the image; decides "
                 "version specific fields (kv_rank/kv_parallel_size only before 0.32)."),
    )

    def cluster_options(self, r: Reader) -> dict[str, Any]:
        version = version_tuple(r.raw("pd_vllm_version"))
        if version is None:
            r.fail("pd_vllm_version", f"cannot read version {r.raw('pd_vllm_version')!r}")
            version = (0, 33, 0)
        return {"vllm_version": version}

    def instance_options(self, engine: str, r: Reader) -> dict[str, Any] | None:
        flavour: str | None = engine
        if engine == "emulator":
            flavour = r.text("pd_emulate", FLAVOURS)
        if flavour is None:
            return None
        connector = r.text("pd_connector") or (
            "NixlConnector" if flavour == "vllm" else "MooncakeConnectorV1")
        return {"flavour": flavour, "connector": connector}

    def kv_port_base(self, inst: Instance) -> int | None:
        return 5600 if inst.opts["flavour"] == "vllm" else 36000

    def kv_ports_per_rank(self, inst: Instance) -> int:
        # As the connectors compute it, from the GLOBAL DP rank r (vLLM 0.33 nixl
        # base_scheduler; vLLM-Ascend mooncake_connector): Mooncake listens on
        # kv_port + r * tp (+ tp worker index), NIXL on kv_port + r (one per engine).
        return inst.tp if inst.opts["connector"].startswith("Mooncake") else 1

    def validate(self, plan: ClusterPlan, readers: Mapping[str, Reader]) -> None:
        _check_mooncake_random_ports(plan, readers)
        _check_mooncake_shapes(plan, readers)

    def node_spec(self, plan: ClusterPlan, node: Node) -> NodeSpec:
        return engine_spec(plan, node)


def _check_mooncake_random_ports(plan: ClusterPlan, readers: Mapping[str, Reader]) -> None:
    for inst in plan.instances:
        if inst.opts["flavour"] != "vllm-ascend" or not inst.opts["connector"].startswith(
                "Mooncake"):
            continue
        for host in inst.hosts:
            ranks = plan.nodes[host].ranks
            if not ranks:
                continue
            chips = inst.tp * len(ranks)
            low, top = ranks[0].kv_port, ranks[-1].kv_port + inst.tp - 1
            hi = MOONCAKE_RANDOM_BASE + chips * 1000
            if low < hi and top >= MOONCAKE_RANDOM_BASE:
                readers[host].fail(
                    "pd_kv_port",
                    f"KV range {low}..{top} of instance {inst.name} overlaps the "
                    f"ports Mooncake picks at random ({MOONCAKE_RANDOM_BASE}..{hi - 1} with "
                    f"{chips} chips); use pd_kv_port >= {hi}")


def _check_mooncake_shapes(plan: ClusterPlan, readers: Mapping[str, Reader]) -> None:
    mooncake = [i for i in plan.instances if i.opts["connector"].startswith("Mooncake")]
    for role in ("P", "D"):
        same = [i for i in mooncake if i.role == role]
        for inst in same[1:]:
            if (inst.dp_size, inst.tp) != (same[0].dp_size, same[0].tp):
                readers[inst.master].fail(
                    "pd_tp" if inst.tp != same[0].tp else "devices",
                    f"{role} instance {inst.name} is DP{inst.dp_size}xTP{inst.tp} but "
                    f"{same[0].name} is DP{same[0].dp_size}xTP{same[0].tp}; with "
                    f"{inst.opts['connector']} every {role} instance must have the same shape "
                    "(kv_connector_extra_config)")
    prefill = [i for i in mooncake if i.role == "P"]
    decode = [i for i in mooncake if i.role == "D"]
    cluster_r = next(iter(readers.values()))  # cluster scope: read from the first host
    if prefill and decode and not cluster_r.boolean("pd_model_is_mla"):
        p, d = prefill[0], decode[0]
        if p.tp % d.tp:
            readers[p.master].fail(
                "pd_tp", f"prefill tp {p.tp} is not a multiple of decode tp {d.tp} (required by "
                f"{p.opts['connector']} for non-MLA models; set pd_model_is_mla: true if it is "
                "MLA)")
