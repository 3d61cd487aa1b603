"""Every Redis key, stream and channel name servetune uses, in one place.

Names start with ``servetune:`` so a Redis shared with other programs stays readable.
"""

from __future__ import annotations

PREFIX = "servetune"

EVENTS = f"{PREFIX}:events"
"""Stream of ``TrialEvent`` entries written by workers (field ``event``: the JSON)."""
EVENTS_GROUP = "managers"
"""Consumer group of the managers on ``EVENTS``: an entry is acknowledged after its DB commit."""
EVENTS_MAXLEN = 100_000
"""Approximate cap of ``EVENTS`` (acknowledged entries beyond it are trimmed)."""

WORKERS = f"{PREFIX}:workers"
"""Set of every worker id that ever registered (offline ones included)."""


def queue(worker_id: str) -> str:
    """The ARQ queue of one worker: the manager places a trial by enqueuing it here."""
    return f"{PREFIX}:queue:{worker_id}"


def worker_info(worker_id: str) -> str:
    """String key: the worker's ``WorkerInfo`` as JSON (set at registration, no expiry)."""
    return f"{PREFIX}:worker:{worker_id}:info"


def heartbeat(worker_id: str) -> str:
    """String key: the worker's last ``Heartbeat`` as JSON; expires after three missed beats."""
    return f"{PREFIX}:worker:{worker_id}:heartbeat"


def gpu_history(worker_id: str) -> str:
    """List key: the worker's recent ``GpuSample`` JSON entries, newest first (capped)."""
    return f"{PREFIX}:worker:{worker_id}:gpu"


def worker_logs(worker_id: str) -> str:
    """Stream key: the worker's last log records (capped; expires after a silence)."""
    return f"{PREFIX}:logs:{worker_id}"


def worker_logs_live(worker_id: str) -> str:
    """Pub/sub channel: the worker's log records as they are shipped (live views only)."""
    return f"{PREFIX}:logs-live:{worker_id}"


def study_live(study_id: int) -> str:
    """Pub/sub channel: a study's trial changes, published by the manager after each commit."""
    return f"{PREFIX}:study:{study_id}:live"


def worker_alias(worker_id: str) -> str:
    """String key: the alias a user gave the worker (UI/API); it wins over the worker's own
    ``--name`` and outlives re-registration (no expiry)."""
    return f"{PREFIX}:worker:{worker_id}:alias"


WORKERS_SEEN = f"{PREFIX}:workers:seen"
"""Sorted set: worker id → Unix time (s) of its last heartbeat (kept when the worker is offline)."""

# ---- ARQ's own keys (fixed by arq 0.28, arq/constants.py; listed here so every name is in one
# place: tests check they match arq's constants) ------------------------------------------------

ARQ_ABORT = "arq:abort"
"""Sorted set: job id → time an abort was asked (every ARQ worker polls it)."""


def arq_job(job_id: str) -> str:
    """String key: the serialized (JSON) ARQ job; deleted when the job finishes."""
    return f"arq:job:{job_id}"


def arq_in_progress(job_id: str) -> str:
    """String key: set while an ARQ worker runs the job."""
    return f"arq:in-progress:{job_id}"


def arq_result(job_id: str) -> str:
    """String key: the ARQ result of a finished job (kept for the worker's keep_result)."""
    return f"arq:result:{job_id}"
