"""Run tests/conformance/vllm_check.py (the real `vllm serve` parser) from the main venv.

    from tests.conformance.vllm_runner import check_argv
    results = check_argv([{"id": "p1:engine-dp0", "argv": ["vllm", "serve", ...],
                           "env": {...}}])
    bad = [r for r in results if not r["ok"]]

The vllm venv is built by `.ci/install-vllm.sh` (Makefile: `make vllm-venv`). Its python
is $PD_VLLM_PYTHON, default <repo>/.venv-vllm/bin/python. When it is missing,
check_argv skips the calling test (pytest.skip) with the reason, or raises
VllmUnavailable outside pytest.

One call = one process that imports vllm (15-25 s on this machine); pass every item
of a test in one call. Results of identical calls are cached for the session.
Each result: {"id", "ok", "error", "stage", "mode", "warnings", "parsed", ...};
see vllm_check.py's docstring.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHECK_SCRIPT = Path(__file__).resolve().with_name("vllm_check.py")
DEFAULT_VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
ENV_VAR = "PD_VLLM_PYTHON"
TIMEOUT_S = 600

_cache: dict[str, list[dict]] = {}


class VllmUnavailable(RuntimeError):
    """No vllm venv to run the check with."""


def vllm_python() -> Path | None:
    """The vllm venv's python, or None when it is not there."""
    path = Path(os.environ.get(ENV_VAR) or DEFAULT_VLLM_PYTHON)
    return path if path.is_file() and os.access(path, os.X_OK) else None


def unavailable_reason() -> str:
    path = os.environ.get(ENV_VAR) or str(DEFAULT_VLLM_PYTHON)
    return (
        f"no vllm venv python at {path} (${ENV_VAR}); build it with "
        "`.ci/install-vllm.sh` (make vllm-venv)"
    )


def require_vllm_python() -> Path:
    """The vllm venv's python; skips the calling test (or raises) when absent."""
    path = vllm_python()
    if path is None:
        if "pytest" in sys.modules:
            import pytest

            pytest.skip(unavailable_reason())
        raise VllmUnavailable(unavailable_reason())
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


def run_check(payload: list[dict] | None, *args: str, python: Path | None = None):
    """Run vllm_check.py once; returns its parsed JSON stdout."""
    py = python or require_vllm_python()
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


def check_argv(items: list[dict], python: Path | None = None) -> list[dict]:
    """Check each planned argv with the real `vllm serve` parser; one result per item,
    in order: {"id", "ok", "error", "ascend", ...}. Items: {"id": str, "argv": ["vllm",
    "serve", MODEL, ...], "env": {...}, "strict_ascend": bool} (env and strict_ascend
    optional; strict_ascend=True also fails the item on vLLM-Ascend's
    kv_connector_extra_config start-up checks, reported in "ascend" either way)."""
    _validate(items)
    payload = [
        {
            "id": it.get("id"),
            "argv": list(it["argv"]),
            "env": dict(it.get("env") or {}),
            "strict_ascend": bool(it.get("strict_ascend", False)),
        }
        for it in items
    ]
    key = json.dumps([str(python), payload], sort_keys=True)
    if key not in _cache:
        results = run_check(payload, python=python)
        if not isinstance(results, list) or len(results) != len(payload):
            raise RuntimeError(f"vllm_check.py returned {len(results)} results for {len(payload)}")
        _cache[key] = results
    return [dict(r) for r in _cache[key]]


def vllm_info(python: Path | None = None) -> dict:
    """vllm version and the code paths vllm_check.py uses (vllm_check.py --info)."""
    return run_check(None, "--info", python=python)
