"""--kv-transfer-config: vLLM 0.33's KVTransferConfig checks and vLLM-Ascend's Mooncake
start-up check."""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Dict, Optional

KV_KEYS = {
    "kv_connector", "engine_id", "kv_buffer_device", "kv_role", "kv_port",
    "kv_connector_extra_config", "kv_connector_module_path", "enable_permute_local_kv",
    "kv_load_failure_policy",
}
KV_REMOVED = {"kv_rank", "kv_parallel_size", "kv_ip", "kv_buffer_size"}
KV_ROLES = ("kv_producer", "kv_consumer", "kv_both")
KV_POLICIES = ("recompute", "fail")
DEFAULT_KV_PORT = 14579
DEFAULT_NIXL_PORT = 5600
# vLLM-Ascend 0.23 kv_p2p: only the producer binds its side channel; the decode pulls
MOONCAKE_PULL = ("MooncakeConnectorV1", "MooncakeHybridConnector")


class StartupError(Exception):
    """A configuration the engine refuses at start-up (exit status 1, not an argv error)."""


@dataclass
class KVConfig:
    connector: str
    role: str
    engine_id: str
    port: int
    extra: Dict[str, Any]
    policy: str
    engine_id_given: bool

    @property
    def producer(self) -> bool:
        return self.role in ("kv_producer", "kv_both")

    @property
    def consumer(self) -> bool:
        return self.role in ("kv_consumer", "kv_both")


def validate_kv(cfg: Dict[str, Any]) -> Optional[KVConfig]:
    """vLLM 0.33's KVTransferConfig checks. Raises ValueError with vLLM-like messages."""
    removed = sorted(set(cfg) & KV_REMOVED)
    if removed:
        raise ValueError(
            "kv-transfer-config: {} removed in vLLM 0.32 (delete them; ranks and "
            "addresses are derived from the parallel config)".format(", ".join(removed))
        )
    unknown = sorted(set(cfg) - KV_KEYS)
    if unknown:
        raise ValueError(
            f"kv-transfer-config: unknown field(s) {', '.join(unknown)}; "
            f"valid fields: {', '.join(sorted(KV_KEYS))}"
        )
    connector = cfg.get("kv_connector")
    if connector is None:
        return None
    if not isinstance(connector, str) or not connector:
        raise ValueError("kv-transfer-config: kv_connector must be a non-empty string")
    role = cfg.get("kv_role")
    if role is None:
        raise ValueError("kv-transfer-config: kv_role is required when kv_connector is set")
    if role not in KV_ROLES:
        raise ValueError(f"kv-transfer-config: kv_role {role!r} not in {list(KV_ROLES)}")
    policy = cfg.get("kv_load_failure_policy", "fail")
    if policy not in KV_POLICIES:
        raise ValueError(
            f"kv-transfer-config: kv_load_failure_policy {policy!r} not in {list(KV_POLICIES)}"
        )
    port = cfg.get("kv_port", DEFAULT_KV_PORT)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"kv-transfer-config: kv_port must be an integer in 1..65535, "
                         f"got {port!r}")
    extra = cfg.get("kv_connector_extra_config", {})
    if not isinstance(extra, dict):
        raise ValueError("kv-transfer-config: kv_connector_extra_config must be an object")
    engine_id = cfg.get("engine_id")
    if engine_id is not None and (not isinstance(engine_id, str) or not engine_id):
        raise ValueError("kv-transfer-config: engine_id must be a non-empty string")
    return KVConfig(
        connector=connector,
        role=role,
        engine_id=engine_id or str(uuid.uuid4()),
        port=port,
        extra=extra,
        policy=policy,
        engine_id_given=engine_id is not None,
    )


def check_mooncake(kv: KVConfig, tp: int, dp: int) -> None:
    """vLLM-Ascend's start-up check of the Mooncake connectors' prefill/decode sizes."""
    if "mooncake" not in kv.connector.lower():
        return
    sides = {"kv_producer": ["prefill"], "kv_consumer": ["decode"], "kv_both": []}[kv.role]
    for side in sides:
        conf = kv.extra.get(side)
        if not isinstance(conf, dict):
            raise StartupError(
                f"{kv.connector} with kv_role {kv.role} needs kv_connector_extra_config."
                f'{side} = {{"dp_size": {dp}, "tp_size": {tp}}}'
            )
        for key, own, flag in (("dp_size", dp, "--data-parallel-size"),
                               ("tp_size", tp, "--tensor-parallel-size")):
            if conf.get(key, 1) != own:
                raise StartupError(
                    f"kv_connector_extra_config.{side}.{key} = {conf.get(key, 1)!r} does not "
                    f"match {flag} {own} of this {side} engine"
                )
    decode = kv.extra.get("decode")
    if isinstance(decode, dict) and decode.get("pp_size", 1) != 1:
        raise StartupError("kv_connector_extra_config.decode.pp_size must be 1")
