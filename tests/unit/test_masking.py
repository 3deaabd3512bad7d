"""One masker for everything pd-deploy prints: flags, env, options (plan, validate summary)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pd_deploy.cli import public_document, render_text
from pd_deploy.masking import MASK, is_secret_name, mask_argv, mask_env, mask_options

from .test_plan_cli import EXAMPLE, REPO


@pytest.mark.parametrize("name", ["--api-key", "--hf-token", "--scheduler-password",
                                  "--scheduler_password", "HF_TOKEN", "api_key",
                                  "engine_api_key", "AWS_SECRET_ACCESS_KEY", "--token",
                                  "REDIS_PASSWORD", "--db-passwd"])
def test_secret_names(name):
    assert is_secret_name(name)


@pytest.mark.parametrize("name", ["--max-num-batched-tokens", "--tokenizer_path",
                                  "--kv-transfer-config", "--served-model-name",
                                  "VLLM_HOST_IP", "keepalive", "--monkey", "PD_KEYSPACE"])
def test_not_secret_names(name):
    assert not is_secret_name(name)


def test_mask_argv_both_forms():
    argv = ["vllm", "serve", "/m", "--hf-token", "hf_abc", "--api-key=sk-1",
            "--max-num-batched-tokens", "256", "--tokenizer_path", "/t",
            "--scheduler-password", "pw"]
    assert mask_argv(argv) == ["vllm", "serve", "/m", "--hf-token", MASK, f"--api-key={MASK}",
                               "--max-num-batched-tokens", "256", "--tokenizer_path", "/t",
                               "--scheduler-password", MASK]


def test_mask_env_and_options():
    assert mask_env({"HF_TOKEN": "x", "HCCL_IF_IP": "1.2.3.4"}) == {
        "HF_TOKEN": MASK, "HCCL_IF_IP": "1.2.3.4"}
    assert mask_options({"api_key": "k", "engine_api_key": None, "keepalive": 64}) == {
        "api_key": MASK, "engine_api_key": None, "keepalive": 64}


def _inventory_with_secrets(tmp_path):
    inv = tmp_path / "inv.yml"
    inv.write_text(open(EXAMPLE).read())
    gv = tmp_path / "group_vars"
    gv.mkdir()
    for name in ("all.yml", "P.yml", "D.yml"):
        text = open(os.path.join(REPO, "inventories", "example", "group_vars", name)).read()
        (gv / name).write_text(text)
    (gv / "D.yml").write_text("pd_extra_args: [--hf-token, hf_SECRETVALUE, --max-num-seqs, "
                              "'40']\npd_env: {HF_TOKEN: hf_ENVSECRET, SOME_FLAG: visible}\n")
    return inv


def test_plan_and_validate_summary_mask_every_secret_flag(tmp_path):
    inv = _inventory_with_secrets(tmp_path)
    for fmt in ("text", "json"):
        out = subprocess.run([sys.executable, "-m", "pd_deploy", "plan", "-i", str(inv),
                              "--format", fmt], cwd=REPO, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        assert "hf_SECRETVALUE" not in out.stdout and "hf_ENVSECRET" not in out.stdout
        if fmt == "text":
            assert "--hf-token '***'" in out.stdout
        else:
            argv = json.loads(out.stdout)["nodes"]["decode-1"]["processes"][0]["argv"]
            assert argv[argv.index("--hf-token") + 1] == "***"
        assert "visible" in out.stdout
    # the validate role's summary (filter pd_cluster_summary) is render_text of the
    # public document: the same masker
    from pd_deploy.cli import plan_document
    from pd_deploy.inventory import load_inventory

    doc = plan_document(*load_inventory(str(inv)))
    text = render_text(public_document(doc))
    assert "hf_SECRETVALUE" not in text and "hf_ENVSECRET" not in text
    assert "hf_SECRETVALUE" in json.dumps(doc["specs"])  # the launcher still gets it
