"""The servetune error tree; adapters translate foreign errors into it (``raise … from e``).

ServetuneError
├── SpecInvalid          a spec with problems (each names the field and the fix)
├── StudyNotFound        no study with that id or name
├── StudyExists          a study with that name is already stored
├── StoreError           the database failed (SQLAlchemy errors, translated)
├── StudyBusy            another live process holds the study's lease
├── PathOutside          a path built from a name would leave its directory
├── EngineError          the engine could not be prepared or launched
│   └── EngineNotFound   the binary/wheel for the engine is missing
├── DeploymentError      a deployment could not start or stop an engine
│   └── EngineStartFailed   carries the FailureKind and the reason
├── BenchmarkError       the benchmark could not run at all (not a failed request)
├── RedisUnavailable     Redis cannot be reached, refused the password or failed a command
├── PayloadRefused       a queue payload that is not JSON (a pickle?) was refused unread
├── WorkerNotFound       no worker with that id is registered
├── SlotNotFound         no worker slot with that id or name
├── SlotExists           a worker slot with that name is already saved
├── SlotBusy             a deploy or restore of that slot is already running
└── DeployFailed         a deploy/restore step failed: category, suggestion, logs
"""

from __future__ import annotations

from servetune.core.spec import Problem
from servetune.core.study import FailureKind
from servetune.remote.models import Category


class ServetuneError(Exception):
    """Base of every error servetune raises on purpose."""


class SpecInvalid(ServetuneError):
    """A spec (or another input: ``subject`` names it) with problems; ``problems`` holds every
    one, each with field path and fix."""

    def __init__(self, problems: list[Problem], subject: str = "spec") -> None:
        self.problems = problems
        self.subject = subject
        super().__init__("\n".join(str(p) for p in problems))


class StudyNotFound(ServetuneError):
    """No study with the given id or name."""


class StudyExists(ServetuneError):
    """A study with that name is already stored; the message says how to resume it."""


class StoreError(ServetuneError):
    """The database failed; the message says what was being done."""


class StudyBusy(ServetuneError):
    """Another live process holds the study's lease; the message names its host, pid and expiry."""


class StudyNotResumable(ServetuneError):
    """The study's status forbids the request: cancelling a study that is not running, or
    resuming one that already finished. Nothing was written; the message says why."""


def check_resumable(name: str, status: str) -> None:
    """Raise StudyNotResumable when a study named ``name`` with ``status`` cannot be resumed
    (it finished: its verdict is final, so a resume would only rewrite it)."""
    if status == "finished":
        raise StudyNotResumable(f"study {name} already finished; nothing to resume")


class WorkerAliasTaken(ServetuneError):
    """Another known worker already has the alias asked for; the message names it."""


class PathOutside(ServetuneError):
    """A path built from a name (study name, file name) would leave the directory it belongs in."""


class EngineError(ServetuneError):
    """The engine could not be prepared or launched."""


class EngineNotFound(EngineError):
    """The engine's binary or wheel is missing; the message says how to install it."""


class DeploymentError(ServetuneError):
    """A deployment could not start or stop an engine."""


class EngineStartFailed(DeploymentError):
    """The engine did not become ready: ``kind`` says why, ``reason`` gives the evidence."""

    def __init__(self, kind: FailureKind, reason: str) -> None:
        self.kind = kind
        self.reason = reason
        super().__init__(f"{kind.value}: {reason}")


class BenchmarkError(ServetuneError):
    """The benchmark could not run at all (e.g. the prompts could not be built)."""


class RedisUnavailable(ServetuneError):
    """Redis cannot be reached, refused the password, or failed a command.

    The message names the URL with its password masked (``safe_url``) and how to fix it.
    """


class PayloadRefused(ServetuneError):
    """A queue payload that is not a JSON object (a pickle, say) was refused without being read."""


class WorkerNotFound(ServetuneError):
    """No worker with that id is registered in Redis."""


class SlotNotFound(ServetuneError):
    """No worker slot with that id or name."""


class SlotExists(ServetuneError):
    """A worker slot with that name is already saved; the message says how to change it."""


class SlotBusy(ServetuneError):
    """A deploy or restore of that slot is running now; the message says to wait for it."""


class DeployFailed(ServetuneError):
    """A deploy or restore step failed.

    ``category`` is the stable code (``remote.models.Category``), ``suggestion`` one line on how
    to fix it, specific to what was found, ``logs`` the tail of the failing command's output
    (secrets removed), ``step`` the step that failed.
    """

    def __init__(
        self,
        category: Category,
        message: str,
        suggestion: str,
        *,
        step: str = "",
        logs: list[str] | None = None,
    ) -> None:
        self.category = category
        self.suggestion = suggestion
        self.step = step
        self.logs = list(logs or [])
        super().__init__(message)
