"""The study loop: baseline, ask → run_trial → save → tell until the budget ends, then confirm.

It is the single code path for running a study; a later manager runs the same loop with a
``run_trial`` that executes on a worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from servetune.core.scoring import (
    Recommendation,
    Verdict,
    best_trial,
    noise_pct,
    objective_value,
    pareto_front,
    recommend_from_repeats,
    top_candidates,
)
from servetune.core.spec import StudySpec
from servetune.core.strategies.base import Strategy, make_strategy, params_key
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
    """What a finished study reports: best trial, the Pareto front, the confirmed verdict.

    ``best`` is the candidate the verdict compares with the defaults (else the search's best
    trial); ``recommended`` is what to run (the baseline = keep the defaults; None = nothing,
    e.g. the objective was never measured); ``candidates`` the trials confirmed on fresh
    servers; ``noise_pct`` the run-to-run spread (None = unknown).
    """

    study: StudyRecord
    trials: list[Trial]
    best: Trial | None
    baseline: Trial | None
    front: list[Trial]
    verdict: Verdict | None
    recommended: Trial | None = None
    recommendation: str = ""
    candidates: tuple[int, ...] = ()
    noise_pct: float | None = None
    objective_measured: bool = True


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
    def _config_key(self, params: Params) -> Hashable:
        """Identity of the configuration ``params`` runs: trials with equal keys ran the same
        server, so their measurements pool (as one candidate, and for the run-to-run spread).

        The engine's canonical form (``Engine.effective_params``), so spellings the engine runs
        identically (llama.cpp's parallel -1 and 4 over a unified cache) are one configuration.
        """
        return params_key(self.ctx.engine.effective_params(params, self.spec.workload))

    def _key(self, trial: Trial) -> Hashable:
        return self._config_key(trial.params)

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
        await self._repeat_baseline_early()
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

        rec = await self._confirm()
        trials = self._trials()
        search_trials = [t for t in trials if t.role is not TrialRole.CONFIRM]
        best = rec.compared or best_trial(search_trials, spec.objective)
        baseline = _baseline(trials)
        if rec.note:
            self._say(rec.note)
        front = pareto_front(search_trials, spec.objective) if len(spec.objective.terms) > 1 else []
        verdict = rec.verdict
        verdict_data: dict[str, Any] = {
            "best_trial": best.number if best else None,
            "baseline_trial": baseline.number if baseline else None,
            "recommended_trial": rec.trial.number if rec.trial else None,
            "recommendation": rec.note,
            "candidates": rec.candidates,
            "noise_pct": rec.noise_pct,
            "objective_measured": rec.objective_measured,
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
            recommended=rec.trial,
            recommendation=rec.note,
            candidates=tuple(rec.candidates),
            noise_pct=rec.noise_pct,
            objective_measured=rec.objective_measured,
        )

    def _measured_twin(self, params: Params, measured: list[Trial]) -> Trial | None:
        """The first of ``measured`` that the engine runs identically to ``params`` (same
        ``Engine.effective_params``), else None."""
        key = self._config_key(params)
        return next((t for t in measured if self._key(t) == key), None)

    async def _repeat(self, target: Trial, total: int) -> None:
        """Run CONFIRM repeats of ``target`` on fresh servers until it has ``total`` that count
        (interrupted or cancelled ones are run again; finished ones, whatever their outcome, are
        kept), so a resumed study runs only the missing ones."""
        done = [
            t
            for t in self._trials()
            if t.role is TrialRole.CONFIRM and t.repeat_of == target.number and _counts(t)
        ]
        for _ in range(total - len(done)):
            number = self.store.next_trial_number(self.study.id)
            self._say(f"trial {number}: repeating trial {target.number} on a fresh server")
            await self._run(number, TrialRole.CONFIRM, target.params, repeat_of=target.number)

    async def _repeat_baseline_early(self) -> None:
        """Measure the run-to-run spread before the search: ``budget.baseline_repeats`` runs of
        the engine defaults in all (a baseline that did not complete is not repeated)."""
        baseline = _baseline(self._trials())
        early = self.spec.budget.baseline_repeats - 1
        if baseline is None or baseline.state is not TrialState.COMPLETE or early <= 0:
            return
        await self._repeat(baseline, early)
        trials = self._trials()
        runs = [t for t in trials if self._key(t) == self._key(baseline)]
        values = [v for t in runs if (v := objective_value(t)) is not None]
        spread = noise_pct(runs, self._key)
        if spread is not None:
            self._say(
                f"run-to-run spread of the engine defaults over {len(values)} runs: "
                f"{spread:.1f} % ({', '.join(f'{v:.4g}' for v in values)}); search results "
                "closer than that are ties"
            )

    async def _confirm(self) -> Recommendation:
        """Re-run the top ``budget.confirm_top_k`` candidates (distinct configurations) and the
        baseline on fresh servers, ``budget.confirm_repeats`` times each, in rounds (baseline,
        then each candidate) so that a slow drift of the machine touches all alike; then
        recommend from the repeats (``recommend_from_repeats``)."""
        spec = self.spec
        repeats = spec.budget.confirm_repeats
        trials = self._trials()
        search = [t for t in trials if t.role is not TrialRole.CONFIRM]
        baseline = _baseline(trials)
        candidates = top_candidates(search, spec.objective, spec.budget.confirm_top_k, self._key)
        base_ok = baseline is not None and baseline.state is TrialState.COMPLETE
        if repeats > 0 and candidates:
            numbers = ", ".join(str(c.number) for c in candidates)
            self._say(
                f"confirming candidate trial(s) {numbers} and the engine defaults on fresh "
                f"servers, {repeats} repeat(s) each"
            )
            early = spec.budget.baseline_repeats - 1
            for round_ in range(1, repeats + 1):
                if base_ok and baseline is not None:
                    await self._repeat(baseline, early + round_)
                for c in candidates:
                    await self._repeat(c, round_)
        rec = recommend_from_repeats(
            self._trials(), spec.objective, candidates, baseline if base_ok else None, self._key
        )
        if rec.verdict is not None:
            self._say(rec.verdict.summary)
        return rec
