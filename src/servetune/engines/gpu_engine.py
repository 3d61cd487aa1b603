"""What the vLLM and SGLang Engine adapters share: flag checks, GPU facts, config.json reading.

Each engine package (engines/vllm, engines/sglang) subclasses ``GpuEngine`` and supplies its
flag rules, launch command, pre-flight rules and log classifier.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path

from servetune.core.feasibility import Direction
from servetune.core.space import SearchSpace
from servetune.core.spec import Problem, SglangEngineSpec, StudySpec, VllmEngineSpec, Workload
from servetune.core.study import FailureKind, Params, ParamValue, TrialNeeds
from servetune.engines.base import Endpoint, FlagInfo, LaunchCommand
from servetune.engines.flagcheck import FlagRules, check_flags, check_space
from servetune.engines.hardware import (
    GpuFacts,
    ModelConfigError,
    ModelFacts,
    config_path,
    probe_gpus,
    read_model_config,
)
from servetune.engines.logclassify import Classification

logger = logging.getLogger(__name__)


class GpuEngine:
    """Shared half of a GPU engine adapter (see engines/base.py for the Engine protocol).

    ``gpu_probe`` finds the host's GPUs when the spec has no ``engine.gpus`` (tests pass their
    own). Subclasses set ``kind``, ``label``, ``rules`` and implement ``launch_command``,
    ``_preflight`` and ``classify``.
    """

    kind: str
    label: str
    health_path = "/health"

    def __init__(
        self,
        spec: VllmEngineSpec | SglangEngineSpec,
        *,
        gpu_probe: Callable[[], GpuFacts] = probe_gpus,
    ) -> None:
        self.spec = spec
        self._gpu_probe = gpu_probe
        self._gpus: GpuFacts | None = None
        self._model: ModelFacts | None = None
        self._model_read = False

    # ---- subclass hooks ---------------------------------------------------------------------

    @property
    def rules(self) -> FlagRules:
        """Flag names, aliases, ranges of this engine (and version)."""
        raise NotImplementedError

    def defaults(self) -> dict[str, ParamValue | None]:
        """Catalogue defaults by flag name."""
        return {n: f.default for n, f in self.rules.catalogue.items()}

    def classify(self, log_text: str, returncode: int | None) -> Classification:
        """Kind, evidence and directions for a failed start (engine-specific rules)."""
        raise NotImplementedError

    def _preflight(
        self,
        flags: Mapping[str, ParamValue | None],
        workload: Workload,
        gpus: GpuFacts,
        model: ModelFacts | None,
    ) -> list[str]:
        raise NotImplementedError

    def _gpus_used(self, flags: Mapping[str, ParamValue | None]) -> int:
        """GPUs one server with these effective flags occupies (from its parallel sizes)."""
        raise NotImplementedError

    # ---- facts --------------------------------------------------------------------------------

    def gpus(self) -> GpuFacts:
        """``engine.gpus`` from the spec, else the host's GPUs (probed once)."""
        if self._gpus is None:
            g = self.spec.gpus
            self._gpus = (
                GpuFacts(g.count, g.memory_gib, "engine.gpus")
                if g is not None
                else self._gpu_probe()
            )
        return self._gpus

    def model_facts(self) -> ModelFacts | None:
        """The model's config.json facts (read once); None when no local config.json is known
        or it cannot be read (``check_engine`` reports the latter)."""
        if not self._model_read:
            self._model_read = True
            path = config_path(self.spec.model, self.spec.config_json)
            if path is not None:
                try:
                    self._model = read_model_config(path)
                except ModelConfigError as e:
                    logger.debug("no model facts: %s", e)
        return self._model

    # ---- Engine protocol ---------------------------------------------------------------------

    def flag_catalogue(self) -> Mapping[str, FlagInfo]:
        """Known flags by name (no dashes), with defaults and the source version."""
        return self.rules.catalogue

    def endpoint(self, host: str, port: int) -> Endpoint:
        """``http://host:port`` (IPv6 bracketed) and ``engine.served_model_name``."""
        h = f"[{host}]" if ":" in host and not host.startswith("[") else host
        return Endpoint(base_url=f"http://{h}:{port}", model=self.spec.served_model_name)

    def effective_flags(self, params: Params) -> dict[str, ParamValue | None]:
        """Catalogue defaults < engine.flags < params, names resolved through aliases."""
        merged = self.defaults()
        for source in (self.spec.flags, params):
            for name, value in source.items():
                merged[self.rules.aliases.get(name, name)] = value
        return merged

    def preflight(self, params: Params, workload: Workload) -> list[str]:
        """Reasons ``params`` cannot run on these GPUs with this model (empty = launch)."""
        return self._preflight(
            self.effective_flags(params), workload, self.gpus(), self.model_facts()
        )

    def check_space(self, space: SearchSpace) -> list[Problem]:
        """Unknown flags (with "did you mean"), param kinds and ranges the engine rejects."""
        return check_space(self.rules, space)

    def check_engine(self) -> list[Problem]:
        """Fixed flags, and the model's config.json when one is named or the model is a folder."""
        problems = check_flags(self.rules, self.spec.flags)
        path = config_path(self.spec.model, self.spec.config_json)
        loc = "engine.config_json" if self.spec.config_json is not None else "engine.model"
        if path is not None:
            try:
                read_model_config(path)
            except ModelConfigError as e:
                problems.append(
                    Problem(
                        loc,
                        f"{e}; point engine.config_json to the model's config.json (or the "
                        "folder holding it) so pre-flight can check heads and memory",
                    )
                )
        return problems

    def check_spec(self, spec: StudySpec) -> list[Problem]:
        """``check_space(spec.space) + check_engine()``."""
        return self.check_space(spec.space) + self.check_engine()

    def launch_command(self, params: Params, *, host: str, port: int) -> LaunchCommand:
        """The engine's own argv (each subclass builds it from its launch module)."""
        raise NotImplementedError

    def classify_failure(
        self, log_text: str, returncode: int | None, params: Params | None = None
    ) -> tuple[FailureKind, str]:
        """(kind, reason) from ``classify`` (the Engine protocol's shape); the directions in the
        reason come from the log, so ``params`` is not needed to keep them from repeating it."""
        c = self.classify(log_text, returncode)
        return c.kind, c.reason

    def needs(self, params: Params, workload: Workload) -> TrialNeeds:
        """What one trial of ``params`` occupies: the GPUs its parallel sizes use (``_gpus_used``
        over catalogue defaults < engine.flags < params) and one CPU thread (the host side of
        a GPU server is not counted). ``workload`` does not change it."""
        return TrialNeeds(cpu_threads=1, gpus=self._gpus_used(self.effective_flags(params)))

    def effective_params(self, params: Params, workload: Workload) -> Params:
        """Every flag the engine runs with (catalogue defaults < engine.flags < params, aliases
        resolved, unset flags left out), so two spellings of one configuration compare equal."""
        return {k: v for k, v in self.effective_flags(params).items() if v is not None}

    def user_command(
        self, params: Params, *, host: str = "127.0.0.1", port: int = 8000
    ) -> LaunchCommand:
        """The launch command itself: ``vllm serve …`` / ``python -m sglang.launch_server …`` is
        what users run (no stand-in is involved for GPU engines)."""
        return self.launch_command(params, host=host, port=port)

    def failure_directions(self, kind: FailureKind, reason: str) -> tuple[Direction, ...]:
        """Which flags a stored failure says to move: the classifier re-read over its own
        reason (which starts with the evidence line); empty when the kind differs."""
        c = self.classify(reason, 1)
        return c.directions if c.kind is kind else ()

    def host_problems(self) -> list[str]:
        """Why this host (or ``engine.gpus``) cannot run the engine at all: no GPU (empty = ok)."""
        from servetune.engines.gpu_preflight import needs_gpus

        return needs_gpus(self.label.split()[0], self.gpus())

    def config_file(self) -> Path | None:
        """Where config.json is looked for (None when the model is a hub id and none is named)."""
        return config_path(self.spec.model, self.spec.config_json)
