"""Process lifecycle: bind, start-up delay, DP rendezvous, readiness, SIGTERM drain."""
from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import socket
import sys
from typing import Any, Dict, List, Optional

from aiohttp import web

from .args import EngineArgs, StartupError
from .dp import DPMaster, DPWorker
from .engine import RankEngine
from .kvnet import KVServer
from .metrics import Metrics
from .server import Api, Router, State
from .settings import Faults, Latency

log = logging.getLogger("pd_emu")


def bind(host: str, port: int, what: str, listen: bool = True) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        if listen:
            sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot bind the {what} port {host}:{port}: "
                           f"{exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def _runner_kwargs() -> Dict[str, Any]:
    """AppRunner keyword arguments for the installed aiohttp. 3.9+ cancels a handler on
    client disconnect only with handler_cancellation=True (3.8, Debian bookworm's, always
    does); 3.10+ takes shutdown_timeout on the runner."""
    kw: Dict[str, Any] = {}
    if "handler_cancellation" in inspect.signature(web.Server.__init__).parameters:
        kw["handler_cancellation"] = True
    if "shutdown_timeout" in inspect.signature(web.BaseRunner.__init__).parameters:
        kw["shutdown_timeout"] = 0.2
    return kw


def _tag(args: EngineArgs) -> str:
    ranks = args.ranks
    where = f"dp{ranks[0]}" if len(ranks) == 1 else f"dp{ranks[0]}-{ranks[-1]}"
    role = args.kv.role if args.kv else "aggregated"
    return f"{'headless ' if args.headless else ''}{where} {role}"


def setup_logging(args: EngineArgs) -> None:
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s [emulator {_tag(args)}] %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


class Runtime:
    def __init__(self, args: EngineArgs, lat: Latency, faults: Faults) -> None:
        self.args, self.lat, self.faults = args, lat, faults
        self.metrics = Metrics(args.served_name)
        self.state = State()
        self.stop = asyncio.Event()
        self.exit_code = 0
        adv = args.kv_host
        if adv in ("0.0.0.0", "::", ""):
            adv = args.dp_address
        self.kv_bind_host = args.kv_host or "0.0.0.0"
        self.engines: Dict[int, RankEngine] = {}
        for i, rank in enumerate(args.ranks):
            addr = (adv, args.kv_ports[i]) if args.kv_ports else None
            self.engines[rank] = RankEngine(rank, args, lat, self.metrics, addr)
        self.kv_servers: List[KVServer] = []
        self.master: Optional[DPMaster] = None
        self.worker: Optional[DPWorker] = None
        self.runner: Optional[web.AppRunner] = None
        self.api_server: Optional[asyncio.AbstractServer] = None
        self.tasks: List[asyncio.Task] = []

    # -- routing -----------------------------------------------------------------
    def handles(self) -> List[Any]:
        hs: List[Any] = list(self.engines.values())
        if self.master is not None and self.args.dp_mode == "internal":
            hs.extend(self.master.remote.values())
        return hs

    def _dp_changed(self, complete: bool) -> None:
        self.state.dp_ok = complete
        self.state.changed()

    def _refused(self, error: str) -> None:
        log.error("DP master refused this process: %s", error)
        self.exit_code = 1
        self.stop.set()

    # -- start ---------------------------------------------------------------------
    async def start(self) -> None:
        a = self.args
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        api_sock = None if a.headless else bind(a.host or "0.0.0.0", a.port, "API")
        for port in a.kv_ports:  # detect a clash now; the listener opens once ready
            bind(self.kv_bind_host, port, "KV").close()
        dp_sock = bind(a.dp_address, a.dp_rpc_port, "DP RPC") if a.dp_master else None
        log.info("starting: %s; model %s served as %s", a.describe(), a.model,
                 ", ".join(a.served_model_names))
        if a.ignored:
            log.info("ignoring vLLM flags the emulator does not model: %s", " ".join(a.ignored))
        if a.kv:
            log.info("KV connector %s (%s), engine id %s, KV listeners %s on %s, policy %s",
                     a.kv.connector, a.kv.role, a.kv.engine_id, a.kv_ports, self.kv_bind_host,
                     a.kv.policy)
        self.state.on_ready.append(self._became_ready)
        if api_sock is not None:
            api = Api(a, self.lat, self.faults, self.metrics, self.state, Router(self.handles))
            self.runner = web.AppRunner(api.app(), access_log=None, **_runner_kwargs())
            await self.runner.setup()
            # our own listener (not a Site): closing it stops new connections without
            # touching in-flight ones, on every aiohttp version
            self.api_server = await loop.create_server(self.runner.server, sock=api_sock,
                                                       backlog=1024)
            log.info("API server on http://%s:%d (/health is 503 until ready)",
                     a.host or "0.0.0.0", a.port)
        else:
            log.info("headless: no API server; ranks %s register with the DP master %s:%d",
                     a.ranks, a.dp_address, a.dp_rpc_port)
        if a.dp > 1:
            self.state.dp_ok = False
            if dp_sock is not None:
                self.master = DPMaster(a.dp, self._dp_changed)
                await self.master.start(dp_sock)
                log.info("DP master listening on %s:%d for %d ranks", a.dp_address,
                         a.dp_rpc_port, a.dp)
            else:
                log.info("%s DP rank(s) %s: DP master is %s:%d", a.dp_mode, a.ranks,
                         a.dp_address, a.dp_rpc_port)
        self.tasks.append(asyncio.ensure_future(self._load()))

    async def _load(self) -> None:
        delay = self.lat.startup_s + self.faults.slow_start_s
        if self.faults.slow_start_s:
            self.metrics.faults.inc(("slow_start",))
            log.warning("fault: slow start, +%gs", self.faults.slow_start_s)
        if delay > 0:
            log.info("loading the model (start-up delay %gs)", delay)
            await asyncio.sleep(delay)
        self.state.loaded = True
        log.info("model loaded")
        a = self.args
        if self.master is not None:
            self.master.register_local(a.ranks)
        elif a.dp > 1:
            self.worker = DPWorker(a.dp_address, a.dp_rpc_port, a.ranks,
                                   a.host or a.kv_host, self.engines, self._dp_changed,
                                   self._refused)
            self.tasks.append(asyncio.ensure_future(self.worker.run()))
        self.state.changed()

    def _became_ready(self) -> None:
        self.tasks.append(asyncio.ensure_future(self._open_kv()))

    async def _open_kv(self) -> None:
        try:
            for rank, port in zip(self.args.ranks, self.args.kv_ports):
                eng = self.engines[rank]
                assert eng.store is not None and eng.engine_id is not None
                srv = KVServer(rank, eng.engine_id, eng.store, self.lat.kv_timeout_s,
                               lambda: self.faults.roll(self.faults.kv_corrupt_rate),
                               self._kv_outcome(rank),
                               cut=lambda: self.faults.roll(self.faults.kv_cut_rate))
                await srv.start(bind(self.kv_bind_host, port, "KV"))
                self.kv_servers.append(srv)
        except StartupError as exc:
            log.error("%s", exc)
            self.exit_code = 1
            self.stop.set()
            return
        log.info("ready: %s%s", "API /health is 200" if not self.args.headless else "headless",
                 f"; KV listeners {self.args.kv_ports} open" if self.args.kv_ports else "")

    def _kv_outcome(self, rank: int):
        lv = self.metrics.lv(rank)

        def record(outcome: str) -> None:
            self.metrics.kv_served.inc(lv + (outcome,))
        return record

    def _on_signal(self, sig: int) -> None:
        if self.stop.is_set():
            return
        log.info("received %s: draining (grace %gs)", signal.Signals(sig).name,
                 self.lat.shutdown_grace_s)
        self.stop.set()

    # -- stop ----------------------------------------------------------------------
    async def shutdown(self) -> None:
        st = self.state
        st.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.lat.shutdown_grace_s
        if self.api_server is not None:
            self.api_server.close()  # no new connections
        if self.worker is not None:
            await self.worker.drain(deadline)
        if st.inflight:
            log.info("waiting for %d in-flight requests", st.inflight)
            try:
                await asyncio.wait_for(st.idle.wait(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                log.warning("grace period over: aborting %d requests", st.inflight)
        if self.runner is not None:
            await self.runner.cleanup()
        if self.worker is not None:
            self.worker.leave()
        for task in self.tasks:
            task.cancel()
        for srv in self.kv_servers:
            if srv.server is not None:
                srv.server.close()
        freed = sum(e.store.free_all() for e in self.engines.values() if e.store is not None)
        if freed:
            log.info("freed %d held KV blocks", freed)
        if self.master is not None:
            self.master.close()
        log.info("stopped (exit %d)", self.exit_code)


async def serve(args: EngineArgs, lat: Latency, faults: Faults) -> int:
    rt = Runtime(args, lat, faults)
    try:
        await rt.start()
    except StartupError as exc:
        log.error("%s", exc)
        return 1
    await rt.stop.wait()
    await rt.shutdown()
    return rt.exit_code
