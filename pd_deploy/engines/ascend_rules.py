"""vLLM-Ascend's start-up rule for Mooncake connectors, reimplemented to test plans.

At start-up vLLM-Ascend compares `kv_connector_extra_config` with the engine's own
parallel sizes: a producer's `prefill` sizes must equal its --tensor-parallel-size /
--data-parallel-size, a consumer's `decode` sizes likewise; decode pp_size must be 1.
Standard library only (the emulator uses it on the node side too).
"""
from __future__ import annotations

from typing import Any

SIDE_OF_ROLE = {"kv_producer": "prefill", "kv_consumer": "decode"}


def mooncake_extra_config_errors(kv_config: dict[str, Any], tp: int, dp: int) -> list[str]:
    """Errors vLLM-Ascend would raise for this engine; [] when it would start."""
    if not str(kv_config.get("kv_connector", "")).startswith("Mooncake"):
        return []
    role = kv_config.get("kv_role")
    extra = kv_config.get("kv_connector_extra_config")
    if not isinstance(extra, dict):
        return ["kv_connector_extra_config is missing (needs prefill and decode sizes)"]
    errors = []
    for side in ("prefill", "decode"):
        sizes = extra.get(side)
        if not isinstance(sizes, dict) or not {"dp_size", "tp_size"} <= set(sizes):
            errors.append(f"kv_connector_extra_config.{side} needs dp_size and tp_size")
    if errors:
        return errors
    if int(extra["decode"].get("pp_size", 1)) != 1:
        errors.append("kv_connector_extra_config.decode.pp_size must be 1")
    side = SIDE_OF_ROLE.get(str(role))
    if side is None:
        return errors  # kv_both: no check
    own = extra[side]
    if int(own["tp_size"]) != tp:
        errors.append(f"kv_connector_extra_config.{side}.tp_size={own['tp_size']} but "
                      f"--tensor-parallel-size is {tp}")
    if int(own["dp_size"]) != dp:
        errors.append(f"kv_connector_extra_config.{side}.dp_size={own['dp_size']} but "
                      f"--data-parallel-size is {dp}")
    return errors
