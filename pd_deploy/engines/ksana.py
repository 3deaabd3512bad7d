"""The KsanaLLM backend: simple_router on the first C host + one serving_server.py per
prefill/decode node, each with a YAML config rendered for that node (reference:
engines-facts.md section 2; the guide: KsanaLLM docs/pd_separation_startup.md).

* Nodes: `python <home>/src/ksana_llm/python/serving_server.py --config_file <node
  YAML> --port <p> --host <bind>`: one process drives every device of its node
  (tensor_para_size = the node's devices, so pd_tp must equal them). The YAML is the
  operator's base (pd_ksana_config, a file on the controller) or a default shaped like
  the guide's examples, with pd-deploy filling setting.connector (router_addr,
  inference_addr = the group's HTTP address, coordinator_addr = the node's OWN IP and
  port, group_role, communication_type, heartbeat_interval_ms, cluster_name),
  setting.global.tensor_para_size and model_spec.base_model.model_dir. Env: the guide's
  three mandatory variables and CUDA_VISIBLE_DEVICES; a group over several hosts
  (pipeline parallel) adds WORLD_SIZE/NODE_RANK/MASTER_HOST/MASTER_PORT (MASTER_PORT is
  pd_dp_rpc_port, bound by rank 0). Only rank 0 serves HTTP and registers as the
  group's inference_addr.
* Router, BEFORE the engines: a KsanaLLM node registers once, at start-up
  (DefaultCoordinator::Initialize: RegisterNode, and only on success the heartbeat
  thread), and never retries, so a node started before its router is never paired.
  simple_router's main.py started through `python -m pd_launcher.ksana_router`, which
  loads our config.ini before main is imported, so cluster_name, log_dir, sqlite_path
  and heartbeat_timeout_seconds take effect in every worker (main.py's own start-up
  drops --config in workers and never applies the timeout: facts §2.2). Ready: GET
  /openapi.json (it has no /health). Gate, waited for after the engines: an active
  prefill/decode pair in its sqlite DB (`pd_launcher.ksana_pairs`).
* Front door: nginx before the router with router_stream_fix (text/event-stream, no
  "[DONE]\\0" trailer after "data: [DONE]", 5xx as OpenAI errors).
* Emulation (pd_engine emulator, pd_emulate ksana): the nodes are the emulator's ksana
  personality with exactly this argv; the router is the emulator's stand-in unless
  pd_ksana_home is set, then the real simple_router of that tree runs.
"""
from __future__ import annotations

import copy
import ipaddress
import os
import re
from typing import Any, Mapping

import yaml

from pd_deploy.engines.base import Backend, FrontDoor, Service
from pd_deploy.engines.ksana_flags import (
    COMMUNICATION_TYPES,
    MANDATORY_ENV,
    check_connector,
    unknown_flags,
)
from pd_deploy.settings import Reader, Variable
from pd_deploy.specs import dirs_for, engine_spec_base
from pd_deploy.topology import ClusterPlan, Instance, Node
from pd_launcher.launcher.spec import Gate, NodeSpec, Port, Process, Ready, SpecFile

ROLES = {"P": "prefill", "D": "decode"}
#: the guide's coordinator ports (prefill example 13569, decode example 13571)
COORDINATOR_PORTS = {"P": 13569, "D": 13571}
OWNED_FLAGS = ("--config_file", "--port", "--host")
ROUTER_UNIT = "ksana-router"
SERVING_SERVER = "src/ksana_llm/python/serving_server.py"
ROUTER_MAIN = "src/ksana_llm/python/simple_router/main.py"
CONFIG_FILE = "ksana.yaml"
DB_FILE = "simple_router.db"
#: addresses pd-deploy writes into the connector -> the variable that sets each; a base
#: config may leave them out or keep the examples' placeholders, a concrete value must
#: agree (group_role and cluster_name are simply set from the group and the cluster, so
#: one base can serve prefill and decode)
OWNED_KEYS = {
    "router_addr": "pd_ksana_router_port",
    "inference_addr": "pd_api_port",
    "coordinator_addr": "pd_ksana_coordinator_port",
}
PLACEHOLDER = re.compile(r"\{[A-Z_]+\}")


def default_config(role: str) -> dict[str, Any]:
    """The base YAML when pd_ksana_config is unset: the guide's disaggregating
    prefill/decode examples (c451219c) without their device-specific parts
    (tensor_para_size comes from the devices; attention DP and expert parallel stay 1,
    so it fits any node; DeepSeek-sized decode settings belong in pd_ksana_config)."""
    decode = role == "D"
    scheduler: dict[str, Any] = {
        "max_batch_size": 768 if decode else 256,
        "max_token_len": 65536,
        "enable_auto_prefix_cache": False,
        "split_fuse_token_num": 0,
        "transfer_layer_chunk_size": 100,
    }
    if decode:
        scheduler["max_pretransfer_batch_size"] = 256
    return {
        "setting": {
            "global": {"tensor_para_size": 1, "pipeline_para_size": 1,
                       "attn_data_para_size": 1, "expert_world_size": 1,
                       "expert_para_size": 1, "enable_cuda_graph": False},
            "connector": {"connector_waiting_sec": 1800, "transfer_batch": 1048576,
                          "send_thread_num": 8, "circular_bucket_num": 8,
                          "circular_thread_num": 8},
            "batch_scheduler": scheduler,
            "block_manager": {"block_token_num": 16, "reserved_device_memory_ratio": 0.05,
                              "block_device_memory_ratio": -1.0},
            "endpoint_type": "python",
        },
        "model_spec": {"base_model": {"model_dir": ""}},
    }


# ---------------------------------------------------------------- addresses


def _reach(ip: str, bind: str) -> str:
    """The address others use for something bound on `bind`."""
    return ip if bind in ("0.0.0.0", "::") else bind


def router_host(plan: ClusterPlan) -> str:
    c = plan.proxies[0]
    return _reach(c.ip, c.bind)


def router_addr(plan: ClusterPlan) -> str:
    return f"{router_host(plan)}:{plan.options['router_port']}"


def http_port(inst: Instance) -> int:
    """--port of every node of the group (only rank 0 serves it)."""
    return inst.api_port


def inference_addr(plan: ClusterPlan, inst: Instance) -> str:
    master = plan.nodes[inst.master]
    return f"{_reach(master.ip, master.bind)}:{http_port(inst)}"


def coordinator_port(inst: Instance, node: Node) -> int:
    """The node's coordinator port (every node of a group binds it on its own IP)."""
    return inst.opts["coordinator_port"] or COORDINATOR_PORTS[inst.role]


def coordinator_addr(inst: Instance, node: Node) -> str:
    # ZMQ binds it: the node's own IP (the guide's decode example wrongly has the prefill's)
    return f"{node.ip}:{coordinator_port(inst, node)}"


def config_path(node: Node) -> str:
    return f"{dirs_for(node.base_dir, node.role)['run']}/{CONFIG_FILE}"


def router_paths(plan: ClusterPlan) -> dict[str, str]:
    d = dirs_for(plan.proxies[0].base_dir, ROUTER_UNIT)
    return {"ini": f"{d['run']}/config.ini", "db": f"{d['state']}/{DB_FILE}",
            "log_dir": d["log"]}


# ---------------------------------------------------------------- nodes


def node_config(plan: ClusterPlan, inst: Instance, node: Node) -> dict[str, Any]:
    """The rendered YAML of one node: the base with pd-deploy's fields filled."""
    o = plan.options
    cfg = copy.deepcopy(base_config(inst))
    setting = cfg.setdefault("setting", {})
    setting.setdefault("global", {})["tensor_para_size"] = len(node.devices)
    connector = setting.setdefault("connector", {})
    connector.update({
        "router_addr": router_addr(plan),
        "inference_addr": inference_addr(plan, inst),
        "coordinator_addr": coordinator_addr(inst, node),
        "cluster_name": plan.cluster,
        "group_role": ROLES[inst.role],
        "communication_type": o["communication_type"],
        "heartbeat_interval_ms": o["heartbeat_interval_ms"],
    })
    base_model = cfg.setdefault("model_spec", {}).setdefault("base_model", {})
    base_model["model_dir"] = inst.model_path
    return cfg


def base_config(inst: Instance) -> dict[str, Any]:
    """The operator's base config (pd_ksana_config) or the role's default."""
    base = inst.opts["base"]
    return base if base is not None else default_config(inst.role)


def render_config(cfg: dict[str, Any]) -> str:
    return ("# written by pd-deploy from the base config (pd_ksana_config or the default);"
            " do not edit on the node\n" + yaml.safe_dump(cfg, sort_keys=False))


def node_env(plan: ClusterPlan, inst: Instance, node: Node) -> dict[str, str]:
    env = dict(MANDATORY_ENV)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(node.devices)
    if len(inst.hosts) > 1:
        master = plan.nodes[inst.master]
        env.update({"WORLD_SIZE": str(len(inst.hosts)), "NODE_RANK": str(node.start_rank),
                    "MASTER_HOST": master.ip, "MASTER_PORT": str(inst.dp_rpc_port)})
    env.update(inst.env)
    return env


def node_argv(plan: ClusterPlan, inst: Instance, node: Node) -> list[str]:
    if inst.engine == "emulator":
        program = [node.python, "-m", "pd_launcher.emulator", "ksana"]
    else:
        program = [plan.options["python"], f"{plan.options['home']}/{SERVING_SERVER}"]
    return program + ["--config_file", config_path(node), "--port", str(http_port(inst)),
                      "--host", node.bind] + inst.extra_args


def engine_spec(plan: ClusterPlan, node: Node) -> NodeSpec:
    inst = plan.instance(node.instance)
    serves = node.master
    ports = [Port(host=node.ip, port=coordinator_port(inst, node), use="coordinator")]
    if serves:
        ports.insert(0, Port(host=node.bind, port=http_port(inst), use="api"))
        if len(inst.hosts) > 1:
            ports.append(Port(host=node.ip, port=inst.dp_rpc_port, use="master"))
    probe = _reach(node.ip, node.bind)
    process = Process(
        name="ksana", argv=node_argv(plan, inst, node), env=node_env(plan, inst, node),
        ports=ports, dp_ranks=[node.start_rank],
        # only rank 0 serves HTTP; /health exists once the model is loaded
        ready=Ready.http(f"http://{probe}:{http_port(inst)}/health") if serves else None)
    real = inst.engine != "emulator"
    paths = [inst.model_path, f"{plan.options['home']}/{SERVING_SERVER}"] if real else []
    devices = [f"/dev/nvidia{d}" for d in node.devices] + ["/dev/nvidiactl"] if real else []
    return engine_spec_base(
        plan, node, [process],
        checks={"paths": paths, "devices": devices, "commands": [process.argv[0]]},
        nic=None,
        files=[SpecFile(path=config_path(node),
                        content=render_config(node_config(plan, inst, node)))],
    )


# ---------------------------------------------------------------- the router


def router_ini(plan: ClusterPlan) -> str:
    paths = router_paths(plan)
    return "\n".join([
        "# written by pd-deploy: simple_router's settings (applied by pd_launcher.ksana_router",
        "# in every worker); do not edit on the node",
        "[general]",
        "log_level = INFO",
        f"log_dir = {paths['log_dir']}",
        f"cluster_name = {plan.cluster}",
        f"heartbeat_timeout_seconds = {plan.options['heartbeat_timeout']}",
        "",
        "[name_service]",
        "name_service_provider = name_service.auto_provider",
        "",
        "[database]",
        "storage_mode = sqlite",
        f"sqlite_path = {paths['db']}",
        "",
    ])


def real_router(plan: ClusterPlan) -> bool:
    """The real simple_router runs (pd_engine ksana, or the emulator with pd_ksana_home);
    otherwise the emulator's stand-in."""
    return plan.options["home"] is not None


def router_service(plan: ClusterPlan) -> Service:
    c = plan.proxies[0]
    o = plan.options
    paths = router_paths(plan)
    port = o["router_port"]
    if real_router(plan):
        program = [o["python"], "-m", "pd_launcher.ksana_router", f"{o['home']}/{ROUTER_MAIN}"]
        checks = {"commands": [o["python"]], "paths": [f"{o['home']}/{ROUTER_MAIN}"]}
    else:
        program = [c.python, "-m", "pd_launcher.emulator", "ksana-router"]
        checks = {"commands": [c.python]}
    argv = program + ["--host", c.bind, "--port", str(port), "--workers", str(o["workers"]),
                      "--config", paths["ini"]]
    host = router_host(plan)
    # a node counts only with a recent heartbeat: the router marks nodes offline late
    # (heartbeat_timeout_seconds, and only when some node heartbeats) and its database
    # outlives router restarts
    max_age = max(5, 3 * o["heartbeat_interval_ms"] // 1000)
    tool = [c.python, "-m", "pd_launcher.ksana_pairs", "--db", paths["db"],
            "--cluster", plan.cluster, "--max-age", str(max_age)]
    return Service(
        # before the engines: a node registers once at start-up and never retries
        name=ROUTER_UNIT, phase="before-engines",
        processes=[Process(
            name="simple_router", argv=argv,
            env={"PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": "python"},
            ports=[Port(host=c.bind, port=port, use="router")],
            # no /health on simple_router: its OpenAPI document answers once it serves
            ready=Ready.http(f"http://{host}:{port}/openapi.json"))],
        files=[SpecFile(path=paths["ini"], content=router_ini(plan))],
        checks=checks,
        port_vars={port: "pd_ksana_router_port"},
        gate=Gate(check=tool + ["--expect-pair"],
                  # the tables, then what is missing (exit 1 while no pair can serve)
                  explain=tool + ["--explain", "--expect-pair"],
                  what=f"an active prefill/decode pair at simple_router {host}:{port} "
                       "(comm_group_pair active with its NCCL id)"),
    )


# ---------------------------------------------------------------- reading


def _load_base(r: Reader) -> dict[str, Any] | None:
    """pd_ksana_config: a YAML file on the controller -> its mapping (None: unset or bad,
    the error recorded)."""
    path = r.raw("pd_ksana_config")
    if path is None:
        return None
    if not isinstance(path, str) or not path.strip():
        r.fail("pd_ksana_config", f"must be a path to a YAML file on the controller, got "
               f"{path!r}")
        return None
    full = os.path.expanduser(path)
    try:
        with open(full, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except OSError as exc:
        r.fail("pd_ksana_config", f"cannot read {path}: {exc.strerror or exc}")
        return None
    except yaml.YAMLError as exc:
        r.fail("pd_ksana_config", f"{path} is not valid YAML: {exc}")
        return None
    problems = base_problems(data)
    for problem in problems:
        r.fail("pd_ksana_config", f"{path}: {problem}")
    return None if problems else data


def base_problems(data: Any) -> list[str]:
    """What makes a base config unusable: its shape and its connector section."""
    if not isinstance(data, dict):
        return ["must be a mapping with `setting` and `model_spec`"]
    problems = [f"has no `{key}` section (KsanaLLM's config needs it)"
                for key in ("setting", "model_spec") if not isinstance(data.get(key), dict)]
    setting = data.get("setting")
    if isinstance(setting, dict) and setting.get("connector") is not None:
        if not isinstance(setting["connector"], dict):
            problems.append("setting.connector must be a mapping")
        else:
            problems += check_connector(setting["connector"])
    return problems


def _ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


# ---------------------------------------------------------------- the backend


class KsanaBackend(Backend):
    name = "ksana"
    title = "KsanaLLM (+ simple_router)"
    engines = ("ksana",)
    emulates = ("ksana",)
    owned_flags = OWNED_FLAGS
    instance_wide = ("pd_ksana_config", "pd_ksana_coordinator_port")
    variables = (
        Variable("pd_ksana_home", None, "cluster", "The KsanaLLM tree on the nodes (absolute; "
                 "runs src/ksana_llm/python/serving_server.py and simple_router/main.py). "
                 "Required for pd_engine ksana; with the emulator it selects the real "
                 "simple_router of that tree instead of the stand-in."),
        Variable("pd_ksana_python", "python", "cluster", "Python of the KsanaLLM image: "
                 "runs serving_server.py and simple_router (fastapi, uvicorn, sqlalchemy, "
                 "httpx)."),
        Variable("pd_ksana_config", None, "instance", "Base YAML of the instance (a file on "
                 "the controller, with `setting` and `model_spec`); pd-deploy fills "
                 "setting.connector, tensor_para_size and model_dir per node. Default: the "
                 "guide's disaggregating example for the role."),
        Variable("pd_ksana_router_port", 9080, "cluster", "simple_router port on the first "
                 "C host (the front door forwards to it)."),
        Variable("pd_ksana_router_workers", 4, "cluster", "simple_router worker processes "
                 "(each applies config.ini: cluster_name, log dir, sqlite path, timeout)."),
        Variable("pd_ksana_heartbeat_timeout", 60, "cluster", "Seconds without a heartbeat "
                 "after which simple_router marks a node offline "
                 "(heartbeat_timeout_seconds)."),
        Variable("pd_ksana_heartbeat_interval_ms", 2000, "cluster", "connector."
                 "heartbeat_interval_ms of every node (the guide's 2000)."),
        Variable("pd_ksana_communication_type", "nccl", "cluster", "connector."
                 "communication_type (KV data channel). Only nccl links through "
                 "simple_router (zmq and tcp are refused: they never register the pair's "
                 "id, so the router never hands out its addresses)."),
        Variable("pd_ksana_coordinator_port", None, "instance", "Port of every node's "
                 "connector.coordinator_addr (ZMQ, bound on the node's own IP). Default: "
                 "the guide's 13569 on prefill, 13571 on decode instances."),
    )

    # ------------------------------------------------------------ reading

    def cluster_options(self, r: Reader) -> dict[str, Any]:
        home = r.raw("pd_ksana_home")
        if home is not None and (not isinstance(home, str) or not home.strip()
                                 or not os.path.isabs(home)):
            r.fail("pd_ksana_home", f"must be an absolute path to the KsanaLLM tree on the "
                   f"nodes, got {home!r}" + (" (empty)" if home in ("", None) else ""))
            home = None
        return {
            "home": home.rstrip("/") if isinstance(home, str) else None,
            "home_raw": r.raw("pd_ksana_home"),
            "python": r.text("pd_ksana_python") or "python",
            "router_port": r.port("pd_ksana_router_port") or 9080,
            "workers": r.integer("pd_ksana_router_workers", 1, 64) or 1,
            "heartbeat_timeout": r.integer("pd_ksana_heartbeat_timeout", 1, 86400) or 60,
            "heartbeat_interval_ms": r.integer("pd_ksana_heartbeat_interval_ms", 100,
                                               600000) or 2000,
            "communication_type": r.text("pd_ksana_communication_type",
                                         COMMUNICATION_TYPES) or "nccl",
        }

    def instance_options(self, engine: str, r: Reader) -> dict[str, Any] | None:
        base = _load_base(r)
        if base is None and r.raw("pd_ksana_config") is not None:
            return None
        port = r.port("pd_ksana_coordinator_port") if r.raw(
            "pd_ksana_coordinator_port") is not None else None
        # base None: the default of the instance's role (default_config); coordinator port
        # None: the guide's port of the role
        return {"base": base, "base_path": r.raw("pd_ksana_config"), "coordinator_port": port}

    def kv_port_base(self, inst: Instance) -> int | None:
        return None  # NCCL picks its own ports; the coordinator port is per node

    def uses_dp_rpc(self, inst: Instance) -> bool:
        return len(inst.hosts) > 1  # MASTER_PORT of a group over several hosts

    def node_bindings(self, inst: Instance, node: Node) -> list[tuple[str, int, str, str]]:
        return [(node.ip, coordinator_port(inst, node), "coordinator",
                 "pd_ksana_coordinator_port")]

    # ------------------------------------------------------------ rules

    def validate(self, plan: ClusterPlan, readers: Mapping[str, Reader]) -> None:
        o = plan.options
        first_r = next(iter(readers.values()))
        engines = {i.engine for i in plan.instances}
        if "ksana" in engines and o["home"] is None and o["home_raw"] is None:
            first_r.fail("pd_ksana_home", "is required for pd_engine ksana (the KsanaLLM "
                         "tree on the nodes, absolute)")
        if plan.engine_api_key:
            first_r.fail("pd_engine_api_key", "KsanaLLM's serving_server and simple_router "
                         "take no API key; protect the front door with pd_proxy_api_key")
        if o["communication_type"] != "nccl":
            first_r.fail("pd_ksana_communication_type", f"{o['communication_type']} never "
                         "links through simple_router: the router hands out a pair's "
                         "addresses only once prefill rank 0 registered an NCCL id "
                         "(/RegisterCommId), which only the nccl channel does; use nccl")
        first = plan.instances[0] if plan.instances else None
        self._world_sizes(plan, readers)
        for inst in plan.instances:
            r = readers[inst.master]
            if first is not None and inst.model_path != first.model_path:
                r.fail("pd_model_path", f"{inst.model_path!r} differs from "
                       f"{first.model_path!r} of {first.name}: simple_router pairs any "
                       "prefill with any decode, so all must serve the same model")
            if len(inst.hosts) > 1 and inst.dp_mode != "internal":
                r.fail("pd_dp_mode", f"instance {inst.name} spans {len(inst.hosts)} hosts "
                       "(KsanaLLM pipeline parallel: only rank 0 serves HTTP): set "
                       "pd_dp_mode internal")
            for flag in unknown_flags(inst.extra_args):
                r.fail("pd_extra_args", f"{flag} is not a serving_server.py flag (it would "
                       "be printed and ignored)")
            for host in inst.hosts:
                self._host_rules(plan, inst, host, readers[host])
            self._base_against_plan(plan, inst, r)

    @staticmethod
    def _world_sizes(plan: ClusterPlan, readers: Mapping[str, Reader]) -> None:
        """KsanaLLM links a prefill and a decode group only when both have the same world
        size (tensor_para_size x nodes): the link expects 2 x world_size addresses."""
        prefill = [i for i in plan.instances if i.role == "P"]
        for d in (i for i in plan.instances if i.role == "D"):
            for p in prefill:
                dw, pw = d.tp * len(d.hosts), p.tp * len(p.hosts)
                if dw != pw:
                    readers[d.master].fail("pd_tp", f"decode {d.name} has world size {dw} "
                                           f"(tp {d.tp} x {len(d.hosts)} hosts) but prefill "
                                           f"{p.name} has {pw}: KsanaLLM links a prefill and "
                                           "a decode group only with equal world sizes")

    def _host_rules(self, plan: ClusterPlan, inst: Instance, host: str, r: Reader) -> None:
        node = plan.nodes[host]
        if inst.tp != len(node.devices):
            r.fail("pd_tp", f"is {inst.tp} but {host} has {len(node.devices)} devices: one "
                   "serving_server drives every device of its node (tensor_para_size = "
                   f"devices), so set pd_tp {len(node.devices)}")

    def _base_against_plan(self, plan: ClusterPlan, inst: Instance, r: Reader) -> None:
        """Connector values a base config sets that pd-deploy also sets: placeholders
        ({ROUTER_IP}...) are fine, a concrete value must agree with the plan."""
        if inst.opts["base"] is None:
            return
        connector = (inst.opts["base"].get("setting") or {}).get("connector") or {}
        for host in inst.hosts:
            node = plan.nodes[host]
            planned = node_config(plan, inst, node)["setting"]["connector"]
            for key, var in OWNED_KEYS.items():
                given = connector.get(key)
                if given is None or (isinstance(given, str) and PLACEHOLDER.search(given)):
                    continue
                if str(given).lower() == str(planned[key]).lower():
                    continue
                r.fail("pd_ksana_config", self._mismatch(key, given, planned[key], var, node))

    @staticmethod
    def _mismatch(key: str, given: Any, planned: Any, var: str, node: Node) -> str:
        text = (f"setting.connector.{key} is {given!r} but pd-deploy plans {planned!r} for "
                f"{node.host} (set by {var}); remove it from the base config")
        if key == "inference_addr":
            port = str(given).rsplit(":", 1)[-1]
            if port != str(planned).rsplit(":", 1)[-1]:
                text += (f": its port {port} is not the node's --port "
                         f"{str(planned).rsplit(':', 1)[-1]}, so the router would send "
                         "requests where nothing listens")
        if key == "coordinator_addr":
            ip = str(given).rsplit(":", 1)[0]
            if _ip(ip) and ip != node.ip:
                text += (f": {ip} is not {node.host}'s own IP ({node.ip}) and ZMQ binds this "
                         "address locally (the guide's decode example points it at the "
                         "prefill's IP: a defect)")
        return text

    # ------------------------------------------------------------ what runs

    def node_spec(self, plan: ClusterPlan, node: Node) -> NodeSpec:
        return engine_spec(plan, node)

    def services(self, plan: ClusterPlan) -> list[Service]:
        return [router_service(plan)]

    def front_door(self, plan: ClusterPlan) -> FrontDoor:
        entry = router_addr(plan)
        return FrontDoor(mode="router", router=[entry], entry=entry,
                         health_path="/openapi.json", stream_fix=True)
