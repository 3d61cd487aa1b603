"""Worker slots on a real manager: the REST API (CRUD, validation, conflicts, deploys, statuses
reconciled with real workers registered in a private Redis), migration 0004 on SQLite and
PostgreSQL, and the `servetune worker-*` commands against a live manager.

No SSH here: deploys go through ``StandInDeployer``, a test-only stand-in for remote/deploy.py's
Deployer (the end-to-end deploy over real sshd is tests/e2e/test_deploy.py). A successful stand-in
deploy registers a worker through cluster/registry.py, as a deployed worker does.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from fastapi.testclient import TestClient
from sqlalchemy import inspect

from servetune.cluster.models import GPUInfo, Heartbeat, RunningTrial, WorkerInfo, utc_now
from servetune.errors import SlotExists, SlotNotFound
from servetune.manager.app import create_app
from servetune.manager.deps import ManagerState
from servetune.remote.models import (
    Category,
    DeployReport,
    DeployStep,
    OfflineMode,
    StepStatus,
    WorkerSlot,
    WorkerSlotCreate,
    WorkerSlotUpdate,
)
from servetune.settings import Settings
from servetune.store.db import alembic_config, current_revision, make_engine
from servetune.store.repo import StudyStore
from servetune.store.slots import SlotStore
from tests.integration.manager_helpers import ScriptedSupervisor, live_server
from tests.integration.study_helpers import servetune
from tests.integration.test_store import make_spec
from tests.redis_server import RedisServer

pytestmark = pytest.mark.integration

GPU = GPUInfo(
    index=0,
    name="NVIDIA H200",
    uuid="GPU-1",
    memory_total_gib=139.8,
    memory_used_gib=1.0,
    memory_free_gib=138.8,
)


class StandInDeployer:
    """Test-only stand-in for remote.deploy.Deployer (same constructor and methods), no SSH.

    A deploy or restore waits until ``release`` is set (set by default), then fails with
    ``fail`` (a Category) when set, raises ``raises`` when set, else registers the worker
    ``w-<slot name>`` through the real registry, beats once and reports success.
    """

    def __init__(self, settings: Settings, redis_url: str, registry: Any) -> None:
        self.redis_url = redis_url
        self.registry = registry
        self.calls: list[tuple[str, str, OfflineMode | None]] = []
        self.removed: list[str] = []
        self.stop_worker_asked: list[bool] = []
        self.unreachable = False
        self.release = threading.Event()
        self.release.set()
        self.entered = threading.Event()
        self.fail: Category | None = None
        self.raises: Exception | None = None

    async def deploy(self, slot: WorkerSlot, *, offline: OfflineMode | None = None) -> DeployReport:
        self.calls.append(("deploy", slot.name, offline))
        return await self._run(slot, "deploy")

    async def restore(self, slot: WorkerSlot) -> DeployReport:
        self.calls.append(("restore", slot.name, None))
        return await self._run(slot, "restore")

    async def remove(self, slot: WorkerSlot, *, stop_worker: bool = True) -> DeployReport:
        self.removed.append(slot.name)
        self.stop_worker_asked.append(stop_worker)
        if not stop_worker:
            stop = DeployStep(name="stop", status=StepStatus.SKIPPED, duration_s=0.0)
            message = f"worker slot {slot.name} removed; its worker on the host was kept"
        elif self.unreachable:
            stop = DeployStep(
                name="stop",
                status=StepStatus.WARNING,
                duration_s=0.2,
                detail="ssh: connect to host gpu-host-1 port 2222: Connection refused",
                category=Category.CONNECTION_REFUSED,
                suggestion="nothing listens on gpu-host-1:2222. The slot is removed anyway; "
                "if its worker still runs on the host, stop it there with "
                "`kill $(cat ~/.servetune/worker.pid)`.",
            )
            message = f"worker slot {slot.name} removed; its worker on the host was not stopped"
        else:
            stop = DeployStep(name="stop", status=StepStatus.OK, duration_s=0.5)
            message = f"worker slot {slot.name} removed; its worker (pid 4242) stopped"
        return DeployReport(
            success=True, action="remove", message=message, steps=[stop], duration_s=0.5
        )

    async def _run(self, slot: WorkerSlot, action: str) -> DeployReport:
        self.entered.set()
        await asyncio.to_thread(self.release.wait, 30)
        if self.raises is not None:
            raise self.raises
        preflight = DeployStep(
            name="preflight", status=StepStatus.OK, duration_s=0.4, detail="python 3.11.2 x86_64"
        )
        if self.fail is not None:
            failed = DeployStep(
                name="preflight",
                status=StepStatus.FAILED,
                duration_s=0.3,
                detail="Permission denied (publickey)",
                category=self.fail,
                suggestion="add your key to gpu@gpu-host-1 with ssh-copy-id",
            )
            return DeployReport(
                success=False,
                action=action,  # type: ignore[arg-type]
                message="ssh refused the key for gpu@gpu-host-1",
                category=self.fail,
                suggestion="add your key to gpu@gpu-host-1 with ssh-copy-id",
                steps=[failed],
                logs=["gpu@gpu-host-1: Permission denied (publickey)."],
                duration_s=0.3,
            )
        worker_id = f"w-{slot.name}"
        await self.registry.register(worker_info(worker_id, slot.name))
        await self.registry.beat(Heartbeat(worker_id=worker_id, sent_at=utc_now(), gpus=[GPU]))
        register = DeployStep(name="register", status=StepStatus.OK, duration_s=1.2)
        return DeployReport(
            success=True,
            action=action,  # type: ignore[arg-type]
            message=f"worker {worker_id} registered",
            steps=[preflight, register],
            worker_id=worker_id,
            gpus=["NVIDIA H200 (139.8 GiB)"],
            duration_s=1.6,
        )


def worker_info(worker_id: str, alias: str) -> WorkerInfo:
    return WorkerInfo(
        id=worker_id,
        hostname="gpu-host-1",
        alias=alias,
        pid=4321,
        version="0.1.0",
        engines=["llamacpp"],
        deployments=["local"],
        gpus=[GPU],
        cpu_count=8,
        memory_total_gib=31.2,
        max_parallel=1,
        started_at=utc_now(),
    )


def slot_settings(tmp_path: Path, redis_url: str, **extra: Any) -> Settings:
    """A test manager's settings; heartbeats last 90 s, so a worker stays online through a test
    unless it is marked offline."""
    return Settings(
        data_dir=tmp_path / "data",
        db_url=f"sqlite:///{tmp_path / 'manager.db'}",
        redis_url=redis_url,
        heartbeat_s=30.0,
        **extra,
    )


class Harness:
    """An app with a StandInDeployer (built by the app, at the first deploy) and its client."""

    def __init__(self, tmp_path: Path, redis_url: str, **settings: Any) -> None:
        self.deployers: list[StandInDeployer] = []

        def factory(settings: Settings, url: str, registry: Any) -> StandInDeployer:
            deployer = StandInDeployer(settings, url, registry)
            self.deployers.append(deployer)
            return deployer

        self.app = create_app(
            slot_settings(tmp_path, redis_url, **settings),
            supervisor_factory=ScriptedSupervisor,
            deployer_factory=factory,
        )

    @property
    def deployer(self) -> StandInDeployer:
        """The app's deployer (built on first use: asking for it builds it)."""
        self.state.slots.deployer  # noqa: B018  # builds it through the factory
        [deployer] = self.deployers
        return deployer

    @property
    def state(self) -> ManagerState:
        manager: ManagerState = self.app.state.manager
        return manager


@pytest.fixture
def harness(tmp_path: Path, private_redis: RedisServer) -> Iterator[tuple[Harness, TestClient]]:
    h = Harness(tmp_path, private_redis.url)
    with TestClient(h.app) as client:
        yield h, client


def create(client: TestClient, **fields: Any) -> dict[str, Any]:
    answer = client.post(
        "/api/worker-slots", json={"name": "gpu-1", "ssh_command": "ssh gpu@gpu-1", **fields}
    )
    assert answer.status_code == 201, answer.text
    body: dict[str, Any] = answer.json()
    return body


def test_slots_are_created_listed_read_changed_and_deleted(
    harness: tuple[Harness, TestClient],
) -> None:
    h, client = harness
    slot = create(client, ssh_command="ssh -p 2222 -J jump gpu@gpu-1")
    assert slot["status"] == "never_seen" and slot["worker_id"] is None
    assert (slot["install_dir"], slot["python"], slot["redis_via"], slot["offline"]) == (
        "~/.servetune",
        "python3",
        "forward",
        "auto",
    )
    assert slot["created_at"].endswith("Z") or slot["created_at"].endswith("+00:00")
    create(client, name="gpu-0", ssh_command="ssh gpu-0")
    assert [s["name"] for s in client.get("/api/worker-slots").json()["items"]] == [
        "gpu-0",
        "gpu-1",
    ]
    assert client.get(f"/api/worker-slots/{slot['id']}").json() == slot

    taken = client.post("/api/worker-slots", json={"name": "gpu-1", "ssh_command": "ssh other"})
    assert taken.status_code == 409 and "already exists" in taken.json()["detail"]

    changed = client.patch(
        f"/api/worker-slots/{slot['id']}",
        json={"redis_via": "direct", "redis_address": "10.0.0.5:6379", "max_parallel": 2},
    )
    assert changed.status_code == 200, changed.text
    assert (changed.json()["redis_via"], changed.json()["redis_address"]) == (
        "direct",
        "10.0.0.5:6379",
    )
    assert changed.json()["ssh_command"] == "ssh -p 2222 -J jump gpu@gpu-1"  # unchanged
    renamed = client.patch(f"/api/worker-slots/{slot['id']}", json={"name": "gpu-0"})
    assert renamed.status_code == 409 and "'gpu-0' already exists" in renamed.json()["detail"]

    removed = client.delete(f"/api/worker-slots/{slot['id']}?keep_worker=true")
    assert removed.status_code == 200, removed.text
    assert removed.json()["action"] == "remove" and removed.json()["success"] is True
    assert h.deployer.removed == ["gpu-1"]  # its tunnel key and reverse tunnel go too
    assert h.deployer.stop_worker_asked == [False]
    assert h.deployer.calls == []  # nothing deployed, nothing restored
    for method, path in (
        ("GET", f"/api/worker-slots/{slot['id']}"),
        ("PATCH", f"/api/worker-slots/{slot['id']}"),
        ("DELETE", f"/api/worker-slots/{slot['id']}"),
        ("POST", f"/api/worker-slots/{slot['id']}/deploy"),
        ("POST", f"/api/worker-slots/{slot['id']}/restore"),
    ):
        gone = client.request(method, path, json={} if method == "PATCH" else None)
        assert gone.status_code == 404, (method, path, gone.text)
        assert gone.json()["detail"] == f"no worker slot id {slot['id']}; saved slots: gpu-0"


INJECTIONS = (";touch {m}", "$(touch {m})", "`touch {m}`", "\ntouch {m}")


@pytest.mark.parametrize("injection", INJECTIONS, ids=["semicolon", "dollar", "backticks", "nl"])
def test_shell_characters_in_names_commands_and_paths_are_refused_and_run_nothing(
    harness: tuple[Harness, TestClient], tmp_path: Path, injection: str
) -> None:
    h, client = harness
    marker = tmp_path / "MARKER"
    evil = injection.format(m=marker)
    good = {"name": "gpu-1", "ssh_command": "ssh gpu@gpu-1"}
    cases = {
        "name": {**good, "name": f"gpu{evil}"},
        "ssh_command": {**good, "ssh_command": f"ssh gpu@gpu-1{evil}"},
        "install_dir": {**good, "install_dir": f"/opt/servetune{evil}"},
        "python": {**good, "python": f"python3{evil}"},
    }
    for field, body in cases.items():
        refused = client.post("/api/worker-slots", json=body)
        assert refused.status_code == 422, (field, refused.text)
        assert field in [p["field"] for p in refused.json()["problems"]], refused.json()
    slot = create(client)
    for field, body in cases.items():
        refused = client.patch(f"/api/worker-slots/{slot['id']}", json={field: body[field]})
        assert refused.status_code == 422, (field, refused.text)
        assert [p["field"] for p in refused.json()["problems"]] == [field], refused.json()
    assert client.get(f"/api/worker-slots/{slot['id']}").json() == slot  # nothing changed
    assert [s["name"] for s in client.get("/api/worker-slots").json()["items"]] == ["gpu-1"]
    assert h.deployers == []  # nothing was ever handed to a deployer
    assert not marker.exists()


def test_other_bad_fields_name_the_field_and_the_fix(
    harness: tuple[Harness, TestClient],
) -> None:
    _, client = harness
    good = {"name": "gpu-1", "ssh_command": "ssh gpu@gpu-1"}
    for changes, field, says in (
        ({"redis_address": "redis://:hunter2@10.0.0.5:6379"}, "redis_address", "no password"),
        ({"redis_address": "10.0.0.5:99999"}, "redis_address", "host:port"),
        ({"redis_via": "direct"}, "redis_address", "redis_address is not given"),
        ({"manager_ssh": "tuner@10.0.0.1:22 -o ProxyCommand=x"}, "manager_ssh", "[user@]host"),
        ({"ssh_command": "scp gpu-1"}, "ssh_command", ""),
        ({"ssh_command": "ssh -o ProxyCommand=nc gpu-1"}, "ssh_command", ""),
        ({"install_dir": "relative/dir"}, "install_dir", "~/"),
        ({"max_parallel": 0}, "max_parallel", ""),
        ({"redis_via": "carrier-pigeon"}, "redis_via", ""),
        ({"password": "hunter2"}, "password", "Extra inputs are not permitted"),
    ):
        refused = client.post("/api/worker-slots", json={**good, **changes})
        assert refused.status_code == 422, (changes, refused.text)
        problems = {p["field"]: p for p in refused.json()["problems"]}
        assert field in problems, refused.json()
        text = problems[field]["message"] + (problems[field]["fix"] or "")
        assert says in text, (changes, text)
    assert "hunter2" not in client.get("/api/worker-slots").text
    slot = create(client)
    null = client.patch(f"/api/worker-slots/{slot['id']}", json={"ssh_command": None})
    assert null.status_code == 422 and null.json()["problems"][0]["field"] == "ssh_command"
    bad_mode = client.post(f"/api/worker-slots/{slot['id']}/deploy", json={"offline": "often"})
    assert bad_mode.status_code == 422 and bad_mode.json()["problems"][0]["field"] == "offline"


def wait_for(check: Any, timeout_s: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_deploys_one_at_a_time_and_statuses_follow_the_registered_worker(
    harness: tuple[Harness, TestClient],
) -> None:
    h, client = harness
    slot = create(client)
    url = f"/api/worker-slots/{slot['id']}"
    deployer = h.deployer
    deployer.release.clear()
    answers: dict[str, Any] = {}
    first = threading.Thread(
        target=lambda: answers.setdefault("deploy", client.post(f"{url}/deploy")), daemon=True
    )
    first.start()
    assert deployer.entered.wait(10)
    assert client.get(url).json()["status"] == "deploying"
    assert client.get("/api/worker-slots").json()["items"][0]["status"] == "deploying"
    # what a manager killed now would leave: the slot says its deploy did not finish
    stored = h.state.slots.store.get(slot["id"])
    assert (stored.status, stored.category) == ("failed", "deploy_interrupted"), stored
    assert "worker-restore gpu-1" in (stored.suggestion or "")
    for method, path, body in (
        ("POST", f"{url}/deploy", None),
        ("POST", f"{url}/restore", None),
        ("DELETE", url, None),
        ("PATCH", url, {"max_parallel": 2}),
    ):
        busy = client.request(method, path, json=body)
        assert busy.status_code == 409, (method, path, busy.text)
        assert "gpu-1" in busy.json()["detail"], busy.json()
    deployer.release.set()
    first.join(10)
    report = answers["deploy"].json()
    assert answers["deploy"].status_code == 200 and report["success"] is True, report
    assert (report["worker_id"], report["gpus"]) == ("w-gpu-1", ["NVIDIA H200 (139.8 GiB)"])
    assert deployer.calls == [("deploy", "gpu-1", None)]  # the refused ones never reached it

    online = client.get(url).json()
    assert (online["status"], online["worker_id"], online["error"]) == ("online", "w-gpu-1", None)
    assert online["deployed_at"] is not None and online["last_seen_at"] is not None
    # its worker and its tunnel key carry its name: a deployed slot is not renamed
    renamed = client.patch(url, json={"name": "gpu-2"})
    assert renamed.status_code == 422, renamed.text
    [problem] = renamed.json()["problems"]
    assert problem["field"] == "name" and "delete it and save it again" in problem["fix"]
    moved = client.patch(url, json={"install_dir": "/opt/elsewhere"})  # its worker runs there
    assert moved.status_code == 422, moved.text
    [problem] = moved.json()["problems"]
    assert problem["field"] == "install_dir" and "worker-remove" in problem["fix"], problem

    # the worker's state in the registry drives the slot's: busy, then offline
    registry = h.state.registry
    running = RunningTrial(
        job_id="trial-1-1", study_id=1, trial_id=1, number=0, started_at=utc_now()
    )
    beat = Heartbeat(worker_id="w-gpu-1", sent_at=utc_now(), running=[running])
    client.portal.call(registry.beat, beat)  # type: ignore[union-attr]
    busy = client.get(url).json()
    assert busy["status"] == "busy"
    assert busy["last_seen_at"].replace("Z", "+00:00") == beat.sent_at.isoformat()
    client.portal.call(registry.mark_offline, "w-gpu-1")  # type: ignore[union-attr]
    assert client.get(url).json()["status"] == "offline"
    assert client.get("/api/worker-slots").json()["items"][0]["status"] == "offline"

    # a failed restore: HTTP 200, the report says why; the slot shows it while the worker is down
    deployer.fail = Category.AUTH_REFUSED
    failed = client.post(f"{url}/restore")
    assert failed.status_code == 200
    assert failed.json()["success"] is False and failed.json()["category"] == "auth_refused"
    shown = client.get(url).json()
    assert (shown["status"], shown["category"], shown["worker_id"]) == (
        "failed",
        "auth_refused",
        "w-gpu-1",
    )
    assert shown["error"] == "ssh refused the key for gpu@gpu-host-1"
    assert shown["suggestion"] == "add your key to gpu@gpu-host-1 with ssh-copy-id"
    # its worker heartbeats again (it came back by itself): online, the last error still shown
    client.portal.call(registry.beat, Heartbeat(worker_id="w-gpu-1", sent_at=utc_now()))  # type: ignore[union-attr]
    back = client.get(url).json()
    assert (back["status"], back["category"]) == ("online", "auth_refused")

    # a deploy with an offline mode passes it on; a successful one clears the error
    deployer.fail = None
    redeployed = client.post(f"{url}/deploy", json={"offline": "always"})
    assert redeployed.json()["success"] is True
    assert deployer.calls[-1] == ("deploy", "gpu-1", OfflineMode.ALWAYS)
    assert client.get(url).json()["error"] is None


def test_a_slot_whose_worker_never_registered_and_a_deployer_that_raises(
    harness: tuple[Harness, TestClient],
) -> None:
    h, client = harness
    slot = create(client)
    url = f"/api/worker-slots/{slot['id']}"
    # a worker registered under another id is not this slot's
    client.portal.call(h.state.registry.register, worker_info("w-other", "other"))  # type: ignore[union-attr]
    assert client.get(url).json()["status"] == "never_seen"
    h.deployer.raises = RuntimeError("bug in the deployer")
    answer = client.post(f"{url}/deploy")
    assert answer.status_code == 200
    report = answer.json()
    assert (report["success"], report["category"]) == (False, "unknown")
    assert "RuntimeError: bug in the deployer" in report["message"]
    assert client.get(url).json()["status"] == "failed"
    # the slot is free again: the next deploy runs
    h.deployer.raises = None
    assert client.post(f"{url}/deploy").json()["success"] is True


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL of an empty database: a fresh SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'servetune.db'}"
        return
    yield request.getfixturevalue("fresh_postgres_url")


def test_migration_0004_up_and_down_keeps_studies(store_url: str) -> None:
    with StudyStore(store_url) as store:
        store.create_study("kept", make_spec(), {})
        slots = SlotStore(store)
        saved = slots.create(WorkerSlotCreate(name="gpu-1", ssh_command="ssh gpu-1"))
        assert slots.get("gpu-1") == slots.get(saved.id) == saved
        with pytest.raises(SlotExists, match="'gpu-1' already exists"):
            slots.create(WorkerSlotCreate(name="gpu-1", ssh_command="ssh other"))
        with pytest.raises(SlotNotFound, match="no worker slot 'gpu-9'; saved slots: gpu-1"):
            slots.get("gpu-9")
        changed = slots.update(saved.id, WorkerSlotUpdate(max_parallel=3, manager_ssh=None))
        assert changed.max_parallel == 3 and changed.updated_at > saved.updated_at
    command.downgrade(alembic_config(url=store_url), "0003")
    engine = make_engine(store_url)
    try:
        assert current_revision(engine) == "0003"
        assert "worker_slots" not in inspect(engine).get_table_names()
    finally:
        engine.dispose()
    with StudyStore(store_url) as store:  # opening upgrades again: an empty table, studies kept
        assert store.get_study("kept").name == "kept"
        slots = SlotStore(store)
        assert slots.list() == []
        again = slots.create(WorkerSlotCreate(name="gpu-1", ssh_command="ssh gpu-1"))
        report = DeployReport(
            success=False,
            action="deploy",
            message="disk full",
            category=Category.DISK_FULL,
            suggestion="free 2 GiB",
        )
        failed = slots.record_deploy(again.id, report)
        assert (failed.status, failed.category, failed.error) == (
            "failed",
            "disk_full",
            "disk full",
        )
        slots.delete(again.id)
        with pytest.raises(SlotNotFound, match="no slot is saved yet"):
            slots.get(again.id)


def test_cli_deploys_restores_and_lists_through_a_live_manager(
    tmp_path: Path, private_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = "slot-token-0123456789abcdef"
    h = Harness(tmp_path, private_redis.url, api_token=token)
    marker = tmp_path / "MARKER"
    (tmp_path / "token").write_text(token + "\n")
    with live_server(h.app) as url:
        denied = servetune(tmp_path, "worker-slots", "--manager", url)
        assert denied.returncode == 1 and "--token-file" in denied.stderr, denied.stderr
        monkeypatch.setenv("SERVETUNE_API_TOKEN", token)  # the later commands' subprocesses get it
        deployed = servetune(
            tmp_path, "worker-deploy", "ssh -p 2222 gpu@gpu-host-1", "--manager", url,
            "--max-parallel", "2", "--offline", "never", "--token-file", str(tmp_path / "token"),
        )  # fmt: skip
        assert deployed.returncode == 0, deployed.stderr
        out = deployed.stdout
        assert "worker slot gpu-host-1 saved (id 1)" in out
        assert "preflight" in out and "python 3.11.2 x86_64" in out and "register" in out
        assert "worker w-gpu-host-1 registered" in out and "NVIDIA H200 (139.8 GiB)" in out
        assert h.deployer.calls == [("deploy", "gpu-host-1", OfflineMode.NEVER)]

        h.deployer.fail = Category.AUTH_REFUSED
        failed = servetune(
            tmp_path, "worker-deploy", "ssh -p 2222 gpu@gpu-host-1", "--manager", url
        )
        assert failed.returncode == 1, failed.stderr
        assert "worker slot gpu-host-1 (id 1) updated" in failed.stdout
        assert "error [auth_refused]: ssh refused the key for gpu@gpu-host-1" in failed.stdout
        assert "suggestion: add your key to gpu@gpu-host-1 with ssh-copy-id" in failed.stdout
        assert "Permission denied (publickey)." in failed.stdout  # the log tail

        h.deployer.fail = None
        restored = servetune(tmp_path, "worker-restore", "gpu-host-1", "--manager", url)
        assert restored.returncode == 0, restored.stderr
        assert "worker w-gpu-host-1 registered" in restored.stdout
        unnamed = servetune(
            tmp_path, "worker-deploy", "ssh gpu@gpu-9", "--name", "", "--manager", url
        )
        assert unnamed.returncode == 2 and "--name is empty" in unnamed.stderr, unnamed.stderr
        unknown = servetune(tmp_path, "worker-restore", "gpu-9", "--manager", url)
        assert unknown.returncode == 2 and "no worker slot named 'gpu-9'" in unknown.stderr
        assert "The request has 1 problem(s)" in unknown.stderr and "spec" not in unknown.stderr

        listed = servetune(tmp_path, "worker-slots", "--manager", url)
        assert listed.returncode == 0, listed.stderr
        assert "gpu-host-1" in listed.stdout and "online" in listed.stdout

        h.deployer.unreachable = True  # the host is gone: the slot goes anyway, and says so
        removed = servetune(tmp_path, "worker-remove", "gpu-host-1", "--manager", url)
        assert removed.returncode == 0, removed.stderr
        assert "worker slot gpu-host-1 removed" in removed.stdout
        assert "[connection_refused]" in removed.stdout
        assert "worker.pid" in removed.stdout  # how to stop the worker left on the host
        assert h.deployer.stop_worker_asked == [True]
        gone = servetune(tmp_path, "worker-remove", "gpu-host-1", "--manager", url)
        assert gone.returncode == 2 and "no worker slot named 'gpu-host-1'" in gone.stderr

        evil = servetune(
            tmp_path, "worker-deploy", f"ssh gpu@gpu-host-1; touch {marker}", "--manager", url
        )
        assert evil.returncode == 2 and "ssh_command" in evil.stderr, evil.stderr
        assert "The worker slot has 1 problem(s)" in evil.stderr, evil.stderr
        evil_dir = servetune(
            tmp_path, "worker-deploy", "ssh gpu@gpu-host-2", "--install-dir",
            f"/opt/$(touch {marker})", "--manager", url,
        )  # fmt: skip
        assert evil_dir.returncode == 2 and "install_dir" in evil_dir.stderr, evil_dir.stderr
    assert not marker.exists()
    assert [c[0] for c in h.deployer.calls] == ["deploy", "deploy", "restore"]


def test_a_body_that_is_not_json_is_named_as_the_body(harness: tuple[Harness, TestClient]) -> None:
    _, client = harness
    answer = client.post(
        "/api/worker-slots",
        content=b'{"name": "gpu-1",',
        headers={"content-type": "application/json"},
    )
    assert answer.status_code == 422, answer.text
    [problem] = answer.json()["problems"]
    assert problem["field"] == "(body)" and "not valid JSON" in problem["message"], problem
