"""A node for the process-runtime module tests: the real launcher bundle
(pd_deploy.bundle), unit specs whose process is a small Python HTTP server on
127.0.76.x, `pd_launcher wait` / `stop` run from the unpacked bundle, and a cleanup that
stops every launcher it may have started (pd_launcher stop, then SIGKILL of whatever
recorded process is still ours)."""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
IP = "127.0.76.1"
PROXY_VARS = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
              "all_proxy")

HTTP_SERVER = (
    "import http.server, sys\n"
    "class H(http.server.BaseHTTPRequestHandler):\n"
    "    def do_GET(self):\n"
    "        self.send_response(200 if self.path == '/health' else 404)\n"
    "        self.send_header('Content-Length', '0')\n"
    "        self.end_headers()\n"
    "    def log_message(self, *a):\n"
    "        pass\n"
    "print('serving', flush=True)\n"
    "http.server.HTTPServer((sys.argv[1], int(sys.argv[2])), H).serve_forever()\n"
)

_BUNDLE: Dict[str, Any] = {}


def bundle() -> tuple:
    """(bytes, sha256) of the real launcher bundle, built once per test session."""
    if not _BUNDLE:
        from pd_deploy.bundle import build

        data = build()
        _BUNDLE.update(data=data, sha=hashlib.sha256(data).hexdigest())
    return _BUNDLE["data"], _BUNDLE["sha"]


@functools.cache
def filters() -> Dict[str, Any]:
    """The filters of plugins/filter/pd_plan.py, loaded from the file as Ansible does."""
    spec = importlib.util.spec_from_file_location("pd_filter_pd_plan",
                                                  REPO / "plugins" / "filter" / "pd_plan.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.FilterModule().filters()


def free_port(host: str = IP) -> int:
    s = socket.socket()
    s.bind((host, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def pid_alive(pid: int) -> bool:
    """Alive and not a zombie (a launcher the module started is this process's child:
    once stopped it stays a zombie until reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return False
    return data[data.rfind(")") + 2] not in "ZX"


def wait_for(pred, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        val = pred()
        if val:
            return val
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


class Node:
    """One node's base directory (the role's layout: lib, run/<unit>, state/<unit>,
    logs/<unit>) and the units started on it."""

    def __init__(self, tmp: Path) -> None:
        self.base = tmp / "pd"
        self.lib = self.base / "lib"
        self.bundle_path = self.lib / "pd_launcher.tar.gz"  # where the role ships it
        self.units: List[str] = []
        self.servers: List[List[str]] = []  # [ip, port] of every unit's server

    def dirs(self, unit: str) -> Dict[str, str]:
        return {"run": str(self.base / "run" / unit), "state": str(self.base / "state" / unit),
                "log": str(self.base / "logs" / unit)}

    def spec(self, unit: str = "P", port: Optional[int] = None, ip: str = IP,
             **over: Any) -> Dict[str, Any]:
        port = port or free_port(ip)
        if unit not in self.units:
            self.units.append(unit)
        self.servers.append([ip, str(port)])
        spec: Dict[str, Any] = {
            "schema": 1, "cluster": "test", "node": "n1", "role": unit, "unit": unit,
            "ip": ip, "instance": f"{unit}1", "master": True, "engine": "emulator",
            "base_dir": str(self.base), "dirs": self.dirs(unit), "grace_seconds": 3,
            "checks": {"paths": [], "devices": [], "commands": []}, "nic": None,
            "files": [], "pre_start": [], "proxy": None,
            "processes": [{
                "name": "engine-dp0", "argv": [PY, "-u", "-c", HTTP_SERVER, ip, str(port)],
                "env": {}, "ports": [{"host": ip, "port": port, "use": "api"}],
                "ready": {"type": "http", "url": f"http://{ip}:{port}/health"},
            }],
        }
        spec.update(over)
        return spec

    def ship(self) -> None:
        """The role's copy task: the bundle in the lib dir."""
        self.lib.mkdir(parents=True, exist_ok=True)
        self.bundle_path.write_bytes(bundle()[0])

    def args(self, spec: Dict[str, Any], **over: Any) -> Dict[str, Any]:
        args = {"spec_json": json.dumps(spec), "bundle": str(self.bundle_path),
                "bundle_sha256": bundle()[1], "lib_dir": str(self.lib), "python": PY,
                "environment": {}}
        args.update(over)
        return args

    def spec_path(self, unit: str = "P") -> Path:
        return self.base / "run" / unit / "spec.json"

    def state(self, unit: str = "P") -> Optional[Dict[str, Any]]:
        try:
            return json.loads((self.base / "state" / unit / "launcher.json").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def env(self) -> Dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
        env["PYTHONPATH"] = str(self.lib)
        return env

    def launcher(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """`python -m pd_launcher ...` from the unpacked bundle, as the role runs it."""
        return subprocess.run([PY, "-m", "pd_launcher", *args], cwd=str(self.lib),
                              env=self.env(), capture_output=True, text=True,
                              timeout=timeout, check=False)

    def wait(self, unit: str = "P", timeout: float = 20) -> Dict[str, Any]:
        """`pd_launcher wait` until every process of the unit is ready; the state then."""
        r = self.launcher("wait", str(self.spec_path(unit)), "--timeout", str(timeout),
                          "--interval", "0.1", "--state-dir", str(self.base / "state" / unit),
                          timeout=timeout + 30)
        log = self.base / "logs" / unit / "launcher.out"
        assert r.returncode == 0, (r.stdout, r.stderr,
                                   log.read_text() if log.exists() else "")
        # `wait` can see the processes answer before the launcher records them running
        return wait_for(lambda: _running(self.state(unit)), 10, f"{unit} recorded running")

    def stop(self, unit: str = "P") -> None:
        r = self.launcher("stop", "--state-dir", str(self.base / "state" / unit))
        assert r.returncode == 0, r.stderr

    def cleanup(self) -> None:
        """Stop what this node's tests may have started: `pd_launcher stop` on every unit
        with a state file, then any process left whose command line is one of ours (a
        launcher on this base directory, maybe not yet recorded, or a unit's server)."""
        for unit in self.units:
            if self.state(unit) is not None and self.lib.joinpath("pd_launcher").is_dir():
                self.launcher("stop", "--state-dir", str(self.base / "state" / unit))
        launchers = self._ours(lambda cmd: "pd_launcher" in cmd and str(self.base) in
                               " ".join(cmd))
        for pid in launchers:
            _signal(pid, signal.SIGTERM)  # it stops its own processes
        try:
            wait_for(lambda: not any(pid_alive(pid) for pid in launchers), 10)
        except AssertionError:
            pass
        for pid in self._ours(lambda cmd: "pd_launcher" in cmd and str(self.base) in
                              " ".join(cmd)) + self._ours(self._server):
            _signal(pid, signal.SIGKILL)

    def _server(self, cmd: List[str]) -> bool:
        return len(cmd) == 6 and cmd[3] == HTTP_SERVER and [cmd[4], cmd[5]] in self.servers

    @staticmethod
    def _ours(match) -> List[int]:
        out = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != os.getpid() and pid_alive(int(entry)):
                try:
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        cmd = [a.decode(errors="replace") for a in f.read().split(b"\0")[:-1]]
                except OSError:
                    continue
                if cmd and match(cmd):
                    out.append(int(entry))
        return out


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def _running(st: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    return st if st and st["status"] == "running" and st["processes"] else None


def pids(state: Dict[str, Any]) -> List[int]:
    """The launcher's and every process's PID of a state file."""
    return [state["launcher"]["pid"]] + [p["pid"] for p in state["processes"]]
