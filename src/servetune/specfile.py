"""Reading a StudySpec from a YAML or JSON file, with paths resolved against the file's folder.

Every problem (syntax, structure, cross-field, engine-specific) is gathered and raised at once.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from servetune.core.space import Param, SearchSpace
from servetune.core.spec import EngineSpec, Problem, SpecError, StudySpec, parse_spec
from servetune.core.strategies.base import make_strategy
from servetune.engines import get_engine
from servetune.errors import SpecInvalid


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader refusing a key repeated in one mapping (YAML 1.2 requires unique
    keys; PyYAML keeps the last silently). Nested mappings and JSON documents alike; keys merged
    in with ``<<`` may still be overridden, as the merge rule intends."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        """Check ``node``'s keys for duplicates, then build the mapping as SafeLoader does."""
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader reports it below
                continue
            if first is not None:
                raise _DuplicateKey(key, first, key_node)
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


# YAML 1.2 reads ``1e12`` and ``1.0e12`` as floats; PyYAML (YAML 1.1) needs a dot and a signed
# exponent and reads them as strings, so a size written that way got "not a valid integer"
# instead of its bound. Resolve 1.2's exponent forms as floats (yaml.org/spec/1.2.2 §10.2.1.4).
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


class _DuplicateKey(yaml.YAMLError):
    """A key given twice in one mapping; carries the key and both places."""

    def __init__(self, key: Any, first: yaml.Node, again: yaml.Node) -> None:
        self.key = key
        self.again_line = again.start_mark.line + 1
        self.again_column = again.start_mark.column + 1
        first_at = f"line {first.start_mark.line + 1}, column {first.start_mark.column + 1}"
        again_at = f"line {self.again_line}, column {self.again_column}"
        super().__init__(
            f"duplicate key {key!r}: first at {first_at}, again at {again_at}; keep one of them"
        )


MAX_SPEC_BYTES = 4 * 1024 * 1024
"""Largest spec file read, in bytes: a study spec is a few kB; anything this big is a wrong file."""


def _not_text(path: Path, raw: bytes) -> str | None:
    """Why ``raw`` is not a YAML/JSON text (binary, not UTF-8), or None when it is text."""
    hint = "a spec is a YAML or JSON text file (UTF-8)"
    if raw.startswith(b"GGUF"):
        return f"this is a GGUF model file, not a spec; {hint}, whose engine.model names the model"
    nul = raw.find(b"\x00", 0, 8192)
    if nul >= 0:
        return f"this is a binary file (a NUL byte at offset {nul}), not a spec; {hint}"
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if len(raw) > MAX_SPEC_BYTES and e.start >= len(raw) - 4:
            return None  # a character cut by the size limit; the size is the problem
        line = raw[: e.start].count(b"\n") + 1
        return (
            f"not UTF-8 text: byte 0x{raw[e.start]:02x} at offset {e.start} (line {line}) cannot "
            f"be decoded; {hint}: save it as UTF-8"
        )
    return None


def read_document(path: Path) -> dict[str, Any]:
    """Parse ``path`` as YAML (JSON is YAML too); the mapping.

    Raises SpecInvalid (naming the file, and the line where known) for an unreadable file, a
    binary or non-UTF-8 file (a ``.gguf`` given by mistake), one over ``MAX_SPEC_BYTES``,
    invalid or too deeply nested YAML/JSON, a key repeated in one mapping (naming the key and
    both lines), or a document that is not a mapping.
    """
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)
    except OSError as e:
        raise SpecInvalid([Problem(str(path), f"cannot read the spec file: {e.strerror}")]) from e
    why = _not_text(path, raw)
    if why is not None:
        raise SpecInvalid([Problem(str(path), why)])
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecInvalid(
            [
                Problem(
                    str(path),
                    f"the file is over {MAX_SPEC_BYTES // (1024 * 1024)} MiB: not a spec "
                    "(a spec is a YAML or JSON text of a few kB)",
                )
            ]
        )
    return parse_document(raw.decode("utf-8"), str(path))


def parse_document(text: str, where: str) -> dict[str, Any]:
    """Parse ``text`` (YAML or JSON) into the spec mapping; ``where`` names it in problems.

    The same rules as ``read_document`` after the file is read: raises SpecInvalid for invalid
    or too deeply nested YAML/JSON (with the line), a key repeated in one mapping, or a
    document that is not a mapping.
    """
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except _DuplicateKey as e:
        raise SpecInvalid([Problem(f"{where}:{e.again_line}:{e.again_column}", str(e))]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise SpecInvalid(
            [Problem(where, f"not valid YAML/JSON{at}: {getattr(e, 'problem', e)}")]
        ) from e
    except RecursionError:
        raise SpecInvalid(
            [Problem(where, "not a spec: its YAML/JSON is nested too deeply to read")]
        ) from None
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
