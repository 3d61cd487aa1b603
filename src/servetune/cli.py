"""The servetune command line (typer + rich): demo, run, resume, show, bench, export, report, …

Entry point only: it parses options, sets up logging and output, and calls the library.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import logging.handlers
import os
import signal
import sys
from collections.abc import Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from servetune.core.metrics import format_warning
from servetune.core.spec import StudySpec
from servetune.core.study import Trial, TrialRole, format_params
from servetune.errors import ServetuneError, SpecInvalid, check_resumable
from servetune.manager.cli import register as register_manager_commands
from servetune.manager.slot_cli import register as register_slot_commands
from servetune.outcome import print_outcome, stand_in_note
from servetune.remote.tunnel import tunnel_cmd
from servetune.settings import Settings
from servetune.worker.cli import worker_cmd

log = logging.getLogger("servetune")


class _PipeSafeStdout:
    """``sys.stdout`` for the rich console that survives a reader going away.

    ``servetune run spec.yaml | head -3``: once the pipe is closed, a write raises
    BrokenPipeError (EPIPE). The study must not stop for that, so the first broken write
    points file descriptor 1 at /dev/null (so the interpreter's final flush is quiet too),
    logs one line, and every later write is dropped; the study keeps running and logging.
    """

    def __init__(self) -> None:
        self.broken = False

    def write(self, text: str) -> int:
        """Write to the current ``sys.stdout``; dropped (and counted as written) once broken."""
        if self.broken:
            return len(text)
        try:
            return sys.stdout.write(text)
        except (BrokenPipeError, ValueError):  # ValueError: stdout closed in-process
            self._went_away()
            return len(text)
        except OSError as e:
            if e.errno != errno.EPIPE:
                raise
            self._went_away()
            return len(text)

    def flush(self) -> None:
        """Flush ``sys.stdout``; a broken pipe ends output as in ``write``."""
        if self.broken:
            return
        try:
            sys.stdout.flush()
        except (BrokenPipeError, ValueError):
            self._went_away()
        except OSError as e:
            if e.errno != errno.EPIPE:
                raise
            self._went_away()

    def _went_away(self) -> None:
        self.broken = True
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        log.warning("standard output was closed (broken pipe); output stops, the command goes on")

    def isatty(self) -> bool:
        """Whether stdout is a terminal (False once broken)."""
        return not self.broken and sys.stdout.isatty()

    def fileno(self) -> int:
        """The descriptor of ``sys.stdout``."""
        return sys.stdout.fileno()

    @property
    def encoding(self) -> str:
        """The encoding of ``sys.stdout``."""
        return getattr(sys.stdout, "encoding", None) or "utf-8"


console = Console(file=_PipeSafeStdout())  # type: ignore[arg-type]  # a text stream's API
err_console = Console(stderr=True)


def _user_error_exit_code(e: BaseException) -> int:
    """Print a user error (no traceback) and return the exit status for it.

    ``SpecInvalid``: its problems, 2; other ``ServetuneError``: ``error: …``, 1; ``OSError``:
    the path and the reason, 1; ``KeyboardInterrupt``: ``interrupted``, 130. The traceback goes
    to the log (the log file and, with ``-v``, stderr) when logging is set up.
    """
    log.info("command stopped by %s", type(e).__name__, exc_info=e)
    if isinstance(e, KeyboardInterrupt):
        err_console.print("[yellow]interrupted[/]", highlight=False)
        return 130
    if isinstance(e, SpecInvalid):
        _print_problems(e)
        return 2
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        where = f" writing {e.filename}" if e.filename is not None else ""
        data_dir = os.environ.get("SERVETUNE_DATA_DIR")
        hint = f"; the data directory is {data_dir}" if data_dir else ""
        _fail(
            f"the disk is full (no space left on device){where}{hint}; free some space, then "
            "`servetune resume` continues a study where it stopped"
        )
        return 1
    if isinstance(e, OSError) and e.filename is not None:
        where = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 is not None else "")
        data_dir = os.environ.get("SERVETUNE_DATA_DIR")
        hint = ""
        if data_dir and str(e.filename).startswith(data_dir):
            hint = f" (under the data directory SERVETUNE_DATA_DIR={data_dir})"
        _fail(f"{where}: {e.strerror or e}{hint}")
        return 1
    _fail(str(e) or type(e).__name__)
    return 1


class _Group(TyperGroup):
    """The command group: user errors and Ctrl-C end a command with a message, not a traceback.

    typer would turn a KeyboardInterrupt into a silent exit 130 before ``main`` sees it, so
    errors are handled here, around the command; ``main`` catches what happens outside one.
    """

    def invoke(self, ctx: Any) -> Any:  # a click Context (typer vendors click privately)
        """Run the chosen command; ServetuneError, OSError and Ctrl-C become exit statuses."""
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            raise  # typer quiets a closed stdout (`servetune show --json | head`)
        except (ServetuneError, OSError, KeyboardInterrupt) as e:
            raise typer.Exit(_user_error_exit_code(e)) from None


app = typer.Typer(
    cls=_Group,
    help="Tune the server flags of LLM inference engines against your workload and SLOs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

T = TypeVar("T")

DbOption = Annotated[
    str | None,
    typer.Option("--db", help="Database URL (default: SQLite file in the data directory)."),
]


def _settings(db: str | None) -> Settings:
    return Settings(db_url=db) if db else Settings()


class _LogFile(logging.handlers.RotatingFileHandler):
    """servetune.log, rotated at ``Settings.log_max_bytes`` keeping ``log_backup_count`` files.

    When the file cannot be written (the disk is full, the folder is read-only) it says so
    once on stderr, naming the file and the reason, and stops logging to the file instead of
    printing a traceback for every record (logging's default ``handleError``).
    """

    failed = False

    def emit(self, record: logging.LogRecord) -> None:
        """Write ``record`` unless the file already failed."""
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        """Report the first failure in one line; drop this and every later record."""
        if self.failed:
            return
        self.failed = True
        exc = sys.exc_info()[1]
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            reason = f"the disk holding {os.path.dirname(self.baseFilename)} is full ({reason})"
        with contextlib.suppress(Exception):
            err_console.print(
                f"[yellow]warning:[/] cannot write the log {self.baseFilename}: {escape(reason)}; "
                "logging to it stops",
                highlight=False,
                soft_wrap=True,
            )
        with contextlib.suppress(Exception):
            self.close()


class _BriefFormatter(logging.Formatter):
    """One line per record, no traceback (the traceback goes to the log file)."""

    def format(self, record: logging.LogRecord) -> str:
        """``record`` formatted without its exception and stack text."""
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        try:
            return super().format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def _setup_logging(settings: Settings, verbose: bool) -> Path:
    """Log everything to a rotated file under the data dir; warnings (or all with -v) to stderr,
    tracebacks only with -v."""
    log_dir = settings.logs_dir
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / "servetune.log"
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    fh = _LogFile(
        path,
        maxBytes=settings.log_max_bytes,
        backupCount=settings.log_backup_count,
        encoding="utf-8",
    )
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(fh)
    sh = logging.StreamHandler(sys.stderr)
    sh.setLevel(logging.INFO if verbose else logging.WARNING)
    fmt = "%(levelname)s %(name)s: %(message)s"
    sh.setFormatter(logging.Formatter(fmt) if verbose else _BriefFormatter(fmt))
    root.addHandler(sh)
    for noisy in ("httpx", "httpcore", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _quiet_optuna()
    return path


def _quiet_optuna() -> None:
    """Send Optuna's log records through ours, warnings only (no "[I …] A new study created").

    Optuna installs its own stderr handler at INFO on first use; it is removed here and its
    records propagate to the root logger's handlers instead. Imports optuna (~0.4 s), so only
    commands that use it call this.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()


class Interrupted(asyncio.CancelledError):
    """``_run_async``'s coroutine was cancelled by SIGINT or SIGTERM.

    A subclass of ``asyncio.CancelledError``, so ``except asyncio.CancelledError`` still catches
    it. ``signum`` is the first signal received; ``exit_code`` = 128 + signum (130 for SIGINT,
    143 for SIGTERM), the status a shell reports for a process killed by that signal.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


def signal_exit_code(e: BaseException) -> int:
    """The exit status for a cancelled run: ``e.exit_code`` for ``Interrupted``, else 130."""
    return e.exit_code if isinstance(e, Interrupted) else 130


def _run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro``; SIGINT and SIGTERM cancel it (engines are stopped, the trial recorded).

    Raises ``Interrupted`` (an ``asyncio.CancelledError`` that names the signal and its exit
    status) when a signal cancelled ``coro`` and ``coro`` let the cancellation through.
    """
    received: list[int] = []

    async def main() -> T:
        task = asyncio.ensure_future(coro)
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            received.append(signum)
            task.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        return await task

    try:
        return asyncio.run(main())
    except asyncio.CancelledError as e:
        if received and not isinstance(e, Interrupted):
            raise Interrupted(received[0]) from e
        raise


def _fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``error: message`` on one line of stderr; return the ``typer.Exit(code)`` to raise."""
    one_line = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    err_console.print(f"[bold red]error:[/] {escape(one_line)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _print_problems(e: SpecInvalid) -> None:
    err_console.print(f"[bold red]The {escape(e.subject)} has {len(e.problems)} problem(s):[/]")
    for p in e.problems:
        err_console.print(f"  [yellow]{escape(p.loc)}[/]: {escape(p.message)}", highlight=False)


# ---- spec commands -----------------------------------------------------------------------


@app.command()
def validate(spec: Annotated[Path, typer.Argument(help="Study spec (YAML or JSON).")]) -> None:
    """Check a spec and report every problem at once (exit status 2 when there are any)."""
    from servetune.specfile import load_spec

    try:
        parsed, _ = load_spec(spec)
    except SpecInvalid as e:
        _print_problems(e)
        raise typer.Exit(2) from None
    console.print(
        f"[green]valid[/]: {parsed.engine.kind} study over {', '.join(parsed.space.params)}; "
        f"strategy {parsed.strategy.kind}, up to {parsed.budget.max_trials} trials"
    )
    for note in parsed.notes():
        console.print(f"[yellow]note[/]: {escape(str(note))}", highlight=False, soft_wrap=True)
    from servetune.dryrun import parallel_notes

    for kind, text in parallel_notes(parsed):
        console.print(f"[yellow]{kind}[/]: {escape(text)}", highlight=False, soft_wrap=True)


@app.command()
def schema() -> None:
    """Print the JSON Schema of a study spec (every field described)."""
    console.print_json(json.dumps(StudySpec.model_json_schema()))


@app.command("make-model")
def make_model_cmd(
    out: Annotated[
        Path, typer.Option("--out", help="Folder to write model.gguf and tokenizer/ into.")
    ],
    size: Annotated[str, typer.Option("--size", help="tiny (~10 MB) or small (~64 MB).")] = "tiny",
    seed: Annotated[int, typer.Option(help="Seed; the same seed writes the same files.")] = 0,
) -> None:
    """Write a random-weight Llama GGUF and its tokenizer, generated locally (no download)."""
    from servetune.modelgen import make_model

    if size not in ("tiny", "small"):
        raise _fail(f"--size must be tiny or small, not {size!r}", 2)
    files = make_model(size, out, seed=seed)  # type: ignore[arg-type]
    console.print(
        f"model: {files.gguf_path} ({files.size_bytes / 1e6:.1f} MB)\ntokenizer: {files.tokenizer_dir}"
    )


# ---- running studies ---------------------------------------------------------------------


def _study_name(spec: StudySpec) -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return spec.name or f"{spec.engine.kind}-{stamp}"


def _execute(settings: Settings, store: Any, study: Any, verbose: bool) -> Any:
    """Run or resume ``study`` from the open ``store`` with a live display; returns the StudyOutcome."""
    from servetune.study_session import run_study

    log_path = _setup_logging(settings, verbose)
    log.info("log file: %s", log_path)
    try:
        return _run_async(run_study(settings, store, study, console))
    except asyncio.CancelledError as e:
        err_console.print(
            f"[yellow]cancelled[/]: the running trial(s) were recorded as cancelled. "
            f"Continue with: servetune resume {study.name}"
        )
        raise typer.Exit(signal_exit_code(e)) from None


@app.command()
def run(
    spec: Annotated[Path, typer.Argument(help="Study spec (YAML or JSON).")],
    name: Annotated[
        str | None, typer.Option(help="Study name (default: from the spec, else generated).")
    ] = None,
    db: DbOption = None,
    verbose: Annotated[
        bool, typer.Option("-v", "--verbose", help="Log every phase to stderr.")
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Print the first candidates' commands and pre-flight verdicts; "
            "start nothing, write nothing.",
        ),
    ] = False,
    count: Annotated[
        int | None,
        typer.Option(
            min=1, help="Candidates --dry-run prints, the baseline included [default: 5]."
        ),
    ] = None,
) -> None:
    """Run a tuning study described by SPEC, then print the winner and how it was confirmed."""
    from servetune.core.spec import check_study_name
    from servetune.specfile import load_spec
    from servetune.store.repo import StudyStore

    if count is not None and not dry_run:
        raise _fail("--count only applies with --dry-run; add --dry-run or drop --count", 2)
    if name is not None:
        try:
            check_study_name(name)
        except ValueError as e:
            raise _fail(f"--name: {e}", 2) from None
    try:
        parsed, doc = load_spec(spec)
    except SpecInvalid as e:
        _print_problems(e)
        raise typer.Exit(2) from None
    if dry_run:
        _print_dry_run(parsed, count or 5)
        return
    study_name = name or _study_name(parsed)
    _check_host(parsed, study_name)
    settings = _settings(db)
    try:
        store = StudyStore(settings.db_url)
        study = store.create_study(study_name, parsed, doc)
    except ServetuneError as e:
        raise _fail(str(e)) from None
    console.print(f"study [bold]{escape(study.name)}[/] (id {study.id}) in {escape(store.url)}")
    outcome = _execute(settings, store, study, verbose)
    print_outcome(outcome, settings, out=console)


def _check_host(spec: StudySpec, study: str) -> None:
    """Exit 1 before anything is written when no trial of the study could start here, instead
    of recording every trial as failed: a GPU engine on a host without GPUs, an engine program
    that is not installed (local deployment), a Docker daemon or Kubernetes API that cannot be
    reached (asked read-only: the study's leftover containers / InferenceServices)."""
    import shutil

    from servetune.core.spec import LocalDeploymentSpec
    from servetune.engines import get_engine
    from servetune.study_session import build_deployment

    engine = get_engine(spec.engine)
    host_problems = getattr(engine, "host_problems", None)
    problems: list[str] = host_problems() if host_problems is not None else []
    if problems:
        raise _fail("; ".join(problems))
    if isinstance(spec.deployment, LocalDeploymentSpec):
        try:
            program = engine.launch_command({}, host="127.0.0.1", port=8000).argv[0]
        except ServetuneError as e:
            raise _fail(str(e)) from None
        if shutil.which(program) is None:
            field = "engine.binary" if spec.engine.kind == "llamacpp" else "engine.executable"
            raise _fail(
                f"the engine program {program!r} ({spec.engine.kind}) is not installed on this "
                f"host (not on PATH); install it (e.g. `pip install {spec.engine.kind}`), or set "
                f"{field} to its path; `servetune run --dry-run` shows the commands without it"
            )
        return
    try:
        leftovers = getattr(build_deployment(spec, engine, study), "leftovers", None)
        if leftovers is not None:
            leftovers()
    except ServetuneError as e:
        raise _fail(f"deployment ({spec.deployment.kind}): {e}") from None


def _print_dry_run(spec: StudySpec, count: int) -> None:
    """Print ``dryrun.plan``: per candidate its role, params, command and pre-flight verdict."""
    from servetune.dryrun import parallel_notes, plan

    try:
        planned = plan(spec, count)
    except (ServetuneError, ValueError) as e:
        raise _fail(str(e)) from None
    console.print(f"dry run: the first {len(planned)} candidate(s); nothing is started or saved")
    for kind, text in parallel_notes(spec):
        console.print(f"[yellow]{kind}[/]: {escape(text)}", highlight=False, soft_wrap=True)
    for p in planned:
        params = ", ".join(f"{k}={v}" for k, v in sorted(p.params.items())) or "engine defaults"
        console.print(
            f"\n[bold]trial {p.number}[/] ({p.role.value}): {escape(params)}", highlight=False
        )
        console.print(p.command, markup=False, highlight=False, soft_wrap=True)
        if p.launch and p.launch != p.command:
            console.print(f"{spec.deployment.kind} deployment:", highlight=False)
            console.print(p.launch, markup=False, highlight=False, soft_wrap=True)
        if p.rejections:
            for r in p.rejections:
                console.print(f"  pre-flight: rejected: {r}", markup=False, highlight=False)
        else:
            console.print("  pre-flight: ok", highlight=False)


@app.command()
def resume(
    study: Annotated[str, typer.Argument(help="Study id or name.")],
    db: DbOption = None,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Continue a study that was stopped or killed: finished trials are kept, not re-run."""
    from servetune.store.repo import StudyStore

    settings = _settings(db)
    try:
        store = StudyStore(settings.db_url)
        record = store.get_study(study)
        kept = [t for t in store.trials(record.id) if t.state.is_finished()]
    except ServetuneError as e:
        raise _fail(str(e)) from None
    try:
        check_resumable(record.name, record.status)
    except ServetuneError as e:  # a finished study: nothing to do, and nothing is rewritten
        console.print(escape(f"{e}; `servetune show {record.name}` shows its result"))
        raise typer.Exit(0) from None
    console.print(
        f"resuming study [bold]{record.name}[/] (id {record.id}): {len(kept)} finished trial(s) "
        "kept, not re-run"
    )
    outcome = _execute(settings, store, record, verbose)
    print_outcome(outcome, settings, out=console)


@app.command()
def demo(
    db: DbOption = None,
    trials: Annotated[int, typer.Option(help="Trials in the search, the baseline included.")] = 12,
    size: Annotated[str, typer.Option(help="Demo model size: tiny or small.")] = "small",
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Make a small local model if missing and tune llama.cpp on it with TPE (about 12 trials)."""
    from servetune.demo import demo_spec
    from servetune.modelgen import make_model
    from servetune.settings import path_under
    from servetune.specfile import validate_document
    from servetune.store.repo import StudyStore

    if size not in ("tiny", "small"):
        raise _fail(f"--size must be tiny or small, not {size!r}", 2)
    settings = _settings(db)
    model_dir = path_under(Path(settings.data_dir) / "models", size)
    console.print(f"[bold]servetune demo[/]: model in {escape(str(model_dir))}")
    files = make_model(size, model_dir)  # type: ignore[arg-type]
    doc = demo_spec(files.gguf_path, files.tokenizer_dir, trials)
    spec_path = Path(settings.data_dir) / "demo.yaml"
    spec_path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    spec = validate_document(doc)
    store = StudyStore(settings.db_url)
    study = store.create_study(_study_name(spec), spec, doc)
    console.print(
        f"spec written to {escape(str(spec_path))}; study [bold]{escape(study.name)}[/] "
        f"(id {study.id})"
    )
    outcome = _execute(settings, store, study, verbose)
    print_outcome(outcome, settings, out=console)


# ---- inspecting studies ------------------------------------------------------------------


def _open_store(settings: Settings, read_only: bool = False) -> Any:
    """The StudyStore of ``settings``; ``read_only`` for commands that only read (a database
    without write access is then opened read-only instead of failing)."""
    from sqlalchemy.engine import make_url

    from servetune.errors import StudyNotFound
    from servetune.store.repo import StudyStore

    url = make_url(settings.db_url)
    database = url.database or ""
    sqlite_file = url.drivername.startswith("sqlite") and database not in ("", ":memory:")
    if read_only and sqlite_file and not Path(database).exists():
        # reading must not create an empty database
        raise StudyNotFound(
            f"no studies yet: {database} does not exist; `servetune run SPEC` creates it "
            "(or give --db / SERVETUNE_DB_URL where your studies are)"
        )
    return StudyStore(settings.db_url, read_only=read_only)


def _load(study: str, db: str | None) -> tuple[Any, list[Trial]]:
    try:
        store = _open_store(_settings(db), read_only=True)
        record = store.get_study(study)
        return record, store.trials(record.id)
    except ServetuneError as e:
        raise _fail(str(e)) from None


def _best(record: Any, trials: list[Trial]) -> Trial | None:
    """The study's winner: the recommended trial of a finished study, else the best ranked one."""
    from servetune.core.scoring import best_trial

    verdict = record.verdict or {}
    if verdict.get("objective_measured") is False:
        return None  # the study measured nothing to choose by; show/export say why
    chosen = verdict.get("recommended_trial")
    for t in trials:
        if chosen is not None and t.number == chosen:
            return t
    return best_trial([t for t in trials if t.role is not TrialRole.CONFIRM], record.spec.objective)


def _user_argv(record: Any, best: Trial | None) -> list[str] | None:
    """The argv a user runs for ``best`` on their own engine build (None without a best trial)."""
    from servetune.engines import get_engine

    return get_engine(record.spec.engine).user_command(best.params).argv if best else None


def _status(record: Any, db: str | None) -> str:
    """The study's status; a study marked running whose lease lapsed reads ``interrupted``."""
    from servetune.study_session import study_status

    return study_status(record, _settings(db))


@app.command()
def show(
    study: Annotated[str, typer.Argument(help="Study id or name.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    db: DbOption = None,
) -> None:
    """Show a study's trials: state, params, key metrics, feasibility, failure reasons."""
    record, trials = _load(study, db)
    best = _best(record, trials)
    if as_json:
        payload = {
            "study": {
                "id": record.id,
                "name": record.name,
                "status": _status(record, db),
                "lease": record.lease.model_dump(mode="json") if record.lease else None,
                "engine": record.spec.engine.kind,
                "created_at": record.created_at.isoformat(),
                "objective": [t.label for t in record.spec.objective.terms],
                "verdict": record.verdict,
            },
            "trials": [t.summary() for t in trials],
            "best_trial": best.summary() if best else None,
            "launch_argv": _user_argv(record, best),
        }
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        return
    status = _status(record, db)
    if status == "running" and record.lease is not None:
        status += f" by {record.lease.describe()}"
    console.print(f"study [bold]{record.name}[/] (id {record.id}) — {escape(status)}")
    table = Table(box=None, header_style="bold")
    for col in ("#", "role", "state", "tok/s", "TTFT p99 ms", "ok"):
        table.add_column(col, no_wrap=True)
    table.add_column("params / failure", overflow="fold")
    for t in trials:
        m = t.result.metrics[-1] if t.result and t.result.metrics else None
        tps = f"{m.output_tokens_per_s:.1f}" if m else "-"
        ttft = m.value("ttft_ms.p99") if m else None
        failure = (
            f"{t.failure_kind.value}: {t.result.failure_reason}"
            if t.failure_kind and t.result
            else ""
        )
        mark = " ★" if best and t.number == best.number else ""
        detail = format_params(t.params)
        for w in t.result.warnings if t.result else []:
            detail += f"\n[yellow]warning {escape(format_warning(w))}[/]"
        if failure:
            detail += f"\n[red]{escape(failure)}[/]"
        elif t.result and t.result.slo_report and not t.feasible:
            missed = t.result.slo_report.missed()
            if missed:
                detail += f"\n[yellow]missed: {escape('; '.join(missed))}[/]"
        table.add_row(
            f"{t.number}{mark}",
            t.role.value + (f" of {t.repeat_of}" if t.repeat_of is not None else ""),
            t.state.value,
            tps,
            f"{ttft:.0f}" if ttft is not None else "-",
            "yes" if t.feasible else "no",
            detail,
        )
    console.print(table)
    if record.verdict and record.verdict.get("summary"):
        console.print(escape(record.verdict["summary"]), highlight=False)
    if record.verdict and record.verdict.get("recommendation"):
        console.print(f"verdict: {escape(record.verdict['recommendation'])}", highlight=False)
    if best is not None:
        from servetune.engines import get_engine

        cmd = get_engine(record.spec.engine).user_command(best.params)
        console.print(f"[bold]launch command[/] (trial {best.number}):", highlight=False)
        console.print(cmd.display(), soft_wrap=True, highlight=False)


@app.command(name="list")
def list_studies(db: DbOption = None) -> None:
    """List recent studies."""
    from sqlalchemy.engine import make_url

    from servetune.errors import StudyNotFound
    from servetune.store.repo import UnreadableStudy

    try:
        studies = _open_store(_settings(db), read_only=True).list_studies()
    except StudyNotFound as e:
        database = make_url(_settings(db).db_url).database or ""
        if not Path(database).parent.is_dir():
            raise _fail(str(e)) from None  # nowhere a database could be: a wrong path
        console.print(str(e), highlight=False)  # simply nothing run here yet
        return
    except ServetuneError as e:
        raise _fail(str(e)) from None
    table = Table("id", "engine", "status", "created", "name")
    table.columns[4].overflow = "fold"
    for s in studies:
        if isinstance(s, UnreadableStudy):
            table.add_row(
                str(s.id),
                s.engine_kind,
                f"[red]unreadable[/]: {escape(s.reason)}",
                s.created_at.isoformat(timespec="seconds"),
                s.name,
            )
            continue
        table.add_row(
            str(s.id),
            s.spec.engine.kind,
            _status(s, db),
            s.created_at.isoformat(timespec="seconds"),
            s.name,
        )
    console.print(table)


@app.command()
def export(
    study: Annotated[str, typer.Argument(help="Study id or name.")],
    fmt: Annotated[str, typer.Option("--format", help="command, yaml or json.")] = "command",
    db: DbOption = None,
) -> None:
    """Print the winning configuration: a launch command ready to paste, or its params as YAML/JSON."""
    from servetune.core.scoring import infeasible_reason
    from servetune.engines import get_engine

    if fmt not in ("command", "yaml", "json"):
        raise _fail(f"--format must be command, yaml or json, not {fmt!r}", 2)
    record, trials = _load(study, db)
    best = _best(record, trials)
    if best is None:
        note = (record.verdict or {}).get("recommendation")
        if (record.verdict or {}).get("objective_measured") is False and note:
            raise _fail(f"study {record.name}: {note}")
        raise _fail(
            f"study {record.name} has no completed trial to export; see `servetune show {record.name}`"
        )
    engine = get_engine(record.spec.engine)
    cmd = engine.user_command(best.params)
    data = {
        "study": record.name,
        "trial": best.number,
        "engine": record.spec.engine.kind,
        "params": best.params,
        "fixed_flags": dict(record.spec.engine.flags),
        "feasible": best.feasible,
        "argv": cmd.argv,
    }
    why = infeasible_reason(best)
    if why is not None:
        met = [t.number for t in trials if t.feasible]
        if why == "misses the SLOs":
            others = f"trial(s) {', '.join(map(str, met))} met them" if met else "no trial met them"
            text = f"trial {best.number} missed its SLOs; {others}"
        else:
            text = f"trial {best.number} {why}"
        err_console.print(f"[yellow]warning:[/] {escape(text)}", highlight=False, soft_wrap=True)
    note = (record.verdict or {}).get("recommendation")
    if note and ("noise" in note or "not confirmed" in note):
        err_console.print(f"[yellow]note:[/] {escape(str(note))}", highlight=False, soft_wrap=True)
    if fmt == "command":
        sys.stdout.write(cmd.display() + "\n")
        err_console.print(stand_in_note(record.spec), highlight=False, soft_wrap=True)
    elif fmt == "json":
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:  # the JSON document as YAML: the same keys and values, whatever their Python types
        sys.stdout.write(yaml.safe_dump(json.loads(json.dumps(data)), sort_keys=False))


@app.command()
def report(
    study: Annotated[str, typer.Argument(help="Study id or name.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="HTML file to write.")],
    self_contained: Annotated[
        bool,
        typer.Option(
            "--self-contained",
            help="Inline plotly.js (about 4.8 MB) for one file to share; by default the report "
            "loads the data directory's shared reports/plotly-<version>.min.js.",
        ),
    ] = False,
    db: DbOption = None,
) -> None:
    """Write an HTML report: trials, objective over trials, Pareto scatter, importances."""
    from servetune.report.html import write_report

    if out.is_dir():
        raise _fail(f"--out {out} is a directory; give a file, e.g. {out / 'report.html'}")
    existing = next((p for p in out.parents if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise _fail(f"cannot write the report to {out}: {existing} is not a directory")
    record, trials = _load(study, db)
    _quiet_optuna()
    plotly_dir = None if self_contained else _settings(db).reports_dir
    try:
        write_report(record, trials, out, plotly_dir=plotly_dir)
    except OSError as e:
        raise _fail(f"cannot write the report to {out}: {e.strerror or e}") from None
    console.print(f"report: {escape(str(out))}")


# ---- one-off benchmark ----------------------------------------------------------------------


_BENCH_OPTIONS = {
    "api": "--api",
    "input_tokens": "--input-tokens",
    "output_tokens": "--output-tokens",
    "concurrency": "--concurrency",
    "request_rates_per_s": "--rate",
    "num_requests": "--num-requests",
    "duration_s": "--duration-s",
    "warmup_requests": "--warmup",
    "request_timeout_s": "--request-timeout-s",
    "seed": "--seed",
}
"""``bench``'s option for each Workload field, so validation errors name what the user typed."""


def _short(value: float | None) -> str:
    """A number in few characters: ``0.042``, ``2.83``, ``89.5``, ``6052``; ``-`` for None."""
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.2g}"


def _bench_table(run: Any, *, rate_mode: bool, with_slos: bool) -> Table:
    """Throughput per load level of ``bench``: one row each, short enough for 80 columns."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    headers = ["rate/s" if rate_mode else "conc", "ok", "fail", "req/s"]
    headers += ["good/s"] if with_slos else []
    headers += ["in tok/s", "out tok/s", "tot tok/s", "prompt≠"]
    for header in headers:
        table.add_column(header, justify="right", no_wrap=True, overflow="fold")
    for lv in run.levels:
        m = lv.metrics
        row = [f"{m.level.value:g}", str(m.completed), str(m.failed), _short(m.requests_per_s)]
        row += [_short(m.goodput_requests_per_s)] if with_slos else []
        row += [
            _short(m.input_tokens_per_s),
            _short(m.output_tokens_per_s),
            _short(m.total_tokens_per_s),
            f"{m.prompt_token_mismatches}/{m.completed}" if m.completed else "-",
        ]
        table.add_row(*row)
    return table


def _latency_table(run: Any, *, rate_mode: bool) -> Table:
    """Every latency metric of every level at the same statistics (mean, p50 … max), in ms."""
    from servetune.core.metrics import LATENCY_METRICS, PERCENTILES

    names = {
        "ttft_ms": "TTFT",
        "tpot_ms": "TPOT",
        "itl_ms": "ITL",
        "itl_per_token_ms": "ITL/tok",
        "e2e_latency_ms": "E2E",
    }
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("rate/s" if rate_mode else "conc", justify="right", no_wrap=True)
    table.add_column("ms", no_wrap=True)
    for stat in PERCENTILES:
        table.add_column(stat, justify="right", no_wrap=True, overflow="fold")
    for lv in run.levels:
        for i, metric in enumerate(LATENCY_METRICS):
            table.add_row(
                f"{lv.level.value:g}" if i == 0 else "",
                names[metric],
                *(_short(lv.metrics.value(f"{metric}.{stat}")) for stat in PERCENTILES),
            )
    return table


class _BenchProgress:
    """A one-line live progress display on stderr (only when stderr is a terminal)."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[failed]} failed"),
            TimeElapsedColumn(),
            console=err_console,
            transient=True,
            disable=not err_console.is_terminal,
        )
        self.task: Any = None
        self.key: tuple[str, str] | None = None

    def __call__(self, p: Any) -> None:
        key = (p.level.label, p.phase)
        if key != self.key:
            if self.task is not None:
                self.progress.remove_task(self.task)
            self.key = key
            self.task = self.progress.add_task(
                f"{p.level.label} {p.phase}", total=p.total, failed=0
            )
        self.progress.update(self.task, completed=p.done, failed=p.failed)


@app.command()
def bench(
    url: Annotated[
        str,
        typer.Argument(help="Base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8080"),
    ],
    model: Annotated[
        str | None, typer.Option(help="Model name. (default: the first of /v1/models)")
    ] = None,
    api: Annotated[str, typer.Option(help="completions or chat.")] = "completions",
    input_tokens: Annotated[int, typer.Option(help="Prompt tokens per request.")] = 128,
    output_tokens: Annotated[int, typer.Option(help="Output tokens per request.")] = 64,
    concurrency: Annotated[
        str | None,
        typer.Option(help="Comma-separated concurrency levels, e.g. 1,4. (default: 1)"),
    ] = None,
    rate: Annotated[
        str | None, typer.Option(help="Comma-separated Poisson request rates per s.")
    ] = None,
    num_requests: Annotated[
        int | None, typer.Option(help="Measured requests per level. (default: 16)")
    ] = None,
    duration_s: Annotated[
        float | None, typer.Option(help="Seconds per level instead of a count.")
    ] = None,
    warmup: Annotated[int, typer.Option(help="Unmeasured warm-up requests per level.")] = 2,
    tokenizer: Annotated[
        str | None,
        typer.Option(
            help="Tokenizer dir or tokenizer.json. (default: the server's /tokenize; without "
            "one, prompt lengths are estimated and the server's usage reports them)"
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option(help="Seed of the prompts (and arrivals); change it for fresh prompts.")
    ] = 0,
    slo: Annotated[
        list[str] | None,
        typer.Option(
            help="METRIC:PERCENTILE:MAX_MS, e.g. ttft_ms:p99:500 (repeatable); goodput counts "
            "the requests meeting every one. Metrics: ttft_ms, tpot_ms, itl_ms, e2e_latency_ms."
        ),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="SERVETUNE_API_KEY",
            help="Sent as 'Authorization: Bearer KEY' (never written to files).",
        ),
    ] = None,
    header: Annotated[
        list[str] | None, typer.Option(help="Extra request header NAME:VALUE (repeatable).")
    ] = None,
    request_timeout_s: Annotated[
        float, typer.Option(help="Longest wait for one whole request, s.")
    ] = 120.0,
    processes: Annotated[
        int | None,
        typer.Option(
            help="Client processes sharing the load. (default: one per 128 in flight or "
            "400 requests/s, up to the cores)"
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(help="Write the run as JSON: settings, version, time, per-level metrics."),
    ] = None,
    records: Annotated[
        Path | None,
        typer.Option(help="Write every request's record; .jsonl or .csv (by the suffix)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Benchmark an already-running endpoint once with the built-in client and print the metrics.

    TTFT is measured from just before the request is written on an already-open keep-alive
    connection to the arrival of the first streamed token: it includes sending the request,
    the server's queueing, prefill and first token, and the way back; not the TCP connect.

    Exit status 2 for bad options (naming the option), 1 when the benchmark cannot run, 130 on
    Ctrl-C, 143 on SIGTERM.
    """
    from pydantic import ValidationError

    from servetune.bench import results as files
    from servetune.bench.builtin import CLIENT_CPU_SATURATED, bench_endpoint
    from servetune.core.slo import check_slos
    from servetune.core.spec import Workload

    def numbers(text: str | None, option: str, kind: type[float] | type[int]) -> list[Any] | None:
        if text is None:
            return None
        what = "whole numbers" if kind is int else "numbers"
        try:
            values = [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            values = []
        if not values:
            raise _fail(f"{option} takes comma-separated {what}, e.g. 1,4; got {text!r}", 2)
        return values

    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _fail(
            f"URL {url!r} is not an http(s) address; give the server's base URL, "
            "e.g. http://127.0.0.1:8080",
            2,
        )
    if concurrency is not None and rate is not None:
        raise _fail("give either --concurrency or --rate, not both", 2)
    if num_requests is not None and duration_s is not None:
        raise _fail("give either --num-requests or --duration-s, not both", 2)
    if processes is not None and processes < 1:
        raise _fail(f"--processes must be ≥ 1, got {processes}", 2)
    try:
        slos = [files.parse_slo(s) for s in slo or ()]
    except ValueError as e:
        raise _fail(f"--slo: {e}", 2) from None
    try:
        headers = dict(files.parse_header(h) for h in header or ())
    except ValueError as e:
        raise _fail(f"--header: {e}", 2) from None
    records_fmt = None
    for option, path in (("--output", output), ("--records", records)):
        if path is not None and not path.parent.is_dir():
            raise _fail(f"{option}: directory {path.parent} does not exist", 2)
    if records is not None:
        try:
            records_fmt = files.records_format(records)
        except ValueError as e:
            raise _fail(f"--records: {e}", 2) from None
    conc = numbers(concurrency, "--concurrency", int)
    rates = numbers(rate, "--rate", float)
    if conc is None and rates is None:
        conc = [1]
    if num_requests is None and duration_s is None:
        num_requests = 16
    try:
        workload = Workload(
            api=api,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            concurrency=conc,
            request_rates_per_s=rates,
            num_requests=num_requests,
            duration_s=duration_s,
            warmup_requests=warmup,
            request_timeout_s=request_timeout_s,
            seed=seed,
        )
    except ValidationError as e:
        for err in e.errors(include_url=False):
            field = str(err["loc"][0]) if err["loc"] else ""
            option = _BENCH_OPTIONS.get(field, field or "options")
            err_console.print(
                f"[bold red]error:[/] {option}: {escape(err['msg'])} (got {err['input']!r})",
                highlight=False,
                soft_wrap=True,
            )
        raise typer.Exit(2) from None
    progress = _BenchProgress()
    created_at = datetime.now(UTC)
    try:
        with progress.progress:
            run = _run_async(
                bench_endpoint(
                    url,
                    model,
                    workload,
                    tokenizer,
                    slos=slos,
                    api_key=api_key,
                    headers=headers,
                    processes=processes,
                    on_progress=progress,
                )
            )
    except ServetuneError as e:
        raise _fail(str(e)) from None
    except asyncio.CancelledError as e:
        code = signal_exit_code(e)
        how = "" if code == 130 else f" by {signal.Signals(code - 128).name}"
        err_console.print(f"[yellow]interrupted{how}[/]: no metrics", highlight=False)
        raise typer.Exit(code) from None
    metrics = [lv.metrics for lv in run.levels]
    try:
        if output is not None:
            doc = files.run_document(
                run,
                url=url,
                workload=workload,
                slos=slos,
                tokenizer=tokenizer,
                header_names=list(headers),
                api_key_given=api_key is not None,
                created_at=created_at,
            )
            files.write_atomically(output, json.dumps(doc, indent=2) + "\n")
        if records is not None and records_fmt is not None:
            files.write_atomically(records, files.records_text(run, records_fmt))
    except OSError as e:
        raise _fail(f"cannot write the results: {e}") from None
    if as_json:
        sys.stdout.write(json.dumps([m.model_dump(mode="json") for m in metrics], indent=2) + "\n")
        if all(m.completed == 0 for m in metrics):
            raise _fail("no request succeeded; see failed_by_kind and error_examples")
        return
    console.print(_bench_table(run, rate_mode=rates is not None, with_slos=bool(slos)))
    console.print(
        "tok/s = tokens per second (in: prompt, from usage or the built prompt; out: output); "
        "prompt≠ = prompts whose server count differs from the built length",
        highlight=False,
    )
    console.print()
    console.print(_latency_table(run, rate_mode=rates is not None))
    console.print(
        "latencies in ms; TTFT = request written on an open connection → first token "
        "(queueing + prefill + network; no TCP connect)",
        highlight=False,
    )
    notes: list[str] = []
    if run.prompt_counting == "estimated":
        notes.append(
            f"{url} has no /tokenize and no --tokenizer was given: prompt lengths were "
            "estimated; 'in tok/s' uses the server's usage.prompt_tokens where sent"
        )
    for lv in run.levels:
        m, load = lv.metrics, lv.client_load
        if m.prompt_token_mismatches:
            notes.append(
                f"{m.level.label}: {m.prompt_token_mismatches} prompt(s) differ from "
                f"{input_tokens} tokens by more than {workload.prompt_token_tolerance} "
                f"(server mean {_short(m.mean_prompt_tokens)})"
            )
        if load.saturated:
            busy = (
                "its CPU was the bottleneck: use more --processes"
                if load.cpu_fraction >= CLIENT_CPU_SATURATED
                else "other programs kept it from running: the machine is busy"
            )
            notes.append(
                f"{m.level.label}: the client delayed responses (event-loop lag p99 "
                f"{load.loop_lag_p99_ms:.1f} ms, CPU {load.cpu_fraction:.0%} of a core); "
                f"{busy}; latencies include that delay"
            )
        if load.stopped_early:
            notes.append(load.stopped_early)
    for note in notes:
        console.print(f"[yellow]{escape(note)}[/]", highlight=False)
    if slos:
        report = check_slos(slos, metrics, workload.max_error_rate)
        for line in report.missed():
            console.print(f"[red]SLO missed: {escape(line)}[/]", highlight=False)
        if report.feasible:
            console.print("[green]every SLO met at every level[/]", highlight=False)
    for m in metrics:
        for w in m.warnings:
            line = f"warning {format_warning(w)}"
            console.print(f"[yellow]{escape(line)}[/]", highlight=False, soft_wrap=True)
    for m in metrics:
        for kind, count in m.failed_by_kind.items():
            example = m.error_examples.get(kind)
            line = f"{m.level.label}: {count} failed with {kind}"
            if example:
                flat = " ".join(example.split())
                line += f": {flat[:300]}" + ("…" if len(flat) > 300 else "")
            console.print(f"[red]{escape(line)}[/]", highlight=False, soft_wrap=True)
    if all(m.completed == 0 for m in metrics):
        raise _fail("no request succeeded; see the failures above")


def main() -> None:
    """Console-script entry point: no traceback for user errors.

    Exit statuses: 0 ok, 1 error (``error: …`` on stderr), 2 bad options or spec, 130
    interrupted (Ctrl-C), 143 terminated (SIGTERM during a run or a benchmark).
    """
    try:
        app()
    except BrokenPipeError:
        raise
    except (ServetuneError, OSError, KeyboardInterrupt) as e:
        sys.exit(_user_error_exit_code(e))


app.command("worker")(worker_cmd)
app.command("tunnel", hidden=True)(tunnel_cmd)
register_manager_commands(app)
register_slot_commands(app)
