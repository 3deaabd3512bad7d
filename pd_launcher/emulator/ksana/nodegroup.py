"""A KsanaLLM pipeline group over several hosts (WORLD_SIZE > 1): rank 0 listens on
MASTER_HOST:MASTER_PORT, every other rank connects (retrying) and says hello; rank 0
counts the group complete when ranks 1..WORLD_SIZE-1 have joined. Newline-delimited
JSON on TCP:

  worker -> master  {"op": "hello", "node_rank", "world_size", "host", "pid"}
  master -> worker  {"op": "welcome"} | {"op": "refused", "error"}
  either way        {"op": "bye"}   (a planned stop)

A member that goes away breaks the group: the other side exits 1 (the real engine
cannot run a pipeline with a missing stage), or 0 after a planned stop of the master.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

log = logging.getLogger("pd_emu.ksana")

RETRY_S = 1.0
WAIT_LOG_S = 5.0
LINE_LIMIT = 1 << 16


def _dump(msg: Dict[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


async def _read(reader: asyncio.StreamReader) -> Optional[Dict[str, Any]]:
    line = await reader.readline()
    if not line:
        return None
    msg = json.loads(line)
    return msg if isinstance(msg, dict) else None


@dataclass
class Member:
    rank: int
    host: str
    pid: Any
    writer: asyncio.StreamWriter
    leaving: bool = False


class GroupMaster:
    """Rank 0's listener. ``complete`` is set once every rank has joined;
    ``on_lost(message)`` is called when a joined rank goes away (not while stopping)."""

    def __init__(self, world: int, on_lost: Callable[[str], None]) -> None:
        self.world = world
        self.on_lost = on_lost
        self.members: Dict[int, Member] = {}
        self.complete = asyncio.Event()
        self.stopping = False
        self.server: Optional[asyncio.AbstractServer] = None
        if world <= 1:
            self.complete.set()

    async def start(self, sock: socket.socket) -> None:
        self.server = await asyncio.start_server(self._handle, sock=sock, limit=LINE_LIMIT)

    async def wait_complete(self) -> None:
        last = 0.0
        while not self.complete.is_set():
            now = time.monotonic()
            if now - last >= WAIT_LOG_S:
                last = now
                missing = [r for r in range(1, self.world) if r not in self.members]
                log.info("waiting for node rank(s) %s of the pipeline group (WORLD_SIZE=%d) "
                         "to join", ",".join(map(str, missing)), self.world)
            try:
                await asyncio.wait_for(self.complete.wait(), WAIT_LOG_S)
            except asyncio.TimeoutError:
                pass

    def _refusal(self, hello: Dict[str, Any]) -> Optional[str]:
        rank = hello.get("node_rank")
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 < rank < self.world:
            return f"NODE_RANK {rank!r} is out of range 1..{self.world - 1}"
        if hello.get("world_size") != self.world:
            return (f"WORLD_SIZE={hello.get('world_size')} differs from rank 0's "
                    f"{self.world}")
        if rank in self.members:
            return f"node rank {rank} has already joined"
        if self.stopping:
            return "rank 0 is stopping"
        return None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        member: Optional[Member] = None
        try:
            hello = await _read(reader)
            if hello is None or hello.get("op") != "hello":
                return
            error = self._refusal(hello)
            if error:
                log.error("refused a node from %s: %s", hello.get("host"), error)
                writer.write(_dump({"op": "refused", "error": error}))
                await writer.drain()
                return
            member = Member(int(hello["node_rank"]), str(hello.get("host")), hello.get("pid"),
                            writer)
            self.members[member.rank] = member
            writer.write(_dump({"op": "welcome"}))
            log.info("node rank %d joined from %s (pid %s): %d/%d", member.rank, member.host,
                     member.pid, 1 + len(self.members), self.world)
            if len(self.members) == self.world - 1:
                self.complete.set()
            while True:
                msg = await _read(reader)
                if msg is None:
                    break
                if msg.get("op") == "bye":
                    member.leaving = True
        except (ConnectionError, ValueError, asyncio.IncompleteReadError,
                asyncio.CancelledError):
            pass
        finally:
            writer.close()
            if member is not None and self.members.get(member.rank) is member:
                del self.members[member.rank]
                if not self.stopping:
                    how = "stopped" if member.leaving else "disconnected"
                    self.on_lost(f"node rank {member.rank} ({member.host}, pid {member.pid}) "
                                 f"{how}: the pipeline group cannot run without it")

    def close(self) -> None:
        """A planned stop: tell every member, stop listening."""
        self.stopping = True
        for m in list(self.members.values()):
            if not m.writer.is_closing():
                m.writer.write(_dump({"op": "bye"}))
                m.writer.close()
        if self.server is not None:
            self.server.close()


class GroupWorker:
    """A rank > 0: joins rank 0 and holds the link. ``on_end(code, message)`` when the
    link ends (0: rank 0 stopped as planned, 1: refused or lost)."""

    def __init__(self, host: str, port: int, rank: int, world: int, own_host: str,
                 on_end: Callable[[int, str], None]) -> None:
        self.host, self.port, self.rank, self.world = host, port, rank, world
        self.own_host = own_host
        self.on_end = on_end
        self.joined = asyncio.Event()
        self._writer: Optional[asyncio.StreamWriter] = None

    async def _connect(self) -> tuple:
        last = 0.0
        while True:
            try:
                return await asyncio.open_connection(self.host, self.port, limit=LINE_LIMIT)
            except OSError as exc:
                now = time.monotonic()
                if now - last >= WAIT_LOG_S:
                    last = now
                    why = os.strerror(exc.errno) if exc.errno else str(exc)
                    log.info("waiting for rank 0 at MASTER_HOST:MASTER_PORT %s:%d: %s "
                             "(retrying every %gs)", self.host, self.port, why, RETRY_S)
                await asyncio.sleep(RETRY_S)

    async def run(self) -> None:
        reader, writer = await self._connect()
        self._writer = writer
        planned = False
        try:
            writer.write(_dump({"op": "hello", "node_rank": self.rank, "world_size": self.world,
                                "host": self.own_host, "pid": os.getpid()}))
            await writer.drain()
            reply = await _read(reader)
            if reply is None:
                raise ConnectionError("rank 0 closed the connection")
            if reply.get("op") == "refused":
                self.on_end(1, f"rank 0 ({self.host}:{self.port}) refused node rank "
                               f"{self.rank}: {reply.get('error')}")
                return
            log.info("joined rank 0 at %s:%d as node rank %d of %d", self.host, self.port,
                     self.rank, self.world)
            self.joined.set()
            while True:
                msg = await _read(reader)
                if msg is None:
                    break
                if msg.get("op") == "bye":
                    planned = True
        except (ConnectionError, ValueError, asyncio.IncompleteReadError) as exc:
            log.warning("link to rank 0 broke: %s", exc)
        finally:
            writer.close()
        if planned:
            self.on_end(0, f"rank 0 ({self.host}:{self.port}) stopped; this node stops too")
        else:
            self.on_end(1, f"rank 0 ({self.host}:{self.port}) went away: a pipeline stage "
                           "cannot run on its own")

    def leave(self) -> None:
        w = self._writer
        if w is not None and not w.is_closing():
            w.write(_dump({"op": "bye"}))
            w.close()
