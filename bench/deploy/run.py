#!/usr/bin/env python3
"""Time site.yml from clean, site.yml re-run (changed=0) and cleanup.yml on a 9-node
emulated cluster (4 P + 4 D + 1 C, process runtime, local connection, 127.0.8.x).

    .venv/bin/python bench/deploy/run.py [--repeat N] [--write-readme]

Targets (issue): site from clean <= 60 s, re-run <= 25 s with changed=0, cleanup <= 20 s.
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
PLAYBOOK = str(Path(sys.executable).parent / "ansible-playbook")
SUBNET = "127.0.8"


def inventory(root: Path) -> Path:
    p = {f"p{i}{s}": (f"{SUBNET}.{n}", f"{SUBNET}.{m}")
         for i, s, n, m in ((1, "a", 1, 1), (1, "b", 2, 1), (2, "a", 3, 3), (2, "b", 4, 3))}
    d = {f"d{i}{s}": (f"{SUBNET}.{n}", f"{SUBNET}.{m}")
         for i, s, n, m in ((1, "a", 5, 5), (1, "b", 6, 5), (1, "c", 7, 5), (1, "d", 8, 5))}
    inv = {"all": {
        "vars": {
            "pd_cluster_name": "bench", "pd_engine": "emulator", "pd_emulate": "vllm-ascend",
            "pd_model_path": "/models/demo", "pd_served_model_name": "demo",
            "pd_kv_port": 36000, "pd_runtime": "process", "pd_grace_seconds": 5,
            "pd_ready_timeout": 120, "devices": "0",
            "pd_base_dir": str(root / "nodes") + "/{{ inventory_hostname }}",
            "pd_python": sys.executable, "pd_bundle_dir": str(root / "bundle"),
            "ansible_connection": "local", "ansible_python_interpreter": sys.executable,
            "pd_validate_show_plan": False,
        },
        "children": {
            "P": {"hosts": {h: {"ansible_host": ip, "host_ip": m} for h, (ip, m) in p.items()}},
            "D": {"hosts": {h: {"ansible_host": ip, "host_ip": m} for h, (ip, m) in d.items()}},
            "C": {"hosts": {"c1": {"ansible_host": f"{SUBNET}.9"}}},
        }}}
    path = root / "inventory.yml"
    path.write_text(yaml.safe_dump(inv, sort_keys=False))
    return path


def timed(inv: Path, playbook: str) -> tuple[float, int]:
    start = time.monotonic()
    res = subprocess.run([PLAYBOOK, "-i", str(inv), playbook], cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    elapsed = time.monotonic() - start
    if res.returncode != 0:
        sys.exit(f"{playbook} failed:\n{res.stdout[-4000:]}\n{res.stderr[-2000:]}")
    changed = sum(int(x) for x in re.findall(r"changed=(\d+)", res.stdout.split("PLAY RECAP")[-1]))
    return elapsed, changed


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--write-readme", action="store_true")
    args = ap.parse_args()
    rows: dict[str, list[float]] = {"site from clean": [], "site re-run": [], "cleanup": []}
    changed_rerun = []
    with tempfile.TemporaryDirectory(prefix="pd-bench-deploy-") as tmp:
        inv = inventory(Path(tmp))
        for _ in range(args.repeat):
            rows["site from clean"].append(timed(inv, "site.yml")[0])
            t, changed = timed(inv, "site.yml")
            rows["site re-run"].append(t)
            changed_rerun.append(changed)
            rows["cleanup"].append(timed(inv, "cleanup.yml")[0])
    targets = {"site from clean": 60, "site re-run": 25, "cleanup": 20}
    lines = ["| step | median s | min s | max s | target s |", "|---|---:|---:|---:|---:|"]
    for step, values in rows.items():
        lines.append(f"| {step} | {statistics.median(values):.1f} | {min(values):.1f} | "
                     f"{max(values):.1f} | {targets[step]} |")
    table = "\n".join(lines)
    note = (f"9 nodes (4 P in two 2-node instances, 4 D in one 4-node instance, 1 C), "
            f"process runtime, local connection, {args.repeat} run(s); changed on re-run: "
            f"{changed_rerun}.")
    print(table)
    print(note)
    if args.write_readme:
        readme = REPO / "bench" / "README.md"
        text = readme.read_text() if readme.exists() else "# Benchmarks\n"
        section = (f"## Deploy\n\n{note}\nRerun: `.venv/bin/python bench/deploy/run.py "
                   f"--repeat 3 --write-readme`.\n\n{table}\n")
        if "## Deploy" in text:
            text = re.sub(r"## Deploy\n.*?(?=\n## |\Z)", section, text, flags=re.S)
        else:
            text = text.rstrip() + "\n\n" + section
        readme.write_text(text)
    return 0 if max(changed_rerun) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
