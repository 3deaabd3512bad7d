"""Builders of (groups, hostvars) inputs for planner tests."""
from __future__ import annotations

import copy
import json
from typing import Any

BASE = {
    "pd_cluster_name": "t",
    "pd_engine": "vllm-ascend",
    "pd_model_path": "/models/m",
    "pd_devices_per_node": 16,
}


def tutorial() -> tuple[dict[str, list[str]], dict[str, dict[str, Any]]]:
    """The vLLM-Ascend multi-node PD tutorial shape (facts file)."""
    p_extra = ["--enable-expert-parallel", "--max-num-batched-tokens", "16384",
               "--max-num-seqs", "8", "--enforce-eager", "--no-enable-prefix-caching"]
    d_extra = ["--max-num-batched-tokens", "256", "--max-num-seqs", "40"]
    common = dict(BASE, pd_kv_port=36000, pd_api_port=7100, pd_dp_rpc_port=12321,
                  pd_model_is_mla=True)
    pv = dict(common, pd_tp=8, pd_extra_args=p_extra)
    dv = dict(common, pd_tp=1, pd_extra_args=d_extra)
    groups = {"P": ["p1", "p2"], "D": ["d1", "d2"], "C": ["c1"]}
    hostvars = {
        "p1": dict(pv, ansible_host="10.0.0.1"),
        "p2": dict(pv, ansible_host="10.0.0.2"),
        "d1": dict(dv, ansible_host="10.0.0.3", host_ip="10.0.0.3"),
        "d2": dict(dv, ansible_host="10.0.0.4", host_ip="10.0.0.3"),
        "c1": dict(common, ansible_host="10.0.0.9"),
    }
    return groups, hostvars


def small(engine: str = "vllm-ascend", **extra: Any
          ) -> tuple[dict[str, list[str]], dict[str, dict[str, Any]]]:
    """1P (one node, 2 devices) + 1D (two nodes, 2 devices each) + C."""
    common = dict(BASE, pd_engine=engine, pd_devices_per_node=2, pd_kv_port=36000, **extra)
    groups = {"P": ["p1"], "D": ["d1", "d2"], "C": ["c1"]}
    hostvars = {
        "p1": dict(common, ansible_host="127.0.1.1"),
        "d1": dict(common, ansible_host="127.0.1.2"),
        "d2": dict(common, ansible_host="127.0.1.3", host_ip="127.0.1.2"),
        "c1": dict(common, ansible_host="127.0.1.9"),
    }
    return groups, hostvars


def mutate(inp: tuple[dict, dict], host: str | None = None, **changes: Any) -> tuple[dict, dict]:
    groups, hostvars = copy.deepcopy(inp)
    for h in ([host] if host else list(hostvars)):
        for key, value in changes.items():
            if value is _DELETE:
                hostvars[h].pop(key, None)
            else:
                hostvars[h][key] = value
    return groups, hostvars


_DELETE = object()
DELETE = _DELETE


def kv_config(argv: list[str]) -> dict[str, Any]:
    return json.loads(argv[argv.index("--kv-transfer-config") + 1])


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def specs_of(inp: tuple[dict, dict]) -> dict[str, dict[str, Any]]:
    """Every unit's node spec (host -> unit -> spec) of a valid input."""
    from pd_deploy.specs import node_specs
    from pd_deploy.topology import build_plan

    return node_specs(build_plan(*inp))


def errors_of(inp: tuple[dict, dict]) -> list[str]:
    """The planner's errors for an invalid input ("host: field: message")."""
    import pytest

    from pd_deploy.settings import PlanInvalid
    from pd_deploy.topology import build_plan

    with pytest.raises(PlanInvalid) as info:
        build_plan(*inp)
    return [str(e) for e in info.value.errors]


def assert_error(inp: tuple[dict, dict], host: str, field: str, words: str) -> None:
    errors = errors_of(inp)
    assert any(e.startswith(f"{host}: {field}:") and words in e for e in errors), errors
