"""The proxy agent on a C node: `python -m pd_launcher.proxy_agent CONFIG.json`.

Standard library only (it runs on the node, inside any image). nginx/njs 0.7 has no
state shared across requests (no js_shared_dict before njs 0.8), and stock nginx
exposes neither counters nor the health of its upstream peers, so the agent
  - tails nginx's JSON access log and serves Prometheus metrics (/metrics);
  - probes every upstream's GET /health (active health checks) and, when a peer
    fails `health_fails` probes in a row, rewrites pd_upstreams.conf with that peer
    marked `down` and reloads nginx (SIGHUP, graceful);
  - answers /health: how many upstreams of each pool are considered healthy (last
    probe passed and no failure seen in the log within fail_timeout_s).
nginx proxies /health and /metrics to it; serving never depends on it. Its config
file is rendered on the controller by pd_deploy.proxy_config (docs/proxy.md).

Two modes (config key `mode`, absent = "pd"): "pd", nginx is the PD router (pools
prefill and decode, log fields prefill_* / decode_*); "router", nginx fronts the
engine's own router (one pool, router; log fields upstream*; probes are TCP
connects unless health.path is set, since routers differ in what they serve).

SIGHUP (the launcher's reload, spec `reload_signal`): the agent re-reads its config
file, rebuilds the pools and probe targets (peers still present keep their health
state and down-marks), re-renders pd_upstreams.conf and reloads nginx.

Operator drains (config key `drain_file`, docs/proxy.md): the controller writes
`{"id": "<token>", "peers": ["ip:port", ...]}` there; the agent looks at it at least
every 0.5 s (and at startup), writes those peers `down` whatever their health, reloads
nginx and, once nginx runs new workers, writes `<drain_file minus .json>.applied.json`
= `{"id", "peers", "applied_at"}`. Missing or empty file: no drains; an invalid one is
logged and the previous drains stay.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
import threading
import time
from typing import Any

from pd_launcher.nodeutil import atomic_write, http_status

ROUTES = ["/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"]

def render_upstreams(pools: dict[str, dict[str, Any]], down: dict[str, set] | None = None
                     ) -> str:
    """nginx `upstream` blocks of the pools; peers in down[pool] get `down`.

    Plain string building (standard library): the agent re-renders this file on
    the node when active health checks change a pool.
    """
    down = down or {}
    out = ["# pd-deploy proxy pools (rendered by pd_deploy.proxy_config; rewritten by the agent)\n"]
    for pool, p in pools.items():
        out.append(f"upstream {p['name']} {{\n")
        out.append(f"    zone {p['name']} {p['zone_kb']}k;\n")
        if p["balance"]:
            out.append(f"    {p['balance']}\n")
        for s in p["servers"]:
            flag = " down" if s in down.get(pool, ()) else ""
            out.append(f"    server {s} {p['params']}{flag};\n")
        if p["keepalive"]:
            out.append(f"    keepalive {p['keepalive']};\n")
            out.append(f"    keepalive_timeout {p['keepalive_timeout_s']}s;\n")
            out.append("    keepalive_requests 100000;\n")
        out.append("}\n")
    return "".join(out)


def error_json(code: int, type_: str, message: str) -> str:
    body = json.dumps({"error": {"message": message, "type": type_, "param": None,
                                 "code": code}}, separators=(",", ":"))
    # the body goes between single quotes in nginx.conf, where $ would be a variable
    assert "'" not in body and "$" not in body and "\\" not in body
    return body



LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
PD_ROUTES = ("/v1/completions", "/v1/chat/completions")
# pools never taken out as a whole by active checks: with nowhere to send, passive
# health and retries do better than an instant 502
LAST_RESORT_POOLS = ("decode", "router")
#: how often the control loop looks at the drain file and a pending SIGHUP (s)
CONTROL_INTERVAL = 0.25


def _esc(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(d: dict) -> str:
    if not d:
        return ""
    return "{" + ",".join(f'{k}="{_esc(v)}"' for k, v in d.items()) + "}"


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.sum += v
        self.count += 1
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
                break

    def lines(self, name: str, labels: dict) -> list[str]:
        out, acc = [], 0
        for b, c in zip(self.buckets, self.counts):
            acc += c
            out.append(f"{name}_bucket{_labels({**labels, 'le': repr(float(b))})} {acc}")
        out.append(f"{name}_bucket{_labels({**labels, 'le': '+Inf'})} {self.count}")
        out.append(f"{name}_sum{_labels(labels)} {self.sum!r}")
        out.append(f"{name}_count{_labels(labels)} {self.count}")
        return out


def _pairs(addrs: str, statuses: str) -> list[tuple[str, str]]:
    """'a:1, b:2' + '502, 200' -> [('a:1','502'), ('b:2','200')] (':'-joined
    groups of internal redirects are flattened)."""
    if not addrs:
        return []
    a = [x.strip() for x in re.split(r"[,]|\s:\s", addrs) if x.strip()]
    s = [x.strip() for x in re.split(r"[,]|\s:\s", statuses or "") if x.strip()]
    s += ["-"] * (len(a) - len(s))
    return list(zip(a, s))


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


class Metrics:
    """Counters derived from the access log. One lock; small critical sections."""

    def __init__(self, pools: dict[str, dict[str, Any]], max_fails: int = 1,
                 mode: str = "pd"):
        self.lock = threading.Lock()
        self.mode = mode
        self.keep_failures = max(1, max_fails)   # the last max_fails times decide
        self.pools = pools
        self.requests: dict[tuple[str, str], int] = {}
        self.modes: dict[str, int] = {}
        self.total = {r: Histogram() for r in ROUTES + ["other"]}
        self.prefill = Histogram()
        self.decode_ttfb = Histogram()
        self.decode = Histogram()
        self.router_ttfb = Histogram()
        self.router = Histogram()
        self.retries = ({"router": 0} if mode == "router" else  # per leg
                        {"prefill": 0, "decode": 0})
        self.fallbacks = 0
        self.skipped = 0
        self.stream_errors = 0    # decode stream ended early (log field stream_error)
        self.rejected = 0         # over max_inflight (log field inflight_limit)
        self.bytes_sent = 0
        self.attempts: dict[tuple[str, str], int] = {}
        self.failures: dict[tuple[str, str], int] = {}
        self.no_live: dict[str, int] = {p: 0 for p in pools}
        self.recent_failures: dict[tuple[str, str], list[float]] = {}
        self.parse_errors = 0
        self.lines = 0
        self.reloads = 0
        self.config_reloads = 0   # SIGHUP: config file read again and applied

    def _attempts(self, pool: str, pairs: list[tuple[str, str]], now: float) -> None:
        members = set(self.pools[pool]["servers"])
        for addr, st in pairs:
            if addr not in members:
                if addr == self.pools[pool]["name"]:
                    self.no_live[pool] += 1
                continue
            k = (pool, addr)
            self.attempts[k] = self.attempts.get(k, 0) + 1
            code = int(st) if st.isdigit() else 0
            if code >= 500 or code == 0:
                self.failures[k] = self.failures.get(k, 0) + 1
                # passive health as nginx sees it: prefill counts 5xx, decode
                # only connect errors / timeouts (reported as 502 / 504)
                if pool == "prefill" or code in (0, 502, 504):
                    ts = self.recent_failures.setdefault(k, [])
                    ts.append(now)
                    del ts[:-self.keep_failures]

    def add(self, rec: dict, now: float) -> None:
        route = rec.get("route") if rec.get("route") in ROUTES else "other"
        status = str(rec.get("status", "-"))
        with self.lock:
            self.lines += 1
            key = (route, status)
            self.requests[key] = self.requests.get(key, 0) + 1
            mode = str(rec.get("mode") or "-")
            if route in PD_ROUTES:
                self.modes[mode] = self.modes.get(mode, 0) + 1
            t = _num(rec.get("total_time"))
            if t is not None:
                self.total[route].observe(t)
            self.bytes_sent += int(_num(rec.get("bytes_sent")) or 0)
            if rec.get("inflight_limit") == "REJECTED":
                self.rejected += 1
            if rec.get("stream_error"):
                self.stream_errors += 1
            if self.mode == "router":
                self._add_router(rec, route, now)
                return
            if route in PD_ROUTES:
                pt = _num(rec.get("prefill_time"))
                if pt is not None and rec.get("prefill_upstream"):
                    self.prefill.observe(pt)
                dt = _num(rec.get("decode_ttfb"))
                if dt is not None:
                    self.decode_ttfb.observe(dt)
                dd = _num(rec.get("decode_time"))
                if dd is not None:
                    self.decode.observe(dd)
                self.retries["prefill"] += int(_num(rec.get("prefill_retries")) or 0)
                self.retries["decode"] += int(_num(rec.get("decode_retries")) or 0)
                if rec.get("fallback") is True:
                    self.fallbacks += 1
                if mode == "decode_only":
                    self.skipped += 1
                self._attempts("prefill", _pairs(rec.get("prefill_upstream", ""),
                                                 rec.get("prefill_status", "")), now)
            if route in PD_ROUTES or route == "/v1/models":
                self._attempts("decode", _pairs(rec.get("decode_upstream", ""),
                                                rec.get("decode_status", "")), now)

    def _add_router(self, rec: dict, route: str, now: float) -> None:
        """Router mode: one leg, to the engine's router (lock held)."""
        if route in PD_ROUTES:
            t = _num(rec.get("upstream_ttfb"))
            if t is not None:
                self.router_ttfb.observe(t)
            t = _num(rec.get("upstream_time"))
            if t is not None:
                self.router.observe(t)
            self.retries["router"] += int(_num(rec.get("retries")) or 0)
        if route in PD_ROUTES or route == "/v1/models":
            self._attempts("router", _pairs(rec.get("upstream", ""),
                                            rec.get("upstream_status", "")), now)

    def passive_failing(self, pool: str, addr: str, now: float, window: float,
                        max_fails: int) -> bool:
        """nginx's passive rule: max_fails failures within fail_timeout take a
        peer out (max_fails 0: never)."""
        if max_fails <= 0:
            return False
        ts = [t for t in self.recent_failures.get((pool, addr), ()) if now - t < window]
        self.recent_failures[(pool, addr)] = ts
        return len(ts) >= max_fails


def _new_peer() -> dict:
    return {"up": True, "fails": 0, "passes": 0, "checked": None, "error": None}


def _clock_ticks() -> int:
    """Now, in the unit of /proc/PID/stat's start time (clock ticks since boot)."""
    with open("/proc/uptime", encoding="ascii") as f:
        up = float(f.read().split()[0])
    return int(up * os.sysconf("SC_CLK_TCK"))


def _children_since(parent: int, ticks: int) -> bool:
    """Some child of `parent` started at or after `ticks` (nginx: a new worker)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                data = f.read()
        except OSError:
            continue
        rest = data[data.rfind(")") + 2:].split()
        try:
            if int(rest[1]) == parent and rest[0] not in "ZX" and int(rest[19]) >= ticks:
                return True
        except (IndexError, ValueError):
            continue
    return False


class Agent:
    def __init__(self, cfg: dict, config_path: str | None = None,
                 reload_event: threading.Event | None = None):
        self.cfg = cfg
        self.config_path = config_path
        self.pools = cfg["pools"]
        self.mode = cfg.get("mode", "pd")
        self.metrics = Metrics(self.pools, cfg.get("max_fails", 1), self.mode)
        self.stop = threading.Event()
        h = cfg["health"]
        self.health = h
        # active state per (pool, addr): up?, consecutive fails / passes, last probe
        self.state = {(p, s): _new_peer() for p, v in self.pools.items() for s in v["servers"]}
        self.down: dict[str, set] = {p: set() for p in self.pools}
        self.server = None
        # one writer of pools / state / down / drains and of pd_upstreams.conf at a time
        # (health checker, control loop); taken before metrics.lock, never after
        self.lock = threading.RLock()
        # SIGHUP (handler installed by main() before the config is read); the control
        # loop does the reload
        self.reload_requested = reload_event or threading.Event()
        # operator drains: the drain file's peers, its id and what was last read
        self.drained: set[str] = set()
        self.drain_id: str | None = None
        self.drain_sig: tuple | None = None
        # a drain written into pd_upstreams.conf whose nginx reload is not confirmed
        # yet: {"id", "peers", "since": clock ticks before the SIGHUP}
        self.drain_pending: dict | None = None
        self.drain_applied: dict | None = None
        self.last_hup_ticks: int | None = None

    # -------------------------------------------------------------- log tail
    def tail(self) -> None:
        path = self.cfg["access_log"]
        f, ino, buf = None, None, b""
        while not self.stop.is_set():
            if f is None:
                try:
                    f = open(path, "rb")
                    ino = os.fstat(f.fileno()).st_ino
                    buf = b""
                except OSError:
                    self.stop.wait(0.5)
                    continue
            chunk = f.read(1 << 20)
            if chunk:
                buf += chunk
                *lines, buf = buf.split(b"\n")
                now = time.time()
                for line in lines:
                    if not line.strip():
                        continue
                    try:
                        self.metrics.add(json.loads(line), now)
                    except (ValueError, TypeError):
                        with self.metrics.lock:
                            self.metrics.parse_errors += 1
                continue
            # rotated or truncated?
            try:
                st = os.stat(path)
                if st.st_ino != ino or st.st_size < f.tell():
                    f.close()
                    f = None
                    continue
            except OSError:
                pass
            self.stop.wait(0.1)

    # -------------------------------------------------------------- active health
    def probe(self, addr: str) -> str | None:
        """None when the peer is up, else why not. health.path null: a TCP connect
        (routers without a health endpoint; xllm-service opens its HTTP port only
        once it has instances to route to), else GET path, 2xx = up. Direct
        connections only (pd_launcher.nodeutil): never through an HTTP proxy."""
        host, _, port = addr.rpartition(":")
        timeout = self.health["timeout_s"]
        if self.health.get("path") is None:
            try:
                socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
                return None
            except OSError as e:
                return type(e).__name__ + (f": {e}" if str(e) else "")
        try:
            st = http_status(f"http://{host}:{port}{self.health['path']}", timeout=timeout)
            return None if 200 <= st < 300 else f"status {st}"
        except OSError as e:
            return type(e).__name__ + (f": {e}" if str(e) else "")
        except Exception as e:  # http.client.HTTPException, bad URL
            return type(e).__name__

    def check_once(self) -> bool:
        """Probe every upstream; returns True when the set of down peers changed."""
        from concurrent.futures import ThreadPoolExecutor

        with self.lock:
            keys = list(self.state)
        if not keys:
            return False
        with ThreadPoolExecutor(max_workers=min(16, len(keys))) as ex:
            results = list(ex.map(lambda k: self.probe(k[1]), keys))
        now = time.time()
        with self.lock:
            for k, err in zip(keys, results):
                s = self.state.get(k)
                if s is None:  # gone with a config reload while it was probed
                    continue
                s["checked"], s["error"] = now, err
                if err is None:
                    s["passes"], s["fails"] = s["passes"] + 1, 0
                    if not s["up"] and s["passes"] >= self.health["passes"]:
                        s["up"] = True
                else:
                    s["fails"], s["passes"] = s["fails"] + 1, 0
                    if s["up"] and s["fails"] >= self.health["fails"]:
                        s["up"] = False
            new = self.desired_down()
            changed = new != self.down
            self.down = new
            return changed

    def desired_down(self) -> dict[str, set]:
        """Per pool, the peers to write `down`: drained peers (operator drains, always,
        even the last of a pool) and peers the active checks took out, except that the
        checks never take out every peer left (not drained) of a LAST_RESORT pool."""
        out = {}
        for pool, p in self.pools.items():
            drained = {a for a in p["servers"] if a in self.drained}
            live = [a for a in p["servers"] if a not in drained]
            bad = {a for a in live if not self.state[(pool, a)]["up"]}
            # never take out the whole decode (or router) pool: with nowhere to
            # send, passive health and retries do better than an instant 502
            if pool in LAST_RESORT_POOLS and live and len(bad) == len(live):
                bad = set()
            out[pool] = bad | drained
        return out

    def apply(self, why: str = "pools changed") -> bool:
        """Write pd_upstreams.conf with the current down-marks and SIGHUP nginx; True
        when nginx was signalled."""
        with self.lock:
            text = render_upstreams(self.pools, self.down)
            path = self.cfg["upstreams_path"]
            tmp = f"{path}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
            try:
                with open(self.cfg["pid_path"], encoding="ascii") as f:
                    pid = int(f.read().strip())
                try:
                    since = _clock_ticks() - 1
                except (OSError, ValueError):
                    since = None
                os.kill(pid, signal.SIGHUP)
            except (OSError, ValueError) as e:
                sys.stderr.write(f"proxy-agent: cannot reload nginx: {e}\n")
                return False
            self.last_hup_ticks = since
            if self.drain_pending is not None:
                self.drain_pending["since"] = since  # this reload carries the drain too
            with self.metrics.lock:
                self.metrics.reloads += 1
            sys.stderr.write(f"proxy-agent: {why}, down={self._down_list()}; "
                             f"reloaded nginx (pid {pid})\n")
            return True

    def _down_list(self) -> dict[str, list[str]]:
        return {p: sorted(v) for p, v in self.down.items()}

    def checker(self) -> None:
        while not self.stop.is_set():
            try:
                # enabled may change with a config reload
                if self.health["enabled"] and self.check_once():
                    self.apply()
            except Exception as e:  # keep probing whatever happens
                sys.stderr.write(f"proxy-agent: health check error: {e!r}\n")
            self.stop.wait(self.health["interval_s"] if self.health["enabled"] else 1.0)

    # -------------------------------------------------------------- config reload
    def reload_config(self) -> bool:
        """SIGHUP: read the config file again; new pools and probe targets (peers still
        present keep their state, so their down-marks), pd_upstreams.conf re-rendered,
        nginx reloaded (its nginx.conf may have changed too). A file that cannot be
        read or lacks pools/health is logged and changes nothing."""
        if not self.config_path:
            return False
        try:
            with open(self.config_path, encoding="utf-8") as f:
                cfg = json.load(f)
            pools, health = cfg["pools"], cfg["health"]
            if not isinstance(pools, dict) or not all(
                    isinstance(p.get("servers"), list) for p in pools.values()):
                raise ValueError("pools: expected {pool: {servers: [...], ...}}")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            sys.stderr.write(f"proxy-agent: config reload: cannot use {self.config_path}: "
                             f"{e!r}; keeping the running config\n")
            return False
        for key in ("listen", "access_log"):
            if cfg.get(key) != self.cfg.get(key):
                sys.stderr.write(f"proxy-agent: config reload: {key} changed; it takes "
                                 "effect at the next restart\n")
                cfg[key] = self.cfg.get(key)
        with self.lock:
            old_state = self.state
            self.state = {(p, a): old_state.get((p, a)) or _new_peer()
                          for p, v in pools.items() for a in v["servers"]}
            self.cfg, self.pools, self.health = cfg, pools, health
            with self.metrics.lock:
                m = self.metrics
                m.pools = pools
                m.keep_failures = max(1, cfg.get("max_fails", 1))
                for p in pools:
                    m.no_live.setdefault(p, 0)
                m.config_reloads += 1
            self.down = self.desired_down()
            sys.stderr.write("proxy-agent: config reloaded from {}: {}\n".format(
                self.config_path, ", ".join(f"{p} {len(v['servers'])}"
                                            for p, v in pools.items())))
            self.apply("config reloaded")
        return True  # a moved drain_file is read at the control loop's next turn

    # -------------------------------------------------------------- drains
    def _drain_applied_path(self) -> str | None:
        path = self.cfg.get("drain_file")
        if not path:
            return None
        return (path[:-5] if path.endswith(".json") else path) + ".applied.json"

    def poll_drain(self) -> None:
        """Read the drain file if it changed (stat); apply a new set of drains."""
        path = self.cfg.get("drain_file")
        if not path:
            return
        try:
            st = os.stat(path)
            sig: tuple | None = (path, st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            sig = (path, None)
        except OSError as e:
            sig = (path, "error", str(e))
        if sig == self.drain_sig:
            return
        self.drain_sig = sig
        if sig[1] is None:
            drain_id, peers = None, set()
        else:
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
                if not text.strip():
                    drain_id, peers = None, set()
                else:
                    doc = json.loads(text)
                    raw = doc.get("peers") if isinstance(doc, dict) else None
                    if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
                        raise ValueError('expected {"id": "...", "peers": ["ip:port", ...]}')
                    drain_id = None if doc.get("id") is None else str(doc.get("id"))
                    peers = set(raw)
            except (OSError, ValueError) as e:
                sys.stderr.write(f"proxy-agent: drain file {path}: {e}; keeping the "
                                 f"drains in effect ({sorted(self.drained)})\n")
                return
        with self.lock:
            if peers == self.drained and drain_id == self.drain_id:
                return
            known = {a for v in self.pools.values() for a in v["servers"]}
            unknown = sorted(peers - known)
            if unknown:
                sys.stderr.write(f"proxy-agent: drain {drain_id}: not upstreams of any "
                                 f"pool: {', '.join(unknown)}\n")
            self.drained, self.drain_id = peers, drain_id
            self.drain_pending = {"id": drain_id, "peers": sorted(peers), "since": None}
            self.down = self.desired_down()
            sys.stderr.write(f"proxy-agent: drain {drain_id}: {sorted(peers) or 'none'}\n")
            self.apply(f"drain {drain_id}")

    def confirm_drain(self) -> None:
        """Once nginx runs workers started after the reload that carried the drain,
        write the applied file (atomically)."""
        pending = self.drain_pending
        if pending is None:
            return
        try:
            with open(self.cfg["pid_path"], encoding="ascii") as f:
                master = int(f.read().strip())
            os.kill(master, 0)
        except (OSError, ValueError):
            return  # nginx not (yet) running: it reads the drain marks when it starts
        if pending.get("since") is None:
            # nginx was not running when the drain was written (the agent's startup):
            # it is now, so signal it; confirmed at a later turn
            self.apply(f"drain {pending['id']}")
            return
        if not _children_since(master, pending["since"]):
            return
        applied = {"id": pending["id"], "peers": pending["peers"], "applied_at": time.time()}
        out = self._drain_applied_path()
        try:
            if out:
                atomic_write(out, (json.dumps(applied) + "\n").encode(), 0o644)
        except OSError as e:
            sys.stderr.write(f"proxy-agent: cannot write {out}: {e}\n")
            return
        with self.lock:
            if self.drain_pending is pending:
                self.drain_pending = None
            self.drain_applied = applied
        sys.stderr.write(f"proxy-agent: drain {pending['id']} applied: "
                         f"{pending['peers'] or 'none'}\n")

    def control(self) -> None:
        """Pending SIGHUP, the drain file, the drain's confirmation: every
        CONTROL_INTERVAL seconds."""
        while not self.stop.is_set():
            try:
                if self.reload_requested.is_set():
                    self.reload_requested.clear()
                    self.reload_config()
                self.poll_drain()
                self.confirm_drain()
            except Exception as e:  # keep going whatever happens
                sys.stderr.write(f"proxy-agent: control loop error: {e!r}\n")
            self.stop.wait(CONTROL_INTERVAL)

    # -------------------------------------------------------------- views
    def health_view(self) -> dict:
        now = time.time()
        pools = {}
        m = self.metrics
        with self.lock, m.lock:
            window = self.cfg["fail_timeout_s"]
            for pool, p in self.pools.items():
                ups = []
                for a in p["servers"]:
                    s = self.state[(pool, a)]
                    active_ok = s["up"] if self.health["enabled"] else True
                    passive_bad = m.passive_failing(pool, a, now, window,
                                                    self.cfg["max_fails"])
                    ups.append({"upstream": a, "healthy": active_ok and not passive_bad,
                                "active": ("off" if not self.health["enabled"] else
                                           "unknown" if s["checked"] is None else
                                           "up" if s["up"] else "down"),
                                "recent_failure": passive_bad, "error": s["error"],
                                "drained": a in self.drained})
                pools[pool] = {"total": len(ups),
                               "healthy": sum(1 for u in ups if u["healthy"]),
                               "drained": sum(1 for u in ups if u["drained"]),
                               "upstreams": ups}
            drain = {"id": self.drain_id, "peers": sorted(self.drained),
                     "applied": self.drain_pending is None,
                     "applied_at": (self.drain_applied or {}).get("applied_at")
                     if self.drain_pending is None else None}
        degraded = any(v["healthy"] == 0 for v in pools.values())
        return {"status": "degraded" if degraded else "ok", "proxy": "up", "agent": "up",
                "pools": pools, "drain": drain}

    def metrics_text(self) -> str:
        m = self.metrics
        view = self.health_view()
        out: list[str] = []

        def head(name: str, typ: str, help_: str) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {typ}")

        with m.lock:
            head("pd_proxy_requests_total", "counter", "Requests by route and status.")
            for (route, status), n in sorted(m.requests.items()):
                out.append(f"pd_proxy_requests_total{_labels({'route': route, 'status': status})}"
                           f" {n}")
            head("pd_proxy_pd_requests_total", "counter",
                 "Completion requests by path taken: router (the engine's router did "
                 "prefill and decode)." if m.mode == "router" else
                 "Completion requests by path taken: pd, decode_only (short prompt), "
                 "fallback, prefill_error, error.")
            for mode, n in sorted(m.modes.items()):
                out.append(f"pd_proxy_pd_requests_total{_labels({'mode': mode})} {n}")
            head("pd_proxy_request_duration_seconds", "histogram",
                 "Total time per request, by route.")
            for route, h in m.total.items():
                out += h.lines("pd_proxy_request_duration_seconds", {"route": route})
            if m.mode == "router":
                head("pd_proxy_router_first_byte_seconds", "histogram",
                     "Router leg: time to the router's response header (first byte).")
                out += m.router_ttfb.lines("pd_proxy_router_first_byte_seconds", {})
                head("pd_proxy_router_duration_seconds", "histogram",
                     "Router leg: time to the end of the router's response.")
                out += m.router.lines("pd_proxy_router_duration_seconds", {})
            else:
                head("pd_proxy_prefill_duration_seconds", "histogram",
                     "Prefill leg, all attempts.")
                out += m.prefill.lines("pd_proxy_prefill_duration_seconds", {})
                head("pd_proxy_decode_first_byte_seconds", "histogram",
                     "Decode leg: time to the decode engine's response header (first byte).")
                out += m.decode_ttfb.lines("pd_proxy_decode_first_byte_seconds", {})
                head("pd_proxy_decode_duration_seconds", "histogram",
                     "Decode leg: time to the end of the decode response.")
                out += m.decode.lines("pd_proxy_decode_duration_seconds", {})
            head("pd_proxy_retries_total", "counter", "Upstream attempts beyond the first.")
            for leg, n in m.retries.items():
                out.append(f"pd_proxy_retries_total{_labels({'leg': leg})} {n}")
            if m.mode != "router":
                head("pd_proxy_fallbacks_total", "counter",
                     "Requests served decode-only because every prefill attempt failed.")
                out.append(f"pd_proxy_fallbacks_total {m.fallbacks}")
                head("pd_proxy_prefill_skipped_total", "counter",
                     "Requests sent straight to decode (prompt below min_prefill_chars).")
                out.append(f"pd_proxy_prefill_skipped_total {m.skipped}")
            head("pd_proxy_rejected_total", "counter",
                 "Completion requests answered 429 at once (reason max_inflight: that many "
                 "were in flight).")
            out.append(f"pd_proxy_rejected_total{_labels({'reason': 'max_inflight'})} "
                       f"{m.rejected}")
            if m.mode != "router":
                head("pd_proxy_stream_errors_total", "counter",
                     "Decode responses that ended early (engine lost or timed out after the "
                     "response header); SSE clients got an error event.")
                out.append(f"pd_proxy_stream_errors_total {m.stream_errors}")
            head("pd_proxy_upstream_attempts_total", "counter", "Attempts per upstream.")
            for (pool, a), n in sorted(m.attempts.items()):
                out.append(f"pd_proxy_upstream_attempts_total"
                           f"{_labels({'pool': pool, 'upstream': a})} {n}")
            head("pd_proxy_upstream_failures_total", "counter",
                 "Failed attempts per upstream (connect error, timeout or 5xx).")
            for (pool, a), n in sorted(m.failures.items()):
                out.append(f"pd_proxy_upstream_failures_total"
                           f"{_labels({'pool': pool, 'upstream': a})} {n}")
            head("pd_proxy_no_live_upstreams_total", "counter",
                 "Requests that found no live upstream in a pool.")
            for pool, n in m.no_live.items():
                out.append(f"pd_proxy_no_live_upstreams_total{_labels({'pool': pool})} {n}")
            head("pd_proxy_bytes_sent_total", "counter", "Bytes sent to clients.")
            out.append(f"pd_proxy_bytes_sent_total {m.bytes_sent}")
            head("pd_proxy_log_parse_errors_total", "counter",
                 "Access log lines the agent could not parse.")
            out.append(f"pd_proxy_log_parse_errors_total {m.parse_errors}")
            head("pd_proxy_reloads_total", "counter",
                 "nginx reloads made by the agent (active health checks, config reloads, "
                 "drains).")
            out.append(f"pd_proxy_reloads_total {m.reloads}")
            head("pd_proxy_config_reloads_total", "counter",
                 "Config reloads of the agent (SIGHUP: config file read again).")
            out.append(f"pd_proxy_config_reloads_total {m.config_reloads}")
        head("pd_proxy_upstreams", "gauge", "Upstreams per pool.")
        for pool, v in view["pools"].items():
            out.append(f"pd_proxy_upstreams{_labels({'pool': pool})} {v['total']}")
        head("pd_proxy_upstreams_healthy", "gauge",
             "Upstreams per pool considered healthy (active probe and passive failures).")
        for pool, v in view["pools"].items():
            out.append(f"pd_proxy_upstreams_healthy{_labels({'pool': pool})} {v['healthy']}")
        head("pd_proxy_upstream_healthy", "gauge", "1 if the upstream is considered healthy.")
        for pool, v in view["pools"].items():
            for u in v["upstreams"]:
                out.append(f"pd_proxy_upstream_healthy"
                           f"{_labels({'pool': pool, 'upstream': u['upstream']})} "
                           f"{1 if u['healthy'] else 0}")
        return "\n".join(out) + "\n"

    # -------------------------------------------------------------- http
    def serve(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        agent = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _send(self, code: int, ctype: str, body: str) -> None:
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, "text/plain; version=0.0.4; charset=utf-8",
                               agent.metrics_text())
                elif path == "/health":
                    self._send(200, "application/json", json.dumps(agent.health_view()))
                else:
                    self._send(404, "application/json",
                               error_json(404, "NotFoundError", "no such endpoint"))

            def log_message(self, *args: Any) -> None:
                pass

        host, _, port = self.cfg["listen"].rpartition(":")

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True
            address_family = (__import__("socket").AF_INET6 if ":" in host
                              else __import__("socket").AF_INET)

        srv = Server((host.strip("[]"), int(port)), Handler)
        self.server = srv
        srv.serve_forever(poll_interval=0.5)

    def run(self) -> int:
        # a drain must survive an agent restart: applied before anything else runs
        try:
            self.poll_drain()
        except Exception as e:
            sys.stderr.write(f"proxy-agent: drain file at startup: {e!r}\n")
        threads = [threading.Thread(target=self.tail, daemon=True, name="tail"),
                   threading.Thread(target=self.checker, daemon=True, name="health"),
                   threading.Thread(target=self.control, daemon=True, name="control")]
        for t in threads:
            t.start()

        if signal.getsignal(signal.SIGHUP) is signal.SIG_DFL:  # not started by main()
            signal.signal(signal.SIGHUP, lambda s, f: self.reload_requested.set())

        def on_term(signum: int, frame: Any) -> None:
            self.stop.set()
            if self.server is not None:
                threading.Thread(target=self.server.shutdown, daemon=True).start()
            else:
                raise SystemExit(0)

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        sys.stderr.write(f"proxy-agent: serving {self.cfg['listen']}, tailing "
                         f"{self.cfg['access_log']}\n")
        self.serve()
        return 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["agent"]:  # the form older specs used
        args = args[1:]
    if len(args) != 1:
        sys.stderr.write("usage: python -m pd_launcher.proxy_agent CONFIG.json\n")
        return 2
    # SIGHUP = reload; counted from the start (its default action would end the
    # agent), the control loop re-reads the config file then
    hup = threading.Event()
    signal.signal(signal.SIGHUP, lambda s, f: hup.set())
    with open(args[0], encoding="utf-8") as f:
        cfg = json.load(f)
    return Agent(cfg, os.path.abspath(args[0]), hup).run()


if __name__ == "__main__":
    sys.exit(main())
