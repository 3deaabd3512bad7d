"""Row 14: secrets stay secret, state is private, admin endpoints stay off wildcards.

A vLLM-Ascend (emulated) cluster with a proxy API key, an engine API key and an HF
token (pd_env). The secrets appear in no Ansible output (-vv), no log, no process's
command line (`ps -eo args`: vLLM gets its key from VLLM_API_KEY, not --api-key), and
every file holding one, like every spec and state file, is unreadable to others. Every
socket our processes listen on (engines, proxy agent, nginx with its status/metrics) is
bound to the node's IP or loopback, never a wildcard.
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import urllib.error
import urllib.request

import pytest

from tests.integration.deploy import make_cluster, post

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"),
                       reason="nginx is not installed (make deps)"),
]

SECRETS = {"proxy": "sk-proxy-R14aZ", "engine": "sk-engine-R14bY", "hf": "hf_R14cXsecret"}


def _our_pids(cluster) -> set[int]:
    """Recorded PIDs and every process in their sessions (nginx workers, ...)."""
    pids = set(cluster.recorded_pids())
    sessions = set()
    for pid in pids:
        try:
            sessions.add(os.getsid(pid))
        except OSError:
            pass
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) in sessions:
                    pids.add(int(entry))
            except OSError:
                pass
    return pids


@pytest.mark.fault_row(14)
def test_secrets_modes_and_listeners(tmp_path, fault_report):
    cluster = make_cluster(tmp_path / "c", "127.0.65", extra_vars={
        "pd_proxy_api_key": SECRETS["proxy"], "pd_engine_api_key": SECRETS["engine"],
        "pd_env": {"HF_TOKEN": SECRETS["hf"]}})
    try:
        outs = [cluster.playbook("site.yml", "-vv"), cluster.playbook("status.yml", "-vv")]
        req = {"Authorization": f"Bearer {SECRETS['proxy']}"}
        r = urllib.request.Request(f"http://{cluster.proxy}/v1/completions", headers=dict(
            req, **{"Content-Type": "application/json"}),
            data=b'{"model": "demo", "prompt": "hi", "max_tokens": 3}')
        with urllib.request.urlopen(r, timeout=30) as resp:
            assert resp.status == 200
        with pytest.raises(urllib.error.HTTPError):  # no key: 401
            post(f"http://{cluster.proxy}/v1/completions", {"model": "demo", "prompt": "x"})
        # 1. Ansible output
        for res in outs:
            for s in SECRETS.values():
                assert s not in res.stdout and s not in res.stderr
        # 2. process listings: every process on the machine
        ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
        leaks = [line for line in ps.splitlines() if any(s in line for s in SECRETS.values())]
        assert leaks == [], leaks
        ours = _our_pids(cluster)
        assert len(ours) >= 8, ours
        # 3. logs, and 4. files: any file holding a secret is private; specs and state too
        files = [p for p in cluster.root.glob("nodes/**/*") if p.is_file()]
        holders, private = [], 0
        for path in files:
            mode = stat.S_IMODE(path.stat().st_mode)
            text = path.read_bytes().decode(errors="replace")
            if any(s in text for s in SECRETS.values()):
                assert "/logs/" not in str(path), f"secret in log {path}"
                holders.append(path.relative_to(cluster.root))
                assert mode & 0o077 == 0, f"{path} holds a secret with mode {oct(mode)}"
            if path.name in ("spec.json", "launcher.json"):
                assert mode & 0o077 == 0, f"{path} mode {oct(mode)}"
                private += 1
        assert holders, "no file holds the secrets: where do the processes get them?"
        # 5. listeners of our processes: the node's IP or loopback, never a wildcard
        ss = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
        listeners = []
        for line in ss.splitlines():
            cols = line.split()
            pids = {int(x.split("=")[1]) for x in line.replace(",", " ").split()
                    if x.startswith("pid=")}
            if pids & ours:
                listeners.append(cols[3])
        assert listeners, ss
        bad = [a for a in listeners if not (a.startswith(cluster.subnet + ".")
                                            or a.startswith("127.0.0.1:"))]
        assert bad == [], bad
    finally:
        cluster.playbook("cleanup.yml", check=False)
    fault_report(observed=(
        f"3 secrets (proxy key, engine key, HF token): absent from -vv output, logs and "
        f"`ps -eo args` of all processes; {len(holders)} files hold them, all 0600 or "
        f"stricter; {private} spec/state files private; {len(listeners)} listening sockets "
        f"of {len(ours)} cluster processes, none on a wildcard address"), lost=None)
