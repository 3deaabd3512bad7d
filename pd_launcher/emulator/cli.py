"""`python -m pd_launcher.emulator serve MODEL [vllm serve flags]`,
`python -m pd_launcher.emulator xllm [xllm gflags]`,
`python -m pd_launcher.emulator xllm_master_serving [xllm-service gflags]`,
`python -m pd_launcher.emulator fastdeploy [FastDeploy api_server flags]`,
`python -m pd_launcher.emulator fd-router --port P [--splitwise] [--config_path FILE]`,
`python -m pd_launcher.emulator ksana --config_file YAML --port P --host H`,
`python -m pd_launcher.emulator ksana-router [--host H] [--port P] [--config INI]`."""
from __future__ import annotations

import asyncio
import sys
from typing import List, Optional

USAGE = """usage: python -m pd_launcher.emulator serve MODEL [vllm serve flags]
       python -m pd_launcher.emulator xllm --model=PATH [xllm flags]
       python -m pd_launcher.emulator xllm_master_serving [xllm-service flags]
       python -m pd_launcher.emulator fastdeploy --model M [FastDeploy api_server flags]
       python -m pd_launcher.emulator fd-router --port P [--splitwise] [--config_path FILE]
       python -m pd_launcher.emulator ksana --config_file YAML --port P --host H
       python -m pd_launcher.emulator ksana-router [--host H] [--port P] [--workers N]
                                                  [--config INI]

An engine emulator that stands in for `vllm serve` (same argv, same HTTP API, real
KV hand-off between prefill and decode over TCP), for an xLLM device process and for
xllm-service (gflags argv, a real etcd registry), for a FastDeploy API server (router
mode, or the Redis splitwise scheduler) and for FastDeploy's router, for a KsanaLLM
node (serving_server.py's argv and YAML, registering with simple_router) and for
simple_router itself. See
pd_launcher/emulator/README.md for the environment variables (PD_EMU_*).
"""


def main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0 if args else 2
    if args[0] == "xllm":
        from .xllm.instance import main as xllm_main

        return xllm_main(args[1:])
    if args[0] == "xllm_master_serving":
        from .xllm.service import main as service_main

        return service_main(args[1:])
    if args[0] == "fastdeploy":
        from .fastdeploy.instance import main as fastdeploy_main

        return fastdeploy_main(args[1:])
    if args[0] == "fd-router":
        from .fastdeploy.router import main as fd_router_main

        return fd_router_main(args[1:])
    if args[0] == "ksana":
        from .ksana.node import main as ksana_main

        return ksana_main(args[1:])
    if args[0] == "ksana-router":
        from .ksana.router import main as ksana_router_main

        return ksana_router_main(args[1:])
    if args[0] != "serve":
        sys.stderr.write(f"unknown command {args[0]!r}\n{USAGE}")
        return 2
    from .args import main_parse
    from .settings import SettingsError, from_environ

    engine_args = main_parse(args[1:])
    try:
        lat, faults = from_environ()
    except SettingsError as exc:
        sys.stderr.write(f"python -m pd_launcher.emulator serve: error: {exc}\n")
        return 2
    from .runtime import serve, setup_logging  # aiohttp only once the argv is good

    setup_logging(engine_args)
    try:
        return asyncio.run(serve(engine_args, lat, faults))
    except KeyboardInterrupt:
        return 130
