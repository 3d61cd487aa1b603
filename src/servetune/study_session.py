"""Wiring for one study run in this process: engine, deployment, benchmark client, live display.

``run_study`` is what ``servetune run``, ``resume`` and ``demo`` call.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from servetune.bench.builtin import BuiltinClient
from servetune.core.metrics import format_warning
from servetune.core.scoring import infeasible_reason
from servetune.core.spec import DockerDeploymentSpec, KubernetesDeploymentSpec, StudySpec
from servetune.core.study import Params, Trial, TrialRole, TrialState, format_params
from servetune.deploy.base import Deployment
from servetune.deploy.docker import DockerDeployment
from servetune.deploy.kubernetes import KubernetesDeployment
from servetune.deploy.local import LocalDeployment
from servetune.engines import get_engine
from servetune.engines.base import Engine
from servetune.engines.llamacpp import LlamaCppEngine
from servetune.errors import ServetuneError, StudyBusy
from servetune.loop import LoopEvents, StudyLoop, StudyOutcome, TrialSlots
from servetune.runner import TrialContext
from servetune.settings import Settings
from servetune.store.repo import LeaseOwner, StudyLease, StudyRecord, StudyStore

log = logging.getLogger(__name__)


def _describe(t: Trial) -> str:
    r = t.result
    head = f"trial {t.number:>2} {t.role.value:<8}"
    params = format_params(t.params)
    if r is None:
        return f"{head} {params}"
    if t.state is TrialState.COMPLETE and r.metrics:
        m = r.metrics[-1]
        ttft = m.value("ttft_ms.p99")
        missed = r.slo_report.missed() if r.slo_report else []
        why = f"misses {'; '.join(missed)}" if missed else (infeasible_reason(t) or "")
        ok = "[green]feasible[/]" if r.feasible else f"[yellow]{escape(why)}[/]"
        line = f"{head} {m.output_tokens_per_s:7.1f} tok/s  TTFT p99 {ttft or 0:7.0f} ms  {ok}  {params}"
        return line + "".join(
            f"\n    [yellow]warning[/] {escape(format_warning(w))}" for w in r.warnings
        )
    kind = r.failure_kind.value if r.failure_kind else t.state.value
    return f"{head} [red]{t.state.value}[/] {kind}: {r.failure_reason}  {params}"


class InFlightLine:
    """The live display's description of the trials in flight, updated by the loop's events.

    One trial: ``trial 3 (search): starting`` then ``trial 3: benchmarking``; several (with
    ``budget.parallel`` > 1): ``trials 3 (benchmarking), 4 (starting)``, by trial number. Each
    method returns the new description.
    """

    def __init__(self) -> None:
        self._phases: dict[int, str] = {}
        self._roles: dict[int, TrialRole] = {}

    def started(self, number: int, role: TrialRole) -> str:
        """Trial ``number`` was launched in ``role``."""
        self._phases[number] = "starting"
        self._roles[number] = role
        return self.text()

    def phase(self, number: int, name: str) -> str:
        """Trial ``number`` entered phase ``name``."""
        self._phases[number] = name
        return self.text()

    def finished(self, number: int) -> str:
        """Trial ``number`` finished (it leaves the line)."""
        self._phases.pop(number, None)
        self._roles.pop(number, None)
        return self.text()

    def text(self) -> str:
        """The description for the trials in flight now (``waiting`` when none is)."""
        if not self._phases:
            return "waiting"
        if len(self._phases) == 1:
            ((number, phase),) = self._phases.items()
            if phase == "starting":
                return f"trial {number} ({self._roles[number].value}): starting"
            return f"trial {number}: {phase}"
        return "trials " + ", ".join(f"{n} ({p})" for n, p in sorted(self._phases.items()))


async def run_study(
    settings: Settings, store: StudyStore, study: StudyRecord, console: Console
) -> StudyOutcome:
    """Run or resume ``study`` (stored in the open ``store``) to its end with a live display.

    The study's lease in the database is taken first (``take_study``) and renewed in the
    background every third of ``settings.lease_ttl_s`` while the study runs; it is released
    when the run ends (finished, failed or cancelled). Raises StudyBusy when another live
    process, on this host or any other sharing the database, holds the lease, or when this
    process loses it (it stopped renewing long enough for another process to take over).
    """
    clean_stale_locks(settings)
    async with holding_lease(settings, store, study.id):
        return await _run_locked(settings, store, study, console)


@contextlib.asynccontextmanager
async def holding_lease(
    settings: Settings, store: StudyStore, study_id: int
) -> AsyncIterator[LeaseOwner]:
    """Hold the study's lease while the ``async with`` body runs; yields the owner (this run).

    Takes it (``take_study``: StudyBusy when a live process holds it), fences ``store``'s writes
    to the study with it, renews it every ``settings.lease_ttl_s / 3`` (``_keep_lease``; losing
    it cancels the task running the body, which then raises StudyBusy), and on exit removes the
    fence and releases it. Both ``run_study`` and the manager's supervisor hold studies this way.
    """
    owner = LeaseOwner(owner_id=uuid.uuid4().hex, host=settings.host_name, pid=os.getpid())
    await asyncio.to_thread(take_study, store, study_id, owner, settings)
    store.fence(study_id, owner.owner_id)
    main = asyncio.current_task()
    lost: list[StudyBusy] = []
    renewer = asyncio.create_task(_keep_lease(store, study_id, owner, settings, main, lost))
    try:
        yield owner
    except (asyncio.CancelledError, StudyBusy):
        if lost:  # the loop's own cancellation writes were fenced off: report the takeover
            raise lost[0] from None
        raise
    finally:
        renewer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewer
        store.fence(study_id, None)
        if not lost:
            try:
                await asyncio.to_thread(store.release_lease, study_id, owner.owner_id)
            except ServetuneError as e:  # it lapses by itself after lease_ttl_s
                log.warning("study %d: could not release its lease: %s", study_id, e)


async def _keep_lease(
    store: StudyStore,
    study_id: int,
    owner: LeaseOwner,
    settings: Settings,
    main: asyncio.Task[object] | None,
    lost: list[StudyBusy],
) -> None:
    """Renew the lease every ``lease_ttl_s / 3``; cancel ``main`` when it was taken over.

    A failed renewal (the database unreachable for a moment) is logged and retried at the next
    tick: the lease stays this owner's until another process takes it over after it expires.
    """
    every_s = settings.lease_ttl_s / 3
    while True:
        await asyncio.sleep(every_s)
        try:
            await asyncio.to_thread(
                store.renew_lease, study_id, owner.owner_id, settings.lease_ttl_s
            )
        except StudyBusy as e:
            log.error("%s; stopping this run", e)
            lost.append(e)
            if main is not None:
                main.cancel()
            return
        except ServetuneError as e:
            log.warning("renewing the lease of study %d failed (retrying): %s", study_id, e)


def take_study(
    store: StudyStore, study_id: int, owner: LeaseOwner, settings: Settings
) -> StudyLease:
    """Take the study's lease for ``owner``; the lease. Raises StudyBusy naming a live holder.

    A lease held on this host (``settings.host_name``) by a process that is gone (no such pid,
    a zombie, or the pid reused by a process started after the lease was taken) is taken over
    at once; any other lease only once it expires (``settings.lease_ttl_s`` after its holder
    last renewed it).
    """
    try:
        return store.acquire_lease(study_id, owner, settings.lease_ttl_s)
    except StudyBusy:
        holder = store.lease_holder(study_id)
        if holder is None or holder_alive(holder, settings):
            raise
        log.info("study %d: its lease holder %s is gone; taking over", study_id, holder.describe())
        return store.acquire_lease(study_id, owner, settings.lease_ttl_s, take_over=holder.owner_id)


def holder_alive(lease: StudyLease, settings: Settings) -> bool:
    """Whether the lease's holder may still be running the study.

    False when the lease has expired, or when it is held on this host by a process that is
    gone; a holder on another host is alive until its lease expires (nothing better is known).
    """
    if not lease.is_live():
        return False
    if lease.host != settings.host_name:
        return True
    return _pid_alive(lease.pid, lease.acquired_at.timestamp())


def _pid_alive(pid: int, since_epoch_s: float) -> bool:
    """True when ``pid`` runs on this host and was started before ``since_epoch_s`` (+2 s slack).

    Reads ``/proc/<pid>/stat`` (state and start time, proc(5)); without /proc, a pid that
    exists counts as alive.
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        state, start_ticks = fields[0], int(fields[19])
        boot_s = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
    except (OSError, ValueError, IndexError, StopIteration):
        return True
    if state in ("Z", "X"):
        return False
    started_s = boot_s + start_ticks / os.sysconf("SC_CLK_TCK")
    return started_s <= since_epoch_s + 2.0


def study_status(record: StudyRecord, settings: Settings) -> str:
    """The status to show for ``record``: a study marked running whose lease lapsed (or whose
    holder on this host is gone) reads ``interrupted``; a live one ``running``."""
    if record.status != "running":
        return str(record.status)
    if record.lease is not None and holder_alive(record.lease, settings):
        return "running"
    return "interrupted (its process is gone; `servetune resume` continues it)"


def clean_stale_locks(settings: Settings) -> int:
    """Remove the per-study lock files older servetune versions left in ``<data_dir>/locks``.

    The database lease replaced them; a file still locked by a live older process is kept.
    Returns how many were removed; never raises (a read-only data directory keeps its files).
    """
    folder = Path(settings.data_dir) / "locks"
    removed = 0
    try:
        paths = list(folder.glob("study-*.lock"))
    except OSError:
        return 0
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            path.unlink()
            removed += 1
        except OSError:
            continue
        finally:
            os.close(fd)
    with contextlib.suppress(OSError):
        folder.rmdir()
    return removed


async def _run_locked(
    settings: Settings, store: StudyStore, study: StudyRecord, console: Console
) -> StudyOutcome:
    spec = study.spec
    engine = get_engine(spec.engine)
    log_dir = (
        Path(spec.deployment.log_dir)
        if spec.deployment.log_dir
        else settings.study_logs_dir(study.name)
    )
    await asyncio.to_thread(log_dir.mkdir, parents=True, exist_ok=True)
    deployment = await asyncio.to_thread(deployment_for, spec, engine, study.name)
    client = BuiltinClient.for_spec(spec)
    ctx = TrialContext(
        spec=spec,
        engine=engine,
        deployment=deployment,
        client=client,
        log_dir=log_dir,
        label=study.name,
    )
    total = spec.budget.planned_trials()
    done = len([t for t in store.trials(study.id) if t.state.is_finished()])
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("starting", total=total, completed=done)
        flying = InFlightLine()

        def started(number: int, role: TrialRole, params: Params) -> None:
            progress.update(task, description=flying.started(number, role))

        def phase(number: int, name: str) -> None:
            progress.update(task, description=flying.phase(number, name))

        def finished(t: Trial) -> None:
            progress.update(task, description=flying.finished(t.number))
            progress.advance(task)
            progress.console.print(_describe(t), highlight=False)

        def message(text: str) -> None:
            progress.console.print(f"[dim]{text}[/]", highlight=False)

        slots = TrialSlots.for_host(spec)
        if spec.budget.parallel > 1:
            message(
                f"up to {spec.budget.parallel} trials at once on this host ({slots.describe()}); "
                "each waits until its engine's threads fit"
            )
        loop = StudyLoop(
            store, study, ctx, events=LoopEvents(started, phase, finished, message), slots=slots
        )
        return await loop.run()


def build_deployment(spec: StudySpec, engine: Engine, study: str) -> Deployment:
    """The Deployment ``spec.deployment`` names, for study ``study``, built without touching the
    Docker daemon or the Kubernetes API (``run --dry-run`` uses it to show what would launch)."""
    d = spec.deployment
    prefix = engine.server_prefix() if isinstance(engine, LlamaCppEngine) else []
    if isinstance(d, DockerDeploymentSpec):
        return DockerDeployment(d, study=study, model_path=spec.engine.model, server_prefix=prefix)
    if isinstance(d, KubernetesDeploymentSpec):
        return KubernetesDeployment(
            d, study=study, model_path=spec.engine.model, server_prefix=prefix
        )
    return LocalDeployment(host=d.host, stop_timeout_s=d.stop_timeout_s)


def deployment_for(spec: StudySpec, engine: Engine, study: str) -> Deployment:
    """``build_deployment``, then, for Docker and kubernetes, removal of the containers /
    InferenceServices a dead run of this study left behind. Raises DeploymentError when the
    Docker daemon or the Kubernetes API cannot be reached.
    """
    deployment = build_deployment(spec, engine, study)
    if isinstance(deployment, DockerDeployment):
        for name in deployment.remove_leftovers():
            log.warning("removed container %s left by an earlier run of study %s", name, study)
    elif isinstance(deployment, KubernetesDeployment):
        for name in deployment.remove_leftovers():
            log.warning(
                "deleted InferenceService %s left by an earlier run of study %s", name, study
            )
    return deployment
