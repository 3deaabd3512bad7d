"""The README's inventory reference (generated, role knobs included) stays true to the
code, and lists each variable once."""
from __future__ import annotations

import re
from pathlib import Path

from pd_deploy.settings import markdown_reference

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def test_inventory_reference_is_the_code_table():
    for row in markdown_reference().splitlines():
        assert row in README, f"README lacks: {row}"


def test_every_role_knob_is_in_the_generated_reference():
    knobs = set()
    for defaults in REPO.glob("roles/*/defaults/main.yml"):
        knobs |= set(re.findall(r"^(pd_[a-z0-9_]+):", defaults.read_text(), re.M))
    reference = markdown_reference()
    missing = sorted(k for k in knobs if f"| `{k}` |" not in reference)
    assert missing == []


def test_each_variable_has_one_row():
    rows = re.findall(r"^\| `([a-z_0-9]+)` \|", README, re.M)
    assert sorted(r for r in set(rows) if rows.count(r) > 1) == []


def test_readme_names_the_test_command_ci_runs():
    assert "make test" in README
    assert "make test" in (REPO / ".ci" / "run").read_text()
