"""Kubernetes deployment through OME: each trial is an InferenceService (ome.io/v1beta1) whose engine
container runs the trial's exact launch command; applied, awaited Ready, deleted on stop.

Manifest builders are pure; ``KubernetesDeployment`` talks to the API server with the official
``kubernetes`` client (``pip install 'servetune[kubernetes]'``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from servetune.core.spec import KubernetesDeploymentSpec
from servetune.core.study import FailureKind
from servetune.engines.base import LaunchCommand
from servetune.errors import DeploymentError, EngineStartFailed

logger = logging.getLogger(__name__)

GROUP = "ome.io"
VERSION = "v1beta1"
API_VERSION = f"{GROUP}/{VERSION}"
"""OME's API group and version (sgl-project/ome, config/crd: ome.io_inferenceservices.yaml)."""
PLURALS = {
    "InferenceService": "inferenceservices",
    "ClusterServingRuntime": "clusterservingruntimes",
    "ClusterBaseModel": "clusterbasemodels",
}
LABEL_STUDY = "servetune.io/study"
LABEL_TRIAL = "servetune.io/trial"
RUNNER_NAME = "ome-container"
"""Container name OME gives the engine's runner (the name its sample runtimes use)."""
GPU_RESOURCE = "nvidia.com/gpu"
POLL_S = 1.0

_DNS_BAD = re.compile(r"[^a-z0-9-]+")


def resource_name(study: str, trial: str) -> str:
    """A DNS-1035 label (≤ 63 chars, lowercase, starts with a letter) for a trial's resources:
    ``st-<study>-<trial>``, shortened with a hash of the full name when too long."""
    full = f"st-{study}-{trial}".lower()
    name = _DNS_BAD.sub("-", full).strip("-")
    if len(name) > 63:
        digest = hashlib.sha256(full.encode()).hexdigest()[:8]
        name = f"{name[:54].rstrip('-')}-{digest}"
    return name


def label_value(text: str) -> str:
    """``text`` as a label value (≤ 63 chars of ``[A-Za-z0-9_.-]``, alphanumeric at both ends)."""
    value = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:63]
    return value.strip("-_.")


def container_command(
    spec: KubernetesDeploymentSpec, command: LaunchCommand, server_prefix: Sequence[str]
) -> tuple[list[str], list[str]]:
    """(container command, container args) for ``command``.

    The command is ``spec.entrypoint``, else the launch command's server program
    (``server_prefix``); the args are every flag of the launch command, the trial's params
    included, with engine.model replaced later by ``spec.model_path``.
    """
    argv = list(command.argv)
    n = len(server_prefix)
    if n and argv[:n] == list(server_prefix):
        program, args = argv[:n], argv[n:]
    else:
        program, args = argv[:1], argv[1:]
    return (list(spec.entrypoint) if spec.entrypoint is not None else program), args


def inference_service(
    spec: KubernetesDeploymentSpec,
    command: LaunchCommand,
    *,
    study: str,
    trial: str,
    model_path: str,
    server_prefix: Sequence[str] = (),
) -> dict[str, Any]:
    """The InferenceService of one trial (a dict ready for the API server).

    Its engine runner runs the trial's launch command: ``command`` / ``args`` (every flag of the
    trial, ``model_path`` arguments replaced by ``spec.model_path``), ``spec.gpus_per_trial``
    GPUs requested and limited, one replica, labels naming study and trial on the resource and
    on the engine pods.
    """
    program, args = container_command(spec, command, server_prefix)
    args = [spec.model_path if a == model_path else a for a in args]
    labels = {LABEL_STUDY: label_value(study), LABEL_TRIAL: label_value(trial)}
    runner: dict[str, Any] = {
        "name": RUNNER_NAME,
        "command": program,
        "args": args,
        "ports": [{"containerPort": spec.container_port, "name": "http1", "protocol": "TCP"}],
    }
    if command.env:
        runner["env"] = [{"name": k, "value": v} for k, v in sorted(command.env.items())]
    if spec.image:
        runner["image"] = spec.image
    if spec.gpus_per_trial:
        gpus = {GPU_RESOURCE: spec.gpus_per_trial}
        runner["resources"] = {"requests": dict(gpus), "limits": dict(gpus)}
    return {
        "apiVersion": API_VERSION,
        "kind": "InferenceService",
        "metadata": {
            "name": resource_name(study, trial),
            "namespace": spec.namespace,
            "labels": labels,
        },
        "spec": {
            "model": {"name": spec.base_model},
            "runtime": {"name": spec.runtime},
            "engine": {
                "minReplicas": 1,
                "maxReplicas": 1,
                "labels": dict(labels),
                "runner": runner,
            },
        },
    }


def cluster_serving_runtime(
    spec: KubernetesDeploymentSpec, *, study: str, model_format: str = "safetensors"
) -> dict[str, Any]:
    """A ClusterServingRuntime named ``spec.runtime`` running ``spec.image`` (each trial's
    InferenceService sets the real command and args). Raises DeploymentError without an image."""
    if not spec.image:
        raise DeploymentError("deployment.create_runtime needs deployment.image")
    runner: dict[str, Any] = {
        "name": RUNNER_NAME,
        "image": spec.image,
        "ports": [{"containerPort": spec.container_port, "name": "http1", "protocol": "TCP"}],
    }
    if spec.gpus_per_trial:
        gpus = {GPU_RESOURCE: spec.gpus_per_trial}
        runner["resources"] = {"requests": dict(gpus), "limits": dict(gpus)}
    return {
        "apiVersion": API_VERSION,
        "kind": "ClusterServingRuntime",
        "metadata": {"name": spec.runtime, "labels": {LABEL_STUDY: label_value(study)}},
        "spec": {
            "disabled": False,
            "supportedModelFormats": [
                {
                    "modelFormat": {"name": model_format},
                    "modelFramework": {"name": "transformers"},
                    "autoSelect": False,
                    "priority": 1,
                }
            ],
            "protocolVersions": ["openAI"],
            "engineConfig": {"minReplicas": 1, "maxReplicas": 1, "runner": runner},
        },
    }


def cluster_base_model(spec: KubernetesDeploymentSpec, *, study: str) -> dict[str, Any]:
    """A ClusterBaseModel named ``spec.base_model`` downloaded from ``spec.model_storage_uri``.
    Raises DeploymentError without a storage URI."""
    if not spec.model_storage_uri:
        raise DeploymentError("deployment.create_base_model needs deployment.model_storage_uri")
    return {
        "apiVersion": API_VERSION,
        "kind": "ClusterBaseModel",
        "metadata": {"name": spec.base_model, "labels": {LABEL_STUDY: label_value(study)}},
        "spec": {"storage": {"storageUri": spec.model_storage_uri}},
    }


def is_ready(obj: dict[str, Any]) -> bool:
    """True when ``status.conditions`` has ``type: Ready`` with ``status: "True"``."""
    conditions = (obj.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _not_ready_reason(obj: dict[str, Any]) -> str:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("status") != "True":
            return f"{c.get('type')}: {c.get('reason') or ''} {c.get('message') or ''}".strip()
    return "no conditions yet"


def _kubernetes() -> Any:
    try:
        import kubernetes
    except ImportError as e:
        raise DeploymentError(
            "deployment.kind kubernetes needs the kubernetes client: "
            "pip install 'servetune[kubernetes]'"
        ) from e
    return kubernetes


class KubernetesRunningEngine:
    """One trial's InferenceService once Ready: its ``base_url``, its status, delete on stop.

    ``pid``/``pgid`` are None; ``returncode()`` is None while the service stays Ready and 1 once
    it is gone or no longer Ready (the engine pod failed).
    """

    pid: int | None = None
    pgid: int | None = None

    def __init__(self, deployment: KubernetesDeployment, name: str, base_url: str, log_path: Path):
        self._deployment = deployment
        self.name = name
        self.base_url = base_url
        self.log_path = log_path
        self._code: int | None = None
        self._stopped = False
        self._last_check = 0.0

    def returncode(self) -> int | None:
        """None while Ready; 1 once the InferenceService lost Ready or vanished (checked at most
        once every POLL_S)."""
        if self._code is not None or self._stopped:
            return self._code
        now = time.monotonic()
        if now - self._last_check < POLL_S:
            return None
        self._last_check = now
        obj = self._deployment.get_service(self.name)
        if obj is None or not is_ready(obj):
            reason = "deleted" if obj is None else _not_ready_reason(obj)
            self._deployment.note(
                self.log_path, f"InferenceService {self.name} not ready: {reason}"
            )
            self._code = 1
        return self._code

    def log_text(self, max_bytes: int = 200_000) -> str:
        """The trial log (servetune's notes on the InferenceService; pod logs stay in the cluster)."""
        try:
            return self.log_path.read_bytes()[-max_bytes:].decode("utf-8", errors="replace")
        except OSError:
            return ""

    async def stop(self) -> int | None:
        """Delete the InferenceService and wait until it is gone; idempotent."""
        if not self._stopped:
            await asyncio.to_thread(self._deployment.delete_service, self.name)
            self._stopped = True
        return self._code


class KubernetesDeployment:
    """Runs each trial as an OME InferenceService in ``spec.namespace``.

    ``api_client`` is a ``kubernetes.client.ApiClient`` (None = from ``spec.kubeconfig`` and
    ``spec.context``, or the in-cluster config). ``start`` applies the trial's resources, waits
    for Ready (``spec.startup_timeout_s``) and resolves the endpoint; every API error becomes a
    DeploymentError naming the resource.
    """

    def __init__(
        self,
        spec: KubernetesDeploymentSpec,
        *,
        study: str,
        model_path: str,
        server_prefix: Sequence[str] = (),
        api_client: Any = None,
    ) -> None:
        self.spec = spec
        self.study = study
        self.model_path = model_path
        self.server_prefix = list(server_prefix)
        self._api_client = api_client
        self._shared_created = False

    # ---- pure ------------------------------------------------------------------------------

    def manifests(self, command: LaunchCommand, trial: str) -> list[dict[str, Any]]:
        """Every resource a trial applies, in order: the ClusterBaseModel and ClusterServingRuntime
        when the spec asks for them, then the trial's InferenceService."""
        out = []
        if self.spec.create_base_model:
            out.append(cluster_base_model(self.spec, study=self.study))
        if self.spec.create_runtime:
            out.append(cluster_serving_runtime(self.spec, study=self.study))
        out.append(
            inference_service(
                self.spec,
                command,
                study=self.study,
                trial=trial,
                model_path=self.model_path,
                server_prefix=self.server_prefix,
            )
        )
        return out

    def reserve_port(self) -> tuple[str, int]:
        """("0.0.0.0", spec.container_port): where the engine binds inside its pod."""
        return "0.0.0.0", self.spec.container_port

    # ---- API -------------------------------------------------------------------------------

    def _api(self) -> Any:
        k8s = _kubernetes()
        if self._api_client is None:
            try:
                if self.spec.kubeconfig is None and _in_cluster():
                    k8s.config.load_incluster_config()
                    self._api_client = k8s.client.ApiClient()
                else:
                    self._api_client = k8s.config.new_client_from_config(
                        config_file=self.spec.kubeconfig, context=self.spec.context
                    )
            except Exception as e:
                raise DeploymentError(
                    f"cannot load the Kubernetes config: {e}; set deployment.kubeconfig/context"
                ) from e
        return k8s.client.CustomObjectsApi(self._api_client)

    def _call(self, what: str, fn: Any, *args: Any, **kw: Any) -> Any:
        k8s = _kubernetes()
        try:
            return fn(*args, **kw)
        except k8s.client.exceptions.ApiException as e:
            raise DeploymentError(f"{what}: {e.status} {e.reason}: {_body_message(e)}") from e
        except Exception as e:  # urllib3 connection errors
            raise DeploymentError(f"{what}: {type(e).__name__}: {e}") from e

    def _create(self, obj: dict[str, Any], *, exist_ok: bool) -> None:
        api, kind = self._api(), obj["kind"]
        plural, name = PLURALS[kind], obj["metadata"]["name"]
        k8s = _kubernetes()
        try:
            if kind == "InferenceService":
                api.create_namespaced_custom_object(
                    GROUP, VERSION, self.spec.namespace, plural, obj
                )
            else:
                api.create_cluster_custom_object(GROUP, VERSION, plural, obj)
        except k8s.client.exceptions.ApiException as e:
            if e.status == 409 and exist_ok:
                logger.info("%s %s exists; using it", kind, name)
                return
            raise DeploymentError(
                f"cannot create {kind} {name}: {e.status} {e.reason}: {_body_message(e)}"
            ) from e
        except Exception as e:
            raise DeploymentError(f"cannot create {kind} {name}: {type(e).__name__}: {e}") from e

    def get_service(self, name: str) -> dict[str, Any] | None:
        """The InferenceService ``name`` as the API server has it, or None when it does not exist."""
        k8s, api = _kubernetes(), self._api()
        try:
            obj: dict[str, Any] = api.get_namespaced_custom_object(
                GROUP, VERSION, self.spec.namespace, "inferenceservices", name
            )
        except k8s.client.exceptions.ApiException as e:
            if e.status == 404:
                return None
            raise DeploymentError(
                f"cannot read InferenceService {name}: {e.status} {e.reason}"
            ) from e
        return obj

    def delete_service(self, name: str) -> None:
        """Delete InferenceService ``name`` (foreground) and wait until it is gone (up to
        ``spec.stop_timeout_s``); no error when it is already gone."""
        k8s, api = _kubernetes(), self._api()
        try:
            api.delete_namespaced_custom_object(
                GROUP,
                VERSION,
                self.spec.namespace,
                "inferenceservices",
                name,
                propagation_policy="Foreground",
            )
        except k8s.client.exceptions.ApiException as e:
            if e.status != 404:
                raise DeploymentError(
                    f"cannot delete InferenceService {name}: {e.status} {e.reason}"
                ) from e
        deadline = time.monotonic() + self.spec.stop_timeout_s
        while self.get_service(name) is not None:
            if time.monotonic() > deadline:
                raise DeploymentError(
                    f"InferenceService {name} still exists {self.spec.stop_timeout_s:.0f} s after "
                    "delete; check its finalizers (kubectl describe inferenceservice)"
                )
            time.sleep(POLL_S / 4)
        logger.info("deleted InferenceService %s/%s", self.spec.namespace, name)

    def leftovers(self) -> list[str]:
        """Names of this study's InferenceServices in ``spec.namespace`` (by the study label)."""
        selector = f"{LABEL_STUDY}={label_value(self.study)}"
        listing = self._call(
            "cannot list InferenceServices",
            self._api().list_namespaced_custom_object,
            GROUP, VERSION, self.spec.namespace, "inferenceservices", label_selector=selector,
        )  # fmt: skip
        return sorted(str(o["metadata"]["name"]) for o in listing.get("items", []))

    def remove_leftovers(self) -> list[str]:
        """Delete every InferenceService of this study (a run that died left them); their names."""
        names = self.leftovers()
        for name in names:
            self.delete_service(name)
        return names

    def note(self, log_path: Path, line: str) -> None:
        """Append one line to the trial log."""
        with log_path.open("a") as f:
            f.write(line.rstrip() + "\n")

    async def start(self, command: LaunchCommand, log_path: Path) -> KubernetesRunningEngine:
        """Apply the trial's resources (named after the study and ``log_path``'s stem), wait for
        Ready and resolve its URL. On a failure, a timeout or cancellation the InferenceService
        is deleted. Raises EngineStartFailed(STARTUP_TIMEOUT) when it is not Ready within
        ``spec.startup_timeout_s`` (with its last non-True condition), DeploymentError for API
        errors."""
        log_path = Path(log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        objs = self.manifests(command, log_path.stem)
        service = objs[-1]
        name = service["metadata"]["name"]
        work = asyncio.ensure_future(asyncio.to_thread(self._apply, objs, log_path))
        try:
            await asyncio.shield(work)
            obj = await self._wait_ready(name)
            base_url = self._endpoint(obj, name)
        except BaseException:
            if not work.done():
                await asyncio.wait({work})  # a thread cannot be interrupted; let it finish
            try:
                await asyncio.shield(asyncio.to_thread(self.delete_service, name))
            except DeploymentError as e:  # keep the original error; say what may be left
                logger.warning("InferenceService %s may be left after a failed start: %s", name, e)
            raise
        self.note(log_path, f"InferenceService {name} Ready at {base_url}")
        logger.info("InferenceService %s ready at %s", name, base_url)
        return KubernetesRunningEngine(self, name, base_url, log_path)

    def _apply(self, objs: list[dict[str, Any]], log_path: Path) -> None:
        """Create the shared objects once (existing ones are used), then the InferenceService
        (replacing one of the same name left by a run that died)."""
        service = objs[-1]
        name = service["metadata"]["name"]
        if not self._shared_created:
            for obj in objs[:-1]:
                self._create(obj, exist_ok=True)
            self._shared_created = True
        if self.get_service(name) is not None:
            self.delete_service(name)
        self._create(service, exist_ok=False)
        runner = service["spec"]["engine"]["runner"]
        self.note(log_path, f"created InferenceService {self.spec.namespace}/{name}")
        self.note(log_path, f"engine command: {runner['command']} args: {runner['args']}")

    async def _wait_ready(self, name: str) -> dict[str, Any]:
        deadline = time.monotonic() + self.spec.startup_timeout_s
        while True:
            obj = await asyncio.to_thread(self.get_service, name)
            if obj is None:
                raise DeploymentError(f"InferenceService {name} vanished while starting")
            if is_ready(obj):
                return obj
            if time.monotonic() > deadline:
                raise EngineStartFailed(
                    FailureKind.STARTUP_TIMEOUT,
                    f"InferenceService {name} not Ready after {self.spec.startup_timeout_s:.0f} s "
                    f"({_not_ready_reason(obj)}); raise deployment.startup_timeout_s or see "
                    f"kubectl describe inferenceservice -n {self.spec.namespace} {name}",
                )
            await asyncio.sleep(POLL_S / 4)

    def _endpoint(self, obj: dict[str, Any], name: str) -> str:
        if self.spec.endpoint_url:
            return self.spec.endpoint_url.format(name=name, namespace=self.spec.namespace)
        status = obj.get("status") or {}
        url = status.get("url") or (status.get("address") or {}).get("url")
        if not url:
            raise DeploymentError(
                f"InferenceService {name} is Ready but has no status.url; set "
                "deployment.endpoint_url (e.g. http://{name}.{namespace}.svc.cluster.local)"
            )
        return str(url).rstrip("/")


def _in_cluster() -> bool:
    return Path("/var/run/secrets/kubernetes.io/serviceaccount/token").exists()


def _body_message(e: Any) -> str:
    import json

    try:
        return str(json.loads(e.body).get("message", e.body))
    except (TypeError, ValueError, AttributeError):
        return str(e.body)
