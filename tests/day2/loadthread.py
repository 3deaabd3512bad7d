"""bench/day2's load generator (constant streaming load through the front door) run
in a thread, for playbook tests that must show 0 failed requests while they change the
cluster."""
from __future__ import annotations

import asyncio
import importlib.util
import sys
import threading
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def _load_module() -> Any:
    spec = importlib.util.spec_from_file_location("pd_bench_day2_load",
                                                  REPO / "bench" / "day2" / "load.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


class Load:
    """`with Load(url, concurrency=3) as load: ...; load.phase("roll")`; after the
    block, `load.summary()` gives sent / ok / failed per phase."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        self.gen = _load_module().LoadGen(url=url, **kwargs)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> Load:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.gen.start(), self.loop).result(10)
        return self

    def phase(self, name: str) -> None:
        self.loop.call_soon_threadsafe(self.gen.phase, name)

    def __exit__(self, *exc: Any) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.gen.stop(30), self.loop).result(60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)

    def summary(self) -> dict[str, dict[str, Any]]:
        return {row["phase"]: row for row in self.gen.summary()}

    def failed(self) -> dict[str, Any]:
        """Phases with failed requests: phase -> (failed, errors)."""
        return {name: (row["failed"], row["errors"]) for name, row in self.summary().items()
                if row["failed"]}
