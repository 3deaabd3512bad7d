#!/usr/bin/env python3
"""The front door at scale: render, `nginx -t` and a graceful reload with streams in
flight, for plans of N prefill + N decode upstreams (external DP: one upstream per
rank).

    .venv/bin/python bench/proxy_scale/run.py [--sizes 16,64,256] [--streams 32]
                                              [--smoke] [--write-readme]

Per size: proxy_unit() render time, the bytes of nginx.conf + pd_upstreams.conf, and
`nginx -t` time. At the largest size, nginx and the proxy agent run as the launcher
runs them (tests/proxy/harness.py) in front of N + N live stand-in engines (aiohttp,
one loop, 127.0.71.x prefill / 127.0.72.x decode), S streaming completions are
opened, nginx gets SIGHUP half-way through them, and the run measures
  reload: SIGHUP -> the first worker of the new generation exists,
  drain:  SIGHUP -> the last old worker has exited (it finishes its streams first),
and checks every stream arrived whole (all tokens, then [DONE]) and a request right
after the reload is answered. Exit status 1 if any stream was cut.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from pd_deploy.proxy_config import proxy_unit  # noqa: E402
from tests.proxy.harness import (  # noqa: E402
    NGINX,
    Backend,
    Proxy,
    _Loop,
    http,
    open_stream,
    read_chunk,
    sse_events,
)

README = REPO / "bench" / "README.md"
OUT = REPO / "bench" / "out"
SECTION = "## Front door at scale"
TOKENS = 30
CHUNK_DELAY_S = 0.1


def addresses(n: int, subnet: str, base_port: int = 20000) -> list[str]:
    """n upstreams, 8 ranks per host (external DP), hosts subnet.1, subnet.2, ..."""
    return [f"{subnet}.{1 + i // 8}:{base_port + i % 8}" for i in range(n)]


def block(prefill: list[str], decode: list[str]) -> dict:
    return {"listen": "127.0.1.101:7000", "prefill": prefill, "decode": decode,
            "served_model_name": "demo-model", "options": {"active_health": False}}


def render_point(n: int, tmp: Path) -> dict:
    dirs = {k: str(tmp / f"n{n}" / k) for k in ("state", "log", "run")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    t0 = time.perf_counter()
    unit = proxy_unit(block(addresses(n, "127.0.71"), addresses(n, "127.0.72")), dirs,
                      nginx_bin=NGINX or "nginx")
    render_s = time.perf_counter() - t0
    size = 0
    for f in unit["files"]:
        Path(f["path"]).write_text(f["content"])
        if f["path"].endswith((".conf",)):
            size += len(f["content"].encode())
    t0 = time.perf_counter()
    res = subprocess.run(unit["pre_start"][0], capture_output=True, text=True)
    test_s = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"nginx -t failed for {n}+{n} upstreams:\n{res.stderr}")
    return {"upstreams": 2 * n, "render_ms": round(render_s * 1000, 1),
            "conf_bytes": size, "nginx_t_ms": round(test_s * 1000, 1)}


def workers(master: int) -> set[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(master)],
                         capture_output=True, text=True).stdout.split()
    return {int(x) for x in out}


def one_stream(url: str, results: list, i: int, started: threading.Barrier) -> None:
    try:
        s, f, status, _ = open_stream(url + "/v1/completions", {
            "model": "demo-model", "prompt": f"stream {i} " * 8, "max_tokens": TOKENS,
            "stream": True}, timeout=60)
        started.wait(30)
        data = b""
        with s:
            while chunk := read_chunk(f):
                data += chunk
        events = sse_events(data)
        texts = [e for e in events if isinstance(e, dict) and e.get("choices")]
        results[i] = (b"200" in status and len(texts) == TOKENS and events[-1] == "[DONE]",
                      len(texts))
    except Exception as exc:  # a cut stream is a result, not a crash of the bench
        results[i] = (False, repr(exc))


def reload_under_load(n: int, streams: int, tmp: Path) -> dict:
    loop = _Loop()
    backends: list[Backend] = []
    try:
        for i in range(n):
            backends.append(Backend(loop, f"127.0.71.{1 + i // 8}", "prefill").start())
            d = Backend(loop, f"127.0.72.{1 + i // 8}", "decode").start()
            d.chunk_delay = CHUNK_DELAY_S
            backends.append(d)
        prefill = [b.addr for b in backends if b.role == "prefill"]
        decode = [b.addr for b in backends if b.role == "decode"]
        px = Proxy(tmp / "live", prefill, decode, {"worker_processes": 2})
        try:
            master = px.procs["proxy"].pid
            results: list = [None] * streams
            started = threading.Barrier(streams + 1)
            threads = [threading.Thread(target=one_stream, args=(px.url, results, i, started))
                       for i in range(streams)]
            for t in threads:
                t.start()
            started.wait(60)
            time.sleep(TOKENS * CHUNK_DELAY_S / 3)   # every stream is mid-way
            old = workers(master)
            t0 = time.monotonic()
            os.kill(master, signal.SIGHUP)
            reload_s = drain_s = None
            while time.monotonic() - t0 < 60:
                now = workers(master)
                if reload_s is None and now - old:
                    reload_s = time.monotonic() - t0
                if not now & old:
                    drain_s = time.monotonic() - t0
                    break
                time.sleep(0.005)
            for t in threads:
                t.join(60)
            after, _, body = http("POST", px.url + "/v1/completions",
                                  {"model": "demo-model", "prompt": "after", "max_tokens": 3})
        finally:
            px.stop()
    finally:
        for b in backends:
            b.stop()
        loop.close()
    whole = sum(1 for r in results if r and r[0])
    return {"upstreams": 2 * n, "streams": streams, "whole": whole,
            "cut": [r for r in results if not (r and r[0])],
            "reload_ms": round(reload_s * 1000, 1) if reload_s is not None else None,
            "drain_s": round(drain_s, 2) if drain_s is not None else None,
            "after_reload_status": after}


def markdown(points: list[dict], live: dict) -> str:
    lines = [f"`bench/proxy_scale/run.py`; nginx {nginx_version()}, {platform.machine()}, "
             f"{os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}.", "",
             "| upstreams (P+D) | render ms | nginx.conf + upstreams bytes | bytes/upstream "
             "| `nginx -t` ms |", "|---:|---:|---:|---:|---:|"]
    for p in points:
        lines.append(f"| {p['upstreams']} | {p['render_ms']} | {p['conf_bytes']} | "
                     f"{p['conf_bytes'] / p['upstreams']:.0f} | {p['nginx_t_ms']} |")
    if len(points) >= 3:
        slopes = [(b["conf_bytes"] - a["conf_bytes"]) / (b["upstreams"] - a["upstreams"])
                  for a, b in zip(points, points[1:])]
        lines += ["", "Bytes per added upstream between successive sizes: "
                  + ", ".join(f"{s:.1f}" for s in slopes) + " (linear: constant)."]
    lines += ["", f"Reload with {live['streams']} streams in flight ({TOKENS} tokens, "
              f"{CHUNK_DELAY_S * 1000:.0f} ms apart) over {live['upstreams']} live upstreams, "
              f"2 workers: new workers after **{live['reload_ms']} ms**, old workers gone "
              f"after {live['drain_s']} s (they finish their streams), "
              f"**{live['whole']}/{live['streams']} streams whole**, next request "
              f"{live['after_reload_status']}."]
    return "\n".join(lines) + "\n"


def nginx_version() -> str:
    res = subprocess.run([NGINX or "nginx", "-v"], capture_output=True, text=True)
    m = re.search(r"nginx/(\S+)", res.stderr)
    return m.group(1) if m else "?"


def write_readme(md: str) -> None:
    text = README.read_text()
    body = f"{SECTION}\n\n{md}"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = (pattern.sub(lambda _: body + "\n", text) if pattern.search(text)
            else text.rstrip("\n") + "\n\n" + body)
    README.write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="16,32,64,128,256", help="upstreams per pool")
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3, help="render / nginx -t runs (median)")
    ap.add_argument("--smoke", action="store_true",
                    help="8,16,32 upstreams, 4 streams, nothing written (CI)")
    ap.add_argument("--write-readme", action="store_true")
    args = ap.parse_args(argv)
    if NGINX is None:
        raise SystemExit("nginx is not installed (make deps)")
    sizes = [8, 16, 32] if args.smoke else [int(x) for x in args.sizes.split(",")]
    streams = 4 if args.smoke else args.streams
    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        points = []
        for n in sizes:
            runs = [render_point(n, tmp / f"r{k}") for k in range(args.repeat)]
            points.append({**runs[0],
                           "render_ms": statistics.median(r["render_ms"] for r in runs),
                           "nginx_t_ms": statistics.median(r["nginx_t_ms"] for r in runs)})
        live = reload_under_load(sizes[-1], streams, tmp)
    md = markdown(points, live)
    print(md)
    if args.smoke:      # a smoke run (CI) leaves the recorded figures alone
        return 0 if live["whole"] == streams and live["after_reload_status"] == 200 else 1
    OUT.mkdir(exist_ok=True)
    (OUT / "proxy_scale.json").write_text(json.dumps({"points": points, "live": live},
                                                     indent=1) + "\n")
    if args.write_readme:
        write_readme(md)
    return 0 if live["whole"] == streams and live["after_reload_status"] == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
