"""Benchmark: wall time of the demo study (servetune/demo.py's spec) run locally and on a
fleet (manager + two local workers over a private Redis) at ``budget.parallel`` 1 and 2.

Every part is the real program: ``servetune run`` for the local reference, ``servetune manager``
plus ``servetune worker`` processes for the fleet, studies submitted with POST /api/studies.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.redis_server (repo root)

from tests.redis_server import RedisServer, free_port

from servetune.demo import demo_spec
from servetune.modelgen import make_model
from servetune.settings import sqlite_url
from servetune.store.repo import StudyStore

TERMINAL = ("finished", "failed", "interrupted", "cancelled")
"""Study statuses after which nothing runs any more (store/repo.py's StudyStatus)."""
RERUN_NOTE = "re-run once: other processes used"
"""How run_trial's note on an outside-load re-run starts (runner.py, ``_less_loaded``)."""


class BenchError(Exception):
    """A part of the fleet did not start or a study did not finish; the message says which."""


def spec_for(base: dict[str, Any], parallel: int, outside_cpu: float | None) -> dict[str, Any]:
    """The demo spec ``base`` with ``budget.parallel`` = ``parallel`` (and, when given,
    ``deployment.max_outside_cpu_fraction`` = ``outside_cpu``); ``base`` is not changed."""
    doc = copy.deepcopy(base)
    doc["budget"]["parallel"] = parallel
    if outside_cpu is not None:
        doc["deployment"]["max_outside_cpu_fraction"] = outside_cpu
    return doc


def peak_overlap(spans: list[tuple[float, float]]) -> int:
    """The most intervals ``(start_s, end_s)`` open at one instant (an end before a start at the
    same instant: back-to-back trials do not overlap); 0 for none."""
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    peak = now = 0
    for _, step in edges:
        now += step
        peak = max(peak, now)
    return peak


def summarize_trials(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts of a study's trials (JSON as ``Trial.model_dump(mode="json")``, the API's shape):
    by state, outside-load re-runs, trials per worker (when the JSON names one) and the peak
    number of trials that ran at the same time and the median and longest trial, s (from each
    result's started_at/finished_at)."""
    states: dict[str, int] = {}
    workers: dict[str, int] = {}
    spans: list[tuple[float, float]] = []
    reruns = 0
    for t in trials:
        states[t["state"]] = states.get(t["state"], 0) + 1
        if t.get("worker_id"):
            workers[str(t["worker_id"])] = workers.get(str(t["worker_id"]), 0) + 1
        result = t.get("result") or {}
        if any(str(n).startswith(RERUN_NOTE) for n in result.get("notes", [])):
            reruns += 1
        if result.get("started_at") and result.get("finished_at"):
            start = _epoch_s(result["started_at"])
            spans.append((start, max(start, _epoch_s(result["finished_at"]))))
    return {
        "trials": len(trials),
        "states": dict(sorted(states.items())),
        "outside_load_reruns": reruns,
        "trials_per_worker": dict(sorted(workers.items())),
        "peak_parallel_trials": peak_overlap(spans),
        "trial_p50_s": statistics.median(e - s for s, e in spans) if spans else None,
        "trial_max_s": max((e - s for s, e in spans), default=None),
    }


def _epoch_s(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


def _env(data_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["SERVETUNE_DATA_DIR"] = str(data_dir)
    env.pop("SERVETUNE_DB_URL", None)
    env.pop("SERVETUNE_REDIS_URL", None)
    env["COLUMNS"] = "200"
    return env


def _servetune(*args: str) -> list[str]:
    return [sys.executable, "-m", "servetune", *args]


def run_local(work: Path, doc: dict[str, Any], parallel: int, timeout_s: float) -> dict[str, Any]:
    """Time ``servetune run`` of ``doc`` at ``parallel`` in its own data dir and database."""
    folder = work / f"local-p{parallel}"
    folder.mkdir(parents=True, exist_ok=True)
    spec_path = folder / "demo.yaml"
    spec_path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    db_url = sqlite_url(folder / "studies.db")
    name = f"bench-local-p{parallel}"
    argv = _servetune("run", str(spec_path), "--name", name, "--db", db_url)
    log_path = folder / "run.log"
    t0 = time.perf_counter()
    with log_path.open("wb") as log:
        try:
            done = subprocess.run(  # noqa: S603 - argv list of our own CLI
                argv, env=_env(folder / "data"), stdout=log, stderr=subprocess.STDOUT,
                timeout=timeout_s, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired as e:
            raise BenchError(
                f"servetune run did not finish in {timeout_s:g} s; see {log_path}"
            ) from e
    wall_s = time.perf_counter() - t0
    store = StudyStore(db_url, read_only=True)
    study = store.get_study(name)
    trials = [t.model_dump(mode="json") for t in store.trials(study.id)]
    if done.returncode not in (0, 1):  # 1: finished with nothing to recommend
        raise BenchError(f"servetune run exited {done.returncode}; see {log_path}")
    return {
        "run": "local",
        "parallel": parallel,
        "wall_s": wall_s,
        "exit_code": done.returncode,
        "status": study.status,
        "host_load_1min_after": os.getloadavg()[0],
        **summarize_trials(trials),
    }


@contextlib.contextmanager
def _process(
    argv: list[str], env: dict[str, str], log_path: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``argv`` with its output in ``log_path``; on exit SIGTERM it, then SIGKILL after 30 s."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)  # noqa: S603
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_until(what: str, check: Any, timeout_s: float, procs: dict[str, tuple[Any, Path]]) -> Any:
    """Poll ``check()`` every 0.25 s until it returns something truthy; BenchError when a process
    in ``procs`` exits meanwhile or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for name, (proc, log_path) in procs.items():
            if proc.poll() is not None:
                raise BenchError(
                    f"{name} exited ({proc.returncode}) while waiting for {what}; "
                    f"last lines of {log_path}:\n{_tail(log_path)}"
                )
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            value = check()
            if value:
                return value
        time.sleep(0.25)
    raise BenchError(f"{what}: not within {timeout_s:g} s")


def _workers(client: httpx.Client) -> tuple[int, dict[str, str]]:
    """From GET /api/workers: how many workers are online or busy, and each id's alias."""
    body = client.get("/api/workers").raise_for_status().json()
    items = body.get("items", []) if isinstance(body, dict) else body
    names = {w["info"]["id"]: w["info"].get("alias") or w["info"]["id"] for w in items}
    if isinstance(body, dict) and "online" in body:
        return int(body["online"]) + int(body.get("busy", 0)), names
    return sum(1 for w in items if w.get("state") in ("online", "busy")), names


def _trials_json(client: httpx.Client, study_id: int) -> list[dict[str, Any]]:
    body = client.get(f"/api/studies/{study_id}/trials").raise_for_status().json()
    if isinstance(body, dict):
        body = body.get("items", body.get("trials", []))
    return list(body)


def _cores_of(index: int, workers: int) -> str:
    """The ``--cpus`` list of worker ``index`` (0-based) when this host's usable cores are split
    evenly between ``workers`` workers (each gets at least one)."""
    cores = sorted(os.sched_getaffinity(0))
    share = max(1, len(cores) // workers)
    mine = cores[index * share : (index + 1) * share] or cores[-1:]
    return ",".join(map(str, mine))


def run_fleet(
    work: Path,
    docs: dict[int, dict[str, Any]],
    workers: int,
    timeout_s: float,
    pin: bool = False,
) -> list[dict[str, Any]]:
    """Start a private Redis, ``servetune manager`` and ``workers`` × ``servetune worker
    --max-parallel 1`` (with ``pin``, worker n gets its own core(s) with ``--cpus``, so workers
    sharing this host do not share cores); submit each spec of ``docs`` (parallel → spec) in turn over REST and time
    it from POST to a terminal status. Raises BenchError when a part fails."""
    folder = work / "fleet"
    folder.mkdir(parents=True, exist_ok=True)
    redis_server = RedisServer(folder / "redis")
    redis_server.start()
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    results = []
    try:
        with contextlib.ExitStack() as stack:
            procs: dict[str, tuple[Any, Path]] = {}
            log_path = folder / "manager.log"
            argv = _servetune("manager", "--host", "127.0.0.1", "--port", str(port))
            argv += ["--db", sqlite_url(folder / "manager.db"), "--redis", redis_server.url]
            procs["manager"] = (
                stack.enter_context(_process(argv, _env(folder / "manager"), log_path)),
                log_path,
            )
            for n in range(1, workers + 1):
                log_path = folder / f"worker-w{n}.log"
                argv = _servetune("worker", "--redis", redis_server.url, "--name", f"w{n}")
                argv += ["--max-parallel", "1"]
                if pin:
                    argv += ["--cpus", _cores_of(n - 1, workers)]
                procs[f"worker w{n}"] = (
                    stack.enter_context(_process(argv, _env(folder / f"w{n}"), log_path)),
                    log_path,
                )
            client = stack.enter_context(httpx.Client(base_url=base_url, timeout=30))
            _wait_until(
                "the manager's /api/health",
                lambda: client.get("/api/health").status_code == 200,
                120,
                procs,
            )
            _wait_until(
                f"{workers} workers online", lambda: _workers(client)[0] >= workers, 120, procs
            )
            for parallel, doc in docs.items():
                name = f"bench-fleet-p{parallel}"
                t0 = time.perf_counter()
                created = client.post("/api/studies", json={"spec": doc, "name": name})
                if created.status_code >= 400:
                    raise BenchError(
                        f"POST /api/studies answered {created.status_code}: {created.text[:2000]}"
                    )
                study_id = int(created.json()["id"])

                def status(study_id: int = study_id) -> str | None:
                    value = client.get(f"/api/studies/{study_id}").raise_for_status().json()
                    return value["status"] if value["status"] in TERMINAL else None

                final = _wait_until(f"study {name} to end", status, timeout_s, procs)
                wall_s = time.perf_counter() - t0
                summary = summarize_trials(_trials_json(client, study_id))
                aliases = _workers(client)[1]
                summary["trials_per_worker"] = {
                    aliases.get(w, w): n for w, n in summary["trials_per_worker"].items()
                }
                results.append(
                    {
                        "run": f"fleet ({workers} workers)",
                        "parallel": parallel,
                        "wall_s": wall_s,
                        "status": final,
                        "host_load_1min_after": os.getloadavg()[0],
                        **summary,
                    }
                )
    finally:
        redis_server.kill()
    return results


def print_table(results: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """Print one line per run and the fleet's speed-up of parallel 2 over parallel 1."""
    print(
        f"demo study: {meta['max_trials']} trials, {meta['model_size']} model, TPE; host: "
        f"{meta['host_cpus']} cores (every engine, worker, manager and client share them), "
        f"load {meta['host_load_1min']:.1f} at the start"
    )
    print(
        f"  {'run':<20}{'parallel':>9}{'wall s':>9}{'trial p50/max s':>17}{'peak':>6}{'re-runs':>9}"
        f"{'load':>6}  {'status':<10}trials"
    )
    for r in results:
        states = ", ".join(f"{n} {s}" for s, n in r["states"].items())
        per_worker = r["trials_per_worker"]
        where = f"; per worker {per_worker}" if per_worker else ""
        trial_s = f"{r['trial_p50_s']:.1f} / {r['trial_max_s']:.1f}" if r["trial_p50_s"] else "-"
        print(
            f"  {r['run']:<20}{r['parallel']:>9}{r['wall_s']:>9.1f}{trial_s:>17}"
            f"{r['peak_parallel_trials']:>6}{r['outside_load_reruns']:>9}"
            f"{r['host_load_1min_after']:>6.1f}  {r['status']:<10}"
            f"{states}{where}"
        )
    fleet = {r["parallel"]: r["wall_s"] for r in results if r["run"].startswith("fleet")}
    if 1 in fleet and 2 in fleet:
        print(f"  fleet speed-up, parallel 2 over 1: {fleet[1] / fleet[2]:.2f}×")
    if meta["workers"] > 1:
        print(
            f"  note: the {meta['workers']} workers share this host, and each offers all "
            f"{meta['host_cpus']} cores: trials placed at once oversubscribe the cores (a real "
            "fleet has one worker per host; `servetune run` at parallel > 1 shares the cores out)"
        )
    print(
        "  peak: most trials running at one time; re-runs: trials measured again because other "
        "processes used the CPU (max_outside_cpu_fraction); load: the host's 1-min load "
        "average when the run ended"
    )


def main() -> None:
    """Parse options, make the demo model, run the local reference and the fleet, report."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--max-trials", type=int, default=12, help="trials per study (the demo's 12)"
    )
    parser.add_argument("--size", choices=["tiny", "small"], default="small", help="demo model")
    parser.add_argument("--workers", type=int, default=2, help="local workers of the fleet")
    parser.add_argument(
        "--local-parallel",
        default="1",
        help="comma-separated budget.parallel values of the local reference runs ('' for none)",
    )
    parser.add_argument(
        "--max-outside-cpu-fraction",
        type=float,
        help="override the spec's deployment.max_outside_cpu_fraction (1 = never re-run a "
        "trial measured under outside load; default: the demo spec's)",
    )
    parser.add_argument("--timeout-s", type=float, default=3600, help="limit per study, s")
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="keep the model (reused) and each run's logs and databases (run-<UTC time>/) here",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="give each local worker its own share of the cores (servetune worker --cpus)",
    )
    parser.add_argument("--output", type=Path, help="write every figure as JSON to this file")
    args = parser.parse_args()
    if args.max_trials < 2:
        parser.error("--max-trials must be at least 2 (the baseline and one search trial)")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    try:
        local = [int(p) for p in args.local_parallel.split(",") if p.strip()]
    except ValueError:
        parser.error(f"--local-parallel {args.local_parallel!r}: use numbers such as 1 or 1,2")
    if any(p < 1 for p in local):
        parser.error("--local-parallel values must be at least 1")
    if args.max_outside_cpu_fraction is not None and not 0 <= args.max_outside_cpu_fraction <= 1:
        parser.error("--max-outside-cpu-fraction must be between 0 and 1")
    meta = {
        "max_trials": args.max_trials,
        "model_size": args.size,
        "workers": args.workers,
        "host_cpus": os.cpu_count(),
        "host_load_1min": os.getloadavg()[0],
        "max_outside_cpu_fraction": args.max_outside_cpu_fraction,
    }
    with contextlib.ExitStack() as stack:
        root = args.work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        files = make_model(args.size, root / f"model-{args.size}")  # made once, then reused
        work = root / datetime.now(UTC).strftime("run-%Y%m%dT%H%M%SZ")  # databases, logs
        work.mkdir(parents=True)
        meta["work_dir"] = str(work) if args.work_dir else None
        base = demo_spec(files.gguf_path, files.tokenizer_dir, args.max_trials)
        results = []
        try:
            for parallel in local:
                doc = spec_for(base, parallel, args.max_outside_cpu_fraction)
                results.append(run_local(work, doc, parallel, args.timeout_s))
                print(f"  done: local parallel {parallel} in {results[-1]['wall_s']:.1f} s")
            docs = {p: spec_for(base, p, args.max_outside_cpu_fraction) for p in (1, 2)}
            results += run_fleet(work, docs, args.workers, args.timeout_s, pin=args.pin)
        except BenchError as e:
            sys.exit(f"bench_fleet_demo: {e}")
    print_table(results, meta)
    if args.output is not None:
        args.output.write_text(
            json.dumps({"meta": meta, "runs": results}, indent=2) + "\n", encoding="utf-8"
        )
        print(f"  JSON written to {args.output}")


if __name__ == "__main__":
    main()
