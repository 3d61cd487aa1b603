"""A real study through the CLI: one engine configuration is never measured twice (params that
llama.cpp runs identically reuse the earlier result), and the launch command a user gets is
``llama-server …`` in every output, runnable as printed through the stand-in."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from servetune.deploy.local import LocalDeployment
from servetune.engines.llamacpp.flags import LLAMA_SERVER_FLAGS
from servetune.engines.llamacpp.launch import SERVER_MODULE, STAND_IN_NOTE
from servetune.modelgen import ModelFiles
from tests.integration.study_helpers import servetune, small_spec, write_spec

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def study(tiny_model: ModelFiles, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(data directory, run stdout) of a finished grid study on the tiny model."""
    tmp_path = tmp_path_factory.mktemp("twins")
    doc = small_spec(tiny_model, trials=4, name="twins")
    # parallel -1 is auto = 4 slots over a unified KV cache; with kv-unified fixed on, parallel 4
    # is the same server, and so is ctx-size 4000 (padded to the model's 4096): every grid point
    # runs exactly as the baseline (the engine's defaults) except parallel 2.
    doc["engine"]["flags"] = {"kv-unified": True, "mlock": False, "mmap": False}
    doc["space"] = {
        "params": {
            "parallel": {"kind": "choice", "values": [-1, 4, 2]},
            "ctx-size": {"kind": "choice", "values": [4000]},
        }
    }
    doc["strategy"] = {"kind": "grid"}
    spec = write_spec(tmp_path / "spec.yaml", doc)
    run = servetune(tmp_path, "run", str(spec))
    assert run.returncode == 0, run.stdout + run.stderr
    return tmp_path, run.stdout


def test_params_the_engine_runs_like_the_baseline_are_not_measured_again(
    study: tuple[Path, str],
) -> None:
    tmp_path, stdout = study
    shown = servetune(tmp_path, "show", "twins", "--json")
    assert shown.returncode == 0, shown.stderr
    trials = json.loads(shown.stdout)["trials"]
    measured = [t["params"] for t in trials]
    assert measured == [{}, {"ctx-size": 4000, "parallel": 2}], measured
    assert stdout.count("its result is reused, not measured again") == 2, stdout


def test_every_output_gives_the_llama_server_command_and_it_runs_as_printed(
    study: tuple[Path, str], tmp_path: Path
) -> None:
    data_dir, stdout = study
    exported = servetune(data_dir, "export", "twins", "--format", "command")
    assert exported.returncode == 0, exported.stderr
    command = exported.stdout.strip()
    argv = shlex.split(command)
    assert argv[0] == "llama-server", command
    assert "xllamacpp" not in command and "python" not in command
    assert STAND_IN_NOTE in exported.stderr.replace("\n", " ")
    # the fixed flags mlock false / mmap false are written as current llama-server writes them
    assert "--load-mode none" in command and "--mlock" not in command and "--no-mmap" not in command
    assert "--kv-unified" in argv
    for token in argv:
        if token.startswith("--"):
            assert token[2:] in LLAMA_SERVER_FLAGS, token
    assert "launch command" in stdout and "\nllama-server --model" in stdout
    assert STAND_IN_NOTE.split("`")[1] in stdout  # the stand-in, named only as a way to try it
    shown = servetune(data_dir, "show", "twins")
    assert shown.returncode == 0 and command in shown.stdout.replace("\n", " "), shown.stdout
    as_json = json.loads(servetune(data_dir, "show", "twins", "--json").stdout)
    assert as_json["launch_argv"] == argv
    exported_json = json.loads(servetune(data_dir, "export", "twins", "--format", "json").stdout)
    assert exported_json["argv"] == argv
    report = servetune(data_dir, "report", "twins", "-o", str(tmp_path / "r.html"))
    assert report.returncode == 0, report.stderr
    assert "llama-server --model" in (tmp_path / "r.html").read_text()

    # the printed flags run: the stand-in takes exactly them (host and port swapped for free ones)
    host, port = LocalDeployment().reserve_port()
    flags = argv[1:]
    flags[flags.index("--port") + 1] = str(port)
    proc = subprocess.Popen(  # noqa: S603 - the exported argv, no shell
        [sys.executable, "-m", SERVER_MODULE, *flags, "--threads", "2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "the stand-in refused the printed flags"
            try:
                if httpx.get(f"http://{host}:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(timeout=15)
