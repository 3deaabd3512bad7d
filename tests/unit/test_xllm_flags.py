"""The xLLM / xllm-service gflags tables (pd_deploy.engines.xllm_flags) and the argv checker."""
from __future__ import annotations

import pytest

from pd_deploy.engines import xllm_flags as xf
from pd_deploy.engines.xllm_flags import check_argv, table_for, validators_for

XLLM = (0, 9, 2)  # release/v0.9.0 head b0328d60cf2d
SERVICE = (0, 9, 1)  # xllm-service release/v0.9.0 head 85d7c3f42344

# The flags the planner emits, with the type that the DEFINE_<type> line gives.
INSTANCE_FLAGS = {
    "model": "string", "devices": "string", "host": "string", "port": "int32",
    "enable_disagg_pd": "bool", "instance_role": "string", "etcd_addr": "string",
    "etcd_namespace": "string", "disagg_pd_port": "int32", "transfer_listen_port": "int32",
    "master_node_addr": "string", "nnodes": "int32", "node_rank": "int32",
    "rank_tablefile": "string", "communication_backend": "string",
    "enable_prefix_cache": "bool", "enable_chunked_prefill": "bool", "etcd_ttl": "int32",
    "heart_beat_interval": "double",
}
SERVICE_FLAGS = {
    "etcd_addr": "string", "etcd_namespace": "string", "http_server_port": "int32",
    "rpc_server_port": "int32", "server_host": "string", "tokenizer_path": "string",
    "load_balance_policy": "string",
}

GOOD_INSTANCE_ARGV = [
    "--model=/models/Qwen3-8B", "--devices=npu:3", "--host=10.0.0.5", "--port=18000",
    "--enable_disagg_pd=true", "--instance_role=PREFILL", "--etcd_addr=10.0.0.1:2379",
    "--etcd_namespace=pd-a", "--disagg_pd_port=17000", "--transfer_listen_port=26003",
    "--master_node_addr=10.0.0.5:19888", "--nnodes=2", "--node_rank=1",
    "--rank_tablefile=/etc/pd/ranktable.json", "--communication_backend=hccl",
    "--enable_prefix_cache=false", "--enable_chunked_prefill=false", "--etcd_ttl=3",
    "--heart_beat_interval=0.5",
]
GOOD_SERVICE_ARGV = [
    "--etcd_addr=10.0.0.1:2379", "--etcd_namespace=pd-a", "--http_server_port=8888",
    "--rpc_server_port=8889", "--server_host=10.0.0.1", "--tokenizer_path=/models/Qwen3-8B",
    "--load_balance_policy=RR",
]


def _one(errors: list[str]) -> str:
    assert len(errors) == 1, errors
    return errors[0]


# --- the tables ----------------------------------------------------------------------

def test_table_sizes_match_the_define_lines() -> None:
    assert len(xf.XLLM_0_9) == 162
    assert len(xf.XLLM_0_10) == 175
    assert len(xf.XLLM_SERVICE_0_9) == 32


@pytest.mark.parametrize("table", [xf.XLLM_0_9, xf.XLLM_0_10, xf.XLLM_SERVICE_0_9])
def test_tables_hold_gflags_types_and_defaults_that_parse(table: dict) -> None:
    for name, (ftype, default) in table.items():
        assert ftype in xf.GFLAGS_TYPES, name
        assert name.isidentifier(), name
        # a default is what gflags would also accept on the command line
        assert check_argv([f"--{name}={default}"], table) == [], name


@pytest.mark.parametrize("version", [XLLM, (0, 10, 0)])
def test_instance_table_has_the_planned_flags(version: tuple[int, ...]) -> None:
    table = table_for("xllm", version)
    assert {n: table[n][0] for n in INSTANCE_FLAGS} == INSTANCE_FLAGS


def test_service_table_has_the_planned_flags() -> None:
    table = table_for("xllm_master_serving", SERVICE)
    assert {n: table[n][0] for n in SERVICE_FLAGS} == SERVICE_FLAGS


def test_defaults_of_the_pd_flags() -> None:
    t = table_for("xllm", XLLM)
    assert t["devices"] == ("string", "npu:0")
    assert t["port"] == ("int32", "8010")
    assert t["disagg_pd_port"] == ("int32", "7777")
    assert t["transfer_listen_port"] == ("int32", "26000")
    assert t["master_node_addr"] == ("string", "127.0.0.1:19888")
    assert t["instance_role"] == ("string", "DEFAULT")
    assert t["communication_backend"] == ("string", "hccl")
    assert t["heart_beat_interval"] == ("double", "0.5")
    assert t["etcd_ttl"] == ("int32", "3")
    assert t["enable_prefix_cache"] == t["enable_chunked_prefill"] == ("bool", "true")
    s = table_for("xllm_master_serving", SERVICE)
    assert s["etcd_addr"] == ("string", "0.0.0.0:2379")
    assert s["http_server_port"] == ("int32", "8888")
    assert s["rpc_server_port"] == ("int32", "8889")
    assert s["load_balance_policy"] == ("string", "RR")


def test_device_id_only_from_0_10() -> None:
    assert "device_id" not in table_for("xllm", XLLM)
    t10 = table_for("xllm", (0, 10, 0))
    assert t10["device_id"] == ("int32", "-1")
    assert t10["devices"] == ("string", "")  # deprecated, still accepted
    assert check_argv(["--device_id=3"], t10) == []
    err = _one(check_argv(["--device_id=3"], table_for("xllm", XLLM)))
    assert "unknown flag --device_id" in err


def test_etcd_namespace_is_newer_than_the_0_9_0_tags() -> None:
    # not in tag v0.9.0 of xllm (added by 87700e35, before tag v0.9.1), nor in tag v0.9.0
    # of xllm-service (added by 5372485, before its 0.9.1)
    assert "etcd_namespace" not in table_for("xllm", (0, 9, 0))
    assert "etcd_namespace" in table_for("xllm", (0, 9, 1))
    assert "etcd_namespace" not in table_for("xllm_master_serving", (0, 9, 0))
    assert "etcd_namespace" in table_for("xllm_master_serving", (0, 9, 1))
    assert "etcd_namespace" in table_for("xllm", (0, 9, 2))


def test_patch_tables_drop_only_what_the_tags_lack() -> None:
    full = table_for("xllm", XLLM)
    assert set(full) - set(table_for("xllm", (0, 9, 0))) == xf.XLLM_NOT_IN_0_9_0
    assert set(full) - set(table_for("xllm", (0, 9, 1))) == xf.XLLM_NOT_IN_0_9_1
    assert table_for("xllm", (0, 9, 7)) == full  # a later 0.9.x: the branch head


def test_backend_removes_npu_only_flags() -> None:
    npu, mlu = table_for("xllm", XLLM), table_for("xllm", XLLM, backend="mlu")
    assert set(npu) - set(mlu) == xf.XLLM_NPU_ONLY_0_9
    assert npu["enable_block_copy_kernel"] == ("bool", "true")
    assert mlu["enable_block_copy_kernel"] == ("bool", "false")
    assert set(table_for("xllm", (0, 10, 0))) - set(table_for("xllm", (0, 10, 0), backend="cuda")) \
        == xf.XLLM_NPU_ONLY_0_10


def test_table_for_returns_a_copy() -> None:
    table_for("xllm", XLLM)["port"] = ("string", "x")
    assert xf.XLLM_0_9["port"] == ("int32", "8010")


@pytest.mark.parametrize("program,version", [
    ("xllm", (0, 8, 0)), ("xllm", (0, 11, 0)), ("xllm", (0, 9)), ("xllm", ("0", "9", "2")),
    ("xllm_master_serving", (0, 10, 0)), ("xllm-service", (0, 9, 1)), ("vllm", (0, 9, 2)),
])
def test_table_for_rejects_what_it_has_no_table_for(program: str, version: tuple) -> None:
    with pytest.raises(ValueError):
        table_for(program, version)


def test_table_for_rejects_unknown_backend() -> None:
    with pytest.raises(ValueError, match="backend"):
        table_for("xllm", XLLM, backend="gpu")


# --- the checker ---------------------------------------------------------------------

def test_good_argv_passes() -> None:
    assert check_argv(GOOD_INSTANCE_ARGV, table_for("xllm", XLLM)) == []
    assert check_argv(GOOD_SERVICE_ARGV, table_for("xllm_master_serving", SERVICE),
                      validators=validators_for("xllm_master_serving", SERVICE)) == []


def test_namespace_flags_fail_on_the_old_tags() -> None:
    err = _one(check_argv(["--etcd_namespace=pd-a"], table_for("xllm", (0, 9, 0))))
    assert "unknown flag --etcd_namespace" in err


def test_unknown_flag_suggests_the_closest_name() -> None:
    err = _one(check_argv(["--enable_disag_pd=true"], table_for("xllm", XLLM)))
    assert "unknown flag --enable_disag_pd" in err and "did you mean --enable_disagg_pd?" in err
    err = _one(check_argv(["--http_port=8888"], table_for("xllm_master_serving", SERVICE)))
    assert "did you mean --http_server_port?" in err
    err = _one(check_argv(["--zzzzzz=1"], table_for("xllm", XLLM)))
    assert "did you mean" not in err


@pytest.mark.parametrize("item,reason", [
    ("--enable_disagg_pd=maybe", "not a bool"),
    ("--enable_disagg_pd=", "not a bool"),
    ("--port=abc", "not a base-10"),
    ("--port=", "empty value"),
    ("--port=99999999999", "out of the int32 range"),
    ("--port=8010 ", "not a base-10"),  # strtol stops at the space
    ("--port=1e3", "not a base-10"),
    ("--port=010x", "not a base-10"),
    ("--heart_beat_interval=fast", "not a double"),
    ("--heart_beat_interval=1e999", "overflows"),
    ("--heart_beat_interval=1_0", "not a double"),
    ("--xxh3_128bits_seed=-1", "no negative"),  # uint32
    ("--xxh3_128bits_seed=4294967296", "out of the uint32 range"),
    ("--input_shm_size=-5", "no negative"),  # uint64
    ("--max_cache_size=9223372036854775808", "out of the int64 range"),
])
def test_bad_values_fail_naming_the_flag(item: str, reason: str) -> None:
    err = _one(check_argv([item], table_for("xllm", XLLM)))
    name = item[2:].split("=")[0]
    assert f"--{name}" in err and reason in err


def test_nnodes_is_a_signed_int32() -> None:
    # nnodes is DEFINE_int32 in 0.9.x: gflags parses -1; xLLM's own checks reject it later
    table = table_for("xllm", XLLM)
    assert table["nnodes"] == ("int32", "1")
    assert check_argv(["--nnodes=-1"], table) == []


@pytest.mark.parametrize("item", [
    "--enable_disagg_pd=TRUE", "--enable_disagg_pd=Yes", "--enable_disagg_pd=t",
    "--enable_disagg_pd=0", "--enable_disagg_pd=n", "--enable_disagg_pd",
    "--noenable_disagg_pd", "-enable_disagg_pd=false", "--enable-disagg-pd=true",
    "--port=0x1F", "--port=+8010", "--port= 8010", "--port=-2147483648", "--port=2147483647",
    "--heart_beat_interval=1", "--heart_beat_interval=.5", "--heart_beat_interval=5e-1",
    "--heart_beat_interval=0x1p-1", "--heart_beat_interval=inf", "--heart_beat_interval=0",
    "--xxh3_128bits_seed=4294967295", "--model=", "--model=a=b c",
])
def test_values_gflags_accepts(item: str) -> None:
    assert check_argv([item], table_for("xllm", XLLM)) == []


def test_space_form_of_a_bool_fails() -> None:
    err = _one(check_argv(["--enable_disagg_pd", "false"], table_for("xllm", XLLM)))
    assert "'false'" in err and "--enable_disagg_pd=false" in err


def test_space_form_of_a_value_flag_fails() -> None:
    errors = check_argv(["--port", "8010"], table_for("xllm", XLLM))
    assert len(errors) == 2
    assert "--port (int32) needs a value" in errors[0]
    assert "not a flag" in errors[1]


def test_one_item_holding_a_space_fails() -> None:
    err = _one(check_argv(["--enable_disagg_pd false"], table_for("xllm", XLLM)))
    assert "holds a space" in err


@pytest.mark.parametrize("argv,reason", [
    (["serve"], "not a flag"),
    (["-"], "not a flag"),
    ([""], "not a flag"),
    (["--", "--port=1"], "ends gflags flag parsing"),
    (["--noport"], "only for bool flags"),
    (["--noenable_disagg_pd=true"], "ignores '=true'"),
    (["--port=1", "--port=2"], "already given"),
    (["--help"], "unknown flag --help"),
])
def test_other_bad_items(argv: list[str], reason: str) -> None:
    assert reason in _one(check_argv(argv, table_for("xllm", XLLM)))


def test_every_bad_item_gets_its_own_error() -> None:
    argv = ["--model=/m", "--prot=1", "--nnodes=x", "stray", "--enable_disagg_pd=true"]
    errors = check_argv(argv, table_for("xllm", XLLM))
    assert len(errors) == 3
    assert "--prot" in errors[0] and "--nnodes" in errors[1] and "stray" in errors[2]


def test_service_validators() -> None:
    table = table_for("xllm_master_serving", SERVICE)
    validators = validators_for("xllm_master_serving", SERVICE)
    assert validators == {"target_ttft": "non_negative", "target_tpot": "non_negative",
                          "readiness_check_interval_s": "positive"}
    assert "must be > 0" in _one(check_argv(["--readiness_check_interval_s=0"], table,
                                            validators=validators))
    assert "must be >= 0" in _one(check_argv(["--target_ttft=-1"], table, validators=validators))
    assert check_argv(["--target_ttft=0"], table, validators=validators) == []
    assert "readiness_check_interval_s" not in validators_for("xllm_master_serving", (0, 9, 0))
    assert validators_for("xllm", XLLM) == {}
