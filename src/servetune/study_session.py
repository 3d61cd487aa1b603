"""Wiring for one study run in this process: engine, local deployment, benchmark client, live display.

``run_study`` is what ``servetune run``, ``resume`` and ``demo`` call.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from servetune.bench.builtin import BuiltinClient
from servetune.core.study import Params, Trial, TrialRole, TrialState, format_params
from servetune.deploy.local import LocalDeployment
from servetune.engines import get_engine
from servetune.loop import LoopEvents, StudyLoop, StudyOutcome
from servetune.runner import TrialContext
from servetune.settings import Settings
from servetune.store.repo import StudyStore

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
        ok = "[green]feasible[/]" if r.feasible else "[yellow]misses SLO[/]"
        return f"{head} {m.output_tokens_per_s:7.1f} tok/s  TTFT p99 {ttft or 0:7.0f} ms  {ok}  {params}"
    kind = r.failure_kind.value if r.failure_kind else t.state.value
    return f"{head} [red]{t.state.value}[/] {kind}: {r.failure_reason}  {params}"


async def run_study(settings: Settings, study_ref: str | int, console: Console) -> StudyOutcome:
    """Run or resume study ``study_ref`` to its end with a rich progress display."""
    store = StudyStore(settings.db_url)
    study = store.get_study(study_ref)
    spec = study.spec
    engine = get_engine(spec.engine)
    log_dir = Path(spec.deployment.log_dir or Path(settings.data_dir) / "logs" / study.name)
    await asyncio.to_thread(log_dir.mkdir, parents=True, exist_ok=True)
    deployment = LocalDeployment(
        host=spec.deployment.host, stop_timeout_s=spec.deployment.stop_timeout_s
    )
    client = BuiltinClient.for_spec(spec)
    ctx = TrialContext(
        spec=spec,
        engine=engine,
        deployment=deployment,
        client=client,
        log_dir=log_dir,
        label=study.name,
    )
    total = spec.budget.max_trials + (2 * spec.budget.confirm_repeats)
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
