"""Helpers shared by the study-level integration tests: a small spec on the tiny model, CLI runs."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml


def small_spec(
    model: Any, *, trials: int = 4, name: str | None = None, **overrides: Any
) -> dict[str, Any]:
    """A quick llama.cpp study on the tiny model: about 1-2 s per trial on 2 cores."""
    doc: dict[str, Any] = {
        "name": name,
        "engine": {
            "kind": "llamacpp",
            "model": str(model.gguf_path),
            "tokenizer": str(model.tokenizer_dir),
            "binary": "xllamacpp",
        },
        # max_outside_cpu_fraction 1: these studies count trials and engine launches, which an
        # outside-load re-run (another job on a shared machine) would change; that path has its
        # own tests (test_outside_load.py)
        "deployment": {
            "kind": "local",
            "startup_timeout_s": 30,
            "stop_timeout_s": 5,
            "max_outside_cpu_fraction": 1.0,
        },
        "space": {
            "params": {
                "threads": {"kind": "int", "low": 1, "high": 2},
                "parallel": {"kind": "choice", "values": [1, 2]},
                "batch-size": {"kind": "choice", "values": [512, 2048]},
            },
        },
        "strategy": {"kind": "random", "seed": 1},
        "budget": {"max_trials": trials, "confirm_repeats": 0, "baseline_repeats": 1},
        "workload": {
            "input_tokens": 32,
            "output_tokens": 12,
            "concurrency": [2],
            "num_requests": 6,
            "warmup_requests": 1,
        },
        "slos": [{"metric": "ttft_ms", "percentile": "p99", "max_ms": 5000}],
        "objective": {"metric": "output_tokens_per_s", "direction": "maximize"},
    }
    for key, value in overrides.items():
        doc[key] = value
    return doc


def write_spec(path: Path, doc: dict[str, Any]) -> Path:
    """Write ``doc`` as YAML to ``path``."""
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def cli_env(tmp_path: Path) -> dict[str, str]:
    """Environment for a CLI subprocess with its own data directory and database."""
    env = dict(os.environ)
    env["SERVETUNE_DATA_DIR"] = str(tmp_path / "data")
    env["SERVETUNE_DB_URL"] = f"sqlite:///{tmp_path / 'studies.db'}"
    env["COLUMNS"] = "200"
    return env


def servetune(tmp_path: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Run the servetune CLI in a subprocess; returns the completed process (never raises on status)."""
    return subprocess.run(  # noqa: S603 - argv list of our own CLI
        [sys.executable, "-m", "servetune", *args],
        capture_output=True,
        text=True,
        env=cli_env(tmp_path),
        timeout=timeout,
        check=False,
    )


@contextlib.contextmanager
def fake_server_process(*options: str) -> Iterator[str]:
    """The in-repo fake streaming server as its own process, started with ``options`` (its CLI
    flags); yields its base URL and stops it on exit."""
    argv = [sys.executable, "-m", "servetune.testing.fake_server", "--port", "0", *options]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)  # noqa: S603 - fixed argv
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on "), line
        yield line.split()[-1]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
