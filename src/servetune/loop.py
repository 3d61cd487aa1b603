"""The study loop: baseline, ask → run_trial → save → tell until the budget ends, then confirm.

It is the single code path for running a study, with ``budget.parallel`` trials in flight; the
manager runs the same loop with a runner that executes each trial on a worker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Hashable
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
from servetune.errors import ServetuneError
from servetune.runner import Runner, TrialContext, run_trial
from servetune.slots import TrialSlots
from servetune.store.repo import StudyRecord, StudyStatus, StudyStore

__all__ = ["Adopt", "LoopEvents", "StudyLoop", "StudyOutcome", "TrialSlots"]

log = logging.getLogger(__name__)


@dataclass
class LoopEvents:
    """Callbacks for a live display; every one is optional. With ``budget.parallel`` > 1 they
    arrive for several trials interleaved (each carries its trial number)."""

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

    @classmethod
    def of_stored(cls, study: StudyRecord, trials: list[Trial]) -> StudyOutcome:
        """The outcome of a finished ``study`` as stored (its ``verdict`` record, written by
        ``StudyLoop.run``) and its ``trials`` (by number), e.g. read back from a manager's
        API. Trials the record names but ``trials`` lacks read as None; a study without a
        verdict record (not finished) has no best, recommendation nor verdict."""
        from servetune.core.scoring import Verdict

        stored = study.verdict or {}
        by_number = {t.number: t for t in trials}

        def trial(key: str) -> Trial | None:
            number = stored.get(key)
            return by_number.get(number) if isinstance(number, int) else None

        verdict = stored.get("verdict")
        noise = stored.get("noise_pct")
        return cls(
            study=study,
            trials=trials,
            best=trial("best_trial"),
            baseline=trial("baseline_trial") or _baseline(trials),
            front=[by_number[n] for n in stored.get("pareto_front") or [] if n in by_number],
            verdict=Verdict.model_validate(verdict) if verdict else None,
            recommended=trial("recommended_trial"),
            recommendation=str(stored.get("recommendation") or ""),
            candidates=tuple(stored.get("candidates") or ()),
            noise_pct=float(noise) if isinstance(noise, int | float) else None,
            objective_measured=stored.get("objective_measured") is not False,
        )


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


Adopt = Callable[[list[Trial]], Awaitable[dict[int, Awaitable[TrialResult]]]]
"""``StudyLoop(adopt=…)``: given the study's RUNNING trials at start, the ones still running
elsewhere (on workers), by trial id, each as an awaitable of its result."""


@dataclass
class _InFlight:
    """One trial in flight: the stored RUNNING trial, its task, its configuration key, and the
    strategy's token to tell its outcome with (None: replayed instead, or not told)."""

    trial: Trial
    task: asyncio.Task[Trial]
    key: Hashable
    token: int | None


class StudyLoop:
    """Runs (or resumes) one study to its end. Create it with a store, the study record and a context.

    Up to ``spec.budget.parallel`` trials are in flight at once (asyncio tasks): the baseline
    first and alone, then the early baseline repeats and the search fill up to ``parallel``
    (the strategy is asked while others run), and each confirm round runs its trials together.
    Every trial also waits for room in ``slots`` (``Engine.needs``; default: this host's cores,
    ``TrialSlots.for_host``) and gets its own copy of ``ctx`` (``dataclasses.replace``) with
    ``on_started``, ``on_phase``, ``study_id`` and ``trial_id`` set.

    Saving happens before telling: a trial is committed to the store before the strategy learns
    its outcome, so a crash never loses a measurement. ``adopt`` (see ``Adopt``) hands the loop
    trials still running elsewhere when it starts; with it, the loop never kills local
    processes on resume (the pids belong to other hosts). ``LoopEvents`` callbacks may arrive
    for several trials interleaved.
    """

    def __init__(
        self,
        store: StudyStore,
        study: StudyRecord,
        ctx: TrialContext,
        runner: Runner = run_trial,
        events: LoopEvents | None = None,
        adopt: Adopt | None = None,
        slots: TrialSlots | None = None,
    ) -> None:
        self.store = store
        self.study = study
        self.spec: StudySpec = study.spec
        self.ctx = ctx
        self.runner = runner
        self.events = events or LoopEvents()
        self.adopt = adopt
        self.slots = slots if slots is not None else TrialSlots.for_host(self.spec)
        self.parallel = self.spec.budget.parallel
        self.strategy: Strategy = make_strategy(self.spec)
        self._flight: dict[int, _InFlight] = {}
        self._saved: dict[int, Trial] = {}
        self._twin_waits: list[tuple[int, int, Params]] = []
        self._early: set[int] = set()
        self._spread_of: Trial | None = None
        self._adopted: list[asyncio.Future[TrialResult]] = []

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

    async def _recover(self) -> None:
        """Adopt the RUNNING trials still running elsewhere (``adopt``); kill engines a killed
        local run left (only without ``adopt``); mark the other RUNNING trials FAIL
        (interrupted)."""
        running = [t for t in self._trials() if t.state is TrialState.RUNNING]
        adopted: dict[int, Awaitable[TrialResult]] = {}
        if self.adopt is not None:
            adopted = dict(await self.adopt(running))
            known = {t.id for t in running}
            for trial_id in [i for i in adopted if i not in known]:
                log.warning("adopt returned trial id %d, which is not RUNNING; ignored", trial_id)
                close = getattr(adopted.pop(trial_id), "close", None)
                if close is not None:  # an un-awaited coroutine: close it quietly
                    close()
        else:
            for number, pid, pgid in self.store.trial_processes(self.study.id):
                if kill_process_group(pgid, must_contain=self.spec.engine.model):
                    self._say(f"killed the engine (pid {pid}) left running by trial {number}")
        for t in self.store.interrupt_running(
            self.study.id,
            "the study process stopped while this trial was running; resumed later",
            keep=set(adopted),
        ):
            self._say(
                f"trial {t.number} was RUNNING when the study stopped: marked FAIL (interrupted)"
            )
        for t in running:
            if t.id not in adopted:
                continue
            assert t.id is not None
            token = None
            if t.role is TrialRole.SEARCH:
                suggestion = self.strategy.add_pending(t.params)
                token = suggestion.token if suggestion is not None else None
            self._say(f"trial {t.number} is still running elsewhere: waiting for its result")
            future = asyncio.ensure_future(adopted[t.id])
            self._adopted.append(future)
            self._track(t, self._body(t, _awaiting(future)), token)

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

    # ---- trials in flight ----------------------------------------------------------------
    def _trial_ctx(self, trial: Trial) -> TrialContext:
        """This trial's own copy of the context: its ids and callbacks."""
        trial_id, number = trial.id, trial.number
        assert trial_id is not None

        def started(running: RunningEngine) -> None:
            if running.pid is not None:
                pgid = running.pgid if running.pgid is not None else running.pid
                self.store.set_trial_process(trial_id, running.pid, pgid)

        on_phase = self.events.trial_phase
        return dataclasses.replace(
            self.ctx,
            on_started=started,
            on_phase=(lambda p: on_phase(number, p)) if on_phase else None,
            study_id=self.study.id,
            trial_id=trial_id,
        )

    def _finish(self, trial: Trial, result: TrialResult) -> Trial:
        """Save ``result`` (idempotent), remember it, show it; the saved trial."""
        assert trial.id is not None
        saved = self.store.finish_trial(trial.id, result)
        self._saved[trial.id] = saved
        return saved

    async def _body(self, trial: Trial, work: Callable[[], Awaitable[TrialResult]]) -> Trial:
        """What a trial's task runs: await its result and save it. The scheduler tells the
        strategy afterwards (``_reap``): only it touches the strategy, so ``ask`` can run in a
        thread while trials are measured."""
        try:
            result = await work()
        except asyncio.CancelledError:
            self._finish(trial, _cancelled())
            raise
        except Exception as e:  # a bug must not leave the trial RUNNING forever
            log.exception("trial %d crashed servetune itself", trial.number)
            self._finish(
                trial,
                TrialResult(
                    state=TrialState.FAIL,
                    failure_kind=FailureKind.UNKNOWN,
                    failure_reason=f"internal error: {type(e).__name__}: {e}",
                ),
            )
            raise
        saved = self._finish(trial, result)
        if self.events.trial_finished:
            self.events.trial_finished(saved)
        return saved

    def _track(
        self, trial: Trial, body: Coroutine[Any, Any, Trial], token: int | None
    ) -> asyncio.Task[Trial]:
        assert trial.id is not None
        task = asyncio.create_task(body, name=f"{self.study.name}-trial-{trial.number}")
        self._flight[trial.id] = _InFlight(trial, task, self._key(trial), token)
        return task

    async def _launch(
        self,
        role: TrialRole,
        params: Params,
        *,
        repeat_of: int | None = None,
        token: int | None = None,
        say: Callable[[int], str] | None = None,
    ) -> Trial:
        """Start one trial as a task once there is room: fewer than ``parallel`` in flight and
        its ``Engine.needs`` free in ``slots``. Returns the stored RUNNING trial."""
        await self._room()
        needs = self.ctx.engine.needs(params, self.spec.workload)
        await self.slots.acquire(needs)
        try:
            number = self.store.next_trial_number(self.study.id)
            if say is not None:
                self._say(say(number))
            trial = self.store.add_trial(self.study.id, number, role, params, repeat_of=repeat_of)
        except BaseException:
            self.slots.release(needs)
            raise
        if self.events.trial_started:
            self.events.trial_started(number, role, params)
        ctx = self._trial_ctx(trial)
        task = self._track(
            trial, self._body(trial, lambda: self.runner(ctx, params, number)), token
        )
        task.add_done_callback(lambda _t: self.slots.release(needs))
        return trial

    async def _room(self) -> None:
        """Wait until fewer than ``parallel`` trials are in flight."""
        self._reap()
        while len(self._flight) >= self.parallel:
            await self._wait_one()

    async def _wait_one(self) -> None:
        """Wait until at least one trial in flight has finished, and take it in."""
        if self._flight:
            tasks = [f.task for f in self._flight.values()]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        self._reap()

    async def _drain(self) -> None:
        """Wait for every trial in flight."""
        self._reap()
        while self._flight:
            await self._wait_one()

    def _reap(self) -> None:
        """Take in the finished tasks (each saved by itself) and tell the strategy their
        outcomes (saved before told); re-raise a trial's crash. Then tell the twins that
        waited for a finished trial, and say the run-to-run spread once the early baseline
        repeats are done.
        """
        for trial_id, f in list(self._flight.items()):
            if not f.task.done():
                continue
            del self._flight[trial_id]
            self._early.discard(trial_id)
            if f.task.cancelled():
                raise asyncio.CancelledError(f"trial {f.trial.number} was cancelled")
            error = f.task.exception()
            if error is not None:
                raise error
            saved = self._saved.get(trial_id)
            if saved is not None and _counts(saved):
                if f.token is not None:
                    self._tell(saved, token=f.token)
                elif saved.role is TrialRole.SEARCH:
                    self._tell(saved, replay=True)
        waiting = []
        for source_id, token, params in self._twin_waits:
            if source_id in self._flight:
                waiting.append((source_id, token, params))
                continue
            saved = self._saved.get(source_id)
            if saved is not None and _counts(saved):
                self._say(f"{params} takes the result of trial {saved.number} (same configuration)")
                self._tell(saved, token=token)
        self._twin_waits = waiting
        if self._spread_of is not None and not self._early:
            baseline, self._spread_of = self._spread_of, None
            self._say_spread(baseline)

    def _flying_twin(self, params: Params) -> _InFlight | None:
        """A trial in flight (baseline or search) that runs the same configuration, else None."""
        key = self._config_key(params)
        return next(
            (
                f
                for f in self._flight.values()
                if f.key == key and f.trial.role in (TrialRole.BASELINE, TrialRole.SEARCH)
            ),
            None,
        )

    async def _abort(self) -> None:
        """Cancel every trial in flight and wait for them: each ends CANCELLED in the store
        (one cancelled before its task ran is recorded here), none stays RUNNING."""
        flights = list(self._flight.values())
        self._flight.clear()
        waits = [f.task for f in flights] + [a for a in self._adopted if not a.done()]
        for w in waits:
            w.cancel()
        try:
            if waits:
                await asyncio.gather(*waits, return_exceptions=True)
        finally:  # cancelled again while the trials clean up: still record every one
            self._record_cancelled(flights)

    def _record_cancelled(self, flights: list[_InFlight]) -> None:
        """Record each of ``flights`` not saved yet as FAIL ``cancelled`` (a store error is
        logged: the lease may be lost, and then nothing more may be written)."""
        for f in flights:
            assert f.trial.id is not None
            if f.trial.id in self._saved:
                continue
            try:
                self._finish(f.trial, _cancelled())
            except ServetuneError as e:  # e.g. the lease was lost: nothing more may be written
                log.warning("trial %d could not be marked cancelled: %s", f.trial.number, e)

    # ---- phases --------------------------------------------------------------------------
    async def run(self) -> StudyOutcome:
        """Run the study from wherever the store says it is to the end; return the outcome.

        Raises ``asyncio.CancelledError`` (after recording) when cancelled; every trial in
        flight is then recorded as cancelled, the study is marked cancelled and can be
        resumed. Any other error also cancels the trials in flight (none stays RUNNING) and
        marks the study failed.
        """
        try:
            await self._recover()
            self.store.set_study_status(self.study.id, "running")
            outcome = await self._search_and_confirm()
        except asyncio.CancelledError:
            await self._stop("cancelled")
            raise
        except BaseException:
            await self._stop("failed")
            raise
        return outcome

    async def _stop(self, status: StudyStatus) -> None:
        """Abort the trials in flight, then mark the study ``status``: marked even when a second
        cancel cuts the abort short (the supervisor re-cancels a loop whose clean-up is slow,
        e.g. a worker slow to send its cancelled result), so a stopped study never stays
        ``running``."""
        try:
            await self._abort()
        finally:
            self.store.set_study_status(self.study.id, status)

    async def _search_and_confirm(self) -> StudyOutcome:
        spec = self.spec
        trials = self._trials()
        self._replay(trials)
        if not _counts(_baseline(trials)):
            await self._drain()  # adopted trials may hold the baseline; it runs first and alone
            if not _counts(_baseline(self._trials())):
                await self._launch(
                    TrialRole.BASELINE,
                    {},
                    say=lambda n: f"trial {n}: the engine's defaults (baseline)",
                )
                await self._drain()
        await self._repeat_baseline_early()
        deadline = (
            (time.monotonic() + spec.budget.max_wall_time_s)
            if spec.budget.max_wall_time_s
            else None
        )

        twins = 0
        while True:
            self._reap()
            trials = self._trials()
            searched = [
                t for t in trials if t.role in (TrialRole.BASELINE, TrialRole.SEARCH) and _counts(t)
            ]
            flying = [
                f
                for f in self._flight.values()
                if f.trial.role in (TrialRole.BASELINE, TrialRole.SEARCH)
            ]
            if len(searched) + len(flying) >= spec.budget.max_trials:
                if not flying:
                    break
                await self._wait_one()  # one in flight may end cancelled: then ask again
                continue
            if deadline is not None and time.monotonic() >= deadline:
                self._say("wall-time budget spent; stopping the search")
                break
            if len(self._flight) >= self.parallel:
                await self._wait_one()
                continue
            # a model-based ask can take a while: off the event loop, so the trials in
            # flight are measured undisturbed (only this scheduler touches the strategy)
            suggestion = (
                await asyncio.to_thread(self.strategy.ask) if self._flight else self.strategy.ask()
            )
            if suggestion is None:
                self._say("the search space is exhausted")
                break
            twin = self._measured_twin(suggestion.params, searched)
            flying_twin = None if twin is not None else self._flying_twin(suggestion.params)
            if twin is not None or flying_twin is not None:
                if twin is not None:  # the engine runs these params exactly as an earlier trial
                    self._say(
                        f"{suggestion.params} runs the same engine configuration as trial "
                        f"{twin.number}: its result is reused, not measured again"
                    )
                    self._tell(twin, token=suggestion.token)
                elif flying_twin is not None:
                    assert flying_twin.trial.id is not None
                    self._say(
                        f"{suggestion.params} runs the same engine configuration as trial "
                        f"{flying_twin.trial.number}, still running: its result will be reused"
                    )
                    self._twin_waits.append(
                        (flying_twin.trial.id, suggestion.token, suggestion.params)
                    )
                twins += 1
                if twins >= spec.budget.max_trials:
                    self._say("the strategy keeps proposing measured configurations; stopping")
                    break
                continue
            region = infeasible_for(trials, self.ctx.engine, spec.space, suggestion.params)
            if region is not None:  # the flag failed both ways here: record, do not launch
                number = self.store.next_trial_number(self.study.id)
                self._say(f"trial {number}: {region.message}")
                t = self.store.add_trial(self.study.id, number, TrialRole.SEARCH, suggestion.params)
                assert t.id is not None
                rejected = TrialResult(
                    state=TrialState.FAIL,
                    failure_kind=FailureKind.PREFLIGHT_REJECTED,
                    failure_reason=region.message,
                )
                saved = self.store.finish_trial(t.id, rejected)
                if _counts(saved):
                    self._tell(saved, token=suggestion.token)
                continue
            await self._launch(TrialRole.SEARCH, suggestion.params, token=suggestion.token)
        await self._drain()

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

    async def _repeat(self, target: Trial, total: int) -> list[int]:
        """Launch CONFIRM repeats of ``target`` on fresh servers until it has ``total`` that
        count or are in flight (interrupted or cancelled ones are run again; finished ones,
        whatever their outcome, are kept), so a resumed study runs only the missing ones.
        Returns the ids of the trials launched; the caller waits for them (``_drain``)."""

        def mine(t: Trial) -> bool:
            return t.role is TrialRole.CONFIRM and t.repeat_of == target.number

        self._reap()
        done = [t for t in self._trials() if mine(t) and _counts(t)]
        flying = [f for f in self._flight.values() if mine(f.trial)]
        launched = []
        for _ in range(total - len(done) - len(flying)):
            t = await self._launch(
                TrialRole.CONFIRM,
                target.params,
                repeat_of=target.number,
                say=lambda n: f"trial {n}: repeating trial {target.number} on a fresh server",
            )
            assert t.id is not None
            launched.append(t.id)
        return launched

    async def _repeat_baseline_early(self) -> None:
        """Measure the run-to-run spread: ``budget.baseline_repeats`` runs of the engine
        defaults in all (a baseline that did not complete is not repeated). The repeats are
        launched and the search fills the rest of ``parallel`` beside them; the spread is said
        once they are all done (``_reap``)."""
        baseline = _baseline(self._trials())
        early = self.spec.budget.baseline_repeats - 1
        if baseline is None or baseline.state is not TrialState.COMPLETE or early <= 0:
            return
        await self._repeat(baseline, early)
        self._early = {
            i
            for i, f in self._flight.items()
            if f.trial.role is TrialRole.CONFIRM and f.trial.repeat_of == baseline.number
        }
        self._spread_of = baseline
        self._reap()

    def _say_spread(self, baseline: Trial) -> None:
        """Say the run-to-run spread of the engine defaults (baseline and its repeats)."""
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
        then each candidate; the trials of one round run in parallel up to ``parallel``, and a
        round ends before the next starts) so that a slow drift of the machine touches all
        alike; then recommend from the repeats (``recommend_from_repeats``)."""
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
                await self._drain()
        rec = recommend_from_repeats(
            self._trials(), spec.objective, candidates, baseline if base_ok else None, self._key
        )
        if rec.verdict is not None:
            self._say(rec.verdict.summary)
        return rec


def _awaiting(work: Awaitable[TrialResult]) -> Callable[[], Awaitable[TrialResult]]:
    """A trial body's ``work`` for a result that is already on its way (an adopted trial)."""
    return lambda: work


def _cancelled() -> TrialResult:
    """The result of a trial stopped by cancellation."""
    return TrialResult(
        state=TrialState.FAIL,
        failure_kind=FailureKind.CANCELLED,
        failure_reason="cancelled by the user",
    )
