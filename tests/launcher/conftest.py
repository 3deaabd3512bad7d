"""Helpers for the node launcher tests: specs on loopback, launcher processes, cleanup.

Every launcher and decoy started here is stopped at teardown, whatever the test did.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import pytest

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable


def py_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("http_proxy", None)
    env.pop("HTTP_PROXY", None)
    if extra:
        env.update(extra)
    return env


def free_port(host: str = "127.0.0.1") -> int:
    s = socket.socket()
    s.bind((host, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_for(pred: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05,
             what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        val = pred()
        if val:
            return val
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def has_line(path: Path, line: str) -> bool:
    """The log holds exactly this line (the launcher's banner quotes the child's code,
    so a substring test would match before the child even ran)."""
    try:
        return line in path.read_text().splitlines()
    except FileNotFoundError:
        return False


def pid_alive(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return False
    return data[data.rfind(")") + 2] not in "ZX"


def proc_start_time(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    return int(data[data.rfind(")") + 2:].split()[19])


def py_proc(name: str, code: str, ports=(), ready=None, env=None) -> Dict[str, Any]:
    """A process entry running `python -c code` (unbuffered)."""
    return {
        "name": name,
        "argv": [PY, "-u", "-c", code],
        "env": env or {},
        "ports": [{"host": h, "port": p, "use": "api"} for h, p in ports],
        "ready": ready,
    }


HTTP_SERVER = (
    "import http.server, sys\n"
    "class H(http.server.BaseHTTPRequestHandler):\n"
    "    def do_GET(self):\n"
    "        self.send_response(200 if self.path == '/health' else 404)\n"
    "        self.end_headers()\n"
    "    def log_message(self, *a):\n"
    "        pass\n"
    "print('serving', flush=True)\n"
    "http.server.HTTPServer((sys.argv[1], int(sys.argv[2])), H).serve_forever()\n"
)

TERM_MARKER = (
    "import signal, sys, time\n"
    "def h(s, f):\n"
    "    open(sys.argv[1], 'w').write('TERM')\n"
    "    sys.exit(0)\n"
    "signal.signal(signal.SIGTERM, h)\n"
    "print('up', flush=True)\n"
    "while True:\n"
    "    time.sleep(1)\n"
)

IGNORE_TERM = (
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ignoring SIGTERM', flush=True)\n"
    "while True:\n"
    "    time.sleep(1)\n"
)


class Env:
    """One test's node: spec writing, launchers, decoys, cleanup."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.state_dir = tmp / "state"
        self.log_dir = tmp / "log"
        self.run_dir = tmp / "run"
        self.launchers: List[subprocess.Popen] = []
        self.others: List[subprocess.Popen] = []

    def spec(self, processes: List[Dict[str, Any]], **over: Any) -> Dict[str, Any]:
        spec: Dict[str, Any] = {
            "schema": 1,
            "cluster": "test",
            "node": "n1",
            "role": "P",
            "ip": "127.0.1.5",
            "instance": "P1",
            "master": True,
            "engine": "emulator",
            "dirs": {"state": str(self.state_dir), "log": str(self.log_dir),
                     "run": str(self.run_dir)},
            "grace_seconds": 5,
            "checks": {"paths": [], "devices": [], "commands": []},
            "nic": None,
            "files": [],
            "pre_start": [],
            "processes": processes,
            "proxy": None,
        }
        spec.update(over)
        return spec

    def write_spec(self, spec: Dict[str, Any], name: str = "spec.json") -> Path:
        path = self.tmp / name
        path.write_text(json.dumps(spec, indent=1))
        return path

    def cli(self, *args: str, timeout: float = 60, py: str = PY,
            env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
        return subprocess.run([py, "-m", "pd_launcher", *args], env=py_env(env),
                              cwd=str(self.tmp), capture_output=True, text=True, timeout=timeout)

    def start(self, spec_path: Path, *args: str, py: str = PY,
              prefix: Optional[List[str]] = None,
              env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
        out = open(self.tmp / f"launcher{len(self.launchers)}.out", "w")
        argv = list(prefix or []) + [py, "-m", "pd_launcher", "run", str(spec_path), *args]
        p = subprocess.Popen(argv, env=py_env(env), cwd=str(self.tmp), stdout=out,
                             stderr=subprocess.STDOUT, text=True)
        p.out_path = out.name  # type: ignore[attr-defined]
        out.close()
        self.launchers.append(p)
        return p

    def output(self, p: subprocess.Popen) -> str:
        return Path(p.out_path).read_text()  # type: ignore[attr-defined]

    def state(self, state_dir: Optional[Path] = None) -> Optional[Dict[str, Any]]:
        path = (state_dir or self.state_dir) / "launcher.json"
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def wait_running(self, p: subprocess.Popen, timeout: float = 15.0,
                     state_dir: Optional[Path] = None) -> Dict[str, Any]:
        def ready():
            if p.poll() is not None:
                raise AssertionError(f"launcher exited {p.returncode}:\n{self.output(p)}")
            st = self.state(state_dir)
            if not st or st.get("status") != "running":
                return None
            return st if st["launcher"]["pid"] == p.pid else None  # not a stale file

        return wait_for(ready, timeout, what="launcher status running")

    def decoy(self, argv: List[str]) -> subprocess.Popen:
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        self.others.append(p)
        return p

    def cleanup(self) -> None:
        for p in self.launchers:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        for sd in {self.state_dir} | {Path(x) for x in self.tmp.glob("state*")}:
            st = self.state(sd)
            for rec in (st or {}).get("processes") or []:
                pid = int(rec["pid"])
                if pid_alive(pid) and proc_start_time(pid) == rec["start_time"]:
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except OSError:
                        pass
        for p in self.others:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture
def node(tmp_path: Path):
    env = Env(tmp_path)
    try:
        yield env
    finally:
        env.cleanup()

# prints the file's content at start and on each SIGHUP
HUP_READER = (
    "import signal, sys, time\n"
    "path = sys.argv[1]\n"
    "def h(s, f):\n"
    "    print('HUP ' + open(path).read().strip(), flush=True)\n"
    "signal.signal(signal.SIGHUP, h)\n"
    "print('up ' + open(path).read().strip(), flush=True)\n"
    "while True:\n"
    "    time.sleep(1)\n"
)
