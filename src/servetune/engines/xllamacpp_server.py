"""A ``llama-server`` stand-in: the same CLI flags, served by llama.cpp in the xllamacpp wheel.

Run ``python -m servetune.engines.xllamacpp_server --model M.gguf --port 8080 [flags]``;
it exits 0 on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

logger = logging.getLogger("servetune.engines.xllamacpp_server")

CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
"""KV cache types llama-server accepts for --cache-type-k/-v (llama.cpp tools/server/README.md)."""

LOAD_MODES = ("auto", "none", "mmap", "mlock", "mmap+mlock", "dio")
"""Values of --load-mode (llama.cpp tools/server/README.md)."""

_ON = ("on", "enabled", "true", "1")
_OFF = ("off", "disabled", "false", "0")
_AUTO = ("auto", "-1")


def _on_off_auto(flag: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        v = value.lower()
        if v in _ON:
            return "on"
        if v in _OFF:
            return "off"
        if v in _AUTO:
            return "auto"
        raise argparse.ArgumentTypeError(
            f"unknown value for {flag}: '{value}' (use on, off or auto)"
        )

    return parse


def _on_off(flag: str) -> Callable[[str], bool]:
    def parse(value: str) -> bool:
        v = value.lower()
        if v in _ON:
            return True
        if v in _OFF:
            return False
        raise argparse.ArgumentTypeError(f"unknown value for {flag}: '{value}' (use on or off)")

    return parse


def _gpu_layers(value: str) -> int:
    """'auto' → -1, 'all' → -2, else an integer (xllamacpp: -1 is auto, ≤ -2 is all)."""
    v = value.lower()
    if v == "auto":
        return -1
    if v == "all":
        return -2
    try:
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid value: '{value}' (a number, 'auto' or 'all')"
        ) from None


def _bool_pair(
    ap: argparse.ArgumentParser, dest: str, on: Sequence[str], off: Sequence[str], help_: str
) -> None:
    ap.add_argument(*on, dest=dest, action="store_true", default=None, help=help_)
    ap.add_argument(*off, dest=dest, action="store_false", default=None, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: llama-server's names, short forms and defaults (tools/server/README.md).

    Flags left unset keep xllamacpp's ``CommonParams`` defaults, which are llama.cpp's own
    (common/common.h), except ``--parallel`` whose default is -1 (auto) as in llama-server.
    """
    ap = argparse.ArgumentParser(
        prog="python -m servetune.engines.xllamacpp_server",
        usage="%(prog)s --model FILE [llama-server flags]",
        description="llama.cpp's HTTP server (llama-server flags) from the xllamacpp wheel.",
        allow_abbrev=False,
    )
    ap.add_argument("-m", "--model", required=True, help="model path (GGUF)")
    ap.add_argument(
        "--host", default="127.0.0.1", help="IP addresses to listen on, comma-separated"
    )
    ap.add_argument("--port", type=int, default=8080, help="port to listen on (default: 8080)")
    ap.add_argument("-a", "--alias", help="model name aliases, comma-separated (used by the API)")
    ap.add_argument(
        "-t", "--threads", type=int, help="CPU threads for generation (default: -1, auto)"
    )
    ap.add_argument(
        "-tb", "--threads-batch", type=int, help="threads for batch/prompt (default: --threads)"
    )
    ap.add_argument("--threads-http", type=int, help="threads for HTTP requests (default: -1)")
    ap.add_argument(
        "-np", "--parallel", type=int, default=-1, help="server slots (default: -1, auto)"
    )
    ap.add_argument(
        "-b", "--batch-size", type=int, help="logical maximum batch size (default: 2048)"
    )
    ap.add_argument(
        "-ub", "--ubatch-size", type=int, help="physical maximum batch size (default: 512)"
    )
    ap.add_argument("-c", "--ctx-size", type=int, help="context size (default: 0 = from model)")
    ap.add_argument(
        "-n",
        "--predict",
        "--n-predict",
        dest="n_predict",
        type=int,
        help="tokens to predict (default: -1, infinity)",
    )
    ap.add_argument(
        "-fa",
        "--flash-attn",
        nargs="?",
        const="on",
        type=_on_off_auto("--flash-attn"),
        help="flash attention: on, off or auto (default: auto)",
    )
    ap.add_argument(
        "-ctk", "--cache-type-k", choices=CACHE_TYPES, help="KV cache type for K (default: f16)"
    )
    ap.add_argument(
        "-ctv", "--cache-type-v", choices=CACHE_TYPES, help="KV cache type for V (default: f16)"
    )
    _bool_pair(
        ap,
        "cont_batching",
        ("-cb", "--cont-batching"),
        ("-nocb", "--no-cont-batching"),
        "continuous batching (default: enabled; --no-cont-batching disables)",
    )
    ap.add_argument(
        "-ngl",
        "--gpu-layers",
        "--n-gpu-layers",
        dest="n_gpu_layers",
        type=_gpu_layers,
        help="layers to store in VRAM: a number, 'auto' or 'all' (default: auto)",
    )
    ap.add_argument(
        "-lm", "--load-mode", choices=LOAD_MODES, help="model loading mode (default: auto)"
    )
    ap.add_argument(
        "--mlock",
        action="store_true",
        default=None,
        help="keep the model in RAM (older llama-server; same as --load-mode mmap+mlock)",
    )
    _bool_pair(
        ap,
        "mmap",
        ("--mmap",),
        ("--no-mmap",),
        "memory-map the model (older llama-server; --no-mmap = --load-mode none)",
    )
    ap.add_argument(
        "--cache-reuse", type=int, help="min chunk size to reuse from the cache (default: 0)"
    )
    _bool_pair(
        ap,
        "cache_prompt",
        ("--cache-prompt",),
        ("--no-cache-prompt",),
        "prompt caching (default: enabled)",
    )
    ap.add_argument(
        "-cram", "--cache-ram", type=int, help="max prompt cache size in MiB (default: 8192)"
    )
    _bool_pair(
        ap, "warmup", ("--warmup",), ("--no-warmup",), "warm-up run at start (default: enabled)"
    )
    _bool_pair(
        ap,
        "kv_unified",
        ("-kvu", "--kv-unified"),
        ("-no-kvu", "--no-kv-unified"),
        "one KV buffer shared by all slots (default: enabled if --parallel is auto)",
    )
    _bool_pair(
        ap,
        "kv_offload",
        ("-kvo", "--kv-offload"),
        ("-nkvo", "--no-kv-offload"),
        "KV cache offloading (default: enabled)",
    )
    ap.add_argument(
        "-fit",
        "--fit",
        type=_on_off("--fit"),
        help="fit unset arguments to device memory: on or off (default: on)",
    )
    ap.add_argument(
        "-dt", "--defrag-thold", type=float, help="deprecated in llama.cpp; accepted and ignored"
    )
    ap.add_argument(
        "--metrics", action="store_true", default=None, help="enable the /metrics endpoint"
    )
    _bool_pair(
        ap, "ui", ("--ui", "--webui"), ("--no-ui", "--no-webui"), "the Web UI (default: enabled)"
    )
    ap.add_argument(
        "-to", "--timeout", type=int, help="server read/write timeout in s (default: 3600)"
    )
    ap.add_argument(
        "-lv",
        "--verbosity",
        "--log-verbosity",
        dest="verbosity",
        type=int,
        help="log verbosity threshold (default: 3)",
    )
    ap.add_argument("-v", "--verbose", "--log-verbose", action="store_true", help="log everything")
    return ap


def validate(ap: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Reject values llama-server rejects, the argparse way (usage + error on stderr, exit 2)."""
    if a.parallel == 0 or a.parallel < -1:
        ap.error(f"invalid value for n_parallel: {a.parallel} (a positive number, or -1 for auto)")
    for name in ("batch_size", "ubatch_size"):
        v = getattr(a, name)
        if v is not None and v < 1:
            ap.error(f"argument --{name.replace('_', '-')}: must be ≥ 1, got {v}")
    if a.ctx_size is not None and a.ctx_size < 0:
        ap.error(f"argument --ctx-size: must be ≥ 0, got {a.ctx_size}")
    if not 0 <= a.port <= 65535:
        ap.error(f"argument --port: {a.port} is not a port number")


def _load_mode(a: argparse.Namespace) -> str | None:
    """--load-mode, or what the older --mlock / --no-mmap pair means in its terms."""
    if a.load_mode is not None:
        return str(a.load_mode)
    if a.mlock is None and a.mmap is None:
        return None
    mmap = a.mmap is not False
    if a.mlock:
        return "mmap+mlock" if mmap else "mlock"
    return "mmap" if mmap else "none"


def to_common_params(a: argparse.Namespace) -> Any:
    """Map parsed flags onto ``xllamacpp.CommonParams`` (unset flags keep its defaults)."""
    import xllamacpp as x

    p = x.CommonParams()
    p.model.path = a.model
    p.hostnames = [h.strip() for h in a.host.split(",") if h.strip()]
    p.port = a.port
    if a.alias:
        p.model_alias = {s.strip() for s in a.alias.split(",") if s.strip()}
    if a.threads is not None:
        p.cpuparams.n_threads = a.threads
    threads_batch = a.threads_batch if a.threads_batch is not None else a.threads
    if threads_batch is not None:
        p.cpuparams_batch.n_threads = threads_batch
    simple = {
        "threads_http": "n_threads_http",
        "parallel": "n_parallel",
        "batch_size": "n_batch",
        "ubatch_size": "n_ubatch",
        "ctx_size": "n_ctx",
        "n_predict": "n_predict",
        "cont_batching": "cont_batching",
        "n_gpu_layers": "n_gpu_layers",
        "cache_reuse": "n_cache_reuse",
        "cache_prompt": "cache_prompt",
        "cache_ram": "cache_ram_mib",
        "warmup": "warmup",
        "kv_unified": "kv_unified",
        "fit": "fit_params",
        "metrics": "endpoint_metrics",
        "ui": "ui",
        "verbosity": "verbosity",
    }
    for arg, attr in simple.items():
        value = getattr(a, arg)
        if value is not None:
            setattr(p, attr, value)
    if a.kv_offload is not None:
        p.no_kv_offload = not a.kv_offload
    if a.verbose:
        p.verbosity = 10**6
    if a.timeout is not None:
        p.timeout_read = a.timeout
        p.timeout_write = a.timeout
    if a.flash_attn is not None:
        fa = x.llama_flash_attn_type
        p.flash_attn_type = {
            "on": fa.LLAMA_FLASH_ATTN_TYPE_ENABLED,
            "off": fa.LLAMA_FLASH_ATTN_TYPE_DISABLED,
            "auto": fa.LLAMA_FLASH_ATTN_TYPE_AUTO,
        }[a.flash_attn]
    if a.cache_type_k is not None:
        p.cache_type_k = getattr(x.ggml_type, f"GGML_TYPE_{a.cache_type_k.upper()}")
    if a.cache_type_v is not None:
        p.cache_type_v = getattr(x.ggml_type, f"GGML_TYPE_{a.cache_type_v.upper()}")
    mode = _load_mode(a)
    if mode is not None:
        name = {"mmap+mlock": "MMAP_MLOCK", "dio": "DIRECT_IO"}.get(mode, mode.upper())
        p.load_mode = getattr(x.llama_load_mode, f"LLAMA_LOAD_MODE_{name}")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse llama-server flags, serve until SIGTERM/SIGINT, return the exit status.

    Exit status: 0 after a signal, 1 when the server cannot start (its log lines on stderr say why),
    2 for invalid flags (argparse).
    """
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="xllamacpp_server: %(message)s"
    )
    ap = build_parser()
    args = ap.parse_args(argv)
    validate(ap, args)
    if args.defrag_thold is not None:
        logger.warning("--defrag-thold is deprecated in llama.cpp and has no effect")
    try:
        import xllamacpp as x
    except ImportError as e:
        logger.error("error: the xllamacpp wheel is not installed (%s); pip install xllamacpp", e)
        return 1
    params = to_common_params(args)
    # Block the signals before the server starts its threads, so they inherit the mask and the
    # signal reaches sigwait below instead of killing the process from some server thread.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        server = x.Server(params)
    except RuntimeError as e:
        logger.error("error: the server did not start: %s", e)
        return 1
    logger.info("listening on %s", server.listening_address)
    sys.stderr.flush()
    sig = signal.sigwait({signal.SIGTERM, signal.SIGINT})
    logger.info("received %s, shutting down", signal.Signals(sig).name)
    del server
    return 0


if __name__ == "__main__":
    sys.exit(main())
