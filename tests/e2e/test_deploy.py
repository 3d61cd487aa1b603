"""Issue #8 end to end: deploy workers over SSH to two real hosts, run a trial on each, restore.

The manager side is a real fleet manager with a password-protected private Redis (``Fleet`` with
no workers of its own) and a real sshd for the workers' forward tunnels. The hosts: a "loopback
host" (an sshd in the root namespace, with package-index access: online install) and a network
namespace with no route to any index and its own sshd, whose Python is another build (offline
install from a wheelhouse). ``Deployer`` runs in the test process, as the manager's API runs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from servetune.modelgen import ModelFiles
from servetune.remote import tunnel
from servetune.remote.models import Category, OfflineMode, RedisVia, StepStatus, WorkerSlot
from servetune.settings import Settings
from tests.e2e.fleet_harness import SERVETUNE, Fleet
from tests.integration.deploy_helpers import (
    assert_ok,
    deploy,
    describe,
    kill_install,
    make_slot,
    manager_settings,
    remove,
    restore,
    step,
    wait_until,
    worker_processes,
    workers,
)
from tests.integration.study_helpers import small_spec
from tests.sshd import NetnsHost, SshServer, make_key, netns_host, require_root, ssh_server

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1500)]

OTHER_PYTHON = next(
    (
        p
        for p in ("/root/.pyenv/versions/3.12.1/bin/python3", "/usr/bin/python3")
        if Path(p).exists()
    ),
    "/usr/bin/python3",
)
"""The netns host's Python: another build than the manager's (pyenv 3.12.1, else Debian's 3.11.2)."""


DEPLOY_STEPS = [
    "preflight",
    "bundle",
    "prepare",
    "redis",
    "upload",
    "install",
    "stop",
    "config",
    "start",
    "register",
]


@dataclass
class Stage:
    """Everything the module's tests share."""

    root: Path
    fleet: Fleet
    netns: NetnsHost
    loopback: SshServer
    remote: SshServer
    manager_sshd: SshServer
    key: Path
    settings: Settings

    @property
    def redis_url(self) -> str:
        """The manager's Redis (with its password), as the manager reaches it."""
        return self.fleet.redis.url

    def netns_slot(self) -> WorkerSlot:
        """The slot of the netns host: another Python build, offline auto, forward tunnel to the
        manager's sshd on the veth address."""
        return make_slot(
            "netns-1",
            self.remote.ssh_command(self.key),
            str(self.root / "remote-netns"),
            python=OTHER_PYTHON,
            redis_via=RedisVia.FORWARD,
            manager_ssh=f"root@{self.netns.host_side}:{self.manager_sshd.port}",
            offline=OfflineMode.AUTO,
        )


@pytest.fixture(scope="module")
def stage(tiny_model: ModelFiles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stage]:
    """The module's hosts and manager; everything they started is killed at the end."""
    require_root()
    root = tmp_path_factory.mktemp("deploy-e2e")
    with contextlib.ExitStack() as stack:
        netns = stack.enter_context(netns_host())
        key = make_key(root / "client" / "id_ed25519")
        loopback = stack.enter_context(ssh_server(root / "sshd-loopback"))
        loopback.authorize(Path(f"{key}.pub"))
        remote = stack.enter_context(ssh_server(root / "sshd-netns", netns=netns))
        remote.authorize(Path(f"{key}.pub"))
        manager_sshd = stack.enter_context(
            ssh_server(root / "sshd-manager", listen=["127.0.0.1", netns.host_side])
        )
        fleet = Fleet(
            root / "fleet",
            model_path=tiny_model.gguf_path,
            workers=(),
            redis_password=secrets.token_hex(16),
        )
        # the manager's own deployer (worker-deploy through the API) adds keys for its sshd
        fleet.manager.env["SERVETUNE_AUTHORIZED_KEYS_PATH"] = str(manager_sshd.authorized_keys)
        fleet.manager.env["SERVETUNE_MANAGER_SSH"] = f"root@127.0.0.1:{manager_sshd.port}"
        stack.enter_context(fleet)
        for d in ("remote-netns", "remote-netns-rev", "remote-cli"):
            stack.callback(kill_install, root / d)
        settings = manager_settings(
            root / "manager-side",
            authorized_keys_path=manager_sshd.authorized_keys,
            register_timeout_s=120.0,
        )
        yield Stage(root, fleet, netns, loopback, remote, manager_sshd, key, settings)


def assert_pins_the_manager_sshd(stage: Stage, install: Path | str, host: str) -> None:
    """The worker's known_hosts holds exactly the manager sshd's host key, under the name its
    tunnel looks up (``[host]:port``), mode 600; its tunnel config checks it strictly."""
    known_hosts = Path(install) / "ssh" / "known_hosts"
    host_key = " ".join(stage.manager_sshd.host_public_key().split()[:2])
    assert known_hosts.read_text() == f"[{host}]:{stage.manager_sshd.port} {host_key}\n"
    assert stat.S_IMODE(known_hosts.stat().st_mode) == 0o600
    launch = json.loads((Path(install) / "worker.json").read_text())
    assert launch["tunnel"]["strict_host_key_checking"] == "yes", launch["tunnel"]


def run_one_trial(stage: Stage, model: ModelFiles, name: str, worker_id: str) -> None:
    """Submit a one-trial study (the baseline) and check it completed on ``worker_id``."""
    study_id = stage.fleet.submit(small_spec(model, trials=1, name=name))
    stage.fleet.wait_study_finished(study_id, timeout_s=240)
    trials = stage.fleet.trials(study_id)
    assert [t["state"] for t in trials] == ["COMPLETE"], trials
    assert trials[0]["worker_id"] == worker_id, trials


def test_worker_deploy_online_through_the_cli_completes_a_trial_then_restore_and_delete(
    stage: Stage, tiny_model: ModelFiles
) -> None:
    """What a user types: ``servetune worker-deploy "SSH COMMAND"`` to the loopback host (online:
    it reaches the index; the manager deploys with its own Deployer); the worker completes a
    trial; then ``worker-restore`` (the live worker stays the only one), then ``worker-remove``
    (the worker stops, its key goes)."""
    install = stage.root / "remote-cli"
    env = stage.fleet.env(stage.root / "cli")
    manager = ("--manager", stage.fleet.base_url)
    command = stage.loopback.ssh_command(stage.key)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(  # noqa: S603 - argv list of our own CLI
            [*SERVETUNE, *args, *manager],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
            check=False,
        )

    try:
        deployed = cli("worker-deploy", command, "--name", "cli-1", "--install-dir", str(install))
        print(deployed.stdout, deployed.stderr)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        assert "register" in deployed.stdout
        for name in DEPLOY_STEPS:
            assert name in deployed.stdout, (name, deployed.stdout)
        assert "rsync" in deployed.stdout, "the loopback host has rsync"
        procs = worker_processes(install)
        assert len(procs) == 1
        slots = {s["name"]: s for s in stage.fleet.get("/api/worker-slots")["items"]}
        assert slots["cli-1"]["status"] in ("online", "busy"), slots["cli-1"]
        assert slots["cli-1"]["worker_id"]

        config = install / "worker.json"
        assert stat.S_IMODE(config.stat().st_mode) == 0o600
        assert stage.fleet.redis.password is not None
        assert stage.fleet.redis.password not in " ".join(procs[0].cmdline())
        assert stage.fleet.redis.password not in deployed.stdout + deployed.stderr
        lines = [
            line
            for line in stage.manager_sshd.authorized_keys.read_text().splitlines()
            if "servetune-slot:cli-1" in line
        ]
        assert len(lines) == 1, lines
        assert f'permitopen="127.0.0.1:{stage.fleet.redis.port}"' in lines[0]
        assert lines[0].startswith("restrict,")
        assert_pins_the_manager_sshd(stage, install, "127.0.0.1")
        run_one_trial(stage, tiny_model, "deployed-online", slots["cli-1"]["worker_id"])

        restored = cli("worker-restore", "cli-1")
        assert restored.returncode == 0, restored.stdout + restored.stderr
        assert [p.pid for p in worker_processes(install)] == [procs[0].pid]
        assert "servetune-slot:cli-1" in stage.manager_sshd.authorized_keys.read_text()

        removed = cli("worker-remove", "cli-1")
        assert removed.returncode == 0, removed.stdout + removed.stderr
        assert f"its worker (pid {procs[0].pid}) stopped" in removed.stdout, removed.stdout
        assert not worker_processes(install), "worker-remove stops the worker on its host"
        assert "servetune-slot:cli-1" not in stage.manager_sshd.authorized_keys.read_text()
        names = [s["name"] for s in stage.fleet.get("/api/worker-slots")["items"]]
        assert "cli-1" not in names
        assert "cli-1" not in stage.fleet.worker_states(), "its stopped worker is forgotten"
    finally:
        kill_install(install)


def test_offline_deploy_to_the_no_route_host_installs_a_wheelhouse_and_completes_a_trial(
    stage: Stage, tiny_model: ModelFiles
) -> None:
    slot = stage.netns_slot()
    report = deploy(stage.settings, stage.redis_url, slot)
    print(f"\nOFFLINE DEPLOY (netns host, {OTHER_PYTHON}): {report.duration_s:.1f} s")
    print(describe(report))
    assert_ok(report)
    bundle = step(report, "bundle")
    assert bundle.status == StepStatus.WARNING, describe(report)
    assert bundle.category == Category.INDEX_UNREACHABLE
    assert bundle.suggestion and "offline" in bundle.suggestion
    assert "offline" in step(report, "install").detail
    version = subprocess.run(  # noqa: S603
        [OTHER_PYTHON, "-c", "import platform; print(platform.python_version())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert f"Python {version} " in step(report, "preflight").detail
    assert f"py{version}-" in bundle.detail, "the wheelhouse is resolved for that exact Python"
    assert report.worker_id is not None

    procs = worker_processes(slot.install_dir)
    assert len(procs) == 1, procs
    assert procs[0].pid in stage.netns.pids(), "the worker runs inside the no-route namespace"
    assert_pins_the_manager_sshd(stage, slot.install_dir, stage.netns.host_side)
    run_one_trial(stage, tiny_model, "deployed-offline", report.worker_id)


def test_restore_keeps_a_live_worker_and_brings_back_a_killed_one(stage: Stage) -> None:
    slot = stage.netns_slot()
    before = worker_processes(slot.install_dir)
    if len(before) != 1:  # the offline test failed or ran alone: deploy first
        assert_ok(deploy(stage.settings, stage.redis_url, slot))
        before = worker_processes(slot.install_dir)
    assert len(before) == 1, before
    pid = before[0].pid

    live = restore(stage.settings, stage.redis_url, slot)
    assert_ok(live)
    assert [s.name for s in live.steps] == ["preflight", "status", "register"], describe(live)
    after = worker_processes(slot.install_dir)
    assert [p.pid for p in after] == [pid], "restore of a live worker must not start another"

    os.kill(pid, signal.SIGKILL)
    wait_until(
        lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie",
        10,
        "the killed worker is gone",
    )
    # a key an impostor got recorded earlier does not survive: the file is written anew
    known_hosts = Path(slot.install_dir) / "ssh" / "known_hosts"
    impostor = make_key(stage.root / "impostor" / "ssh_host_ed25519_key", "impostor")
    with known_hosts.open("a") as f:
        name = f"[{stage.netns.host_side}]:{stage.manager_sshd.port}"
        f.write(f"{name} {Path(f'{impostor}.pub').read_text()}")
    back = restore(stage.settings, stage.redis_url, slot)
    print(f"\nRESTORE after kill -9: {back.duration_s:.1f} s\n{describe(back)}")
    assert_ok(back)
    assert step(back, "start").status == StepStatus.OK
    assert step(back, "install").status == StepStatus.SKIPPED, "installed already: not again"
    new = worker_processes(slot.install_dir)
    assert len(new) == 1 and new[0].pid != pid, new
    assert back.worker_id == live.worker_id, "the same worker (stable id) registered again"
    assert_pins_the_manager_sshd(stage, slot.install_dir, stage.netns.host_side)
    online = [
        w
        for w in workers(stage.settings, stage.redis_url)
        if w.info.alias == "netns-1" and w.state in ("online", "busy")
    ]
    assert [w.info.pid for w in online] == [new[0].pid]


def test_reverse_tunnel_deploy_registers_and_remove_takes_key_and_tunnel_away(
    stage: Stage,
) -> None:
    """redis_via=reverse: the manager keeps ``ssh -R`` open to the no-route host (a detached
    ``servetune tunnel``); removing the slot stops it. Removing the forward slot drops its key."""
    slot = make_slot(
        "netns-rev",
        stage.remote.ssh_command(stage.key),
        str(stage.root / "remote-netns-rev"),
        python=OTHER_PYTHON,
        redis_via=RedisVia.REVERSE,
    )
    try:
        report = deploy(stage.settings, stage.redis_url, slot)
        print(f"\nREVERSE DEPLOY (netns host): {report.duration_s:.1f} s\n{describe(report)}")
        assert_ok(report)
        assert "reverse tunnel" in step(report, "redis").detail
        assert tunnel.detached_running(stage.settings, "netns-rev")
        assert len(worker_processes(slot.install_dir)) == 1

        removed = remove(stage.settings, stage.redis_url, slot)
        assert removed.success and step(removed, "stop").status is StepStatus.OK, removed
        assert not worker_processes(slot.install_dir)
        assert not tunnel.detached_running(stage.settings, "netns-rev")
    finally:
        tunnel.stop_detached(stage.settings, "netns-rev")
        kill_install(slot.install_dir)

    forward = stage.netns_slot()
    if "servetune-slot:netns-1" not in stage.manager_sshd.authorized_keys.read_text():
        assert_ok(deploy(stage.settings, stage.redis_url, forward))  # run alone: deploy it
    assert "servetune-slot:netns-1" in stage.manager_sshd.authorized_keys.read_text()
    remove(stage.settings, stage.redis_url, forward)
    assert "servetune-slot:netns-1" not in stage.manager_sshd.authorized_keys.read_text()
