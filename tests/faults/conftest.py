"""The fault matrix (docs/failure-modes.md): one test per row, marked `fault_row(N)`.

A row's test calls `fault_report(N, observed=..., lost=...)` once it has checked the
behaviour: what it saw, in a sentence with figures, and how many client requests were
lost (None where the row sends none). The report goes to the JSON-lines file named by
PD_FAULT_REPORT (bench/faults sets it); without it the call only checks its arguments.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

ROWS = range(1, 15)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fault_row(n): the test of row n of docs/failure-modes.md")


@pytest.fixture
def fault_report(request: pytest.FixtureRequest) -> Callable[..., None]:
    marker = request.node.get_closest_marker("fault_row")
    if marker is None:
        raise pytest.UsageError(f"{request.node.nodeid} uses fault_report without fault_row(N)")
    row = int(marker.args[0])

    def report(observed: str, lost: int | None = None) -> None:
        assert observed.strip(), "fault_report needs what was observed"
        assert lost is None or lost >= 0
        path = os.environ.get("PD_FAULT_REPORT")
        if not path:
            return
        line = {"row": row, "test": request.node.nodeid, "observed": observed.strip(),
                "lost": lost, "at": time.time()}
        with Path(path).open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(line) + "\n")

    return report
