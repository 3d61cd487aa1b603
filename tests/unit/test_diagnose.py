"""remote/diagnose.py: real ssh error output → the right category and a suggestion naming what
was found; agent errors → their category; secrets never reach the logs.

The stderr samples were captured from OpenSSH 9.2p1 (Debian 12) provoked for real (a closed port,
10.255.255.1 with ConnectTimeout=2, x.invalid, unreachable/prohibit/blackhole routes in a network
namespace, a real sshd with a changed host key, strict checking of an unknown key and a refused
public key); tests/integration/test_diagnose_real.py provokes them again on every run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from servetune.errors import DeployFailed
from servetune.remote.diagnose import (
    SUGGESTIONS,
    classify_ssh,
    failure,
    from_agent_error,
    tail,
)
from servetune.remote.models import Category, CommandResult

KH = "/var/lib/servetune/ssh/known_hosts"

CHANGED = """\
@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @
@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
IT IS POSSIBLE THAT SOMEONE IS DOING SOMETHING NASTY!
Someone could be eavesdropping on you right now (man-in-the-middle attack)!
It is also possible that a host key has just been changed.
The fingerprint for the ED25519 key sent by the remote host is
SHA256:wb9vJsrHsemGWZytmGhhECbYYrb1XY3jEehA1uzZ6CE.
Please contact your system administrator.
Add correct host key in /tmp/diag/kh to get rid of this message.
Offending ED25519 key in /tmp/diag/kh:1
  remove with:
  ssh-keygen -f "/tmp/diag/kh" -R "[127.0.0.1]:42222"
Host key for [127.0.0.1]:42222 has changed and you have requested strict checking.
Host key verification failed.
"""

CHANGED_PORT_22_ACCEPT_NEW = """\
@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @
@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
IT IS POSSIBLE THAT SOMEONE IS DOING SOMETHING NASTY!
Someone could be eavesdropping on you right now (man-in-the-middle attack)!
It is also possible that a host key has just been changed.
The fingerprint for the ED25519 key sent by the remote host is
SHA256:wb9vJsrHsemGWZytmGhhECbYYrb1XY3jEehA1uzZ6CE.
Please contact your system administrator.
Add correct host key in /root/.servetune/ssh/known_hosts to get rid of this message.
Offending ED25519 key in /root/.servetune/ssh/known_hosts:3
  remove with:
  ssh-keygen -f "/root/.servetune/ssh/known_hosts" -R "gpu1.example.com"
Host key for gpu1.example.com has changed and you have requested strict checking.
Host key verification failed.
"""

UNKNOWN_STRICT = (
    "No ED25519 host key is known for [127.0.0.1]:42222 and you have requested strict checking.\n"
    "Host key verification failed.\n"
)
AUTH = "root@127.0.0.1: Permission denied (publickey).\n"
AUTH_VERBOSE = """\
Warning: Identity file /tmp/diag/nokey not accessible: No such file or directory.
debug1: Connecting to 127.0.0.1 [127.0.0.1] port 42222.
debug1: Authenticating to 127.0.0.1:42222 as 'root'
debug1: Will attempt key: /tmp/diag/ck2 ED25519 SHA256:rbRqijK0Yp1mL05TN6qoT+4UxTk0Mha02/O2TyTy4oE explicit
debug1: Authentications that can continue: publickey
debug1: Next authentication method: publickey
debug1: Offering public key: /tmp/diag/ck2 ED25519 SHA256:rbRqijK0Yp1mL05TN6qoT+4UxTk0Mha02/O2TyTy4oE explicit
debug1: Authentications that can continue: publickey
debug1: No more authentication methods to try.
root@127.0.0.1: Permission denied (publickey).
"""
REFUSED = "ssh: connect to host 127.0.0.1 port 1: Connection refused\n"
BANNER_TIMEOUT = (
    "Connection timed out during banner exchange\nConnection to 10.255.255.1 port 22 timed out\n"
)
SYN_TIMEOUT = "ssh: connect to host 10.255.255.1 port 22: Connection timed out\n"
RESOLVE = "ssh: Could not resolve hostname x.invalid: Name or service not known\n"
RESOLVE_NO_DNS = "ssh: Could not resolve hostname x.invalid: Temporary failure in name resolution\n"
NO_ROUTE = "ssh: connect to host 10.9.9.9 port 22: No route to host\n"
PROHIBIT = "ssh: connect to host 10.9.9.10 port 22: Permission denied\n"
BLACKHOLE = "ssh: connect to host 10.9.9.11 port 22: Invalid argument\n"
NET_UNREACHABLE = "ssh: connect to host 10.9.9.12 port 22: Network is unreachable\n"
BASH_127 = "bash: line 1: python3.99: command not found\n"
BASH_127_PLAIN = "bash: python3.99: command not found\n"
DASH_127 = "sh: 1: python3.99: not found\n"
ZSH_127 = "zsh:1: command not found: python3.99\n"


def ssh_result(stderr: str, returncode: int = 255, argv: list[str] | None = None) -> CommandResult:
    """A CommandResult as remote/ssh.py returns it for one ssh call."""
    return CommandResult(
        argv=argv
        or ["ssh", "-o", f"UserKnownHostsFile={KH}", "-p", "42222", "--", "root@127.0.0.1", "x"],
        returncode=returncode,
        stdout="",
        stderr=stderr,
        duration_s=0.1,
    )


def classify(stderr: str, *, target: str = "root@127.0.0.1", **kw: object) -> DeployFailed:
    err = classify_ssh(ssh_result(stderr, **kw), target=target)  # type: ignore[arg-type]
    assert err is not None
    return err


def test_every_category_has_a_specific_suggestion() -> None:
    assert set(SUGGESTIONS) == set(Category)
    for category, text in SUGGESTIONS.items():
        assert "something went wrong" not in text.lower()
        filled = failure(category, "x", step="s").suggestion
        assert "<" not in filled, (category, filled)  # every field has a default
        assert "\n" not in filled


def test_host_key_changed_names_host_port_known_hosts_and_the_keygen_line() -> None:
    err = classify(CHANGED)
    assert err.category is Category.HOST_KEY_CHANGED
    assert "127.0.0.1 port 42222" in err.suggestion
    assert "/tmp/diag/kh" in err.suggestion
    assert "ssh-keygen -R '[127.0.0.1]:42222' -f /tmp/diag/kh" in err.suggestion
    assert "SHA256:wb9vJsrHsemGWZytmGhhECbYYrb1XY3jEehA1uzZ6CE" in err.suggestion
    assert "Host key verification failed." in err.logs


def test_host_key_changed_on_port_22_uses_the_plain_host_name() -> None:
    err = classify(CHANGED_PORT_22_ACCEPT_NEW, target="gpu1.example.com")
    assert err.category is Category.HOST_KEY_CHANGED
    assert "ssh-keygen -R gpu1.example.com -f /root/.servetune/ssh/known_hosts" in err.suggestion
    assert "gpu1.example.com port 22" in err.suggestion


def test_unknown_host_key_with_strict_checking() -> None:
    err = classify(UNKNOWN_STRICT)
    assert err.category is Category.HOST_KEY_UNKNOWN
    assert "ssh-keyscan -p 42222 127.0.0.1 >> " + KH in err.suggestion
    assert "StrictHostKeyChecking=yes" in err.suggestion


def test_auth_refused_names_user_host_and_the_keys_from_argv() -> None:
    argv = ["ssh", "-p", "2222", "-i", "/home/u/.ssh/gpu", "--", "root@127.0.0.1", "x"]
    err = classify(AUTH, argv=argv)
    assert err.category is Category.AUTH_REFUSED
    assert "root@127.0.0.1" in err.suggestion
    assert "/home/u/.ssh/gpu" in err.suggestion
    assert "ssh-copy-id -i /home/u/.ssh/gpu.pub -p 2222 root@127.0.0.1" in err.suggestion


def test_auth_refused_reads_the_keys_ssh_offered_and_the_generated_config(tmp_path: Path) -> None:
    cfg = tmp_path / "abc.conf"
    cfg.write_text(
        "Host *\n  BatchMode yes\n  Port 42222\n  IdentityFile /etc/keys/id_cfg\n"
        f"  UserKnownHostsFile {KH}\n"
    )
    argv = ["ssh", "-F", str(cfg), "--", "root@127.0.0.1", "x"]
    err = classify(AUTH_VERBOSE, argv=argv)
    assert err.category is Category.AUTH_REFUSED
    assert "/tmp/diag/ck2, /etc/keys/id_cfg" in err.suggestion
    assert "ssh-copy-id -i /tmp/diag/ck2.pub -p 42222 root@127.0.0.1" in err.suggestion


def test_auth_refused_without_any_key_named_mentions_ssh_defaults() -> None:
    err = classify(AUTH, argv=["ssh", "--", "root@127.0.0.1", "x"])
    assert "~/.ssh/id_ed25519" in err.suggestion
    assert "-p 22 root@127.0.0.1" in err.suggestion


def test_connection_refused_names_host_port_and_sshd() -> None:
    err = classify(REFUSED)
    assert err.category is Category.CONNECTION_REFUSED
    assert "127.0.0.1:1" in err.suggestion
    assert "systemctl status ssh" in err.suggestion


@pytest.mark.parametrize("stderr", [BANNER_TIMEOUT, SYN_TIMEOUT])
def test_timeouts_say_firewall_or_host_down(stderr: str) -> None:
    err = classify(stderr, target="10.255.255.1")
    assert err.category is Category.CONNECTION_TIMEOUT
    assert "10.255.255.1:22" in err.suggestion
    assert "firewall" in err.suggestion and "down" in err.suggestion


@pytest.mark.parametrize("stderr", [RESOLVE, RESOLVE_NO_DNS])
def test_name_not_resolved_names_the_name(stderr: str) -> None:
    err = classify(stderr, target="x.invalid")
    assert err.category is Category.NAME_NOT_RESOLVED
    assert "x.invalid" in err.suggestion


@pytest.mark.parametrize(
    ("stderr", "address"),
    [(NO_ROUTE, "10.9.9.9"), (PROHIBIT, "10.9.9.10"), (BLACKHOLE, "10.9.9.11"),
     (NET_UNREACHABLE, "10.9.9.12")],
)  # fmt: skip
def test_no_route_names_the_address_and_is_not_auth(stderr: str, address: str) -> None:
    err = classify(stderr, target=address)
    assert err.category is Category.NO_ROUTE
    assert f"ip route get {address}" in err.suggestion


@pytest.mark.parametrize("stderr", [BASH_127, BASH_127_PLAIN, DASH_127, ZSH_127])
def test_remote_command_not_found_is_python_missing(stderr: str) -> None:
    err = classify(stderr, returncode=127)
    assert err.category is Category.PYTHON_MISSING
    assert err.suggestion.startswith("python3.99 was not found on 127.0.0.1")
    assert ">= 3.11" in err.suggestion and "slot's python" in err.suggestion


PYTHON2_DASH_I = """\
Unknown option: -I
usage: /usr/bin/python [option] ... [-c cmd | -m mod | file | -] [arg] ...
Try `python -h' for more information.
"""


def test_python_2_refusing_isolated_mode_is_too_old() -> None:
    argv = ["ssh", "-p", "42222", "--", "root@127.0.0.1", "python -I -c 'import sys'"]
    err = classify(PYTHON2_DASH_I, returncode=2, argv=argv)
    assert err.category is Category.PYTHON_TOO_OLD
    assert err.suggestion.startswith("python on 127.0.0.1 is Python 2 ")
    assert "3.11" in err.suggestion


@pytest.mark.parametrize(
    "stderr",
    [
        "kex_exchange_identification: read: Connection reset by peer\r\n"
        "Connection reset by 127.0.0.1 port 42222\r\n",
        "Connection closed by 127.0.0.1 port 42222\r\n",
        "Connection closed by authenticating user root 127.0.0.1 port 42222 [preauth]\r\n",
    ],
)
def test_a_connection_dropped_before_the_handshake_is_connection_refused(stderr: str) -> None:
    err = classify(stderr)
    assert err.category is Category.CONNECTION_REFUSED
    assert err.suggestion.startswith("127.0.0.1:42222 closed the connection before the ssh ")


def test_dash_exec_not_found_names_the_interpreter() -> None:
    err = classify("sh: 1: exec: python3.12: not found\n", returncode=127)
    assert err.category is Category.PYTHON_MISSING
    assert err.suggestion.startswith("python3.12 was not found on 127.0.0.1")


def test_remote_command_own_failure_and_success_are_not_ssh_failures() -> None:
    assert classify_ssh(ssh_result("Traceback ...", returncode=1), target="h") is None
    assert classify_ssh(ssh_result("", returncode=0), target="h") is None


def test_unrecognised_ssh_failure_quotes_ssh_own_last_line() -> None:
    stderr = "kex_exchange_identification: read: Connection reset by peer\n"
    err = classify(stderr)
    assert err.category is Category.UNKNOWN
    assert "Connection reset by peer" in err.suggestion
    assert "Connection reset by peer" in str(err)


def test_timed_out_call_is_a_step_timeout() -> None:
    result = CommandResult(
        argv=["ssh", "h", "x"], returncode=124, stdout="", stderr="", duration_s=30.0,
        timed_out=True,
    )  # fmt: skip
    err = classify_ssh(result, target="h")
    assert err is not None and err.category is Category.STEP_TIMEOUT
    assert "30 s" in err.suggestion


# ---- agent errors ---------------------------------------------------------------------------


def test_agent_python_too_old_names_both_versions() -> None:
    error = {
        "kind": "python_too_old",
        "message": "Python 3.9.2 at /usr/bin/python3 is older than 3.11",
        "detail": "",
    }
    err = from_agent_error(error, step="preflight", target="gpu@h1")
    assert err.category is Category.PYTHON_TOO_OLD
    assert err.step == "preflight"
    assert "3.9.2" in err.suggestion and ">= 3.11" in err.suggestion
    assert "on h1" in err.suggestion


def test_agent_disk_full_names_path_and_free_gib() -> None:
    error = {
        "kind": "disk_full",
        "message": "/mnt/small/.servetune has 0.05 GiB free, 2.0 GiB needed",
        "detail": "",
    }
    err = from_agent_error(error, step="prepare", target="h1")
    assert err.category is Category.DISK_FULL
    assert "/mnt/small/.servetune on h1 has 0.05 GiB free" in err.suggestion


def test_agent_found_fields_take_precedence_over_the_message() -> None:
    error = {
        "kind": "permission_denied",
        "message": "[Errno 13] Permission denied: '/opt/st'",
        "detail": "",
        "found": {"path": "/opt/st/data", "user": "gpu"},
    }
    err = from_agent_error(error, step="prepare", target="h1")
    assert err.category is Category.PERMISSION_DENIED
    assert "gpu may not write /opt/st/data on h1" in err.suggestion
    assert "under ~/" in err.suggestion


def test_agent_permission_denied_reads_the_path_from_the_message() -> None:
    error = {"kind": "permission_denied", "message": "[Errno 13] Permission denied: '/opt/st'"}
    err = from_agent_error(error, step="prepare", target="root@h1")
    assert "root may not write /opt/st on h1" in err.suggestion


def test_agent_redis_unreachable_says_localhost_needs_a_tunnel() -> None:
    error = {
        "kind": "redis_unreachable",
        "message": "cannot connect to 127.0.0.1:6379: [Errno 111] Connection refused",
        "detail": "",
    }
    err = from_agent_error(error, step="redis", target="h1")
    assert err.category is Category.REDIS_UNREACHABLE
    assert "127.0.0.1:6379" in err.suggestion
    assert "tunnel" in err.suggestion and "forward" in err.suggestion


def test_agent_tunnel_failed_quotes_ssh_and_what_sshd_must_allow() -> None:
    error = {
        "kind": "tunnel_failed",
        "message": "the tunnel to 127.0.0.1:6379 did not come up",
        "detail": "debug1: x\nchannel_setup_fwd_listener_tcpip: cannot listen to port: 6390\n"
        "Error: administratively prohibited: open failed\n",
        "found": {"manager_ssh": "st@manager:22"},
    }
    err = from_agent_error(error, step="redis", target="h1")
    assert err.category is Category.TUNNEL_FAILED
    assert "administratively prohibited: open failed" in err.suggestion
    assert "st@manager:22" in err.suggestion and "AllowTcpForwarding" in err.suggestion
    assert err.logs[-1] == "Error: administratively prohibited: open failed"


def test_agent_unknown_kind_is_unknown_and_named() -> None:
    err = from_agent_error({"kind": "weird", "message": "boom"}, step="install", target="h")
    assert err.category is Category.UNKNOWN
    assert "'weird'" in str(err)
    assert "boom" in err.suggestion


def test_agent_error_logs_have_no_secrets() -> None:
    error = {
        "kind": "worker_start_failed",
        "message": "the worker exited with 1",
        "detail": "connecting to redis://:hunter2@127.0.0.1:6390/0\nAUTH hunter2\nexit 1\n",
    }
    err = from_agent_error(error, step="start", target="h")
    assert not any("hunter2" in line for line in err.logs)
    assert err.logs[-1] == "exit 1"


# ---- failure ---------------------------------------------------------------------------------


def test_index_unreachable_says_the_fallback_or_how_to_allow_it() -> None:
    taken = failure(Category.INDEX_UNREACHABLE, "m", step="bundle", host="h", reason="timed out")
    assert "offline wheelhouse" in taken.suggestion and "instead" in taken.suggestion
    never = failure(Category.INDEX_UNREACHABLE, "m", step="bundle", host="h", offline="never")
    assert "--offline auto" in never.suggestion


def test_register_timeout_names_log_and_masked_redis_url() -> None:
    err = failure(
        Category.REGISTER_TIMEOUT,
        "no worker registered",
        step="register",
        host="h1",
        install_dir="/home/gpu/.servetune",
        timeout_s="120",
        redis_url="redis://:s3cret@127.0.0.1:6390/0",
    )
    assert "/home/gpu/.servetune/logs/worker.out" in err.suggestion
    assert "redis://:***@127.0.0.1:6390/0" in err.suggestion
    assert "s3cret" not in err.suggestion
    assert "120 s" in err.suggestion


def test_rsync_missing_says_tar_was_used() -> None:
    err = failure(Category.RSYNC_MISSING, "no rsync", step="upload", host="h1")
    assert "rsync is not installed on h1" in err.suggestion and "tar" in err.suggestion


def test_failure_masks_secrets_in_message() -> None:
    err = failure(Category.UNKNOWN, "redis://:pw@h:1 failed", step="x")
    assert "pw@" not in str(err)


# ---- tail ------------------------------------------------------------------------------------


def test_tail_keeps_the_last_lines() -> None:
    text = "\n".join(f"line {i}" for i in range(100)) + "\n\n"
    assert tail(text, 3) == ["line 97", "line 98", "line 99"]
    assert tail(text, 0) == []
    assert tail("") == []


@pytest.mark.parametrize(
    "text",
    [
        "redis://:hunter2@10.0.0.1:6379/0",
        "rediss://default:hunter2@h:6380",
        "AUTH hunter2",
        "AUTH default hunter2",
        "['AUTH', 'hunter2']",
        "*2\r\n$4\r\nAUTH\r\n$7\r\nhunter2\r\n",
        "b'*2\\r\\n$4\\r\\nAUTH\\r\\n$7\\r\\nhunter2\\r\\n'",
        '{"password": "hunter2", "host": "h"}',
        "REDIS_PASSWORD=hunter2",
        "redis-server --requirepass hunter2 --port 1",
        "redis-cli -h h -a hunter2 ping",
    ],
)
def test_tail_removes_redis_passwords(text: str) -> None:
    out = "\n".join(tail("before\n" + text + "\nafter"))
    assert "hunter2" not in out
    assert out.startswith("before") and out.endswith("after")


def test_tail_removes_private_key_blocks_even_cut_ones() -> None:
    key = (
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmU\n"
        "QyNTUxOQAAACBmZXN0\n-----END OPENSSH PRIVATE KEY-----\n"
    )
    out = "\n".join(tail("keygen:\n" + key + "done\n"))
    assert "b3BlbnNzaC1rZXkt" not in out and "QyNTUxOQ" not in out
    assert out.endswith("done")
    cut_start = "QyNTUxOQAAACBmZXN0\n-----END OPENSSH PRIVATE KEY-----\ndone\n"
    assert "QyNTUxOQ" not in "\n".join(tail(cut_start))
    cut_end = "keygen:\n-----BEGIN RSA PRIVATE KEY-----\nMIIEow"
    assert "MIIEow" not in "\n".join(tail(cut_end))


def test_tail_leaves_ssh_messages_alone() -> None:
    text = "root@h: Permission denied (publickey,password).\n-o PasswordAuthentication=no\n"
    assert tail(text) == text.splitlines()


# ---- through a ProxyJump hop (real output of `ssh -J root@127.0.0.1:PORT ...`) ----------------

JUMP_REFUSED = """\
channel 0: open failed: connect failed: Connection refused
stdio forwarding failed
kex_exchange_identification: Connection closed by remote host
Connection closed by UNKNOWN port 65535
"""
JUMP_UNRESOLVED = JUMP_REFUSED.replace("Connection refused", "Name or service not known")
JUMP_TIMEOUT = (
    "Connection timed out during banner exchange\nConnection to UNKNOWN port 65535 timed out\n"
)
HOP_REFUSED = (
    "ssh: connect to host 127.0.0.1 port 1: Connection refused\n"
    "kex_exchange_identification: Connection closed by remote host\n"
    "Connection closed by UNKNOWN port 65535\n"
)


def jump_argv(port: str = "22") -> list[str]:
    return ["ssh", "-J", "root@127.0.0.1:42222", "-p", port, "--", "root@gpu7", "x"]


def test_jump_destination_refused_names_the_destination() -> None:
    err = classify(JUMP_REFUSED, target="root@gpu7", argv=jump_argv("2200"))
    assert err.category is Category.CONNECTION_REFUSED
    assert "gpu7:2200" in err.suggestion
    assert "UNKNOWN" not in err.suggestion


def test_jump_destination_unresolved_names_the_destination() -> None:
    err = classify(JUMP_UNRESOLVED, target="root@gpu7", argv=jump_argv())
    assert err.category is Category.NAME_NOT_RESOLVED
    assert "gpu7" in err.suggestion and "jump host" in err.suggestion


def test_jump_destination_timeout_names_the_destination() -> None:
    err = classify(JUMP_TIMEOUT, target="root@gpu7", argv=jump_argv())
    assert err.category is Category.CONNECTION_TIMEOUT
    assert "gpu7:22" in err.suggestion and "UNKNOWN" not in err.suggestion


def test_jump_hop_refused_names_the_hop() -> None:
    err = classify(HOP_REFUSED, target="root@gpu7", argv=jump_argv())
    assert err.category is Category.CONNECTION_REFUSED
    assert "127.0.0.1:1" in err.suggestion


def test_too_many_authentication_failures_is_auth_refused_with_the_keys() -> None:
    stderr = (
        "Received disconnect from 127.0.0.1 port 42222:2: Too many authentication failures\n"
        "Disconnected from 127.0.0.1 port 42222\n"
    )  # real: sshd MaxAuthTries 2, three wrong -i keys
    argv = ["ssh", "-p", "42222", "-i", "/k/w1", "-i", "/k/w2", "-i", "/k/w3", "--", "root@h", "x"]
    err = classify(stderr, target="root@127.0.0.1", argv=argv)
    assert err.category is Category.AUTH_REFUSED
    assert "/k/w1, /k/w2, /k/w3" in err.suggestion
    assert "ssh-copy-id -i /k/w1.pub -p 42222 root@127.0.0.1" in err.suggestion


# ---- rsync -e "ssh ..." (real rsync 3.2 / OpenSSH 9.2 output) --------------------------------

RSYNC_REFUSED = """\
ssh: connect to host 127.0.0.1 port 1: Connection refused
rsync: connection unexpectedly closed (0 bytes received so far) [sender]
rsync error: unexplained error (code 255) at io.c(285) [sender=3.5.0]
"""
RSYNC_REMOTE_MISSING = """\
bash: rsync9: command not found
rsync: connection unexpectedly closed (0 bytes received so far) [sender]
rsync error: error in rsync protocol data stream (code 12) at io.c(285) [sender=3.5.0]
"""


def rsync_argv(tmp_path: Path) -> list[str]:
    cfg = tmp_path / "t.conf"
    cfg.write_text(f"Host *\n  UserKnownHostsFile {KH}\n")
    return ["rsync", "-a", "-s", "-e", f"ssh -F {cfg} -p 1 -i /k/id", "src/", "root@127.0.0.1:/d/"]


def test_rsync_ssh_failure_is_classified_from_its_e_option(tmp_path: Path) -> None:
    err = classify(RSYNC_REFUSED, argv=rsync_argv(tmp_path))
    assert err.category is Category.CONNECTION_REFUSED
    assert "127.0.0.1:1" in err.suggestion


def test_rsync_own_failure_is_not_an_ssh_failure(tmp_path: Path) -> None:
    result = ssh_result(RSYNC_REMOTE_MISSING, returncode=12, argv=rsync_argv(tmp_path))
    assert classify_ssh(result, target="root@127.0.0.1") is None


def test_agent_disk_full_prefers_the_free_figure() -> None:
    error = {"kind": "disk_full", "message": "needs 2.0 GiB, /srv has 0.3 GiB free"}
    err = from_agent_error(error, step="prepare", target="h1")
    assert "/srv on h1 has 0.3 GiB free" in err.suggestion


def test_agent_python_too_old_names_the_interpreter_path() -> None:
    error = {
        "kind": "python_too_old",
        "message": "Python 3.9.2 at /usr/bin/python3 is older than 3.11",
    }
    err = from_agent_error(error, step="preflight", target="h1")
    assert err.suggestion.startswith("/usr/bin/python3 on h1 is Python 3.9.2")


def test_tail_removes_a_private_key_inside_json() -> None:
    line = '{"ok": true, "result": {"private_key": "-----BEGIN OPENSSH PRIVATE KEY-----\\nb3Bl\\nQyNT\\n-----END OPENSSH PRIVATE KEY-----\\n", "x": 1}}'
    out = "\n".join(tail(line))
    assert "b3Bl" not in out and "QyNT" not in out
    assert '"x": 1' in out


def test_tunnel_error_quoted_in_the_suggestion_has_no_password() -> None:
    err = failure(
        Category.TUNNEL_FAILED, "tunnel down", step="redis", ssh_error="AUTH hunter2 failed"
    )
    assert "hunter2" not in err.suggestion


def test_a_silent_ssh_failure_says_what_hides_the_error() -> None:
    err = classify("", argv=["ssh", "-q", "-p", "1", "--", "root@127.0.0.1", "x"])
    assert err.category is Category.UNKNOWN
    assert "-q / LogLevel QUIET hides its errors" in err.suggestion


@pytest.mark.parametrize(
    ("message", "says"),
    [
        (
            "/srv/shared is not a directory of servetune's own: others may write to it "
            "(mode 1777): it is a shared directory",
            "not servetune's to take over",
        ),
        ("creating /x/f/sub failed: Not a directory (/x/f/sub) [ENOTDIR]", "is a file, not"),
        ("creating /ro/st failed: Read-only file system (/ro/st) [EROFS]", "read-only file"),
        ("creating /x/f failed: File exists (/x/f) [EEXIST]", "exists and is not a directory"),
    ],
)
def test_a_permission_problem_that_is_not_write_access_gets_its_own_advice(
    message: str, says: str
) -> None:
    err = from_agent_error(
        {"kind": "permission_denied", "message": message}, step="prepare", target="root@h1"
    )
    assert says in err.suggestion, err.suggestion
    assert "give that user write access" not in err.suggestion


@pytest.mark.parametrize(
    "said",
    [
        "Connection to 10.0.0.7 closed by remote host.",
        "client_loop: send disconnect: Broken pipe",
        "Timeout, server 10.0.0.7 not responding.",
    ],
)
def test_a_session_that_dropped_midway_is_connection_lost(said: str) -> None:
    result = CommandResult(
        argv=["ssh", "-p", "22", "root@10.0.0.7", "python3"],
        returncode=255,
        stdout="",
        stderr=f"{said}\n",
        duration_s=40.0,
    )
    err = classify_ssh(result, target="root@10.0.0.7")
    assert err is not None and err.category is Category.CONNECTION_LOST
    assert "10.0.0.7" in err.suggestion and "worker-restore" in err.suggestion
