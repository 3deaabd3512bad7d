"""FastDeploy's node-side helpers: rdma_env (KVCACHE_RDMA_NICS from a fake sysfs, then
exec), http_check (the router's /registered_number gate), version_check (redis-server
>= 6.2) and redis_nodes (the splitwise scheduler's <topic>.cluster in a real Redis)."""
from __future__ import annotations

import glob
import http.server
import json
import os
import signal
import subprocess
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from pd_launcher import http_check, redis_nodes, version_check
from pd_launcher.rdma_env import detect, gpu_root_ports, natural_key, scan
from pd_launcher.redis_nodes import (
    Resp,
    RespError,
    parse_config,
    parse_nodes,
    split_config_line,
)

from .conftest import PY, free_port, py_env

PRINT_NICS = "import os; print(os.environ['KVCACHE_RDMA_NICS'])"
REDIS = "/usr/bin/redis-server"
needs_redis = pytest.mark.skipif(not os.path.exists(REDIS), reason=f"{REDIS} not installed")


def run_module(module: str, *args: str, env: dict[str, str] | None = None,
               drop: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    full = py_env(env)
    for name in drop:
        full.pop(name, None)
    return subprocess.run([PY, "-m", f"pd_launcher.{module}", *args], env=full,
                          capture_output=True, text=True, timeout=30)


# =========================================================================== rdma_env
# A fake sysfs laid out like the kernel's: PCI functions under
# sys/devices/pci0000:00/<root port>/<function>, with sys/bus/pci/devices and
# sys/class/infiniband symlinks into it, as relative links.


def _link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(target, link.parent))


def pci_function(root: Path, port: str, bdf: str, vendor: str, cls: str) -> Path:
    dev = root / "sys/devices/pci0000:00" / port / bdf
    dev.mkdir(parents=True)
    (dev / "vendor").write_text(vendor + "\n")
    (dev / "class").write_text(cls + "\n")
    _link(root / "sys/bus/pci/devices" / bdf, dev)
    return dev


def gpu(root: Path, port: str, bdf: str, cls: str = "0x030200",
        vendor: str = "0x10de") -> None:
    pci_function(root, port, bdf, vendor, cls)


def rdma_nic(root: Path, name: str, port: str | None, bdf: str, state: str = "ACTIVE",
             layer: str = "Ethernet", netdev: str | None = "eth", oper: str = "up") -> None:
    """An RDMA device: a Mellanox function (port None: a virtual rxe-like device)."""
    if port is None:
        ib = root / "sys/devices/virtual/infiniband" / name
        ib.mkdir(parents=True)
    else:
        dev = pci_function(root, port, bdf, "0x15b3", "0x020000")
        ib = dev / "infiniband" / name
        ib.mkdir(parents=True)
        _link(ib / "device", dev)
        if netdev:
            net = dev / "net" / netdev
            net.mkdir(parents=True)
            (net / "operstate").write_text(oper + "\n")
            _link(root / "sys/class/net" / netdev, net)
    num = {"ACTIVE": 4, "DOWN": 1, "INIT": 2}[state]
    p1 = ib / "ports" / "1"
    p1.mkdir(parents=True)
    (p1 / "state").write_text(f"{num}: {state}\n")
    (p1 / "link_layer").write_text(layer + "\n")
    _link(root / "sys/class/infiniband" / name, ib)


@pytest.fixture
def sysfs(tmp_path: Path) -> Path:
    """Two NVIDIA GPUs (root ports 0000:17:00.0, 0000:3a:00.0), an accelerator shown
    as a "Communication controller" (0000:80:00.0) and eight RDMA devices."""
    root = tmp_path / "node"
    gpu(root, "0000:17:00.0", "0000:1a:00.0")
    gpu(root, "0000:3a:00.0", "0000:3d:00.0", cls="0x030000")  # VGA compatible
    gpu(root, "0000:80:00.0", "0000:81:00.0", cls="0x078000", vendor="0x1d22")
    pci_function(root, "0000:00:1f.0", "0000:00:1f.3", "0x10de", "0x040300")  # audio only
    rdma_nic(root, "mlx5_0", "0000:17:00.0", "0000:18:00.0", netdev="ens1np0")
    rdma_nic(root, "mlx5_1", "0000:3a:00.0", "0000:3c:00.0", state="DOWN", oper="down",
             netdev="ens2np0")
    rdma_nic(root, "mlx5_2", "0000:3a:00.0", "0000:3c:00.1", layer="InfiniBand",
             netdev="ib0")
    rdma_nic(root, "mlx5_3", "0000:5d:00.0", "0000:5e:00.0", netdev="ens3np0")  # no GPU
    rdma_nic(root, "mlx5_4", "0000:17:00.0", "0000:19:00.0", netdev=None)  # no netdev
    rdma_nic(root, "mlx5_5", "0000:80:00.0", "0000:82:00.0", netdev="ens5np0")
    rdma_nic(root, "mlx5_10", "0000:17:00.0", "0000:18:00.1", netdev="ens1np1")
    rdma_nic(root, "mlx5_11", "0000:17:00.0", "0000:18:00.2", state="INIT", oper="up",
             netdev="ens1np2")  # interface up, port not ACTIVE
    rdma_nic(root, "mlx5_12", "0000:5d:00.0", "0000:5e:00.1", oper="down",
             netdev="ens3np1")
    rdma_nic(root, "rxe0", None, "")
    return root


def test_detect_gpu_nics_in_natural_order(sysfs: Path):
    assert detect(str(sysfs), "gpu") == ["mlx5_0", "mlx5_2", "mlx5_5", "mlx5_10"]


def test_detect_cpu_nics_are_the_ones_without_a_gpu(sysfs: Path):
    assert detect(str(sysfs), "cpu") == ["mlx5_3"]


def test_scan_reads_ports_netdevs_and_root_ports(sysfs: Path):
    by_name = {d.name: d for d in scan(str(sysfs))}
    assert by_name["mlx5_2"].ports == {"1": ("4: ACTIVE", "InfiniBand")}
    assert by_name["mlx5_2"].netdevs == {"ib0": "up"}
    assert by_name["mlx5_2"].root_port == "0000:3a:00.0"
    assert by_name["rxe0"].root_port is None
    assert gpu_root_ports(str(sysfs)) == {"0000:17:00.0", "0000:3a:00.0", "0000:80:00.0"}
    gpus = gpu_root_ports(str(sysfs))
    assert by_name["mlx5_1"].rejected("gpu", gpus).startswith("interface not up")
    assert by_name["mlx5_11"].rejected("gpu", gpus).startswith("no ACTIVE port")
    assert by_name["mlx5_4"].rejected("gpu", gpus) == "no network interface"
    assert "no GPU" in by_name["mlx5_3"].rejected("gpu", gpus)
    assert by_name["rxe0"].rejected("cpu", gpus) == "not a PCI device"


def test_detect_on_an_empty_tree_and_a_bad_device(tmp_path: Path):
    assert detect(str(tmp_path), "gpu") == []
    assert detect(str(tmp_path), "cpu") == []
    with pytest.raises(ValueError, match="gpu, cpu"):
        detect(str(tmp_path), "xpu")


def test_natural_key():
    assert sorted(["mlx5_10", "mlx5_2", "mlx5_bond_0", "mlx5_1"], key=natural_key) == [
        "mlx5_1", "mlx5_2", "mlx5_10", "mlx5_bond_0"]


def test_exec_sets_the_variable_and_keeps_the_pid(sysfs: Path):
    code = "import os; print(os.getpid(), os.environ['KVCACHE_RDMA_NICS'])"
    env = py_env()
    env.pop("KVCACHE_RDMA_NICS", None)
    p = subprocess.Popen([PY, "-m", "pd_launcher.rdma_env", "--sys-root", str(sysfs),
                          "--device", "gpu", "--", PY, "-c", code],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert out.split() == [str(p.pid), "mlx5_0,mlx5_2,mlx5_5,mlx5_10"]
    assert "KVCACHE_RDMA_NICS=mlx5_0,mlx5_2,mlx5_5,mlx5_10 (detected, gpu)" in err


def test_exec_passes_the_exit_status_and_cpu_device(sysfs: Path):
    r = run_module("rdma_env", "--sys-root", str(sysfs), "--device", "cpu", "--",
                   PY, "-c", PRINT_NICS + "; raise SystemExit(7)", drop=("KVCACHE_RDMA_NICS",))
    assert (r.returncode, r.stdout) == (7, "mlx5_3\n")


def test_an_existing_variable_wins(tmp_path: Path):
    r = run_module("rdma_env", "--sys-root", str(tmp_path), "--", PY, "-c", PRINT_NICS,
                   env={"KVCACHE_RDMA_NICS": "mlx5_9"})
    assert (r.returncode, r.stdout, r.stderr) == (0, "mlx5_9\n", "")


def test_no_nic_exits_1_naming_the_directory_and_rdma_nics(tmp_path: Path, sysfs: Path):
    r = run_module("rdma_env", "--sys-root", str(tmp_path), "--", PY, "-c", PRINT_NICS,
                   env={"KVCACHE_RDMA_NICS": ""})
    assert r.returncode == 1 and r.stdout == ""
    assert str(tmp_path / "sys/class/infiniband") in r.stderr
    assert "rdma_nics" in r.stderr and "no RDMA device there" in r.stderr
    # a tree with RDMA devices but no GPU: each device's reason is given
    for g in (sysfs / "sys/bus/pci/devices").iterdir():
        if (g / "class").read_text().startswith(("0x03", "0x0780")):
            g.unlink()
    r = run_module("rdma_env", "--sys-root", str(sysfs), "--print", drop=("KVCACHE_RDMA_NICS",))
    assert r.returncode == 1
    assert "mlx5_0: no GPU on its PCI root port 0000:17:00.0" in r.stderr
    assert "no GPU found in" in r.stderr and "rdma_nics" in r.stderr


def test_print(sysfs: Path, tmp_path: Path):
    r = run_module("rdma_env", "--print", "--sys-root", str(sysfs))
    assert (r.returncode, r.stdout) == (0, "KVCACHE_RDMA_NICS=mlx5_0,mlx5_2,mlx5_5,mlx5_10\n")
    r = run_module("rdma_env", "--print", "--sys-root", str(tmp_path / "none"))
    assert (r.returncode, r.stdout) == (1, "")


@pytest.mark.parametrize("args", [[], ["--print", "--", "true"], ["--device", "xpu", "--",
                                                                    "true"]])
def test_rdma_env_usage_errors(args: list[str], tmp_path: Path):
    r = run_module("rdma_env", "--sys-root", str(tmp_path), *args)
    assert r.returncode == 2


def test_exec_of_a_missing_program(sysfs: Path):
    r = run_module("rdma_env", "--sys-root", str(sysfs), "--", "/nonexistent/engine",
                   drop=("KVCACHE_RDMA_NICS",))
    assert r.returncode == 127 and "cannot execute '/nonexistent/engine'" in r.stderr


# =========================================================================== http_check

HTTP_HOST = "127.0.1.5"


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, str]] = {}

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        status, body = self.routes.get(self.path, (404, "not found"))
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def web() -> Iterator[str]:
    _Handler.routes = {
        "/one-each": (200, json.dumps({"mixed": 0, "prefill": 1, "decode": 1})),
        "/no-decode": (200, json.dumps({"mixed": 0, "prefill": 2, "decode": 0})),
        "/text": (200, "<html>hello</html>"),
        "/list": (200, "[1, 2]"),
        "/busy": (503, "busy"),
    }
    server = http.server.ThreadingHTTPServer((HTTP_HOST, free_port(HTTP_HOST)), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{HTTP_HOST}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


GATE = ("--expect", "prefill>=1", "--expect", "decode>=1")


def test_http_check_pass(web: str, capsys: pytest.CaptureFixture[str]):
    assert http_check.main(["--url", f"{web}/one-each", *GATE]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "ok: prefill=1 (>= 1)", "ok: decode=1 (>= 1)",
        '{"mixed": 0, "prefill": 1, "decode": 1}']


def test_http_check_missing(web: str, capsys: pytest.CaptureFixture[str]):
    rc = http_check.main(["--url", f"{web}/no-decode", *GATE, "--expect", "mixed==0",
                          "--expect", "prefill > 2", "--expect", "other<=3"])
    assert rc == 1
    assert capsys.readouterr().out.splitlines() == [
        "ok: prefill=2 (>= 1)", "missing: decode=0 (needs >= 1)", "ok: mixed=0 (== 0)",
        "missing: prefill=2 (needs > 2)", "missing: other=absent (needs <= 3)",
        '{"mixed": 0, "prefill": 2, "decode": 0}']


def test_http_check_ignores_proxies(web: str):
    dead = "http://127.0.0.1:9"
    r = run_module("http_check", "--url", f"{web}/one-each", *GATE,
                   env={"http_proxy": dead, "HTTP_PROXY": dead, "all_proxy": dead})
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("path, what", [
    ("/text", "did not answer JSON: '<html>hello</html>'"),
    ("/list", "JSON that is not an object: [1, 2]"),
    ("/busy", "answered HTTP 503"),
])
def test_http_check_bad_answers(web: str, path: str, what: str,
                                capsys: pytest.CaptureFixture[str]):
    assert http_check.main(["--url", f"{web}{path}", *GATE]) == 2
    err = capsys.readouterr().err
    assert f"{web}{path}" in err and what in err


def test_http_check_unreachable(capsys: pytest.CaptureFixture[str]):
    url = f"http://{HTTP_HOST}:{free_port(HTTP_HOST)}/registered_number"
    assert http_check.main(["--url", url, *GATE, "--timeout", "2"]) == 2
    assert f"cannot reach {url}" in capsys.readouterr().err


def test_http_check_bad_arguments(capsys: pytest.CaptureFixture[str]):
    assert http_check.main(["--url", "ftp://h/x"]) == 2
    assert "bad --url 'ftp://h/x'" in capsys.readouterr().err
    for bad in ("prefill=>1", "prefill>=x", ">=1", "prefill<1"):
        with pytest.raises(SystemExit) as exc:
            http_check.main(["--url", "http://h/", "--expect", bad])
        assert exc.value.code == 2


def test_http_check_parse_and_check():
    assert http_check.parse_expect(" decode >= -1 ") == ("decode", ">=", -1)
    results = http_check.check({"a": True, "b": "1", "c": 1.5}, [
        ("a", ">=", 0), ("b", ">=", 0), ("c", ">", 1)])
    assert [ok for ok, _ in results] == [False, False, True]
    assert results[1][1] == 'missing: b="1" (needs >= 0)'


# =========================================================================== version_check


def fake_version(text: str, *, stderr: bool = False, code: int = 0) -> list[str]:
    stream = "sys.stderr" if stderr else "sys.stdout"
    return [PY, "-c", f"import sys; {stream}.write({text!r} + '\\n'); sys.exit({code})"]


def vcheck(*argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = version_check.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_version_newer_and_equal(capsys: pytest.CaptureFixture[str]):
    cmd = fake_version("Redis server v=7.0.15 sha=0")
    assert vcheck("--min", "6.2.0", "--name", "redis-server", "--", *cmd,
                  capsys=capsys) == (0, "redis-server 7.0.15 >= 6.2.0\n", "")
    rc, out, _ = vcheck("--min", "6.2", "--", *fake_version("tool 6.2.0", stderr=True),
                        capsys=capsys)
    assert rc == 0 and out.endswith(" 6.2.0 >= 6.2\n")
    assert out.startswith(Path(PY).name + " ")  # NAME defaults to the base name


def test_version_older(capsys: pytest.CaptureFixture[str]):
    rc, out, err = vcheck("--min", "6.2.0", "--name", "redis-server",
                          "--why", "FastDeploy's splitwise scheduler needs RPOP with a count",
                          "--", *fake_version("Redis server v=5.0.7 sha=00000000:0"),
                          capsys=capsys)
    assert (rc, out) == (1, "")
    assert err == ("version_check: redis-server 5.0.7 is older than 6.2.0 (FastDeploy's "
                   "splitwise scheduler needs RPOP with a count)\n")
    rc, _, err = vcheck("--min", "6.2.1", "--", *fake_version("v6.2"), capsys=capsys)
    assert rc == 1 and "6.2 is older than 6.2.1" in err


def test_version_none_or_command_missing(capsys: pytest.CaptureFixture[str]):
    rc, _, err = vcheck("--min", "6.2.0", "--", *fake_version("no number here", code=3),
                        capsys=capsys)
    assert rc == 2 and "(exit 3) printed no version" in err and "no number here" in err
    rc, _, err = vcheck("--min", "6.2.0", "--name", "redis-server", "--",
                        "/nonexistent/redis-server", "--version", capsys=capsys)
    assert rc == 2 and "cannot run '/nonexistent/redis-server' (redis-server)" in err
    rc, _, err = vcheck("--min", "6.2.0", "--timeout", "0.5", "--",
                        PY, "-c", "import time; time.sleep(5)", capsys=capsys)
    assert rc == 2 and "did not finish within 0.5s" in err


def test_version_bad_arguments():
    for argv in (["--min", "six", "--", "true"], ["--min", "6.2.0"], ["--", "true"]):
        with pytest.raises(SystemExit) as exc:
            version_check.main(argv)
        assert exc.value.code == 2


def test_find_version():
    assert version_check.find_version("Redis server v=7.0.15 sha=00000000:0 bits=64") == (
        "7.0.15", (7, 0, 15))
    assert version_check.find_version("built 2024; 10.1 ok") == ("10.1", (10, 1, 0))
    assert version_check.find_version("nothing 7") is None
    assert version_check.parse_version("v6.2") == (6, 2, 0)


@pytest.mark.skipif(not os.path.exists(REDIS), reason=f"{REDIS} not installed")
def test_version_of_the_real_redis_server():
    r = run_module("version_check", "--min", "6.2.0", "--name", "redis-server", "--",
                   REDIS, "--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("redis-server ") and r.stdout.endswith(" >= 6.2.0\n")
    r = run_module("version_check", "--min", "999.0", "--", REDIS, "--version")
    assert r.returncode == 1 and "is older than 999.0" in r.stderr


# =========================================================================== redis_nodes

REDIS_HOST = "127.0.1.6"
PASSWORD = 'pä ss"w\\ord'  # a space, a quote, a backslash and non-ASCII: quoting matters


def conf_quote(value: str) -> str:
    """`value` as a double-quoted redis.conf argument."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class RedisServer:
    host: str
    port: int
    conf: Path
    password: str | None
    proc: subprocess.Popen

    def client(self) -> Resp:
        r = Resp(self.host, self.port, 3.0)
        if self.password:
            r.command("AUTH", self.password)
        return r


@contextmanager
def running_redis(tmp: Path, password: str | None) -> Iterator[RedisServer]:
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port(REDIS_HOST)
    conf = tmp / "redis.conf"
    lines = ["# written like pd-deploy's redis.conf", f"bind {REDIS_HOST}", f"port {port}",
             "daemonize no", "protected-mode no"]
    if password:
        lines.append(f"requirepass {conf_quote(password)}")
    conf.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen([REDIS, str(conf), "--save", "", "--appendonly", "no",
                             "--dir", str(tmp)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    server = RedisServer(REDIS_HOST, port, conf, password, proc)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with server.client() as r:
                    assert r.command("PING") == "PONG"
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@pytest.fixture(scope="module")
def redis_open(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if not os.path.exists(REDIS):
        pytest.skip(f"{REDIS} not installed")
    with running_redis(tmp_path_factory.mktemp("redis-open"), None) as server:
        yield server


@pytest.fixture(scope="module")
def redis_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if not os.path.exists(REDIS):
        pytest.skip(f"{REDIS} not installed")
    with running_redis(tmp_path_factory.mktemp("redis-auth"), PASSWORD) as server:
        yield server


def register(server: RedisServer, topic: str, role: str, host: str, age: float,
             load: int = 0) -> str:
    node = uuid.uuid4().hex
    info = {"ts": time.time() - age, "role": role, "load": load, "host": host,
            "disaggregated": {"transfer_protocol": ["ipc", "rdma"]}}
    with server.client() as r:
        assert r.command("HSET", f"{topic}.cluster", node, json.dumps(info)) == 1
    return node


def nodes_cli(server: RedisServer, topic: str, *extra: str, conf: Path | None = None
              ) -> subprocess.CompletedProcess:
    return run_module("redis_nodes", "--config", str(conf or server.conf), "--topic", topic,
                      *extra)


@needs_redis
def test_resp_client_replies(redis_open: RedisServer):
    with redis_open.client() as r:
        assert r.command("PING") == "PONG"
        assert r.command("PING", b"bin\x00ary\r\n") == b"bin\x00ary\r\n"
        assert r.command("HGETALL", f"none-{uuid.uuid4().hex}") == []
        key = f"k-{uuid.uuid4().hex}"
        assert r.command("HSET", key, "a", "1", "b", "") == 2
        assert sorted(r.command("HGETALL", key)) == [b"", b"1", b"a", b"b"]
        with pytest.raises(RespError, match="ERR unknown command"):
            r.command("NOSUCHCOMMAND")
        assert r.command("PING") == "PONG"  # still in step after an error
        with pytest.raises(RespError, match="WRONGTYPE"):
            r.command("LPUSH", key.encode(), "x")
        assert r.command("DEL", key) == 1


@needs_redis
def test_fresh_and_stale_nodes(redis_open: RedisServer):
    topic = f"t{uuid.uuid4().hex[:8]}"
    register(redis_open, topic, "prefill", "127.0.1.1", 0.4)
    register(redis_open, topic, "decode", "127.0.1.2", 9.0, load=3)
    r = nodes_cli(redis_open, topic, "--expect", "prefill", "--expect", "decode")
    assert r.returncode == 1, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"2 node(s) in {topic}.cluster at Redis {REDIS_HOST}:{redis_open.port}"
    assert lines[1].startswith("decode 127.0.1.2 load 3 age 9.") and lines[1].endswith(" STALE")
    assert lines[2].startswith("prefill 127.0.1.1 load 0 age 0.") and "STALE" not in lines[2]
    assert lines[3:] == ["present: prefill (1 live)",
                         f"missing: decode (no live node in {topic}.cluster)"]
    # a fresh decode arrives; a longer --max-age-ms would also accept the old one
    register(redis_open, topic, "decode", "127.0.1.3", 0.1)
    r = nodes_cli(redis_open, topic, "--expect", "prefill", "--expect", "decode")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines()[-1] == "present: decode (1 live)"
    r = nodes_cli(redis_open, topic, "--expect", "decode", "--max-age-ms", "60000")
    assert r.stdout.splitlines()[-1] == "present: decode (2 live)"


@needs_redis
def test_empty_topic_and_unreadable_entries(redis_open: RedisServer):
    topic = f"t{uuid.uuid4().hex[:8]}"
    r = nodes_cli(redis_open, topic, "--expect", "prefill")
    assert r.returncode == 1
    assert r.stdout.splitlines()[1:] == [f"missing: prefill (no live node in {topic}.cluster)"]
    with redis_open.client() as c:
        c.command("HSET", f"{topic}.cluster", "n1", "not json", "n2", '{"role": "prefill"}')
    r = nodes_cli(redis_open, topic)
    assert r.returncode == 0  # nothing expected
    assert r.stdout.splitlines()[1:] == ["? unreadable entry n1",
                                         "prefill ? load ? no ts STALE"]


@needs_redis
def test_with_password(redis_auth: RedisServer, tmp_path: Path):
    topic = f"t{uuid.uuid4().hex[:8]}"
    register(redis_auth, topic, "prefill", "127.0.1.1", 0.2)
    register(redis_auth, topic, "decode", "127.0.1.2", 0.2)
    r = nodes_cli(redis_auth, topic, "--expect", "prefill", "--expect", "decode")
    assert r.returncode == 0, r.stderr
    assert PASSWORD not in r.stdout + r.stderr
    # the wrong password: exit 2, host:port named, neither password printed
    wrong = tmp_path / "wrong.conf"
    wrong.write_text(redis_auth.conf.read_text().replace(
        conf_quote(PASSWORD), conf_quote("Wr0ng-Secret")))
    r = nodes_cli(redis_auth, topic, "--expect", "prefill", conf=wrong)
    assert r.returncode == 2 and r.stdout == ""
    assert f"Redis {REDIS_HOST}:{redis_auth.port} refused the password" in r.stderr
    assert "Wr0ng-Secret" not in r.stderr and PASSWORD not in r.stderr
    # no password at all: the server's NOAUTH error
    nopass = tmp_path / "nopass.conf"
    nopass.write_text("\n".join(line for line in redis_auth.conf.read_text().splitlines()
                                if not line.startswith("requirepass")) + "\n")
    r = nodes_cli(redis_auth, topic, conf=nopass)
    assert r.returncode == 2 and "NOAUTH" in r.stderr


@needs_redis
def test_password_sent_to_a_server_without_one(redis_open: RedisServer, tmp_path: Path):
    conf = tmp_path / "extra.conf"
    conf.write_text(redis_open.conf.read_text() + "requirepass 'Unused-Secret'\n")
    r = nodes_cli(redis_open, "t", conf=conf)
    assert r.returncode == 2 and "Unused-Secret" not in r.stderr
    assert f"Redis {REDIS_HOST}:{redis_open.port} answered an error" in r.stderr


def test_redis_unreachable_and_bad_config(tmp_path: Path):
    port = free_port(REDIS_HOST)
    conf = tmp_path / "redis.conf"
    conf.write_text(f"bind {REDIS_HOST} -::1\nport {port}\nrequirepass \"S3cret\"\n")
    r = run_module("redis_nodes", "--config", str(conf), "--topic", "t", "--expect", "decode",
                   "--timeout", "2")
    assert r.returncode == 2
    assert f"cannot reach Redis {REDIS_HOST}:{port}" in r.stderr and "S3cret" not in r.stderr
    r = run_module("redis_nodes", "--config", str(tmp_path / "absent.conf"), "--topic", "t")
    assert r.returncode == 2 and "cannot read" in r.stderr
    conf.write_text('port 1\nrequirepass "S3cret\n')
    r = run_module("redis_nodes", "--config", str(conf), "--topic", "t")
    assert r.returncode == 2 and "line 2: unbalanced quotes" in r.stderr
    assert "S3cret" not in r.stderr
    r = run_module("redis_nodes", "--topic", "t")
    assert r.returncode == 2


def test_config_parsing():
    cfg = parse_config(b"# c\n  \nbind * -::*\nport 7000\nrequirepass \"a b\\x41\\\"\"\n"
                       b"Port 7001\r\n")
    assert (cfg.host, cfg.port, cfg.password, cfg.address) == (
        "127.0.0.1", 7001, b'a bA"', "127.0.0.1:7001")
    cfg = parse_config(b"bind ::1\nrequirepass ''\n")
    assert (cfg.host, cfg.port, cfg.password, cfg.address) == ("::1", 6379, None, "[::1]:6379")
    assert parse_config(b"bind 10.0.0.5 127.0.0.1\n").host == "10.0.0.5"
    assert split_config_line(b"save \"\"  'it\\'s' a\"b c\"") == [b"save", b"", b"it's",
                                                                 b"ab c"]
    for bad in (b'requirepass "x"y', b"requirepass 'x", b"port seven"):
        with pytest.raises(ValueError, match="redis.conf line 1"):
            parse_config(bad)
    with pytest.raises(ValueError, match="port 0"):
        parse_config(b"port 0\n")


def test_parse_nodes():
    now = 1000.0
    pairs = [b"a", json.dumps({"ts": 999.5, "role": "decode", "load": 2, "host": "h2"}),
             b"b", json.dumps({"ts": 990.0, "role": "prefill", "load": 0, "host": "h1"}),
             b"c", json.dumps({"ts": 1001.0, "role": "prefill", "load": 1, "host": "h0"})]
    nodes = parse_nodes(pairs, now, 3.0)
    assert [(n.field, n.live) for n in nodes] == [("a", True), ("c", True), ("b", False)]
    assert nodes[1].line() == "prefill h0 load 1 age -1.0s"
    assert nodes[2].line() == "prefill h1 load 0 age 10.0s STALE"


def test_redis_nodes_main_in_process(capsys: pytest.CaptureFixture[str], tmp_path: Path):
    conf = tmp_path / "r.conf"
    conf.write_text(f"bind {REDIS_HOST}\nport {free_port(REDIS_HOST)}\n")
    assert redis_nodes.main(["--config", str(conf), "--topic", "t", "--timeout", "1"]) == 2
    assert "cannot reach Redis" in capsys.readouterr().err


# =========================================================================== Python 3.9


def _python39() -> str | None:
    for cand in sorted(glob.glob("/root/.pyenv/versions/3.9*/bin/python3.9")) + [
            "/usr/bin/python3.9"]:
        if os.path.exists(cand):
            return cand
    return None


PY39 = _python39()


@pytest.mark.skipif(PY39 is None, reason="no Python 3.9 interpreter found")
@needs_redis
def test_the_tools_run_on_python39(sysfs: Path, web: str, redis_open: RedisServer):
    assert PY39 is not None
    env = py_env()
    env.pop("KVCACHE_RDMA_NICS", None)

    def run(module: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([PY39, "-m", f"pd_launcher.{module}", *args], env=env,
                              capture_output=True, text=True, timeout=30)

    r = run("rdma_env", "--sys-root", str(sysfs), "--", PY39, "-c", PRINT_NICS)
    assert (r.returncode, r.stdout) == (0, "mlx5_0,mlx5_2,mlx5_5,mlx5_10\n"), r.stderr
    r = run("http_check", "--url", f"{web}/one-each", *GATE)
    assert r.returncode == 0, r.stderr
    r = run("version_check", "--min", "6.2.0", "--", REDIS, "--version")
    assert r.returncode == 0, r.stderr
    topic = f"t{uuid.uuid4().hex[:8]}"
    register(redis_open, topic, "prefill", "127.0.1.1", 0.1)
    r = run("redis_nodes", "--config", str(redis_open.conf), "--topic", topic,
            "--expect", "prefill")
    assert r.returncode == 0, r.stderr
