"""Wiring for one study run in this process: engine, deployment, benchmark client, live display.

``run_study`` is what ``servetune run``, ``resume`` and ``demo`` call.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import logging
import os
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
from sqlalchemy.engine import make_url

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
from servetune.errors import ServetuneError
from servetune.loop import LoopEvents, StudyLoop, StudyOutcome
from servetune.runner import TrialContext
from servetune.settings import Settings
from servetune.store.repo import StudyRecord, StudyStore

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


async def run_study(
    settings: Settings, store: StudyStore, study: StudyRecord, console: Console
) -> StudyOutcome:
    """Run or resume ``study`` (stored in the open ``store``) to its end with a live display.

    Raises StudyBusy when another process on this machine is running it.
    """
    lock = StudyLock(settings, store.url, study.id)
    lock.acquire()
    try:
        return await _run_locked(settings, store, study, console)
    finally:
        lock.release()


async def _run_locked(
    settings: Settings, store: StudyStore, study: StudyRecord, console: Console
) -> StudyOutcome:
    spec = study.spec
    engine = get_engine(spec.engine)
    log_dir = Path(spec.deployment.log_dir or Path(settings.data_dir) / "logs" / study.name)
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

        def started(number: int, role: TrialRole, params: Params) -> None:
            progress.update(task, description=f"trial {number} ({role.value}): starting")

        def phase(number: int, name: str) -> None:
            progress.update(task, description=f"trial {number}: {name}")

        def finished(t: Trial) -> None:
            progress.advance(task)
            progress.console.print(_describe(t), highlight=False)

        def message(text: str) -> None:
            progress.console.print(f"[dim]{text}[/]", highlight=False)

        loop = StudyLoop(store, study, ctx, events=LoopEvents(started, phase, finished, message))
        return await loop.run()


def deployment_for(spec: StudySpec, engine: Engine, study: str) -> Deployment:
    """The Deployment ``spec.deployment`` names, for study ``study``.

    Docker and kubernetes deployments first remove the containers / InferenceServices a dead run
    of this study left behind. Raises DeploymentError when the Docker daemon or the Kubernetes
    API cannot be reached.
    """
    d = spec.deployment
    if isinstance(d, DockerDeploymentSpec):
        prefix = engine.server_prefix() if isinstance(engine, LlamaCppEngine) else []
        docker = DockerDeployment(
            d, study=study, model_path=spec.engine.model, server_prefix=prefix
        )
        for name in docker.remove_leftovers():
            log.warning("removed container %s left by an earlier run of study %s", name, study)
        return docker
    if isinstance(d, KubernetesDeploymentSpec):
        prefix = engine.server_prefix() if isinstance(engine, LlamaCppEngine) else []
        k8s = KubernetesDeployment(
            d, study=study, model_path=spec.engine.model, server_prefix=prefix
        )
        for name in k8s.remove_leftovers():
            log.warning(
                "deleted InferenceService %s left by an earlier run of study %s", name, study
            )
        return k8s
    return LocalDeployment(host=d.host, stop_timeout_s=d.stop_timeout_s)


class StudyBusy(ServetuneError):
    """Another process on this machine is running the study right now."""


class StudyLock:
    """An exclusive, process-lifetime lock on one study (``fcntl.flock`` on a file in the data dir).

    Held while a process runs the study, so a second ``run``/``resume`` cannot take it over; the
    OS releases it when the process dies (even by SIGKILL), so a crashed study is never locked.
    Covers processes on this machine only (a manager with remote workers needs a DB lease).
    """

    def __init__(self, settings: Settings, store_url: str, study_id: int) -> None:
        url = make_url(store_url).render_as_string(hide_password=True)  # as StudyStore.url
        key = hashlib.sha256(f"{url}#{study_id}".encode()).hexdigest()[:16]
        self.path = Path(settings.data_dir) / "locks" / f"study-{key}.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise StudyBusy naming the holder's pid."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StudyBusy(
                f"the study is being run by another process (pid {holder}); wait for it, or stop it "
                "and then `servetune resume` it"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        """Release the lock (idempotent)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def is_held_elsewhere(self) -> bool:
        """True when another process holds the lock now (a study marked running that is not
        held is one whose process died)."""
        if not self.path.exists():
            return False
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False
