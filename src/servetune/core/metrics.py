"""Serving metrics: per-request records in, per-load-level distributions and throughputs out.

Every formula servetune reports is defined here, once, as a pure function over plain records.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Percentile = Literal["mean", "p50", "p90", "p95", "p99", "max"]
"""Names of the statistics a ``Distribution`` holds."""

LatencyMetric = Literal["ttft_ms", "tpot_ms", "itl_ms", "e2e_latency_ms"]
"""Per-request latency metrics (all in milliseconds)."""

LATENCY_METRICS: tuple[LatencyMetric, ...] = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_latency_ms")
SCALAR_METRICS: tuple[str, ...] = (
    "output_tokens_per_s",
    "requests_per_s",
    "goodput_requests_per_s",
    "error_rate",
)
PERCENTILES: tuple[Percentile, ...] = ("mean", "p50", "p90", "p95", "p99", "max")


class RequestRecord(BaseModel):
    """One benchmark request as the client saw it; times are monotonic seconds (same clock).

    ``chunk_times_s`` holds the arrival time of every streamed chunk that carried content, in
    order. ``output_tokens``/``prompt_tokens`` come from the server's ``usage`` when it sent one
    (else ``output_tokens`` is the count of content chunks). ``error_kind`` is None for a success,
    else a short stable code (``http_500``, ``connect``, ``timeout``, ``read``, ``short_output``…).
    """

    model_config = ConfigDict(frozen=True)

    sent_s: float = Field(description="Monotonic time the request was sent, in s.")
    chunk_times_s: tuple[float, ...] = Field(
        default=(), description="Arrival of each content chunk, s."
    )
    done_s: float | None = Field(default=None, description="Monotonic time the stream ended, in s.")
    prompt_tokens: int | None = Field(
        default=None, description="usage.prompt_tokens from the server."
    )
    output_tokens: int | None = Field(
        default=None, description="usage.completion_tokens, else chunk count."
    )
    expected_prompt_tokens: int | None = Field(default=None, description="Tokens the client built.")
    error_kind: str | None = Field(default=None, description="None on success, else an error code.")
    error: str | None = Field(default=None, description="Error message, for the log.")
    retries: int = Field(default=0, description="Re-sends after a failure before the first byte.")
    warmup: bool = Field(default=False, description="Warm-up requests are never measured.")

    @property
    def ok(self) -> bool:
        """True when the request succeeded and streamed at least one content chunk."""
        return self.error_kind is None and bool(self.chunk_times_s)

    def ttft_ms(self) -> float | None:
        """Time to first token: sent → first content chunk, in ms (None if no chunk arrived)."""
        if not self.chunk_times_s:
            return None
        return (self.chunk_times_s[0] - self.sent_s) * 1000.0

    def e2e_latency_ms(self) -> float | None:
        """End-to-end latency: sent → last content chunk, in ms."""
        if not self.chunk_times_s:
            return None
        return (self.chunk_times_s[-1] - self.sent_s) * 1000.0

    def tpot_ms(self) -> float | None:
        """Time per output token after the first: (e2e − ttft) / (output_tokens − 1), in ms.

        vLLM's definition (``benchmarks/benchmark_serving.py``); None with fewer than 2 tokens.
        """
        e2e, ttft, n = self.e2e_latency_ms(), self.ttft_ms(), self.output_tokens
        if e2e is None or ttft is None or n is None or n < 2:
            return None
        return (e2e - ttft) / (n - 1)

    def itl_ms(self) -> list[float]:
        """Inter-token latencies: every gap between consecutive content chunks, in ms."""
        t = self.chunk_times_s
        return [(b - a) * 1000.0 for a, b in itertools.pairwise(t)]


class Distribution(BaseModel):
    """Summary statistics of one latency metric, in ms; percentiles use linear interpolation."""

    model_config = ConfigDict(frozen=True)

    mean: float = Field(description="Arithmetic mean.")
    p50: float = Field(description="Median.")
    p90: float = Field(description="90th percentile.")
    p95: float = Field(description="95th percentile.")
    p99: float = Field(description="99th percentile.")
    max: float = Field(description="Largest value.")
    count: int = Field(description="Number of samples.")

    def get(self, stat: Percentile) -> float:
        """The statistic named ``stat`` (``mean``, ``p50`` … ``max``)."""
        return float(getattr(self, stat))


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0 ≤ q ≤ 100) of already-sorted values, linear interpolation.

    Matches ``numpy.percentile(..., method="linear")``. Raises ValueError on an empty sequence.
    """
    if not sorted_values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be within [0, 100], got {q}")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = math.ceil(pos)
    frac = pos - lo
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac


def distribution(values: Iterable[float]) -> Distribution | None:
    """Mean, p50, p90, p95, p99 and max of ``values``; None when there are none."""
    xs = sorted(values)
    if not xs:
        return None
    return Distribution(
        mean=math.fsum(xs) / len(xs),
        p50=percentile(xs, 50),
        p90=percentile(xs, 90),
        p95=percentile(xs, 95),
        p99=percentile(xs, 99),
        max=xs[-1],
        count=len(xs),
    )


class LoadLevel(BaseModel):
    """One load point of a workload: a fixed concurrency or a Poisson request rate."""

    model_config = ConfigDict(frozen=True)

    concurrency: int | None = Field(default=None, description="Requests in flight at once.")
    request_rate_per_s: float | None = Field(default=None, description="Mean Poisson arrival rate.")

    @property
    def value(self) -> float:
        """The concurrency or the rate: how SLOs and objectives name a level."""
        if self.concurrency is not None:
            return float(self.concurrency)
        assert self.request_rate_per_s is not None
        return self.request_rate_per_s

    @property
    def label(self) -> str:
        """Short readable name: ``concurrency=4`` or ``rate=2.5/s``."""
        if self.concurrency is not None:
            return f"concurrency={self.concurrency}"
        return f"rate={self.request_rate_per_s:g}/s"


class RequestSloBounds(BaseModel):
    """Per-request bounds used for goodput (ms; None = unbounded)."""

    model_config = ConfigDict(frozen=True)

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_latency_ms: float | None = None

    def met_by(self, record: RequestRecord) -> bool:
        """True when a successful ``record`` meets every bound (a failed one never does)."""
        if not record.ok:
            return False
        for name in ("ttft_ms", "tpot_ms", "e2e_latency_ms"):
            bound = getattr(self, name)
            if bound is None:
                continue
            value = getattr(record, name)()
            if value is not None and value > bound:
                return False
        return True


class ServingMetrics(BaseModel):
    """Everything measured at one load level (DESIGN.md §4).

    Throughputs divide by ``duration_s``: first measured request sent → last measured request
    done. Failed requests are counted in ``failed`` and ``failed_by_kind``, never dropped.
    """

    model_config = ConfigDict(frozen=True)

    level: LoadLevel = Field(description="The load level measured.")
    completed: int = Field(description="Measured requests that succeeded.")
    failed: int = Field(description="Measured requests that failed.")
    failed_by_kind: dict[str, int] = Field(
        default_factory=dict, description="Failures by error code."
    )
    error_examples: dict[str, str] = Field(
        default_factory=dict,
        description="The first error message seen per error code (codes whose failures carried "
        "no message are absent).",
    )
    warmup: int = Field(default=0, description="Warm-up requests sent (never measured).")
    retried: int = Field(default=0, description="Re-sends after a failure before the first byte.")
    duration_s: float = Field(description="First measured send → last measured completion, s.")
    ttft_ms: Distribution | None = Field(default=None, description="Time to first token.")
    tpot_ms: Distribution | None = Field(default=None, description="Time per output token (vLLM).")
    itl_ms: Distribution | None = Field(
        default=None, description="Inter-token latency (every gap)."
    )
    e2e_latency_ms: Distribution | None = Field(default=None, description="End-to-end latency.")
    output_tokens_per_s: float = Field(
        description="Output tokens of completed requests / duration."
    )
    input_tokens_per_s: float = Field(
        default=0.0,
        description="Prompt tokens of completed requests / duration (usage.prompt_tokens, else "
        "the built prompt's length).",
    )
    total_tokens_per_s: float = Field(
        default=0.0, description="input_tokens_per_s + output_tokens_per_s."
    )
    requests_per_s: float = Field(description="Completed requests / duration.")
    goodput_requests_per_s: float = Field(description="Requests meeting every per-request SLO / s.")
    error_rate: float = Field(description="failed / (completed + failed).")
    mean_prompt_tokens: float | None = Field(default=None, description="From usage.prompt_tokens.")
    mean_output_tokens: float | None = Field(
        default=None, description="From usage.completion_tokens."
    )
    prompt_token_mismatches: int = Field(
        default=0, description="Requests whose usage.prompt_tokens differs from the built prompt."
    )
    client_loop_lag_p99_ms: float | None = Field(
        default=None,
        description="The benchmark client's event-loop lag p99 while measuring, ms (None = not "
        "measured); high = the client, not the server, delayed responses.",
    )
    client_cpu_fraction: float | None = Field(
        default=None,
        description="The benchmark client's CPU seconds per wall second while measuring (the "
        "busiest client process); near 1 = the client was the bottleneck.",
    )

    def value(self, name: str) -> float | None:
        """A metric by name: ``output_tokens_per_s`` or ``ttft_ms.p99`` style; None if absent.

        Raises KeyError for a name that is not a metric.
        """
        if "." in name:
            metric, stat = name.split(".", 1)
            if metric not in LATENCY_METRICS or stat not in PERCENTILES:
                raise KeyError(name)
            dist: Distribution | None = getattr(self, metric)
            return None if dist is None else dist.get(stat)
        if name not in SCALAR_METRICS:
            raise KeyError(name)
        return float(getattr(self, name))


def metric_names() -> list[str]:
    """Every name ``ServingMetrics.value`` accepts."""
    return [*SCALAR_METRICS, *(f"{m}.{p}" for m in LATENCY_METRICS for p in PERCENTILES)]


def summarize(
    level: LoadLevel,
    records: Sequence[RequestRecord],
    bounds: RequestSloBounds | None = None,
    prompt_token_tolerance: int = 2,
) -> ServingMetrics:
    """Fold the records of one load level into ``ServingMetrics``.

    Warm-up records are counted in ``warmup`` and otherwise ignored (their errors too: only
    measured failures fill ``failed_by_kind`` and ``error_examples``, the latter with the first
    message, in issue order, of each error code). TTFT, E2E and TPOT come
    from successful requests, ITL from every gap of every successful request. Goodput counts
    requests meeting ``bounds`` (DistServe, OSDI'24; vLLM's ``--goodput``). A prompt whose
    server-side token count differs from the built one by more than ``prompt_token_tolerance``
    counts as a mismatch.
    """
    measured = [r for r in records if not r.warmup]
    warm = len(records) - len(measured)
    ok = [r for r in measured if r.ok]
    bad = [r for r in measured if not r.ok]
    kinds = Counter(r.error_kind or "no_output" for r in bad)
    examples: dict[str, str] = {}
    for r in bad:
        if r.error:
            examples.setdefault(r.error_kind or "no_output", r.error)
    starts = [r.sent_s for r in measured]
    ends = [
        r.done_s if r.done_s is not None else (r.chunk_times_s[-1] if r.chunk_times_s else r.sent_s)
        for r in measured
    ]
    duration = (max(ends) - min(starts)) if measured else 0.0
    out_tokens = sum(r.output_tokens or 0 for r in ok)
    in_tokens = sum(
        r.prompt_tokens if r.prompt_tokens is not None else (r.expected_prompt_tokens or 0)
        for r in ok
    )
    bounds = bounds or RequestSloBounds()
    good = sum(1 for r in ok if bounds.met_by(r))
    prompt_counts = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    out_counts = [r.output_tokens for r in ok if r.output_tokens is not None]
    mismatches = sum(
        1
        for r in ok
        if r.prompt_tokens is not None
        and r.expected_prompt_tokens is not None
        and abs(r.prompt_tokens - r.expected_prompt_tokens) > prompt_token_tolerance
    )

    def rate(n: float) -> float:
        return n / duration if duration > 0 else 0.0

    return ServingMetrics(
        level=level,
        completed=len(ok),
        failed=len(bad),
        failed_by_kind=dict(sorted(kinds.items())),
        error_examples=dict(sorted(examples.items())),
        warmup=warm,
        retried=sum(r.retries for r in measured),
        duration_s=duration,
        ttft_ms=distribution(v for r in ok if (v := r.ttft_ms()) is not None),
        tpot_ms=distribution(v for r in ok if (v := r.tpot_ms()) is not None),
        itl_ms=distribution(g for r in ok for g in r.itl_ms()),
        e2e_latency_ms=distribution(v for r in ok if (v := r.e2e_latency_ms()) is not None),
        output_tokens_per_s=rate(out_tokens),
        input_tokens_per_s=rate(in_tokens),
        total_tokens_per_s=rate(in_tokens + out_tokens),
        requests_per_s=rate(len(ok)),
        goodput_requests_per_s=rate(good),
        error_rate=(len(bad) / len(measured)) if measured else 0.0,
        mean_prompt_tokens=(sum(prompt_counts) / len(prompt_counts)) if prompt_counts else None,
        mean_output_tokens=(sum(out_counts) / len(out_counts)) if out_counts else None,
        prompt_token_mismatches=mismatches,
    )
