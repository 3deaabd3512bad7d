"""FastDeploy's v0 "splitwise" scheduler against a real Redis (>= 6.2), with redis.asyncio.

Keys (as FastDeploy's splitwise_scheduler):
- ``<topic>.cluster``: a hash, field = this instance's node id (a uuid4), value = JSON
  ``{"ts", "role", "load", "host", "disaggregated": {...}}``, HSET every sync period and
  HDEL'd on SIGTERM; entries older than the expire period are not scheduled, entries
  older than PD_EMU_FD_CLEAR_EXPIRED_S are HDEL'd by any instance.
- ``ReqQ_<node id>``: a list per instance; the instance that received the client request
  LPUSHes the request JSON to the chosen decode's and prefill's lists; each instance pops
  its own (``RPOP key 50``, else ``BRPOP key 1``).
- ``<api node id>-<i>`` (i = 0..3, one chosen per request): the reply lists; the decode
  LPUSHes JSON result chunks and sets EXPIRE ttl; the API node BRPOPs them.
"""
from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Dict, List, Optional, Tuple

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ..xllm.common import Item, cancel_all
from .common import Job, Timings

log = logging.getLogger("pd_emu.fastdeploy.scheduler")

READER_GROUPS = 4  # FastDeploy's reader_parallel
QUEUE_BATCH = 50
RESULT_BATCH = 200
MIN_REDIS = (6, 2)


class SchedulerError(Exception):
    """Redis is unusable at start (exit status 1)."""


def version_problem(version: str) -> Optional[str]:
    """None when ``version`` (INFO server's redis_version) is >= 6.2, else why not."""
    try:
        parts = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        return f"cannot parse the Redis version {version!r}"
    if len(parts) < 2:
        parts = parts + (0,) * (2 - len(parts))
    if parts < MIN_REDIS:
        return (f"Redis version {version} too low. Please upgrade to Redis 6.2+ to support "
                "batch RPOP operations.")
    return None


@dataclass
class RedisConfig:
    host: str
    port: int
    db: int
    password: Optional[str]
    topic: str
    ttl: int  # s
    sync_ms: int
    expire_ms: int

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}/{self.db}"


@dataclass
class Node:
    nodeid: str
    role: str
    load: int
    host: str
    ts: float
    disaggregated: Dict[str, Any]


def _least(nodes: List[Node]) -> Node:
    low = min(n.load for n in nodes)
    return random.choice([n for n in nodes if n.load == low])


def _protocol(p: Node, d: Node) -> str:
    """As FastDeploy: with both ipc and rdma, ipc on the same host else rdma; else the
    decode's only protocol."""
    protos = list(d.disaggregated.get("transfer_protocol") or ["rdma"])
    if "ipc" in protos and "rdma" in protos:
        return "ipc" if p.host == d.host else "rdma"
    return str(protos[0])


class RedisScheduler:
    def __init__(self, cfg: RedisConfig, timings: Timings, role: str, host_ip: str,
                 disaggregated: Dict[str, Any], load: Callable[[], int],
                 handle: Callable[[Dict[str, Any]], None]) -> None:
        self.cfg, self.timings = cfg, timings
        self.role, self.host_ip = role, host_ip
        self.disaggregated = disaggregated
        self.load = load  # this instance's current load
        self.handle = handle  # a request popped from this instance's queue
        self.nodeid = str(uuid.uuid4())
        self.cluster_key = f"{cfg.topic}.cluster"
        self.queue_key = f"ReqQ_{self.nodeid}"
        self.groups = [f"{self.nodeid}-{i}" for i in range(READER_GROUPS)]
        self._next_group = 0
        self.client: Optional[aioredis.Redis] = None
        self.pending: Dict[str, asyncio.Queue] = {}
        self.reported = asyncio.Event()
        self.reports = 0
        self.scheduled = 0
        self.version = ""
        self.intake: List[asyncio.Task] = []  # report + queue loops (stopped first)
        self.tasks: List[asyncio.Task] = []  # result reader, clean-up
        self.expire_s = cfg.expire_ms / 1000.0
        self.sync_s = max(cfg.sync_ms, timings.min_sync_ms) / 1000.0

    # -- lifecycle -------------------------------------------------------------------
    async def connect(self) -> None:
        """Connect (AUTH with the password if any) and check the version."""
        c = self.cfg
        # no retries inside redis-py (its default backs off for seconds, e.g. on NOAUTH):
        # the loops here retry themselves
        self.client = aioredis.Redis(host=c.host, port=c.port, db=c.db, password=c.password,
                                     socket_connect_timeout=5, socket_timeout=10,
                                     retry=Retry(NoBackoff(), 0))
        try:
            info = await self.client.info("server")
        except RedisError as exc:
            await self.client.aclose()
            self.client = None
            raise SchedulerError(f"cannot use Redis at {c.where}: "
                                 f"{exc or type(exc).__name__}") from None
        self.version = str(info.get("redis_version", ""))
        why = version_problem(self.version)
        if why:
            await self.client.aclose()
            self.client = None
            raise SchedulerError(why)
        log.info("Redis version %s detected at %s (topic %r, node id %s)", self.version,
                 c.where, c.topic, self.nodeid)

    def start(self) -> None:
        self.intake.append(asyncio.ensure_future(self._report_loop()))
        self.intake.append(asyncio.ensure_future(self._queue_loop()))
        self.tasks.append(asyncio.ensure_future(self._result_loop()))
        self.tasks.append(asyncio.ensure_future(self._clear_loop()))

    async def leave(self) -> None:
        """Stop reporting and taking requests; delete this node's entry (SIGTERM)."""
        await cancel_all(self.intake)
        self.intake = []
        if self.client is None:
            return
        try:
            await self.client.hdel(self.cluster_key, self.nodeid)
            log.info("removed node %s from %s", self.nodeid, self.cluster_key)
        except RedisError as exc:
            log.warning("could not HDEL %s %s: %s", self.cluster_key, self.nodeid, exc)

    async def close(self) -> None:
        await cancel_all(self.intake + self.tasks)
        self.intake, self.tasks = [], []
        if self.client is not None:
            try:
                await self.client.aclose()
            except RedisError:
                pass

    # -- this node in the cluster hash -----------------------------------------------
    def entry(self) -> Dict[str, Any]:
        return {"ts": time.time(), "role": self.role, "load": int(self.load()),
                "host": self.host_ip, "disaggregated": self.disaggregated}

    async def _report_loop(self) -> None:
        assert self.client is not None
        failing = False
        while True:
            try:
                await self.client.hset(self.cluster_key, self.nodeid, json.dumps(self.entry()))
                self.reports += 1
                if not self.reported.is_set():
                    log.info("reporting to %s every %g ms as node %s (%s)", self.cluster_key,
                             self.sync_s * 1000, self.nodeid, self.role)
                    self.reported.set()
                if failing:
                    log.info("Redis reachable again")
                failing = False
            except RedisError as exc:
                if not failing:
                    log.warning("cannot report to Redis: %s", exc)
                failing = True
            await asyncio.sleep(self.sync_s)

    async def _clear_loop(self) -> None:
        """HDEL entries that stopped reporting long ago (clear_expired_nodes_period)."""
        assert self.client is not None
        while True:
            await asyncio.sleep(self.timings.clear_expired_s)
            try:
                for nodeid, node in (await self._nodes(self.timings.clear_expired_s,
                                                       stale=True)).items():
                    await self.client.hdel(self.cluster_key, nodeid)
                    log.info("cleared node %s (%s at %s): no report for %.0fs", nodeid,
                             node.role, node.host, time.time() - node.ts)
            except RedisError as exc:
                log.warning("cannot clear expired nodes: %s", exc)

    async def _nodes(self, max_age: float, stale: bool = False) -> Dict[str, Node]:
        """Live entries (``stale``: those older than ``max_age`` instead)."""
        assert self.client is not None
        raw = await self.client.hgetall(self.cluster_key)
        now = time.time()
        out: Dict[str, Node] = {}
        for k, v in raw.items():
            nodeid = k.decode() if isinstance(k, bytes) else str(k)
            try:
                d = json.loads(v)
                node = Node(nodeid, str(d["role"]), int(d["load"]), str(d["host"]),
                            float(d["ts"]), dict(d.get("disaggregated") or {}))
            except (ValueError, KeyError, TypeError):
                log.warning("ignoring a malformed entry %s in %s", nodeid, self.cluster_key)
                continue
            if (now - node.ts > max_age) == stale:
                out[nodeid] = node
        return out

    async def alive(self, nodeid: str) -> Tuple[bool, str]:
        assert self.client is not None
        try:
            raw = await self.client.hget(self.cluster_key, nodeid)
        except RedisError:
            return True, ""  # cannot tell; the ttl still bounds the wait
        if raw is None:
            return False, "its entry is gone"
        try:
            age = time.time() - float(json.loads(raw)["ts"])
        except (ValueError, KeyError, TypeError):
            return False, "its entry is malformed"
        if age > self.expire_s:
            return False, f"no report for {age:.1f}s"
        return True, ""

    # -- this node's request queue ---------------------------------------------------
    async def _queue_loop(self) -> None:
        assert self.client is not None
        await self.reported.wait()
        failing = False
        while True:
            try:
                raws = await self.client.rpop(self.queue_key, QUEUE_BATCH)
                if not raws:
                    got = await self.client.brpop([self.queue_key], timeout=1)
                    if got is None:
                        continue
                    raws = [got[1]]
                failing = False
            except RedisError as exc:
                if not failing:
                    log.warning("cannot pop %s: %s", self.queue_key, exc)
                failing = True
                await asyncio.sleep(0.5)
                continue
            for raw in raws:
                try:
                    env = json.loads(raw)
                    if not isinstance(env, dict):
                        raise ValueError("not an object")
                except ValueError as exc:
                    log.error("ignoring a malformed request in %s: %s", self.queue_key, exc)
                    continue
                log.info("Infer Scheduler Get Req: %s", env.get("request_id"))
                self.handle(env)

    async def push_result(self, group: str, rid: str, item: Item) -> None:
        """LPUSH one result chunk (JSON) to the API node's reply list, EXPIRE ttl."""
        assert self.client is not None
        chunk = dict(item)
        chunk["request_id"] = rid
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.lpush(group, json.dumps(chunk))
            pipe.expire(group, self.cfg.ttl)
            await pipe.execute()

    # -- the API node: schedule a client request and read its results ------------------
    async def _result_loop(self) -> None:
        assert self.client is not None
        failing = False
        while True:
            try:
                got = await self.client.brpop(self.groups, timeout=1)
                if got is None:
                    continue
                key, first = got
                raws = [first] + list(await self.client.rpop(key, RESULT_BATCH) or [])
                failing = False
            except RedisError as exc:
                if not failing:
                    log.warning("cannot read results: %s", exc)
                failing = True
                await asyncio.sleep(0.5)
                continue
            for raw in raws:
                try:
                    chunk = json.loads(raw)
                    q = self.pending.get(str(chunk.get("request_id")))
                except (ValueError, AttributeError):
                    log.error("ignoring a malformed result chunk")
                    continue
                if q is not None:
                    q.put_nowait(chunk)

    async def submit(self, job: Job, chat: bool) -> AsyncIterator[Item]:
        """Schedule ``job`` on a prefill and a decode (or a mixed node) and yield the
        result items the decode writes back."""
        assert self.client is not None
        try:
            live = await self._nodes(self.expire_s)
        except RedisError as exc:
            yield {"t": "error", "status": 503, "message": f"Redis unavailable: {exc}"}
            return
        ps = [n for n in live.values() if n.role == "prefill"]
        ds = [n for n in live.values() if n.role == "decode"]
        ms = [n for n in live.values() if n.role == "mixed"]
        if not ms and (not ps or not ds):
            yield {"t": "error", "status": 503, "message":
                   f"No Schedule Nodes: mixed:{len(ms)}, prefill:{len(ps)}, "
                   f"decode:{len(ds)} (live entries of {self.cluster_key})"}
            return
        pnode = _least(ps + ms)
        group = self.groups[self._next_group % READER_GROUPS]
        self._next_group += 1
        env: Dict[str, Any] = {
            "request_id": job.rid, "arrival_time": time.time(),
            "prompt_token_ids_len": job.prompt_tokens, "group": group,
            "api_node": self.nodeid, "chat": chat,
            # stands in for the tokenized Request.to_dict() FastDeploy sends
            "emu_prompt": job.as_dict(), "disaggregate_info": None,
        }
        if pnode.role == "mixed":
            watch, keys = pnode, [f"ReqQ_{pnode.nodeid}"]
            log.info("Schedule Req %s(len:%d) to %s (mixed)", job.rid, job.prompt_tokens,
                     pnode.nodeid)
        else:
            dnode = _least(ds)
            info = dict(dnode.disaggregated)
            info.update({"transfer_protocol": _protocol(pnode, dnode),
                         "prefill_ip": pnode.host,
                         "prefill_connector_port": pnode.disaggregated.get("connector_port"),
                         "prefill_node": pnode.nodeid, "decode_ip": dnode.host,
                         "decode_node": dnode.nodeid})
            env["disaggregate_info"] = info
            watch, keys = dnode, [f"ReqQ_{dnode.nodeid}", f"ReqQ_{pnode.nodeid}"]
            log.info("Schedule Req %s(len:%d) to prefill %s(%d) at %s, decode %s(%d) at %s",
                     job.rid, job.prompt_tokens, pnode.nodeid, pnode.load, pnode.host,
                     dnode.nodeid, dnode.load, dnode.host)
        queue: asyncio.Queue = asyncio.Queue()
        self.pending[job.rid] = queue
        try:
            raw = json.dumps(env)
            try:
                async with self.client.pipeline(transaction=False) as pipe:
                    for key in keys:
                        pipe.lpush(key, raw)
                    await pipe.execute()
            except RedisError as exc:
                yield {"t": "error", "status": 503, "message": f"Redis unavailable: {exc}"}
                return
            self.scheduled += 1
            async for item in self._results(job, queue, watch):
                yield item
        finally:
            self.pending.pop(job.rid, None)

    async def _results(self, job: Job, queue: asyncio.Queue, watch: Node
                       ) -> AsyncIterator[Item]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.ttl
        check = max(0.05, min(self.expire_s, 1.0))
        while True:
            try:
                chunk = await asyncio.wait_for(queue.get(), check)
            except asyncio.TimeoutError:
                if loop.time() > deadline:
                    yield {"t": "error", "status": 500,
                           "message": f"Req({job.rid}) is expired({self.cfg.ttl})"}
                    return
                ok, why = await self.alive(watch.nodeid)
                if not ok:
                    yield {"t": "error", "status": 502, "message":
                           f"{watch.role} instance {watch.nodeid} at {watch.host} stopped "
                           f"serving request {job.rid}: {why}"}
                    return
                continue
            kind = chunk.get("t")
            if kind == "tok":
                yield {"t": "tok", "texts": [str(t) for t in chunk.get("texts") or []]}
            elif kind == "end":
                yield {"t": "end", "finish": chunk.get("finish") or "length",
                       "cached": int(chunk.get("cached") or 0)}
                return
            else:
                yield {"t": "error", "status": int(chunk.get("status") or 502),
                       "message": str(chunk.get("message") or "the decode instance failed")}
                return
