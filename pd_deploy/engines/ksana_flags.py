"""What KsanaLLM accepts, as tables: serving_server.py's flags and the YAML connector
keys. serving_server.py parses with parse_known_args (an unknown flag is printed and
ignored) and the connector section is read only by C++, so neither rejects a typo: the
planner checks every flag and key it writes, and the operator's pd_extra_args and base
YAML, against these tables.

Sources (KsanaLLM c451219c0c447b2672faee44c9182c607dc2d964, engines-facts.md §2.3-2.4):
* flags: src/ksana_llm/python/ksana_llm/arg_utils.py, EngineArgs.from_command_line;
* connector keys: src/ksana_llm/utils/config/schedule_config_parser.cpp,
  InitConnectorConfig (keys and the parser's defaults).
"""
from __future__ import annotations

from typing import Any

#: serving_server.py flag -> takes a value (False: a switch, action=store_true)
SERVING_FLAGS: dict[str, bool] = {
    "--config_file": True,
    "--tokenizer_path": True,
    "--host": True,
    "--port": True,
    "--endpoint": True,
    "--access_log": False,
    "--ssl_keyfile": True,
    "--ssl_certfile": True,
    "--root_path": True,
    "--tool-call-parser": True,
    "--reasoning-parser": True,
    "--enable-auto-tool-choice": False,
    "--tool-parser-plugin": True,
    "--chat-template": True,
    "--chat-template-content-format": True,
}

#: setting.connector key -> (type, the parser's default)
CONNECTOR_KEYS: dict[str, tuple[type, Any]] = {
    "group_role": (str, "none"),
    "router_addr": (str, ""),
    "inference_addr": (str, ""),
    "coordinator_addr": (str, ""),
    "cluster_name": (str, ""),
    "heartbeat_interval_ms": (int, 5000),
    "connector_waiting_sec": (int, 1800),
    "communication_type": (str, ""),
    "transfer_batch": (int, 1048576),
    "task_expire_sec": (int, 300),
    "circular_bucket_size": (int, 8192),
    "circular_bucket_num": (int, 4),
    "circular_thread_num": (int, 4),
    "send_thread_num": (int, 4),
}

#: group_role values the parser knows (case-insensitive); anything else means no PD
GROUP_ROLES = ("prefill", "decode", "both")
#: communication_type values; anything else, even empty, means TCP
COMMUNICATION_TYPES = ("nccl", "zmq", "tcp")

#: env vars the PD guide makes mandatory on every prefill and decode node
MANDATORY_ENV = {
    "SELECT_ALL_REDUCE_BY_SIZE": "1",
    "PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync",
    "ENABLE_LAYER_TRACKER": "1",
}
#: env of a group spanning hosts (pipeline parallel; MASTER_* mandatory when WORLD_SIZE>1)
MULTI_NODE_ENV = ("WORLD_SIZE", "NODE_RANK", "MASTER_HOST", "MASTER_PORT")


def flag_name(arg: str) -> str | None:
    """The flag of an argv token ("--port=8067" -> "--port"); None for a value."""
    if not arg.startswith("-") or arg in ("-", "--"):
        return None
    return arg.split("=", 1)[0]


def unknown_flags(argv: list[str]) -> list[str]:
    """Flags of argv (after the program) that serving_server.py does not define."""
    return [name for name in (flag_name(a) for a in argv)
            if name is not None and name not in SERVING_FLAGS]


def check_connector(connector: dict[str, Any]) -> list[str]:
    """Problems of a connector section: unknown keys, wrong types, unknown values."""
    problems = []
    for key, value in connector.items():
        if key not in CONNECTOR_KEYS:
            problems.append(f"unknown connector key {key!r} (KsanaLLM's parser reads "
                            f"{', '.join(sorted(CONNECTOR_KEYS))})")
            continue
        kind = CONNECTOR_KEYS[key][0]
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            problems.append(f"connector.{key} must be an integer, got {value!r}")
        elif kind is str and not isinstance(value, str):
            problems.append(f"connector.{key} must be a string, got {value!r}")
    role = connector.get("group_role")
    if isinstance(role, str) and role.lower() not in GROUP_ROLES:
        problems.append(f"connector.group_role {role!r} is not one of "
                        f"{', '.join(GROUP_ROLES)} (KsanaLLM would silently run without PD)")
    return problems
