"""Inventory variables: declarations, defaults and typed reading with collected errors.

Every variable pd-deploy understands is declared once: the engine-neutral ones in
CORE, the Ansible role knobs in ROLE_KNOBS, and each engine backend's own in its
module (pd_deploy/engines/). README.md's inventory reference is generated from them
(`python -m pd_deploy.settings` prints it as markdown); a pd_ variable that nobody
declares is an inventory error.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Callable, Mapping

DP_MODES = ("external", "internal", "independent")
#: DP modes in which every DP rank is its own process with its own API port
PER_RANK_API_MODES = ("external", "independent")
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


@dataclass(frozen=True)
class Variable:
    """One inventory variable: who reads it, its default and what it means.

    scope: host | instance (read from the instance master) | cluster (read once) |
    proxy (read from the first C host) | role (an Ansible role knob, read by the
    playbooks, not by the planner). A default of None means "derived" (explained in
    the meaning) or "unset".
    """

    name: str
    default: Any
    scope: str
    meaning: str


def _v(name: str, default: Any, scope: str, meaning: str) -> Variable:
    return Variable(name, default, scope, meaning)


# Engine-neutral variables the planner reads (topology, front door, directories).
CORE: tuple[Variable, ...] = (
    _v("ansible_host", None, "host", "SSH address of the host (required)."),
    _v("host_ip", None, "host", "IP of the master node of the engine instance this host "
       "belongs to. Hosts sharing a host_ip form one instance. Default: the host's own "
       "node_ip (a one-node instance)."),
    _v("node_ip", None, "host", "Data-plane IP (HCCL_IF_IP, DP address, KV). Default: "
       "ansible_host."),
    _v("devices", None, "host", "Visible device ids, \"0,1,2\" or a list. Default: "
       "pd_devices_per_node ids from 0."),
    _v("nic", None, "host", "NIC holding node_ip (for *_SOCKET_IFNAME). Default: detected on "
       "the node by the launcher."),
    _v("pd_cluster_name", "pd", "cluster", "Name of the deployment; container label "
       "pd.cluster."),
    _v("pd_engine", "vllm-ascend", "instance", "Which engine runs the instances; one backend "
       "per cluster (docs/engines.md): vllm-ascend | vllm | xllm | fastdeploy | ksana | emulator."),
    _v("pd_emulate", "vllm", "instance", "With pd_engine=emulator: the engine the emulator "
       "stands in for (vllm | vllm-ascend | xllm | fastdeploy | ksana); it gets exactly "
       "that engine's argv and env, and its backend's services."),
    _v("pd_model_path", None, "instance", "Model directory on the nodes (required)."),
    _v("pd_served_model_name", None, "instance", "--served-model-name. Default: the basename "
       "of pd_model_path."),
    _v("pd_tp", 1, "instance", "Tensor parallel size of every DP rank."),
    _v("pd_dp_mode", "external", "instance", "external: one process per DP rank, each with "
       "its own API port | internal: one process per node, master serves the API, other "
       "nodes run --headless | independent: one DP=1 engine per rank, no --data-parallel-* "
       "flags (dense models; vLLM family only)."),
    _v("pd_devices_per_node", 8, "host", "Number of devices assumed when `devices` is not "
       "set."),
    _v("pd_api_port", 7100, "instance", "First API port on a node; DP rank j of a node uses "
       "pd_api_port + j (external DP)."),
    _v("pd_dp_rpc_port", 12321, "instance", "--data-parallel-rpc-port, bound on the instance "
       "master."),
    _v("pd_kv_port", None, "instance", "KV transfer base port (default: the engine's, e.g. "
       "36000 for Mooncake, 5600 for NIXL). Instances with the same base that share a node address "
       "get distinct ranges (base + k * pd_kv_port_stride, the smallest k free on their "
       "addresses); instances on other addresses reuse the range, so appending an instance "
       "never moves the others' ports."),
    _v("pd_kv_port_stride", 100, "cluster", "Distance between the KV ranges of instances "
       "sharing a pd_kv_port base and a node address."),
    _v("pd_extra_args", [], "instance", "Extra engine arguments (list). Flags the planner "
       "owns (--port, --host, --data-parallel-*, --kv-transfer-config, ...) are refused."),
    _v("pd_env", {}, "instance", "Extra environment of the engine processes (dict); overrides "
       "the engine's defaults."),
    _v("pd_bind_host", None, "host", "Address services bind to. Default: node_ip."),
    _v("pd_front_door", "nginx", "cluster", "nginx: clients talk to nginx on pd_proxy_port "
       "(the PD router for the vLLM family, in front of the engine's router otherwise) | none: "
       "no nginx, the engine's router is the entry point (engines that bring one)."),
    _v("pd_proxy_port", 7000, "proxy", "Port of the global proxy on each C host."),
    _v("pd_proxy_admin_port", None, "proxy", "Port of the proxy agent (metrics, health, "
       "active health checks) on each C host. Default: pd_proxy_port + 1."),
    _v("pd_python", "python3", "host", "Python on the node, used to run the launcher and the "
       "emulator."),
    _v("pd_base_dir", None, "host", "Per-node directory for state, logs and run files. "
       "Default /var/lib/pd-deploy/<pd_cluster_name>."),
    _v("pd_grace_seconds", 30, "host", "SIGTERM -> SIGKILL grace period when stopping."),
    _v("pd_restart_policy", "on-failure", "host", "What a unit's launcher does when one "
       "of its processes exits on its own: on-failure: stop the unit's whole set, wait a "
       "backoff (1 s, doubling per restart, at most pd_restart_backoff_max_s) and start it "
       "again; status shows the restarts | never: stop the set and leave the unit failed "
       "until site.yml runs again."),
    _v("pd_restart_max", 5, "host", "Restarts allowed within pd_restart_window_s; one more "
       "crash and the unit is left failed (0: never restart)."),
    _v("pd_restart_window_s", 600, "host", "Window (seconds) over which pd_restart_max "
       "counts restarts; the backoff also starts again from 1 s once the restarts before "
       "it are older than this."),
    _v("pd_restart_backoff_max_s", 30, "host", "Longest wait (seconds) before a restart."),
    _v("pd_engine_api_key", None, "cluster", "API key of the engines (--api-key); the proxy "
       "sends it. Optional; never logged."),
    _v("pd_proxy_api_key", None, "proxy", "API key clients must send to the proxy. Optional; "
       "never logged."),
    _v("pd_proxy_prefill_balance", "least_conn", "proxy", "least_conn | "
       "random_two_least_conn | round_robin."),
    _v("pd_proxy_decode_balance", "least_conn", "proxy", "Same, for the decode pool."),
    _v("pd_proxy_keepalive", 64, "proxy", "Idle keepalive connections per upstream pool and "
       "worker."),
    _v("pd_proxy_max_fails", 1, "proxy", "Passive health: failures before an upstream is "
       "taken out."),
    _v("pd_proxy_fail_timeout_s", 10, "proxy", "Passive health: how long it stays out."),
    _v("pd_proxy_prefill_attempts", 3, "proxy", "Prefill tries over distinct upstreams."),
    _v("pd_proxy_decode_attempts", 2, "proxy", "Decode tries on connect errors."),
    _v("pd_proxy_fallback", True, "proxy", "All prefills failed: serve decode-only (local "
       "prefill)."),
    _v("pd_proxy_max_body_size", "8m", "proxy", "Largest request body (nginx size)."),
    _v("pd_proxy_min_prefill_chars", 0, "proxy", "Prompts shorter than this skip the prefill "
       "leg."),
    _v("pd_proxy_connect_timeout_s", 3, "proxy", "Upstream connect timeout."),
    _v("pd_proxy_prefill_timeout_s", 600, "proxy", "Prefill leg read timeout."),
    _v("pd_proxy_decode_timeout_s", 3600, "proxy", "Decode leg read timeout."),
    _v("pd_proxy_worker_processes", 1, "proxy", "nginx worker processes."),
    _v("pd_proxy_max_inflight", 0, "proxy", "Completion requests the front door serves at "
       "once (all workers); beyond that it answers 429 with Retry-After at once instead of "
       "queueing. 0 = no limit (the engines queue). Size it from the decode pool's capacity "
       "(decode instances x max-num-seqs x a small factor)."),
)

# Ansible role knobs: read by the playbooks. Their defaults live in roles/pd_defaults
# (the shared ones) and in each role's defaults/main.yml; tests/unit/test_role_knobs.py
# keeps those and this table in sync. Declared here so an inventory or -e typo of one of
# them is an error, not silently ignored.
ROLE_KNOBS: tuple[Variable, ...] = (
    _v("pd_runtime", "process", "role", "process: the launcher runs on the host | container: "
       "one container per node and unit."),
    _v("pd_container_cli", "docker", "role", "Container CLI: docker | podman."),
    _v("pd_container_cli_args", [], "role", "Extra global arguments of the container CLI "
       "(e.g. podman --root/--runroot)."),
    _v("pd_container_env", {}, "role", "Environment of every container CLI call (e.g. "
       "CONTAINERS_CONF)."),
    _v("pd_image", "", "role", "Image the unit containers run (container runtime)."),
    _v("pd_image_tarball", "", "role", "docker-archive tarball on the controller; empty: pull "
       "pd_image from its registry."),
    _v("pd_image_pull_policy", "missing", "role", "missing | always."),
    _v("pd_image_fanout", 4, "role", "Tarball mode: nodes one holder serves per fan-out round "
       "(0: all from the seed)."),
    _v("pd_image_serve_port", 0, "role", "Tarball mode: port of the transient HTTP server on "
       "the holders (0: any free port)."),
    _v("pd_image_dir", "", "role", "Tarball mode: directory on the nodes (empty: "
       "<pd_base_dir>/images)."),
    _v("pd_image_keep_tarball", False, "role", "Tarball mode: keep the tarball on the nodes "
       "after loading."),
    _v("pd_container_restart", "on-failure:3", "role", "Container restart policy."),
    _v("pd_shm_size", "64g", "role", "Shared memory (--shm-size) of engine containers."),
    _v("pd_container_extra_args", [], "role", "Extra `run` arguments of engine containers."),
    _v("pd_ready_timeout", 600, "role", "Seconds to wait for every process of a unit to be "
       "ready."),
    _v("pd_log_max_mb", 100, "role", "Log rotation cap (MiB) of every log file of a unit "
       "(process logs, the launcher's, nginx's access log): copied to .1 and truncated "
       "above it."),
    _v("pd_log_backups", 4, "role", "Rotated copies kept per log file; a file uses at most "
       "pd_log_max_mb * (1 + pd_log_backups) MiB."),
    _v("pd_systemd", "auto", "role", "Process runtime: install and enable (not start) a "
       "systemd service per unit so that units come back after a reboot (docs/systemd.md): "
       "auto (when the node runs systemd) | true | false."),
    _v("pd_systemd_dir", "/etc/systemd/system", "role", "Directory of those unit files on "
       "the nodes."),
    _v("pd_systemd_enable", True, "role", "Enable (cleanup: disable) those units with "
       "systemctl; false: only write and remove the files."),
    _v("pd_bundle_dir", None, "role", "Controller directory of the launcher bundle. Default: "
       "var/bundle in the repository."),
    _v("pd_min_free_mb", 512, "role", "Free disk space needed under pd_base_dir (MiB)."),
    _v("pd_status_probe_timeout", 2, "role", "Seconds per readiness probe in status.yml."),
    _v("pd_lock_break", "", "role", "Take over the cluster lock of a run that is gone (killed, "
       "its controller lost): the lock's id as the refusal prints it. A lock left on this "
       "controller by an ansible-playbook that no longer runs is taken over without it."),
    _v("pd_cleanup_logs", False, "role", "cleanup.yml also deletes the units' log "
       "directories."),
    _v("pd_logs_dest", None, "role", "Controller directory receiving logs.yml's files. "
       "Default: var/logs in the repository."),
    _v("pd_validate_show_plan", True, "role", "Print the secret-free plan summary during "
       "validation."),
    _v("pd_drain_timeout", 60, "role", "Scale in and rolling restarts: seconds to wait for "
       "requests in flight on an engine the front door no longer sends to; then it stops."),
    _v("pd_record_file", "", "role", "Controller file of the deployment record (empty: "
       "pd-deploy-record.<cluster>.json beside the inventory)."),
    _v("pd_restart_scope", "all", "role", "restart.yml: P, D or all instances to roll."),
    _v("pd_restart_instances", "", "role", "restart.yml: comma list of instance names to "
       "roll (empty: every instance in pd_restart_scope)."),
    _v("pd_rolling", False, "role", "site.yml: restart running instances whose spec changed "
       "one at a time, drained (an upgrade), instead of all at once."),
    _v("pd_roll_allow_outage", False, "role", "Roll an instance even when it is the only "
       "one serving its role."),
    _v("pd_roll_apply_timeout", 30, "role", "Rolling restarts: seconds to wait for the "
       "front door's agent to apply a drain or an undrain."),
    _v("pd_scale_in_logs", False, "role", "Scale in: delete the removed units' log "
       "directories too."),
    _v("pd_proxy_smoke_test", True, "role", "After the front door is ready, send one real "
       "request through it."),
    _v("pd_proxy_smoke_prompt", "pd-deploy smoke test:", "role", "Prompt of that request."),
    _v("pd_proxy_smoke_max_tokens", 8, "role", "max_tokens of that request."),
)


def declared() -> dict[str, Variable]:
    """Every variable pd-deploy knows: core, role knobs and every backend's own."""
    from pd_deploy.engines import registry  # the backends declare theirs

    out = {v.name: v for v in CORE + ROLE_KNOBS}
    for backend in registry().values():
        for v in backend.variables:
            out.setdefault(v.name, v)
    return out


_DEFAULTS: tuple[int, dict[str, Any]] | None = None


def default_of(name: str) -> Any:
    """The declared default of a variable (None: derived or unset). Cached per registry
    (a new registry, e.g. with PD_DEPLOY_BACKENDS, recomputes it)."""
    global _DEFAULTS
    from pd_deploy.engines import registry

    key = id(registry())
    if _DEFAULTS is None or _DEFAULTS[0] != key:
        _DEFAULTS = (key, {n: v.default for n, v in declared().items()})
    return _DEFAULTS[1].get(name)


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
            return default_of(name)
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


def markdown_table(variables: tuple[Variable, ...] | None = None) -> str:
    rows = ["| variable | scope | default | meaning |", "|---|---|---|---|"]
    for v in variables if variables is not None else CORE:
        d = v.default
        shown = "(derived)" if d is None else f"`{d!r}`" if d != "" else '""'
        rows.append(f"| `{v.name}` | {v.scope} | {shown} | {v.meaning} |")
    return "\n".join(rows)


def markdown_reference() -> str:
    """README's inventory reference: engine-neutral variables, each backend's, role knobs."""
    from pd_deploy.engines import registry

    parts = ["#### Engine-neutral variables", "", markdown_table(CORE)]
    for backend in registry().values():
        if backend.variables:
            emulated = (f"; emulated: `pd_engine: emulator`, `pd_emulate`: "
                        f"{', '.join(backend.emulates)}" if backend.emulates else "")
            parts += ["", f"#### {backend.title} (`pd_engine`: "
                      f"{', '.join(backend.engines)}{emulated})", "",
                      markdown_table(backend.variables)]
    parts += ["", "#### Ansible role knobs", "", markdown_table(ROLE_KNOBS)]
    return "\n".join(parts)


def unknown_variable(name: str) -> str:
    """The error message of an undeclared pd_ variable, with the closest known name."""
    import difflib

    close = difflib.get_close_matches(name, list(declared()), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"unknown pd-deploy variable{hint} (see README, Inventory reference)"


if __name__ == "__main__":
    print(markdown_reference())
