"""Spec field `reload_signal` (parse, validate, serialise) and reload_differences."""
from __future__ import annotations

import copy

import pytest

from pd_deploy.proxy_config import proxy_unit
from pd_launcher.launcher.spec import (
    RELOAD_SIGNALS,
    SpecError,
    parse_process,
    parse_spec,
    reload_differences,
    spec_to_dict,
)


def raw_spec(**proc) -> dict:
    return {"schema": 1, "cluster": "c", "node": "n", "role": "C", "ip": "127.0.78.9",
            "dirs": {"state": "/s", "log": "/l", "run": "/r"},
            "files": [{"path": "/r/a.conf", "content": "one", "mode": "0644"}],
            "processes": [{"name": "agent", "argv": ["agent"], **proc},
                          {"name": "web", "argv": ["web", "--port", "1"]}],
            "proxy": {"listen": "127.0.78.9:1", "prefill": ["a:1"], "decode": ["b:1"]}}


@pytest.mark.parametrize("sig", RELOAD_SIGNALS)
def test_reload_signal_round_trips(sig):
    spec = parse_spec(raw_spec(reload_signal=sig))
    assert spec.processes[0].reload_signal == sig
    assert spec.processes[1].reload_signal is None
    d = spec_to_dict(spec)
    assert d["processes"][0]["reload_signal"] == sig
    assert "reload_signal" not in d["processes"][1]  # absent when unset: canonical form
    assert parse_spec(d) == spec and spec_to_dict(parse_spec(d)) == d
    assert "reload_signal" not in spec.processes[0].extra


def test_reload_signal_null_is_unset():
    assert parse_spec(raw_spec(reload_signal=None)).processes[0].reload_signal is None


@pytest.mark.parametrize("bad", ["SIGHUP", "KILL", "hup", 1, True, ""])
def test_invalid_reload_signal_is_named(bad):
    with pytest.raises(SpecError) as exc:
        parse_spec(raw_spec(reload_signal=bad, argv=[]))
    errors = exc.value.errors
    assert any(e.startswith("processes[0].reload_signal: must be one of HUP | USR1 | USR2")
               for e in errors), errors
    assert any(e.startswith("processes[0].argv") for e in errors)  # collected, not first
    with pytest.raises(SpecError, match=r"p\.reload_signal"):
        parse_process({"name": "x", "argv": ["x"], "reload_signal": bad}, "p")


def test_reload_differences_ignores_files_and_proxy_only():
    old = parse_spec(raw_spec(reload_signal="HUP"))
    new_raw = raw_spec(reload_signal="HUP")
    new_raw["files"] = [{"path": "/r/a.conf", "content": "two"},
                        {"path": "/r/b.conf", "content": "new", "mode": "0600"}]
    new_raw["proxy"]["decode"].append("c:1")
    assert reload_differences(old, parse_spec(new_raw)) == []

    changed = copy.deepcopy(new_raw)
    changed["processes"][1]["argv"][2] = "2"
    changed["processes"][1]["env"] = {"A": "1"}
    changed["dirs"]["run"] = "/r2"
    assert reload_differences(old, parse_spec(changed)) == [
        "dirs.run", "processes[1].argv[2]", "processes[1].env.A"]
    fewer = copy.deepcopy(new_raw)
    del fewer["processes"][1]
    assert reload_differences(old, parse_spec(fewer)) == ["processes"]
    sig = copy.deepcopy(new_raw)
    sig["processes"][0]["reload_signal"] = "USR1"
    assert reload_differences(old, parse_spec(sig)) == ["processes[0].reload_signal"]
    many = copy.deepcopy(new_raw)
    many.update(cluster="x", node="y", ip="z", grace_seconds=1, engine="e", master=True)
    diffs = reload_differences(old, parse_spec(many))
    assert len(diffs) == 5 and diffs[-1] == "... and 2 more", diffs


@pytest.mark.parametrize("router", [False, True])
def test_proxy_agent_reloads_on_hup_and_its_drain_file_is_not_a_spec_file(router):
    block = ({"listen": "127.0.78.9:7000", "mode": "router", "router": ["127.0.78.3:1"]}
             if router else
             {"listen": "127.0.78.9:7000", "prefill": ["127.0.78.1:1"],
              "decode": ["127.0.78.2:1"]})
    unit = proxy_unit(block, {"state": "/x/state", "log": "/x/log", "run": "/x/run"})
    procs = {p["name"]: p for p in unit["processes"]}
    assert procs["proxy-agent"]["reload_signal"] == "HUP"
    assert "reload_signal" not in procs["proxy"]   # nginx gets its HUP from the agent
    import json

    cfg = json.loads(next(f["content"] for f in unit["files"]
                          if f["path"].endswith("proxy_agent.json")))
    assert cfg["drain_file"] == "/x/run/drain.json"
    assert cfg["drain_file"] not in [f["path"] for f in unit["files"]]
    parse_process(procs["proxy-agent"])  # valid for the launcher
