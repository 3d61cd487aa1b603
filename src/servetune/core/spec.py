"""StudySpec: what a user writes (YAML/JSON) to describe one tuning study, and its parts.

Every field has a description, so ``servetune schema`` emits a documented JSON Schema.
"""

from __future__ import annotations

import re
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

from servetune.core.metrics import LoadLevel
from servetune.core.scoring import Objective, ObjectiveTerm
from servetune.core.slo import Slo
from servetune.core.space import ParamValue, SearchSpace


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
    flags: dict[str, ParamValue] = Field(
        default_factory=dict,
        description="Fixed flags passed to every trial (engine CLI names, no dashes), e.g. {n-gpu-layers: 0}.",
    )
    served_model_name: str = Field(
        default="servetune", description="Model name the server reports (--alias)."
    )


EngineSpec = Annotated[LlamaCppEngineSpec, Field(description="The engine; chosen by `kind`.")]


class LocalDeploymentSpec(_Model):
    """Run each trial's engine as a local process group on a free port."""

    kind: Literal["local"] = Field(default="local", description="Deployment kind.")
    host: str = Field(default="127.0.0.1", description="Address the engine binds to.")
    startup_timeout_s: float = Field(default=120.0, gt=0, description="Launch → ready limit, s.")
    stop_timeout_s: float = Field(default=10.0, gt=0, description="SIGTERM → SIGKILL grace, s.")
    log_dir: str | None = Field(
        default=None, description="Where trial logs go; null = the data directory."
    )


DeploymentSpec = Annotated[
    LocalDeploymentSpec, Field(description="Where engines run; chosen by `kind`.")
]


class StrategySpec(_Model):
    """How the next params are chosen (Optuna samplers through ask/tell, or a plain grid)."""

    kind: Literal["grid", "random", "tpe", "gp", "nsga2"] = Field(
        default="tpe", description="Strategy."
    )
    seed: int = Field(default=0, description="Random seed; same seed, same proposals.")
    n_startup_trials: PositiveInt | None = Field(
        default=None,
        description="Random trials before the model kicks in (tpe/gp); null = Optuna's default.",
    )


class Budget(_Model):
    """When the search stops (whichever comes first)."""

    max_trials: PositiveInt = Field(
        default=20, description="Trials, the baseline included, repeats excluded."
    )
    max_wall_time_s: float | None = Field(
        default=None, gt=0, description="Wall-time limit of the search, s."
    )
    confirm_repeats: int = Field(
        default=1,
        ge=0,
        le=5,
        description="Fresh re-runs of the best trial and the baseline before the verdict (0 = none).",
    )


class Workload(_Model):
    """The request pattern of each benchmark: fixed-length synthetic prompts at one or more load levels."""

    api: Literal["completions", "chat"] = Field(
        default="completions", description="/v1/completions or /v1/chat/completions."
    )
    input_tokens: PositiveInt = Field(
        default=128, description="Prompt length in tokens (model's tokenizer)."
    )
    output_tokens: PositiveInt = Field(
        default=64, description="Generated tokens per request (max_tokens + ignore_eos)."
    )
    concurrency: list[PositiveInt] | None = Field(
        default=None, description="Concurrency levels (requests in flight), measured in order."
    )
    request_rates_per_s: list[Annotated[float, Field(gt=0)]] | None = Field(
        default=None,
        description="Poisson request rates per second, measured in order (instead of concurrency).",
    )
    num_requests: PositiveInt | None = Field(
        default=None, description="Measured requests per level."
    )
    duration_s: float | None = Field(
        default=None, gt=0, description="Measure each level this long instead."
    )
    warmup_requests: int = Field(
        default=2, ge=0, description="Unmeasured requests before each level."
    )
    max_error_rate: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Failed-request share above which a trial is infeasible.",
    )
    request_timeout_s: float = Field(default=120.0, gt=0, description="Per-request timeout, s.")
    prompt_token_tolerance: int = Field(
        default=2,
        ge=0,
        description="Allowed |server prompt tokens − built prompt tokens| before it is reported.",
    )
    seed: int = Field(default=0, description="Seed for prompts and Poisson arrivals.")

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


def cross_problems(
    *,
    engine: LlamaCppEngineSpec | None,
    space: SearchSpace | None,
    strategy: StrategySpec | None,
    workload: Workload | None,
    slos: list[Slo] | None,
    objective: Objective | None,
) -> list[Problem]:
    """Problems between sections; each check runs when the sections it needs are valid (None =
    that section is invalid or missing), so a spec with errors elsewhere still gets them."""
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
        for i, term in enumerate(objective.terms if objective else []):
            if term.level is not None and term.level not in level_values:
                problems.append(
                    Problem(
                        f"objective.terms.{i}.level",
                        f"{term.level:g} is not a workload level; use one of {sorted(level_values)} or null",
                    )
                )
    nsga2 = strategy is not None and strategy.kind == "nsga2"
    if nsga2 and objective is not None and len(objective.terms) < 2:
        problems.append(
            Problem(
                "strategy.kind", "nsga2 needs two objective terms; use tpe, or add a second term"
            )
        )
    if strategy is not None and space is not None and strategy.kind == "grid":
        try:
            size = space.grid_size()
        except ValueError as e:
            problems.append(Problem("space.params", str(e)))
        else:
            if size == 0:
                problems.append(
                    Problem("space.constraints", "no grid point meets the constraints; relax them")
                )
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
    for key in loc:
        if isinstance(node, dict) and key not in node and node.get("kind") == key:
            continue  # the union member chosen by `kind`, not a field of the document
        parts.append(str(key))
        if isinstance(node, dict):
            node = node.get(key)
        elif isinstance(node, list) and isinstance(key, int) and 0 <= key < len(node):
            node = node[key]
        else:
            node = None
    return ".".join(parts) or "(root)"


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
            loc = _field_path(data, err["loc"])
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
