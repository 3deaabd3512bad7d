"""The validate play on the controller, for every inventory in the repo: plans once,
shows the plan, and fails naming an undeclared pd_ variable given with -e. Cheap: it
runs on localhost only (--tags validate), no node is touched."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PLAYBOOK = str(Path(sys.executable).parent / "ansible-playbook")
INVENTORIES = sorted(p.parent.name for p in REPO.glob("inventories/*/inventory.yml"))


def validate(inventory: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PLAYBOOK, "-i", f"inventories/{inventory}/inventory.yml", "site.yml", "--tags",
         "validate", *extra], cwd=REPO, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, ANSIBLE_FORCE_COLOR="0", ANSIBLE_NOCOLOR="1"))


@pytest.mark.parametrize("inventory", INVENTORIES)
def test_every_inventory_validates_on_the_controller(inventory):
    res = validate(inventory)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "# cluster " in res.stdout  # the plan summary
    assert res.stdout.count("TASK [validate : Build the cluster plan") == 1


def test_a_mistyped_knob_given_with_e_is_an_error():
    res = validate("local", "-e", "pd_ready_timout=5")
    assert res.returncode != 0
    assert "pd_ready_timout: unknown pd-deploy variable; did you mean pd_ready_timeout?" in (
        res.stdout.replace("\n", " ").replace("  ", " "))
