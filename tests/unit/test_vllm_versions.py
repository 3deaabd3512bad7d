"""The vLLM family planned for a real release pair: versions, connectors, DP modes.

vLLM-Ascend 0.23.0 (source 5cb98caa) with vLLM 0.23.0 for vllm-ascend, vLLM 0.33.0 for
vllm (NIXL); docs/vllm-versions.md has the facts each rule comes from.
"""
from __future__ import annotations

import pytest

from pd_deploy.engines.ascend_rules import mooncake_extra_config_errors
from pd_deploy.engines.vllm import CONNECTORS, DEFAULT_VLLM, vllm_version
from pd_deploy.topology import build_plan, version_tuple

from .planfix import assert_error, errors_of, flag, kv_config, mutate, small, specs_of

DENSE = {"pd_model_is_moe": False}


def error(inp, host: str, field: str, words: str) -> str:
    """The one error on host/field containing words (assert_error, returning its text)."""
    assert_error(inp, host, field, words)
    return next(e for e in errors_of(inp) if e.startswith(f"{host}: {field}:") and words in e)


def procs(specs, host, role):
    return specs[host][role]["processes"]


# ---------------------------------------------------------------- versions


@pytest.mark.parametrize("text,want", [
    ("0.23.0", (0, 23, 0)), ("0.23.0.post1", (0, 23, 0)), ("v0.9.2", (0, 9, 2)),
    ("0.33", (0, 33)), ("0.23.0rc1", None), ("0.9.2.dev1", None), ("latest", None),
    ("0.23.0.post", None), ("1", None),
])
def test_version_tuple_reads_releases_only(text, want):
    assert version_tuple(text) == want


@pytest.mark.parametrize("engine", ["vllm-ascend", "vllm"])
def test_default_version_is_the_flavours_release(engine):
    plan = build_plan(*small(engine))
    assert plan.options["vllm_version"] is None
    assert vllm_version(plan, engine) == version_tuple(DEFAULT_VLLM[engine])
    assert DEFAULT_VLLM == {"vllm-ascend": "0.23.0", "vllm": "0.33.0"}


def test_the_emulator_follows_the_flavour_it_emulates():
    plan = build_plan(*small("emulator", pd_emulate="vllm-ascend",
                             pd_vllm_version="0.23.0.post1"))
    assert vllm_version(plan, "vllm-ascend") == (0, 23, 0)
    assert_error(small("emulator", pd_emulate="vllm", pd_vllm_version="0.23.0"),
                 "p1", "pd_vllm_version", "not planned for vllm")


@pytest.mark.parametrize("engine,version", [
    ("vllm-ascend", "0.33.0"), ("vllm-ascend", "0.11.0"), ("vllm-ascend", "0.24.0"),
    ("vllm", "0.23.0"), ("vllm", "0.32.1"),
])
def test_unsupported_version_is_refused_naming_the_planned_pair(engine, version):
    err = error(small(engine, pd_vllm_version=version), "p1", "pd_vllm_version",
                "not planned")
    assert ("0.23.x" in err) == (engine == "vllm-ascend")


def test_pre_release_version_is_unreadable():
    assert_error(small(pd_vllm_version="0.23.0rc1"), "p1", "pd_vllm_version",
                 "pre-releases")


# ---------------------------------------------------------------- connectors


@pytest.mark.parametrize("connector,why", [
    ("MooncakeLayerwiseConnector", "prefill first"),
    ("LLMDataDistCMgrConnector", "no longer in vLLM-Ascend"),
    ("MooncakeConnector", "CUDA"),
    ("MooncakeConnectorStoreV1", "pool"),
    ("NixlConnector", "not a connector pd-deploy plans"),
    ("Nope", "not a connector pd-deploy plans"),
])
def test_ascend_connectors_outside_the_release_are_refused(connector, why):
    err = error(small(pd_connector=connector), "p1", "pd_connector", why)
    assert "MooncakeConnectorV1 or MooncakeHybridConnector" in err


def test_nixl_flavour_plans_nixl_only():
    assert CONNECTORS["vllm"] == ("NixlConnector",)
    assert_error(small("vllm", pd_connector="MooncakeConnectorV1"), "p1", "pd_connector",
                 "use NixlConnector")


def test_hybrid_connector_is_planned_with_extra_config():
    specs = specs_of(small(pd_connector="MooncakeHybridConnector"))
    cfg = kv_config(procs(specs, "p1", "P")[0]["argv"])
    assert cfg["kv_connector"] == "MooncakeHybridConnector"
    assert cfg["kv_connector_extra_config"]["prefill"] == {"dp_size": 2, "tp_size": 1}


# ---------------------------------------------------------------- tp rules


def test_prefill_tp_below_decode_tp_is_refused_even_for_mla():
    inp = mutate(mutate(mutate(small(pd_model_is_mla=True), pd_devices_per_node=4), "p1", pd_tp=2),
                 "d1", pd_tp=4)
    inp = mutate(inp, "d2", pd_tp=4)
    assert_error(inp, "p1", "pd_tp", "smaller than decode tp 4")


def test_prefill_tp_not_a_multiple_is_refused_unless_mla():
    inp = mutate(mutate(small(), pd_devices_per_node=6), "p1", pd_tp=3)
    inp = mutate(mutate(inp, "d1", pd_tp=2), "d2", pd_tp=2)
    assert_error(inp, "p1", "pd_tp", "non-MLA")
    build_plan(*mutate(inp, pd_model_is_mla=True))
    hybrid = mutate(inp, pd_model_is_mla=True, pd_connector="MooncakeHybridConnector")
    assert_error(hybrid, "p1", "pd_tp", "hybrid KV caches")


# ---------------------------------------------------------------- dense models


def test_dense_model_refuses_external_dp_everywhere():
    for engine in ("vllm-ascend", "vllm"):
        assert_error(small(engine, **DENSE), "p1", "pd_dp_mode", "independent")


def test_dense_model_refuses_internal_dp_on_ascend_mooncake_only():
    err = error(small(pd_dp_mode="internal", **DENSE), "p1", "pd_dp_mode", "same KV ports")
    assert "independent" in err
    build_plan(*small("vllm", pd_dp_mode="internal", **DENSE))  # NIXL: dp index


def test_single_rank_instances_of_a_dense_model_need_nothing():
    inp = mutate(mutate(small(**DENSE), pd_devices_per_node=1), "d2", host_ip="127.0.1.3")
    build_plan(*inp)


def test_independent_mode_plans_dp1_engines_with_their_own_ports():
    plan = build_plan(*small(pd_dp_mode="independent", **DENSE))
    specs = specs_of(small(pd_dp_mode="independent", **DENSE))
    p = procs(specs, "p1", "P")
    assert [x["name"] for x in p] == ["engine-dp0", "engine-dp1"]
    seen_ids = set()
    for j, proc in enumerate(p):
        argv = proc["argv"]
        assert not [a for a in argv if a.startswith("--data-parallel")]
        assert flag(argv, "--port") == str(7100 + j)
        cfg = kv_config(argv)
        assert cfg["kv_port"] == 36000 + j  # tp 1: base + rank * tp, vLLM adds nothing
        assert cfg["kv_connector_extra_config"] == {
            "prefill": {"dp_size": 1, "tp_size": 1}, "decode": {"dp_size": 1, "tp_size": 1}}
        assert mooncake_extra_config_errors(cfg, 1, 1) == []
        seen_ids.add(cfg["engine_id"])
        assert {x["use"] for x in proc["ports"]} == {"api", "kv"}  # no DP RPC port
    assert len(seen_ids) == 2
    assert plan.prefill_upstreams == ["127.0.1.1:7100", "127.0.1.1:7101"]
    assert len(plan.decode_upstreams) == 4  # every decode rank is an upstream


def test_independent_nixl_engines_get_their_own_side_channel_port():
    # small() sets pd_kv_port 36000: D on its own addresses starts at 36000 too, NIXL one per rank
    specs = specs_of(small("vllm", pd_dp_mode="independent", **DENSE))
    decode = [proc for host in ("d1", "d2") for proc in procs(specs, host, "D")]
    assert [proc["env"]["VLLM_NIXL_SIDE_CHANNEL_PORT"] for proc in decode] == [
        "36000", "36001", "36002", "36003"]
    assert len({kv_config(proc["argv"])["engine_id"] for proc in decode}) == 4


def test_independent_mode_is_vllm_only():
    assert_error(small("xllm", pd_dp_mode="independent"), "p1", "pd_dp_mode", "not supported")


# ---------------------------------------------------------------- layout and readiness


@pytest.mark.parametrize("arg", ["--pipeline-parallel-size=2", "-pp", "--nnodes",
                                 "--data-parallel-backend", "--node-rank=1"])
def test_layout_changing_flags_are_refused(arg):
    assert_error(small(pd_extra_args=[arg, "2"] if "=" not in arg else [arg]), "p1",
                 "pd_extra_args", "not planned")


def test_headless_decode_is_ready_when_its_master_serves():
    specs = specs_of(small(pd_dp_mode="internal"))
    headless = procs(specs, "d2", "D")[0]
    assert headless["name"] == "engine-headless"
    assert headless["ready"] == {"type": "http", "url": "http://127.0.1.2:7100/health"}
    assert [x for x in headless["ports"] if x["use"] == "kv"] == []
    prefill = procs(specs_of(small(pd_dp_mode="internal")), "p1", "P")[0]
    assert [x["port"] for x in prefill["ports"] if x["use"] == "kv"] == [36000, 36001]


def test_the_emulator_binds_what_independent_engines_bind():
    from pd_launcher.emulator import args as emu

    specs = specs_of(small("emulator", pd_emulate="vllm-ascend", pd_dp_mode="independent",
                           **DENSE))
    for host, role, want in (("p1", "P", [[36000], [36001]]), ("d1", "D", [[], []])):
        got = []
        for proc in procs(specs, host, role):
            a = emu.parse(proc["argv"][4:], env=proc["env"])
            assert a.dp_mode == "single" and a.ranks == [0]
            got.append(a.kv_ports)
        assert got == want
