"""Cluster services on C hosts: phases, unit specs, plan document, port clashes."""
from __future__ import annotations

import pytest

from pd_deploy import engines
from pd_deploy.cli import plan_document
from pd_deploy.settings import PlanInvalid
from pd_deploy.specs import node_specs, unit_phase
from pd_deploy.topology import build_plan

from .planfix import mutate, small


@pytest.fixture()
def toy(monkeypatch):
    monkeypatch.setenv(engines.EXTRA_ENV, "tests.fixtures.toy_backend:ToyBackend")
    engines.reset()
    yield small(engine="toy")
    engines.reset()


def test_services_are_units_of_the_c_host_in_phase_order(toy):
    specs = node_specs(build_plan(*toy))
    assert list(specs["c1"]) == ["registry", "router", "C"]
    assert [unit_phase(s) for s in specs["c1"].values()] == [
        "before-engines", "after-engines", "front-door"]
    reg = specs["c1"]["registry"]
    assert (reg["role"], reg["unit"], reg["phase"]) == ("C", "registry", "before-engines")
    assert reg["dirs"]["state"].endswith("/state/registry")
    assert reg["processes"][0]["ready"] == {"type": "http", "url": "http://127.0.1.9:7300/"}
    assert unit_phase(specs["p1"]["P"]) == "engines"


def test_plan_document_lists_services_and_units(toy):
    doc = plan_document(*toy)
    assert doc["engine"] == "toy"
    assert [(s["name"], s["phase"], s["hosts"]) for s in doc["services"]] == [
        ("registry", "before-engines", ["c1"]), ("router", "after-engines", ["c1"])]
    assert doc["units"]["c1"] == {"registry": "before-engines", "router": "after-engines",
                                  "C": "front-door"}
    names = [(p.get("unit"), p["name"]) for p in doc["nodes"]["c1"]["processes"]]
    assert names[:2] == [("registry", "registry"), ("router", "router")]


def test_service_port_clash_names_host_and_variable(toy):
    inp = mutate(toy, pd_toy_router_port=7000)  # the front door's port
    with pytest.raises(PlanInvalid) as info:
        build_plan(*inp)
    hits = [e for e in info.value.errors if e.host == "c1" and e.field == "pd_toy_router_port"]
    assert hits and "also bound by c1/proxy" in hits[0].message


def test_backend_variables_are_declared_only_with_the_backend(toy):
    build_plan(*mutate(toy, pd_toy_router_port=7400))


def test_front_door_none_leaves_no_nginx_unit(toy):
    specs = node_specs(build_plan(*mutate(toy, pd_front_door="none")))
    assert list(specs["c1"]) == ["registry", "router"]


def test_unknown_front_door():
    with pytest.raises(PlanInvalid) as info:
        build_plan(*mutate(small(), pd_front_door="haproxy"))
    assert any(e.field == "pd_front_door" for e in info.value.errors)


def test_router_front_door_block(toy, monkeypatch):
    from pd_deploy.engines.base import FrontDoor
    from tests.fixtures.toy_backend import ToyBackend

    def door(self, plan):
        port = plan.options["router_port"]
        return FrontDoor(mode="router", router=[f"{plan.proxies[0].bind}:{port}"],
                         health_path="/health")

    monkeypatch.setattr(ToyBackend, "front_door", door)
    c = node_specs(build_plan(*toy))["c1"]["C"]
    block = c["proxy"]
    assert block["mode"] == "router" and block["router"] == ["127.0.1.9:7301"]
    assert "prefill" not in block and "decode" not in block
    assert block["options"]["router_health_path"] == "/health"
    assert not any(f["path"].endswith("pd_router.js") for f in c["files"])


@pytest.mark.parametrize("name,phase,text", [
    ("registry", "during-engines", "phase 'during-engines' is not one of"),
    ("C", "before-engines", "bad or duplicate service name 'C'"),
    ("a/b", "before-engines", "bad or duplicate service name 'a/b'"),
])
def test_a_backend_bug_in_its_services_is_named(toy, monkeypatch, name, phase, text):
    from pd_deploy.engines.base import Service
    from tests.fixtures.toy_backend import ToyBackend

    monkeypatch.setattr(ToyBackend, "services", lambda self, plan: [
        Service(name=name, phase=phase, processes=[])])
    with pytest.raises(ValueError) as info:
        node_specs(build_plan(*toy))
    assert str(info.value).startswith("backend toy: ") and text in str(info.value)


def test_two_services_with_one_name(toy, monkeypatch):
    from pd_deploy.engines.base import Service
    from tests.fixtures.toy_backend import ToyBackend

    monkeypatch.setattr(ToyBackend, "services", lambda self, plan: [
        Service(name="x", phase="before-engines", processes=[]),
        Service(name="x", phase="after-engines", processes=[])])
    with pytest.raises(ValueError, match="bad or duplicate service name 'x'"):
        node_specs(build_plan(*toy))
