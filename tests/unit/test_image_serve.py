"""plugins/modules/pd_image_serve.py: the transient one-file HTTP server of the image
fan-out (real processes on 127.0.0.1)."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def serve():
    spec = importlib.util.spec_from_file_location(
        "pd_image_serve", REPO / "plugins" / "modules" / "pd_image_serve.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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
