"""Property tests over generated topologies: no clash, devices once, ranks exactly once."""
from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from pd_deploy.specs import node_specs
from pd_deploy.topology import build_plan


@st.composite
def topologies(draw):
    engine = draw(st.sampled_from(["vllm-ascend", "vllm", "emulator"]))
    mode = draw(st.sampled_from(["external", "internal"]))
    tp_p = draw(st.sampled_from([1, 2, 4]))
    tp_d = draw(st.sampled_from([1, 2]))
    tp_p = tp_p * tp_d  # keep prefill tp a multiple of decode tp
    groups = {"P": [], "D": [], "C": []}
    hostvars = {}
    ip = iter(range(1, 250))
    common = {"pd_engine": engine, "pd_model_path": "/m", "pd_dp_mode": mode,
              "pd_kv_port": 50000, "pd_cluster_name": "prop"}
    for role, tp in (("P", tp_p), ("D", tp_d)):
        # Mooncake needs every instance of a role to have the same shape: same node count
        n_inst = draw(st.integers(1, 3))
        nodes_per = draw(st.integers(1, 3))
        per_node = tp * draw(st.integers(1, max(1, 16 // tp)))
        for _ in range(n_inst):
            master = None
            for _ in range(nodes_per):
                name = f"{role.lower()}{len(groups[role])}"
                addr = f"127.0.1.{next(ip)}"
                master = master or addr
                groups[role].append(name)
                offset = draw(st.integers(0, 2))
                devs = ",".join(str(offset + i) for i in range(per_node))
                hostvars[name] = dict(common, ansible_host=addr, host_ip=master, pd_tp=tp,
                                      devices=devs)
    for i in range(draw(st.integers(1, 2))):
        shared = draw(st.booleans())
        name = groups["D"][0] if shared and i == 0 else f"c{i}"
        groups["C"].append(name)
        if name not in hostvars:
            hostvars[name] = dict(common, ansible_host=f"127.0.1.{next(ip)}")
    return groups, hostvars


@settings(max_examples=150, deadline=None)
@given(topologies())
def test_generated_topologies_are_consistent(inp):
    groups, hostvars = inp
    plan = build_plan(groups, hostvars)
    specs = node_specs(plan)

    bound = Counter()
    for by_role in specs.values():
        for spec in by_role.values():
            for proc in spec["processes"]:
                for port in proc["ports"]:
                    bound[(port["host"], port["port"])] += 1
    assert [k for k, n in bound.items() if n > 1] == []

    for inst in plan.instances:
        ranks = [r.rank for h in inst.hosts for r in plan.nodes[h].ranks]
        assert sorted(ranks) == list(range(inst.dp_size))
        for h in inst.hosts:
            node = plan.nodes[h]
            used = [d for r in node.ranks for d in r.devices]
            assert sorted(used, key=int) == sorted(node.devices, key=int)
            assert len(set(used)) == len(used)
            env_devs = []
            for proc in specs[h][node.role]["processes"]:
                key = ("ASCEND_RT_VISIBLE_DEVICES" if inst.opts["flavour"] == "vllm-ascend"
                       else "CUDA_VISIBLE_DEVICES")
                env_devs += proc["env"][key].split(",")
            assert sorted(env_devs, key=int) == sorted(node.devices, key=int)

    n_prefill_endpoints = sum(
        len(plan.nodes[h].ranks) if i.dp_mode == "external" else (h == i.master)
        for i in plan.instances if i.role == "P" for h in i.hosts)
    assert len(plan.prefill_upstreams) == n_prefill_endpoints
    assert len(set(plan.decode_upstreams)) == len(plan.decode_upstreams)
