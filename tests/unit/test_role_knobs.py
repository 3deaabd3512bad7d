"""Role knobs: one definition each (roles/*/defaults/main.yml, commented, validated by
the role's meta/argument_specs.yml), and the same set and defaults as ROLE_KNOBS in
pd_deploy/settings.py, which makes an inventory typo of one of them a planner error."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from pd_deploy.settings import CORE, ROLE_KNOBS

REPO = Path(__file__).resolve().parents[2]
DEFAULTS = sorted(REPO.glob("roles/*/defaults/main.yml"))


def role_knobs() -> dict[str, tuple[str, object]]:
    """knob -> (role, default) over every role's defaults; fails on a knob defined twice."""
    out: dict[str, tuple[str, object]] = {}
    for path in DEFAULTS:
        role = path.parts[-3]
        for name, value in (yaml.safe_load(path.read_text()) or {}).items():
            assert name not in out, f"{name} is defined by {out[name][0]} and {role}"
            out[name] = (role, value)
    return out


def test_every_knob_is_a_pd_variable():
    assert [n for n in role_knobs() if not n.startswith("pd_")] == []


def test_knobs_are_role_knobs_with_the_same_defaults():
    knobs = role_knobs()
    core = {v.name: v for v in CORE}
    declared = {v.name: v for v in ROLE_KNOBS}
    # a few planner variables are also read by the roles (pd_python): same default
    shared = {n for n in knobs if n in core}
    assert set(knobs) - shared == set(declared)
    for name, (role, value) in knobs.items():
        want = (core.get(name) or declared[name]).default
        if want is None:  # derived: the role computes it (e.g. a path under the repo)
            assert isinstance(value, str) and "{{" in value, (name, value)
        else:
            assert value == want and type(value) is type(want), (role, name, value, want)


def test_every_knob_has_a_comment_and_an_argument_spec():
    for path in DEFAULTS:
        role = path.parts[-3]
        lines = path.read_text().splitlines()
        specs = yaml.safe_load((path.parents[1] / "meta" / "argument_specs.yml").read_text())
        options = {k for entry in specs["argument_specs"].values()
                   for k in (entry.get("options") or {})}
        for i, line in enumerate(lines):
            m = re.match(r"^(pd_[a-z0-9_]+):", line)
            if m:
                assert lines[i - 1].startswith("#"), f"{role}: {m.group(1)} has no comment"
                assert m.group(1) in options, f"{role}: {m.group(1)} is not in argument_specs"


def test_shared_knobs_live_in_pd_defaults_and_its_users_depend_on_it():
    knobs = role_knobs()
    for name in ("pd_runtime", "pd_python", "pd_container_cli", "pd_container_cli_args",
                 "pd_container_env", "pd_image"):
        assert knobs[name][0] == "pd_defaults", name
    for path in REPO.glob("roles/*/tasks/*.yml"):
        role = path.parts[-3]
        text = path.read_text()
        if role == "pd_defaults" or not re.search(r"\b(pd_runtime|pd_container_cli)\b", text):
            continue
        meta = yaml.safe_load((REPO / "roles" / role / "meta" / "main.yml").read_text())
        deps = [d["role"] if isinstance(d, dict) else d for d in meta["dependencies"]]
        assert "pd_defaults" in deps, f"{role} reads shared knobs without pd_defaults"
