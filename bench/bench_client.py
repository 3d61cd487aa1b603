"""Benchmark: the built-in client's own capacity and its TTFT measurement error (fake server).

Each part runs twice: with one client process pinned to one core (the fake server pinned to
another), and with as many client processes as the machine has cores (as many fake server
processes sharing one port with SO_REUSEPORT, nothing pinned).
(a) capacity: zero server delays; requests/s and streamed tokens/s, each side's CPU use (the side
near 100 % of its cores is the bottleneck) and the client's rate per core of CPU it used.
(b) TTFT error: the server waits a known first-token delay; measured TTFT minus that delay, and
the client's own share (from the server's timestamps), at 1, 16, 64 and 256 in flight.
Prints tables; ``--json`` prints JSON (``--json FILE`` writes it to FILE as well as the tables).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx

from servetune.bench.builtin import BuiltinClient, servetune_version
from servetune.bench.prompts import Prompt
from servetune.core.metrics import percentile, summarize
from servetune.core.spec import Workload
from servetune.engines.base import Endpoint

TTFT_DELAY_MS = 100.0
ITL_DELAY_MS = 5.0
CONCURRENCIES = ((1, 40), (16, 320), (64, 640), (256, 1024))
"""(requests in flight, measured requests) of the TTFT error part."""


def _cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def _proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    """CPU seconds of this process plus its reaped children (the client processes)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


@contextlib.contextmanager
def fake_servers(cores: set[int] | None, n: int, *flags: str) -> Iterator[tuple[str, list[int]]]:
    """``n`` fake server processes on one port (SO_REUSEPORT), pinned to ``cores`` if given."""
    procs: list[subprocess.Popen[str]] = []
    argv = [sys.executable, "-m", "servetune.testing.fake_server", "--reuse-port", *flags]
    try:
        url = ""
        for i in range(n):
            port = url.rsplit(":", 1)[1] if i else "0"
            p = subprocess.Popen([*argv, "--port", port], stdout=subprocess.PIPE, text=True)  # noqa: S603
            procs.append(p)
            if cores is not None:
                os.sched_setaffinity(p.pid, cores)
            assert p.stdout is not None
            line = p.stdout.readline()
            if not line.startswith("listening on "):
                raise RuntimeError(f"fake server did not start: {line!r}")
            url = line.split()[-1]
        yield url, [p.pid for p in procs]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stdout is not None:
                p.stdout.close()


def _prompts(n: int, start: int = 0) -> list[Prompt]:
    text = "a short synthetic prompt for the client benchmark"
    return [Prompt(f"{i}. {text}", 10) for i in range(start, start + n)]


def capacity(
    url: str,
    server_pids: list[int],
    processes: int,
    output_tokens: int,
    concurrency: int,
    requests: int,
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
    client = BuiltinClient(processes=processes)
    server_cpu0 = sum(_proc_cpu_s(p) for p in server_pids)
    client_cpu0 = _own_cpu_s()
    results = asyncio.run(client.run(Endpoint(url, "fake-model"), wl, prompts))
    level, records = results[0]
    m = summarize(level, records)
    client_cpu = _own_cpu_s() - client_cpu0
    server_cpu = sum(_proc_cpu_s(p) for p in server_pids) - server_cpu0
    # Rates, CPU shares and CPU per request over the measured phase only (process start-up and
    # warm-up excluded); client_cpu (everything, start-up included) is reported as well.
    span = m.duration_s
    load = client.client_load[0]
    sent = m.completed + m.failed
    return {
        "processes": processes,
        "output_tokens": output_tokens,
        "concurrency": concurrency,
        "requests": requests,
        "completed": m.completed,
        "failed": m.failed,
        "requests_per_s": m.requests_per_s,
        "tokens_per_s": m.output_tokens_per_s,
        "client_cpu_busiest_pct": 100 * load.cpu_fraction,
        "server_cpu_pct": 100 * server_cpu / span if span else 0.0,
        "client_cpu_s_total": client_cpu,
        "client_cpu_s_measured": load.cpu_s,
        "requests_per_client_cpu_s": sent / load.cpu_s if load.cpu_s else 0.0,
        "tokens_per_client_cpu_s": sent * output_tokens / load.cpu_s if load.cpu_s else 0.0,
        "client_loop_lag_p99_ms": load.loop_lag_p99_ms,
    }


def ttft_error(
    url: str, processes: int, concurrency: int, requests: int, start: int
) -> dict[str, Any]:
    """Measured TTFT minus the server's first-token delay, over one level, and the client's part.

    ``ttft_error`` = measured TTFT − the configured delay (includes the fake server's own timer
    lateness). ``client_error`` = measured TTFT − (first token written − request read), from the
    server's own timestamps (``GET /stats``; CLOCK_MONOTONIC in every process): the time the
    client and the network add. With one process each record is matched to its prompt's server
    timing (``send_lag`` before the server has the request, ``receive_lag`` after the first token
    left it, p99 and max); with several, records are merged in send order and only the means of
    both sides are compared (mean client error = mean TTFT − mean server TTFT).
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
    client = BuiltinClient(processes=processes)
    results = asyncio.run(client.run(Endpoint(url, "fake-model"), wl, prompts))
    level, records = results[0]
    m = summarize(level, records)
    timings = httpx.get(url + "/stats").json()["timings"]
    measured = [r for r in records if r.ok and not r.warmup]
    ttft = [t for r in measured if (t := r.ttft_ms()) is not None]
    ttft_err = sorted(t - TTFT_DELAY_MS for t in ttft)
    itl = [g for r in measured for g in r.itl_ms()]
    out: dict[str, Any] = {
        "processes": processes,
        "concurrency": concurrency,
        "requests": requests,
        "completed": m.completed,
        "failed": m.failed,
        "ttft_error_mean_ms": statistics.fmean(ttft_err),
        "ttft_error_p99_ms": percentile(ttft_err, 99),
        "itl_error_mean_ms": statistics.fmean(itl) - ITL_DELAY_MS,
        "client_loop_lag_p99_ms": client.client_load[0].loop_lag_p99_ms,
        "client_cpu_busiest_pct": 100 * client.client_load[0].cpu_fraction,
    }
    server = {t["prompt_start"]: t for t in timings}
    if processes == 1 and len(records) == len(prompts):
        client_err, send_lag, receive_lag = [], [], []
        for prompt, r in zip(prompts, records, strict=True):  # issue order = prompt order
            if r.warmup or not r.ok or not r.chunk_times_s:
                continue
            t = server[prompt.text[:64]]
            send_lag.append((t["received_s"] - r.sent_s) * 1e3)
            receive_lag.append((r.chunk_times_s[0] - t["first_token_s"]) * 1e3)
            client_err.append(send_lag[-1] + receive_lag[-1])
        client_err.sort()
        out |= {
            "client_error_mean_ms": statistics.fmean(client_err),
            "client_error_p99_ms": percentile(client_err, 99),
            "client_error_max_ms": client_err[-1],
            "send_lag_mean_ms": statistics.fmean(send_lag),
            "receive_lag_mean_ms": statistics.fmean(receive_lag),
        }
    else:
        wanted = {p.text[:64] for p in prompts[warm:]}
        server_ttft = [
            (t["first_token_s"] - t["received_s"]) * 1e3
            for key, t in server.items()
            if key in wanted
        ]
        out["client_error_mean_ms"] = statistics.fmean(ttft) - statistics.fmean(server_ttft)
    return out


def _f(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _run_all(cpus: list[int], scale: float) -> dict[str, Any]:
    out: dict[str, Any] = {
        "cpus": len(cpus),
        "python": sys.version.split()[0],
        "servetune": servetune_version(),
        "httpx": httpx.__version__,
        "load_average": os.getloadavg(),
        "ttft_delay_ms": TTFT_DELAY_MS,
        "itl_delay_ms": ITL_DELAY_MS,
        "capacity": [],
        "ttft_error": [],
    }
    many = len(cpus)
    setups: list[tuple[int, set[int] | None, set[int] | None, int]] = [
        (1, {cpus[0]}, {cpus[-1]}, 1)
    ]
    if many > 1:
        setups.append((many, None, None, many))
    for processes, client_cores, server_cores, servers in setups:
        os.sched_setaffinity(0, client_cores or set(cpus))
        with fake_servers(server_cores, servers) as (url, pids):
            for tokens, conc, n in ((1, 32, 3000), (16, 32, 2000), (512, 16, 200)):
                c = conc * processes
                out["capacity"].append(capacity(url, pids, processes, tokens, c, int(n * scale)))
        flags = ["--first-token-delay-ms", str(TTFT_DELAY_MS)]
        flags += ["--inter-token-delay-ms", str(ITL_DELAY_MS), "--record-timings"]
        # One server process: its /stats holds every request's timing.
        with fake_servers(server_cores, 1, *flags) as (url, _):
            for i, (c, n) in enumerate(CONCURRENCIES):
                row = ttft_error(url, processes, c, max(20, int(n * scale)), 100_000 * i)
                out["ttft_error"].append(row)
    os.sched_setaffinity(0, set(cpus))
    return out


def _print(out: dict[str, Any]) -> None:
    print(
        f"servetune {out['servetune']} built-in client, {out['cpus']} CPUs, load average "
        f"{out['load_average'][0]:.1f} at the start (other programs share the cores)\n"
    )
    print("(a) capacity, zero server delays (1 process: client and server pinned to a core each)")
    print(
        f"{'procs':>5} {'out tok':>7} {'conc':>5} {'reqs':>6} {'failed':>6} {'req/s':>8} "
        f"{'tok/s':>9} {'req/CPU-s':>9} {'tok/CPU-s':>9} {'client CPU':>10} {'server CPU':>10}"
    )
    for r in out["capacity"]:
        print(
            f"{r['processes']:>5} {r['output_tokens']:>7} {r['concurrency']:>5} "
            f"{r['requests']:>6} {r['failed']:>6} {r['requests_per_s']:8.0f} "
            f"{r['tokens_per_s']:9.0f} {r['requests_per_client_cpu_s']:9.0f} "
            f"{r['tokens_per_client_cpu_s']:9.0f} {r['client_cpu_busiest_pct']:9.0f}% "
            f"{r['server_cpu_pct']:9.0f}%"
        )
    print(
        "  req/CPU-s, tok/CPU-s: requests (tokens) per second of client CPU = the rate one "
        "core can drive;\n  client CPU: the busiest client process; server CPU: all server "
        "processes (100 % = one core)"
    )
    print(
        f"\n(b) TTFT measurement error (first-token delay {TTFT_DELAY_MS:g} ms, then 16 tokens "
        f"{ITL_DELAY_MS:g} ms apart), ms"
    )
    print("  meas−delay: measured TTFT − configured delay (includes the server's own lateness)")
    print("  client: measured TTFT − (first token written − request read), server timestamps")
    print("          = send lag (sent_s → server has the request) + receive lag (written → seen)")
    print(
        f"{'procs':>5} {'conc':>5} {'reqs':>6} {'failed':>6} {'meas−delay':>10} {'p99':>7} "
        f"{'client':>7} {'p99':>7} {'max':>7} {'send lag':>8} {'recv lag':>8} {'ITL err':>8} "
        f"{'lag p99':>7}"
    )
    for r in out["ttft_error"]:
        print(
            f"{r['processes']:>5} {r['concurrency']:>5} {r['requests']:>6} {r['failed']:>6} "
            f"{r['ttft_error_mean_ms']:10.2f} {r['ttft_error_p99_ms']:7.2f} "
            f"{r['client_error_mean_ms']:7.2f} {_f(r.get('client_error_p99_ms'), '7.2f'):>7} "
            f"{_f(r.get('client_error_max_ms'), '7.2f'):>7} "
            f"{_f(r.get('send_lag_mean_ms'), '8.2f'):>8} "
            f"{_f(r.get('receive_lag_mean_ms'), '8.2f'):>8} {r['itl_error_mean_ms']:8.3f} "
            f"{r['client_loop_lag_p99_ms']:7.2f}"
        )
    print("  with several processes only the means of both sides are compared (see ttft_error)")


def main() -> None:
    """Run both parts for one process and for one per core (a few minutes) and print them."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--json", nargs="?", const="-", metavar="FILE", help="JSON to stdout, or to FILE"
    )
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    args = parser.parse_args()
    out = _run_all(_cpus(), 0.2 if args.quick else 1.0)
    if args.json is not None:
        text = json.dumps(out, indent=2)
        if args.json == "-":
            print(text)
            return
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    _print(out)


if __name__ == "__main__":
    main()
