"""``servetune run SPEC --dry-run``: the first candidates' exact command lines and pre-flight
verdicts, computed without starting an engine or writing the database.
"""

from __future__ import annotations

from dataclasses import dataclass

import yaml

from servetune.core.spec import KubernetesDeploymentSpec, StudySpec
from servetune.core.strategies.base import make_strategy
from servetune.core.study import Params, TrialRole
from servetune.deploy.base import Deployment
from servetune.deploy.docker import DockerDeployment
from servetune.deploy.kubernetes import KubernetesDeployment
from servetune.engines import get_engine
from servetune.engines.base import LaunchCommand
from servetune.errors import ServetuneError
from servetune.study_session import build_deployment

DRY_RUN_HOST = "127.0.0.1"
DRY_RUN_PORT = 8000
"""Where the printed commands listen (a real run takes a free port from the deployment)."""


@dataclass(frozen=True)
class PlannedTrial:
    """One candidate: its role (baseline first), params, the command line a user can paste
    (``LaunchCommand.display()``) and the pre-flight reasons it would be rejected (empty = ok)."""

    number: int
    role: TrialRole
    params: Params
    command: str
    rejections: list[str]
    launch: str = ""
    """What the deployment would start: the same command (local), the ``docker run`` line
    (docker, secrets as ***), or the YAML manifests (kubernetes)."""


def describe_launch(deployment: Deployment, command: LaunchCommand, trial: str) -> str:
    """What ``deployment`` would start for ``command`` as trial ``trial`` (e.g. ``trial-0003``):
    the ``docker run`` equivalent of the container, the Kubernetes manifests as YAML documents,
    or the command itself for a local process. Pure: no daemon or API server is contacted."""
    if isinstance(deployment, DockerDeployment):
        return deployment.plan(command, trial).display()
    if isinstance(deployment, KubernetesDeployment):
        docs = deployment.manifests(command, trial)
        return yaml.safe_dump_all(docs, sort_keys=False, default_flow_style=False).rstrip()
    return command.display()


def plan(spec: StudySpec, count: int) -> list[PlannedTrial]:
    """The first ``count`` candidates of ``spec``'s study: the baseline (engine defaults), its
    early repeats (``budget.baseline_repeats``), then what the strategy asks for, in order (asked without being told, so a model-based strategy
    gives its start-up proposals). Starts nothing, writes nothing; raises ValueError for
    ``count`` < 1 and ServetuneError when the engine cannot build a command (e.g. no binary).
    """
    if count < 1:
        raise ValueError("--count must be ≥ 1")
    engine = get_engine(spec.engine)
    strategy = make_strategy(spec)
    candidates: list[tuple[TrialRole, Params]] = [(TrialRole.BASELINE, {})]
    # the defaults' early repeats come next, as in a real run (they measure run-to-run noise)
    repeats: list[tuple[TrialRole, Params]] = [(TrialRole.CONFIRM, {})] * (
        spec.budget.baseline_repeats - 1
    )
    candidates += repeats[: count - 1]
    while len(candidates) < count:
        suggestion = strategy.ask()
        if suggestion is None:
            break
        candidates.append((TrialRole.SEARCH, suggestion.params))
    deployment = build_deployment(spec, engine, spec.name or "dry-run")
    out = []
    for number, (role, params) in enumerate(candidates):
        problems = spec.space.violations(params) if params else []
        problems += engine.preflight(params, spec.workload)
        try:
            command = engine.launch_command(params, host=DRY_RUN_HOST, port=DRY_RUN_PORT)
            cmd = command.display()
            launch = describe_launch(deployment, command, f"trial-{number:04d}")
        except ServetuneError as e:
            cmd = launch = f"(no command: {e})"
        out.append(PlannedTrial(number, role, params, cmd, problems, launch))
    return out


def parallel_notes(spec: StudySpec) -> list[tuple[str, str]]:
    """What ``validate`` and ``run --dry-run`` say about ``budget.parallel``, as (``"note"`` or
    ``"warning"``, text) pairs (empty when 1).

    When > 1: how many trials run at once, and, for a deployment on this host (local or
    docker), a warning that trials in flight at once share its CPU, so each one's measurement
    is disturbed by the others: the outside-load check (``deployment.max_outside_cpu_fraction``)
    flags such a trial and re-runs it once unless the limit allows the load.
    """
    n = spec.budget.parallel
    if n <= 1:
        return []
    notes = [
        (
            "note",
            f"budget.parallel {n}: up to {n} trials run at once (the baseline runs alone "
            "first; each confirm round runs its trials together)",
        )
    ]
    if not isinstance(spec.deployment, KubernetesDeploymentSpec):
        limit = spec.deployment.max_outside_cpu_fraction
        notes.append(
            (
                "warning",
                f"with a {spec.deployment.kind} deployment the {n} trials in flight share "
                "this host's CPU (each waits until its engine's threads fit the cores), so their "
                "measurements disturb each other: the outside-load check will flag and re-run "
                "a trial measured while the others used more than "
                f"deployment.max_outside_cpu_fraction = {limit:g} of the CPU; raise that limit "
                "to accept it, or run the trials on separate hosts through a manager and workers",
            )
        )
    return notes
