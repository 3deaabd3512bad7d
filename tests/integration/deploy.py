"""Helpers to deploy an emulated cluster with the real playbooks and look at it."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PLAYBOOK = str(BIN / "ansible-playbook")

# The local inventory's shape (2 P instances, one over two nodes; D over two nodes; C).
LAYOUT = {
    "P": [("p1a", 1, None, "0"), ("p1b", 2, 1, "0"), ("p2", 3, None, "0,1")],
    "D": [("d1a", 4, None, "0,1"), ("d1b", 5, 4, "0,1")],
    "C": [("c1", 9, None, None)],
}


@dataclass
class Cluster:
    root: Path
    subnet: str  # e.g. "127.0.3"
    inventory: Path
    hosts: dict[str, str] = field(default_factory=dict)  # host -> ip
    env: dict[str, str] = field(default_factory=dict)

    def playbook(self, name: str, *extra: str, check: bool = True,
                 timeout: float = 400) -> subprocess.CompletedProcess:
        res = subprocess.run([PLAYBOOK, "-i", str(self.inventory), name, *extra], cwd=REPO,
                             capture_output=True, text=True, timeout=timeout,
                             env=dict(os.environ, ANSIBLE_FORCE_COLOR="0", **self.env))
        if check and res.returncode != 0:
            raise AssertionError(f"{name} failed rc={res.returncode}\n{res.stdout[-6000:]}\n"
                                 f"{res.stderr[-3000:]}")
        return res

    @property
    def proxy(self) -> str:
        return f"{self.hosts['c1']}:7000"

    def state_files(self) -> list[Path]:
        return sorted(self.root.glob("nodes/*/state/*/launcher.json"))

    def recorded_pids(self) -> list[int]:
        pids = []
        for path in self.state_files():
            state = json.loads(path.read_text())
            pids.append(state["launcher"]["pid"])
            pids += [p["pid"] for p in state["processes"]]
        return pids

    def listening(self) -> list[str]:
        """Listening sockets on the cluster's addresses, except the test's own sshd."""
        out = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout
        return [line.split()[3] for line in out.splitlines()
                if line.split()[3].startswith(self.subnet + ".")
                and not line.split()[3].endswith(":2222")]


def make_cluster(root: Path, subnet: str, runtime: str = "process",
                 connection: dict[str, Any] | None = None,
                 extra_vars: dict[str, Any] | None = None,
                 host_vars: dict[str, dict[str, Any]] | None = None,
                 layout: dict[str, list[tuple[str, int, int | None, str | None]]] | None = None,
                 ) -> Cluster:
    """Write an inventory like inventories/local but on SUBNET.x with nodes under ROOT.
    host_vars: per-host variables (host -> vars), e.g. each node's own podman store;
    layout: group -> [(host, last octet, master's last octet, devices)] (default LAYOUT)."""
    children: dict[str, Any] = {}
    hosts: dict[str, str] = {}
    for group, members in (layout or LAYOUT).items():
        entries = {}
        for name, last, master, devices in members:
            ip = f"{subnet}.{last}"
            hosts[name] = ip
            entry: dict[str, Any] = {"ansible_host": ip}
            if master:
                entry["host_ip"] = f"{subnet}.{master}"
            if devices:
                entry["devices"] = devices
            entry.update((host_vars or {}).get(name, {}))
            entries[name] = entry
        children[group] = {"hosts": entries}
    variables = {
        "pd_cluster_name": f"t{subnet.split('.')[-1]}",
        "pd_engine": "emulator",
        "pd_emulate": "vllm-ascend",
        "pd_model_path": "/models/demo",
        "pd_served_model_name": "demo",
        "pd_kv_port": 36000,
        "pd_runtime": runtime,
        # a test machine running systemd would otherwise get boot units in /etc/systemd
        "pd_systemd": "false",
        "pd_grace_seconds": 5,
        "pd_ready_timeout": 90,
        "pd_base_dir": str(root / "nodes") + "/{{ inventory_hostname }}",
        "pd_python": sys.executable,
        "pd_bundle_dir": str(root / "bundle"),
        "pd_logs_dest": str(root / "fetched-logs"),
        "ansible_connection": "local",
        "ansible_python_interpreter": sys.executable,
    }
    variables.update(connection or {})
    variables.update(extra_vars or {})
    inv = {"all": {"vars": variables, "children": children}}
    root.mkdir(parents=True, exist_ok=True)
    path = root / "inventory.yml"
    path.write_text(yaml.safe_dump(inv, sort_keys=False))
    return Cluster(root=root, subnet=subnet, inventory=path, hosts=hosts)


def recap(stdout: str) -> dict[str, dict[str, int]]:
    out = {}
    for line in stdout.split("PLAY RECAP")[-1].splitlines():
        m = re.match(r"^(\S+)\s+:\s+(.*)$", line.strip())
        if m:
            out[m.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
    return out


def task_hosts(stdout: str, task: str) -> dict[str, list[str]]:
    """Per outcome (ok, changed, skipping, failed, ...), the hosts of every run of the
    task whose name contains TASK (default callback output)."""
    out: dict[str, list[str]] = {}
    inside = False
    for line in stdout.splitlines():
        if line.startswith(("TASK [", "RUNNING HANDLER [")):
            inside = task in line
            continue
        m = re.match(r"^(ok|changed|skipping|failed|fatal): \[([^\]]+)\]", line)
        if inside and m:
            out.setdefault(m.group(1), []).append(m.group(2).split(" -> ")[0])
    return out


def status_rows(stdout: str) -> dict[str, list[str]]:
    """The rows of status.yml's table, keyed "node/unit" (unit: P, D, C or a service
    name), each split on whitespace (state and health may span several words)."""
    rows = {}
    inside = False
    for line in stdout.splitlines():
        line = line.strip().strip("-").strip().strip("'")
        parts = line.split()
        if parts[:2] == ["NODE", "ROLE"]:
            inside = True
        elif inside and line.endswith("units healthy"):
            inside = False
        elif inside and len(parts) >= 6:
            rows[f"{parts[0]}/{parts[1]}"] = parts
    return rows


def row_restarts(row: list[str]) -> int | None:
    """The RESTARTS cell of a status_rows() row (the column after HEALTH, "N/M ready"),
    as an int; None when the row has no such cell (or "-": no state file)."""
    for i in range(len(row) - 2):
        if re.fullmatch(r"\d+/\d+", row[i]) and row[i + 1] == "ready":
            cell = row[i + 2]
            return int(cell) if cell.isdigit() else None
    return None


def wait_restarted(state_file: Path, before: dict[str, Any],
                   timeout: float = 30) -> dict[str, Any] | None:
    """The unit's state once its launcher restarted the set by itself after a crash
    (pd_restart_policy on-failure): the same launcher, more restarts than in BEFORE
    (a state file read before the crash), status running again and every process
    under a new PID and alive. None if that does not happen within TIMEOUT seconds."""
    old = {p["pid"] for p in before["processes"]}
    seen: dict[str, Any] = {}

    def check() -> bool:
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):  # replaced atomically, but may be absent briefly
            return False
        ok = (state["launcher"]["pid"] == before["launcher"]["pid"]
              and state.get("status") == "running"
              and int(state.get("restarts") or 0) > int(before.get("restarts") or 0)
              and len(state["processes"]) == len(before["processes"])
              and all(p["pid"] not in old and pid_alive(p["pid"])
                      for p in state["processes"]))
        if ok:
            seen.update(state)
        return ok

    return seen if wait_until(check, timeout, 0.05) else None


def unit_ready(cluster: Cluster, host: str, unit: str, timeout: float = 60) -> bool:
    """`pd_launcher wait` on the unit's spec: every process ready (after a restart: ready
    again), within TIMEOUT seconds."""
    node = cluster.root / "nodes" / host
    res = subprocess.run([sys.executable, "-m", "pd_launcher", "wait",
                          str(node / "run" / unit / "spec.json"), "--timeout", str(timeout),
                          "--interval", "0.2", "--state-dir", str(node / "state" / unit)],
                         cwd=REPO, capture_output=True, text=True, timeout=timeout + 30,
                         env=dict(os.environ, **cluster.env))
    return res.returncode == 0


def post(url: str, body: dict[str, Any], timeout: float = 30) -> tuple[int, dict, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        raw = resp.read()
        return resp.status, dict(resp.headers), raw


def stream(url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    req = urllib.request.Request(url, data=json.dumps(dict(body, stream=True)).encode(),
                                 headers={"Content-Type": "application/json"})
    events = []
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200
        for raw in resp:
            line = raw.decode().strip()
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def exercise_proxy(cluster: Cluster) -> None:
    """Completions (plain and streaming) and chat through the deployed proxy."""
    url = f"http://{cluster.proxy}/v1/completions"
    body = {"model": "demo", "prompt": "The quick brown fox", "max_tokens": 12}
    status, headers, raw = post(url, body)
    assert status == 200 and b'"text"' in raw
    assert headers.get("X-Request-Id")
    events = stream(url, body)
    assert len([e for e in events if e.get("choices")]) >= 12
    chat = post(f"http://{cluster.proxy}/v1/chat/completions",
                {"model": "demo", "messages": [{"role": "user", "content": "hi"}],
                 "max_tokens": 5})
    assert chat[0] == 200


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), 0.5):
            return True
    except OSError:
        return False


def start_decoy(argv_like: list[str]) -> subprocess.Popen:
    """A python process whose command line looks like one of ours, not started by us."""
    code = "import time; time.sleep(600)"
    return subprocess.Popen([sys.executable, "-c", code, *argv_like],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_until(pred, timeout: float = 20, interval: float = 0.3) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(interval)
    return pred()


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_leftovers(cluster: Cluster) -> None:
    """Stop whatever a failed cleanup left running (the launcher stops what it recorded)."""
    for state in cluster.state_files():
        subprocess.run([sys.executable, "-m", "pd_launcher", "stop", "--state-dir",
                        str(state.parent)], cwd=REPO, capture_output=True, timeout=60)


def assert_cleanup_spares(cluster: Cluster, decoy: subprocess.Popen,
                          decoy_addrs: set[str]) -> None:
    """cleanup.yml stops every process the launchers recorded and leaves no state and no
    listening socket on the cluster's addresses, except the decoy's, which survives."""
    ours = cluster.recorded_pids()
    cluster.playbook("cleanup.yml")
    assert cluster.state_files() == []
    assert wait_until(lambda: set(cluster.listening()) <= decoy_addrs, 10), cluster.listening()
    for pid in ours:
        assert not pid_alive(pid), pid
    assert decoy.poll() is None, "cleanup stopped a process it did not start"
