"""List the nodes of FastDeploy's splitwise scheduler in Redis and check the roles.

    python -m pd_launcher.redis_nodes --config REDIS_CONF --topic TOPIC
        [--expect prefill --expect decode] [--max-age-ms 3000] [--timeout S] [--host H]

Redis is found through its config file (the one pd-deploy writes): the first address
of ``bind`` (``*``/``0.0.0.0`` -> 127.0.0.1, ``::``/``::*`` -> ::1, 127.0.0.1 when
there is no bind; --host overrides it), ``port`` (6379) and ``requirepass``. Lines are
``key value ...`` with Redis' quoting ("..." with \\n \\t \\xHH escapes, '...');
``#`` starts a comment line. The password is sent with AUTH and never printed.

Every instance of the scheduler writes ``HSET <topic>.cluster <node id> <json>`` with
``{"ts": <unix seconds>, "role": "prefill|decode|mixed", "load": n, "host": ip, ...}``
and is not scheduled once its ``ts`` is older than the expire period (3 s by
default: --max-age-ms). Output: a header, one line per node, one line per --expect:

    2 node(s) in demo.cluster at Redis 127.0.1.6:6379
    decode 127.0.1.2 load 3 age 9.1s STALE
    prefill 127.0.1.1 load 0 age 0.4s
    present: prefill (1 live)
    missing: decode (no live node in demo.cluster)

A role counts only its own entries (a ``mixed`` node is neither prefill nor decode).

Exit codes: 0 every expected role has a live node, 1 some have none, 2 Redis is
unreachable, refuses the password or answers an error, an unreadable config file, or
bad arguments (messages name host:port, never the password).

``Resp(host, port, timeout)`` is a minimal synchronous RESP2 client:
``Resp.command("HGETALL", key)`` returns the decoded reply (simple strings as str,
bulk strings as bytes, integers, None for nil, lists for arrays) and raises
``RespError`` with the server's message for an error reply.
"""
from __future__ import annotations

import argparse
import json
import math
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any, Union

EXIT_OK = 0
EXIT_MISSING = 1
EXIT_ERROR = 2
DEFAULT_PORT = 6379
MAX_LINE = 64 * 1024
MAX_BULK = 512 * 1024 * 1024  # Redis' proto-max-bulk-len default

Arg = Union[str, bytes, int, float]


class RespError(Exception):
    """An error reply of the server; str() is the server's message."""


class RespProtocolError(ConnectionError):
    """The server closed the connection or sent something that is not RESP2."""


def encode_command(args: tuple[Arg, ...]) -> bytes:
    """A command as the RESP2 array of bulk strings that Redis expects."""
    if not args:
        raise ValueError("a command needs at least its name")
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode("utf-8")
        elif isinstance(arg, (int, float)) and not isinstance(arg, bool):
            data = repr(arg).encode("ascii")
        else:
            raise TypeError(f"cannot send a {type(arg).__name__} to Redis")
        out += [b"$%d\r\n" % len(data), data, b"\r\n"]
    return b"".join(out)


class Resp:
    """One connection to Redis (opened by the first command; close() or `with`)."""

    def __init__(self, host: str, port: int, timeout: float = 3.0) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._file: Any = None

    def __enter__(self) -> Resp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        self.close()
        self._sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        self._file = self._sock.makefile("rb")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def command(self, *args: Arg) -> Any:
        """Send one command and return its reply; RespError for an error reply,
        OSError (RespProtocolError, timeouts) when the connection fails (it is closed)."""
        payload = encode_command(args)
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        try:
            self._sock.sendall(payload)
            reply = self._reply()
        except OSError:
            self.close()
            raise
        errors = [x for x in (reply if isinstance(reply, list) else [reply])
                  if isinstance(x, RespError)]
        if errors:
            raise errors[0]
        return reply

    # ---------------------------------------------------------------- parsing

    def _line(self) -> bytes:
        line = self._file.readline(MAX_LINE)
        if not line:
            raise RespProtocolError("the server closed the connection")
        if not line.endswith(b"\r\n"):
            raise RespProtocolError(f"bad reply line {line[:60]!r}")
        return line[:-2]

    def _int(self, text: bytes) -> int:
        try:
            return int(text)
        except ValueError:
            raise RespProtocolError(f"bad number in reply: {text[:60]!r}") from None

    def _reply(self) -> Any:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode("utf-8", "replace")
        if kind == b"-":
            return RespError(rest.decode("utf-8", "replace"))
        if kind == b":":
            return self._int(rest)
        if kind == b"$":
            size = self._int(rest)
            if size == -1:
                return None
            if size < 0 or size > MAX_BULK:
                raise RespProtocolError(f"bad bulk string length {size}")
            data = self._file.read(size + 2)
            if len(data) < size + 2:
                raise RespProtocolError("the server closed the connection")
            if data[-2:] != b"\r\n":
                raise RespProtocolError("bulk string not followed by CRLF")
            return data[:-2]
        if kind == b"*":
            count = self._int(rest)
            if count == -1:
                return None
            if count < 0:
                raise RespProtocolError(f"bad array length {count}")
            return [self._reply() for _ in range(count)]
        raise RespProtocolError(f"unknown reply type {line[:60]!r}")


# --------------------------------------------------------------------------- config


def split_config_line(line: bytes) -> list[bytes]:
    """The arguments of one redis.conf line, with Redis' quoting rules.

    ValueError for unbalanced quotes or a closing quote not followed by a space
    (the message never quotes the line: it may hold the password)."""
    args: list[bytes] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i:i + 1].isspace():
            i += 1
        if i >= n:
            return args
        cur = bytearray()
        quote = b""
        while True:
            if i >= n:
                if quote:
                    raise ValueError("unbalanced quotes")
                break
            c = line[i:i + 1]
            if quote == b'"':
                if c == b"\\" and line[i + 1:i + 2] == b"x" and _is_hex(line[i + 2:i + 4]):
                    cur.append(int(line[i + 2:i + 4], 16))
                    i += 4
                    continue
                if c == b"\\" and i + 1 < n:
                    nxt = line[i + 1:i + 2]
                    cur += {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"b": b"\b",
                            b"a": b"\a"}.get(nxt, nxt)
                    i += 2
                    continue
                if c == b'"':
                    if i + 1 < n and not line[i + 1:i + 2].isspace():
                        raise ValueError("closing quote must be followed by a space")
                    i += 1
                    break
                cur += c
            elif quote == b"'":
                if c == b"\\" and line[i + 1:i + 2] == b"'":
                    cur += b"'"
                    i += 2
                    continue
                if c == b"'":
                    if i + 1 < n and not line[i + 1:i + 2].isspace():
                        raise ValueError("closing quote must be followed by a space")
                    i += 1
                    break
                cur += c
            else:
                if c.isspace():
                    break
                if c in (b'"', b"'"):
                    quote = c
                else:
                    cur += c
            i += 1
        args.append(bytes(cur))


def _is_hex(two: bytes) -> bool:
    return len(two) == 2 and all(ch in b"0123456789abcdefABCDEF" for ch in two)


@dataclass
class RedisConfig:
    host: str
    port: int
    password: bytes | None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def connect_host(bind: str | None) -> str:
    """The address to reach a server whose first ``bind`` address is `bind`."""
    addr = (bind or "").lstrip("-")
    if addr in ("", "*", "0.0.0.0"):
        return "127.0.0.1"
    if addr in ("::", "::*"):
        return "::1"
    return addr


def parse_config(data: bytes, path: str = "redis.conf") -> RedisConfig:
    """bind (first address), port and requirepass of a redis.conf (the last line of a
    key wins, as in Redis). ValueError naming `path` and the line number."""
    bind: str | None = None
    port = DEFAULT_PORT
    password: bytes | None = None
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        line = raw.strip(b" \t\r\n")
        if not line or line.startswith(b"#"):
            continue
        try:
            args = split_config_line(line)
        except ValueError as exc:
            raise ValueError(f"{path} line {lineno}: {exc}") from None
        if not args:
            continue
        key = args[0].lower()
        if key == b"bind" and len(args) > 1:
            bind = args[1].decode("utf-8", "replace")
        elif key == b"port" and len(args) > 1:
            try:
                port = int(args[1])
            except ValueError:
                raise ValueError(f"{path} line {lineno}: bad port "
                                 f"{args[1].decode('utf-8', 'replace')!r}") from None
        elif key == b"requirepass" and len(args) > 1:
            password = args[1] or None
    if not 0 < port < 65536:
        raise ValueError(f"{path}: port {port} (Redis listens on no TCP port)")
    return RedisConfig(host=connect_host(bind), port=port, password=password)


def read_config(path: str) -> RedisConfig:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    return parse_config(data, path)


# --------------------------------------------------------------------------- nodes


@dataclass
class Node:
    field: str
    role: str
    host: str
    load: Any
    age: float | None  # seconds; None: no usable ts
    live: bool

    def line(self) -> str:
        if self.role == "?" and self.age is None:
            return f"? unreadable entry {self.field}"
        age = "no ts" if self.age is None else f"age {self.age:.1f}s"
        text = f"{self.role} {self.host} load {self.load} {age}"
        return text if self.live else text + " STALE"


def parse_nodes(pairs: list[Any], now: float, max_age_s: float) -> list[Node]:
    """Nodes of an HGETALL reply (field, value, field, value, ...), sorted by role and
    host. A node is live when its ts is at most max_age_s old (a ts in the future
    counts as live, as in the scheduler)."""
    nodes: list[Node] = []
    for i in range(0, len(pairs) - 1, 2):
        field = _text(pairs[i])
        try:
            info = json.loads(_text(pairs[i + 1]))
        except ValueError:
            info = None
        if not isinstance(info, dict):
            nodes.append(Node(field, "?", "?", "?", None, False))  # not a JSON object
            continue
        ts = info.get("ts")
        ok = isinstance(ts, (int, float)) and not isinstance(ts, bool) and math.isfinite(ts)
        age = now - ts if ok else None
        nodes.append(Node(field, str(info.get("role", "?")), str(info.get("host", "?")),
                          info.get("load", "?"), age,
                          age is not None and age <= max_age_s))
    return sorted(nodes, key=lambda n: (n.role, n.host, n.field))


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def fetch_nodes(cfg: RedisConfig, key: str, timeout: float) -> list[Any]:
    """AUTH (when the config has a password), PING, then HGETALL key."""
    with Resp(cfg.host, cfg.port, timeout) as r:
        if cfg.password is not None:
            r.command("AUTH", cfg.password)
        pong = r.command("PING")
        if pong != "PONG":
            raise RespProtocolError(f"PING answered {pong!r}")
        reply = r.command("HGETALL", key)
    if not isinstance(reply, list):
        raise RespProtocolError(f"HGETALL {key} answered {type(reply).__name__}")
    return reply


# --------------------------------------------------------------------------- command


def _positive(text: str) -> float:
    try:
        val = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not val > 0 or math.isinf(val):
        raise argparse.ArgumentTypeError(f"must be a positive number: {text!r}")
    return val


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pd_launcher.redis_nodes",
        description="List FastDeploy's splitwise scheduler nodes in Redis "
                    "(<topic>.cluster) and check that the expected roles are live.")
    p.add_argument("--config", required=True, metavar="REDIS_CONF",
                   help="the redis.conf (bind, port, requirepass)")
    p.add_argument("--topic", required=True, help="FastDeploy's --scheduler-topic")
    p.add_argument("--expect", action="append", default=[], metavar="ROLE",
                   help="a role that needs a live node: prefill, decode, mixed (repeatable)")
    p.add_argument("--max-age-ms", type=_positive, default=3000.0, metavar="MS",
                   help="a node older than this is stale (default 3000: FastDeploy's "
                        "--scheduler-expire-period)")
    p.add_argument("--timeout", type=_positive, default=3.0, metavar="S",
                   help="seconds for connecting and for each reply (default 3)")
    p.add_argument("--host", help="connect to this address instead of the config's bind")
    return p


def _redact(message: str, password: bytes | None) -> str:
    if password:
        for form in {password.decode("utf-8", "replace"), repr(password)[2:-1]}:
            if form:
                message = message.replace(form, "***")
    return message


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = read_config(args.config)
    except ValueError as exc:
        sys.stderr.write(f"redis_nodes: {exc}\n")
        return EXIT_ERROR
    if args.host:
        cfg.host = args.host
    key = f"{args.topic}.cluster"
    try:
        reply = fetch_nodes(cfg, key, args.timeout)
    except RespError as exc:
        what = "refused the password" if cfg.password is not None and (
            "WRONGPASS" in str(exc) or "invalid password" in str(exc)) else "answered an error"
        sys.stderr.write(f"redis_nodes: Redis {cfg.address} {what}: "
                         f"{_redact(str(exc), cfg.password)}\n")
        return EXIT_ERROR
    except OSError as exc:
        sys.stderr.write(f"redis_nodes: cannot reach Redis {cfg.address}: "
                         f"{_redact(str(exc.strerror or exc), cfg.password)}\n")
        return EXIT_ERROR
    nodes = parse_nodes(reply, time.time(), args.max_age_ms / 1000.0)
    out = [f"{len(nodes)} node(s) in {key} at Redis {cfg.address}"]
    out += [n.line() for n in nodes]
    missing = False
    for role in args.expect:
        live = sum(1 for n in nodes if n.live and n.role == role)
        if live:
            out.append(f"present: {role} ({live} live)")
        else:
            missing = True
            out.append(f"missing: {role} (no live node in {key})")
    sys.stdout.write("\n".join(out) + "\n")
    return EXIT_MISSING if missing else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
