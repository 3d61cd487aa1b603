"""Unit tests of spec parsing: every problem at once with its field path, and the accepted forms.

Documents are plain dicts, as YAML/JSON loading would produce them.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from servetune.core.spec import SpecError, StudySpec, parse_spec

MINIMAL: dict[str, Any] = {
    "engine": {"kind": "llamacpp", "model": "model.gguf"},
    "space": {"params": {"batch-size": {"kind": "int", "low": 64, "high": 512, "step": 64}}},
    "workload": {"concurrency": [1, 4], "num_requests": 8},
    "objective": {"metric": "output_tokens_per_s", "direction": "maximize"},
}


def _doc(**changes: Any) -> dict[str, Any]:
    doc = copy.deepcopy(MINIMAL)
    doc.update(changes)
    return doc


def _problems(doc: Any) -> dict[str, str]:
    with pytest.raises(SpecError) as info:
        parse_spec(doc)
    return {p.loc: p.message for p in info.value.problems}


def test_a_minimal_spec_gets_documented_defaults() -> None:
    spec = parse_spec(MINIMAL)
    assert spec.strategy.kind == "tpe" and spec.strategy.seed == 0
    assert spec.budget.max_trials == 20
    assert spec.deployment.kind == "local"
    assert spec.workload.api == "completions" and spec.workload.warmup_requests == 2
    assert [lv.value for lv in spec.workload.levels()] == [1.0, 4.0]
    assert spec.slos == []
    assert StudySpec.model_validate_json(spec.model_dump_json()) == spec


def test_every_structural_problem_is_reported_at_once_with_its_path() -> None:
    doc = _doc(
        engine={"kind": "llamacpp", "model": "m.gguf", "flagz": 1},
        space={
            "params": {
                "batch-size": {"kind": "int", "low": 512, "high": 64},
                "cache": {"kind": "flot"},
                "gpu-memory": {"kind": "float", "low": 0, "high": "lots"},
            }
        },
        workload={"concurrency": [1, 4]},
        objective={"metric": "tokens", "direction": "up"},
        slos=[{"metric": "ttft_ms", "max_ms": -1}],
    )
    problems = _problems(doc)
    assert set(problems) == {
        "engine.flagz",
        "space.params.batch-size",
        "space.params.cache.kind",  # the discriminator is what to fix
        "space.params.gpu-memory.high",  # the path of the document, without pydantic's union tag
        "workload",
        "slos.0.max_ms",
        "objective.terms.0.metric",
        "objective.terms.0.direction",
    }
    assert "unknown field" in problems["engine.flagz"]
    assert "swap" in problems["space.params.batch-size"]
    assert "'int', 'float', 'log', 'choice', 'bool'" in problems["space.params.cache.kind"]
    assert "num_requests" in problems["workload"] and "duration_s" in problems["workload"]
    assert "output_tokens_per_s" in problems["objective.terms.0.metric"]  # lists the valid names


def test_missing_sections_and_non_mappings_are_reported() -> None:
    problems = _problems({})
    assert set(problems) == {"engine", "space", "workload", "objective"}
    assert all(m == "missing; add this field" for m in problems.values())
    assert set(_problems(["not", "a", "mapping"])) == {"(root)"}


def test_workload_needs_exactly_one_load_and_one_length() -> None:
    both = _problems(
        _doc(workload={"concurrency": [1], "request_rates_per_s": [2.0], "num_requests": 8})
    )
    assert "concurrency" in both["workload"]
    neither = _problems(_doc(workload={"concurrency": [1], "num_requests": 8, "duration_s": 10}))
    assert "num_requests" in neither["workload"]
    rates = parse_spec(_doc(workload={"request_rates_per_s": [0.5, 2.0], "duration_s": 30}))
    assert [lv.label for lv in rates.workload.levels()] == ["rate=0.5/s", "rate=2/s"]


@pytest.mark.parametrize(
    "objective",
    [
        {"metric": "output_tokens_per_s", "direction": "maximize"},
        [{"metric": "output_tokens_per_s", "direction": "maximize"}],
        {"terms": [{"metric": "output_tokens_per_s", "direction": "maximize"}]},
    ],
)
def test_objective_forms_are_equivalent(objective: Any) -> None:
    spec = parse_spec(_doc(objective=objective))
    assert len(spec.objective.terms) == 1
    assert spec.objective.terms[0].metric == "output_tokens_per_s"
    assert spec.objective.directions == ["maximize"]


def test_two_objective_terms_and_not_three() -> None:
    two = [
        {"metric": "output_tokens_per_s", "direction": "maximize"},
        {"metric": "ttft_ms.p99", "direction": "minimize", "level": 4},
    ]
    spec = parse_spec(_doc(objective=two, strategy={"kind": "nsga2"}))
    assert spec.objective.directions == ["maximize", "minimize"]
    three = [*two, {"metric": "requests_per_s", "direction": "maximize"}]
    assert "objective.terms" in _problems(_doc(objective=three))


def test_cross_field_problems_are_reported_together() -> None:
    doc = _doc(
        engine={
            "kind": "llamacpp",
            "model": "m.gguf",
            "flags": {"batch-size": 256, "n-gpu-layers": 0},
        },
        strategy={"kind": "nsga2"},
        slos=[
            {"metric": "ttft_ms", "max_ms": 500, "levels": [1]},
            {"metric": "ttft_ms", "max_ms": 500, "levels": [8]},
        ],
        objective={"metric": "output_tokens_per_s", "direction": "maximize", "level": 2},
    )
    problems = _problems(doc)
    assert set(problems) == {
        "slos.1.levels",
        "objective.terms.0.level",
        "strategy.kind",
        "engine.flags",
    }
    assert "8 is not a workload level" in problems["slos.1.levels"]
    assert "[1.0, 4.0]" in problems["slos.1.levels"]
    assert "two objective terms" in problems["strategy.kind"]
    assert (
        "batch-size" in problems["engine.flags"] and "n-gpu-layers" not in problems["engine.flags"]
    )


def test_grid_strategy_problems_are_caught_before_the_study() -> None:
    no_step = _doc(
        strategy={"kind": "grid"},
        space={"params": {"gpu-memory": {"kind": "float", "low": 0.5, "high": 0.9}}},
    )
    assert "step" in _problems(no_step)["space.params"]
    empty = _doc(
        strategy={"kind": "grid"},
        space={
            "params": {
                "a": {"kind": "int", "low": 1, "high": 2},
                "b": {"kind": "int", "low": 1, "high": 2},
            },
            "constraints": ["a * b > 4"],
        },
    )
    assert "no grid point" in _problems(empty)["space.constraints"]
    # the same float space is fine for tpe, which samples it continuously
    parse_spec({**no_step, "strategy": {"kind": "tpe"}})


def test_space_problems_carry_their_path() -> None:
    doc = _doc(
        space={
            "params": {"batch-size": {"kind": "int", "low": 64, "high": 512}},
            "constraints": ["ubatch-size <= batch-size"],
        }
    )
    problems = _problems(doc)
    assert list(problems) == ["space"]
    assert "ubatch-size" in problems["space"] and "not params of the space" in problems["space"]


def test_spec_error_message_lists_every_problem() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec({})
    text = str(info.value)
    assert text.count("\n") == 3 and "engine: missing" in text


# ---- objectives and SLOs the workload cannot measure ---------------------------------------


def test_tpot_and_itl_need_two_output_tokens_as_slo_or_objective() -> None:
    one_token = {"concurrency": [1, 4], "num_requests": 8, "output_tokens": 1}
    problems = _problems(
        _doc(
            workload=one_token,
            slos=[
                {"metric": "tpot_ms", "max_ms": 50},
                {"metric": "ttft_ms", "max_ms": 500},
                {"metric": "itl_ms", "max_ms": 50},
            ],
            objective={"metric": "itl_ms.p99", "direction": "minimize"},
        )
    )
    assert set(problems) == {"slos.0.metric", "slos.2.metric", "objective.terms.0.metric"}
    for message in problems.values():
        assert "workload.output_tokens is 1" in message and "2 or more" in message
    # two tokens give one gap: both are measured
    parse_spec(
        _doc(
            workload={**one_token, "output_tokens": 2},
            slos=[{"metric": "tpot_ms", "max_ms": 50}],
            objective={"metric": "itl_ms.p99", "direction": "minimize"},
        )
    )
    # ttft and e2e exist with one token
    parse_spec(
        _doc(workload=one_token, objective={"metric": "ttft_ms.p99", "direction": "minimize"})
    )


def test_goodput_needs_a_per_request_slo() -> None:
    goodput = {"metric": "goodput_requests_per_s", "direction": "maximize"}
    message = _problems(_doc(objective=goodput))["objective.terms.0.metric"]
    assert "equal requests_per_s" in message and "add such an SLO" in message
    # an ITL SLO is per gap, not per request: goodput still counts every request
    itl_only = _doc(objective=goodput, slos=[{"metric": "itl_ms", "max_ms": 50}])
    assert "objective.terms.0.metric" in _problems(itl_only)
    parse_spec(_doc(objective=goodput, slos=[{"metric": "e2e_latency_ms", "max_ms": 900}]))


@pytest.mark.parametrize(
    ("objective", "fix"),
    [
        ({"metric": "error_rate", "direction": "minimize"}, "max_error_rate"),
        ({"metric": "ttft_ms.p99", "direction": "maximize"}, "direction: minimize"),
        ({"metric": "requests_per_s", "direction": "minimize"}, "direction: maximize"),
    ],
)
def test_objectives_that_cannot_rank_trials_are_refused(objective: Any, fix: str) -> None:
    assert fix in _problems(_doc(objective=objective))["objective.terms.0.metric"]


def test_rate_mode_throughput_objective_is_a_note_not_an_error() -> None:
    spec = parse_spec(_doc(workload={"request_rates_per_s": [2.0], "num_requests": 8}))
    notes = {n.loc: n.message for n in spec.notes()}
    assert "offered rate" in notes["objective.terms.0.metric"]
    assert not any(n.loc.startswith("objective") for n in parse_spec(MINIMAL).notes())


# ---- sizes without bounds ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("workload", "loc", "bound"),
    [
        ({"concurrency": [10_000_000], "num_requests": 8}, "workload.concurrency.0", "10000"),
        ({"concurrency": [1], "num_requests": 1e12}, "workload.num_requests", "1000000"),
        ({"concurrency": [1], "duration_s": float("inf")}, "workload.duration_s", "86,400"),
        ({"concurrency": [1], "duration_s": float("nan")}, "workload.duration_s", "86,400"),
        ({"concurrency": [1], "duration_s": 90_000}, "workload.duration_s", "86400"),
        (
            {"request_rates_per_s": [float("inf")], "num_requests": 8},
            "workload.request_rates_per_s.0",
            "10,000",
        ),
        (
            {"request_rates_per_s": [1e9], "num_requests": 8},
            "workload.request_rates_per_s.0",
            "10000",
        ),
        (
            {"concurrency": [1], "num_requests": 8, "input_tokens": 10**7},
            "workload.input_tokens",
            "1048576",
        ),
        (
            {"concurrency": [1], "num_requests": 8, "output_tokens": 10**7},
            "workload.output_tokens",
            "1048576",
        ),
        (
            {"concurrency": [1], "num_requests": 8, "warmup_requests": 10**9},
            "workload.warmup_requests",
            "1000000",
        ),
        (
            {"concurrency": [1], "num_requests": 8, "request_timeout_s": float("inf")},
            "workload.request_timeout_s",
            "86,400",
        ),
        (
            {"concurrency": [1], "num_requests": 8, "max_error_rate": float("nan")},
            "workload.max_error_rate",
            "finite",
        ),
        ({"concurrency": list(range(1, 40)), "num_requests": 8}, "workload.concurrency", "32"),
        ({"concurrency": [], "num_requests": 8}, "workload.concurrency", "at least 1"),
    ],
)
def test_every_workload_size_has_a_bound_named_in_the_error(
    workload: dict[str, Any], loc: str, bound: str
) -> None:
    problems = _problems(_doc(workload=workload))
    assert bound in problems[loc], problems


@pytest.mark.parametrize(
    ("changes", "loc", "bound"),
    [
        ({"budget": {"max_trials": 10**9}}, "budget.max_trials", "10000"),
        ({"budget": {"max_wall_time_s": float("inf")}}, "budget.max_wall_time_s", "finite"),
        ({"budget": {"baseline_repeats": 0}}, "budget.baseline_repeats", "1"),
        ({"budget": {"confirm_top_k": 50}}, "budget.confirm_top_k", "10"),
        (
            {"deployment": {"startup_timeout_s": float("inf")}},
            "deployment.startup_timeout_s",
            "86,400",
        ),
        ({"deployment": {"stop_timeout_s": 1e9}}, "deployment.stop_timeout_s", "86400"),
        ({"strategy": {"seed": 2**70}}, "strategy.seed", "9223372036854775808"),
        ({"strategy": {"n_startup_trials": 10**9}}, "strategy.n_startup_trials", "10000"),
        ({"slos": [{"metric": "ttft_ms", "max_ms": float("inf")}]}, "slos.0.max_ms", "finite"),
        ({"slos": [{"metric": "ttft_ms", "max_ms": 1e12}]}, "slos.0.max_ms", "86400000"),
        (
            {
                "engine": {
                    "kind": "llamacpp",
                    "model": "m",
                    "flags": {"rope-freq-scale": float("nan")},
                }
            },
            "engine.flags.rope-freq-scale",
            "finite",
        ),
        (
            {"space": {"params": {"x": {"kind": "float", "low": 0, "high": float("inf")}}}},
            "space.params.x.high",
            "finite",
        ),
        (
            {"space": {"params": {"x": {"kind": "int", "low": 0, "high": 10**30}}}},
            "space.params.x.high",
            "9007199254740992",
        ),
        (
            {"space": {"params": {"x": {"kind": "choice", "values": [1.0, float("nan")]}}}},
            "space.params.x.values.1",
            "finite",
        ),
    ],
)
def test_every_other_number_of_the_spec_is_bounded(
    changes: dict[str, Any], loc: str, bound: str
) -> None:
    problems = _problems(_doc(**changes))
    assert bound in problems[loc], problems


def test_a_huge_grid_is_counted_not_enumerated_and_refused_with_its_bound() -> None:
    import time

    doc = _doc(
        strategy={"kind": "grid"},
        space={
            "params": {
                "a": {"kind": "int", "low": 1, "high": 100_000},
                "b": {"kind": "int", "low": 1, "high": 100_000},
            }
        },
    )
    t0 = time.perf_counter()
    message = _problems(doc)["space.params"]
    assert time.perf_counter() - t0 < 2.0
    assert "10,000,000,000 points" in message and "100,000" in message and "tpe" in message
    # the same space is fine for tpe, which samples it
    parse_spec({**doc, "strategy": {"kind": "tpe"}})


# ---- constraints no point meets: one rule for every strategy -------------------------------

_NONE_MEET = {
    "params": {
        "a": {"kind": "int", "low": 1, "high": 2},
        "b": {"kind": "int", "low": 1, "high": 2},
    },
    "constraints": ["a * b > 4"],
}


@pytest.mark.parametrize("kind", ["grid", "random", "tpe", "nsga2"])
def test_constraints_no_point_meets_are_refused_for_every_strategy(kind: str) -> None:
    objective: Any = {"metric": "output_tokens_per_s", "direction": "maximize"}
    if kind == "nsga2":
        objective = [objective, {"metric": "ttft_ms.p99", "direction": "minimize"}]
    problems = _problems(_doc(strategy={"kind": kind}, space=_NONE_MEET, objective=objective))
    assert "meets the constraints" in problems["space.constraints"]
    assert "relax" in problems["space.constraints"]


def test_constraints_over_continuous_params_are_sampled() -> None:
    space = {
        "params": {
            "x": {"kind": "float", "low": 0.0, "high": 1.0},
            "y": {"kind": "log", "low": 1.0, "high": 10.0},
        },
        "constraints": ["x * y > 10"],
    }
    message = _problems(_doc(space=space))["space.constraints"]
    assert "none of 10,000 seeded random points" in message
    parse_spec(_doc(space={**space, "constraints": ["x * y > 9"]}))  # rare but reachable


def test_tpe_counts_the_ints_it_samples_not_the_log_grid() -> None:
    # log ints: the grid has 1, 2, 4, 8 (none is 3) but tpe samples every int from 1 to 8
    space = {
        "params": {"a": {"kind": "int", "low": 1, "high": 8, "log": True}},
        "constraints": ["a == 3"],
    }
    assert (
        "no grid point"
        in _problems(_doc(strategy={"kind": "grid"}, space=space))["space.constraints"]
    )
    parse_spec(_doc(space=space))


def test_feasible_count_against_the_budget_is_a_note() -> None:
    few = _doc(
        strategy={"kind": "grid"},
        budget={"max_trials": 20},
        space={**_NONE_MEET, "constraints": ["a * b >= 2"]},
    )
    spec = parse_spec(few)
    notes = {n.loc: n.message for n in spec.notes()}
    assert (
        "only 3 grid points meet the constraints, fewer than the 19 search trials"
        in notes["budget.max_trials"]
    )
    # the same holds for tpe on a finite space
    tpe_notes = {n.loc: n.message for n in parse_spec({**few, "strategy": {"kind": "tpe"}}).notes()}
    assert "only 3 points of the space" in tpe_notes["budget.max_trials"]
    many = _doc(strategy={"kind": "grid"}, budget={"max_trials": 3})  # 8 grid points, 2 trials
    notes = {n.loc: n.message for n in parse_spec(many).notes()}
    assert (
        "8 points" in notes["budget.max_trials"] and "2 search trials" in notes["budget.max_trials"]
    )
    assert parse_spec(_doc(strategy={"kind": "grid"}, budget={"max_trials": 9})).notes() == []
