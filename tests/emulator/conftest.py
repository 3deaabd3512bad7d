"""Fixtures of the emulator tests (helpers live in tests/emulator/helpers.py)."""
from __future__ import annotations

import signal
import subprocess
from typing import Dict, List, Optional

import pytest

from tests.emulator.helpers import Emu


def _factory(logdir, started: List[Emu]):
    def start(name: str, host: str, port: Optional[int], flags: List[str],
              env: Optional[Dict[str, str]] = None) -> Emu:
        e = Emu(name, host, port, flags, env or {}, logdir)
        started.append(e)
        return e
    return start


def _stop_all(started: List[Emu]) -> None:
    for e in started:
        if e.proc.poll() is None:
            e.proc.send_signal(signal.SIGTERM)
    for e in started:
        try:
            e.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        e.kill()


@pytest.fixture
def emu_factory(tmp_path_factory):
    """Start emulator processes; every one is stopped (SIGTERM, then SIGKILL) at teardown."""
    started: List[Emu] = []
    yield _factory(tmp_path_factory.mktemp("emu"), started)
    _stop_all(started)


@pytest.fixture(scope="module")
def module_emus(tmp_path_factory):
    """Like emu_factory, shared by a whole test module."""
    started: List[Emu] = []
    yield _factory(tmp_path_factory.mktemp("emu"), started)
    _stop_all(started)
