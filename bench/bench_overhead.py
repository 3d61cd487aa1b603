"""Benchmark: the tuner's own overhead per trial on the real llama.cpp server (tiny model).

Overhead = trial wall time (as the study loop sees it, store writes and ask/tell included)
minus engine start-up time minus benchmark time. Prints a table; ``--json`` prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from servetune.bench.builtin import BuiltinClient
from servetune.core.study import Trial
from servetune.deploy.local import LocalDeployment
from servetune.engines import get_engine
from servetune.loop import LoopEvents, StudyLoop
from servetune.modelgen import make_model
from servetune.runner import TrialContext
from servetune.specfile import validate_document
from servetune.store.repo import StudyStore


def main() -> None:
    """Run a 6-trial study and print per-trial overhead statistics."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = make_model("tiny", tmp / "model")
        doc = {
            "name": "overhead",
            "engine": {
                "kind": "llamacpp",
                "model": str(model.gguf_path),
                "tokenizer": str(model.tokenizer_dir),
            },
            "space": {
                "params": {
                    "threads": {"kind": "int", "low": 1, "high": 2},
                    "parallel": {"kind": "choice", "values": [1, 2, 4]},
                }
            },
            "strategy": {"kind": "tpe", "seed": 0},
            "budget": {"max_trials": args.trials, "confirm_repeats": 0},
            "workload": {
                "input_tokens": 64,
                "output_tokens": 16,
                "concurrency": [2],
                "num_requests": 8,
                "warmup_requests": 1,
            },
            "objective": {"metric": "output_tokens_per_s", "direction": "maximize"},
        }
        spec = validate_document(doc)
        store = StudyStore(f"sqlite:///{tmp / 'bench.db'}")
        study = store.create_study("overhead", spec, doc)
        ctx = TrialContext(
            spec=spec,
            engine=get_engine(spec.engine),
            deployment=LocalDeployment(),
            client=BuiltinClient.for_spec(spec),
            log_dir=tmp / "logs",
            label="overhead",
        )
        (tmp / "logs").mkdir()
        starts: dict[int, float] = {}
        walls: dict[int, float] = {}

        def started(number: int, *_: object) -> None:
            starts[number] = time.perf_counter()

        def finished(t: Trial) -> None:
            walls[t.number] = time.perf_counter() - starts[t.number]

        loop = StudyLoop(
            store, study, ctx, events=LoopEvents(trial_started=started, trial_finished=finished)
        )
        t0 = time.perf_counter()
        outcome = asyncio.run(loop.run())
        total_s = time.perf_counter() - t0
        rows = []
        for t in outcome.trials:
            r = t.result
            if r is None or r.engine_start_s is None or r.benchmark_s is None:
                continue
            wall = walls[t.number]
            rows.append(
                {
                    "trial": t.number,
                    "wall_s": wall,
                    "engine_start_s": r.engine_start_s,
                    "benchmark_s": r.benchmark_s,
                    "overhead_s": wall - r.engine_start_s - r.benchmark_s,
                }
            )
        overheads = [r["overhead_s"] for r in rows]
        summary = {
            "trials": len(rows),
            "study_wall_s": total_s,
            "overhead_mean_s": statistics.mean(overheads),
            "overhead_max_s": max(overheads),
            "between_trials_s": (total_s - sum(walls.values())) / max(1, len(walls)),
            "rows": rows,
        }
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print("tuner overhead per trial (tiny model, real llama.cpp server)")
    print(f"{'trial':>5} {'wall s':>8} {'start s':>8} {'bench s':>8} {'overhead s':>10}")
    for r in rows:
        print(
            f"{r['trial']:>5} {r['wall_s']:8.3f} {r['engine_start_s']:8.3f} {r['benchmark_s']:8.3f} "
            f"{r['overhead_s']:10.3f}"
        )
    print(
        f"overhead per trial: mean {summary['overhead_mean_s']:.3f} s, max {summary['overhead_max_s']:.3f} s; "
        f"loop time between trials (ask/tell, store): {summary['between_trials_s']:.3f} s; "
        f"study wall {total_s:.1f} s"
    )


if __name__ == "__main__":
    main()
