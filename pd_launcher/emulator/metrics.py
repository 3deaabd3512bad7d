"""A small Prometheus text-format registry (no dependency) with vLLM's metric names.

Labels follow vLLM v1: ``model_name`` and ``engine`` (the DP rank). Counters are
exposed as ``<name>_total``; histograms as ``_bucket``/``_sum``/``_count``.
"""
from __future__ import annotations

import bisect
from typing import Dict, List, Sequence, Tuple

LabelValues = Tuple[str, ...]

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
               5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
KV_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
              5.0, 10.0)


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    return repr(float(value))


class _Family:
    kind = ""

    def __init__(self, name: str, doc: str, labels: Sequence[str]) -> None:
        self.name, self.doc, self.labels = name, doc, tuple(labels)

    def _labelstr(self, values: LabelValues, extra: str = "") -> str:
        parts = [f'{k}="{_esc(v)}"' for k, v in zip(self.labels, values)]
        if extra:
            parts.append(extra)
        return "{{{}}}".format(",".join(parts)) if parts else ""

    def header(self, suffix: str = "") -> List[str]:
        name = self.name + suffix
        return [f"# HELP {name} {self.doc}", f"# TYPE {name} {self.kind}"]


class Counter(_Family):
    kind = "counter"

    def __init__(self, name: str, doc: str, labels: Sequence[str]) -> None:
        super().__init__(name, doc, labels)
        self.values: Dict[LabelValues, float] = {}

    def inc(self, labels: LabelValues, amount: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def get(self, labels: LabelValues) -> float:
        return self.values.get(labels, 0.0)

    def render(self) -> List[str]:
        out = self.header("_total")
        for lv, v in sorted(self.values.items()):
            out.append(f"{self.name}_total{self._labelstr(lv)} {_fmt(v)}")
        return out


class Gauge(Counter):
    kind = "gauge"

    def set(self, labels: LabelValues, value: float) -> None:
        self.values[labels] = float(value)

    def render(self) -> List[str]:
        out = self.header()
        for lv, v in sorted(self.values.items()):
            out.append(f"{self.name}{self._labelstr(lv)} {_fmt(v)}")
        return out


class Histogram(_Family):
    kind = "histogram"

    def __init__(self, name: str, doc: str, labels: Sequence[str],
                 buckets: Sequence[float]) -> None:
        super().__init__(name, doc, labels)
        self.buckets = tuple(buckets)
        self.series: Dict[LabelValues, List[float]] = {}  # bucket counts..., sum, count

    def observe(self, labels: LabelValues, value: float) -> None:
        s = self.series.get(labels)
        if s is None:
            s = self.series[labels] = [0.0] * (len(self.buckets) + 2)
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.buckets):
            s[i] += 1
        s[-2] += value
        s[-1] += 1

    def observe_many(self, labels: LabelValues, value: float, times: int) -> None:
        if times <= 0:
            return
        self.observe(labels, value)
        if times > 1:
            s = self.series[labels]
            i = bisect.bisect_left(self.buckets, value)
            if i < len(self.buckets):
                s[i] += times - 1
            s[-2] += value * (times - 1)
            s[-1] += times - 1

    def count(self, labels: LabelValues) -> float:
        s = self.series.get(labels)
        return s[-1] if s else 0.0

    def render(self) -> List[str]:
        out = self.header()
        for lv, s in sorted(self.series.items()):
            acc = 0.0
            for b, c in zip(self.buckets, s):
                acc += c
                le = self._labelstr(lv, f'le="{_fmt(b)}"')
                out.append(f"{self.name}_bucket{le} {_fmt(acc)}")
            inf = self._labelstr(lv, 'le="+Inf"')
            out.append(f"{self.name}_bucket{inf} {_fmt(s[-1])}")
            out.append(f"{self.name}_sum{self._labelstr(lv)} {_fmt(s[-2])}")
            out.append(f"{self.name}_count{self._labelstr(lv)} {_fmt(s[-1])}")
        return out


class Metrics:
    """Every metric the emulator exposes (documented in README.md)."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        L = ("model_name", "engine")
        self.running = Gauge("vllm:num_requests_running",
                             "Number of requests in model execution batches.", L)
        self.waiting = Gauge("vllm:num_requests_waiting",
                             "Number of requests waiting to be processed.", L)
        self.ttft = Histogram("vllm:time_to_first_token_seconds",
                              "Histogram of time to first token in seconds.", L, TTFT_BUCKETS)
        self.itl = Histogram("vllm:inter_token_latency_seconds",
                             "Histogram of inter-token latency in seconds.", L, ITL_BUCKETS)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds",
                             "Histogram of e2e request latency in seconds.", L, E2E_BUCKETS)
        self.prompt_tokens = Counter("vllm:prompt_tokens",
                                     "Number of prefill tokens processed.", L)
        self.generation_tokens = Counter("vllm:generation_tokens",
                                         "Number of generation tokens processed.", L)
        self.success = Counter("vllm:request_success",
                               "Count of successfully processed requests.",
                               L + ("finished_reason",))
        self.kv_transfers = Counter("pd_emu:kv_transfers",
                                    "KV pulls completed by this engine (decode side).", L)
        self.kv_transfer_failures = Counter("pd_emu:kv_transfer_failures",
                                            "KV pulls that failed, by cause.", L + ("cause",))
        self.kv_recomputes = Counter("pd_emu:kv_recomputes",
                                     "Requests prefilled locally after a failed KV pull "
                                     "(kv_load_failure_policy=recompute).", L)
        self.kv_bytes = Counter("pd_emu:kv_transfer_bytes", "KV bytes pulled.", L)
        self.kv_transfer_time = Histogram("pd_emu:kv_transfer_seconds",
                                          "Time of KV pulls in seconds.", L, KV_BUCKETS)
        self.kv_served = Counter("pd_emu:kv_pulls_served",
                                 "KV pulls answered by this engine's KV listener, by outcome.",
                                 L + ("outcome",))
        self.kv_held_blocks = Gauge("pd_emu:kv_held_blocks",
                                    "KV blocks held for remote decode.", L)
        self.kv_held_bytes = Gauge("pd_emu:kv_held_bytes",
                                   "KV bytes held for remote decode.", L)
        self.kv_expired = Counter("pd_emu:kv_lease_expired_blocks",
                                  "Held KV blocks freed because their lease expired.", L)
        self.prefills = Counter("pd_emu:remote_prefills",
                                "Prefill-only requests (do_remote_decode) served.", L)
        self.aborts = Counter("pd_emu:request_aborts",
                              "Requests aborted by a client disconnect or shutdown.", L)
        self.errors = Counter("pd_emu:request_errors",
                              "Requests answered with an HTTP error, by status.", L + ("status",))
        self.faults = Counter("pd_emu:injected_faults", "Faults injected, by kind.", ("kind",))

    def init_rank(self, rank: int) -> None:
        """Expose a rank's plain series at 0 before anything happened."""
        lv = self.lv(rank)
        for fam in (self.running, self.waiting, self.prompt_tokens, self.generation_tokens,
                    self.kv_transfers, self.kv_recomputes, self.kv_bytes, self.prefills,
                    self.aborts, self.kv_held_blocks, self.kv_held_bytes, self.kv_expired):
            fam.values.setdefault(lv, 0.0)

    def lv(self, rank: int) -> LabelValues:
        return (self.model_name, str(rank))

    def families(self) -> List[_Family]:
        return [v for v in vars(self).values() if isinstance(v, _Family)]

    def render(self) -> str:
        lines: List[str] = []
        for fam in self.families():
            lines.extend(fam.render())
        return "\n".join(lines) + "\n"
