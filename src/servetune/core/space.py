"""Search spaces: the allowed values of each engine flag, constraints between flags, grid points.

Param names are the engine's own CLI flag names without leading dashes (``batch-size``).
"""

from __future__ import annotations

import itertools
import math
import operator
import random
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

ParamValue = int | float | str | bool

MAX_PARAM_MAGNITUDE = 2**53
"""Largest |low|, |high| or choice value of a numeric param: every integer up to 2^53 is exact as
a float, which constraints compute in (IEEE 754 double precision)."""
MAX_GRID_POINTS = 100_000
"""Largest full grid (every combination, before constraints) the grid strategy accepts. At a
minute or more per trial, 100,000 points is months of trials; a bigger grid is only ever walked
along its first corner, so tpe or random explores it better."""
MAX_ENUMERATED_POINTS = 200_000
"""Largest product of the params tied together by constraints that is enumerated to count the
feasible points exactly (about a second); bigger groups are sampled instead."""
FEASIBILITY_SAMPLES = 10_000
"""Seeded random points drawn per constraint group when it is too large to count or continuous."""
MAX_CHOICES = 10_000
"""Most values a choice param may list."""
MAX_CONSTRAINTS = 100
"""Most constraints a space may have."""
MAX_PARAMS = 64
"""Most params a space may tune (llama-server has about 200 flags; few matter for serving)."""

_Bounded = Annotated[
    float, Field(allow_inf_nan=False, ge=-MAX_PARAM_MAGNITUDE, le=MAX_PARAM_MAGNITUDE)
]
_BoundedInt = Annotated[int, Field(ge=-MAX_PARAM_MAGNITUDE, le=MAX_PARAM_MAGNITUDE)]


def finite_value(v: ParamValue) -> ParamValue:
    """``v`` unchanged; raises ValueError for a float that is NaN, ±inf or beyond ±2^53."""
    if isinstance(v, float) and (not math.isfinite(v) or abs(v) > MAX_PARAM_MAGNITUDE):
        raise ValueError(f"{v!r} is not a finite number within ±2^53; give a plain number")
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_PARAM_MAGNITUDE:
        raise ValueError(f"{v} is beyond ±2^53 (9007199254740992); give a smaller number")
    return v


FiniteParamValue = Annotated[ParamValue, AfterValidator(finite_value)]
"""A param value whose numbers are finite and within ±2^53."""


class IntParam(BaseModel):
    """Integers in [low, high] on a ``step`` grid (or log-uniform when ``log``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["int"] = "int"
    low: _BoundedInt = Field(description="Smallest value (inclusive), within ±2^53.")
    high: _BoundedInt = Field(description="Largest value (inclusive), within ±2^53.")
    step: int = Field(
        default=1,
        ge=1,
        le=MAX_PARAM_MAGNITUDE,
        description="Grid step; values are low, low+step, …",
    )
    log: bool = Field(default=False, description="Sample log-uniformly (step must be 1).")

    @model_validator(mode="after")
    def _check(self) -> IntParam:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be ≤ high ({self.high}); swap them")
        if self.log and (self.low < 1 or self.step != 1):
            raise ValueError("log=true needs low ≥ 1 and step = 1")
        return self

    def grid(self) -> list[ParamValue]:
        """Every value, low to high; log params use powers of two within range plus the ends."""
        if self.log:
            vals = {self.low, self.high}
            p = 1
            while p <= self.high:
                if p >= self.low:
                    vals.add(p)
                p *= 2
            return sorted(vals)
        return list(range(self.low, self.high + 1, self.step))

    def grid_count(self) -> int:
        """``len(self.grid())`` without building the grid."""
        if self.log:
            return len(self.grid())  # at most 55 values: powers of two up to 2^53 and the ends
        return (self.high - self.low) // self.step + 1


class FloatParam(BaseModel):
    """Floats in [low, high]; a grid needs ``step``."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["float"] = "float"
    low: _Bounded = Field(description="Smallest value (inclusive), finite, within ±2^53.")
    high: _Bounded = Field(description="Largest value (inclusive), finite, within ±2^53.")
    step: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="Grid step (needed by the grid strategy), finite.",
    )

    @model_validator(mode="after")
    def _check(self) -> FloatParam:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be ≤ high ({self.high}); swap them")
        return self

    def grid(self) -> list[ParamValue]:
        """low, low+step, … ≤ high. Raises ValueError without ``step``."""
        if self.step is None:
            raise ValueError(
                "a float param needs `step` for the grid strategy; add step or use tpe"
            )
        n = math.floor((self.high - self.low) / self.step + 1e-9)
        return [round(self.low + i * self.step, 12) for i in range(n + 1)]

    def grid_count(self) -> int:
        """``len(self.grid())`` without building the grid. Raises ValueError without ``step``."""
        if self.step is None:
            self.grid()
        assert self.step is not None
        return math.floor((self.high - self.low) / self.step + 1e-9) + 1


class LogParam(BaseModel):
    """Positive floats in [low, high], sampled log-uniformly; a grid needs ``points``."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["log"] = "log"
    low: float = Field(
        gt=0,
        le=MAX_PARAM_MAGNITUDE,
        allow_inf_nan=False,
        description="Smallest value (> 0, inclusive).",
    )
    high: float = Field(
        gt=0, le=MAX_PARAM_MAGNITUDE, allow_inf_nan=False, description="Largest value (inclusive)."
    )
    points: int = Field(
        default=5, ge=2, le=MAX_CHOICES, description="Grid points, spaced geometrically."
    )

    @model_validator(mode="after")
    def _check(self) -> LogParam:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be ≤ high ({self.high}); swap them")
        return self

    def grid(self) -> list[ParamValue]:
        """``points`` values spaced geometrically from low to high."""
        ratio = (self.high / self.low) ** (1 / (self.points - 1))
        return [self.low * ratio**i for i in range(self.points)]

    def grid_count(self) -> int:
        """``len(self.grid())``: ``points``."""
        return self.points


class ChoiceParam(BaseModel):
    """One of a list of values (strings or numbers)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["choice"] = "choice"
    values: list[FiniteParamValue] = Field(
        min_length=1,
        max_length=MAX_CHOICES,
        description="The allowed values, in order (at most 10,000; numbers finite).",
    )

    @field_validator("values")
    @classmethod
    def _unique(cls, v: list[ParamValue]) -> list[ParamValue]:
        if len({repr(x) for x in v}) != len(v):
            raise ValueError("values must be unique; remove the repeats")
        return v

    def grid(self) -> list[ParamValue]:
        """The values, in order."""
        return list(self.values)

    def grid_count(self) -> int:
        """Number of values."""
        return len(self.values)


class BoolParam(BaseModel):
    """A switch: false or true."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["bool"] = "bool"

    def grid(self) -> list[ParamValue]:
        """[False, True]."""
        return [False, True]

    def grid_count(self) -> int:
        """2."""
        return 2


Param = Annotated[
    IntParam | FloatParam | LogParam | ChoiceParam | BoolParam, Field(discriminator="kind")
]
"""One flag's allowed values, chosen by ``kind``: int, float, log, choice, bool."""

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    "<": operator.lt,
    ">=": operator.ge,
    ">": operator.gt,
    "==": operator.eq,
    "!=": operator.ne,
}
_TERM = re.compile(r"^\s*([A-Za-z0-9_.\-]+(?:\s*\*\s*[A-Za-z0-9_.\-]+)*)\s*$")
_NUMBER = re.compile(r"^-?\d+(\.\d+)?$")


class Constraint(BaseModel):
    """A relation between params, written ``"ubatch-size <= batch-size"`` or ``"parallel * 256 <= ctx-size"``.

    Each side is a product of param names and numbers; the operator is one of <= < >= > == !=.
    A candidate that breaks a constraint is never launched.
    """

    model_config = ConfigDict(frozen=True)
    text: str = Field(description="The constraint as written.")
    left: tuple[str, ...]
    op: str
    right: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Constraint:
        """Parse ``text``; raises ValueError naming the problem and the accepted form."""
        for op in ("<=", ">=", "==", "!=", "<", ">"):
            if op in text:
                lhs, rhs = text.split(op, 1)
                break
        else:
            raise ValueError(
                f"constraint {text!r} has no operator; write e.g. 'ubatch-size <= batch-size'"
            )
        sides = []
        for side in (lhs, rhs):
            m = _TERM.match(side)
            if not m:
                raise ValueError(
                    f"constraint {text!r}: {side.strip()!r} is not a product of names and numbers"
                )
            sides.append(tuple(t.strip() for t in m.group(1).split("*")))
        return cls(text=text, left=sides[0], op=op, right=sides[1])

    def names(self) -> set[str]:
        """Param names the constraint mentions."""
        return {t for t in (*self.left, *self.right) if not _NUMBER.match(t)}

    def holds(self, values: Mapping[str, ParamValue]) -> bool:
        """True when the relation holds for ``values`` (every mentioned name must be present).

        Raises KeyError for a missing name.
        """

        def product(terms: tuple[str, ...]) -> float:
            out = 1.0
            for t in terms:
                out *= float(t) if _NUMBER.match(t) else float(values[t])
            return out

        return _OPS[self.op](product(self.left), product(self.right))


def _check_constraint_syntax(text: str) -> str:
    Constraint.parse(text)
    return text


ConstraintText = Annotated[str, AfterValidator(_check_constraint_syntax)]
"""A constraint as written; its syntax is checked item by item, so every bad one is reported."""


class SearchSpace(BaseModel):
    """The params to tune and the constraints between them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    params: dict[str, Param] = Field(
        min_length=1,
        max_length=MAX_PARAMS,
        description="Flag name (engine CLI name, no dashes) → allowed values (at most 64).",
    )
    constraints: list[ConstraintText] = Field(
        default_factory=list,
        max_length=MAX_CONSTRAINTS,
        description="Relations such as 'ubatch-size <= batch-size' (at most 100).",
    )

    @field_validator("params")
    @classmethod
    def _names(cls, v: dict[str, Param]) -> dict[str, Param]:
        for name in v:
            if name.startswith("-"):
                raise ValueError(
                    f"param {name!r}: write the flag without dashes, e.g. {name.lstrip('-')!r}"
                )
        return v

    @model_validator(mode="after")
    def _constraints(self) -> SearchSpace:
        problems = []
        for text in self.constraints:
            unknown = Constraint.parse(text).names() - set(self.params)
            if unknown:
                problems.append(
                    f"constraint {text!r} names {sorted(unknown)}, which are not params of the "
                    f"space; use one of {sorted(self.params)}"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def parsed_constraints(self) -> list[Constraint]:
        """The constraints, parsed."""
        return [Constraint.parse(t) for t in self.constraints]

    def violations(self, values: Mapping[str, ParamValue]) -> list[str]:
        """The constraints ``values`` break (empty when it is allowed)."""
        return [c.text for c in self.parsed_constraints() if not c.holds(values)]

    def grid_points(self) -> Iterator[dict[str, ParamValue]]:
        """Every point of the full grid that meets the constraints, in a fixed order, no repeats.

        Raises ValueError when a param has no grid (a float without ``step``).
        """
        names = sorted(self.params)
        axes = [self.params[n].grid() for n in names]
        constraints = self.parsed_constraints()
        for combo in itertools.product(*axes):
            point = dict(zip(names, combo, strict=True))
            if all(c.holds(point) for c in constraints):
                yield point

    def full_grid_count(self) -> int:
        """Number of grid points before constraints (the product of each param's grid count),
        computed without building any grid. Raises ValueError when a param has no grid."""
        return math.prod(p.grid_count() for p in self.params.values())

    def grid_size(self) -> int:
        """Number of grid points that meet the constraints, counted without walking the full
        product (see ``count_feasible``). Raises ValueError when a param has no grid, or when a
        group of params tied by constraints has more than ``MAX_ENUMERATED_POINTS`` points."""
        for name, param in self.params.items():
            try:
                param.grid_count()
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from e
        feasibility = self.feasibility(grid=True, samples=0)
        if feasibility.exact_count is None:
            raise ValueError(
                f"params {sorted(feasibility.uncounted)} are tied by constraints over more than "
                f"{MAX_ENUMERATED_POINTS:,} grid points; coarsen their steps"
            )
        return feasibility.exact_count

    def groups(self) -> list[tuple[list[str], list[Constraint]]]:
        """The params tied together by constraints (connected through shared names), each with
        its constraints, in name order; params no constraint names are left out."""
        parent = {n: n for n in self.params}

        def root(n: str) -> str:
            while parent[n] != n:
                parent[n] = parent[parent[n]]
                n = parent[n]
            return n

        parsed = self.parsed_constraints()
        for c in parsed:
            names = sorted(c.names())
            for other in names[1:]:
                parent[root(other)] = root(names[0])
        by_root: dict[str, tuple[list[str], list[Constraint]]] = {}
        for c in parsed:
            names = sorted(c.names())
            if not names:  # numbers only, e.g. '1 <= 2': true or false for every point
                by_root.setdefault("", ([], []))[1].append(c)
                continue
            by_root.setdefault(root(names[0]), ([], []))[1].append(c)
        for n in sorted(self.params):
            if root(n) in by_root and n not in by_root[root(n)][0]:
                by_root[root(n)][0].append(n)
        return [by_root[k] for k in sorted(by_root)]

    def feasibility(
        self, *, grid: bool, samples: int = FEASIBILITY_SAMPLES, seed: int = 0
    ) -> Feasibility:
        """How many points meet the constraints, without enumerating the full product.

        ``grid=True`` counts the grid the grid strategy walks; ``grid=False`` the domain an Optuna
        strategy samples (every int from low to high on its step, log ints included; floats
        without step and log params are continuous). Params that no constraint names multiply
        the count; each group of params tied by constraints (see ``groups``) is enumerated when
        it is discrete with at most ``MAX_ENUMERATED_POINTS`` points, and otherwise sampled:
        ``samples`` seeded random points of the group (``seed``), the count of those meeting its
        constraints recorded. A group none of whose samples pass makes the space infeasible.
        Raises ValueError when ``grid`` and a param has no grid.
        """
        exact = 1
        uncounted: list[str] = []
        sampled: list[tuple[list[str], int, int]] = []
        tied: set[str] = set()
        for names, constraints in self.groups():
            tied.update(names)
            axes = [_domain(self.params[n], grid) for n in names]
            size = math.prod(len(a) for a in axes if a is not None)
            if all(a is not None for a in axes) and size <= MAX_ENUMERATED_POINTS:
                count = 0
                for combo in itertools.product(*[a for a in axes if a is not None]):
                    point = dict(zip(names, combo, strict=True))
                    if all(c.holds(point) for c in constraints):
                        count += 1
                exact *= count
                continue
            uncounted.extend(names)
            rng = random.Random(seed)
            ok = 0
            for _ in range(samples):
                point = {n: _sample(self.params[n], grid, rng) for n in names}
                if all(c.holds(point) for c in constraints):
                    ok += 1
            sampled.append((names, samples, ok))
        free = [n for n in self.params if n not in tied]
        free_domains = [_domain(self.params[n], grid) for n in free]
        continuous = [n for n, d in zip(free, free_domains, strict=True) if d is None]
        if exact:
            exact *= math.prod(len(d) for d in free_domains if d is not None)
        return Feasibility(
            exact_count=exact if not uncounted and not continuous else None,
            counted_zero=exact == 0,
            uncounted=uncounted + continuous,
            sampled=sampled,
        )

    def infeasibility(self, *, grid: bool, seed: int = 0) -> str | None:
        """Why no point of the space meets the constraints, or None when some point does (as far
        as ``feasibility`` can tell); the text names the constraints and the fix."""
        f = self.feasibility(grid=grid, seed=seed)
        if f.counted_zero:
            where = "grid point" if grid else "point of the space"
            return f"no {where} meets the constraints {self.constraints}; relax them"
        for names, drawn, ok in f.sampled:
            if drawn and ok == 0:
                return (
                    f"none of {drawn:,} seeded random points of {names} meets the constraints "
                    f"{self.constraints}; relax them (an equality between continuous params is "
                    "never met by sampling)"
                )
        return None


@dataclass(frozen=True)
class Feasibility:
    """What ``SearchSpace.feasibility`` found.

    ``exact_count``: points meeting the constraints, when every param was counted (None when a
    group was sampled or a free param is continuous). ``counted_zero``: some enumerated group has
    no feasible point, so the space has none. ``uncounted``: params that were sampled or are
    continuous. ``sampled``: per sampled group, (its params, points drawn, points that passed).
    """

    exact_count: int | None
    counted_zero: bool
    uncounted: list[str]
    sampled: list[tuple[list[str], int, int]]


class _FloatSteps(Sequence[float]):
    """The values low, low + step, … of a stepped float, without building the list."""

    def __init__(self, low: float, step: float, n: int) -> None:
        self._low, self._step, self._n = low, step, n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> float:  # type: ignore[override]
        if not 0 <= i < self._n:
            raise IndexError(i)
        return round(self._low + i * self._step, 12)


def _domain(param: Param, grid: bool) -> Sequence[ParamValue] | None:
    """The values a strategy can propose for ``param`` as a lazy sequence; None = continuous.

    Raises ValueError when ``grid`` and the param has no grid.
    """
    if isinstance(param, IntParam):
        if grid and param.log:
            return param.grid()
        return range(param.low, param.high + 1, param.step)
    if isinstance(param, FloatParam):
        if param.step is None:
            if grid:
                param.grid()  # raises with the fix
            return None
        return _FloatSteps(param.low, param.step, param.grid_count())
    if isinstance(param, LogParam):
        return param.grid() if grid else None
    return param.grid()


def _sample(param: Param, grid: bool, rng: random.Random) -> ParamValue:
    """One random value of ``param`` from its domain (see ``_domain``): uniform over a discrete
    domain, uniform over [low, high] for a float without step, log-uniform for a log param."""
    domain = _domain(param, grid)
    if domain is not None:
        return domain[rng.randrange(len(domain))]
    if isinstance(param, LogParam):
        return math.exp(rng.uniform(math.log(param.low), math.log(param.high)))
    assert isinstance(param, FloatParam)
    return rng.uniform(param.low, param.high)
