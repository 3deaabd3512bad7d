"""ClusterPlan -> node specs (argv, env and ports of every process), per flavour.

A node spec is the exact input of `python -m pd_launcher run` (docs/node-spec.md).
No arithmetic here beyond reading the plan: ranks, ports and slices come from
pd_launcher.topology.
"""
from __future__ import annotations

import json
from typing import Any

from pd_launcher.topology import ClusterPlan, Instance, Node, ProxyHost, Rank

SCHEMA = 1
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


def dirs_for(base_dir: str, role: str) -> dict[str, str]:
    return {
        "state": f"{base_dir}/state/{role}",
        "log": f"{base_dir}/logs/{role}",
        "run": f"{base_dir}/run/{role}",
    }


def node_specs(plan: ClusterPlan) -> dict[str, dict[str, dict[str, Any]]]:
    """host -> role -> node spec, for every host of the cluster."""
    specs: dict[str, dict[str, dict[str, Any]]] = {}
    for node in plan.nodes.values():
        specs.setdefault(node.host, {})[node.role] = engine_spec(plan, node)
    for proxy in plan.proxies:
        specs.setdefault(proxy.host, {})["C"] = proxy_spec(plan, proxy)
    return specs


# ---------------------------------------------------------------- engines


def kv_transfer_config(plan: ClusterPlan, inst: Instance) -> dict[str, Any]:
    producer = inst.role == "P"
    cfg: dict[str, Any] = {
        "kv_connector": inst.connector,
        "kv_role": "kv_producer" if producer else "kv_consumer",
        "engine_id": f"{plan.cluster}-{inst.engine_id}",
    }
    if inst.flavour == "vllm-ascend":
        cfg["kv_buffer_device"] = "npu"
        cfg["kv_port"] = inst.kv_port
        if inst.connector.startswith("Mooncake"):
            p_dp, p_tp = plan.shape("P")
            d_dp, d_tp = plan.shape("D")
            cfg["kv_connector_extra_config"] = {
                "prefill": {"dp_size": p_dp, "tp_size": p_tp},
                "decode": {"dp_size": d_dp, "tp_size": d_tp},
            }
    if plan.vllm_version < (0, 32):
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
    if inst.flavour == "vllm-ascend":
        env.update(ASCEND_ENV)
        env["HCCL_BUFFSIZE"] = ASCEND_HCCL_BUFFSIZE[inst.role]
        env["HCCL_IF_IP"] = node.ip
        env["ASCEND_RT_VISIBLE_DEVICES"] = devices
    else:
        env["CUDA_VISIBLE_DEVICES"] = devices
        if inst.connector == "NixlConnector":
            env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = node.ip
            env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(inst.kv_port)  # vLLM adds the DP rank
    env["VLLM_HOST_IP"] = node.ip  # vLLM-Ascend's Mooncake advertises get_ip()
    env.update(inst.env)
    return env


def _ports(inst: Instance, node: Node, ranks: list[Rank], headless: bool) -> list[dict]:
    ports = []
    for rank in ranks:
        if rank.api_port is not None and not headless:
            ports.append({"host": node.bind, "port": rank.api_port, "use": "api"})
    if node.master and ranks[0].rank == 0 and inst.dp_size > 1:
        ports.append({"host": node.ip, "port": inst.dp_rpc_port, "use": "dp_rpc"})
    use = "nixl" if inst.connector == "NixlConnector" else "kv"
    # Mooncake: every tp worker of a rank has a port (the emulator binds the first);
    # NIXL: one side channel per engine
    mooncake = inst.connector.startswith("Mooncake")
    width = inst.tp if mooncake and inst.engine != "emulator" else 1
    for rank in ranks:
        for t in range(width):
            ports.append({"host": node.ip, "port": rank.kv_port + t, "use": use})
    return ports


def _process(plan: ClusterPlan, inst: Instance, node: Node, ranks: list[Rank],
             rank: Rank | None, name: str) -> dict[str, Any]:
    headless = rank is None and not node.master
    ready_host = node.ip if node.bind in ("0.0.0.0", "::") else node.bind
    if headless:
        ready = {"type": "tcp", "host": node.ip, "port": ranks[0].kv_port}
    else:
        port = ranks[0].api_port
        ready = {"type": "http", "url": f"http://{ready_host}:{port}/health"}
    return {
        "name": name,
        "argv": _engine_argv(plan, inst, node, rank),
        "env": _engine_env(plan, inst, node, ranks),
        "ports": _ports(inst, node, ranks, headless),
        "ready": ready,
        "dp_ranks": [r.rank for r in ranks],
    }


def engine_spec(plan: ClusterPlan, node: Node) -> dict[str, Any]:
    inst = plan.instance(node.instance)
    if inst.dp_mode == "external":
        processes = [_process(plan, inst, node, [r], r, f"engine-dp{r.rank}") for r in node.ranks]
    else:
        what = "engine" if node.master else "engine-headless"
        processes = [_process(plan, inst, node, node.ranks, None, what)]
    real = inst.engine != "emulator"
    devices: list[str] = []
    if real and inst.flavour == "vllm-ascend":
        devices = [f"/dev/davinci{d}" for d in node.devices] + ASCEND_DEVICE_FILES
    elif real:
        devices = [f"/dev/nvidia{d}" for d in node.devices] + ["/dev/nvidiactl"]
    nic_env = ASCEND_NIC_ENV if inst.flavour == "vllm-ascend" else GPU_NIC_ENV
    return {
        "schema": SCHEMA,
        "cluster": plan.cluster,
        "node": node.host,
        "role": node.role,
        "ip": node.ip,
        "instance": inst.name,
        "master": node.master,
        "engine": inst.engine,
        "base_dir": node.base_dir,
        "dirs": dirs_for(node.base_dir, node.role),
        "grace_seconds": node.grace,
        "checks": {
            "paths": [inst.model_path] if real else [],
            "devices": devices,
            "commands": [processes[0]["argv"][0]],
        },
        "nic": {"ip": node.ip, "name": node.nic, "env": nic_env},
        "files": [],
        "pre_start": [],
        "processes": processes,
        "proxy": None,
    }


# ---------------------------------------------------------------- proxy


def proxy_block(plan: ClusterPlan, proxy: ProxyHost) -> dict[str, Any]:
    first = plan.instances[0]
    return {
        "listen": proxy.listen,
        "prefill": list(plan.prefill_upstreams),
        "decode": list(plan.decode_upstreams),
        "served_model_name": first.served_model_name,
        "options": dict(plan.proxy_options, admin_port=proxy.admin_port),
    }


def proxy_spec(plan: ClusterPlan, proxy: ProxyHost) -> dict[str, Any]:
    from pd_launcher.proxy import proxy_unit  # Jinja2: controller side only

    block = proxy_block(plan, proxy)
    dirs = dirs_for(proxy.base_dir, "C")
    unit = proxy_unit(block, dirs, python=proxy.python)
    return {
        "schema": SCHEMA,
        "cluster": plan.cluster,
        "node": proxy.host,
        "role": "C",
        "ip": proxy.ip,
        "instance": None,
        "master": False,
        "engine": "nginx",
        "base_dir": proxy.base_dir,
        "dirs": dirs,
        "grace_seconds": proxy.grace,
        "checks": unit.get("checks", {"paths": [], "devices": [], "commands": []}),
        "nic": None,
        "files": unit["files"],
        "pre_start": unit["pre_start"],
        "processes": unit["processes"],
        "proxy": block,
    }
