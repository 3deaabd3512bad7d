"""The engine backend interface (see docs/engines.md).

A backend turns the engine-neutral ClusterPlan (instances, masters, ranks, device
slices, API/KV port ranges: pd_deploy.topology) into what runs:

* the processes of every P/D node (argv, env, files, ports, readiness),
* the cluster services on C hosts, each with a phase (before or after the engines),
* the front door: what nginx on pd_proxy_port forwards to.

It also declares its own inventory variables and validation rules. The planner
(pd_deploy.topology, pd_deploy.specs) calls only the methods below; it never asks
which engine it is dealing with.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

from pd_deploy.settings import Reader, Variable

if TYPE_CHECKING:  # pragma: no cover
    from pd_deploy.topology import ClusterPlan, Instance, Node
    from pd_launcher.launcher.spec import Gate, NodeSpec

PHASES = ("before-engines", "after-engines")


@dataclass
class Service:
    """A cluster service on C hosts: one unit (own dirs, state, logs) per host.

    phase: before-engines (registries, schedulers: etcd, Redis) or after-engines
    (routers that need live engines). `processes`, `files`, `pre_start` and `checks`
    have the node spec's shapes (docs/node-spec.md); `hosts` are the C hosts that run
    it (default: the first C host).
    """

    name: str
    phase: str
    processes: list[dict[str, Any]]
    files: list[dict[str, Any]] = field(default_factory=list)
    pre_start: list[list[str]] = field(default_factory=list)
    checks: dict[str, list[str]] = field(default_factory=dict)
    hosts: list[str] = field(default_factory=list)
    #: port -> the inventory variable that sets it (named by clash errors)
    port_vars: dict[int, str] = field(default_factory=dict)
    #: readiness that needs the engines (pd_launcher.launcher.spec.Gate): site.yml waits
    #: for it after the engines started, and status shows its `explain` output
    gate: Gate | None = None


@dataclass
class FrontDoor:
    """What clients reach on pd_proxy_port.

    mode "pd": nginx is the PD router itself (prefill leg, then decode leg) over the
    `prefill` and `decode` upstreams (the vLLM family). mode "router": nginx fronts
    the engine's own router (`router` upstreams) with the same API key, request id,
    access log, metrics and body limit. mode "none": no nginx; `entry` names the
    engine's router address clients use directly.
    """

    mode: str
    prefill: list[str] = field(default_factory=list)
    decode: list[str] = field(default_factory=list)
    router: list[str] = field(default_factory=list)
    entry: str | None = None
    #: router mode: HTTP path nginx's agent probes on each router (2xx = up); None
    #: probes with a TCP connect (xllm-service and simple_router have no /health)
    health_path: str | None = None
    #: router mode: nginx repairs the router's stream (proxy option router_stream_fix:
    #: SSE content type, nothing after "data: [DONE]", 5xx bodies as OpenAI errors)
    stream_fix: bool = False


class Backend:
    """Base class of engine backends; see docs/engines.md for a worked example."""

    #: short name (registry key), a title for docs, and the pd_engine values it serves
    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    engines: ClassVar[tuple[str, ...]] = ()
    #: pd_emulate values it serves: with pd_engine emulator, the emulator gets exactly
    #: the argv this backend plans for that engine (its own personality)
    emulates: ClassVar[tuple[str, ...]] = ()
    #: the backend's own inventory variables (README table, unknown-variable check)
    variables: ClassVar[tuple[Variable, ...]] = ()
    #: engine flags the planner sets itself; pd_extra_args may not contain them
    owned_flags: ClassVar[tuple[str, ...]] = ()
    #: instance-scope variables every node of an instance must share with its master
    instance_wide: ClassVar[tuple[str, ...]] = ()
    #: pd_dp_mode values this backend can plan
    dp_modes: ClassVar[tuple[str, ...]] = ("external", "internal")

    # ------------------------------------------------------------ reading

    def cluster_options(self, r: Reader) -> dict[str, Any]:
        """Cluster-scope settings of this backend (read once, from the first host)."""
        return {}

    def instance_options(self, engine: str, r: Reader) -> dict[str, Any] | None:
        """Instance-scope settings read from the instance master; None when invalid
        (the error is already recorded through `r`)."""
        return {}

    def kv_port_base(self, inst: Instance) -> int | None:
        """Default KV side-channel base port of an instance; None: no KV ports."""
        return None

    def kv_ports_per_rank(self, inst: Instance) -> int:
        """How many consecutive KV ports one DP rank takes (rank r starts at
        base + r * this)."""
        return 1

    def api_ports_per_rank(self, opts: Mapping[str, Any]) -> int:
        """API-side ports one external-DP rank takes: rank j of a node gets pd_api_port +
        j * this (FastDeploy: --port, --metrics-port, the engine worker and cache queue
        ports, one block of 4). `opts` are the instance's options."""
        return 1

    def uses_dp_rpc(self, inst: Instance) -> bool:
        """The instance master binds pd_dp_rpc_port (DP rendezvous)."""
        return True

    def node_bindings(self, inst: Instance, node: Node) -> list[tuple[str, int, str, str]]:
        """Ports a node binds beyond API, KV and DP RPC ports, as (ip, port, use, the
        variable that sets it): the planner's clash check covers them."""
        return []

    # ------------------------------------------------------------ rules

    def validate(self, plan: ClusterPlan, readers: Mapping[str, Reader]) -> None:
        """Engine rules over the whole plan; record errors with readers[host].fail."""

    # ------------------------------------------------------------ what runs

    def node_spec(self, plan: ClusterPlan, node: Node) -> NodeSpec | dict[str, Any]:
        """The launcher input of one P/D node: build it with
        pd_deploy.specs.engine_spec_base (a NodeSpec, the launcher's own dataclass)."""
        raise NotImplementedError

    def services(self, plan: ClusterPlan) -> list[Service]:
        """Cluster services on C hosts (none for engines that need none)."""
        return []

    def front_door(self, plan: ClusterPlan) -> FrontDoor:
        """Default: nginx is the PD router over every rank's API port."""
        return FrontDoor(mode="pd", prefill=plan.upstreams("P"), decode=plan.upstreams("D"))

    def served_model_name(self, plan: ClusterPlan) -> str:
        return plan.instances[0].served_model_name
