"""The Deployment protocol: start a LaunchCommand somewhere, hand back a handle to stop it.

One small protocol per side effect; each implementation translates its own errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from servetune.engines.base import LaunchCommand


class RunningEngine(Protocol):
    """A started engine process (or pod): poll it, read its log, stop it."""

    @property
    def pid(self) -> int | None:
        """Process id of the engine (None where there is no local process)."""
        ...

    @property
    def pgid(self) -> int | None:
        """Process group to kill on cleanup (None where there is none)."""
        ...

    @property
    def log_path(self) -> Path:
        """File holding the engine's output."""
        ...

    def returncode(self) -> int | None:
        """Exit status once it exited, else None."""
        ...

    def log_text(self, max_bytes: int = 200_000) -> str:
        """The last ``max_bytes`` of its output (stdout and stderr together)."""
        ...

    async def stop(self) -> int | None:
        """Stop it and everything it started (SIGTERM, then SIGKILL after the grace); return the exit status."""
        ...


class Deployment(Protocol):
    """Somewhere engines run."""

    def reserve_port(self) -> tuple[str, int]:
        """(host, port) the next engine should bind to."""
        ...

    async def start(self, command: LaunchCommand, log_path: Path) -> RunningEngine:
        """Launch ``command``; output goes to ``log_path``. Raises DeploymentError if it cannot be spawned."""
        ...
