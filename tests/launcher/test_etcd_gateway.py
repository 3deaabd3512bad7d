"""EtcdGateway against a real etcd (v3 JSON gateway), and `python -m pd_launcher.etcd_keys`."""
from __future__ import annotations

import http.server
import json
import subprocess
import threading
import time
import uuid
from typing import Iterator

import pytest

from pd_launcher.etcd_gateway import EtcdError, EtcdGateway, prefix_range_end
from tests.fixtures.etcd import ETCD_MISSING, Etcd, running_etcd

from .conftest import PY, free_port, py_env

needs_etcd = pytest.mark.skipif(ETCD_MISSING is not None, reason=str(ETCD_MISSING))
DEAD_PROXY = "http://127.0.0.1:9"  # discard port: nothing answers


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Etcd]:
    if ETCD_MISSING:
        pytest.skip(ETCD_MISSING)
    with running_etcd(str(tmp_path_factory.mktemp("etcd")), "127.0.1.9") as server:
        yield server


@pytest.fixture
def prefix() -> str:
    return f"/t-{uuid.uuid4().hex[:8]}/"


def keys_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "pd_launcher.etcd_keys", *args], env=py_env(env),
                          capture_output=True, text=True, timeout=30)


# --------------------------------------------------------------------------- pure


def test_prefix_range_end():
    assert prefix_range_end(b"/demo/") == b"/demo0"
    assert prefix_range_end(b"a\xff") == b"b"
    assert prefix_range_end(b"") == b"\0"
    assert prefix_range_end(b"\xff\xff") == b"\0"


@pytest.mark.parametrize("endpoint, url", [
    ("127.0.1.9:2379", "http://127.0.1.9:2379"),
    ("http://127.0.1.9:2379/", "http://127.0.1.9:2379"),
    (" https://etcd.local:2379 ", "https://etcd.local:2379"),
])
def test_endpoint_forms(endpoint, url):
    assert EtcdGateway(endpoint).endpoint == url


@pytest.mark.parametrize("endpoint", ["", "ftp://x:1", "127.0.1.9:notaport", "http://h:1/v3"])
def test_bad_endpoint_is_an_etcd_error(endpoint):
    with pytest.raises(EtcdError, match="bad etcd endpoint"):
        EtcdGateway(endpoint)


# --------------------------------------------------------------------------- real etcd


@needs_etcd
def test_put_get_range_delete(etcd, prefix):
    gw = EtcdGateway(etcd.addr)
    assert gw.health() is True
    assert gw.get(prefix + "a") is None
    gw.put(prefix + "b", "two")
    gw.put(prefix + "a", '{"name": "ü"}')
    gw.put(prefix + "c/d", "")
    gw.put(prefix[:-1] + "x", "outside the prefix")
    assert gw.get(prefix + "a") == '{"name": "ü"}'
    assert gw.get(prefix + "c/d") == ""
    got = gw.range_prefix(prefix)
    assert list(got) == [prefix + "a", prefix + "b", prefix + "c/d"]  # key order
    assert got[prefix + "b"] == "two"
    assert gw.range_prefix(prefix + "nothing/") == {}
    assert gw.delete(prefix + "b") == 1
    assert gw.delete(prefix + "b") == 0
    assert gw.get(prefix + "b") is None


@needs_etcd
def test_lease_keepalive_expiry_and_revoke(etcd, prefix):
    gw = EtcdGateway(etcd.endpoint)
    lease = gw.grant(1)  # etcd may round a tiny TTL up to its minimum (2 s)
    gw.put(prefix + "short", "v", lease=lease)
    assert 1 <= gw.keepalive(lease) <= 3
    assert gw.get(prefix + "short") == "v"
    deadline = time.monotonic() + 10
    while gw.get(prefix + "short") is not None:
        assert time.monotonic() < deadline, "leased key did not expire"
        time.sleep(0.1)
    assert gw.keepalive(lease) == 0  # expired

    lease2 = gw.grant(60)
    gw.put(prefix + "long", "v", lease=lease2)
    gw.revoke(lease2)
    assert gw.get(prefix + "long") is None
    gw.revoke(lease2)  # already gone: not an error


@needs_etcd
def test_http_error_names_endpoint_and_etcd_message(etcd, prefix):
    gw = EtcdGateway(etcd.addr)
    with pytest.raises(EtcdError) as info:
        gw.put(prefix + "k", "v", lease=12345)
    msg = str(info.value)
    assert etcd.endpoint in msg and "HTTP 404" in msg and "lease not found" in msg
    assert info.value.status == 404


def test_unreachable_endpoint_error_names_it():
    addr = f"127.0.1.9:{free_port('127.0.1.9')}"
    gw = EtcdGateway(addr, timeout=1)
    for call in (lambda: gw.get("k"), lambda: gw.put("k", "v"), gw.health,
                 lambda: gw.grant(5)):
        with pytest.raises(EtcdError) as info:
            call()
        assert f"etcd http://{addr}" in str(info.value)
        assert "unreachable" in str(info.value)


def test_bad_json_reply_is_an_etcd_error():
    class Garbage(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"<html>not etcd</html>")

        def log_message(self, *a):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Garbage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        gw = EtcdGateway(f"127.0.0.1:{server.server_port}")
        with pytest.raises(EtcdError, match="bad JSON in the reply") as info:
            gw.get("k")
        assert gw.endpoint in str(info.value)
    finally:
        server.shutdown()
        server.server_close()


@needs_etcd
def test_proxies_in_the_environment_are_ignored(etcd, prefix, monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(var, DEAD_PROXY)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    gw = EtcdGateway(etcd.addr)
    gw.put(prefix + "p", "direct")
    assert gw.get(prefix + "p") == "direct"
    assert gw.health()


# --------------------------------------------------------------------------- etcd_keys CLI


@needs_etcd
def test_etcd_keys_all_present(etcd, prefix):
    gw = EtcdGateway(etcd.addr)
    p1 = prefix + "XLLM:PREFILL:127.0.1.1:7100"
    gw.put(p1, json.dumps({"name": "127.0.1.1:7100", "pad": "x" * 300}))
    gw.put(prefix + "XLLM:SERVICE:MASTER", "127.0.1.1:9889")
    r = keys_cli("--endpoint", etcd.addr, "--prefix", prefix, "--expect", f"P1={p1}",
                 env={"http_proxy": DEAD_PROXY, "HTTP_PROXY": DEAD_PROXY})
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"2 key(s) under {prefix!r} in etcd {etcd.endpoint}"
    assert lines[1].startswith(p1 + '  {"name": "127.0.1.1:7100"')
    assert len(lines[1]) == len(p1) + 2 + 120 + 3  # first 120 chars, then "..."
    assert lines[2] == f"{prefix}XLLM:SERVICE:MASTER  127.0.1.1:9889"
    assert lines[3] == f"present: P1 ({p1})"


@needs_etcd
def test_etcd_keys_missing_and_json(etcd, prefix):
    gw = EtcdGateway(etcd.addr)
    p1, d1 = prefix + "XLLM:PREFILL:127.0.1.1:7100", prefix + "XLLM:DECODE:127.0.1.2:7200"
    gw.put(p1, "{}")
    expect = ["--expect", f"P1={p1}", f"D1={d1}"]
    r = keys_cli("--endpoint", etcd.endpoint, "--prefix", prefix, *expect)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"present: P1 ({p1})" in r.stdout.splitlines()
    assert f"missing: D1 ({d1} not in etcd)" in r.stdout.splitlines()

    r = keys_cli("--endpoint", etcd.endpoint, "--prefix", prefix, "--json", *expect)
    assert r.returncode == 1, r.stdout + r.stderr
    assert json.loads(r.stdout) == {"keys": {p1: "{}"}, "missing": ["D1"], "present": ["P1"]}

    gw.put(d1, "{}")
    r = keys_cli("--endpoint", etcd.endpoint, "--prefix", prefix, "--json", *expect)
    assert r.returncode == 0
    assert json.loads(r.stdout)["present"] == ["P1", "D1"]


def test_etcd_keys_unreachable_and_bad_arguments_exit_2():
    addr = f"127.0.1.9:{free_port('127.0.1.9')}"
    r = keys_cli("--endpoint", addr, "--prefix", "/x/", "--expect", "P1=/x/k")
    assert r.returncode == 2
    assert f"http://{addr}" in r.stderr and "unreachable" in r.stderr
    assert r.stdout == ""
    r = keys_cli("--endpoint", addr, "--prefix", "/x/", "--expect", "no-equals-sign")
    assert r.returncode == 2 and "LABEL=KEY" in r.stderr
    r = keys_cli("--endpoint", "ftp://nowhere", "--prefix", "/x/")
    assert r.returncode == 2 and "ftp://nowhere" in r.stderr
    r = keys_cli("--prefix", "/x/")
    assert r.returncode == 2 and "--endpoint" in r.stderr
