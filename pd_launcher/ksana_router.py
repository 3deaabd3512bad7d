"""Start KsanaLLM's simple_router so that its ini really applies:
``python -m pd_launcher.ksana_router <tree>/src/ksana_llm/python/simple_router/main.py
[--host H] [--port P] [--workers N] [--config INI]`` (main.py's own flags and defaults:
0.0.0.0, 9080, 6 workers, ``config.ini`` next to main.py).

Why: started as ``python main.py --config INI``, simple_router applies the ini in the
supervisor only. Its uvicorn workers (``"main:app"``, --workers > 1) import main.py
afresh and read the ``config.ini`` next to it, and ``services.py`` binds
``from config import SETTINGS`` while that is still None, so ``heartbeat_timeout_seconds``
is never honoured (always 60 s).

What this does instead, in the supervisor and again in every worker process: put
main.py's directory first on ``sys.path``, load the ini (``config.reload_settings``)
*before* importing main, so ``services.SETTINGS`` is the loaded settings and main.py's
log set-up (``<log_dir>/simple_router.log``; a relative log_dir is relative to the
current directory) and database (``sqlite_path``, relative to the ini's directory) come
from the ini; then run uvicorn on ``pd_launcher.ksana_router:app``, a module attribute
(PEP 562 ``__getattr__``) that performs the same load from ``PD_KSANA_ROUTER_DIR`` and
``PD_KSANA_ROUTER_INI``, which this process sets for its workers.

It runs inside the router's own Python (fastapi, uvicorn, sqlalchemy, httpx); this
module imports only the standard library until uvicorn starts. Exit 2, with a message
naming the problem, when main.py, its config.py or the ini is missing, or when the ini
leaves ``[name_service] name_service_provider`` to simple_router's default (which does
not import with main.py's directory on sys.path).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
from typing import Any, List, Optional, Tuple

PROG = "python -m pd_launcher.ksana_router"
ENV_DIR = "PD_KSANA_ROUTER_DIR"
ENV_INI = "PD_KSANA_ROUTER_INI"
APP = "pd_launcher.ksana_router:app"
EXIT_USAGE = 2


class BootError(Exception):
    """The router cannot be started as asked (exit 2)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Run KsanaLLM's simple_router with its ini applied in every "
        "worker process.")
    p.add_argument("main_py", metavar="MAIN_PY", help="simple_router's main.py")
    p.add_argument("--host", default="0.0.0.0", help="bind address (default: 0.0.0.0)")
    p.add_argument("--port", type=int, default=9080, help="listen port (default: 9080)")
    p.add_argument("--workers", type=int, default=6,
                   help="uvicorn worker processes (default: 6)")
    p.add_argument("--config", default=None,
                   help="the router's ini (default: config.ini next to main.py)")
    return p


def resolve(main_py: str, config: Optional[str]) -> Tuple[str, str]:
    """(absolute directory of main.py, absolute ini path); BootError naming what is
    missing."""
    path = os.path.abspath(os.path.expanduser(main_py))
    if not os.path.isfile(path):
        raise BootError(f"simple_router's main.py not found: {path} (expected "
                        "<KsanaLLM tree>/src/ksana_llm/python/simple_router/main.py)")
    directory = os.path.dirname(path)
    if not os.path.isfile(os.path.join(directory, "config.py")):
        raise BootError(f"{directory} is not a simple_router directory: no config.py next "
                        "to main.py")
    ini = os.path.abspath(os.path.expanduser(config or os.path.join(directory,
                                                                      "config.ini")))
    if not os.path.isfile(ini):
        what = "--config" if config else "the default config.ini next to main.py"
        raise BootError(f"router ini not found: {ini} ({what})")
    return directory, ini


def _first_on_path(directory: str) -> None:
    while directory in sys.path:
        sys.path.remove(directory)
    sys.path.insert(0, directory)


def _module_in(name: str, directory: str) -> Any:
    """Import ``name`` and check that it is the file of ``directory`` (not a namesake)."""
    module = importlib.import_module(name)
    where = os.path.dirname(os.path.realpath(getattr(module, "__file__", "") or ""))
    if where != os.path.realpath(directory):
        raise BootError(f"module {name!r} is imported from {where or 'nowhere'}, not from "
                        f"{directory}: another {name!r} is already loaded or comes first")
    return module


def _check_provider(settings: Any, ini: str) -> None:
    name = getattr(settings, "name_service_provider", None)
    if not isinstance(name, str):
        return
    try:
        found = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise BootError(f"{ini}: [name_service] name_service_provider = {name!r} cannot be "
                        "imported (simple_router's built-in default does not import when "
                        "main.py runs from its own directory; set name_service_provider = "
                        "name_service.auto_provider)")


def load(directory: str, ini: str) -> Any:
    """Apply ``ini`` to simple_router in this process and return its FastAPI app."""
    loaded = sys.modules.get("main")
    if loaded is not None and hasattr(loaded, "app"):
        _module_in("main", directory)
        return loaded.app
    _first_on_path(directory)
    config = _module_in("config", directory)
    try:
        settings = config.reload_settings(ini)
    except (OSError, ValueError, KeyError) as exc:
        raise BootError(f"{ini}: simple_router cannot use this ini: "
                        f"{type(exc).__name__}: {exc}") from None
    _check_provider(settings, ini)
    main = _module_in("main", directory)
    services = sys.modules.get("services")
    if services is not None and getattr(services, "SETTINGS", None) is not settings:
        raise BootError("services.SETTINGS is not the loaded ini (services was imported "
                        "before the ini was loaded); heartbeat_timeout_seconds would not "
                        "apply")
    return main.app


def __getattr__(name: str) -> Any:
    """``app``: simple_router's app with the ini applied, for uvicorn's import string
    (in the supervisor and in every worker process)."""
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    directory, ini = os.environ.get(ENV_DIR), os.environ.get(ENV_INI)
    if not directory or not ini:
        raise RuntimeError(f"{APP} needs {ENV_DIR} and {ENV_INI} (set by {PROG})")
    return load(directory, ini)


def run(argv: List[str]) -> int:
    args = build_parser().parse_args(argv)
    directory, ini = resolve(args.main_py, args.config)
    os.environ[ENV_DIR], os.environ[ENV_INI] = directory, ini
    load(directory, ini)  # here first: errors surface before any worker starts
    uvicorn = importlib.import_module("uvicorn")  # the router's Python has it
    logging.getLogger("simple_router.pd_deploy").info(
        "simple_router from %s with %s applied in every worker: %s:%s, %d worker(s)",
        directory, ini, args.host, args.port, args.workers)
    uvicorn.run(APP, host=args.host, port=args.port, workers=args.workers)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    try:
        return run(list(sys.argv[1:] if argv is None else argv))
    except BootError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
