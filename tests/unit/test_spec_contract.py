"""One node-spec contract: what the planner emits is exactly what the launcher parses.

For every unit of every inventory in the repository, of the test backend (services)
and of the planner's test inputs: spec_to_dict(parse_spec(d)) == d (same keys, same
order) and parse_spec(spec_to_dict(s)) == s; relocating a spec's directories moves
every path that names them. docs/node-spec.md's example is the generated text.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import pytest

from pd_deploy import engines, settings
from pd_deploy.cli import plan_document
from pd_deploy.inventory import load_inventory
from pd_deploy.specs import example_markdown, node_specs, unit_specs
from pd_deploy.topology import build_plan
from pd_launcher.launcher.spec import NodeSpec, parse_spec, relocate, spec_to_dict

from .planfix import mutate, small, tutorial

REPO = Path(__file__).resolve().parents[2]
INVENTORIES = sorted(REPO.glob("inventories/*/inventory.yml"))
TOY = "tests.fixtures.toy_backend:ToyBackend"


def units(specs: dict[str, dict[str, Any]]) -> Iterator[tuple[str, Any]]:
    for host, by_unit in specs.items():
        for unit, spec in by_unit.items():
            yield f"{host}/{unit}", spec


def assert_round_trip(where: str, data: dict[str, Any]) -> NodeSpec:
    spec = parse_spec(data, where)
    again = spec_to_dict(spec)
    assert again == data, where
    assert json.dumps(again) == json.dumps(data), f"{where}: key order differs"
    assert parse_spec(again, where) == spec, where
    return spec


def assert_planner_specs(plan_inputs: tuple[dict, dict]) -> int:
    """Round trip of the JSON the planner emits and of the dataclasses it builds."""
    plan = build_plan(*plan_inputs)
    n = 0
    for where, data in units(node_specs(plan)):
        assert_round_trip(where, data)
        n += 1
    for where, spec in units(unit_specs(plan)):
        data = spec_to_dict(spec)
        assert parse_spec(data, where) == spec, where
        leaked = {"raw", "source", "extra"} & (set(data) | {k for p in data["processes"]
                                                             for k in p})
        assert not leaked, f"{where}: {leaked}"
    return n


@pytest.mark.parametrize("inventory", INVENTORIES, ids=lambda p: p.parent.name)
def test_every_unit_of_every_inventory_round_trips(inventory):
    doc = plan_document(*load_inventory(str(inventory)))
    seen = [assert_round_trip(where, data) for where, data in units(doc["specs"])]
    assert {s.role for s in seen} == {"P", "D", "C"}


@pytest.mark.parametrize("inputs", [
    tutorial(),
    small(),
    small("vllm"),
    small("emulator"),
    small("emulator", pd_emulate="vllm-ascend"),
    mutate(small(), pd_dp_mode="internal"),
    mutate(small("vllm"), pd_engine_api_key="s3cret", pd_proxy_api_key="k3y"),
    mutate(small(), pd_dp_mode="independent", pd_model_is_moe=False),
    mutate(small("vllm"), nic="eth7"),
], ids=["tutorial", "ascend", "vllm", "emulator", "emulated-ascend", "internal-dp",
        "api-keys", "independent-dp", "nic-name"])
def test_planner_inputs_round_trip(inputs):
    assert assert_planner_specs(inputs) >= 4


@pytest.fixture()
def toy_backend(monkeypatch):
    monkeypatch.setenv(engines.EXTRA_ENV, TOY)
    engines.reset()
    monkeypatch.setattr(settings, "_DEFAULTS", None)  # declared defaults incl. the toy's
    yield
    engines.reset()


@pytest.mark.parametrize("front_door", ["nginx", "none"])
def test_service_units_round_trip(toy_backend, front_door):
    plan = build_plan(*mutate(small(engine="toy"), pd_front_door=front_door))
    specs = node_specs(plan)
    for unit, phase in (("registry", "before-engines"), ("router", "after-engines")):
        spec = assert_round_trip(f"c1/{unit}", specs["c1"][unit])
        assert (spec.role, spec.unit, spec.phase) == ("C", unit, phase)
    assert ("C" in specs["c1"]) == (front_door == "nginx")
    assert assert_planner_specs(mutate(small(engine="toy"), pd_front_door=front_door)) >= 5


def test_unit_and_phase_only_on_service_units(toy_backend):
    for where, data in units(node_specs(build_plan(*small(engine="toy")))):
        service = where.split("/")[1] not in ("P", "D", "C")
        assert ("unit" in data, "phase" in data) == (service, service), where


def test_dict_and_dataclass_builders_agree():
    """A backend may still hand the planner dicts (out-of-tree ones): same JSON."""
    from pd_deploy.specs import engine_spec_base

    plan = build_plan(*small("emulator"))
    node = plan.nodes["p1"]
    typed = plan.backend.node_spec(plan, node)
    data = spec_to_dict(typed)
    loose = engine_spec_base(
        plan, node, [dict(p) for p in data["processes"]], checks=data["checks"],
        nic=data["nic"])
    assert spec_to_dict(loose) == data


def test_relocating_moves_every_path_of_every_local_unit():
    doc = plan_document(*load_inventory(str(REPO / "inventories/local/inventory.yml")))
    moved = 0
    for where, data in units(doc["specs"]):
        spec = parse_spec(data, where)
        new = {"state": "/elsewhere/st", "log": "/elsewhere/lg", "run": "/elsewhere/rn"}
        there = relocate(spec, new)
        assert there.dirs == new
        text = json.dumps(dict(spec_to_dict(there), base_dir=None))
        for old in spec.dirs.values():
            assert old not in text, f"{where}: {old} left after relocation"
        moved += text.count("/elsewhere/")
        assert relocate(there, spec.dirs) == spec, where
    assert moved > 20  # nginx.conf, agent config, argv, pre_start of the C unit


def test_node_spec_doc_example_is_the_generated_one():
    text = (REPO / "docs" / "node-spec.md").read_text()
    m = re.search(r"<!-- BEGIN generated example: python -m pd_deploy\.specs -->\n"
                  r"(.*?)<!-- END generated example -->", text, re.S)
    assert m, "docs/node-spec.md lost its generated-example markers"
    assert m.group(1) == example_markdown(), (
        "docs/node-spec.md is stale: paste the output of `python -m pd_deploy.specs` "
        "between its BEGIN/END markers")


def test_doc_example_is_valid_json_once_comments_are_gone():
    blocks = re.findall(r"```jsonc\n(.*?)```", example_markdown(), re.S)
    assert len(blocks) == 4
    for block in blocks[:3]:
        plain = re.sub(r"\s*// [^\n]*", "", block)
        json.loads(plain)
