"""What a finished study prints at the end of `servetune run`, `resume`, `demo` and `submit`.

One function for all of them, fed a ``StudyOutcome`` (from the loop, or rebuilt from storage).
"""

from __future__ import annotations

import logging
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from servetune.core.metrics import format_warning
from servetune.core.spec import StudySpec
from servetune.core.study import Trial, TrialRole, TrialState, format_params
from servetune.settings import Settings

log = logging.getLogger(__name__)


def print_stored_outcome(
    record: Any, trials: list[Trial], report: str, out: Console | None = None
) -> None:
    """Print what `servetune run` prints at the end (trial counts, best params, the comparison
    with the defaults, the verdict, the recommendation, the launch command) for a finished
    study as stored: ``record`` (a StudyRecord with its verdict record) and its ``trials``,
    e.g. read from a manager's GET /api/studies/{id} and /trials. ``report`` is where its
    report is (a URL); ``out`` the console (default: this module's). Raises typer.Exit(1)
    when the study has nothing to recommend, like `run`."""
    from servetune.loop import StudyOutcome

    print_outcome(StudyOutcome.of_stored(record, trials), report=report, out=out)


def print_outcome(
    outcome: Any,
    settings: Settings | None = None,
    *,
    report: str | None = None,
    out: Console | None = None,
) -> None:
    """Print the end of `run`/`resume`/`demo`/`submit` for ``outcome`` (a StudyOutcome) on
    ``out`` (default: stdout): trial counts, the best params, the comparison with the
    defaults, the verdict, the recommendation, the launch command, the report. ``report`` is
    where the report is (None: written here under ``settings``' reports directory). Raises
    typer.Exit(1) when nothing can be recommended."""
    from servetune.core.scoring import infeasible_reason, mean_metric, runs_of
    from servetune.engines import get_engine
    from servetune.report.html import write_report

    console = out or Console()

    spec: StudySpec = outcome.study.spec
    best: Trial | None = outcome.best
    base: Trial | None = outcome.baseline
    chosen: Trial | None = outcome.recommended
    console.rule(f"study {outcome.study.name}")
    counts: dict[str, int] = {}
    for t in outcome.trials:
        counts[t.state.value] = counts.get(t.state.value, 0) + 1
    console.print("trials: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    if report is None:
        assert settings is not None, "give settings (a report written here) or report"
        path = settings.report_path(outcome.study.name)
        write_report(outcome.study, outcome.trials, path, plotly_dir=settings.reports_dir)
        report = str(path)
    if best is None or chosen is None:
        if outcome.recommendation and any(t.state is TrialState.COMPLETE for t in outcome.trials):
            console.print(f"[red]nothing to recommend[/]: {escape(outcome.recommendation)}")
        else:
            console.print(
                "[red]no trial completed[/]: see `servetune show` for each failure's reason"
            )
        console.print(f"report: {report}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    why = infeasible_reason(chosen)
    feasible = "feasible" if why is None else f"[red]{escape(why)}[/]"
    what = "engine defaults" if chosen.role is TrialRole.BASELINE else "best params"
    console.print(
        f"{what} (trial {chosen.number}, {feasible}): {format_params(chosen.params)}",
        highlight=False,
    )
    for w in chosen.result.warnings if chosen.result else []:
        console.print(f"[yellow]warning {escape(format_warning(w))}[/]", highlight=False)
    if best.number != chosen.number:
        console.print(
            f"best candidate trial {best.number} ({format_params(best.params)}) was not kept",
            highlight=False,
        )
    if base is not None and base.number != best.number:
        # every run of the defaults; the candidate's fresh repeats when there are any (its
        # search run was picked as the best of a noisy search, so it is biased upwards)
        base_runs = runs_of(base, outcome.trials)
        best_runs = runs_of(best, outcome.trials)[1:] or [best]
        fresh = best_runs[0] is not best
        table = Table(
            "metric",
            f"engine defaults (trial {base.number})",
            f"best candidate (trial {best.number})",
            "change",
            caption=(
                f"medians of {len(base_runs)} run(s) of the defaults and {len(best_runs)} fresh "
                f"repeat(s) of trial {best.number}"
                if fresh
                else f"medians of {len(base_runs)} run(s) of the defaults and trial "
                f"{best.number}'s search run (not repeated)"
            )
            + ", at the last load level",
        )
        for name in (
            "output_tokens_per_s",
            "ttft_ms.p99",
            "ttft_ms.p50",
            "tpot_ms.p50",
            "requests_per_s",
        ):
            b = mean_metric(base_runs, name, median=True)
            v = mean_metric(best_runs, name, median=True)
            change = f"{(v / b - 1) * 100:+.1f} %" if b and v is not None else "-"
            table.add_row(
                name,
                f"{b:.1f}" if b is not None else "-",
                f"{v:.1f}" if v is not None else "-",
                change,
            )
        console.print(table)
    if outcome.verdict is not None:
        head = "repeats" if outcome.verdict.repeats else "not confirmed"
        console.print(f"[bold]{head}[/]: {escape(outcome.verdict.summary)}", highlight=False)
    if outcome.noise_pct is not None:
        console.print(
            f"run-to-run spread: {outcome.noise_pct:.1f} % (differences inside it are ties)",
            highlight=False,
        )
    if outcome.recommendation:
        style = "green" if chosen.feasible else "yellow"
        console.print(
            f"[bold {style}]verdict[/]: {escape(outcome.recommendation)}", highlight=False
        )
    if outcome.front:
        console.print("Pareto front: trials " + ", ".join(str(t.number) for t in outcome.front))
    cmd = get_engine(spec.engine).user_command(chosen.params)
    console.print("[bold]launch command[/] (your llama.cpp build):")
    console.print(cmd.display(), soft_wrap=True, highlight=False)
    console.print(stand_in_note(spec), soft_wrap=True, highlight=False)
    console.print(f"report: {report}", highlight=False, soft_wrap=True)


def stand_in_note(spec: Any) -> str:
    """For llama.cpp: how to try the command here with the wheel's stand-in (else empty)."""
    if spec.engine.kind != "llamacpp":
        return ""
    from servetune.engines.llamacpp.launch import STAND_IN_NOTE

    return STAND_IN_NOTE
