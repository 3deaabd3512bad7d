"""An asyncio client of etcd's v3 JSON gateway (aiohttp), enough for xLLM's registry.

Used calls: ``/v3/kv/put``, ``/v3/kv/range``, ``/v3/kv/deleterange``, ``/v3/kv/txn``
(create-if-absent), ``/v3/lease/grant``, ``/v3/lease/keepalive``, ``/v3/lease/revoke``
and the streaming ``/v3/watch`` (newline-delimited JSON). Keys and values are str; the
gateway's base64 and string-encoded int64s are handled here. Every failure raises
``EtcdError``. No authentication (ETCD_USERNAME/ETCD_PASSWORD are not supported).
"""
from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import dataclass
from typing import Any, AsyncIterator, Dict, List, Optional, Tuple

import aiohttp


class EtcdError(Exception):
    pass


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(text: Optional[str]) -> str:
    return base64.b64decode(text or "").decode("utf-8", "replace")


def prefix_end(prefix: str) -> str:
    """The range_end that selects every key starting with ``prefix``."""
    raw = bytearray(prefix.encode())
    while raw:
        if raw[-1] < 0xFF:
            raw[-1] += 1
            return base64.b64encode(bytes(raw)).decode()
        raw.pop()
    return base64.b64encode(b"\0").decode()


def namespaced(namespace: str, key: str) -> str:
    """xLLM's rule: ``--etcd_namespace=ns`` prefixes every key with ``/ns/`` (slashes
    stripped from ns); an empty namespace adds nothing."""
    ns = namespace.strip("/")
    return f"/{ns}/{key}" if ns else key


@dataclass
class Event:
    kind: str  # PUT | DELETE
    key: str
    value: str
    revision: int


class Etcd:
    def __init__(self, addr: str, session: aiohttp.ClientSession, timeout_s: float = 3.0) -> None:
        addr = addr.strip()
        self.base = addr.rstrip("/") if "://" in addr else f"http://{addr}"
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def _call(self, path: str, body: Dict[str, Any]) -> Dict[str, Any]:
        url = self.base + path
        try:
            async with self.session.post(url, json=body, timeout=self.timeout) as rsp:
                text = await rsp.text()
                status = rsp.status
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            raise EtcdError(f"etcd {self.base} unreachable ({path}): "
                            f"{exc or type(exc).__name__}") from None
        try:
            data = json.loads(text) if text else {}
        except ValueError:
            raise EtcdError(f"etcd {self.base}{path}: HTTP {status}, not JSON: "
                            f"{text[:200]!r}") from None
        if status != 200 or (isinstance(data, dict) and "error" in data and "header" not in data):
            msg = data.get("message") or data.get("error") if isinstance(data, dict) else text
            raise EtcdError(f"etcd {self.base}{path}: HTTP {status}: {msg}")
        return data

    # -- kv --------------------------------------------------------------------------
    async def put(self, key: str, value: str, lease: int = 0) -> int:
        body: Dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        data = await self._call("/v3/kv/put", body)
        return int(data.get("header", {}).get("revision", 0))

    async def get(self, key: str) -> Optional[str]:
        data = await self._call("/v3/kv/range", {"key": _b64(key)})
        kvs = data.get("kvs") or []
        return _unb64(kvs[0].get("value")) if kvs else None

    async def range_prefix(self, prefix: str) -> Tuple[int, List[Tuple[str, str]]]:
        """(revision, [(key, value)]) of every key under ``prefix``."""
        data = await self._call("/v3/kv/range",
                                {"key": _b64(prefix), "range_end": prefix_end(prefix)})
        rev = int(data.get("header", {}).get("revision", 0))
        return rev, [(_unb64(kv.get("key")), _unb64(kv.get("value")))
                     for kv in data.get("kvs") or []]

    async def delete(self, key: str) -> int:
        data = await self._call("/v3/kv/deleterange", {"key": _b64(key)})
        return int(data.get("deleted", 0))

    async def create_if_absent(self, key: str, value: str, lease: int = 0
                               ) -> Tuple[bool, Optional[str]]:
        """Txn: put ``key`` only if it does not exist. (created, value now in etcd)."""
        put: Dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            put["lease"] = str(lease)
        data = await self._call("/v3/kv/txn", {
            "compare": [{"key": _b64(key), "target": "CREATE", "result": "EQUAL",
                         "create_revision": "0"}],
            "success": [{"request_put": put}],
            "failure": [{"request_range": {"key": _b64(key)}}],
        })
        if data.get("succeeded"):
            return True, value
        for r in data.get("responses") or []:
            kvs = (r.get("response_range") or {}).get("kvs") or []
            if kvs:
                return False, _unb64(kvs[0].get("value"))
        return False, None

    # -- leases ----------------------------------------------------------------------
    async def grant(self, ttl: int) -> int:
        data = await self._call("/v3/lease/grant", {"TTL": str(ttl)})
        return int(data["ID"])

    async def keepalive(self, lease: int) -> int:
        """Remaining TTL after the refresh; 0 when the lease is gone (expired/revoked)."""
        data = await self._call("/v3/lease/keepalive", {"ID": str(lease)})
        return int((data.get("result") or data).get("TTL", 0))

    async def revoke(self, lease: int) -> None:
        try:
            await self._call("/v3/lease/revoke", {"ID": str(lease)})
        except EtcdError as exc:
            if "not found" not in str(exc):
                raise

    # -- watch -----------------------------------------------------------------------
    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[Event]:
        """Events under ``prefix`` from ``start_revision`` until the stream ends (then
        EtcdError: the caller resyncs)."""
        body = {"create_request": {"key": _b64(prefix), "range_end": prefix_end(prefix),
                                   "start_revision": str(start_revision)}}
        try:
            async with self.session.post(
                    self.base + "/v3/watch", json=body,
                    timeout=aiohttp.ClientTimeout(total=None, connect=self.timeout.total,
                                                  sock_read=None)) as rsp:
                if rsp.status != 200:
                    raise EtcdError(f"etcd watch: HTTP {rsp.status}")
                buf = b""
                while True:
                    chunk = await rsp.content.readany()
                    if not chunk:
                        break
                    buf += chunk
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        if not line.strip():
                            continue
                        msg = json.loads(line).get("result") or {}
                        if msg.get("canceled") or msg.get("compact_revision"):
                            raise EtcdError(f"etcd watch canceled: {msg.get('cancel_reason')}")
                        for ev in msg.get("events") or []:
                            kv = ev.get("kv") or {}
                            yield Event(ev.get("type", "PUT"), _unb64(kv.get("key")),
                                        _unb64(kv.get("value")), int(kv.get("mod_revision", 0)))
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise EtcdError(f"etcd watch on {self.base} broke: {exc or type(exc).__name__}"
                            ) from None
        raise EtcdError("etcd watch stream ended")
