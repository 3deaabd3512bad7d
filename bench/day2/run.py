#!/usr/bin/env python3
"""Day-2 operations under load (issue 14 item 6): constant streaming load through the
front door while the cluster scales out, scales in and rolls, every operation done by
the real playbooks.

    .venv/bin/python bench/day2/run.py [--smoke] [--write-readme] [--concurrency N] [--keep]

An emulated cluster on loopback 127.0.77.x (process runtime, local connection, one
address and one device per node): 2 one-node P instances, 2 one-node D instances, one C
host with the front door. The engines are the bundled emulator with real latency
(inter-token 20 ms, prefill 5 ms + 0.1 ms per prompt token) and 4 running slots per
instance (`--max-num-seqs 4`, the rest wait in the engine's queue), so each instance has
a fixed capacity and the load (16 streams by default) needs all of them: losing one of
two D instances halves what the D pool can deliver.

`bench/day2/load.py`'s closed-loop generator runs from before the first phase to after
the last; each request counts in the phase during which it started:

    baseline   steady (20 s; smoke 6 s)
    scale-out  p3 (P) and d3 (D) added to the inventory, site.yml
    after-out  steady (15 s; smoke 4 s)
    scale-in   p3 and d3 removed from the inventory, site.yml -e pd_drain_timeout=30
    after-in   steady
    roll-P     restart.yml -e pd_restart_scope=P
    roll-D     restart.yml -e pd_restart_scope=D
    after      steady

then cleanup.yml (over every host that was ever in the inventory). Per phase: the
operation's wall seconds and changed count (PLAY RECAP), requests sent / ok / failed,
p50 / p99 end-to-end and TTFT of the ok requests, completed tokens/s and that as a share
of the baseline's. Checks: the launcher and process PIDs of every unit that existed
before the scale-out (C included: the front door reloads, it does not restart) are the
same after it; after the scale-in the removed hosts run nothing; a roll restarts every
unit of its pool (new PIDs) and no other. Targets: 0 failed requests in every phase;
during roll-P and roll-D capacity >= baseline x (1 - 1/instances in the pool) - 10 % of
the baseline.

Writes bench/out/day2.{json,md} and the playbook logs to bench/out/day2-logs/;
--write-readme also replaces the "Day-2" section of bench/README.md (a block from
`<!-- day2-notes -->` to the section's end is kept). --smoke (CI): short phases,
concurrency 4, nothing written; exit status 1 only when a playbook or a request failed.
Otherwise exit status 1 when a playbook failed or a target or check was missed.
--keep leaves the cluster running under bench/out/day2-cluster (remove it with
cleanup.yml on bench/out/day2-cluster/inventory-all.yml).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import LoadGen  # noqa: E402

BIN = Path(sys.executable).parent
PLAYBOOK = str(BIN / "ansible-playbook")
SUBNET = "127.0.77"
OUT = REPO / "bench" / "out"
README = REPO / "bench" / "README.md"
SECTION = "## Day-2"
NOTES = "<!-- day2-notes -->"
CAPACITY_TOLERANCE = 0.10  # of the baseline, below the 1 - 1/n bound
MAX_NUM_SEQS = 4
EMU_ENV = {"PD_EMU_ZERO_LATENCY": "0", "PD_EMU_ITL_S": "0.02",
           "PD_EMU_PREFILL_OVERHEAD_S": "0.005", "PD_EMU_PREFILL_S_PER_TOKEN": "0.0001"}

# host -> (group, last octet)
BASE_HOSTS = {"p1": ("P", 1), "p2": ("P", 2), "d1": ("D", 3), "d2": ("D", 4), "c1": ("C", 10)}
EXTRA_HOSTS = {"p3": ("P", 5), "d3": ("D", 6)}
UNIT = {"P": "P", "D": "D", "C": "C"}


def inventory(root: Path, hosts: dict[str, tuple[str, int]], name: str) -> Path:
    children: dict[str, Any] = {}
    for group in ("P", "D", "C"):
        members = {h: {"ansible_host": f"{SUBNET}.{last}"}
                   for h, (g, last) in hosts.items() if g == group}
        children[group] = {"hosts": members}
        if group in ("P", "D"):
            children[group]["vars"] = {"pd_extra_args": ["--max-num-seqs", str(MAX_NUM_SEQS)]}
    variables = {
        "pd_cluster_name": "day2", "pd_engine": "emulator", "pd_emulate": "vllm-ascend",
        "pd_model_path": "/models/demo", "pd_served_model_name": "demo",
        "pd_kv_port": 36000, "pd_runtime": "process", "pd_grace_seconds": 5,
        "pd_ready_timeout": 120, "devices": "0", "pd_env": dict(EMU_ENV),
        "pd_base_dir": str(root / "nodes") + "/{{ inventory_hostname }}",
        "pd_python": sys.executable, "pd_bundle_dir": str(root / "bundle"),
        "pd_logs_dest": str(root / "fetched-logs"),
        "ansible_connection": "local", "ansible_python_interpreter": sys.executable,
        "pd_validate_show_plan": False,
    }
    path = root / name
    path.write_text(yaml.safe_dump({"all": {"vars": variables, "children": children}},
                                   sort_keys=False))
    return path


def plan(inv: Path) -> tuple[str, str, str | None]:
    """(front door URL, served model name, API key) from `pd_deploy plan --format json`."""
    import subprocess

    res = subprocess.run([sys.executable, "-m", "pd_deploy", "plan", "-i", str(inv),
                          "--format", "json"], cwd=REPO, capture_output=True, text=True,
                         check=True)
    doc = json.loads(res.stdout)
    model = "demo"
    for node in doc["nodes"].values():
        for proc in node.get("processes", []):
            argv = proc.get("argv", [])
            if "--served-model-name" in argv:
                model = argv[argv.index("--served-model-name") + 1]
                break
    return (f"http://{doc['proxy']['listen']}", model,
            doc["proxy"]["options"].get("api_key"))


def recap(stdout: str) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    if "PLAY RECAP" not in stdout:
        return out
    for line in stdout.split("PLAY RECAP")[-1].splitlines():
        m = re.match(r"^(\S+)\s+:\s+(.*)$", line.strip())
        if m:
            out[m.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
    return out


@dataclass
class Run:
    root: Path
    logs: Path
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ,
                                                              ANSIBLE_FORCE_COLOR="0"))
    ops: list[dict[str, Any]] = field(default_factory=list)

    async def playbook(self, phase: str, inv: Path, name: str, *extra: str,
                       gen: LoadGen | None = None) -> dict[str, Any]:
        op: dict[str, Any] = {"phase": phase, "command": " ".join(
            ["ansible-playbook", "-i", inv.name, name, *extra]), "rc": None, "seconds": 0.0,
            "changed": None, "error": ""}
        if gen is not None:
            op["t_start"] = gen.now()
        self.ops.append(op)
        log = self.logs / f"{len(list(self.logs.glob('*.log'))) + 1:02d}-{phase}.log"
        op["log"] = str(log)
        if not (REPO / name).exists():
            op["error"] = f"{name} does not exist in {REPO} (not built yet?)"
            log.write_text(op["error"] + "\n")
            print(f"  {phase}: {op['error']}", flush=True)
            return op
        start = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            PLAYBOOK, "-i", str(inv), name, *extra, cwd=REPO, env=self.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        raw, _ = await proc.communicate()
        op["seconds"] = time.monotonic() - start
        if gen is not None:
            op["t_end"] = gen.now()
        out = raw.decode(errors="replace")
        log.write_text(out)
        op["rc"] = proc.returncode
        hosts = recap(out)
        op["changed"] = sum(h.get("changed", 0) for h in hosts.values())
        op["failed_hosts"] = sorted(h for h, c in hosts.items()
                                    if c.get("failed") or c.get("unreachable"))
        if proc.returncode != 0:
            op["error"] = first_error(out) or f"rc={proc.returncode}"
        print(f"  {phase}: {op['command']} -> rc={op['rc']} in {op['seconds']:.1f} s, "
              f"changed={op['changed']}" + (f"\n    {op['error']}" if op["error"] else ""),
              flush=True)
        return op


def first_error(out: str) -> str:
    """The first error of a failed ansible-playbook run, on one line: an `[ERROR]:` or
    `ERROR!` line, else a `fatal:` / `failed:` line with the few lines after it."""
    lines = out.splitlines()
    for ln in lines:
        if ln.startswith(("[ERROR]", "ERROR!")):
            return " ".join(ln.split())[:400]
    for i, ln in enumerate(lines):
        if ln.startswith(("fatal:", "failed:")):
            return " ".join(" ".join(lines[i:i + 8]).split())[:400]
    return " ".join(lines[-1].split())[:400] if lines else ""


def unit_pids(root: Path, hosts: list[str]) -> dict[str, list[int] | None]:
    """host/unit -> [launcher pid, process pids...] from the units' state files (None: a
    state file that cannot be read)."""
    out: dict[str, list[int] | None] = {}
    for host in hosts:
        for path in sorted((root / "nodes" / host / "state").glob("*/launcher.json")):
            key = f"{host}/{path.parent.name}"
            try:
                state = json.loads(path.read_text())
                out[key] = [state["launcher"]["pid"]] + [p["pid"] for p in state["processes"]]
            except (OSError, ValueError, KeyError, TypeError):
                out[key] = None
    return out


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie (a stopped launcher whose parent, after
    the module that started it exited, has not reaped it yet is gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def unit_of(key: str) -> str:
    return key.split("/", 1)[1]


def compare_pids(before: dict[str, list[int] | None], after: dict[str, list[int] | None],
                 restarted: str | None) -> tuple[bool, str]:
    """Units of pool RESTARTED (P or D) must have all-new PIDs, every other unit the same
    ones (restarted None: every unit the same)."""
    same, moved, bad = [], [], []
    for key, pids in before.items():
        now = after.get(key)
        if pids is None or now is None:
            bad.append(f"{key}: no readable state")
            continue
        if now == pids:
            same.append(key)
        elif not set(now) & set(pids):
            moved.append(key)
        else:
            bad.append(f"{key}: partly new PIDs")
    expect_moved = sorted(k for k in before if restarted and unit_of(k) == restarted)
    expect_same = sorted(k for k in before if k not in expect_moved)
    ok = not bad and sorted(moved) == expect_moved and sorted(same) == expect_same
    text = (f"same PIDs: {', '.join(sorted(same)) or '-'}; new PIDs: "
            f"{', '.join(sorted(moved)) or '-'}" + (f"; {'; '.join(bad)}" if bad else ""))
    return ok, text


def removed_gone(root: Path, hosts: list[str], before: dict[str, list[int] | None]
                 ) -> tuple[bool, str]:
    left = unit_pids(root, hosts)
    alive = sorted({f"{k}:{p}" for k, pids in before.items() if pids
                    for p in pids if pid_alive(p)})
    ok = not left and not alive
    text = (f"state files left: {', '.join(sorted(left)) or 'none'}; "
            f"processes alive: {', '.join(alive) or 'none'}")
    return ok, text


async def steady(gen: LoadGen, name: str, seconds: float) -> None:
    gen.phase(name)
    print(f"  {name}: {seconds:.0f} s steady", flush=True)
    await asyncio.sleep(seconds)


async def bench(args: argparse.Namespace, root: Path, logs: Path) -> dict[str, Any]:
    base = inventory(root, BASE_HOSTS, "inventory.yml")
    inventory(root, {**BASE_HOSTS, **EXTRA_HOSTS}, "inventory-all.yml")  # for cleanup
    run = Run(root=root, logs=logs)
    result: dict[str, Any] = {"ops": run.ops, "checks": [], "phases": [],
                              "aborted": None}
    baseline_s, steady_s = (6.0, 4.0) if args.smoke else (20.0, 15.0)
    print(f"deploy: {len(BASE_HOSTS)} hosts on {SUBNET}.x under {root}", flush=True)
    op = await run.playbook("deploy", base, "site.yml")
    if op["rc"] != 0:
        result["aborted"] = f"the initial deploy failed: {op['error']}"
        return result
    url, model, key = plan(base)
    gen = LoadGen(url, api_key=key, concurrency=args.concurrency,
                  max_tokens=args.max_tokens, model=model)
    result["load"] = {"url": url, "model": model, "concurrency": args.concurrency,
                      "max_tokens": args.max_tokens}
    gen.phase("baseline")
    await gen.start()
    try:
        print(f"load: {args.concurrency} streams of {args.max_tokens} tokens -> {url}",
              flush=True)
        await asyncio.sleep(baseline_s)

        gen.phase("scale-out")
        before = unit_pids(root, list(BASE_HOSTS))
        inventory(root, {**BASE_HOSTS, **EXTRA_HOSTS}, "inventory.yml")
        op = await run.playbook("scale-out", base, "site.yml", gen=gen)
        ok, text = compare_pids(before, unit_pids(root, list(BASE_HOSTS)), None)
        new = unit_pids(root, list(EXTRA_HOSTS))
        result["checks"].append({"name": "scale-out keeps every existing unit (C included)",
                                 "ok": ok and op["rc"] == 0, "detail": text})
        result["checks"].append({"name": "scale-out starts p3/P and d3/D",
                                 "ok": sorted(new) == ["d3/D", "p3/P"],
                                 "detail": f"units: {', '.join(sorted(new)) or 'none'}"})
        await steady(gen, "after-out", steady_s)

        gen.phase("scale-in")
        extra_before = unit_pids(root, list(EXTRA_HOSTS))
        inventory(root, BASE_HOSTS, "inventory.yml")
        op = await run.playbook("scale-in", base, "site.yml", "-e", "pd_drain_timeout=30",
                                gen=gen)
        ok, text = removed_gone(root, list(EXTRA_HOSTS), extra_before)
        result["checks"].append({"name": "scale-in stops the removed hosts' units",
                                 "ok": ok and op["rc"] == 0, "detail": text})
        await steady(gen, "after-in", steady_s)

        for pool in ("P", "D"):
            name = f"roll-{pool}"
            gen.phase(name)
            before = unit_pids(root, list(BASE_HOSTS))
            op = await run.playbook(name, base, "restart.yml", "-e",
                                    f"pd_restart_scope={pool}", gen=gen)
            ok, text = compare_pids(before, unit_pids(root, list(BASE_HOSTS)), pool)
            result["checks"].append({"name": f"{name} restarts every {pool} unit, no other",
                                     "ok": ok and op["rc"] == 0, "detail": text})
        await steady(gen, "after", steady_s)
    finally:
        await gen.stop()
    result["phases"] = gen.summary()
    result["timeline"] = timeline(gen)
    result["pools"] = {"P": 2, "D": 2}
    return result


def timeline(gen: LoadGen) -> list[dict[str, Any]]:
    """Per second of the run: requests finished ok / failed and tokens of the ok ones
    (by end time), for plots."""
    buckets: dict[int, dict[str, Any]] = {}
    for r in gen.records:
        if not r.t_end:
            continue
        b = buckets.setdefault(int(r.t_end), {"t": int(r.t_end), "ok": 0, "failed": 0,
                                               "tokens": 0})
        if r.ok:
            b["ok"] += 1
            b["tokens"] += r.tokens
        else:
            b["failed"] += 1
    return [buckets[k] for k in sorted(buckets)]


def evaluate(result: dict[str, Any], smoke: bool) -> tuple[list[str], bool]:
    """Lines of PASS / FAIL and whether the run passes."""
    lines: list[str] = []
    good = True
    if result.get("aborted"):
        return [f"FAIL: {result['aborted']}"], False
    for op in result["ops"]:
        fine = op["rc"] == 0
        good &= fine
        lines.append(f"{'PASS' if fine else 'FAIL'}: playbook {op['phase']}: "
                     f"`{op['command']}` " + (f"{op['seconds']:.1f} s, changed={op['changed']}"
                                              if fine else f"failed: {op['error']}"))
    phases = {p["phase"]: p for p in result["phases"]}
    for p in result["phases"]:
        fine = p["failed"] == 0
        good &= fine
        errs = "; ".join(f"{n} x {e}" for e, n in p["errors"].items())
        when = (f", started {p['failed_from_s']:.1f}-{p['failed_to_s']:.1f} s into the phase"
                if p["failed"] else "")
        lines.append(f"{'PASS' if fine else 'FAIL'}: {p['phase']}: {p['failed']} of "
                     f"{p['sent']} requests failed" + (f" ({errs}{when})" if errs else ""))
    base = phases.get("baseline", {}).get("tokens_per_s") or 0.0
    for pool in ("P", "D"):
        p = phases.get(f"roll-{pool}")
        n = result["pools"][pool]
        bound = (1 - 1 / n) - CAPACITY_TOLERANCE
        if p is None or not base:
            continue
        share = p["tokens_per_s"] / base
        ran = any(op["phase"] == f"roll-{pool}" and op["rc"] == 0 for op in result["ops"])
        fine = share >= bound and ran
        if not smoke:
            good &= fine
        target = f"target >= 1 - 1/{n} - {CAPACITY_TOLERANCE:.0%} = {bound:.0%}"
        lines.append(f"{'PASS' if fine else 'FAIL'}: roll-{pool} capacity "
                     + (f"{share:.0%} of baseline ({target})" if ran else
                        f"not measured, the roll did not succeed ({target})"))
    for c in result["checks"]:
        if not smoke:
            good &= c["ok"]
        lines.append(f"{'PASS' if c['ok'] else 'FAIL'}: {c['name']}: {c['detail']}")
    return lines, good


def table(result: dict[str, Any]) -> str:
    ops = {op["phase"]: op for op in result["ops"]}
    phases = result["phases"]
    base = next((p["tokens_per_s"] for p in phases if p["phase"] == "baseline"), 0.0)

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    lines = ["| phase | operation s | changed | sent | ok | failed | p50 ms | p99 ms | "
             "TTFT p50 ms | TTFT p99 ms | tokens/s | vs baseline |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in phases:
        op = ops.get(p["phase"])
        if op is None:
            op_s, changed = f"({p['seconds']:.0f} s steady)", ""
        elif op["rc"] == 0:
            op_s, changed = f"{op['seconds']:.1f}", str(op["changed"])
        else:
            op_s, changed = "FAILED" if op["rc"] is not None else "NOT RUN", "-"
        share = f"{p['tokens_per_s'] / base:.0%}" if base and p["sent"] else "-"
        tps = f"{p['tokens_per_s']:.0f}" if p["sent"] else "-"
        lines.append(f"| {p['phase']} | {op_s} | {changed} | {p['sent']} | {p['ok']} | "
                     f"{p['failed']} | {ms(p['p50_ms'])} | {ms(p['p99_ms'])} | "
                     f"{ms(p['ttft_p50_ms'])} | {ms(p['ttft_p99_ms'])} | "
                     f"{tps} | {share} |")
    return "\n".join(lines)


def header(result: dict[str, Any], args: argparse.Namespace, wall: float) -> str:
    load = os.getloadavg()[0]
    return (f"`bench/day2/run.py`, {time.strftime('%Y-%m-%d')}, {platform.machine()}, "
            f"{os.cpu_count()} cores, Python {platform.python_version()}; loopback "
            f"{SUBNET}.x, process runtime, emulated engines (vllm-ascend flavour, ITL "
            f"{float(EMU_ENV['PD_EMU_ITL_S']) * 1000:.0f} ms, --max-num-seqs {MAX_NUM_SEQS});"
            f" {args.concurrency} closed-loop streams of {args.max_tokens} tokens; wall "
            f"{wall:.0f} s; 1-minute load average after: {load:.1f}.")


METHOD = """\
Method: an emulated cluster on loopback (`bench/day2/run.py`; process runtime, local
connection, one address and one device per node): 2 one-node P instances, 2 one-node D
instances and a C host with the front door. The emulated engines have real latency (20 ms
between tokens, prefill 5 ms + 0.1 ms per prompt token) and 4 running slots each
(`--max-num-seqs 4`; the rest wait in the engine's queue), so every instance has a fixed
capacity and the load needs all of them. A closed-loop generator (`bench/day2/load.py`,
aiohttp, one connection per request) keeps 16 streaming `/v1/completions` requests of 32
tokens in flight through the front door for the whole run: each worker sends its next
request when the previous one ended, so the offered load stays constant while the
capacity changes. The operations are the real playbooks, run while the load goes on:
`site.yml` after adding a P and a D host to the inventory (scale-out), `site.yml -e
pd_drain_timeout=30` after removing them (scale-in), `restart.yml -e pd_restart_scope=P`
then `=D` (rolling restarts), with steady phases in between. A request counts in the
phase during which it started; it is ok only with HTTP 200, at least one token, no
`{"error": ...}` chunk and a final `data: [DONE]`. Capacity is the tokens of the ok
requests that started in the phase over the phase's seconds. Targets: no failed request
in any phase; during a roll, capacity >= baseline x (1 - 1/n) - 10 % of the baseline,
n = instances in the pool being rolled (2: one instance out at a time leaves half). Checks:
the scale-out leaves the PIDs of every existing unit unchanged (the front door reloads its
upstreams, it does not restart), the scale-in leaves nothing running on the removed hosts,
and a roll gives every unit of its pool new PIDs and no other unit."""


def write_out(result: dict[str, Any], md: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "day2.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (OUT / "day2.md").write_text(md)


def write_readme(md: str) -> None:
    text = README.read_text()
    section = f"{SECTION}\n\n{md.rstrip()}\n\n{METHOD}\n\nRerun: `.venv/bin/python " \
              "bench/day2/run.py --write-readme` (`--smoke`: short phases, 4 streams, " \
              "writes nothing; `--keep` leaves the cluster running).\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    old = pattern.search(text)
    if old and NOTES in old.group(0):
        section += "\n" + old.group(0)[old.group(0).index(NOTES):].rstrip() + "\n"
    if old:
        text = text[:old.start()] + section + ("\n" if old.end() < len(text) else "") \
            + text[old.end():]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    README.write_text(text)


async def cleanup(root: Path, logs: Path) -> None:
    """cleanup.yml over every host that was ever in the inventory."""
    run = Run(root=root, logs=logs)
    op = await run.playbook("cleanup", root / "inventory-all.yml", "cleanup.yml")
    if op["rc"] != 0:
        print(f"cleanup failed: see {op['log']}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--write-readme", action="store_true")
    ap.add_argument("--concurrency", type=int)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--keep", action="store_true", help="leave the cluster running")
    args = ap.parse_args()
    if args.concurrency is None:
        args.concurrency = 4 if args.smoke else 16
    if args.keep:
        root = OUT / "day2-cluster"
        if root.exists():
            sys.exit(f"{root} exists: remove that cluster first (cleanup.yml -i "
                     f"{root / 'inventory-all.yml'}), then the directory")
        root.mkdir(parents=True)
    else:
        root = Path(tempfile.mkdtemp(prefix="pd-bench-day2-"))
    logs = root / "playbook-logs" if args.smoke else OUT / "day2-logs"
    if logs.exists() and not args.smoke:
        shutil.rmtree(logs)
    logs.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    try:
        result = asyncio.run(bench(args, root, logs))
    finally:
        if not args.keep:
            asyncio.run(cleanup(root, logs))
    wall = time.monotonic() - start
    lines, good = evaluate(result, args.smoke)
    md = (f"{header(result, args, wall)}\n\n{table(result)}\n\n"
          + "\n".join(f"- {ln}" for ln in lines) + "\n")
    print("\n" + md, flush=True)
    if not good:
        for op in result["ops"]:
            if op["rc"] != 0 and op.get("log") and Path(op["log"]).exists():
                print(f"--- {op['phase']} ({op['log']}), last lines:\n"
                      + "\n".join(Path(op["log"]).read_text().splitlines()[-25:]))
    if not args.smoke:
        write_out(result, md)
        if args.write_readme:
            write_readme(md)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"cluster left running: .venv/bin/ansible-playbook -i "
              f"{root / 'inventory-all.yml'} cleanup.yml")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
