"""Benchmark: the built-in client's own capacity and its TTFT measurement error (fake server).

The client runs pinned to one core, the fake server in a separate process pinned to another.
(a) capacity: zero server delays, requests/s and streamed tokens/s, with each side's CPU use (the
side near 100 % is the bottleneck). (b) TTFT error: the server waits a known first-token delay;
measured TTFT minus that delay, at a few concurrencies. Prints a table; ``--json`` prints JSON
(``--json FILE`` writes it to FILE as well as printing the table).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from servetune.bench.builtin import BuiltinClient
from servetune.bench.prompts import Prompt
from servetune.core.metrics import percentile, summarize
from servetune.core.spec import Workload
from servetune.engines.base import Endpoint

TTFT_DELAY_MS = 100.0
ITL_DELAY_MS = 5.0


def _cores() -> tuple[int, int]:
    """Two distinct cores for client and server (the same one twice on a 1-core machine)."""
    cpus = sorted(os.sched_getaffinity(0))
    return cpus[0], cpus[1 if len(cpus) > 1 else 0]


def _proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def fake_server(core: int, *flags: str) -> Iterator[tuple[str, int]]:
    """Start ``python -m servetune.testing.fake_server`` pinned to ``core``; yield (url, pid)."""
    argv = [sys.executable, "-m", "servetune.testing.fake_server", "--port", "0", *flags]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)  # noqa: S603 - fixed argv
    try:
        os.sched_setaffinity(proc.pid, {core})
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("listening on "):
            raise RuntimeError(f"fake server did not start: {line!r}")
        yield line.split()[-1], proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _prompts(n: int, start: int = 0) -> list[Prompt]:
    text = "a short synthetic prompt for the client benchmark"
    return [Prompt(f"{i}. {text}", 10) for i in range(start, start + n)]


def capacity(
    url: str, server_pid: int, output_tokens: int, concurrency: int, requests: int
) -> dict[str, Any]:
    """One closed-loop level against the zero-delay server: throughput, CPU use of each side."""
    wl = Workload(
        input_tokens=10,
        output_tokens=output_tokens,
        concurrency=[concurrency],
        num_requests=requests,
        warmup_requests=concurrency,
    )
    prompts = _prompts(requests + concurrency)
    client_cpu0, server_cpu0, t0 = time.process_time(), _proc_cpu_s(server_pid), time.perf_counter()
    results = asyncio.run(BuiltinClient().run(Endpoint(url, "fake-model"), wl, prompts))
    wall = time.perf_counter() - t0
    client_cpu, server_cpu = (
        time.process_time() - client_cpu0,
        _proc_cpu_s(server_pid) - server_cpu0,
    )
    level, records = results[0]
    m = summarize(level, records)
    return {
        "output_tokens": output_tokens,
        "concurrency": concurrency,
        "requests": requests,
        "completed": m.completed,
        "failed": m.failed,
        "failed_by_kind": m.failed_by_kind,
        "requests_per_s": m.requests_per_s,
        "tokens_per_s": m.output_tokens_per_s,
        "client_cpu_pct": 100 * client_cpu / wall,
        "server_cpu_pct": 100 * server_cpu / wall,
        "client_cpu_us_per_token": 1e6
        * client_cpu
        / max(1, (m.completed + m.warmup) * output_tokens),
    }


def ttft_error(url: str, concurrency: int, requests: int, start: int) -> dict[str, Any]:
    """Measured TTFT minus the server's first-token delay, over one level, and its two parts.

    ``ttft_error`` = measured TTFT − the configured delay (includes the fake server's own timer
    lateness). ``client_error`` = measured TTFT − (first token written − request read), from the
    server's own timestamps (``GET /stats``; same CLOCK_MONOTONIC in both processes): the time
    the client and the network add, ``send_lag`` before the server has the request plus
    ``receive_lag`` after the first token left the server.
    """
    warm = min(concurrency, 8)
    wl = Workload(
        input_tokens=10,
        output_tokens=16,
        concurrency=[concurrency],
        num_requests=requests,
        warmup_requests=warm,
    )
    prompts = _prompts(requests + warm, start)
    results = asyncio.run(BuiltinClient().run(Endpoint(url, "fake-model"), wl, prompts))
    level, records = results[0]
    m = summarize(level, records)
    server = {t["prompt_start"]: t for t in httpx.get(url + "/stats").json()["timings"]}
    ttft_err, client_err, send_lag, receive_lag = [], [], [], []
    for prompt, r in zip(prompts, records, strict=True):  # records are in issue (= prompt) order
        ttft = r.ttft_ms()
        if r.warmup or not r.ok or ttft is None:
            continue
        t = server[prompt.text[:64]]
        ttft_err.append(ttft - TTFT_DELAY_MS)
        send_lag.append((t["received_s"] - r.sent_s) * 1e3)
        receive_lag.append((r.chunk_times_s[0] - t["first_token_s"]) * 1e3)
        client_err.append(send_lag[-1] + receive_lag[-1])
    itl = [g for r in records if r.ok and not r.warmup for g in r.itl_ms()]
    ttft_err.sort()
    client_err.sort()
    return {
        "concurrency": concurrency,
        "requests": requests,
        "completed": m.completed,
        "failed": m.failed,
        "ttft_error_mean_ms": statistics.fmean(ttft_err),
        "ttft_error_p99_ms": percentile(ttft_err, 99),
        "client_error_mean_ms": statistics.fmean(client_err),
        "client_error_p99_ms": percentile(client_err, 99),
        "client_error_max_ms": client_err[-1],
        "send_lag_mean_ms": statistics.fmean(send_lag),
        "receive_lag_mean_ms": statistics.fmean(receive_lag),
        "itl_error_mean_ms": statistics.fmean(itl) - ITL_DELAY_MS,
    }


def main() -> None:
    """Run both parts (about 30-60 s) and print the results."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--json", nargs="?", const="-", metavar="FILE", help="JSON to stdout, or to FILE"
    )
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    args = parser.parse_args()
    client_core, server_core = _cores()
    os.sched_setaffinity(0, {client_core})
    scale = 0.2 if args.quick else 1.0
    out: dict[str, Any] = {
        "client_core": client_core,
        "server_core": server_core,
        "python": sys.version.split()[0],
        "httpx": httpx.__version__,
        "ttft_delay_ms": TTFT_DELAY_MS,
        "itl_delay_ms": ITL_DELAY_MS,
    }
    with fake_server(server_core) as (url, pid):
        out["capacity"] = [
            capacity(url, pid, 1, 32, int(3000 * scale)),
            capacity(url, pid, 16, 32, int(2000 * scale)),
            capacity(url, pid, 512, 16, int(200 * scale)),
        ]
    flags = [
        "--first-token-delay-ms",
        str(TTFT_DELAY_MS),
        "--inter-token-delay-ms",
        str(ITL_DELAY_MS),
        "--record-timings",
    ]
    with fake_server(server_core, *flags) as (url, _):
        out["ttft_error"] = [
            ttft_error(url, c, max(20, int(n * scale)), start=100_000 * i)
            for i, (c, n) in enumerate(((1, 40), (16, 320), (64, 640), (256, 1024)))
        ]
    if args.json is not None:
        text = json.dumps(out, indent=2)
        if args.json == "-":
            print(text)
            return
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(
        f"built-in client capacity (httpx {out['httpx']}, client on core {client_core}, "
        f"fake server on core {server_core}, zero delays)"
    )
    print(
        f"{'out tok':>7} {'conc':>5} {'reqs':>6} {'failed':>6} {'req/s':>8} {'tok/s':>9} "
        f"{'client CPU':>10} {'server CPU':>10} {'client µs/tok':>13}"
    )
    for r in out["capacity"]:
        print(
            f"{r['output_tokens']:>7} {r['concurrency']:>5} {r['requests']:>6} {r['failed']:>6} "
            f"{r['requests_per_s']:8.0f} {r['tokens_per_s']:9.0f} {r['client_cpu_pct']:9.0f}% "
            f"{r['server_cpu_pct']:9.0f}% {r['client_cpu_us_per_token']:13.1f}"
        )
    print(
        f"\nTTFT measurement error (server first-token delay {TTFT_DELAY_MS:g} ms, then 16 tokens "
        f"{ITL_DELAY_MS:g} ms apart), ms"
    )
    print(
        "  measured−delay: measured TTFT − configured delay (includes the server's timer lateness)"
    )
    print("  client: measured TTFT − (first token written − request read), server timestamps;")
    print("          = send lag (sent_s → server has the request) + receive lag (written → seen)")
    print(
        f"{'conc':>5} {'reqs':>6} {'failed':>6} {'meas−delay':>10} {'p99':>7} "
        f"{'client':>7} {'p99':>7} "
        f"{'max':>7} {'send lag':>8} {'recv lag':>8} {'ITL err':>8}"
    )
    for r in out["ttft_error"]:
        print(
            f"{r['concurrency']:>5} {r['requests']:>6} {r['failed']:>6} "
            f"{r['ttft_error_mean_ms']:10.2f} "
            f"{r['ttft_error_p99_ms']:7.2f} {r['client_error_mean_ms']:7.2f} "
            f"{r['client_error_p99_ms']:7.2f} {r['client_error_max_ms']:7.2f} "
            f"{r['send_lag_mean_ms']:8.2f} {r['receive_lag_mean_ms']:8.2f} "
            f"{r['itl_error_mean_ms']:8.3f}"
        )


if __name__ == "__main__":
    main()
