"""The Engine protocol every adapter (llama.cpp, vLLM, SGLang) implements, and its value types.

An Engine is pure: it builds commands and reads logs; it never starts a process itself.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from servetune.core.space import SearchSpace
from servetune.core.spec import Problem, StudySpec, Workload
from servetune.core.study import FailureKind, Params, ParamValue, TrialNeeds


@dataclass(frozen=True)
class LaunchCommand:
    """What to execute for one trial: ``argv`` (never a shell string), extra ``env``, and where it listens."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 0

    def display(self) -> str:
        """The command as a shell line a user can paste (quoted with ``shlex.join``); values of
        secret-looking variables (``*TOKEN*``, ``*SECRET*``, ``*PASSWORD*``, ``*KEY``) are
        shown as ``***`` so logs and dry runs never carry them."""
        env = " ".join(
            f"{k}={shlex.quote('***' if _SECRET.search(k) else v)}"
            for k, v in sorted(self.env.items())
        )
        return f"{env} {shlex.join(self.argv)}".strip()


_SECRET = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|_KEY$|^KEY$|API_KEY", re.IGNORECASE)
"""Environment variable names whose values ``LaunchCommand.display`` hides."""


@dataclass(frozen=True)
class FlagInfo:
    """One entry of an engine's flag catalogue.

    ``type`` is the value type the flag takes; ``default`` is the engine's own default (None when
    it depends on the machine or is unset); ``source`` names where the fact comes from.
    """

    name: str
    type: Literal["int", "float", "str", "bool"]
    default: ParamValue | None
    meaning: str
    source: str
    choices: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible server: base URL (``http://127.0.0.1:8080``) and the served model name."""

    base_url: str
    model: str


class Engine(Protocol):
    """An inference engine adapter.

    ``launch_command`` is pure and deterministic; ``preflight`` rejects params that cannot work
    before any launch; ``classify_failure`` maps a start-up log and exit code to a FailureKind.
    """

    kind: str
    health_path: str

    def flag_catalogue(self) -> Mapping[str, FlagInfo]:
        """Known flags by name (CLI name without dashes)."""
        ...

    def launch_command(self, params: Params, *, host: str, port: int) -> LaunchCommand:
        """The command that serves the model with ``params`` (plus the spec's fixed flags) on host:port."""
        ...

    def preflight(self, params: Params, workload: Workload) -> list[str]:
        """Reasons ``params`` cannot serve ``workload`` (empty = fine to launch)."""
        ...

    def effective_params(self, params: Params, workload: Workload) -> Params:
        """The canonical form of ``params``: every flag the engine will run with, equivalent
        spellings made equal (e.g. llama.cpp's parallel -1 and 4 with a unified KV cache), so
        two params the engine runs identically compare equal and are measured once."""
        ...

    def needs(self, params: Params, workload: Workload) -> TrialNeeds:
        """What one trial of ``params`` occupies on its host while it runs: CPU threads
        (llama.cpp: its thread count) and GPUs (vLLM/SGLang: their parallel sizes); the loop's
        ``TrialSlots`` and a manager's placement only start it where these fit."""
        ...

    def check_space(self, space: SearchSpace) -> list[Problem]:
        """Problems of the search space only this engine can see: unknown flag names (with
        suggestions), wrong kinds/values; usable when the rest of the spec is invalid."""
        ...

    def check_spec(self, spec: StudySpec) -> list[Problem]:
        """Problems of the spec only this engine can see (unknown flags, wrong types, missing model).

        ``check_space(spec.space) + check_engine()`` plus whatever needs the whole spec.
        """
        ...

    def check_engine(self) -> list[Problem]:
        """Problems of the engine section alone (model file, binary, fixed flags)."""
        ...

    def classify_failure(
        self, log_text: str, returncode: int | None, params: Params | None = None
    ) -> tuple[FailureKind, str]:
        """Why the engine failed, from its log and exit code: (kind, one readable line of
        evidence). Only error lines and the exit status are evidence, never warnings; advice in
        the reason never recommends what ``params`` (the failing trial's) already set."""
        ...

    def user_command(
        self, params: Params, *, host: str = "127.0.0.1", port: int = 8080
    ) -> LaunchCommand:
        """The command a user runs to serve the model with ``params`` (plus the spec's fixed
        flags) on their own install of the engine (e.g. ``llama-server …``), never a test
        stand-in; every flag in it exists in the engine's own current argument list."""
        ...

    def endpoint(self, host: str, port: int) -> Endpoint:
        """Where the launched server answers."""
        ...
