"""The FastDeploy 2.x argparse tables (pd_deploy.engines.fastdeploy_flags) and the argv checker."""
from __future__ import annotations

import argparse
import json
import shlex
from typing import Any, Callable

import pytest

from pd_deploy.engines import fastdeploy_flags as ff
from pd_deploy.engines.fastdeploy_flags import Flag, check_argv, table_for

API = table_for()  # api_server, args_utils.py@0009064e + make_arg_parser@00dc2b04
OLDER = table_for("api_server", "ab0b6aa5")

# The flags the planner emits, with the kind the source gives them.
PLANNED = {
    "--model": "str", "--port": "int", "--host": "str", "--metrics-port": "int",
    "--engine-worker-queue-port": "list", "--cache-queue-port": "list",
    "--tensor-parallel-size": "int", "--data-parallel-size": "int",
    "--local-data-parallel-id": "int", "--cache-transfer-protocol": "list",
    "--rdma-comm-ports": "list", "--pd-comm-port": "list", "--splitwise-role": "choice",
    "--router": "str", "--scheduler-name": "choice", "--scheduler-host": "str",
    "--scheduler-port": "int", "--scheduler-topic": "str", "--scheduler-ttl": "int",
    "--scheduler-password": "str", "--ips": "list", "--quantization": "str",
}

# The two commands of the FastDeploy PD guide (pd-guides/fastdeploy-disaggregated.md),
# copied verbatim. The decode command lacks the '\' after --scheduler-ttl 9000.
GUIDE_PREFILL = r"""
python -m fastdeploy.entrypoints.openai.api_server \
       --model ERNIE-4.5-300B-A47B-BF16 \
       --port 8180 --metrics-port 8181 \
       --engine-worker-queue-port 8182 \
       --cache-queue-port 8183 \
       --tensor-parallel-size 4 \
       --quantization wint4 \
       --cache-transfer-protocol "rdma,ipc" \
       --rdma-comm-ports "7671,7672,7673,7674" \
       --pd-comm-port "2334" \
       --splitwise-role "prefill" \
       --scheduler-name "splitwise" \
       --scheduler-host "127.0.0.1" \
       --scheduler-port 6379 \
       --scheduler-topic "test" \
       --scheduler-ttl 9000
"""
GUIDE_DECODE = r"""
python -m fastdeploy.entrypoints.openai.api_server \
       --model ERNIE-4.5-300B-A47B-BF16 \
       --port 8184 --metrics-port 8185 \
       --engine-worker-queue-port 8186 \
       --cache-queue-port 8187 \
       --tensor-parallel-size 4 \
       --quantization wint4 \
       --scheduler-name "splitwise" \
       --cache-transfer-protocol "rdma,ipc" \
       --rdma-comm-ports "7671,7672,7673,7674" \
       --pd-comm-port "2334" \
       --scheduler-host "127.0.0.1" \
       --scheduler-port 6379 \
       --scheduler-ttl 9000
       --scheduler-topic "test" \
       --splitwise-role "decode"
"""
PROGRAM = ["python", "-m", "fastdeploy.entrypoints.openai.api_server"]


def _shell_commands(script: str) -> list[list[str]]:
    """The commands bash runs for `script`: '\\'+newline joins lines, a newline ends one."""
    lines = script.replace("\\\n", " ").splitlines()
    return [shlex.split(line) for line in lines if line.strip()]


def _guide_argv(script: str) -> list[str]:
    """The argv the guide means: every flag of the command, the orphaned lines included."""
    commands = _shell_commands(script)
    assert commands[0][:3] == PROGRAM
    return [word for command in commands for word in command][3:]


def _one(errors: list[str]) -> str:
    assert len(errors) == 1, errors
    return errors[0]


# --- the tables ----------------------------------------------------------------------------

def test_table_sizes() -> None:
    assert len(ff.FASTDEPLOY_2) == 112  # 11 make_arg_parser + 100 EngineArgs + --config
    assert len(OLDER) == 112 - 13 == 99
    assert len(ff.NOT_IN_AB0B6AA5) == 13 and ff.NOT_IN_AB0B6AA5 <= set(API)
    assert len(ff.FD_ROUTER_PY) == 5 and len(ff.FD_ROUTER_GO) == 4


def test_planned_flags_are_in_both_versions_with_their_kind() -> None:
    for table in (API, OLDER):
        missing = sorted(set(PLANNED) - set(table))
        assert missing == [], f"planned flags absent from the source: {missing}"
        assert {name: table[name].kind for name in PLANNED} == PLANNED


def test_details_of_the_planned_flags() -> None:
    assert API["--tensor-parallel-size"].options == ("--tensor-parallel-size", "-tp")
    role = API["--splitwise-role"]
    assert (role.choices, role.default, role.choices_checked) == (
        ("mixed", "prefill", "decode"), "'mixed'", "FDConfig.check")
    assert API["--scheduler-name"].choices == ("local", "global", "splitwise", "dp")
    for name in ("--rdma-comm-ports", "--pd-comm-port", "--engine-worker-queue-port", "--ips"):
        assert (API[name].list_form, API[name].item_kind) == ("comma-split", "str"), name
    assert (API["--cache-queue-port"].list_form, API["--cache-queue-port"].item_kind) == (
        "comma-split", "int")
    assert API["--cache-transfer-protocol"].list_form == "comma-string"
    assert API["--logits-processors"].list_form == "nargs+"
    assert API["--port"].default == "8000" and API["--metrics-port"].default == "None"
    assert API["--cache-transfer-protocol"].default == "'ipc,rdma'"
    assert OLDER["--cache-transfer-protocol"].default == "'ipc'"
    assert OLDER["--engine-worker-queue-port"].default == "'0'"
    assert API["--scheduler-ttl"].default == "900" and API["--scheduler-topic"].default == (
        "'default'")


def test_switch_forms() -> None:
    caching = API["--enable-prefix-caching"]
    assert caching.kind == "bool-switch" and caching.default == "True"
    assert caching.options == ("--enable-prefix-caching", "--no-enable-prefix-caching")
    assert caching.negation == "--no-enable-prefix-caching"
    assert API["--enable-expert-parallel"].options == ("--enable-expert-parallel",)
    assert API["--enable-mm"].deprecated
    assert "--lm_head-fp32" in API  # spelled with '_' in the source
    negatable = {n for n, f in API.items() if f.negation}
    assert negatable == {"--enable-prefix-caching", "--enable-output-caching",
                         "--shutdown-comm-group-if-worker-idle"}
    assert {n for n, f in OLDER.items() if f.negation} == {"--enable-prefix-caching"}


@pytest.mark.parametrize("table", [ff.FASTDEPLOY_2, ff.FD_ROUTER_PY, ff.FD_ROUTER_GO])
def test_flags_are_well_formed(table: dict[str, Flag]) -> None:
    seen: set[str] = set()
    for name, flag in table.items():
        assert flag.name == name and flag.kind in ff.KINDS
        assert not seen & set(flag.options), name
        seen |= set(flag.options)
        assert bool(flag.choices) == (flag.kind == "choice"), name
        assert bool(flag.list_form) == (flag.kind == "list"), name
        assert (flag.negation in flag.options) if flag.negation else True
        if flag.kind == "choice" and flag.choices_checked == "argparse" and flag.default != "None":
            assert flag.default.strip("'") in flag.choices, name
        # a typed default is valid for its kind; a switch takes no value
        if flag.kind in ("int", "float") and flag.default != "None":
            assert check_argv([name, flag.default], table, post_parse=False) == [], name


def test_table_for_rejects_unknown_program_and_version() -> None:
    with pytest.raises(ValueError, match="unknown program"):
        table_for("multi_api_server")
    with pytest.raises(ValueError, match="no api_server flag table"):
        table_for("api_server", "1.1")
    with pytest.raises(ValueError, match="no router flag table"):
        table_for("router", "ab0b6aa5")
    assert table_for("api_server", "0009064e") == API
    table = table_for()
    table.pop("--model")
    assert "--model" in table_for()  # a fresh dict each time


# --- the guide's commands --------------------------------------------------------------

def test_guide_prefill_command_passes() -> None:
    (command,) = _shell_commands(GUIDE_PREFILL)
    argv = command[3:]
    assert argv[argv.index("--splitwise-role") + 1] == "prefill"
    assert check_argv(argv, API) == []
    assert check_argv(argv, OLDER) == []


def test_guide_decode_command_passes_as_meant() -> None:
    argv = _guide_argv(GUIDE_DECODE)
    assert argv[-4:] == ["--scheduler-topic", "test", "--splitwise-role", "decode"]
    assert check_argv(argv, API) == []
    assert check_argv(argv, OLDER) == []


def test_guide_decode_command_as_bash_runs_it_loses_its_role() -> None:
    """The known guide defect: bash ends the command after --scheduler-ttl 9000."""
    server, orphan = _shell_commands(GUIDE_DECODE)
    assert orphan == ["--scheduler-topic", "test", "--splitwise-role", "decode"]
    argv = server[3:]
    assert check_argv(argv, API) == []  # valid argv, but ...
    assert "--splitwise-role" not in argv and "--scheduler-topic" not in argv
    assert API["--splitwise-role"].default == "'mixed'"  # ... the instance starts as mixed


# --- errors ----------------------------------------------------------------------------

def test_removed_flags_are_named_with_their_replacement() -> None:
    message = _one(check_argv(["--innode-prefill-ports", "8182"], API))
    assert message.startswith("--innode-prefill-ports: removed") and "--router" in message
    message = _one(check_argv(["--inner-prefill-ports=8182,8183", "--port", "8180"], API))
    assert message.startswith("--inner-prefill-ports: removed")
    assert "--scheduler-name splitwise" in message
    assert "removed" in _one(check_argv(["--use-cudagraph"], API))
    assert set(ff.REMOVED).isdisjoint(API) and set(ff.REMOVED).isdisjoint(OLDER)


@pytest.mark.parametrize("argv, flag, words", [
    (["--port", "abc"], "--port", "not an int"),
    (["--port=abc"], "--port", "not an int"),
    (["-tp", "two"], "-tp", "not an int"),
    (["--gpu-memory-utilization", "0,9"], "--gpu-memory-utilization", "not a float"),
    (["--speculative-config", "{method: mtp}"], "--speculative-config", "not JSON"),
    (["--cache-queue-port", "8183,x"], "--cache-queue-port", "list of ints"),
    (["--logprobs-mode", "raw"], "--logprobs-mode", "invalid choice"),
    (["--splitwise-role", "both"], "--splitwise-role", "FDConfig.check"),
    (["--scheduler-name", "redis"], "--scheduler-name", "SchedulerConfig.check"),
    (["--rdma-comm-ports", "7671,abc"], "--rdma-comm-ports", "not TCP ports"),
    (["--pd-comm-port", "70000"], "--pd-comm-port", "not TCP ports"),
    (["--engine-worker-queue-port", "8182,,8183"], "--engine-worker-queue-port", "TCP ports"),
    (["--metrics-port", "0"], "--metrics-port", "not a TCP port"),
    (["--cache-transfer-protocol", "rdma,tcp"], "--cache-transfer-protocol", "ipc or rdma"),
])
def test_bad_values(argv: list[str], flag: str, words: str) -> None:
    message = _one(check_argv(argv, API))
    assert message.startswith(flag) and words in message, message


def test_checks_after_parsing_can_be_left_out() -> None:
    """argparse itself takes these; FastDeploy (or a pd-deploy rule) rejects them later."""
    for argv in (["--splitwise-role", "both"], ["--rdma-comm-ports", "7671,abc"],
                 ["--cache-transfer-protocol", "tcp"], ["--port", "0"]):
        assert check_argv(argv, API, post_parse=False) == [], argv
        assert len(check_argv(argv, API)) == 1, argv


@pytest.mark.parametrize("flag, value", [
    ("--rdma-comm-ports", "7671,7672,7673"), ("--ips", "10.0.0.1,10.0.0.2,10.0.0.3"),
    ("--cache-transfer-protocol", "rdma,ipc"), ("--pd-comm-port", "2334,2335,2336"),
    ("--engine-worker-queue-port", "8182,8183,8184"), ("--cache-queue-port", "8183,8184,8185"),
])
def test_comma_lists_take_several_items(flag: str, value: str) -> None:
    assert check_argv([flag, value], API) == []
    assert check_argv([f"{flag}={value}"], API) == []


def test_empty_port_list_means_free_ports() -> None:
    # type=lambda s: s.split(",") if s else None -> None -> FastDeploy finds free ports
    assert check_argv(["--rdma-comm-ports", ""], API) == []


def test_abbreviations_are_refused() -> None:
    message = _one(check_argv(["--scheduler-top", "test"], API))
    assert message.startswith("--scheduler-top: abbreviated") and "--scheduler-topic" in message
    message = _one(check_argv(["--no-enable-prefix"], API))
    assert "--no-enable-prefix-caching" in message
    message = _one(check_argv(["--scheduler-re", "x"], API))
    assert "ambiguous" in message and "--scheduler-reader-parallel" in message
    assert "abbreviated" in _one(check_argv(["-t", "4"], API))


def test_unknown_flags_get_the_closest_name() -> None:
    message = _one(check_argv(["--tensor-paralel-size", "4"], API))
    assert message == "--tensor-paralel-size: unknown flag (did you mean --tensor-parallel-size?)"
    message = _one(check_argv(["--tensor_parallel_size", "4"], API))
    assert "does not read '_' as '-'" in message and "--tensor-parallel-size" in message
    assert "--lm_head-fp32" in _one(check_argv(["--lm-head-fp32"], API))
    assert "--config_path" in _one(check_argv(["--config-path", "c.yaml"], ff.FD_ROUTER_GO))


def test_a_flag_twice_is_an_error_even_under_another_name() -> None:
    message = _one(check_argv(["-tp", "4", "--tensor-parallel-size=4"], API))
    assert message.startswith("--tensor-parallel-size: given twice")
    message = _one(check_argv(["--enable-prefix-caching", "--no-enable-prefix-caching"], API))
    assert "given twice" in message
    # action="append" is meant to be repeated
    assert check_argv(["--api-key", "k1", "--api-key", "k2"], API) == []


def test_switches_take_no_value() -> None:
    message = _one(check_argv(["--enable-expert-parallel=true"], API))
    assert message.startswith("--enable-expert-parallel: a switch takes no value")
    message = _one(check_argv(["--enable-expert-parallel", "true"], API))
    assert "'true': stray argument" in message and "--enable-expert-parallel" in message
    assert check_argv(["--no-enable-prefix-caching", "--enable-output-caching"], API) == []


def test_values_and_what_looks_like_a_flag() -> None:
    assert check_argv(["--max-waiting-time", "-1", "--controller-port", "-1"], API) == []
    assert check_argv(["--scheduler-password", "-x"], API)[0].startswith(
        "--scheduler-password: expects a value")
    assert check_argv(["--scheduler-password=-x"], API) == []
    assert check_argv(["--scheduler-password", "has space -x"], API) == []
    assert _one(check_argv(["--model"], API)) == (
        "--model: expects a value, but nothing follows (write --model=VALUE)")
    assert check_argv(["--logits-processors", "a:B", "c:D", "--port", "8000"], API) == []
    assert "expects a value" in _one(check_argv(["--logits-processors", "--port", "1"], API))
    assert "stray argument" in _one(check_argv(["/models/x"], API))
    assert "'--'" in _one(check_argv(["--port", "8000", "--", "x"], API))
    assert "'--'" in _one(check_argv(["--port", "8000", "--"], API))


def test_older_version_lacks_the_newer_flags() -> None:
    assert "unknown flag" in _one(check_argv(["--enable-output-caching"], OLDER))
    assert check_argv(["--enable-output-caching"], API) == []


def test_every_message_names_its_flag() -> None:
    cases = [["--port", "x"], ["--splitwise-role", "both"], ["--innode-prefill-ports", "1"],
             ["--scheduler-top", "t"], ["--porrt", "1"], ["--ips"], ["--enable-eplb=1"],
             ["--port", "1", "--port", "2"]]
    for argv in cases:
        assert argv[0] in _one(check_argv(argv, API)), argv


# --- routers ---------------------------------------------------------------------------

def test_router_argvs() -> None:
    python_router = ["--host", "0.0.0.0", "--port", "9000", "--splitwise",
                     "--request-timeout-secs", "1800"]
    assert check_argv(python_router, table_for("router")) == []
    go_router = ["--port", "9000", "--splitwise", "--config_path", "/etc/fd/router.yaml"]
    assert check_argv(go_router, table_for("golang_router")) == []
    assert check_argv(["-V"], table_for("golang_router")) == []
    assert "not an int" in _one(check_argv(["--port", "x"], table_for("router")))
    assert "not a TCP port" in _one(check_argv(["--port", "x"], table_for("golang_router")))
    assert "unknown flag" in _one(check_argv(["--model", "m"], table_for("router")))


# --- the checker against real argparse -------------------------------------------------

class _Refused(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # type: ignore[override]
        raise _Refused(message)


def _split(ints: bool) -> Callable[[str], Any]:
    """The source's type= lambdas: s.split(",") (or int per item) if s else None."""
    def parse(s: str) -> Any:
        if not s:
            return None
        return [int(x.strip()) for x in s.split(",")] if ints else s.split(",")
    return parse


def _real_parser(table: dict[str, Flag], *, allow_abbrev: bool = False) -> _Parser:
    """An argparse parser built from `table` the way the FastDeploy source builds it."""
    parser = _Parser(allow_abbrev=allow_abbrev, add_help=False)
    for flag in table.values():
        if flag.kind == "bool-switch":
            if flag.negation:
                positive = [o for o in flag.options if o != flag.negation]
                parser.add_argument(*positive, action=argparse.BooleanOptionalAction)
            else:
                parser.add_argument(*flag.options, action="store_true")
            continue
        kwargs: dict[str, Any] = {"type": {"int": int, "float": float,
                                           "json": json.loads}.get(flag.kind, str)}
        if flag.list_form == "comma-split":
            kwargs["type"] = _split(flag.item_kind == "int")
        elif flag.list_form == "nargs+":
            kwargs["nargs"] = "+"
        if flag.kind == "choice" and flag.choices_checked == "argparse":
            kwargs["choices"] = flag.choices
        if flag.repeatable:
            kwargs["action"] = "append"
        parser.add_argument(*flag.options, **kwargs)
    return parser


def _accepts(parser: _Parser, argv: list[str]) -> bool:
    try:
        parser.parse_args(argv)
    except _Refused:
        return False
    return True


AGREE = [
    _guide_argv(GUIDE_DECODE),
    ["--port=8000", "-tp=2", "--no-enable-prefix-caching", "--logits-processors", "a", "b"],
    ["--max-waiting-time", "-1"], ["--scheduler-password", "-1.5"],
    ["--api-key", "a", "--api-key", "b"], ["--speculative-config", '{"method": "mtp"}'],
    ["--cache-queue-port", "1, 2"], ["--rdma-comm-ports", ""], ["--splitwise-role", "both"],
    ["--kvcache-storage-backend", "file"], ["--shutdown-comm-group-if-worker-idle"],
    ["--port", "abc"], ["--port"], ["--model", "--port", "1"], ["--enable-logprob", "true"],
    ["--enable-logprob=true"], ["--innode-prefill-ports", "8182"],
    ["--tensor_parallel_size", "2"], ["--scheduler-top", "x"], ["x"], ["--", "x"],
    ["--cache-queue-port", "1,a"], ["--speculative-config", "{bad"],
    ["--kvcache-storage-backend", ""], ["--logprobs-mode", "raw"], ["--logits-processors"],
    ["--scheduler-password", "-x"], ["-tp4"], ["--gpu-memory-utilization", "nan"],
    ["--seed", "+7"], ["--seed", " 7 "], ["--max-model-len", "1_000"],
]


@pytest.mark.parametrize("argv", AGREE)
def test_checker_agrees_with_argparse(argv: list[str]) -> None:
    """Accepted by the checker (argparse checks only) <=> accepted by real argparse."""
    real = _accepts(_real_parser(API), argv)
    assert (check_argv(argv, API, post_parse=False) == []) == real, argv


def test_where_the_checker_is_stricter_than_argparse() -> None:
    lenient = _real_parser(API, allow_abbrev=True)  # FlexibleArgumentParser's setting
    for argv in (["--scheduler-top", "x"], ["-t", "4"], ["--port", "1", "--port", "2"]):
        assert _accepts(lenient, argv), argv
        assert len(check_argv(argv, API, post_parse=False)) == 1, argv
