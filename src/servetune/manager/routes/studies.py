"""REST routes of studies: create from a spec, list, read, cancel, resume, delete, trials, report.

A spec is validated exactly as `servetune validate` does; every problem comes back in one 422.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Response
from fastapi.responses import FileResponse, HTMLResponse

from servetune.core.spec import Problem
from servetune.errors import (
    ServetuneError,
    SpecInvalid,
    StudyBusy,
    StudyNotResumable,
    check_resumable,
)
from servetune.manager.deps import RedisDep, RegistryDep, SettingsDep, StoreDep, SupervisorDep
from servetune.manager.schemas import (
    ErrorBody,
    ProblemsBody,
    StudyCreate,
    StudyList,
    StudyPublic,
    TrialList,
    TrialPublic,
)
from servetune.specfile import parse_document, validate_document
from servetune.store.repo import StudyRecord

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/studies", tags=["studies"])

StudyId = Annotated[int, Path(ge=1, le=2**31 - 1, description="Database id of the study.")]

_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorBody}}
_CONFLICT: dict[int | str, dict[str, Any]] = {409: {"model": ErrorBody}}


def _spec_document(body: StudyCreate) -> dict[str, Any]:
    """The spec mapping of the request; SpecInvalid when it has none, both, or bad text."""
    if (body.spec is None) == (body.spec_yaml is None):
        raise SpecInvalid(
            [Problem("spec", "give the spec once: either `spec` (an object) or `spec_yaml` (text)")]
        )
    if body.spec is not None:
        return body.spec
    assert body.spec_yaml is not None
    return parse_document(body.spec_yaml, "spec_yaml")


def _study_name(body: StudyCreate, spec_name: str | None, engine_kind: str) -> str:
    if body.name:
        return body.name
    return spec_name or f"{engine_kind}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"


async def _public(store: StoreDep, supervisor: SupervisorDep, study_id: int) -> StudyPublic:
    record: StudyRecord = await asyncio.to_thread(store.get_study, study_id)
    return StudyPublic.of(record, supervisor.running())


@router.post(
    "",
    status_code=201,
    responses={422: {"model": ProblemsBody}, **_CONFLICT},
    summary="Create a study from a spec and run it on the workers",
)
async def create_study(
    body: StudyCreate, store: StoreDep, supervisor: SupervisorDep
) -> StudyPublic:
    """Validate the spec like `servetune validate` (422 with every problem), store the study
    (409 when the name is taken), and hand it to the supervisor, which runs it on workers."""
    document = _spec_document(body)
    spec = await asyncio.to_thread(validate_document, document)
    name = _study_name(body, spec.name, spec.engine.kind)
    record = await asyncio.to_thread(store.create_study, name, spec, document, "manager")
    await supervisor.submit(record.id)
    log.info("study %s (id %d) submitted", record.name, record.id)
    return await _public(store, supervisor, record.id)


@router.get("", summary="List studies, newest first")
async def list_studies(store: StoreDep, supervisor: SupervisorDep) -> StudyList:
    """Up to 200 studies, newest first; those this servetune cannot read are listed apart."""
    found = await asyncio.to_thread(store.list_studies, 200)
    running = supervisor.running()
    return StudyList(
        items=[StudyPublic.of(s, running) for s in found if isinstance(s, StudyRecord)],
        unreadable=[s for s in found if not isinstance(s, StudyRecord)],
    )


@router.get("/{study_id}", responses=_NOT_FOUND, summary="Read a study")
async def read_study(study_id: StudyId, store: StoreDep, supervisor: SupervisorDep) -> StudyPublic:
    """The study with this id (404 when there is none)."""
    return await _public(store, supervisor, study_id)


@router.post(
    "/{study_id}/cancel", responses={**_NOT_FOUND, **_CONFLICT}, summary="Cancel a running study"
)
async def cancel_study(
    study_id: StudyId, store: StoreDep, supervisor: SupervisorDep
) -> StudyPublic:
    """Abort the study's jobs on the workers; its running trials end cancelled (409, nothing
    written, when the study is not running, or runs on another manager)."""
    record = await asyncio.to_thread(store.get_study, study_id)
    if record.status != "running":
        raise StudyNotResumable(
            f"study {record.name} is not running (status {record.status}); nothing to cancel"
        )
    if study_id not in supervisor.running():
        raise StudyBusy(
            f"study {record.name} is {record.status} and not running on this manager; "
            "nothing to cancel"
        )
    await supervisor.cancel(study_id)
    return await _public(store, supervisor, study_id)


@router.post(
    "/{study_id}/resume",
    responses={**_NOT_FOUND, **_CONFLICT},
    summary="Resume a stopped study on the workers",
)
async def resume_study(
    study_id: StudyId, store: StoreDep, supervisor: SupervisorDep
) -> StudyPublic:
    """Run the study again from where it stopped (409 when it runs already, here or elsewhere,
    or already finished: its verdict is final, like `servetune resume`)."""
    record = await asyncio.to_thread(store.get_study, study_id)
    if study_id in supervisor.running():
        raise StudyBusy(f"study {record.name} is already running on this manager")
    check_resumable(record.name, record.status)
    await supervisor.resume(study_id)
    return await _public(store, supervisor, study_id)


@router.delete(
    "/{study_id}",
    status_code=204,
    responses={**_NOT_FOUND, **_CONFLICT},
    summary="Delete a study and its trials",
)
async def delete_study(
    study_id: StudyId,
    store: StoreDep,
    supervisor: SupervisorDep,
    redis: RedisDep,
    registry: RegistryDep,
) -> Response:
    """Delete the study and every trial of it (409 while it runs: cancel it first); its jobs
    still queued on workers are removed, and its stored job results (best effort: a Redis
    failure is logged, the study is deleted all the same)."""
    from servetune.cluster.queue import forget_trial_jobs

    record = await asyncio.to_thread(store.get_study, study_id)
    if study_id in supervisor.running():
        raise StudyBusy(f"study {record.name} is running on this manager; cancel it first")
    trials = await asyncio.to_thread(store.trials, study_id)
    await asyncio.to_thread(store.delete_study, study_id)
    try:
        workers = [w.info.id for w in await registry.workers()]
        await forget_trial_jobs(redis, [t.id for t in trials if t.id is not None], workers)
    except ServetuneError as e:
        log.warning("study %s deleted, but its jobs in Redis were not removed: %s", record.name, e)
    return Response(status_code=204)


@router.get("/{study_id}/trials", responses=_NOT_FOUND, summary="A study's trials")
async def list_trials(study_id: StudyId, store: StoreDep) -> TrialList:
    """Every trial of the study by number, with the worker that ran it."""

    def read() -> TrialList:
        trials = store.list_trials(study_id)
        workers = store.trial_workers(study_id)
        return TrialList(
            items=[
                TrialPublic(**dict(t), worker_id=workers.get(t.id) if t.id else None)
                for t in trials
            ]
        )

    return await asyncio.to_thread(read)


PLOTLY_PATH = "/assets/plotly.min.js"
"""Where the manager serves plotly.js for its reports (no token needed: a public library)."""

assets = APIRouter(prefix="/assets", include_in_schema=False)


@assets.get("/plotly.min.js")
async def plotly_js(settings: SettingsDep) -> FileResponse:
    """plotly.js for the reports, cached by browsers for a day."""
    from servetune.report.html import shared_plotly_js

    path = await asyncio.to_thread(shared_plotly_js, settings.reports_dir)
    return FileResponse(
        path, media_type="text/javascript", headers={"Cache-Control": "public, max-age=86400"}
    )


@router.get(
    "/{study_id}/report",
    response_class=HTMLResponse,
    responses={
        200: {"content": {"text/html": {}}},
        404: {
            "description": "No such study.",
            "content": {"application/json": {"schema": ErrorBody.model_json_schema()}},
        },
    },
    summary="The study's HTML report",
)
async def read_report(study_id: StudyId, store: StoreDep, settings: SettingsDep) -> HTMLResponse:
    """The study's HTML report (as `servetune report`); plotly.js comes from
    /assets/plotly.min.js, or inline when the data directory cannot hold it."""
    from servetune.report.html import render_report, shared_plotly_js

    def render() -> str:
        record = store.get_study(study_id)
        trials = store.list_trials(study_id)
        try:
            shared_plotly_js(settings.reports_dir)
            src: str | None = PLOTLY_PATH
        except OSError as e:
            log.info(
                "shared plotly.js unavailable in %s (%s); inlining it", settings.reports_dir, e
            )
            src = None
        return render_report(record, trials, plotly_src=src)

    return HTMLResponse(await asyncio.to_thread(render))
