"""Self-tests of the vllm conformance checker (tests/conformance/vllm_check.py).

They run the REAL `vllm serve` parser of vLLM 0.33.0 from the vllm venv
(.ci/install-vllm.sh; $PD_VLLM_PYTHON) and are skipped, with the reason, without it.
All checker items go through one vllm_check.py process (vllm imports in ~20 s).
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

# id -> (argv, env, expected ok, expected stage, substring of the error / mode)
CASES: dict[str, tuple] = {
    "known-good": (KNOWN_GOOD, {}, True, "done", "api_server"),
    "internal-master": (INTERNAL_MASTER, {}, True, "done", "multi_api_server"),
    "internal-headless": (INTERNAL_HEADLESS, {}, True, "done", "headless"),
    "reference-p1-dp0": (_reference_prefill(0), {}, True, "done", "api_server"),
    "reference-p1-dp1": (_reference_prefill(1), {}, True, "done", "api_server"),
    "nixl-env": (
        serve("--port", "7100", *kv({"kv_connector": "NixlConnector", "kv_role": "kv_both"})),
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


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    items = [{"id": k, "argv": v[0], "env": v[1]} for k, v in CASES.items()]
    items += [{"id": k, "argv": v[0], "strict_ascend": True} for k, v in STRICT.items()]
    out = vllm_runner.check_argv(items)
    assert [r["id"] for r in out] == [it["id"] for it in items]
    return {r["id"]: r for r in out}


@pytest.mark.parametrize("case", list(CASES))
def test_case(results, case):
    _argv, _env, ok, stage, needle = CASES[case]
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


def test_real_vllm_version_and_parser(results):
    assert results["known-good"]["vllm"] == "0.33.0"


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


def test_internal_dp_layout(results):
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


def test_skips_without_the_vllm_venv(monkeypatch, tmp_path):
    monkeypatch.setenv(vllm_runner.ENV_VAR, str(tmp_path / "missing" / "python"))
    assert vllm_runner.vllm_python() is None
    with pytest.raises(pytest.skip.Exception, match="install-vllm.sh"):
        vllm_runner.check_argv([{"id": "x", "argv": serve()}])


def test_items_are_validated():
    with pytest.raises(ValueError, match="duplicate"):
        vllm_runner.check_argv([{"id": "a", "argv": serve()}, {"id": "a", "argv": serve()}])
    with pytest.raises(TypeError):
        vllm_runner.check_argv([{"id": "a", "argv": ["vllm", "serve", 1]}])


def test_default_python_location():
    assert vllm_runner.DEFAULT_VLLM_PYTHON == (
        Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
    )
    assert os.path.basename(vllm_runner.CHECK_SCRIPT) == "vllm_check.py"
