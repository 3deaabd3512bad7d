"""The README's inventory reference and role-variable table stay true to the code."""
from __future__ import annotations

import re
from pathlib import Path

from pd_deploy.settings import markdown_reference

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def test_inventory_reference_is_the_code_table():
    for row in markdown_reference().splitlines():
        assert row in README, f"README lacks: {row}"


def test_every_role_knob_is_documented():
    knobs = set()
    for defaults in REPO.glob("roles/*/defaults/main.yml"):
        knobs |= set(re.findall(r"^(pd_[a-z_]+):", defaults.read_text(), re.M))
    missing = sorted(k for k in knobs if f"`{k}`" not in README)
    assert missing == []


def test_readme_names_the_test_command_ci_runs():
    assert "make test" in README
    assert "make test" in (REPO / ".ci" / "run").read_text()
