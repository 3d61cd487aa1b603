"""The manager's FastAPI app: ``create_app(settings)`` with its lifespan, routes and error answers.

The lifespan opens the store, Redis (``settings.redis_url`` or a private redis-server), the
worker registry, the study supervisor and the worker slots (their deployer is built on first
use), and closes them in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis
from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.requests import HTTPConnection
from starlette.websockets import WebSocketState

from servetune.errors import (
    PathOutside,
    RedisUnavailable,
    ServetuneError,
    SlotBusy,
    SlotExists,
    SlotNotFound,
    SpecInvalid,
    StoreError,
    StudyBusy,
    StudyExists,
    StudyNotFound,
    StudyNotResumable,
    WorkerAliasTaken,
    WorkerNotFound,
)
from servetune.manager import ws
from servetune.manager.auth import BearerAuth
from servetune.manager.deps import DeployerFactory, ManagerState, SlotDeployer, SupervisorFactory
from servetune.manager.routes import health, slots, studies, workers
from servetune.manager.schemas import ProblemPublic, ProblemsBody
from servetune.settings import Settings
from servetune.store.repo import StudyStore

log = logging.getLogger(__name__)


def _default_supervisor(settings: Settings, store: StudyStore, r: Any) -> Any:
    from servetune.manager.supervisor import StudySupervisor

    return StudySupervisor(settings, store, r)


def _default_deployer(settings: Settings, redis_url: str, registry: Any) -> SlotDeployer:
    from servetune.remote.deploy import Deployer

    deployer: SlotDeployer = Deployer(settings, redis_url, registry)
    return deployer


@asynccontextmanager
async def _lifespan(
    app: FastAPI,
    settings: Settings,
    supervisor_factory: SupervisorFactory | None,
    deployer_factory: DeployerFactory | None,
) -> AsyncIterator[None]:
    from servetune.cluster.redis import connect, safe_url
    from servetune.cluster.registry import Registry
    from servetune.manager.redis_launcher import start_private_redis
    from servetune.manager.worker_slots import WorkerSlots
    from servetune.store.slots import SlotStore

    store = await asyncio.to_thread(StudyStore, settings.db_url)
    private = None
    r = None
    try:
        url = settings.redis_url
        if url is None:
            private = await start_private_redis(settings.data_dir)
            url = private.url
            settings = settings.model_copy(update={"redis_url": url})
        log.info("manager: database %s, Redis %s", store.url, safe_url(url))
        r = await connect(url)
        registry = Registry(r, settings)
        supervisor = (supervisor_factory or _default_supervisor)(settings, store, r)
        await supervisor.start()
        make_deployer = deployer_factory or _default_deployer
        redis_url = url
        worker_slots = WorkerSlots(
            SlotStore(store), registry, lambda: make_deployer(settings, redis_url, registry)
        )
        app.state.manager = ManagerState(
            settings=settings,
            store=store,
            redis=r,
            registry=registry,
            supervisor=supervisor,
            slots=worker_slots,
        )
        try:
            yield
        finally:
            await worker_slots.stop()
            await supervisor.stop()
    finally:
        if r is not None:
            await r.aclose()
        if private is not None:
            await private.stop()
        store.close()


def _problems_response(detail: str, problems: list[ProblemPublic]) -> JSONResponse:
    body = ProblemsBody(detail=detail, problems=problems)
    return JSONResponse(status_code=422, content=body.model_dump(mode="json"))


def _error(status: int, e: BaseException) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": str(e) or type(e).__name__})


CLOSE_INTERNAL_ERROR = 1011
"""WebSocket close code when a handler failed (Redis or the store down); the reason says why."""
CLOSE_REASON_MAX_BYTES = 123
"""Longest close reason a WebSocket close frame carries, bytes (RFC 6455)."""

Handler = Any


def _for_websockets_too(handler: Handler) -> Handler:
    """``handler`` (made for HTTP requests) that also serves a WebSocket scope: there the error
    is logged and the socket closed with ``CLOSE_INTERNAL_ERROR`` and the answer's detail as
    the reason (accepted first if needed, so the client gets that reason), nothing returned."""

    async def both(conn: HTTPConnection, e: Exception) -> JSONResponse | None:
        if conn.scope["type"] != "websocket":
            answer: JSONResponse = await handler(conn, e)
            return answer
        assert isinstance(conn, WebSocket)
        log.error("WebSocket %s: %s: %s", conn.url.path, type(e).__name__, e)
        reason = (str(e) or type(e).__name__).encode()[:CLOSE_REASON_MAX_BYTES]
        with contextlib.suppress(RuntimeError, OSError):  # the client may be gone already
            if conn.client_state == WebSocketState.CONNECTING:
                await conn.accept()
            if conn.client_state == WebSocketState.CONNECTED:
                await conn.close(
                    code=CLOSE_INTERNAL_ERROR, reason=reason.decode("utf-8", errors="ignore")
                )
        return None

    return both


def _install_error_handlers(app: FastAPI) -> None:
    """Map the error tree to HTTP answers: every error body is ``{"detail": …}`` (JSON).

    On a WebSocket (``/ws/…``) every one of them closes the socket with code 1011 and the
    error as the reason instead (``_for_websockets_too``).
    """

    async def spec_invalid(request: Request, e: Exception) -> JSONResponse:
        assert isinstance(e, SpecInvalid)
        problems = [ProblemPublic.of(p) for p in e.problems]
        what = "spec" if request.url.path.rstrip("/") == "/api/studies" else "request"
        return _problems_response(f"the {what} has {len(problems)} problem(s)", problems)

    async def bad_request(request: Request, e: Exception) -> JSONResponse:
        assert isinstance(e, RequestValidationError)
        problems = []
        for err in e.errors():
            message = str(err.get("msg", "")).removeprefix("Value error, ")
            if err.get("type") == "json_invalid":  # its loc is a character position, not a field
                where = [x for x in err.get("loc", ()) if isinstance(x, int)]
                at = f" at character {where[0]}" if where else ""
                problems.append(
                    ProblemPublic(
                        field="(body)", message=f"the body is not valid JSON{at}: {message}"
                    )
                )
                continue
            loc = [str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path")]
            problems.append(ProblemPublic(field=".".join(loc) or "(body)", message=message))
        return _problems_response(f"the request has {len(problems)} problem(s)", problems)

    async def servetune_error(request: Request, e: Exception) -> JSONResponse:
        if isinstance(e, StudyNotFound | WorkerNotFound | SlotNotFound):
            return _error(404, e)
        if isinstance(
            e,
            StudyExists | StudyBusy | StudyNotResumable | WorkerAliasTaken | SlotExists | SlotBusy,
        ):
            return _error(409, e)
        if isinstance(e, PathOutside):
            return _error(422, e)
        if isinstance(e, StoreError | RedisUnavailable):
            log.error("%s %s: %s", request.method, request.url.path, e)
            return _error(503, e)
        return _error(400, e)

    async def redis_error(request: Request, e: Exception) -> JSONResponse:
        log.error("%s %s: Redis failed: %s", request.method, request.url.path, e)
        return JSONResponse(
            status_code=503, content={"detail": f"Redis is unavailable ({type(e).__name__})"}
        )

    app.add_exception_handler(SpecInvalid, _for_websockets_too(spec_invalid))
    app.add_exception_handler(RequestValidationError, _for_websockets_too(bad_request))
    app.add_exception_handler(ServetuneError, _for_websockets_too(servetune_error))
    app.add_exception_handler(redis.RedisError, _for_websockets_too(redis_error))


def create_app(
    settings: Settings,
    *,
    supervisor_factory: SupervisorFactory | None = None,
    deployer_factory: DeployerFactory | None = None,
) -> FastAPI:
    """The manager's FastAPI app for ``settings``; OpenAPI at /openapi.json, docs at /docs.

    ``supervisor_factory(settings, store, redis)`` builds the study supervisor (default:
    manager/supervisor.py's StudySupervisor); ``deployer_factory(settings, redis_url,
    registry)`` the deployer of worker slots (default: remote/deploy.py's Deployer, built at
    the first deploy, restore or delete of a slot); tests pass their own. With
    ``settings.api_token`` every /api and /ws request needs ``Authorization: Bearer <token>``
    (or the WebSocket subprotocol ``bearer.<token>``). Nothing is opened until the app starts
    (its lifespan): the store, Redis (a private redis-server when ``settings.redis_url`` is
    None; raises RedisNotInstalled when none is on PATH), the registry and the supervisor.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with _lifespan(app, settings, supervisor_factory, deployer_factory):
            yield

    app = FastAPI(
        title="servetune manager",
        summary="Runs tuning studies on workers over Redis; live trials and worker logs.",
        version="1",
        lifespan=lifespan,
        responses={401: {"description": "Missing or wrong bearer token."}}
        if settings.api_token
        else None,
    )
    _install_error_handlers(app)
    app.include_router(studies.router)
    app.include_router(studies.assets)
    app.include_router(workers.router)
    app.include_router(slots.router)
    app.include_router(health.router)
    app.include_router(ws.router)
    if settings.api_token is not None:
        app.add_middleware(BearerAuth, token=settings.api_token)
    return app
