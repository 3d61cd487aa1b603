"""The study loop: baseline, ask → run_trial → save → tell until the budget ends, then confirm.

It is the single code path for running a study; a later manager runs the same loop with a
``run_trial`` that executes on a worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from servetune.core.scoring import (
    Verdict,
    best_trial,
    confirm_verdict,
    pareto_front,
    recommend,
    runs_of,
)
from servetune.core.spec import StudySpec
from servetune.core.strategies.base import Strategy, make_strategy
from servetune.core.study import FailureKind, Params, Trial, TrialResult, TrialRole, TrialState
from servetune.deploy.base import RunningEngine
from servetune.deploy.local import kill_process_group
from servetune.engines.feasibility_hook import infeasible_for
from servetune.runner import Runner, TrialContext, run_trial
from servetune.store.repo import StudyRecord, StudyStore

log = logging.getLogger(__name__)


@dataclass
class LoopEvents:
    """Callbacks for a live display; every one is optional."""

    trial_started: Callable[[int, TrialRole, Params], None] | None = None
    trial_phase: Callable[[int, str], None] | None = None
    trial_finished: Callable[[Trial], None] | None = None
    message: Callable[[str], None] | None = None


@dataclass(frozen=True)
class StudyOutcome:
    """What a finished study reports: best trial, the Pareto front, the confirmed verdict."""

    study: StudyRecord
    trials: list[Trial]
    best: Trial | None
    baseline: Trial | None
    front: list[Trial]
    verdict: Verdict | None
    recommended: Trial | None = None
    recommendation: str = ""


_NOT_MEASURED = frozenset({FailureKind.INTERRUPTED, FailureKind.CANCELLED})


def _counts(trial: Trial | None) -> bool:
    """True for a finished trial that says something about its params (not interrupted/cancelled).

    Interrupted and cancelled trials do not use up the budget, are not told to the strategy, and
    are run again (a grid point is re-proposed; a baseline or a repeat is re-run).
    """
    return (
        trial is not None and trial.state.is_finished() and trial.failure_kind not in _NOT_MEASURED
    )


def _baseline(trials: list[Trial]) -> Trial | None:
    """The study's baseline: the first COMPLETE baseline trial, else the first that counts, else
    the first baseline trial at all (None when there is none)."""
    baselines = [t for t in trials if t.role is TrialRole.BASELINE]
    for pick in (lambda t: t.state is TrialState.COMPLETE, _counts, lambda t: True):
        found = [t for t in baselines if pick(t)]
        if found:
            return found[0]
    return None


class StudyLoop:
    """Runs (or resumes) one study to its end. Create it with a store, the study record and a context.

    Saving happens before telling: a trial is committed to the store before the strategy learns
    its outcome, so a crash never loses a measurement.
    """

    def __init__(
        self,
        store: StudyStore,
        study: StudyRecord,
        ctx: TrialContext,
        runner: Runner = run_trial,
        events: LoopEvents | None = None,
    ) -> None:
        self.store = store
        self.study = study
        self.spec: StudySpec = study.spec
        self.ctx = ctx
        self.runner = runner
        self.events = events or LoopEvents()
        self.strategy: Strategy = make_strategy(self.spec)

    # ---- helpers -------------------------------------------------------------------------
    def _say(self, text: str) -> None:
        log.info("study %s: %s", self.study.name, text)
        if self.events.message:
            self.events.message(text)

    def _trials(self) -> list[Trial]:
        return self.store.trials(self.study.id)

    def _recover(self) -> None:
        """Kill engines left by a killed run and mark their trials FAIL (interrupted)."""
        for number, pid, pgid in self.store.trial_processes(self.study.id):
            if kill_process_group(pgid, must_contain=self.spec.engine.model):
                self._say(f"killed the engine (pid {pid}) left running by trial {number}")
        for t in self.store.interrupt_running(
            self.study.id, "the study process stopped while this trial was running; resumed later"
        ):
            self._say(
                f"trial {t.number} was RUNNING when the study stopped: marked FAIL (interrupted)"
            )

    def _replay(self, trials: list[Trial]) -> None:
        for t in trials:
            if t.role is not TrialRole.SEARCH or t.result is None or not _counts(t):
                continue
            self._tell(t, replay=True)

    def _tell(self, t: Trial, replay: bool = False, token: int | None = None) -> None:
        r = t.result
        assert r is not None
        values = r.objective_values if t.state is TrialState.COMPLETE else None
        state = (
            t.state if values is not None or t.state is not TrialState.COMPLETE else TrialState.FAIL
        )
        miss = r.slo_report.total_miss if r.slo_report else None
        if replay or token is None:
            self.strategy.replay(t.params, state, values, miss, failure_kind=t.failure_kind)
        else:
            self.strategy.tell(token, state, values, miss, failure_kind=t.failure_kind)

    async def _run(
        self, number: int, role: TrialRole, params: Params, repeat_of: int | None = None
    ) -> Trial:
        trial = self.store.add_trial(self.study.id, number, role, params, repeat_of=repeat_of)
        assert trial.id is not None
        trial_id = trial.id
        if self.events.trial_started:
            self.events.trial_started(number, role, params)

        def started(running: RunningEngine) -> None:
            if running.pid is not None:
                pgid = running.pgid if running.pgid is not None else running.pid
                self.store.set_trial_process(trial_id, running.pid, pgid)

        self.ctx.on_started = started
        on_phase = self.events.trial_phase
        self.ctx.on_phase = (lambda p: on_phase(number, p)) if on_phase else None
        try:
            result = await self.runner(self.ctx, params, number)
        except asyncio.CancelledError:
            self.store.finish_trial(
                trial_id,
                TrialResult(
                    state=TrialState.FAIL,
                    failure_kind=FailureKind.CANCELLED,
                    failure_reason="cancelled by the user",
                ),
            )
            raise
        except Exception as e:  # a bug must not leave the trial RUNNING forever
            log.exception("trial %d crashed servetune itself", number)
            self.store.finish_trial(
                trial_id,
                TrialResult(
                    state=TrialState.FAIL,
                    failure_kind=FailureKind.UNKNOWN,
                    failure_reason=f"internal error: {type(e).__name__}: {e}",
                ),
            )
            raise
        saved = self.store.finish_trial(trial_id, result)
        if self.events.trial_finished:
            self.events.trial_finished(saved)
        return saved

    # ---- phases --------------------------------------------------------------------------
    async def run(self) -> StudyOutcome:
        """Run the study from wherever the store says it is to the end; return the outcome.

        Raises ``asyncio.CancelledError`` (after recording) when cancelled; the study is then
        marked cancelled and can be resumed.
        """
        self._recover()
        self.store.set_study_status(self.study.id, "running")
        try:
            outcome = await self._search_and_confirm()
        except asyncio.CancelledError:
            self.store.set_study_status(self.study.id, "cancelled")
            raise
        except BaseException:
            self.store.set_study_status(self.study.id, "failed")
            raise
        return outcome

    async def _search_and_confirm(self) -> StudyOutcome:
        spec = self.spec
        trials = self._trials()
        self._replay(trials)
        if _baseline(trials) is None or not _counts(_baseline(trials)):
            number = self.store.next_trial_number(self.study.id)
            self._say(f"trial {number}: the engine's defaults (baseline)")
            await self._run(number, TrialRole.BASELINE, {})
        deadline = (
            (time.monotonic() + spec.budget.max_wall_time_s)
            if spec.budget.max_wall_time_s
            else None
        )

        twins = 0
        while True:
            trials = self._trials()
            searched = [
                t for t in trials if t.role in (TrialRole.BASELINE, TrialRole.SEARCH) and _counts(t)
            ]
            if len(searched) >= spec.budget.max_trials:
                break
            if deadline is not None and time.monotonic() >= deadline:
                self._say("wall-time budget spent; stopping the search")
                break
            suggestion = self.strategy.ask()
            if suggestion is None:
                self._say("the search space is exhausted")
                break
            twin = self._measured_twin(suggestion.params, searched)
            if twin is not None:  # the engine runs these params exactly as an earlier trial
                self._say(
                    f"{suggestion.params} runs the same engine configuration as trial "
                    f"{twin.number}: its result is reused, not measured again"
                )
                self._tell(twin, token=suggestion.token)
                twins += 1
                if twins >= spec.budget.max_trials:
                    self._say("the strategy keeps proposing measured configurations; stopping")
                    break
                continue
            number = self.store.next_trial_number(self.study.id)
            region = infeasible_for(trials, self.ctx.engine, spec.space, suggestion.params)
            if region is not None:  # the flag failed both ways here: record, do not launch
                self._say(f"trial {number}: {region.message}")
                t = self.store.add_trial(self.study.id, number, TrialRole.SEARCH, suggestion.params)
                assert t.id is not None
                rejected = TrialResult(
                    state=TrialState.FAIL,
                    failure_kind=FailureKind.PREFLIGHT_REJECTED,
                    failure_reason=region.message,
                )
                saved = self.store.finish_trial(t.id, rejected)
            else:
                saved = await self._run(number, TrialRole.SEARCH, suggestion.params)
            if _counts(saved):
                self._tell(saved, token=suggestion.token)

        verdict = await self._confirm()
        trials = self._trials()
        search_trials = [t for t in trials if t.role is not TrialRole.CONFIRM]
        best = best_trial(search_trials, spec.objective)
        baseline = _baseline(trials)
        recommended, note = recommend(best, baseline, verdict, trials)
        if note:
            self._say(note)
        front = pareto_front(search_trials, spec.objective) if len(spec.objective.terms) > 1 else []
        verdict_data: dict[str, Any] = {
            "best_trial": best.number if best else None,
            "baseline_trial": baseline.number if baseline else None,
            "recommended_trial": recommended.number if recommended else None,
            "recommendation": note,
            "pareto_front": [t.number for t in front],
            "verdict": verdict.model_dump(mode="json") if verdict else None,
            "summary": verdict.summary if verdict else None,
        }
        self.store.set_study_status(self.study.id, "finished", verdict_data)
        study = self.store.get_study(self.study.id)
        return StudyOutcome(
            study=study,
            trials=trials,
            best=best,
            baseline=baseline,
            front=front,
            verdict=verdict,
            recommended=recommended,
            recommendation=note,
        )

    def _measured_twin(self, params: Params, measured: list[Trial]) -> Trial | None:
        """The first of ``measured`` that the engine runs identically to ``params`` (same
        ``Engine.effective_params``), else None."""
        workload = self.spec.workload
        effective = self.ctx.engine.effective_params(params, workload)
        return next(
            (
                t
                for t in measured
                if self.ctx.engine.effective_params(t.params, workload) == effective
            ),
            None,
        )

    async def _confirm(self) -> Verdict | None:
        """Re-run the best trial and the baseline on fresh servers; compare from the repeats."""
        spec = self.spec
        repeats = spec.budget.confirm_repeats
        trials = self._trials()
        search = [t for t in trials if t.role is not TrialRole.CONFIRM]
        best = best_trial(search, spec.objective)
        baseline = _baseline(trials)
        if best is None or baseline is None or baseline.state is not TrialState.COMPLETE:
            self._say("no completed best trial and baseline to confirm")
            return None
        term = spec.objective.terms[0]
        if repeats == 0 or best.number == baseline.number:
            values_best = self._values_of(best, trials)
            values_base = self._values_of(baseline, trials)
            return (
                confirm_verdict(term.metric, term.direction, values_base, values_best)
                if (values_best and values_base and best.number != baseline.number)
                else None
            )
        for target in (best, baseline):
            done = [
                t
                for t in trials
                if t.role is TrialRole.CONFIRM and t.repeat_of == target.number and _counts(t)
            ]
            for _ in range(repeats - len(done)):
                number = self.store.next_trial_number(self.study.id)
                self._say(f"trial {number}: repeating trial {target.number} on a fresh server")
                await self._run(number, TrialRole.CONFIRM, target.params, repeat_of=target.number)
        trials = self._trials()
        values_best = self._values_of(best, trials)
        values_base = self._values_of(baseline, trials)
        if not values_best or not values_base:
            return None
        verdict = confirm_verdict(term.metric, term.direction, values_base, values_best)
        self._say(verdict.summary)
        return verdict

    def _values_of(self, target: Trial, trials: list[Trial]) -> list[float]:
        """The first objective value of ``target`` then of each COMPLETE repeat of it."""
        return [
            t.result.objective_values[0]
            for t in runs_of(target, trials)
            if t.state is TrialState.COMPLETE and t.result and t.result.objective_values
        ]
