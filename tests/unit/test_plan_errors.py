"""Bad input: every case is caught, named by host and field, and all errors are collected."""
from __future__ import annotations

import pytest

from pd_deploy.settings import PlanInvalid
from pd_deploy.topology import build_plan

from .planfix import BASE, DELETE, mutate, small, tutorial


def errors_of(inp) -> list:
    with pytest.raises(PlanInvalid) as info:
        build_plan(*inp)
    return info.value.errors


def assert_error(inp, host, field, text) -> None:
    errs = errors_of(inp)
    hits = [e for e in errs if e.host == host and e.field == field and text in e.message]
    assert hits, f"no error {host}/{field}/{text!r} in: " + "; ".join(map(str, errs))


def without_group(name):
    groups, hostvars = small()
    groups[name] = []
    return groups, hostvars


def test_valid_inputs_plan_cleanly():
    build_plan(*small())
    build_plan(*tutorial())


@pytest.mark.parametrize("group", ["P", "D", "C"])
def test_empty_group(group):
    assert_error(without_group(group), None, f"groups.{group}", "empty")


def test_host_ip_not_in_group():
    inp = mutate(small(), "d2", host_ip="127.0.1.77")
    assert_error(inp, "d2", "host_ip", "not the IP of any host in group D")


def test_host_ip_pointing_into_other_group():
    inp = mutate(small(), "d2", host_ip="127.0.1.1")  # p1's IP, a P host
    assert_error(inp, "d2", "host_ip", "not the IP of any host in group D")


def test_instance_master_missing():
    # d1 (127.0.1.2) is named master by d2 but d1 itself points elsewhere
    groups, hostvars = small()
    groups["D"].append("d3")
    hostvars["d3"] = dict(hostvars["d1"], ansible_host="127.0.1.4")
    hostvars["d1"]["host_ip"] = "127.0.1.4"
    assert_error((groups, hostvars), "d2", "host_ip", "has no master")


def test_host_in_both_p_and_d():
    groups, hostvars = small()
    groups["D"].append("p1")
    assert_error((groups, hostvars), "p1", "groups", "both P and D")


def test_hosts_sharing_a_machine_may_not_share_devices():
    # d2 on p1's machine with the same two devices: both hosts are named
    inp = mutate(small(), "d2", ansible_host="127.0.1.1", host_ip="127.0.1.2")
    assert_error(inp, "d2", "devices", "0,1 on 127.0.1.1 are also used by p1")


def test_hosts_sharing_a_machine_may_not_share_ports():
    # disjoint devices, but both serve on the default API port of the same address
    inp = mutate(small(), "d2", ansible_host="127.0.1.1", host_ip="127.0.1.2",
                 devices="2,3")
    assert_error(inp, "d2", "pd_api_port", "is also bound by p1")


def test_one_host_1p1d_like_the_guides():
    # xLLM / FastDeploy single-host layout: P on devices 0-3, D on 4-7, own ports
    groups = {"P": ["p"], "D": ["d"], "C": ["c"]}
    common = dict(BASE, pd_kv_port=36000, pd_devices_per_node=4)
    hostvars = {
        "p": dict(common, ansible_host="127.0.1.1", devices="0,1,2,3", pd_tp=4),
        "d": dict(common, ansible_host="127.0.1.1", devices="4,5,6,7", pd_tp=4,
                  pd_api_port=7200, pd_dp_rpc_port=12400, pd_kv_port=37000),
        "c": dict(common, ansible_host="127.0.1.1"),
    }
    plan = build_plan(groups, hostvars)
    assert plan.nodes["p"].ip == plan.nodes["d"].ip == "127.0.1.1"
    assert plan.upstreams("P") == ["127.0.1.1:7100"]
    assert plan.upstreams("D") == ["127.0.1.1:7200"]


def test_two_one_node_instances_on_one_machine():
    groups = {"P": ["pa", "pb"], "D": ["d"], "C": ["c"]}
    common = dict(BASE, pd_kv_port=36000, pd_devices_per_node=2)
    hostvars = {
        "pa": dict(common, ansible_host="127.0.1.1", devices="0,1"),
        "pb": dict(common, ansible_host="127.0.1.1", devices="2,3", pd_api_port=7200,
                   pd_dp_rpc_port=12400),
        "d": dict(common, ansible_host="127.0.1.2"),
        "c": dict(common, ansible_host="127.0.1.9"),
    }
    plan = build_plan(groups, hostvars)
    assert [i.hosts for i in plan.instances if i.role == "P"] == [["pa"], ["pb"]]
    assert plan.instance("P2").kv_port == 36100  # same base: the next range


def test_host_ip_naming_a_shared_machine_is_ambiguous():
    groups = {"P": ["pa", "pb", "pc"], "D": ["d"], "C": ["c"]}
    common = dict(BASE, pd_kv_port=36000, pd_devices_per_node=1)
    hostvars = {
        "pa": dict(common, ansible_host="127.0.1.1", devices="0"),
        "pb": dict(common, ansible_host="127.0.1.1", devices="1", pd_api_port=7200,
                   pd_dp_rpc_port=12400),
        "pc": dict(common, ansible_host="127.0.1.3", host_ip="127.0.1.1"),
        "d": dict(common, ansible_host="127.0.1.2"),
        "c": dict(common, ansible_host="127.0.1.9"),
    }
    assert_error((groups, hostvars), "pc", "host_ip", "several masters in group P (pa, pb)")


def test_unknown_pd_variable_names_host_and_closest_name():
    inp = mutate(small(), "c1", pd_proxy_max_inflght=10)
    assert_error(inp, "c1", "pd_proxy_max_inflght", "unknown pd-deploy variable")
    inp = mutate(small(), "c1", pd_proxy_max_fail=3)
    assert_error(inp, "c1", "pd_proxy_max_fail", "did you mean pd_proxy_max_fails?")


def test_unknown_variable_once_with_the_other_hosts():
    errs = errors_of(mutate(small(), pd_ready_timout=5))
    hits = [e for e in errs if e.field == "pd_ready_timout"]
    assert len(hits) == 1 and hits[0].host == "p1"
    assert "did you mean pd_ready_timeout?" in hits[0].message
    assert "also set for d1, d2, c1" in hits[0].message


def test_role_knobs_and_backend_variables_are_declared():
    build_plan(*mutate(small(), pd_runtime="process", pd_ready_timeout=5, pd_image="x",
                       pd_emulate="vllm", pd_vllm_version="0.23.0",
                       pd_model_is_moe=True))


def test_all_errors_at_once_including_engine_rules():
    # a generic error (bad port) and a backend rule (Mooncake random ports) together
    errs = errors_of(mutate(small(), pd_kv_port=20000, pd_proxy_port=0))
    fields = {(e.host, e.field) for e in errs}
    assert ("p1", "pd_kv_port") in fields and ("c1", "pd_proxy_port") in fields


def test_one_engine_family_per_cluster(monkeypatch):
    from pd_deploy.engines import base, registry, reset

    class Other(base.Backend):
        name = "other"
        engines = ("other-engine",)

    reset()
    monkeypatch.setattr("pd_deploy.engines.BACKENDS",
                        ("pd_deploy.engines.vllm:VllmBackend",))
    monkeypatch.setattr("pd_deploy.engines.registry",
                        lambda: {"vllm": registry.__wrapped__()["vllm"], "other": Other()})
    try:
        inp = mutate(small(), "d1", pd_engine="other-engine")
        assert_error(inp, "d1", "pd_engine", "one cluster runs one engine family")
    finally:
        reset()


def test_devices_not_divisible_by_tp():
    inp = mutate(small(), "p1", devices="0,1,2", pd_tp=2)
    assert_error(inp, "p1", "devices", "not divisible by pd_tp=2")


@pytest.mark.parametrize("devices", ["0,x,2", "0,,1", [0, "a"], "-1", 3.5])
def test_malformed_device_ids(devices):
    inp = mutate(small(), "p1", devices=devices)
    errs = [e for e in errors_of(inp) if e.host == "p1" and e.field == "devices"]
    assert errs and ("malformed" in errs[0].message or "must be" in errs[0].message)


def test_duplicate_device_ids():
    assert_error(mutate(small(), "p1", devices="0,1,1,2"), "p1", "devices", "listed twice")


def test_same_port_twice_on_one_ip_api_vs_proxy():
    # c1 on the same IP as p1 with the proxy on p1's API port
    inp = mutate(small(), "c1", ansible_host="127.0.1.1", pd_proxy_port=7100)
    assert_error(inp, "c1", "pd_proxy_port", "also bound by p1/dp0")


def test_same_port_twice_api_vs_dp_rpc():
    inp = mutate(small(), pd_dp_rpc_port=7101)
    assert_error(inp, "p1", "pd_dp_rpc_port", "also bound by p1/dp1")


def test_same_port_twice_api_vs_kv_range():
    inp = mutate(small(), pd_kv_port=7100)
    errs = errors_of(inp)
    assert any(e.field == "pd_kv_port" and "also bound by" in e.message for e in errs)


def test_port_out_of_range():
    assert_error(mutate(small(), "p1", pd_api_port=70000), "p1", "pd_api_port", "outside 1..65535")
    assert_error(mutate(small(), "c1", pd_proxy_port=0), "c1", "pd_proxy_port", "outside")


def test_api_range_past_65535():
    inp = mutate(small(), pd_api_port=65535)
    assert_error(inp, "p1", "pd_api_port", "outside 1..65535")


def test_kv_range_inside_mooncake_random_ports():
    inp = mutate(small(), pd_kv_port=21000)
    assert_error(inp, "p1", "pd_kv_port", "overlaps the ports Mooncake picks")


def test_prefill_instances_of_different_shape_with_mooncake():
    groups, hostvars = tutorial()
    hostvars["p2"]["devices"] = "0,1,2,3,4,5,6,7"  # DP1 x TP8 vs DP2 x TP8
    assert_error((groups, hostvars), "p2", "devices", "must have the same shape")


def test_different_shapes_fine_with_nixl():
    groups, hostvars = mutate(small("vllm"), pd_kv_port=DELETE)
    groups["P"].append("p2")
    hostvars["p2"] = dict(hostvars["p1"], ansible_host="127.0.1.5", devices="0")
    build_plan(groups, hostvars)


def test_prefill_tp_not_multiple_of_decode_tp():
    groups, hostvars = small()
    for h in ("d1", "d2"):
        hostvars[h].update(pd_tp=2, devices="0,1")
    hostvars["p1"].update(pd_tp=1)
    groups2, hostvars2 = mutate((groups, hostvars), "p1", devices="0,1,2")
    # p1: tp 3 on 3 devices; decode tp 2
    hostvars2["p1"]["pd_tp"] = 3
    assert_error((groups2, hostvars2), "p1", "pd_tp", "not a multiple of decode tp 2")


def test_prefill_tp_rule_lifted_for_mla():
    groups, hostvars = mutate(small(), pd_model_is_mla=True)
    for h in ("d1", "d2"):
        hostvars[h].update(pd_tp=2, devices="0,1")
    hostvars["p1"].update(pd_tp=3, devices="0,1,2")
    build_plan(groups, hostvars)


def test_unknown_engine():
    assert_error(mutate(small(), pd_engine="trt-llm"), "p1", "pd_engine", "unknown value")


def test_unknown_dp_mode():
    assert_error(mutate(small(), pd_dp_mode="hybrid"), "d1", "pd_dp_mode", "unknown value")


def test_missing_model_path():
    assert_error(mutate(small(), pd_model_path=DELETE), "p1", "pd_model_path", "required")


@pytest.mark.parametrize("arg", ["--port", "--port=9000", "--data-parallel-rank",
                                 "--kv-transfer-config", "--host", "-tp", "--api-key"])
def test_extra_args_overriding_owned_flag(arg):
    inp = mutate(small(), "d1", pd_extra_args=["--max-num-seqs", "4", arg, "1"])
    assert_error(inp, "d1", "pd_extra_args", "set by the planner")


def test_extra_args_not_a_list():
    assert_error(mutate(small(), "p1", pd_extra_args="--enforce-eager"), "p1", "pd_extra_args",
                 "must be a list")


def test_env_not_a_dict():
    assert_error(mutate(small(), "p1", pd_env=["A=1"]), "p1", "pd_env", "must be a dict")


def test_bad_tp_value():
    assert_error(mutate(small(), "p1", pd_tp="two"), "p1", "pd_tp", "must be an integer")


def test_bad_ip():
    assert_error(mutate(small(), "d2", host_ip="127.0.1"), "d2", "host_ip", "not an IP")


def test_instance_nodes_disagree_with_master():
    inp = mutate(small(), "d2", pd_model_path="/models/other")
    assert_error(inp, "d2", "pd_model_path", "differs from")


def test_unreadable_vllm_version():
    assert_error(mutate(small(), pd_vllm_version="latest"), "p1", "pd_vllm_version", "cannot")


def test_all_errors_are_collected():
    groups, hostvars = mutate(small(), "p1", pd_engine="nope")
    hostvars["d2"]["host_ip"] = "127.0.1.99"
    hostvars["c1"]["pd_proxy_port"] = 99999
    errs = errors_of((groups, hostvars))
    where = {(e.host, e.field) for e in errs}
    assert {("p1", "pd_engine"), ("d2", "host_ip"), ("c1", "pd_proxy_port")} <= where
    assert all(str(e).startswith(f"{e.host}: {e.field}: ") for e in errs if e.host)


def test_proxy_agent_port_clash():
    # the agent listens on pd_proxy_port + 1: on p1's IP that is p1's second API port
    inp = mutate(small(), "c1", ansible_host="127.0.1.1", pd_proxy_port=7100)
    errs = errors_of(inp)
    assert any(e.host == "c1" and e.field == "pd_proxy_admin_port" for e in errs), errs
    inp = mutate(small(), "c1", ansible_host="127.0.1.1", pd_proxy_port=7000,
                 pd_proxy_admin_port=7101)
    assert_error(inp, "c1", "pd_proxy_admin_port", "also bound by p1/dp1")
