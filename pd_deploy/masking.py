"""One masker for everything pd-deploy prints: plan text/JSON, the validate summary,
status output. The rules are the launcher's own (pd_launcher.nodeutil: what a secret
flag is, how `--flag V` and `--flag=V` are masked), so the controller and the nodes
hide the same values. A value is secret when the flag, env variable or option that
carries it has a word key, token, secret, password or credential (`--api-key`,
`--hf-token`, `--scheduler-password`, `HF_TOKEN`, `api_key`, ...).
"""
from __future__ import annotations

from typing import Any, Mapping

from pd_launcher.nodeutil import MASK, is_secret_name, mask_argv

__all__ = ["MASK", "is_secret_name", "mask_argv", "mask_env", "mask_options"]


def mask_env(env: Mapping[str, str]) -> dict[str, str]:
    return {k: (MASK if is_secret_name(k) and v else v) for k, v in env.items()}


def mask_options(options: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (MASK if is_secret_name(k) and v else v) for k, v in options.items()}
