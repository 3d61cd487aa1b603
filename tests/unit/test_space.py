"""Unit tests of search spaces: per-kind grids, constraints between params, their error messages.

The grid is what the grid strategy walks and what the Optuna fallback draws from.
"""

from __future__ import annotations

import itertools
import math

import pytest
from pydantic import ValidationError

from servetune.core.space import (
    BoolParam,
    ChoiceParam,
    Constraint,
    FloatParam,
    IntParam,
    LogParam,
    SearchSpace,
)


def test_int_grids_follow_step_and_log() -> None:
    assert IntParam(low=1, high=10, step=4).grid() == [1, 5, 9]
    assert IntParam(low=2, high=2).grid() == [2]
    assert IntParam(low=3, high=20, log=True).grid() == [3, 4, 8, 16, 20]
    assert IntParam(low=64, high=512, log=True).grid() == [64, 128, 256, 512]


def test_float_grids_land_exactly_on_their_steps() -> None:
    assert FloatParam(low=0.1, high=0.3, step=0.1).grid() == [0.1, 0.2, 0.3]
    g = FloatParam(low=0.5, high=0.95, step=0.05).grid()
    assert len(g) == 10 and g[0] == 0.5 and g[-1] == 0.95 and 0.85 in g
    assert FloatParam(low=0.0, high=1.0, step=0.3).grid() == [0.0, 0.3, 0.6, 0.9]  # high off-step
    with pytest.raises(ValueError, match="needs `step`"):
        FloatParam(low=0.0, high=1.0).grid()


def test_log_points_are_geometric_and_include_both_ends() -> None:
    g = LogParam(low=1.0, high=16.0, points=5).grid()
    assert g == pytest.approx([1.0, 2.0, 4.0, 8.0, 16.0])
    g = LogParam(low=1e-3, high=1.0, points=4).grid()
    assert g[0] == pytest.approx(1e-3) and g[-1] == pytest.approx(1.0)
    ratios = [b / a for a, b in itertools.pairwise(g)]  # type: ignore[operator]
    assert all(r == pytest.approx(10.0) for r in ratios)


def test_choice_and_bool_grids() -> None:
    assert ChoiceParam(values=["f16", "q8_0", 4]).grid() == ["f16", "q8_0", 4]
    assert BoolParam().grid() == [False, True]
    with pytest.raises(ValidationError, match="unique"):
        ChoiceParam(values=["f16", "f16"])
    with pytest.raises(ValidationError):
        ChoiceParam(values=[])


def test_param_bounds_are_validated() -> None:
    with pytest.raises(ValidationError, match="swap"):
        IntParam(low=10, high=1)
    with pytest.raises(ValidationError, match="log=true"):
        IntParam(low=0, high=8, log=True)
    with pytest.raises(ValidationError, match="log=true"):
        IntParam(low=1, high=8, step=2, log=True)
    with pytest.raises(ValidationError):
        LogParam(low=0.0, high=1.0)
    with pytest.raises(ValidationError, match="swap"):
        FloatParam(low=1.0, high=0.5)


SPACE = SearchSpace.model_validate(
    {
        "params": {
            "ubatch-size": {"kind": "int", "low": 128, "high": 512, "step": 128},
            "batch-size": {"kind": "choice", "values": [256, 512, 1024]},
            "flash-attn": {"kind": "bool"},
        },
        "constraints": ["ubatch-size <= batch-size"],
    }
)


def test_grid_points_meet_the_constraints_in_a_fixed_order_without_repeats() -> None:
    points = list(SPACE.grid_points())
    # names sorted: batch-size, flash-attn, ubatch-size; 256 admits ubatch 128/256 only
    assert len(points) == (2 + 4 + 4) * 2 == SPACE.grid_size()
    assert points[0] == {"batch-size": 256, "flash-attn": False, "ubatch-size": 128}
    assert points[1] == {"batch-size": 256, "flash-attn": False, "ubatch-size": 256}
    assert points[2] == {"batch-size": 256, "flash-attn": True, "ubatch-size": 128}
    assert points[-1] == {"batch-size": 1024, "flash-attn": True, "ubatch-size": 512}
    assert len({tuple(sorted(p.items())) for p in points}) == len(points)
    assert all(p["ubatch-size"] <= p["batch-size"] for p in points)
    assert points == list(SPACE.grid_points())  # same order every time


def test_constraints_with_products_and_numbers() -> None:
    c = Constraint.parse("parallel * 256 <= ctx-size")
    assert c.names() == {"parallel", "ctx-size"}
    assert c.holds({"parallel": 4, "ctx-size": 1024})
    assert not c.holds({"parallel": 5, "ctx-size": 1024})
    assert Constraint.parse("a != b").holds({"a": 1, "b": 2})
    assert Constraint.parse("a > 0.5").holds({"a": 0.75})
    assert Constraint.parse("a >= -1").holds({"a": -1})
    with pytest.raises(KeyError):
        c.holds({"parallel": 4})
    space = SearchSpace.model_validate(
        {
            "params": {
                "parallel": {"kind": "int", "low": 1, "high": 8},
                "ctx-size": {"kind": "int", "low": 512, "high": 2048},
            },
            "constraints": ["parallel * 256 <= ctx-size"],
        }
    )
    assert space.violations({"parallel": 8, "ctx-size": 1024}) == ["parallel * 256 <= ctx-size"]
    assert space.violations({"parallel": 2, "ctx-size": 1024}) == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ubatch-size batch-size", "has no operator"),
        ("ubatch-size = batch-size", "has no operator"),
        ("ubatch-size <= batch-size <= 1024", "not a product of names and numbers"),
        ("ubatch-size + 1 <= batch-size", "not a product of names and numbers"),
        ("<= batch-size", "not a product of names and numbers"),
    ],
)
def test_constraint_parse_errors_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Constraint.parse(text)
    with pytest.raises(ValidationError, match=message):
        SearchSpace.model_validate({"params": SPACE.model_dump()["params"], "constraints": [text]})


def test_constraints_must_name_params_of_the_space() -> None:
    with pytest.raises(ValidationError, match=r"names \['threads'\], which are not params"):
        SearchSpace.model_validate(
            {
                "params": {"batch-size": {"kind": "int", "low": 1, "high": 8}},
                "constraints": ["threads <= batch-size"],
            }
        )


def test_space_rejects_dashed_names_and_empty_params() -> None:
    with pytest.raises(ValidationError, match="without dashes"):
        SearchSpace.model_validate(
            {"params": {"--batch-size": {"kind": "int", "low": 1, "high": 8}}}
        )
    with pytest.raises(ValidationError):
        SearchSpace.model_validate({"params": {}})
    with pytest.raises(ValidationError):
        SearchSpace.model_validate(
            {"params": {"x": {"kind": "int", "low": 1, "high": 8, "stride": 2}}}
        )


def test_grid_size_is_zero_when_no_point_meets_the_constraints() -> None:
    space = SearchSpace.model_validate(
        {
            "params": {
                "a": {"kind": "int", "low": 1, "high": 3},
                "b": {"kind": "int", "low": 1, "high": 3},
            },
            "constraints": ["a * b > 9"],
        }
    )
    assert space.grid_size() == 0
    with pytest.raises(ValueError, match="step"):
        SearchSpace.model_validate(
            {"params": {"x": {"kind": "float", "low": 0, "high": 1}}}
        ).grid_size()


def test_a_big_grid_is_enumerated_lazily() -> None:
    space = SearchSpace.model_validate(
        {
            "params": {f"p{i}": {"kind": "int", "low": 0, "high": 99} for i in range(5)},
        }
    )
    first = next(space.grid_points())  # 10^10 points: only the first is built
    assert first == {f"p{i}": 0 for i in range(5)}
    assert math.prod(len(p.grid()) for p in space.params.values()) == 10**10


def test_grid_size_counts_constraint_groups_without_walking_the_product() -> None:
    import time

    space = SearchSpace.model_validate(
        {
            "params": {
                "ubatch-size": {"kind": "int", "low": 128, "high": 512, "step": 128},
                "batch-size": {"kind": "choice", "values": [256, 512, 1024]},
                "threads": {"kind": "int", "low": 1, "high": 100_000},
                "ctx-size": {"kind": "int", "low": 1, "high": 100_000},
            },
            "constraints": ["ubatch-size <= batch-size"],
        }
    )
    t0 = time.perf_counter()
    # the constrained pair has 10 feasible points; the free params multiply by 10^10
    assert space.grid_size() == 10 * 100_000 * 100_000
    assert space.full_grid_count() == 4 * 3 * 100_000 * 100_000
    assert time.perf_counter() - t0 < 1.0
    assert SPACE.grid_size() == len(list(SPACE.grid_points()))


def test_feasibility_counts_exactly_or_samples_and_says_which() -> None:
    finite = SearchSpace.model_validate(
        {
            "params": {
                "a": {"kind": "int", "low": 1, "high": 4},
                "b": {"kind": "int", "low": 1, "high": 4},
                "c": {"kind": "bool"},
            },
            "constraints": ["a < b", "1 <= 2"],
        }
    )
    f = finite.feasibility(grid=False)
    assert f.exact_count == 6 * 2 and f.sampled == [] and finite.infeasibility(grid=False) is None
    continuous = SearchSpace.model_validate(
        {
            "params": {
                "x": {"kind": "float", "low": 0, "high": 1},
                "y": {"kind": "float", "low": 0, "high": 1},
            },
            "constraints": ["x < y"],
        }
    )
    f = continuous.feasibility(grid=False)
    assert f.exact_count is None and f.uncounted == ["x", "y"]
    [(names, drawn, ok)] = f.sampled
    assert names == ["x", "y"] and drawn == 10_000 and 4_500 < ok < 5_500  # half the square
    assert continuous.feasibility(grid=False, seed=3) == continuous.feasibility(grid=False, seed=3)
    never = SearchSpace.model_validate(
        {"params": {"a": {"kind": "int", "low": 1, "high": 4}}, "constraints": ["2 < 1"]}
    )
    assert "no point of the space meets" in (never.infeasibility(grid=False) or "")


def test_a_constraint_group_too_large_to_enumerate_is_sampled() -> None:
    space = SearchSpace.model_validate(
        {
            "params": {
                "a": {"kind": "int", "low": 1, "high": 100_000},
                "b": {"kind": "int", "low": 1, "high": 100_000},
            },
            "constraints": ["a * b > 20000000000"],  # a * b ≤ 10^10: nothing passes
        }
    )
    f = space.feasibility(grid=False)
    assert f.exact_count is None and f.sampled[0][1:] == (10_000, 0)
    assert "none of 10,000 seeded random points of ['a', 'b']" in (
        space.infeasibility(grid=False) or ""
    )
    with pytest.raises(ValueError, match="more than 200,000 grid points"):
        space.grid_size()


def test_grid_counts_match_the_grids() -> None:
    for param in (
        IntParam(low=1, high=10, step=4),
        IntParam(low=3, high=20, log=True),
        FloatParam(low=0.5, high=0.95, step=0.05),
        FloatParam(low=0.0, high=1.0, step=0.3),
        LogParam(low=1.0, high=16.0, points=5),
        ChoiceParam(values=["a", 1]),
        BoolParam(),
    ):
        assert param.grid_count() == len(param.grid())
    assert IntParam(low=0, high=2**53).grid_count() == 2**53 + 1  # no list is built
    with pytest.raises(ValueError, match="step"):
        FloatParam(low=0.0, high=1.0).grid_count()


@pytest.mark.parametrize(
    "param",
    [
        {"kind": "float", "low": float("-inf"), "high": 1},
        {"kind": "float", "low": 0, "high": float("nan")},
        {"kind": "float", "low": 0, "high": 1, "step": float("inf")},
        {"kind": "log", "low": 1, "high": float("inf")},
        {"kind": "int", "low": -(2**60), "high": 1},
        {"kind": "choice", "values": [float("inf")]},
        {"kind": "log", "low": 1, "high": 2, "points": 10**6},
    ],
)
def test_param_numbers_are_finite_and_bounded(param: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        SearchSpace.model_validate({"params": {"x": param}})
