"""Docker deployment: each trial's engine runs in its own container, through the Docker SDK for Python.

Host networking, the model directory mounted read-only, GPUs by device request; the container is
named and labelled after its study and trial, and removed when the trial stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shlex
import socket
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from servetune.core.spec import DockerDeploymentSpec
from servetune.engines.base import LaunchCommand
from servetune.errors import DeploymentError

logger = logging.getLogger(__name__)

LABEL_STUDY = "io.servetune.study"
"""Container label holding the study name (leftovers of a study are found by it)."""
LABEL_TRIAL = "io.servetune.trial"
"""Container label holding the trial's log name, e.g. ``trial-0003`` or ``trial-0003-attempt2``."""
HF_TOKEN_VAR = "HF_TOKEN"
"""Variable the Hugging Face token is passed in (read by huggingface_hub, vLLM and SGLang)."""
REDACTED = "***"

_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")
_GPU_ERRORS = ("could not select device driver", "nvidia-container", "unknown runtime", "nvml")


def container_name(study: str, trial: str) -> str:
    """``servetune-<study>-<trial>``, other characters than letters, digits, ``_.-`` made ``-``."""
    return _NAME_CHARS.sub("-", f"servetune-{study}-{trial}")[:250]


@dataclass(frozen=True, repr=False)
class ContainerPlan:
    """Everything one trial's container is created with (pure; shown to users with the token hidden).

    ``argv`` is what runs inside (entrypoint + args); ``env`` includes the HF token when one is
    set; ``mounts`` are (host path, container path) bind mounts, all read-only; ``shm_size_mib``
    is /dev/shm in MiB; ``secrets`` are hidden in ``display()`` and ``repr()``.
    """

    name: str
    image: str
    argv: list[str]
    env: dict[str, str]
    labels: dict[str, str]
    mounts: list[tuple[str, str]]
    gpu_ids: list[str]
    shm_size_mib: int
    secrets: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"ContainerPlan({self.display()!r})"

    def display(self) -> str:
        """The equivalent ``docker run`` line with every secret replaced by ``***``."""
        argv = ["docker", "run", "--init", "--network", "host", "--name", self.name]
        argv += ["--shm-size", f"{self.shm_size_mib}m"]
        for src, dst in self.mounts:
            argv += ["--volume", f"{src}:{dst}:ro"]
        if self.gpu_ids:
            argv += ["--gpus", f"device={','.join(self.gpu_ids)}"]
        for k, v in sorted(self.env.items()):
            argv += ["--env", f"{k}={v}"]
        argv += ["--entrypoint", self.argv[0], self.image, *self.argv[1:]]
        return redact(shlex.join(argv), self.secrets)


def redact(text: str, secrets: Sequence[str]) -> str:
    """``text`` with every occurrence of each non-empty secret replaced by ``***``."""
    for s in secrets:
        if s:
            text = text.replace(s, REDACTED)
    return text


def _docker_module() -> Any:
    try:
        import docker
    except ImportError as e:
        raise DeploymentError(
            "deployment.kind docker needs the Docker SDK for Python: pip install 'servetune[docker]'"
        ) from e
    return docker


class DockerRunningEngine:
    """One trial's container: its exit status, its log (streamed to ``log_path``), stop = remove.

    ``pid`` and ``pgid`` are None (no local process); ``name`` finds the container.
    """

    pid: int | None = None
    pgid: int | None = None

    def __init__(
        self, container: Any, log_path: Path, stop_timeout_s: float, secrets: Sequence[str]
    ) -> None:
        self._container = container
        self.name: str = container.name
        self.log_path = log_path
        self.stop_timeout_s = stop_timeout_s
        self._secrets = list(secrets)
        self._code: int | None = None
        self._stopped = False
        self._lock = threading.Lock()
        self._logs = threading.Thread(
            target=self._stream_logs, name=f"logs-{self.name}", daemon=True
        )
        self._logs.start()

    def _stream_logs(self) -> None:
        """Copy the container's stdout and stderr into the log file, line by line, secrets hidden."""
        pending = b""
        try:
            with self.log_path.open("ab") as f:
                for chunk in self._container.logs(stream=True, follow=True):
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        f.write(self._clean(line) + b"\n")
                    f.flush()
                if pending:
                    f.write(self._clean(pending))
        except Exception as e:  # the container may vanish under us; the log just ends
            logger.debug("log stream of %s ended: %s", self.name, e)

    def _clean(self, line: bytes) -> bytes:
        if not self._secrets:
            return line
        return redact(line.decode("utf-8", errors="replace"), self._secrets).encode()

    def returncode(self) -> int | None:
        """The container's exit status once it exited, else None (asks the Docker daemon); once
        it exited, its whole output is in the log file before this returns."""
        if self._code is not None or self._stopped:
            return self._code
        errors = _docker_module().errors
        try:
            self._container.reload()
        except errors.NotFound:
            self._code = -1 if self._code is None else self._code
            return self._code
        except errors.DockerException as e:
            logger.warning("cannot inspect container %s: %s", self.name, e)
            return None
        state = self._container.attrs.get("State", {})
        if state.get("Status") in ("exited", "dead"):
            self._code = int(state.get("ExitCode", -1))
            # the log stream ends with the container: let it land, so that whoever classifies
            # the exit reads the engine's last lines (the error is usually the last one)
            self._logs.join(timeout=5)
        return self._code

    def log_text(self, max_bytes: int = 200_000) -> str:
        """The last ``max_bytes`` of the container's output as streamed so far (UTF-8, replacing)."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - max_bytes))
                return f.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    async def stop(self) -> int | None:
        """Stop the container (SIGTERM through its init, SIGKILL after ``stop_timeout_s``) and remove
        it; idempotent. Returns its exit status. Raises DeploymentError when it cannot be removed."""
        return await asyncio.to_thread(self._stop_sync)

    def _stop_sync(self) -> int | None:
        with self._lock:
            if self._stopped:
                return self._code
            errors = _docker_module().errors
            try:
                with contextlib.suppress(errors.NotFound):
                    self._container.stop(timeout=max(1, round(self.stop_timeout_s)))
                    status = self._container.wait(timeout=self.stop_timeout_s + 30)
                    self._code = int(status.get("StatusCode", -1))
                self._logs.join(timeout=10)
                with contextlib.suppress(errors.NotFound):
                    self._container.remove(force=True)
            except errors.DockerException as e:
                raise DeploymentError(f"cannot stop container {self.name}: {e}") from e
            except Exception as e:  # requests' read timeout when the daemon hangs
                raise DeploymentError(f"cannot stop container {self.name}: {e}") from e
            self._stopped = True
            logger.info("removed container %s (exit %s)", self.name, self._code)
            return self._code


class DockerDeployment:
    """Runs each trial's engine in a new container of ``spec.image`` on the Docker host.

    ``study`` names and labels the containers; ``model_path`` is engine.model (its directory is
    mounted read-only at the same path unless ``spec.model_dir`` says otherwise);
    ``server_prefix`` is the host-side program at the head of every launch command, replaced by
    ``spec.entrypoint`` when that is set. ``environ`` is where the HF token is read from
    (``os.environ`` by default). Raises DeploymentError from any method that needs the daemon
    when it cannot be reached.
    """

    def __init__(
        self,
        spec: DockerDeploymentSpec,
        *,
        study: str,
        model_path: str,
        server_prefix: Sequence[str] = (),
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.spec = spec
        self.study = study
        self.model_path = model_path
        self.server_prefix = list(server_prefix)
        self._environ = os.environ if environ is None else environ
        self._client: Any = None

    # ---- pure plan -------------------------------------------------------------------------

    def model_dir(self) -> str:
        """The host directory mounted read-only: spec.model_dir, else engine.model's directory
        (engine.model itself when it is a directory), as an absolute path."""
        if self.spec.model_dir:
            return str(Path(self.spec.model_dir).expanduser().absolute())
        model = Path(self.model_path).expanduser().absolute()
        return str(model if model.is_dir() else model.parent)

    def container_argv(self, command: LaunchCommand) -> list[str]:
        """``command.argv`` with the host-side server prefix replaced by ``spec.entrypoint``."""
        argv = list(command.argv)
        if self.spec.entrypoint is None:
            return argv
        n = len(self.server_prefix)
        if n and argv[:n] == self.server_prefix:
            argv = argv[n:]
        return [*self.spec.entrypoint, *argv]

    def plan(self, command: LaunchCommand, trial: str) -> ContainerPlan:
        """The container for ``command`` of trial ``trial`` (e.g. ``trial-0003``); pure but for
        reading the HF token variable."""
        env = {**self.spec.env, **command.env}
        secrets = []
        token = self._environ.get(self.spec.hf_token_env) if self.spec.hf_token_env else None
        if token:
            env[HF_TOKEN_VAR] = token
            secrets.append(token)
        model_dir = self.model_dir()
        return ContainerPlan(
            name=container_name(self.study, trial),
            image=self.spec.image,
            argv=self.container_argv(command),
            env=env,
            labels={LABEL_STUDY: self.study, LABEL_TRIAL: trial},
            mounts=[(model_dir, model_dir)],
            gpu_ids=list(self.spec.gpu_ids),
            shm_size_mib=max(1, round(self.spec.shm_size_gib * 1024)),
            secrets=secrets,
        )

    # ---- Deployment protocol ---------------------------------------------------------------

    def reserve_port(self) -> tuple[str, int]:
        """(spec.host, a port free right now on this host; containers share its network)."""
        family = socket.AF_INET6 if ":" in self.spec.host else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((self.spec.host, 0))
                port = int(s.getsockname()[1])
        except OSError as e:
            raise DeploymentError(
                f"cannot bind {self.spec.host}: {e}; check deployment.host"
            ) from e
        return self.spec.host, port

    async def start(self, command: LaunchCommand, log_path: Path) -> DockerRunningEngine:
        """Create and start the trial's container (named after the study and ``log_path``'s stem);
        its output is streamed into ``log_path``.

        A container of the same name left by an earlier run is removed first. Raises
        DeploymentError naming the cause (daemon unreachable, image missing, GPUs requested on a
        host without the NVIDIA runtime); nothing is left behind then. Cancelled meanwhile, it
        waits for the daemon calls under way and removes what they made before re-raising.
        """
        log_path = Path(log_path)
        plan = self.plan(command, log_path.stem)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        work = asyncio.ensure_future(asyncio.to_thread(self._create_and_start, plan))
        try:
            container = await asyncio.shield(work)
        except asyncio.CancelledError:
            await asyncio.wait({work})  # a thread cannot be interrupted; let it finish
            if not work.cancelled() and work.exception() is None:
                await asyncio.to_thread(self._remove_named, plan.name)
            raise
        logger.info("started container %s: %s (log %s)", plan.name, plan.display(), log_path)
        return DockerRunningEngine(container, log_path, self.spec.stop_timeout_s, plan.secrets)

    # ---- daemon side -----------------------------------------------------------------------

    def client(self) -> Any:
        """The docker.DockerClient of ``spec.docker_host`` (made once); DeploymentError when the
        SDK is missing or the daemon does not answer."""
        if self._client is None:
            docker = _docker_module()
            try:
                if self.spec.docker_host:
                    client = docker.DockerClient(base_url=self.spec.docker_host)
                else:
                    client = docker.from_env()
                client.ping()
            except docker.errors.DockerException as e:
                where = self.spec.docker_host or os.environ.get("DOCKER_HOST", "the default socket")
                raise DeploymentError(
                    f"cannot reach the Docker daemon at {where}: {e}; start dockerd or set "
                    "deployment.docker_host"
                ) from e
            self._client = client
        return self._client

    def _ensure_image(self) -> None:
        docker = _docker_module()
        client = self.client()
        try:
            client.images.get(self.spec.image)
            return
        except docker.errors.ImageNotFound:
            if self.spec.pull == "never":
                raise DeploymentError(
                    f"image {self.spec.image!r} is not on the Docker host and deployment.pull is "
                    "never; load or build it, or set pull: missing"
                ) from None
        except docker.errors.DockerException as e:
            raise DeploymentError(f"cannot inspect image {self.spec.image!r}: {e}") from e
        logger.info("pulling image %s", self.spec.image)
        try:
            client.images.pull(self.spec.image)
        except docker.errors.DockerException as e:
            raise DeploymentError(
                f"cannot pull image {self.spec.image!r}: {e}; check deployment.image"
            ) from e

    def _create_and_start(self, plan: ContainerPlan) -> Any:
        docker = _docker_module()
        client = self.client()
        self._ensure_image()
        self._remove_named(plan.name)
        kwargs: dict[str, Any] = {
            "image": plan.image,
            "entrypoint": plan.argv[:1],
            "command": plan.argv[1:],
            "name": plan.name,
            "labels": plan.labels,
            "environment": plan.env,
            "network_mode": "host",
            "init": True,
            "shm_size": f"{plan.shm_size_mib}m",
            "mounts": [
                docker.types.Mount(target=dst, source=src, type="bind", read_only=True)
                for src, dst in plan.mounts
            ],
            "detach": True,
        }
        if plan.gpu_ids:
            kwargs["device_requests"] = [
                docker.types.DeviceRequest(
                    driver="nvidia", device_ids=plan.gpu_ids, capabilities=[["gpu"]]
                )
            ]
        try:
            container = client.containers.create(**kwargs)
        except docker.errors.DockerException as e:
            raise DeploymentError(self._explain(plan, e)) from e
        try:
            container.start()
        except docker.errors.DockerException as e:
            with contextlib.suppress(docker.errors.DockerException):
                container.remove(force=True)
            raise DeploymentError(self._explain(plan, e)) from e
        return container

    def _explain(self, plan: ContainerPlan, e: Exception) -> str:
        text = redact(str(e), plan.secrets)
        if plan.gpu_ids and any(s in text.lower() for s in _GPU_ERRORS):
            return (
                f"container {plan.name} asked for GPUs {plan.gpu_ids} but the Docker host cannot "
                f"give them ({text}); install the NVIDIA Container Toolkit on the host, or set "
                "deployment.gpu_ids: [] to run without GPUs"
            )
        return f"cannot start container {plan.name} from {plan.image}: {text}"

    def _remove_named(self, name: str) -> None:
        errors = _docker_module().errors
        with contextlib.suppress(errors.NotFound):
            self.client().containers.get(name).remove(force=True)
            logger.info("removed leftover container %s", name)

    def leftovers(self) -> list[str]:
        """Names of this study's containers on the Docker host (running or not)."""
        containers = self.client().containers.list(
            all=True, filters={"label": f"{LABEL_STUDY}={self.study}"}
        )
        return sorted(c.name for c in containers)

    def remove_leftovers(self) -> list[str]:
        """Remove every container of this study (a run that died left them); returns their names.

        Raises DeploymentError when the daemon refuses.
        """
        docker = _docker_module()
        removed = []
        for name in self.leftovers():
            try:
                self._remove_named(name)
            except docker.errors.DockerException as e:
                raise DeploymentError(f"cannot remove leftover container {name}: {e}") from e
            removed.append(name)
        return removed
