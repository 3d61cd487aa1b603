"""The Strategy protocol (ask/tell between search and execution), its bookkeeping, the factory.

A strategy's proposals depend only on the spec (its seed included) and on what it was told.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Protocol

from servetune.core.space import (
    BoolParam,
    ChoiceParam,
    FloatParam,
    IntParam,
    LogParam,
    Param,
    SearchSpace,
)
from servetune.core.study import FailureKind, Params, ParamValue, TrialState

if TYPE_CHECKING:
    from servetune.core.spec import StudySpec

ParamsKey = tuple[tuple[str, str, ParamValue], ...]
"""Hashable identity of a params dict: sorted (name, type tag, value) triples."""


@dataclass(frozen=True, slots=True)
class Suggestion:
    """What ``Strategy.ask`` returns: params to try, and the ``token`` to tell the outcome."""

    token: int
    params: Params


class Strategy(Protocol):
    """What to try next. Only the process that owns the study holds one; workers see plain params.

    ``ask`` proposes params (None = nothing left to try, e.g. a grid is done); ``tell`` reports the
    outcome of a proposal by its token; ``replay`` feeds a stored trial on resume without asking.
    """

    def ask(self) -> Suggestion | None:
        """Next params to try, or None when the space is exhausted."""
        ...

    def tell(
        self,
        token: int,
        state: TrialState,
        values: list[float] | None,
        slo_miss: float | None = None,
        failure_kind: FailureKind | None = None,
    ) -> None:
        """Report the outcome of the suggestion ``token``.

        ``state`` is COMPLETE, PRUNED or FAIL. ``values`` holds one objective value per term for
        a COMPLETE trial (ignored otherwise). ``slo_miss`` is ``SloReport.total_miss`` (> 0 means
        infeasible; None = no SLO report, feasible). ``failure_kind`` says why a FAIL failed;
        None counts as deterministic (the params are not proposed again). Raises ValueError for
        an unknown or already told token, an unfinished state, or a wrong number of values.
        """
        ...

    def replay(
        self,
        params: Mapping[str, ParamValue],
        state: TrialState,
        values: list[float] | None,
        slo_miss: float | None = None,
        failure_kind: FailureKind | None = None,
    ) -> bool:
        """Add a stored, finished trial to the history (on resume), as ``tell`` would have.

        Returns False, recording nothing, when ``params`` is not a point of the space (e.g. the
        baseline's ``{}``). Raises ValueError like ``tell`` for a bad state or values.
        """
        ...

    def add_pending(self, params: Mapping[str, ParamValue]) -> Suggestion | None:
        """Record ``params``, already running (a trial adopted from a worker on resume), as a
        pending proposal, exactly as if ``ask`` had returned it: a grid does not propose it,
        a sampler sees it as running; tell its outcome with the returned token. None, recording
        nothing, when ``params`` is not a point of the space (e.g. the baseline's ``{}``).
        """
        ...


def make_strategy(spec: StudySpec) -> Strategy:
    """The strategy ``spec.strategy.kind`` names, over ``spec.space`` with the spec's seed.

    ``grid`` → ``GridStrategy``; ``random``, ``tpe``, ``gp``, ``nsga2`` → ``OptunaStrategy``.
    Raises ValueError when the strategy cannot run here: a grid over a float param without
    ``step``, or ``gp`` without torch and scipy installed.
    """
    n_values = len(spec.objective.terms)
    if spec.strategy.kind == "grid":
        from servetune.core.strategies.grid import GridStrategy

        return GridStrategy(spec.space, n_values=n_values)
    from servetune.core.strategies.optuna import OptunaStrategy

    return OptunaStrategy.from_spec(spec)


# ---- space membership ---------------------------------------------------------------------

_REL_TOL = 1e-9


def _number(v: ParamValue) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    x = float(v)
    return x if math.isfinite(x) else None


def _within(x: float, low: float, high: float) -> bool:
    tol = _REL_TOL * max(1.0, abs(low), abs(high))
    return low - tol <= x <= high + tol


def snap_to_step(low: float, step: float, x: float) -> float:
    """``x`` moved to the nearest ``low + k·step``, rounded like ``FloatParam.grid`` (12 places)."""
    return round(low + round((x - low) / step) * step, 12)


def stepped_high(low: float, high: float, step: float) -> float:
    """The largest ``low + k·step`` ≤ ``high``: the last point of ``FloatParam.grid``."""
    n = math.floor((high - low) / step + 1e-9)
    return round(low + n * step, 12)


def canonical_value(param: Param, v: ParamValue) -> ParamValue | None:
    """``v`` as ``param`` spells it (the choice object itself, a stepped float snapped), or None
    when ``v`` is not an allowed value of ``param``.
    """
    if isinstance(param, BoolParam):
        return v if isinstance(v, bool) else None
    if isinstance(param, ChoiceParam):
        for c in param.values:
            if isinstance(c, bool) != isinstance(v, bool):
                continue
            if isinstance(c, str) != isinstance(v, str):
                continue
            if c == v:
                return c
        return None
    x = _number(v)
    if x is None:
        return None
    if isinstance(param, IntParam):
        if not x.is_integer() or not param.low <= x <= param.high:
            return None
        i = int(x)
        return i if param.log or (i - param.low) % param.step == 0 else None
    if isinstance(param, LogParam):
        return x if _within(x, param.low, param.high) else None
    assert isinstance(param, FloatParam)
    if param.step is None:
        return x if _within(x, param.low, param.high) else None
    if not _within(x, param.low, stepped_high(param.low, param.high, param.step)):
        return None
    k = (x - param.low) / param.step
    if abs(k - round(k)) > 1e-6:
        return None
    return snap_to_step(param.low, param.step, x)


def canonical_params(space: SearchSpace, params: Mapping[str, ParamValue]) -> Params | None:
    """``params`` with every value canonical (see ``canonical_value``), or None when it is not a
    point of ``space``: a name missing or extra, or a value not allowed. Constraints between params
    are not checked here (see ``SearchSpace.violations``).
    """
    if set(params) != set(space.params):
        return None
    out: Params = {}
    for name, param in space.params.items():
        v = canonical_value(param, params[name])
        if v is None:
            return None
        out[name] = v
    return out


def params_key(params: Mapping[str, ParamValue]) -> ParamsKey:
    """Hashable identity of ``params`` (True and 1 differ; 2 and 2.0 are the same number)."""

    def tag(v: ParamValue) -> str:
        return "bool" if isinstance(v, bool) else "str" if isinstance(v, str) else "num"

    return tuple(sorted((k, tag(v), v) for k, v in params.items()))


# ---- history shared by every strategy -----------------------------------------------------


class Seen(Enum):
    """What the history says about a point, most binding first."""

    FRESH = "fresh"
    """Never tried, or only failed for a reason that may not repeat."""
    PENDING = "pending"
    """Proposed and not told yet."""
    FAILED = "failed"
    """Failed deterministically: the same params would fail again."""
    DONE = "done"
    """Finished COMPLETE or PRUNED: trying it again only re-measures it."""


@dataclass(frozen=True, slots=True)
class Record:
    """One finished trial as a strategy knows it (told or replayed), in canonical params."""

    params: Params
    state: TrialState
    values: list[float] | None
    slo_miss: float
    failure_kind: FailureKind | None

    @property
    def usable_values(self) -> list[float] | None:
        """The objective values when COMPLETE and every one is finite, else None."""
        if self.state is not TrialState.COMPLETE or self.values is None:
            return None
        return self.values if all(math.isfinite(v) for v in self.values) else None


@dataclass
class History:
    """The told trials and the pending proposals of one strategy, and what each point has seen.

    ``n_values`` is the number of objective terms a COMPLETE trial's values must have.
    """

    space: SearchSpace
    n_values: int
    records: list[Record] = field(default_factory=list)
    pending: dict[int, Params] = field(default_factory=dict)
    _next_token: int = 0
    _pending_keys: dict[ParamsKey, int] = field(default_factory=dict)
    _failed: set[ParamsKey] = field(default_factory=set)
    _done: set[ParamsKey] = field(default_factory=set)
    _told: set[ParamsKey] = field(default_factory=set)

    def seen(self, params: Mapping[str, ParamValue]) -> Seen:
        """What the history says about ``params`` (canonical params expected)."""
        key = params_key(params)
        if key in self._pending_keys:
            return Seen.PENDING
        if key in self._failed:
            return Seen.FAILED
        if key in self._done:
            return Seen.DONE
        return Seen.FRESH

    def tried(self, params: Mapping[str, ParamValue]) -> bool:
        """True when ``params`` is pending or was told or replayed, whatever the outcome."""
        key = params_key(params)
        return key in self._pending_keys or key in self._told

    def issue(self, params: Params) -> Suggestion:
        """Record ``params`` as pending and return its suggestion (tokens count up from 0)."""
        token = self._next_token
        self._next_token += 1
        self.pending[token] = dict(params)
        key = params_key(params)
        self._pending_keys[key] = self._pending_keys.get(key, 0) + 1
        return Suggestion(token=token, params=dict(params))

    def tell(
        self,
        token: int,
        state: TrialState,
        values: list[float] | None,
        slo_miss: float | None,
        failure_kind: FailureKind | None,
    ) -> Record:
        """Move the pending ``token`` to the records (see ``Strategy.tell``)."""
        if token not in self.pending:
            raise ValueError(f"unknown token {token}: it was never asked, or was already told")
        record = self._record(self.pending[token], state, values, slo_miss, failure_kind)
        params = self.pending.pop(token)
        key = params_key(params)
        self._pending_keys[key] -= 1
        if self._pending_keys[key] == 0:
            del self._pending_keys[key]
        self._add(record)
        return record

    def replay(
        self,
        params: Mapping[str, ParamValue],
        state: TrialState,
        values: list[float] | None,
        slo_miss: float | None,
        failure_kind: FailureKind | None,
    ) -> Record | None:
        """Add a stored trial (see ``Strategy.replay``); None if ``params`` is not in the space."""
        point = canonical_params(self.space, params)
        record = self._record(point or {}, state, values, slo_miss, failure_kind)
        if point is None:
            return None
        self._add(record)
        return record

    def _record(
        self,
        params: Params,
        state: TrialState,
        values: list[float] | None,
        slo_miss: float | None,
        failure_kind: FailureKind | None,
    ) -> Record:
        if not state.is_finished():
            raise ValueError(f"tell a finished state (COMPLETE, PRUNED or FAIL), not {state.value}")
        if state is TrialState.COMPLETE and values is not None and len(values) != self.n_values:
            raise ValueError(f"expected {self.n_values} objective value(s), got {len(values)}")
        if slo_miss is not None and math.isnan(slo_miss):
            raise ValueError("slo_miss is NaN; pass SloReport.total_miss (≥ 0) or None")
        return Record(
            params=params,
            state=state,
            values=list(values) if state is TrialState.COMPLETE and values is not None else None,
            slo_miss=max(0.0, slo_miss or 0.0) if state is TrialState.COMPLETE else 0.0,
            failure_kind=failure_kind if state is TrialState.FAIL else None,
        )

    def _add(self, record: Record) -> None:
        self.records.append(record)
        key = params_key(record.params)
        self._told.add(key)
        if record.state is TrialState.FAIL:
            if record.failure_kind is None or record.failure_kind.is_deterministic():
                self._failed.add(key)
        else:
            self._done.add(key)


class HistoryStrategy:
    """Shared ``tell``/``replay`` of strategies that keep their outcomes in a ``History``.

    Subclasses set ``self._history`` and implement ``ask``.
    """

    _history: History

    def tell(
        self,
        token: int,
        state: TrialState,
        values: list[float] | None,
        slo_miss: float | None = None,
        failure_kind: FailureKind | None = None,
    ) -> None:
        """Record the outcome of ``token`` (see ``Strategy.tell``); the next ask learns from it."""
        self._history.tell(token, state, values, slo_miss, failure_kind)

    def replay(
        self,
        params: Mapping[str, ParamValue],
        state: TrialState,
        values: list[float] | None,
        slo_miss: float | None = None,
        failure_kind: FailureKind | None = None,
    ) -> bool:
        """Add a stored trial to the history (see ``Strategy.replay``); False when ``params`` are
        not a point of the space (e.g. the baseline's ``{}``)."""
        return self._history.replay(params, state, values, slo_miss, failure_kind) is not None

    def add_pending(self, params: Mapping[str, ParamValue]) -> Suggestion | None:
        """Record running ``params`` as pending (see ``Strategy.add_pending``); None when they
        are not a point of the space."""
        point = canonical_params(self._history.space, params)
        return self._history.issue(point) if point is not None else None
