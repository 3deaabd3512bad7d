#!/usr/bin/env python3
"""Check planned `vllm serve` command lines against the REAL vllm argument parser.

Run with the python of a vllm venv (.ci/install-vllm.sh), not the project's venv:

    echo '[{"id": "p1-dp0", "argv": ["vllm", "serve", "/models/x", "--port", "7100"],
            "env": {"VLLM_NIXL_SIDE_CHANNEL_PORT": "36000"}}]' \\
        | .venv-vllm/bin/python tests/conformance/vllm_check.py

Two venvs, one per flavour pd-deploy plans: .venv-vllm (vLLM 0.33.0, NVIDIA/NIXL) and
.venv-vllm-ascend (vLLM 0.23.0 with vLLM-Ascend 0.23.0.post1 installed, pure Python).

stdout: a JSON list, one object per input item, in input order:
    {"id", "vllm": version, "ok": bool, "error": str ("" when ok), "stage": where it
     stopped, "mode": what `vllm serve` would launch, "warnings": [str],
     "parsed": {selected parsed values}, "parallel": {derived DP layout},
     "connector": null | {"name", "registered", "provider"},
     "ascend": null | {"ok", "error"}}
Item keys: "id", "argv", "env" (optional), "strict_ascend" and "strict_connector"
(optional, see below).
`vllm_check.py --info` prints the vllm version and which code paths are used;
`vllm_check.py --with-info` (items on stdin) prints {"info": that, "results": the list}.
`vllm_check.py --ascend` prints what of vLLM-Ascend loads here and what does not (below).

Before vllm.engine / vllm.entrypoints are imported (_prepare_import):
  * vLLM-Ascend's plugins are kept out with VLLM_PLUGINS, vLLM's allow-list of plugin
    names (set to every installed plugin but vllm_ascend's; left alone when the caller
    set it, and unset when there is nothing to exclude, as in the 0.33 venv): its general
    plugins import torch_npu, and vLLM calls them unguarded while it builds the serve
    parser (AsyncEngineArgs.add_cli_args -> load_general_plugins).
  * the CPU platform is selected when vllm cannot infer one. vllm 0.33 honours
    VLLM_TARGET_DEVICE=cpu (nothing is changed there); the vllm 0.23 wheel ignores it and
    its serve parser fails with "Failed to infer device type" (EngineArgs.add_cli_args
    builds VllmConfig's default DeviceConfig), so vllm.platforms.current_platform is set
    to CpuPlatform, as `vllm bench` does, before arg_utils and config.parallel bind it.
  Consequence: what NPUPlatform.pre_register_and_update would add to the parser (e.g.
  "ascend" among --quantization's choices) is not seen here.
With vLLM-Ascend installed, its KV connector names are registered with
vllm_ascend.distributed.kv_transfer.register_connector() (names only, nothing loaded).

Stages, each the code `vllm serve` itself runs, in its order (vllm 0.33 and 0.23 alike:
vllm/entrypoints/cli/main.py main() and vllm/entrypoints/cli/serve.py):
  argv          the item's argv is `vllm serve ...` (or `<python> -m <module> serve ...`,
                the emulator form); everything after `serve` is what is parsed.
  parse         top-level FlexibleArgumentParser + the serve subparser built by
                ServeSubcommand.subparser_init (-> make_arg_parser), parse_args(["serve",
                ...]): positional model_tag, unknown flags, types, choices, and the
                --kv-transfer-config JSON (TypeAdapter(KVTransferConfig).validate_json:
                unknown or removed keys such as kv_rank are rejected). Exit status 2.
  validate      ServeSubcommand.validate -> validate_parsed_serve_args.
  dispatch      ServeSubcommand.cmd with its launchers replaced by recorders: the data
                parallel load-balancing mode checks (--data-parallel-rank and
                --data-parallel-start-rank together are refused, --headless with
                --api-server-count > 0 ...). "mode" says what would be launched:
                api_server | multi_api_server | headless | dp_supervisor | grpc.
  engine_args   AsyncEngineArgs.from_cli_args (model-free: copies the namespace).
  parallel      (vllm 0.33 and 0.23) the data-parallel part of
                EngineArgs.create_engine_config, transcribed below for each version
                because the real method needs the model's config, then the real
                ParallelConfig(...) with its validators (rank range, ...). Model-dependent
                checks (external DP needs a MoE model, world size vs devices, ...) are NOT
                done. Other versions skip this stage.
  connector     the --kv-transfer-config connector name against vLLM's
                KVConnectorFactory registry (with vLLM-Ascend's names when it is
                installed), as KVConnectorFactory.get_connector_class does at start-up
                ("Unsupported connector type"); skipped with kv_connector_module_path.
                Reported in "connector"; it fails the item only with
                "strict_connector": true (a vLLM-Ascend connector is unknown to plain
                vLLM, whose venv still checks the vLLM-Ascend argv's other flags).
  ascend        only for vLLM-Ascend's Mooncake connectors (MooncakeConnectorV1,
                MooncakeLayerwiseConnector, MooncakeHybridConnector): the start-up checks
                vLLM-Ascend makes on kv_connector_extra_config, transcribed from
                vllm-ascend 0.23.0.post1 (the newest on PyPI; see _ascend_kv_extra).
                Reported in "ascend": {"ok", "error"} (null when not applicable); it
                fails the item ("ok": false) only when the item has "strict_ascend": true,
                since vLLM itself accepts these values.
  env           VLLM_* names in the item's env that vllm does not define: a warning
                (vllm warns too), an error with --fail-on-environ-validation.
                VLLM_ASCEND_* names belong to vLLM-Ascend's own envs module and are
                not reported.

`--ascend` (a separate process; nothing of it affects the checks above) reports, as JSON:
the vllm_ascend entry points; each one loaded and called (the platform plugin's
register() must name vllm_ascend.platform.NPUPlatform, then that class is imported);
the KV connector names register_connector() adds or replaces, and each connector class
loaded; every failure as "Type: message" with the innermost installed file:line
("where"). On a CPU machine torch_npu, mooncake, ... are missing, so most of it fails
to load: that is the report, not an error of this script.

The model path is never opened: parsing keeps it as a string (HF_HUB_OFFLINE is left
unset, so EngineArgs.__post_init__ does not resolve it either).
Item env is applied to os.environ around each item (values that vllm read at import
time, e.g. defaults computed from VLLM_* variables, are those of this process).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import io
import json
import logging
import os
import sys
import traceback

# Before vllm is imported: no accelerator here, no usage reporting.
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PLUGIN_GROUPS = ("vllm.platform_plugins", "vllm.general_plugins")
ASCEND_PACKAGE = "vllm_ascend"


def _plugin_entry_points() -> list:
    """(group, entry point) of every installed vLLM plugin."""
    from importlib.metadata import entry_points

    return [(g, ep) for g in PLUGIN_GROUPS for ep in entry_points(group=g)]


def _is_ascend(ep) -> bool:
    return ep.value.split(":")[0].split(".")[0] == ASCEND_PACKAGE


def _prepare_import() -> dict:
    """Plugins and platform, before vllm.engine / vllm.entrypoints are imported.

    See the module docstring. Returns what was done, for --info.
    """
    eps = _plugin_entry_points()
    excluded = sorted({ep.name for _, ep in eps if _is_ascend(ep)})
    preset = "VLLM_PLUGINS" in os.environ
    if excluded and not preset:
        allowed = sorted({ep.name for _, ep in eps if not _is_ascend(ep)})
        os.environ["VLLM_PLUGINS"] = ",".join(allowed)  # "" allows none
    import vllm.platforms as platforms

    forced = False
    if platforms.current_platform.is_unspecified():
        from vllm.platforms.cpu import CpuPlatform

        platforms.current_platform = CpuPlatform()
        forced = True
    return {
        "excluded_plugins": [] if preset else excluded,
        "vllm_plugins": os.environ.get("VLLM_PLUGINS"),
        "platform": type(platforms.current_platform).__name__,
        "forced_cpu_platform": forced,
    }


def _failure(e: BaseException) -> tuple[str, str]:
    """("Type: message", innermost installed file:line) of an exception."""
    where = ""
    for frame in traceback.extract_tb(e.__traceback__):
        _, sep, rel = frame.filename.partition("site-packages" + os.sep)
        if sep:
            where = f"{rel}:{frame.lineno}"
    return " ".join(f"{type(e).__name__}: {e}".split()), where


def _connector_registry():
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    return KVConnectorFactory._registry


def _register_ascend_connectors() -> dict:
    """vLLM-Ascend's KV connector names, as its ascend_kv_connector plugin registers them
    (without the plugin's global patch, which imports torch_npu). Names only."""
    from importlib.metadata import version

    out = {"version": version("vllm-ascend"), "added": [], "replaced": [], "error": ""}
    try:
        registry = _connector_registry()
        before = dict(registry)
        kv_transfer = importlib.import_module("vllm_ascend.distributed.kv_transfer")
        kv_transfer.register_connector()
        out["added"] = sorted(set(registry) - set(before))
        out["replaced"] = sorted(n for n in before if registry.get(n) is not before[n])
    except Exception as e:  # noqa: BLE001 - reported, the parse checks still run
        out["error"], out["where"] = _failure(e)
    return out

MAKE_ARG_PARSER_MODULES = (
    "vllm.entrypoints.common.cli_args",  # 0.33
    "vllm.entrypoints.launchers.cli_args",  # 0.29 - 0.32
    "vllm.entrypoints.openai.cli_args",  # <= 0.28
)
FLEXIBLE_PARSER_MODULES = ("vllm.utils.argparse_utils", "vllm.utils")

# Parsed values worth reporting (when the namespace has them).
REPORTED = (
    "model",
    "model_tag",
    "host",
    "port",
    "served_model_name",
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "data_parallel_size",
    "data_parallel_size_local",
    "data_parallel_rank",
    "data_parallel_start_rank",
    "data_parallel_address",
    "data_parallel_rpc_port",
    "data_parallel_external_lb",
    "data_parallel_hybrid_lb",
    "headless",
    "api_server_count",
    "enable_expert_parallel",
    "enable_prefix_caching",
    "enforce_eager",
    "max_num_batched_tokens",
    "max_num_seqs",
    "max_model_len",
)


class _Dispatched(Exception):
    """Raised by the launcher recorders: ServeSubcommand.cmd got as far as launching."""

    def __init__(self, mode: str):
        super().__init__(mode)
        self.mode = mode


# The data-parallel rules of EngineArgs.create_engine_config transcribed in
# _parallel_config, by vllm minor version.
PARALLEL_RULES = ("0.33", "0.23")


class _Vllm:
    """The pieces of the installed vllm the checks use, located once."""

    def __init__(self, setup: dict | None = None) -> None:
        import vllm

        self.setup = setup or {}
        self.version = getattr(vllm, "__version__", "?")
        minor = ".".join(self.version.split(".")[:2])
        self.parallel_rules = minor if minor in PARALLEL_RULES else None
        self.serve_mod = None
        self.serve_cmd = None
        try:
            self.serve_mod = importlib.import_module("vllm.entrypoints.cli.serve")
            self.serve_cmd = self.serve_mod.ServeSubcommand()
        except (ImportError, AttributeError) as e:  # very old layouts
            self.serve_import_error = f"{type(e).__name__}: {e}"
        self.cli_args = None
        for name in MAKE_ARG_PARSER_MODULES:
            try:
                mod = importlib.import_module(name)
            except ImportError:
                continue
            if hasattr(mod, "make_arg_parser"):
                self.cli_args = mod
                break
        if self.cli_args is None and self.serve_cmd is None:
            raise RuntimeError("no make_arg_parser in " + ", ".join(MAKE_ARG_PARSER_MODULES))
        self.flexible = None
        for name in FLEXIBLE_PARSER_MODULES:
            try:
                self.flexible = importlib.import_module(name).FlexibleArgumentParser
                break
            except (ImportError, AttributeError):
                continue
        if self.flexible is None:
            raise RuntimeError("no FlexibleArgumentParser in " + ", ".join(FLEXIBLE_PARSER_MODULES))
        from vllm.engine.arg_utils import AsyncEngineArgs

        self.engine_args_cls = AsyncEngineArgs
        import vllm.envs as envs

        self.env_names = set(getattr(envs, "environment_variables", {}))
        self.ascend = None  # vLLM-Ascend's connector names, when it is installed
        if importlib.util.find_spec(ASCEND_PACKAGE) is not None:
            self.ascend = _register_ascend_connectors()

    def info(self) -> dict:
        return {
            "vllm": self.version,
            "serve_subcommand": bool(self.serve_cmd),
            "make_arg_parser": self.cli_args.__name__ if self.cli_args else None,
            "flexible_argument_parser": self.flexible.__module__,
            "parallel_stage": self.parallel_rules is not None,
            "parallel_rules": self.parallel_rules,
            "python": sys.executable,
            "target_device": os.environ.get("VLLM_TARGET_DEVICE"),
            **self.setup,
            "vllm_ascend": self.ascend,
        }

    def connector(self, kv) -> dict | None:
        """Is the item's kv_connector known to KVConnectorFactory (see "connector")?"""
        name = getattr(kv, "kv_connector", None)
        if name is None or getattr(kv, "kv_connector_module_path", None):
            return None
        registry = _connector_registry()
        ascend = set(self.ascend["added"] + self.ascend["replaced"]) if self.ascend else set()
        registered = name in registry
        provider = None
        if registered:
            provider = "vllm-ascend" if name in ascend else "vllm"
        return {"name": name, "registered": registered, "provider": provider}

    def build_parser(self):
        """The parser `vllm serve` uses: main()'s top-level parser + the serve subparser."""
        parser = self.flexible(prog="vllm", description="vLLM CLI")
        subparsers = parser.add_subparsers(required=False, dest="subparser")
        if self.serve_cmd is not None:
            sub = self.serve_cmd.subparser_init(subparsers)
            sub.set_defaults(dispatch_function=self.serve_cmd.cmd)
        else:
            sub = subparsers.add_parser("serve", usage="vllm serve [model_tag] [options]")
            self.cli_args.make_arg_parser(sub)
        return parser

    def validate(self, ns: argparse.Namespace) -> None:
        if self.serve_cmd is not None:
            self.serve_cmd.validate(ns)
        else:
            self.cli_args.validate_parsed_serve_args(ns)

    def dispatch(self, ns: argparse.Namespace) -> str:
        """Run ServeSubcommand.cmd up to the point where it would launch something."""
        if self.serve_cmd is None:
            return "unknown"
        if getattr(ns, "grpc", False):
            return "grpc"
        mod = self.serve_mod

        def recorder(mode):
            def record(*_a, **_k):
                raise _Dispatched(mode)

            return record

        class _Uvloop:  # `uvloop.run(run_server(args))`: run_server is a recorder
            @staticmethod
            def run(*_a, **_k):
                raise _Dispatched("api_server")

        patches = {
            "run_headless": recorder("headless"),
            "run_multi_api_server": recorder("multi_api_server"),
            "run_dp_supervisor": recorder("dp_supervisor"),
            "run_server": recorder("api_server"),
            "uvloop": _Uvloop,
        }
        saved = {k: getattr(mod, k) for k in patches if hasattr(mod, k)}
        try:
            for k in saved:
                setattr(mod, k, patches[k])
            self.serve_cmd.cmd(ns)
        except _Dispatched as d:
            return d.mode
        finally:
            for k, v in saved.items():
                setattr(mod, k, v)
        return "unknown"


@contextlib.contextmanager
def _item_env(env: dict):
    saved = {k: os.environ.get(k) for k in env}
    try:
        for k, v in env.items():
            os.environ[str(k)] = str(v)
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.messages.append(record.getMessage())
        except Exception:  # noqa: BLE001 - a broken log record is not our failure
            self.messages.append(str(record.msg))


def _serve_args(argv: list) -> list[str]:
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise ValueError("argv must be a list of strings")
    if len(argv) >= 2 and os.path.basename(argv[0]) == "vllm" and argv[1] == "serve":
        return argv[2:]
    if len(argv) >= 4 and argv[1] == "-m" and argv[3] == "serve":  # <python> -m emulator serve
        return argv[4:]
    raise ValueError("argv must start with `vllm serve` (or `<python> -m <module> serve`)")


def _parser_message(text: str) -> str:
    """argparse's `prog: error: message` (the usage lines before it dropped)."""
    _, sep, message = text.partition(" error: ")
    message = message if sep else text
    return " ".join(message.split())[:2000]


def _jsonable(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


def _parallel_config(engine_args, headless: bool, rules: str = "0.33"):
    """Data-parallel section of EngineArgs.create_engine_config, model-free.

    Transcribed from vllm/engine/arg_utils.py, create_engine_config, from `assert not
    headless or not self.data_parallel_hybrid_lb` to the ParallelConfig call, of
    vllm 0.33.0 (rules "0.33") and vllm 0.23.0 (rules "0.23"); only the model-dependent
    `not model_config.is_moe` check is left out. Where 0.23 asserts, 0.33 raises
    ValueError; the messages here are the same for both. 0.23 also differs in: no
    prefill context parallel in the --nnodes world size, node rank checked only against
    --nnodes, an external LB rank always inferred from --node-rank with --nnodes > 1, no
    fault-tolerance check, and a start rank of 0 counting as "no start rank" (`or`).
    Then the real ParallelConfig runs its own validators.
    """
    from vllm.config import ParallelConfig

    old = rules == "0.23"
    error = AssertionError if old else ValueError
    ea = engine_args
    if headless and ea.data_parallel_hybrid_lb:
        raise AssertionError("data_parallel_hybrid_lb is not applicable in headless mode")
    if ea.data_parallel_hybrid_lb and ea.data_parallel_external_lb:
        raise error(
            "`--data-parallel-hybrid-lb` and `--data-parallel-external-lb` cannot be "
            "enabled together."
        )
    if ea.nnodes > 1 and ea.data_parallel_backend != "mp":
        raise error("`--nnodes` > 1 requires `--data-parallel-backend mp`")
    inferred_rank = 0
    size_local = ea.data_parallel_size_local
    rank = ea.data_parallel_rank
    hybrid = ea.data_parallel_hybrid_lb
    if ea.nnodes > 1:
        within_dp = ea.pipeline_parallel_size * ea.tensor_parallel_size
        if not old:
            within_dp *= ea.prefill_context_parallel_size
        world = ea.data_parallel_size * within_dp
        if world % ea.nnodes != 0:
            raise error(f"`--nnodes {ea.nnodes}` must evenly divide the world size {world}")
        if not (ea.node_rank < ea.nnodes if old else 0 <= ea.node_rank < ea.nnodes):
            raise error(f"`--node-rank` must be between 0 and {ea.nnodes - 1}")
        local_world = world // ea.nnodes
        inferred_rank = (ea.node_rank * local_world) // within_dp
        if ea.data_parallel_size > 1 and ea.data_parallel_external_lb:
            if old:
                rank = inferred_rank
            elif rank is None:
                if ea.nnodes % ea.data_parallel_size != 0:
                    raise ValueError(
                        "`--node-rank` cannot identify external data-parallel ranks when "
                        "`--nnodes` is not divisible by `--data-parallel-size`"
                    )
                rank = inferred_rank
        elif size_local is None:
            size_local = max(local_world // within_dp, 1)
    external = ea.data_parallel_external_lb or rank is not None
    if not old and ea.enable_fault_tolerance and not external:
        raise ValueError("Fault tolerance requires external load balancer mode")
    if external:
        if rank is None:
            raise error("`--data-parallel-external-lb` requires a data-parallel rank")
        if size_local not in (1, None):
            raise error(
                "an external data-parallel rank requires `--data-parallel-size-local 1`; "
                f"got {size_local}"
            )
        size_local = 1
        hybrid = False
    elif size_local is not None:
        start = ea.data_parallel_start_rank
        if (bool(start) if old else start is not None) and not headless:
            hybrid = True
        if hybrid and size_local == 1:
            external, hybrid = True, False
        if size_local == ea.data_parallel_size:
            hybrid = False
        if old:
            rank = start or inferred_rank
        else:
            rank = start if start is not None else inferred_rank
    else:
        if hybrid:
            raise error("`--data-parallel-hybrid-lb` requires `--data-parallel-size-local`")
        size_local = ea.data_parallel_size
    if headless and size_local <= 0:
        raise ValueError("data_parallel_size_local must be > 0 in headless mode")

    names = {f.name for f in dataclasses.fields(ParallelConfig) if f.init}
    kwargs = {}
    for f in dataclasses.fields(ea):
        if f.name in names and not f.name.startswith("_"):
            value = getattr(ea, f.name)
            if value is not None:
                kwargs[f.name] = value
    kwargs.update(
        data_parallel_rank=rank or 0,
        data_parallel_external_lb=external,
        data_parallel_size_local=size_local,
        data_parallel_hybrid_lb=hybrid,
    )
    if ea.data_parallel_address is not None:
        kwargs["data_parallel_master_ip"] = ea.data_parallel_address
    if ea.data_parallel_rpc_port is not None:
        kwargs["data_parallel_rpc_port"] = ea.data_parallel_rpc_port
    for model_dependent in ("is_moe_model", "placement_group", "ray_runtime_env"):
        kwargs.pop(model_dependent, None)
    pc = ParallelConfig(**kwargs)
    return {
        "data_parallel_rank": pc.data_parallel_rank,
        "data_parallel_size": pc.data_parallel_size,
        "data_parallel_size_local": pc.data_parallel_size_local,
        "data_parallel_external_lb": pc.data_parallel_external_lb,
        "data_parallel_hybrid_lb": pc.data_parallel_hybrid_lb,
        "data_parallel_master_ip": pc.data_parallel_master_ip,
        "data_parallel_rpc_port": pc.data_parallel_rpc_port,
        "world_size": pc.world_size,
    }


ASCEND_MOONCAKE_CONNECTORS = (
    "MooncakeConnectorV1",
    "MooncakeLayerwiseConnector",
    "MooncakeHybridConnector",
)


def _ascend_kv_extra(kv, tp: int, dp: int, warnings: list[str]) -> None:
    """vLLM-Ascend's start-up checks of kv_connector_extra_config (model-free part).

    Transcribed from vllm-ascend 0.23.0.post1:
      vllm_ascend/utils.py check_kv_extra_config (called by NPUPlatform.
        check_and_update_config): a producer's "prefill" and a consumer's "decode"
        tp_size / dp_size must equal its own --tensor-parallel-size /
        --data-parallel-size (kv_both: both);
      kv_p2p/mooncake_connector.py MooncakeConnectorWorker: "prefill" and "decode" need
        tp_size and dp_size; decode pp_size must be 1; prefill tp_size >= decode tp_size;
      ascend_config.py: non-MLA models need prefill tp_size % decode tp_size == 0
        (model-dependent: a warning here).
    """
    extra = kv.kv_connector_extra_config or {}
    producer = kv.kv_role in ("kv_producer", "kv_both")
    consumer = kv.kv_role in ("kv_consumer", "kv_both")
    for name, own in (("prefill", producer), ("decode", consumer)):
        cfg = extra.get(name, {})
        if not isinstance(cfg, dict):
            raise ValueError(f"kv_connector_extra_config.{name} must be an object")
        if not own:
            continue
        if "tp_size" in cfg and cfg["tp_size"] != tp:
            raise ValueError(
                f"KV transfer '{name}' config has a conflicting tensor parallel size. "
                f"Expected {tp}, but got {cfg['tp_size']}."
            )
        if "dp_size" in cfg and cfg["dp_size"] != dp:
            raise ValueError(
                f"KV transfer '{name}' config has a conflicting data parallel size. "
                f"Expected {dp}, but got {cfg['dp_size']}."
            )
    if kv.kv_connector != "MooncakeConnectorV1":
        return
    prefill, decode = extra.get("prefill", {}), extra.get("decode", {})
    for name, cfg in (("prefill", prefill), ("decode", decode)):
        for key in ("tp_size", "dp_size"):
            if key not in cfg:
                raise ValueError(f"kv_connector_extra_config.{name}.{key} is required")
    if decode.get("pp_size", 1) != 1:
        raise ValueError("decode pp size must be 1")
    if prefill["tp_size"] < decode["tp_size"]:
        raise ValueError(
            f"prefill_tp_size: {prefill['tp_size']} must be greater than or equal to the "
            f"decode_tp_size: {decode['tp_size']}"
        )
    if prefill["tp_size"] % decode["tp_size"]:
        warnings.append(
            "prefill tp_size is not a multiple of decode tp_size: vLLM-Ascend refuses "
            "this for non-MLA models"
        )


def check_item(v: _Vllm, item: dict) -> dict:
    res = {
        "id": item.get("id"),
        "vllm": v.version,
        "ok": False,
        "error": "",
        "stage": "argv",
        "mode": None,
        "warnings": [],
        "parsed": {},
        "connector": None,
        "ascend": None,
    }
    capture = _Capture()
    vllm_logger = logging.getLogger("vllm")
    vllm_logger.addHandler(capture)
    stderr = io.StringIO()
    try:
        env = item.get("env") or {}
        if not isinstance(env, dict):
            raise ValueError("env must be an object")
        args = _serve_args(item.get("argv"))
        with _item_env(env), contextlib.redirect_stderr(stderr):
            res["stage"] = "parse"
            parser = v.build_parser()
            try:
                ns = parser.parse_args(["serve", *args])
            except SystemExit as e:
                raise ValueError(
                    f"parser exited with status {e.code}: {_parser_message(stderr.getvalue())}"
                ) from None
            res["parsed"] = {k: _jsonable(getattr(ns, k)) for k in REPORTED if hasattr(ns, k)}
            if getattr(ns, "model_tag", "") is None and "--config" not in args:
                res["warnings"].append(f"no model given: vllm serves {ns.model!r}")
            if getattr(ns, "api_key", None):
                res["parsed"]["api_key"] = "***"
            if getattr(ns, "kv_transfer_config", None) is not None:
                res["parsed"]["kv_transfer_config"] = _jsonable(ns.kv_transfer_config)

            res["stage"] = "validate"
            v.validate(ns)

            res["stage"] = "dispatch"
            headless = bool(getattr(ns, "headless", False))
            res["mode"] = v.dispatch(ns)
            res["parsed"]["model"] = _jsonable(getattr(ns, "model", None))
            res["parsed"]["api_server_count"] = getattr(ns, "api_server_count", None)

            res["stage"] = "engine_args"
            engine_args = v.engine_args_cls.from_cli_args(ns)

            if v.parallel_rules is not None:
                res["stage"] = "parallel"
                res["parallel"] = _parallel_config(engine_args, headless, v.parallel_rules)

            kv = getattr(ns, "kv_transfer_config", None)
            if kv is not None:
                res["stage"] = "connector"
                res["connector"] = v.connector(kv)
                if (
                    res["connector"]
                    and not res["connector"]["registered"]
                    and item.get("strict_connector")
                ):
                    raise ValueError(
                        f"Unsupported connector type: {kv.kv_connector} (not registered "
                        f"in vllm {v.version}"
                        + (f" with vllm-ascend {v.ascend['version']}" if v.ascend else "")
                        + ")"
                    )
            if kv is not None and kv.kv_connector in ASCEND_MOONCAKE_CONNECTORS:
                res["stage"] = "ascend"
                try:
                    _ascend_kv_extra(
                        kv, ns.tensor_parallel_size, ns.data_parallel_size, res["warnings"]
                    )
                    res["ascend"] = {"ok": True, "error": ""}
                except ValueError as e:
                    res["ascend"] = {"ok": False, "error": f"ValueError: {e}"}
                    if item.get("strict_ascend"):
                        raise

            res["stage"] = "env"
            unknown = sorted(
                k
                for k in env
                if k.startswith("VLLM_")
                and not k.startswith("VLLM_ASCEND_")
                and k not in v.env_names
            )
            if unknown and getattr(engine_args, "fail_on_environ_validation", False):
                raise ValueError(f"Unknown vLLM environment variable detected: {unknown[0]}")
            for k in unknown:
                res["warnings"].append(f"Unknown vLLM environment variable detected: {k}")
        res["stage"] = "done"
        res["ok"] = True
    except Exception as e:  # noqa: BLE001 - every failure is a result, never a crash
        res["error"] = " ".join(f"{type(e).__name__}: {e}".split())
        if os.environ.get("PD_VLLM_CHECK_TRACEBACK"):
            res["traceback"] = traceback.format_exc()
    finally:
        vllm_logger.removeHandler(capture)
    res["warnings"] = capture.messages + res["warnings"]
    return res


def _missing_imports(module: str) -> list[str]:
    """Top-level packages the module's own top-level imports name that are not installed
    (read from its source; the import stops at the first one, this lists them all)."""
    import ast

    try:
        spec = importlib.util.find_spec(module)
        with open(spec.origin, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except Exception:  # noqa: BLE001 - best effort
        return []
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return sorted(n for n in names if importlib.util.find_spec(n) is None)


def _load_connector(loader) -> dict:
    try:
        cls = loader()
        return {"ok": True, "class": f"{cls.__module__}.{cls.__qualname__}", "error": ""}
    except Exception as e:  # noqa: BLE001 - the report is what loads and what does not
        error, where = _failure(e)
        out = {"ok": False, "class": None, "error": error, "where": where}
        try:  # KVConnectorFactory.register_connector's lazy loader keeps the module path
            cells = dict(zip(loader.__code__.co_freevars,
                             (c.cell_contents for c in loader.__closure__ or ())))
            out["module"] = cells["module_path"]
            out["missing"] = _missing_imports(cells["module_path"])
        except Exception:  # noqa: BLE001 - best effort
            pass
        return out


def ascend_report(setup: dict) -> dict:
    """What of vLLM-Ascend loads in this venv, and exactly why the rest does not."""
    from importlib.metadata import version

    rep: dict = {"installed": importlib.util.find_spec(ASCEND_PACKAGE) is not None,
                 "setup": setup}
    if not rep["installed"]:
        return rep
    import vllm

    rep.update(vllm=vllm.__version__, version=version("vllm-ascend"), plugins=[])
    registry = _connector_registry()
    before = dict(registry)
    for group, ep in _plugin_entry_points():
        if not _is_ascend(ep):
            continue
        entry = {"group": group, "name": ep.name, "value": ep.value, "loaded": False,
                 "called": False, "returned": None, "error": "", "where": ""}
        rep["plugins"].append(entry)
        try:
            func = ep.load()
            entry["loaded"] = True
            result = func()
            entry["called"] = True
            entry["returned"] = result if result is None or isinstance(result, str) else repr(
                result
            )
        except Exception as e:  # noqa: BLE001 - reported
            entry["error"], entry["where"] = _failure(e)
            continue
        if group == "vllm.platform_plugins" and isinstance(result, str):
            module, _, name = result.rpartition(".")
            try:
                getattr(importlib.import_module(module), name)
                entry["class_import"] = {"ok": True, "error": "", "where": ""}
            except Exception as e:  # noqa: BLE001 - reported
                error, where = _failure(e)
                entry["class_import"] = {"ok": False, "error": error, "where": where,
                                         "missing": _missing_imports(module)}
    # The ascend_kv_connector plugin registers nothing when its global patch fails
    # (torch_npu): register the names the way _Vllm does, and say so.
    via = "ascend_kv_connector plugin"
    if set(registry) == set(before) and all(registry[n] is before[n] for n in before):
        via = "vllm_ascend.distributed.kv_transfer.register_connector()"
        try:
            importlib.import_module("vllm_ascend.distributed.kv_transfer").register_connector()
        except Exception as e:  # noqa: BLE001 - reported
            error, where = _failure(e)
            rep["connectors"] = {"via": via, "error": error, "where": where}
            return rep
    added = sorted(set(registry) - set(before))
    replaced = sorted(n for n in before if registry.get(n) is not before[n])
    rep["connectors"] = {
        "via": via,
        "error": "",
        "added": added,
        "replaced": replaced,
        "classes": {n: _load_connector(registry[n]) for n in added + replaced},
    }
    missing = set()
    for entry in rep["plugins"]:
        for err in (entry["error"], entry.get("class_import", {}).get("error", "")):
            if err.startswith("ModuleNotFoundError: No module named "):
                missing.add(err.split("'")[1])
    for c in rep["connectors"]["classes"].values():
        if c["error"].startswith("ModuleNotFoundError: No module named "):
            missing.add(c["error"].split("'")[1])
        missing.update(c.get("missing", ()))
    for entry in rep["plugins"]:
        missing.update(entry.get("class_import", {}).get("missing", ()))
    rep["missing_modules"] = sorted(missing)
    return rep


def main(argv: list[str]) -> int:
    # vllm logs to stdout by default: keep fd 1 for our JSON only.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    setup = _prepare_import()
    if argv[1:2] == ["--ascend"]:
        json.dump(ascend_report(setup), out, indent=1)
        out.write("\n")
        out.flush()
        return 0
    v = _Vllm(setup)
    if argv[1:2] == ["--info"]:
        json.dump(v.info(), out)
        out.write("\n")
        out.flush()
        return 0
    items = json.load(sys.stdin)
    if not isinstance(items, list):
        raise SystemExit("stdin must be a JSON list of {id, argv, env}")
    results = [check_item(v, it if isinstance(it, dict) else {}) for it in items]
    if argv[1:2] == ["--with-info"]:
        json.dump({"info": v.info(), "results": results}, out, indent=1)
    else:
        json.dump(results, out, indent=1)
    out.write("\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
