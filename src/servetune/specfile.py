"""Reading a StudySpec from a YAML or JSON file, with paths resolved against the file's folder.

Every problem (syntax, structure, cross-field, engine-specific) is gathered and raised at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from servetune.core.space import Param, SearchSpace
from servetune.core.spec import EngineSpec, Problem, SpecError, StudySpec, parse_spec
from servetune.core.strategies.base import make_strategy
from servetune.engines import get_engine
from servetune.errors import SpecInvalid


def read_document(path: Path) -> dict[str, Any]:
    """Parse ``path`` as YAML (JSON is YAML too). Raises SpecInvalid for unreadable or non-mapping files."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SpecInvalid([Problem(str(path), f"cannot read the spec file: {e.strerror}")]) from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise SpecInvalid(
            [Problem(str(path), f"not valid YAML/JSON{where}: {getattr(e, 'problem', e)}")]
        ) from e
    if not isinstance(data, dict):
        raise SpecInvalid(
            [Problem("(root)", "a spec is a mapping with engine, space, workload and objective")]
        )
    return data


def resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make relative ``engine.model``/``engine.tokenizer``/``engine.config_json`` paths relative
    to ``base`` (the spec's folder); a vLLM/SGLang model that is no local path stays a hub id."""
    engine = data.get("engine")
    if isinstance(engine, dict):
        engine = dict(engine)
        hub = engine.get("kind") in ("vllm", "sglang")  # model may be a Hugging Face id
        for key in ("model", "tokenizer", "config_json"):
            value = engine.get(key)
            if hub and key == "model" and isinstance(value, str) and not (base / value).exists():
                continue
            if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
                engine[key] = str((base / value).resolve())
            elif isinstance(value, str) and value.startswith("~"):
                engine[key] = str(Path(value).expanduser())
        data = {**data, "engine": engine}
    return data


def validate_document(data: dict[str, Any]) -> StudySpec:
    """Structural, cross-field and engine checks together. Raises SpecInvalid with every problem."""
    try:
        spec = parse_spec(data)
    except SpecError as e:
        raise SpecInvalid(e.problems + _engine_problems(data, e.problems)) from e
    problems = get_engine(spec.engine).check_spec(spec)
    try:
        make_strategy(spec)
    except ValueError as e:
        problems.append(Problem("strategy.kind", str(e)))
    if problems:
        raise SpecInvalid(problems)
    return spec


def _engine_problems(data: dict[str, Any], known: list[Problem]) -> list[Problem]:
    """Engine-level problems of a spec whose other parts are invalid (when its engine section
    parses): the engine section's own, and those of every space param that parses on its own."""
    try:
        engine_spec = TypeAdapter(EngineSpec).validate_python(data.get("engine"))
    except ValidationError:
        return []
    engine = get_engine(engine_spec)
    found = engine.check_engine()
    raw_space = data.get("space")
    raw_params = raw_space.get("params") if isinstance(raw_space, dict) else None
    if isinstance(raw_params, dict):
        params: dict[str, Any] = {}
        for name, raw in raw_params.items():
            try:
                params[str(name)] = TypeAdapter(Param).validate_python(raw)
            except ValidationError:
                continue
        if params:
            found += engine.check_space(SearchSpace.model_construct(params=params, constraints=[]))
    seen = {(p.loc, p.message) for p in known}
    return [p for p in found if (p.loc, p.message) not in seen]


def load_spec(path: Path) -> tuple[StudySpec, dict[str, Any]]:
    """Read, resolve and validate the spec at ``path``; returns (spec, resolved document).

    Raises SpecInvalid listing every problem.
    """
    data = resolve_paths(read_document(path), path.resolve().parent)
    return validate_document(data), data
