"""schemathesis against the manager's OpenAPI schema: generated requests never get a 5xx.

A live manager (uvicorn on a free port, private Redis, a real store holding one study, one
registered worker) with the bearer token on; a bounded number of examples per operation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from servetune.cluster.models import Heartbeat, utc_now
from servetune.manager.app import create_app
from servetune.modelgen import ModelFiles
from tests.integration.manager_helpers import ScriptedSupervisor, live_server, manager_settings
from tests.integration.study_helpers import small_spec
from tests.integration.test_manager_api import worker_info
from tests.redis_server import RedisServer

pytestmark = pytest.mark.integration

TOKEN = "schema-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXAMPLES_PER_OPERATION = 12


@pytest.fixture
def manager_url(
    tmp_path: Path, private_redis: RedisServer, tiny_model: ModelFiles
) -> Iterator[str]:
    settings_ = manager_settings(tmp_path, private_redis.url, api_token=TOKEN)
    app = create_app(settings_, supervisor_factory=ScriptedSupervisor)
    with live_server(app) as url:
        created = httpx.post(
            f"{url}/api/studies", json={"spec": small_spec(tiny_model, name="s")}, headers=AUTH
        )
        assert created.status_code == 201, created.text

        async def one_worker() -> None:
            from servetune.cluster.registry import Registry

            r = redis.asyncio.Redis.from_url(private_redis.url)
            registry = Registry(r, settings_)
            await registry.register(worker_info("w-1"))
            await registry.beat(Heartbeat(worker_id="w-1", sent_at=utc_now()))
            await r.aclose()

        asyncio.run(one_worker())
        yield url


def test_no_operation_answers_5xx(manager_url: str) -> None:
    api = schemathesis.openapi.from_url(f"{manager_url}/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 13
    failures: list[str] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def check(case: schemathesis.Case) -> None:
            case.call_and_validate(
                headers=AUTH,
                checks=[
                    not_a_server_error,
                    status_code_conformance,
                    content_type_conformance,
                    response_schema_conformance,
                ],
            )

        try:
            check()
        except Exception as e:  # collect every operation's failure, then fail once
            failures.append(f"{operation.label}: {e}")
    assert not failures, "\n\n".join(failures)
