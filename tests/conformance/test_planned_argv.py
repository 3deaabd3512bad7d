"""Every argv the planner produces is accepted by the real `vllm serve` parser of its flavour.

  vLLM-Ascend (pd_engine vllm-ascend, or the emulator emulating it)
      -> vLLM 0.23.0 with vLLM-Ascend 0.23.0.post1 installed (.venv-vllm-ascend,
         $PD_VLLM_ASCEND_PYTHON); also vLLM-Ascend's start-up checks of
         kv_connector_extra_config (strict_ascend) and its connector names.
  vLLM / NIXL (pd_engine vllm)
      -> vLLM 0.33.0 (.venv-vllm, $PD_VLLM_PYTHON).
Every item must also name a registered KV connector (strict_connector).

Covers the example (tutorial-shaped, external DP) and local (emulated: the emulator gets
exactly the vLLM-Ascend flags) inventories, plus internal-DP, dense independent-DP and
vllm/NIXL variants. The vLLM-Ascend variants set pd_vllm_version "0.23.0" and the NIXL
ones "0.33.0" explicitly, whatever the inventories say.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from pd_deploy.cli import plan_document
from pd_deploy.inventory import load_inventory

REPO = Path(__file__).resolve().parents[2]
EMULATOR_PREFIX = ["-m", "pd_launcher.emulator", "serve"]
# flavour -> pd_vllm_version its variants plan for (the vLLM of its conformance venv)
VERSIONS = {"vllm-ascend": "0.23.0", "vllm": "0.33.0"}


def _vllm_argv(argv: list[str]) -> list[str]:
    if argv[1:4] == EMULATOR_PREFIX:
        return ["vllm", "serve", *argv[4:]]
    assert argv[:2] == ["vllm", "serve"], argv
    return argv


def _flavour(hv: dict) -> str:
    """The vLLM flavour a host's argv is planned for (the emulator: the one it emulates)."""
    engine = hv.get("pd_engine")
    flavour = hv.get("pd_emulate") if engine == "emulator" else engine
    assert flavour in VERSIONS, (engine, flavour)
    return flavour


def _items(name: str, groups: dict, hostvars: dict) -> list[dict]:
    doc = plan_document(groups, hostvars)
    items = []
    for host, by_role in doc["specs"].items():
        for role, spec in by_role.items():
            if role == "C":
                continue
            flavour = _flavour(hostvars[host])
            for proc in spec["processes"]:
                items.append({"id": f"{name}:{host}:{proc['name']}", "flavour": flavour,
                              "argv": _vllm_argv(proc["argv"]), "env": proc["env"],
                              "strict_ascend": flavour == "vllm-ascend",
                              "strict_connector": True})
    return items


def _with(hostvars: dict, **update) -> dict:
    out = copy.deepcopy(hostvars)
    for hv in out.values():
        hv.update(update)
    return out


def _variants() -> list[dict]:
    items = []
    groups, hostvars = load_inventory(str(REPO / "inventories/example/inventory.yml"))
    ascend = _with(hostvars, pd_vllm_version=VERSIONS["vllm-ascend"])
    items += _items("example", groups, ascend)
    items += _items("example-internal", groups, _with(ascend, pd_dp_mode="internal"))
    items += _items("example-dense-independent", groups,
                    _with(ascend, pd_model_is_moe=False, pd_dp_mode="independent"))

    nixl = _with(hostvars, pd_engine="vllm", pd_vllm_version=VERSIONS["vllm"], pd_kv_port=5600,
                 pd_devices_per_node=8, pd_engine_api_key="k-123")
    for hv in nixl.values():
        hv["pd_tp"] = 4 if hv.get("pd_tp") == 8 else hv.get("pd_tp", 1)
    items += _items("example-nixl", groups, nixl)
    items += _items("example-nixl-internal", groups, _with(nixl, pd_dp_mode="internal"))

    groups, hostvars = load_inventory(str(REPO / "inventories/local/inventory.yml"))
    items += _items("local", groups, _with(hostvars, pd_vllm_version=VERSIONS["vllm-ascend"]))
    return items


def _negatives(item: dict) -> list[dict]:
    """Variations of a planned item that vLLM must refuse (the check can fail)."""
    argv = list(item["argv"])
    i = argv.index("--kv-transfer-config") + 1
    cfg = json.loads(argv[i])
    out = []
    for tag, change in (("unknown-key", {"kv_no_such_key": 1}), ("kv-rank", {"kv_rank": 0})):
        bad = list(argv)
        bad[i] = json.dumps({**cfg, **change})
        out.append({**item, "id": f"negative:{tag}:{item['id']}", "argv": bad})
    out.append({**item, "id": f"negative:bad-int:{item['id']}",
                "argv": argv + ["--max-num-seqs", "x"]})
    return out


@pytest.fixture(scope="module")
def planned() -> list[dict]:
    return _variants()


@pytest.fixture(scope="module", params=list(VERSIONS))
def checked(request, planned) -> tuple[str, list[dict], dict[str, dict]]:
    """One vllm_check.py process per flavour: its planned items, then the negatives."""
    runner = pytest.importorskip("tests.conformance.vllm_runner")
    flavour = request.param
    items = [it for it in planned if it["flavour"] == flavour]
    negatives = _negatives(items[0])
    results = runner.check_argv(items + negatives, flavour=flavour)
    assert [r["id"] for r in results] == [it["id"] for it in items + negatives]
    assert {r["vllm"] for r in results} == {VERSIONS[flavour]}
    return flavour, items, {r["id"]: r for r in results}


def test_both_flavours_are_planned(planned):
    by = {f: [it for it in planned if it["flavour"] == f] for f in VERSIONS}
    assert len(planned) > 60
    assert all(len(v) > 10 for v in by.values()), {f: len(v) for f, v in by.items()}
    assert {it["id"].split(":")[0] for it in by["vllm-ascend"]} == {
        "example", "example-internal", "example-dense-independent", "local"}
    assert all(it["id"].startswith("example-nixl") for it in by["vllm"])


@pytest.mark.vllm
def test_every_planned_argv_is_accepted_by_vllm_serve(checked):
    flavour, items, results = checked
    bad = [f"{it['id']}: {results[it['id']]['error']}" for it in items
           if not results[it["id"]]["ok"]]
    assert bad == []
    for it in items:  # strict: the connector is registered, by the flavour's own package
        con = results[it["id"]]["connector"]
        assert con["registered"], (it["id"], con)
        assert con["provider"] == ("vllm-ascend" if flavour == "vllm-ascend" else "vllm")
        if flavour == "vllm-ascend":
            assert results[it["id"]]["ascend"] == {"ok": True, "error": ""}, it["id"]


@pytest.mark.vllm
def test_the_parser_rejects_what_vllm_rejects(checked):
    """The check can fail: an unknown kv-transfer-config key and a bad int are refused by
    both; kv_rank only by vLLM 0.33 (0.23's KVTransferConfig still has it)."""
    flavour, items, results = checked
    first = items[0]["id"]
    assert results[f"negative:unknown-key:{first}"]["ok"] is False
    assert "kv_no_such_key" in results[f"negative:unknown-key:{first}"]["error"]
    assert results[f"negative:bad-int:{first}"]["ok"] is False
    assert results[f"negative:kv-rank:{first}"]["ok"] is (flavour == "vllm-ascend")
