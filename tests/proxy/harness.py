"""Harness of the proxy conformance suite (helpers; fixtures in conftest.py).

* `Backend`: a real aiohttp server on a 127.0.1.x address that records every
  request (headers, raw body, parsed JSON, arrival time) and plays a prefill or a
  decode engine (vLLM-shaped JSON / SSE), with fault injection: status codes,
  delays, dropped connections, a gate that holds a stream after its first chunk,
  and detection of the proxy closing the connection.
* `Proxy`: renders pd_deploy.proxy_config.proxy_unit into a temporary run dir and runs
  nginx and the proxy agent exactly as the node launcher would (pre_start, then
  the processes' argv), on its own 127.0.1.x address. With `router=[...]` the block
  is a router-mode block (nginx in front of an engine's own router).
* `http()` / `stream()`: small synchronous clients (http.client / raw socket).
"""
from __future__ import annotations

import asyncio
import http.client as httplib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx")
                                  else None)
NJS_MODULE = "/usr/lib/nginx/modules/ngx_http_js_module.so"

needs_nginx = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed (apt-get install nginx libnginx-mod-http-js)")

# addresses of this suite (other suites use the low 127.0.1.x addresses)
PROXY_HOST = "127.0.1.101"
PREFILL_HOSTS = ["127.0.1.111", "127.0.1.112", "127.0.1.113"]
DECODE_HOSTS = ["127.0.1.121", "127.0.1.122", "127.0.1.123"]


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def closed_addr(host: str) -> str:
    """host:port where nothing listens (connect refused)."""
    return f"{host}:{free_port(host)}"


# ------------------------------------------------------------------ backends


class _Loop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 10):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Backend:
    """A recording, fault-injecting stand-in for one engine API endpoint."""

    def __init__(self, loop: _Loop, host: str, role: str):
        self.loop, self.host, self.role = loop, host, role
        self.port = free_port(host)
        self.requests: list[dict] = []
        self.faults: list[dict] = []      # consumed in order, one per request
        self.fault_always: dict | None = None
        self.tokens = 4                   # default completion length
        self.chunk_delay = 0.0
        self.gate: threading.Event | None = None   # hold the stream after chunk 1
        self.chunk_times: list[float] = []
        self.closed_by_peer: list[float] = []     # proxy closed a stream early
        self.health_ok = True
        self.usage_bug = True             # decode reports the whole prompt as cached
        self.split_writes = False         # send every SSE event in two pieces
        self.cut_after: int | None = None  # streams: drop the connection after n events
        self.runner = None

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    def gen_requests(self) -> list[dict]:
        return [r for r in self.requests if r["path"] != "/health"]

    # ---------------------------------------------------------------- server
    async def _start(self) -> None:
        from aiohttp import web

        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                    shutdown_timeout=0.2)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port)
        await site.start()

    def start(self) -> Backend:
        self.loop.run(self._start())
        return self

    def stop(self) -> None:
        if self.runner is not None:
            try:
                self.loop.run(self.runner.cleanup())
            except Exception:
                pass
            self.runner = None

    # ---------------------------------------------------------------- handler
    async def _handle(self, request):
        from aiohttp import web

        raw = await request.read()
        rec = {"path": request.path, "method": request.method,
               "headers": {k.lower(): v for k, v in request.headers.items()},
               "raw": raw, "t": time.monotonic(),
               "peer": request.transport.get_extra_info("peername") if request.transport
               else None}
        try:
            rec["json"] = json.loads(raw) if raw else None
        except ValueError:
            rec["json"] = None
        self.requests.append(rec)
        if request.path == "/health":
            return web.Response(status=200 if self.health_ok else 503, text="")
        if request.path == "/v1/models":
            return web.json_response({"object": "list", "data": [
                {"id": "demo-model", "object": "model", "owned_by": self.addr}]})
        fault = self.faults.pop(0) if self.faults else self.fault_always
        if fault:
            kind = fault["kind"]
            if kind == "status":
                return web.Response(status=fault["status"], body=fault.get("body", b""),
                                    content_type=fault.get("ctype", "application/json"))
            if kind == "sleep":
                await asyncio.sleep(fault["s"])
            elif kind == "drop":
                request.transport.close()
                return web.Response(status=200, text="")
        body = rec["json"] or {}
        rid = request.headers.get("X-Request-Id", "none")
        if self.role == "prefill":
            return web.json_response(self.prefill_response(body, rid))
        return await self.decode_response(request, body, rid)

    @staticmethod
    def prompt_tokens(body: dict) -> int:
        if "messages" in body:
            text = "".join(str(m.get("content", "")) for m in body["messages"])
        else:
            text = str(body.get("prompt", ""))
        return max(1, len(text) // 4)

    def prefill_response(self, body: dict, rid: str) -> dict:
        n = self.prompt_tokens(body)
        return {
            "id": f"cmpl-{rid}", "object": "text_completion", "created": 1,
            "model": body.get("model"),
            "choices": [{"index": 0, "text": "A", "finish_reason": "length"}],
            "usage": {"prompt_tokens": n, "completion_tokens": 1, "total_tokens": n + 1,
                      "prompt_tokens_details": {"cached_tokens": 2}},
            "kv_transfer_params": {"do_remote_prefill": True, "do_remote_decode": False,
                                   "remote_engine_id": f"eng-{self.port}",
                                   "remote_block_ids": [1, 2, 3], "remote_host": self.host,
                                   "remote_port": self.port, "tp_size": 1},
        }

    def _usage(self, body: dict, completion: int) -> dict:
        n = self.prompt_tokens(body)
        if self.usage_bug and body.get("kv_transfer_params"):
            # the known bug class: everything counted as cached, prompt off by a few
            return {"prompt_tokens": n + 7, "completion_tokens": completion,
                    "total_tokens": n + 7 + completion,
                    "prompt_tokens_details": {"cached_tokens": n + 7}}
        return {"prompt_tokens": n, "completion_tokens": completion,
                "total_tokens": n + completion,
                "prompt_tokens_details": {"cached_tokens": 0}}

    async def decode_response(self, request, body: dict, rid: str):
        from aiohttp import web

        chat = request.path.endswith("/chat/completions")
        n = int(body.get("max_tokens") or body.get("max_completion_tokens") or self.tokens)
        if not body.get("stream") and self.cut_after is not None:
            # a JSON answer cut after its head and a first piece (chunked)
            resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
            await resp.prepare(request)
            await resp.write(b'{"id": "cmpl-cut", "choices": [')
            await asyncio.sleep(0.05)
            request.transport.abort()
            return resp
        if not body.get("stream"):
            text = "".join(f"t{i} " for i in range(n))
            choice = ({"index": 0, "message": {"role": "assistant", "content": text},
                       "finish_reason": "length"} if chat else
                      {"index": 0, "text": text, "finish_reason": "length"})
            return web.json_response({"id": f"cmpl-{rid}", "object": "text_completion",
                                      "model": body.get("model"), "choices": [choice],
                                      "usage": self._usage(body, n)})
        resp = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        so = body.get("stream_options") or {}
        try:
            for i in range(n):
                delta = ({"index": 0, "delta": {"content": f"t{i} "}} if chat else
                         {"index": 0, "text": f"t{i} "})
                ev = {"id": f"cmpl-{rid}", "object": "chunk", "choices": [delta]}
                self.chunk_times.append(time.monotonic())
                await resp.write(b"data: " + json.dumps(ev).encode() + b"\n\n")
                if self.cut_after is not None and i + 1 >= self.cut_after:
                    # the engine dies mid-stream: the connection ends, no last chunk
                    await asyncio.sleep(0.05)
                    request.transport.abort()
                    return resp
                if i == 0 and self.gate is not None:
                    while not self.gate.is_set():
                        await asyncio.sleep(0.01)
                        if request.transport is None or request.transport.is_closing():
                            raise ConnectionResetError("peer closed")
                if self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)
                if request.transport is None or request.transport.is_closing():
                    raise ConnectionResetError("peer closed")
            if so.get("include_usage"):
                ev = {"id": f"cmpl-{rid}", "object": "chunk", "choices": [],
                      "usage": self._usage(body, n)}
                data = b"data: " + json.dumps(ev).encode() + b"\n\n"
                if self.split_writes:     # cut inside "usage" and before the blank line
                    cut = data.index(b'"usage"') + 3
                    for piece in (data[:cut], data[cut:-1], data[-1:]):
                        await resp.write(piece)
                        await asyncio.sleep(0.03)
                else:
                    await resp.write(data)
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except (ConnectionResetError, ConnectionError, RuntimeError):
            self.closed_by_peer.append(time.monotonic())
        return resp


@pytest.fixture(scope="session")
def aloop():
    lp = _Loop()
    yield lp
    lp.close()


@pytest.fixture
def backends(aloop):
    """backends(n_prefill, n_decode) -> (prefill list, decode list); stopped after."""
    made: list[Backend] = []

    def make(n_prefill: int = 1, n_decode: int = 1):
        p = [Backend(aloop, PREFILL_HOSTS[i], "prefill").start() for i in range(n_prefill)]
        d = [Backend(aloop, DECODE_HOSTS[i], "decode").start() for i in range(n_decode)]
        made.extend(p + d)
        return p, d

    yield make
    for b in made:
        b.stop()


# ------------------------------------------------------------------ the proxy


class Proxy:
    def __init__(self, tmp: Path, prefill: list[str] | None, decode: list[str] | None,
                 options: dict, agent: bool = True, router: list[str] | None = None,
                 host: str | None = None):
        from pd_deploy.proxy_config import proxy_unit

        self.host = host or PROXY_HOST
        self.port = free_port(self.host)
        opts = {"admin_port": free_port(self.host), "active_health": False}
        opts.update(options)
        self.dirs = {"state": str(tmp / "state"), "log": str(tmp / "log"),
                     "run": str(tmp / "run")}
        for d in self.dirs.values():
            os.makedirs(d, exist_ok=True)
        if router is not None:
            self.block = {"listen": f"{self.host}:{self.port}", "mode": "router",
                          "router": router, "served_model_name": "demo-model",
                          "options": opts}
        else:
            self.block = {"listen": f"{self.host}:{self.port}", "prefill": prefill,
                          "decode": decode, "served_model_name": "demo-model",
                          "options": opts}
        self.unit = proxy_unit(self.block, self.dirs, nginx_bin=NGINX)
        for f in self.unit["files"]:
            Path(f["path"]).write_text(f["content"])
            os.chmod(f["path"], int(f["mode"], 8))
        for argv in self.unit["pre_start"]:
            r = subprocess.run(argv, capture_output=True, text=True)
            assert r.returncode == 0, f"pre_start {argv} failed:\n{r.stderr}"
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        env = dict(os.environ, PYTHONPATH=str(REPO))
        for p in self.unit["processes"]:
            if p["name"] == "proxy-agent" and not agent:
                continue
            argv = list(p["argv"])
            if argv[0] == "python3":
                argv[0] = sys.executable
            log = Path(self.dirs["log"]) / f"{p['name']}.log"
            self.logs[p["name"]] = log
            self.procs[p["name"]] = subprocess.Popen(
                argv, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                env={**env, **p["env"]}, start_new_session=True)
        self.wait_ready(agent)
        self.access_log = Path(self.dirs["log"]) / "proxy_access.log"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def wait_ready(self, agent: bool, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        path = "/health/agent" if agent else "/health"
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise AssertionError(f"{name} exited {p.returncode}:\n"
                                         + self.logs[name].read_text())
            try:
                st, _, _ = http("GET", self.url + path, timeout=1)
                if st == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError("proxy not ready:\n" + "\n".join(
            f.read_text() for f in self.logs.values()))

    def log_lines(self, n: int | None = None, timeout: float = 5.0) -> list[dict]:
        """Parsed access log lines; waits until at least n are there."""
        deadline = time.monotonic() + timeout
        while True:
            lines = [json.loads(x) for x in self.access_log.read_text().splitlines()
                     if x.strip()] if self.access_log.exists() else []
            if n is None or len(lines) >= n or time.monotonic() > deadline:
                return lines
            time.sleep(0.05)

    def pd_lines(self, n: int, timeout: float = 5.0) -> list[dict]:
        """Access log lines of completion requests; waits until there are n (a
        line is written after the response went out)."""
        deadline = time.monotonic() + timeout
        while True:
            lines = [x for x in self.log_lines() if x["route"] in
                     ("/v1/completions", "/v1/chat/completions")]
            if len(lines) >= n or time.monotonic() > deadline:
                return lines
            time.sleep(0.02)

    def nginx_pids(self) -> list[int]:
        master = self.procs["proxy"].pid
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(master)],
                             capture_output=True, text=True).stdout.split()
        return [master] + [int(x) for x in out]

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


@pytest.fixture
def proxy_factory(tmp_path):
    made: list[Proxy] = []

    def make(prefill: list[str] | None = None, decode: list[str] | None = None,
             agent: bool = True, router: list[str] | None = None, **options) -> Proxy:
        px = Proxy(tmp_path / f"px{len(made)}", prefill, decode, options, agent=agent,
                   router=router)
        made.append(px)
        return px

    yield make
    for px in made:
        px.stop()


# ------------------------------------------------------------------ emulated engines


def emu_kv_config(role: str, port: int, engine_id: str, **extra) -> str:
    return json.dumps({"kv_connector": "MooncakeConnectorV1", "kv_role": role,
                       "kv_port": port, "engine_id": engine_id,
                       "kv_connector_extra_config": {"prefill": {"dp_size": 1, "tp_size": 1},
                                                     "decode": {"dp_size": 1, "tp_size": 1}},
                       **extra})


class EmuEngine:
    """A real emulated vLLM engine process (`python -m pd_launcher.emulator serve`)."""

    def __init__(self, name: str, host: str, role: str, logdir: Path,
                 env: dict | None = None, kv: dict | None = None,
                 model: str = "demo-model"):
        self.name, self.host = name, host
        self.port = free_port(host)
        kv_port = free_port(host)
        argv = [sys.executable, "-m", "pd_launcher.emulator", "serve", "/models/demo",
                "--host", host, "--port", str(self.port), "--served-model-name", model,
                "--max-num-seqs", "64", "--kv-transfer-config",
                emu_kv_config(role, kv_port, f"{name}-{kv_port}", **(kv or {}))]
        e = dict(os.environ, PYTHONPATH=str(REPO), PD_EMU_ZERO_LATENCY="1")
        e.pop("VLLM_NIXL_SIDE_CHANNEL_PORT", None)
        e.update(env or {})
        self.log = logdir / f"{name}.log"
        self.proc = subprocess.Popen(argv, stdout=self.log.open("wb"),
                                     stderr=subprocess.STDOUT, env=e, cwd=str(REPO))

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    def wait_ready(self, timeout: float = 20) -> EmuEngine:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited:\n{self.log.read_text()}")
            try:
                if http("GET", f"http://{self.addr}/health", timeout=1)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"{self.name} not ready:\n{self.log.read_text()}")

    def metrics(self) -> dict:
        return parse_metrics(http("GET", f"http://{self.addr}/metrics")[2].decode())

    def kill(self) -> None:
        """SIGKILL: the process dies at once, the kernel closes its sockets."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def proxy_metrics(px: Proxy, name: str, want: float | None = None, timeout: float = 5.0,
                  **labels) -> float:
    """A proxy metric; with `want`, waits until it reaches that value (the agent
    tails the access log)."""
    deadline = time.monotonic() + timeout
    while True:
        m = parse_metrics(http("GET", px.url + "/metrics")[2].decode())
        v = metric(m, name, **labels)
        if want is None or v >= want or time.monotonic() > deadline:
            return v
        time.sleep(0.1)


# ------------------------------------------------------------------ clients


def http(method: str, url: str, body=None, headers: dict | None = None,
         timeout: float = 30) -> tuple[int, dict, bytes]:
    """One request; returns (status, lower-cased headers, body)."""
    from urllib.parse import urlsplit

    u = urlsplit(url)
    c = httplib.HTTPConnection(u.hostname, u.port, timeout=timeout)
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    h = {"Content-Type": "application/json"} if body is not None else {}
    h.update(headers or {})
    c.request(method, u.path + (f"?{u.query}" if u.query else ""), body=body, headers=h)
    r = c.getresponse()
    data = r.read()
    hdrs = {k.lower(): v for k, v in r.getheaders()}
    c.close()
    return r.status, hdrs, data


def post(url: str, body, headers: dict | None = None, timeout: float = 30):
    return http("POST", url, body, headers, timeout)


def sse_events(data: bytes) -> list:
    out = []
    for line in data.decode().split("\n"):
        if line.startswith("data: "):
            p = line[6:]
            out.append(p if p == "[DONE]" else json.loads(p))
    return out


def open_stream(url: str, body: dict, headers: dict | None = None, timeout: float = 10):
    """Start a request; return (socket, file) positioned after the response head."""
    from urllib.parse import urlsplit

    u = urlsplit(url)
    s = socket.create_connection((u.hostname, u.port), timeout=timeout)
    data = json.dumps(body).encode()
    head = [f"POST {u.path} HTTP/1.1", f"Host: {u.hostname}", "Content-Type: application/json",
            f"Content-Length: {len(data)}", "Connection: close"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    s.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + data)
    f = s.makefile("rb")
    status = f.readline()
    hdrs = {}
    while True:
        line = f.readline()
        if line in (b"\r\n", b""):
            break
        k, _, v = line.decode().partition(":")
        hdrs[k.strip().lower()] = v.strip()
    return s, f, status, hdrs


def read_chunk(f) -> bytes:
    """One HTTP/1.1 chunk of a chunked body (b'' at the end)."""
    size = int(f.readline().split(b";")[0], 16)
    data = f.read(size)
    f.readline()
    return data


def parse_metrics(text: str) -> dict:
    """{(name, frozenset(labels)): value} via prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def metric(m: dict, name: str, **labels) -> float:
    return m.get((name, frozenset(labels.items())), 0.0)
