"""Latency model and fault injection, read from ``PD_EMU_*`` environment variables.

Every variable is documented in README.md. A malformed value is a start-up error
(exit status 2) naming the variable.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Mapping, Optional


class SettingsError(ValueError):
    """A PD_EMU_* variable has a malformed value."""


def _num(env: Mapping[str, str], name: str, default: float, minimum: float = 0.0) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None
    if value != value or value < minimum:
        raise SettingsError(f"{name}={raw!r} must be >= {minimum:g}")
    return value


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise SettingsError(f"{name}={raw!r} must be >= {minimum}")
    return value


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise SettingsError(f"{name}={raw!r} is not a boolean (use 0 or 1)")


@dataclass
class Latency:
    """Seconds unless stated. ``zero`` makes every delay 0 and the KV link unlimited."""

    startup_s: float = 0.0
    prefill_s_per_token: float = 0.0001
    prefill_overhead_s: float = 0.005
    itl_s: float = 0.01
    kv_bandwidth_mbps: float = 1000.0  # megabytes per second; 0 = unlimited
    kv_bytes_per_token: int = 512
    kv_block_tokens: int = 16
    kv_lease_s: float = 60.0
    kv_timeout_s: float = 10.0
    concurrency_slowdown: float = 0.0
    max_waiting: int = 0  # 0 = unbounded waiting queue
    default_max_tokens: int = 256
    shutdown_grace_s: float = 20.0
    zero: bool = False

    def slowdown(self, running: int) -> float:
        """Factor applied to prefill and inter-token time with ``running`` requests."""
        return 1.0 + self.concurrency_slowdown * max(0, running - 1)

    def prefill_s(self, prompt_tokens: int, running: int) -> float:
        if self.zero:
            return 0.0
        base = self.prefill_overhead_s + self.prefill_s_per_token * prompt_tokens
        return base * self.slowdown(running)

    def itl(self, running: int) -> float:
        return 0.0 if self.zero else self.itl_s * self.slowdown(running)

    def transfer_s(self, nbytes: int) -> float:
        if self.zero or self.kv_bandwidth_mbps <= 0:
            return 0.0
        return nbytes / (self.kv_bandwidth_mbps * 1e6)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Latency:
        zero = _flag(env, "PD_EMU_ZERO_LATENCY")
        d = cls()
        return cls(
            startup_s=_num(env, "PD_EMU_STARTUP_S", d.startup_s),
            prefill_s_per_token=_num(env, "PD_EMU_PREFILL_S_PER_TOKEN", d.prefill_s_per_token),
            prefill_overhead_s=_num(env, "PD_EMU_PREFILL_OVERHEAD_S", d.prefill_overhead_s),
            itl_s=_num(env, "PD_EMU_ITL_S", d.itl_s),
            kv_bandwidth_mbps=_num(env, "PD_EMU_KV_BANDWIDTH_MBPS", d.kv_bandwidth_mbps),
            kv_bytes_per_token=_int(env, "PD_EMU_KV_BYTES_PER_TOKEN", d.kv_bytes_per_token, 1),
            kv_block_tokens=_int(env, "PD_EMU_KV_BLOCK_TOKENS", d.kv_block_tokens, 1),
            kv_lease_s=_num(env, "PD_EMU_KV_LEASE_S", d.kv_lease_s),
            kv_timeout_s=_num(env, "PD_EMU_KV_TIMEOUT_S", d.kv_timeout_s, 0.001),
            concurrency_slowdown=_num(env, "PD_EMU_CONCURRENCY_SLOWDOWN", d.concurrency_slowdown),
            max_waiting=_int(env, "PD_EMU_MAX_WAITING", d.max_waiting),
            default_max_tokens=_int(env, "PD_EMU_DEFAULT_MAX_TOKENS", d.default_max_tokens, 1),
            shutdown_grace_s=_num(env, "PD_EMU_SHUTDOWN_GRACE_S", d.shutdown_grace_s),
            zero=zero,
        )


@dataclass
class Faults:
    """Injected faults; changeable at run time through ``POST /admin/faults``."""

    error_rate: float = 0.0  # fraction of /v1 requests answered with HTTP 500
    exit_after: int = 0  # exit (status 1, no cleanup) after this many answered requests; 0 = never
    hang: bool = False  # accept /v1 requests but never answer
    slow_start_s: float = 0.0  # extra start-up delay on top of PD_EMU_STARTUP_S
    kv_corrupt_rate: float = 0.0  # fraction of served KV pulls with a flipped byte
    kv_cut_rate: float = 0.0  # fraction of KV pull connections cut at once (P->D link cut)
    seed: Optional[int] = None
    rng: random.Random = field(default_factory=random.Random, repr=False, compare=False)

    RUNTIME_KEYS = ("error_rate", "exit_after", "hang", "kv_corrupt_rate", "kv_cut_rate")

    def __post_init__(self) -> None:
        if self.seed is not None:
            self.rng.seed(self.seed)

    def roll(self, rate: float) -> bool:
        return rate > 0 and (rate >= 1 or self.rng.random() < rate)

    def as_dict(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "rng"}

    def update(self, changes: Mapping[str, Any]) -> None:
        """Apply runtime changes; raises SettingsError on an unknown key or bad value."""
        for key, value in changes.items():
            if key not in self.RUNTIME_KEYS:
                known = ", ".join(self.RUNTIME_KEYS)
                raise SettingsError(f"unknown fault {key!r} (known: {known})")
            if key == "hang":
                if not isinstance(value, bool):
                    raise SettingsError("hang must be true or false")
            elif key == "exit_after":
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise SettingsError("exit_after must be an integer >= 0")
            elif (isinstance(value, bool) or not isinstance(value, (int, float))
                  or not 0 <= value <= 1):
                raise SettingsError(f"{key} must be a number between 0 and 1")
        for key, value in changes.items():
            setattr(self, key, float(value) if key.endswith("_rate") else value)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Faults:
        error_rate = _num(env, "PD_EMU_ERROR_RATE", 0.0)
        corrupt = _num(env, "PD_EMU_KV_CORRUPT_RATE", 0.0)
        cut = _num(env, "PD_EMU_KV_CUT_RATE", 0.0)
        for name, value in (("PD_EMU_ERROR_RATE", error_rate), ("PD_EMU_KV_CORRUPT_RATE", corrupt),
                            ("PD_EMU_KV_CUT_RATE", cut)):
            if value > 1:
                raise SettingsError(f"{name} must be between 0 and 1")
        seed_raw = env.get("PD_EMU_SEED", "").strip()
        return cls(
            error_rate=error_rate,
            exit_after=_int(env, "PD_EMU_EXIT_AFTER", 0),
            hang=_flag(env, "PD_EMU_HANG"),
            slow_start_s=_num(env, "PD_EMU_SLOW_START_S", 0.0),
            kv_corrupt_rate=corrupt,
            kv_cut_rate=cut,
            seed=_int(env, "PD_EMU_SEED", 0) if seed_raw else None,
        )


def from_environ() -> tuple:
    """(Latency, Faults) from ``os.environ``."""
    return Latency.from_env(os.environ), Faults.from_env(os.environ)
