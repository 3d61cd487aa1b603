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
        "space.params.cache",
        "space.params.gpu-memory.high",  # the path of the document, without pydantic's union tag
        "workload",
        "slos.0.max_ms",
        "objective.terms.0.metric",
        "objective.terms.0.direction",
    }
    assert "unknown field" in problems["engine.flagz"]
    assert "swap" in problems["space.params.batch-size"]
    assert "'int', 'float', 'log', 'choice', 'bool'" in problems["space.params.cache"]
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
