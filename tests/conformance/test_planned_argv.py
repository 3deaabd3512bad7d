"""Every argv the planner produces is accepted by the real `vllm serve` parser (vLLM 0.33.0).

Covers the example (tutorial-shaped, external DP) and local (emulated: the emulator gets
exactly the vLLM-Ascend flags) inventories, plus internal-DP and vllm/NIXL variants.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

from pd_deploy.cli import plan_document
from pd_deploy.inventory import load_inventory

REPO = Path(__file__).resolve().parents[2]
EMULATOR_PREFIX = ["-m", "pd_launcher.emulator", "serve"]


def _vllm_argv(argv: list[str]) -> list[str]:
    if argv[1:4] == EMULATOR_PREFIX:
        return ["vllm", "serve", *argv[4:]]
    assert argv[:2] == ["vllm", "serve"], argv
    return argv


def _items(name: str, groups: dict, hostvars: dict) -> list[dict]:
    doc = plan_document(groups, hostvars)
    items = []
    for host, by_role in doc["specs"].items():
        for role, spec in by_role.items():
            if role == "C":
                continue
            for proc in spec["processes"]:
                items.append({"id": f"{name}:{host}:{proc['name']}",
                              "argv": _vllm_argv(proc["argv"]), "env": proc["env"]})
    return items


def _variants() -> list[dict]:
    items = []
    groups, hostvars = load_inventory(str(REPO / "inventories/example/inventory.yml"))
    items += _items("example", groups, hostvars)

    internal = copy.deepcopy(hostvars)
    for hv in internal.values():
        hv["pd_dp_mode"] = "internal"
    items += _items("example-internal", groups, internal)

    nixl = copy.deepcopy(hostvars)
    for hv in nixl.values():
        hv.update(pd_engine="vllm", pd_kv_port=5600, pd_devices_per_node=8,
                  pd_engine_api_key="k-123")
        hv["pd_tp"] = 4 if hv.get("pd_tp") == 8 else hv.get("pd_tp", 1)
    items += _items("example-nixl", groups, nixl)

    groups, hostvars = load_inventory(str(REPO / "inventories/local/inventory.yml"))
    items += _items("local", groups, hostvars)
    return items


def test_every_planned_argv_is_accepted_by_vllm_serve():
    runner = pytest.importorskip("tests.conformance.vllm_runner")
    items = _variants()
    assert len(items) > 60
    results = runner.check_argv(items)
    assert len(results) == len(items)
    bad = [f"{r['id']}: {r['error']}" for r in results if not r["ok"]]
    assert bad == []


def test_the_parser_rejects_what_vllm_rejects():
    """The check can fail: a removed kv-transfer-config key and a clashing flag are refused."""
    runner = pytest.importorskip("tests.conformance.vllm_runner")
    item = _variants()[0]
    argv = list(item["argv"])
    i = argv.index("--kv-transfer-config") + 1
    argv[i] = argv[i].replace('"kv_role"', '"kv_rank":0,"kv_role"')
    res = runner.check_argv([{"id": "kv_rank", "argv": argv, "env": {}},
                             {"id": "bad-int", "argv": item["argv"] + ["--max-num-seqs", "x"],
                              "env": {}}])
    assert [r["ok"] for r in res] == [False, False]
