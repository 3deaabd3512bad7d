"""HCCL rank tables: hccn.conf parsing, the table, and `python -m pd_launcher.ranktable`
(exchange through a real etcd between two fake hosts)."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from pd_launcher.etcd_gateway import EtcdGateway
from pd_launcher.ranktable import build_rank_table, parse_hccn, render
from tests.fixtures.etcd import ETCD_MISSING, Etcd, running_etcd

from .conftest import PY, free_port, py_env

HOSTS = ("127.0.1.1", "127.0.1.2")
ALL8 = "0,1,2,3,4,5,6,7"


def hccn_text(host: int, devices: int = 8, skip: tuple[int, ...] = ()) -> str:
    """An hccn.conf as hccn_tool writes it, with a comment and blank lines."""
    lines = [f"# hccn.conf of fake host {host}", ""]
    for d in range(devices):
        if d in skip:
            continue
        lines += [f"address_{d}=29.{host}.0.{10 + d}", f"netmask_{d}=255.255.255.0",
                  f"netdetect_{d}=29.{host}.0.1", f"gateway_{d}=29.{host}.0.1",
                  f"send_arp_status_{d}=1", f"tls_enable_{d}=0"]
    return "\n".join(lines + ["", "  # end", ""])


def write_hccn(tmp: Path, host: int, **kw) -> Path:
    path = tmp / f"hccn{host}.conf"
    path.write_text(hccn_text(host, **kw))
    return path


def rt_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "pd_launcher.ranktable", *args], env=py_env(),
                          capture_output=True, text=True, timeout=timeout)


def exchange_argv(etcd: str, prefix: str, me: str, hccn: Path, out: Path, *extra: str,
                  servers: str = ",".join(HOSTS), devices: str = ALL8) -> list[str]:
    return [PY, "-m", "pd_launcher.ranktable", "exchange", "--etcd", etcd,
            "--prefix", prefix, "--server-ip", me, "--devices", devices,
            "--servers", servers, "--hccn", str(hccn), "--out", str(out),
            "--interval", "0.1", *extra]


def two_servers() -> list[tuple[str, list[tuple[str, str]]]]:
    return [(ip, [(str(d), f"29.{h}.0.{10 + d}") for d in range(8)])
            for h, ip in enumerate(HOSTS, 1)]


# --------------------------------------------------------------------------- parse_hccn


def test_parse_hccn_eight_devices_ignores_other_keys_and_comments():
    ips = parse_hccn(hccn_text(1))
    assert ips == {d: f"29.1.0.{10 + d}" for d in range(8)}


def test_parse_hccn_accepts_spaces_around_equals_and_empty_text():
    assert parse_hccn("address_3 = 10.0.0.3\n  address_12=10.0.0.12  \n") == {
        3: "10.0.0.3", 12: "10.0.0.12"}
    assert parse_hccn("") == {}


@pytest.mark.parametrize("bad, what", [
    ("address_2=29.1.0", "bad IPv4 address '29.1.0'"),
    ("address_2=300.1.0.1", "bad IPv4 address"),
    ("address_2=fe80::1", "bad IPv4 address"),
    ("address_x=29.1.0.1", "malformed address line"),
    ("address_2 29.1.0.1", "malformed address line"),
    ("address_2=", "malformed address line"),
    ("address_2=29.1.0.1 29.1.0.2", "malformed address line"),
])
def test_parse_hccn_malformed_line_names_path_and_line(bad, what):
    text = "# header\naddress_0=29.1.0.10\nnetmask_0=255.255.255.0\n" + bad + "\n"
    with pytest.raises(ValueError) as info:
        parse_hccn(text, "/fake/hccn.conf")
    assert str(info.value).startswith("/fake/hccn.conf line 4: ")
    assert what in str(info.value)


def test_parse_hccn_device_listed_twice():
    with pytest.raises(ValueError, match=r"hccn.conf line 3: device 0 already .*line 1"):
        parse_hccn("address_0=1.1.1.1\n\naddress_0=1.1.1.2\n")


# --------------------------------------------------------------------------- build / render


def test_build_rank_table_counts_ranks_across_servers():
    table = build_rank_table(two_servers())
    assert list(table) == ["version", "server_count", "server_list", "status"]
    assert table["version"] == "1.0" and table["status"] == "completed"
    assert table["server_count"] == "2"
    assert [s["server_id"] for s in table["server_list"]] == list(HOSTS)
    devices = [d for s in table["server_list"] for d in s["device"]]
    assert [d["rank_id"] for d in devices] == [str(r) for r in range(16)]
    assert devices[8] == {"device_id": "0", "device_ip": "29.2.0.10", "rank_id": "8"}
    assert list(devices[0]) == ["device_id", "device_ip", "rank_id"]
    assert all(isinstance(v, str) for d in devices for v in d.values())


def test_build_rank_table_takes_int_device_ids():
    table = build_rank_table([("10.0.0.1", [(4, "29.1.0.4"), (5, "29.1.0.5")])])
    assert [d["device_id"] for d in table["server_list"][0]["device"]] == ["4", "5"]


@pytest.mark.parametrize("servers, match", [
    ([], "at least one server"),
    ([("10.0.0.1", [("0", "29.0.0.1")]), ("10.0.0.1", [("1", "29.0.0.2")])],
     "server 10.0.0.1 listed twice"),
    ([("10.0.0.1", [("0", "29.0.0.1")]), ("10.0.0.2", [("0", "29.0.0.1")])],
     "device IP 29.0.0.1 of server 10.0.0.2 device 0 is also server 10.0.0.1 device 0"),
    ([("10.0.0.1", [("0", "29.0.0.1"), ("0", "29.0.0.2")])], "device 0 listed twice"),
    ([("10.0.0.1", [])], "has no devices"),
    ([("10.0.0.1", [("npu0", "29.0.0.1")])], "bad device id"),
    ([("10.0.0.1", [("0", "29.0.0")])], "bad IPv4 address"),
])
def test_build_rank_table_rejects(servers, match):
    with pytest.raises(ValueError, match=match):
        build_rank_table(servers)


def test_render_keeps_field_order_indent_2_trailing_newline():
    text = render(build_rank_table(two_servers()))
    assert text.endswith("}\n") and not text.endswith("\n\n")
    assert text.startswith('{\n  "version": "1.0",\n  "server_count": "2",\n')
    assert json.loads(text) == build_rank_table(two_servers())


# --------------------------------------------------------------------------- build / hccn CLI


def test_build_cli_writes_the_table(tmp_path):
    out = tmp_path / "sub" / "rt.json"
    servers = [f"{ip}=" + ",".join(f"{d}:{dip}" for d, dip in devs)
               for ip, devs in two_servers()]
    r = rt_cli("build", "--out", str(out), "--server", *servers)
    assert r.returncode == 0, r.stderr
    assert out.read_text() == render(build_rank_table(two_servers()))
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert r.stdout == (f"rank table {out}: 2 server(s), 16 rank(s) "
                        "(127.0.1.1, 127.0.1.2)\n")


def test_build_cli_errors(tmp_path):
    r = rt_cli("build", "--out", str(tmp_path / "x"), "--server", "10.0.0.1=0:29.0.0.1",
               "--server", "10.0.0.2=0:29.0.0.1")
    assert r.returncode == 1 and "device IP 29.0.0.1" in r.stderr
    r = rt_cli("build", "--out", str(tmp_path / "x"), "--server", "10.0.0.1")
    assert r.returncode == 2 and "IP=DEV:DEVIP" in r.stderr
    assert not (tmp_path / "x").exists()


def test_hccn_cli(tmp_path):
    path = write_hccn(tmp_path, 1, skip=(5,))
    r = rt_cli("hccn", "--hccn", str(path), "--devices", "0,7")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "0 29.1.0.10\n7 29.1.0.17\n"
    assert rt_cli("hccn", "--hccn", str(path)).stdout.count("\n") == 7
    r = rt_cli("hccn", "--hccn", str(path), "--devices", "0,5,9")
    assert r.returncode == 1
    assert f"{path} has no address_<device> line for device(s) 5, 9" in r.stderr
    r = rt_cli("hccn", "--hccn", str(tmp_path / "nope.conf"))
    assert r.returncode == 1 and f"cannot read {tmp_path / 'nope.conf'}" in r.stderr


# --------------------------------------------------------------------------- exchange


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Etcd]:
    if ETCD_MISSING:
        pytest.skip(ETCD_MISSING)
    with running_etcd(str(tmp_path_factory.mktemp("etcd")), "127.0.1.9") as server:
        yield server


@pytest.fixture
def prefix() -> str:
    return f"/pd/ranktable/{uuid.uuid4().hex[:8]}/"


def test_exchange_two_hosts_write_identical_tables(etcd, prefix, tmp_path):
    procs = []
    for h, ip in enumerate(HOSTS, 1):
        hccn = write_hccn(tmp_path, h)
        argv = exchange_argv(etcd.addr, prefix, ip, hccn, tmp_path / f"rt{h}.json",
                             "--timeout", "20")
        procs.append(subprocess.Popen(argv, env=py_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
        time.sleep(0.5)  # the first host really waits for the second
    outs = [p.communicate(timeout=30) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out + err
        assert out.startswith("rank table ") and out.count("\n") == 1
        assert "2 server(s), 16 rank(s) (127.0.1.1, 127.0.1.2)" in out
    first, second = (tmp_path / "rt1.json").read_text(), (tmp_path / "rt2.json").read_text()
    assert first == second == render(build_rank_table(two_servers()))
    assert stat.S_IMODE(os.stat(tmp_path / "rt1.json").st_mode) == 0o644
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_exchange_missing_device_in_hccn(etcd, prefix, tmp_path):
    hccn = write_hccn(tmp_path, 1, skip=(3,))
    out = tmp_path / "rt.json"
    r = rt_cli(*exchange_argv(etcd.addr, prefix, HOSTS[0], hccn, out)[3:])
    assert r.returncode == 1
    assert f"{hccn} has no address_<device> line for device(s) 3" in r.stderr
    assert not out.exists()


def test_exchange_timeout_names_the_silent_server(etcd, prefix, tmp_path):
    hccn = write_hccn(tmp_path, 1)
    out = tmp_path / "rt.json"
    t0 = time.monotonic()
    r = rt_cli(*exchange_argv(etcd.addr, prefix, HOSTS[0], hccn, out, "--timeout", "1.5",
                              servers="127.0.1.1,127.0.1.3")[3:])
    assert r.returncode == 1
    assert 1.5 <= time.monotonic() - t0 < 15
    assert "timed out after 1.5s: server(s) 127.0.1.3 never published" in r.stderr
    assert "(published: 127.0.1.1)" in r.stderr and etcd.endpoint in r.stderr
    assert not out.exists()


def test_exchange_argument_errors(tmp_path):
    hccn = write_hccn(tmp_path, 1)
    out = tmp_path / "rt.json"
    r = rt_cli(*exchange_argv("127.0.1.9:1", "/p/", "127.0.1.4", hccn, out)[3:])
    assert r.returncode == 2 and "--server-ip 127.0.1.4 is not in --servers" in r.stderr
    r = rt_cli(*exchange_argv("127.0.1.9:1", "/p/", HOSTS[0], hccn, out,
                              devices="0,x")[3:])
    assert r.returncode == 2 and "not a device number: x" in r.stderr


def test_exchange_unreachable_etcd_names_it(tmp_path):
    hccn = write_hccn(tmp_path, 1)
    addr = f"127.0.1.9:{free_port('127.0.1.9')}"
    r = rt_cli(*exchange_argv(addr, "/p/", HOSTS[0], hccn, tmp_path / "rt.json",
                              "--timeout", "0.5")[3:])
    assert r.returncode == 1
    assert f"etcd http://{addr}" in r.stderr and "unreachable" in r.stderr


def test_exchange_rejects_a_peers_bad_data(etcd, prefix, tmp_path):
    EtcdGateway(etcd.addr).put(prefix + HOSTS[1], "not json")
    hccn = write_hccn(tmp_path, 1)
    r = rt_cli(*exchange_argv(etcd.addr, prefix, HOSTS[0], hccn, tmp_path / "rt.json",
                              "--timeout", "10")[3:])
    assert r.returncode == 1
    assert "server 127.0.1.2 published 'not json', expected a JSON list" in r.stderr
