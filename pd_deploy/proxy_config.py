"""The front door's configuration (C node): nginx + njs, rendered from the plan's proxy block.

`proxy_unit(proxy, dirs)` renders templates/nginx.conf.j2 (package data of
pd_deploy) and ships templates/pd_router.js; it returns the files, the `nginx -t`
pre-start check and the processes of the C node spec: nginx and the proxy agent
(`python -m pd_launcher.proxy_agent`, node side, see that module). All arithmetic
(upstream lists, balancing policy -> directives, limits, retry maps) is done here;
the template only places values. Jinja2 is imported lazily.

Two modes, one front door (same API key, request id, access log, metrics, health):
  - "pd" (the block has no `mode`; `prefill` and `decode` lists): nginx + njs is the
    PD router (the vLLM family);
  - "router" (`mode: router`, a `router` list): the engine brings its own PD router
    (xllm-service, FastDeploy's router, KsanaLLM's simple_router) and nginx proxies
    to it as one pool, `pd_router`; no njs.

See docs/proxy.md.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any

from pd_launcher.proxy_agent import PD_ROUTES, ROUTES, error_json, render_upstreams

TEMPLATES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")
DEFAULT_NJS_MODULE = "/usr/lib/nginx/modules/ngx_http_js_module.so"
NJS_MODULE_FILE = "ngx_http_js_module.so"

BALANCE = {
    "least_conn": "least_conn;",
    "random_two_least_conn": "random two least_conn;",
    "round_robin": "",
}

# Options of the proxy block (docs/node-spec.md) and their defaults; None in the
# block means "default". Keys after the first group are optional extensions.
DEFAULTS: dict[str, Any] = {
    "prefill_balance": "least_conn",
    "decode_balance": "least_conn",
    "keepalive": 64,
    "max_fails": 1,
    "fail_timeout_s": 10,
    "prefill_attempts": 3,
    "decode_attempts": 2,
    "fallback": True,
    "max_body_size": "8m",
    "api_key": None,
    "engine_api_key": None,
    "min_prefill_chars": 0,
    "connect_timeout_s": 3,
    "prefill_timeout_s": 600,
    "decode_timeout_s": 3600,
    "worker_processes": 1,
    # completion requests in flight at once (all workers); beyond: 429 + Retry-After.
    # 0 = no limit (see docs/proxy.md, Overload)
    "max_inflight": 0,
    # extensions
    "retry_after_s": 1,                  # Retry-After of those 429 answers
    "upstream_keepalive_timeout_s": 4,   # below uvicorn's 5 s idle close (vLLM default)
    "prefill_response_buffer": None,     # largest prefill response held in memory;
                                         # default max(16m, 2 x max_body_size)
    "worker_connections": 8192,
    "user": None,                        # nginx `user` (only meaningful when run as root)
    "njs_module": None,                  # path of ngx_http_js_module.so; "" = built in
    "admin_port": None,                  # agent port; default listen port + 1
    "active_health": True,
    "health_interval_s": 5,
    "health_timeout_s": 2,
    "health_fails": 2,
    "health_passes": 1,
    "error_log_level": "warn",
    # router mode (null: the decode leg's value; the router's answer is the decode stream)
    "router_balance": None,
    "router_attempts": None,
    "router_timeout_s": None,
    # router mode: active probe of the router. null: TCP connect (xllm-service and
    # KsanaLLM's simple_router have no /health); "/path": HTTP GET, 2xx = up
    "router_health_path": None,
    # router mode: repair the router's stream with njs (pd_stream_fix.js): SSE content
    # type, no bytes after "data: [DONE]" (KsanaLLM's "[DONE]\\0" trailer), 5xx bodies
    # as OpenAI errors
    "router_stream_fix": False,
}

MODES = ("pd", "router")
POOLS = {"pd": ("prefill", "decode"), "router": ("router",)}

_SIZE_RE = re.compile(r"^[0-9]+[kKmMgG]?$")
_HOSTPORT_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):([0-9]{1,5})$")
_KEY_RE = re.compile(r"^[A-Za-z0-9._~+/=:-]{1,512}$")
_PATH_RE = re.compile(r"^/[A-Za-z0-9._~/%=&?+:@-]{0,255}$")
_WILDCARD = {"0.0.0.0", "[::]", "*"}


class ProxyConfigError(ValueError):
    """A field of the proxy block is invalid; the message names the field."""


# ----------------------------------------------------------------- validation


def _hostport(value: Any, field: str) -> tuple[str, int]:
    m = _HOSTPORT_RE.match(str(value)) if isinstance(value, str) else None
    if not m or not (1 <= int(m.group(2)) <= 65535):
        raise ProxyConfigError(f"proxy.{field}: expected host:port, got {value!r}")
    return m.group(1), int(m.group(2))


def _int(opts: dict, key: str, lo: int, hi: int) -> int:
    v = opts[key]
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ProxyConfigError(f"proxy.options.{key}: expected an integer in {lo}..{hi}, "
                               f"got {v!r}")
    return v


def _size(opts: dict, key: str) -> str:
    v = opts[key]
    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
        return str(v)
    if not isinstance(v, str) or not _SIZE_RE.match(v):
        raise ProxyConfigError(f"proxy.options.{key}: expected an nginx size like 8m, "
                               f"got {v!r}")
    return v


def _size_bytes(s: str) -> int:
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(s[-1].lower(), 1)
    return int(s.rstrip("kKmMgG")) * mult


def _key(opts: dict, key: str) -> str | None:
    v = opts[key]
    if v is None or v == "":
        return None
    if not isinstance(v, str) or not _KEY_RE.match(v):
        # never echo the value: it is a secret
        raise ProxyConfigError(f"proxy.options.{key}: must be 1-512 characters of "
                               "A-Z a-z 0-9 . _ ~ + / = : -")
    return v


def options_of(proxy: dict) -> dict[str, Any]:
    """The proxy block's options with defaults filled in, validated."""
    raw = proxy.get("options") or {}
    if not isinstance(raw, dict):
        raise ProxyConfigError("proxy.options: expected a mapping")
    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        raise ProxyConfigError(f"proxy.options: unknown option(s) {', '.join(unknown)}")
    o = {k: (raw[k] if raw.get(k) is not None else v) for k, v in DEFAULTS.items()}
    for k in ("balance", "attempts", "timeout_s"):
        if o[f"router_{k}"] is None:
            o[f"router_{k}"] = o[f"decode_{k}"]
    for k in ("prefill_balance", "decode_balance", "router_balance"):
        if o[k] not in BALANCE:
            raise ProxyConfigError(f"proxy.options.{k}: expected one of "
                                   f"{', '.join(BALANCE)}, got {o[k]!r}")
    _int(o, "keepalive", 0, 100000)
    _int(o, "max_fails", 0, 1000)
    _int(o, "fail_timeout_s", 1, 86400)
    _int(o, "prefill_attempts", 1, 100)
    _int(o, "decode_attempts", 1, 100)
    _int(o, "min_prefill_chars", 0, 10**9)
    _int(o, "connect_timeout_s", 1, 3600)
    _int(o, "prefill_timeout_s", 1, 86400)
    _int(o, "decode_timeout_s", 1, 86400)
    _int(o, "router_attempts", 1, 100)
    _int(o, "router_timeout_s", 1, 86400)
    _int(o, "upstream_keepalive_timeout_s", 1, 3600)
    _int(o, "worker_connections", 64, 1 << 20)
    _int(o, "max_inflight", 0, 10**6)
    _int(o, "retry_after_s", 1, 3600)
    _int(o, "health_interval_s", 1, 3600)
    _int(o, "health_timeout_s", 1, 600)
    _int(o, "health_fails", 1, 100)
    _int(o, "health_passes", 1, 100)
    if o["worker_processes"] != "auto":
        _int(o, "worker_processes", 1, 256)
    if not isinstance(o["fallback"], bool):
        raise ProxyConfigError(f"proxy.options.fallback: expected true/false, "
                               f"got {o['fallback']!r}")
    if not isinstance(o["active_health"], bool):
        raise ProxyConfigError("proxy.options.active_health: expected true/false")
    if not isinstance(o["router_stream_fix"], bool):
        raise ProxyConfigError("proxy.options.router_stream_fix: expected true/false")
    o["max_body_size"] = _size(o, "max_body_size")
    if o["prefill_response_buffer"] is None:
        # nginx allocates it when a prefill response arrives and only touches what
        # the response fills; a response that does not fit ends the client's
        # connection (see docs/proxy.md), so the default is generous
        kib = max(16 << 10, (2 * _size_bytes(o["max_body_size"])) >> 10)
        o["prefill_response_buffer"] = f"{kib}k"
    o["prefill_response_buffer"] = _size(o, "prefill_response_buffer")
    o["api_key"] = _key(o, "api_key")
    o["engine_api_key"] = _key(o, "engine_api_key")
    if o["user"] is not None and not re.match(r"^[a-z_][a-z0-9_-]*( [a-z_][a-z0-9_-]*)?$",
                                              str(o["user"])):
        raise ProxyConfigError(f"proxy.options.user: expected 'user' or 'user group', "
                               f"got {o['user']!r}")
    if o["error_log_level"] not in ("debug", "info", "notice", "warn", "error", "crit"):
        raise ProxyConfigError("proxy.options.error_log_level: expected an nginx level")
    if o["admin_port"] is not None:
        _int(o, "admin_port", 1, 65535)
    if o["router_health_path"] == "":
        o["router_health_path"] = None
    if o["router_health_path"] is not None and not (
            isinstance(o["router_health_path"], str)
            and _PATH_RE.match(o["router_health_path"])):
        raise ProxyConfigError("proxy.options.router_health_path: expected null (TCP "
                               "connect) or an HTTP path like /health, got "
                               f"{o['router_health_path']!r}")
    return o


def mode_of(proxy: dict) -> str:
    """"pd" (no `mode` key: nginx is the PD router) or "router" (the engine's own
    router behind nginx); the block's upstream keys must match the mode."""
    mode = proxy.get("mode", "pd")
    if mode not in MODES:
        raise ProxyConfigError(f"proxy.mode: expected 'router' (or no mode: nginx is the "
                               f"PD router), got {mode!r}")
    other = ("router",) if mode == "pd" else ("prefill", "decode")
    for k in other:
        if k in proxy:
            raise ProxyConfigError(
                f"proxy.{k}: not used in {mode} mode ("
                + ("the engine's router chooses prefill and decode; list its address "
                   "in proxy.router)" if mode == "router" else "set proxy.mode: router")
                + ")")
    return mode


# ----------------------------------------------------------------- upstreams


def upstream_pools(proxy: dict, opts: dict) -> dict[str, dict[str, Any]]:
    """Per pool: nginx upstream name, policy directive, servers and parameters."""
    pools = {}
    for pool in POOLS[mode_of(proxy)]:
        servers = proxy.get(pool)
        if not isinstance(servers, list) or not servers:
            raise ProxyConfigError(f"proxy.{pool}: expected a non-empty list of host:port")
        seen = set()
        for i, s in enumerate(servers):
            _hostport(s, f"{pool}[{i}]")
            if s in seen:
                raise ProxyConfigError(f"proxy.{pool}[{i}]: {s} is listed twice")
            seen.add(s)
        pools[pool] = {
            "name": f"pd_{pool}",
            "balance": BALANCE[opts[f"{pool}_balance"]],
            "servers": list(servers),
            "params": f"max_fails={opts['max_fails']} fail_timeout={opts['fail_timeout_s']}s",
            "keepalive": opts["keepalive"],
            "keepalive_timeout_s": opts["upstream_keepalive_timeout_s"],
            "zone_kb": 64 + 2 * len(servers),
        }
    return pools


def _retry_maps(prefill_attempts: int, decode_attempts: int
                ) -> tuple[list[tuple[str, int]], int, list[tuple[str, int]]]:
    # decode retries = commas in $upstream_addr; nginx can try a cached
    # (keepalive) peer once more than the configured tries, hence the +1.
    d_max = min(decode_attempts, 63) + 1
    p_max = min(prefill_attempts, 63) + 1
    decode = [("~^[^,]*" + ",[^,]*" * n + "$", n) for n in range(d_max)]
    total = [(f"{p}:{d}", p + d) for p in range(p_max) for d in range(d_max)]
    return decode, d_max, total


ERRORS = [
    ("pd_e400", 400, "BadRequestError", "bad request"),
    ("pd_e413", 413, "RequestTooLargeError", "request body too large"),
    ("pd_e429", 429, "RateLimitError", "too many requests in flight at the proxy; retry later"),
    ("pd_e500", 500, "InternalServerError", "internal proxy error"),
    ("pd_e502", 502, "BadGatewayError", "upstream engine unavailable or failed"),
    ("pd_e503", 503, "ServiceUnavailableError", "service unavailable"),
    ("pd_e504", 504, "GatewayTimeoutError", "upstream engine timed out"),
]


def _agent_addr(host: str, port: int, opts: dict) -> tuple[str, int]:
    ahost = "127.0.0.1" if host in _WILDCARD else host
    if host == "[::]":
        ahost = "[::1]"
    aport = opts["admin_port"] or port + 1
    if aport > 65535:
        raise ProxyConfigError("proxy.listen: port + 1 (the agent's port) exceeds 65535; "
                               "set proxy.options.admin_port")
    return ahost, aport


def _url_host(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "*": "127.0.0.1", "[::]": "[::1]"}.get(host, host)


# ----------------------------------------------------------------- the unit


def proxy_unit(proxy: dict, dirs: dict, *, nginx_bin: str = "nginx",
               modules_dir: str | None = None, python: str = "python3") -> dict:
    """Files, pre-start check and processes of the C node (see docs/proxy.md).

    proxy: the proxy block of docs/node-spec.md; dirs: {"state","log","run"},
    absolute paths on the node. Raises ProxyConfigError naming the bad field.
    """
    import jinja2  # controller side only

    for k in ("run", "log"):
        if not isinstance(dirs.get(k), str) or not os.path.isabs(dirs[k]):
            raise ProxyConfigError(f"dirs.{k}: expected an absolute path")
    if not isinstance(proxy, dict):
        raise ProxyConfigError("proxy: expected the proxy block (a mapping)")
    host, port = _hostport(proxy.get("listen"), "listen")
    mode = mode_of(proxy)
    router = mode == "router"
    opts = options_of(proxy)
    pools = upstream_pools(proxy, opts)
    ahost, aport = _agent_addr(host, port, opts)

    run = dirs["run"].rstrip("/") or "/"
    logd = dirs["log"].rstrip("/") or "/"
    conf_path = f"{run}/nginx.conf"
    js_path = f"{run}/pd_router.js"
    fix_path = f"{run}/pd_stream_fix.js"
    stream_fix = router and opts["router_stream_fix"]
    upstreams_path = f"{run}/pd_upstreams.conf"
    agent_cfg_path = f"{run}/proxy_agent.json"
    drain_path = f"{run}/drain.json"
    pid_path = f"{run}/nginx.pid"
    access_log = f"{logd}/proxy_access.log"

    if router and not stream_fix:
        njs_module = ""        # plain proxying: no njs, nothing to load
    elif opts["njs_module"] is not None:
        njs_module = opts["njs_module"]
    elif modules_dir:
        njs_module = f"{modules_dir.rstrip('/')}/{NJS_MODULE_FILE}"
    else:
        njs_module = DEFAULT_NJS_MODULE

    # router mode: the router leg's retries are counted like the decode leg's
    decode_map, d_max, total_map = _retry_maps(
        opts["prefill_attempts"], opts["router_attempts" if router else "decode_attempts"])
    max_body = _size_bytes(opts["max_body_size"])
    workers = opts["worker_processes"]
    conns = opts["worker_connections"]
    ctx = {
        "listen": f"{host}:{port}",
        "prefix": run + "/",
        "conf_path": conf_path,
        "njs_module": njs_module,
        "worker_processes": workers,
        "user": opts["user"],
        "pid_path": pid_path,
        "error_log_level": opts["error_log_level"],
        "worker_connections": conns,
        "worker_rlimit_nofile": 2 * conns + 64,
        "temp_dir": run,
        "client_keepalive_timeout_s": 75,
        "keepalive_requests": 100000,
        "map_hash_max_size": max(2048, 4 * len(decode_map if router else total_map)),
        "routes": ROUTES,
        "decode_retry_map": decode_map,
        "decode_retry_default": d_max - 1,
        "total_retry_map": total_map,
        # nginx map strings match ignoring case: a case-sensitive regex instead
        # (the key's characters are limited, only . and + need escaping)
        "api_key_regex": ("~^Bearer " + re.sub(r"([.+])", r"\\\1", opts["api_key"]) + "$"
                          if opts["api_key"] else None),
        "engine_auth_header": (f"Bearer {opts['engine_api_key']}"
                               if opts["engine_api_key"] else None),
        "access_log": access_log,
        "js_path": js_path,
        "min_prefill_chars": opts["min_prefill_chars"],
        "fallback_enabled": 1 if opts["fallback"] else 0,
        "upstreams_path": upstreams_path,
        "agent_addr": f"{ahost}:{aport}",
        "connect_timeout_s": opts["connect_timeout_s"],
        "prefill_timeout_s": opts["prefill_timeout_s"],
        "decode_timeout_s": opts["decode_timeout_s"],
        "prefill_attempts": opts["prefill_attempts"],
        "decode_attempts": opts["decode_attempts"],
        "prefill_response_buffer": opts["prefill_response_buffer"],
        "listen_backlog": 4096,
        # the whole body in one memory buffer, so njs can read it
        "max_body_size": opts["max_body_size"],
        "client_body_timeout_s": 60,
        "max_inflight": opts["max_inflight"],
        "retry_after_s": opts["retry_after_s"],
        "err401": error_json(401, "AuthenticationError", "missing or invalid API key"),
        "err404": error_json(404, "NotFoundError", "no such endpoint"),
        "health_local": json.dumps({"status": "ok", "proxy": "up", "agent": "down",
                                    "pools": None}, separators=(",", ":")),
        "error_bodies": [(n, c, error_json(c, t, m)) for n, c, t, m in ERRORS],
        "router": router,
        "stream_fix": stream_fix,
        "fix_path": fix_path,
    }
    if router:
        ctx.update({
            "router_attempts": opts["router_attempts"],
            "router_timeout_s": opts["router_timeout_s"],
            "err405": {r: error_json(405, "MethodNotAllowedError", f"use POST for {r}")
                       for r in PD_ROUTES},
        })
    assert max_body > 0
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
                             undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True,
                             autoescape=False)
    conf = env.get_template("nginx.conf.j2").render(**ctx)
    with open(os.path.join(TEMPLATES_DIR, "pd_router.js"), encoding="utf-8") as f:
        js = None if router else f.read()
    with open(os.path.join(TEMPLATES_DIR, "pd_stream_fix.js"), encoding="utf-8") as f:
        fix_js = f.read() if stream_fix else None

    secret = bool(opts["api_key"] or opts["engine_api_key"])
    agent_cfg = {
        "listen": f"{ahost}:{aport}",
        **({"mode": mode} if router else {}),     # absent: pd
        "access_log": access_log,
        "pid_path": pid_path,
        "upstreams_path": upstreams_path,
        # operator drains (docs/proxy.md): written by the controller, never by the
        # launcher (not one of the spec's files), so a reload or restart keeps it
        "drain_file": drain_path,
        "pools": pools,
        "fail_timeout_s": opts["fail_timeout_s"],
        "max_fails": opts["max_fails"],
        "health": {
            "enabled": opts["active_health"],
            # null: TCP connect probe
            "path": opts["router_health_path"] if router else "/health",
            "interval_s": opts["health_interval_s"],
            "timeout_s": opts["health_timeout_s"],
            "fails": opts["health_fails"],
            "passes": opts["health_passes"],
        },
    }
    url_host = _url_host(host)
    return {
        "files": [f for f in [
            {"path": conf_path, "content": conf, "mode": "0600" if secret else "0644"},
            {"path": js_path, "content": js, "mode": "0644"} if js is not None else None,
            {"path": fix_path, "content": fix_js, "mode": "0644"} if fix_js else None,
            {"path": upstreams_path, "content": render_upstreams(pools), "mode": "0644"},
            {"path": agent_cfg_path, "content": json.dumps(agent_cfg, indent=1) + "\n",
             "mode": "0644"},
        ] if f is not None],
        "pre_start": [[nginx_bin, "-t", "-q", "-p", run + "/", "-c", conf_path]],
        # nginx writes the access log itself (O_APPEND): the launcher rotates it like the
        # processes' own logs (copy-truncate, spec `logs.files`); nginx's error log is
        # its stderr, i.e. the proxy process's log
        "logs": {"files": [access_log]},
        "processes": [
            {
                "name": "proxy",
                "argv": [nginx_bin, "-p", run + "/", "-c", conf_path],
                "env": {},
                "ports": [{"host": "0.0.0.0" if host == "*" else host.strip("[]"),
                           "port": port, "use": "proxy"}],
                "ready": {"type": "http", "url": f"http://{url_host}:{port}/health"},
            },
            {
                "name": "proxy-agent",
                "argv": [python, "-m", "pd_launcher.proxy_agent", agent_cfg_path],
                "env": {},
                "ports": [{"host": ahost.strip("[]"), "port": aport, "use": "admin"}],
                "ready": {"type": "http", "url": f"http://{url_host}:{port}/health/agent"},
                # a reload (pd_launcher reload) sends it SIGHUP: it re-reads its config,
                # re-renders pd_upstreams.conf and reloads nginx (graceful)
                "reload_signal": "HUP",
            },
        ],
        "checks": {
            "commands": [nginx_bin, python],
            "paths": [njs_module] if njs_module.startswith("/") else [],
            "devices": [],
        },
    }


# ================================================================= the agent
