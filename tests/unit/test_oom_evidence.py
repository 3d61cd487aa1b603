"""The kernel's OOM-kill counters servetune reads as evidence (cgroup v1 and v2, /proc/vmstat),
on hand-made /proc and /sys/fs/cgroup trees (files only, no processes)."""

from __future__ import annotations

from pathlib import Path

from servetune.deploy.local import OOM_EVIDENCE_PREFIX, oom_kill_counts
from servetune.engines.llamacpp.classify import _SERVETUNE_OOM


def _tree(tmp_path: Path, cgroup_file: str, files: dict[str, str]) -> tuple[Path, Path]:
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(cgroup_file)
    (proc / "vmstat").write_text("nr_free_pages 100\noom_kill 7\n")
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return proc, root


def test_cgroup_v2_memory_events_of_the_cgroup_and_its_ancestors(tmp_path: Path) -> None:
    proc, root = _tree(
        tmp_path,
        "0::/user.slice/study\n",
        {
            "user.slice/study/memory.events": "low 0\nhigh 0\nmax 3\noom 2\noom_kill 2\n",
            "user.slice/memory.events": "oom 5\noom_kill 5\n",
        },
    )
    counts = oom_kill_counts(proc=proc, cgroup_root=root)
    assert counts == {
        str(proc / "vmstat"): 7,
        str(root / "user.slice/study/memory.events"): 2,
        str(root / "user.slice/memory.events"): 5,
    }


def test_cgroup_v1_memory_oom_control_and_hybrid_unified(tmp_path: Path) -> None:
    # the layout of this very machine: v1 memory controller, a v2 "unified" mount without memory
    proc, root = _tree(
        tmp_path,
        "9:name=systemd:/\n4:memory:/process_api/abc\n1:cpu:/\n0::/\n",
        {
            "memory/process_api/abc/memory.oom_control": (
                "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n"
            ),
            "unified/cgroup.procs": "",
        },
    )
    counts = oom_kill_counts(proc=proc, cgroup_root=root)
    assert counts[str(root / "memory/process_api/abc/memory.oom_control")] == 1
    assert len(counts) == 2  # vmstat + the v1 file; nothing made up for missing files


def test_nothing_readable_means_no_counters(tmp_path: Path) -> None:
    assert oom_kill_counts(proc=tmp_path / "missing", cgroup_root=tmp_path) == {}


def test_the_deployment_writes_the_line_the_classifier_reads() -> None:
    assert OOM_EVIDENCE_PREFIX == _SERVETUNE_OOM
