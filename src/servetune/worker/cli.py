"""``servetune worker``: the command line of the worker process (options → ``run_worker``).

Registered on the main typer app by one line at the end of ``servetune/cli.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import logging.handlers
import sys
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

import typer
from pydantic import ValidationError

from servetune.redact import install_secret_filter
from servetune.remote.models import WorkerLaunchConfig, read_config_file
from servetune.settings import Settings
from servetune.worker import ENGINE_LOGGER


def _fail(message: str, code: int) -> typer.Exit:
    """Print ``error: message`` on stderr; the ``typer.Exit`` to raise."""
    print(f"error: {message}", file=sys.stderr)
    return typer.Exit(code)


def _not_engine_output(record: logging.LogRecord) -> bool:
    return record.name != ENGINE_LOGGER


def setup_worker_logging(settings: Settings, name: str | None, verbose: bool) -> Path:
    """Log to ``<logs_dir>/worker-<name>.log`` (rotated like servetune.log) and to stderr
    (warnings, or everything with ``verbose``); the log file's path. (The Redis handler is
    added by ``run_worker``.)"""
    settings.logs_dir.mkdir(parents=True, exist_ok=True)
    path = settings.logs_dir / f"worker-{name or 'default'}.log"
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    fh = logging.handlers.RotatingFileHandler(
        path,
        maxBytes=settings.log_max_bytes,
        backupCount=settings.log_backup_count,
        encoding="utf-8",
    )
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    fh.addFilter(_not_engine_output)  # already in the trial's own engine log file
    root.addHandler(fh)
    sh = logging.StreamHandler(sys.stderr)
    sh.setLevel(logging.INFO if verbose else logging.WARNING)
    sh.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(sh)
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    password = None
    with contextlib.suppress(ValueError):
        password = urlsplit(settings.redis_url).password if settings.redis_url else None
    install_secret_filter([password] if password else [])
    return path


def read_launch_config(path: Path) -> WorkerLaunchConfig:
    """The WorkerLaunchConfig in the JSON file ``path``. It holds the Redis password, so a file
    that group or others may read is refused. Raises ValueError naming the file and the fix
    (``chmod 600 FILE``, the field at fault, or why it cannot be read)."""
    return read_config_file(path, WorkerLaunchConfig, private=True)


def worker_cmd(
    redis: Annotated[
        str | None,
        typer.Option(
            "--redis",
            help="Redis URL of the fleet, redis://[:password@]host:port/db (rediss:// for TLS); "
            "default: SERVETUNE_REDIS_URL.",
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(
            "--name",
            help="Alias of this worker; the worker id is stable per host and name (several "
            "workers on one host need different names).",
        ),
    ] = None,
    max_parallel: Annotated[
        int | None,
        typer.Option("--max-parallel", min=1, help="Trials this worker runs at once (default 1)."),
    ] = None,
    heartbeat_s: Annotated[
        float | None,
        typer.Option(
            "--heartbeat-s", help="Heartbeat period, s (default: SERVETUNE_HEARTBEAT_S or 5)."
        ),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            help="Where the worker keeps its id, engine logs and its own log "
            "(default: SERVETUNE_DATA_DIR or the user data directory).",
        ),
    ] = None,
    cpus: Annotated[
        str | None,
        typer.Option(
            "--cpus",
            help="CPU cores this worker and its engines may use, as taskset writes them "
            "(0-3 or 0,2,4); its capacity is their count. Default: every core this process may "
            "use. Give each of several workers on one host its own cores.",
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="A WorkerLaunchConfig JSON file of mode 600 (written by worker-deploy): Redis "
            "URL, name, data directory, max parallel trials and the Redis tunnel to keep open. "
            "Not with --redis, --name, --data-dir or --max-parallel.",
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log INFO to stderr.")] = False,
) -> None:
    """Run a worker: take trials from the fleet's Redis queue and run them on this host.

    Stop it with SIGTERM or Ctrl-C: it takes no new trial and hands the running ones back to the
    manager (engines stopped). Exit status 0 after a stop, 1 when Redis cannot be reached, 2 for
    bad options.
    """
    from servetune.worker.gpu import parse_cpu_list, pin_cpus
    from servetune.worker.main import check_name, run_worker

    tunnel = None
    if config is not None:
        given = [
            option
            for option, value in (
                ("--redis", redis),
                ("--name", name),
                ("--data-dir", data_dir),
                ("--max-parallel", max_parallel),
            )
            if value is not None
        ]
        if given:
            raise _fail(
                f"--config sets the Redis URL, name, data directory and max parallel trials: "
                f"drop {', '.join(given)} (or drop --config)",
                2,
            )
        try:
            launch = read_launch_config(config)
        except ValueError as e:
            raise _fail(str(e), 2) from None
        redis, name, max_parallel = launch.redis_url, launch.name, launch.max_parallel
        data_dir, tunnel = Path(launch.data_dir).expanduser(), launch.tunnel
    overrides: dict[str, object] = {}
    if redis is not None:
        overrides["redis_url"] = redis
    if heartbeat_s is not None:
        overrides["heartbeat_s"] = heartbeat_s
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        field = ".".join(str(x) for x in first["loc"])
        raise _fail(f"--{field.replace('_', '-')}: {first['msg']}", 2) from None
    if not settings.redis_url:
        raise _fail(
            "no Redis URL: pass --redis redis://HOST:6379/0 (the manager's Redis) or set "
            "SERVETUNE_REDIS_URL",
            2,
        )
    try:
        check_name(name)
    except ValueError as e:
        raise _fail(str(e), 2) from None
    if cpus is not None:
        try:
            pin_cpus(parse_cpu_list(cpus))
        except ValueError as e:
            raise _fail(f"--cpus: {e}", 2) from None
    setup_worker_logging(settings, name, verbose)
    code = asyncio.run(run_worker(settings, name, max_parallel or 1, tunnel=tunnel))
    raise typer.Exit(code)
