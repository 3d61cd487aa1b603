"""Benchmark: servetune's TTFT error next to aiperf's and guidellm's, against one fake server.

Peers are never dependencies: install them in a scratch environment (e.g. ``uv venv /tmp/peers;
VIRTUAL_ENV=/tmp/peers uv pip install aiperf guidellm``) and pass its directory with ``--peers``.
For each concurrency each tool runs alone, pinned to one core, against a fresh fake server pinned
to another (first token after a known delay, then tokens a fixed gap apart, timings recorded).
``client error`` = the tool's mean TTFT − the server's own mean TTFT (first token written − request
read, from its ``/stats``): what the tool adds. aiperf and guidellm need a tokenizer: the tiny
model's, made locally. Prints a table; ``--json FILE`` writes the rows as well.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from bench_client import ITL_DELAY_MS, TTFT_DELAY_MS, fake_servers

from servetune.modelgen import make_model

CONCURRENCIES = ((1, 40), (16, 320), (64, 640), (256, 1024))


def _pinned(core: int) -> Any:
    return lambda: os.sched_setaffinity(0, {core})


def _run(argv: list[str], core: int, cwd: Path, timeout_s: float) -> float:
    """Run ``argv`` pinned to ``core``; its wall seconds. Raises RuntimeError when it fails."""
    t0 = time.perf_counter()
    out = subprocess.run(  # noqa: S603 - argv list of fixed tools
        argv,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        preexec_fn=_pinned(core),
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {out.returncode}: {out.stderr[-2000:]}")
    return time.perf_counter() - t0


def servetune(
    url: str, conc: int, n: int, work: Path, core: int, processes: int
) -> dict[str, float]:
    out = work / "servetune.json"
    argv = [sys.executable, "-m", "servetune", "bench", url, "--input-tokens", "10"]
    argv += ["--output-tokens", "16", "--concurrency", str(conc), "--num-requests", str(n)]
    argv += ["--warmup", str(min(conc, 8)), "--processes", str(processes), "--output", str(out)]
    _run(argv, core, work, 900)
    level = json.loads(out.read_text())["levels"][0]
    return {
        "ttft_mean_ms": level["ttft_ms"]["mean"],
        "ttft_p99_ms": level["ttft_ms"]["p99"],
        "requests_per_s": level["requests_per_s"],
        "completed": level["completed"],
    }


def aiperf(
    peers: Path, url: str, conc: int, n: int, work: Path, core: int, tok: Path
) -> dict[str, float]:
    art = work / "aiperf"
    argv = [str(peers / "bin" / "aiperf"), "profile", "-m", "fake-model", "-u", url]
    argv += ["--endpoint-type", "completions", "--streaming", "--concurrency", str(conc)]
    argv += ["--request-count", str(n), "--warmup-request-count", str(min(conc, 8))]
    argv += ["--isl", "10", "--osl", "16", "--artifact-dir", str(art), "--ui", "none"]
    argv += ["--tokenizer", str(tok), "--extra-inputs", "ignore_eos:true"]
    _run(argv, core, work, 1200)
    d = json.loads((art / "profile_export_aiperf.json").read_text())
    return {
        "ttft_mean_ms": d["time_to_first_token"]["avg"],
        "ttft_p99_ms": d["time_to_first_token"]["p99"],
        "requests_per_s": d["request_throughput"]["avg"],
        "completed": d["request_count"]["avg"],
    }


def guidellm(
    peers: Path, url: str, conc: int, n: int, work: Path, core: int, tok: Path
) -> dict[str, float]:
    out = work / "guidellm.json"
    argv = [str(peers / "bin" / "guidellm"), "run"]
    argv += ["--backend", f"kind=openai_http,target={url},request_format=/v1/completions"]
    argv += ["--profile", f"kind=concurrent,streams={conc}"]
    argv += ["--data", "kind=synthetic_text,prompt_tokens=10,output_tokens=16"]
    argv += ["--constraint", f"kind=max_requests,count={n}"]
    argv += ["--tokenizer", f"kind=hf_auto,model={tok}", "--output", f"kind=json,path={out}"]
    argv += ["--disable-console-interactive"]
    _run(argv, core, work, 1200)
    m = json.loads(out.read_text())["benchmarks"][0]["metrics"]
    ttft = m["time_to_first_token_ms"]["successful"]
    return {
        "ttft_mean_ms": ttft["mean"],
        "ttft_p99_ms": ttft["percentiles"]["p99"],
        "requests_per_s": m["requests_per_second"]["successful"]["mean"],
        "completed": ttft["count"],
    }


def main() -> None:
    """Run every tool at every concurrency and print the comparison."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--peers", type=Path, required=True, help="the peers' virtualenv")
    parser.add_argument("--scale", type=float, default=1.0, help="× the request counts")
    parser.add_argument("--json", type=Path, help="write the rows to this file too")
    parser.add_argument(
        "--tools", default="servetune,aiperf,guidellm", help="comma-separated subset"
    )
    parser.add_argument(
        "--servetune-processes",
        type=int,
        default=1,
        help="client processes of servetune (all on the one client core)",
    )
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    client_core, server_core = cpus[0], cpus[-1]
    tools = args.tools.split(",")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        tok = make_model("tiny", tmp / "model").tokenizer_dir
        flags = ["--first-token-delay-ms", str(TTFT_DELAY_MS), "--inter-token-delay-ms"]
        flags += [str(ITL_DELAY_MS), "--record-timings"]
        for conc, n0 in CONCURRENCIES:
            n = max(20, int(n0 * args.scale))
            for tool in tools:
                work = tmp / f"{tool}-{conc}"
                work.mkdir()
                with fake_servers({server_core}, 1, *flags) as (url, _):
                    try:
                        if tool == "servetune":
                            r = servetune(url, conc, n, work, client_core, args.servetune_processes)
                        elif tool == "aiperf":
                            r = aiperf(args.peers, url, conc, n, work, client_core, tok)
                        else:
                            r = guidellm(args.peers, url, conc, n, work, client_core, tok)
                    except (RuntimeError, subprocess.TimeoutExpired, OSError, KeyError) as e:
                        print(f"{tool} at {conc}: {e}", file=sys.stderr)
                        continue
                    timings = httpx.get(url + "/stats").json()["timings"]
                server_ttft = statistics.fmean(
                    (t["first_token_s"] - t["received_s"]) * 1e3 for t in timings
                )
                row = {"tool": tool, "concurrency": conc, "requests": n, **r}
                row["server_ttft_mean_ms"] = server_ttft
                row["client_error_mean_ms"] = r["ttft_mean_ms"] - server_ttft
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    print(
        f"TTFT error per tool (one core each; server first-token delay {TTFT_DELAY_MS:g} ms, "
        f"16 tokens {ITL_DELAY_MS:g} ms apart; load average {os.getloadavg()[0]:.1f})"
    )
    print(
        f"{'conc':>5} {'tool':<10} {'reqs':>6} {'done':>6} {'TTFT mean':>9} {'p99':>8} "
        f"{'server':>8} {'client err':>10} {'req/s':>8}"
    )
    for r in rows:
        print(
            f"{r['concurrency']:>5} {r['tool']:<10} {r['requests']:>6} {r['completed']:>6.0f} "
            f"{r['ttft_mean_ms']:9.2f} {r['ttft_p99_ms']:8.2f} {r['server_ttft_mean_ms']:8.2f} "
            f"{r['client_error_mean_ms']:10.2f} {r['requests_per_s']:8.1f}"
        )


if __name__ == "__main__":
    main()
