"""One DP rank's "engine core": scheduling, prefill, KV hand-off and token generation.

``RankEngine.execute(job)`` yields events (plain dicts, so they can cross the DP
link of internal data parallel unchanged):

  {"t": "start"}                               a running slot was granted
  {"t": "tok", "texts": [str, ...]}            generated tokens (one per inter-token
                                               step; all at once when that step is 0)
  {"t": "end", "finish": "length", "n": int, "cached": int, "kv": {...},
   "kv_transfer_params": {...} | None}         done
  {"t": "error", "status": int, "message": str, "kv": {...}}

A job is a dict: request_id, model, key, prompt_tokens, max_tokens, kv_params.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, AsyncIterator, Deque, Dict, Optional

from . import kvnet, textgen
from .args import EngineArgs
from .kvstore import BlockStore, KVError, build
from .metrics import Metrics
from .settings import Latency

log = logging.getLogger("pd_emu.engine")

Event = Dict[str, Any]


class QueueFull(Exception):
    """The waiting queue is at PD_EMU_MAX_WAITING."""


class RankEngine:
    """A DP rank hosted by this process."""

    def __init__(self, rank: int, args: EngineArgs, lat: Latency, metrics: Metrics,
                 kv_addr: Optional[tuple] = None) -> None:
        self.rank = rank
        self.args = args
        self.lat = lat
        self.metrics = metrics
        self.lv = metrics.lv(rank)
        self.kv = args.kv
        self.engine_id = args.rank_engine_id(rank) if self.kv else None
        self.kv_addr = kv_addr  # (host, port) advertised in prefill answers
        self.store: Optional[BlockStore] = None
        if self.kv is not None:
            self.store = BlockStore(lat.kv_lease_s, self._kv_changed)
        self.running = 0
        self.waiting: Deque[asyncio.Future] = deque()
        metrics.init_rank(rank)

    # -- load, for DP routing -------------------------------------------------
    def load(self) -> int:
        return self.running + len(self.waiting)

    # -- scheduling ------------------------------------------------------------
    async def _admit(self) -> None:
        if self.running < self.args.max_num_seqs and not self.waiting:
            self.running += 1
            self._gauges()
            return
        if self.lat.max_waiting and len(self.waiting) >= self.lat.max_waiting:
            raise QueueFull(f"waiting queue full ({self.lat.max_waiting} requests)")
        fut = asyncio.get_running_loop().create_future()
        self.waiting.append(fut)
        self._gauges()
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._release()  # the slot was granted just as we were cancelled
            else:
                try:
                    self.waiting.remove(fut)
                except ValueError:
                    pass
                self._gauges()
            raise

    def _release(self) -> None:
        self.running -= 1
        while self.waiting and self.running < self.args.max_num_seqs:
            fut = self.waiting.popleft()
            if not fut.done():
                self.running += 1
                fut.set_result(None)
        self._gauges()

    def _gauges(self) -> None:
        self.metrics.running.set(self.lv, self.running)
        self.metrics.waiting.set(self.lv, len(self.waiting))

    def _kv_changed(self, blocks: int, nbytes: int, expired: int) -> None:
        self.metrics.kv_held_blocks.set(self.lv, blocks)
        self.metrics.kv_held_bytes.set(self.lv, nbytes)
        if expired:
            self.metrics.kv_expired.inc(self.lv, expired)

    # -- the request -----------------------------------------------------------
    def mode(self, kvp: Optional[Dict[str, Any]]) -> str:
        """prefill (hold KV for a remote decode), pull (remote prefill) or local."""
        if not kvp or self.kv is None:
            return "local"
        if kvp.get("do_remote_decode") and self.kv.producer:
            return "prefill"
        if kvp.get("do_remote_prefill") and self.kv.consumer:
            return "pull"
        return "local"

    async def execute(self, job: Dict[str, Any]) -> AsyncIterator[Event]:
        mode = self.mode(job.get("kv_params"))
        await self._admit()
        try:
            yield {"t": "start"}
            kv_info: Dict[str, Any] = {}
            cached = 0
            first_wait = True  # wait one inter-token latency before the first token
            if mode == "pull":
                try:
                    res = await self._pull(job)
                    kv_info = {"pulled": True, "bytes": res.nbytes, "seconds": res.seconds}
                    cached = job["prompt_tokens"]
                except KVError as exc:
                    kv_info = {"failure": exc.cause, "message": str(exc)}
                    log.warning("rank %d request %s: KV pull failed (%s): %s; policy %s",
                                self.rank, job["request_id"], exc.cause, exc, self.kv.policy)
                    if self.kv.policy == "fail":
                        yield {"t": "error", "status": 500, "kv": kv_info,
                               "message": f"KV transfer failed ({exc.cause}): {exc}"}
                        return
                    kv_info["recomputed"] = True
                    await self._prefill(job["prompt_tokens"])
                    first_wait = False
            else:
                await self._prefill(job["prompt_tokens"])
                first_wait = False
            toks = textgen.tokens(job["model"], job["key"], 0, job["max_tokens"])
            n = 0
            if self.lat.itl(self.running) <= 0:
                # no inter-token time: every token is ready at once, deliver them together
                n = len(toks)
                yield {"t": "tok", "texts": toks, "last": True}  # "end" follows at once
            for tok in toks[n:]:
                if n or first_wait:
                    delay = self.lat.itl(self.running)
                    if delay > 0:
                        await asyncio.sleep(delay)
                n += 1
                yield {"t": "tok", "texts": [tok]}
            end: Event = {"t": "end", "finish": "length", "n": n, "cached": cached,
                          "kv": kv_info, "kv_transfer_params": None}
            if mode == "prefill":
                end["kv_transfer_params"] = self._hold(job)
            yield end
        finally:
            self._release()

    async def _prefill(self, prompt_tokens: int) -> None:
        delay = self.lat.prefill_s(prompt_tokens, self.running)
        if delay > 0:
            await asyncio.sleep(delay)

    async def _pull(self, job: Dict[str, Any]) -> kvnet.PullResult:
        assert self.engine_id is not None
        return await kvnet.pull(job["kv_params"], self.engine_id, job["model"], job["key"],
                                job["prompt_tokens"], self.lat.kv_timeout_s,
                                self.lat.transfer_s)

    def _hold(self, job: Dict[str, Any]) -> Dict[str, Any]:
        assert self.store is not None and self.kv_addr is not None
        blocks, tokens = build(job["model"], job["key"], job["prompt_tokens"],
                               self.lat.kv_block_tokens, self.lat.kv_bytes_per_token)
        ids = self.store.hold(job["request_id"], blocks, tokens)
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_engine_id": self.engine_id,
            "remote_block_ids": ids,
            "remote_host": self.kv_addr[0],
            "remote_port": self.kv_addr[1],
            "remote_request_id": job["request_id"],
            "tp_size": self.args.tp,
        }
