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
    "pd_deploy.engines.xllm:XllmBackend",
    "pd_deploy.engines.fastdeploy:FastDeployBackend",
    "pd_deploy.engines.ksana:KsanaBackend",
)

#: pd_engine value of the engine emulator; pd_emulate names the engine it stands in
#: for, whose backend then plans exactly that engine's argv (Backend.emulates)
EMULATOR = "emulator"


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


@cache
def by_emulation() -> dict[str, Backend]:
    """pd_emulate value -> backend."""
    out: dict[str, Backend] = {}
    for backend in registry().values():
        for name in backend.emulates:
            if name in out:
                raise ValueError(f"pd_emulate {name!r} is served by {out[name].name} and "
                                 f"{backend.name}")
            out[name] = backend
    return out


def engine_names() -> tuple[str, ...]:
    return tuple(by_engine()) + (EMULATOR,)


def emulated_names() -> tuple[str, ...]:
    return tuple(by_emulation())


def backend_for(engine: str, emulate: str | None = None) -> Backend:
    """The backend of a pd_engine value (for the emulator: of the engine it emulates,
    pd_emulate, default vllm)."""
    if engine == EMULATOR:
        return by_emulation()[emulate or "vllm"]
    return by_engine()[engine]


def reset() -> None:
    """Forget the registry (after changing PD_DEPLOY_BACKENDS, in tests)."""
    for cached in (registry, by_engine, by_emulation):
        clear = getattr(cached, "cache_clear", None)  # tests may have replaced one
        if clear is not None:
            clear()
