"""The KsanaLLM node's start-up inputs: serving_server.py's argv (as
``ksana_llm/arg_utils.py::EngineArgs.from_command_line`` parses it), the YAML config
(``setting.global``, ``setting.connector``, ``setting.batch_scheduler``,
``model_spec.base_model``) and the environment (mandatory PD variables, devices,
multi-node rendezvous). Everything is checked here, before any port is bound;
``ConfigError`` carries the exit status and a message naming the field or variable.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple
from urllib.parse import urlsplit

from ..settings import SettingsError
from ..settings import _int as env_int

PROG = "python -m pd_launcher.emulator ksana"
DEFAULT_CONFIG = "examples/ksana_llm.yaml"
#: the variables KsanaLLM's PD guide makes mandatory on every prefill and decode node
MANDATORY_ENV: Dict[str, str] = {
    "SELECT_ALL_REDUCE_BY_SIZE": "1",
    "PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync",
    "ENABLE_LAYER_TRACKER": "1",
}
PD_ROLES = ("prefill", "decode", "both")
#: group_role as the C++ client sends it (GroupRoleToString has no "both": it says "none")
WIRE_ROLE = {"prefill": "prefill", "decode": "decode", "both": "none"}
PROXY_VARS = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy",
              "ALL_PROXY")


class ConfigError(Exception):
    """A start-up refusal; ``code`` is the exit status (1: the engine would fail)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Flags:
    """serving_server.py's own flags (arg_utils.py); ``unknown`` is printed, not refused."""

    config_file: str = DEFAULT_CONFIG
    tokenizer_path: Optional[str] = None
    host: Optional[str] = None
    port: Optional[int] = None
    endpoint: Optional[str] = None
    access_log: bool = True
    ssl_keyfile: Optional[str] = None
    ssl_certfile: Optional[str] = None
    root_path: Optional[str] = None
    tool_call_parser: Optional[str] = None
    reasoning_parser: Optional[str] = None
    enable_auto_tool_choice: bool = False
    tool_parser_plugin: Optional[str] = None
    chat_template: Optional[str] = None
    chat_template_content_format: Optional[str] = None
    unknown: List[str] = field(default_factory=list)


@dataclass
class Connector:
    """``setting.connector`` as schedule_config_parser.cpp::InitConnectorConfig reads it."""

    role: str = "none"  # prefill | decode | both | none
    router_addr: str = ""  # with http:// prepended, as the parser does
    inference_addr: str = ""
    coordinator_addr: str = ""
    cluster_name: str = ""
    heartbeat_interval_ms: int = 5000
    connector_waiting_sec: int = 1800
    communication_type: str = "tcp"  # nccl | zmq | tcp (anything else)
    transfer_batch: int = 1048576
    task_expire_sec: int = 300
    benchmark: bool = False  # DECODE_NODE_BENCHMARK=1: decode with no router

    @property
    def pd(self) -> bool:
        return self.role in PD_ROLES

    @property
    def registers(self) -> bool:
        return self.pd and not self.benchmark


@dataclass
class NodeConfig:
    flags: Flags
    config_file: str
    model_dir: str
    model_name: str  # /v1/models id: the model_dir's last component
    model_type: str  # config.json's model_type, or "" without one
    endpoint: str
    host: str
    port: int
    max_token_len: int
    tp: int  # setting.global.tensor_para_size (0 = every device)
    attn_dp: int
    connector: Connector
    devices: List[str]  # CUDA_VISIBLE_DEVICES
    world_size: int  # WORLD_SIZE: nodes of the pipeline group
    node_rank: int  # NODE_RANK
    master_host: str
    master_port: int
    warnings: List[str] = field(default_factory=list)

    @property
    def serves_http(self) -> bool:
        return self.node_rank == 0 and self.endpoint == "python"

    @property
    def connector_world_size(self) -> int:
        """What the node registers as world_size: pipeline nodes x tensor_para_size."""
        return self.world_size * self.tp


# --------------------------------------------------------------------------- argv


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="KsanaLLM serving_server.py stand-in "
                                "(see pd_launcher/emulator/ksana/node.py)")
    p.add_argument("--config_file", type=str, default=DEFAULT_CONFIG,
                   help="Serving config file (YAML).")
    p.add_argument("--tokenizer_path", type=str, default=None, help="accepted, unused")
    p.add_argument("--host", type=str, default=None,
                   help="HTTP bind address (default localhost)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default 8080)")
    p.add_argument("--endpoint", type=str, default=None,
                   help="python (HTTP) or an RPC plugin name (then no HTTP)")
    p.add_argument("--access_log", action="store_true", help="always on, as in KsanaLLM")
    p.add_argument("--ssl_keyfile", type=str, default=None)
    p.add_argument("--ssl_certfile", type=str, default=None)
    p.add_argument("--root_path", type=str, default=None, help="accepted, unused")
    for name in ("--tool-call-parser", "--reasoning-parser", "--tool-parser-plugin",
                 "--chat-template", "--chat-template-content-format"):
        p.add_argument(name, type=str, default=None, help="accepted, unused")
    p.add_argument("--enable-auto-tool-choice", action="store_true", default=False,
                   help="accepted, unused")
    p.set_defaults(access_log=True)
    return p


def parse_flags(argv: List[str]) -> Flags:
    """argparse's parse_known_args, like KsanaLLM: a bad value exits 2 (SystemExit),
    unknown flags are kept in ``unknown`` for printing."""
    ns, unknown = _parser().parse_known_args(argv)
    values = {k: v for k, v in vars(ns).items()}
    return Flags(unknown=list(unknown), **values)


# --------------------------------------------------------------------------- YAML


def _read_yaml(path: str) -> Dict[str, Any]:
    if not os.path.exists(path):
        raise ConfigError(f"The config file {path} does not exist.")
    if not path.lower().endswith(".yaml"):
        raise ConfigError(f"The config file {path} must be in YAML format.")
    try:
        import yaml
    except ImportError:  # pragma: no cover - PyYAML is there wherever KsanaLLM runs
        raise ConfigError("the ksana personality needs PyYAML to read --config_file "
                          "(KsanaLLM's arg_utils.py needs it too)") from None
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"the config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"the config file {path} must hold a mapping with 'setting' and "
                          "'model_spec'")
    return data


def _section(data: Mapping[str, Any], dotted: str, path: str,
             required: bool = True) -> Dict[str, Any]:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or node.get(part) is None:
            if required:
                raise ConfigError(f"{path}: {dotted} is missing (KsanaLLM reads it at "
                                  "start-up)")
            return {}
        node = node[part]
    if not isinstance(node, dict):
        raise ConfigError(f"{path}: {dotted} must be a mapping, got {type(node).__name__}")
    return node


def _int(section: Mapping[str, Any], key: str, where: str, default: int,
         minimum: int) -> int:
    value = section.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}.{key} must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{where}.{key} must be >= {minimum}, got {value}")
    return value


def _str(section: Mapping[str, Any], key: str, where: str) -> str:
    value = section.get(key)
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        raise ConfigError(f"{where}.{key} must be a string, got {value!r}")
    return str(value).strip()


def _model(data: Mapping[str, Any], path: str) -> Tuple[str, str, str]:
    """(model_dir made absolute as arg_utils.py does, its name, config.json model_type)."""
    base = _section(data, "model_spec.base_model", path)
    raw = base.get("model_dir")
    if raw is None or str(raw).strip() == "":
        raise ConfigError(f"{path}: model_spec.base_model.model_dir is missing")
    model_dir = os.path.abspath(str(raw))
    name = str(raw).rstrip("/").split("/")[-1] or "ksana-llm"
    return model_dir, name, _model_type(model_dir)


def _model_type(model_dir: str) -> str:
    try:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as fh:
            cfg = json.load(fh)
    except (OSError, ValueError):
        return ""
    return str(cfg.get("model_type", "")) if isinstance(cfg, dict) else ""


def _host_port(value: str, where: str, need_ip: bool = False) -> Tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{where} must be 'ip:port', got {value!r}")
    host = host.strip("[]")
    if need_ip:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(f"{where} {value!r}: the host must be a literal IP address "
                              "(ZMQ binds it, and simple_router refuses anything else)"
                              ) from None
    return host, int(port)


def _router_url(raw: str, where: str) -> str:
    url = raw
    if "://" not in url and ":" in url:
        url = f"http://{url}"  # as the C++ parser does
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where} must be 'ip:port' (or an http:// URL), got {raw!r}")
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None and parts.scheme == "http" and "://" not in raw:
        raise ConfigError(f"{where} has a bad port: {raw!r}")
    return url.rstrip("/")


def _connector(data: Mapping[str, Any], path: str, env: Mapping[str, str],
               warnings: List[str]) -> Connector:
    sec = _section(data, "setting.connector", path, required=False)
    where = "setting.connector"
    raw_role = _str(sec, "group_role", where).lower() or "none"
    benchmark = env.get("DECODE_NODE_BENCHMARK", "") == "1"
    if benchmark:
        raw_role = "decode"
    c = Connector(benchmark=benchmark)
    if raw_role != "none" and raw_role not in PD_ROLES:
        warnings.append(f"Unknown connector role: {raw_role}, defaulting to NONE "
                        f"({where}.group_role; no PD)")
        raw_role = "none"
    c.role = raw_role
    if not c.pd:
        return c
    c.inference_addr = _str(sec, "inference_addr", where)
    c.coordinator_addr = _str(sec, "coordinator_addr", where)
    c.cluster_name = _str(sec, "cluster_name", where)
    c.heartbeat_interval_ms = _int(sec, "heartbeat_interval_ms", where, 5000, 1)
    c.connector_waiting_sec = _int(sec, "connector_waiting_sec", where, 1800, 0)
    c.transfer_batch = _int(sec, "transfer_batch", where, 1048576, 1)
    c.task_expire_sec = _int(sec, "task_expire_sec", where, 300, 0)
    ctype = _str(sec, "communication_type", where).lower()
    c.communication_type = ctype if ctype in ("nccl", "zmq") else "tcp"
    router = _str(sec, "router_addr", where)
    if not benchmark:
        if not router:
            raise ConfigError(f"{path}: {where}.router_addr is empty: a {c.role} node "
                              "registers with simple_router there")
        c.router_addr = _router_url(router, f"{where}.router_addr")
    for key in ("inference_addr", "coordinator_addr"):
        if not getattr(c, key):
            raise ConfigError(f"{path}: {where}.{key} is empty (a {c.role} node needs it)")
    _host_port(c.inference_addr, f"{where}.inference_addr")
    _host_port(c.coordinator_addr, f"{where}.coordinator_addr", need_ip=True)
    return c


# --------------------------------------------------------------------------- env


def _env_int(env: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    try:
        return env_int(env, name, default, minimum)
    except SettingsError as exc:
        raise ConfigError(str(exc)) from None


def _mandatory(env: Mapping[str, str], role: str) -> None:
    bad = []
    for name, want in MANDATORY_ENV.items():
        have = env.get(name)
        if have is None:
            bad.append(f"{name} is not set")
        elif have.strip() != want:
            bad.append(f"{name}={have!r}")
    if bad:
        need = " ".join(f"{k}={v}" for k, v in MANDATORY_ENV.items())
        raise ConfigError(f"{'; '.join(bad)}: KsanaLLM's PD guide makes {need} mandatory on "
                          f"every prefill and decode node (this is a {role} node; the "
                          "emulator refuses to start without them)")


def _devices(env: Mapping[str, str]) -> List[str]:
    raw = env.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        raise ConfigError("CUDA_VISIBLE_DEVICES is not set: the emulator has no GPUs to "
                          "enumerate, so it needs the devices this node uses (the real "
                          "engine would take every GPU it can see)")
    return [d.strip() for d in raw.split(",") if d.strip()]


def _parallel(data: Mapping[str, Any], path: str, devices: List[str]) -> Tuple[int, int]:
    """(tensor_para_size, attn_data_para_size), checked as schedule_config_parser.cpp."""
    glob = _section(data, "setting.global", path, required=False)
    where = "setting.global"
    tp = _int(glob, "tensor_para_size", where, 0, 0) or len(devices)
    attn_dp = _int(glob, "attn_data_para_size", where, 1, 1)
    if tp < attn_dp:
        raise ConfigError(f"Tensor Para Size(tensor_para_size) {tp} should >= Attention Data "
                          f"Para Size(attn_data_para_size) {attn_dp}")
    if tp % attn_dp:
        raise ConfigError(f"Tensor Para Size(tensor_para_size) {tp} % Attention Data Para "
                          f"Size(attn_data_para_size) {attn_dp} != 0")
    if tp > len(devices):
        raise ConfigError(f"{tp} tensor_parallel_size should not bigger than devices num: "
                          f"{len(devices)} (CUDA_VISIBLE_DEVICES={','.join(devices)!r}; "
                          f"{where}.tensor_para_size)")
    return tp, attn_dp


def _distributed(env: Mapping[str, str]) -> Tuple[int, int, str, int]:
    """(WORLD_SIZE, NODE_RANK, MASTER_HOST, MASTER_PORT) as SetDistributeRelatedConfig."""
    world = _env_int(env, "WORLD_SIZE", 1, 1)
    rank = _env_int(env, "NODE_RANK", 0, 0)
    host = env.get("MASTER_HOST", "").strip()
    port_raw = env.get("MASTER_PORT", "").strip()
    if world > 1 and (not host or not port_raw):
        raise ConfigError("The environment variable MASTER_HOST and MASTER_PORT must be set "
                          f"in distributed mode. (WORLD_SIZE={world})")
    if rank >= world:
        raise ConfigError(f"NODE_RANK={rank} must be < WORLD_SIZE={world}")
    port = _env_int(env, "MASTER_PORT", 0, 0)
    if world > 1 and not 0 < port < 65536:
        raise ConfigError(f"MASTER_PORT={port_raw!r} is not a port")
    return world, rank, host, port


# --------------------------------------------------------------------------- all


def load(argv: List[str], env: Optional[Mapping[str, str]] = None) -> NodeConfig:
    """Flags, YAML and environment -> NodeConfig. Raises ConfigError (exit 1) or
    SystemExit (argparse: 2 for a bad flag value, 0 for --help)."""
    return build(parse_flags(argv), env)


def build(flags: Flags, env: Optional[Mapping[str, str]] = None) -> NodeConfig:
    """The YAML (--config_file) and the environment, checked; raises ConfigError."""
    env = os.environ if env is None else env
    path = flags.config_file
    data = _read_yaml(path)
    _section(data, "setting", path)
    model_dir, name, model_type = _model(data, path)
    sched = _section(data, "setting.batch_scheduler", path)
    max_token_len = _int(sched, "max_token_len", "setting.batch_scheduler", 2048, 1)
    warnings: List[str] = []
    conn = _connector(data, path, env, warnings)
    devices = _devices(env)
    tp, attn_dp = _parallel(data, path, devices)
    world, rank, mhost, mport = _distributed(env)
    if conn.pd:
        _mandatory(env, conn.role)
    endpoint = (flags.endpoint or _str(_section(data, "setting", path), "endpoint_type",
                                       "setting") or "python").lower()
    cfg = NodeConfig(
        flags=flags, config_file=path, model_dir=model_dir, model_name=name,
        model_type=model_type, endpoint=endpoint, host=flags.host or "localhost",
        port=8080 if flags.port is None else flags.port, max_token_len=max_token_len,
        tp=tp, attn_dp=attn_dp, connector=conn, devices=devices, world_size=world,
        node_rank=rank, master_host=mhost, master_port=mport, warnings=warnings)
    _advise(cfg, env)
    return cfg


def _advise(cfg: NodeConfig, env: Mapping[str, str]) -> None:
    """Warnings for what the real engine accepts but deployments get wrong."""
    c = cfg.connector
    if not 0 <= cfg.port < 65536:
        raise ConfigError(f"--port {cfg.port} is not a port")
    if c.pd:
        _, port = _host_port(c.inference_addr, "setting.connector.inference_addr")
        if cfg.serves_http and port != cfg.port:
            cfg.warnings.append(f"--port {cfg.port} differs from the port of setting.connector."
                                f"inference_addr {c.inference_addr}: the router will send "
                                "requests to the latter")
        if c.registers and c.communication_type != "nccl":
            cfg.warnings.append(f"communication_type {c.communication_type}: no NCCL id is "
                                "registered, and simple_router hands out a pair's addresses "
                                "only once one is (/RegisterCommId), so this pair never links")
        if c.role == "both":
            cfg.warnings.append("group_role both: KsanaLLM registers it as group_role 'none', "
                                "which simple_router refuses; requests are served locally")
    if c.benchmark:
        cfg.warnings.append("DECODE_NODE_BENCHMARK=1: decode role without a router; requests "
                            "are generated locally")
    if not os.path.isdir(cfg.model_dir):
        # like every personality, the emulator never loads weights: a missing directory
        # is only reported (the real engine fails to load it)
        cfg.warnings.append(f"model_spec.base_model.model_dir {cfg.model_dir} is not a "
                            "directory (the real engine loads the model from it)")
    elif cfg.model_type == "":
        cfg.warnings.append(f"{cfg.model_dir} has no readable config.json with a model_type "
                            "(the real engine's AutoConfig would fail here)")
    proxies = [v for v in PROXY_VARS if env.get(v)]
    if proxies and c.registers:
        cfg.warnings.append(f"{', '.join(proxies)} set: KsanaLLM's libcurl would send router "
                            "calls through the proxy (the guide says unset it); the emulator "
                            "never uses a proxy")
