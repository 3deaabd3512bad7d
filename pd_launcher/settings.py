"""Inventory variables: names, defaults and typed reading with collected errors.

Every variable the planner understands is listed in VARIABLES with its default and
meaning; README.md's inventory reference is generated from the same table
(`python -m pd_launcher.settings` prints it as markdown).
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Callable, Mapping

ENGINES = ("vllm-ascend", "vllm", "emulator")
DP_MODES = ("external", "internal")
BALANCE_POLICIES = ("least_conn", "random_two_least_conn", "round_robin")


@dataclass(frozen=True)
class PlanError:
    host: str | None
    field: str
    message: str

    def __str__(self) -> str:
        where = self.host if self.host else "cluster"
        return f"{where}: {self.field}: {self.message}"


class PlanInvalid(Exception):
    """Raised with every error found, not just the first."""

    def __init__(self, errors: list[PlanError]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


# name -> (default, scope, meaning). Scope: host | instance | cluster | proxy.
# A default of None means "derived" (explained in the meaning) or "unset".
VARIABLES: dict[str, tuple[Any, str, str]] = {
    "ansible_host": (None, "host", "SSH address of the host (required)."),
    "host_ip": (None, "host", "IP of the master node of the engine instance this host belongs "
                "to. Hosts sharing a host_ip form one instance. Default: the host's own node_ip "
                "(a one-node instance)."),
    "node_ip": (None, "host", "Data-plane IP (HCCL_IF_IP, DP address, KV). Default: ansible_host."),
    "devices": (None, "host", "Visible device ids, \"0,1,2\" or a list. Default: "
                "pd_devices_per_node ids from 0."),
    "nic": (None, "host", "NIC holding node_ip (for *_SOCKET_IFNAME). Default: detected on the "
            "node by the launcher."),
    "pd_cluster_name": ("pd", "cluster", "Name of the deployment; container label pd.cluster."),
    "pd_engine": ("vllm-ascend", "instance", "vllm-ascend | vllm | emulator."),
    "pd_emulate": ("vllm", "instance", "With pd_engine=emulator: whose flags and env the emulator "
                   "gets (vllm | vllm-ascend)."),
    "pd_model_path": (None, "instance", "Model directory on the nodes (required)."),
    "pd_served_model_name": (None, "instance", "--served-model-name. Default: the basename of "
                             "pd_model_path."),
    "pd_tp": (1, "instance", "Tensor parallel size of every DP rank."),
    "pd_dp_mode": ("external", "instance", "external: one process per DP rank, each with its own "
                   "API port | internal: one process per node, master serves the API, other "
                   "nodes run --headless."),
    "pd_devices_per_node": (8, "host", "Number of devices assumed when `devices` is not set."),
    "pd_api_port": (7100, "instance", "First API port on a node; DP rank j of a node uses "
                    "pd_api_port + j (external DP)."),
    "pd_dp_rpc_port": (12321, "instance", "--data-parallel-rpc-port, bound on the instance "
                       "master."),
    "pd_kv_port": (None, "instance", "KV transfer base port. Default 36000 (Mooncake) or 5600 "
                   "(NIXL). Instances with the same base get distinct ranges: base + k * "
                   "pd_kv_port_stride for the k-th such instance. A node uses base .. base + "
                   "devices - 1."),
    "pd_kv_port_stride": (100, "cluster", "Distance between the KV ranges of instances sharing "
                          "a pd_kv_port base."),
    "pd_connector": (None, "instance", "KV connector. Default MooncakeConnectorV1 (vllm-ascend), "
                     "NixlConnector (vllm)."),
    "pd_model_is_mla": (False, "cluster", "The model uses MLA: lifts the rule that prefill tp "
                        "must be a multiple of decode tp (Mooncake)."),
    "pd_extra_args": ([], "instance", "Extra `vllm serve` arguments (list). Flags the planner "
                      "owns (--port, --host, --data-parallel-*, --kv-transfer-config, ...) are "
                      "refused."),
    "pd_env": ({}, "instance", "Extra environment of the engine processes (dict); overrides the "
               "flavour's defaults."),
    "pd_vllm_version": ("0.33.0", "cluster", "vLLM version of the image; decides version "
                        "specific fields (kv_rank/kv_parallel_size only before 0.32)."),
    "pd_bind_host": (None, "host", "Address services bind to. Default: node_ip."),
    "pd_proxy_port": (7000, "proxy", "Port of the global proxy on each C host."),
    "pd_proxy_admin_port": (None, "proxy", "Port of the proxy agent (metrics, health, active "
                            "health checks) on each C host. Default: pd_proxy_port + 1."),
    "pd_python": ("python3", "host", "Python on the node, used to run the launcher and the "
                  "emulator."),
    "pd_base_dir": (None, "host", "Per-node directory for state, logs and run files. Default "
                    "/var/lib/pd-deploy/<pd_cluster_name>."),
    "pd_grace_seconds": (30, "host", "SIGTERM -> SIGKILL grace period when stopping."),
    "pd_engine_api_key": (None, "cluster", "API key of the engines (--api-key); the proxy sends "
                          "it. Optional; never logged."),
    "pd_proxy_api_key": (None, "proxy", "API key clients must send to the proxy. Optional; "
                         "never logged."),
    "pd_proxy_prefill_balance": ("least_conn", "proxy", "least_conn | random_two_least_conn | "
                                 "round_robin."),
    "pd_proxy_decode_balance": ("least_conn", "proxy", "Same, for the decode pool."),
    "pd_proxy_keepalive": (64, "proxy", "Idle keepalive connections per upstream pool and worker."),
    "pd_proxy_max_fails": (1, "proxy", "Passive health: failures before an upstream is taken out."),
    "pd_proxy_fail_timeout_s": (10, "proxy", "Passive health: how long it stays out."),
    "pd_proxy_prefill_attempts": (3, "proxy", "Prefill tries over distinct upstreams."),
    "pd_proxy_decode_attempts": (2, "proxy", "Decode tries on connect errors."),
    "pd_proxy_fallback": (True, "proxy", "All prefills failed: serve decode-only (local prefill)."),
    "pd_proxy_max_body_size": ("8m", "proxy", "Largest request body (nginx size)."),
    "pd_proxy_min_prefill_chars": (0, "proxy", "Prompts shorter than this skip the prefill leg."),
    "pd_proxy_connect_timeout_s": (3, "proxy", "Upstream connect timeout."),
    "pd_proxy_prefill_timeout_s": (600, "proxy", "Prefill leg read timeout."),
    "pd_proxy_decode_timeout_s": (3600, "proxy", "Decode leg read timeout."),
    "pd_proxy_worker_processes": (1, "proxy", "nginx worker processes."),
}


class Reader:
    """Typed access to one host's variables; errors are collected, never raised."""

    def __init__(self, host: str, hostvars: Mapping[str, Any], errors: list[PlanError]) -> None:
        self.host = host
        self.vars = hostvars
        self.errors = errors

    def raw(self, name: str) -> Any:
        try:
            value = self.vars[name]
        except (KeyError, TypeError):
            value = None
        if value is None or value == "":
            return VARIABLES.get(name, (None,))[0]
        return value

    def fail(self, field: str, message: str) -> None:
        self.errors.append(PlanError(self.host, field, message))

    def text(self, name: str, choices: tuple[str, ...] | None = None) -> str | None:
        value = self.raw(name)
        if value is None:
            return None
        if not isinstance(value, str):
            self.fail(name, f"must be a string, got {value!r}")
            return None
        if choices and value not in choices:
            self.fail(name, f"unknown value {value!r}; expected one of {', '.join(choices)}")
            return None
        return value

    def integer(self, name: str, low: int | None = None, high: int | None = None) -> int | None:
        value = self.raw(name)
        if value is None:
            return None
        if isinstance(value, bool) or not _is_int(value):
            self.fail(name, f"must be an integer, got {value!r}")
            return None
        number = int(value)
        if (low is not None and number < low) or (high is not None and number > high):
            self.fail(name, f"{number} is outside {low}..{high}")
            return None
        return number

    def port(self, name: str) -> int | None:
        return self.integer(name, 1, 65535)

    def boolean(self, name: str) -> bool:
        value = self.raw(name)
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        self.fail(name, f"must be true or false, got {value!r}")
        return False

    def ip(self, name: str, value: Any = None) -> str | None:
        value = self.raw(name) if value is None else value
        if value is None:
            return None
        try:
            return str(ipaddress.ip_address(str(value)))
        except ValueError:
            self.fail(name, f"{value!r} is not an IP address")
            return None

    def typed(self, name: str, kind: type, check: Callable[[Any], str | None] | None = None) -> Any:
        value = self.raw(name)
        if value is None:
            return None
        if not isinstance(value, kind):
            self.fail(name, f"must be a {kind.__name__}, got {type(value).__name__} {value!r}")
            return kind()
        problem = check(value) if check else None
        if problem:
            self.fail(name, problem)
            return kind()
        return value


def _is_int(value: Any) -> bool:
    if isinstance(value, int):
        return True
    return isinstance(value, str) and value.strip().isdigit()


def markdown_table() -> str:
    rows = ["| variable | scope | default | meaning |", "|---|---|---|---|"]
    for name, (default, scope, meaning) in VARIABLES.items():
        shown = "(derived)" if default is None else f"`{default!r}`" if default != "" else '""'
        rows.append(f"| `{name}` | {scope} | {shown} | {meaning} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
