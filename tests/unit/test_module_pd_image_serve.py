"""plugins/modules/pd_image_serve.py: the transient one-file HTTP server of the image
fan-out (real processes on 127.0.0.1), directly and through a mocked AnsibleModule."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from .modharness import failed, load, ok


@pytest.fixture(scope="module")
def serve():
    return load("pd_image_serve")


@pytest.fixture
def payload(tmp_path):
    path = tmp_path / "img.tar"
    path.write_bytes(os.urandom(3 << 20))
    return path


def _get(url: str, method: str = "GET") -> tuple[int, bytes, dict]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, method=method), timeout=10) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, b"", {}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_serves_exactly_the_file_then_stops(serve, payload):
    rec = serve.start_server(str(payload), "127.0.0.1", 0, 60)
    try:
        assert rec["url"] == f"http://127.0.0.1:{rec['port']}/img.tar"
        status, body, _ = _get(rec["url"])
        assert status == 200
        assert hashlib.sha256(body).digest() == hashlib.sha256(payload.read_bytes()).digest()
        status, _, headers = _get(rec["url"], "HEAD")
        assert status == 200 and headers["Content-Length"] == str(3 << 20)
        for other in ("/", "/img.tar/../img.tar", "/.pd-image-serve.json", "/etc/passwd"):
            assert _get(f"http://127.0.0.1:{rec['port']}{other}")[0] == 404, other
        recorded = json.loads((payload.parent / serve.RECORD).read_text())
        assert recorded["pid"] == rec["pid"] and recorded["port"] == rec["port"]
    finally:
        stopped = serve.stop_server(str(payload))
    assert stopped == [rec["pid"]]
    assert not _alive(rec["pid"])
    assert not (payload.parent / serve.RECORD).exists()
    assert serve.stop_server(str(payload)) == []  # idempotent


def test_a_second_start_replaces_the_first(serve, payload):
    first = serve.start_server(str(payload), "127.0.0.1", 0, 60)
    try:
        # what the module does on state=started: stop what is recorded, then start
        assert serve.stop_server(str(payload)) == [first["pid"]]
        second = serve.start_server(str(payload), "127.0.0.1", 0, 60)
        assert second["pid"] != first["pid"] and not _alive(first["pid"])
    finally:
        serve.stop_server(str(payload))


def test_a_reused_pid_is_never_signalled(serve, payload):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                              serve.MARKER, str(payload)])
    try:
        (payload.parent / serve.RECORD).write_text(json.dumps(
            {"pid": other.pid, "start_time": 1, "port": 1, "path": str(payload)}))
        assert serve.stop_server(str(payload)) == []
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_it_stops_by_itself_after_its_lifetime(serve, payload):
    rec = serve.start_server(str(payload), "127.0.0.1", 0, 1)
    end = time.monotonic() + 10
    while time.monotonic() < end and _alive(rec["pid"]):
        time.sleep(0.1)
    assert not _alive(rec["pid"])
    assert serve.stop_server(str(payload)) == []


def test_a_busy_port_is_reported(serve, payload):
    rec = serve.start_server(str(payload), "127.0.0.1", 0, 60)
    try:
        other = payload.parent / "other.tar"
        other.write_bytes(b"x")
        (payload.parent / "sub").mkdir()
        moved = payload.parent / "sub" / "other.tar"
        other.rename(moved)
        with pytest.raises(RuntimeError, match="did not start"):
            serve.start_server(str(moved), "127.0.0.1", rec["port"], 60)
    finally:
        serve.stop_server(str(payload))


def test_module_started_then_stopped(serve, payload):
    r = ok(serve, {"path": str(payload), "bind": "127.0.0.1", "lifetime": 60})
    try:
        assert r["changed"] and r["stopped"] == []
        assert r["url"] == f"http://127.0.0.1:{r['port']}/img.tar"
        assert _get(r["url"], "HEAD")[0] == 200
        # started again: the first server is stopped, a new one serves
        again = ok(serve, {"path": str(payload), "bind": "127.0.0.1", "lifetime": 60})
        assert again["stopped"] == [r["pid"]] and again["pid"] != r["pid"]
        assert not _alive(r["pid"])
    finally:
        stop = ok(serve, {"path": str(payload), "state": "stopped"})
    assert stop["changed"] and stop["stopped"] == [again["pid"]]
    assert not _alive(again["pid"])
    stop = ok(serve, {"path": str(payload), "state": "stopped"})
    assert not stop["changed"] and stop["stopped"] == []


def test_module_check_mode_starts_nothing(serve, payload):
    r = ok(serve, {"path": str(payload)}, check_mode=True)
    assert r["changed"] and r["pid"] is None
    assert not (payload.parent / serve.RECORD).exists()


def test_module_fails_for_a_missing_file(serve, tmp_path):
    r = failed(serve, {"path": str(tmp_path / "nope.tar")})
    assert r["msg"] == f"{tmp_path / 'nope.tar'}: no such file to serve"


def test_module_reports_a_server_that_cannot_start(serve, payload):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    try:
        r = failed(serve, {"path": str(payload), "port": s.getsockname()[1]})
    finally:
        s.close()
    assert r["msg"].startswith(f"the HTTP server for {payload} did not start on 127.0.0.1:")
    assert "Address already in use" in r["msg"]
