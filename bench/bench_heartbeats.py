"""Benchmark: heartbeat handling of a fleet of simulated workers (200 × 8 GPUs) on a private
redis-server: beats/s, beat and Registry.workers() latency, Redis memory, wrong offlines.

Each worker registers and beats every period through ``Registry`` with two running trials while a
manager process lists them; a back-to-back burst then shows the beats/s ceiling of this host.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.redis_server (repo root)

from tests.redis_server import RedisServer

from servetune.cluster import keys
from servetune.cluster.models import (
    GPUInfo,
    Heartbeat,
    RunningTrial,
    WorkerInfo,
    utc_now,
)
from servetune.cluster.redis import connect
from servetune.cluster.registry import MISSED_BEATS, Registry
from servetune.settings import Settings

GPUS_PER_WORKER = 8
GPU_MEMORY_GIB = 79.6  # an 80 GB H100 as NVML reports it


@dataclass(frozen=True)
class Plan:
    """What one run does; ``start_at``/``end_at`` are wall-clock epochs (s) set by the parent."""

    url: str
    data_dir: str
    workers: int
    heartbeat_s: float
    seconds: float
    burst_s: float
    poll_s: float


def worker_id(n: int) -> str:
    """The id of simulated worker ``n`` (0-based)."""
    return f"sim-{n:04d}"


def worker_info(n: int) -> WorkerInfo:
    """A realistic registration of simulated worker ``n``: 8 idle H100s, 64 cores."""
    return WorkerInfo(
        id=worker_id(n),
        hostname=f"gpu-node-{n:04d}.cluster.local",
        alias=f"node{n}",
        address=f"10.0.{n // 250}.{n % 250 + 1}",
        pid=1000 + n,
        version="0.1.0",
        engines=["llamacpp", "vllm", "sglang"],
        deployments=["local", "docker"],
        gpus=gpu_state(n, random.Random(n)),
        cpu_count=64,
        memory_total_gib=503.5,
        max_parallel=GPUS_PER_WORKER,
        started_at=utc_now(),
    )


def gpu_state(n: int, rng: random.Random) -> list[GPUInfo]:
    """Eight H100s of worker ``n`` with loads that vary from beat to beat (as NVML's would)."""
    gpus = []
    for i in range(GPUS_PER_WORKER):
        used = round(rng.uniform(40.0, 78.0), 2)
        gpus.append(
            GPUInfo(
                index=i,
                name="NVIDIA H100 80GB HBM3",
                uuid=f"GPU-{n:08x}-{i:04x}-4a1b-9c2d-{n * 8 + i:012x}",
                memory_total_gib=GPU_MEMORY_GIB,
                memory_used_gib=used,
                memory_free_gib=round(GPU_MEMORY_GIB - used, 2),
                utilization_pct=float(rng.randint(60, 100)),
                temperature_c=float(rng.randint(45, 80)),
                power_w=round(rng.uniform(250.0, 690.0), 1),
            )
        )
    return gpus


def heartbeat(n: int, rng: random.Random, running: list[RunningTrial]) -> Heartbeat:
    """A heartbeat of worker ``n`` now: its GPUs, its running trials, host load."""
    return Heartbeat(
        worker_id=worker_id(n),
        sent_at=utc_now(),
        running=running,
        gpus=gpu_state(n, rng),
        memory_available_gib=round(rng.uniform(100.0, 400.0), 1),
        cpu_load_fraction=round(rng.uniform(0.1, 0.9), 3),
    )


def running_trials(n: int) -> list[RunningTrial]:
    """Two trials of 4 GPUs each (tensor parallel 4) running on worker ``n``."""
    started = utc_now() - timedelta(seconds=30)
    return [
        RunningTrial(
            job_id=f"trial-{n * 2 + k}-1",
            study_id=1 + n % 5,
            trial_id=n * 2 + k,
            number=n * 2 + k,
            started_at=started,
        )
        for k in range(2)
    ]


async def _simulate(plan: Plan, ids: list[int], conn: Connection) -> None:
    """Workers ``ids`` of this process: register + first beat, then (after the parent's go)
    beat every period at staggered phases, then a back-to-back burst; send back the samples."""
    settings = Settings(data_dir=Path(plan.data_dir), heartbeat_s=plan.heartbeat_s)
    clients = [connect(plan.url) for _ in ids]
    registries = [Registry(r, settings) for r in clients]
    rngs = {n: random.Random(n) for n in ids}
    running = {n: running_trials(n) for n in ids}
    for n, reg in zip(ids, registries, strict=True):
        await reg.register(worker_info(n))
        await reg.beat(heartbeat(n, rngs[n], running[n]))
    conn.send("ready")
    start_at, end_at = conn.recv()
    latencies_ms: list[float] = []
    late_ms: list[float] = []
    max_gap_s = 0.0

    async def paced(n: int, reg: Registry) -> None:
        nonlocal max_gap_s
        offset_s = plan.heartbeat_s * (n / plan.workers)
        k = 0
        last_done: float | None = None
        while True:
            due = start_at + offset_s + k * plan.heartbeat_s
            if due >= end_at:
                return
            await asyncio.sleep(max(0.0, due - time.time()))
            late_ms.append((time.time() - due) * 1000)
            hb = heartbeat(n, rngs[n], running[n])
            t0 = time.perf_counter()
            await reg.beat(hb)
            latencies_ms.append((time.perf_counter() - t0) * 1000)
            done = time.time()
            if last_done is not None:
                max_gap_s = max(max_gap_s, done - last_done)
            last_done = done
            k += 1

    await asyncio.gather(*(paced(n, reg) for n, reg in zip(ids, registries, strict=True)))
    conn.send({"latencies_ms": latencies_ms, "late_ms": late_ms, "max_gap_s": max_gap_s})
    burst_s = conn.recv()
    burst_beats = 0
    spans: list[tuple[float, float]] = []

    async def burst(n: int, reg: Registry) -> None:
        nonlocal burst_beats
        first = time.perf_counter()
        until = first + burst_s
        while time.perf_counter() < until:
            await reg.beat(heartbeat(n, rngs[n], running[n]))
            burst_beats += 1
        spans.append((first, time.perf_counter()))

    if burst_s > 0:
        await asyncio.gather(*(burst(n, reg) for n, reg in zip(ids, registries, strict=True)))
    for r in clients:
        await r.aclose()
    span_s = max(e for _, e in spans) - min(s for s, _ in spans) if spans else 0.0
    conn.send(burst_beats / span_s if span_s > 0 else 0.0)


def _worker_process(plan: Plan, ids: list[int], conn: Connection) -> None:
    asyncio.run(_simulate(plan, ids, conn))


async def _watch(plan: Plan, conn: Connection) -> None:
    """The manager: list the workers every ``poll_s`` between the parent's start and end; every
    worker must be seen (busy) each time."""
    settings = Settings(data_dir=Path(plan.data_dir), heartbeat_s=plan.heartbeat_s)
    r = connect(plan.url)
    registry = Registry(r, settings)
    await registry.workers()  # connect before the clock starts
    conn.send("ready")
    start_at, end_at = conn.recv()
    await asyncio.sleep(max(0.0, start_at - time.time()))
    list_ms: list[float] = []
    wrongly_offline: set[str] = set()
    offline_sightings = 0
    max_age_s = 0.0
    while time.time() < end_at:
        t0 = time.perf_counter()
        statuses = await registry.workers()
        list_ms.append((time.perf_counter() - t0) * 1000)
        seen = {s.info.id for s in statuses if s.state == "busy"}
        missing = {worker_id(n) for n in range(plan.workers)} - seen
        offline_sightings += len(missing)
        wrongly_offline |= missing
        now = utc_now()
        for s in statuses:
            if s.last_heartbeat is not None:
                max_age_s = max(max_age_s, (now - s.last_heartbeat.sent_at).total_seconds())
        await asyncio.sleep(plan.poll_s)
    await r.aclose()
    conn.send(
        {
            "list_ms": list_ms,
            "wrongly_offline": sorted(wrongly_offline),
            "offline_sightings": offline_sightings,
            "max_heartbeat_age_s": max_age_s,
        }
    )


def _manager_process(plan: Plan, conn: Connection) -> None:
    asyncio.run(_watch(plan, conn))


async def _quiet_listing(plan: Plan, calls: int) -> list[float]:
    """``Registry.workers()`` latencies (ms) with no beats arriving: its cost alone."""
    r = connect(plan.url)
    registry = Registry(r, Settings(data_dir=Path(plan.data_dir), heartbeat_s=plan.heartbeat_s))
    await registry.workers()
    list_ms = []
    for _ in range(calls):
        t0 = time.perf_counter()
        await registry.workers()
        list_ms.append((time.perf_counter() - t0) * 1000)
    await r.aclose()
    return list_ms


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` by nearest rank; NaN when empty."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _memory_usage_b(client: redis.Redis, key: str) -> int:
    return int(client.memory_usage(key, samples=0) or 0)


def measure(plan: Plan, processes: int) -> dict[str, Any]:
    """Run the simulation on the redis-server at ``plan.url``; returns every figure as a dict."""
    client = redis.Redis.from_url(plan.url)
    base_memory_b = int(client.info("memory")["used_memory"])
    ctx = multiprocessing.get_context("spawn")
    pipes: list[Connection] = []
    children = []
    for p in range(processes):
        here, there = ctx.Pipe()
        ids = list(range(p, plan.workers, processes))
        child = ctx.Process(target=_worker_process, args=(plan, ids, there), daemon=True)
        child.start()
        pipes.append(here)
        children.append(child)
    here, there = ctx.Pipe()
    manager = ctx.Process(target=_manager_process, args=(plan, there), daemon=True)
    manager.start()
    ready_deadline = time.monotonic() + 60
    for pipe in [*pipes, here]:
        if not pipe.poll(max(0.0, ready_deadline - time.monotonic())):
            raise SystemExit("the simulated workers did not register within 60 s")
        assert pipe.recv() == "ready"
    start_at = time.time() + 0.2
    end_at = start_at + plan.seconds
    for pipe in [*pipes, here]:
        pipe.send((start_at, end_at))
    samples = [pipe.recv() for pipe in pipes]
    watched = here.recv()
    info = client.info("memory")  # after the paced run: what a fleet this old holds
    quiet_ms = asyncio.run(_quiet_listing(plan, 20))
    history_len = int(client.llen(keys.gpu_history(worker_id(0))))
    one = {
        "info": _memory_usage_b(client, keys.worker_info(worker_id(0))),
        "heartbeat": _memory_usage_b(client, keys.heartbeat(worker_id(0))),
        "gpu_history": _memory_usage_b(client, keys.gpu_history(worker_id(0))),
    }
    cap = Settings(data_dir=Path(plan.data_dir)).gpu_history_len
    full_history_b = one["gpu_history"] / max(1, history_len) * cap
    per_worker_full_b = one["info"] + one["heartbeat"] + full_history_b
    for pipe in pipes:
        pipe.send(plan.burst_s)
    burst_per_s = sum(pipe.recv() for pipe in pipes)  # the processes burst at the same time
    for child in [*children, manager]:
        child.join(10)
    latencies = [x for s in samples for x in s["latencies_ms"]]
    late = [x for s in samples for x in s["late_ms"]]
    return {
        "workers": plan.workers,
        "gpus_per_worker": GPUS_PER_WORKER,
        "heartbeat_s": plan.heartbeat_s,
        "heartbeat_ttl_s": MISSED_BEATS * plan.heartbeat_s,
        "seconds": plan.seconds,
        "processes": processes,
        "host_cpus": os.cpu_count(),
        "host_load_1min": os.getloadavg()[0],
        "beats": len(latencies),
        "beats_per_s": len(latencies) / plan.seconds,
        "expected_beats_per_s": plan.workers / plan.heartbeat_s,
        "beat_p50_ms": percentile(latencies, 0.50),
        "beat_p99_ms": percentile(latencies, 0.99),
        "beat_max_ms": max(latencies, default=float("nan")),
        "beat_late_p99_ms": percentile(late, 0.99),
        "max_beat_gap_s": max(s["max_gap_s"] for s in samples),
        "burst_beats_per_s": burst_per_s if plan.burst_s > 0 else None,
        "workers_list_calls": len(watched["list_ms"]),
        "workers_list_p50_ms": percentile(watched["list_ms"], 0.50),
        "workers_list_p99_ms": percentile(watched["list_ms"], 0.99),
        "workers_list_quiet_p50_ms": percentile(quiet_ms, 0.50),
        "workers_list_quiet_p99_ms": percentile(quiet_ms, 0.99),
        "max_heartbeat_age_s": watched["max_heartbeat_age_s"],
        "wrongly_offline_workers": len(watched["wrongly_offline"]),
        "wrongly_offline_sightings": watched["offline_sightings"],
        "wrongly_offline_ids": watched["wrongly_offline"][:20],
        "redis_used_memory_mib": info["used_memory"] / 2**20,
        "redis_fleet_memory_mib": (info["used_memory"] - base_memory_b) / 2**20,
        "gpu_history_len_now": history_len,
        "gpu_history_cap": cap,
        "per_worker_kib": {k: v / 1024 for k, v in one.items()},
        "projected_full_history_mib": per_worker_full_b * plan.workers / 2**20,
    }


def print_table(r: dict[str, Any]) -> None:
    """Print the figures of ``measure`` as a small table."""
    print(
        f"heartbeats: {r['workers']} simulated workers × {r['gpus_per_worker']} GPUs, 2 trials "
        f"running each, beat every {r['heartbeat_s']:g} s for {r['seconds']:g} s "
        f"({r['processes']} process(es)), manager lists them every poll; host: "
        f"{r['host_cpus']} cores, load {r['host_load_1min']:.1f}"
    )
    rows = [
        ("beats handled/s", f"{r['beats_per_s']:.1f}", f"expected {r['expected_beats_per_s']:.0f}"),
        ("one beat p50 / p99", f"{r['beat_p50_ms']:.2f} / {r['beat_p99_ms']:.2f} ms", ""),
        ("beat start late p99", f"{r['beat_late_p99_ms']:.1f} ms", "(client event loop)"),
        (
            "longest gap between beats",
            f"{r['max_beat_gap_s']:.2f} s",
            f"TTL {r['heartbeat_ttl_s']:g} s",
        ),
        (
            "burst ceiling (back to back)",
            f"{r['burst_beats_per_s'] or 0:.0f} beats/s",
            "client-bound on this host",
        ),
        (
            "Registry.workers() p50 / p99",
            f"{r['workers_list_p50_ms']:.1f} / {r['workers_list_p99_ms']:.1f} ms",
            f"{r['workers_list_calls']} calls",
        ),
        (
            "… with no beats arriving",
            f"{r['workers_list_quiet_p50_ms']:.1f} / {r['workers_list_quiet_p99_ms']:.1f} ms",
            "20 calls",
        ),
        ("oldest heartbeat seen", f"{r['max_heartbeat_age_s']:.2f} s", ""),
        (
            "Redis memory (fleet / total)",
            f"{r['redis_fleet_memory_mib']:.1f} / {r['redis_used_memory_mib']:.1f} MiB",
            f"GPU history {r['gpu_history_len_now']} of {r['gpu_history_cap']}",
        ),
        ("… with full GPU histories", f"{r['projected_full_history_mib']:.1f} MiB", "projected"),
        (
            "workers wrongly seen offline",
            str(r["wrongly_offline_workers"]),
            f"{r['wrongly_offline_sightings']} sightings; must be 0",
        ),
    ]
    for name, value, note in rows:
        print(f"  {name:<30}{value:>22}  {note}")


def main() -> None:
    """Parse options, start a private redis-server, measure, print, write ``--output``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=200, help="simulated workers")
    parser.add_argument("--heartbeat-s", type=float, default=1.0, help="heartbeat period, s")
    parser.add_argument("--seconds", type=float, default=10.0, help="paced run length, s")
    parser.add_argument("--burst-s", type=float, default=2.0, help="back-to-back burst, s")
    parser.add_argument("--poll-s", type=float, default=0.2, help="manager's listing period, s")
    parser.add_argument("--processes", type=int, default=2, help="processes of simulated workers")
    parser.add_argument("--output", type=Path, help="write every figure as JSON to this file")
    args = parser.parse_args()
    for name in ("workers", "processes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    for name in ("heartbeat_s", "seconds", "poll_s"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")
    if args.burst_s < 0:
        parser.error("--burst-s must be ≥ 0 (0 skips the burst)")
    processes = min(args.processes, args.workers)
    with tempfile.TemporaryDirectory() as tmp_name:
        server = RedisServer(Path(tmp_name) / "redis")
        server.start()
        try:
            plan = Plan(
                url=server.url,
                data_dir=tmp_name,
                workers=args.workers,
                heartbeat_s=args.heartbeat_s,
                seconds=args.seconds,
                burst_s=args.burst_s,
                poll_s=args.poll_s,
            )
            result = measure(plan, processes)
        finally:
            server.kill()
    print_table(result)
    if args.output is not None:
        args.output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"  JSON written to {args.output}")
    if result["wrongly_offline_workers"]:
        sys.exit(f"{result['wrongly_offline_workers']} worker(s) were wrongly seen offline")


if __name__ == "__main__":
    main()
