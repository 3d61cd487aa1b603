"""Optuna strategies (random, tpe, gp, nsga2) by ask/tell; the one servetune module using Optuna.

Each ask rebuilds an in-memory study from the history: a proposal is a function of spec and history.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import random
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.samplers import BaseSampler, NSGAIISampler, RandomSampler, TPESampler
from optuna.trial import FrozenTrial, create_trial
from optuna.trial import TrialState as OptunaState

from servetune.core.space import (
    BoolParam,
    ChoiceParam,
    FloatParam,
    IntParam,
    LogParam,
    Param,
    SearchSpace,
)
from servetune.core.strategies.base import (
    History,
    HistoryStrategy,
    Record,
    Seen,
    Suggestion,
    canonical_params,
    stepped_high,
)
from servetune.core.study import Params, Trial, TrialState

if TYPE_CHECKING:
    from servetune.core.spec import StudySpec

log = logging.getLogger(__name__)

OptunaKind = Literal["random", "tpe", "gp", "nsga2"]
"""Strategies backed by an Optuna sampler."""
Direction = Literal["maximize", "minimize"]

MODEL_ATTEMPTS = 16
"""Proposals asked of the strategy's own sampler per ``ask`` before falling back to random ones."""
RANDOM_ATTEMPTS = 256
"""Uniformly random proposals per ``ask`` before falling back to a random unused grid point."""
GRID_FALLBACK_MAX = 200_000
"""Largest full grid (before constraints) that the grid fallback walks (about a second)."""
CONSTRAINT_KEY = "slo_miss"
"""Name of the one Optuna constraint: ``SloReport.total_miss`` (≤ 0 feasible)."""


def distribution(param: Param) -> BaseDistribution:
    """The Optuna distribution of one param.

    int → ``IntDistribution(step, log)``, float → ``FloatDistribution`` (on ``step`` when given,
    ``high`` lowered to the last step like the grid), log → ``FloatDistribution(log=True)``,
    choice → ``CategoricalDistribution(values)``, bool → ``CategoricalDistribution([False, True])``.
    """
    if isinstance(param, IntParam):
        top = param.low + (param.high - param.low) // param.step * param.step
        return IntDistribution(param.low, top, log=param.log, step=param.step)
    if isinstance(param, FloatParam):
        if param.step is None:
            return FloatDistribution(param.low, param.high)
        high = stepped_high(param.low, param.high, param.step)
        return FloatDistribution(param.low, high, step=param.step)
    if isinstance(param, LogParam):
        return FloatDistribution(param.low, param.high, log=True)
    if isinstance(param, ChoiceParam):
        return CategoricalDistribution(list(param.values))
    assert isinstance(param, BoolParam)
    return CategoricalDistribution([False, True])


def distributions(space: SearchSpace) -> dict[str, BaseDistribution]:
    """``distribution`` of every param of ``space``, by name."""
    return {name: distribution(p) for name, p in space.params.items()}


def derive_seed(seed: int, *parts: int) -> int:
    """A 32-bit seed from ``seed`` and non-negative ``parts`` (NumPy ``SeedSequence``).

    The same arguments always give the same seed.
    """
    state = np.random.SeedSequence([seed & 0xFFFF_FFFF_FFFF_FFFF, *parts]).generate_state(1)
    return int(state[0])


def gp_available() -> bool:
    """True when torch and scipy, which Optuna's ``GPSampler`` needs, can be imported."""
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "scipy"))


def nsga2_population(max_trials: int) -> int:
    """NSGA-II population for a budget: ``max_trials // 4`` within [4, 50] (Optuna's default: 50).

    So a study sees about four generations instead of staying random throughout.
    """
    return max(4, min(50, max_trials // 4))


class OptunaStrategy(HistoryStrategy):
    """Proposals from an Optuna sampler, checked against the space's constraints and the history.

    ``kind``: ``random`` (RandomSampler), ``tpe`` (multivariate TPESampler with
    ``constant_liar``, for proposals made while other trials run), ``gp`` (GPSampler;
    needs torch and scipy), ``nsga2`` (NSGAIISampler with ``population_size``; None = Optuna's
    50). ``directions`` has one ``maximize``/``minimize`` per objective term. ``n_startup_trials``
    (tpe, gp) None = Optuna's default.

    Each ``ask`` builds a fresh in-memory study holding every told trial (``create_trial`` +
    ``add_trial``) and every pending one (RUNNING), with a sampler seeded from ``seed`` and the
    history's length. The same seed and the same history therefore give the same proposal,
    whether the history was told live or replayed after a restart. COMPLETE trials carry one
    Optuna constraint, ``slo_miss`` (> 0 = infeasible), which TPE, GP and NSGA-II use to prefer
    feasible regions; FAIL trials carry none and are ignored by every sampler. A COMPLETE trial
    without finite values is shown to Optuna as FAIL.

    A proposal is never returned when it breaks a constraint of the space, is pending, or
    repeats params that failed deterministically; it is told to the throwaway study as PRUNED
    (so TPE moves away from it) and the sampler is asked again, up to ``MODEL_ATTEMPTS`` times,
    then ``RANDOM_ATTEMPTS`` uniformly random proposals. A proposal that repeats a finished
    COMPLETE or PRUNED trial is also re-asked. If nothing new is found and every param has a
    grid of at most ``GRID_FALLBACK_MAX`` points in all, a random unused grid point meeting the
    constraints is returned, or None when there is none left (the space is exhausted).
    Otherwise a repeat of a finished trial that the sampler insisted on is returned; failing
    that, ``ask`` raises ValueError.
    Raises ValueError at construction for ``gp`` without torch/scipy.
    """

    def __init__(
        self,
        space: SearchSpace,
        directions: Sequence[str],
        kind: OptunaKind = "tpe",
        seed: int = 0,
        n_startup_trials: int | None = None,
        population_size: int | None = None,
    ) -> None:
        if kind not in ("random", "tpe", "gp", "nsga2"):
            raise ValueError(f"unknown Optuna strategy {kind!r}; use random, tpe, gp or nsga2")
        if not directions or any(d not in ("maximize", "minimize") for d in directions):
            raise ValueError(
                f"directions must be maximize/minimize, one per objective term; got {directions}"
            )
        if kind == "gp" and not gp_available():
            raise ValueError(
                "strategy gp needs torch and scipy, which are not installed; "
                "use strategy kind 'tpe', or install them (pip install torch scipy)"
            )
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self._space = space
        self._directions: list[Direction] = [
            "maximize" if d == "maximize" else "minimize" for d in directions
        ]
        self._kind: OptunaKind = kind
        self._seed = seed
        self._n_startup_trials = n_startup_trials
        self._population_size = population_size
        self._dists = distributions(space)
        self._gridable = _small_grid(space)
        self._history = History(space=space, n_values=len(self._directions))

    @classmethod
    def from_spec(cls, spec: StudySpec) -> OptunaStrategy:
        """The strategy ``spec.strategy`` describes over ``spec.space`` (kind must not be grid)."""
        kind = spec.strategy.kind
        if kind == "grid":
            raise ValueError("strategy grid is not an Optuna strategy; use make_strategy")
        return cls(
            spec.space,
            spec.objective.directions,
            kind=kind,
            seed=spec.strategy.seed,
            n_startup_trials=spec.strategy.n_startup_trials,
            population_size=nsga2_population(spec.budget.max_trials) if kind == "nsga2" else None,
        )

    @property
    def history(self) -> History:
        """What this strategy was told (read-only use)."""
        return self._history

    # ---- Strategy ----------------------------------------------------------------------------

    def ask(self) -> Suggestion | None:
        """Next params to try (see the class docstring for how proposals are vetted)."""
        h = self._history
        n = len(h.records) + len(h.pending)
        study = self._study(self._sampler(derive_seed(self._seed, n, 0)))
        stages: list[tuple[BaseSampler | None, int]] = [(None, MODEL_ATTEMPTS)]
        if self._kind == "random":
            stages = [(None, MODEL_ATTEMPTS + RANDOM_ATTEMPTS)]
        else:
            stages.append((RandomSampler(seed=derive_seed(self._seed, n, 1)), RANDOM_ATTEMPTS))
        repeat: Params | None = None
        rejected = 0
        for sampler, attempts in stages:
            if sampler is not None:
                study.sampler = sampler
            for _ in range(attempts):
                trial = study.ask(self._dists)
                params = canonical_params(self._space, trial.params)
                if params is None:  # pragma: no cover - Optuna only proposes allowed values
                    raise AssertionError(f"Optuna proposed {trial.params}, outside the space")
                seen = self._judge(params)
                if seen is Seen.FRESH:
                    if rejected:
                        log.debug("found new params after %d rejected proposals", rejected)
                    return h.issue(params)
                if seen is Seen.DONE and repeat is None:
                    repeat = params
                rejected += 1
                study.tell(trial, state=OptunaState.PRUNED)
        if self._gridable:
            point = self._random_grid_point(random.Random(derive_seed(self._seed, n, 2)))
            if point is not None:
                log.info("no new params in %d proposals; trying an unused grid point", rejected)
                return h.issue(point)
            return None
        if repeat is not None:
            log.warning("the sampler keeps proposing tried params; repeating %s", repeat)
            return h.issue(repeat)
        raise ValueError(
            f"no params meeting the constraints {self._space.constraints} in {rejected} proposals; "
            "relax the constraints (a fallback to the grid needs a step on every float param and "
            f"at most {GRID_FALLBACK_MAX} grid points)"
        )

    # ---- internals -----------------------------------------------------------------------------

    def _judge(self, params: Params) -> Seen | None:
        """FRESH when ``params`` may be returned; None when it breaks a constraint; else why not."""
        if self._space.violations(params):
            return None
        return self._history.seen(params)

    def _random_grid_point(self, rng: random.Random) -> Params | None:
        """A uniformly chosen FRESH grid point meeting the constraints (reservoir sampling)."""
        chosen: Params | None = None
        count = 0
        for point in self._space.grid_points():
            if self._history.seen(point) is Seen.FRESH:
                count += 1
                if rng.randrange(count) == 0:
                    chosen = point
        return chosen

    def _sampler(self, seed: int) -> BaseSampler:
        startup: dict[str, Any] = (
            {} if self._n_startup_trials is None else {"n_startup_trials": self._n_startup_trials}
        )
        if self._kind == "random":
            return RandomSampler(seed=seed)
        if self._kind == "tpe":
            # constant_liar: the pending (RUNNING) trials count as the worst value seen, so
            # proposals made while other trials run spread out instead of piling up
            return TPESampler(seed=seed, multivariate=True, constant_liar=True, **startup)
        if self._kind == "gp":
            return optuna.samplers.GPSampler(seed=seed, **startup)
        if self._population_size is None:
            return NSGAIISampler(seed=seed)
        return NSGAIISampler(seed=seed, population_size=self._population_size)

    def _study(self, sampler: BaseSampler) -> optuna.Study:
        """A fresh in-memory study with the history: finished trials, then pending as RUNNING."""
        study = optuna.create_study(sampler=sampler, directions=self._directions)
        generations = _Generations(self._population_size or 50) if self._kind == "nsga2" else None
        for rec in self._history.records:
            study.add_trial(self._frozen(rec, generations))
        for params in self._history.pending.values():
            attrs = generations.assign(complete=False) if generations else {}
            study.add_trial(
                create_trial(
                    state=OptunaState.RUNNING,
                    params=params,
                    distributions=self._dists,
                    system_attrs=attrs,
                )
            )
        return study

    def _frozen(self, rec: Record, generations: _Generations | None) -> FrozenTrial:
        values = rec.usable_values
        complete = values is not None
        attrs = generations.assign(complete=complete) if generations else {}
        if complete:
            return create_trial(
                state=OptunaState.COMPLETE,
                values=values,
                params=rec.params,
                distributions=self._dists,
                constraints={CONSTRAINT_KEY: rec.slo_miss},
                system_attrs=attrs,
            )
        state = OptunaState.PRUNED if rec.state is TrialState.PRUNED else OptunaState.FAIL
        return create_trial(
            state=state, params=rec.params, distributions=self._dists, system_attrs=attrs
        )


class _Generations:
    """NSGA-II generation numbers for replayed trials, by Optuna's own rule.

    ``BaseGASampler.get_trial_generation`` stamps a trial, when it is asked, with the latest
    generation of the COMPLETE trials, or the next one once that generation holds
    ``population_size`` of them. Trials added with ``add_trial`` carry no stamp, so the rebuilt
    study stamps them here, in history order, as a sequential run would have.
    """

    def __init__(self, population_size: int) -> None:
        self._size = population_size
        self._counts: dict[int, int] = {}
        self._key = NSGAIISampler._get_generation_key()

    def assign(self, complete: bool) -> dict[str, Any]:
        latest = max(self._counts, default=0)
        generation = latest if self._counts.get(latest, 0) < self._size else latest + 1
        if complete:
            self._counts[generation] = self._counts.get(generation, 0) + 1
        return {self._key: generation}


def _grid_count(param: Param) -> int | None:
    """Values in ``param.grid()``, counted without building it; None for a float without step."""
    try:
        return param.grid_count()
    except ValueError:
        return None


def _small_grid(space: SearchSpace) -> bool:
    """True when every param has a grid and the full grid has ≤ ``GRID_FALLBACK_MAX`` points."""
    total = 1
    for param in space.params.values():
        count = _grid_count(param)
        if count is None:
            return False
        total *= count
        if total > GRID_FALLBACK_MAX:
            return False
    return True


def param_importances(spec: StudySpec, trials: Sequence[Trial]) -> dict[str, float]:
    """Importance of each tuned param for the first objective term, highest first (sums to 1).

    Optuna's default evaluator, PED-ANOVA (Watanabe et al., IJCAI'23; numpy only, no
    scikit-learn), over the COMPLETE trials, feasible or not, whose params are points of the
    space (the baseline's ``{}`` is not). Returns {} with fewer than two such trials.
    """
    dists = distributions(spec.space)
    study = optuna.create_study(direction=spec.objective.terms[0].direction)
    for t in trials:
        r = t.result
        if t.state is not TrialState.COMPLETE or r is None or not r.objective_values:
            continue
        params = canonical_params(spec.space, t.params)
        value = r.objective_values[0]
        if params is None or not math.isfinite(value):
            continue
        study.add_trial(create_trial(params=params, distributions=dists, value=value))
    if len(study.trials) < 2:
        return {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PED-ANOVA warns when a study is small; the report says so
        importances = optuna.importance.get_param_importances(study)
    return {name: float(v) for name, v in importances.items()}
