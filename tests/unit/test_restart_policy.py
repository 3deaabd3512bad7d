"""The restart policy (issue 14, "Recovery"): pd_restart_* knobs -> the spec's `restart`
block of every unit, errors naming host and field; the launcher's parser of the block;
restarts in the status table."""
from __future__ import annotations

import pytest

from pd_deploy.settings import PlanInvalid
from pd_deploy.status_table import COLUMNS, format_table, unit_row
from pd_deploy.topology import build_plan
from pd_launcher.launcher.spec import RestartPolicy, SpecError, parse_spec, spec_to_dict

from .planfix import assert_error, mutate, small, specs_of

DEFAULT = {"policy": "on-failure", "max": 5, "window_s": 600, "backoff_s": 1.0,
           "backoff_max_s": 30}


def test_every_unit_gets_the_default_policy():
    specs = specs_of(small())
    units = [(h, u) for h, by_unit in specs.items() for u in by_unit]
    assert {u for _, u in units} == {"P", "D", "C"}
    for host, unit in units:
        assert specs[host][unit]["restart"] == DEFAULT, (host, unit)
        assert list(specs[host][unit])[-1] == "restart"  # after logs, before unknown keys


def test_the_knobs_land_in_that_hosts_spec_only():
    inp = mutate(small(), "d2", pd_restart_policy="never", pd_restart_max=2,
                 pd_restart_window_s=60, pd_restart_backoff_max_s=8)
    inp = mutate(inp, "c1", pd_restart_max="0")  # strings from -e are accepted
    specs = specs_of(inp)
    assert specs["d2"]["D"]["restart"] == {"policy": "never", "max": 2, "window_s": 60,
                                           "backoff_s": 1.0, "backoff_max_s": 8}
    assert specs["d1"]["D"]["restart"] == DEFAULT
    assert specs["p1"]["P"]["restart"] == DEFAULT
    assert specs["c1"]["C"]["restart"] == dict(DEFAULT, max=0)


@pytest.mark.parametrize("var, value, words", [
    ("pd_restart_policy", "always", "unknown value 'always'; expected one of on-failure, never"),
    ("pd_restart_policy", 3, "must be a string"),
    ("pd_restart_max", -1, "-1 is outside 0..1000"),
    ("pd_restart_max", "five", "must be an integer"),
    ("pd_restart_window_s", 0, "0 is outside 1..604800"),
    ("pd_restart_backoff_max_s", 1.5, "must be an integer"),
    ("pd_restart_backoff_max_s", 7200, "7200 is outside 1..3600"),
    ("pd_restart_polcy", "never", "unknown pd-deploy variable; did you mean pd_restart_policy?"),
])
def test_bad_knob_names_host_and_field(var, value, words):
    assert_error(mutate(small(), "d2", **{var: value}), "d2", var, words)


def test_bad_knobs_on_several_hosts_are_all_reported():
    inp = mutate(mutate(small(), "p1", pd_restart_policy="sometimes"), "c1",
                 pd_restart_max=-3)
    with pytest.raises(PlanInvalid) as info:
        build_plan(*inp)
    where = {(e.host, e.field) for e in info.value.errors}
    assert {("p1", "pd_restart_policy"), ("c1", "pd_restart_max")} <= where


# ------------------------------------------------------------ the launcher's parser

def base_spec(**over):
    spec = {"schema": 1, "cluster": "t", "node": "n", "role": "P", "ip": "127.0.0.1",
            "processes": [{"name": "a", "argv": ["true"]}]}
    spec.update(over)
    return spec


def test_spec_without_restart_means_never():
    spec = parse_spec(base_spec())
    assert spec.restart is None
    assert "restart" not in spec_to_dict(spec)
    assert RestartPolicy().policy == "never"


def test_restart_block_round_trips_and_fills_defaults():
    spec = parse_spec(base_spec(restart={"policy": "on-failure", "max": 3}))
    assert spec.restart == RestartPolicy(policy="on-failure", max=3)
    again = spec_to_dict(spec)["restart"]
    assert again == {"policy": "on-failure", "max": 3, "window_s": 600.0, "backoff_s": 1.0,
                     "backoff_max_s": 30.0}
    assert parse_spec(base_spec(restart=again)) == spec


def test_restart_block_errors_name_the_field():
    with pytest.raises(SpecError) as info:
        parse_spec(base_spec(restart={"policy": "always", "max": -1, "window_s": "x",
                                      "backoff_s": True, "backoff_max_s": -2}))
    fields = sorted(e.split(":")[0] for e in info.value.errors)
    assert fields == ["restart.backoff_max_s", "restart.backoff_s", "restart.max",
                      "restart.policy", "restart.window_s"]
    with pytest.raises(SpecError) as info:
        parse_spec(base_spec(restart=["on-failure"]))
    assert info.value.errors[0].startswith("restart: must be an object")


# ------------------------------------------------------------------ status table

SPEC = {"role": "P", "instance": "P1",
        "processes": [{"name": "engine-dp0", "dp_ranks": [0],
                       "ports": [{"host": "127.0.0.1", "port": 7100, "use": "api"}]}]}


def unit(**over):
    info = {"recorded": True, "running": True, "status": "running", "launcher_alive": True,
            "uptime_s": 65, "processes": [{"name": "engine-dp0", "alive": True,
                                           "ready": True}]}
    info.update(over)
    return info


def test_status_row_shows_restarts():
    assert COLUMNS.index("restarts") == COLUMNS.index("health") + 1
    assert COLUMNS[-2:] == ("uptime", "image")  # the last columns stay where they were
    row = unit_row("p1", "P", SPEC, unit(restarts=3), [], "process")
    assert (row["state"], row["health"], row["restarts"]) == ("running", "1/1 ready", "3")
    lines = format_table([row])
    assert lines[0].split()[:7] == ["NODE", "ROLE", "INSTANCE", "DP", "RANKS", "STATE",
                                    "HEALTH"]
    assert lines[1].split()[6:8] == ["ready", "3"]


def test_status_row_of_an_old_state_file_or_no_state_file():
    old = unit()  # a state file written before `restarts` existed
    assert unit_row("p1", "P", SPEC, old, [], "process")["restarts"] == "0"
    assert unit_row("p1", "P", SPEC, None, [], "process")["restarts"] == "-"
    assert unit_row("p1", "P", SPEC, {"recorded": False}, [], "process")["restarts"] == "-"


def test_status_row_while_restarting():
    down = [{"name": "engine-dp0", "alive": False, "ready": False}]
    row = unit_row("p1", "P", SPEC, unit(status="restarting", running=False, restarts=1,
                                         processes=down), [], "process")
    assert (row["state"], row["health"], row["restarts"]) == ("restarting", "0/1 ready", "1")
    # a launcher that died during its backoff left "restarting" behind: not restarting
    row = unit_row("p1", "P", SPEC, unit(status="restarting", running=False, restarts=1,
                                         launcher_alive=False, processes=down), [], "process")
    assert row["state"].startswith("degraded 0/1")
