"""The worker process: registers with the fleet's Redis, heartbeats, runs trial jobs from its queue.

``run_worker`` is what ``servetune worker`` calls; it returns the process exit status.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import importlib
import importlib.util
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Coroutine
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from redis.exceptions import RedisError

from servetune.cluster import queue
from servetune.cluster.logs import RedisLogHandler
from servetune.cluster.models import GPUInfo, WorkerInfo, utc_now
from servetune.cluster.redis import connect, safe_url, translate
from servetune.cluster.registry import Registry
from servetune.cluster.tasks import cancel_and_wait
from servetune.core.spec import LlamaCppEngineSpec
from servetune.deploy.local import kill_process_group
from servetune.errors import RedisUnavailable, ServetuneError
from servetune.remote.models import TunnelConfig
from servetune.remote.tunnel import TunnelFailed, TunnelSupervisor
from servetune.settings import Settings, path_under
from servetune.worker.gpu import host_facts, read_gpus
from servetune.worker.heartbeat import HeartbeatThread
from servetune.worker.jobs import CTX_KEY, WorkerRuntime, run_trial_job

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""What ``--name`` may be: it names the worker's files under the data directory."""

DEFAULT_NAME = "default"
"""The name of a worker started without ``--name``."""

PROBE_TIMEOUT_S = 2.0
"""How long the start-up checks (Redis, Docker, Kubernetes, engines) may each take, s."""

QUEUE_RETRY_S = 2.0
"""Pause before the job loop is started again after Redis stayed unreachable, s."""

STOP_WAIT_S = 5.0
"""How long the heartbeat and the job loop get to end once the worker stops, s."""

HAND_BACK_GRACE_S = 30.0
"""After SIGTERM: how long running jobs get to stop their engines and report, s (beyond the
engines' own stop timeouts, which come first)."""


def check_name(name: str | None) -> str:
    """The worker name to use (``DEFAULT_NAME`` for None); raises ValueError naming ``--name``
    and the allowed characters when it could not name a file."""
    if name is None:
        return DEFAULT_NAME
    if not NAME_PATTERN.match(name):
        raise ValueError(
            f"--name {name!r} is not a plain name: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def _slug(text: str, limit: int) -> str:
    return re.sub(r"[^A-Za-z0-9-]+", "-", text).strip("-")[:limit] or "host"


def worker_id_for(data_dir: Path, name: str, host: str) -> str:
    """The stable id of the worker called ``name`` on ``host``: read from
    ``<data_dir>/worker-<name>.json``, or made (``<host>-<name>-<8 hex>``) and stored there the
    first time (and again when the file names another host, e.g. a copied data directory).
    Raises PathOutside for a name that is not a plain file name, OSError when the file cannot be
    written."""
    path = path_under(data_dir, f"worker-{name}.json")
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored.get("host") == host and stored.get("name") == name and stored.get("id"):
            return str(stored["id"])
    except (OSError, ValueError, AttributeError):
        pass
    worker_id = f"{_slug(host, 30)}-{_slug(name, 20)}-{secrets.token_hex(4)}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"id": worker_id, "host": host, "name": name}), encoding="utf-8")
    return worker_id


class NameTaken(ServetuneError):
    """Another live worker process uses this name with this data directory."""


def claim_name(data_dir: Path, name: str) -> int:
    """Lock ``<data_dir>/worker-<name>.lock`` for this process (the lock goes with the process);
    the open descriptor (keep it open). Raises NameTaken when another live worker holds it: two
    workers sharing a name would share an id, and each start kills the engines the other runs."""
    path = path_under(data_dir, f"worker-{name}.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        holder = path.read_text(encoding="utf-8").strip() or "?"
        raise NameTaken(
            f"a worker named {name!r} already runs with data directory {data_dir} (pid "
            f"{holder}); give this one another --name"
        ) from e
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def engines_file(data_dir: Path, name: str) -> Path:
    """``<data_dir>/worker-<name>-engines.json``: process groups of the engines running now."""
    return path_under(data_dir, f"worker-{name}-engines.json")


def kill_leftover_engines(path: Path) -> list[int]:
    """Kill the engine process groups a previous incarnation recorded in ``path`` (it was killed
    before it could stop them), then empty the record. Only a group whose command line still
    holds the recorded marker (the model) is signalled, so a reused group id is left alone.
    Returns the process groups killed. Blocks up to ~15 s per surviving group."""
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        log.warning("cannot read the engine record %s (%s); ignoring it", path, e)
        entries = []
    killed = []
    for entry in entries if isinstance(entries, list) else []:
        try:
            pgid, marker = int(entry["pgid"]), str(entry["marker"])
        except (KeyError, TypeError, ValueError):
            continue
        try:
            if kill_process_group(pgid, must_contain=marker):
                log.warning(
                    "killed engine process group %d left by a previous run of this worker", pgid
                )
                killed.append(pgid)
        except ValueError as e:
            log.warning("left engine group %d alone: %s", pgid, e)
    with contextlib.suppress(OSError):
        path.write_text("[]", encoding="utf-8")
    return killed


# ---- what this host offers -------------------------------------------------------------------


def _servetune_version() -> str:
    try:
        return version("servetune")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0+unknown"


def _address_towards(url: str) -> str | None:
    """The local IP address this host uses to reach the Redis in ``url`` (no packet is sent)."""
    parts = urlsplit(url)
    if not parts.hostname:
        return None
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 6379, type=socket.SOCK_DGRAM)
        family, _, _, _, sockaddr = infos[0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(sockaddr)
            return str(s.getsockname()[0])
    except (OSError, IndexError):
        return None


def _llamacpp_available() -> bool:
    from servetune.engines.llamacpp import LlamaCppEngine

    spec = LlamaCppEngineSpec(kind="llamacpp", model="(probe)")
    problems = LlamaCppEngine(spec).check_engine()
    return not any(p.loc == "engine.binary" for p in problems)


def _python_has(python: str, module: str) -> bool:
    exe = shutil.which(python)
    if exe is None:
        return False
    code = f"import importlib.util,sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    try:
        done = subprocess.run(  # noqa: S603 - argv list: a found interpreter and fixed code
            [exe, "-c", code], capture_output=True, timeout=PROBE_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def available_engines(gpus: list[GPUInfo], docker: bool) -> list[str]:
    """Engines this host can run: llama.cpp when its binary or wheel is there (its
    ``check_engine``); vLLM (``vllm`` on PATH) and SGLang (``python3`` with sglang) only with an
    NVIDIA GPU, or in containers when Docker answers and there is a GPU."""
    engines = []
    with contextlib.suppress(ServetuneError, OSError):
        if _llamacpp_available():
            engines.append("llamacpp")
    if gpus:
        if docker or shutil.which("vllm"):
            engines.append("vllm")
        if docker or _python_has("python3", "sglang"):
            engines.append("sglang")
    return engines


def _docker_answers() -> bool:
    if importlib.util.find_spec("docker") is None:
        return False
    docker: Any = importlib.import_module("docker")
    try:
        client = docker.from_env(timeout=int(PROBE_TIMEOUT_S))
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # docker.errors.DockerException, requests errors: no daemon
        return False


def _kubernetes_answers() -> bool:
    if importlib.util.find_spec("kubernetes") is None:
        return False
    if not (os.environ.get("KUBECONFIG") or Path("~/.kube/config").expanduser().is_file()) and (
        not os.environ.get("KUBERNETES_SERVICE_HOST")
    ):
        return False
    kubernetes: Any = importlib.import_module("kubernetes")
    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            kubernetes.config.load_incluster_config()
            api_client = kubernetes.client.ApiClient()
        else:
            api_client = kubernetes.config.new_client_from_config()
        with api_client:
            kubernetes.client.VersionApi(api_client).get_code(_request_timeout=PROBE_TIMEOUT_S)
        return True
    except Exception:  # config errors, urllib3 errors, ApiException: not usable
        return False


async def _answers(probe: Any) -> bool:
    try:
        return bool(await asyncio.wait_for(asyncio.to_thread(probe), PROBE_TIMEOUT_S + 0.5))
    except TimeoutError:
        return False


async def host_offer(url: str) -> tuple[list[str], list[str], list[GPUInfo]]:
    """(engines, deployments, GPUs) of this host, probed in parallel within ~2 s: deployments
    are ``local`` always, ``docker`` when the Docker SDK imports and the daemon answers,
    ``kubernetes`` when its client imports, a config is found and the API answers."""
    docker, kube, gpus = await asyncio.gather(
        _answers(_docker_answers), _answers(_kubernetes_answers), asyncio.to_thread(read_gpus)
    )
    deployments = ["local"] + (["docker"] if docker else []) + (["kubernetes"] if kube else [])
    engines = await asyncio.to_thread(available_engines, gpus, docker)
    return engines, deployments, gpus


# ---- the process -----------------------------------------------------------------------------


async def check_redis(url: str) -> Any:
    """A connected client (``cluster.redis.connect``) after one PING that may take about
    ``PROBE_TIMEOUT_S``; raises RedisUnavailable naming the masked URL and the fix."""
    probe = connect(url, retry_for_s=PROBE_TIMEOUT_S)
    try:
        await probe.ping()
    except RedisError as e:
        raise translate(e, safe_url(url), "starting the worker") from e
    finally:
        await probe.aclose()
    return connect(url)


@dataclass
class _Worker:
    settings: Settings
    url: str
    info: WorkerInfo
    registry: Registry
    runtime: WorkerRuntime
    heart: HeartbeatThread
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    signals: list[int] = field(default_factory=list)
    hurry: asyncio.Event = field(default_factory=asyncio.Event)

    def on_signal(self, signum: int) -> None:
        """First SIGTERM/SIGINT: stop (hand running trials back). A second one: stop waiting
        for them (their engines die with this process: PR_SET_PDEATHSIG)."""
        self.signals.append(signum)
        name = signal.Signals(signum).name
        if len(self.signals) == 1:
            log.warning(
                "%s: taking no new trials; handing back %d running trial(s)",
                name,
                len(self.runtime.running),
            )
        else:
            log.warning("%s again: exiting without waiting for the trials to be handed back", name)
            self.hurry.set()
        self.stop.set()


TUNNEL_READY_S = 30.0
"""How long the worker waits for its Redis tunnel at start, s."""


async def run_worker(
    settings: Settings, name: str | None, max_parallel: int, *, tunnel: TunnelConfig | None = None
) -> int:
    """Run a worker until SIGTERM or SIGINT; the process exit status.

    Registers a ``WorkerInfo`` (stable id per host and ``name``, kept in
    ``<data_dir>/worker-<name>.json``), kills engines a previous incarnation left behind
    (``kill_leftover_engines``), ships every log record to Redis (``RedisLogHandler`` on the root
    logger), heartbeats every ``settings.heartbeat_s`` and runs up to ``max_parallel`` trial jobs
    at once from its ARQ queue (``run_trial_job``). On SIGTERM/SIGINT it takes no new job, hands
    back the running ones (engines stopped, HANDED_BACK events), flushes its logs and returns 0.
    Returns 1 when Redis cannot be reached at start (the error names the masked URL and the
    fix), 2 for bad options (no Redis URL, a bad name, ``max_parallel`` < 1, a name another
    live worker with this data directory uses: ``claim_name``).

    With ``tunnel`` (a forward tunnel to the manager's Redis, ``redis_url`` pointing at its bind
    port), a ``TunnelSupervisor`` keeps it open (its ssh in this process group, restarted when it
    dies) from before Redis is first reached until the worker exits; a tunnel not ready within
    ``TUNNEL_READY_S`` returns 1 with ssh's stderr tail logged.
    """
    url = settings.redis_url
    if not url:
        log.error("no Redis URL: pass --redis redis://HOST:PORT/0 or set SERVETUNE_REDIS_URL")
        return 2
    try:
        name = check_name(name)
    except ValueError as e:
        log.error("%s", e)
        return 2
    if max_parallel < 1:
        log.error("--max-parallel must be at least 1, got %d", max_parallel)
        return 2
    if tunnel is None:
        return await _connect_and_serve(settings, url, name, max_parallel)
    try:
        supervisor = TunnelSupervisor(tunnel)
    except ValueError as e:
        log.error("%s", e)
        return 2
    supervisor.start()
    try:
        await supervisor.wait_ready(TUNNEL_READY_S)
        log.info("Redis tunnel to %s ready", tunnel.destination)
        return await _connect_and_serve(settings, url, name, max_parallel)
    except TunnelFailed as e:
        log.error("%s; ssh said: %s", e, " | ".join(e.logs) or "(nothing)")
        return 1
    finally:
        await supervisor.stop()


async def _connect_and_serve(settings: Settings, url: str, name: str, max_parallel: int) -> int:
    try:
        r = await check_redis(url)
    except RedisUnavailable as e:
        log.error("%s", e)
        return 1
    try:
        return await _serve(settings, url, r, name, max_parallel)
    finally:
        with contextlib.suppress(Exception):
            await r.aclose()


async def _serve(settings: Settings, url: str, r: Any, name: str, max_parallel: int) -> int:
    data_dir = settings.data_dir
    try:
        lock_fd = await asyncio.to_thread(claim_name, data_dir, name)
    except NameTaken as e:
        log.error("%s", e)
        return 2
    try:
        return await _serve_as(settings, url, r, name, max_parallel)
    finally:
        os.close(lock_fd)


async def _serve_as(settings: Settings, url: str, r: Any, name: str, max_parallel: int) -> int:
    data_dir = settings.data_dir
    worker_id = await asyncio.to_thread(worker_id_for, data_dir, name, settings.host_name)
    record = engines_file(data_dir, name)
    await asyncio.to_thread(kill_leftover_engines, record)
    handler = RedisLogHandler(url, worker_id, settings)
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    try:
        engines, deployments, gpus = await host_offer(url)
        cpu_count, memory_total_gib, _ = host_facts()
        info = WorkerInfo(
            id=worker_id,
            hostname=settings.host_name,
            alias=None if name == DEFAULT_NAME else name,
            address=_address_towards(url),
            pid=os.getpid(),
            version=_servetune_version(),
            engines=engines,
            deployments=deployments,
            gpus=gpus,
            cpu_count=cpu_count,
            memory_total_gib=memory_total_gib,
            max_parallel=max_parallel,
            started_at=utc_now(),
        )
        runtime = WorkerRuntime(
            settings=settings, worker_id=worker_id, redis=r, engines_file=record
        )
        registry = Registry(r, settings)
        heart = HeartbeatThread(registry, url, worker_id, runtime.trials, settings)
        worker = _Worker(settings, url, info, registry, runtime, heart)
        return await _run(worker, max_parallel)
    finally:
        root.removeHandler(handler)
        handler.close()


async def _run(worker: _Worker, max_parallel: int) -> int:
    info, runtime = worker.info, worker.runtime
    try:
        await worker.registry.register(info)
        await asyncio.to_thread(worker.heart.beat_once)
        pool = await queue.arq_pool(worker.url)
    except (ServetuneError, RedisError) as e:
        log.error("registering worker %s failed: %s", info.id, e)
        worker.heart.stop(0)  # not started: closes its client
        return 1
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.on_signal, sig)
    arq_worker = queue.worker_settings(
        pool, info.id, [run_trial_job], max_parallel, ctx={CTX_KEY: runtime}
    )
    log.info(
        "worker %s (%s) ready on %s: engines %s, deployments %s, %d GPU(s), up to %d trial(s)",
        info.id,
        info.hostname,
        safe_url(worker.url),
        ",".join(info.engines) or "none",
        ",".join(info.deployments),
        len(info.gpus),
        max_parallel,
    )
    print(f"worker {info.id} ready", file=sys.stderr, flush=True)
    # its own thread and Redis client: a trial blocking this loop must not stop the beats
    worker.heart.start()
    jobs = asyncio.create_task(_take_jobs(arq_worker), name="arq worker")
    stopped = asyncio.create_task(worker.stop.wait())
    try:
        await asyncio.wait({jobs, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if jobs.done() and not stopped.done():
            jobs.result()  # the job loop never ends on its own; raise what ended it
            return 1
        await _hand_back(arq_worker, runtime, signal.Signals(worker.signals[0]).name, worker.hurry)
        return 0
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await cancel_and_wait({jobs, stopped}, STOP_WAIT_S, grace_s=0.2)
        await asyncio.to_thread(worker.heart.stop, STOP_WAIT_S)
        await _within(arq_worker.close(), STOP_WAIT_S)
        # offline now, not 3 beats later (the heartbeat thread has ended: no beat comes after)
        await _within(worker.registry.mark_offline(info.id), STOP_WAIT_S)
        log.info("worker %s stopped", info.id)


async def _within(coro: Coroutine[Any, Any, Any], timeout_s: float) -> None:
    """Run ``coro`` for at most ``timeout_s`` (a Redis that is down must not hold up the exit);
    its errors are logged, not raised."""
    task = asyncio.ensure_future(coro)
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if not done:
        await cancel_and_wait({task}, 1.0, grace_s=0.2)
    elif not task.cancelled() and task.exception() is not None:
        log.warning("while stopping: %s", task.exception())


async def _take_jobs(arq_worker: Any) -> None:
    """Run ARQ's job loop; when Redis stays unreachable longer than the client's retries, log
    it and start the loop again (running jobs go on meanwhile), so a worker outlives a Redis
    restart or a long network cut."""
    while True:
        try:
            await arq_worker.async_run()
            return
        except (RedisError, ServetuneError, OSError) as e:
            log.warning("the job queue is unreachable (%s); retrying in %.0f s", e, QUEUE_RETRY_S)
        await asyncio.sleep(QUEUE_RETRY_S)


async def _hand_back(
    arq_worker: Any, runtime: WorkerRuntime, stopped_by: str, hurry: asyncio.Event
) -> None:
    """Stop taking jobs, cancel the running ones (they stop their engines and send
    HANDED_BACK) and wait for them and for their events to be sent, unless ``hurry`` is set."""
    arq_worker.allow_pick_jobs = False
    runtime.hand_back_all(stopped_by)
    grace_s = HAND_BACK_GRACE_S + max(
        (r.job.spec.deployment.stop_timeout_s for r in runtime.running.values()), default=0.0
    )
    tasks = {t for t in list(arq_worker.tasks.values()) if not t.done()}
    tasks |= {t for t in runtime.senders if not t.done()}
    if not tasks:
        return
    hurried = asyncio.create_task(hurry.wait())
    try:
        waiting = set(tasks)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while waiting and not hurry.is_set() and loop.time() < deadline:
            _, waiting = await asyncio.wait(
                waiting | {hurried},
                timeout=deadline - loop.time(),
                return_when=asyncio.FIRST_COMPLETED,
            )
            waiting.discard(hurried)
            # a job that ended queued its last event: wait for that too
            waiting |= {t for t in runtime.senders if not t.done()}
        if waiting and not hurry.is_set():
            log.error("%d job(s) did not stop within %.0f s", len(waiting), grace_s)
    finally:
        hurried.cancel()
