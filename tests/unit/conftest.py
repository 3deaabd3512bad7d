"""Fixtures of the unit tests that run real launchers (tests/unit/unitnode.py)."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from .unitnode import Node


@pytest.fixture
def node(tmp_path) -> Iterator[Node]:
    """A node directory whose launchers and processes are all stopped afterwards."""
    n = Node(tmp_path)
    try:
        yield n
    finally:
        n.cleanup()
