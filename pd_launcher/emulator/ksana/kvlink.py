"""The KV hand-off of the KsanaLLM node: the prefill PUSHES a request's KV to the
decode's ``coordinator_addr`` (where the real engine binds its ZMQ socket), tagged with
the router's ``kv-comm-request-id``; the decode waits for it in an inbox.

Frames are kvnet's (``!4sBIII`` = magic ``PDKV``, type, header length, payload length,
CRC32 of the payload; a JSON header; the payload), with two types of their own:

  prefill -> decode  PUSH {request_id, comm_key, sender, tokens, sizes} + payload
  decode -> prefill  ACK  {ok, message}

The payload is the prompt's blocks as kvstore builds them (PD_EMU_KV_BLOCK_TOKENS,
PD_EMU_KV_BYTES_PER_TOKEN); the decode checks the checksum and recomputes the expected
bytes from its own copy of the request (kvnet's verification), so KV of another prompt
or a flipped byte is detected.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from .. import kvnet
from ..kvstore import KVError

log = logging.getLogger("pd_emu.ksana")

PUSH, ACK = 16, 17


@dataclass
class Arrival:
    """KV of one request as it reached this node's coordinator."""

    request_id: str
    comm_key: str
    sender: str
    header: Dict[str, Any]
    payload: bytes
    crc_ok: bool
    at: float = field(default_factory=time.monotonic)

    @property
    def prompt_tokens(self) -> int:
        return sum(int(t) for t in self.header.get("tokens", []))


class Inbox:
    """Arrived KV by request id; a waiter may come before or after its KV. Unclaimed KV
    is dropped after ``lease_s`` (PD_EMU_KV_LEASE_S)."""

    def __init__(self, lease_s: float) -> None:
        self.lease_s = lease_s
        self.items: Dict[str, Arrival] = {}
        self.waiters: Dict[str, asyncio.Future] = {}
        self.received = 0
        self.expired = 0

    def put(self, item: Arrival) -> None:
        self.received += 1
        fut = self.waiters.pop(item.request_id, None)
        if fut is not None and not fut.done():
            fut.set_result(item)
            return
        if item.request_id in self.items:
            log.warning("KV of request %s arrived twice (from %s); keeping the newer",
                        item.request_id, item.sender)
        self.items[item.request_id] = item
        if self.lease_s > 0:
            asyncio.get_running_loop().call_later(self.lease_s, self._expire, item)

    def _expire(self, item: Arrival) -> None:
        if self.items.get(item.request_id) is item:
            del self.items[item.request_id]
            self.expired += 1
            log.warning("KV of request %s from %s expired unclaimed after %gs (no decode "
                        "request with that kv-comm-request-id)", item.request_id, item.sender,
                        self.lease_s)

    async def take(self, request_id: str, timeout_s: float) -> Arrival:
        """The KV of ``request_id``; KVError(timeout) when it does not come in time."""
        item = self.items.pop(request_id, None)
        if item is not None:
            return item
        if request_id in self.waiters:
            raise KVError("invalid_params", f"another decode request already waits for "
                          f"kv-comm-request-id {request_id}")
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self.waiters[request_id] = fut
        try:
            return await asyncio.wait_for(fut, timeout_s)
        except asyncio.TimeoutError:
            raise KVError("timeout", f"the KV of kv-comm-request-id {request_id} did not "
                          f"arrive from the prefill within {timeout_s:g}s") from None
        finally:
            if self.waiters.get(request_id) is fut:
                del self.waiters[request_id]


class Coordinator:
    """The TCP listener on ``coordinator_addr`` (ZMQ's place in the real engine)."""

    def __init__(self, inbox: Inbox, timeout_s: float) -> None:
        self.inbox = inbox
        self.timeout_s = timeout_s
        self.server: Optional[asyncio.AbstractServer] = None

    async def start(self, sock: socket.socket) -> None:
        self.server = await asyncio.start_server(self._handle, sock=sock)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(self._serve(reader, writer), self.timeout_s)
        except (KVError, asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError,
                ValueError) as exc:
            log.warning("coordinator: a KV push broke: %s", exc or type(exc).__name__)
        finally:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        kind, hdr, payload, crc_ok = await kvnet.read_frame(reader)
        if kind != PUSH:
            await kvnet._send(writer, ACK, {"ok": False, "message": f"expected PUSH, got "
                                            f"frame type {kind}"})
            return
        rid = str(hdr.get("request_id") or "")
        if not rid:
            await kvnet._send(writer, ACK, {"ok": False, "message": "PUSH without request_id"})
            return
        self.inbox.put(Arrival(rid, str(hdr.get("comm_key", "")), str(hdr.get("sender", "")),
                               hdr, payload, crc_ok))
        await kvnet._send(writer, ACK, {"ok": True, "message": "stored"})


async def push(addr: str, request_id: str, comm_key: str, sender: str, blocks: List[bytes],
               tokens: List[int], timeout_s: float, min_seconds: Callable[[int], float],
               corrupt: bool = False) -> int:
    """Send a request's KV to a decode coordinator (``ip:port``); returns the bytes sent.
    The transfer takes at least ``min_seconds(bytes)`` (PD_EMU_KV_BANDWIDTH_MBPS).
    Raises KVError(connect_failed | timeout | refused | protocol_error)."""
    host, _, port = addr.rpartition(":")
    payload = b"".join(blocks)
    crc = zlib.crc32(payload)
    if corrupt and payload:
        flipped = bytearray(payload)
        flipped[len(flipped) // 2] ^= 0xFF
        payload = bytes(flipped)
    start = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"),
                                                                        int(port)), timeout_s)
    except asyncio.TimeoutError:
        raise KVError("timeout", f"connect to the decode coordinator {addr} timed out") from None
    except (OSError, ValueError) as exc:
        raise KVError("connect_failed", f"cannot connect to the decode coordinator {addr}: "
                      f"{_why(exc)}") from None
    try:
        hdr = {"request_id": request_id, "comm_key": comm_key, "sender": sender,
               "tokens": tokens, "sizes": [len(b) for b in blocks]}
        return await asyncio.wait_for(_exchange(reader, writer, hdr, payload, crc, start,
                                                min_seconds, addr), timeout_s)
    except asyncio.TimeoutError:
        raise KVError("timeout", f"KV push to {addr} timed out after {timeout_s:g}s") from None
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise KVError("protocol_error", f"KV push to {addr} broke: "
                      f"{exc or type(exc).__name__}") from None
    finally:
        writer.close()


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    hdr: Dict[str, Any], payload: bytes, crc: int, start: float,
                    min_seconds: Callable[[int], float], addr: str) -> int:
    rest = min_seconds(len(payload)) - (time.monotonic() - start)
    if rest > 0:
        await asyncio.sleep(rest)
    await kvnet._send(writer, PUSH, hdr, payload, crc)
    kind, ack, _, _ = await kvnet.read_frame(reader)
    if kind != ACK or not ack.get("ok"):
        raise KVError("refused", f"the decode coordinator {addr} refused the KV: "
                      f"{ack.get('message', 'no reason')}")
    return len(payload)


def _why(exc: BaseException) -> str:
    errno = getattr(exc, "errno", None)
    return os.strerror(errno) if errno else str(exc)
