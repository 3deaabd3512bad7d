"""plugins/modules/pd_unit_remove.py with a mocked AnsibleModule: refuses a running
unit, removes only its own paths, the launcher with the last unit, check mode."""
from __future__ import annotations

import pytest

from .modharness import failed, load, ok


@pytest.fixture(scope="module")
def mod():
    return load("pd_unit_remove")


def node(tmp_path, roles=("P", "D")):
    base = tmp_path / "pd"
    for role in roles:
        for d in ("run", "state", "logs"):
            (base / d / role).mkdir(parents=True)
        (base / "logs" / role / "engine.log").write_text("log\n")
    (base / "lib" / "pd_launcher").mkdir(parents=True)
    (base / "images").mkdir()
    return base


def test_a_unit_that_still_has_a_state_file_is_refused(mod, tmp_path):
    base = node(tmp_path)
    (base / "state" / "P" / "launcher.json").write_text("{}")
    r = failed(mod, {"base_dir": str(base), "role": "P"})
    assert r["msg"] == (f"{base}/state/P/launcher.json still exists: the unit is not stopped "
                        f"(stop it first: python -m pd_launcher stop --state-dir {base}/state/P)")
    assert (base / "run" / "P").is_dir()


def test_one_unit_of_two_keeps_logs_and_launcher(mod, tmp_path):
    base = node(tmp_path)
    r = ok(mod, {"base_dir": str(base), "role": "P"})
    assert r["changed"] and r["removed"] == [str(base / "run" / "P"), str(base / "state" / "P")]
    assert (base / "logs" / "P" / "engine.log").exists() and (base / "lib").is_dir()
    assert (base / "run" / "D").is_dir()
    again = ok(mod, {"base_dir": str(base), "role": "P"})
    assert not again["changed"] and again["removed"] == []


def test_the_last_unit_takes_the_launcher_and_asked_logs_with_it(mod, tmp_path):
    base = node(tmp_path, roles=("C",))
    r = ok(mod, {"base_dir": str(base), "role": "C", "remove_logs": True})
    assert set(r["removed"]) == {str(base / p) for p in
                                 ("run/C", "state/C", "logs/C", "lib", "run", "state", "logs")}
    assert sorted(p.name for p in base.iterdir()) == ["images"]  # not ours to remove


def test_check_mode_reports_and_removes_nothing(mod, tmp_path):
    base = node(tmp_path)
    r = ok(mod, {"base_dir": str(base), "role": "D", "remove_logs": True}, check_mode=True)
    assert r["changed"] and str(base / "logs" / "D") in r["removed"]
    assert (base / "run" / "D").is_dir() and (base / "logs" / "D" / "engine.log").exists()


def test_role_is_an_alias_of_unit(mod, tmp_path):
    base = node(tmp_path)
    r = ok(mod, {"base_dir": str(base), "role": "D"})
    assert str(base / "run" / "D") in r["removed"]


def test_service_unit_by_name(mod, tmp_path):
    base = node(tmp_path, roles=("P", "etcd"))
    r = ok(mod, {"base_dir": str(base), "unit": "etcd", "remove_logs": True})
    assert sorted(r["removed"]) == sorted(str(base / d / "etcd") for d in ("run", "state", "logs"))
    assert (base / "run" / "P").is_dir() and (base / "lib").exists()


@pytest.mark.parametrize("bad", ["../P", "a/b", "..", "", "-x", "x y"])
def test_unit_name_is_a_plain_directory_name(mod, tmp_path, bad):
    base = node(tmp_path)
    r = failed(mod, {"base_dir": str(base), "unit": bad})
    assert "not a unit name" in r["msg"]
    assert (base / "run" / "P").is_dir()
