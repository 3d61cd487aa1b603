"""The CLI's rough edges, through real subprocesses: clean errors and exit statuses, signals, output.

Bench tests drive a real llama.cpp server (xllamacpp) on the tiny model; every process is stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from servetune.cli import Interrupted, _run_async, signal_exit_code
from servetune.modelgen import ModelFiles
from tests.integration.llamacpp_helpers import server_process
from tests.integration.study_helpers import cli_env, servetune, small_spec, write_spec

pytestmark = pytest.mark.integration

NO_SUCH_DIR = "/proc/servetune-nope"
"""A directory nobody can create, not even root (/proc refuses new entries)."""


def cli(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``servetune(...)`` with extra environment variables."""
    return subprocess.run(  # noqa: S603 - argv list of our own CLI
        [sys.executable, "-m", "servetune", *args],
        capture_output=True,
        text=True,
        env=cli_env(tmp_path) | (env or {}),
        timeout=timeout,
        check=False,
    )


def start_cli(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    """Start the CLI in its own session (so a test can stop all it started)."""
    return subprocess.Popen(  # noqa: S603 - argv list of our own CLI
        [sys.executable, "-m", "servetune", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(tmp_path),
        start_new_session=True,
    )


def stop_group(proc: subprocess.Popen[str]) -> None:
    """Kill ``proc``'s whole process group if it still runs, and reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def assert_clean_error(out: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    """Exit status ``code``, no traceback, and every needle in stderr."""
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    for needle in needles:
        assert needle in out.stderr, (needle, out.stderr)


# ---- errors and exit statuses --------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("foo://x", "'foo' is not supported"),
        ("sqlite:////proc/x/y.db", "/proc/x/y.db"),
        ("postgresql://u@127.0.0.1:1/x", "127.0.0.1:1"),
    ],
)
def test_list_reports_a_bad_database_in_one_line(tmp_path: Path, url: str, needle: str) -> None:
    out = servetune(tmp_path, "list", "--db", url, timeout=60)
    assert_clean_error(out, 1, needle)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr


def test_a_path_that_cannot_be_created_is_a_one_line_error_naming_it(
    tmp_path: Path, tiny_model: ModelFiles
) -> None:
    made = servetune(tmp_path, "make-model", "--out", f"{NO_SUCH_DIR}/model")
    assert_clean_error(made, 1, f"error: {NO_SUCH_DIR}")

    listed = cli(tmp_path, "list", env={"SERVETUNE_DATA_DIR": NO_SUCH_DIR, "SERVETUNE_DB_URL": ""})
    assert_clean_error(listed, 1, "error: ", f"{NO_SUCH_DIR}/servetune.db")

    # the database is elsewhere, but the run's log goes under the data directory
    spec = write_spec(tmp_path / "spec.yaml", small_spec(tiny_model, trials=1, name="nodir"))
    ran = cli(tmp_path, "run", str(spec), env={"SERVETUNE_DATA_DIR": NO_SUCH_DIR})
    assert_clean_error(ran, 1, f"error: {NO_SUCH_DIR}", f"SERVETUNE_DATA_DIR={NO_SUCH_DIR}")


def test_what_the_user_typed_is_printed_as_typed_never_read_as_markup(tmp_path: Path) -> None:
    """Square brackets in a spec key, a path or an ssh command are the user's text: shown as
    is (rich would drop ``[user@]``, or crash with a traceback on ``[/bold]``)."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        'engine: {kind: llamacpp, model: "[/bold]x.gguf"}\n'
        'space: {params: {"[/b]": {kind: int, low: 1, high: 2}}}\n'
    )
    checked = servetune(tmp_path, "validate", str(spec))
    assert_clean_error(checked, 2, "[/bold]x.gguf", "space.params.[/b]")
    slot = servetune(
        tmp_path, "worker-deploy", "ssh -p 22 root@x[/bold]", "--manager", "http://127.0.0.1:9"
    )
    assert_clean_error(slot, 2, "root@x[/bold]", "[user@]host")


def test_ctrl_c_in_a_blocking_command_prints_interrupted_and_exits_130(tmp_path: Path) -> None:
    fifo = tmp_path / "spec.yaml"
    os.mkfifo(fifo)
    proc = start_cli(tmp_path, "validate", str(fifo))
    writer = None
    try:
        # Opening a FIFO's write end without blocking succeeds only once the CLI opened it for
        # reading; the CLI then blocks reading it (nothing is written): sync code, no event loop.
        deadline = time.monotonic() + 60
        while writer is None:
            try:
                writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as e:
                assert e.errno == errno.ENXIO, e
                assert proc.poll() is None and time.monotonic() < deadline, proc.poll()
                time.sleep(0.05)
        # A SIGINT that lands between the CLI's open() returning and its read() starting is
        # only acted on when read() returns (CPython runs handlers between bytecodes), so, like
        # a user, press Ctrl-C again while it still runs.
        err = None
        for _ in range(30):
            proc.send_signal(signal.SIGINT)
            try:
                _, err = proc.communicate(timeout=1)
                break
            except subprocess.TimeoutExpired:
                continue
    finally:
        if writer is not None:
            os.close(writer)
        stop_group(proc)
    assert err is not None, "Ctrl-C did not stop the CLI"
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err, err


def test_run_async_names_the_signal_that_cancelled_it() -> None:
    async def signalled(sig: signal.Signals) -> None:
        os.kill(os.getpid(), sig)
        await asyncio.sleep(30)

    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        with pytest.raises(asyncio.CancelledError) as caught:
            _run_async(signalled(sig))
        assert isinstance(caught.value, Interrupted)
        assert caught.value.signum == sig and caught.value.exit_code == code
        assert signal_exit_code(caught.value) == code
    assert signal_exit_code(asyncio.CancelledError()) == 130


# ---- studies: report, export, show ---------------------------------------------------------


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory, tiny_model: ModelFiles) -> Path:
    """A CLI home with two finished 2-trial studies: "missed" (no trial meets an impossible SLO)
    and "met" (every trial meets a loose one). Returns the tmp path to pass to ``servetune``."""
    home = tmp_path_factory.mktemp("cli_studies")
    for name, max_ms in (("missed", 0.01), ("met", 60000)):
        slos = [{"metric": "ttft_ms", "percentile": "p99", "max_ms": max_ms}]
        doc = small_spec(tiny_model, trials=2, name=name, slos=slos)
        out = servetune(home, "run", str(write_spec(home / f"{name}.yaml", doc)))
        assert "Traceback" not in out.stderr, out.stderr
        assert "A new study created" not in out.stdout + out.stderr
        shown = servetune(home, "show", name, "--json")
        trials = json.loads(shown.stdout)["trials"]
        assert [t["state"] for t in trials] == ["COMPLETE", "COMPLETE"], shown.stdout
    return home


def test_report_refuses_a_directory_and_names_unwritable_paths(studies: Path) -> None:
    as_dir = servetune(studies, "report", "met", "-o", str(studies))
    assert_clean_error(as_dir, 1, f"{studies} is a directory")

    no_dir = servetune(studies, "report", "met", "-o", f"{NO_SUCH_DIR}/r.html")
    assert_clean_error(no_dir, 1, f"{NO_SUCH_DIR}/r.html")

    under_file = studies / "met.yaml" / "r.html"
    not_dir = servetune(studies, "report", "met", "-o", str(under_file))
    assert_clean_error(not_dir, 1, f"{studies / 'met.yaml'} is not a directory")


def test_report_writes_the_file_without_optuna_log_lines(studies: Path) -> None:
    target = studies / "reports" / "new" / "met.html"  # missing parents are created
    out = servetune(studies, "report", "met", "-o", str(target))
    assert out.returncode == 0, out.stderr
    assert target.read_text(encoding="utf-8").lstrip().lower().startswith("<!doctype html")
    assert out.stderr == "", out.stderr  # no "[I …] A new study created in memory" from Optuna


def test_export_yaml_matches_json_and_warns_when_no_trial_met_the_slos(studies: Path) -> None:
    as_json = servetune(studies, "export", "missed", "--format", "json")
    as_yaml = servetune(studies, "export", "missed", "--format", "yaml")
    assert as_json.returncode == 0 and as_yaml.returncode == 0, as_json.stderr + as_yaml.stderr
    data = json.loads(as_json.stdout)
    assert yaml.safe_load(as_yaml.stdout) == data
    assert set(data) == {"study", "trial", "engine", "params", "fixed_flags", "feasible", "argv"}
    assert data["feasible"] is False
    warning = f"warning: trial {data['trial']} missed its SLOs; no trial met them"
    assert warning in as_json.stderr and warning in as_yaml.stderr

    met = servetune(studies, "export", "met", "--format", "yaml")
    assert met.returncode == 0 and "warning" not in met.stderr, met.stderr
    # without repeats, a search winner other than the defaults is flagged as unconfirmed
    if json.loads(servetune(studies, "export", "met", "--format", "json").stdout)["params"]:
        assert "not confirmed on fresh servers" in met.stderr, met.stderr
    else:
        assert met.stderr == "", met.stderr
    assert yaml.safe_load(met.stdout)["feasible"] is True


def test_show_says_which_slo_an_infeasible_trial_missed(studies: Path) -> None:
    out = servetune(studies, "show", "missed")
    assert out.returncode == 0, out.stderr
    missed = re.findall(r"missed: ttft_ms p99 ≤ 0\.01 ms at concurrency=2: ([0-9.]+)", out.stdout)
    assert len(missed) == 2 and all(float(v) > 0.01 for v in missed), out.stdout

    met = servetune(studies, "show", "met")
    assert met.returncode == 0 and "missed:" not in met.stdout, met.stdout


# ---- names, spec files, unreadable rows ----------------------------------------------------


@pytest.mark.parametrize("name", ["../x", "sub/dir", "/srv/x/abs"])
def test_run_refuses_a_name_that_would_leave_the_data_directory(
    tmp_path: Path, tiny_model: ModelFiles, name: str
) -> None:
    spec = write_spec(tmp_path / "spec.yaml", small_spec(tiny_model, trials=1))
    out = servetune(tmp_path, "run", str(spec), "--name", name)
    assert_clean_error(out, 2, "--name", repr(name), "letters, digits, '.', '_' or '-'")
    assert not (tmp_path / "data").exists() and not (tmp_path / "studies.db").exists()
    assert not Path("/srv/x").exists() and not (tmp_path / "x").exists()


def test_demo_refuses_a_size_that_would_leave_the_data_directory(tmp_path: Path) -> None:
    out = servetune(tmp_path, "demo", "--size", "../../x")
    assert_clean_error(out, 2, "--size must be tiny or small")
    assert not (tmp_path / "data").exists() and not (tmp_path / "x").exists()


def test_a_model_file_given_as_the_spec_is_a_clear_error(
    tmp_path: Path, tiny_model: ModelFiles
) -> None:
    for command in ("validate", "run"):
        out = servetune(tmp_path, command, str(tiny_model.gguf_path))
        assert_clean_error(out, 2, str(tiny_model.gguf_path), "GGUF model file, not a spec")
    assert not (tmp_path / "studies.db").exists()


def test_duplicate_keys_in_a_spec_are_refused_naming_both_lines(
    tmp_path: Path, tiny_model: ModelFiles
) -> None:
    text = yaml.safe_dump(small_spec(tiny_model, trials=1, name="dup"), sort_keys=False)
    text = text.replace("budget:\n", "budget:\n  max_trials: 40\n", 1)  # then max_trials: 1
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if "max_trials: 40" in line) + 1
    again = next(i for i, line in enumerate(lines) if "max_trials: 1" in line) + 1
    spec = tmp_path / "spec.yaml"
    spec.write_text(text, encoding="utf-8")
    out = servetune(tmp_path, "run", str(spec))
    assert_clean_error(
        out, 2, "duplicate key 'max_trials'", f"line {first}, column 3", f"again at line {again}"
    )
    assert not (tmp_path / "studies.db").exists()


def test_list_shows_an_unreadable_study_and_goes_on(studies: Path, tmp_path: Path) -> None:
    shutil.copytree(studies, tmp_path, dirs_exist_ok=True)
    with sqlite3.connect(tmp_path / "studies.db") as conn:
        (raw,) = conn.execute("select spec from studies where name = 'missed'").fetchone()
        spec = json.loads(raw)
        spec["engine"]["kind"] = "vllm-next"  # as a newer servetune would write it
        conn.execute("update studies set spec = ? where name = 'missed'", (json.dumps(spec),))
    out = servetune(tmp_path, "list")
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    assert out.stderr == "", out.stderr
    (missed,) = [line for line in out.stdout.splitlines() if " missed " in line]
    (met,) = [line for line in out.stdout.splitlines() if " met " in line]
    assert "unreadable" in missed and "another servetune version" in missed
    assert "engine.kind" in missed  # the reason names the field
    assert "finished" in met
    shown = servetune(tmp_path, "show", "missed")
    assert_clean_error(shown, 1, "missed", "cannot be read by this servetune", "upgrade")


# ---- a read-only data directory ------------------------------------------------------------


def test_an_archived_study_reads_from_a_read_only_data_directory(
    studies: Path, tmp_path: Path
) -> None:
    archive, view = tmp_path / "archive", tmp_path / "view"
    shutil.copytree(studies, archive)
    view.mkdir()
    subprocess.run(["mount", "--bind", "-o", "ro", str(archive), str(view)], check=True)  # noqa: S603 - fixed argv
    try:
        with pytest.raises(OSError, match="Read-only file system"):
            (view / "probe").write_text("x")
        listed = servetune(view, "list")
        assert listed.returncode == 0, listed.stderr
        assert "met" in listed.stdout and "missed" in listed.stdout
        shown = servetune(view, "show", "met", "--json")
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["study"]["status"] == "finished"
        exported = servetune(view, "export", "met", "--format", "json")
        assert exported.returncode == 0, exported.stderr
        assert json.loads(exported.stdout)["study"] == "met"
        target = tmp_path / "out" / "met.html"
        reported = servetune(view, "report", "met", "-o", str(target))
        assert reported.returncode == 0, reported.stderr
        page = target.read_text(encoding="utf-8")
        assert "servetune study met" in page
        # the data directory's shared plotly.js exists (written by the run) and is referenced
        js = next((view / "data" / "reports").glob("plotly-*.min.js"))
        src = re.search(r'<script src="([^"]+plotly-[^"]+\.min\.js)"', page)
        assert src is not None and (target.parent / src.group(1)).resolve() == js.resolve()
    finally:
        subprocess.run(["umount", str(view)], check=True)  # noqa: S603 - fixed argv


# ---- reports, the log, lock files ----------------------------------------------------------


def test_reports_share_one_plotly_file_unless_self_contained(studies: Path) -> None:
    shared = studies / "data" / "reports"
    js = list(shared.glob("plotly-*.min.js"))
    assert len(js) == 1 and js[0].stat().st_size > 3_000_000  # written once by the runs
    run_report = shared / "met.html"
    assert run_report.stat().st_size < 200_000, run_report.stat().st_size
    assert f'<script src="{js[0].name}"></script>' in run_report.read_text(encoding="utf-8")

    small = studies / "sizes" / "small.html"
    out = servetune(studies, "report", "met", "-o", str(small))
    assert out.returncode == 0, out.stderr
    big = studies / "sizes" / "one-file.html"
    out = servetune(studies, "report", "met", "-o", str(big), "--self-contained")
    assert out.returncode == 0, out.stderr
    assert small.stat().st_size < 200_000 < 3_000_000 < big.stat().st_size
    assert "<script src=" not in big.read_text(encoding="utf-8")
    assert f"../data/reports/{js[0].name}" in small.read_text(encoding="utf-8")
    assert list(shared.glob("plotly-*.min.js")) == js and not list(shared.glob(".plotly-*"))


def test_the_log_rotates_and_a_full_log_disk_is_said_once(studies: Path, tmp_path: Path) -> None:
    shutil.copytree(studies, tmp_path, dirs_exist_ok=True)
    logs = tmp_path / "data" / "logs"
    (logs / "servetune.log").write_text("x" * 5000, encoding="utf-8")
    locks = tmp_path / "data" / "locks"  # left by older versions, one per study ever run
    locks.mkdir()
    for i in range(3):
        (locks / f"study-{i:016x}.lock").write_text("123")
    before = servetune(tmp_path, "show", "met", "--json").stdout
    noop = cli(tmp_path, "resume", "met")
    assert noop.returncode == 0, noop.stderr  # finished: a no-op, its verdict is final
    assert "study met already finished; nothing to resume" in noop.stdout, noop.stdout
    assert servetune(tmp_path, "show", "met", "--json").stdout == before  # nothing rewritten

    def interrupted() -> None:  # as after a kill: resumable (the finished trials are kept)
        with sqlite3.connect(tmp_path / "studies.db") as db:
            db.execute("UPDATE studies SET status = 'interrupted' WHERE name = 'met'")

    interrupted()
    out = cli(tmp_path, "resume", "met", env={"SERVETUNE_LOG_MAX_BYTES": "4096"})
    assert out.returncode == 0, out.stderr
    assert (logs / "servetune.log.1").stat().st_size == 5000  # rotated, not grown forever
    assert (logs / "servetune.log").stat().st_size <= 4096
    assert not locks.exists()

    (logs / "servetune.log").unlink()
    (logs / "servetune.log").symlink_to("/dev/full")  # every write: ENOSPC
    interrupted()
    out = cli(tmp_path, "resume", "met", "-v")
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr and "Logging error" not in out.stderr, out.stderr
    warnings = [line for line in out.stderr.splitlines() if "cannot write the log" in line]
    assert len(warnings) == 1, out.stderr
    assert str(logs) in warnings[0] and "is full" in warnings[0]


# ---- bench -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    """A running llama.cpp server: its base URL and its log file."""

    url: str
    log_path: Path

    def log_count(self, text: str) -> int:
        """How many lines of the server's log contain ``text``."""
        return sum(text in line for line in self.log_path.read_text(errors="replace").splitlines())

    def wait_log_count(self, text: str, at_least: int, timeout_s: float = 20) -> int:
        """Wait until ``text`` appears on ``at_least`` lines of the log; returns the count."""
        deadline = time.monotonic() + timeout_s
        while (n := self.log_count(text)) < at_least:
            assert time.monotonic() < deadline, f"{text!r}: {n} < {at_least} lines"
            time.sleep(0.05)
        return n


DONE = "stop processing"
"""llama.cpp logs this when a slot finished a request."""
FULL_PROMPT_CACHE_HIT = "n_past was set to"
"""llama.cpp logs this when a request's whole prompt was already in its cache."""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model: ModelFiles) -> Iterator[Server]:
    """llama.cpp on the tiny model: one slot, a 256-token context, one thread."""
    log_path = tmp_path_factory.mktemp("bench_server") / "server.log"
    params = {"threads": 1, "parallel": 1, "ctx-size": 256}
    with server_process(tiny_model.gguf_path, log_path, params) as url:
        yield Server(url, log_path)


def _bench_args(server: Server, tiny_model: ModelFiles, *extra: str) -> list[str]:
    return [
        "bench",
        server.url,
        "--input-tokens",
        "32",
        "--output-tokens",
        "8",
        "--tokenizer",
        str(tiny_model.tokenizer_dir),
        *extra,
    ]


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--input-tokens", "0"], "--input-tokens"),
        (["--concurrency", "0"], "--concurrency"),
        (["--concurrency", "abc"], "--concurrency"),
        (["--rate", "0"], "--rate"),
        (["--num-requests", "0"], "--num-requests"),
        (["--duration-s", "0"], "--duration-s"),
        (["--warmup", "-1"], "--warmup"),
        (["--api", "foo"], "--api"),
        (["--concurrency", "2", "--rate", "1"], "--rate"),
    ],
)
def test_bench_rejects_bad_options_naming_the_option(
    tmp_path: Path, args: list[str], option: str
) -> None:
    out = servetune(tmp_path, "bench", "http://127.0.0.1:9", *args, timeout=60)
    assert_clean_error(out, 2, option)
    fields = ("_tokens", "request_rates_per_s", "num_requests", "warmup_requests", "duration_s")
    assert not any(f in out.stderr for f in fields), out.stderr


def test_bench_table_fits_80_columns(
    tmp_path: Path, server: Server, tiny_model: ModelFiles
) -> None:
    args = _bench_args(server, tiny_model, "--concurrency", "1,2", "--num-requests", "3")
    out = cli(tmp_path, *args, "--warmup", "0", env={"COLUMNS": "80"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), out.stdout
    assert "…" not in out.stdout
    assert lines[0].split() == [
        "conc",
        "ok",
        "fail",
        "req/s",
        "in",
        "tok/s",
        "out",
        "tok/s",
        "tot",
        "tok/s",
        "prompt≠",
    ]
    rows = [line.split() for line in lines[1:3]]
    assert [r[:3] for r in rows] == [["1", "3", "0"], ["2", "3", "0"]], out.stdout
    assert all(r[-1] == "0/3" for r in rows), out.stdout  # no prompt-length mismatch
    numbers = [[float(x) for x in r[3:-1]] for r in rows]  # every value whole, none cut short
    assert all(len(r) == 4 and min(r) > 0 for r in numbers), out.stdout
    # Latencies: every metric at the same statistics, TTFT's mean included.
    (head,) = [line for line in lines if line.split()[:2] == ["conc", "ms"]]
    assert head.split()[2:] == ["mean", "p50", "p90", "p95", "p99", "max"]
    ttft = [line.split() for line in lines if line.split()[1:2] == ["TTFT"]]
    assert [r[0] for r in ttft] == ["1", "2"] and all(len(r) == 8 for r in ttft), out.stdout
    for name in ("TPOT", "ITL", "E2E"):
        rows = [line.split() for line in lines if line.split()[:1] == [name]]
        assert len(rows) == 2 and all(float(x) > 0 for r in rows for x in r[1:]), out.stdout
    assert "TTFT = request written on an open connection" in out.stdout


def test_bench_shows_why_requests_failed(
    tmp_path: Path, server: Server, tiny_model: ModelFiles
) -> None:
    # 300-token prompts do not fit the server's 256-token context: every request is refused
    args = [*_bench_args(server, tiny_model, "--num-requests", "2", "--warmup", "0")]
    args[args.index("--input-tokens") + 1] = "300"
    table = cli(tmp_path, *args)
    assert table.returncode == 1, table.stderr  # nothing was measured
    assert "no request succeeded" in table.stderr
    (line,) = [x for x in table.stdout.splitlines() if "http_400" in x]
    assert line.startswith("concurrency=1: 2 failed with http_400: ") and "context" in line, line

    as_json = cli(tmp_path, *args, "--json")
    assert as_json.returncode == 1, as_json.stderr
    (level,) = json.loads(as_json.stdout)
    assert level["failed_by_kind"] == {"http_400": 2}
    assert "context" in level["error_examples"]["http_400"]


def test_bench_seed_gives_fresh_prompts(
    tmp_path: Path, server: Server, tiny_model: ModelFiles
) -> None:
    def bench(seed: str) -> int:
        """Run 2 requests with ``seed``; return how many had their whole prompt cached."""
        done, hits = server.log_count(DONE), server.log_count(FULL_PROMPT_CACHE_HIT)
        args = _bench_args(server, tiny_model, "--num-requests", "2", "--warmup", "0")
        out = cli(tmp_path, *args, "--seed", seed, "--json")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)[0]["completed"] == 2
        server.wait_log_count(DONE, done + 2)
        return server.log_count(FULL_PROMPT_CACHE_HIT) - hits

    bench("11")
    assert bench("11") == 2  # the same seed repeats the prompts: the server's cache answers them
    assert bench("12") == 0  # a new seed: prompts the server has never seen


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_bench_stopped_by_a_signal_says_interrupted(
    tmp_path: Path, server: Server, tiny_model: ModelFiles, sig: signal.Signals, code: int
) -> None:
    done = server.log_count(DONE)
    proc = start_cli(tmp_path, *_bench_args(server, tiny_model, "--duration-s", "60"))
    try:
        server.wait_log_count(DONE, done + 3, timeout_s=60)  # warm-up over, measuring
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        stop_group(proc)
    assert proc.returncode == code, err
    assert err.startswith("interrupted") and "Traceback" not in err, err
    assert out == ""


def test_reading_commands_never_create_a_database(tmp_path: Path) -> None:
    """`list`, `show`, `export`, `report` on a data directory with no studies say so and write
    nothing (they only read)."""
    listed = servetune(tmp_path, "list")
    assert listed.returncode == 0, listed.stderr
    assert "no studies yet" in " ".join(listed.stdout.split())
    for args in (["show", "x"], ["export", "x"], ["report", "x", "-o", str(tmp_path / "r.html")]):
        assert_clean_error(servetune(tmp_path, *args), 1, "no studies yet", "servetune run SPEC")
    assert not (tmp_path / "data").exists()
