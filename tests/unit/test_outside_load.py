"""Unit tests of the outside-load formula and of which run the outside-load re-run keeps."""

from __future__ import annotations

import pytest

from servetune.core.metrics import LoadLevel, RequestRecord, summarize
from servetune.core.spec import LocalDeploymentSpec
from servetune.core.study import FailureKind, TrialResult, TrialState
from servetune.hostload import CpuSnapshot, outside_cpu_fraction
from servetune.runner import _less_loaded, _loaded


def _snap(at: float, busy: float, excluded: float, cores: int = 4) -> CpuSnapshot:
    return CpuSnapshot(at_s=at, busy_s=busy, excluded_s=excluded, cores=cores)


def test_outside_fraction_is_others_cpu_over_wall_times_cores() -> None:
    # 10 s on 4 cores = 40 core-s; 30 busy, 10 of them ours → 20 / 40
    assert outside_cpu_fraction(_snap(0, 100, 50), _snap(10, 130, 60)) == pytest.approx(0.5)
    # nothing else ran
    assert outside_cpu_fraction(_snap(0, 100, 50), _snap(10, 110, 60)) == pytest.approx(0.0)


def test_outside_fraction_is_clamped_and_none_without_time() -> None:
    # our processes exited in between (their time lost) or tick rounding: never below 0
    assert outside_cpu_fraction(_snap(0, 100, 50), _snap(1, 100.5, 51)) == 0.0
    assert outside_cpu_fraction(_snap(0, 0, 0, 2), _snap(1, 2.5, 0, 2)) == 1.0
    assert outside_cpu_fraction(_snap(5, 0, 0), _snap(5, 1, 0)) is None


def test_the_limit_is_a_deployment_field_with_a_documented_default() -> None:
    assert LocalDeploymentSpec().max_outside_cpu_fraction == 0.5
    with pytest.raises(ValueError, match="max_outside_cpu_fraction"):
        LocalDeploymentSpec(max_outside_cpu_fraction=1.5)


def _result(fraction: float | None, tps: float = 100.0, **kw: object) -> TrialResult:
    r = RequestRecord(
        sent_s=0.0, chunk_times_s=(0.1, 0.2), done_s=1.0, output_tokens=int(tps), max_tokens=200
    )
    return TrialResult.model_validate(
        {
            "state": TrialState.COMPLETE,
            "metrics": [summarize(LoadLevel(concurrency=1), [r])],
            "outside_cpu_fraction": fraction,
            **kw,
        }
    )


def test_only_a_complete_loaded_trial_is_rerun() -> None:
    assert _loaded(_result(0.6), 0.5)
    assert not _loaded(_result(0.5), 0.5)
    assert not _loaded(_result(None), 0.5)
    failed = TrialResult(
        state=TrialState.FAIL, failure_kind=FailureKind.ENGINE_CRASHED, outside_cpu_fraction=0.9
    )
    assert not _loaded(failed, 0.5)


def test_the_rerun_is_kept_unless_it_failed_or_ran_under_more_load() -> None:
    first = _result(0.7, notes=["retried once after engine_crashed: x"])
    calm = _result(0.1, tps=150.0)
    kept = _less_loaded(first, calm, 0.5)
    assert kept.outside_cpu_fraction == 0.1
    assert kept.notes[0] == (
        "re-run once: other processes used 70% of all CPU cores during the first measurement "
        "(100.0 tok/s; limit 50%), 10% during the re-run; kept the re-run"
    )
    worse = _less_loaded(first, _result(0.9), 0.5)
    assert worse.outside_cpu_fraction == 0.7 and worse.notes[0].endswith("kept the first")
    assert worse.notes[1] == "retried once after engine_crashed: x"
    crashed = TrialResult(state=TrialState.FAIL, failure_kind=FailureKind.ENGINE_CRASHED)
    kept = _less_loaded(first, crashed, 0.5)
    assert (
        kept.state is TrialState.COMPLETE
        and "FAIL engine_crashed during the re-run" in kept.notes[0]
    )
