"""`python -m pd_deploy plan` (pd-deploy plan) on real inventory files (Ansible's inventory API)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(REPO, "inventories", "example", "inventory.yml")


def plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pd_deploy", "plan", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_text_plan_of_example():
    out = plan("-i", EXAMPLE)
    assert out.returncode == 0, out.stderr
    assert "## decode-2 192.0.2.22 role D instance D1 dp ranks 16..31" in out.stdout
    assert "--data-parallel-rank 31" in out.stdout
    assert "ASCEND_RT_VISIBLE_DEVICES=15" in out.stdout


def test_json_contract():
    out = plan("-i", EXAMPLE, "--format", "json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    node = doc["nodes"]["decode-2"]
    assert node["role"] == "D" and node["ip"] == "192.0.2.22" and node["master"] is False
    assert node["instance"] == "D1"
    proc = node["processes"][0]
    assert set(proc) >= {"name", "argv", "env", "ports"}
    assert doc["nodes"]["prefill-1"]["roles"] == ["P", "C"]
    assert doc["proxy"]["listen"] == "192.0.2.11:7000"
    assert doc["proxy"]["prefill"][0] == "192.0.2.11:7100"
    assert len(doc["proxy"]["decode"]) == 32


def test_node_spec_for_the_launcher():
    out = plan("-i", EXAMPLE, "--node", "decode-1")
    assert out.returncode == 0, out.stderr
    spec = json.loads(out.stdout)
    assert spec["schema"] == 1 and spec["role"] == "D" and spec["node"] == "decode-1"
    assert len(spec["processes"]) == 16
    assert spec["checks"]["paths"] == ["/mnt/weights/DeepSeek-V3-w8a8"]
    assert "/dev/davinci15" in spec["checks"]["devices"]
    proxy = json.loads(plan("-i", EXAMPLE, "--node", "prefill-1", "--role", "C").stdout)
    assert proxy["role"] == "C" and proxy["proxy"]["listen"] == "192.0.2.11:7000"
    assert plan("-i", EXAMPLE, "--node", "nope").returncode == 2


def test_secrets_are_masked(tmp_path):
    inv = tmp_path / "inv.yml"
    inv.write_text(open(EXAMPLE).read())
    gv = tmp_path / "group_vars"
    gv.mkdir()
    for name in ("all.yml", "P.yml", "D.yml"):
        text = open(os.path.join(REPO, "inventories", "example", "group_vars", name)).read()
        (gv / name).write_text(text)
    with open(gv / "all.yml", "a") as f:
        f.write("pd_engine_api_key: topsecret-123\npd_proxy_api_key: proxysecret-9\n")
    for fmt in ("text", "json"):
        out = plan("-i", str(inv), "--format", fmt)
        assert out.returncode == 0, out.stderr
        assert "topsecret-123" not in out.stdout and "proxysecret-9" not in out.stdout
        assert "***" in out.stdout
    spec = plan("-i", str(inv), "--node", "decode-1")
    assert "topsecret-123" in spec.stdout  # the launcher's input must carry it


def test_bad_inventory_lists_all_errors_on_stderr(tmp_path):
    inv = tmp_path / "bad.yml"
    inv.write_text(textwrap.dedent("""\
        all:
          vars:
            pd_engine: vllm-ascend
            pd_model_path: /m
          children:
            P:
              hosts:
                p1: {ansible_host: 10.0.0.1, devices: "0,1,x", pd_tp: 2}
            D:
              hosts:
                d1: {ansible_host: 10.0.0.2, pd_extra_args: ["--port", "1"]}
                d2: {ansible_host: 10.0.0.3, host_ip: 10.0.0.99}
            C:
              hosts:
                c1: {ansible_host: 10.0.0.9, pd_proxy_port: 123456}
        """))
    out = plan("-i", str(inv))
    assert out.returncode == 1
    assert out.stdout == ""
    assert "p1: devices: malformed device id 'x'" in out.stderr
    assert "d1: pd_extra_args: --port is set by the planner" in out.stderr
    assert "d2: host_ip: 10.0.0.99 is not the IP of any host in group D" in out.stderr
    assert "c1: pd_proxy_port: 123456 is outside 1..65535" in out.stderr


def test_missing_inventory():
    out = plan("-i", "/nonexistent/inv.yml")
    assert out.returncode == 2 and "does not exist" in out.stderr
