"""`pd_launcher quiesce`: established connections to a unit's `api` ports, read from
/proc/net/tcp(6), with a real listening socket on 127.0.78.x."""
from __future__ import annotations

import io
import socket
import time

import pytest

from pd_launcher.launcher.quiesce import connections, quiesce
from pd_launcher.launcher.spec import parse_spec

from .conftest import free_port

HOST = "127.0.78.2"


def spec_for(node, ports) -> dict:
    return node.spec([{"name": "engine", "argv": ["engine"], "env": {},
                       "ports": [{"host": h, "port": p, "use": u} for h, p, u in ports],
                       "ready": None}])


@pytest.fixture
def listener():
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((HOST, 0))
    srv.listen()
    try:
        yield srv
    finally:
        srv.close()


def test_an_open_connection_times_out_then_drains_after_close(node, listener):
    port = listener.getsockname()[1]
    kv = free_port(HOST)
    path = node.write_spec(spec_for(node, [(HOST, port, "api"), (HOST, kv, "kv")]))
    client = socket.create_connection((HOST, port))
    accepted, _ = listener.accept()
    try:
        assert connections([(HOST, port)]) == {(HOST, port): 1}
        assert connections([("0.0.0.0", port)]) == {("0.0.0.0", port): 1}  # wildcard
        assert connections([("127.0.78.3", port)]) == {("127.0.78.3", port): 0}
        t0 = time.monotonic()
        r = node.cli("quiesce", str(path), "--timeout", "1")
        assert r.returncode == 0, r.stderr
        assert r.stdout == f"drain timeout after 1 s: 1 connections left on {HOST}:{port} (1)\n"
        assert 1 <= time.monotonic() - t0 < 10
        # another use: the kv port has no connection
        r = node.cli("quiesce", str(path), "--use", "kv", "--timeout", "1")
        assert r.returncode == 0 and r.stdout.startswith("drained after 0."), r.stdout
    finally:
        client.close()
        accepted.close()
    r = node.cli("quiesce", str(path), "--timeout", "5")
    assert r.returncode == 0 and r.stdout.startswith("drained after "), (r.stdout, r.stderr)


def test_quiesce_waits_for_the_last_connection_to_end(node, listener):
    port = listener.getsockname()[1]
    spec = parse_spec(spec_for(node, [(HOST, port, "api")]))
    client = socket.create_connection((HOST, port))
    accepted, _ = listener.accept()
    import threading

    def close_later() -> None:
        time.sleep(0.6)
        client.close()
        accepted.close()

    threading.Thread(target=close_later, daemon=True).start()
    out = io.StringIO()
    assert quiesce(spec, ["api"], timeout=10, interval=0.05, out=out) == 0
    text = out.getvalue()
    assert text.startswith("drained after ") and 0.5 <= float(text.split()[2]) < 5, text


def test_quiesce_errors_exit_1(node, tmp_path):
    path = node.write_spec(spec_for(node, [(HOST, 7000, "kv")]))
    r = node.cli("quiesce", str(path))
    assert r.returncode == 1 and "has no port with use api" in r.stderr, r.stderr
    r = node.cli("quiesce", str(tmp_path / "missing.json"))
    assert r.returncode == 1 and "cannot read node spec" in r.stderr, r.stderr
    spec = parse_spec(spec_for(node, [(HOST, 7000, "api")]))
    assert quiesce(spec, ["api"], 1, paths=[str(tmp_path / "no-tcp")], out=io.StringIO()) == 1
