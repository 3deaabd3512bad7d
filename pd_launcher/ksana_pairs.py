"""What KsanaLLM's simple_router knows, read from its sqlite database (the real router's
or the emulator's stand-in's: same tables and value formats):
``python -m pd_launcher.ksana_pairs --db PATH [--cluster NAME] [--expect-pair]
[--max-age SECONDS] [--explain]``.

* ``--expect-pair`` (the readiness gate): exit 0 when at least one ``comm_group_pair``
  (of ``--cluster``, else of any cluster) is active, has its NCCL id
  (``data_channel_meta`` not empty) and its prefill and decode rank-0 nodes are online:
  the router can route a request then. Otherwise exit 1 and say what is missing (no
  prefill registered, decode offline, no pair yet, pair waiting for its NCCL id, ...).
* ``--explain`` (the default without --expect-pair): a table of the nodes (role,
  inference_addr, coordinator_addr, rank, devices, online, seconds since the last
  heartbeat) and of the pairs (key, active, id registered), exit 0.

Exit 1 also when the database is missing or unreadable or has no router tables yet.
The file is opened read-only (``file:...?mode=ro``), so the router is never locked out
for longer than one read. ``online`` is the router's own flag: the router marks a node
offline only while some node of its cluster still sends heartbeats, and rows of an
earlier run stay as they were; ``--max-age SECONDS`` makes ``--expect-pair`` count a node
whose last heartbeat is older than that as offline too.
"""
from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import urllib.parse
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, List, Optional, Sequence

PROG = "python -m pd_launcher.ksana_pairs"
TABLES = ("node_info", "comm_group_pair", "inference_group_status")


class DBError(Exception):
    """The database cannot be read (exit 1)."""


@dataclass
class Node:
    cluster: str
    role: str
    inference_addr: str
    coordinator_addr: str
    rank: int
    world_size: int
    devices: int
    online: bool
    age_s: Optional[float]


@dataclass
class Pair:
    cluster: str
    key: str
    prefill_addr: str
    decode_addr: str
    active: bool
    comm_id: str


@dataclass
class Group:
    cluster: str
    role: str
    inference_addr: str
    world_size: int
    online_devices: int
    ready: bool


@dataclass
class State:
    nodes: List[Node]
    pairs: List[Pair]
    groups: List[Group]
    max_age: Optional[float] = None  # --max-age: older heartbeats count as offline

    def alive(self, node: Node) -> bool:
        if not node.online:
            return False
        return self.max_age is None or (node.age_s is not None and
                                        node.age_s <= self.max_age)


# -- reading ------------------------------------------------------------------------------

def parse_stamp(value: Any) -> Optional[datetime]:
    """A stored DateTime (``YYYY-MM-DD HH:MM:SS[.ffffff]``, UTC) as an aware datetime."""
    if not isinstance(value, str) or not value:
        return None
    try:
        dt = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def json_text(value: Any) -> str:
    """A JSON column holding a string (data_channel_meta): '"abc"' -> 'abc'."""
    if value is None:
        return ""
    try:
        decoded = json.loads(value)
    except (TypeError, ValueError):
        return str(value)
    return decoded if isinstance(decoded, str) else ("" if decoded is None else str(decoded))


def connect(path: str) -> sqlite3.Connection:
    if not os.path.exists(path):
        raise DBError(f"router database {path} does not exist (not started yet, or another "
                      "sqlite_path in its ini?)")
    if not os.path.isfile(path):
        raise DBError(f"router database {path} is not a file")
    uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=5.0)
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE "
                                            "type = 'table'")}
    except sqlite3.Error as exc:
        raise DBError(f"cannot read the router database {path}: {exc}") from None
    missing = [t for t in TABLES if t not in names]
    if missing:
        conn.close()
        raise DBError(f"router database {path} has no table {', '.join(missing)} yet (the "
                      "router creates them when it starts)")
    conn.row_factory = sqlite3.Row
    return conn


def _where(cluster: Optional[str]) -> str:
    return " WHERE cluster_name = ?" if cluster is not None else ""


def _args(cluster: Optional[str]) -> Sequence[str]:
    return (cluster,) if cluster is not None else ()


def read_state(conn: sqlite3.Connection, cluster: Optional[str],
               now: Optional[datetime] = None) -> State:
    now = now or datetime.now(timezone.utc)
    try:
        node_rows = conn.execute(
            "SELECT cluster_name, role, inference_addr, coordinator_addr, node_rank, "
            "world_size, device_num, is_online, last_heartbeat FROM node_info"
            + _where(cluster) + " ORDER BY cluster_name, role DESC, inference_addr, "
            "node_rank", _args(cluster)).fetchall()
        pair_rows = conn.execute(
            "SELECT cluster_name, comm_key, prefill_addr, decode_addr, is_active, "
            "data_channel_meta FROM comm_group_pair" + _where(cluster) + " ORDER BY id",
            _args(cluster)).fetchall()
        group_rows = conn.execute(
            "SELECT cluster_name, role, inference_addr, world_size_expected, "
            "online_device_sum, is_ready FROM inference_group_status" + _where(cluster)
            + " ORDER BY id", _args(cluster)).fetchall()
    except sqlite3.Error as exc:
        raise DBError(f"cannot read the router tables: {exc}") from None
    nodes = []
    for r in node_rows:
        beat = parse_stamp(r["last_heartbeat"])
        nodes.append(Node(r["cluster_name"], r["role"], r["inference_addr"],
                          r["coordinator_addr"], int(r["node_rank"]), int(r["world_size"]),
                          int(r["device_num"]), bool(r["is_online"]),
                          (now - beat).total_seconds() if beat else None))
    pairs = [Pair(r["cluster_name"], r["comm_key"], r["prefill_addr"], r["decode_addr"],
                  bool(r["is_active"]), json_text(r["data_channel_meta"]))
             for r in pair_rows]
    groups = [Group(r["cluster_name"], r["role"], r["inference_addr"],
                    int(r["world_size_expected"]), int(r["online_device_sum"]),
                    bool(r["is_ready"])) for r in group_rows]
    return State(nodes, pairs, groups)


# -- the verdict ------------------------------------------------------------------------------

def rank0(state: State, role: str, addr: str) -> Optional[Node]:
    """The rank-0 node of that group (an online one first, as the router picks)."""
    found = [n for n in state.nodes
             if n.role == role and n.inference_addr == addr and n.rank == 0]
    found.sort(key=lambda n: not state.alive(n))
    return found[0] if found else None


def _age(node: Node) -> str:
    return "never" if node.age_s is None else f"{node.age_s:.1f}s ago"


def _offline(state: State, node: Node) -> str:
    if node.online:
        return (f"silent: online at the router, but its last heartbeat was {_age(node)} "
                f"(more than --max-age {state.max_age:g}s)")
    return f"offline, last heartbeat {_age(node)}"


def _group_text(state: State, role: str, addr: str) -> str:
    for g in state.groups:
        if g.role == role and g.inference_addr == addr:
            return (f"{role} group {addr}: {g.online_devices} of {g.world_size} device(s) "
                    f"online, {'ready' if g.ready else 'not ready'}")
    return f"{role} group {addr}: no heartbeat yet"


def pair_problems(state: State, pair: Pair) -> List[str]:
    """Why this pair cannot take requests (empty: it can)."""
    out = []
    for role, addr in (("prefill", pair.prefill_addr), ("decode", pair.decode_addr)):
        node = rank0(state, role, addr)
        if node is None:
            out.append(f"no {role} rank-0 node registered at {addr}")
        elif not state.alive(node):
            out.append(f"{role} {addr} (rank 0, coordinator {node.coordinator_addr}) is "
                       f"{_offline(state, node)}")
    if not pair.active:
        out.append("inactive (" + "; ".join(_group_text(state, r, a) for r, a in
                                            (("prefill", pair.prefill_addr),
                                             ("decode", pair.decode_addr))) + ")")
    if not pair.comm_id:
        out.append("waiting for its NCCL id (the prefill's rank 0 registers it after a "
                   "heartbeat shows the pair)")
    return out


def missing(state: State) -> List[str]:
    """What stands between this state and a usable pair (empty: one is usable)."""
    if any(not pair_problems(state, p) for p in state.pairs):
        return []
    out = []
    for role in ("prefill", "decode"):
        nodes = [n for n in state.nodes if n.role == role]
        if not nodes:
            out.append(f"no {role} node registered")
        elif not any(state.alive(n) for n in nodes):
            out.append(f"every {role} node is offline or silent ("
                       + ", ".join(f"{n.inference_addr} rank {n.rank}: last heartbeat "
                                   f"{_age(n)}" for n in nodes) + ")")
    if not state.pairs and not out:
        out.append("no prefill/decode pair yet (the router creates one when a node "
                   "heartbeats after the other role's first heartbeat)")
    for p in state.pairs:
        out.append(f"pair {p.key}: " + "; ".join(pair_problems(state, p)))
    return out


# -- output ----------------------------------------------------------------------------------

def _table(header: Sequence[str], rows: List[Sequence[str]]) -> List[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    return ["  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()
            for row in [header, *rows]]


def explain(state: State, db: str, cluster: Optional[str]) -> List[str]:
    scope = f"cluster {cluster}" if cluster is not None else "all clusters"
    lines = [f"simple_router database {db} ({scope})"]
    if state.nodes:
        lines.append("nodes:")
        lines += _table(("cluster", "role", "inference_addr", "coordinator_addr", "rank",
                         "devices", "world", "online", "last heartbeat"),
                        [(n.cluster, n.role, n.inference_addr, n.coordinator_addr,
                          str(n.rank), str(n.devices), str(n.world_size),
                          "yes" if n.online else "no", _age(n)) for n in state.nodes])
    else:
        lines.append("nodes: none registered")
    if state.pairs:
        lines.append("pairs:")
        lines += _table(("cluster", "comm_key", "active", "NCCL id"),
                        [(p.cluster, p.key, "yes" if p.active else "no",
                          "registered" if p.comm_id else "not yet") for p in state.pairs])
    else:
        lines.append("pairs: none")
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Nodes and prefill/decode pairs in "
                                "KsanaLLM simple_router's sqlite database.")
    p.add_argument("--db", required=True, help="the router's sqlite file (its ini's "
                   "sqlite_path)")
    p.add_argument("--cluster", default=None, help="only this cluster_name (default: all)")
    p.add_argument("--expect-pair", action="store_true", help="exit 0 only when a pair can "
                   "take requests; else say what is missing and exit 1")
    p.add_argument("--max-age", type=float, default=None, metavar="SECONDS",
                   help="for --expect-pair, a node whose last heartbeat is older counts as "
                   "offline (the router's flag lags: it is updated only on heartbeats; "
                   "rows of an earlier run stay online)")
    p.add_argument("--explain", action="store_true", help="print the nodes and pairs "
                   "(the default without --expect-pair)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        conn = connect(args.db)
        try:
            state = read_state(conn, args.cluster)
            state.max_age = args.max_age
        finally:
            conn.close()
    except DBError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    if args.explain or not args.expect_pair:
        print("\n".join(explain(state, args.db, args.cluster)))
    if not args.expect_pair:
        return 0
    problems = missing(state)
    if not problems:
        ok = [p.key for p in state.pairs if not pair_problems(state, p)]
        print(f"ready: pair {', '.join(ok)} can take requests")
        return 0
    print("not ready:")
    for line in problems:
        print(f"  - {line}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
