"""Bad input: every case is caught, named by host and field, and all errors are collected."""
from __future__ import annotations

import pytest

from pd_launcher.settings import PlanInvalid
from pd_launcher.topology import build_plan

from .planfix import DELETE, mutate, small, tutorial


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


def test_duplicate_node_ips():
    inp = mutate(small(), "d2", ansible_host="127.0.1.1", host_ip="127.0.1.2")
    assert_error(inp, "d2", "node_ip", "also the node IP of p1")


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
