"""The state of the simple_router stand-in: its ini (read the way simple_router's
``config.py`` reads it) and its sqlite database, with the tables, columns and value
formats of the real router (SQLAlchemy models ``node_info``, ``comm_group_pair``,
``inference_group_status``), so that one reader (``python -m pd_launcher.ksana_pairs``)
works on either router's file.

Value formats, as SQLAlchemy writes them into sqlite (checked against the real router):

* Boolean: integer 0 / 1.
* DateTime(timezone=True) set from Python: text ``YYYY-MM-DD HH:MM:SS.ffffff``, the UTC
  wall clock with the zone dropped (``last_heartbeat``, ``start_time``, ``created_at``,
  ``updated_at`` of node_info; ``last_computed_at``).
* DateTime with a ``func.now()`` default / onupdate: sqlite's ``CURRENT_TIMESTAMP``, text
  ``YYYY-MM-DD HH:MM:SS`` UTC (``updated_at`` of comm_group_pair and
  inference_group_status).
* JSON: ``json.dumps`` text: ``control_channel_meta`` ``[[0, 0, "ip:port"], ...]``,
  ``data_channel_meta`` a JSON string (``""`` when no id is registered yet).
* Enum role: text ``prefill`` / ``decode``.

Everything here is synchronous sqlite3 on one connection; each operation is one
transaction (``BEGIN IMMEDIATE`` .. ``COMMIT``).
"""
from __future__ import annotations

import configparser
import json
import logging
import os
import random
import sqlite3
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

log = logging.getLogger("pd_emu.ksana_router")

#: the only name service the stand-in models (simple_router's database-backed one)
AUTO_PROVIDER = "name_service.auto_provider"
#: config.py's default when the ini has no name_service_provider
DEFAULT_PROVIDER = "simple_router.name_service.auto_provider"
ROLES = ("prefill", "decode")

Triple = Tuple[int, int, str]


class SettingsError(Exception):
    """The ini cannot be used (the stand-in exits 2 with this message)."""


@dataclass
class Settings:
    """What simple_router's PrefillDecodeSettings holds (sqlite mode)."""

    ini_path: Optional[str]
    log_level: str
    log_dir: str
    cluster_name: str
    heartbeat_timeout_seconds: int
    sqlite_path: str
    name_service_provider: str

    @property
    def log_file(self) -> str:
        """``<log_dir>/simple_router.log``; a relative log_dir is relative to the current
        directory (main.py takes ``os.path.abspath`` of it), not to the ini."""
        return os.path.join(os.path.abspath(os.path.expanduser(self.log_dir)),
                            "simple_router.log")


def builtin_settings() -> Settings:
    """The values of the config.ini shipped next to main.py; the stand-in has no such
    file, so its relative paths are taken from the current directory."""
    return Settings(ini_path=None, log_level="INFO", log_dir="./log",
                    cluster_name="default_cluster", heartbeat_timeout_seconds=60,
                    sqlite_path=os.path.abspath("sqlite/simple_router.db"),
                    name_service_provider=AUTO_PROVIDER)


def _section(cp: configparser.ConfigParser, name: str) -> Any:
    return cp[name] if cp.has_section(name) else {}


def _sqlite_path(db: Any, ini_dir: str, ini: str) -> str:
    mode = db.get("storage_mode", "sqlite").lower()
    if mode == "mysql":
        raise SettingsError(f"{ini}: [database] storage_mode = mysql: the stand-in keeps "
                            "its state in sqlite only (set storage_mode = sqlite)")
    if mode != "sqlite":
        raise SettingsError(f"{ini}: [database] storage_mode = {mode!r}: must be either "
                            "'sqlite' or 'mysql'")
    raw = os.path.expanduser(db.get("sqlite_path", "./simple_router.db"))
    if raw == ":memory:":
        raise SettingsError(f"{ini}: [database] sqlite_path: an in-memory database is not "
                            "supported")
    return raw if os.path.isabs(raw) else os.path.normpath(os.path.join(ini_dir, raw))


def _provider(ns: Any, ini: str) -> str:
    value = ns.get("name_service_provider", DEFAULT_PROVIDER)
    if value == AUTO_PROVIDER:
        return value
    if value == DEFAULT_PROVIDER:
        raise SettingsError(
            f"{ini}: [name_service] name_service_provider is not set; simple_router's "
            f"built-in default {DEFAULT_PROVIDER!r} does not import when main.py runs from "
            f"its own directory (set name_service_provider = {AUTO_PROVIDER})")
    raise SettingsError(f"{ini}: [name_service] name_service_provider = {value!r}: the "
                        f"stand-in models {AUTO_PROVIDER} only")


def load_settings(ini_path: str) -> Settings:
    """Read ``ini_path`` like PrefillDecodeSettings; SettingsError when unusable."""
    ini = os.path.abspath(os.path.expanduser(ini_path))
    cp = configparser.ConfigParser()
    try:
        ok = cp.read(ini, encoding="utf-8")
    except (configparser.Error, UnicodeDecodeError) as exc:
        raise SettingsError(f"{ini}: not a valid ini file: {exc}") from None
    if not ok:
        raise SettingsError(f"Failed to load configuration file: {ini} (missing or "
                            "unreadable)")
    if not cp.has_section("database"):
        raise SettingsError(f"{ini}: no [database] section (simple_router requires one)")
    general = _section(cp, "general")
    try:
        timeout = general.getint("heartbeat_timeout_seconds", 60) if general else 60
        return Settings(
            ini_path=ini,
            log_level=general.get("log_level", "INFO").upper(),
            log_dir=general.get("log_dir", "./"),
            cluster_name=general.get("cluster_name", "default_cluster"),
            heartbeat_timeout_seconds=timeout,
            sqlite_path=_sqlite_path(cp["database"], os.path.dirname(ini), ini),
            name_service_provider=_provider(_section(cp, "name_service"), ini),
        )
    except ValueError as exc:
        raise SettingsError(f"{ini}: [general] heartbeat_timeout_seconds: {exc}") from None
    except configparser.Error as exc:
        raise SettingsError(f"{ini}: {exc}") from None


# -- value formats ------------------------------------------------------------------------

def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def stamp(dt: datetime) -> str:
    """A DateTime as SQLAlchemy stores it in sqlite (the zone is dropped)."""
    return (f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d} {dt.hour:02d}:{dt.minute:02d}:"
            f"{dt.second:02d}.{dt.microsecond:06d}")


def iso(dt: datetime) -> str:
    """A datetime as pydantic 2 writes it in JSON (UTC as ``Z``, no zero microseconds)."""
    text = dt.replace(tzinfo=None).isoformat()
    if dt.tzinfo is None:
        return text
    off = dt.utcoffset()
    if not off:
        return text + "Z"
    return text + dt.isoformat()[-6:]


def _json_in(value: Any) -> str:
    return json.dumps(value)


def _json_out(text: Any, default: Any) -> Any:
    if text is None:
        return default
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return default


# -- schema ---------------------------------------------------------------------------------

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS node_info (
        id INTEGER NOT NULL,
        node_id VARCHAR(64) NOT NULL,
        cluster_name VARCHAR(128) NOT NULL,
        inference_addr VARCHAR(128) NOT NULL,
        coordinator_addr VARCHAR(128) NOT NULL,
        role VARCHAR(7) NOT NULL,
        node_rank INTEGER NOT NULL,
        world_size INTEGER NOT NULL,
        device_num INTEGER NOT NULL,
        last_heartbeat DATETIME NOT NULL,
        is_online BOOLEAN NOT NULL,
        start_time DATETIME NOT NULL,
        created_at DATETIME NOT NULL,
        updated_at DATETIME NOT NULL,
        PRIMARY KEY (id),
        CONSTRAINT uq_cluster_addr_role_rank UNIQUE (cluster_name, inference_addr, role,
                                                     node_rank),
        UNIQUE (node_id))""",
    "CREATE INDEX IF NOT EXISTS ix_node_cluster_role_online ON node_info "
    "(cluster_name, role, is_online)",
    "CREATE INDEX IF NOT EXISTS ix_node_last_heartbeat ON node_info (last_heartbeat)",
    """CREATE TABLE IF NOT EXISTS comm_group_pair (
        id INTEGER NOT NULL,
        comm_key VARCHAR(256) NOT NULL,
        is_active BOOLEAN NOT NULL,
        cluster_name VARCHAR(128) NOT NULL,
        prefill_addr VARCHAR(128) NOT NULL,
        decode_addr VARCHAR(128) NOT NULL,
        control_channel_meta JSON NOT NULL,
        data_channel_meta JSON NOT NULL,
        updated_at DATETIME DEFAULT CURRENT_TIMESTAMP NOT NULL,
        PRIMARY KEY (id),
        UNIQUE (comm_key))""",
    "CREATE INDEX IF NOT EXISTS ix_comm_decode_addr ON comm_group_pair (decode_addr)",
    "CREATE INDEX IF NOT EXISTS ix_comm_prefill_addr ON comm_group_pair (prefill_addr)",
    "CREATE INDEX IF NOT EXISTS ix_comm_cluster_active ON comm_group_pair (cluster_name)",
    """CREATE TABLE IF NOT EXISTS inference_group_status (
        id INTEGER NOT NULL,
        cluster_name VARCHAR(128) NOT NULL,
        inference_addr VARCHAR(128) NOT NULL,
        role VARCHAR(7) NOT NULL,
        world_size_expected INTEGER NOT NULL,
        online_device_sum INTEGER NOT NULL,
        online_node_count INTEGER NOT NULL,
        is_ready BOOLEAN NOT NULL,
        last_computed_at DATETIME DEFAULT CURRENT_TIMESTAMP NOT NULL,
        updated_at DATETIME DEFAULT CURRENT_TIMESTAMP NOT NULL,
        PRIMARY KEY (id),
        CONSTRAINT uq_group_status UNIQUE (cluster_name, inference_addr, role))""",
    "CREATE INDEX IF NOT EXISTS ix_status_role_ready ON inference_group_status "
    "(role, is_ready)",
)


@dataclass
class NodeRequest:
    """A validated /RegisterNode body, after the endpoint's own checks."""

    node_id: Optional[str]
    cluster_name: str
    inference_addr: str
    coordinator_addr: str
    role: str
    node_rank: int
    world_size: int
    device_num: int


class CommIdRefused(Exception):
    """/RegisterCommId refused: ``status`` (403 or 400) and the detail."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def _marks(values: Sequence[Any]) -> str:
    return ",".join("?" * len(values))


class RouterDB:
    """The router's tables in one sqlite file (created when missing)."""

    def __init__(self, path: str, cluster_name: str, timeout_s: int) -> None:
        self.path, self.cluster, self.timeout_s = path, cluster_name, timeout_s
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        self.conn = sqlite3.connect(path, timeout=5.0, isolation_level=None,
                                    check_same_thread=False)
        self.conn.row_factory = sqlite3.Row
        with self.tx():
            for ddl in SCHEMA:
                self.conn.execute(ddl)

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def _q(self, sql: str, args: Sequence[Any] = ()) -> List[sqlite3.Row]:
        return self.conn.execute(sql, tuple(args)).fetchall()

    def _one(self, sql: str, args: Sequence[Any] = ()) -> Optional[sqlite3.Row]:
        return self.conn.execute(sql, tuple(args)).fetchone()

    def node(self, node_id: str) -> Optional[sqlite3.Row]:
        return self._one("SELECT * FROM node_info WHERE node_id = ?", (node_id,))

    # -- /RegisterNode ----------------------------------------------------------------
    def register_node(self, req: NodeRequest) -> Tuple[str, datetime]:
        """(node_id, last_heartbeat); raises sqlite3.IntegrityError like the real one."""
        with self.tx():
            old = self._one("SELECT * FROM node_info WHERE coordinator_addr = ?",
                            (req.coordinator_addr,))
            now = utcnow()
            if old is not None:
                self._reset_if_prefill_rank0(req.cluster_name, old)
                self.conn.execute(
                    "UPDATE node_info SET cluster_name = ?, inference_addr = ?, role = ?, "
                    "node_rank = ?, world_size = ?, device_num = ?, last_heartbeat = ?, "
                    "is_online = 1, start_time = ?, updated_at = ? WHERE id = ?",
                    (req.cluster_name, req.inference_addr, req.role, req.node_rank,
                     req.world_size, req.device_num, stamp(now), stamp(utcnow()),
                     stamp(utcnow()), old["id"]))
                log.info("node %s (%s %s rank %d, coordinator %s) registered again",
                         old["node_id"], req.role, req.inference_addr, req.node_rank,
                         req.coordinator_addr)
                return old["node_id"], now
            node_id = req.node_id or uuid.uuid4().hex
            created = stamp(utcnow())
            self.conn.execute(
                "INSERT INTO node_info (node_id, cluster_name, inference_addr, "
                "coordinator_addr, role, node_rank, world_size, device_num, last_heartbeat, "
                "is_online, start_time, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?, ?)",
                (node_id, req.cluster_name, req.inference_addr, req.coordinator_addr,
                 req.role, req.node_rank, req.world_size, req.device_num, stamp(now),
                 stamp(utcnow()), created, created))
            log.info("registered node %s: %s %s rank %d of world %d, %d device(s), "
                     "coordinator %s", node_id, req.role, req.inference_addr, req.node_rank,
                     req.world_size, req.device_num, req.coordinator_addr)
            return node_id, now

    def _reset_if_prefill_rank0(self, cluster: str, node: sqlite3.Row) -> None:
        """A prefill rank 0 registering again invalidates its pairs' NCCL ids."""
        if node["role"] != "prefill" or node["node_rank"] != 0:
            return
        rows = self._q("SELECT id, comm_key FROM comm_group_pair WHERE cluster_name = ? AND "
                       "prefill_addr = ?", (cluster, node["inference_addr"]))
        for row in rows:
            log.info("clearing the communication ids of pair %s (prefill %s registered "
                     "again)", row["comm_key"], node["node_id"])
            self.conn.execute(
                "UPDATE comm_group_pair SET data_channel_meta = ?, control_channel_meta = ?, "
                "is_active = 0, updated_at = CURRENT_TIMESTAMP WHERE id = ?",
                (_json_in(""), _json_in([]), row["id"]))

    # -- /Heartbeat -----------------------------------------------------------------------
    def heartbeat(self, node_id: str) -> Optional[Dict[str, Any]]:
        """The heartbeat answer's data, or None for an unknown node_id."""
        now = utcnow()
        with self.tx():
            node = self.node(node_id)
            if node is None:
                return None
            self.conn.execute("UPDATE node_info SET last_heartbeat = ?, is_online = 1, "
                              "updated_at = ? WHERE id = ?",
                              (stamp(now), stamp(utcnow()), node["id"]))
            cluster = node["cluster_name"]
            self._groups_not_ready(cluster, self._mark_stale(cluster, now))
            ready = self._refresh_group(node, now)
            out: Dict[str, Any] = {"node": node, "group_ready": ready, "address": {},
                                   "ids": {}}
            keys = self._comm_keys(node)
            if keys:
                control, data = self._comm_metadata(node, keys)
                out["address"], out["ids"] = self._filter_ready(node, control, data)
            return out

    def _mark_stale(self, cluster: str, now: datetime) -> List[sqlite3.Row]:
        limit = stamp(now - timedelta(seconds=self.timeout_s))
        stale = self._q("SELECT * FROM node_info WHERE cluster_name = ? AND "
                        "last_heartbeat < ?", (cluster, limit))
        for row in stale:
            if row["is_online"]:
                log.warning("node %s (%s %s rank %d) is stale: last heartbeat %s UTC, more "
                            "than %ds ago; marked offline", row["node_id"], row["role"],
                            row["inference_addr"], row["node_rank"], row["last_heartbeat"],
                            self.timeout_s)
                self.conn.execute("UPDATE node_info SET is_online = 0, updated_at = ? "
                                  "WHERE id = ?", (stamp(utcnow()), row["id"]))
        return stale

    def _groups_not_ready(self, cluster: str, stale: List[sqlite3.Row]) -> None:
        addrs = sorted({row["inference_addr"] for row in stale})
        if not addrs:
            return
        self.conn.execute(
            "UPDATE inference_group_status SET is_ready = 0, updated_at = CURRENT_TIMESTAMP "
            f"WHERE cluster_name = ? AND inference_addr IN ({_marks(addrs)}) AND "
            "is_ready != 0", (cluster, *addrs))

    def _refresh_group(self, node: sqlite3.Row, now: datetime) -> bool:
        """Recompute the node's group (same cluster, inference_addr and role)."""
        key = (node["cluster_name"], node["inference_addr"], node["role"])
        devices, world, count = self._one(
            "SELECT COALESCE(SUM(device_num), 0), COALESCE(MAX(world_size), 0), COUNT(id) "
            "FROM node_info WHERE cluster_name = ? AND inference_addr = ? AND role = ? AND "
            "is_online IS 1", key)
        ready = 1 if world > 0 and devices == world else 0
        row = self._one("SELECT id FROM inference_group_status WHERE cluster_name = ? AND "
                        "inference_addr = ? AND role = ?", key)
        values = (world, devices, count, ready, stamp(now))
        if row is None:
            self.conn.execute(
                "INSERT INTO inference_group_status (cluster_name, inference_addr, role, "
                "world_size_expected, online_device_sum, online_node_count, is_ready, "
                "last_computed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (*key, *values))
        else:
            self.conn.execute(
                "UPDATE inference_group_status SET world_size_expected = ?, "
                "online_device_sum = ?, online_node_count = ?, is_ready = ?, "
                "last_computed_at = ?, updated_at = CURRENT_TIMESTAMP WHERE id = ?",
                (*values, row["id"]))
        return bool(ready)

    def _comm_keys(self, node: sqlite3.Row) -> List[str]:
        """``<P>__<D>`` for every group of the opposite role (ready or not)."""
        prefill = node["role"] == "prefill"
        rows = self._q("SELECT inference_addr FROM inference_group_status WHERE "
                       "cluster_name = ? AND role = ? ORDER BY id",
                       (node["cluster_name"], "decode" if prefill else "prefill"))
        keys: Dict[str, None] = {}
        for row in rows:
            other = row["inference_addr"]
            keys[f"{node['inference_addr']}__{other}" if prefill
                 else f"{other}__{node['inference_addr']}"] = None
        return list(keys)

    def _comm_metadata(self, node: sqlite3.Row, keys: List[str]
                       ) -> Tuple[Dict[str, List[Triple]], Dict[str, str]]:
        cluster = node["cluster_name"]
        pairs = {row["comm_key"]: row for row in self._q(
            "SELECT * FROM comm_group_pair WHERE cluster_name = ?", (cluster,))}
        control: Dict[str, List[Triple]] = {}
        data: Dict[str, str] = {}
        for key in keys:
            pair = pairs.get(key)
            if pair is None:
                control[key], data[key] = [], ""
                self._create_empty_pair(cluster, key)
                continue
            control[key] = self._triples(_json_out(pair["control_channel_meta"], []))
            data[key] = _json_out(pair["data_channel_meta"], "") or ""
        roles = self._roles_by_coordinator(cluster, control)
        for key, entries in control.items():
            control[key] = sorted(entries, key=lambda e: (0 if roles.get(e[2]) == "prefill"
                                                          else 1, e[0], e[1], e[2]))
        return control, data

    def _triples(self, stored: Any) -> List[Triple]:
        """Stored control meta: ``[[rank, device, addr], ...]``, or the older form (lists
        of coordinator addresses), expanded per device of the node at that address."""
        if not isinstance(stored, list):
            return []
        if stored and all(isinstance(e, list) and len(e) == 3 for e in stored):
            return [(int(r), int(d), str(a)) for r, d, a in stored]
        out: List[Triple] = []
        for addrs in stored:
            for addr in addrs if isinstance(addrs, list) else []:
                row = self._one("SELECT node_rank, device_num FROM node_info WHERE "
                                "coordinator_addr = ?", (addr,))
                if row is None:
                    out.append((0, 0, addr))
                    continue
                out.extend((row["node_rank"], dev, addr)
                           for dev in range(max(row["device_num"] or 1, 1)))
        return out

    def _roles_by_coordinator(self, cluster: str, control: Dict[str, List[Triple]]
                              ) -> Dict[str, str]:
        addrs = sorted({e[2] for entries in control.values() for e in entries})
        if not addrs:
            return {}
        rows = self._q("SELECT coordinator_addr, role FROM node_info WHERE cluster_name = ? "
                       f"AND coordinator_addr IN ({_marks(addrs)})", (cluster, *addrs))
        return {row["coordinator_addr"]: row["role"] for row in rows}

    def _create_empty_pair(self, cluster: str, key: str) -> None:
        if "__" not in key:
            log.error("invalid comm_key %r", key)
            return
        prefill, decode = key.split("__", 1)
        self.conn.execute(
            "INSERT INTO comm_group_pair (comm_key, is_active, cluster_name, prefill_addr, "
            "decode_addr, control_channel_meta, data_channel_meta) VALUES (?, 0, ?, ?, ?, "
            "?, ?)", (key, cluster, prefill, decode, _json_in([]), _json_in("")))
        log.info("new pair %s (waiting for both groups and an id from the prefill's rank 0)",
                 key)

    def _filter_ready(self, node: sqlite3.Row, control: Dict[str, List[Triple]],
                      data: Dict[str, str]) -> Tuple[Dict[str, List[Triple]], Dict[str, str]]:
        """Empty the pairs whose decode group (or, seen from a prefill node other than
        rank 0, prefill group) is not ready and mark them inactive; the others active."""
        addrs = sorted({a for key in data if "__" in key for a in key.split("__", 1)})
        if not addrs:
            return control, data
        cluster = node["cluster_name"]
        rows = self._q("SELECT inference_addr, role, is_ready FROM inference_group_status "
                       f"WHERE cluster_name = ? AND inference_addr IN ({_marks(addrs)})",
                       (cluster, *addrs))
        clear = set()
        for row in rows:
            if row["is_ready"]:
                continue
            addr = row["inference_addr"]
            if row["role"] == "decode":
                clear.update(k for k in control if k.endswith(f"__{addr}"))
            elif node["node_rank"] != 0:
                clear.update(k for k in control if k.startswith(f"{addr}__"))
        for key in clear:
            control[key], data[key] = [], ""
        self._set_active(cluster, sorted(clear), 0)
        self._set_active(cluster, sorted(set(control) - clear), 1)
        return control, data

    def _set_active(self, cluster: str, keys: List[str], active: int) -> None:
        if keys:
            self.conn.execute(
                "UPDATE comm_group_pair SET is_active = ?, updated_at = CURRENT_TIMESTAMP "
                f"WHERE cluster_name = ? AND comm_key IN ({_marks(keys)})",
                (active, cluster, *keys))

    # -- /RegisterCommId ------------------------------------------------------------------
    def register_comm_id(self, node: sqlite3.Row, comm_key: str, comm_id: str) -> str:
        """The stored id; CommIdRefused (403/400), sqlite3.IntegrityError (a pair of that
        key in another cluster)."""
        if node["role"] != "prefill" or node["node_rank"] != 0:
            raise CommIdRefused(403, "Only prefill rank-0 nodes may register comm ids")
        if "__" not in comm_key:
            raise CommIdRefused(400, "comm_key must follow 'prefill__decode' format")
        prefill, decode = comm_key.split("__", 1)
        cluster = node["cluster_name"]
        with self.tx():
            pair = self._one("SELECT id FROM comm_group_pair WHERE comm_key = ? AND "
                             "cluster_name = ?", (comm_key, cluster))
            control = _json_in(self._rebuild_control(cluster, prefill, decode))
            if pair is None:
                self.conn.execute(
                    "INSERT INTO comm_group_pair (comm_key, is_active, cluster_name, "
                    "prefill_addr, decode_addr, control_channel_meta, data_channel_meta) "
                    "VALUES (?, 1, ?, ?, ?, ?, ?)",
                    (comm_key, cluster, prefill, decode, control, _json_in(comm_id)))
            else:
                self.conn.execute(
                    "UPDATE comm_group_pair SET control_channel_meta = ?, "
                    "data_channel_meta = ?, updated_at = CURRENT_TIMESTAMP WHERE id = ?",
                    (control, _json_in(comm_id), pair["id"]))
        log.info("pair %s: communication id registered by %s", comm_key, node["node_id"])
        return comm_id

    def _rebuild_control(self, cluster: str, prefill: str, decode: str) -> List[Triple]:
        rows = self._q("SELECT role, node_rank, device_num, coordinator_addr FROM node_info "
                       "WHERE cluster_name = ? AND inference_addr IN (?, ?) AND role IN "
                       "('prefill', 'decode') ORDER BY id", (cluster, prefill, decode))
        sides: Dict[str, List[Triple]] = {"prefill": [], "decode": []}
        for row in rows:
            sides[row["role"]].extend(
                (row["node_rank"], dev, row["coordinator_addr"])
                for dev in range(max(row["device_num"] or 1, 1)))
        return (sorted(sides["prefill"], key=lambda e: (e[0], e[1]))
                + sorted(sides["decode"], key=lambda e: (e[0], e[1])))

    # -- fan-out ----------------------------------------------------------------------------
    def pick_pair(self) -> Optional[Tuple[str, str, str]]:
        """(comm_key, prefill inference_addr, decode inference_addr) of a random active
        pair of this cluster whose prefill and decode rank-0 nodes are online."""
        sql = "SELECT comm_key, prefill_addr, decode_addr FROM comm_group_pair WHERE " \
              "is_active IS 1"
        args: Tuple[str, ...] = ()
        if self.cluster:
            sql, args = sql + " AND cluster_name = ?", (self.cluster,)
        pairs = self._q(sql, args)
        random.shuffle(pairs)
        for pair in pairs:
            if self._rank0_online("prefill", pair["prefill_addr"]) and \
                    self._rank0_online("decode", pair["decode_addr"]):
                return pair["comm_key"], pair["prefill_addr"], pair["decode_addr"]
        return None

    def _rank0_online(self, role: str, addr: str) -> bool:
        return self._one("SELECT 1 FROM node_info WHERE inference_addr = ? AND role = ? AND "
                         "node_rank = 0 AND is_online IS 1 LIMIT 1", (addr, role)) is not None
