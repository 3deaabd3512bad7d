"""Row 7: corrupted or truncated state files. status.yml and cleanup.yml never signal
a process they cannot prove is theirs (PID + start time + command line, or the launcher
holding the unit's lock); they report the damage, naming host and file, and still stop
and remove what they can prove."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from tests.integration.deploy import make_cluster, pid_alive, start_decoy, wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"),
                       reason="nginx is not installed (make deps)"),
]

LAYOUT = {"P": [("p1", 1, None, "0")], "D": [("d1", 4, None, "0")], "C": [("c1", 9, None, None)]}


def _flat(text: str) -> str:
    """Without whitespace: Ansible wraps warnings (also inside paths, at hyphens)."""
    return "".join(text.split())


@pytest.mark.fault_row(7)
def test_damaged_state_files_spare_the_decoy(tmp_path, fault_report):
    cluster = make_cluster(tmp_path / "c", "127.0.56", layout=LAYOUT)
    decoy = None
    try:
        cluster.playbook("site.yml")
        files = {p.parts[-4]: p for p in cluster.state_files()}
        states = {h: json.loads(p.read_text()) for h, p in files.items()}
        ours = [states[h]["launcher"]["pid"] for h in states] + [
            p["pid"] for h in states for p in states[h]["processes"]]
        decoy = start_decoy(states["d1"]["processes"][0]["argv"][1:])
        # p1: truncated mid-write; d1: the launcher's and the engine's PID replaced by the
        # decoy's (a PID reused by an unrelated process with a look-alike command line)
        files["p1"].write_text(files["p1"].read_text()[:97])
        bad = states["d1"]
        bad["launcher"]["pid"] = decoy.pid
        bad["processes"][0]["pid"] = decoy.pid
        files["d1"].write_text(json.dumps(bad))

        res = cluster.playbook("status.yml")
        out = _flat(res.stdout + res.stderr)  # the warnings, wrapped to the terminal
        assert _flat(f"p1/P: damaged state file: cannot read {files['p1']}") in out, out[-3000:]
        assert _flat(f"d1/D: damaged state file: {files['d1']}: processes[0] (engine-dp0): "
                     f"pid {decoy.pid} now belongs to another process") in out, out[-3000:]
        assert decoy.poll() is None

        res = cluster.playbook("cleanup.yml")
        text = _flat(res.stdout)
        assert "p1/P:DAMAGEDSTATE" in text and "d1/D:DAMAGEDSTATE" in text, res.stdout[-4000:]
        assert _flat(f"{files['p1']} cannot be read") in text
        assert _flat(f"pid {decoy.pid} now belongs to another process") in text
        assert _flat("the launcher holding the lock is pid") in text
        assert decoy.poll() is None, "cleanup signalled a process it cannot prove is ours"
        assert wait_until(lambda: not any(pid_alive(p) for p in ours), 10), \
            [p for p in ours if pid_alive(p)]
        assert cluster.state_files() == []
        assert wait_until(lambda: cluster.listening() == [], 10), cluster.listening()
        fault_report(
            observed=f"p1's launcher.json truncated to 97 bytes and d1's launcher and engine "
                     f"PIDs swapped for a look-alike decoy: status.yml warned 'p1/P: damaged "
                     f"state file: cannot read ...' and 'd1/D: ... pid {decoy.pid} now belongs "
                     f"to another process'; cleanup.yml reported both (DAMAGED STATE), stopped "
                     f"both launchers through their lock; all {len(ours)} recorded launchers "
                     f"and processes are gone, every state file removed, the decoy "
                     f"survived",
            lost=None)
    finally:
        if decoy is not None:
            decoy.kill()
            decoy.wait()
        cluster.playbook("cleanup.yml", check=False)
