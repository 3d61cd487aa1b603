"""`servetune worker --cpus`: a worker's capacity is the cores it may use, never the host's."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from servetune.worker.gpu import parse_cpu_list, pin_cpus, usable_cpu_count


@pytest.mark.parametrize(
    ("text", "cores"),
    [("0", {0}), ("0-3", {0, 1, 2, 3}), ("0,2,4", {0, 2, 4}), ("0-1, 6", {0, 1, 6})],
)
def test_core_lists_read_as_taskset_writes_them(text: str, cores: set[int]) -> None:
    assert parse_cpu_list(text) == cores


@pytest.mark.parametrize("text", ["", "a", "3-1", "-1", "0-", "1,,2", "70000"])
def test_a_bad_core_list_names_the_part(text: str) -> None:
    with pytest.raises(ValueError, match=r"e\.g\. 0-3|range of core numbers|no core"):
        parse_cpu_list(text)


def test_a_pinned_process_counts_only_its_cores_and_its_children_inherit_them() -> None:
    code = (
        "import os, subprocess, sys\n"
        "from servetune.worker.gpu import pin_cpus, usable_cpu_count\n"
        "pin_cpus({0})\n"
        "child = subprocess.run([sys.executable, '-c', "
        "'import os; print(sorted(os.sched_getaffinity(0)))'], capture_output=True, text=True)\n"
        "print(usable_cpu_count(), child.stdout.strip())\n"
    )
    argv = [sys.executable, "-c", code]
    out = subprocess.run(argv, capture_output=True, text=True, check=True)  # noqa: S603 - our own code
    assert out.stdout.split() == ["1", "[0]"]
    assert usable_cpu_count() == len(os.sched_getaffinity(0))  # this process is untouched


def test_pinning_to_a_core_the_process_may_not_use_is_refused() -> None:
    with pytest.raises(ValueError, match="not available to this process"):
        pin_cpus({max(os.sched_getaffinity(0)) + 1000})
