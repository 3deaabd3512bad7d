"""Data-parallel rendezvous over newline-delimited JSON on TCP.

The DP master (rank 0's process: external rank 0 or the internal-DP API server)
listens on --data-parallel-address:--data-parallel-rpc-port. Every other process
connects, says ``hello`` with the ranks it hosts (after its start-up delay, i.e.
once its "model is loaded"), and is ``welcome``d or ``refused`` (duplicate or
out-of-range rank). When all --data-parallel-size ranks have joined, the master
sends ``ready`` to everyone; if a process goes away, ``unready``.

With internal DP the master's API server also dispatches requests to ranks of
headless processes over the same connection: ``run`` {id, rank, job} ->
``ev`` {id, ev} ... ; ``abort`` {id}.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import socket
import time
from typing import Any, AsyncIterator, Callable, Dict, List, Optional

from .engine import Event, RankEngine

log = logging.getLogger("pd_emu.dp")

LOG_EVERY_S = 5.0
RETRY_S = 1.0
LINE_LIMIT = 1 << 24


def oserror(exc: OSError) -> str:
    """'Connection refused' rather than asyncio's 'Connect call failed (...)'."""
    return os.strerror(exc.errno) if exc.errno else str(exc)


def _dump(msg: Dict[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


class _Peer:
    """A connected process on the master side."""

    def __init__(self, writer: asyncio.StreamWriter, ranks: List[int], who: str) -> None:
        self.writer, self.ranks, self.who = writer, ranks, who
        self.pending: Dict[int, asyncio.Queue] = {}
        self.inflight: Dict[int, int] = {r: 0 for r in ranks}
        self.leaving = False  # said "bye": a planned stop, not a failure

    def send(self, msg: Dict[str, Any]) -> None:
        if not self.writer.is_closing():
            self.writer.write(_dump(msg))


class RemoteRank:
    """A rank of a headless process, driven from the internal-DP master."""

    _ids = itertools.count(1)

    def __init__(self, peer: _Peer, rank: int) -> None:
        self.peer, self.rank = peer, rank

    def load(self) -> int:
        return self.peer.inflight.get(self.rank, 0)

    async def execute(self, job: Dict[str, Any]) -> AsyncIterator[Event]:
        jid = next(self._ids)
        queue: asyncio.Queue = asyncio.Queue()
        peer = self.peer
        peer.pending[jid] = queue
        peer.inflight[self.rank] += 1
        done = False
        try:
            peer.send({"op": "run", "id": jid, "rank": self.rank, "job": job})
            while True:
                ev = await queue.get()
                if ev["t"] in ("end", "error"):
                    done = True
                yield ev
                if done:
                    return
        finally:
            peer.pending.pop(jid, None)
            peer.inflight[self.rank] -= 1
            if not done:
                peer.send({"op": "abort", "id": jid})


class DPMaster:
    def __init__(self, size: int, on_change: Callable[[bool], None]) -> None:
        self.size = size
        self.on_change = on_change
        self.joined: Dict[int, str] = {}  # rank -> who
        self.peers: List[_Peer] = []
        self.remote: Dict[int, RemoteRank] = {}
        self.server: Optional[asyncio.AbstractServer] = None
        self._waiter: Optional[asyncio.Task] = None
        self.complete = False
        self._quiet = False

    async def start(self, sock: socket.socket) -> None:
        self.server = await asyncio.start_server(self._handle, sock=sock, limit=LINE_LIMIT)
        self._waiter = asyncio.ensure_future(self._log_waiting())

    def register_local(self, ranks: List[int]) -> None:
        for r in ranks:
            self.joined[r] = "this process"
        log.info("DP master: local ranks %s joined (%d/%d)", ranks, len(self.joined), self.size)
        self._update()

    def _update(self) -> None:
        complete = len(self.joined) == self.size
        if complete == self.complete:
            return
        self.complete = complete
        if complete:
            log.info("DP rendezvous complete: all %d ranks joined", self.size)
            for p in self.peers:
                p.send({"op": "ready"})
        else:
            missing = sorted(set(range(self.size)) - set(self.joined))
            (log.info if self._quiet else log.warning)(
                "DP group incomplete, missing ranks %s", missing)
            for p in self.peers:
                p.send({"op": "unready", "missing": missing})
        self.on_change(complete)

    async def _log_waiting(self) -> None:
        while True:
            await asyncio.sleep(LOG_EVERY_S)
            if not self.complete:
                missing = sorted(set(range(self.size)) - set(self.joined))
                log.info("DP master waiting for ranks %s (%d/%d joined)",
                         missing, len(self.joined), self.size)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer: Optional[_Peer] = None
        try:
            hello = json.loads(await reader.readline() or b"null")
            if not isinstance(hello, dict) or hello.get("op") != "hello":
                return
            ranks = [int(r) for r in hello.get("ranks", [])]
            who = f"{hello.get('host', '?')} pid {hello.get('pid', '?')}"
            error = self._refusal(ranks)
            if error:
                log.error("DP master refused %s: %s", who, error)
                writer.write(_dump({"op": "refused", "error": error}))
                await writer.drain()
                return
            peer = _Peer(writer, ranks, who)
            self.peers.append(peer)
            for r in ranks:
                self.joined[r] = who
                self.remote[r] = RemoteRank(peer, r)
            log.info("DP master: ranks %s joined from %s (%d/%d)", ranks, who,
                     len(self.joined), self.size)
            peer.send({"op": "welcome", "size": self.size})
            if self.complete:
                peer.send({"op": "ready"})
            self._update()
            async for line in reader:
                msg = json.loads(line)
                if msg.get("op") == "ev":
                    q = peer.pending.get(msg["id"])
                    if q is not None:
                        q.put_nowait(msg["ev"])
                elif msg.get("op") == "bye":
                    peer.leaving = True
        except (ConnectionError, ValueError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:  # loop shutting down
            pass
        finally:
            writer.close()
            if peer is not None:
                self._drop(peer)

    def _refusal(self, ranks: List[int]) -> Optional[str]:
        if not ranks:
            return "no ranks in hello"
        for r in ranks:
            if not 0 <= r < self.size:
                return f"rank {r} out of range for --data-parallel-size {self.size}"
            if r in self.joined:
                return f"duplicate rank {r}: already registered by {self.joined[r]}"
        return None

    def _drop(self, peer: _Peer) -> None:
        self.peers.remove(peer)
        for r in peer.ranks:
            self.joined.pop(r, None)
            self.remote.pop(r, None)
        if peer.leaving:
            log.info("DP master: ranks %s (%s) left (shutting down)", peer.ranks, peer.who)
        else:
            log.warning("DP master: lost ranks %s (%s)", peer.ranks, peer.who)
        self._quiet = peer.leaving
        for q in peer.pending.values():
            q.put_nowait({"t": "error", "status": 503, "kv": {},
                          "message": f"DP ranks {peer.ranks} ({peer.who}) went away"})
        self._update()

    def close(self) -> None:
        if self._waiter is not None:
            self._waiter.cancel()
        if self.server is not None:
            self.server.close()
        for p in list(self.peers):
            p.send({"op": "bye"})
            p.writer.close()


class DPWorker:
    """A process that is not the DP master: registers its ranks and follows the master."""

    def __init__(self, address: str, port: int, ranks: List[int], host: str,
                 engines: Dict[int, RankEngine], on_change: Callable[[bool], None],
                 on_refused: Callable[[str], None]) -> None:
        self.address, self.port, self.ranks, self.host = address, port, ranks, host
        self.engines = engines
        self.on_change = on_change
        self.on_refused = on_refused
        self.jobs: Dict[int, asyncio.Task] = {}
        self.writer: Optional[asyncio.StreamWriter] = None
        self.accepting = True
        self.refused = False
        self.master_left = False

    async def run(self) -> None:
        last_log = 0.0
        while True:
            try:
                reader, writer = await asyncio.open_connection(
                    self.address, self.port, limit=LINE_LIMIT)
            except OSError as exc:
                now = time.monotonic()
                if now - last_log >= LOG_EVERY_S:
                    last_log = now
                    log.info("ranks %s waiting for DP master at %s:%d: %s (retrying every "
                             "%gs)", self.ranks, self.address, self.port, oserror(exc), RETRY_S)
                await asyncio.sleep(RETRY_S)
                continue
            try:
                await self._session(reader, writer)
            except (ConnectionError, ValueError, asyncio.IncompleteReadError) as exc:
                if not self.master_left:
                    log.warning("DP link to %s:%d broke: %s", self.address, self.port, exc)
                self.master_left = False
            finally:
                writer.close()
                self.writer = None
                for task in list(self.jobs.values()):
                    task.cancel()
                self.on_change(False)
            if self.refused:
                return
            last_log = 0.0
            await asyncio.sleep(RETRY_S)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(_dump({"op": "hello", "ranks": self.ranks, "host": self.host,
                            "pid": os.getpid()}))
        await writer.drain()
        reply = json.loads(await reader.readline() or b"null")
        if not isinstance(reply, dict):
            raise ConnectionError("DP master closed the connection")
        if reply.get("op") == "refused":
            self.refused = True
            self.on_refused(reply.get("error", "refused"))
            return
        log.info("ranks %s registered with DP master %s:%d; waiting for all %s ranks",
                 self.ranks, self.address, self.port, reply.get("size"))
        self.writer = writer
        async for line in reader:
            msg = json.loads(line)
            op = msg.get("op")
            if op == "ready":
                log.info("DP group complete")
                self.on_change(True)
            elif op == "unready":
                log.warning("DP group incomplete, missing ranks %s", msg.get("missing"))
                self.on_change(False)
            elif op == "run":
                self._start_job(msg["id"], msg["rank"], msg["job"])
            elif op == "abort":
                task = self.jobs.get(msg["id"])
                if task is not None:
                    task.cancel()
            elif op == "bye":
                log.info("DP master %s:%d is shutting down", self.address, self.port)
                self.master_left = True
        raise ConnectionError("DP master closed the connection")

    def _start_job(self, jid: int, rank: int, job: Dict[str, Any]) -> None:
        engine = self.engines.get(rank)
        if engine is None or not self.accepting:
            why = "shutting down" if engine is not None else f"rank {rank} not hosted here"
            self._send({"op": "ev", "id": jid,
                        "ev": {"t": "error", "status": 503, "kv": {}, "message": why}})
            return
        self.jobs[jid] = asyncio.ensure_future(self._run_job(jid, engine, job))

    async def _run_job(self, jid: int, engine: RankEngine, job: Dict[str, Any]) -> None:
        agen = engine.execute(job)
        try:
            async for ev in agen:
                self._send({"op": "ev", "id": jid, "ev": ev})
                w = self.writer
                if w is not None and w.transport.get_write_buffer_size() > 1 << 20:
                    await w.drain()
        finally:
            await agen.aclose()
            self.jobs.pop(jid, None)

    def _send(self, msg: Dict[str, Any]) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(_dump(msg))

    def leave(self) -> None:
        """Tell the master this is a planned stop."""
        self._send({"op": "bye"})

    async def drain(self, deadline: float) -> None:
        """Stop taking jobs and wait (until ``deadline``, loop time) for running ones."""
        self.accepting = False
        loop = asyncio.get_running_loop()
        while self.jobs and loop.time() < deadline:
            await asyncio.wait(list(self.jobs.values()), timeout=deadline - loop.time())
