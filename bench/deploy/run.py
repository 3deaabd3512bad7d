#!/usr/bin/env python3
"""Deploy growth curves: site.yml from clean, site.yml re-run (changed=0), status.yml and
cleanup.yml on emulated clusters of several sizes (process runtime, local connection,
loopback 127.0.8.x, one address per node; the whole 127.0.0.0/8 routes to lo, so no
alias is created).

    .venv/bin/python bench/deploy/run.py [--nodes 9,17,33,65] [--repeat N]
        [--profile] [--forks N] [--write-readme] [--smoke]

A cluster of N nodes is 1 C host plus (N-1)/2 P nodes in 2-node instances and (N-1)/2 D
nodes in 4-node instances (9 nodes: 2 P instances + 1 D instance, the size the first
targets were set for). Per size and step it measures wall seconds, the changed count,
CPU seconds of ansible-playbook and everything it ran (module processes: with the local
connection the "node side" runs here too), and the peak summed RSS of that process tree
(sampled every 0.1 s). Plan time and plan size (JSON bytes) come from the same planner
the validate role calls, run in this process.

--profile enables bench/deploy/callback_plugins/pd_task_times (wall time per task) and
writes the 20 costliest tasks per step to bench/out/deploy-profile-<N>.txt.
--write-readme replaces the "Deploy" section of bench/README.md and writes
bench/out/deploy.{json,md} and bench/plots/deploy.png. --smoke runs the smallest size
once and writes nothing (CI).

Targets (issue 16, this machine): 65 nodes: site from clean <= 120 s, re-run <= 45 s with
changed=0, cleanup <= 40 s; the re-run's seconds per node flat or falling from 17 to 65.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PLAYBOOK = str(BIN / "ansible-playbook")
SUBNET = "127.0.8"
OUT = REPO / "bench" / "out"
STEPS = ("site from clean", "site re-run", "status", "cleanup")
TARGETS_65 = {"site from clean": 120.0, "site re-run": 45.0, "cleanup": 40.0}


def layout(nodes: int) -> dict[str, dict[str, tuple[str, str]]]:
    """host -> (ip, master ip) per group, for a cluster of `nodes` nodes."""
    engine = nodes - 1
    if engine < 8 or engine % 8:
        raise SystemExit(f"--nodes {nodes}: need 1 + a multiple of 8 (9, 17, 33, 65, ...)")
    half = engine // 2
    p: dict[str, tuple[str, str]] = {}
    d: dict[str, tuple[str, str]] = {}
    for i in range(half):
        inst, member = divmod(i, 2)
        p[f"p{inst + 1}{'ab'[member]}"] = (f"{SUBNET}.{i + 1}", f"{SUBNET}.{inst * 2 + 1}")
    for i in range(half):
        inst, member = divmod(i, 4)
        n = half + i + 1
        d[f"d{inst + 1}{'abcd'[member]}"] = (f"{SUBNET}.{n}", f"{SUBNET}.{half + inst * 4 + 1}")
    return {"P": p, "D": d, "C": {"c1": (f"{SUBNET}.{nodes}", f"{SUBNET}.{nodes}")}}


def inventory(root: Path, nodes: int) -> Path:
    groups = layout(nodes)
    inv = {"all": {
        "vars": {
            "pd_cluster_name": "bench", "pd_engine": "emulator", "pd_emulate": "vllm-ascend",
            "pd_model_path": "/models/demo", "pd_served_model_name": "demo",
            "pd_kv_port": 36000, "pd_runtime": "process", "pd_grace_seconds": 5,
            "pd_ready_timeout": 300, "devices": "0",
            "pd_base_dir": str(root / "nodes") + "/{{ inventory_hostname }}",
            "pd_python": sys.executable, "pd_bundle_dir": str(root / "bundle"),
            "ansible_connection": "local", "ansible_python_interpreter": sys.executable,
            "pd_validate_show_plan": False,
        },
        "children": {
            g: {"hosts": {h: ({"ansible_host": ip} if g == "C" else
                              {"ansible_host": ip, "host_ip": m})
                          for h, (ip, m) in hosts.items()}}
            for g, hosts in groups.items()
        }}}
    path = root / "inventory.yml"
    path.write_text(yaml.safe_dump(inv, sort_keys=False))
    return path


def plan_cost(inv: Path) -> tuple[float, int]:
    """Seconds to build the plan document (what the validate role's filter does) and its
    JSON size. The inventory is read first and not timed (ansible-playbook does that too,
    before any play)."""
    sys.path.insert(0, str(REPO))
    from pd_deploy.cli import plan_document
    from pd_deploy.inventory import load_inventory

    groups, hostvars = load_inventory(str(inv))
    best = float("inf")
    doc: dict[str, Any] = {}
    for _ in range(3):
        start = time.perf_counter()
        doc = plan_document(groups, hostvars)
        best = min(best, time.perf_counter() - start)
    return best, len(json.dumps(doc))


def _tree_rss_kib(root_pid: int) -> int:
    """Summed RSS of root_pid and its descendants (a /proc walk; Linux only)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, ppid = int(entry), int(fields[1])
        children.setdefault(ppid, []).append(pid)
        rss[pid] = int(fields[21]) * (resource.getpagesize() // 1024)
    total, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total


FORKS: int | None = None  # --forks: ANSIBLE_FORKS for every playbook run (ansible.cfg: 20)


def timed(inv: Path, playbook: str, profile_to: Path | None = None) -> dict[str, Any]:
    env = dict(os.environ, ANSIBLE_FORCE_COLOR="0")
    if FORKS:
        env["ANSIBLE_FORKS"] = str(FORKS)
    times = Path(tempfile.mkstemp(prefix="pd-task-times-")[1]) if profile_to else None
    if times:
        env["ANSIBLE_CALLBACK_PLUGINS"] = str(Path(__file__).parent / "callback_plugins")
        env["ANSIBLE_CALLBACKS_ENABLED"] = "pd_task_times"
        env["PD_TASK_TIMES"] = str(times)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    proc = subprocess.Popen([PLAYBOOK, "-i", str(inv), playbook], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            peak[0] = max(peak[0], _tree_rss_kib(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out, err = proc.communicate(timeout=1800)
    finally:
        done.set()
        sampler.join()
    elapsed = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{playbook} failed:\n{out[-6000:]}\n{err[-2000:]}")
    recap = out.split("PLAY RECAP")[-1]
    if profile_to and times:
        profile_to.parent.mkdir(parents=True, exist_ok=True)
        lines = times.read_text().splitlines()
        times.unlink()
        data = json.loads(lines[-1]) if lines else {"tasks": {}, "hosts": {}}
        top = sorted(data["tasks"].items(), key=lambda kv: -kv[1])[:20]
        with profile_to.open("a") as f:
            f.write(f"== {playbook} ({elapsed:.1f} s, {len(data['tasks'])} tasks, "
                    f"{sum(data['tasks'].values()):.1f} s in tasks)\n")
            for name, secs in top:
                f.write(f"{secs:7.2f} s  {data['hosts'].get(name, 0):4d} hosts  {name}\n")
            f.write("\n")
    return {
        "seconds": elapsed,
        "changed": sum(int(x) for x in re.findall(r"changed=(\d+)", recap)),
        "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "peak_rss_mib": peak[0] / 1024,
    }


def measure(nodes: int, repeat: int, profile: bool) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in STEPS}
    with tempfile.TemporaryDirectory(prefix=f"pd-bench-deploy-{nodes}-") as tmp:
        inv = inventory(Path(tmp), nodes)
        plan_s, plan_bytes = plan_cost(inv)
        prof = OUT / f"deploy-profile-{nodes}.txt" if profile else None
        if prof and prof.exists():
            prof.unlink()
        try:
            for _ in range(repeat):
                runs["site from clean"].append(timed(inv, "site.yml", prof))
                runs["site re-run"].append(timed(inv, "site.yml", prof))
                runs["status"].append(timed(inv, "status.yml", prof))
                runs["cleanup"].append(timed(inv, "cleanup.yml", prof))
        except RuntimeError as exc:
            # leave nothing running behind a failed step
            subprocess.run([PLAYBOOK, "-i", str(inv), "cleanup.yml"], cwd=REPO,
                           capture_output=True, timeout=1800, check=False)
            sys.exit(str(exc))
    row: dict[str, Any] = {"nodes": nodes, "plan_s": plan_s, "plan_bytes": plan_bytes,
                           "runs": repeat}
    for step, values in runs.items():
        row[step] = {k: statistics.median(v[k] for v in values)
                     for k in ("seconds", "cpu_s", "peak_rss_mib")}
        row[step]["changed"] = max(v["changed"] for v in values)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| nodes | step | s | s / node | changed | controller CPU s | peak RSS MiB |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        for step in STEPS:
            m = r[step]
            lines.append(f"| {r['nodes']} | {step} | {m['seconds']:.1f} | "
                         f"{m['seconds'] / r['nodes']:.2f} | {m['changed']} | "
                         f"{m['cpu_s']:.1f} | {m['peak_rss_mib']:.0f} |")
    lines += ["", "| nodes | plan ms | plan JSON kB |", "|---:|---:|---:|"]
    lines += [f"| {r['nodes']} | {r['plan_s'] * 1000:.0f} | {r['plan_bytes'] / 1000:.1f} |"
              for r in rows]
    return "\n".join(lines)


def verdict(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    big = [r for r in rows if r["nodes"] == 65]
    for r in big:
        for step, limit in TARGETS_65.items():
            got = r[step]["seconds"]
            out.append(f"65 nodes {step}: {got:.1f} s (target <= {limit:.0f} s: "
                       f"{'met' if got <= limit else 'NOT met'})")
    per = [(r["nodes"], r["site re-run"]["seconds"] / r["nodes"]) for r in rows
           if r["nodes"] >= 17]
    if len(per) >= 2:
        flat = all(b <= a * 1.10 for (_, a), (_, b) in zip(per, per[1:]))
        out.append("re-run s/node from 17 up: " + ", ".join(f"{n}: {s:.2f}" for n, s in per)
                   + f" ({'flat or falling' if flat else 'NOT flat'}, 10 % tolerance)")
    out.append("changed on re-run: " + ", ".join(
        f"{r['nodes']}: {r['site re-run']['changed']}" for r in rows))
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    xs = [r["nodes"] for r in rows]
    for step in STEPS:
        ax.plot(xs, [r[step]["seconds"] for r in rows], marker="o", label=step)
    for limit in TARGETS_65.values():
        ax.scatter([65], [limit], marker="_", s=300, color="grey")
    ax.set_xlabel("nodes (1 C + half P in 2-node instances + half D in 4-node instances)")
    ax.set_ylabel("seconds")
    ax.set_title("pd-deploy on emulated clusters, 2 cores (grey: 65-node targets)")
    ax.set_xticks(xs)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return True


def write_readme(rows: list[dict[str, Any]], text_table: str, notes: list[str]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "deploy.json").write_text(json.dumps(rows, indent=1))
    (OUT / "deploy.md").write_text(text_table + "\n\n" + "\n".join(notes) + "\n")
    plots = REPO / "bench" / "plots"  # tracked (bench/out is not): README embeds it
    plots.mkdir(exist_ok=True)
    has_plot = plot(rows, plots / "deploy.png")
    readme = REPO / "bench" / "README.md"
    text = readme.read_text()
    load = os.getloadavg()[0]
    section = (
        "## Deploy\n\n"
        f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, process runtime, local "
        f"connection, emulated engines (vllm-ascend flavour), loopback {SUBNET}.x; "
        f"median of {rows[0]['runs']} run(s) per size; 1-minute load average after: "
        f"{load:.1f}. Controller CPU = ansible-playbook and every process it ran (with "
        "the local connection that includes the modules, i.e. the node side of Ansible; "
        "the engines the launcher starts are not its children). Rerun: "
        "`.venv/bin/python bench/deploy/run.py --nodes 9,17,33,65 --write-readme`.\n\n"
        f"{text_table}\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
        + ("\n![seconds vs nodes](plots/deploy.png)\n" if has_plot else "")
    )
    marker = "<!-- deploy-notes -->"
    keep = ""
    old = re.search(r"## Deploy\n.*?(?=\n## |\Z)", text, flags=re.S)
    if old and marker in old.group(0):
        keep = "\n" + old.group(0)[old.group(0).index(marker):].rstrip() + "\n"
    section = section + keep
    if old:
        text = text[:old.start()] + section + text[old.end():]
    else:
        text = text.rstrip() + "\n\n" + section
    readme.write_text(text)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", default="9", help="comma-separated sizes, e.g. 9,17,33,65")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--write-readme", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="9 nodes once, write nothing")
    ap.add_argument("--forks", type=int, help="Ansible forks (default: ansible.cfg's 20)")
    args = ap.parse_args()
    global FORKS
    FORKS = args.forks
    sizes = [9] if args.smoke else [int(n) for n in args.nodes.split(",")]
    for n in sizes:
        layout(n)  # fail on a bad size before deploying anything
    rows = []
    for n in sizes:
        rows.append(measure(n, 1 if args.smoke else args.repeat, args.profile))
        print(table(rows[-1:]), flush=True)
    text_table = table(rows)
    notes = verdict(rows)
    print(text_table)
    print("\n".join(notes))
    if args.write_readme and not args.smoke and not args.forks:
        write_readme(rows, text_table, notes)
    return 0 if all(r["site re-run"]["changed"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
