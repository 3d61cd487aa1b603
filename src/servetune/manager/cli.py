"""The `servetune manager` and `servetune submit` commands (registered on the main typer app).

This module never imports servetune.cli (so manager and worker stay independent through it);
user errors raised here are printed by the main app like every other command's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from servetune.core.spec import Problem
from servetune.errors import ServetuneError, SpecInvalid

log = logging.getLogger(__name__)

FINAL_STATUSES = ("finished", "failed", "cancelled", "interrupted")

FOLLOW_RETRIES = 20
"""Reconnections `submit` tries in a row when the live view drops (a manager restarting)."""
FOLLOW_RETRY_MAX_S = 2.0
"""Longest pause between two reconnections, s (about 35 s of retries in all)."""

TokenFileOption = Annotated[
    Path | None,
    typer.Option(
        "--token-file",
        help="File holding the API bearer token (default: SERVETUNE_API_TOKEN).",
        dir_okay=False,
    ),
]


class ManagerUnreachable(ServetuneError):
    """`servetune submit` could not talk to the manager (connection, auth or protocol)."""


def _read_token(path: Path | None) -> Any:
    """The token of ``--token-file`` (stripped), else SERVETUNE_API_TOKEN, as a SecretStr."""
    from pydantic import SecretStr

    from servetune.settings import Settings

    if path is None:
        return Settings().api_token
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise ServetuneError(f"--token-file {path}: {e.strerror or e}") from e
    if not token:
        raise ServetuneError(f"--token-file {path} is empty; write the token in it")
    return SecretStr(token)


def _secrets_of(settings: Any) -> list[str]:
    """The literal secrets of ``settings`` a log must never show: the API token, URL passwords."""
    from urllib.parse import urlsplit

    found = [settings.api_token.get_secret_value()] if settings.api_token is not None else []
    for url in (settings.redis_url, settings.db_url):
        try:
            password = urlsplit(url).password if url else None
        except ValueError:
            password = None
        if password:
            found.append(password)
    return found


def _log_to_stderr(verbose: bool, secrets: list[str] | None = None) -> None:
    """One line per record on stderr (a service's log goes to its supervisor: systemd, docker);
    ``secrets``, bearer credentials and URL passwords are masked in every record."""
    from servetune.redact import install_secret_filter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("httpx", "httpcore", "alembic", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    install_secret_filter(secrets or [])


PREFLIGHT_REDIS_S = 5.0
"""How long the manager's start-up check of --redis retries an unreachable Redis, s."""
STARTUP_FAILED = 3
"""Exit status of a manager that could not start (uvicorn's for a failed start-up)."""


async def _ping_redis(url: str) -> None:
    """Connect to ``url`` and PING it; raises RedisUnavailable (masked URL, the fix)."""
    from redis.exceptions import RedisError

    from servetune.cluster.redis import connect, safe_url, translate

    r = connect(url, retry_for_s=PREFLIGHT_REDIS_S)
    try:
        await r.ping()
    except RedisError as e:
        raise translate(e, safe_url(url), "starting the manager") from e
    finally:
        await r.aclose()


def _preflight(settings: Any) -> None:
    """Open the database and PING ``--redis`` before uvicorn starts, so a bad option is one line.

    Prints ``error: --db …`` / ``error: --redis …`` with the fix on stderr and raises
    ``typer.Exit(STARTUP_FAILED)``; a private Redis (no --redis) is checked by its own start.
    """
    from servetune.errors import RedisUnavailable, StoreError
    from servetune.store.repo import StudyStore

    try:
        StudyStore(settings.db_url).close()
    except StoreError as e:
        print(f"error: --db (or SERVETUNE_DB_URL): {e}", file=sys.stderr)
        raise typer.Exit(STARTUP_FAILED) from None
    if settings.redis_url is None:
        return
    try:
        asyncio.run(_ping_redis(settings.redis_url))
    except RedisUnavailable as e:
        print(f"error: --redis (or SERVETUNE_REDIS_URL): {e}", file=sys.stderr)
        raise typer.Exit(STARTUP_FAILED) from None


def manager(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8400,
    db: Annotated[
        str | None,
        typer.Option("--db", help="Database URL (default: SQLite file in the data directory)."),
    ] = None,
    redis_url: Annotated[
        str | None,
        typer.Option(
            "--redis",
            help="Redis URL (redis://[:password@]host:port/db, rediss:// for TLS); default: a "
            "private redis-server started and stopped with the manager.",
        ),
    ] = None,
    token_file: TokenFileOption = None,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Log debug lines.")] = False,
) -> None:
    """Run the manager: REST API and WebSockets (docs at /docs), studies run on workers."""
    import uvicorn

    from servetune.manager.app import create_app
    from servetune.manager.auth import check_bind
    from servetune.manager.redis_launcher import INSTALL_HINT, RedisNotInstalled
    from servetune.settings import Settings

    overrides: dict[str, Any] = {}
    if db:
        overrides["db_url"] = db
    if redis_url:
        overrides["redis_url"] = redis_url
    if token_file is not None:
        overrides["api_token"] = _read_token(token_file)
    settings = Settings(**overrides)
    check_bind(host, settings.api_token)
    if settings.redis_url is None and shutil.which("redis-server") is None:
        raise RedisNotInstalled(f"no redis-server on PATH: {INSTALL_HINT}")
    _preflight(settings)
    _log_to_stderr(verbose, _secrets_of(settings))
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        access_log=False,  # access lines could carry query strings; the token is never logged
        log_config=None,
        ws_ping_interval=20.0,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    shown = f"[{host}]" if ":" in host else host
    log.info("manager on http://%s:%d (API docs at /docs)", shown, port)
    asyncio.run(server.serve())
    if not server.started:
        raise ServetuneError("the manager did not start; see the lines above for why")


def _headers(token: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {token.get_secret_value()}"} if token is not None else {}


def _answer_error(status: int, body: Any, base: str) -> ServetuneError:
    detail = body.get("detail") if isinstance(body, dict) else None
    if status == 401:
        return ManagerUnreachable(
            f"the manager at {base} needs its API token: pass --token-file or set "
            "SERVETUNE_API_TOKEN"
        )
    return ManagerUnreachable(f"the manager at {base} answered {status}: {detail or body}")


def manager_base(manager_url: str) -> str:
    """``--manager``'s URL without a trailing slash; raises typer.BadParameter unless it is an
    http:// or https:// URL."""
    base = manager_url.rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise typer.BadParameter(f"{manager_url!r}: give http://host:port", param_hint="--manager")
    return base


def call_manager(
    method: str,
    base: str,
    path: str,
    token: Any,
    *,
    json: Any = None,
    timeout_s: float = 60.0,
    ok: tuple[int, ...] = (200,),
    subject: str = "spec",
) -> Any:
    """One request to the manager; the JSON answer. A 422 becomes SpecInvalid (its problems,
    about ``subject``: the spec, a worker slot), another error answer ManagerUnreachable
    (``_answer_error``), a network failure too."""
    import httpx

    try:
        answer = httpx.request(
            method, f"{base}{path}", json=json, headers=_headers(token), timeout=timeout_s
        )
    except httpx.HTTPError as e:
        raise ManagerUnreachable(
            f"cannot reach the manager at {base}: {e}; is `servetune manager` running there?"
        ) from e
    try:
        body = answer.json()
    except ValueError:
        body = answer.text[:300]
    if answer.status_code == 422 and isinstance(body, dict) and "problems" in body:
        raise SpecInvalid(
            [
                Problem(p["field"], p["message"] + (f"; {p['fix']}" if p.get("fix") else ""))
                for p in body["problems"]
            ],
            subject=subject,
        )
    if answer.status_code not in ok:
        raise _answer_error(answer.status_code, body, base)
    return body


def _create(base: str, document: dict[str, Any], name: str | None, token: Any) -> dict[str, Any]:
    """POST the spec; the created study (dict). Raises SpecInvalid on 422, ManagerUnreachable."""
    import yaml

    payload = {"spec_yaml": yaml.safe_dump(document, sort_keys=False), "name": name}
    body = call_manager("POST", base, "/api/studies", token, json=payload, ok=(201,))
    assert isinstance(body, dict)
    return body


def _read_outcome(base: str, study_id: int, token: Any) -> tuple[Any, list[Any]]:
    """The finished study as stored on the manager: (StudyRecord, its Trials by number), from
    GET /api/studies/{id} and /trials. Raises ManagerUnreachable, or what ``_answer_error``
    makes of an error answer."""
    import httpx

    from servetune.core.study import Trial
    from servetune.store.repo import StudyRecord

    answers = []
    for path in (f"/api/studies/{study_id}", f"/api/studies/{study_id}/trials"):
        try:
            answer = httpx.get(f"{base}{path}", headers=_headers(token), timeout=60)
        except httpx.HTTPError as e:
            raise ManagerUnreachable(f"cannot reach the manager at {base}: {e}") from e
        if answer.status_code != 200:
            raise _answer_error(answer.status_code, answer.text[:300], base)
        answers.append(answer.json())
    study, trials = answers
    record = StudyRecord.model_validate(
        {k: v for k, v in study.items() if k in StudyRecord.model_fields}
    )
    stored = [
        Trial.model_validate({k: v for k, v in t.items() if k in Trial.model_fields})
        for t in trials["items"]
    ]
    return record, stored


async def _follow(base: str, study_id: int, token: Any, console: Console) -> str:
    """Print each trial as it finishes (the lines `run` prints) until the study ends; its status."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus, WebSocketException

    from servetune.core.study import Trial, TrialState
    from servetune.study_session import _describe

    printed: set[int] = set()
    status = "running"

    def show(raw: dict[str, Any]) -> None:
        trial = Trial.model_validate(raw)
        if trial.state in (TrialState.RUNNING, TrialState.WAITING) or trial.number in printed:
            return
        printed.add(trial.number)
        console.print(_describe(trial), highlight=False)

    url = "ws" + base.removeprefix("http") + f"/ws/studies/{study_id}"
    failures = 0
    while True:
        try:
            async with connect(url, additional_headers=_headers(token), max_size=None) as ws:
                async for text in ws:
                    message = json.loads(text)
                    kind = message.get("type")
                    if kind == "snapshot":
                        failures = 0  # connected again: a fresh budget of retries
                        for raw in message.get("trials", []):
                            show(raw)
                        status = message["study"]["status"]
                    elif kind == "trial":
                        show(message["trial"])
                    elif kind == "study":
                        status = message.get("status", status)
                    if status in FINAL_STATUSES:
                        return status
            lost = "the manager closed it while the study is not running there"
        except InvalidStatus as e:
            if e.response.status_code < 500:
                raise _answer_error(e.response.status_code, {}, base) from e
            lost = f"HTTP {e.response.status_code}"
        except (OSError, WebSocketException) as e:
            lost = str(e) or type(e).__name__
        failures += 1
        if failures > FOLLOW_RETRIES:
            raise ManagerUnreachable(
                f"lost the live view of study {study_id} at {base} ({lost}) and could not get "
                f"it back; the study goes on there: {base}/api/studies/{study_id}"
            )
        console.print(f"[dim]live view lost ({escape(lost)}); reconnecting…[/]", highlight=False)
        await asyncio.sleep(min(FOLLOW_RETRY_MAX_S, 0.25 * 2**failures))


def submit(
    spec: Annotated[Path, typer.Argument(help="Study spec (YAML or JSON).")],
    manager_url: Annotated[
        str, typer.Option("--manager", help="Base URL of the manager, e.g. http://host:8400.")
    ],
    name: Annotated[
        str | None, typer.Option(help="Study name (default: from the spec, else generated).")
    ] = None,
    token_file: TokenFileOption = None,
) -> None:
    """Create a study on a manager from SPEC and follow it live, with the lines `run` prints.

    Once it finished, prints what `run` prints: the verdict, the recommendation, the best params
    and the launch command (``servetune.outcome.print_stored_outcome``), then the report's URL.
    Exit status: 0 finished, 1 failed, cancelled or nothing to recommend (like `run`), 2 an
    invalid spec, 130 Ctrl-C (the study keeps running on the manager).
    """
    from servetune.specfile import read_document, resolve_paths

    base = manager_base(manager_url)
    token = _read_token(token_file)
    from servetune.redact import install_secret_filter

    install_secret_filter([token.get_secret_value()] if token is not None else [])
    document = resolve_paths(read_document(spec), spec.resolve().parent)
    study = _create(base, document, name, token)
    console = Console()
    console.print(f"study [bold]{escape(study['name'])}[/] (id {study['id']}) on {base}")
    try:
        status = asyncio.run(_follow(base, study["id"], token, console))
    except KeyboardInterrupt:
        console.print(
            f"[yellow]stopped following[/]: study {escape(study['name'])} keeps running on the "
            f"manager; see it at {base}/api/studies/{study['id']} (live: "
            f"/ws/studies/{study['id']}), cancel it with POST {base}/api/studies/{study['id']}/cancel",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(130) from None
    console.print(f"study {escape(study['name'])}: {status}", highlight=False)
    report = f"{base}/api/studies/{study['id']}/report"
    if status != "finished":
        console.print(f"report: {escape(str(report))}", highlight=False)
        raise typer.Exit(1)
    from servetune.outcome import print_stored_outcome

    record, trials = _read_outcome(base, study["id"], token)
    print_stored_outcome(record, trials, report, out=console)


def register(app: typer.Typer) -> None:
    """Add `manager` and `submit` to the main command line ``app``."""
    app.command("manager")(manager)
    app.command("submit")(submit)
