"""Benchmark: log records/s through RedisLogHandler → a private redis-server → a live subscriber.

A subscriber in its own process (as the manager is) timestamps each record's arrival on the live
channel; the delay is arrival time − the record's own time. Goal: ≥ 20,000 records/s, p99 < 250 ms.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import redis

from servetune.cluster import keys
from servetune.cluster.logs import RedisLogHandler, parse_live
from servetune.settings import Settings

WORKER_ID = "bench-worker"


def _start_redis(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("bench_logs needs redis-server on PATH (Debian: apt-get install redis-server)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(argv, cwd=folder, stdout=subprocess.DEVNULL)  # noqa: S603
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(200):
        try:
            if redis.Redis.from_url(url).ping():
                return proc, url
        except redis.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    sys.exit(f"redis-server on port {port} did not answer")


def _subscribe(url: str, expected: int, timeout_s: float, validate: bool, conn: Connection) -> None:
    """Receive ``expected`` records on the live channel; send back arrival stats.

    ``validate``: parse each message into ``LogRecord`` models (``parse_live``) rather than plain
    JSON (what a manager that forwards the payload to its WebSocket clients does).
    """
    pubsub = redis.Redis.from_url(url).pubsub()
    pubsub.subscribe(keys.worker_logs_live(WORKER_ID))
    pubsub.get_message(timeout=5)  # the subscribe confirmation
    conn.send("ready")
    delays_ms: list[float] = []
    first = last = None
    deadline = time.monotonic() + timeout_s
    while len(delays_ms) < expected and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.5)
        if not message or message["type"] != "message":
            continue
        arrived = time.time()
        if validate:
            stamps = [r.at.timestamp() for r in parse_live(message["data"])]
        else:
            stamps = [
                datetime.fromisoformat(r["at"]).timestamp() for r in json.loads(message["data"])
            ]
        first = first if first is not None else arrived
        last = arrived
        delays_ms += [(arrived - at) * 1000 for at in stamps]
    conn.send({"received": len(delays_ms), "first": first, "last": last, "delays_ms": delays_ms})


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _run(
    url: str, tmp: Path, n: int, rate: float | None, queue_max: int, validate: bool
) -> dict[str, Any]:
    """Emit ``n`` records (at ``rate`` per s, or as fast as possible) and measure delivery."""
    here, there = multiprocessing.Pipe()
    subscriber = multiprocessing.Process(target=_subscribe, args=(url, n, 60.0, validate, there))
    subscriber.start()
    assert here.recv() == "ready"
    settings = Settings(data_dir=tmp, log_queue_max=queue_max)
    handler = RedisLogHandler(url, WORKER_ID, settings)
    log = logging.getLogger("servetune.bench_logs")
    log.propagate = False
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    emit_ns: list[int] = []
    started = time.time()
    t0 = time.perf_counter()
    for i in range(n):
        if rate is not None and i % 50 == 0:
            ahead_s = t0 + i / rate - time.perf_counter()
            if ahead_s > 0:
                time.sleep(ahead_s)
        before = time.perf_counter_ns()
        log.info("request %d done in %.1f ms", i, 12.5)
        emit_ns.append(time.perf_counter_ns() - before)
    emitted_s = time.perf_counter() - t0
    stats = here.recv()
    subscriber.join()
    dropped = handler.dropped
    log.removeHandler(handler)
    handler.close()
    span_s = (stats["last"] or started) - started
    return {
        "records": n,
        "target_per_s": rate,
        "emitted_per_s": n / emitted_s,
        "delivered": stats["received"],
        "dropped": dropped,
        "delivered_per_s": stats["received"] / span_s if span_s > 0 else float("nan"),
        "delay_p50_ms": _percentile(stats["delays_ms"], 0.50),
        "delay_p99_ms": _percentile(stats["delays_ms"], 0.99),
        "delay_max_ms": max(stats["delays_ms"], default=float("nan")),
        "emit_p99_us": _percentile([x / 1000 for x in emit_ns], 0.99),
    }


def main() -> None:
    """Run a paced run at the goal rate and an unpaced burst; print a table (or JSON)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=20_000, help="paced run, records/s")
    parser.add_argument("--seconds", type=float, default=3.0, help="paced run length, s")
    parser.add_argument("--burst", type=int, default=100_000, help="records of the unpaced run")
    parser.add_argument(
        "--validate", action="store_true", help="the subscriber builds LogRecord models"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        proc, url = _start_redis(tmp)
        try:
            n = int(args.rate * args.seconds)
            paced = _run(url, tmp, n, args.rate, 10_000, args.validate)
            burst = _run(url, tmp, args.burst, None, args.burst, args.validate)
        finally:
            proc.kill()
            proc.wait()
    if args.json:
        print(json.dumps({"paced": paced, "burst": burst}, indent=2))
        return
    reader = "LogRecord models" if args.validate else "plain JSON"
    print(f"log shipping: RedisLogHandler → redis-server → live subscriber ({reader}, own process)")
    print(
        f"{'run':<8}{'records':>9}{'emitted/s':>11}{'delivered/s':>13}{'dropped':>9}"
        f"{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'emit p99 µs':>13}"
    )
    for name, r in (("paced", paced), ("burst", burst)):
        print(
            f"{name:<8}{r['records']:>9}{r['emitted_per_s']:>11.0f}{r['delivered_per_s']:>13.0f}"
            f"{r['dropped']:>9}{r['delay_p50_ms']:>9.1f}{r['delay_p99_ms']:>9.1f}"
            f"{r['delay_max_ms']:>9.1f}{r['emit_p99_us']:>13.1f}"
        )
    ok = paced["delivered"] == paced["records"] and paced["delay_p99_ms"] < 250
    ok = ok and burst["delivered_per_s"] >= 20_000
    print(
        f"goal (≥ 20,000 records/s, p99 < 250 ms at {args.rate:.0f}/s, nothing dropped): "
        f"{'met' if ok else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
