"""The HTML report: why the winner won. Trial table, objective over trials, Pareto scatter, importances.

Either one self-contained file (plotly.js, about 4.8 MB, inlined once), or a small page that
loads a shared ``plotly-<version>.min.js`` written once beside the data directory's reports.
"""

from __future__ import annotations

import html
import logging
import os
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import plotly
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from servetune.core.metrics import format_warning
from servetune.core.scoring import best_trial, infeasible_reason, pareto_front
from servetune.core.study import Trial, TrialRole, TrialState, format_params
from servetune.engines import get_engine
from servetune.engines.llamacpp.launch import STAND_IN_NOTE
from servetune.store.repo import StudyRecord

log = logging.getLogger(__name__)

_CSS = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1200px;color:#222;padding:0 1rem}
table{border-collapse:collapse;font-size:.85rem;width:100%}th,td{border:1px solid #ddd;padding:.3rem .5rem;
text-align:left;vertical-align:top}th{background:#f4f4f4}tr.best{background:#e8f7e8}tr.fail{color:#a33}
code,pre{background:#f6f6f6;padding:.2rem .4rem;border-radius:4px}pre{white-space:pre-wrap;padding:.6rem}
.warn{color:#8a5a00}.verdict{padding:.6rem 1rem;border-left:4px solid #4a4;background:#f3fbf3}.noise{border-color:#c90;background:#fdf8ec}
"""


def _metric(t: Trial, name: str) -> float | None:
    if t.result is None or not t.result.metrics:
        return None
    return t.result.metrics[-1].value(name)


def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _trial_rows(trials: Sequence[Trial], best: Trial | None) -> str:
    rows = []
    for t in trials:
        r = t.result
        cls = (
            "best"
            if best and t.number == best.number
            else ("fail" if t.state is TrialState.FAIL else "")
        )
        failure = ""
        if r and r.failure_kind:
            failure = f"<b>{r.failure_kind.value}</b>: {html.escape(r.failure_reason or '')}"
        missed = (
            r.slo_report.missed() if r and r.slo_report and r.state is TrialState.COMPLETE else []
        )
        notes = "<br>".join(
            [f"<b>misses</b> {html.escape(m)}" for m in missed]
            + [
                f"<span class='warn'>warning {html.escape(format_warning(w))}</span>"
                for w in (r.warnings if r else [])
            ]
            + [html.escape(n) for n in (r.notes if r else [])]
        )
        rows.append(
            f"<tr class='{cls}'><td>{t.number}</td><td>{t.role.value}"
            f"{f' of {t.repeat_of}' if t.repeat_of is not None else ''}</td><td>{t.state.value}</td>"
            f"<td><code>{html.escape(format_params(t.params))}</code></td>"
            f"<td>{_fmt(_metric(t, 'output_tokens_per_s'))}</td><td>{_fmt(_metric(t, 'requests_per_s'), 2)}</td>"
            f"<td>{_fmt(_metric(t, 'ttft_ms.p50'), 0)}</td><td>{_fmt(_metric(t, 'ttft_ms.p99'), 0)}</td>"
            f"<td>{_fmt(_metric(t, 'tpot_ms.p50'))}</td><td>{_fmt(_metric(t, 'itl_ms.p99'))}</td>"
            f"<td>{'yes' if t.feasible else 'no'}</td><td>{failure}{notes}</td></tr>"
        )
    head = (
        "<tr><th>#</th><th>role</th><th>state</th><th>params</th><th>out tok/s</th><th>req/s</th>"
        "<th>TTFT p50 ms</th><th>TTFT p99 ms</th><th>TPOT p50 ms</th><th>ITL p99 ms</th><th>feasible</th>"
        "<th>failure / notes</th></tr>"
    )
    return f"<table>{head}{''.join(rows)}</table>"


def _objective_plot(record: StudyRecord, trials: Sequence[Trial]) -> go.Figure:
    term = record.spec.objective.terms[0]
    fig = go.Figure()
    done = [t for t in trials if t.state is TrialState.COMPLETE]
    groups = {
        "feasible": [t for t in done if t.feasible and t.role is not TrialRole.CONFIRM],
        "infeasible": [t for t in done if not t.feasible and t.role is not TrialRole.CONFIRM],
        "repeat on a fresh server": [t for t in done if t.role is TrialRole.CONFIRM],
    }
    colors = {"feasible": "#2a2", "infeasible": "#d80", "repeat on a fresh server": "#88a"}
    for name, group in groups.items():
        xs = [t.number for t in group]
        ys = [
            t.result.objective_values[0] if t.result and t.result.objective_values else None
            for t in group
        ]
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="markers",
                name=name,
                marker={"color": colors[name], "size": 9},
                text=[format_params(t.params) for t in group],
            )
        )
    better = max if term.direction == "maximize" else min
    best_so_far: list[float | None] = []
    current: float | None = None
    ordered = sorted((t for t in trials if t.role is not TrialRole.CONFIRM), key=lambda t: t.number)
    for t in ordered:
        if t.state is TrialState.COMPLETE and t.feasible and t.result and t.result.objective_values:
            v = t.result.objective_values[0]
            current = v if current is None else better(current, v)
        best_so_far.append(current)
    fig.add_trace(
        go.Scatter(
            x=[t.number for t in ordered],
            y=best_so_far,
            mode="lines",
            name="best so far",
            line={"shape": "hv", "color": "#246"},
        )
    )
    failed = [t.number for t in trials if t.state is TrialState.FAIL]
    if failed:
        fig.add_trace(
            go.Scatter(
                x=failed,
                y=[0] * len(failed),
                mode="markers",
                name="failed",
                marker={"symbol": "x", "color": "#c22", "size": 9},
            )
        )
    fig.update_layout(
        title=f"{term.label} over trials",
        xaxis_title="trial",
        yaxis_title=term.metric,
        height=380,
        margin={"t": 50, "b": 40},
    )
    return fig


def _pareto_plot(trials: Sequence[Trial], front: set[int]) -> go.Figure:
    done = [t for t in trials if t.state is TrialState.COMPLETE]
    fig = go.Figure()
    for name, pick, color in (("feasible", True, "#2a2"), ("infeasible", False, "#d80")):
        group = [t for t in done if t.feasible is pick]
        fig.add_trace(
            go.Scatter(
                x=[_metric(t, "ttft_ms.p99") for t in group],
                y=[_metric(t, "output_tokens_per_s") for t in group],
                mode="markers+text",
                name=name,
                text=[str(t.number) for t in group],
                textposition="top center",
                marker={"color": color, "size": [14 if t.number in front else 9 for t in group]},
            )
        )
    fig.update_layout(
        title="throughput vs TTFT p99 (each trial; label = trial number)",
        xaxis_title="TTFT p99 (ms)",
        yaxis_title="output tokens/s",
        height=420,
        margin={"t": 50, "b": 40},
    )
    return fig


def _front_plot(record: StudyRecord, trials: Sequence[Trial], front: set[int]) -> go.Figure:
    """Scatter of the two objective terms, the Pareto front joined by a line."""
    t0, t1 = record.spec.objective.terms
    done = [t for t in trials if t.state is TrialState.COMPLETE and t.result]

    def xy(group: Sequence[Trial]) -> tuple[list[float | None], list[float | None]]:
        return (
            [t0.read(t.result.metrics) if t.result else None for t in group],
            [t1.read(t.result.metrics) if t.result else None for t in group],
        )

    fig = go.Figure()
    rest = [t for t in done if t.number not in front]
    x, y = xy(rest)
    fig.add_trace(
        go.Scatter(
            x=x,
            y=y,
            mode="markers+text",
            name="other trials",
            marker={"color": "#999"},
            text=[str(t.number) for t in rest],
            textposition="top center",
        )
    )
    members = sorted(
        (t for t in done if t.number in front),
        key=lambda t: (t0.read(t.result.metrics) if t.result else None) or 0.0,
    )
    x, y = xy(members)
    fig.add_trace(
        go.Scatter(
            x=x,
            y=y,
            mode="lines+markers+text",
            name="Pareto front",
            line={"color": "#2a2"},
            marker={"size": 12},
            text=[str(t.number) for t in members],
            textposition="top center",
        )
    )
    fig.update_layout(
        title=f"Pareto front: {t0.label} vs {t1.label}",
        xaxis_title=t0.metric,
        yaxis_title=t1.metric,
        height=420,
        margin={"t": 50, "b": 40},
    )
    return fig


def _front_table(record: StudyRecord, trials: Sequence[Trial], front: list[int]) -> str:
    """The Pareto front as a table: each member's params and objective values."""
    terms = record.spec.objective.terms
    by_number = {t.number: t for t in trials}
    rows = []
    for n in front:
        t = by_number.get(n)
        if t is None or t.result is None:
            continue
        values = "".join(f"<td>{_fmt(term.read(t.result.metrics), 1)}</td>" for term in terms)
        rows.append(
            f"<tr><td>{n}</td><td><code>{html.escape(format_params(t.params))}</code></td>{values}</tr>"
        )
    head = "".join(f"<th>{html.escape(term.label)}</th>" for term in terms)
    if not rows:
        return "<h3>Pareto front</h3><p>No feasible trial: the front is empty.</p>"
    return (
        "<h3>Pareto front</h3><p>"
        + (
            "No trial on the front beats another on both objectives; pick by your own trade-off."
            if len(rows) > 1
            else "One trial beats or ties every other feasible trial on both objectives."
        )
        + f"</p><table><tr><th>#</th><th>params</th>{head}</tr>{''.join(rows)}</table>"
    )


def _importance_plot(record: StudyRecord, trials: Sequence[Trial]) -> go.Figure | None:
    from servetune.core.strategies.optuna import param_importances

    try:
        imp = param_importances(record.spec, trials)
    except Exception as e:  # importance is a nicety: never lose the report over it
        log.info("parameter importance unavailable: %s", e)
        return None
    if not imp:
        return None
    names = list(imp)[::-1]
    fig = go.Figure(
        go.Bar(x=[imp[n] for n in names], y=names, orientation="h", marker={"color": "#468"})
    )
    fig.update_layout(
        title="parameter importance (Optuna PED-ANOVA over complete trials)",
        height=120 + 40 * len(names),
        margin={"t": 50, "b": 40},
    )
    return fig


def render_report(
    record: StudyRecord, trials: Sequence[Trial], plotly_src: str | None = None
) -> str:
    """The report of ``record`` as one HTML document (str).

    ``plotly_src``: URL (e.g. a relative path) of plotly.js for a ``<script src>``; None inlines
    plotly.js (a self-contained file of about 4.8 MB).
    """
    spec = record.spec
    search = [t for t in trials if t.role is not TrialRole.CONFIRM]
    verdict = record.verdict or {}
    chosen = verdict.get("recommended_trial")
    best = next(
        (t for t in trials if chosen is not None and t.number == chosen), None
    ) or best_trial(search, spec.objective)
    front_numbers = list(verdict.get("pareto_front") or [])
    if len(spec.objective.terms) > 1 and not front_numbers:
        front_numbers = [t.number for t in pareto_front(search, spec.objective)]
    front = set(front_numbers)
    figs = [
        f
        for f in (
            _objective_plot(record, trials),
            _pareto_plot(trials, front),
            _front_plot(record, search, front) if len(spec.objective.terms) > 1 else None,
            _importance_plot(record, search),
        )
        if f is not None
    ]
    script = f'<script src="{html.escape(plotly_src)}"></script>' if plotly_src else ""
    plots = script + "".join(
        f.to_html(full_html=False, include_plotlyjs=(i == 0 and plotly_src is None))
        for i, f in enumerate(figs)
    )
    winner = "<p>No trial completed.</p>"
    if verdict.get("objective_measured") is False:
        best = None
        winner = f"<p>Nothing to recommend: {html.escape(verdict.get('recommendation') or '')}</p>"
    if best is not None:
        cmd = get_engine(spec.engine).user_command(best.params)
        why = verdict.get("recommendation")
        state = infeasible_reason(best) or "feasible"
        what = "keep the engine defaults" if best.role is TrialRole.BASELINE else "params"
        winner = (
            f"<p>Recommended: trial {best.number} ({html.escape(state)}), "
            f"{what} <code>{html.escape(format_params(best.params))}</code></p>"
            + (f"<p>{html.escape(why)}</p>" if why else "")
            + f"<pre>{html.escape(cmd.display())}</pre>"
            + (f"<p>{html.escape(STAND_IN_NOTE)}</p>" if spec.engine.kind == "llamacpp" else "")
        )
    if len(spec.objective.terms) > 1:
        winner += _front_table(record, trials, front_numbers)
    summary = verdict.get("summary")
    v = verdict.get("verdict") or {}
    verdict_html = (
        f"<div class='verdict {'' if v.get('is_win') else 'noise'}'>{html.escape(summary)}</div>"
        if summary
        else ""
    )
    w = spec.workload
    slos = ", ".join(s.label + (f" at {s.levels}" if s.levels else "") for s in spec.slos) or "none"
    levels = ", ".join(lv.label for lv in w.levels())
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>servetune: {html.escape(record.name)}</title>
<style>{_CSS}</style></head><body>
<h1>servetune study {html.escape(record.name)}</h1>
<p>Engine <b>{spec.engine.kind}</b>, model <code>{html.escape(spec.engine.model)}</code>; status {record.status};
created {record.created_at.isoformat(timespec="seconds")}; report written
{datetime.now(UTC).isoformat(timespec="seconds")}.</p>
<p>Objective: {html.escape(", ".join(t.label for t in spec.objective.terms))}. SLOs: {html.escape(slos)};
error rate ≤ {w.max_error_rate:g}. Workload: {w.api}, {w.input_tokens} input / {w.output_tokens} output tokens,
{html.escape(levels)}, {w.num_requests or f"{w.duration_s} s"} measured requests per level after {w.warmup_requests}
warm-up. Strategy {spec.strategy.kind} (seed {spec.strategy.seed}).</p>
<h2>Verdict</h2>{verdict_html}{winner}
<h2>Plots</h2>{plots}
<h2>Trials</h2>{_trial_rows(trials, best)}
<h2>Definitions</h2><p>Metrics are read at the last load level. TTFT: request sent → first content chunk.
TPOT: (E2E − TTFT)/(output tokens − 1) (vLLM). ITL: every gap between content chunks (per event); ITL per token:
each gap ÷ the tokens of the event ending it. Output tok/s credits each request with at most the output tokens it
asked for; tokens counted by the client when the server sent no usage are flagged as estimated. Goodput: requests per second
meeting every per-request SLO. The engine defaults run {spec.budget.baseline_repeats} time(s) before the search to measure
the run-to-run spread; confirm trials then re-run the top {spec.budget.confirm_top_k} candidates (distinct configurations)
and the defaults on fresh servers. The recommendation comes from those repeats: the candidate with the best median is
recommended only when it beats the defaults' median by more than the run-to-run spread, otherwise the defaults are kept
(a difference inside the spread is a tie).</p>
</body></html>"""


def shared_plotly_js(folder: Path) -> Path:
    """``folder/plotly-<version>.min.js``, written once (atomically) when missing; its path.

    Reports that reference it stay small (tens of kB instead of about 4.8 MB each). Raises
    OSError when it cannot be written.
    """
    path = folder / f"plotly-{plotly.__version__}.min.js"
    if path.is_file() and path.stat().st_size > 0:
        return path
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".plotly-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(get_plotlyjs())
        os.chmod(tmp, 0o644)  # readable like the reports that load it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_report(
    record: StudyRecord,
    trials: Sequence[Trial],
    path: Path,
    plotly_dir: Path | None = None,
) -> Path:
    """Write the report to ``path`` (parents created, replaced atomically); returns the path.

    ``plotly_dir`` None: one self-contained file (plotly.js inlined, about 4.8 MB). Otherwise
    the page loads ``plotly_dir/plotly-<version>.min.js`` (written once, see
    ``shared_plotly_js``) by a path relative to the report; when that file cannot be written
    (a read-only data directory) the report is self-contained instead. Raises OSError when the
    report itself cannot be written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    src: str | None = None
    if plotly_dir is not None:
        try:
            js = shared_plotly_js(plotly_dir)
            src = Path(os.path.relpath(js.resolve(), path.parent.resolve())).as_posix()
        except OSError as e:
            log.info("shared plotly.js unavailable in %s (%s); inlining it", plotly_dir, e)
    page = render_report(record, trials, plotly_src=src)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(page)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.filename is None:  # a failed write names no file; say which one
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
