"""Node facts: NIC lookup, port/path/device/command checks, --check mode, refusal (exit 3)."""
from __future__ import annotations

import os
import socket

import pytest

from pd_launcher.launcher import nodefacts
from pd_launcher.nodeutil import port_problem

from .conftest import PY, free_port, py_proc

ADDRS = [("lo", "127.0.0.1", 8), ("eth0", "10.1.2.3", 24), ("eth1", "10.1.2.77", 32),
         ("lo", "::1", 128), ("eth0", "fd00::2", 64)]


def test_nic_for_loopback_range_is_lo():
    assert nodefacts.find_nic("127.0.1.5", ADDRS) == "lo"
    assert nodefacts.find_nic("127.0.1.5") == "lo"  # the real node


def test_nic_exact_match_beats_containing_prefix():
    assert nodefacts.find_nic("10.1.2.77", ADDRS) == "eth1"
    assert nodefacts.find_nic("10.1.2.9", ADDRS) == "eth0"
    assert nodefacts.find_nic("fd00::2", ADDRS) == "eth0"


def test_nic_not_found_lists_addresses():
    with pytest.raises(LookupError) as exc:
        nodefacts.find_nic("192.168.9.9", ADDRS)
    assert "192.168.9.9" in str(exc.value) and "eth0=10.1.2.3/24" in str(exc.value)
    with pytest.raises(LookupError):
        nodefacts.find_nic("not-an-ip", ADDRS)


def test_address_sources_agree_on_loopback():
    via_ioctl = nodefacts._addrs_from_ioctl()
    assert ("lo", "127.0.0.1", 8) in via_ioctl
    via_ip = nodefacts._addrs_from_ip_cmd()
    if via_ip is not None:
        assert ("lo", "127.0.0.1", 8) in via_ip


def test_port_check_detects_listener_and_foreign_address():
    port = free_port("127.0.1.5")
    assert port_problem("127.0.1.5", port) is None
    s = socket.socket()
    s.bind(("127.0.1.5", port))
    s.listen()
    try:
        err = port_problem("127.0.1.5", port)
        assert err and f"port 127.0.1.5:{port} is already in use by pid {os.getpid()} (" in err
    finally:
        s.close()
    err = port_problem("192.0.2.254", port)  # TEST-NET-1, not on this node
    assert err and "not on this node" in err


def test_check_mode_prints_plan_masks_secrets_starts_nothing(node):
    marker = node.tmp / "started"
    port = free_port("127.0.1.5")
    spec = node.spec(
        [py_proc("engine", f"open({str(marker)!r}, 'w')", ports=[("127.0.1.5", port)],
                 env={"HF_TOKEN": "hf_secret", "PLAIN": "visible"},
                 ready={"type": "http", "url": f"http://127.0.1.5:{port}/health"})],
        nic={"ip": "127.0.1.5", "name": None, "env": ["GLOO_SOCKET_IFNAME", "TP_SOCKET_IFNAME"]},
        files=[{"path": str(node.run_dir / "x.conf"), "content": "k=supersecret"}],
        pre_start=[["true"]],
    )
    spec["processes"][0]["argv"] += ["--api-key", "sk-123", "--hf-token=abc", "--tokenizer", "t"]
    r = node.cli("run", str(node.write_spec(spec)), "--check")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "GLOO_SOCKET_IFNAME=lo" in out and "TP_SOCKET_IFNAME=lo" in out
    assert "--api-key ***" in out and "--hf-token=***" in out and "--tokenizer t" in out
    assert "HF_TOKEN=***" in out and "PLAIN=visible" in out
    for secret in ("sk-123", "hf_secret", "abc", "supersecret"):
        assert secret not in out + r.stderr
    assert f"127.0.1.5:{port}" in out and "would write" in out
    assert "would run before start: true" in out
    assert not marker.exists()
    assert not (node.run_dir / "x.conf").exists()
    assert not (node.state_dir / "launcher.json").exists()
    assert not (node.log_dir / "engine.log").exists()


def test_check_mode_reports_every_failure(node):
    busy = socket.socket()
    busy.bind(("127.0.1.5", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        spec = node.spec(
            [py_proc("a", "0", ports=[("127.0.1.5", port)]),
             {"name": "b", "argv": ["no-such-command-xyz"]}],
            checks={"paths": ["/no/model/here"], "devices": ["/dev/davinci99"],
                    "commands": ["no-such-tool-abc"]},
            nic={"ip": "198.51.100.7", "name": None, "env": ["GLOO_SOCKET_IFNAME"]},
        )
        r = node.cli("run", str(node.write_spec(spec)), "--check")
    finally:
        busy.close()
    assert r.returncode == 3, r.stdout + r.stderr
    for needle in (f"port 127.0.1.5:{port} is already in use", "/no/model/here",
                   "/dev/davinci99", "no-such-command-xyz", "no-such-tool-abc",
                   "no interface holds 198.51.100.7"):
        assert needle in r.stdout, needle


def test_busy_port_refuses_before_starting_anything(node):
    markers = [node.tmp / "m0", node.tmp / "m1"]
    socks = []
    ports = []
    for _ in range(2):
        s = socket.socket()
        s.bind(("127.0.1.5", 0))
        s.listen()
        socks.append(s)
        ports.append(s.getsockname()[1])
    free = free_port("127.0.1.5")
    spec = node.spec([
        py_proc("first", f"open({str(markers[0])!r}, 'w')", ports=[("127.0.1.5", free)]),
        py_proc("second", f"open({str(markers[1])!r}, 'w')",
                ports=[("127.0.1.5", ports[0]), ("127.0.1.5", ports[1])]),
    ], files=[{"path": str(node.run_dir / "f.conf"), "content": "x"}])
    try:
        r = node.cli("run", str(node.write_spec(spec)))
    finally:
        for s in socks:
            s.close()
    assert r.returncode == 3, r.stderr
    assert "nothing started" in r.stderr
    for p in ports:  # every busy port reported, not just the first
        assert f"127.0.1.5:{p} is already in use" in r.stderr
    assert f":{free}" not in r.stderr.split("nothing started")[1]
    assert not any(m.exists() for m in markers)
    assert not (node.run_dir / "f.conf").exists()
    assert not (node.state_dir / "launcher.json").exists()
    assert not (node.log_dir / "first.log").exists()


def test_missing_path_device_command_exit_3(node):
    spec = node.spec([{"name": "a", "argv": ["sleep", "100"]}],
                     checks={"paths": [str(node.tmp)], "devices": ["/dev/davinci7"],
                             "commands": []})
    r = node.cli("run", str(node.write_spec(spec)))
    assert r.returncode == 3
    assert "device /dev/davinci7 does not exist" in r.stderr
    assert str(node.tmp) + " does not exist" not in r.stderr


def test_command_lookup_uses_process_path(node, tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    tool = bindir / "my-engine"
    tool.write_text(f"#!{PY}\nimport time\ntime.sleep(100)\n")
    tool.chmod(0o755)
    spec = node.spec([{"name": "a", "argv": ["my-engine"],
                       "env": {"PATH": f"{bindir}:/usr/bin:/bin"}}])
    r = node.cli("run", str(node.write_spec(spec)), "--check")
    assert r.returncode == 0, r.stdout
    spec["processes"][0]["env"] = {}
    r = node.cli("run", str(node.write_spec(spec)), "--check")
    assert r.returncode == 3 and "'my-engine'" in r.stdout
