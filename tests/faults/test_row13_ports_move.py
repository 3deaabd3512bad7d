"""Row 13: an inventory change moves ports onto ones the previous units hold. The re-run
stops the old units before the new ones bind and never fails on "address in use"."""
from __future__ import annotations

import os
import shutil

import pytest
import yaml

from tests.integration.deploy import exercise_proxy, make_cluster, port_open, wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"),
                       reason="nginx is not installed (make deps)"),
]

LAYOUT = {"P": [("p1", 1, None, "0")], "D": [("d1", 4, None, "0,1")], "C": [("c1", 9, None, None)]}


@pytest.mark.fault_row(13)
def test_ports_moving_onto_old_ones_converge(tmp_path, fault_report):
    cluster = make_cluster(tmp_path / "c", "127.0.57", layout=LAYOUT)
    d1, c1 = cluster.hosts["d1"], cluster.hosts["c1"]
    try:
        cluster.playbook("site.yml")
        assert port_open(d1, 7100) and port_open(d1, 7101) and port_open(c1, 7001)
        # d1's rank 0 moves onto rank 1's old API port, the proxy onto its agent's old one
        inv = yaml.safe_load(cluster.inventory.read_text())
        inv["all"]["vars"].update({"pd_api_port": 7101, "pd_proxy_port": 7001})
        cluster.inventory.write_text(yaml.safe_dump(inv, sort_keys=False))
        res = cluster.playbook("site.yml")
        assert "address already in use" not in res.stdout.lower()
        assert "already in use" not in res.stdout
        assert "answered 200" in res.stdout  # the smoke request through the moved proxy
        for host, port in ((d1, 7101), (d1, 7102), (c1, 7001), (c1, 7002)):
            assert port_open(host, port), (host, port)
        assert wait_until(lambda: not port_open(d1, 7100) and not port_open(c1, 7000), 10)
        old = {f"{d1}:7100", f"{cluster.hosts['p1']}:7100", f"{c1}:7000"}
        assert not old & set(cluster.listening()), cluster.listening()
        _exercise(cluster)
        fault_report(
            observed="pd_api_port 7100->7101 and pd_proxy_port 7000->7001 (d1's rank 0 onto "
                     "rank 1's old port, the proxy onto its agent's old port): the re-run of "
                     "site.yml stopped each changed unit before starting it, succeeded with no "
                     "'address in use', served the smoke request and completions on :7001, "
                     "and left 7100 and 7000 free",
            lost=None)
    finally:
        cluster.playbook("cleanup.yml", check=False)


def _exercise(cluster) -> None:
    class Moved:
        proxy = f"{cluster.hosts['c1']}:7001"
    exercise_proxy(Moved)  # type: ignore[arg-type]
