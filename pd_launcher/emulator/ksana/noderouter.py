"""The KsanaLLM node's side of simple_router's protocol (the C++ HTTPRouterClient,
DefaultCoordinator and the communicators' ProcessHeartbeatData):

* ``POST /RegisterNode`` with the node's body (``register_body``); retried every
  heartbeat interval until the router answers with a ``node_id``;
* ``POST /Heartbeat {"node_id"}`` every ``heartbeat_interval_ms`` (sleeping the interval
  after each attempt, as the C++ thread does); the answer's ``comm_group_to_address``
  and ``comm_group_to_id`` update ``Links``;
* prefill rank 0 with ``communication_type: nccl``: a pair whose id is empty gets a fresh
  128-byte id (an ncclUniqueId's size), base64, ``POST /RegisterCommId``;
* the readiness lines of the real engine: ``ZeroMQ communication group <key>
  initialized`` once a pair's address list has 2 x world_size entries, and ``NCCL
  communication group <key> initialized`` once its id is known;
* a heartbeat answered 404/500 (simple_router answers 500 for an unknown node_id) means
  the router forgot this node: it registers again (the real client does not).

With ``register_once`` (PD_EMU_KSANA_REGISTER_ONCE=1) it behaves as KsanaLLM's client
does: one registration attempt at start-up; if it fails, no heartbeat is ever sent (the
engine runs on, unregistered); a forgotten node_id is never registered again.

Router calls never go through an HTTP proxy (the session ignores http_proxy & co.).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
import random
import time
from typing import Any, Dict, List, Optional, Tuple

import aiohttp

from ..xllm.common import local_ip
from .nodeconfig import WIRE_ROLE, NodeConfig

log = logging.getLogger("pd_emu.ksana")

#: what the node reports as each device's device_type (the real one: cudaDeviceProp.name)
DEVICE_TYPE = "pd-emu GPU"
NCCL_ID_BYTES = 128  # sizeof(ncclUniqueId)
#: libcurl's CURLOPT_TIMEOUT in http_router_client.cpp
ROUTER_TIMEOUT_S = 60.0
#: a repeated failure is logged again after this long
RELOG_S = 30.0

Entry = Tuple[int, int, str]  # (node_rank, device_id, coordinator_addr)


class Links:
    """The node's view of its comm groups, from the latest heartbeat."""

    def __init__(self) -> None:
        self.addresses: Dict[str, List[Entry]] = {}
        self.ids: Dict[str, str] = {}
        self._changed = asyncio.Event()

    def update(self, ids: Dict[str, str], addresses: Dict[str, List[Entry]]) -> None:
        self.ids, self.addresses = dict(ids), dict(addresses)
        self._pulse()

    def set_id(self, key: str, comm_id: str) -> None:
        self.ids[key] = comm_id
        self._pulse()

    def _pulse(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def peer(self, key: str, own: str, world: int, nccl: bool) -> Tuple[Optional[str], str]:
        """(decode rank 0's coordinator address, "") when the pair is linked, else
        (None, why not)."""
        entries = self.addresses.get(key)
        if not entries:
            if key not in self.addresses:
                return None, "the router has not reported this pair (is the decode registered?)"
            return None, "the router reports no addresses for this pair yet"
        if len(entries) != 2 * world:
            return None, (f"the pair has {len(entries)} address entries, KsanaLLM's ZMQ link "
                          f"needs 2 x world_size = {2 * world} (prefill and decode groups of "
                          "the same size)")
        if nccl and not self.ids.get(key):
            return None, "the pair has no NCCL id yet"
        for rank, dev, addr in entries:
            if rank == 0 and dev == 0 and addr != own:
                return addr, ""
        return None, "no decode rank 0 in the pair's addresses"

    async def wait_peer(self, key: str, own: str, world: int, nccl: bool,
                        timeout_s: float) -> str:
        """The decode coordinator of ``key``; LookupError(why) after ``timeout_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            addr, why = self.peer(key, own, world, nccl)
            if addr is not None:
                return addr
            left = deadline - loop.time()
            if left <= 0:
                raise LookupError(why)
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except asyncio.TimeoutError:
                pass


class _Throttle:
    """Log a repeated message once, then again every RELOG_S or when it changes."""

    def __init__(self) -> None:
        self.last = ""
        self.at = 0.0

    def due(self, message: str) -> bool:
        now = time.monotonic()
        if message != self.last or now - self.at >= RELOG_S:
            self.last, self.at = message, now
            return True
        return False

    def reset(self) -> None:
        self.last = ""


def _entries(value: Any) -> Optional[List[Entry]]:
    if not isinstance(value, list):
        return None
    out: List[Entry] = []
    for item in value:
        if (not isinstance(item, (list, tuple)) or len(item) != 3
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in item[:2])
                or not isinstance(item[2], str)):
            return None
        out.append((item[0], item[1], item[2]))
    return out


def _valid_nccl_id(comm_id: str) -> bool:
    try:
        return len(base64.b64decode(comm_id, validate=True)) == NCCL_ID_BYTES
    except (binascii.Error, ValueError):
        return False


class RouterClient:
    def __init__(self, cfg: NodeConfig, links: Links, session: aiohttp.ClientSession,
                 register_once: bool = False) -> None:
        self.cfg, self.links, self.session = cfg, links, session
        self.register_once = register_once
        c = cfg.connector
        self.base = c.router_addr
        self.interval_s = c.heartbeat_interval_ms / 1000.0
        self.nccl = c.communication_type == "nccl"
        self.registers_ids = self.nccl and c.role == "prefill" and cfg.node_rank == 0
        self.node_id = ""
        self.registrations = 0
        self.heartbeats = 0
        self.group_ready: Optional[bool] = None
        self.device_ip = local_ip()
        self._nccl_logged: Dict[str, str] = {}
        self._zmq_logged: Dict[str, int] = {}
        self._reg_throttle = _Throttle()
        self._hb_throttle = _Throttle()

    # -- bodies ---------------------------------------------------------------------
    def register_body(self) -> Dict[str, Any]:
        """KVNodeInfo as HTTPRouterClient::RegisterNode sends it."""
        cfg, c = self.cfg, self.cfg.connector
        now = time.time()
        return {
            "inference_addr": c.inference_addr,
            "coordinator_addr": c.coordinator_addr,
            "cluster_name": c.cluster_name,
            "group_role": WIRE_ROLE[c.role],
            "node_rank": cfg.node_rank,
            "world_size": cfg.connector_world_size,
            "devices": [{"device_id": i, "device_type": DEVICE_TYPE,
                         "device_ip": self.device_ip} for i in range(cfg.tp)],
            "start_time": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)),
            "job_id": f"{int(now * 1e6)}_{random.randint(0, 999999):06d}",
        }

    # -- loop -----------------------------------------------------------------------
    async def run(self) -> None:
        if self.register_once and not await self.register():
            log.error("RegisterNode failed and, as in KsanaLLM (PD_EMU_KSANA_REGISTER_ONCE=1), "
                      "is not tried again: this node sends no heartbeats and is never paired "
                      "(start the router before the nodes)")
            return
        while True:
            if not self.node_id:
                await self.register()
            if self.node_id:
                await self.heartbeat()
            await asyncio.sleep(self.interval_s)

    async def _post(self, path: str, body: Dict[str, Any]) -> Tuple[Optional[int], Any]:
        """(HTTP status, JSON or text), or (None, why) when the router is unreachable."""
        try:
            async with self.session.post(self.base + path, json=body,
                                         timeout=aiohttp.ClientTimeout(total=ROUTER_TIMEOUT_S)
                                         ) as rsp:
                text = await rsp.text()
                try:
                    return rsp.status, await rsp.json(content_type=None)
                except ValueError:
                    return rsp.status, text
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            return None, str(exc) or type(exc).__name__

    async def register(self) -> bool:
        status, data = await self._post("/RegisterNode", self.register_body())
        node_id = data.get("node_id") if isinstance(data, dict) else None
        if status is not None and 200 <= status < 300 and isinstance(node_id, str) and node_id:
            self.node_id = node_id
            self.registrations += 1
            self._reg_throttle.reset()
            log.info("Node successfully registered with ID: %s (router %s, %s rank %d, "
                     "world_size %d)", node_id, self.base, WIRE_ROLE[self.cfg.connector.role],
                     self.cfg.node_rank, self.cfg.connector_world_size)
            return True
        again = "" if self.register_once else f" (retrying every {self.interval_s:g}s)"
        if status is None:
            msg = f"cannot reach the router {self.base}: {data}{again}"
            if self._reg_throttle.due(msg):
                log.warning("RegisterNode: %s", msg)
        else:
            msg = (f"the router {self.base} refused the registration: HTTP {status} "
                   f"{_detail(data)}{again}")
            if self._reg_throttle.due(msg):
                log.error("RegisterNode: %s", msg)
        return False

    async def heartbeat(self) -> None:
        status, data = await self._post("/Heartbeat", {"node_id": self.node_id})
        if status is None:
            if self._hb_throttle.due(str(data)):
                log.error("Failed to send heartbeat: cannot reach the router %s: %s",
                          self.base, data)
            return
        if (status in (404, 500) or "不存在" in str(data)) and self.register_once:
            if self._hb_throttle.due(f"{status}"):
                log.error("Failed to send heartbeat: HTTP %d %s (the router does not know node "
                          "%s; PD_EMU_KSANA_REGISTER_ONCE=1: not registering again)", status,
                          _detail(data), self.node_id)
            return
        if status in (404, 500) or "不存在" in str(data):
            log.warning("the router no longer knows node %s (heartbeat answered HTTP %d: %s): "
                        "registering again", self.node_id, status, _detail(data))
            self.node_id = ""
            await self.register()
            return
        if status != 200 or not isinstance(data, dict):
            if self._hb_throttle.due(f"{status}"):
                log.error("Failed to send heartbeat: HTTP %d %s", status, _detail(data))
            return
        self._hb_throttle.reset()
        self.heartbeats += 1
        await self._process(data)

    # -- heartbeat answers ------------------------------------------------------------
    async def _process(self, data: Dict[str, Any]) -> None:
        ready = data.get("group_ready")
        if isinstance(ready, bool) and ready != self.group_ready:
            self.group_ready = ready
            log.info("router: this node's group is %s", "ready" if ready else "not ready")
        raw_ids = data.get("comm_group_to_id") or {}
        raw_addrs = data.get("comm_group_to_address") or {}
        if not isinstance(raw_ids, dict) or not isinstance(raw_addrs, dict):
            log.error("heartbeat answer: comm_group_to_id / comm_group_to_address are not "
                      "objects: %r", data)
            return
        ids = {k: v for k, v in raw_ids.items() if isinstance(v, str)}
        addrs: Dict[str, List[Entry]] = {}
        for key, value in raw_addrs.items():
            entries = _entries(value)
            if entries is None:
                log.error("heartbeat answer: bad comm_group_to_address[%s]: %r", key, value)
                continue
            addrs[key] = entries
        self.links.update(ids, addrs)
        self._zmq_groups(addrs)
        if self.nccl:
            await self._nccl_groups(ids)

    def _zmq_groups(self, addrs: Dict[str, List[Entry]]) -> None:
        want = 2 * self.cfg.connector_world_size
        for key, entries in addrs.items():
            n = len(entries)
            if not n or self._zmq_logged.get(key) == n:
                continue
            self._zmq_logged[key] = n
            if n == want:
                log.info("ZeroMQ communication group %s initialized", key)
            else:
                log.warning("Address tuples size mismatch for group %s: %d vs %d: the ZMQ "
                            "link needs prefill and decode groups of the same world_size "
                            "(this node's is %d); the pair stays unlinked", key, n, want,
                            self.cfg.connector_world_size)

    async def _nccl_groups(self, ids: Dict[str, str]) -> None:
        for key, comm_id in ids.items():
            if not comm_id:
                if not self.registers_ids:
                    continue
                comm_id = base64.b64encode(os.urandom(NCCL_ID_BYTES)).decode()
                if not await self.register_comm_id(key, comm_id):
                    continue
                self.links.set_id(key, comm_id)
            if self._nccl_logged.get(key) == comm_id:
                continue
            self._nccl_logged[key] = comm_id
            if not _valid_nccl_id(comm_id):
                log.error("Invalid NCCL ID size for group %s", key)
                continue
            log.info("NCCL communication group %s initialized", key)

    async def register_comm_id(self, key: str, comm_id: str) -> bool:
        status, data = await self._post("/RegisterCommId", {
            "node_id": self.node_id, "comm_key": key, "comm_id": comm_id})
        if status is None:
            log.error("Failed to register Communication ID for %s: %s", key, data)
            return False
        if not isinstance(data, dict) or "detail" in data or status >= 400:
            log.error("Failed to register Comm ID for %s: HTTP %d %s", key, status,
                      _detail(data))
            return False
        returned = data.get("comm_id")
        if returned is not None and returned != comm_id:
            log.error("comm ID mismatch for %s: the router returned another id", key)
            return False
        log.info("Successfully registered Communication ID for communication group %s", key)
        return True


def _detail(data: Any) -> str:
    if isinstance(data, dict) and "detail" in data:
        return str(data["detail"])
    text = str(data).strip()
    return text[:300] if text else "(empty body)"
