"""StudySpec: what a user writes (YAML/JSON) to describe one tuning study, and its parts.

Every field has a description, so ``servetune schema`` emits a documented JSON Schema.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PositiveInt,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from servetune.core.metrics import DEFAULT_MAX_OUTSIDE_CPU_FRACTION, LoadLevel
from servetune.core.scoring import Objective, ObjectiveTerm
from servetune.core.slo import Slo
from servetune.core.space import (
    MAX_GRID_POINTS,
    FiniteParamValue,
    SearchSpace,
)

# ---- bounds of every size a spec can ask for (each error names its bound) -----------------
MAX_CONCURRENCY = 10_000
"""Requests in flight per level: each holds an open connection and a task in one client process
(Linux's default open-file limit is 1,024 soft / 524,288 hard; 10,000 streams fit in memory)."""
MAX_REQUEST_RATE_PER_S = 10_000.0
"""Poisson arrivals per second: several times what one client process can send (bench/)."""
MAX_LEVELS = 32
"""Load levels per workload."""
MAX_REQUESTS = 1_000_000
"""Measured requests per level: every request's record is kept in memory (about 1 KB each)."""
MAX_DURATION_S = 86_400.0
"""Measurement time per level: one day."""
MAX_TOKENS = 1_048_576
"""Prompt or output tokens per request: 2^20, the largest context of current open models."""
MAX_TIMEOUT_S = 86_400.0
"""Any timeout (request, start-up, stop): one day."""
MAX_TRIALS = 10_000
"""Trials per study (search budget)."""
MAX_PARALLEL = 256
"""Trials in flight at once (``budget.parallel``)."""
MAX_WALL_TIME_S = 30 * 86_400.0
"""Wall-time budget: thirty days."""
MAX_SLO_MS = 86_400_000.0
"""An SLO bound: one day in milliseconds."""
SEED_BOUND = 2**63
"""Seeds lie in [−2^63, 2^63): they are stored as 64-bit integers."""
_Seed = Annotated[int, Field(ge=-SEED_BOUND, lt=SEED_BOUND)]


def _finite(bound: float) -> BeforeValidator:
    """Refuse NaN and ±inf before the range check, naming the bound in the message."""

    def check(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"must be a finite number ≤ {bound:,g}, not {v}")
        return v

    return BeforeValidator(check)


_TimeoutS = Annotated[float, _finite(MAX_TIMEOUT_S), Field(gt=0, le=MAX_TIMEOUT_S)]
_WallTimeS = Annotated[float, _finite(MAX_WALL_TIME_S), Field(gt=0, le=MAX_WALL_TIME_S)]
_DurationS = Annotated[float, _finite(MAX_DURATION_S), Field(gt=0, le=MAX_DURATION_S)]
_RatePerS = Annotated[
    float, _finite(MAX_REQUEST_RATE_PER_S), Field(gt=0, le=MAX_REQUEST_RATE_PER_S)
]


def _objective_forms(v: Any) -> Any:
    """Accept one term, a list of terms, or {terms: [...]} for ``StudySpec.objective``."""
    if isinstance(v, list):
        return {"terms": v}
    if isinstance(v, dict) and "terms" not in v:
        return {"terms": [v]}
    return v


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")

STUDY_NAME_RULE = (
    "1-200 letters, digits, '.', '_' or '-', starting with a letter or digit, not digits only "
    "(it names files and reads as a study id otherwise), e.g. 'llama-8b-h100'"
)
"""The study name rule in words, for error messages (``check_study_name`` enforces it)."""


def check_study_name(name: str) -> str:
    """Return ``name`` when it is a valid study name, else raise ValueError saying the rule.

    The one rule for study names wherever they come from (spec ``name:``, ``run --name``, the
    API): 1-200 characters of ``[A-Za-z0-9._-]`` starting with a letter or digit (so no path
    separator, no ``..`` component, nothing absolute: a name is safe as a file name), and not
    digits only (``servetune resume 24`` means the study with id 24).
    """
    if not _NAME.fullmatch(name):
        raise ValueError(f"study name {name!r} is not allowed: use {STUDY_NAME_RULE}")
    if name.isdigit():
        raise ValueError(
            f"study name {name!r} is digits only and would read as a study id; add a letter, "
            "e.g. 'run-24'"
        )
    return name


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LlamaCppEngineSpec(_Model):
    """llama.cpp's HTTP server: the ``llama-server`` binary when there is one, else the xllamacpp wheel."""

    kind: Literal["llamacpp"] = Field(description="Engine kind.")
    model: str = Field(description="Path to the GGUF model file.")
    tokenizer: str | None = Field(
        default=None,
        description="Hugging Face tokenizer directory or tokenizer.json used to build prompts; "
        "null = ask the server's /tokenize endpoint.",
    )
    binary: str | None = Field(
        default=None,
        description="'xllamacpp' to use the embedded wheel, a path to llama-server, or null = "
        "llama-server from PATH if present, else the wheel.",
    )
    flags: dict[str, FiniteParamValue] = Field(
        default_factory=dict,
        description="Fixed flags passed to every trial (engine CLI names, no dashes), e.g. {n-gpu-layers: 0}.",
    )
    served_model_name: str = Field(
        default="servetune", description="Model name the server reports (--alias)."
    )


class GpuSpec(_Model):
    """The GPUs each trial gets, for pre-flight checks and dry runs (instead of probing the host)."""

    count: PositiveInt = Field(description="GPUs a trial may use, e.g. 8.")
    memory_gib: float = Field(gt=0, description="Total memory of each GPU in GiB, e.g. 80.")


class _GpuEngineSpec(_Model):
    """Fields vLLM and SGLang share: a Hugging Face model, its config.json, fixed flags, GPUs."""

    model: str = Field(
        description="Hugging Face model id or local model folder (passed to the engine as is)."
    )
    config_json: str | None = Field(
        default=None,
        description="Local path to the model's config.json (or a folder holding it) for "
        "pre-flight checks; null = MODEL/config.json when model is a local folder.",
    )
    tokenizer: str | None = Field(
        default=None,
        description="Hugging Face tokenizer directory or tokenizer.json used to build prompts; "
        "null = ask the server's /tokenize endpoint.",
    )
    flags: dict[str, FiniteParamValue] = Field(
        default_factory=dict,
        description="Fixed flags passed to every trial (engine CLI names, no dashes).",
    )
    served_model_name: str = Field(
        default="servetune", description="Model name the server reports (--served-model-name)."
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Extra environment for the engine process, e.g. {CUDA_VISIBLE_DEVICES: '0,1'}.",
    )
    gpus: GpuSpec | None = Field(
        default=None,
        description="GPUs each trial gets; null = probe this host with nvidia-smi.",
    )


class VllmEngineSpec(_GpuEngineSpec):
    """vLLM's OpenAI-compatible server, started as ``vllm serve MODEL``."""

    kind: Literal["vllm"] = Field(description="Engine kind.")
    executable: str = Field(
        default="vllm", description="The `vllm` entry point: a name on PATH or a path."
    )


class SglangEngineSpec(_GpuEngineSpec):
    """SGLang's server, started as ``python -m sglang.launch_server --model-path MODEL``."""

    kind: Literal["sglang"] = Field(description="Engine kind.")
    python: str = Field(
        default="python3", description="Python interpreter that has sglang installed."
    )
    version: str | None = Field(
        default=None,
        description="SGLang release (e.g. '0.5.3'); flags renamed between releases are judged "
        "by it; null = the release servetune's catalogue was read from.",
    )


EngineSpec = Annotated[
    LlamaCppEngineSpec | VllmEngineSpec | SglangEngineSpec,
    Field(discriminator="kind", description="The engine; chosen by `kind`."),
]


class _DeploymentBase(_Model):
    """What every deployment shares: the benchmark client always runs on this host."""

    max_outside_cpu_fraction: float = Field(
        default=DEFAULT_MAX_OUTSIDE_CPU_FRACTION,
        ge=0,
        le=1,
        description="Share of all CPU cores other processes may use while a trial is measured; "
        "above it the trial is flagged (outside_load) and re-run once (1 = never).",
    )


class LocalDeploymentSpec(_DeploymentBase):
    """Run each trial's engine as a local process group on a free port."""

    kind: Literal["local"] = Field(default="local", description="Deployment kind.")
    host: str = Field(default="127.0.0.1", description="Address the engine binds to.")
    startup_timeout_s: _TimeoutS = Field(
        default=120.0, description="Launch → ready limit, s (≤ 86,400)."
    )
    stop_timeout_s: _TimeoutS = Field(
        default=10.0, description="SIGTERM → SIGKILL grace, s (≤ 86,400)."
    )
    log_dir: str | None = Field(
        default=None, description="Where trial logs go; null = the data directory."
    )


class DockerDeploymentSpec(_DeploymentBase):
    """Run each trial's engine in its own Docker container (host networking, model mounted read-only)."""

    kind: Literal["docker"] = Field(description="Deployment kind.")
    image: str = Field(
        min_length=1,
        description="Engine image; its tag pins the engine version, e.g. vllm/vllm-openai:v0.11.0.",
    )
    entrypoint: list[str] | None = Field(
        default=None,
        description="Program (and leading arguments) that starts the server inside the image, in "
        "place of the host-side server program of the launch command, e.g. ['/app/llama-server'] "
        "for ghcr.io/ggml-org/llama.cpp:server; null = the launch command unchanged.",
    )
    pull: Literal["missing", "never"] = Field(
        default="missing", description="Pull the image when it is not on the Docker host, or never."
    )
    gpu_ids: list[str] = Field(
        default_factory=list,
        description="GPU device ids (e.g. ['0', '1']) every trial's container gets through a "
        "device request; empty = no GPU.",
    )
    shm_size_gib: Annotated[float, _finite(1024.0)] = Field(
        default=16.0, gt=0, le=1024.0, description="Shared memory (/dev/shm) of the container, GiB."
    )
    model_dir: str | None = Field(
        default=None,
        description="Host directory mounted read-only at the same path in the container; null = "
        "the directory holding engine.model.",
    )
    hf_token_env: str | None = Field(
        default="HF_TOKEN",
        description="Name of the environment variable of this process whose value is passed to "
        "the container as HF_TOKEN (the token itself never goes in the spec or a log); null = none.",
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="Extra environment variables of the container."
    )
    docker_host: str | None = Field(
        default=None,
        description="Docker daemon URL, e.g. unix:///var/run/docker.sock; null = DOCKER_HOST or "
        "the default socket.",
    )
    host: str = Field(
        default="127.0.0.1", description="Address the engine binds to (host network)."
    )
    startup_timeout_s: _TimeoutS = Field(default=600.0, description="Launch → ready limit, s.")
    stop_timeout_s: _TimeoutS = Field(default=30.0, description="SIGTERM → SIGKILL grace, s.")
    log_dir: str | None = Field(
        default=None, description="Where trial logs go; null = the data directory."
    )

    @model_validator(mode="before")
    @classmethod
    def _no_token_in_spec(cls, data: Any) -> Any:
        """The spec is stored with the study: a token written in it would be kept and shown."""
        if isinstance(data, dict) and {"hf_token", "token"} & set(data):
            raise ValueError(
                "never put a token in the spec (it is stored with the study); export it, e.g. "
                "HF_TOKEN=..., and name the variable in hf_token_env"
            )
        return data

    @field_validator("gpu_ids", mode="before")
    @classmethod
    def _gpu_ids(cls, v: Any) -> Any:
        """YAML reads ``[0, 1]`` as integers; device ids are strings (indexes or UUIDs)."""
        if isinstance(v, list):
            return [str(x) if isinstance(x, int) and not isinstance(x, bool) else x for x in v]
        return v


_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN = r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?"
"""Kubernetes names (RFC 1123 label: namespaces; subdomain: cluster-scoped objects), as the API
server checks them."""


class KubernetesDeploymentSpec(_DeploymentBase):
    """Run each trial as an OME InferenceService on Kubernetes (ome.io/v1beta1)."""

    kind: Literal["kubernetes"] = Field(description="Deployment kind.")
    namespace: str = Field(
        default="default", description="Namespace of the InferenceServices (a Kubernetes name)."
    )
    runtime: str = Field(description="ClusterServingRuntime name the InferenceServices use.")
    base_model: str = Field(description="ClusterBaseModel name the InferenceServices serve.")
    image: str | None = Field(
        default=None,
        description="Engine image of the trial's container; null = the runtime's image.",
    )
    entrypoint: list[str] | None = Field(
        default=None,
        description="Container command in place of the host-side server program of the launch "
        "command (the trial's flags become the container args); null = the launch command's program.",
    )
    model_path: str = Field(
        default="$(MODEL_PATH)",
        description="What engine.model becomes in the container args (OME mounts the base model "
        "and sets MODEL_PATH).",
    )
    container_port: int = Field(default=8080, gt=0, lt=65536, description="Engine port in the pod.")
    gpus_per_trial: int = Field(
        default=1, ge=0, le=1024, description="nvidia.com/gpu requested (and limited) per trial."
    )
    create_runtime: bool = Field(
        default=False,
        description="Also create the ClusterServingRuntime (needs image) instead of using an existing one.",
    )
    create_base_model: bool = Field(
        default=False,
        description="Also create the ClusterBaseModel from model_storage_uri.",
    )
    model_storage_uri: str | None = Field(
        default=None,
        description="Where OME downloads the base model from, e.g. hf://meta-llama/Llama-3.2-1B-Instruct.",
    )
    endpoint_url: str | None = Field(
        default=None,
        description="Base URL servetune benchmarks, with {name} and {namespace} placeholders; "
        "null = the InferenceService's status.url.",
    )
    kubeconfig: str | None = Field(
        default=None, description="Kubeconfig path; null = in-cluster config, else ~/.kube/config."
    )
    context: str | None = Field(default=None, description="Kubeconfig context; null = current.")
    startup_timeout_s: _TimeoutS = Field(default=1800.0, description="Apply → ready limit, s.")
    stop_timeout_s: _TimeoutS = Field(default=120.0, description="Delete → gone limit, s.")
    log_dir: str | None = Field(
        default=None, description="Where trial logs go; null = the data directory."
    )

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str) -> str:
        """The API server would refuse anything else, after the study started."""
        if len(v) > 63 or not re.fullmatch(_DNS_LABEL, v):
            raise ValueError(
                f"{v!r} is not a Kubernetes namespace; use at most 63 lowercase letters, digits "
                "and '-', starting and ending with a letter or digit, e.g. 'llm-tuning'"
            )
        return v

    @field_validator("runtime", "base_model")
    @classmethod
    def _object_name(cls, v: str) -> str:
        """Names of cluster-scoped OME objects (DNS subdomains)."""
        if len(v) > 253 or not re.fullmatch(_DNS_SUBDOMAIN, v):
            raise ValueError(
                f"{v!r} is not a Kubernetes object name; use lowercase letters, digits, '-' and "
                "'.', starting and ending with a letter or digit, e.g. 'llama-3.2-1b'"
            )
        return v

    @model_validator(mode="after")
    def _creatable(self) -> KubernetesDeploymentSpec:
        if self.create_runtime and not self.image:
            raise ValueError("create_runtime needs `image` (the engine image of the runtime)")
        if self.create_base_model and not self.model_storage_uri:
            raise ValueError(
                "create_base_model needs `model_storage_uri`, e.g. hf://meta-llama/Llama-3.2-1B"
            )
        return self


def _local_by_default(v: Any) -> Any:
    """A deployment mapping without `kind` is a local one (as before docker and kubernetes)."""
    if isinstance(v, dict) and "kind" not in v:
        return {**v, "kind": "local"}
    return v


DeploymentSpec = Annotated[
    LocalDeploymentSpec | DockerDeploymentSpec | KubernetesDeploymentSpec,
    BeforeValidator(_local_by_default),
    Field(discriminator="kind", description="Where engines run; chosen by `kind` (default local)."),
]


class StrategySpec(_Model):
    """How the next params are chosen (Optuna samplers through ask/tell, or a plain grid)."""

    kind: Literal["grid", "random", "tpe", "gp", "nsga2"] = Field(
        default="tpe", description="Strategy."
    )
    seed: _Seed = Field(default=0, description="Random seed; same seed, same proposals.")
    n_startup_trials: Annotated[int, Field(ge=1, le=MAX_TRIALS)] | None = Field(
        default=None,
        description="Random trials before the model kicks in (tpe/gp); null = Optuna's default.",
    )


class Budget(_Model):
    """When the search stops (whichever comes first)."""

    max_trials: PositiveInt = Field(
        default=20,
        le=MAX_TRIALS,
        description="Trials, the baseline included, repeats excluded (≤ 10,000).",
    )
    max_wall_time_s: _WallTimeS | None = Field(
        default=None, description="Wall-time limit of the search, s (≤ 30 days)."
    )
    baseline_repeats: int = Field(
        default=2,
        ge=1,
        le=10,
        description="Runs of the engine defaults, each on a fresh server, before the search "
        "starts (the first is the baseline trial, the others its repeats): their spread is the "
        "run-to-run noise, and search results within it count as ties. 1 = no early repeat.",
    )
    confirm_top_k: int = Field(
        default=3,
        ge=1,
        le=10,
        description="Best candidates (distinct configurations) re-run on fresh servers after "
        "the search; the recommendation comes from these repeats.",
    )
    confirm_repeats: int = Field(
        default=1,
        ge=0,
        le=5,
        description="Fresh re-runs of each of the top candidates and of the baseline after the "
        "search, before the verdict (0 = none).",
    )
    parallel: int = Field(
        default=1,
        ge=1,
        le=MAX_PARALLEL,
        description="Trials in flight at once (≤ 256). Locally they share this host (each "
        "engine's CPU threads must fit its cores); through a manager they are spread over the "
        "workers where each fits.",
    )

    def planned_trials(self) -> int:
        """Trials a study runs at most: ``max_trials`` + the early baseline repeats + the confirm
        repeats of the baseline and of up to ``confirm_top_k`` candidates."""
        return (
            self.max_trials
            + (self.baseline_repeats - 1)
            + self.confirm_repeats * (self.confirm_top_k + 1)
        )


class Workload(_Model):
    """The request pattern of each benchmark: fixed-length synthetic prompts at one or more load levels."""

    api: Literal["completions", "chat"] = Field(
        default="completions", description="/v1/completions or /v1/chat/completions."
    )
    input_tokens: PositiveInt = Field(
        default=128,
        le=MAX_TOKENS,
        description="Prompt length in tokens (model's tokenizer), ≤ 1,048,576.",
    )
    output_tokens: PositiveInt = Field(
        default=64,
        le=MAX_TOKENS,
        description="Generated tokens per request (max_tokens + ignore_eos), ≤ 1,048,576. "
        "TPOT and ITL need at least 2.",
    )
    concurrency: list[Annotated[int, Field(ge=1, le=MAX_CONCURRENCY)]] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_LEVELS,
        description="Concurrency levels (requests in flight, each ≤ 10,000), measured in order.",
    )
    request_rates_per_s: list[_RatePerS] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_LEVELS,
        description="Poisson request rates per second (each ≤ 10,000), measured in order "
        "(instead of concurrency).",
    )
    num_requests: Annotated[int, Field(ge=1, le=MAX_REQUESTS)] | None = Field(
        default=None, description="Measured requests per level (≤ 1,000,000)."
    )
    duration_s: _DurationS | None = Field(
        default=None, description="Measure each level this long instead, s (≤ 86,400)."
    )
    warmup_requests: int = Field(
        default=2,
        ge=0,
        le=MAX_REQUESTS,
        description="Unmeasured requests before each level (≤ 1,000,000).",
    )
    max_error_rate: Annotated[float, _finite(1.0)] = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Failed-request share above which a trial is infeasible.",
    )
    request_timeout_s: _TimeoutS = Field(
        default=120.0, description="Per-request timeout, s (≤ 86,400)."
    )
    prompt_token_tolerance: int = Field(
        default=2,
        ge=0,
        le=MAX_TOKENS,
        description="Allowed |server prompt tokens − built prompt tokens| before it is reported.",
    )
    seed: _Seed = Field(default=0, description="Seed for prompts and Poisson arrivals.")

    @model_validator(mode="after")
    def _one_of(self) -> Workload:
        if (self.concurrency is None) == (self.request_rates_per_s is None):
            raise ValueError(
                "give exactly one of `concurrency` (e.g. [1, 4]) or `request_rates_per_s` (e.g. [2.0])"
            )
        if (self.num_requests is None) == (self.duration_s is None):
            raise ValueError(
                "give exactly one of `num_requests` (e.g. 24) or `duration_s` (e.g. 30)"
            )
        return self

    def levels(self) -> list[LoadLevel]:
        """The load levels, in order."""
        if self.concurrency is not None:
            return [LoadLevel(concurrency=c) for c in self.concurrency]
        return [LoadLevel(request_rate_per_s=r) for r in self.request_rates_per_s or []]


class StudySpec(_Model):
    """One tuning study: engine, where it runs, what to search, how to load it, what counts as good."""

    name: str | None = Field(
        default=None, description="Study name; null = derived from the engine and date."
    )
    engine: EngineSpec = Field(
        description="The engine, its model and fixed flags; chosen by `kind`."
    )
    deployment: DeploymentSpec = Field(
        default_factory=LocalDeploymentSpec, description="Where each trial's engine runs."
    )
    space: SearchSpace = Field(description="Flags to tune and their allowed values.")
    strategy: StrategySpec = Field(
        default_factory=StrategySpec, description="How the next params are chosen."
    )
    budget: Budget = Field(default_factory=Budget, description="When the search stops; repeats.")
    workload: Workload = Field(description="The request pattern every trial is benchmarked with.")
    slos: list[Slo] = Field(default_factory=list, description="Bounds every feasible trial meets.")
    objective: Annotated[
        Objective,
        BeforeValidator(
            _objective_forms, json_schema_input_type=ObjectiveTerm | list[ObjectiveTerm] | Objective
        ),
        Field(
            description="What to maximise/minimise among feasible trials: one term, a list of one "
            "or two terms (two = a Pareto study), or {terms: [...]}."
        ),
    ]

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        """Names become file names (logs, reports) and CLI arguments: see ``check_study_name``."""
        return v if v is None else check_study_name(v)

    def problems(self) -> list[Problem]:
        """Cross-field problems pydantic cannot see field by field (empty when consistent)."""
        return cross_problems(
            engine=self.engine,
            space=self.space,
            strategy=self.strategy,
            workload=self.workload,
            slos=self.slos,
            objective=self.objective,
        )

    def notes(self) -> list[Problem]:
        """Things worth knowing about a valid spec that do not stop it (``validate`` prints them):
        a finite space with fewer feasible points than the search budget, or more grid points
        than the budget runs; a throughput objective in rate mode."""
        notes: list[Problem] = []
        search_trials = self.budget.max_trials - 1
        grid = self.strategy.kind == "grid"
        count = self.space.feasibility(grid=grid, samples=0).exact_count
        if count is not None and not (grid and self.space.full_grid_count() > MAX_GRID_POINTS):
            what = "grid points" if grid else "points of the space"
            if count < search_trials:
                notes.append(
                    Problem(
                        "budget.max_trials",
                        f"only {count:,} {what} meet the constraints, fewer than the "
                        f"{search_trials:,} search trials budget.max_trials allows: the search "
                        f"ends after {count:,} (plus the baseline)",
                    )
                )
            elif grid and count > search_trials:
                notes.append(
                    Problem(
                        "budget.max_trials",
                        f"the grid has {count:,} points meeting the constraints but "
                        f"budget.max_trials allows {search_trials:,} search trials: only the "
                        "first ones in name order run; raise max_trials, coarsen the grid or "
                        "use tpe",
                    )
                )
        if self.workload.request_rates_per_s is not None:
            for i, term in enumerate(self.objective.terms):
                if term.metric in ("requests_per_s", "output_tokens_per_s"):
                    notes.append(
                        Problem(
                            f"objective.terms.{i}.metric",
                            f"in rate mode {term.metric} follows the offered rate while the "
                            "server keeps up, so trials differ only once it falls behind; "
                            "goodput_requests_per_s with SLOs, or a latency, tells them apart",
                        )
                    )
        return notes


PER_REQUEST_SLO_METRICS = ("ttft_ms", "tpot_ms", "e2e_latency_ms")
"""SLO metrics checked per request, which goodput counts (ITL is per gap, not per request)."""
_MULTI_TOKEN_METRICS = ("tpot_ms", "itl_ms")
"""Metrics that need at least two output tokens per request: TPOT divides by output − 1 (vLLM's
definition) and ITL is the gap between tokens (DESIGN.md §4)."""
_LOWER_IS_BETTER = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_latency_ms", "error_rate")


def unmeasurable(metric: str, workload: Workload) -> str | None:
    """Why the workload can never produce ``metric`` (a ``ServingMetrics.value`` name or an SLO
    metric), with the fix; None when it can. TPOT and ITL need ``output_tokens`` ≥ 2."""
    base = metric.split(".", 1)[0]
    if base in _MULTI_TOKEN_METRICS and workload.output_tokens < 2:
        return (
            f"{base} needs at least 2 output tokens per request, and workload.output_tokens is "
            f"{workload.output_tokens}, so it is never measured: raise workload.output_tokens "
            "to 2 or more, or use ttft_ms or e2e_latency_ms"
        )
    return None


def objective_problem(term: ObjectiveTerm, workload: Workload, slos: list[Slo]) -> str | None:
    """Why ``term`` cannot rank trials, with the fix; None when it can.

    Refused: a metric the workload never produces (see ``unmeasurable``); ``error_rate`` (a
    limit, set by ``workload.max_error_rate``, not an objective: every feasible trial would tie
    at 0 with the default limit); ``goodput_requests_per_s`` without a per-request SLO (ttft,
    tpot or e2e: goodput would equal ``requests_per_s``); a latency maximised or a throughput
    minimised (the best trial would be the worst server).
    """
    why = unmeasurable(term.metric, workload)
    if why:
        return why
    base = term.metric.split(".", 1)[0]
    if base == "error_rate":
        return (
            "error_rate is a limit, not an objective: bound it with workload.max_error_rate "
            "and optimise a throughput or a latency"
        )
    if term.metric == "goodput_requests_per_s" and not any(
        s.metric in PER_REQUEST_SLO_METRICS for s in slos
    ):
        return (
            "goodput counts the requests meeting every per-request SLO (ttft_ms, tpot_ms or "
            "e2e_latency_ms) and slos has none, so it would equal requests_per_s: add such an "
            "SLO, or use requests_per_s"
        )
    lower_better = base in _LOWER_IS_BETTER
    if lower_better and term.direction == "maximize":
        return f"{term.metric} is better when lower; use direction: minimize"
    if not lower_better and term.direction == "minimize":
        return f"{term.metric} is better when higher; use direction: maximize"
    return None


def cross_problems(
    *,
    engine: LlamaCppEngineSpec | VllmEngineSpec | SglangEngineSpec | None,
    space: SearchSpace | None,
    strategy: StrategySpec | None,
    workload: Workload | None,
    slos: list[Slo] | None,
    objective: Objective | None,
) -> list[Problem]:
    """Problems between sections; each check runs when the sections it needs are valid (None =
    that section is invalid or missing), so a spec with errors elsewhere still gets them.

    Checked: SLO and objective levels that are not workload levels; SLOs and objective terms the
    workload cannot measure (see ``unmeasurable``, ``objective_problem``); nsga2 with one term;
    constraints no point meets, by one rule for every strategy (``SearchSpace.infeasibility``:
    counted exactly where the space is finite, else sampled); a grid over more than
    ``MAX_GRID_POINTS`` points; flags both fixed and tuned.
    """
    problems: list[Problem] = []
    if workload is not None:
        level_values = {lv.value for lv in workload.levels()}
        for i, slo in enumerate(slos or []):
            for v in slo.levels or []:
                if v not in level_values:
                    problems.append(
                        Problem(
                            f"slos.{i}.levels",
                            f"{v:g} is not a workload level; use one of {sorted(level_values)}",
                        )
                    )
            why = unmeasurable(slo.metric, workload)
            if why:
                problems.append(Problem(f"slos.{i}.metric", why))
        for i, term in enumerate(objective.terms if objective else []):
            if term.level is not None and term.level not in level_values:
                problems.append(
                    Problem(
                        f"objective.terms.{i}.level",
                        f"{term.level:g} is not a workload level; use one of {sorted(level_values)} or null",
                    )
                )
            if slos is not None:
                why = objective_problem(term, workload, slos)
                if why:
                    problems.append(Problem(f"objective.terms.{i}.metric", why))
    nsga2 = strategy is not None and strategy.kind == "nsga2"
    if nsga2 and objective is not None and len(objective.terms) < 2:
        problems.append(
            Problem(
                "strategy.kind", "nsga2 needs two objective terms; use tpe, or add a second term"
            )
        )
    if strategy is not None and space is not None:
        problems.extend(_space_problems(space, strategy))
    if engine is not None and space is not None:
        both = set(engine.flags) & set(space.params)
        if both:
            problems.append(
                Problem(
                    "engine.flags",
                    f"{sorted(both)} are also tuned in space.params; remove them from one of the two",
                )
            )
    return problems


def _space_problems(space: SearchSpace, strategy: StrategySpec) -> list[Problem]:
    """A grid without a grid or too large to run; constraints no point meets (any strategy)."""
    grid = strategy.kind == "grid"
    if grid:
        missing = []
        for name, param in space.params.items():
            try:
                param.grid_count()
            except ValueError as e:
                missing.append(Problem("space.params", f"{name}: {e}"))
        if missing:
            return missing
        size = space.full_grid_count()
        if size > MAX_GRID_POINTS:
            return [
                Problem(
                    "space.params",
                    f"the grid has {size:,} points (every combination of the params' values), "
                    f"more than the {MAX_GRID_POINTS:,} a grid study accepts; coarsen the steps, "
                    "tune fewer params, or use strategy tpe or random",
                )
            ]
    why = space.infeasibility(grid=grid, seed=strategy.seed)
    return [Problem("space.constraints", why)] if why else []


class Problem(BaseModel):
    """One thing wrong with a spec: where (dotted field path) and what to do about it."""

    model_config = ConfigDict(frozen=True)
    loc: str = Field(description="Dotted path of the field, e.g. workload.concurrency.")
    message: str = Field(description="What is wrong and how to fix it.")

    def __init__(self, loc: str, message: str) -> None:
        super().__init__(loc=loc, message=message)

    def __str__(self) -> str:
        return f"{self.loc}: {self.message}"


class SpecError(ValueError):
    """A spec with one or more problems; ``problems`` lists them all."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def _field_path(data: Any, loc: tuple[int | str, ...]) -> str:
    """Dotted path of ``loc`` in the document, without the tags pydantic inserts for
    discriminated unions (``space.params.x.int.low`` → ``space.params.x.low``).
    """
    parts: list[str] = []
    node: Any = data
    for i, key in enumerate(loc):
        if (
            isinstance(node, dict)
            and key not in node
            and (
                node.get("kind") == key
                # no kind: the union's default member (deployment: local), never a missing field
                or ("kind" not in node and key == "local" and i < len(loc) - 1)
            )
        ):
            continue  # the union member chosen by `kind`, not a field of the document
        parts.append(str(key))
        if isinstance(node, dict):
            node = node.get(key)
        elif isinstance(node, list) and isinstance(key, int) and 0 <= key < len(node):
            node = node[key]
        else:
            node = None
    return ".".join(parts) or "(root)"


def error_loc(err: Mapping[str, Any]) -> tuple[int | str, ...]:
    """Where a pydantic error is, naming the discriminator field for a bad union tag
    (``engine`` → ``engine.kind`` for ``kind: vllm-next``), so the path points at what to fix."""
    loc = tuple(err["loc"])
    if err.get("type") in ("union_tag_invalid", "union_tag_not_found"):
        field = str((err.get("ctx") or {}).get("discriminator", "")).strip("'")
        if field:
            loc += (field,)
    return loc


def parse_spec(data: Any) -> StudySpec:
    """Validate a parsed YAML/JSON document into a StudySpec.

    Raises SpecError listing every problem at once (structural ones from pydantic, then the
    cross-field ones), each with its field path and a fix.
    """
    if not isinstance(data, dict):
        raise SpecError(
            [Problem("(root)", "a spec is a mapping with engine, space, workload and objective")]
        )
    try:
        spec = StudySpec.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors(include_url=False):
            loc = _field_path(data, error_loc(err))
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "missing":
                msg = "missing; add this field"
            elif err["type"] == "extra_forbidden":
                msg = "unknown field; remove it or check its spelling"
            elif err["type"] == "literal_error" or err["type"] == "union_tag_invalid":
                msg = err["msg"]
            problems.append(Problem(loc, msg))
        raise SpecError(problems + _partial_cross_problems(data)) from e
    problems = spec.problems()
    if problems:
        raise SpecError(problems)
    return spec


def _partial_cross_problems(data: dict[str, Any]) -> list[Problem]:
    """Cross-section problems among the sections of ``data`` that are valid on their own."""
    parts: dict[str, Any] = {}
    for name, field in StudySpec.model_fields.items():
        if name == "name":
            continue
        if name not in data:
            parts[name] = (
                field.get_default(call_default_factory=True) if not field.is_required() else None
            )
            continue
        value = data[name]
        if name == "objective":
            value = _objective_forms(value)
        try:
            annotation: Any = field.annotation
            parts[name] = TypeAdapter[Any](annotation).validate_python(value)
        except ValidationError:
            parts[name] = None
    return cross_problems(
        engine=parts.get("engine"),
        space=parts.get("space"),
        strategy=parts.get("strategy"),
        workload=parts.get("workload"),
        slos=parts.get("slos"),
        objective=parts.get("objective"),
    )
