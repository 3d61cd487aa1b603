"""A fleet of real processes for the end-to-end tests: a private Redis, a manager and workers.

``Fleet`` starts each as ``servetune …`` in its own process group with its output in a log file,
waits through the REST API, kills and restarts on demand, and kills everything it started on exit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar, cast

import httpx
import psutil
import redis
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from servetune.cluster import keys
from servetune.cluster.models import TrialEvent
from tests.redis_server import RedisServer, free_port

log = logging.getLogger(__name__)

T = TypeVar("T")

SERVETUNE: tuple[str, ...] = (sys.executable, "-m", "servetune")
"""The CLI as the fleet runs it: this interpreter, so the processes use this checkout."""

FINISHED_TRIAL_STATES = frozenset({"COMPLETE", "PRUNED", "FAIL"})
"""Trial states that end a trial (Optuna's); WAITING and RUNNING do not."""

ENDED_STUDY_STATUSES = frozenset({"finished", "failed", "interrupted", "cancelled"})
"""Study statuses that end a study run; ``running`` does not."""

ONLINE_WORKER_STATES = frozenset({"online", "busy"})
"""Worker states of a worker that heartbeats (busy = online with a trial running)."""

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    httpx.HTTPError,
    psutil.Error,
    sqlite3.OperationalError,
    redis.RedisError,
    ConnectionError,
    TimeoutError,
)
"""Errors a wait tolerates and retries through (a manager or Redis being restarted)."""


class FleetError(RuntimeError):
    """A fleet process could not be started or exited when it should run; the message says which."""


class WaitTimeout(AssertionError):
    """A ``wait_for`` condition did not hold in time; the message names it and the last value seen."""


def utc_now() -> datetime:
    """The current time as an aware UTC datetime."""
    return datetime.now(UTC)


def parse_utc(text: str | None) -> datetime | None:
    """An ISO 8601 timestamp from the API as an aware UTC datetime (None stays None).

    Raises ValueError for a naive timestamp: everything the fleet writes is timezone-aware.
    """
    if text is None:
        return None
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        raise ValueError(f"timestamp {text!r} has no timezone; the API must send aware UTC times")
    return value.astimezone(UTC)


def wait_for(
    predicate: Callable[[], T | Literal[False] | None],
    timeout_s: float,
    *,
    what: str,
    interval_s: float = 0.05,
) -> T:
    """Call ``predicate`` until it returns something truthy, and return that.

    Errors in ``TRANSIENT_ERRORS`` (the API down while a manager restarts, a process gone) are
    retried; any other error propagates at once. Raises WaitTimeout naming ``what``, the last
    value and the last transient error after ``timeout_s`` seconds.
    """
    deadline = time.monotonic() + timeout_s
    last: Any = None
    error: BaseException | None = None
    while True:
        try:
            last = predicate()
            error = None
            if last:
                return cast(T, last)
        except TRANSIENT_ERRORS as e:
            error = e
        if time.monotonic() >= deadline:
            because = f"; last error: {error!r}" if error is not None else ""
            raise WaitTimeout(f"{what}: not so after {timeout_s} s (last value {last!r}{because})")
        time.sleep(interval_s)


def items_of(body: Any) -> list[Any]:
    """The ``items`` of a list answer of the API (``{"items": [...], ...}``). Raises FleetError
    for any other shape."""
    if isinstance(body, dict) and isinstance(body.get("items"), list):
        return list(body["items"])
    raise FleetError(f"expected an object with 'items' from the API, got {body!r}")


def study_of(body: Any) -> dict[str, Any]:
    """The study object of an answer of POST /api/studies or GET /api/studies/{id} (a
    StudyPublic: id, name, status, …). Raises FleetError for any other shape."""
    if isinstance(body, dict) and "id" in body and "status" in body:
        return body
    raise FleetError(f"expected a study object (id, status) from the API, got {body!r}")


def trial_field(trial: dict[str, Any], name: str) -> Any:
    """A trial's field from the API's trial JSON: at the top level, else inside its ``result``
    (``failure_kind``, ``started_at`` and ``finished_at`` live in TrialResult)."""
    if trial.get(name) is not None:
        return trial[name]
    result = trial.get("result") or {}
    return result.get(name)


def records_in(message: str | bytes) -> list[dict[str, Any]]:
    """The log records in one WebSocket message: ``{"type": "logs", "records": [...]}`` as the
    manager sends them, or a bare LogRecord object or list; anything else (a ping) → []."""
    try:
        return _records_of(json.loads(message))
    except ValueError:
        return []


def _records_of(data: Any) -> list[dict[str, Any]]:
    if isinstance(data, list):
        return [d for d in data if isinstance(d, dict) and "message" in d and "at" in d]
    if isinstance(data, dict):
        if "message" in data and "at" in data:
            return [data]
        if "records" in data:
            return _records_of(data["records"])
    return []


def record_at(record: dict[str, Any]) -> datetime:
    """When a log record (LogRecord JSON) was written on its worker, aware UTC."""
    at = parse_utc(record.get("at"))
    if at is None:
        raise FleetError(f"log record without 'at': {record!r}")
    return at


def record_identity(record: dict[str, Any]) -> tuple[Any, ...]:
    """What makes a log record the same record whichever way it came (REST or WebSocket):
    its time, logger, source, trial and message."""
    rest = tuple(record.get(k) for k in ("logger", "source", "trial_id", "message"))
    return (record_at(record), *rest)


@dataclass(frozen=True)
class SeenRecord:
    """A worker's log record as a reader received it: the record JSON and when it arrived."""

    record: dict[str, Any]
    seen_at: datetime

    @property
    def at(self) -> datetime:
        """When the worker wrote the record (its ``at``, aware UTC)."""
        return record_at(self.record)

    @property
    def delay_s(self) -> float:
        """Seconds from being written on the worker to arriving here (same host, same clock)."""
        return (self.seen_at - self.at).total_seconds()


class LogReader:
    """A background reader of one worker's log records; ``seen`` holds each record once, with
    its arrival time. Subclasses fill it; use as a context manager (``stop()`` on exit)."""

    kind = "log reader"

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: list[SeenRecord] = []
        self.errors: list[str] = []
        self._keys: set[tuple[Any, ...]] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"logs-{name}", daemon=True)

    def _add(self, records: list[dict[str, Any]]) -> None:
        now = utc_now()
        with self._lock:
            for r in records:
                key = record_identity(r)
                if key not in self._keys:
                    self._keys.add(key)
                    self.seen.append(SeenRecord(r, now))

    def _run(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        """Start reading in a daemon thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop reading (waits up to 5 s for the thread)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def records(
        self, *, written_after: datetime | None = None, study_id: int | None = None
    ) -> list[SeenRecord]:
        """The records seen so far, only those written after ``written_after`` and, when
        ``study_id`` is given, those of that study."""
        with self._lock:
            seen = list(self.seen)
        if written_after is not None:
            seen = [s for s in seen if s.at >= written_after]
        if study_id is not None:
            seen = [s for s in seen if s.record.get("study_id") == study_id]
        return seen

    def __enter__(self) -> LogReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RestLogPoller(LogReader):
    """Polls ``GET /api/workers/{id}/logs?limit=<limit>`` every ``interval_s`` (a record is
    seen at most that late after it reaches Redis). When the API refuses the limit (422), it
    polls with the API's default limit instead."""

    kind = "REST"
    interval_s = 0.25

    def __init__(self, fleet: Fleet, name: str, limit: int | None = 500) -> None:
        super().__init__(name)
        self.fleet = fleet
        self.limit = limit

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._add(self.fleet.worker_logs(self.name, limit=self.limit))
            except httpx.HTTPStatusError as e:
                self.errors.append(repr(e))
                if e.response.status_code == 422 and self.limit is not None:
                    self.limit = None
            except (httpx.HTTPError, FleetError) as e:
                self.errors.append(repr(e))
            self._stop.wait(self.interval_s)


class WsLogWatcher(LogReader):
    """Follows ``/ws/workers/{id}/logs``: connects in ``start()`` (raises when it cannot) and
    records every log record pushed to it."""

    kind = "WebSocket"

    def __init__(self, fleet: Fleet, name: str) -> None:
        super().__init__(name)
        self.url = fleet.ws_url(f"/ws/workers/{fleet.worker_id(name)}/logs")
        self._headers = fleet.auth_headers
        self._ws: ClientConnection | None = None
        self._exit = contextlib.ExitStack()

    def start(self) -> None:
        """Open the WebSocket (5 s timeout), then read it in a daemon thread."""
        connection = ws_connect(
            self.url, additional_headers=self._headers, proxy=None, open_timeout=5
        )
        self._ws = self._exit.enter_context(connection)
        super().start()

    def _run(self) -> None:
        assert self._ws is not None
        while not self._stop.is_set():
            try:
                message = self._ws.recv(timeout=0.2)
            except TimeoutError:
                continue
            except ConnectionClosed as e:
                self.errors.append(f"closed: {e!r}")
                return
            self._add(records_in(message))

    def stop(self) -> None:
        """Stop reading and close the WebSocket."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self._exit.close()


@dataclass
class FleetProcess:
    """One ``servetune`` process of the fleet: its argv, environment, log file and Popen.

    Each start runs in a new session (its own process group, pgid = pid) and appends to
    ``log_path`` after a header line, so restarts keep the earlier output.
    """

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> None:
        """Start it (raises FleetError when it is already running)."""
        if self.alive:
            raise FleetError(f"{self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        with self.log_path.open("ab") as out:
            header = (
                f"=== start {self.starts} at {utc_now().isoformat()}: {shlex.join(self.argv)}\n"
            )
            out.write(header.encode())
            out.flush()
            self.popen = subprocess.Popen(  # noqa: S603 - argv list of our own CLI
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        log.info("started %s (pid %d)", self.name, self.popen.pid)

    @property
    def pid(self) -> int:
        """Process id of the current (or last) start; raises FleetError before the first."""
        if self.popen is None:
            raise FleetError(f"{self.name} was never started")
        return self.popen.pid

    @property
    def alive(self) -> bool:
        """True while the process runs."""
        return self.popen is not None and self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        """Exit status once it exited (negative = killed by that signal), else None."""
        return None if self.popen is None else self.popen.poll()

    def kill9(self) -> None:
        """SIGKILL the process itself, not its group (what it started must die on its own, as
        after a crash), and reap it."""
        if self.popen is not None and self.alive:
            os.kill(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)
            log.info("killed %s with SIGKILL", self.name)

    def sigterm(self) -> None:
        """Send SIGTERM to the process itself (it decides how to stop)."""
        if self.popen is not None and self.alive:
            os.kill(self.popen.pid, signal.SIGTERM)
            log.info("sent SIGTERM to %s", self.name)

    def wait(self, timeout_s: float) -> int:
        """Wait for it to exit; its exit status. Raises WaitTimeout when it still runs."""
        if self.popen is None:
            raise FleetError(f"{self.name} was never started")
        try:
            return self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired as e:
            raise WaitTimeout(
                f"{self.name} still runs {timeout_s} s after being asked to stop"
            ) from e

    def stop(self) -> None:
        """Kill it and everything under it (its process group and every descendant, found
        before the kill), and reap it: the cleanup that runs even when a test failed."""
        if self.popen is None:
            return
        descendants: list[psutil.Process] = []
        if self.alive:
            with contextlib.suppress(psutil.Error):
                descendants = psutil.Process(self.popen.pid).children(recursive=True)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        for p in descendants:
            with contextlib.suppress(psutil.Error):
                p.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)
        psutil.wait_procs(descendants, timeout=5)

    def tail(self, lines: int = 60) -> str:
        """The last ``lines`` lines of its log ('' before it wrote any)."""
        if not self.log_path.exists():
            return ""
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])


def is_gone(p: psutil.Process) -> bool:
    """True when the process has exited (a zombie no one reaped yet counts as exited)."""
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(procs: Sequence[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Wait up to ``timeout_s`` for every process of ``procs`` to exit; the ones still running."""
    deadline = time.monotonic() + timeout_s
    alive = [p for p in procs if not is_gone(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if not is_gone(p)]
    return alive


def _row_dict(cursor: sqlite3.Cursor, row: tuple[Any, ...]) -> dict[str, Any]:
    return {column[0]: value for column, value in zip(cursor.description, row, strict=True)}


def _describe(p: psutil.Process) -> str:
    try:
        return f"pid {p.pid} (parent {p.ppid()}): {shlex.join(p.cmdline())[:200]}"
    except psutil.Error:
        return f"pid {p.pid} (gone)"


@dataclass(frozen=True)
class RunningOnWorker:
    """A trial caught mid-trial: its API JSON, the worker (name) running it and the engine
    processes of that worker at that moment."""

    trial: dict[str, Any]
    worker: str
    engines: list[psutil.Process]


class Fleet:
    """A private Redis, one manager and named workers, each a real ``servetune`` process.

    - Redis: ``tests/redis_server.RedisServer`` on a free port (never the shared 6379), with
      ``redis_password`` when given.
    - Manager: ``servetune manager --host 127.0.0.1 --port <free> --db sqlite:///<root>/manager/
      manager.db --redis <url>`` with ``SERVETUNE_DATA_DIR=<root>/manager``.
    - Workers: ``servetune worker --redis <url> --name <name> --max-parallel <n>`` with
      ``SERVETUNE_DATA_DIR=<root>/<name>`` (its worker id is stable across restarts).
    - Every process gets ``SERVETUNE_HEARTBEAT_S=heartbeat_s`` and ``SERVETUNE_LEASE_TTL_S=
      lease_ttl_s`` (short, so faults are noticed in seconds) and no other inherited
      ``SERVETUNE_*`` variable; logs go to ``<root>/logs/<name>.log``. The heartbeat is 1 s,
      not shorter: a worker's event loop can be busy for up to ~1 s while a trial starts on a
      loaded 2-core host, and at 0.5 s (offline after 1.5 s) a busy worker was seen declared
      lost.
    - ``model_path``: a string every engine process of this fleet carries in its command line
      (the tiny model's path), so ``engine_processes()`` sees this fleet's engines only.

    ``with Fleet(...) as fleet`` starts everything and waits until every worker is online
    (raises FleetError with every log's tail when that fails); leaving the block kills every
    process it started, their process groups and descendants, and any engine of ``model_path``.
    """

    def __init__(
        self,
        root: Path,
        *,
        model_path: Path,
        workers: Sequence[str] = ("w1", "w2"),
        heartbeat_s: float = 1.0,
        lease_ttl_s: float = 3.0,
        max_parallel: int = 1,
        api_token: str | None = None,
        start_timeout_s: float = 60.0,
        redis_password: str | None = None,
    ) -> None:
        self.root = root
        self.model_path = model_path
        self.heartbeat_s = heartbeat_s
        self.lease_ttl_s = lease_ttl_s
        self.api_token = api_token
        self.start_timeout_s = start_timeout_s
        self.redis = RedisServer(root / "redis", password=redis_password)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.db_path = root / "manager" / "manager.db"
        self.db_url = f"sqlite:///{self.db_path}"
        logs = root / "logs"
        manager_env = self.env(root / "manager")
        manager_env["SERVETUNE_DB_URL"] = self.db_url
        self.manager = FleetProcess(
            "manager",
            [
                *SERVETUNE,
                *("manager", "--host", "127.0.0.1", "--port", str(self.port)),
                *("--db", self.db_url, "--redis", self.redis.url),
            ],
            manager_env,
            logs / "manager.log",
        )
        self.workers: dict[str, FleetProcess] = {
            name: FleetProcess(
                name,
                [
                    *SERVETUNE,
                    *("worker", "--redis", self.redis.url, "--name", name),
                    *("--max-parallel", str(max_parallel)),
                ],
                self.env(root / name),
                logs / f"{name}.log",
            )
            for name in workers
        }
        self.api = httpx.Client(
            base_url=self.base_url, headers=self.auth_headers, timeout=10.0, trust_env=False
        )
        self._worker_ids: dict[str, str] = {}

    # ---- life cycle -----------------------------------------------------------------------

    def env(self, data_dir: Path) -> dict[str, str]:
        """The environment of a fleet process whose data directory is ``data_dir``."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SERVETUNE_")}
        env.update(
            SERVETUNE_DATA_DIR=str(data_dir),
            SERVETUNE_HEARTBEAT_S=str(self.heartbeat_s),
            SERVETUNE_LEASE_TTL_S=str(self.lease_ttl_s),
            PYTHONUNBUFFERED="1",
            COLUMNS="200",
        )
        if self.api_token:
            env["SERVETUNE_API_TOKEN"] = self.api_token
        return env

    @property
    def auth_headers(self) -> dict[str, str]:
        """The Authorization header when the fleet has an API token, else none."""
        return {"Authorization": f"Bearer {self.api_token}"} if self.api_token else {}

    def __enter__(self) -> Fleet:
        try:
            self.redis.start()
            self.start_manager()
            for worker in self.workers.values():
                worker.start()
            if self.workers:
                self.wait_workers_online(timeout_s=self.start_timeout_s)
        except Exception as e:
            report = self.report()
            self.close()
            raise FleetError(f"the fleet did not start: {e}\n{report}") from e
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Kill every process the fleet started (workers, manager, their groups and
        descendants, leftover engines of ``model_path``) and Redis; close the API client."""
        for proc in [*self.workers.values(), self.manager]:
            try:
                proc.stop()
            except Exception:
                log.exception("could not stop %s", proc.name)
        for p in self.engine_processes():
            with contextlib.suppress(psutil.Error):
                p.kill()
        self.redis.kill()
        self.api.close()

    def start_manager(self, timeout_s: float | None = None) -> None:
        """Start the manager and wait until ``GET /api/health`` answers 200; raises FleetError
        at once when it exits, WaitTimeout when it does not answer in time."""
        self.manager.start()
        wait_for(
            self._manager_healthy,
            timeout_s or self.start_timeout_s,
            what="the manager answers GET /api/health",
            interval_s=0.1,
        )

    def _manager_healthy(self) -> bool:
        if not self.manager.alive:
            raise FleetError(f"the manager exited ({self.manager.returncode}); see its log")
        return self.api.get("/api/health").status_code == 200

    def restart_manager(self) -> None:
        """kill -9 the manager, then start it again on the same port and database."""
        self.manager.kill9()
        self.start_manager()

    def restart_redis(self) -> None:
        """Kill Redis (SIGKILL: its data is lost, as in a crash) and start it again on the same
        port; returns once it answers PING."""
        self.redis.kill()
        self.redis.start()

    def start_worker(self, name: str) -> None:
        """Start worker ``name`` (again) and wait until the manager lists it online."""
        self.workers[name].start()
        self.wait_workers_online([name])

    def heal(self) -> None:
        """Restart whatever a previous test killed (Redis, the manager, workers), kill any
        engine a previous test left behind (that test has failed on it already), and wait
        until every worker is online."""
        if self.redis.proc is None or self.redis.proc.poll() is not None:
            self.redis.start()
        if not self.manager.alive:
            self.start_manager()
        for worker in self.workers.values():
            if not worker.alive:
                worker.start()
        for p in self.engine_processes():
            log.warning("killing an engine a previous test left behind: %s", _describe(p))
            with contextlib.suppress(psutil.Error):
                p.kill()
        self.wait_workers_online(timeout_s=self.start_timeout_s)

    # ---- the REST API --------------------------------------------------------------------

    def get(self, path: str, **params: Any) -> Any:
        """``GET path`` with query ``params`` (None values left out); the JSON body. Raises
        httpx.HTTPStatusError for a non-2xx answer."""
        r = self.api.get(path, params={k: v for k, v in params.items() if v is not None})
        r.raise_for_status()
        return r.json()

    def post(self, path: str, body: Any = None) -> httpx.Response:
        """``POST path`` with a JSON ``body``; the response, whatever its status."""
        return self.api.post(path, json=body)

    def submit(self, spec: dict[str, Any], name: str | None = None) -> int:
        """Create a study through ``POST /api/studies`` (``{"spec": spec, "name": name}``); its
        id. Raises FleetError with the problems when the manager refuses the spec."""
        body: dict[str, Any] = {"spec": spec}
        if name is not None:
            body["name"] = name
        r = self.post("/api/studies", body)
        if r.status_code >= 400:
            raise FleetError(f"POST /api/studies answered {r.status_code}: {r.text}")
        return int(study_of(r.json())["id"])

    def study(self, study_id: int) -> dict[str, Any]:
        """``GET /api/studies/{id}``: the study object (``status`` among its fields)."""
        return study_of(self.get(f"/api/studies/{study_id}"))

    def cancel(self, study_id: int) -> httpx.Response:
        """``POST /api/studies/{id}/cancel``; the response."""
        return self.post(f"/api/studies/{study_id}/cancel")

    def trials(self, study_id: int) -> list[dict[str, Any]]:
        """``GET /api/studies/{id}/trials``, sorted by number."""
        found = items_of(self.get(f"/api/studies/{study_id}/trials"))
        return sorted(found, key=lambda t: int(t["number"]))

    def wait_study_ended(self, study_id: int, timeout_s: float = 120.0) -> dict[str, Any]:
        """Wait until the study's status is no longer ``running``; the study object."""
        return wait_for(
            lambda: (s := self.study(study_id))["status"] in ENDED_STUDY_STATUSES and s,
            timeout_s,
            what=f"study {study_id} ends",
            interval_s=0.2,
        )

    def wait_study_finished(self, study_id: int, timeout_s: float = 120.0) -> dict[str, Any]:
        """Wait until the study ended and check it ``finished``; the study object. Raises
        AssertionError naming the status and every trial's state when it ended otherwise."""
        study = self.wait_study_ended(study_id, timeout_s)
        if study["status"] != "finished":
            states = [
                (t["number"], t["state"], trial_field(t, "failure_kind"))
                for t in self.trials(study_id)
            ]
            raise AssertionError(f"study {study_id} ended {study['status']}, trials {states}")
        return study

    def study_named(self, name: str) -> dict[str, Any]:
        """The study called ``name`` from ``GET /api/studies``; raises FleetError when absent."""
        for item in items_of(self.get("/api/studies")):
            study = study_of(item)
            if study.get("name") == name:
                return study
        raise FleetError(f"the manager lists no study named {name!r}")

    def worker_states(self) -> dict[str, str]:
        """``GET /api/workers``: each worker's state (online, busy, offline) by name (alias);
        remembers each name's worker id."""
        states: dict[str, str] = {}
        for item in items_of(self.get("/api/workers")):  # WorkerPublic: info, state, …
            info = item["info"]
            name = info["alias"] or info["id"]
            self._worker_ids[name] = info["id"]
            states[name] = item["state"]
        return states

    def wait_workers_online(
        self, names: Sequence[str] | None = None, timeout_s: float = 30.0
    ) -> dict[str, str]:
        """Wait until the manager lists every worker of ``names`` (default: all) online or
        busy; raises FleetError at once when one of their processes exited."""
        wanted = list(names or self.workers)

        def online() -> dict[str, str] | None:
            for name in wanted:
                proc = self.workers[name]
                if not proc.alive:
                    raise FleetError(f"worker {name} exited ({proc.returncode}); see its log")
            states = self.worker_states()
            ok = all(states.get(n) in ONLINE_WORKER_STATES for n in wanted)
            return states if ok else None

        return wait_for(online, timeout_s, what=f"workers {wanted} are online", interval_s=0.1)

    def worker_id(self, name: str) -> str:
        """The worker id of worker ``name`` (as the manager lists it)."""
        if name not in self._worker_ids:
            self.worker_states()
        if name not in self._worker_ids:
            raise FleetError(f"the manager does not list a worker named {name!r}")
        return self._worker_ids[name]

    def worker_name(self, worker_id: str | None) -> str | None:
        """The name of the worker with id ``worker_id`` (None when unknown or None)."""
        if worker_id is not None and worker_id not in self._worker_ids.values():
            self.worker_states()
        return next((n for n, i in self._worker_ids.items() if i == worker_id), None)

    def worker_logs(self, name: str, **params: Any) -> list[dict[str, Any]]:
        """``GET /api/workers/{id}/logs`` with ``params`` (limit, level, since, trial)."""
        return items_of(self.get(f"/api/workers/{self.worker_id(name)}/logs", **params))

    def latest_logs(self, name: str) -> list[dict[str, Any]]:
        """Worker ``name``'s newest log records: up to 500 (the default cap of the stored
        stream), or as many as the API's default limit when it refuses 500."""
        try:
            return self.worker_logs(name, limit=500)
        except httpx.HTTPStatusError as e:
            if e.response.status_code != 422:
                raise
            return self.worker_logs(name)

    def ws_url(self, path: str) -> str:
        """The ws:// URL of ``path`` on the manager."""
        return f"ws://127.0.0.1:{self.port}{path}"

    @contextlib.contextmanager
    def log_readers(
        self, names: Sequence[str] | None = None
    ) -> Iterator[dict[str, tuple[RestLogPoller, WsLogWatcher]]]:
        """A REST poller and a WebSocket watcher per worker (default: all), reading while the
        block runs; by name."""
        readers: dict[str, tuple[RestLogPoller, WsLogWatcher]] = {}
        try:
            for name in names or list(self.workers):
                rest, ws = RestLogPoller(self, name), WsLogWatcher(self, name)
                readers[name] = (rest, ws)
                ws.start()
                rest.start()
            yield readers
        finally:
            for rest, ws in readers.values():
                rest.stop()
                ws.stop()

    # ---- the database ----------------------------------------------------------------------

    def db_trials(self, study_id: int) -> list[dict[str, Any]]:
        """The study's trial rows in the manager's SQLite database (read-only), by number:
        every column but the result JSON, plus ``has_result``."""
        uri = f"file:{self.db_path}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10)) as conn:
            conn.row_factory = _row_dict
            rows = conn.execute(
                "select *, result is not null as has_result from trials where study_id = ? "
                "order by number",
                (study_id,),
            ).fetchall()
        return [{k: v for k, v in r.items() if k != "result"} for r in rows]

    # ---- Redis --------------------------------------------------------------------------

    def events(self) -> list[TrialEvent]:
        """Every entry of the trial events stream (``keys.EVENTS``) as TrialEvents, oldest first."""
        with self.redis.client() as r:
            entries = r.xrange(keys.EVENTS)
        return [TrialEvent.model_validate_json(fields["event"]) for _, fields in entries]

    def registered(self, name: str) -> bool:
        """True when Redis holds worker ``name``'s info and a live heartbeat (it registered)."""
        worker_id = self.worker_id(name)
        with self.redis.client() as r:
            return bool(r.exists(keys.worker_info(worker_id), keys.heartbeat(worker_id)) == 2)

    # ---- processes -----------------------------------------------------------------------

    def engine_processes(self) -> list[psutil.Process]:
        """Live (not zombie) processes whose command line holds ``model_path``: this fleet's
        engines, wherever their parent is."""
        marker = str(self.model_path)
        found = []
        for p in psutil.process_iter(["cmdline", "status"]):
            try:
                if p.info["status"] == psutil.STATUS_ZOMBIE or p.pid == os.getpid():
                    continue
                if any(marker in part for part in p.info["cmdline"] or ()):
                    found.append(p)
            except psutil.Error:
                continue
        return found

    def engines_of(self, name: str) -> list[psutil.Process]:
        """The engine processes started by worker ``name`` (its descendants)."""
        proc = self.workers[name]
        if not proc.alive:
            return []
        engines = []
        for p in self.engine_processes():
            with contextlib.suppress(psutil.Error):
                if proc.pid in (a.pid for a in p.parents()):
                    engines.append(p)
        return engines

    def wait_no_engines(self, timeout_s: float = 10.0) -> None:
        """Wait until no engine of this fleet runs; raises WaitTimeout listing the survivors
        (pid, parent pid, command line)."""
        try:
            wait_for(lambda: not self.engine_processes(), timeout_s, what="no engine is left")
        except WaitTimeout as e:
            left = [_describe(p) for p in self.engine_processes()]
            raise WaitTimeout(f"engine processes still run {timeout_s} s later: {left}") from e

    def running_trial(
        self, study_id: int, *, min_number: int = 0, timeout_s: float = 60.0
    ) -> RunningOnWorker:
        """Wait until a trial of the study numbered ``min_number`` or more is RUNNING on a
        worker whose engine process is up (mid-trial); that trial, its worker's name and the
        worker's engines. (``min_number=1`` skips the baseline, which runs alone.)"""

        def caught() -> RunningOnWorker | None:
            busy = {name: e for name in self.workers if (e := self.engines_of(name))}
            if not busy:
                return None
            for t in self.trials(study_id):
                name = self.worker_name(t.get("worker_id"))
                if t["number"] >= min_number and t["state"] == "RUNNING" and name in busy:
                    return RunningOnWorker(t, name, busy[name])
            return None

        return wait_for(caught, timeout_s, what=f"a trial of study {study_id} runs on a worker")

    # ---- reports -------------------------------------------------------------------------

    def report(self, lines: int = 80) -> str:
        """The tail of every process's output, Redis's log and each process's own log file
        (``<data_dir>/logs/*.log``): what a failed test prints."""
        parts = []
        for proc in [self.manager, *self.workers.values()]:
            state = (
                "not started"
                if proc.popen is None
                else ("running" if proc.alive else f"exit {proc.returncode}")
            )
            parts.append(f"----- {proc.name} ({state}) {proc.log_path} -----\n{proc.tail(lines)}")
        redis_log = self.redis.folder / "redis.log"
        if redis_log.exists():
            tail = redis_log.read_text(errors="replace").splitlines()[-20:]
            parts.append(f"----- redis {redis_log} -----\n" + "\n".join(tail))
        for path in sorted(self.root.glob("*/logs/*.log")):  # servetune.log, worker-<name>.log
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"----- {path} -----\n" + "\n".join(tail))
        return "\n".join(parts)
