"""KV transfer over TCP: a framed binary protocol with a CRC32 checksum.

Frame: ``!4sBIII`` = magic ``PDKV``, type, header length, payload length, CRC32
of the payload; then the header (UTF-8 JSON) and the payload.

Exchange (one pull per connection), decode side = client:
  PULL  {engine_id, request_id, block_ids, requester}          ->
                                                <- BLOCKS {block_ids, tokens, sizes} + payload
                                                   or ERROR {cause, message}
  FREE  {block_ids, ok}                                         ->
                                                <- FREED {freed}
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import time
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from .kvstore import BlockStore, KVError, block_bytes

MAGIC = b"PDKV"
_HDR = struct.Struct("!4sBIII")
PULL, BLOCKS, ERROR, FREE, FREED = 1, 2, 3, 4, 5
MAX_HEADER = 1 << 20


def encode(kind: int, header: Dict[str, Any], payload: bytes = b"",
           crc: Optional[int] = None) -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    c = zlib.crc32(payload) if crc is None else crc
    return _HDR.pack(MAGIC, kind, len(h), len(payload), c) + h


async def read_frame(reader: asyncio.StreamReader) -> Tuple[int, Dict[str, Any], bytes, bool]:
    """(type, header, payload, checksum ok). Raises KVError(protocol_error)."""
    raw = await reader.readexactly(_HDR.size)
    magic, kind, hlen, plen, crc = _HDR.unpack(raw)
    if magic != MAGIC or hlen > MAX_HEADER:
        raise KVError("protocol_error", f"not a KV frame (magic {magic!r})")
    header = json.loads((await reader.readexactly(hlen)).decode())
    payload = await reader.readexactly(plen) if plen else b""
    return kind, header, payload, zlib.crc32(payload) == crc


async def _send(writer: asyncio.StreamWriter, kind: int, header: Dict[str, Any],
                payload: bytes = b"", crc: Optional[int] = None) -> None:
    writer.write(encode(kind, header, payload, crc))
    if payload:
        writer.write(payload)
    await writer.drain()


class KVServer:
    """The KV listener of one DP rank (the port the real connector would use)."""

    def __init__(self, rank: int, engine_id: str, store: BlockStore, timeout_s: float,
                 corrupt: Callable[[], bool], record: Callable[[str], None],
                 cut: Optional[Callable[[], bool]] = None) -> None:
        self.rank, self.engine_id, self.store = rank, engine_id, store
        self.timeout_s = timeout_s
        self.corrupt = corrupt  # fault injection: flip a byte of this pull?
        self.cut = cut  # fault injection: cut this pull's connection at once?
        self.record = record  # outcome -> metrics
        self.server: Optional[asyncio.AbstractServer] = None
        self.active = 0

    async def start(self, sock: socket.socket) -> None:
        self.server = await asyncio.start_server(self._handle, sock=sock)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.active += 1
        try:
            if self.cut is not None and self.cut():
                # the P->D link is cut: no byte answered, the connection dropped (the
                # decode's pull fails with protocol_error); the blocks stay held
                self.record("cut")
                writer.transport.abort()
                return
            await asyncio.wait_for(self._serve(reader, writer), self.timeout_s)
        except KVError as exc:
            self.record(exc.cause)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, ValueError,
                asyncio.CancelledError):
            self.record("aborted")
        finally:
            self.active -= 1
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        kind, hdr, _, _ = await read_frame(reader)
        if kind != PULL:
            raise KVError("protocol_error", "expected PULL")
        block_ids = hdr.get("block_ids")
        try:
            if hdr.get("engine_id") != self.engine_id:
                raise KVError("engine_mismatch", f"this KV listener serves engine "
                              f"{self.engine_id}, not {hdr.get('engine_id')}")
            if not isinstance(block_ids, list) or not all(isinstance(b, int) for b in block_ids):
                raise KVError("invalid_params", "block_ids must be a list of integers")
            blocks, tokens = self.store.lookup(block_ids)
        except KVError as exc:
            await _send(writer, ERROR, {"cause": exc.cause, "message": str(exc)})
            raise
        payload = b"".join(blocks)
        crc = zlib.crc32(payload)
        if payload and self.corrupt():
            flipped = bytearray(payload)
            flipped[len(flipped) // 2] ^= 0xFF
            payload = bytes(flipped)
            self.record("corrupted_sent")
        await _send(writer, BLOCKS, {"block_ids": block_ids, "tokens": tokens,
                                     "sizes": [len(b) for b in blocks]}, payload, crc)
        kind, hdr, _, _ = await read_frame(reader)
        if kind != FREE:
            raise KVError("protocol_error", "expected FREE")
        freed = self.store.free(block_ids)
        await _send(writer, FREED, {"freed": freed})
        self.record("ok" if hdr.get("ok") else "rejected_by_decode")


@dataclass
class PullResult:
    nbytes: int
    seconds: float
    blocks: int


async def pull(params: Dict[str, Any], own_engine_id: str, model: str, key: str,
               prompt_tokens: int, timeout_s: float, min_seconds: Callable[[int], float]
               ) -> PullResult:
    """Pull and verify the blocks named by a prefill's kv_transfer_params, then free them.

    ``min_seconds(nbytes)`` is the modelled transfer time (bandwidth); the pull takes
    at least that long. Raises KVError with a cause.
    """
    host, port = params.get("remote_host"), params.get("remote_port")
    engine_id, block_ids = params.get("remote_engine_id"), params.get("remote_block_ids")
    if not isinstance(host, str) or not host or isinstance(port, bool) or not isinstance(port, int):
        raise KVError("invalid_params", "kv_transfer_params need remote_host and remote_port, "
                      f"got {host!r}:{port!r}")
    if not isinstance(block_ids, list) or not isinstance(engine_id, str):
        raise KVError("invalid_params", "kv_transfer_params need remote_engine_id and "
                      "remote_block_ids")
    if engine_id == own_engine_id:
        raise KVError("same_engine", f"remote_engine_id {engine_id} is this engine's own id")
    start = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except asyncio.TimeoutError:
        raise KVError("timeout", f"connect to {host}:{port} timed out") from None
    except OSError as exc:
        raise KVError("connect_failed", f"cannot connect to KV listener {host}:{port}: "
                      f"{os.strerror(exc.errno) if exc.errno else exc}") from None
    try:
        return await asyncio.wait_for(
            _exchange(reader, writer, params, engine_id, own_engine_id, model, key,
                      prompt_tokens, start, min_seconds), timeout_s)
    except asyncio.TimeoutError:
        raise KVError("timeout", f"KV pull from {host}:{port} timed out after "
                      f"{timeout_s:g}s") from None
    except (asyncio.IncompleteReadError, ConnectionError, ValueError) as exc:
        raise KVError("protocol_error", f"KV pull from {host}:{port} broke: "
                      f"{exc or type(exc).__name__}") from None
    finally:
        writer.close()


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    params: Dict[str, Any], engine_id: str, own: str, model: str, key: str,
                    prompt_tokens: int, start: float, min_seconds: Callable[[int], float]
                    ) -> PullResult:
    block_ids = params["remote_block_ids"]
    await _send(writer, PULL, {"engine_id": engine_id, "block_ids": block_ids, "requester": own,
                               "request_id": params.get("remote_request_id")})
    kind, hdr, payload, crc_ok = await read_frame(reader)
    if kind == ERROR:
        raise KVError(hdr.get("cause", "protocol_error"),
                      f"remote {engine_id}: {hdr.get('message', 'error')}")
    if kind != BLOCKS:
        raise KVError("protocol_error", f"unexpected frame type {kind}")
    problem = _verify(hdr, payload, crc_ok, model, key, prompt_tokens)
    await _send(writer, FREE, {"block_ids": block_ids, "ok": problem is None})
    await read_frame(reader)
    if problem is not None:
        raise problem
    rest = min_seconds(len(payload)) - (time.monotonic() - start)
    if rest > 0:
        await asyncio.sleep(rest)
    return PullResult(len(payload), time.monotonic() - start, len(block_ids))


def _verify(hdr: Dict[str, Any], payload: bytes, crc_ok: bool, model: str, key: str,
            prompt_tokens: int) -> Optional[KVError]:
    if not crc_ok:
        return KVError("corrupted", f"KV payload failed its checksum ({len(payload)} bytes)")
    tokens: List[int] = hdr.get("tokens", [])
    sizes: List[int] = hdr.get("sizes", [])
    if sum(tokens) != prompt_tokens or len(tokens) != len(sizes) or sum(sizes) != len(payload):
        return KVError("prompt_mismatch", f"KV holds {sum(tokens)} prompt tokens, this "
                       f"request has {prompt_tokens}")
    off = 0
    for i, size in enumerate(sizes):
        if payload[off:off + size] != block_bytes(model, key, i, size):
            return KVError("prompt_mismatch", f"KV block {i} does not belong to this prompt")
        off += size
    return None
