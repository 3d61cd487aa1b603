"""The manager's REST API and WebSockets on a real store, a private Redis and real spec checks.

The study supervisor is ``ScriptedSupervisor`` (tests/integration/manager_helpers.py): these
tests check what the API promises (validation, status codes, live streams, auth), not the loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from servetune.cluster import keys
from servetune.cluster.models import GPUInfo, Heartbeat, RunningTrial, WorkerInfo, utc_now
from servetune.errors import SpecInvalid
from servetune.manager.app import create_app
from servetune.manager.deps import ManagerState
from servetune.modelgen import ModelFiles
from servetune.specfile import validate_document
from tests.integration.manager_helpers import ScriptedSupervisor, manager_settings
from tests.integration.study_helpers import small_spec
from tests.redis_server import RedisServer

pytestmark = pytest.mark.integration

TOKEN = "s3cret-token-for-the-test-0123456789"


@pytest.fixture
def client(tmp_path: Path, private_redis: RedisServer) -> Iterator[TestClient]:
    settings = manager_settings(tmp_path, private_redis.url)
    app = create_app(settings, supervisor_factory=ScriptedSupervisor)
    with TestClient(app) as c:
        yield c


def state(c: TestClient) -> ManagerState:
    manager: ManagerState = c.app.state.manager  # type: ignore[attr-defined]
    return manager


def wait_for(check: Any, timeout_s: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_study_lifecycle_over_rest(client: TestClient, tiny_model: ModelFiles) -> None:
    doc = small_spec(tiny_model, name="api-study")
    created = client.post("/api/studies", json={"spec_yaml": yaml.safe_dump(doc)})
    assert created.status_code == 201, created.text
    study = created.json()
    assert study["name"] == "api-study" and study["executor"] == "manager"
    supervisor = state(client).supervisor
    assert isinstance(supervisor, ScriptedSupervisor) and supervisor.submitted == [study["id"]]

    finished = wait_for(
        lambda: (
            (r := client.get(f"/api/studies/{study['id']}").json())["status"] == "finished" and r
        )
    )
    assert finished["running_here"] is False
    trials = client.get(f"/api/studies/{study['id']}/trials").json()["items"]
    assert [(t["number"], t["state"], t["worker_id"]) for t in trials] == [
        (0, "PRUNED", "w-script"),
        (1, "FAIL", "w-script"),
    ]
    listed = client.get("/api/studies").json()
    assert [s["name"] for s in listed["items"]] == ["api-study"] and listed["unreadable"] == []

    report = client.get(f"/api/studies/{study['id']}/report")
    assert report.status_code == 200 and report.headers["content-type"].startswith("text/html")
    assert "api-study" in report.text and 'src="/assets/plotly.min.js"' in report.text
    plotly_js = client.get("/assets/plotly.min.js")
    assert plotly_js.status_code == 200 and len(plotly_js.content) > 1_000_000

    # the same name again (as an object this time) is a conflict, not a second study
    again = client.post("/api/studies", json={"spec": doc})
    assert again.status_code == 409 and "already exists" in again.json()["detail"]

    finished = client.get(f"/api/studies/{study['id']}").json()
    cancel = client.post(f"/api/studies/{study['id']}/cancel")
    assert cancel.status_code == 409
    assert (
        cancel.json()["detail"]
        == "study api-study is not running (status finished); nothing to cancel"
    )
    resume = client.post(f"/api/studies/{study['id']}/resume")
    assert resume.status_code == 409
    assert resume.json()["detail"] == "study api-study already finished; nothing to resume"
    assert client.get(f"/api/studies/{study['id']}").json() == finished  # nothing written

    # a job of the study still queued on a worker, and a stored result: delete removes both
    # (a later study reusing these SQLite ids must not meet them); another trial's are kept
    r = state(client).redis
    client.portal.call(state(client).registry.register, worker_info("w-q"))  # type: ignore[union-attr]
    ours, theirs = f"trial-{trials[0]['id']}-1-0123abcd", "trial-999-1-0123abcd"

    async def leftovers() -> None:
        for job_id in (ours, theirs):
            await r.zadd(keys.queue("w-q"), {job_id: 1})
            await r.set(keys.arq_job(job_id), b"payload")
            await r.set(keys.arq_result(job_id), b"result")

    async def left() -> list[Any]:
        return [
            await r.zrange(keys.queue("w-q"), 0, -1),
            await r.exists(keys.arq_job(ours), keys.arq_result(ours)),
            await r.exists(keys.arq_job(theirs), keys.arq_result(theirs)),
        ]

    client.portal.call(leftovers)  # type: ignore[union-attr]
    assert client.delete(f"/api/studies/{study['id']}").status_code == 204
    assert client.portal.call(left) == [[theirs.encode()], 0, 2]  # type: ignore[union-attr]
    gone = client.get(f"/api/studies/{study['id']}")
    assert gone.status_code == 404 and "no study" in gone.json()["detail"]


def test_an_invalid_spec_gets_every_problem_like_validate(
    client: TestClient, tiny_model: ModelFiles
) -> None:
    doc = small_spec(tiny_model)
    doc["workload"]["concurrency"] = [0]
    doc["space"]["params"]["no-such-flag"] = {"kind": "int", "low": 1, "high": 2}
    with pytest.raises(SpecInvalid) as expected:
        validate_document(doc)
    answer = client.post("/api/studies", json={"spec_yaml": yaml.safe_dump(doc)})
    assert answer.status_code == 422
    body = answer.json()
    got = [
        (p["field"], p["message"] + (f"; {p['fix']}" if p["fix"] else "")) for p in body["problems"]
    ]
    assert got == [(p.loc, p.message) for p in expected.value.problems]
    assert len(got) >= 2 and body["detail"] == f"the spec has {len(got)} problem(s)"

    broken = client.post("/api/studies", json={"spec_yaml": "engine: [unclosed"})
    assert broken.status_code == 422
    assert "not valid YAML/JSON (line" in broken.json()["problems"][0]["message"]
    both = client.post("/api/studies", json={"spec": {}, "spec_yaml": "a: 1"})
    assert both.status_code == 422 and both.json()["problems"][0]["field"] == "spec"
    extra = client.post("/api/studies", json={"spec": {}, "colour": "red"})
    assert extra.status_code == 422 and extra.json()["problems"][0]["field"] == "colour"
    assert client.get("/api/studies").json()["items"] == []  # nothing was stored


def test_unknown_ids_are_404_with_a_message(client: TestClient) -> None:
    for path in (
        "/api/studies/4242",
        "/api/studies/4242/trials",
        "/api/workers/nope",
        "/api/workers/nope/logs",
        "/api/workers/nope/gpu-history",
    ):
        answer = client.get(path)
        assert answer.status_code == 404, path
        assert answer.json()["detail"]
    assert client.get("/api/studies/0").status_code == 422
    # a WebSocket refuses a bad id or query with a reason, not a bare 403
    refusals = {
        "/ws/studies/abc": "study id 'abc' is not a number",
        "/ws/workers/nope/logs?level=loud": "level: 'loud' is not a log level",
        "/ws/workers/nope/logs?since=2026-01-01T00:00:00": "write e.g. 2026-01-01T12:00:00Z",
        "/ws/workers/nope/logs?since=2026-01-01T00:00:00 00:00": "is not a time with a zone",
    }
    for path, says in refusals.items():
        with client.websocket_connect(path) as ws, pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert closed.value.code == 1008 and says in closed.value.reason, (path, closed.value)


def test_a_study_streams_its_trials_over_the_websocket(
    tmp_path: Path, private_redis: RedisServer, tiny_model: ModelFiles
) -> None:
    settings = manager_settings(tmp_path, private_redis.url)

    def held(*args: Any) -> ScriptedSupervisor:
        return ScriptedSupervisor(*args, hold=True)

    with TestClient(create_app(settings, supervisor_factory=held)) as c:
        study = c.post("/api/studies", json={"spec": small_spec(tiny_model, name="live")}).json()
        with c.websocket_connect(f"/ws/studies/{study['id']}") as ws:
            first = ws.receive_json()
            assert first["type"] == "snapshot" and first["study"]["name"] == "live"
            assert first["trials"] == []
            supervisor = state(c).supervisor
            assert isinstance(supervisor, ScriptedSupervisor)
            busy = c.delete(f"/api/studies/{study['id']}")
            assert busy.status_code == 409 and "cancel it first" in busy.json()["detail"]
            assert c.post(f"/api/studies/{study['id']}/resume").status_code == 409
            c.portal.call(supervisor.go.set)  # type: ignore[union-attr]
            messages = []
            while not messages or messages[-1]["type"] != "study":
                messages.append(ws.receive_json())
        trials = [
            (m["trial"]["number"], m["trial"]["state"]) for m in messages if m["type"] == "trial"
        ]
        assert trials == [(0, "RUNNING"), (0, "PRUNED"), (1, "RUNNING"), (1, "FAIL")]
        assert messages[-1] == {"type": "study", "status": "finished"}

        # a finished study: the snapshot, then a normal close
        with c.websocket_connect(f"/ws/studies/{study['id']}") as ws:
            snapshot = ws.receive_json()
            assert [t["number"] for t in snapshot["trials"]] == [0, 1]
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_json()
            assert closed.value.code == 1000
        with c.websocket_connect("/ws/studies/777") as ws, pytest.raises(WebSocketDisconnect) as e:
            ws.receive_json()
        assert e.value.code == 4404


def worker_info(worker_id: str) -> WorkerInfo:
    return WorkerInfo(
        id=worker_id,
        hostname="gpu-host-1",
        pid=1234,
        version="0.1.0",
        engines=["llamacpp"],
        deployments=["local"],
        gpus=[],
        cpu_count=8,
        memory_total_gib=31.2,
        max_parallel=2,
        started_at=utc_now(),
    )


def test_workers_counts_alias_gpu_history_and_logs(client: TestClient) -> None:
    from servetune.cluster.logs import RedisLogHandler

    manager = state(client)
    registry = manager.registry
    gpu = GPUInfo(
        index=0,
        name="NVIDIA H200",
        uuid="GPU-1",
        memory_total_gib=139.8,
        memory_used_gib=1.0,
        memory_free_gib=138.8,
        utilization_pct=3.0,
    )
    running = RunningTrial(
        job_id="trial-1-1", study_id=1, trial_id=1, number=0, started_at=utc_now()
    )
    client.portal.call(registry.register, worker_info("w-idle"))  # type: ignore[union-attr]
    client.portal.call(registry.register, worker_info("w-busy"))  # type: ignore[union-attr]
    client.portal.call(registry.beat, Heartbeat(worker_id="w-idle", sent_at=utc_now(), gpus=[gpu]))  # type: ignore[union-attr]
    client.portal.call(  # type: ignore[union-attr]
        registry.beat, Heartbeat(worker_id="w-busy", sent_at=utc_now(), running=[running])
    )
    listed = client.get("/api/workers").json()
    assert (listed["online"], listed["busy"], listed["offline"]) == (1, 1, 0)
    assert {w["info"]["id"]: w["state"] for w in listed["items"]} == {
        "w-idle": "online",
        "w-busy": "busy",
    }
    renamed = client.patch("/api/workers/w-idle", json={"alias": "rack 3"})
    assert renamed.status_code == 200 and renamed.json()["info"]["alias"] == "rack 3"
    assert client.get("/api/workers/w-idle").json()["info"]["alias"] == "rack 3"
    history = client.get("/api/workers/w-idle/gpu-history").json()["items"]
    assert history and history[0]["gpus"][0]["name"] == "NVIDIA H200"
    assert client.patch("/api/workers/w-x", json={"alias": "a"}).status_code == 404
    for bad_alias, says in (
        ("a\nb", "control character '\\n'"),
        ("", "alias is empty"),
        (" rack 3", "starts or ends with a space"),
        ("x" * 101, "at most 100"),
    ):
        refused = client.patch("/api/workers/w-busy", json={"alias": bad_alias})
        assert refused.status_code == 422, refused.text
        [problem] = refused.json()["problems"]
        assert problem["field"] == "alias" and says in problem["message"], problem
    taken = client.patch("/api/workers/w-busy", json={"alias": "Rack 3"})
    assert taken.status_code == 409 and "taken by worker w-idle" in taken.json()["detail"]
    assert client.get("/api/workers/w-busy").json()["info"]["alias"] is None  # unchanged
    cleared = client.patch("/api/workers/w-idle", json={"alias": None})
    assert cleared.status_code == 200 and cleared.json()["info"]["alias"] is None

    # logs: a record shipped before the WebSocket opens comes first, a later one live
    handler = RedisLogHandler(manager.settings.redis_url, "w-idle", manager.settings)
    shipped = logging.getLogger("servetune.test.worker")
    shipped.propagate = False
    shipped.addHandler(handler)
    shipped.setLevel(logging.INFO)
    try:
        shipped.warning("engine warming up")
        wait_for(lambda: client.get("/api/workers/w-idle/logs").json()["items"])
        items = client.get("/api/workers/w-idle/logs", params={"level": "warning"}).json()["items"]
        assert [r["message"] for r in items] == ["engine warming up"]
        shipped.info("engine ready")  # below WARNING: not sent to a level=Warning socket
        wait_for(lambda: len(client.get("/api/workers/w-idle/logs").json()["items"]) == 2)
        with client.websocket_connect("/ws/workers/w-idle/logs?level=Warning") as ws:
            recent = ws.receive_json()
            assert recent["type"] == "logs"
            assert [r["message"] for r in recent["records"]] == ["engine warming up"]
            written = time.monotonic()
            shipped.info("trial 3 is warming up")  # filtered out: below WARNING
            shipped.warning("trial 3 started")
            live = ws.receive_json()
            while live["type"] == "ping":
                live = ws.receive_json()
            assert [r["message"] for r in live["records"]] == ["trial 3 started"]
            assert time.monotonic() - written < 2.0
    finally:
        shipped.removeHandler(handler)
        handler.close()
    bad = client.get("/api/workers/w-idle/logs", params={"since": "2026-01-01T00:00:00"})
    assert bad.status_code == 422  # a time without a zone is refused, not guessed


def test_the_log_websocket_pings_while_quiet(client: TestClient) -> None:
    state(client).ws_ping_s = 0.2
    with client.websocket_connect("/ws/workers/quiet/logs") as ws:
        assert ws.receive_json() == {"type": "logs", "records": []}
        assert ws.receive_json() == {"type": "ping"}
    # the client went away: its pub/sub subscription is released
    r = state(client).redis
    wait_for(
        lambda: client.portal.call(r.pubsub_numsub, "servetune:logs-live:quiet")[0][1] == 0  # type: ignore[union-attr]
    )


def test_health(client: TestClient) -> None:
    body = client.get("/api/health").json()
    assert body["status"] == "ok" and body["database"] and body["redis"]


def test_bearer_token_guards_api_and_websockets_and_is_never_logged(
    tmp_path: Path, private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    settings = manager_settings(tmp_path, private_redis.url, api_token=TOKEN)
    caplog.set_level(logging.DEBUG)
    with TestClient(create_app(settings, supervisor_factory=ScriptedSupervisor)) as c:
        assert c.get("/api/studies").status_code == 401
        wrong = c.get("/api/studies", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        good = {"Authorization": f"Bearer {TOKEN}"}
        assert c.get("/api/studies", headers=good).status_code == 200
        assert c.get("/api/health", headers=good).json()["status"] == "ok"
        assert c.get("/openapi.json").status_code == 200  # the schema stays open
        with (
            pytest.raises(WebSocketDisconnect),
            c.websocket_connect("/ws/workers/w/logs") as ws,
        ):
            ws.receive_json()
        with c.websocket_connect("/ws/workers/w/logs", subprotocols=[f"bearer.{TOKEN}"]) as ws:
            assert ws.receive_json()["type"] == "logs"
        with c.websocket_connect("/ws/workers/w/logs", headers=good) as ws:
            assert ws.receive_json()["type"] == "logs"
    assert caplog.records
    assert all(TOKEN not in r.getMessage() for r in caplog.records)
    assert TOKEN not in caplog.text


def test_cancel_reaches_the_supervisor_and_the_study_ends_cancelled(
    tmp_path: Path, private_redis: RedisServer, tiny_model: ModelFiles
) -> None:
    settings = manager_settings(tmp_path, private_redis.url)

    def held(*args: Any) -> ScriptedSupervisor:
        return ScriptedSupervisor(*args, hold=True)

    with TestClient(create_app(settings, supervisor_factory=held)) as c:
        study = c.post("/api/studies", json={"spec": small_spec(tiny_model, name="stop")}).json()
        assert study["running_here"] is True
        cancelled = c.post(f"/api/studies/{study['id']}/cancel")
        assert cancelled.status_code == 200
        supervisor = state(c).supervisor
        assert isinstance(supervisor, ScriptedSupervisor)
        assert supervisor.cancelled == [study["id"]]
        wait_for(lambda: c.get(f"/api/studies/{study['id']}").json()["status"] == "cancelled")
