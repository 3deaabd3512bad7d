"""Run tests/conformance/vllm_check.py (the real `vllm serve` parser) from the main venv.

    from tests.conformance.vllm_runner import check_argv
    results = check_argv([{"id": "p1:engine-dp0", "argv": ["vllm", "serve", ...],
                           "env": {...}}])
    bad = [r for r in results if not r["ok"]]

Two venvs, one per flavour, both built by `.ci/install-vllm.sh` (Makefile:
`make vllm-venv`):
  "vllm"         vLLM 0.33.0 (NVIDIA/NIXL): $PD_VLLM_PYTHON, default
                 <repo>/.venv-vllm/bin/python
  "vllm-ascend"  vLLM 0.23.0 + vLLM-Ascend 0.23.0.post1: $PD_VLLM_ASCEND_PYTHON, default
                 <repo>/.venv-vllm-ascend/bin/python
Every function takes flavour= ("vllm" unless given). When the venv is missing,
check_argv skips the calling test (pytest.skip) with the reason, or raises
VllmUnavailable outside pytest.

One call = one process that imports vllm (15-25 s on this machine); pass every item
of a test in one call. Results of identical calls are cached for the session.
Each result: {"id", "ok", "error", "stage", "mode", "warnings", "parsed", ...};
see vllm_check.py's docstring. ascend_report() is what of vLLM-Ascend loads on this
machine and what does not (vllm_check.py --ascend).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CHECK_SCRIPT = Path(__file__).resolve().with_name("vllm_check.py")
DEFAULT_VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
ENV_VAR = "PD_VLLM_PYTHON"
DEFAULT_VLLM_ASCEND_PYTHON = REPO / ".venv-vllm-ascend" / "bin" / "python"
ASCEND_ENV_VAR = "PD_VLLM_ASCEND_PYTHON"
TIMEOUT_S = 600

# flavour -> (env var, default python, how to build the venv, what it holds)
VENVS = {
    "vllm": (ENV_VAR, DEFAULT_VLLM_PYTHON, "`.ci/install-vllm.sh` (make vllm-venv)",
             "vLLM 0.33.0"),
    "vllm-ascend": (
        ASCEND_ENV_VAR, DEFAULT_VLLM_ASCEND_PYTHON,
        "`.ci/install-vllm.sh .venv-vllm-ascend .ci/requirements-vllm-ascend.txt` "
        "(make vllm-venv)",
        "vLLM 0.23.0 + vLLM-Ascend 0.23.0.post1",
    ),
}

_cache: dict[str, Any] = {}
_info: dict[str, dict | None] = {}


class VllmUnavailable(RuntimeError):
    """No vllm venv to run the check with."""


def _venv(flavour: str) -> tuple[str, Path, str, str]:
    if flavour not in VENVS:
        raise ValueError(f"unknown flavour {flavour!r}: {' or '.join(VENVS)}")
    return VENVS[flavour]


def vllm_python(flavour: str = "vllm") -> Path | None:
    """The flavour's vllm venv python, or None when it is not there."""
    env_var, default, _, _ = _venv(flavour)
    path = Path(os.environ.get(env_var) or default)
    return path if path.is_file() and os.access(path, os.X_OK) else None


def unavailable_reason(flavour: str = "vllm") -> str:
    env_var, default, build, holds = _venv(flavour)
    path = os.environ.get(env_var) or str(default)
    return f"no {holds} venv python at {path} (${env_var}); build it with {build}"


def require_vllm_python(flavour: str = "vllm") -> Path:
    """The flavour's vllm venv python; skips the calling test (or raises) when absent."""
    path = vllm_python(flavour)
    if path is None:
        if "pytest" in sys.modules:
            import pytest

            pytest.skip(unavailable_reason(flavour))
        raise VllmUnavailable(unavailable_reason(flavour))
    return path


def _validate(items: list[dict]) -> None:
    if not isinstance(items, list):
        raise TypeError("items must be a list of {id, argv, env}")
    ids = set()
    for it in items:
        if not isinstance(it, dict) or not isinstance(it.get("argv"), list):
            raise TypeError(f"each item needs an argv list: {it!r}")
        if not all(isinstance(a, str) for a in it["argv"]):
            raise TypeError(f"argv must be strings: {it.get('id')}: {it['argv']!r}")
        if it.get("id") in ids:
            raise ValueError(f"duplicate id {it.get('id')!r}")
        ids.add(it.get("id"))


def run_check(payload: list[dict] | None, *args: str, python: Path | None = None,
              flavour: str = "vllm"):
    """Run vllm_check.py once; returns its parsed JSON stdout."""
    py = python or require_vllm_python(flavour)
    env = dict(os.environ)
    env.setdefault("VLLM_TARGET_DEVICE", "cpu")
    env.pop("PYTHONPATH", None)  # the main venv's paths must not leak into the vllm venv
    proc = subprocess.run(
        [str(py), str(CHECK_SCRIPT), *args],
        input="" if payload is None else json.dumps(payload),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=env,
        cwd=str(REPO),
    )
    tail = "\n".join(proc.stderr.splitlines()[-30:])
    if proc.returncode != 0:
        raise RuntimeError(f"vllm_check.py exited {proc.returncode}:\n{tail}")
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError as e:
        raise RuntimeError(
            f"vllm_check.py printed no JSON ({e}):\n{proc.stdout[:2000]}\n{tail}"
        ) from e


def check_argv(items: list[dict], python: Path | None = None,
               flavour: str = "vllm") -> list[dict]:
    """Check each planned argv with the flavour's real `vllm serve` parser; one result
    per item, in order: {"id", "ok", "error", "connector", "ascend", ...}. Items:
    {"id": str, "argv": ["vllm", "serve", MODEL, ...], "env": {...},
    "strict_ascend": bool, "strict_connector": bool} (all but id and argv optional;
    strict_ascend=True also fails the item on vLLM-Ascend's kv_connector_extra_config
    start-up checks, reported in "ascend" either way; strict_connector=True fails it
    when its kv_connector is not registered, reported in "connector" either way)."""
    _validate(items)
    payload = [
        {
            "id": it.get("id"),
            "argv": list(it["argv"]),
            "env": dict(it.get("env") or {}),
            "strict_ascend": bool(it.get("strict_ascend", False)),
            "strict_connector": bool(it.get("strict_connector", False)),
        }
        for it in items
    ]
    py = python or require_vllm_python(flavour)
    key = json.dumps([str(py), payload], sort_keys=True)
    if key not in _cache:
        out = run_check(payload, "--with-info", python=py)
        results = out.get("results") if isinstance(out, dict) else None
        if not isinstance(results, list) or len(results) != len(payload):
            raise RuntimeError(f"vllm_check.py returned {out!r:.500} for {len(payload)} items")
        _cache[key] = results
        _info[str(py)] = out.get("info")
    return [dict(r) for r in _cache[key]]


def vllm_info(python: Path | None = None, flavour: str = "vllm") -> dict:
    """vllm version and the code paths vllm_check.py uses (vllm_check.py --info); from an
    earlier check_argv of the same venv when there was one (no second vllm import)."""
    py = python or require_vllm_python(flavour)
    if _info.get(str(py)) is None:
        _info[str(py)] = run_check(None, "--info", python=py)
    return dict(_info[str(py)])


def ascend_report(python: Path | None = None) -> dict:
    """What of vLLM-Ascend loads in its venv and exactly why the rest does not
    (vllm_check.py --ascend; cached for the session)."""
    py = python or require_vllm_python("vllm-ascend")
    key = json.dumps([str(py), "--ascend"])
    if key not in _cache:
        _cache[key] = run_check(None, "--ascend", python=py)
    return json.loads(json.dumps(_cache[key]))
