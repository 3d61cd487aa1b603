"""Serving metrics: per-request records in, per-load-level distributions and throughputs out.

Every formula servetune reports is defined here, once, as a pure function over plain records.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field

Percentile = Literal["mean", "p50", "p90", "p95", "p99", "max"]
"""Names of the statistics a ``Distribution`` holds."""

LatencyMetric = Literal["ttft_ms", "tpot_ms", "itl_ms", "itl_per_token_ms", "e2e_latency_ms"]
"""Per-request latency metrics (all in milliseconds)."""

LATENCY_METRICS: tuple[LatencyMetric, ...] = (
    "ttft_ms",
    "tpot_ms",
    "itl_ms",
    "itl_per_token_ms",
    "e2e_latency_ms",
)
SCALAR_METRICS: tuple[str, ...] = (
    "output_tokens_per_s",
    "raw_output_tokens_per_s",
    "requests_per_s",
    "goodput_requests_per_s",
    "error_rate",
)
PERCENTILES: tuple[Percentile, ...] = ("mean", "p50", "p90", "p95", "p99", "max")


class RequestRecord(BaseModel):
    """One benchmark request as the client saw it; times are monotonic seconds (same clock).

    ``chunk_times_s`` holds the arrival time of every streamed event that carried content, in
    order; ``event_tokens`` how many tokens each of those events carried, when known (same
    length; speculative decoding and server-side delta batching send several per event).
    ``output_tokens`` comes from the server's ``usage.completion_tokens`` when it sent one; else
    the client counted the streamed text with the model's tokenizer (or, failing that, counted
    one token per event), and ``output_tokens_estimated`` is True. ``max_tokens`` is the number
    of output tokens the request asked for. ``error_kind`` is None for a success, else a short
    stable code (``http_500``, ``connect``, ``timeout``, ``read``, ``short_output``…).
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
        default=None,
        description="usage.completion_tokens, else the client's count (output_tokens_estimated).",
    )
    output_tokens_estimated: bool = Field(
        default=False,
        description="True when output_tokens was counted by the client (no usage from the server).",
    )
    event_tokens: tuple[int, ...] | None = Field(
        default=None,
        description="Tokens carried by each content event (aligned with chunk_times_s); None = "
        "unknown (see tokens_per_event).",
    )
    max_tokens: int | None = Field(
        default=None, description="Output tokens the request asked for (max_tokens)."
    )
    event_texts: tuple[str, ...] | None = Field(
        default=None,
        exclude=True,
        description="Text of each content event, kept only until the client has counted its "
        "tokens (never serialized).",
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

        vLLM's definition (``benchmarks/benchmark_serving.py``) with the real token count (usage,
        else the tokenizer's count), never the event count; None with fewer than 2 tokens.
        """
        e2e, ttft, n = self.e2e_latency_ms(), self.ttft_ms(), self.output_tokens
        if e2e is None or ttft is None or n is None or n < 2:
            return None
        return (e2e - ttft) / (n - 1)

    def itl_ms(self) -> list[float]:
        """Inter-token latencies per event: every gap between consecutive content chunks, in ms.

        One value per gap, however many tokens the later event carried (vLLM's and today's
        definition); see ``itl_per_token_ms`` for the per-token view.
        """
        t = self.chunk_times_s
        return [(b - a) * 1000.0 for a, b in itertools.pairwise(t)]

    def tokens_per_event(self) -> list[int]:
        """Tokens carried by each content event, aligned with ``chunk_times_s``.

        ``event_tokens`` when known; else, when ``output_tokens`` exceeds the number of events,
        the tokens spread as evenly as possible (earlier events get the remainder); else one
        per event. Shape: ``len(chunk_times_s)`` non-negative ints.
        """
        n = len(self.chunk_times_s)
        if self.event_tokens is not None and len(self.event_tokens) == n:
            return list(self.event_tokens)
        total = self.output_tokens or 0
        if n == 0 or total <= n:
            return [1] * n
        base, extra = divmod(total, n)
        return [base + (1 if i < extra else 0) for i in range(n)]

    def itl_per_token_ms(self) -> list[float]:
        """Inter-token latencies per token, in ms: each gap ÷ the tokens of the event ending it.

        An event carrying k tokens after a gap of g ms contributes k values of g / k, so every
        token after the first event has one value (tokens arriving in the first event have no
        gap: they belong to TTFT). An event that carried no token (k = 0) adds nothing. With one
        token per event this equals ``itl_ms``.
        """
        out: list[float] = []
        per = self.tokens_per_event()
        for (a, b), k in zip(itertools.pairwise(self.chunk_times_s), per[1:], strict=True):
            if k > 0:
                out.extend([(b - a) * 1000.0 / k] * k)
        return out

    def credited_output_tokens(self) -> int:
        """Output tokens credited to throughput: at most ``max_tokens`` (when known).

        A server that generates past ``max_tokens`` does work nobody asked for; counting it would
        reward the bug (issue 5, item 1).
        """
        n = self.output_tokens or 0
        return min(n, self.max_tokens) if self.max_tokens is not None else n


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


WarningCode = Literal[
    "over_generation",
    "under_generation",
    "estimated_token_counts",
    "multi_token_events",
    "prompt_token_mismatch",
    "outside_load",
    "client_saturated",
]
"""Stable codes of ``MeasurementWarning``s (tools may match on them; the messages may change)."""

CLIENT_LOOP_LAG_P99_MAX_MS = 10.0
"""Event-loop lag p99 of the benchmark client above which its timings are suspect, ms.

A lag this long delays the timestamp of every token by as much; 10 ms is a tenth of a typical
100 ms TTFT SLO step and several times the lag of an idle asyncio loop (< 1 ms)."""

CLIENT_CPU_FRACTION_MAX = 0.9
"""Share of one core used by the benchmark client above which it is likely the bottleneck."""

DEFAULT_MAX_OUTSIDE_CPU_FRACTION = 0.5
"""Share of all cores that other processes may use during a measurement before the trial is
flagged (``outside_load``) and re-run; half the host leaves the engine and the client at least
the other half (issue 5, item 7)."""


class MeasurementWarning(BaseModel):
    """Something that makes a measurement less trustworthy than its numbers look.

    ``code`` is stable (see ``WarningCode``); ``message`` says what was seen, with counts and
    units; ``level`` names the load level (``concurrency=4``), None for the whole trial.
    """

    model_config = ConfigDict(frozen=True)

    code: WarningCode = Field(description="Stable code, e.g. over_generation.")
    message: str = Field(description="What was seen, for people.")
    level: str | None = Field(default=None, description="Load level label; None = whole trial.")


def format_warning(warning: MeasurementWarning) -> str:
    """One line for a warning, the same in every output: ``concurrency=4: code: message``."""
    head = f"{warning.level}: " if warning.level else ""
    return f"{head}{warning.code}: {warning.message}"


class ServingMetrics(BaseModel):
    """Everything measured at one load level (DESIGN.md §4).

    Throughputs divide by ``duration_s``: first measured request sent → last measured request
    done. Failed requests are counted in ``failed`` and ``failed_by_kind``, never dropped.
    ``output_tokens_per_s`` credits each request with at most the output tokens it asked for;
    ``raw_output_tokens_per_s`` counts every token returned. ``warnings`` is derived from the
    counts (never stored on its own), so every output shows the same ones.
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
        default=None, description="Inter-token latency per event (every gap between events)."
    )
    itl_per_token_ms: Distribution | None = Field(
        default=None,
        description="Inter-token latency per token (each gap ÷ the tokens of the event ending it).",
    )
    e2e_latency_ms: Distribution | None = Field(default=None, description="End-to-end latency.")
    output_tokens_per_s: float = Field(
        description="Output tokens of completed requests, at most max_tokens each, / duration."
    )
    raw_output_tokens_per_s: float = Field(
        default=0.0, description="Every output token returned by completed requests / duration."
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
        default=None,
        description="Mean output tokens returned (usage, else the client's count), uncapped.",
    )
    prompt_token_mismatches: int = Field(
        default=0, description="Requests whose usage.prompt_tokens differs from the built prompt."
    )
    prompt_token_tolerance: int = Field(
        default=2, description="The tolerance prompt_token_mismatches was counted with."
    )
    requested_output_tokens: int | None = Field(
        default=None, description="max_tokens of the requests (None if unknown)."
    )
    over_generated: int = Field(
        default=0, description="Completed requests that returned more than max_tokens tokens."
    )
    under_generated: int = Field(
        default=0,
        description="Requests (completed or failed short_output) that returned fewer than "
        "max_tokens tokens.",
    )
    min_output_tokens: int | None = Field(
        default=None, description="Fewest output tokens one request returned."
    )
    max_output_tokens: int | None = Field(
        default=None, description="Most output tokens one request returned."
    )
    estimated_output_tokens: int = Field(
        default=0,
        description="Completed requests whose output tokens were counted by the client (no usage).",
    )
    multi_token_event_requests: int = Field(
        default=0, description="Completed requests with at least one event carrying >1 token."
    )
    max_tokens_per_event: int | None = Field(
        default=None, description="Most tokens one streamed event carried."
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

    @computed_field(  # type: ignore[prop-decorator]
        description="Why these numbers may mislead; the same list in every output."
    )
    @property
    def warnings(self) -> list[MeasurementWarning]:
        """Warnings derived from this level's counts (see ``level_warnings``)."""
        return level_warnings(self)

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


def level_warnings(m: ServingMetrics) -> list[MeasurementWarning]:
    """The warnings of one level, in a fixed order, from its counts (pure).

    - ``over_generation``: requests returned more than ``max_tokens`` (tokens beyond it are not
      credited to ``output_tokens_per_s``; ``raw_output_tokens_per_s`` keeps them);
    - ``under_generation``: requests returned fewer (``short_output`` failures included);
    - ``estimated_token_counts``: the server sent no ``usage``; the client counted the tokens;
    - ``multi_token_events``: events carried several tokens, so per-event ITL (``itl_ms``) is not
      per-token ITL (``itl_per_token_ms``);
    - ``prompt_token_mismatch``: the server counted prompts differently from the client;
    - ``client_saturated``: the client's event-loop lag p99 > ``CLIENT_LOOP_LAG_P99_MAX_MS`` or its
      CPU share > ``CLIENT_CPU_FRACTION_MAX`` (the client, not the server, may set the pace).
    """
    out: list[MeasurementWarning] = []
    label = m.level.label
    asked = m.requested_output_tokens
    est = " (estimated counts)" if m.estimated_output_tokens else ""

    def add(code: WarningCode, message: str) -> None:
        out.append(MeasurementWarning(code=code, message=message, level=label))

    if m.over_generated:
        add(
            "over_generation",
            f"{m.over_generated} of {m.completed} requests returned more than the {asked} output "
            f"tokens asked for (up to {m.max_output_tokens}){est}; tokens beyond {asked} are not "
            f"credited: {m.output_tokens_per_s:.1f} tok/s credited, "
            f"{m.raw_output_tokens_per_s:.1f} returned",
        )
    if m.under_generated:
        add(
            "under_generation",
            f"{m.under_generated} requests returned fewer than the {asked} output tokens asked "
            f"for (as few as {m.min_output_tokens}){est}",
        )
    if m.estimated_output_tokens:
        add(
            "estimated_token_counts",
            f"the server sent no usage for {m.estimated_output_tokens} of {m.completed} requests; "
            "their output tokens were counted by the client (tokenizer, else one per event), "
            "so tok/s and TPOT are estimates",
        )
    if m.multi_token_event_requests:
        add(
            "multi_token_events",
            f"{m.multi_token_event_requests} of {m.completed} requests streamed events carrying "
            f"several tokens (up to {m.max_tokens_per_event}); itl_ms is per event, "
            "itl_per_token_ms per token",
        )
    if m.prompt_token_mismatches:
        add(
            "prompt_token_mismatch",
            f"{m.prompt_token_mismatches} prompts differ from the built length by more than "
            f"{m.prompt_token_tolerance} tokens (server mean {m.mean_prompt_tokens})",
        )
    lag, cpu = m.client_loop_lag_p99_ms, m.client_cpu_fraction
    why = []
    if lag is not None and lag > CLIENT_LOOP_LAG_P99_MAX_MS:
        why.append(f"event-loop lag p99 {lag:.1f} ms > {CLIENT_LOOP_LAG_P99_MAX_MS:g} ms")
    if cpu is not None and cpu > CLIENT_CPU_FRACTION_MAX:
        why.append(f"CPU {cpu:.0%} of a core > {CLIENT_CPU_FRACTION_MAX:.0%}")
    if why:
        add(
            "client_saturated",
            "the benchmark client was the bottleneck (" + "; ".join(why) + "): latencies include "
            "its own delay and throughput may be the client's",
        )
    return out


def outside_load_warning(
    outside_cpu_fraction: float | None, max_outside_cpu_fraction: float
) -> MeasurementWarning | None:
    """The ``outside_load`` warning when other processes used more than the limit, else None.

    Both are shares of all the host's cores over the benchmark window (0–1).
    """
    if outside_cpu_fraction is None or outside_cpu_fraction <= max_outside_cpu_fraction:
        return None
    return MeasurementWarning(
        code="outside_load",
        message=f"other processes used {outside_cpu_fraction:.0%} of all CPU cores while this "
        f"trial was measured (limit {max_outside_cpu_fraction:.0%}); its numbers may be low",
    )


def trial_warnings(
    metrics: Sequence[ServingMetrics],
    outside_cpu_fraction: float | None = None,
    max_outside_cpu_fraction: float = DEFAULT_MAX_OUTSIDE_CPU_FRACTION,
) -> list[MeasurementWarning]:
    """Every warning of one trial: each level's, in level order, then ``outside_load``."""
    out = [w for m in metrics for w in m.warnings]
    outside = outside_load_warning(outside_cpu_fraction, max_outside_cpu_fraction)
    if outside is not None:
        out.append(outside)
    return out


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
    from successful requests, ITL (per event and per token) from every gap of every successful
    request. Goodput counts requests meeting ``bounds`` (DistServe, OSDI'24; vLLM's
    ``--goodput``). A prompt whose server-side token count differs from the built one by more
    than ``prompt_token_tolerance`` counts as a mismatch.

    Token accounting: ``output_tokens_per_s`` = Σ min(output_tokens, max_tokens) / duration over
    completed requests; ``raw_output_tokens_per_s`` = Σ output_tokens / duration. Over- and
    under-generation compare each request's ``output_tokens`` with its ``max_tokens``
    (completed requests, plus ``short_output`` failures for under-generation).
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
    raw_tokens = sum(r.output_tokens or 0 for r in ok)
    credited_tokens = sum(r.credited_output_tokens() for r in ok)
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
    counted = [
        r
        for r in measured
        if r.output_tokens is not None
        and r.max_tokens is not None
        and (r.ok or r.error_kind == "short_output")
    ]
    over = [r for r in counted if r.ok and (r.output_tokens or 0) > (r.max_tokens or 0)]
    under = [r for r in counted if (r.output_tokens or 0) < (r.max_tokens or 0)]
    seen = [r.output_tokens for r in counted if r.output_tokens is not None]
    asked = Counter(r.max_tokens for r in measured if r.max_tokens is not None)
    per_event = [max(r.tokens_per_event(), default=1) for r in ok]

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
        itl_per_token_ms=distribution(g for r in ok for g in r.itl_per_token_ms()),
        e2e_latency_ms=distribution(v for r in ok if (v := r.e2e_latency_ms()) is not None),
        output_tokens_per_s=rate(credited_tokens),
        raw_output_tokens_per_s=rate(raw_tokens),
        input_tokens_per_s=rate(in_tokens),
        total_tokens_per_s=rate(in_tokens + credited_tokens),
        requests_per_s=rate(len(ok)),
        goodput_requests_per_s=rate(good),
        error_rate=(len(bad) / len(measured)) if measured else 0.0,
        mean_prompt_tokens=(sum(prompt_counts) / len(prompt_counts)) if prompt_counts else None,
        mean_output_tokens=(sum(out_counts) / len(out_counts)) if out_counts else None,
        prompt_token_mismatches=mismatches,
        prompt_token_tolerance=prompt_token_tolerance,
        requested_output_tokens=asked.most_common(1)[0][0] if asked else None,
        over_generated=len(over),
        under_generated=len(under),
        min_output_tokens=min(seen) if seen else None,
        max_output_tokens=max(seen) if seen else None,
        estimated_output_tokens=sum(1 for r in ok if r.output_tokens_estimated),
        multi_token_event_requests=sum(1 for k in per_event if k > 1),
        max_tokens_per_event=max(per_event) if per_event else None,
    )
