"""Outside load: CPU used by other processes while a trial is measured, with a real CPU burner."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from servetune.hostload import OutsideLoadMeter, outside_cpu_fraction
from tests.integration.study_helpers import servetune, small_spec, write_spec

pytestmark = pytest.mark.integration

_BURN = "import time\nend = time.monotonic() + 600\nwhile time.monotonic() < end: pass\n"
# Started through a parent that exits at once: the burner is re-parented (not our descendant),
# in its own session, as another user's process on the host would be.
_DETACH = (
    "import subprocess, sys\n"
    "p = subprocess.Popen([sys.executable, '-c', sys.argv[1]], start_new_session=True,\n"
    "                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
    "print(p.pid, flush=True)\n"
)


@pytest.fixture
def outside_burner() -> Iterator[psutil.Process]:
    """A process burning one core that is not a descendant of the test process."""
    out = subprocess.run(  # noqa: S603 - argv of our own interpreter
        [sys.executable, "-c", _DETACH, _BURN], capture_output=True, text=True, check=True
    )
    proc = psutil.Process(int(out.stdout.strip()))
    assert proc.pid not in {c.pid for c in psutil.Process().children(recursive=True)}
    try:
        yield proc
    finally:
        os.kill(proc.pid, signal.SIGKILL)


def _burner_s(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def test_a_burner_outside_our_tree_is_outside_load_and_excluded_as_the_engine(
    outside_burner: psutil.Process,
) -> None:
    meter = OutsideLoadMeter()
    cores = psutil.cpu_count() or 1
    time.sleep(0.2)  # let it start burning
    a_all, a_eng, b0 = (
        meter.snapshot(),
        meter.snapshot(outside_burner.pid),
        _burner_s(outside_burner),
    )
    t0 = time.monotonic()
    time.sleep(1.5)
    b1, wall = _burner_s(outside_burner), time.monotonic() - t0
    z_all, z_eng = meter.snapshot(), meter.snapshot(outside_burner.pid)
    share = (b1 - b0) / (wall * cores)
    assert share > 0.2 / cores, "the burner did not get CPU time"
    with_burner = outside_cpu_fraction(a_all, z_all)
    as_engine = outside_cpu_fraction(a_eng, z_eng)
    assert with_burner is not None and as_engine is not None
    # everything the burner used counts as outside load (other users of the host may add more)
    assert with_burner >= share - 0.03, (with_burner, share)
    # named as the engine, it is excluded: the difference is the burner's own share
    assert with_burner - as_engine == pytest.approx(share, abs=0.04)


def test_our_own_children_are_not_outside_load() -> None:
    meter = OutsideLoadMeter()
    burner = subprocess.Popen([sys.executable, "-c", _BURN])  # noqa: S603 - our interpreter
    try:
        p = psutil.Process(burner.pid)
        time.sleep(0.2)
        a, b0 = meter.snapshot(), _burner_s(p)
        time.sleep(1.0)
        z, b1 = meter.snapshot(), _burner_s(p)
    finally:
        burner.kill()
        burner.wait()
    assert b1 - b0 > 0.1, "the child did not get CPU time"
    # the child's CPU time is part of what is excluded from the outside load
    assert z.excluded_s - a.excluded_s >= (b1 - b0) - 0.05


def test_a_trial_under_outside_load_is_flagged_everywhere_and_rerun_once(
    tiny_model, tmp_path: Path, outside_burner: psutil.Process
) -> None:
    doc = small_spec(tiny_model, trials=1, name="busy")
    doc["deployment"]["max_outside_cpu_fraction"] = 0.02
    spec = write_spec(tmp_path / "spec.yaml", doc)
    run = servetune(tmp_path, "run", str(spec))
    assert run.returncode == 0, run.stdout + run.stderr
    # live output: the finished trial's line carries the warning
    assert "warning outside_load: other processes used" in run.stdout, run.stdout

    shown = json.loads(servetune(tmp_path, "show", "busy", "--json").stdout)
    (trial,) = shown["trials"]
    assert trial["state"] == "COMPLETE"
    assert trial["outside_cpu_fraction"] > 0.02
    # the burner may also slow the client (client_saturated); outside_load is what this is about
    assert [w["code"] for w in trial["warnings"] if w["code"] != "client_saturated"] == [
        "outside_load"
    ]
    assert trial["notes"][0].startswith("re-run once: other processes used")
    logs = sorted(p.name for p in (tmp_path / "data" / "logs" / "busy").iterdir())
    assert logs == ["trial-0000-attempt3.log", "trial-0000.log"], "run twice, once re-run"

    table = servetune(tmp_path, "show", "busy")
    assert "warning outside_load" in " ".join(table.stdout.split()), table.stdout
    report = (tmp_path / "data" / "reports" / "busy.html").read_text(encoding="utf-8")
    assert "warning outside_load: other processes used" in report
