"""Issue #8: every failure category provoked for real through ``Deployer.deploy``.

Each test breaks one real thing (a refused key, a changed host key, a closed port, dropped
packets, a missing Python, a read-only or full file system, a Redis nobody reaches, a tunnel the
manager's sshd refuses, ...) and checks the report: not success, that category, and a suggestion
naming what was found. Hosts: real sshd servers (``tests/sshd.py``) in the root namespace and in a
network namespace with no route out; Redis: a real password-protected redis-server.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from servetune.remote import deploy as deploy_module
from servetune.remote.keys import fingerprint
from servetune.remote.models import (
    Category,
    CommandResult,
    DeployReport,
    OfflineMode,
    RedisVia,
    StepStatus,
    WorkerSlot,
)
from servetune.settings import Settings
from tests.integration.deploy_helpers import (
    SHARED_WHEELHOUSE,
    deploy,
    describe,
    kill_install,
    kill_installs,
    make_slot,
    manager_settings,
    remove,
    step,
)
from tests.redis_server import RedisServer, free_port
from tests.sshd import NetnsHost, SshServer, make_key, netns_host, require_root, ssh_server

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

OLD_PYTHON = "/root/.pyenv/versions/3.9.18/bin/python3"
NETNS_PYTHON = "/usr/bin/python3"


@dataclass
class Hosts:
    """The module's hosts, Redis and manager side."""

    root: Path
    key: Path
    wrong_key: Path
    netns: NetnsHost
    remote: SshServer
    loopback: SshServer
    manager_sshd: SshServer
    redis: RedisServer
    settings: Settings

    def settings_in(self, folder: Path, **overrides: object) -> Settings:
        """Manager settings with their own data directory (own known_hosts), tunnel keys going
        to the manager sshd's authorized_keys; ``overrides`` win."""
        values: dict[str, object] = {
            "authorized_keys_path": self.manager_sshd.authorized_keys,
            "manager_ssh": f"root@127.0.0.1:{self.manager_sshd.port}",
            "ssh_connect_timeout_s": 3.0,
        }
        values.update(overrides)
        return manager_settings(folder, **values)

    def loopback_slot(self, install_dir: Path | str, **kw: object) -> WorkerSlot:
        """A slot on the loopback host (index reachable: online)."""
        return make_slot(
            str(kw.pop("name", "loop")),
            self.loopback.ssh_command(self.key),
            str(install_dir),
            **kw,  # type: ignore[arg-type]
        )


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    """A loopback host, a no-route netns host, the manager's sshd and Redis, for the module."""
    require_root()
    root = tmp_path_factory.mktemp("deploy-failures")
    with contextlib.ExitStack() as stack:
        netns = stack.enter_context(netns_host())
        key = make_key(root / "keys" / "id_ed25519")
        wrong_key = make_key(root / "keys" / "not_authorized")
        remote = stack.enter_context(ssh_server(root / "sshd-netns", netns=netns))
        remote.authorize(Path(f"{key}.pub"))
        loopback = stack.enter_context(ssh_server(root / "sshd-loop"))
        loopback.authorize(Path(f"{key}.pub"))
        manager_sshd = stack.enter_context(
            ssh_server(root / "sshd-manager", listen=["127.0.0.1", netns.host_side])
        )
        redis = RedisServer(root / "redis", password=os.urandom(12).hex())
        redis.start()
        stack.callback(redis.kill)
        stack.callback(kill_installs, root, "install-*")
        settings = manager_settings(
            root / "manager",
            authorized_keys_path=manager_sshd.authorized_keys,
            manager_ssh=f"root@127.0.0.1:{manager_sshd.port}",
            ssh_connect_timeout_s=3.0,
            register_timeout_s=60.0,
        )
        yield Hosts(root, key, wrong_key, netns, remote, loopback, manager_sshd, redis, settings)


def failed(report: DeployReport, category: Category, step_name: str) -> None:
    """The report says failure with ``category`` at step ``step_name`` and has a suggestion
    (printed: ``pytest -s`` shows what a user would read)."""
    print(f"\n{describe(report)}")
    assert not report.success, describe(report)
    assert report.category == category, describe(report)
    assert report.suggestion, describe(report)
    assert step(report, step_name).status == StepStatus.FAILED, describe(report)
    assert report.steps[-1].name == step_name, describe(report)


@contextlib.contextmanager
def mounted_tmpfs(where: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at ``where`` with ``options`` (e.g. ``size=1m`` or ``ro``), unmounted after."""
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], check=True)  # noqa: S603
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)  # noqa: S603


@contextlib.contextmanager
def root_route(*args: str) -> Iterator[None]:
    """``ip route add ARGS`` in the root namespace, deleted afterwards."""
    subprocess.run(["ip", "route", "add", *args], check=True, capture_output=True)  # noqa: S603
    try:
        yield
    finally:
        subprocess.run(["ip", "route", "del", *args], check=False, capture_output=True)  # noqa: S603


# ---- ssh: before anything is installed ---------------------------------------------------------


def test_refused_key_is_auth_refused_and_names_the_key(hosts: Hosts, tmp_path: Path) -> None:
    slot = make_slot(
        "wrong-key", hosts.loopback.ssh_command(hosts.wrong_key), str(tmp_path / "install")
    )
    report = deploy(hosts.settings, hosts.redis.url, slot)
    failed(report, Category.AUTH_REFUSED, "preflight")
    assert str(hosts.wrong_key) in (report.suggestion or ""), report.suggestion
    assert "ssh-copy-id" in (report.suggestion or "")


def test_changed_host_key_stops_the_deploy_and_says_how_to_forget_it(
    hosts: Hosts, tmp_path: Path
) -> None:
    settings = hosts.settings_in(tmp_path / "manager")
    with ssh_server(tmp_path / "sshd") as server:
        server.authorize(Path(f"{hosts.key}.pub"))
        # first contact records the host key (accept-new), then fails on a missing python
        first = make_slot(
            "rekeyed", server.ssh_command(hosts.key), str(tmp_path / "i"), python="/no/python3"
        )
        failed(deploy(settings, hosts.redis.url, first), Category.PYTHON_MISSING, "preflight")
        known_hosts = settings.ssh_dir / "known_hosts"
        assert f"[127.0.0.1]:{server.port}" in known_hosts.read_text()
        server.stop()
        server.new_host_key()
        server.start()
        slot = make_slot("rekeyed", server.ssh_command(hosts.key), str(tmp_path / "i"))
        report = deploy(settings, hosts.redis.url, slot)
    failed(report, Category.HOST_KEY_CHANGED, "preflight")
    assert "ssh-keygen -R" in (report.suggestion or "")
    assert str(known_hosts) in (report.suggestion or "")


def test_unknown_host_key_with_strict_checking_is_host_key_unknown(
    hosts: Hosts, tmp_path: Path
) -> None:
    settings = hosts.settings_in(tmp_path / "manager")
    command = hosts.loopback.ssh_command(hosts.key, "root", "-o", "StrictHostKeyChecking=yes")
    report = deploy(settings, hosts.redis.url, make_slot("strict", command, str(tmp_path / "i")))
    failed(report, Category.HOST_KEY_UNKNOWN, "preflight")
    assert f"ssh-keyscan -p {hosts.loopback.port}" in (report.suggestion or "")


def test_forward_without_the_managers_ssh_address_fails_before_connecting(
    hosts: Hosts, tmp_path: Path
) -> None:
    """Forgetting SERVETUNE_MANAGER_SSH is said at once, not after a minutes-long install."""
    settings = hosts.settings_in(tmp_path / "manager", manager_ssh=None)
    slot = hosts.loopback_slot(tmp_path / "install", name="no-manager-ssh")
    report = deploy(settings, hosts.redis.url, slot)
    failed(report, Category.TUNNEL_FAILED, "preflight")
    assert [s.name for s in report.steps] == ["preflight"], describe(report)
    assert "SERVETUNE_MANAGER_SSH" in (report.suggestion or "")
    assert not (tmp_path / "install").exists()


def test_closed_port_is_connection_refused(hosts: Hosts, tmp_path: Path) -> None:
    port = free_port()
    command = f"ssh -p {port} -i {hosts.key} root@127.0.0.1"
    report = deploy(hosts.settings, hosts.redis.url, make_slot("closed", command, "/tmp/x"))
    failed(report, Category.CONNECTION_REFUSED, "preflight")
    assert f"127.0.0.1:{port}" in (report.suggestion or "")


def test_removing_a_slot_whose_host_is_gone_removes_it_and_says_how_to_stop_the_worker(
    hosts: Hosts, tmp_path: Path
) -> None:
    """The host no longer answers: the removal still cleans the manager's side (the tunnel key
    goes); its stop step is a warning with the category and how to stop the worker there."""
    port = free_port()
    command = f"ssh -p {port} -i {hosts.key} root@127.0.0.1"
    slot = make_slot("gone", command, "/srv/servetune-gone")
    keys_file = tmp_path / "authorized_keys"
    keys_file.write_text('restrict,command="/bin/false" ssh-ed25519 AAAAX servetune-slot:gone\n')
    settings = hosts.settings_in(tmp_path / "manager", authorized_keys_path=keys_file)
    report = remove(settings, hosts.redis.url, slot)
    assert report.success and report.action == "remove", describe(report)
    stop = step(report, "stop")
    assert (stop.status, stop.category) == (StepStatus.WARNING, Category.CONNECTION_REFUSED)
    assert "kill $(cat /srv/servetune-gone/worker.pid)" in (stop.suggestion or "")
    assert f"127.0.0.1:{port}" in (stop.suggestion or "")
    assert step(report, "key").status is StepStatus.OK
    assert "servetune-slot:gone" not in keys_file.read_text()
    assert "not stopped" in report.message


def test_dropped_packets_are_connection_timeout(hosts: Hosts) -> None:
    """An address routed into the namespace's veth towards a MAC nobody has: packets vanish."""
    address = f"10.203.{hosts.netns.index}.5"
    neigh = [address, "lladdr", "02:00:00:00:02:03", "dev", hosts.netns.veth_host]
    with root_route(f"{address}/32", "dev", hosts.netns.veth_host):
        subprocess.run(["ip", "neigh", "replace", *neigh, "nud", "permanent"], check=True)  # noqa: S603
        command = f"ssh -i {hosts.key} root@{address}"
        report = deploy(hosts.settings, hosts.redis.url, make_slot("dropped", command, "/tmp/x"))
    failed(report, Category.CONNECTION_TIMEOUT, "preflight")
    assert step(report, "preflight").duration_s < hosts.settings.ssh_connect_timeout_s + 5
    assert address in (report.suggestion or "")


def test_unresolvable_name_is_name_not_resolved(hosts: Hosts) -> None:
    command = f"ssh -i {hosts.key} root@gpu-7.servetune-test.invalid"
    report = deploy(hosts.settings, hosts.redis.url, make_slot("noname", command, "/tmp/x"))
    failed(report, Category.NAME_NOT_RESOLVED, "preflight")
    assert "gpu-7.servetune-test.invalid" in (report.suggestion or "")


def test_unreachable_route_is_no_route(hosts: Hosts) -> None:
    address = f"10.205.{hosts.netns.index}.9"
    with root_route("unreachable", f"{address}/32"):
        command = f"ssh -i {hosts.key} root@{address}"
        report = deploy(hosts.settings, hosts.redis.url, make_slot("noroute", command, "/tmp/x"))
    failed(report, Category.NO_ROUTE, "preflight")
    assert f"ip route get {address}" in (report.suggestion or "")


def test_missing_python_is_python_missing(hosts: Hosts, tmp_path: Path) -> None:
    slot = hosts.loopback_slot(tmp_path / "i", python="/opt/no-such-python/bin/python3")
    report = deploy(hosts.settings, hosts.redis.url, slot)
    failed(report, Category.PYTHON_MISSING, "preflight")
    assert "/opt/no-such-python/bin/python3" in (report.suggestion or "")


@pytest.mark.skipif(not Path(OLD_PYTHON).exists(), reason=f"{OLD_PYTHON} is not installed")
def test_old_python_is_python_too_old(hosts: Hosts, tmp_path: Path) -> None:
    report = deploy(
        hosts.settings, hosts.redis.url, hosts.loopback_slot(tmp_path, python=OLD_PYTHON)
    )
    failed(report, Category.PYTHON_TOO_OLD, "preflight")
    assert "3.9.18" in (report.suggestion or ""), describe(report)
    assert "needs >= 3.11" in (report.suggestion or ""), describe(report)


def test_unreachable_index_with_offline_never_is_index_unreachable(
    hosts: Hosts, tmp_path: Path
) -> None:
    slot = make_slot(
        "never",
        hosts.remote.ssh_command(hosts.key),
        str(tmp_path / "i"),
        python=NETNS_PYTHON,
        offline=OfflineMode.NEVER,
    )
    report = deploy(hosts.settings, hosts.redis.url, slot)
    failed(report, Category.INDEX_UNREACHABLE, "bundle")
    assert hosts.settings.package_index_url in (report.suggestion or "")
    assert "--offline auto" in (report.suggestion or "")


# ---- the install directory -----------------------------------------------------------------------


def test_read_only_install_dir_is_permission_denied(hosts: Hosts, tmp_path: Path) -> None:
    with mounted_tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        report = deploy(hosts.settings, hosts.redis.url, hosts.loopback_slot(ro / "servetune"))
    failed(report, Category.PERMISSION_DENIED, "prepare")
    assert str(ro / "servetune") in (report.suggestion or "") or str(ro) in (
        report.suggestion or ""
    )


def test_small_file_system_is_disk_full(hosts: Hosts, tmp_path: Path) -> None:
    with mounted_tmpfs(tmp_path / "small", "size=1m") as small:
        report = deploy(hosts.settings, hosts.redis.url, hosts.loopback_slot(small / "servetune"))
    failed(report, Category.DISK_FULL, "prepare")
    assert str(small) in (report.suggestion or ""), report.suggestion


# ---- after the install: Redis, tunnel, register --------------------------------------------------


def test_redis_at_a_closed_port_is_redis_unreachable(hosts: Hosts) -> None:
    address = f"{hosts.netns.host_side}:{free_port()}"
    slot = hosts.loopback_slot(
        hosts.root / "install-shared", redis_via=RedisVia.DIRECT, redis_address=address
    )
    report = deploy(hosts.settings, hosts.redis.url, slot)
    failed(report, Category.REDIS_UNREACHABLE, "redis")
    names = [s.name for s in report.steps]
    assert "upload" not in names and "install" not in names, "Redis is checked before installing"
    assert address in (report.suggestion or "")


def test_manager_sshd_refusing_the_tunnel_key_is_tunnel_failed(
    hosts: Hosts, tmp_path: Path
) -> None:
    """The key goes to an authorized_keys file the manager's sshd does not read."""
    elsewhere = tmp_path / "other_authorized_keys"
    settings = hosts.settings_in(hosts.root / "manager-elsewhere", authorized_keys_path=elsewhere)
    slot = hosts.loopback_slot(hosts.root / "install-shared", name="refused-tunnel")
    report = deploy(settings, hosts.redis.url, slot)
    failed(report, Category.TUNNEL_FAILED, "redis")
    assert "servetune-slot:refused-tunnel" in elsewhere.read_text()
    assert str(elsewhere) in (report.suggestion or "")
    assert "Permission denied" in (report.suggestion or "") + report.message, describe(report)
    assert ".." not in (report.suggestion or ""), report.suggestion


def test_manager_ssh_at_a_closed_port_says_to_check_manager_ssh(hosts: Hosts) -> None:
    """A wrong SERVETUNE_MANAGER_SSH port: the suggestion is about that address, not keys."""
    port = free_port()
    settings = hosts.settings_in(
        hosts.root / "manager-wrong-port", manager_ssh=f"root@127.0.0.1:{port}"
    )
    slot = hosts.loopback_slot(hosts.root / "install-shared", name="wrong-manager-port")
    report = deploy(settings, hosts.redis.url, slot)
    failed(report, Category.TUNNEL_FAILED, "redis")
    assert f"cannot reach the manager's sshd at root@127.0.0.1:{port}" in (report.suggestion or "")
    assert "SERVETUNE_MANAGER_SSH" in (report.suggestion or "")


def test_a_manager_sshd_key_other_than_the_pinned_one_stops_the_tunnel(
    hosts: Hosts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker meets, at manager_ssh, an sshd whose host key is not the one the manager read
    from its own sshd (the manager's ssh-keyscan is pointed at another real sshd, the loopback
    host's: the worker's view differs from the manager's as with an impostor in between). The
    tunnel does not come up (StrictHostKeyChecking=yes), tunnel_failed says it is the manager's
    sshd key, and known_hosts holds only what the manager pinned."""
    real_run_command = deploy_module.run_command

    async def scan_elsewhere(argv: list[str], **kw: Any) -> CommandResult:
        if argv[0] == "ssh-keyscan":  # [..., "-p", PORT, HOST]
            argv = [*argv[:-2], str(hosts.loopback.port), argv[-1]]
        return await real_run_command(argv, **kw)

    monkeypatch.setattr(deploy_module, "run_command", scan_elsewhere)
    install = hosts.root / "install-shared"
    report = deploy(hosts.settings, hosts.redis.url, hosts.loopback_slot(install, name="pinned"))
    failed(report, Category.TUNNEL_FAILED, "redis")
    assert "MANAGER's sshd" in (report.suggestion or ""), describe(report)
    assert f"127.0.0.1:{hosts.manager_sshd.port}" in (report.suggestion or "")
    assert "Host key verification failed" in report.message + " ".join(report.logs)
    pinned = " ".join(hosts.loopback.host_public_key().split()[:2])
    assert fingerprint(pinned) in (report.suggestion or ""), "the key the manager pinned"
    known_hosts = install / "ssh" / "known_hosts"
    assert known_hosts.read_text() == f"[127.0.0.1]:{hosts.manager_sshd.port} {pinned}\n"


def test_worker_on_another_redis_is_register_timeout(hosts: Hosts, tmp_path: Path) -> None:
    """Redis answers at the address given, but it is not the manager's: the worker registers
    where the manager never looks."""
    assert hosts.redis.password is not None
    other = RedisServer(tmp_path / "other-redis", password=hosts.redis.password)
    other.start()
    try:
        settings = hosts.settings_in(hosts.root / "manager", register_timeout_s=3.0)
        slot = hosts.loopback_slot(
            hosts.root / "install-shared",
            name="lost",
            redis_via=RedisVia.DIRECT,
            redis_address=f"127.0.0.1:{other.port}",
        )
        report = deploy(settings, hosts.redis.url, slot)
    finally:
        kill_install(hosts.root / "install-shared")
        other.kill()
    failed(report, Category.REGISTER_TIMEOUT, "register")
    assert "worker.out" in (report.suggestion or "")
    assert any(" ready" in line for line in report.logs), "the tail of the worker's own log"
    assert hosts.redis.password not in (report.suggestion or "") + "".join(report.logs)


def test_localhost_redis_on_the_netns_host_says_to_use_a_tunnel(hosts: Hosts) -> None:
    """The manager's Redis URL is 127.0.0.1: from the no-route host that is the host itself."""
    slot = make_slot(
        "netns-direct",
        hosts.remote.ssh_command(hosts.key),
        str(hosts.root / "install-netns"),
        python=NETNS_PYTHON,
        redis_via=RedisVia.DIRECT,
        redis_address=f"127.0.0.1:{hosts.redis.port}",
    )
    report = deploy(hosts.settings, hosts.redis.url, slot)
    failed(report, Category.REDIS_UNREACHABLE, "redis")
    assert "--redis-via forward" in (report.suggestion or ""), describe(report)


def test_a_wheel_without_the_package_is_module_not_found(hosts: Hosts, tmp_path: Path) -> None:
    """The cached bundle's servetune wheel lost its package (a broken build): it installs, then
    ``import servetune`` fails on the remote."""
    if not list(SHARED_WHEELHOUSE.glob("*-online")):  # run alone: build the bundle first
        slot = hosts.loopback_slot(tmp_path / "first", redis_via=RedisVia.DIRECT)
        deploy(hosts.settings, hosts.redis.url, slot)  # fails at the redis step, built by then
    settings = hosts.settings_in(tmp_path / "manager")
    (settings.data_dir / "wheelhouse").unlink()  # a private cache, not the shared one
    for bundle in SHARED_WHEELHOUSE.glob("*-online"):
        if bundle.is_dir():
            copy = settings.wheelhouse_dir / bundle.name
            shutil.copytree(bundle, copy)
            for wheel in copy.glob("servetune-*.whl"):
                gut_wheel(wheel)
    install = hosts.root / "install-broken"
    report = deploy(settings, hosts.redis.url, hosts.loopback_slot(install, name="broken"))
    failed(report, Category.MODULE_NOT_FOUND, "install")
    assert f"{install}/venv" in (report.suggestion or ""), report.suggestion
    assert any("No module named 'servetune'" in line for line in report.logs)


def gut_wheel(wheel: Path) -> None:
    """Rewrite ``wheel`` without its ``servetune/`` package (metadata kept)."""
    gutted = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(gutted, "w") as dst:
        for item in src.infolist():
            if not item.filename.startswith("servetune/"):
                dst.writestr(item, src.read(item.filename))
    gutted.replace(wheel)
