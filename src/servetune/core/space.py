"""Search spaces: the allowed values of each engine flag, constraints between flags, grid points.

Param names are the engine's own CLI flag names without leading dashes (``batch-size``).
"""

from __future__ import annotations

import itertools
import math
import operator
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

ParamValue = int | float | str | bool


class IntParam(BaseModel):
    """Integers in [low, high] on a ``step`` grid (or log-uniform when ``log``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["int"] = "int"
    low: int = Field(description="Smallest value (inclusive).")
    high: int = Field(description="Largest value (inclusive).")
    step: int = Field(default=1, ge=1, description="Grid step; values are low, low+step, …")
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


class FloatParam(BaseModel):
    """Floats in [low, high]; a grid needs ``step``."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["float"] = "float"
    low: float = Field(description="Smallest value (inclusive).")
    high: float = Field(description="Largest value (inclusive).")
    step: float | None = Field(
        default=None, gt=0, description="Grid step (needed by the grid strategy)."
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


class LogParam(BaseModel):
    """Positive floats in [low, high], sampled log-uniformly; a grid needs ``points``."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["log"] = "log"
    low: float = Field(gt=0, description="Smallest value (> 0, inclusive).")
    high: float = Field(gt=0, description="Largest value (inclusive).")
    points: int = Field(default=5, ge=2, description="Grid points, spaced geometrically.")

    @model_validator(mode="after")
    def _check(self) -> LogParam:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be ≤ high ({self.high}); swap them")
        return self

    def grid(self) -> list[ParamValue]:
        """``points`` values spaced geometrically from low to high."""
        ratio = (self.high / self.low) ** (1 / (self.points - 1))
        return [self.low * ratio**i for i in range(self.points)]


class ChoiceParam(BaseModel):
    """One of a list of values (strings or numbers)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["choice"] = "choice"
    values: list[ParamValue] = Field(min_length=1, description="The allowed values, in order.")

    @field_validator("values")
    @classmethod
    def _unique(cls, v: list[ParamValue]) -> list[ParamValue]:
        if len({repr(x) for x in v}) != len(v):
            raise ValueError("values must be unique; remove the repeats")
        return v

    def grid(self) -> list[ParamValue]:
        """The values, in order."""
        return list(self.values)


class BoolParam(BaseModel):
    """A switch: false or true."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["bool"] = "bool"

    def grid(self) -> list[ParamValue]:
        """[False, True]."""
        return [False, True]


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
        min_length=1, description="Flag name (engine CLI name, no dashes) → allowed values."
    )
    constraints: list[ConstraintText] = Field(
        default_factory=list, description="Relations such as 'ubatch-size <= batch-size'."
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

    def grid_size(self) -> int:
        """Number of grid points that meet the constraints."""
        return sum(1 for _ in self.grid_points())
