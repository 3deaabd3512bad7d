"""A small synchronous client of etcd's v3 JSON gateway (standard library only).

    gw = EtcdGateway("10.0.0.9:2379")          # or "http://10.0.0.9:2379"
    lease = gw.grant(30)
    gw.put("/demo/XLLM:PREFILL:10.0.0.5:8010", "{...}", lease=lease)
    gw.get("/demo/XLLM:PREFILL:10.0.0.5:8010")  # -> "{...}" or None
    gw.range_prefix("/demo/")                    # -> {key: value} in key order

It speaks the gRPC gateway that every etcd >= 3.4 serves on its client URL
(``POST /v3/kv/put``, ``/v3/kv/range``, ``/v3/kv/deleterange``, ``/v3/lease/grant``,
``/v3/lease/keepalive``, ``/v3/lease/revoke``; ``GET /health``). Keys and values are
str (UTF-8); the base64 the gateway wants is handled here. Lease ids are ints.

Requests never go through a proxy: http_proxy / https_proxy / ALL_PROXY are ignored
(etcd is a cluster-internal address). Every failure raises ``EtcdError``, whose
message names the endpoint, the operation and what failed (unreachable, HTTP status
with etcd's message, a reply that is not JSON). Authentication is not supported.
"""
from __future__ import annotations

import base64
import http.client
import json
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

_GRPC_NOT_FOUND = 5


class EtcdError(Exception):
    """An etcd request failed; ``status`` is the HTTP status when there was one and
    ``code`` etcd's gRPC code when its reply carried one."""

    def __init__(self, message: str, endpoint: str = "", status: int | None = None,
                 code: int | None = None) -> None:
        super().__init__(message)
        self.endpoint = endpoint
        self.status = status
        self.code = code


def normalize_endpoint(endpoint: str) -> str:
    """``ip:port`` -> ``http://ip:port``; a trailing slash is dropped.

    Raises EtcdError for anything that is not an http(s) URL with a host.
    """
    text = (endpoint or "").strip().rstrip("/")
    url = text if "://" in text else "http://" + text
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError for a bad port
    except ValueError as exc:
        raise EtcdError(f"bad etcd endpoint {endpoint!r}: {exc}", endpoint) from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path:
        raise EtcdError(f"bad etcd endpoint {endpoint!r}: expected http://IP:PORT or IP:PORT",
                        endpoint)
    return url


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def _unb64(data: str) -> str:
    return base64.b64decode(data or "").decode("utf-8", "replace")


def prefix_range_end(prefix: bytes) -> bytes:
    """The range_end that selects every key starting with `prefix` (etcd's rule:
    the prefix with its last byte below 0xff incremented; b"\\0" means all keys)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return b"\0"
    return stripped[:-1] + bytes([stripped[-1] + 1])


def _reply_error(body: Any) -> tuple[str, int | None] | None:
    """etcd's error message and gRPC code inside a JSON reply, if it holds one."""
    if not isinstance(body, dict) or "error" not in body:
        return None
    err = body["error"]
    if isinstance(err, dict):  # streaming calls: {"error": {"grpc_code", "message"}}
        return str(err.get("message") or err), err.get("grpc_code")
    return str(body.get("message") or err), body.get("code")


def _parse_json(raw: bytes) -> Any:
    """A reply: one JSON document, or the first line of a streamed reply."""
    text = raw.decode("utf-8", "replace").strip()
    try:
        return json.loads(text)
    except ValueError:
        first = text.split("\n", 1)[0]
        return json.loads(first)


class EtcdGateway:
    """Synchronous etcd v3 client over the JSON gateway; see the module docstring."""

    def __init__(self, endpoint: str, timeout: float = 3.0) -> None:
        self.endpoint = normalize_endpoint(endpoint)
        self.timeout = float(timeout)
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def __repr__(self) -> str:
        return f"EtcdGateway({self.endpoint!r})"

    # ------------------------------------------------------------------ transport

    def _error(self, what: str, detail: str, status: int | None = None,
               code: int | None = None) -> EtcdError:
        return EtcdError(f"etcd {self.endpoint}: {what}: {detail}", self.endpoint,
                         status, code)

    def _send(self, what: str, path: str, body: dict | None) -> tuple[int, bytes]:
        """(HTTP status, raw reply) of one request; raises EtcdError when unreachable."""
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(self.endpoint + path, data=data,
                                     method="GET" if body is None else "POST")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with self._opener.open(req, timeout=self.timeout) as rsp:
                return rsp.status, rsp.read()
        except urllib.error.HTTPError as exc:
            try:
                raw = exc.read()
            except (OSError, http.client.HTTPException):
                raw = b""
            return exc.code, raw
        except urllib.error.URLError as exc:
            raise self._error(what, f"unreachable ({exc.reason})") from None
        except (OSError, http.client.HTTPException) as exc:
            raise self._error(what, f"unreachable ({str(exc) or type(exc).__name__})") \
                from None

    def _call(self, what: str, path: str, body: dict | None) -> dict:
        """The JSON object etcd replied with; EtcdError for any failure."""
        status, raw = self._send(what, path, body)
        try:
            reply = _parse_json(raw)
        except ValueError:
            reply = None
        err = _reply_error(reply)
        if status != 200 or err:
            message = err[0] if err else raw.decode("utf-8", "replace").strip()[:200]
            code = err[1] if err else None
            raise self._error(what, f"HTTP {status}: {message or 'no message'}", status, code)
        if not isinstance(reply, dict):
            shown = raw.decode("utf-8", "replace").strip()[:200]
            raise self._error(what, f"bad JSON in the reply: {shown!r}", status)
        return reply

    # ------------------------------------------------------------------ kv

    def put(self, key: str, value: str, lease: int | None = None) -> None:
        """Set `key` to `value`, attached to `lease` when given."""
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(int(lease))
        self._call(f"put {key!r}", "/v3/kv/put", body)

    def get(self, key: str) -> str | None:
        """The value of `key`, None when it does not exist."""
        reply = self._call(f"get {key!r}", "/v3/kv/range", {"key": _b64(key)})
        kvs = reply.get("kvs") or []
        return _unb64(kvs[0].get("value", "")) if kvs else None

    def range_prefix(self, prefix: str) -> dict[str, str]:
        """Every key starting with `prefix` and its value, in key (byte) order."""
        raw = prefix.encode("utf-8")
        body = {"key": base64.b64encode(raw or b"\0").decode("ascii"),
                "range_end": base64.b64encode(prefix_range_end(raw)).decode("ascii")}
        reply = self._call(f"range {prefix!r}", "/v3/kv/range", body)
        return {_unb64(kv.get("key", "")): _unb64(kv.get("value", ""))
                for kv in reply.get("kvs") or []}

    def delete(self, key: str) -> int:
        """Delete `key`; the number of keys deleted (0 or 1)."""
        reply = self._call(f"delete {key!r}", "/v3/kv/deleterange", {"key": _b64(key)})
        return int(reply.get("deleted") or 0)

    # ------------------------------------------------------------------ leases

    def grant(self, ttl: int) -> int:
        """A new lease of `ttl` seconds (etcd may raise a tiny TTL); its id."""
        what = f"grant lease of {int(ttl)}s"
        reply = self._call(what, "/v3/lease/grant", {"TTL": str(int(ttl))})
        try:
            return int(reply["ID"])
        except (KeyError, TypeError, ValueError):
            raise self._error(what, f"reply without a lease ID: {reply!r}") from None

    def keepalive(self, lease: int) -> int:
        """Refresh `lease` once; its remaining TTL in seconds (0: expired or unknown)."""
        reply = self._call(f"keepalive lease {int(lease)}", "/v3/lease/keepalive",
                           {"ID": str(int(lease))})
        result = reply.get("result", reply)
        return int(result.get("TTL") or 0) if isinstance(result, dict) else 0

    def revoke(self, lease: int) -> None:
        """Revoke `lease`, deleting its keys; a lease already gone is not an error."""
        try:
            self._call(f"revoke lease {int(lease)}", "/v3/lease/revoke",
                       {"ID": str(int(lease))})
        except EtcdError as exc:
            if exc.code != _GRPC_NOT_FOUND:
                raise

    # ------------------------------------------------------------------ health

    def health(self) -> bool:
        """GET /health: True when etcd reports itself healthy, False when it answers
        unhealthy (HTTP 503, "health": "false"); EtcdError when unreachable or garbled."""
        status, raw = self._send("health", "/health", None)
        try:
            reply = _parse_json(raw)
        except ValueError:
            reply = None
        if not isinstance(reply, dict) or "health" not in reply:
            shown = raw.decode("utf-8", "replace").strip()[:200]
            raise self._error("health", f"HTTP {status}, not a health reply: {shown!r}", status)
        return status == 200 and str(reply["health"]).lower() == "true"
