"""The loop's hook into core/feasibility.py: stored failed trials → directed failures →
the infeasible region (if any) that rules out the next params, with its message.
"""

from __future__ import annotations

from collections.abc import Sequence

from servetune.core.feasibility import (
    DirectedFailure,
    InfeasibleRegion,
    blocking_region,
    infeasible_regions,
)
from servetune.core.space import ChoiceParam, IntParam, SearchSpace
from servetune.core.study import Params, Trial, TrialState
from servetune.engines.base import Engine


def directed_failures(trials: Sequence[Trial], engine: Engine) -> list[DirectedFailure]:
    """One DirectedFailure per failed trial and direction whose flag the trial set, from the
    engine's ``failure_directions(kind, reason)`` (engines without it give none)."""
    directions_of = getattr(engine, "failure_directions", None)
    if directions_of is None:
        return []
    out: list[DirectedFailure] = []
    for t in trials:
        if t.state is not TrialState.FAIL or t.failure_kind is None:
            continue
        reason = t.result.failure_reason if t.result is not None else None
        for d in directions_of(t.failure_kind, reason or ""):
            if d.flag in t.params:
                out.append(DirectedFailure(t.number, dict(t.params), d, str(t.failure_kind)))
    return out


def grids(space: SearchSpace) -> dict[str, list[float]]:
    """The values each discrete numeric param can take (int ranges with their step, numeric
    choices); continuous params are left out (see infeasible_regions)."""
    out: dict[str, list[float]] = {}
    for name, p in space.params.items():
        if isinstance(p, IntParam) and (p.high - p.low) // p.step <= 10_000:
            out[name] = [float(v) for v in range(p.low, p.high + 1, p.step)]
        elif isinstance(p, ChoiceParam):
            nums = [
                float(v) for v in p.values if isinstance(v, int | float) and not isinstance(v, bool)
            ]
            if nums:
                out[name] = nums
    return out


def infeasible_for(
    trials: Sequence[Trial], engine: Engine, space: SearchSpace, params: Params
) -> InfeasibleRegion | None:
    """The region, found from ``trials``' failures, that rules ``params`` out (None if none)."""
    failures = directed_failures(trials, engine)
    if not failures:
        return None
    return blocking_region(infeasible_regions(failures, grids(space)), params)
