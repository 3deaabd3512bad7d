"""The prompt's "KV": bytes derived from (model, prompt), held under block ids for a lease."""
from __future__ import annotations

import asyncio
import hashlib
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

_TOMBSTONES = 65536


class KVError(Exception):
    """A failed KV transfer. ``cause`` is a short code used in metrics and messages:
    connect_failed, timeout, invalid_params, same_engine, engine_mismatch,
    unknown_blocks, expired_blocks, corrupted, prompt_mismatch, protocol_error."""

    def __init__(self, cause: str, message: str) -> None:
        super().__init__(message)
        self.cause = cause


def block_bytes(model: str, key: str, index: int, nbytes: int) -> bytes:
    """Content of block ``index`` of the prompt (model, key): ``nbytes`` derived bytes."""
    return hashlib.shake_256(f"kv\0{model}\0{key}\0{index}".encode()).digest(nbytes)


def layout(prompt_tokens: int, block_tokens: int) -> List[int]:
    """Tokens in each block of a prompt."""
    full, rest = divmod(prompt_tokens, block_tokens)
    return [block_tokens] * full + ([rest] if rest else [])


def build(model: str, key: str, prompt_tokens: int, block_tokens: int,
          bytes_per_token: int) -> Tuple[List[bytes], List[int]]:
    """(block contents, tokens per block) of a prompt."""
    toks = layout(prompt_tokens, block_tokens)
    return [block_bytes(model, key, i, n * bytes_per_token) for i, n in enumerate(toks)], toks


@dataclass
class Held:
    request_id: str
    block_ids: List[int]
    blocks: List[bytes]
    tokens: List[int]
    nbytes: int
    timer: Optional[asyncio.TimerHandle] = field(default=None, repr=False)


class BlockStore:
    """Blocks of prefilled prompts waiting for a decode engine to pull them.

    Each hold gets fresh block ids and a lease timer (no polling); when the lease
    ends the blocks are freed and their ids remembered as expired, so a late pull
    is told "expired" rather than "unknown".
    """

    def __init__(self, lease_s: float, on_change: Callable[[int, int, int], None]) -> None:
        self.lease_s = lease_s
        self.on_change = on_change  # (held blocks, held bytes, newly expired blocks)
        self._next = random.randint(1, 1 << 30)
        self._by_block: Dict[int, Held] = {}
        self._dead: OrderedDict = OrderedDict()  # block id -> "expired" | "freed"
        self.held_blocks = 0
        self.held_bytes = 0

    def hold(self, request_id: str, blocks: List[bytes], tokens: List[int]) -> List[int]:
        ids = list(range(self._next, self._next + len(blocks)))
        self._next += len(blocks)
        held = Held(request_id, ids, blocks, tokens, sum(len(b) for b in blocks))
        for i in ids:
            self._by_block[i] = held
        self.held_blocks += len(ids)
        self.held_bytes += held.nbytes
        if self.lease_s > 0:
            held.timer = asyncio.get_running_loop().call_later(self.lease_s, self._expire, held)
        self.on_change(self.held_blocks, self.held_bytes, 0)
        return ids

    def lookup(self, block_ids: List[int]) -> Tuple[List[bytes], List[int]]:
        """Contents and token counts of ``block_ids``; KVError when one is not held."""
        out_b: List[bytes] = []
        out_t: List[int] = []
        for bid in block_ids:
            held = self._by_block.get(bid)
            if held is None:
                state = self._dead.get(bid)
                if state == "expired":
                    raise KVError("expired_blocks",
                                  f"block {bid} expired (lease {self.lease_s:g}s)")
                why = "already freed" if state else "unknown id"
                raise KVError("unknown_blocks", f"block {bid} is not held ({why})")
            pos = held.block_ids.index(bid)
            out_b.append(held.blocks[pos])
            out_t.append(held.tokens[pos])
        return out_b, out_t

    def free(self, block_ids: List[int], reason: str = "freed") -> int:
        """Free held blocks (whole holds whose blocks are listed); returns blocks freed."""
        freed = 0
        for bid in block_ids:
            held = self._by_block.get(bid)
            if held is not None:
                freed += self._drop(held, reason)
        if freed:
            self.on_change(self.held_blocks, self.held_bytes,
                           freed if reason == "expired" else 0)
        return freed

    def free_all(self) -> int:
        holds = {id(h): h for h in self._by_block.values()}
        n = sum(self._drop(h, "freed") for h in holds.values())
        self.on_change(self.held_blocks, self.held_bytes, 0)
        return n

    def _expire(self, held: Held) -> None:
        held.timer = None
        if self._by_block.get(held.block_ids[0]) is held:
            self.free(held.block_ids, "expired")

    def _drop(self, held: Held, reason: str) -> int:
        if held.timer is not None:
            held.timer.cancel()
            held.timer = None
        n = 0
        for bid in held.block_ids:
            if self._by_block.pop(bid, None) is not None:
                n += 1
            self._dead[bid] = reason
        while len(self._dead) > _TOMBSTONES:
            self._dead.popitem(last=False)
        self.held_blocks -= n
        self.held_bytes -= held.nbytes if n else 0
        return n
