"""Unit tests of the search strategies: grid order and exhaustion, Optuna vetting, determinism.

Every test drives a real strategy through ask/tell with hand-made outcomes; no engine runs.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import pytest

from servetune.core.scoring import Objective
from servetune.core.space import SearchSpace
from servetune.core.spec import parse_spec
from servetune.core.strategies import GridStrategy, Suggestion, make_strategy
from servetune.core.strategies.base import Strategy, params_key
from servetune.core.strategies.optuna import OptunaStrategy, param_importances
from servetune.core.study import FailureKind, Params, Trial, TrialResult, TrialRole, TrialState

SMALL = SearchSpace.model_validate(
    {
        "params": {
            "parallel": {"kind": "int", "low": 1, "high": 4},
            "cache-type-k": {"kind": "choice", "values": ["f16", "q8_0", "q4_0"]},
            "flash-attn": {"kind": "bool"},
        },
    }
)
"""24 points, no constraints: small enough for repeats to be likely."""

CONSTRAINED = SearchSpace.model_validate(
    {
        "params": {
            "batch-size": {"kind": "int", "low": 64, "high": 2048, "log": True},
            "ubatch-size": {"kind": "int", "low": 64, "high": 2048, "log": True},
            "threads": {"kind": "int", "low": 1, "high": 16, "step": 3},
            "gpu-memory": {"kind": "float", "low": 0.5, "high": 0.95, "step": 0.05},
            "rope-scale": {"kind": "log", "low": 0.25, "high": 4.0},
            "cache-type-k": {"kind": "choice", "values": ["f16", "q8_0"]},
            "cont-batching": {"kind": "bool"},
        },
        "constraints": ["ubatch-size <= batch-size", "threads * 128 <= batch-size"],
    }
)
"""Every param kind, and two constraints that reject a large share of the box."""


def _spec(
    kind: str, *, space: dict[str, Any] | None = None, terms: int = 1, **strategy: Any
) -> Any:
    objective: list[dict[str, Any]] = [{"metric": "output_tokens_per_s", "direction": "maximize"}]
    if terms == 2:
        objective.append({"metric": "ttft_ms.p99", "direction": "minimize"})
    return parse_spec(
        {
            "engine": {"kind": "llamacpp", "model": "m.gguf"},
            "space": space or SMALL.model_dump(),
            "strategy": {"kind": kind, **strategy},
            "workload": {"concurrency": [1], "num_requests": 4},
            "objective": objective,
        }
    )


def _score(p: Params) -> float:
    """A made-up objective with structure a sampler can learn."""
    value = 0.0
    for _, v in sorted(p.items()):
        if isinstance(v, bool):
            value += 3.0 if v else 0.0
        elif isinstance(v, int | float):
            value += float(v) / 100.0
        else:
            value += float(len(v))
    return value


Outcome = tuple[TrialState, list[float] | None, float | None, FailureKind | None]


def _outcome(p: Params, terms: int = 1) -> Outcome:
    """COMPLETE with values (infeasible when flash-attn/cont-batching is off), or cuda_oom FAIL."""
    if p.get("parallel") == 4 or p.get("batch-size", 0) >= 1900:
        return (TrialState.FAIL, None, None, FailureKind.CUDA_OOM)
    values = [_score(p)] + ([_score(p) / 7.0 + 1.0] if terms == 2 else [])
    miss = 0.0 if p.get("flash-attn", p.get("cont-batching")) else 0.4
    return (TrialState.COMPLETE, values, miss, None)


def _drive(
    strategy: Strategy, n: int, outcome: Callable[[Params], Outcome] = _outcome
) -> list[tuple[Params, Outcome]]:
    """Ask/tell ``n`` times; return each suggestion's params and the outcome told."""
    out: list[tuple[Params, Outcome]] = []
    for _ in range(n):
        s = strategy.ask()
        assert s is not None
        o = outcome(s.params)
        strategy.tell(s.token, o[0], o[1], o[2], o[3])
        out.append((s.params, o))
    return out


# ---- grid --------------------------------------------------------------------------------------


def test_grid_walks_every_constrained_point_in_order_once_then_is_exhausted() -> None:
    space = SearchSpace.model_validate(
        {
            "params": {
                "batch-size": {"kind": "choice", "values": [256, 512, 1024]},
                "ubatch-size": {"kind": "int", "low": 128, "high": 512, "step": 128},
            },
            "constraints": ["ubatch-size <= batch-size"],
        }
    )
    grid = GridStrategy(space)
    asked = []
    while (s := grid.ask()) is not None:
        asked.append(s.params)
        grid.tell(s.token, TrialState.COMPLETE, [1.0], 0.0)
    assert asked == list(space.grid_points())
    assert len(asked) == 2 + 4 + 4  # 256 admits ubatch 128, 256; 512 and 1024 admit all four
    assert all(p["ubatch-size"] <= p["batch-size"] for p in asked)
    assert len({params_key(p) for p in asked}) == len(asked)
    assert grid.ask() is None


def test_grid_skips_replayed_points_and_ignores_the_baseline() -> None:
    grid = make_strategy(_spec("grid"))
    points = list(SMALL.grid_points())
    assert grid.replay({}, TrialState.COMPLETE, [1.0], 0.0) is False  # baseline: engine defaults
    for p in points[:5]:
        assert grid.replay(p, TrialState.COMPLETE, [1.0], 0.0) is True
    # a non-deterministic failure is still not repeated by a grid
    assert grid.replay(points[7], TrialState.FAIL, None, None, FailureKind.WORKER_LOST) is True
    asked = []
    while (s := grid.ask()) is not None:
        asked.append(s.params)
        grid.tell(s.token, TrialState.FAIL, None)
    assert asked == points[5:7] + points[8:]


def test_grid_without_a_float_step_is_refused() -> None:
    space = SearchSpace.model_validate({"params": {"x": {"kind": "float", "low": 0, "high": 1}}})
    with pytest.raises(ValueError, match=r"space\.params\.x: .*step"):
        GridStrategy(space)


def test_concurrent_asks_never_hand_out_the_same_point() -> None:
    for strategy in (GridStrategy(SMALL), OptunaStrategy(SMALL, ["maximize"], kind="tpe", seed=1)):
        pending = [strategy.ask() for _ in range(24)]
        assert all(s is not None for s in pending)
        keys = {params_key(s.params) for s in pending if s is not None}
        assert len(keys) == 24
        assert strategy.ask() is None  # every point is pending


def test_tell_rejects_unknown_tokens_unfinished_states_and_wrong_value_counts() -> None:
    strategy = OptunaStrategy(SMALL, ["maximize", "minimize"], kind="random")
    s = strategy.ask()
    assert s is not None
    with pytest.raises(ValueError, match="expected 2 objective value"):
        strategy.tell(s.token, TrialState.COMPLETE, [1.0])
    with pytest.raises(ValueError, match="finished state"):
        strategy.tell(s.token, TrialState.RUNNING, None)
    with pytest.raises(ValueError, match="unknown token"):
        strategy.tell(s.token + 100, TrialState.COMPLETE, [1.0, 2.0])
    strategy.tell(s.token, TrialState.COMPLETE, [1.0, 2.0], 0.0)
    with pytest.raises(ValueError, match="unknown token"):
        strategy.tell(s.token, TrialState.COMPLETE, [1.0, 2.0], 0.0)
    with pytest.raises(ValueError, match="expected 2 objective value"):
        strategy.replay(s.params, TrialState.COMPLETE, [1.0])


def test_suggestion_is_frozen() -> None:
    s = Suggestion(token=3, params={"parallel": 2})
    with pytest.raises(AttributeError):
        s.token = 4  # type: ignore[misc]


# ---- Optuna ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["random", "tpe", "nsga2"])
def test_optuna_proposals_meet_constraints_and_never_repeat_deterministic_failures(
    kind: str,
) -> None:
    terms = 2 if kind == "nsga2" else 1
    strategy = make_strategy(
        _spec(
            kind,
            space=CONSTRAINED.model_dump(),
            terms=terms,
            seed=7,
            n_startup_trials=6,
        )
    )
    failed: set[Any] = set()
    for params, (state, *_rest) in _drive(strategy, 30, lambda p: _outcome(p, terms)):
        assert CONSTRAINED.violations(params) == [], params
        assert params_key(params) not in failed
        if state is TrialState.FAIL:
            failed.add(params_key(params))
        assert params["gpu-memory"] in CONSTRAINED.params["gpu-memory"].grid()  # on its step
        assert (params["threads"] - 1) % 3 == 0
    assert failed  # the test exercised deterministic failures


@pytest.mark.parametrize("kind", ["random", "tpe", "nsga2"])
def test_optuna_exhausts_a_small_space_without_repeats_then_returns_none(kind: str) -> None:
    directions = ["maximize", "minimize"] if kind == "nsga2" else ["maximize"]
    strategy = OptunaStrategy(
        SMALL, directions, kind=kind, seed=3, n_startup_trials=4, population_size=4
    )
    seen = [p for p, _ in _drive(strategy, 24, lambda p: _outcome(p, len(directions)))]
    assert len({params_key(p) for p in seen}) == 24
    assert strategy.ask() is None


def test_a_nondeterministic_failure_may_be_tried_again() -> None:
    strategy = OptunaStrategy(SMALL, ["maximize"], kind="tpe", seed=0)
    points = list(SMALL.grid_points())
    for p in points[:-1]:
        strategy.replay(p, TrialState.COMPLETE, [_score(p)], 0.0)
    strategy.replay(points[-1], TrialState.FAIL, None, None, FailureKind.WORKER_LOST)
    s = strategy.ask()
    assert s is not None and s.params == points[-1]
    strategy.tell(s.token, TrialState.FAIL, None, None, FailureKind.KV_CACHE_TOO_SMALL)
    assert strategy.ask() is None


def test_a_failure_without_a_kind_counts_as_deterministic() -> None:
    strategy = OptunaStrategy(SMALL, ["maximize"], kind="random", seed=0)
    points = list(SMALL.grid_points())
    for p in points[:-1]:
        strategy.replay(p, TrialState.COMPLETE, [1.0], 0.0)
    strategy.replay(points[-1], TrialState.FAIL, None)
    assert strategy.ask() is None


def test_impossible_constraints_end_the_search_or_raise_a_clear_error() -> None:
    gridded = SearchSpace.model_validate(
        {
            "params": {
                "a": {"kind": "int", "low": 1, "high": 8},
                "b": {"kind": "int", "low": 1, "high": 8},
            },
            "constraints": ["a * b > 64"],
        }
    )
    assert OptunaStrategy(gridded, ["maximize"], kind="tpe").ask() is None
    continuous = SearchSpace.model_validate(
        {
            "params": {
                "a": {"kind": "float", "low": 0, "high": 1},
                "b": {"kind": "float", "low": 0, "high": 1},
            },
            "constraints": ["a * b > 2"],
        }
    )
    with pytest.raises(ValueError, match="no params meeting the constraints"):
        OptunaStrategy(continuous, ["maximize"], kind="tpe").ask()


def test_impossible_constraints_on_a_huge_grid_raise_instead_of_walking_it() -> None:
    space = SearchSpace.model_validate(
        {
            "params": {n: {"kind": "int", "low": 0, "high": 999} for n in ("a", "b", "c")},
            "constraints": ["a > 1000"],
        }
    )  # 10^9 grid points, none allowed
    with pytest.raises(ValueError, match="at most 200000 grid points"):
        OptunaStrategy(space, ["maximize"], kind="random").ask()


def test_tight_constraints_fall_back_to_unused_grid_points() -> None:
    # 1 point in 1000 meets the constraint: model and random proposals almost never hit it.
    space = SearchSpace.model_validate(
        {
            "params": {"a": {"kind": "int", "low": 1, "high": 1000}},
            "constraints": ["a == 777"],
        }
    )
    strategy = OptunaStrategy(space, ["maximize"], kind="tpe", seed=1)
    s = strategy.ask()
    assert s is not None and s.params == {"a": 777}
    strategy.tell(s.token, TrialState.COMPLETE, [1.0], 0.0)
    assert strategy.ask() is None


@pytest.mark.parametrize("kind", ["random", "tpe", "nsga2"])
def test_same_seed_same_tells_same_asks_and_replay_resumes_identically(kind: str) -> None:
    terms = 2 if kind == "nsga2" else 1
    spec = _spec(kind, space=CONSTRAINED.model_dump(), terms=terms, seed=11, n_startup_trials=5)
    spec = spec.model_copy(update={"budget": spec.budget.model_copy(update={"max_trials": 16})})

    def outcome(p: Params) -> Outcome:
        return _outcome(p, terms)

    first = make_strategy(spec)
    history = _drive(first, 14, outcome)
    assert [p for p, _ in _drive(make_strategy(spec), 14, outcome)] == [p for p, _ in history]
    uninterrupted = _drive(first, 4, outcome)

    resumed = make_strategy(spec)
    assert resumed.replay({}, TrialState.COMPLETE, [1.0] * terms, 0.0) is False  # baseline
    for params, (state, values, miss, kind_) in history:
        assert resumed.replay(params, state, values, miss, kind_) is True
    assert [p for p, _ in _drive(resumed, 4, outcome)] == [p for p, _ in uninterrupted]


def test_different_seeds_give_different_proposals() -> None:
    a = [
        p for p, _ in _drive(make_strategy(_spec("tpe", space=CONSTRAINED.model_dump(), seed=1)), 5)
    ]
    b = [
        p for p, _ in _drive(make_strategy(_spec("tpe", space=CONSTRAINED.model_dump(), seed=2)), 5)
    ]
    assert a != b


def test_tpe_steers_away_from_slo_misses() -> None:
    # The objective grows with x, but x > 0.6 misses the SLO by x − 0.6. Told the miss, TPE
    # hugs the feasible boundary; not told it, TPE chases x → 1.
    space = SearchSpace.model_validate({"params": {"x": {"kind": "float", "low": 0, "high": 1}}})

    def late_mean_x(tell_miss: bool) -> float:
        strategy = OptunaStrategy(space, ["maximize"], kind="tpe", seed=5, n_startup_trials=8)
        xs = []
        for _ in range(40):
            s = strategy.ask()
            assert s is not None
            x = float(s.params["x"])
            strategy.tell(
                s.token, TrialState.COMPLETE, [x], max(0.0, x - 0.6) if tell_miss else None
            )
            xs.append(x)
        return sum(xs[20:]) / 20

    told, untold = late_mean_x(tell_miss=True), late_mean_x(tell_miss=False)
    assert told < 0.7 < 0.75 < untold, (told, untold)


def test_nsga2_evolves_past_its_first_generation() -> None:
    # Maximise the sum of six digits (and keep p0 small): random proposals average 27; NSGA-II
    # with a population of 6 recombines its elite and does clearly better after 8 generations.
    space = SearchSpace.model_validate(
        {"params": {f"p{i}": {"kind": "int", "low": 0, "high": 9} for i in range(6)}}
    )
    strategy = OptunaStrategy(
        space, ["maximize", "minimize"], kind="nsga2", seed=0, population_size=6
    )
    sums = []
    for _ in range(48):
        s = strategy.ask()
        assert s is not None
        total = float(sum(int(v) for v in s.params.values()))
        strategy.tell(s.token, TrialState.COMPLETE, [total, float(s.params["p0"])], 0.0)
        sums.append(total)
    assert sum(sums[-12:]) / 12 > 31


def test_replay_ignores_params_outside_the_space() -> None:
    strategy = OptunaStrategy(SMALL, ["maximize"], kind="tpe", seed=0)
    outside: list[dict[str, Any]] = [
        {},  # the baseline
        {"parallel": 2, "cache-type-k": "f16"},  # a param missing
        {"parallel": 2, "cache-type-k": "f16", "flash-attn": True, "threads": 4},  # an extra one
        {"parallel": 9, "cache-type-k": "f16", "flash-attn": True},  # out of range
        {"parallel": 2, "cache-type-k": "bf16", "flash-attn": True},  # not a choice
        {"parallel": 2, "cache-type-k": "f16", "flash-attn": 1},  # not a bool
        {"parallel": 2.5, "cache-type-k": "f16", "flash-attn": True},  # not an int
    ]
    for p in outside:
        assert strategy.replay(p, TrialState.COMPLETE, [1.0], 0.0) is False
    assert (
        strategy.replay(
            {"parallel": 2, "cache-type-k": "f16", "flash-attn": True},
            TrialState.COMPLETE,
            [1.0],
            0.0,
        )
        is True
    )
    fresh = OptunaStrategy(SMALL, ["maximize"], kind="tpe", seed=0)
    fresh.replay(
        {"parallel": 2, "cache-type-k": "f16", "flash-attn": True}, TrialState.COMPLETE, [1.0], 0.0
    )
    a, b = strategy.ask(), fresh.ask()
    assert a is not None and b is not None and a.params == b.params


def test_complete_trials_without_values_and_pruned_trials_are_accepted() -> None:
    strategy = OptunaStrategy(SMALL, ["maximize"], kind="tpe", seed=0, n_startup_trials=2)
    for i in range(6):
        s = strategy.ask()
        assert s is not None
        state = TrialState.PRUNED if i % 2 else TrialState.COMPLETE
        strategy.tell(
            s.token,
            state,
            None
            if i % 3 == 0
            else [
                float(i),
            ],
            0.0,
        )
    assert strategy.ask() is not None


def test_gp_runs_with_torch_or_says_to_use_tpe_or_install_it() -> None:
    spec = _spec("gp", space=CONSTRAINED.model_dump(), seed=1, n_startup_trials=3)
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("scipy") is None:
        with pytest.raises(ValueError, match=r"gp needs torch.*use strategy kind 'tpe'.*install"):
            make_strategy(spec)
        return
    strategy = make_strategy(spec)  # pragma: no cover - torch is an optional extra
    for params, _ in _drive(strategy, 5):  # pragma: no cover
        assert CONSTRAINED.violations(params) == []


def test_param_importances_rank_the_param_that_drives_the_objective_first() -> None:
    spec = _spec(
        "random",
        space=SearchSpace.model_validate(
            {
                "params": {
                    "a": {"kind": "float", "low": 0, "high": 1},
                    "b": {"kind": "float", "low": 0, "high": 1},
                },
            }
        ).model_dump(),
    )
    strategy = make_strategy(spec)
    trials = [
        Trial(
            number=0,
            role=TrialRole.BASELINE,
            params={},
            state=TrialState.COMPLETE,
            result=TrialResult(state=TrialState.COMPLETE, objective_values=[0.5]),
        )
    ]
    for i in range(1, 40):
        s = strategy.ask()
        assert s is not None
        a, b = float(s.params["a"]), float(s.params["b"])
        value = 10 * a + 0.01 * b
        strategy.tell(s.token, TrialState.COMPLETE, [value], 0.0)
        trials.append(
            Trial(
                number=i,
                params=s.params,
                state=TrialState.COMPLETE,
                result=TrialResult(state=TrialState.COMPLETE, objective_values=[value]),
            )
        )
    importances = param_importances(spec, trials)
    assert list(importances) == ["a", "b"]
    assert importances["a"] > 0.5
    assert param_importances(spec, trials[:2]) == {}


def test_objective_directions_reach_optuna() -> None:
    # Minimising x: after start-up, TPE proposes small x.
    space = SearchSpace.model_validate({"params": {"x": {"kind": "float", "low": 0, "high": 1}}})
    objective = Objective.model_validate(
        {"terms": [{"metric": "ttft_ms.p99", "direction": "minimize"}]}
    )
    strategy = OptunaStrategy(space, objective.directions, kind="tpe", seed=2, n_startup_trials=6)
    xs = [
        float(p["x"])
        for p, _ in _drive(
            strategy, 30, lambda p: (TrialState.COMPLETE, [float(p["x"])], 0.0, None)
        )
    ]
    assert sum(xs[-10:]) / 10 < 0.25


def test_grid_strategy_refuses_a_grid_too_large_to_run_without_building_it() -> None:
    huge = SearchSpace.model_validate(
        {
            "params": {
                "a": {"kind": "int", "low": 1, "high": 100_000},
                "b": {"kind": "int", "low": 1, "high": 100_000},
            }
        }
    )
    with pytest.raises(ValueError, match=r"10,000,000,000 points, more than 100,000"):
        GridStrategy(huge)
    # tpe samples the same space and proposes points of it
    suggestion = OptunaStrategy(huge, ["maximize"], kind="tpe", seed=0).ask()
    assert suggestion is not None and 1 <= suggestion.params["a"] <= 100_000  # type: ignore[operator]
