"""The checks of worker slot fields beyond their types, and the slot name `worker-deploy`
makes from an ssh command (pure: nothing is run)."""

from __future__ import annotations

import pytest

from servetune.errors import SpecInvalid
from servetune.manager.slot_cli import default_slot_name
from servetune.manager.worker_slots import check_slot, slot_problems
from servetune.remote.models import WorkerSlotCreate


def slot(**fields: object) -> WorkerSlotCreate:
    return WorkerSlotCreate.model_validate({"name": "gpu-1", "ssh_command": "ssh gpu-1", **fields})


@pytest.mark.parametrize(
    ("command", "name"),
    [
        ("ssh gpu-host-1", "gpu-host-1"),
        ("ssh -p 2222 -i ~/.ssh/key me@gpu-host-1.lab.example", "gpu-host-1.lab.example"),
        ("ssh -J jump tuner@10.0.0.7", "10.0.0.7"),
        ("ssh root@::1", "ipv6-1"),
        ("ssh ssh://root@[fd00::5]:2222", "ipv6-fd00-5"),
        ("ssh ssh://root@gpu-2:2222", "gpu-2"),
    ],
)
def test_the_default_slot_name_is_the_host_part(command: str, name: str) -> None:
    assert default_slot_name(command) == name


def test_an_ssh_command_that_cannot_be_parsed_names_the_field() -> None:
    with pytest.raises(SpecInvalid) as refused:
        default_slot_name("ssh gpu-1; touch /tmp/x")
    assert [p.loc for p in refused.value.problems] == ["ssh_command"]
    assert refused.value.subject == "worker slot"  # the CLI says so, not "the spec"


@pytest.mark.parametrize(
    "fields",
    [
        {"redis_via": "direct", "redis_address": "10.0.0.5:6379"},
        {"redis_via": "direct", "redis_address": "[fd00::5]:6379"},
        {"redis_via": "direct", "redis_address": "redis.lab.example:1"},
        {"manager_ssh": "tuner@10.0.0.1:2222"},
        {"manager_ssh": "manager.lab.example"},
        {"manager_ssh": "[fd00::1]:22"},
        {"install_dir": "~/servetune-1.0/a_b+c@d"},
    ],
)
def test_good_fields_pass(fields: dict[str, str]) -> None:
    assert slot_problems(slot(**fields)) == []
    check_slot(slot(**fields))


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"redis_address": "redis://:pw@10.0.0.5:6379"}, "redis_address"),
        ({"redis_address": "10.0.0.5"}, "redis_address"),
        ({"redis_address": "10.0.0.5:0"}, "redis_address"),
        ({"redis_address": "fd00::5:6379"}, "redis_address"),
        ({"redis_via": "direct"}, "redis_address"),
        ({"manager_ssh": "-oProxyCommand=x@h"}, "manager_ssh"),
        ({"manager_ssh": "tuner@h:70000"}, "manager_ssh"),
        ({"manager_ssh": "tuner@h -p 22"}, "manager_ssh"),
        ({"install_dir": "/opt/a b'c"}, "install_dir"),
        ({"install_dir": "~/$HOME"}, "install_dir"),
        ({"install_dir": "/opt/x&&y"}, "install_dir"),
    ],
)
def test_bad_fields_are_named(fields: dict[str, str], field: str) -> None:
    assert [p.loc for p in slot_problems(slot(**fields))] == [field]
    with pytest.raises(SpecInvalid):
        check_slot(slot(**fields))


@pytest.mark.parametrize(
    "install_dir",
    ["/tmp", "/tmp/.", "/opt", "/usr/local", "/var/lib", "/home/alice", "/etc/servetune",
     "/proc/1/cwd", "~", "~/.", "/"],
)  # fmt: skip
def test_a_system_or_shared_directory_is_no_install_dir(install_dir: str) -> None:
    """servetune takes its install_dir over (venv/, keys, stopping what runs from it): never
    /tmp, /opt, /usr/local, a home directory, or a system tree."""
    [problem] = slot_problems(slot(install_dir=install_dir))
    assert problem.loc == "install_dir" and "directory of its own" in problem.message


@pytest.mark.parametrize(
    "install_dir", ["/opt/servetune", "/usr/local/servetune", "/home/alice/.servetune", "/tmp/x"]
)
def test_a_directory_of_its_own_is_an_install_dir(install_dir: str) -> None:
    assert slot_problems(slot(install_dir=install_dir)) == []


def test_ctrl_c_while_the_manager_deploys_says_the_deploy_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The request cannot stop a deploy on the manager: Ctrl-C says so, exit 130, no traceback."""
    from typer.testing import CliRunner

    from servetune.cli import app
    from servetune.manager import slot_cli

    slot = {"id": 3, "name": "gpu-a", "install_dir": "~/.servetune"}

    def call(method: str, base: str, path: str, token: object, **kw: object) -> object:
        if method == "GET":
            return {"items": [slot]}
        raise KeyboardInterrupt

    monkeypatch.setattr(slot_cli, "_call", call)
    run = CliRunner().invoke(app, ["worker-restore", "gpu-a"])
    assert run.exit_code == 130, run.output
    assert "the manager goes on with the restore of worker slot gpu-a" in run.output
    assert "servetune worker-slots" in run.output and "Traceback" not in run.output


def test_the_slot_commands_help_keeps_paragraphs_and_joins_their_lines() -> None:
    from servetune.manager.slot_cli import help_text

    doc = """Deploy a worker.

    Saves the host,
    then deploys.
    """
    assert help_text(doc) == "Deploy a worker.\n\nSaves the host, then deploys."


@pytest.mark.parametrize(
    ("body", "field", "says"),
    [
        ({"python": "python3; id"}, "python", "e.g. python3.11"),
        ({"max_parallel": True}, "max_parallel", "integer"),
        ({"max_parallel": "2"}, "max_parallel", "integer"),
        ({"name": "x" * 5000}, "name", "(5000 characters)"),
    ],
)
def test_a_bad_field_is_named_in_words_without_echoing_it_whole(
    body: dict[str, object], field: str, says: str
) -> None:
    from pydantic import ValidationError

    from servetune.remote.models import WorkerSlotCreate

    with pytest.raises(ValidationError) as caught:
        WorkerSlotCreate.model_validate({"name": "gpu-1", "ssh_command": "ssh h", **body})
    [error] = caught.value.errors()
    assert error["loc"] == (field,) and says in error["msg"], error
    assert len(error["msg"]) < 400
