"""Self-tests of the vllm conformance checker (tests/conformance/vllm_check.py).

They run the REAL `vllm serve` parser of both flavours pd-deploy plans:
  vllm         vLLM 0.33.0 (.venv-vllm, $PD_VLLM_PYTHON)
  vllm-ascend  vLLM 0.23.0 with vLLM-Ascend 0.23.0.post1 (.venv-vllm-ascend,
               $PD_VLLM_ASCEND_PYTHON)
both built by .ci/install-vllm.sh, and are skipped, with the reason, without them.
All checker items of a flavour go through one vllm_check.py process (vllm imports in
~20 s). test_vllm_ascend_loading reports what of vLLM-Ascend loads on a CPU machine.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conformance import vllm_runner

MODEL = "/nonexistent/models/x"  # never opened by the parse
MOONCAKE_P = {
    "kv_connector": "MooncakeConnectorV1",
    "kv_role": "kv_producer",
    "kv_port": 36000,
    "kv_connector_extra_config": {
        "prefill": {"dp_size": 2, "tp_size": 8},
        "decode": {"dp_size": 32, "tp_size": 1},
    },
}
MOONCAKE_D = dict(MOONCAKE_P, kv_role="kv_consumer", kv_port=36200)
PREFILL_TUNING = [
    "--enable-expert-parallel", "--max-num-batched-tokens", "16384", "--max-num-seqs", "8",
    "--enforce-eager", "--no-enable-prefix-caching",
]
DECODE_TUNING = ["--max-num-batched-tokens", "256", "--max-num-seqs", "40"]


def serve(*args: str) -> list[str]:
    return ["vllm", "serve", MODEL, *args]


def kv(cfg: dict) -> list[str]:
    return ["--kv-transfer-config", json.dumps(cfg, separators=(",", ":"))]


KNOWN_GOOD = serve(
    "--host", "127.0.0.1", "--port", "8000", "--tensor-parallel-size", "2",
    "--data-parallel-size", "4", "--data-parallel-rank", "1",
    "--data-parallel-address", "10.0.0.1", "--data-parallel-rpc-port", "12321",
    *kv(MOONCAKE_P), *PREFILL_TUNING,
)
INTERNAL_MASTER = serve(
    "--host", "10.0.0.5", "--port", "7100", "--data-parallel-size", "32",
    "--data-parallel-size-local", "16", "--data-parallel-address", "10.0.0.5",
    "--data-parallel-rpc-port", "12321", *kv(MOONCAKE_D), *DECODE_TUNING,
)
INTERNAL_HEADLESS = serve(
    "--headless", "--data-parallel-size", "32", "--data-parallel-size-local", "16",
    "--data-parallel-start-rank", "16", "--data-parallel-address", "10.0.0.5",
    "--data-parallel-rpc-port", "12321", *kv(MOONCAKE_D), *DECODE_TUNING,
)


def _reference_prefill(rank: int) -> list[str]:
    """The facts file's reference topology: P1, external DP2 x TP8 on one node."""
    return serve(
        "--host", "10.0.0.1", "--port", str(7100 + rank), "--tensor-parallel-size", "8",
        "--data-parallel-size", "2", "--data-parallel-rank", str(rank),
        "--data-parallel-address", "10.0.0.1", "--data-parallel-rpc-port", "12321",
        *kv(MOONCAKE_P), *PREFILL_TUNING,
    )


KV_RANK = dict(MOONCAKE_P, kv_rank=0)
KV_REMOVED = dict(MOONCAKE_P, kv_parallel_size=2, kv_ip="10.0.0.1", kv_buffer_size=1e9)
NIXL = {"kv_connector": "NixlConnector", "kv_role": "kv_both"}

# flavour -> the vLLM version of its venv
FLAVOURS = {"vllm": "0.33.0", "vllm-ascend": "0.23.0"}

# id -> (argv, env, expected ok, expected stage, substring of the error / mode)
CASES: dict[str, tuple] = {
    "known-good": (KNOWN_GOOD, {}, True, "done", "api_server"),
    "internal-master": (INTERNAL_MASTER, {}, True, "done", "multi_api_server"),
    "internal-headless": (INTERNAL_HEADLESS, {}, True, "done", "headless"),
    "reference-p1-dp0": (_reference_prefill(0), {}, True, "done", "api_server"),
    "reference-p1-dp1": (_reference_prefill(1), {}, True, "done", "api_server"),
    "nixl-env": (
        serve("--port", "7100", *kv(NIXL)),
        {"VLLM_NIXL_SIDE_CHANNEL_HOST": "10.0.0.1", "VLLM_NIXL_SIDE_CHANNEL_PORT": "5600"},
        True, "done", "api_server",
    ),
    "api-key": (serve("--api-key", "k-123"), {}, True, "done", "api_server"),
    "emulator-form": (
        ["/usr/bin/python3", "-m", "pd_launcher.emulator", "serve", MODEL, "--port", "7100"],
        {}, True, "done", "api_server",
    ),
    "kv-rank": (serve(*kv(KV_RANK)), {}, False, "parse", "kv_rank"),
    "kv-removed-keys": (serve(*kv(KV_REMOVED)), {}, False, "parse", "kv_parallel_size"),
    "kv-no-role": (
        serve(*kv({"kv_connector": "MooncakeConnectorV1"})), {}, False, "parse", "kv_role",
    ),
    "kv-bad-json": (serve("--kv-transfer-config", "{kv_role:"), {}, False, "parse", ""),
    "unknown-flag": (serve("--no-such-flag"), {}, False, "parse", "unrecognized arguments"),
    "bad-int": (serve("--max-num-seqs", "x"), {}, False, "parse", "invalid int value"),
    "bad-port": (serve("--port", "80x"), {}, False, "parse", "--port"),
    "rank-and-start-rank": (
        serve("--data-parallel-size", "4", "--data-parallel-rank", "1",
              "--data-parallel-start-rank", "1"),
        {}, False, "dispatch", "more than one data parallel load balancing mode",
    ),
    "rank-and-size-local": (
        serve("--data-parallel-size", "4", "--data-parallel-rank", "1",
              "--data-parallel-size-local", "2"),
        {}, False, "parallel", "--data-parallel-size-local 1",
    ),
    "rank-out-of-range": (
        serve("--data-parallel-size", "4", "--data-parallel-rank", "4"),
        {}, False, "parallel", "must be in the range [0, 4)",
    ),
    "headless-with-api-servers": (
        serve("--headless", "--api-server-count", "2"), {}, False, "dispatch", "--headless",
    ),
    "unknown-env-warned": (serve(), {"VLLM_USE_V1": "1"}, True, "done", "api_server"),
    "unknown-env-fatal": (
        serve("--fail-on-environ-validation"), {"VLLM_USE_V1": "1"}, False, "env", "VLLM_USE_V1",
    ),
    "not-vllm-serve": (["vllm", "bench", MODEL], {}, False, "argv", "vllm serve"),
    "kv-unknown-key": (
        serve(*kv(dict(MOONCAKE_P, kv_no_such_key=1))), {}, False, "parse", "kv_no_such_key",
    ),
    "kv-port-string": (  # the v0.23.0 tutorial writes "36000"; pydantic converts it
        serve(*kv(dict(MOONCAKE_P, kv_port="36000"))), {}, True, "done", "api_server",
    ),
}
# Where vLLM 0.23 answers differently: KVTransferConfig still has kv_rank,
# kv_parallel_size, kv_ip and kv_buffer_size (0.33 removed them).
CASES_BY_FLAVOUR: dict[str, dict[str, tuple]] = {
    "vllm": {},
    "vllm-ascend": {
        "kv-rank": (serve(*kv(KV_RANK)), {}, True, "done", "api_server"),
        "kv-removed-keys": (serve(*kv(KV_REMOVED)), {}, True, "done", "api_server"),
    },
}


def expected(case: str, flavour: str) -> tuple:
    return CASES_BY_FLAVOUR[flavour].get(case, CASES[case])


# The connector name against vLLM's registry (+ vLLM-Ascend's names where installed):
# id -> (argv, {flavour: (ok, provider or error substring)})
CONNECTORS = {
    "connector-mooncake": (
        serve(*kv(MOONCAKE_P)),
        {"vllm": (False, "Unsupported connector type: MooncakeConnectorV1"),
         "vllm-ascend": (True, "vllm-ascend")},
    ),
    "connector-hybrid": (
        serve(*kv(dict(MOONCAKE_P, kv_connector="MooncakeHybridConnector"))),
        {"vllm": (False, "Unsupported connector type"), "vllm-ascend": (True, "vllm-ascend")},
    ),
    "connector-nixl": (
        serve(*kv(NIXL)), {"vllm": (True, "vllm"), "vllm-ascend": (True, "vllm")},
    ),
    "connector-unknown": (
        serve(*kv(dict(NIXL, kv_connector="LLMDataDistCMgrConnector"))),
        {f: (False, "Unsupported connector type: LLMDataDistCMgrConnector") for f in FLAVOURS},
    ),
}
# vLLM-Ascend's kv_connector_extra_config start-up checks: reported in "ascend",
# and failing the item only with strict_ascend.
STRICT = {
    "strict-reference-p1": (_reference_prefill(1), True, ""),
    "strict-reference-d-headless": (INTERNAL_HEADLESS, True, ""),
    "strict-known-good": (KNOWN_GOOD, False, "conflicting tensor parallel size"),
    "strict-dp-mismatch": (
        serve("--tensor-parallel-size", "8", "--data-parallel-size", "4",
              "--data-parallel-rank", "0", *kv(MOONCAKE_P)),
        False, "conflicting data parallel size",
    ),
    "strict-prefill-tp-below-decode": (
        serve("--tensor-parallel-size", "1", *kv(dict(
            MOONCAKE_P, kv_connector_extra_config={
                "prefill": {"dp_size": 1, "tp_size": 1}, "decode": {"dp_size": 1, "tp_size": 2},
            }))),
        False, "must be greater than or equal to the decode_tp_size",
    ),
    "strict-missing-sizes": (
        serve(*kv(dict(MOONCAKE_P, kv_connector_extra_config={}))), False, "tp_size is required",
    ),
}

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module", params=list(FLAVOURS))
def flavour(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def results(flavour) -> dict[str, dict]:
    items = [{"id": k, "argv": expected(k, flavour)[0], "env": expected(k, flavour)[1]}
             for k in CASES]
    items += [{"id": k, "argv": v[0], "strict_ascend": True} for k, v in STRICT.items()]
    items += [{"id": k, "argv": v[0], "strict_connector": True} for k, v in CONNECTORS.items()]
    out = vllm_runner.check_argv(items, flavour=flavour)
    assert [r["id"] for r in out] == [it["id"] for it in items]
    return {r["id"]: r for r in out}


@pytest.mark.parametrize("case", list(CASES))
def test_case(results, flavour, case):
    _argv, _env, ok, stage, needle = expected(case, flavour)
    r = results[case]
    assert r["ok"] is ok, r
    assert r["stage"] == stage, r
    if ok:
        assert r["error"] == ""
        assert r["mode"] == needle, r
    else:
        assert needle in r["error"], r


@pytest.mark.parametrize("case", list(STRICT))
def test_strict_ascend(results, case):
    _argv, ok, needle = STRICT[case]
    r = results[case]
    assert r["ok"] is ok, r
    assert r["ascend"]["ok"] is ok, r
    assert needle in r["error"], r
    if not ok:
        assert r["stage"] == "ascend"


def test_ascend_checks_are_reported_without_failing(results):
    """vLLM itself accepts prefill/decode sizes that differ from the engine's own."""
    r = results["known-good"]
    assert r["ok"] is True
    assert r["ascend"] == {
        "ok": False,
        "error": "ValueError: KV transfer 'prefill' config has a conflicting tensor parallel "
        "size. Expected 2, but got 8.",
    }
    assert results["reference-p1-dp0"]["ascend"] == {"ok": True, "error": ""}
    assert results["nixl-env"]["ascend"] is None  # not a vLLM-Ascend connector


@pytest.mark.parametrize("case", list(CONNECTORS))
def test_connector_registered(results, flavour, case):
    ok, needle = CONNECTORS[case][1][flavour]
    r = results[case]
    assert r["ok"] is ok, r
    assert r["connector"]["registered"] is ok, r
    if ok:
        assert r["connector"]["provider"] == needle, r
    else:
        assert r["stage"] == "connector" and needle in r["error"], r


def test_connector_is_reported_without_failing(results, flavour):
    """Without strict_connector an unknown name is only reported (the vLLM-Ascend argv's
    other flags are still checked by the plain-vLLM venv)."""
    r = results["known-good"]
    assert r["ok"] is True
    assert r["connector"] == {
        "name": "MooncakeConnectorV1",
        "registered": flavour == "vllm-ascend",
        "provider": "vllm-ascend" if flavour == "vllm-ascend" else None,
    }
    assert results["api-key"]["connector"] is None  # no --kv-transfer-config


def test_real_vllm_version_and_parser(results, flavour):
    assert results["known-good"]["vllm"] == FLAVOURS[flavour]
    info = vllm_runner.vllm_info(flavour=flavour)  # from the same process
    assert info["vllm"] == FLAVOURS[flavour]
    assert info["platform"] == "CpuPlatform"
    assert info["parallel_rules"] == FLAVOURS[flavour].rsplit(".", 1)[0]
    if flavour == "vllm":  # VLLM_TARGET_DEVICE=cpu is enough; nothing to keep out
        assert info["make_arg_parser"] == "vllm.entrypoints.common.cli_args"
        assert (info["forced_cpu_platform"], info["excluded_plugins"]) == (False, [])
        assert info["vllm_plugins"] is None and info["vllm_ascend"] is None
    else:  # 0.23 cannot infer the CPU platform; vLLM-Ascend's plugins need torch_npu
        assert info["make_arg_parser"] == "vllm.entrypoints.openai.cli_args"
        assert info["forced_cpu_platform"] is True
        assert info["excluded_plugins"] == [
            "ascend", "ascend_kv_connector", "ascend_model", "ascend_model_loader",
            "ascend_service_profiling",
        ]
        assert "ascend" not in (info["vllm_plugins"] or "")
        assert info["vllm_ascend"]["version"] == "0.23.0.post1"
        assert info["vllm_ascend"]["error"] == ""


def test_kv_transfer_config_fields(results, flavour):
    """0.23 still accepts (and keeps) the fields 0.33 removed; both forbid unknown keys."""
    r = results["kv-rank" if flavour == "vllm-ascend" else "known-good"]
    cfg = r["parsed"]["kv_transfer_config"]
    removed = {"kv_rank", "kv_parallel_size", "kv_ip", "kv_buffer_size"}
    if flavour == "vllm":
        assert not removed & set(cfg)
    else:
        assert removed <= set(cfg)
        assert (cfg["kv_rank"], cfg["kv_parallel_size"], cfg["kv_ip"]) == (0, 1, "127.0.0.1")
        old = results["kv-removed-keys"]["parsed"]["kv_transfer_config"]
        assert (old["kv_parallel_size"], old["kv_ip"]) == (2, "10.0.0.1")
    assert results["kv-port-string"]["parsed"]["kv_transfer_config"]["kv_port"] == 36000


def test_known_good_parsed_values(results):
    p = results["known-good"]["parsed"]
    assert p["model"] == MODEL  # positional model_tag wins, as in ServeSubcommand.cmd
    assert (p["tensor_parallel_size"], p["data_parallel_size"], p["data_parallel_rank"]) == (
        2, 4, 1,
    )
    assert p["enable_prefix_caching"] is False and p["enable_expert_parallel"] is True
    assert p["kv_transfer_config"]["kv_port"] == 36000
    assert p["kv_transfer_config"]["kv_connector_extra_config"] == MOONCAKE_P[
        "kv_connector_extra_config"
    ]
    par = results["known-good"]["parallel"]
    assert par["data_parallel_external_lb"] is True and par["data_parallel_size_local"] == 1


def test_internal_dp_layout(results, flavour):
    master, headless = results["internal-master"], results["internal-headless"]
    # Internal LB: the master starts one API server per DP rank unless told otherwise.
    assert master["parsed"]["api_server_count"] == 32
    assert (master["parallel"]["data_parallel_rank"], headless["parallel"]["data_parallel_rank"]
            ) == (0, 16)
    assert headless["parsed"]["api_server_count"] == 0


def test_api_key_is_redacted(results):
    assert results["api-key"]["parsed"]["api_key"] == "***"
    assert "k-123" not in json.dumps(results["api-key"])


def test_unknown_env_is_a_warning(results):
    assert any("VLLM_USE_V1" in w for w in results["unknown-env-warned"]["warnings"])
    assert results["nixl-env"]["warnings"] == []


def test_model_path_is_not_needed():
    assert not Path(MODEL).exists()


# What of vLLM-Ascend 0.23.0.post1 loads on a CPU machine (vllm_check.py --ascend).
ASCEND_PLUGINS = {  # entry point -> what its function does here
    "ascend": "vllm_ascend.platform.NPUPlatform",  # register(): returned, not probed
    "ascend_kv_connector": "ModuleNotFoundError: No module named 'torch_npu'",
    "ascend_model": None,  # registers the model classes by name: works
    "ascend_model_loader": "ModuleNotFoundError: No module named 'torch_npu'",
    "ascend_service_profiling": "ModuleNotFoundError: No module named 'torch_npu'",
}
ASCEND_CONNECTORS_ADDED = [
    "AscendStoreConnector", "LMCacheAscendConnector", "MooncakeConnectorStoreV1",
    "MooncakeConnectorV1", "MooncakeHybridConnector", "MooncakeLayerwiseConnector",
    "RecomputeCPUOffloadConnector", "UCMConnector",
]
ASCEND_CONNECTORS_REPLACED = ["MultiConnector", "SimpleCPUOffloadConnector"]
# Modules a CPU machine cannot have (NPU runtime, Mooncake transfer engine, pool backends).
NPU_ONLY_MODULES = {"torch_npu", "mooncake", "lmcache_ascend", "ucm"}


def test_vllm_ascend_loading(capsys):
    """Reports (printed, also under -q) and pins what loads and what does not."""
    rep = vllm_runner.ascend_report()
    assert rep["installed"] and rep["version"] == "0.23.0.post1" and rep["vllm"] == "0.23.0"
    plugins = {p["name"]: p for p in rep["plugins"]}
    assert {n: p["group"] for n, p in plugins.items()} == {
        n: "vllm.platform_plugins" if n == "ascend" else "vllm.general_plugins"
        for n in ASCEND_PLUGINS
    }
    assert plugins["ascend"]["returned"] == ASCEND_PLUGINS["ascend"]
    for name, want in ASCEND_PLUGINS.items():
        if name != "ascend":
            assert plugins[name]["error"] == (want or ""), plugins[name]
    npu = plugins["ascend"]["class_import"]
    assert not npu["ok"] and npu["error"] == "ModuleNotFoundError: No module named 'torch_npu'"
    con = rep["connectors"]
    assert con["error"] == "" and con["added"] == ASCEND_CONNECTORS_ADDED
    assert con["replaced"] == ASCEND_CONNECTORS_REPLACED
    assert "LLMDataDistCMgrConnector" not in con["added"]
    for name, c in con["classes"].items():  # a class fails only for an NPU-only module
        assert c["ok"] or c["error"].split("'")[1] in NPU_ONLY_MODULES, (name, c)
    assert con["classes"]["MooncakeConnectorV1"]["missing"] == ["mooncake", "torch_npu"]
    assert set(rep["missing_modules"]) <= NPU_ONLY_MODULES
    with capsys.disabled():
        print("\n" + _ascend_summary(rep))


def _ascend_summary(rep: dict) -> str:
    lines = [f"vLLM-Ascend {rep['version']} on vLLM {rep['vllm']} (CPU): "
             f"VLLM_PLUGINS={rep['setup']['vllm_plugins']!r}, "
             f"CPU platform forced: {rep['setup']['forced_cpu_platform']}"]
    for p in rep["plugins"]:
        state = p["error"] or f"ok -> {p['returned']}"
        if "class_import" in p:
            ci = p["class_import"]
            state += "; import: " + ("ok" if ci["ok"] else f"{ci['error']} ({ci['where']})")
        lines.append(f"  plugin {p['name']}: {state}" + (f" ({p['where']})" if p["where"] else ""))
    con = rep["connectors"]
    lines.append(f"  connectors registered via {con['via']}: added {', '.join(con['added'])}; "
                 f"replaced {', '.join(con['replaced'])}")
    for name, c in con["classes"].items():
        state = f"loads ({c['class']})" if c["ok"] else (
            f"{c['error']} ({c['where']}; missing: {', '.join(c.get('missing', [])) or '-'})")
        lines.append(f"    {name}: {state}")
    lines.append(f"  missing modules: {', '.join(rep['missing_modules'])}")
    return "\n".join(lines)


def test_skips_without_the_vllm_venv(monkeypatch, tmp_path):
    monkeypatch.setenv(vllm_runner.ENV_VAR, str(tmp_path / "missing" / "python"))
    assert vllm_runner.vllm_python() is None
    with pytest.raises(pytest.skip.Exception, match="install-vllm.sh"):
        vllm_runner.check_argv([{"id": "x", "argv": serve()}])
    monkeypatch.setenv(vllm_runner.ASCEND_ENV_VAR, str(tmp_path / "missing" / "python"))
    assert vllm_runner.vllm_python("vllm-ascend") is None
    with pytest.raises(pytest.skip.Exception, match="requirements-vllm-ascend.txt"):
        vllm_runner.check_argv([{"id": "x", "argv": serve()}], flavour="vllm-ascend")
    with pytest.raises(pytest.skip.Exception, match="PD_VLLM_ASCEND_PYTHON"):
        vllm_runner.ascend_report()


def test_items_are_validated():
    with pytest.raises(ValueError, match="duplicate"):
        vllm_runner.check_argv([{"id": "a", "argv": serve()}, {"id": "a", "argv": serve()}])
    with pytest.raises(TypeError):
        vllm_runner.check_argv([{"id": "a", "argv": ["vllm", "serve", 1]}])


def test_default_python_location():
    repo = Path(__file__).resolve().parents[2]
    assert vllm_runner.DEFAULT_VLLM_PYTHON == repo / ".venv-vllm" / "bin" / "python"
    assert vllm_runner.DEFAULT_VLLM_ASCEND_PYTHON == (
        repo / ".venv-vllm-ascend" / "bin" / "python"
    )
    assert vllm_runner.ASCEND_ENV_VAR == "PD_VLLM_ASCEND_PYTHON"
    assert os.path.basename(vllm_runner.CHECK_SCRIPT) == "vllm_check.py"
