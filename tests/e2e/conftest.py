"""Fixtures of the end-to-end tests: one fleet (private Redis, a manager, two workers) per module.

Each test gets it healed (whatever an earlier test killed is started again); a failed test's
report carries the tail of every fleet process's log.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from servetune.modelgen import ModelFiles
from tests.e2e.fleet_harness import Fleet


@pytest.fixture(scope="module")
def fleet_module(
    tiny_model: ModelFiles, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    """The module's fleet: workers w1 and w2 (max-parallel 1), heartbeat 1 s, lease 3 s;
    its logs stay under the test session's temporary folder."""
    with Fleet(tmp_path_factory.mktemp("fleet"), model_path=tiny_model.gguf_path) as fleet:
        yield fleet


@pytest.fixture
def fleet(fleet_module: Fleet) -> Fleet:
    """The module's fleet with every process running, every worker online and no engine left."""
    fleet_module.heal()
    return fleet_module


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Append the fleet's logs (every process's tail) to the report of a failed test."""
    outcome: Any = yield
    report = outcome.get_result()
    fleet = getattr(item, "funcargs", {}).get("fleet")
    if report.failed and isinstance(fleet, Fleet):
        report.sections.append(("fleet logs", fleet.report()))
