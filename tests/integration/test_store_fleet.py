"""The store's fleet additions (migration 0003, executor, trial workers, delete), on SQLite and
PostgreSQL alike: what the manager's API reads and writes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command

from servetune.core.study import TrialRole
from servetune.errors import StudyBusy, StudyNotFound
from servetune.store.db import alembic_config, current_revision, head_revision, make_engine
from servetune.store.repo import LeaseOwner, StudyStore
from tests.integration.test_store import make_spec

pytestmark = pytest.mark.integration


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL of an empty database: a fresh SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'servetune.db'}"
        return
    yield request.getfixturevalue("fresh_postgres_url")


def test_upgrade_from_0002_keeps_studies_and_makes_them_local(store_url: str) -> None:
    with StudyStore(store_url) as s:
        study = s.create_study("old", make_spec(), {"name": "old"})
        s.add_trial(study.id, 0, TrialRole.BASELINE, {})
    command.downgrade(alembic_config(url=store_url), "0002")
    engine = make_engine(store_url)
    try:
        assert current_revision(engine) == "0002"
    finally:
        engine.dispose()
    with StudyStore(store_url) as s:  # opening upgrades to the head again
        old = s.get_study("old")
        assert old.executor == "local"
        assert [t.number for t in s.list_trials(old.id)] == [0]
        assert s.trial_workers(old.id) == {}
    engine = make_engine(store_url)
    try:
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


def test_manager_study_records_workers_and_is_deleted_only_when_free(store_url: str) -> None:
    with StudyStore(store_url) as s:
        study = s.create_study("fleet", make_spec(), {}, executor="manager")
        assert s.get_study(study.id).executor == "manager"
        trial = s.add_trial(study.id, 0, TrialRole.BASELINE, {})
        assert trial.id is not None
        s.set_trial_worker(trial.id, "w-1")
        s.set_trial_worker(trial.id, "w-2")  # placed again: the last worker is kept
        assert s.trial_workers(study.id) == {trial.id: "w-2"}

        owner = LeaseOwner(owner_id="manager-run", host="h", pid=1)
        s.acquire_lease(study.id, owner, ttl_s=60)
        with pytest.raises(StudyBusy, match="cancel it first"):
            s.delete_study(study.id)
        assert s.get_study(study.id).name == "fleet"

        s.release_lease(study.id, owner.owner_id)
        s.delete_study(study.id)
        with pytest.raises(StudyNotFound):
            s.get_study(study.id)
        with pytest.raises(StudyNotFound):
            s.delete_study(study.id)
        # the name is free again, and no trial of the deleted study is left behind
        again = s.create_study("fleet", make_spec(), {})
        assert s.list_trials(again.id) == []


def test_unknown_executor_is_refused(tmp_path: Path) -> None:
    with (
        StudyStore(f"sqlite:///{tmp_path / 'db.sqlite'}") as s,
        pytest.raises(ValueError, match="local, manager"),
    ):
        s.create_study("x", make_spec(), {}, executor="cloud")  # type: ignore[arg-type]
