"""API keys work end to end and never reach Ansible's output, even with -vv."""
from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.request

import pytest

from .deploy import make_cluster

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"),
                       reason="nginx is not installed (make deps)"),
]

PROXY_KEY = "sk-proxy-Zq81mX"
ENGINE_KEY = "sk-engine-P0w7Lr"


def _post(url: str, key: str | None) -> int:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, headers=headers,
                                 data=b'{"model": "demo", "prompt": "hi", "max_tokens": 3}')
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_api_keys_end_to_end_and_never_logged(tmp_path):
    cluster = make_cluster(tmp_path / "s", "127.0.9",
                           extra_vars={"pd_proxy_api_key": PROXY_KEY,
                                       "pd_engine_api_key": ENGINE_KEY})
    try:
        outputs = [cluster.playbook("site.yml", "-vv")]
        outputs.append(cluster.playbook("status.yml", "-vv"))
        for res in outputs:
            for key in (PROXY_KEY, ENGINE_KEY):
                assert key not in res.stdout and key not in res.stderr
        url = f"http://{cluster.proxy}/v1/completions"
        assert _post(url, None) == 401
        assert _post(url, "sk-wrong") == 401
        assert _post(url, PROXY_KEY) == 200  # the proxy passes the engine key on
        engine = f"http://{cluster.hosts['d1a']}:7100/v1/completions"
        assert _post(engine, None) == 401 and _post(engine, ENGINE_KEY) == 200
        for log in cluster.root.glob("nodes/*/logs/*/*"):
            text = log.read_text(errors="replace")
            assert PROXY_KEY not in text and ENGINE_KEY not in text, log
        specs = list(cluster.root.glob("nodes/*/run/*/spec.json"))
        assert specs and all(oct(p.stat().st_mode & 0o777) == "0o600" for p in specs)
    finally:
        cluster.playbook("cleanup.yml", check=False)
