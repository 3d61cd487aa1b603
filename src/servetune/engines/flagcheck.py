"""Checking spec flags against an engine's flag catalogue: names (with "did you mean"), value
types, choices and ranges, and whether a search-space param kind can drive a flag.

Shared by the GPU engine packages (vllm, sglang); each passes its own ``FlagRules``.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from servetune.core.space import (
    BoolParam,
    ChoiceParam,
    FloatParam,
    IntParam,
    LogParam,
    Param,
    SearchSpace,
)
from servetune.core.spec import Problem
from servetune.core.study import ParamValue
from servetune.engines.base import FlagInfo


@dataclass(frozen=True)
class Range:
    """Numbers a flag accepts: ``low``..``high`` (None = unbounded; ``low_open`` = strictly
    above ``low``) plus ``specials`` (e.g. -1 meaning "off")."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    specials: tuple[float, ...] = ()

    def allows(self, v: float) -> bool:
        """Whether ``v`` is inside the range or one of the specials."""
        if v in self.specials:
            return True
        if self.low is not None and (v < self.low or (self.low_open and v == self.low)):
            return False
        return self.high is None or v <= self.high

    def text(self) -> str:
        """``"use > 0 and ≤ 1"`` style wording."""
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '≥'} {self.low:g}")
        if self.high is not None:
            parts.append(f"≤ {self.high:g}")
        text = "use " + " and ".join(parts) if parts else "any number"
        if self.specials:
            text += ", or " + " / ".join(f"{s:g}" for s in self.specials)
        return text


@dataclass(frozen=True)
class FlagRules:
    """Everything needed to judge a flag name and value for one engine.

    ``engine`` names it in messages ("vLLM 0.33.0"); ``aliases`` maps short/alternative spellings
    to catalogue names; ``negations`` maps ``no-x`` to the bool ``x``; ``reserved`` maps flags
    servetune sets itself to the spec field to use instead; ``renamed`` maps flag names the engine
    no longer has (or not yet) to a hint; ``ranges`` bounds numeric flags; ``json_flags`` take a
    JSON object as their string value; ``list_flags`` take integers separated by commas/spaces.
    """

    engine: str
    catalogue: Mapping[str, FlagInfo]
    aliases: Mapping[str, str] = field(default_factory=dict)
    negations: Mapping[str, str] = field(default_factory=dict)
    reserved: Mapping[str, str] = field(default_factory=dict)
    renamed: Mapping[str, str] = field(default_factory=dict)
    ranges: Mapping[str, Range] = field(default_factory=dict)
    json_flags: frozenset[str] = frozenset()
    list_flags: frozenset[str] = frozenset()


def name_problem(rules: FlagRules, name: str) -> str | None:
    """Why ``name`` is not a usable flag of the engine (None when it is), with a "did you mean"
    for near misses (difflib over names and aliases)."""
    if name in rules.catalogue:
        return None
    if name.startswith("-"):
        return f"write flag names without dashes: {name.lstrip('-')!r}"
    if name in rules.reserved:
        return f"servetune sets --{name} itself; set {rules.reserved[name]} instead"
    if name in rules.renamed:
        return rules.renamed[name]
    if name in rules.aliases:
        return f"write the long flag name {rules.aliases[name]!r} instead of {name!r}"
    if name in rules.negations:
        return f"use {rules.negations[name]!r} with false instead of {name!r}"
    if "_" in name and name.replace("_", "-") in rules.catalogue:
        return f"write {name.replace('_', '-')!r} (the CLI spelling, dashes) instead of {name!r}"
    pool = [*rules.catalogue, *rules.aliases]
    close = difflib.get_close_matches(name, pool, n=1, cutoff=0.6)
    hint = f"did you mean {rules.aliases.get(close[0], close[0])!r}? " if close else ""
    return (
        f"unknown {rules.engine} flag {name!r}; {hint}"
        f"known flags: {', '.join(sorted(rules.catalogue))}"
    )


def value_problem(rules: FlagRules, info: FlagInfo, value: ParamValue) -> str | None:
    """Why ``value`` does not fit flag ``info`` (type, choices, range; None when it does)."""
    name, t = info.name, info.type
    if t == "bool":
        return None if isinstance(value, bool) else f"{name} takes true or false, not {value!r}"
    if t in ("int", "float"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            kind = "an integer" if t == "int" else "a number"
            return f"{name} takes {kind}, not {value!r}"
        if t == "int" and isinstance(value, float) and not value.is_integer():
            return f"{name} takes an integer, not {value!r}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"{name} takes a finite number, not {value!r}"
        rng = rules.ranges.get(name)
        if rng is not None and not rng.allows(float(value)):
            return f"{name} = {value} is out of range: {rng.text()}"
        return None
    if not isinstance(value, str):
        return f"{name} takes a string{_choices_text(info)}, not {value!r}"
    if info.choices and value not in info.choices:
        close = difflib.get_close_matches(value, info.choices, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"{name} = {value!r} is not allowed{_choices_text(info)}{hint}"
    if name in rules.json_flags:
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as e:
            return f'{name} takes a JSON object, e.g. \'{{"method": "ngram"}}\'; {e}'
        if not isinstance(parsed, dict):
            return f"{name} takes a JSON object, not {type(parsed).__name__}"
    if name in rules.list_flags:
        items = value.replace(",", " ").split()
        if not items or not all(x.isdigit() and int(x) > 0 for x in items):
            return f"{name} takes positive integers separated by commas or spaces, not {value!r}"
    return None


def _choices_text(info: FlagInfo) -> str:
    return f" (one of {', '.join(info.choices)})" if info.choices else ""


def param_problem(rules: FlagRules, info: FlagInfo, param: Param) -> str | None:
    """Why a search-space param of this kind cannot drive flag ``info`` (None when it can).

    Names the kind that can (bool for a bool flag, int for an int flag, choice for a string flag)
    and, for numeric ranges, the bound the engine rejects.
    """
    t = info.type
    if isinstance(param, ChoiceParam):
        for v in param.values:
            msg = value_problem(rules, info, v)
            if msg:
                return msg
        return None
    if t == "bool":
        if isinstance(param, BoolParam):
            return None
        return f"{info.name} is a bool flag (true or false); use kind: bool, not {param.kind}"
    if isinstance(param, BoolParam):
        return f"{info.name} is a {t} flag; a bool param cannot set it (use kind: choice)"
    if t == "str":
        return f"{info.name} is a string flag; use kind: choice{_choices_text(info)}"
    if isinstance(param, FloatParam | LogParam) and t == "int":
        return f"{info.name} takes integers; use kind: int (log: true for a log scale) or choice"
    if isinstance(param, IntParam | FloatParam | LogParam):
        rng = rules.ranges.get(info.name)
        if rng is None:
            return None
        for end in (param.low, param.high):
            if not rng.allows(float(end)):
                return (
                    f"the range {param.low:g}..{param.high:g} reaches {end:g}, which "
                    f"{rules.engine} rejects for {info.name}: {rng.text()}"
                )
    return None


def check_space(rules: FlagRules, space: SearchSpace) -> list[Problem]:
    """Problems of ``space.params`` for this engine, at ``space.params.<name>``."""
    problems: list[Problem] = []
    for name, param in space.params.items():
        msg = name_problem(rules, name) or param_problem(rules, rules.catalogue[name], param)
        if msg:
            problems.append(Problem(f"space.params.{name}", msg))
    return problems


def check_flags(rules: FlagRules, flags: Mapping[str, ParamValue]) -> list[Problem]:
    """Problems of the fixed ``engine.flags``, at ``engine.flags.<name>``."""
    problems: list[Problem] = []
    for name, value in flags.items():
        msg = name_problem(rules, name) or value_problem(rules, rules.catalogue[name], value)
        if msg:
            problems.append(Problem(f"engine.flags.{name}", msg))
    return problems


def render_value(info: FlagInfo | None, value: ParamValue) -> str:
    """A non-bool value as the engine reads it: ints from integral floats, floats by ``repr``."""
    if isinstance(value, float) and info is not None and info.type == "int" and value.is_integer():
        return str(int(value))
    if isinstance(value, float):
        return repr(value)
    return str(value)
