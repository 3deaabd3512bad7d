"""Constant streaming load through a front door, labelled by phase (bench/day2).

    gen = LoadGen("http://127.0.77.10:7000", concurrency=16, max_tokens=32, model="demo")
    await gen.start()
    gen.phase("baseline"); await asyncio.sleep(20)
    gen.phase("scale-out"); ...                # run an operation while the load goes on
    await gen.stop()
    print(format_table(gen.summary()))

Closed loop: CONCURRENCY workers, each sends its next streaming `/v1/completions`
request as soon as the previous one ended, so the offered load (requests in flight) is
constant whatever the cluster does. Each request is recorded (`Record`) with the phase
that was current when it STARTED; a request counts in that phase even if it ends in the
next one.

A request is ok when the answer is HTTP 200, the SSE stream ends with `data: [DONE]`,
no chunk is an `{"error": ...}` object and at least one token came. Anything else (a
status, an error chunk, a stream cut short, a connection error, the client timeout) is a
failure with its error text.

Each request opens its own connection by default (`keepalive=False`): a front door that
reloads closes its idle keep-alive connections, and a POST sent on such a connection
just as it closes fails on the client before the server saw it; a real client retries
that, a bench counting failures should not count it against the cluster. After a failed
request a worker pauses `fail_pause_s` (0.1 s) so that a front door answering errors at
once is not hammered in a tight loop (the failure is counted either way).
"""
from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp

DEFAULT_PROMPT = ("Explain prefill/decode disaggregation to an operator who has to keep a "
                  "cluster serving while it scales out, scales in and restarts, in a few "
                  "plain sentences:")


@dataclass
class Record:
    """One request. Times are seconds since the generator started (time.monotonic)."""

    phase: str
    worker: int
    t_start: float
    t_first_token: float | None = None
    t_end: float = 0.0
    status: int | None = None  # HTTP status; None: no answer (connection error, timeout)
    ok: bool = False
    tokens: int = 0  # completion tokens (usage if the stream had it, else text chunks)
    error: str = ""

    @property
    def latency(self) -> float:
        return self.t_end - self.t_start

    @property
    def ttft(self) -> float | None:
        return None if self.t_first_token is None else self.t_first_token - self.t_start


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100) of VALUES; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class LoadGen:
    url: str  # the front door, "http://host:port" (or the full /v1/completions URL)
    api_key: str | None = None
    concurrency: int = 8
    max_tokens: int = 32
    prompt: str = DEFAULT_PROMPT
    model: str = "demo"
    timeout_s: float = 120.0  # per request, whole stream
    keepalive: bool = False
    fail_pause_s: float = 0.1
    records: list[Record] = field(default_factory=list)
    phases: list[tuple[str, float]] = field(default_factory=list)  # (name, start)

    def __post_init__(self) -> None:
        base = self.url.rstrip("/")
        self.endpoint = base if base.endswith("/v1/completions") else base + "/v1/completions"
        self._t0 = time.monotonic()
        self._stopping: asyncio.Event | None = None  # created in start() (needs a loop)
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self._current = "start"
        self._t_stop: float | None = None

    # -- control -------------------------------------------------------------------
    def now(self) -> float:
        return time.monotonic() - self._t0

    def phase(self, name: str) -> None:
        """Label every request started from now on with NAME."""
        self._current = name
        self.phases.append((name, self.now()))

    @property
    def current_phase(self) -> str:
        return self._current

    async def start(self) -> None:
        if self._tasks:
            raise RuntimeError("already started")
        self._stopping = asyncio.Event()
        self._t0 = time.monotonic()
        self.phases = [(self._current, 0.0)]  # the label set before start begins at 0
        connector = aiohttp.TCPConnector(limit=0, force_close=not self.keepalive)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.timeout_s, sock_connect=10))
        self._tasks = [asyncio.create_task(self._worker(i), name=f"loadgen-{i}")
                       for i in range(self.concurrency)]

    async def stop(self, wait_s: float | None = None) -> None:
        """Stop sending; requests in flight finish (or hit the client timeout, or are
        cancelled after WAIT_S seconds and recorded as failed)."""
        if self._stopping is None or not self._tasks:
            return
        self._stopping.set()
        self._t_stop = self.now()
        done, pending = await asyncio.wait(self._tasks, timeout=wait_s or self.timeout_s + 5)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        for task in done:
            if task.exception() is not None:  # a bug in the worker, not a request failure
                raise task.exception()  # type: ignore[misc]
        self._tasks = []
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- the workers -----------------------------------------------------------------
    async def _worker(self, index: int) -> None:
        assert self._stopping is not None
        while not self._stopping.is_set():
            rec = Record(phase=self._current, worker=index, t_start=self.now())
            self.records.append(rec)
            try:
                await self._one(rec)
            except asyncio.CancelledError:
                rec.error = rec.error or "cancelled at stop"
                rec.t_end = self.now()
                raise
            if not rec.ok and self.fail_pause_s > 0:
                try:
                    await asyncio.wait_for(self._stopping.wait(), self.fail_pause_s)
                except asyncio.TimeoutError:
                    pass

    def _body(self) -> dict[str, Any]:
        return {"model": self.model, "prompt": self.prompt, "max_tokens": self.max_tokens,
                "stream": True, "stream_options": {"include_usage": True}}

    async def _one(self, rec: Record) -> None:
        assert self._session is not None
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        chunks = 0
        usage_tokens: int | None = None
        done = False
        try:
            async with self._session.post(self.endpoint, json=self._body(),
                                          headers=headers) as resp:
                rec.status = resp.status
                if resp.status != 200:
                    text = (await resp.read())[:300].decode(errors="replace")
                    rec.error = f"HTTP {resp.status}: {' '.join(text.split())}"
                    return
                async for raw in resp.content:
                    line = raw.decode(errors="replace").strip()
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        continue
                    if done:
                        rec.error = rec.error or "data after [DONE]"
                        continue
                    try:
                        event = json.loads(data)
                    except ValueError:
                        rec.error = rec.error or f"bad SSE data: {data[:120]}"
                        continue
                    if isinstance(event, dict) and event.get("error") is not None:
                        err = event["error"]
                        msg = err.get("message", err) if isinstance(err, dict) else err
                        rec.error = rec.error or f"error chunk: {str(msg)[:200]}"
                        continue
                    for choice in event.get("choices") or []:
                        if choice.get("text"):
                            chunks += 1
                            if rec.t_first_token is None:
                                rec.t_first_token = self.now()
                    usage = event.get("usage")
                    if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
                        usage_tokens = int(usage["completion_tokens"])
        except asyncio.TimeoutError:
            rec.error = rec.error or f"client timeout after {self.timeout_s:.0f} s"
        except aiohttp.ClientError as exc:
            rec.error = rec.error or f"{type(exc).__name__}: {exc}"
        finally:
            rec.t_end = self.now()
        rec.tokens = usage_tokens if usage_tokens is not None else chunks
        if not rec.error and not done:
            rec.error = "stream ended without data: [DONE]"
        if not rec.error and chunks == 0:
            rec.error = "no token in the stream"
        rec.ok = not rec.error

    # -- results -------------------------------------------------------------------
    def phase_windows(self) -> list[tuple[str, float, float]]:
        """(name, start, end) of each phase, in order; the last ends at stop (or now)."""
        end = self._t_stop if self._t_stop is not None else self.now()
        out = []
        for i, (name, start) in enumerate(self.phases):
            stop = self.phases[i + 1][1] if i + 1 < len(self.phases) else end
            out.append((name, start, stop))
        return out

    def summary(self) -> list[dict[str, Any]]:
        """Per phase (in order; a name used twice is one row): its wall seconds, sent /
        ok / failed, p50 / p99 latency and TTFT of the ok requests (ms), the completed
        tokens per second (tokens of the ok requests that started in the phase, over the
        phase's seconds: the capacity the cluster delivered under this constant load),
        and up to 5 distinct error texts."""
        rows: dict[str, dict[str, Any]] = {}
        starts: dict[str, float] = {}
        for name, start, stop in self.phase_windows():
            row = rows.setdefault(name, {"phase": name, "seconds": 0.0})
            row["seconds"] += stop - start
            starts.setdefault(name, start)
        by_phase: dict[str, list[Record]] = {}
        for rec in self.records:
            if rec.t_end:  # finished (a request cancelled at stop has its t_end too)
                by_phase.setdefault(rec.phase, []).append(rec)
        for name, row in rows.items():
            recs = by_phase.get(name, [])
            good = [r for r in recs if r.ok]
            bad = [r for r in recs if not r.ok]
            lat = [r.latency * 1000 for r in good]
            ttft = [r.ttft * 1000 for r in good if r.ttft is not None]
            tokens = sum(r.tokens for r in good)
            errors: dict[str, int] = {}
            for r in bad:
                errors[r.error] = errors.get(r.error, 0) + 1
            row.update({
                "sent": len(recs), "ok": len(good), "failed": len(bad),
                "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99),
                "ttft_p50_ms": percentile(ttft, 50), "ttft_p99_ms": percentile(ttft, 99),
                "tokens": tokens,
                "tokens_per_s": tokens / row["seconds"] if row["seconds"] > 0 else 0.0,
                "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5]),
                # when the failed requests started, in seconds after the phase began
                "failed_from_s": min(r.t_start for r in bad) - starts[name] if bad else None,
                "failed_to_s": max(r.t_start for r in bad) - starts[name] if bad else None,
            })
        return list(rows.values())

    def records_json(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.records]


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| phase | s | sent | ok | failed | p50 ms | p99 ms | TTFT p50 ms | TTFT p99 ms "
             "| tokens/s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['phase']} | {r['seconds']:.1f} | {r['sent']} | {r['ok']} | "
                     f"{r['failed']} | {_ms(r['p50_ms'])} | {_ms(r['p99_ms'])} | "
                     f"{_ms(r['ttft_p50_ms'])} | {_ms(r['ttft_p99_ms'])} | "
                     f"{r['tokens_per_s']:.0f} |")
    return "\n".join(lines)


async def _main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description="constant streaming load for N seconds")
    ap.add_argument("url")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--api-key")
    args = ap.parse_args()
    gen = LoadGen(args.url, api_key=args.api_key, concurrency=args.concurrency,
                  max_tokens=args.max_tokens, model=args.model)
    gen.phase("load")
    await gen.start()
    await asyncio.sleep(args.seconds)
    await gen.stop()
    print(format_table(gen.summary()))
    for row in gen.summary():
        for err, n in row["errors"].items():
            print(f"{row['phase']}: {n} x {err}")


if __name__ == "__main__":
    asyncio.run(_main())
