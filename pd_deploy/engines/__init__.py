"""Engine backends: one module per engine family, one registry line each.

`pd_engine` (an inventory variable) names an engine; the backend that serves it
turns the cluster plan into processes, services and a front door. Adding an engine:
docs/engines.md. Backends are imported on first use (they import the planner).
"""
from __future__ import annotations

import importlib
import os
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from pd_deploy.engines.base import Backend

# The registry: "module:class" of every backend, in the README's order.
BACKENDS: tuple[str, ...] = (
    "pd_deploy.engines.vllm:VllmBackend",
)


# Out-of-tree backends (developing a new one, tests): "module:Class,module:Class".
EXTRA_ENV = "PD_DEPLOY_BACKENDS"


def backend_paths() -> tuple[str, ...]:
    extra = [p.strip() for p in os.environ.get(EXTRA_ENV, "").split(",") if p.strip()]
    return BACKENDS + tuple(extra)


@cache
def registry() -> dict[str, Backend]:
    """backend name -> backend instance."""
    out: dict[str, Backend] = {}
    for path in backend_paths():
        module, cls = path.split(":")
        backend = getattr(importlib.import_module(module), cls)()
        if backend.name in out:
            raise ValueError(f"two backends are named {backend.name!r}")
        out[backend.name] = backend
    return out


@cache
def by_engine() -> dict[str, Backend]:
    """pd_engine value -> backend."""
    out: dict[str, Backend] = {}
    for backend in registry().values():
        for engine in backend.engines:
            if engine in out:
                raise ValueError(f"pd_engine {engine!r} is served by {out[engine].name} and "
                                 f"{backend.name}")
            out[engine] = backend
    return out


def engine_names() -> tuple[str, ...]:
    return tuple(by_engine())


def backend_for(engine: str) -> Backend:
    return by_engine()[engine]
