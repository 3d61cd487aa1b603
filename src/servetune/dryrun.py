"""``servetune run SPEC --dry-run``: the first candidates' exact command lines and pre-flight
verdicts, computed without starting an engine or writing the database.
"""

from __future__ import annotations

from dataclasses import dataclass

from servetune.core.spec import StudySpec
from servetune.core.strategies.base import make_strategy
from servetune.core.study import Params, TrialRole
from servetune.engines import get_engine
from servetune.errors import ServetuneError

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


def plan(spec: StudySpec, count: int) -> list[PlannedTrial]:
    """The first ``count`` candidates of ``spec``'s study: the baseline (engine defaults), then
    what the strategy asks for, in order (asked without being told, so a model-based strategy
    gives its start-up proposals). Starts nothing, writes nothing; raises ValueError for
    ``count`` < 1 and ServetuneError when the engine cannot build a command (e.g. no binary).
    """
    if count < 1:
        raise ValueError("--count must be ≥ 1")
    engine = get_engine(spec.engine)
    strategy = make_strategy(spec)
    candidates: list[tuple[TrialRole, Params]] = [(TrialRole.BASELINE, {})]
    while len(candidates) < count:
        suggestion = strategy.ask()
        if suggestion is None:
            break
        candidates.append((TrialRole.SEARCH, suggestion.params))
    out = []
    for number, (role, params) in enumerate(candidates):
        problems = spec.space.violations(params) if params else []
        problems += engine.preflight(params, spec.workload)
        try:
            cmd = engine.launch_command(params, host=DRY_RUN_HOST, port=DRY_RUN_PORT).display()
        except ServetuneError as e:
            cmd = f"(no command: {e})"
        out.append(PlannedTrial(number, role, params, cmd, problems))
    return out
