"""site.yml, status.yml and cleanup.yml work with an HTTP proxy set for the controller
and the nodes (a dead one here): readiness waits, unit probes, the smoke request and
the engines' own traffic go straight to the cluster addresses, never through a proxy."""
from __future__ import annotations

import os
import shutil

import pytest

from .deploy import exercise_proxy, make_cluster, status_rows, wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"),
                       reason="nginx is not installed (make deps)"),
]

DEAD = "http://127.0.0.1:9"  # discard port: nothing listens, every proxied request fails
PROXY_ENV = {name: DEAD for name in ("http_proxy", "https_proxy", "all_proxy",
                                     "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")}
PROXY_ENV.update(no_proxy="", NO_PROXY="")  # nothing exempted, not even loopback


def test_deploy_status_cleanup_with_a_dead_proxy_in_the_environment(tmp_path):
    cluster = make_cluster(tmp_path / "np", "127.0.25")
    # ansible_connection local: the nodes' modules and commands inherit this too
    cluster.env = dict(PROXY_ENV)
    try:
        site = cluster.playbook("site.yml")
        assert "answered 200" in site.stdout  # the smoke request, through the front door
        rows = status_rows(cluster.playbook("status.yml").stdout)
        assert len(rows) == 6, rows
        for key, row in rows.items():
            ready, total = row[5].split("/")
            assert row[4] == "running" and ready == total, (key, row)
        exercise_proxy(cluster)  # prefill and decode legs and the KV handoff work
        cluster.playbook("cleanup.yml")
        assert cluster.state_files() == []
        assert wait_until(lambda: cluster.listening() == [], 10), cluster.listening()
    finally:
        cluster.playbook("cleanup.yml", check=False)
