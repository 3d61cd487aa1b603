"""``servetune bench``'s files: the run as one JSON document and per-request records (JSONL/CSV).

Also the parsers of its ``--slo`` and ``--header`` values. Files are written whole or not at all.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, get_args

from servetune.bench.builtin import BenchRun, servetune_version
from servetune.core.metrics import LATENCY_METRICS, PERCENTILES, Percentile
from servetune.core.slo import Slo, check_slos
from servetune.core.spec import Workload

RecordsFormat = Literal["jsonl", "csv"]
_RECORD_SUFFIXES: dict[str, RecordsFormat] = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}

RECORD_FIELDS = (
    "level",
    "index",
    "warmup",
    "ok",
    "error_kind",
    "error",
    "sent_offset_s",
    "ttft_ms",
    "tpot_ms",
    "e2e_latency_ms",
    "itl_ms",
    "content_events",
    "prompt_tokens",
    "expected_prompt_tokens",
    "output_tokens",
    "retries",
)
"""Columns of a records file, in order (``itl_ms``: a list in JSONL, ``;``-separated in CSV)."""


def parse_slo(text: str) -> Slo:
    """``METRIC:PERCENTILE:MAX_MS`` (e.g. ``ttft_ms:p99:500``) → ``Slo``.

    Raises ValueError naming the part that is wrong and what is accepted.
    """
    parts = text.split(":")
    if len(parts) != 3:
        raise ValueError(f"expected METRIC:PERCENTILE:MAX_MS, e.g. ttft_ms:p99:500; got {text!r}")
    metric, stat, bound = (p.strip() for p in parts)
    if metric not in LATENCY_METRICS:
        raise ValueError(f"metric {metric!r} is not one of {', '.join(LATENCY_METRICS)}")
    if stat not in get_args(Percentile):
        raise ValueError(f"percentile {stat!r} is not one of {', '.join(PERCENTILES)}")
    try:
        max_ms = float(bound)
    except ValueError:
        max_ms = float("nan")
    if not max_ms > 0 or max_ms == float("inf"):
        raise ValueError(f"the bound must be a positive number of ms, got {bound!r}")
    return Slo.model_validate({"metric": metric, "percentile": stat, "max_ms": max_ms})


def parse_header(text: str) -> tuple[str, str]:
    """``NAME:VALUE`` (or ``NAME: VALUE``) → (name, value); ValueError if it is not a header."""
    name, sep, value = text.partition(":")
    name = name.strip()
    if not sep or not name or any(c in name for c in " \t\r\n") or "\n" in value or "\r" in value:
        raise ValueError(f"expected NAME:VALUE, e.g. 'X-Team: infra'; got {text!r}")
    return name, value.strip()


def records_format(path: Path) -> RecordsFormat:
    """The records format a file name asks for, by suffix; ValueError for any other suffix."""
    fmt = _RECORD_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path.name}: the suffix picks the format: .jsonl (or .ndjson) or .csv")
    return fmt


def run_document(
    run: BenchRun,
    *,
    url: str,
    workload: Workload,
    slos: Sequence[Slo],
    tokenizer: str | None,
    header_names: Sequence[str],
    api_key_given: bool,
    created_at: datetime,
) -> dict[str, Any]:
    """The whole run as one JSON-ready document: settings, version, time, per-level metrics.

    ``settings`` holds every setting of the run (the API key and header values are never
    written: only whether a key was given and the header names). ``levels[i]`` is that
    level's ``ServingMetrics`` plus ``client`` (the client's own load) and ``slo_checks``.
    ``created_at`` must be an aware UTC datetime.
    """
    if created_at.tzinfo is None:
        raise ValueError("created_at must be timezone-aware (UTC)")
    report = check_slos(slos, [lv.metrics for lv in run.levels], workload.max_error_rate)
    levels = []
    for lv in run.levels:
        doc = lv.metrics.model_dump(mode="json")
        doc["client"] = dataclasses.asdict(lv.client_load) | {"saturated": lv.client_load.saturated}
        doc["slo_checks"] = [
            c.model_dump(mode="json") for c in report.checks if c.level == lv.level.label
        ]
        levels.append(doc)
    return {
        "servetune_version": servetune_version(),
        "created_at": created_at.isoformat(),
        "settings": {
            "url": url,
            "model": run.model,
            "workload": workload.model_dump(mode="json"),
            "slos": [s.model_dump(mode="json") for s in slos],
            "tokenizer": tokenizer,
            "prompt_counting": run.prompt_counting,
            "processes": run.processes,
            "header_names": list(header_names),
            "api_key_given": api_key_given,
        },
        "feasible": report.feasible,
        "levels": levels,
    }


def record_rows(run: BenchRun) -> Iterator[dict[str, Any]]:
    """One dict per request (warm-ups included, flagged), levels in order, fields as
    ``RECORD_FIELDS``; ``sent_offset_s`` counts from the level's first send."""
    for lv in run.levels:
        t0 = min((r.sent_s for r in lv.records), default=0.0)
        for i, r in enumerate(lv.records):
            yield {
                "level": lv.level.value,
                "index": i,
                "warmup": r.warmup,
                "ok": r.ok,
                "error_kind": r.error_kind,
                "error": r.error,
                "sent_offset_s": round(r.sent_s - t0, 6),
                "ttft_ms": r.ttft_ms(),
                "tpot_ms": r.tpot_ms(),
                "e2e_latency_ms": r.e2e_latency_ms(),
                "itl_ms": r.itl_ms(),
                "content_events": len(r.chunk_times_s),
                "prompt_tokens": r.prompt_tokens,
                "expected_prompt_tokens": r.expected_prompt_tokens,
                "output_tokens": r.output_tokens,
                "retries": r.retries,
            }


def records_text(run: BenchRun, fmt: RecordsFormat) -> str:
    """Every record as JSONL (one object a line) or CSV (a header row, ``itl_ms`` joined by ``;``)."""
    if fmt == "jsonl":
        return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in record_rows(run))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=RECORD_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in record_rows(run):
        row["itl_ms"] = ";".join(f"{g:.3f}" for g in row["itl_ms"])
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return out.getvalue()


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all (a temporary file renamed over it).

    Raises OSError when the directory cannot be written.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or Path("."))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
