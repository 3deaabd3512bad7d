"""The ``serve`` argv: the flags the emulator models, vLLM's others accepted and ignored.

Unknown flags are removed before argparse sees them (so a model path or value is
never mistaken for another): ``--flag=value`` is one token; ``--flag value``
takes the next token as its value unless the flag is boolean (``--no-*``,
``--enable-*``, ``--disable-*`` or a known vLLM switch) or the next token is
itself a flag. Underscores in flag names are accepted as vLLM does.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .kvconfig import (  # noqa: F401  (re-exported)
    DEFAULT_KV_PORT,
    DEFAULT_NIXL_PORT,
    MOONCAKE_PULL,
    KVConfig,
    StartupError,
    check_mooncake,
    validate_kv,
)

PROG = "python -m pd_launcher.emulator serve"

# Flags the emulator uses: name -> short aliases
_VALUE_FLAGS = {
    "--model": (),
    "--host": (),
    "--port": (),
    "--served-model-name": (),
    "--api-key": (),
    "--max-num-seqs": (),
    "--max-model-len": (),
    "--tensor-parallel-size": ("-tp",),
    "--data-parallel-size": ("-dp",),
    "--data-parallel-rank": ("-dpn",),
    "--data-parallel-size-local": ("-dpl",),
    "--data-parallel-start-rank": ("-dpr",),
    "--data-parallel-address": ("-dpa",),
    "--data-parallel-rpc-port": ("-dpp",),
    "--kv-transfer-config": (),
}
_BOOL_FLAGS = {"--headless": (), "--help": ("-h",)}
_KNOWN = {a: n for n, al in {**_VALUE_FLAGS, **_BOOL_FLAGS}.items() for a in (n,) + al}

# vLLM switches that take no value and do not follow the --enable-/--disable-/--no- pattern.
_VLLM_SWITCHES = {
    "--enforce-eager", "--trust-remote-code", "--skip-tokenizer-init", "--async-scheduling",
    "--return-tokens-as-token-ids", "--allow-credentials", "--use-v2-block-manager",
    "--fully-sharded-loras", "--worker-use-ray", "--ray-workers-use-nsight",
    "--aggregate-engine-logging", "--calculate-kv-scales", "--multi-step-stream-outputs",
    "--api-server-count-auto", "--show-hidden-metrics-for-version-auto",
}

@dataclass
class EngineArgs:
    model: str
    host: Optional[str]
    port: int
    served_model_names: List[str]
    api_key: Optional[str]
    max_num_seqs: int
    max_model_len: int
    tp: int
    dp: int
    dp_rank: Optional[int]
    dp_size_local: Optional[int]
    dp_start_rank: Optional[int]
    dp_address: str
    dp_rpc_port: int
    headless: bool
    kv: Optional[KVConfig]
    ignored: List[str] = field(default_factory=list)
    # derived
    ranks: List[int] = field(default_factory=list)  # global DP ranks hosted by this process
    dp_mode: str = "single"  # single | external | internal
    kv_host: str = "127.0.0.1"
    kv_ports: List[int] = field(default_factory=list)  # one per hosted rank (empty: no connector)

    @property
    def served_name(self) -> str:
        return self.served_model_names[0]

    @property
    def dp_master(self) -> bool:
        """This process runs the DP rendezvous listener."""
        return self.dp > 1 and not self.headless and (self.ranks[0] == 0)

    def rank_engine_id(self, rank: int) -> str:
        assert self.kv is not None
        return f"{self.kv.engine_id}_dp{rank}" if self.dp > 1 else self.kv.engine_id

    def describe(self) -> str:
        role = self.kv.role if self.kv else "aggregated"
        if self.dp_mode == "single":
            where = "single rank"
        else:
            where = f"{self.dp_mode} DP, ranks {self.ranks} of {self.dp}"
        head = "headless " if self.headless else ""
        return f"{head}{role}, {where}"


def _pos_int(minimum: int):
    def conv(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return conv


def _port(text: str) -> int:
    value = _pos_int(0)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"port out of range: {value}")
    return value


def _human_int(text: str) -> int:
    """vLLM's human-readable ints: 1000, 1k (=1000), 1K (=1024), 1m, 1M, 1g, 1G; -1 = auto."""
    m = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid human-readable int: {text!r}")
    number, suffix = float(m.group(1)), m.group(2)
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "K": 2**10, "M": 2**20, "G": 2**30}
    value = int(number * scale[suffix])
    if value == -1:
        return -1
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (or -1), got {text!r}")
    return value


def _json_obj(text: str) -> Dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"invalid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, add_help=True, allow_abbrev=False)
    p.add_argument("model_tag", nargs="?", help="model path or name")
    p.add_argument("--model", dest="model_flag")
    p.add_argument("--host")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--served-model-name", nargs="+")
    p.add_argument("--api-key")
    p.add_argument("--max-num-seqs", type=_pos_int(1), default=256)
    p.add_argument("--max-model-len", type=_human_int, default=8192)
    p.add_argument("--tensor-parallel-size", "-tp", type=_pos_int(1), default=1)
    p.add_argument("--data-parallel-size", "-dp", type=_pos_int(1), default=1)
    p.add_argument("--data-parallel-rank", "-dpn", type=_pos_int(0))
    p.add_argument("--data-parallel-size-local", "-dpl", type=_pos_int(1))
    p.add_argument("--data-parallel-start-rank", "-dpr", type=_pos_int(0))
    p.add_argument("--data-parallel-address", "-dpa")
    p.add_argument("--data-parallel-rpc-port", "-dpp", type=_port, default=29550)
    p.add_argument("--headless", action="store_true")
    p.add_argument("--kv-transfer-config", type=_json_obj)
    return p


def _is_flag(tok: str) -> bool:
    return tok.startswith("-") and not re.fullmatch(r"-\d+(\.\d+)?", tok) and tok != "-"


def _norm(tok: str) -> str:
    """``--max_num_seqs=4`` -> ``--max-num-seqs=4`` (only the name, up to '=' or '.')."""
    if not tok.startswith("--"):
        return tok
    name, sep, rest = tok.partition("=")
    head, dot, tail = name.partition(".")
    return head.replace("_", "-") + dot + tail + sep + rest


def split_argv(argv: Sequence[str]) -> Tuple[List[str], List[str], Dict[str, Any]]:
    """(argv for our parser, ignored flags as written, dotted kv-transfer-config keys)."""
    keep: List[str] = []
    ignored: List[str] = []
    dotted: Dict[str, Any] = {}
    toks = list(argv)
    i = 0
    while i < len(toks):
        tok = _norm(toks[i])
        i += 1
        if not _is_flag(tok):
            keep.append(tok)
            continue
        name, has_eq, value = tok.partition("=")
        if name.startswith("--kv-transfer-config."):
            if not has_eq:
                if i >= len(toks):
                    raise _ArgvError(f"argument {name}: expected one argument")
                value, i = toks[i], i + 1
            dotted[name[len("--kv-transfer-config."):]] = value
            continue
        if name in _KNOWN:
            keep.append(tok)
            if name in _VALUE_FLAGS or _KNOWN[name] in _VALUE_FLAGS:
                canonical = _KNOWN[name]
                if not has_eq:
                    # served-model-name takes one or more values
                    while i < len(toks) and not _is_flag(toks[i]):
                        keep.append(toks[i])
                        i += 1
                        if canonical != "--served-model-name":
                            break
            continue
        if has_eq or _is_switch(name) or i >= len(toks) or _is_flag(toks[i]):
            ignored.append(tok)
        else:
            ignored.append(f"{tok} {toks[i]}")
            i += 1
    return keep, ignored, dotted


def _is_switch(name: str) -> bool:
    return (
        name in _VLLM_SWITCHES
        or name.startswith(("--no-", "--enable-", "--disable-"))
        or not name.startswith("--")
    )


class _ArgvError(Exception):
    pass


def _dotted_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _derive(ns: argparse.Namespace, kv: Optional[KVConfig], env: Mapping[str, str],
            err) -> EngineArgs:
    model = ns.model_tag or ns.model_flag
    if not model:
        err("the following arguments are required: model_tag")
    dp = ns.data_parallel_size
    a = EngineArgs(
        model=model,
        host=ns.host,
        port=ns.port,
        served_model_names=ns.served_model_name or [model],
        api_key=ns.api_key or env.get("VLLM_API_KEY") or None,
        max_num_seqs=ns.max_num_seqs,
        max_model_len=8192 if ns.max_model_len == -1 else ns.max_model_len,
        tp=ns.tensor_parallel_size,
        dp=dp,
        dp_rank=ns.data_parallel_rank,
        dp_size_local=ns.data_parallel_size_local,
        dp_start_rank=ns.data_parallel_start_rank,
        dp_address=ns.data_parallel_address or "127.0.0.1",
        dp_rpc_port=ns.data_parallel_rpc_port,
        headless=ns.headless,
        kv=kv,
    )
    if a.dp_rank is not None:
        if a.dp_rank >= dp:
            err(f"--data-parallel-rank {a.dp_rank} must be < --data-parallel-size {dp}")
        if a.headless:
            err("--headless cannot be combined with --data-parallel-rank (external DP)")
        a.ranks = [a.dp_rank]
        a.dp_mode = "external" if dp > 1 else "single"
    else:
        start = a.dp_start_rank or 0
        local = a.dp_size_local if a.dp_size_local is not None else (dp - start)
        if start + local > dp:
            err(f"--data-parallel-start-rank {start} + --data-parallel-size-local {local} "
                f"exceeds --data-parallel-size {dp}")
        if local < 1:
            err("no data parallel rank left for this process")
        if start > 0 and not a.headless:
            err("--data-parallel-start-rank > 0 needs --headless (or use --data-parallel-rank)")
        a.ranks = list(range(start, start + local))
        a.dp_mode = "internal" if dp > 1 else "single"
    if kv is not None:
        # As the real connectors (vLLM 0.33 / vLLM-Ascend), from the GLOBAL DP rank:
        # NIXL listens on VLLM_NIXL_SIDE_CHANNEL_PORT + rank (one listener per engine),
        # Mooncake on kv_port + rank * tp (tp workers +0 .. +tp-1; we bind the first).
        nixl_port = env.get("VLLM_NIXL_SIDE_CHANNEL_PORT", "").strip()
        if kv.connector == "NixlConnector" or nixl_port:
            try:
                base = int(nixl_port) if nixl_port else DEFAULT_NIXL_PORT
            except ValueError:
                err(f"VLLM_NIXL_SIDE_CHANNEL_PORT={nixl_port!r} is not an integer")
            a.kv_ports = [base + r for r in a.ranks]
        elif kv.role == "kv_consumer" and kv.connector in MOONCAKE_PULL:
            a.kv_ports = []  # vLLM-Ascend: the decode pulls; only producers listen
        else:
            a.kv_ports = [kv.port + r * a.tp for r in a.ranks]
        if any(not 0 < p < 65536 for p in a.kv_ports):
            err(f"KV listen ports {a.kv_ports} out of range")
    a.kv_host = (
        env.get("VLLM_NIXL_SIDE_CHANNEL_HOST", "").strip()
        or a.host
        or a.dp_address
    )
    return a


def parse(argv: Sequence[str], env: Optional[Mapping[str, str]] = None) -> EngineArgs:
    """Parse ``serve`` argv (without the word ``serve``). Exits 2 on a malformed value."""
    env = os.environ if env is None else env
    parser = _parser()
    try:
        keep, ignored, dotted = split_argv(argv)
    except _ArgvError as exc:
        parser.error(str(exc))
    ns = parser.parse_args(keep)
    cfg = ns.kv_transfer_config
    if dotted:
        cfg = dict(cfg or {})
        for path, raw in dotted.items():
            node = cfg
            keys = path.split(".")
            for k in keys[:-1]:
                node = node.setdefault(k, {})
                if not isinstance(node, dict):
                    parser.error(f"--kv-transfer-config.{path}: {k} is not an object")
            node[keys[-1]] = _dotted_value(raw)
    kv = None
    if cfg is not None:
        try:
            kv = validate_kv(cfg)
        except ValueError as exc:
            parser.error(f"argument --kv-transfer-config: {exc}")
    args = _derive(ns, kv, env, parser.error)
    args.ignored = ignored
    return args


def main_parse(argv: Sequence[str]) -> EngineArgs:
    """``parse`` plus the vLLM-Ascend start-up checks (exit status 1)."""
    args = parse(argv)
    if args.kv is not None:
        try:
            check_mooncake(args.kv, args.tp, args.dp)
        except StartupError as exc:
            sys.stderr.write(f"{PROG}: error: {exc}\n")
            sys.exit(1)
    return args
