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
from pd_deploy.settings import PER_RANK_API_MODES, Reader, Variable
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
#: vLLM releases planned for, per flavour: (major, minor) -> the pair that was checked
#: (docs/vllm-versions.md). pd_vllm_version names the vLLM version of the image.
SUPPORTED_VLLM = {
    "vllm-ascend": {(0, 23): "vLLM 0.23.0 + vLLM-Ascend 0.23.0 / 0.23.0.post1"},
    "vllm": {(0, 33): "vLLM 0.33.0"},
}
DEFAULT_VLLM = {"vllm-ascend": "0.23.0", "vllm": "0.33.0"}
#: kv_transfer_config.kv_load_failure_policy (vLLM 0.23.0 and 0.33.0 config/kv_transfer.py)
KV_LOAD_FAILURE_POLICIES = ("fail", "recompute")
#: KV connectors whose prefill -> decode flow the front door drives, per flavour
CONNECTORS = {
    "vllm-ascend": ("MooncakeConnectorV1", "MooncakeHybridConnector"),
    "vllm": ("NixlConnector",),
}
#: connectors an operator may know, and why they are not planned
_POOL = "a KV pool / offload connector, not a prefill-to-decode transfer"
REFUSED_CONNECTORS = {
    "MooncakeLayerwiseConnector": "its decode is chosen first and the prefill pushes to it "
    "layer by layer (a decode-first proxy with a metaserver URL); the front door sends "
    "requests to a prefill first",
    "LLMDataDistCMgrConnector": "no longer in vLLM-Ascend (0.23.0 registers only the "
    "Mooncake connectors for prefill-to-decode transfer)",
    "MooncakeConnector": "upstream vLLM's CUDA Mooncake connector; on Ascend it is "
    "MooncakeConnectorV1",
    "MultiConnector": "composite connectors are not planned",
    **{name: _POOL for name in (
        "MooncakeConnectorStoreV1", "AscendStoreConnector", "UCMConnector",
        "LMCacheAscendConnector", "LMCacheConnectorV1", "SimpleCPUOffloadConnector",
        "RecomputeCPUOffloadConnector", "OffloadingConnector")},
}
#: Mooncake connectors where only the producer listens (the decode pulls) and which read
#: kv_connector_extra_config.prefill/decode (vLLM-Ascend 0.23.0 kv_p2p/)
MOONCAKE_PULL = ("MooncakeConnectorV1", "MooncakeHybridConnector")
#: pd_extra_args flags that change the DP/KV layout the planner computes
LAYOUT_FLAGS = {
    "--pipeline-parallel-size": "widens every rank's Mooncake port block (tp * pp) and "
    "decode must run pp 1",
    "-pp": "widens every rank's Mooncake port block (tp * pp) and decode must run pp 1",
    "--prefill-context-parallel-size": "widens every rank's Mooncake port block (tp * pcp)",
    "--nnodes": "multi-node tensor parallelism is not planned (use DP ranks of tp devices)",
    "-n": "multi-node tensor parallelism is not planned (use DP ranks of tp devices)",
    "--node-rank": "multi-node tensor parallelism is not planned",
    "-r": "multi-node tensor parallelism is not planned",
    "--data-parallel-backend": "the planner runs DP with vLLM's own multiprocessing backend",
    "-dpb": "the planner runs DP with vLLM's own multiprocessing backend",
    "--data-parallel-multi-port-external-lb": "the planner chooses the DP mode (pd_dp_mode)",
    "-dpm": "the planner chooses the DP mode (pd_dp_mode)",
}
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


def engine_dp(inst: Instance) -> int:
    """--data-parallel-size of one engine process (independent ranks are DP=1 engines)."""
    return 1 if inst.dp_mode == "independent" else inst.dp_size


def _kv_shape(plan: ClusterPlan, role: str) -> dict[str, int]:
    first = next(i for i in plan.instances if i.role == role)
    return {"dp_size": engine_dp(first), "tp_size": first.tp}


def kv_transfer_config(plan: ClusterPlan, inst: Instance,
                       rank: Rank | None = None) -> dict[str, Any]:
    """--kv-transfer-config of one process; `rank` is its DP rank (per-rank modes).

    Only fields the release reads (vLLM-Ascend 0.23.0's tutorial and kv_p2p/ sources):
    kv_rank/kv_parallel_size are never sent (vLLM >= 0.32 refuses them, vLLM-Ascend
    never read them) and kv_buffer_device is left to the platform's default."""
    independent = inst.dp_mode == "independent" and rank is not None
    engine_id = f"{plan.cluster}-{inst.engine_id}"
    if independent:
        engine_id += f"-r{rank.rank}"  # DP=1 engines: vLLM adds no _dp<rank> suffix
    cfg: dict[str, Any] = {
        "kv_connector": inst.opts["connector"],
        "kv_role": "kv_producer" if inst.role == "P" else "kv_consumer",
        "engine_id": engine_id,
    }
    if inst.role == "D" and inst.opts.get("kv_load_failure_policy"):
        # read by the scheduler of the engine that loads KV (vLLM 0.23 and 0.33 have it)
        cfg["kv_load_failure_policy"] = inst.opts["kv_load_failure_policy"]
    if inst.opts["flavour"] == "vllm-ascend":
        # vLLM-Ascend adds data_parallel_rank * tp itself; a DP=1 engine is rank 0
        cfg["kv_port"] = rank.kv_port if independent else inst.kv_port
        if inst.opts["connector"] in MOONCAKE_PULL:
            cfg["kv_connector_extra_config"] = {
                "prefill": _kv_shape(plan, "P"), "decode": _kv_shape(plan, "D")}
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
    if engine_dp(inst) > 1:
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
             json.dumps(kv_transfer_config(plan, inst, rank), separators=(",", ":"))]
    # the API key goes in VLLM_API_KEY (_engine_env), never in argv: argv shows in `ps`
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
            # vLLM adds the DP rank; a DP=1 engine (independent) is rank 0
            port = ranks[0].kv_port if inst.dp_mode == "independent" else inst.kv_port
            env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(port)
    env["VLLM_HOST_IP"] = node.ip  # vLLM-Ascend's Mooncake advertises get_ip()
    if plan.engine_api_key:
        # read when --api-key is absent (vllm/entrypoints/serve/middleware/register.py);
        # a headless node serves no HTTP, so setting it there changes nothing
        env["VLLM_API_KEY"] = str(plan.engine_api_key)
    env.update(inst.env)
    return env


def _ports(inst: Instance, node: Node, ranks: list[Rank], headless: bool) -> list[Port]:
    ports = []
    for rank in ranks:
        if rank.api_port is not None and not headless:
            ports.append(Port(host=node.bind, port=rank.api_port, use="api"))
    if node.master and ranks[0].rank == 0 and engine_dp(inst) > 1:
        ports.append(Port(host=node.ip, port=inst.dp_rpc_port, use="dp_rpc"))
    if not listens_on_kv(inst):
        return ports
    use = "nixl" if inst.opts["connector"] == "NixlConnector" else "kv"
    # Mooncake: every tp worker of a rank has a port (the emulator binds the first);
    # NIXL: one side channel per engine
    mooncake = inst.opts["connector"].startswith("Mooncake")
    width = inst.tp if mooncake and inst.engine != "emulator" else 1
    for rank in ranks:
        for t in range(width):
            ports.append(Port(host=node.ip, port=rank.kv_port + t, use=use))
    return ports


def listens_on_kv(inst: Instance) -> bool:
    """Mooncake V1/Hybrid: only the producer binds its side channel, the decode pulls."""
    return inst.role == "P" or inst.opts["connector"] not in MOONCAKE_PULL


def _health_url(node: Node, port: int | None) -> str:
    host = node.ip if node.bind in ("0.0.0.0", "::") else node.bind
    return f"http://{host}:{port}/health"


def _process(plan: ClusterPlan, inst: Instance, node: Node, ranks: list[Rank],
             rank: Rank | None, name: str) -> Process:
    headless = rank is None and not node.master
    if headless and listens_on_kv(inst):
        ready = Ready.tcp(node.ip, ranks[0].kv_port)
    elif headless:
        # binds nothing of its own: ready once the master, which waits for every DP
        # engine (this node's included) before it serves, answers /health
        master = plan.nodes[inst.master]
        ready = Ready.http(_health_url(master, master.ranks[0].api_port))
    else:
        ready = Ready.http(_health_url(node, ranks[0].api_port))
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
    if inst.dp_mode in PER_RANK_API_MODES:
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
    instance_wide = ("pd_connector", "pd_kv_load_failure_policy")
    dp_modes = ("external", "internal", "independent")
    variables = (
        Variable("pd_connector", None, "instance", "KV connector: MooncakeConnectorV1 "
                 "(vllm-ascend default) or MooncakeHybridConnector; NixlConnector (vllm). Its "
                 "KV ports: Mooncake base + rank * tp (+ tp worker), NIXL base + rank; "
                 "defaults 36000 (Mooncake), 5600 (NIXL)."),
        Variable("pd_kv_load_failure_policy", None, "instance", "What a decode engine does "
                 "when loading a request's KV from the prefill fails (kv_transfer_config "
                 "kv_load_failure_policy, vLLM 0.23 and 0.33): fail (the request ends with "
                 "an error) | recompute (the decode prefills it locally). Unset: vLLM's "
                 "default, fail, and the field is not sent. Sent to D instances only."),
        Variable("pd_model_is_mla", False, "cluster", "The model uses MLA: lifts the rule that "
                 "prefill tp must be a multiple of decode tp (Mooncake)."),
        Variable("pd_model_is_moe", True, "cluster", "The model is a mixture of experts. "
                 "false (dense): vLLM refuses external DP for it, and on vLLM-Ascend every "
                 "internal DP engine would bind the same Mooncake ports: use pd_dp_mode "
                 "independent."),
        Variable("pd_vllm_version", None, "cluster", "vLLM version in the image (a release, "
                 "X.Y.Z[.postN]); decides version-specific fields. Planned: 0.23.x for "
                 "vllm-ascend (default 0.23.0, with vLLM-Ascend 0.23.0/0.23.0.post1), 0.33.x "
                 "for vllm (default 0.33.0); others are refused."),
    )

    def cluster_options(self, r: Reader) -> dict[str, Any]:
        raw = r.raw("pd_vllm_version")
        version = None if raw is None else version_tuple(raw)
        if raw is not None and version is None:
            r.fail("pd_vllm_version", f"cannot read version {raw!r}: give a release "
                   "X.Y.Z or X.Y.Z.postN (pre-releases are not planned)")
        return {"vllm_version": version, "model_is_moe": r.boolean("pd_model_is_moe"),
                "model_is_mla": r.boolean("pd_model_is_mla")}

    def instance_options(self, engine: str, r: Reader) -> dict[str, Any] | None:
        flavour: str | None = engine
        if engine == "emulator":
            flavour = r.text("pd_emulate", FLAVOURS)
        if flavour is None:
            return None
        connector = r.text("pd_connector") or CONNECTORS[flavour][0]
        if connector not in CONNECTORS[flavour]:
            why = REFUSED_CONNECTORS.get(connector, "not a connector pd-deploy plans")
            r.fail("pd_connector", f"{connector!r} is not planned for {flavour}: {why}; use "
                   f"{' or '.join(CONNECTORS[flavour])}")
            return None
        policy = r.text("pd_kv_load_failure_policy", KV_LOAD_FAILURE_POLICIES)
        return {"flavour": flavour, "connector": connector, "kv_load_failure_policy": policy}

    def kv_port_base(self, inst: Instance) -> int | None:
        return 5600 if inst.opts["flavour"] == "vllm" else 36000

    def kv_ports_per_rank(self, inst: Instance) -> int:
        # As the connectors compute it, from the GLOBAL DP rank r (vLLM 0.33 nixl
        # base_scheduler; vLLM-Ascend mooncake_connector): Mooncake listens on
        # kv_port + r * tp (+ tp worker index), NIXL on kv_port + r (one per engine).
        return inst.tp if inst.opts["connector"].startswith("Mooncake") else 1

    def uses_dp_rpc(self, inst: Instance) -> bool:
        return engine_dp(inst) > 1

    def validate(self, plan: ClusterPlan, readers: Mapping[str, Reader]) -> None:
        _check_versions(plan, readers)
        _check_dense_dp(plan, readers)
        _check_layout_flags(plan, readers)
        _check_mooncake_random_ports(plan, readers)
        _check_mooncake_shapes(plan, readers)

    def node_spec(self, plan: ClusterPlan, node: Node) -> NodeSpec:
        return engine_spec(plan, node)


def vllm_version(plan: ClusterPlan, flavour: str) -> tuple[int, ...]:
    """The planned vLLM version: pd_vllm_version, else the flavour's default."""
    return plan.options["vllm_version"] or version_tuple(DEFAULT_VLLM[flavour]) or ()


def _cluster_reader(readers: Mapping[str, Reader]) -> Reader:
    return next(iter(readers.values()))  # cluster scope: read from the first host


def _check_versions(plan: ClusterPlan, readers: Mapping[str, Reader]) -> None:
    if plan.options["vllm_version"] is None:
        return  # unset (each flavour's default) or unreadable (already an error)
    for flavour in dict.fromkeys(i.opts["flavour"] for i in plan.instances):
        version = vllm_version(plan, flavour)
        if version[:2] not in SUPPORTED_VLLM[flavour]:
            planned = "; ".join(f"{'.'.join(map(str, k))}.x ({v})"
                                for k, v in SUPPORTED_VLLM[flavour].items())
            _cluster_reader(readers).fail(
                "pd_vllm_version",
                f"vLLM {'.'.join(map(str, version))} is not planned for {flavour}: its flags "
                f"and kv_transfer_config fields were checked only for {planned}")


def _check_dense_dp(plan: ClusterPlan, readers: Mapping[str, Reader]) -> None:
    if plan.options["model_is_moe"]:
        return
    for inst in plan.instances:
        if inst.dp_size < 2:
            continue
        r = readers[inst.master]
        if inst.dp_mode == "external":
            r.fail("pd_dp_mode", f"instance {inst.name} runs {inst.dp_size} DP ranks with "
                   "external DP, which vLLM refuses for a dense model (pd_model_is_moe: "
                   "false) at start-up; use pd_dp_mode: independent")
        elif (inst.dp_mode == "internal" and inst.opts["flavour"] == "vllm-ascend"
              and inst.opts["connector"].startswith("Mooncake")):
            r.fail("pd_dp_mode", f"instance {inst.name}: vLLM runs the {inst.dp_size} DP "
                   "engines of a dense model as DP rank 0 each, so vLLM-Ascend's Mooncake "
                   "binds the same KV ports in all of them (address in use); use pd_dp_mode: "
                   "independent")


def _check_layout_flags(plan: ClusterPlan, readers: Mapping[str, Reader]) -> None:
    for inst in plan.instances:
        for arg in inst.extra_args:
            flag = arg.split("=", 1)[0]
            if flag in LAYOUT_FLAGS:
                readers[inst.master].fail(
                    "pd_extra_args", f"{flag} is not planned: {LAYOUT_FLAGS[flag]}")


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
    mooncake = [i for i in plan.instances if i.opts["connector"] in MOONCAKE_PULL]
    for role in ("P", "D"):
        same = [i for i in mooncake if i.role == role]
        for inst in same[1:]:
            shape, first = (engine_dp(inst), inst.tp), (engine_dp(same[0]), same[0].tp)
            if shape != first:
                readers[inst.master].fail(
                    "pd_tp" if inst.tp != same[0].tp else "devices",
                    f"{role} instance {inst.name} runs DP{shape[0]}xTP{shape[1]} engines but "
                    f"{same[0].name} DP{first[0]}xTP{first[1]}; with "
                    f"{inst.opts['connector']} every {role} instance must have the same shape "
                    "(kv_connector_extra_config)")
    prefill = [i for i in mooncake if i.role == "P"]
    decode = [i for i in mooncake if i.role == "D"]
    if not (prefill and decode):
        return
    p, d = prefill[0], decode[0]
    connector = p.opts["connector"]
    if p.tp < d.tp:
        readers[p.master].fail(
            "pd_tp", f"prefill tp {p.tp} is smaller than decode tp {d.tp}; {connector} "
            "refuses that at start-up (MLA models too)")
    elif p.tp % d.tp and (connector == "MooncakeHybridConnector"
                          or not plan.options["model_is_mla"]):
        why = ("for hybrid KV caches" if connector == "MooncakeHybridConnector" else
               "for non-MLA models; set pd_model_is_mla: true if it is MLA")
        readers[p.master].fail(
            "pd_tp", f"prefill tp {p.tp} is not a multiple of decode tp {d.tp} (required by "
            f"vLLM-Ascend {why})")
