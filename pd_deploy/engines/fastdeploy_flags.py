"""FastDeploy 2.x command-line flags (Python argparse) and a checker for planned argv.

FastDeploy's own parser cannot run here: ``fastdeploy.engine.args_utils`` imports
``fastdeploy.config``, which imports paddle. So the flags were read from the sources and
written down as tables. Each table maps a flag's primary option string to a ``Flag``: its
option strings, kind, default and (for a choice or a list) what argparse checks. The help
texts are not copied. A default is the ``repr()`` of the ``default=`` value in the source,
with ``EngineArgs.<field>`` resolved to the dataclass value. (argparse runs ``type`` over a
default only when the default is a string.)

Sources: the file index of github.com/PaddlePaddle/FastDeploy (its git snapshot is from
2024, FastDeploy 1.x), read at these commits:

* ``FASTDEPLOY_2`` is the flag set of ``python -m fastdeploy.entrypoints.openai.api_server``.
  That module builds its parser as ``make_arg_parser(FlexibleArgumentParser())``
  (api_server.py@a2bd99e5020891ad7ea09ec6d02f4758ae369596). The table has 112 flags:
  - fastdeploy/entrypoints/openai/utils.py@00dc2b04fd022fb0e9aae313b468be414b77c534,
    ``make_arg_parser``: 11 flags, from ``--port`` to ``--api-key``.
  - fastdeploy/engine/args_utils.py@0009064e6f6ed105cfa5d39c4a52021251e275a2 (the newer
    commit), ``EngineArgs.add_cli_args``: 100 flags.
  - fastdeploy/utils.py@04e4dc19253253be21525c871a201d00e8e5311d (also
    f5b2f4635ef8422776a0a21464319732d81cc139, the same code), ``FlexibleArgumentParser``:
    ``--config`` (a YAML file of flag values), read by a second parser before the main one.
* The older commit, fastdeploy/engine/args_utils.py@ab0b6aa5d78c43ad273cf4eef25a3a206b78ffb9,
  defines 87 of those 100 EngineArgs flags. It lacks the 13 in ``NOT_IN_AB0B6AA5``, and three
  of its defaults differ (``AB0B6AA5_DEFAULTS``). ``table_for(version="ab0b6aa5")`` pairs it
  with the same make_arg_parser. That pairing is an assumption (UNVERIFIED): the index holds
  no copy of utils.py or api_server.py at that commit. The older ``__post_init__`` also makes
  ``--rdma-comm-ports`` mandatory for a prefill or decode role that uses rdma. The count must
  then be tp * dp / nnodes, or it raises ValueError. ``check_argv`` does not check flags
  against each other, so it does not check this.
* ``FD_ROUTER_PY``: ``python -m fastdeploy.router.launch``. Sources:
  fastdeploy/router/launch.py@177cb1407118ef2ed2a6dafe38ff56ed057d65a0 (a
  FlexibleArgumentParser, so ``--config`` too) and ``RouterArgs.add_cli_args`` in
  fastdeploy/router/router.py@029e4cf8b039288f02d9e8b9fea115a73e44a3f4. 5 flags.
* ``FD_ROUTER_GO``: ``python -m fastdeploy.golang_router.launch``. Source: ``build_arg_parser``
  in fastdeploy/golang_router/launch.py@48ecd161d8d2f4a580b456581a105962e42aabd9, a plain
  argparse parser with no ``--config``. 4 flags. The launcher passes them on to the
  ``fd-router`` binary,
  fastdeploy/golang_router/cmd/main.go@03850e3fe389ea189029faf70c17b9fd02283171.
  That binary uses Go's ``flag`` package and defines config_path, port, splitwise, version
  and V. Go's flag accepts ``--name value``, ``--name=value`` and a bare bool flag, so an
  argv that passes this table is valid for the binary too.
* ``REMOVED``: flags that guides or earlier versions use, but that neither args_utils.py
  commit defines.

Checks that FastDeploy makes after argparse. With ``post_parse=True``, ``check_argv``
applies them too, and each message names where the check is made:
* ``--splitwise-role`` must be mixed, prefill or decode: an assert in ``FDConfig.check``
  (fastdeploy/config.py@0009064e). argparse takes any string here.
* ``--scheduler-name`` must be local, global, splitwise or dp: ``SchedulerConfig.check``
  (fastdeploy/scheduler/config.py@021ebe9e4f2bcd2d6d9554c1cfea5ce2eedc813c).
* ``--guided-decoding-backend`` must be auto, xgrammar, XGrammar, guidance or off:
  ``FDConfig.check`` (config.py@0009064e).
* The port-list flags keep strings at parse time, and FastDeploy turns them into ints
  later. A pd-deploy rule (not FastDeploy's) asks every port to be an int in 1..65535, and
  every ``--cache-transfer-protocol`` item to be ipc or rdma. ``FDConfig.init_cache_info``
  splits that string on ',' and ignores any other word.

How ``check_argv`` follows argparse (Python 3.10/3.11 ``_parse_optional`` and
``consume_optional``):
* ``--flag value`` and ``--flag=value`` (split at the first '='). ``-tp 4`` and ``-tp=4``
  work too.
* An item after a flag is read as its value unless it looks like a flag. An item looks like
  a flag if it starts with '-', and it is not '-', not a negative number, and has no space.
* A switch takes no value. ``nargs='+'`` takes every following value.
* Items left over are positional, and these parsers define no positional arguments.

It is stricter than argparse in four places, and reports each as an error:
* a bare ``--`` (argparse reads the items after it as positional and rejects them; it
  ignores a ``--`` at the very end);
* a flag given twice (argparse keeps the last; the repeatable ``action='append'`` flag
  ``--api-key`` is the exception);
* an abbreviation. FlexibleArgumentParser leaves ``allow_abbrev`` on, so FastDeploy would
  accept ``--scheduler-top``. The planner never abbreviates, and a prefix can become
  ambiguous when a release adds a flag;
* a flag in ``REMOVED`` (argparse says "unrecognized arguments"; we say what replaced it).

FlexibleArgumentParser does NOT turn '_' into '-' (vLLM's does), so ``--tensor_parallel_size``
is unknown. argparse's own ``-h/--help`` is not in the tables. Standard library only.
"""
from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, replace
from typing import Mapping, Optional, Sequence

KINDS = ("int", "float", "str", "json", "bool-switch", "choice", "list")
#: how a "list" flag takes its items
LIST_FORMS = (
    "comma-split",  # type=lambda s: s.split(",") -> argparse stores a list
    "comma-string",  # type=str -> stored as one string, split on ',' later by FastDeploy
    "nargs+",  # nargs="+" -> one or more separate argv items
)
PROGRAMS = ("api_server", "router", "golang_router")
#: version names table_for accepts for api_server ("2" is the newer commit)
API_SERVER_VERSIONS = ("2", "0009064e", "ab0b6aa5")


@dataclass(frozen=True)
class Flag:
    """One argparse argument.

    options: every option string argparse registers for it, the primary one first. A
    BooleanOptionalAction switch also lists its ``--no-`` form, which is named in `negation`.
    kind: one of KINDS. default: repr() of the source default.
    choices / choices_checked: allowed values, and who checks them: "argparse" (choices=),
    or the FastDeploy function that checks them after parsing, e.g. "FDConfig.check"
    (argparse itself takes any string there).
    list_form / item_kind: for kind "list", one of LIST_FORMS and "int" or "str". That is
    the type argparse converts each item to; "int" items are checked at parse time.
    repeatable: action="append". post: an extra check after parsing: "port", "ports"
    (every item a port number) or "protocols" (items ipc/rdma); see the module docstring.
    """

    options: tuple[str, ...]
    kind: str
    default: str
    choices: tuple[str, ...] = ()
    choices_checked: str = ""
    list_form: str = ""
    item_kind: str = ""
    negation: str = ""
    repeatable: bool = False
    deprecated: bool = False
    post: str = ""
    note: str = ""

    @property
    def name(self) -> str:
        return self.options[0]

    @property
    def takes_value(self) -> bool:
        return self.kind != "bool-switch"


FlagTable = dict[str, Flag]


def _table(*flags: Flag) -> dict[str, Flag]:
    table: dict[str, Flag] = {}
    for flag in flags:
        assert flag.kind in KINDS, flag
        assert flag.name not in table, flag.name
        table[flag.name] = flag
    return table


def _int(option: str, default: str, *more: str, post: str = "", note: str = "") -> Flag:
    return Flag((option, *more), "int", default, post=post, note=note)


def _float(option: str, default: str) -> Flag:
    return Flag((option,), "float", default)


def _str(option: str, default: str = "None", *, note: str = "", post: str = "",
         repeatable: bool = False) -> Flag:
    return Flag((option,), "str", default, note=note, post=post, repeatable=repeatable)


def _json(option: str) -> Flag:
    return Flag((option,), "json", "None")


def _switch(option: str, default: str = "False", *, negatable: bool = False,
            deprecated: bool = False) -> Flag:
    """store_true (default False), BooleanOptionalAction (negatable) or a nargs=0 action."""
    if negatable:
        negation = "--no-" + option[2:]
        return Flag((option, negation), "bool-switch", default, negation=negation)
    return Flag((option,), "bool-switch", default, deprecated=deprecated)


def _choice(option: str, default: str, choices: Sequence[str], checked: str) -> Flag:
    return Flag((option,), "choice", default, choices=tuple(choices), choices_checked=checked)


def _list(option: str, default: str, form: str, item_kind: str = "str", *, post: str = "",
          note: str = "") -> Flag:
    assert form in LIST_FORMS, form
    return Flag((option,), "list", default, list_form=form, item_kind=item_kind, post=post,
                note=note)


ROLES = ("mixed", "prefill", "decode")  # FDConfig.check
SCHEDULERS = ("local", "global", "splitwise", "dp")  # SchedulerConfig.check
PROTOCOLS = ("ipc", "rdma")  # FDConfig.init_cache_info
_ARGPARSE = "argparse"

# utils.py@00dc2b04 make_arg_parser, then FlexibleArgumentParser's --config (utils.py@04e4dc19)
_API_SERVER_OWN = (
    _int("--port", "8000", post="port", note="the HTTP API port"),
    _str("--host", "'0.0.0.0'"),
    _int("--workers", "4", note="1 when FD_ENABLE_MULTI_API_SERVER=1"),
    _int("--metrics-port", "None", post="port", note="None: served on --port"),
    _int("--controller-port", "-1"),
    _int("--max-waiting-time", "-1"),
    _int("--max-concurrency", "2048", note="512 when FD_ENABLE_MULTI_API_SERVER=1"),
    _switch("--enable-mm-output"),
    _int("--timeout-graceful-shutdown", "0"),
    _int("--timeout", "0"),
    _str("--api-key", repeatable=True, note="action='append'; FD_API_KEY env also works"),
    _str("--config", note="YAML file of flag values (FlexibleArgumentParser, utils.py)"),
)

# args_utils.py@0009064e EngineArgs.add_cli_args, in source order
_ENGINE_ARGS = (
    # Model Configuration
    _str("--model", "'baidu/ernie-45-turbo'"),
    _str("--served-model-name"),
    _str("--revision", "'master'"),
    _str("--model-config-name", "'config.json'"),
    _str("--tokenizer"),
    _str("--tokenizer-base-url"),
    _int("--max-model-len", "2048"),
    _int("--block-size", "64"),
    _str("--task", "'generate'"),
    _str("--runner", "'auto'"),
    _str("--convert", "'auto'"),
    _json("--override-pooler-config"),
    _int("--use-warmup", "0"),
    _json("--limit-mm-per-prompt"),
    _json("--mm-processor-kwargs"),
    _int("--max-encoder-cache", "-1"),
    _float("--max-processor-cache", "-1"),
    _switch("--enable-mm", deprecated=True),
    _str("--reasoning-parser"),
    _str("--chat-template"),
    _str("--tool-call-parser"),
    _str("--tool-parser-plugin"),
    _json("--speculative-config"),
    _switch("--dynamic-load-weight"),
    _str("--load-strategy", "'normal'"),
    _json("--rsync-config"),
    _list("--engine-worker-queue-port", "None", "comma-split", post="ports",
          note="one port per local DP rank"),
    _str("--quantization", note="parse_quantization: a JSON object, else a name like wint4"),
    _json("--graph-optimization-config"),
    _json("--plas-attention-config"),
    _choice("--guided-decoding-backend", "'off'",
            ("auto", "xgrammar", "XGrammar", "guidance", "off"), "FDConfig.check"),
    _str("--guided-decoding-disable-any-whitespace", "False",
         note="type=str: any non-empty value is true"),
    _switch("--enable-logprob"),
    _switch("--enable-keep-sampling-mask"),
    _int("--max-logprobs", "20"),
    _choice("--logprobs-mode", "'raw_logprobs'",
            ("raw_logprobs", "raw_logits", "processed_logprobs", "processed_logits"), _ARGPARSE),
    _int("--seed", "0"),
    _switch("--enable-early-stop"),
    _json("--early-stop-config"),
    _switch("--lm_head-fp32"),
    _list("--logits-processors", "None", "nargs+"),
    _switch("--enable-entropy"),
    _choice("--model-impl", "'auto'", ("auto", "fastdeploy", "paddleformers"), _ARGPARSE),
    # Parallel Configuration
    _int("--tensor-parallel-size", "1", "-tp"),
    _switch("--disable-custom-all-reduce"),
    _switch("--enable-flashinfer-allreduce-fusion"),
    _switch("--use-internode-ll-two-stage"),
    _switch("--disable-sequence-parallel-moe"),
    _int("--max-num-seqs", "8"),
    _int("--num-gpu-blocks-override", "None"),
    _int("--max-num-batched-tokens", "None"),
    _float("--gpu-memory-utilization", "0.9"),
    _int("--data-parallel-size", "1"),
    _int("--local-data-parallel-id", "0"),
    _switch("--enable-expert-parallel"),
    _switch("--enable-eplb"),
    _json("--eplb-config"),
    _json("--routing-replay-config"),
    _switch("--enable-chunked-moe"),
    _int("--chunked-moe-size", "256"),
    _switch("--shutdown-comm-group-if-worker-idle", "None", negatable=True),
    # Load Configuration
    _str("--load-choices", "'default_v1'"),
    # Cache Configuration
    _float("--kv-cache-ratio", "0.75"),
    _float("--swap-space", "None"),
    _int("--prealloc-dec-block-slot-num-threshold", "12"),
    _list("--cache-queue-port", "None", "comma-split", "int", post="ports",
          note="one port per local DP rank"),
    _int("--static-decode-blocks", "2"),
    _choice("--kvcache-storage-backend", "None", ("mooncake", "attention_store", "file"),
            _ARGPARSE),
    _choice("--write-policy", "'write_through'", ("write_through",), _ARGPARSE),
    # System Configuration
    _list("--ips", "None", "comma-split", note="multi-node: the first IP is the master"),
    # Performance Tuning
    _switch("--enable-prefix-caching", "True", negatable=True),
    _switch("--enable-output-caching", "True", negatable=True),
    _switch("--enable-chunked-prefill"),
    _int("--max-num-partial-prefills", "1"),
    _int("--max-long-partial-prefills", "1"),
    _int("--long-prefill-token-threshold", "0"),
    # Splitwise Deployment (and one more Performance Tuning flag, as in the source)
    _choice("--splitwise-role", "'mixed'", ROLES, "FDConfig.check"),
    _list("--cache-transfer-protocol", "'ipc,rdma'", "comma-string", post="protocols"),
    _list("--pd-comm-port", "None", "comma-split", post="ports",
          note="one port per local DP rank"),
    _list("--rdma-comm-ports", "None", "comma-split", post="ports",
          note="tp * dp / nnodes ports"),
    _switch("--disable-chunked-mm-input"),
    # Router
    _str("--router", note="ip:port of the v1 router; http:// is prepended"),
    # Scheduler
    _choice("--scheduler-name", "'local'", SCHEDULERS, "SchedulerConfig.check"),
    _int("--scheduler-max-size", "-1"),
    _int("--scheduler-ttl", "900"),
    _str("--scheduler-host", "'127.0.0.1'"),
    _int("--scheduler-port", "6379", post="port"),
    _int("--scheduler-db", "0"),
    _str("--scheduler-password"),
    _str("--scheduler-topic", "'default'"),
    _float("--scheduler-min-load-score", "3"),
    _int("--scheduler-load-shards-num", "1"),
    _int("--scheduler-sync-period", "5"),
    _int("--scheduler-expire-period", "3000"),
    _int("--scheduler-release-load-expire-period", "600"),
    _int("--scheduler-reader-parallel", "4"),
    _int("--scheduler-writer-parallel", "4"),
    _int("--scheduler-reader-batch-size", "200"),
    _int("--scheduler-writer-batch-size", "200"),
    _switch("--enable-overlap-schedule"),
)

#: api_server of the newer commit: make_arg_parser@00dc2b04 + EngineArgs@0009064e + --config
FASTDEPLOY_2: dict[str, Flag] = _table(*_API_SERVER_OWN, *_ENGINE_ARGS)

#: EngineArgs flags of FASTDEPLOY_2 that args_utils.py@ab0b6aa5 does not define
NOT_IN_AB0B6AA5: frozenset[str] = frozenset({
    "--rsync-config", "--enable-keep-sampling-mask", "--enable-entropy", "--model-impl",
    "--enable-flashinfer-allreduce-fusion", "--routing-replay-config", "--enable-chunked-moe",
    "--chunked-moe-size", "--shutdown-comm-group-if-worker-idle", "--kvcache-storage-backend",
    "--write-policy", "--enable-output-caching", "--enable-overlap-schedule",
})
#: defaults that differ at args_utils.py@ab0b6aa5 (the dataclass field values)
AB0B6AA5_DEFAULTS: dict[str, str] = {
    "--engine-worker-queue-port": "'0'",
    "--cache-queue-port": "'0'",
    "--cache-transfer-protocol": "'ipc'",
}


@dataclass(frozen=True)
class Removed:
    """A flag that FastDeploy 2.x (both commits read) no longer defines."""

    seen_in: str
    replacement: str


_PD_PEERS = ("--router <ip:port> (v1: prefill and decode register with the router), or "
             "--scheduler-name splitwise with --scheduler-host/--scheduler-port/"
             "--scheduler-topic (v0, Redis)")
REMOVED: dict[str, Removed] = {
    "--innode-prefill-ports": Removed(
        "an earlier FastDeploy 2.x args_utils.py (EngineArgs.innode_prefill_ports; file index "
        "id 54487964863, its commit not shown) and the single-host PD docs", _PD_PEERS),
    "--inner-prefill-ports": Removed(
        "the FastDeploy PD guide only (docs/zh/features/disaggregated.md, single-host "
        "parameters); no parser read defines it", _PD_PEERS),
    "--use-cudagraph": Removed(
        "an earlier FastDeploy 2.x args_utils.py (file index id 54487964863)",
        "none recorded here (graph options now go in the --graph-optimization-config JSON; "
        "its keys were not checked)"),
}

#: python -m fastdeploy.router.launch (router/launch.py@177cb140 + RouterArgs@029e4cf8)
FD_ROUTER_PY: dict[str, Flag] = _table(
    _str("--host", "'0.0.0.0'"),
    _int("--port", "9000", post="port"),
    _switch("--splitwise"),
    _int("--request-timeout-secs", "1800"),
    _str("--config", note="YAML file of flag values (FlexibleArgumentParser, utils.py)"),
)

#: python -m fastdeploy.golang_router.launch (golang_router/launch.py@48ecd161)
FD_ROUTER_GO: dict[str, Flag] = _table(
    _str("--port", "''", post="port", note="'' -> the config file's port, else 9000"),
    _switch("--splitwise"),
    _str("--config_path", "''", note="router config YAML"),
    Flag(("--version", "-V"), "bool-switch", "False", note="prints the version and exits"),
)


def table_for(program: str = "api_server", version: str = "2") -> dict[str, Flag]:
    """The flags of `program` at `version`: a fresh dict, primary option string -> Flag.

    program: "api_server" (fastdeploy.entrypoints.openai.api_server), "router" (the Python
    router, fastdeploy.router.launch) or "golang_router" (fastdeploy.golang_router.launch,
    the fd-router wrapper). version for api_server: "2" or "0009064e" (args_utils.py at the
    newer commit) or "ab0b6aa5" (the older commit). Routers: "2". Anything else raises
    ValueError.
    """
    if program == "api_server":
        if version in ("2", "0009064e"):
            return dict(FASTDEPLOY_2)
        if version == "ab0b6aa5":
            return {name: replace(flag, default=AB0B6AA5_DEFAULTS.get(name, flag.default))
                    for name, flag in FASTDEPLOY_2.items() if name not in NOT_IN_AB0B6AA5}
        raise ValueError(f"no api_server flag table for version {version!r} "
                         f"(known: {', '.join(API_SERVER_VERSIONS)})")
    if program in ("router", "golang_router"):
        if version != "2":
            raise ValueError(f"no {program} flag table for version {version!r} (known: '2')")
        return dict(FD_ROUTER_PY if program == "router" else FD_ROUTER_GO)
    raise ValueError(f"unknown program {program!r}: expected one of {', '.join(PROGRAMS)}")


# --- the checker --------------------------------------------------------------------------

_NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")  # argparse's _negative_number_matcher


def _options(table: Mapping[str, Flag]) -> dict[str, str]:
    """Every option string -> the primary option string of its flag."""
    return {option: name for name, flag in table.items() for option in flag.options}


def _looks_like_flag(item: str, options: Mapping[str, str]) -> bool:
    """argparse's _parse_optional: would it read `item` as an option ('O'), not a value?"""
    if not item.startswith("-") or item == "-":
        return False
    if item in options or item.split("=", 1)[0] in options:
        return True
    if _NEGATIVE_NUMBER.match(item):  # no option string of ours looks like a number
        return False
    return " " not in item


def _bad_value(flag: Flag, value: str) -> Optional[str]:
    """Why argparse itself rejects `value` for `flag` (its `type` or `choices`), or None."""
    try:
        if flag.kind == "int":
            int(value)
        elif flag.kind == "float":
            float(value)
        elif flag.kind == "json":
            json.loads(value)
        elif flag.kind == "list" and flag.item_kind == "int" and value:
            for item in value.split(","):
                int(item.strip())
    except ValueError:
        what = {"int": "an int", "float": "a float", "json": "JSON"}.get(
            flag.kind, "a comma-separated list of ints")
        return f"is not {what} (argparse: invalid value)"
    if flag.kind == "choice" and flag.choices_checked == _ARGPARSE and value not in flag.choices:
        return f"is not one of {', '.join(flag.choices)} (argparse: invalid choice)"
    return None


def _port_ok(text: str) -> bool:
    try:
        return 1 <= int(text) <= 65535
    except ValueError:
        return False


def _bad_after_parse(flag: Flag, value: str) -> Optional[str]:
    """Why FastDeploy (or a pd-deploy rule, as marked) rejects `value` after argparse."""
    if flag.kind == "choice" and flag.choices_checked != _ARGPARSE and value not in flag.choices:
        return (f"is not one of {', '.join(flag.choices)}: argparse takes it, but FastDeploy "
                f"rejects it after parsing ({flag.choices_checked})")
    if flag.post == "port" and not _port_ok(value):
        return "is not a TCP port in 1..65535 (pd-deploy rule)"
    if flag.post == "ports" and value:  # "" is None: FastDeploy picks free ports
        bad = [item for item in value.split(",") if not _port_ok(item.strip())]
        if bad:
            return (f"has items that are not TCP ports in 1..65535: {bad!r} (FastDeploy uses "
                    f"each item as an int port; write p1,p2,...)")
    if flag.post == "protocols":
        bad = [item for item in value.split(",") if item not in PROTOCOLS]
        if bad:
            return (f"has items other than {' or '.join(PROTOCOLS)}: {bad!r} "
                    f"(FDConfig.init_cache_info ignores them)")
    return None


def _unknown(option: str, options: Mapping[str, str]) -> str:
    if option.replace("_", "-") in options and option.startswith("--"):
        return (f"{option}: unknown flag (FastDeploy's parser does not read '_' as '-'; "
                f"write {option.replace('_', '-')})")
    close = difflib.get_close_matches(option, list(options), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"{option}: unknown flag{hint}"


def check_argv(argv: Sequence[str], table: Mapping[str, Flag], *, post_parse: bool = True,
               removed: Optional[Mapping[str, Removed]] = None) -> list[str]:
    """Errors in `argv` (the items after the program) for a parser with `table` (see
    table_for). One message per problem, each naming the flag; [] if argv is good.

    post_parse: also apply the checks FastDeploy makes after argparse, plus the pd-deploy
    port and protocol rules (see the module docstring). removed: the removed flags to name;
    REMOVED by default.
    """
    removed = REMOVED if removed is None else removed
    options = _options(table)
    errors: list[str] = []
    given: dict[str, str] = {}
    last_switch: Optional[str] = None
    i, n = 0, len(argv)

    def values_after(start: int) -> int:
        """The index after the run of value items that starts at `start`."""
        end = start
        while end < n and argv[end] != "--" and not _looks_like_flag(argv[end], options):
            end += 1
        return end

    while i < n:
        item = argv[i]
        i += 1
        after_switch, last_switch = last_switch, None
        if item == "--":
            errors.append(f"'--': argparse reads the {n - i} item(s) after it as positional "
                          f"arguments, which this parser does not take" if i < n else
                          "'--': a bare '--' at the end does nothing; drop it")
            break
        if not _looks_like_flag(item, options):
            hint = (f"; {after_switch} is a switch and takes no value" if after_switch
                    else "")
            errors.append(f"{item!r}: stray argument (the parser takes no positional "
                          f"arguments{hint})")
            continue
        option, has_value, value = (item, "", "") if item in options else item.partition("=")
        name = options.get(option)
        if name is None:
            prefix_of = sorted(o for o in options if o.startswith(option))
            if option in removed:
                gone = removed[option]
                errors.append(f"{option}: removed from FastDeploy 2.x; use {gone.replacement}. "
                              f"(It was in {gone.seen_in}.)")
            elif len(prefix_of) == 1:
                errors.append(f"{option}: abbreviated flag; argparse would read it as "
                              f"{prefix_of[0]}, but write the full name")
                target = table[options[prefix_of[0]]]
                if not has_value and target.takes_value:  # skip its value, as argparse would
                    end = values_after(i)
                    i = end if target.list_form == "nargs+" else min(end, i + 1)
                continue
            elif prefix_of:
                errors.append(f"{option}: abbreviated and ambiguous flag (it could be "
                              f"{', '.join(prefix_of)}); write the full name")
            else:
                errors.append(_unknown(option, options))
            if not has_value:
                i = values_after(i)  # argparse lists them as unrecognized along with it
            continue

        flag = table[name]
        values: list[str] = []
        if not flag.takes_value:
            if has_value:
                errors.append(f"{option}: a switch takes no value (got {item!r}; argparse: "
                              f"ignored explicit argument)")
                continue
            last_switch = option
        elif has_value:
            values = [value]
        else:
            end = values_after(i)
            if flag.list_form == "nargs+":
                values, i = list(argv[i:end]), end
            elif end > i:
                values, i = [argv[i]], i + 1
            if not values:
                nxt = f"the next item {argv[i]!r} is a flag" if i < n else "nothing follows"
                errors.append(f"{option}: expects a value, but {nxt} (write {option}=VALUE)")
                continue
        shown = " ".join([option, *values]) if not has_value else item
        if name in given and not flag.repeatable:
            errors.append(f"{option}: given twice ({given[name]!r}, then {shown!r}); argparse "
                          f"would keep the last")
        given.setdefault(name, shown)
        for v in values:
            reason = _bad_value(flag, v)
            if reason is None and post_parse:
                reason = _bad_after_parse(flag, v)
            if reason is not None:
                errors.append(f"{option} {v!r}: {reason}")
    return errors
