"""Pieces shared by the FastDeploy personalities: timings (``PD_EMU_FD_*``), logging
(``FD_LOG_DIR``), the connector on ``--pd-comm-port`` (a kvnet KV listener that hands
out a request's KV by request id), plain TCP stand-in listeners, the request "job"."""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import zlib
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional

from .. import kvnet
from ..kvnet import KVServer
from ..kvstore import KVError
from ..settings import _int, _num
from ..xllm.common import local_ip, setup_logging

log = logging.getLogger("pd_emu.fastdeploy")

#: what the instance reports as "version" in /register (FastDeploy sends the model's)
VERSION = "pd-emu"
WILDCARDS = ("", "0.0.0.0", "::")


class ConfigError(Exception):
    """A start-up refusal with exit status ``code`` (FastDeploy raises ValueError: 1)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Timings:
    """Periods of the FastDeploy personalities, seconds unless stated."""

    register_s: float = 5.0  # instance -> router POST /register period
    health_s: float = 5.0  # router health-check period
    health_timeout_s: float = 5.0  # router health-check timeout
    health_failures: int = 3  # consecutive failed checks that drop an instance
    min_sync_ms: float = 50.0  # floor of --scheduler-sync-period (FastDeploy: 5 ms)
    clear_expired_s: float = 60.0  # HDEL of <topic>.cluster entries older than this

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Timings:
        d = cls()
        return cls(
            register_s=_num(env, "PD_EMU_FD_REGISTER_S", d.register_s, 0.01),
            health_s=_num(env, "PD_EMU_FD_HEALTH_S", d.health_s, 0.01),
            health_timeout_s=_num(env, "PD_EMU_FD_HEALTH_TIMEOUT_S", d.health_timeout_s, 0.01),
            health_failures=_int(env, "PD_EMU_FD_HEALTH_FAILURES", d.health_failures, 1),
            min_sync_ms=_num(env, "PD_EMU_FD_MIN_SYNC_MS", d.min_sync_ms, 1.0),
            clear_expired_s=_num(env, "PD_EMU_FD_CLEAR_EXPIRED_S", d.clear_expired_s, 0.1),
        )


def advertised_ip(host: str) -> str:
    """The IP an instance reports (``host_ip``): --host, or the local IP for a wildcard."""
    return local_ip() if host in WILDCARDS else host


def connect_host(host: str) -> str:
    """Where this process reaches its own listeners bound on ``host``."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    return "::1" if host == "::" else host


def start_logging(tag: str, log_dir: Optional[str], filename: str) -> Optional[str]:
    """stderr, plus ``<FD_LOG_DIR>/<filename>`` when FD_LOG_DIR is set; returns its path."""
    setup_logging(tag)
    if not log_dir:
        return None
    os.makedirs(log_dir, exist_ok=True)
    path = os.path.join(log_dir, filename)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [{tag}] %(message)s"))
    logging.getLogger().addHandler(handler)
    return path


@dataclass
class Job:
    """One request as the engine sees it (stands in for the tokenized request)."""

    rid: str
    model: str
    key: str
    prompt_tokens: int
    max_tokens: int

    def as_dict(self) -> Dict[str, Any]:
        return {"model": self.model, "key": self.key, "prompt_tokens": self.prompt_tokens,
                "max_tokens": self.max_tokens}

    @classmethod
    def from_dict(cls, rid: str, d: Mapping[str, Any]) -> Job:
        job = cls(rid, str(d["model"]), str(d["key"]), int(d["prompt_tokens"]),
                  int(d["max_tokens"]))
        if job.prompt_tokens < 1 or job.max_tokens < 1:
            raise ValueError("prompt_tokens and max_tokens must be >= 1")
        return job


class Connector(KVServer):
    """The ``--pd-comm-port`` listener of a prefill (FastDeploy's splitwise connector).

    The kvnet protocol of the vLLM personality, with one addition: a PULL without block
    ids names the request (``request_id``) and waits until this prefill has built and
    held that request's KV (the decode is sent the request at the same time as the
    prefill, so its pull may come first). The blocks are freed once pulled, or when their
    lease (PD_EMU_KV_LEASE_S) ends.
    """

    def __init__(self, engine_id: str, store: Any, timeout_s: float, lease_s: float,
                 corrupt: Any, record: Any) -> None:
        super().__init__(0, engine_id, store, timeout_s, corrupt, record)
        self.lease_s = lease_s
        self.by_request: Dict[str, List[int]] = {}
        self.waiters: Dict[str, asyncio.Event] = {}

    def offer(self, rid: str, block_ids: List[int]) -> None:
        """The KV of request ``rid`` is held under ``block_ids``."""
        self.by_request[rid] = block_ids
        ev = self.waiters.pop(rid, None)
        if ev is not None:
            ev.set()
        if self.lease_s > 0:
            asyncio.get_running_loop().call_later(self.lease_s + 1, self._forget, rid,
                                                  block_ids)

    def _forget(self, rid: str, block_ids: List[int]) -> None:
        if self.by_request.get(rid) is block_ids:
            del self.by_request[rid]

    async def _resolve(self, rid: Any) -> List[int]:
        if not isinstance(rid, str) or not rid:
            raise KVError("invalid_params", "a PULL needs block_ids or a request_id")
        ids = self.by_request.get(rid)
        if ids is not None:
            return ids
        ev = self.waiters.setdefault(rid, asyncio.Event())
        wait = self.timeout_s * 0.8
        try:
            await asyncio.wait_for(ev.wait(), wait)
        except asyncio.TimeoutError:
            raise KVError("unknown_blocks", f"this prefill has no KV of request {rid} (not "
                          f"prefilled here within {wait:g}s)") from None
        finally:
            if self.waiters.get(rid) is ev and not ev.is_set():
                del self.waiters[rid]
        ids = self.by_request.get(rid)
        if ids is None:
            raise KVError("unknown_blocks", f"the KV of request {rid} is gone")
        return ids

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        kind, hdr, _, _ = await kvnet.read_frame(reader)
        if kind != kvnet.PULL:
            raise KVError("protocol_error", "expected PULL")
        rid = hdr.get("request_id")
        try:
            if hdr.get("engine_id") != self.engine_id:
                raise KVError("engine_mismatch", f"this connector serves {self.engine_id}, "
                              f"not {hdr.get('engine_id')}")
            block_ids = hdr.get("block_ids") or []
            if not isinstance(block_ids, list) or not all(isinstance(b, int)
                                                          for b in block_ids):
                raise KVError("invalid_params", "block_ids must be a list of integers")
            if not block_ids:
                block_ids = await self._resolve(rid)
            blocks, tokens = self.store.lookup(block_ids)
        except KVError as exc:
            await kvnet._send(writer, kvnet.ERROR, {"cause": exc.cause, "message": str(exc)})
            raise
        payload = b"".join(blocks)
        crc = zlib.crc32(payload)
        if payload and self.corrupt():
            flipped = bytearray(payload)
            flipped[len(flipped) // 2] ^= 0xFF
            payload = bytes(flipped)
            self.record("corrupted_sent")
        await kvnet._send(writer, kvnet.BLOCKS, {"block_ids": block_ids, "tokens": tokens,
                                                 "sizes": [len(b) for b in blocks]},
                          payload, crc)
        kind, hdr, _, _ = await kvnet.read_frame(reader)
        if kind != kvnet.FREE:
            raise KVError("protocol_error", "expected FREE")
        freed = self.store.free(block_ids)
        if isinstance(rid, str):
            self.by_request.pop(rid, None)
        await kvnet._send(writer, kvnet.FREED, {"freed": freed})
        self.record("ok" if hdr.get("ok") else "rejected_by_decode")


async def _close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()


async def plain_listener(sock: socket.socket) -> asyncio.AbstractServer:
    """A TCP listener standing in for a FastDeploy port the emulator does not speak
    (engine worker queue, cache queue, RDMA): it accepts and closes connections."""
    return await asyncio.start_server(_close_at_once, sock=sock)
