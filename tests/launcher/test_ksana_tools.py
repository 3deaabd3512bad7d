"""KsanaLLM node-side tools: ksana_pairs (the router database gate and status table) on
databases built with the stand-in's database layer and by direct sqlite writes, and the
simple_router boot wrapper (ksana_router) against a small fake simple_router tree with
simple_router's import-order trap (services.py binds ``from config import SETTINGS``)."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import textwrap
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Optional

import pytest

from pd_launcher import ksana_pairs
from pd_launcher.emulator.ksana import routerdb as rdb
from pd_launcher.ksana_router import ENV_DIR, ENV_INI

from .conftest import PY, py_env

P_ADDR, D_ADDR = "10.0.0.1:8067", "10.0.0.2:6890"
P_COORD, D_COORD = "10.0.0.1:13569", "10.0.0.2:13571"
KEY = f"{P_ADDR}__{D_ADDR}"


def pairs(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "pd_launcher.ksana_pairs", *args], env=py_env(),
                          capture_output=True, text=True, timeout=30)


def node(role: str, addr: str, coord: str, world: int = 1, devices: int = 1,
         cluster: str = "c1", rank: int = 0) -> rdb.NodeRequest:
    return rdb.NodeRequest(None, cluster, addr, coord, role, rank, world, devices)


@pytest.fixture
def db(tmp_path) -> rdb.RouterDB:
    router = rdb.RouterDB(str(tmp_path / "state" / "router.db"), "c1", 60)
    yield router
    router.close()


def formed(router: rdb.RouterDB, comm_id: Optional[str] = "Y29tbQ==") -> Dict[str, str]:
    """P and D registered and heartbeating; the pair's id registered unless None."""
    p_id, _ = router.register_node(node("prefill", P_ADDR, P_COORD))
    d_id, _ = router.register_node(node("decode", D_ADDR, D_COORD))
    router.heartbeat(p_id)
    router.heartbeat(d_id)
    if comm_id is not None:
        router.register_comm_id(router.node(p_id), KEY, comm_id)
    return {"p": p_id, "d": d_id}


# =========================================================================== ksana_pairs

def test_a_missing_database_is_reported_and_not_created(tmp_path):
    path = tmp_path / "nope.db"
    for flags in ([], ["--expect-pair"]):
        out = pairs("--db", str(path), *flags)
        assert out.returncode == 1 and "does not exist" in out.stderr
    assert not path.exists()


def test_a_database_without_tables_or_not_sqlite(tmp_path):
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    out = pairs("--db", str(empty), "--explain")
    assert out.returncode == 1 and "has no table node_info, comm_group_pair" in out.stderr
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all" * 100)
    out = pairs("--db", str(junk))
    assert out.returncode == 1 and "cannot read the router database" in out.stderr


def test_gate_states_from_nothing_to_ready(db):
    path = db.path
    out = pairs("--db", path, "--expect-pair")
    assert out.returncode == 1
    assert "no prefill node registered" in out.stdout and "no decode node" in out.stdout
    p_id, _ = db.register_node(node("prefill", P_ADDR, P_COORD))
    db.heartbeat(p_id)
    out = pairs("--db", path, "--expect-pair")
    assert out.returncode == 1 and "no decode node registered" in out.stdout
    assert "no prefill node registered" not in out.stdout
    d_id, _ = db.register_node(node("decode", D_ADDR, D_COORD))
    out = pairs("--db", path, "--expect-pair")
    assert out.returncode == 1 and "no prefill/decode pair yet" in out.stdout
    db.heartbeat(d_id)  # the pair appears, active, without an id
    out = pairs("--db", path, "--expect-pair")
    assert out.returncode == 1 and f"pair {KEY}: waiting for its NCCL id" in out.stdout
    db.register_comm_id(db.node(p_id), KEY, "Y29tbQ==")
    out = pairs("--db", path, "--expect-pair")
    assert out.returncode == 0 and f"ready: pair {KEY} can take requests" in out.stdout
    assert "nodes:" not in out.stdout  # no table unless --explain


def test_gate_names_an_offline_decode_and_a_silent_one(db):
    formed(db)
    with sqlite3.connect(db.path) as conn:
        conn.execute("UPDATE node_info SET is_online = 0 WHERE role = 'decode'")
    out = pairs("--db", db.path, "--expect-pair")
    assert out.returncode == 1
    assert f"decode {D_ADDR} (rank 0, coordinator {D_COORD}) is offline" in out.stdout
    assert "every decode node is offline" in out.stdout
    with sqlite3.connect(db.path) as conn:
        conn.execute("UPDATE node_info SET is_online = 1, last_heartbeat = "
                     "'2020-01-01 00:00:00.000000'")
    assert pairs("--db", db.path, "--expect-pair").returncode == 0  # the router's flag
    out = pairs("--db", db.path, "--expect-pair", "--max-age", "30")
    assert out.returncode == 1 and "silent: online at the router" in out.stdout


def test_gate_explains_an_inactive_pair_by_its_groups(db):
    p_id, _ = db.register_node(node("prefill", P_ADDR, P_COORD))
    d_id, _ = db.register_node(node("decode", D_ADDR, D_COORD, world=2, devices=1))
    db.heartbeat(p_id)
    answer = db.heartbeat(d_id)
    assert answer["group_ready"] is False and answer["address"] == {KEY: []}
    db.register_comm_id(db.node(p_id), KEY, "Y29tbQ==")
    out = pairs("--db", db.path, "--expect-pair")
    assert out.returncode == 1
    assert f"inactive (prefill group {P_ADDR}: 1 of 1 device(s) online, ready; decode group " \
           f"{D_ADDR}: 1 of 2 device(s) online, not ready)" in out.stdout
    # the second device of the decode group (node rank 1) makes the group whole
    r1, _ = db.register_node(node("decode", D_ADDR, "10.0.0.3:13571", world=2, rank=1))
    assert db.heartbeat(r1)["group_ready"] is True
    assert pairs("--db", db.path, "--expect-pair").returncode == 0


def test_cluster_filter(db, tmp_path):
    formed(db)
    assert pairs("--db", db.path, "--cluster", "c1", "--expect-pair").returncode == 0
    out = pairs("--db", db.path, "--cluster", "c2", "--expect-pair", "--explain")
    assert out.returncode == 1 and "no prefill node registered" in out.stdout
    assert "(cluster c2)" in out.stdout and "nodes: none registered" in out.stdout


def test_explain_table(db):
    formed(db, comm_id=None)
    out = pairs("--db", db.path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"simple_router database {db.path} (all clusters)"
    assert lines[1] == "nodes:" and lines[2].split() == [
        "cluster", "role", "inference_addr", "coordinator_addr", "rank", "devices", "world",
        "online", "last", "heartbeat"]
    prefill = lines[3].split()
    assert prefill[:8] == ["c1", "prefill", P_ADDR, P_COORD, "0", "1", "1", "yes"]
    assert float(prefill[8].rstrip("s")) < 30 and prefill[9] == "ago"
    assert lines[4].split()[:3] == ["c1", "decode", D_ADDR]
    assert lines[5] == "pairs:" and lines[7].split() == ["c1", KEY, "yes", "not", "yet"]
    db.register_comm_id(db.node(db._q("SELECT node_id FROM node_info WHERE role = "
                                      "'prefill'")[0][0]), KEY, "Y29tbQ==")
    assert pairs("--db", db.path).stdout.splitlines()[7].split()[-1] == "registered"


def test_reads_while_the_router_holds_a_write_lock(db):
    formed(db)
    writer = sqlite3.connect(db.path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("UPDATE node_info SET is_online = 0")
    try:
        out = pairs("--db", db.path, "--expect-pair")
        assert out.returncode == 0, out.stdout + out.stderr  # the committed state
    finally:
        writer.execute("COMMIT")
        writer.close()
    assert pairs("--db", db.path, "--expect-pair").returncode == 1


def test_value_parsing():
    assert ksana_pairs.json_text('"abc"') == "abc" and ksana_pairs.json_text('""') == ""
    assert ksana_pairs.json_text(None) == "" and ksana_pairs.json_text("raw") == "raw"
    dt = ksana_pairs.parse_stamp("2026-02-10 01:02:03.000004")
    assert dt is not None and dt.utcoffset().total_seconds() == 0 and dt.microsecond == 4
    assert ksana_pairs.parse_stamp("2026-02-10 01:02:03") is not None
    assert ksana_pairs.parse_stamp("yesterday") is None


# =========================================================================== routerdb

def test_routerdb_value_formats(db):
    ids = formed(db)
    rows = db._q("SELECT * FROM node_info WHERE node_id = ?", (ids["p"],))
    assert rows[0]["is_online"] == 1 and len(rows[0]["last_heartbeat"]) == 26
    (pair,) = db._q("SELECT * FROM comm_group_pair")
    assert pair["data_channel_meta"] == '"Y29tbQ=="'
    assert pair["control_channel_meta"] == f'[[0, 0, "{P_COORD}"], [0, 0, "{D_COORD}"]]'
    assert len(pair["updated_at"]) == 19  # CURRENT_TIMESTAMP
    assert rdb.iso(datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=timezone.utc)) == \
        "2026-01-02T03:04:05.000006Z"
    assert rdb.iso(datetime(2026, 1, 2, 3, 4, 5)) == "2026-01-02T03:04:05"
    assert rdb.stamp(datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)) == \
        "2026-01-02 03:04:05.000000"


def test_routerdb_settings(tmp_path, monkeypatch):
    ini = tmp_path / "conf" / "r.ini"
    ini.parent.mkdir()
    ini.write_text("[general]\nlog_level = debug\n[database]\nsqlite_path = ../db/x.db\n"
                   "[name_service]\nname_service_provider = name_service.auto_provider\n")
    s = rdb.load_settings(str(ini))
    assert (s.log_level, s.log_dir, s.cluster_name, s.heartbeat_timeout_seconds) == \
        ("DEBUG", "./", "default_cluster", 60)
    assert s.sqlite_path == str(tmp_path / "db" / "x.db")  # relative to the ini's dir
    monkeypatch.chdir(tmp_path)
    assert s.log_file == str(tmp_path / "simple_router.log")  # log_dir: to the cwd
    assert rdb.builtin_settings().sqlite_path == str(tmp_path / "sqlite" /
                                                     "simple_router.db")


# =========================================================================== ksana_router

CONFIG_PY = '''
import configparser
import os

class Settings:
    def __init__(self, ini=None):
        ini = ini or os.path.join(os.path.dirname(__file__), "config.ini")
        cp = configparser.ConfigParser()
        if not cp.read(ini):
            raise FileNotFoundError(f"Failed to load configuration file: {ini}")
        self.ini = ini
        self.cluster_name = cp.get("general", "cluster_name", fallback="default_cluster")
        self.heartbeat_timeout_seconds = cp.getint("general", "heartbeat_timeout_seconds",
                                                   fallback=60)
        self.name_service_provider = cp.get("name_service", "name_service_provider",
                                            fallback="simple_router.name_service.auto_provider")

SETTINGS = None

def get_settings():
    global SETTINGS
    if SETTINGS is None:
        SETTINGS = Settings()
    return SETTINGS

def reload_settings(ini=None):
    global SETTINGS
    SETTINGS = Settings(ini)
    return SETTINGS
'''
SERVICES_PY = '''
from config import SETTINGS

def timeout():
    return getattr(SETTINGS, "heartbeat_timeout_seconds", 60)
'''
MAIN_PY = '''
import os
import config
import services

app = {"cluster": config.get_settings().cluster_name, "timeout": services.timeout(),
       "ini": config.get_settings().ini, "pid": os.getpid()}
'''
FAKE_UVICORN = '''
import importlib
import json
import multiprocessing
import os

def _load(spec, queue):
    module, attr = spec.split(":")
    queue.put(getattr(importlib.import_module(module), attr))

def run(app, host, port, workers):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_load, args=(app, queue)) for _ in range(workers)]
    for p in procs:
        p.start()
    apps = [queue.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(30)
    with open(os.environ["FAKE_UVICORN_OUT"], "w") as fh:
        json.dump({"app": app, "host": host, "port": port, "workers": workers,
                   "apps": apps}, fh)
'''
DEFAULT_INI = ("[general]\ncluster_name = default_cluster\nheartbeat_timeout_seconds = 60\n"
               "[name_service]\nname_service_provider = name_service.auto_provider\n")


@pytest.fixture
def tree(tmp_path) -> Path:
    """A fake simple_router directory, a fake uvicorn, and an ini of our own."""
    sr = tmp_path / "ksana" / "src" / "ksana_llm" / "python" / "simple_router"
    (sr / "name_service").mkdir(parents=True)
    for name, text in (("config.py", CONFIG_PY), ("services.py", SERVICES_PY),
                       ("main.py", MAIN_PY), ("config.ini", DEFAULT_INI),
                       ("name_service/__init__.py", ""),
                       ("name_service/auto_provider.py", "")):
        (sr / name).write_text(textwrap.dedent(text))
    (tmp_path / "fakes").mkdir()
    (tmp_path / "fakes" / "uvicorn.py").write_text(FAKE_UVICORN)
    (tmp_path / "router.ini").write_text(
        "[general]\ncluster_name = pd-c\nheartbeat_timeout_seconds = 3\n"
        "[name_service]\nname_service_provider = name_service.auto_provider\n")
    return sr


def py(code: str, env: Optional[Dict[str, str]] = None, cwd: Optional[Path] = None
       ) -> Any:
    out = subprocess.run([PY, "-c", code], env=py_env(env), capture_output=True, text=True,
                         timeout=30, cwd=cwd)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def wrapper(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    """The boot wrapper with the fake uvicorn (it records what it was asked to run)."""
    env = py_env({"PYTHONDONTWRITEBYTECODE": "1",
                  "FAKE_UVICORN_OUT": str(tmp / "uvicorn.json")})
    env["PYTHONPATH"] = str(tmp / "fakes") + ":" + env["PYTHONPATH"]
    return subprocess.run([PY, "-m", "pd_launcher.ksana_router", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def test_the_fake_tree_has_simple_routers_trap(tree, tmp_path):
    """Started the way main.py does it (import main, then reload), services keeps None."""
    app = py(f"import sys, json; sys.path.insert(0, {str(tree)!r}); import config, main;"
             f" config.reload_settings({str(tmp_path / 'router.ini')!r});"
             "import services; print(json.dumps([main.app['cluster'], services.timeout()]))")
    assert app == ["default_cluster", 60]


def test_load_applies_the_ini_before_main_is_imported(tree, tmp_path):
    ini = str(tmp_path / "router.ini")
    app = py("import json; from pd_launcher import ksana_router as k;"
             f"print(json.dumps(k.load({str(tree)!r}, {ini!r})))")
    assert (app["cluster"], app["timeout"], app["ini"]) == ("pd-c", 3, ini)


def test_the_app_attribute_loads_from_the_environment(tree, tmp_path):
    ini = str(tmp_path / "router.ini")
    code = ("import importlib, json; m = importlib.import_module('pd_launcher.ksana_router');"
            "print(json.dumps(m.app))")
    app = py(code, {ENV_DIR: str(tree), ENV_INI: ini}, cwd=tmp_path)
    assert (app["cluster"], app["timeout"]) == ("pd-c", 3)
    out = subprocess.run([PY, "-c", code], env=py_env(), capture_output=True, text=True,
                         timeout=30)
    assert out.returncode != 0 and f"needs {ENV_DIR} and {ENV_INI}" in out.stderr
    out = subprocess.run([PY, "-c", "import pd_launcher.ksana_router as k; k.nothing"],
                         env=py_env(), capture_output=True, text=True, timeout=30)
    assert "AttributeError" in out.stderr


def test_every_worker_applies_the_ini(tree, tmp_path):
    out = wrapper(tmp_path, str(tree / "main.py"), "--host", "127.0.30.20", "--port", "9999",
                  "--workers", "2", "--config", str(tmp_path / "router.ini"))
    assert out.returncode == 0, out.stderr
    got = json.loads((tmp_path / "uvicorn.json").read_text())
    assert (got["app"], got["host"], got["port"], got["workers"]) == \
        ("pd_launcher.ksana_router:app", "127.0.30.20", 9999, 2)
    assert len({a["pid"] for a in got["apps"]}) == 2  # two fresh processes
    for app in got["apps"]:
        assert (app["cluster"], app["timeout"]) == ("pd-c", 3)
    assert not (tree / "__pycache__").exists()


def test_without_config_the_ini_next_to_main_py_applies(tree, tmp_path):
    out = wrapper(tmp_path, str(tree / "main.py"), "--workers", "1")
    assert out.returncode == 0, out.stderr
    got = json.loads((tmp_path / "uvicorn.json").read_text())
    assert (got["host"], got["port"], got["workers"]) == ("0.0.0.0", 9080, 1)
    assert got["apps"][0]["ini"] == str(tree / "config.ini")


def test_errors_name_what_is_wrong(tree, tmp_path):
    out = wrapper(tmp_path, str(tmp_path / "nowhere" / "main.py"))
    assert out.returncode == 2 and "simple_router's main.py not found" in out.stderr
    assert str(tmp_path / "nowhere" / "main.py") in out.stderr
    out = wrapper(tmp_path, str(tree / "main.py"), "--config", str(tmp_path / "none.ini"))
    assert out.returncode == 2 and f"router ini not found: {tmp_path / 'none.ini'}" \
        in out.stderr
    bad = tmp_path / "bad.ini"
    bad.write_text("[general]\ncluster_name = x\n")
    out = wrapper(tmp_path, str(tree / "main.py"), "--config", str(bad))
    assert out.returncode == 2 and "name_service_provider" in out.stderr
    assert "simple_router.name_service.auto_provider" in out.stderr
    out = wrapper(tmp_path, str(tree / "main.py"), "--bogus")
    assert out.returncode == 2 and "unrecognized arguments: --bogus" in out.stderr
    (tree / "config.py").unlink()
    out = wrapper(tmp_path, str(tree / "main.py"))
    assert out.returncode == 2 and "no config.py next to main.py" in out.stderr
    assert not (tmp_path / "uvicorn.json").exists()


def test_concurrent_gate_reads_do_not_fail_heartbeats(db):
    """The stand-in keeps writing while the gate polls (one reader at a time here)."""
    ids = formed(db)
    errors = []

    def beat() -> None:
        try:
            for _ in range(30):
                db.heartbeat(ids["p"])
        except sqlite3.Error as exc:  # pragma: no cover - the failure this guards
            errors.append(exc)

    t = threading.Thread(target=beat)
    t.start()
    for _ in range(3):
        assert pairs("--db", db.path, "--expect-pair").returncode == 0
    t.join(30)
    assert errors == []
