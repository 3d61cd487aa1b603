"""Infeasible regions of one flag, from start-up failures that say which way the flag must move.

Pure: given failed trials with (flag, value, direction) it finds where no value can work, so the
study stops probing back and forth between "too little" and "too much" of one flag.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from servetune.core.study import Params, ParamValue

Change = Literal["increase", "decrease"]


@dataclass(frozen=True)
class Direction:
    """Which way ``flag`` must move for the failure to go away: ``"increase"`` or ``"decrease"``."""

    flag: str
    change: Change

    def text(self) -> str:
        """``"raise mem-fraction-static"`` / ``"lower cuda-graph-max-bs"``."""
        return f"{'raise' if self.change == 'increase' else 'lower'} {self.flag}"


@dataclass(frozen=True)
class DirectedFailure:
    """One failed trial's evidence about one flag: at ``params[flag]`` it needed ``change``.

    ``params`` are the trial's full params (the flag included); ``trial`` its number; ``kind`` the
    failure code (e.g. ``kv_cache_too_small``) used in the message.
    """

    trial: int
    params: Params
    direction: Direction
    kind: str

    @property
    def value(self) -> float | None:
        """The flag's numeric value in this trial (None when absent or not a number)."""
        return _number(self.params.get(self.direction.flag))


@dataclass(frozen=True)
class InfeasibleRegion:
    """Values of ``flag`` that cannot work while the other params equal ``context``.

    Every value ≤ ``needs_more_at`` failed or would fail for lack of it (monotone: less is
    worse), and every value ≥ ``needs_less_at`` for excess. ``closed`` is True when no value is
    left between them (they are neighbours on the flag's grid, or they cross), so the flag has
    no working value at all in this context; else only the open gap between them may work.
    """

    flag: str
    context: Params
    needs_more_at: float
    needs_less_at: float
    closed: bool
    message: str

    def blocks(self, params: Mapping[str, ParamValue]) -> bool:
        """True when ``params`` (same context) puts the flag where it cannot work."""
        if {k: v for k, v in params.items() if k != self.flag} != dict(self.context):
            return False
        v = _number(params.get(self.flag))
        if v is None:
            return False
        if self.closed:
            return True
        return v <= self.needs_more_at or v >= self.needs_less_at


def infeasible_regions(
    failures: Sequence[DirectedFailure],
    grids: Mapping[str, Sequence[float]] | None = None,
) -> list[InfeasibleRegion]:
    """Regions where a flag has been seen failing in both directions, one per (flag, context).

    Failures are grouped by flag and by the values of every other param (a direction only holds
    with the rest unchanged). In a group, ``a`` = the largest value that needed more and ``b`` =
    the smallest value that needed less; when both exist the region is found. It is ``closed``
    when ``a ≥ b`` (contradictory evidence) or when ``grids[flag]`` (the values the space can
    take, for discrete params) holds no value strictly between ``a`` and ``b``. Returns them
    sorted by flag. Pure; ``grids`` None = every flag continuous.
    """
    groups: dict[tuple[str, tuple[tuple[str, str], ...]], list[DirectedFailure]] = {}
    for f in failures:
        if f.value is None:
            continue
        ctx = tuple(sorted((k, repr(v)) for k, v in f.params.items() if k != f.direction.flag))
        groups.setdefault((f.direction.flag, ctx), []).append(f)
    regions: list[InfeasibleRegion] = []
    for (flag, _), group in sorted(groups.items()):
        more = [f for f in group if f.direction.change == "increase"]
        less = [f for f in group if f.direction.change == "decrease"]
        if not more or not less:
            continue
        hi_more = max(more, key=lambda f: f.value or 0.0)
        lo_less = min(less, key=lambda f: f.value or 0.0)
        a, b = float(hi_more.value or 0.0), float(lo_less.value or 0.0)
        grid = (grids or {}).get(flag)
        closed = a >= b or (grid is not None and not any(a < float(g) < b for g in grid))
        context = {k: v for k, v in hi_more.params.items() if k != flag}
        regions.append(
            InfeasibleRegion(
                flag=flag,
                context=context,
                needs_more_at=a,
                needs_less_at=b,
                closed=closed,
                message=_message(flag, hi_more, lo_less, a, b, closed, context),
            )
        )
    return regions


def _message(
    flag: str,
    more: DirectedFailure,
    less: DirectedFailure,
    a: float,
    b: float,
    closed: bool,
    context: Params,
) -> str:
    ctx = ", ".join(f"{k}={v}" for k, v in sorted(context.items())) or "the engine's defaults"
    evidence = (
        f"{flag}={a:g} needed more ({more.kind}, trial {more.trial}) and {flag}={b:g} needed "
        f"less ({less.kind}, trial {less.trial}) with {ctx}"
    )
    if closed:
        return (
            f"infeasible region: {evidence}; no value of {flag} works with these other params, so "
            f"servetune stops probing {flag} here: change another flag (a smaller batch or graph "
            "size, a shorter context, more GPUs) or a bigger GPU"
        )
    return (
        f"infeasible region: {evidence}; values ≤ {a:g} and ≥ {b:g} are not tried again with "
        f"these other params; only {a:g} < {flag} < {b:g} may still work"
    )


def blocking_region(
    regions: Sequence[InfeasibleRegion], params: Mapping[str, ParamValue]
) -> InfeasibleRegion | None:
    """The first region that rules ``params`` out (None when none does)."""
    return next((r for r in regions if r.blocks(params)), None)


def _number(v: ParamValue | None) -> float | None:
    if v is None or isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v)
