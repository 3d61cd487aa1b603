"""Why a deploy step failed, as a stable ``Category`` plus one line on how to fix it.

Every failure of a deploy or restore ends here: ``classify_ssh`` reads what the system ssh said
(its exit status 255 and stderr) and ``from_agent_error`` what the remote agent reported; both
build a ``DeployFailed`` through ``failure``, whose suggestion is ``SUGGESTIONS[category]``
formatted with what was found (host, port, known_hosts file, key tried, path, versions, ...), so
the user reads exactly what to run or change, never "something went wrong".

``tail`` gives the last lines of a command's output for ``DeployFailed.logs`` with secrets removed
(Redis URL passwords, AUTH arguments, password fields, private key blocks).

The patterns below were taken from OpenSSH 9.2's real messages, provoked against a closed port, an
address that drops packets, a name that does not resolve, unreachable/prohibit/blackhole routes
and a real sshd (changed host key, unknown key with strict checking, refused public key); the
unit tests hold those samples.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Mapping
from pathlib import Path

from servetune.errors import DeployFailed
from servetune.redact import MASK, redact
from servetune.remote.models import Category, CommandResult

__all__ = ["SUGGESTIONS", "classify_ssh", "failure", "from_agent_error", "tail"]

MIN_PYTHON = "3.11"
"""The oldest Python a deployed worker runs on (named in the python suggestions)."""

SUGGESTIONS: dict[Category, str] = {
    Category.HOST_KEY_CHANGED: (
        "The host key of {host} port {port} is not the one recorded in {known_hosts} (the host "
        "was reinstalled, or someone is in the middle): check the new key{fingerprint_note} with "
        "the host's admin, then run `ssh-keygen -R {host_key_id_q} -f {known_hosts_q}` and deploy "
        "again."
    ),
    Category.HOST_KEY_UNKNOWN: (
        "{host} port {port} has no key in {known_hosts} and the ssh command asks for "
        "StrictHostKeyChecking=yes: check the host's key fingerprint, then add it with "
        "`ssh-keyscan -p {port} {host_q} >> {known_hosts_q}` (or drop StrictHostKeyChecking=yes "
        "so servetune records the key on first use)."
    ),
    Category.AUTH_REFUSED: (
        "{user}@{host} refused the key(s) tried ({identity_files}): install your public key there "
        "with `ssh-copy-id -i {public_key_q} -p {port} {user_host_q}`, or name the right key with "
        "-i in the slot's ssh command."
    ),
    Category.CONNECTION_REFUSED: (
        "Nothing accepts connections on {host}:{port}: sshd is not listening there; check the "
        "port in the ssh command (-p) and on the host run `systemctl status ssh`."
    ),
    Category.CONNECTION_TIMEOUT: (
        "{host}:{port} did not answer within the connect timeout: a firewall drops the packets "
        "or the host is down; check that it is up and that port {port} is open from this machine."
    ),
    Category.NAME_NOT_RESOLVED: (
        "The host name {name} does not resolve ({reason}): check its spelling in the ssh "
        "command, /etc/hosts or your DNS, or use the host's IP address."
    ),
    Category.NO_ROUTE: (
        "There is no route from this machine to {address} ({reason}): check the address and the "
        "network (VPN, `ip route get {address}`), or reach the host through a jump host with -J."
    ),
    Category.SSH_COMMAND_INVALID: (
        "Fix the ssh command ({reason}): give it as `ssh [-p PORT] [-i KEY] [-J JUMP] "
        "[-o Option=value] user@host`, with nothing after the destination."
    ),
    Category.REDIS_UNREACHABLE: (
        "The worker on {host} cannot reach Redis at {address} ({reason}); a localhost URL of the "
        "manager is only reachable from another host through a tunnel: set the slot's redis_via "
        "to forward (the worker opens ssh -L to the manager) or reverse (the manager opens "
        "ssh -R), or give redis_via direct an address the worker can reach."
    ),
    Category.INDEX_UNREACHABLE: (
        "The package index {index_url} cannot be reached from {host} ({reason}): {index_action}."
    ),
    Category.PYTHON_MISSING: (
        "{python} was not found on {host}: install python3 >= " + MIN_PYTHON + " there "
        "(e.g. `apt install python3`) or set the slot's python to an interpreter that exists "
        "(e.g. /usr/bin/python3.11)."
    ),
    Category.PYTHON_TOO_OLD: (
        "{python} on {host} is Python {found_version} and servetune needs >= {min_version}: "
        "install a newer Python there (e.g. `uv python install 3.11`) and set the slot's python "
        "to it."
    ),
    Category.MODULE_NOT_FOUND: (
        "servetune was installed into {install_dir}/venv on {host} but `import servetune` failed "
        "({reason}): read the log tail; deploy again to reinstall, or use --offline always if "
        "the index served a broken dependency."
    ),
    Category.INSTALL_FAILED: (
        "Installing servetune on {host} failed ({reason}): read the log tail for the package "
        "that failed; with no wheel for the host's platform, use a Python/arch with wheels, or "
        "--offline always to ship a wheelhouse built for it."
    ),
    Category.RSYNC_MISSING: (
        "rsync is not installed on {host}: the files were sent as a tar stream over ssh instead "
        "(nothing to do; install rsync there for faster re-deploys)."
    ),
    Category.DISK_FULL: (
        "{path} on {host} has {free_gib} GiB free, not enough to install there: free some space "
        "or set the slot's install_dir to a filesystem with more room."
    ),
    Category.PERMISSION_DENIED: (
        "{user} may not write {path} on {host}: set the slot's install_dir to a path under ~/ "
        "(e.g. ~/.servetune), or give that user write access to it."
    ),
    Category.WORKER_START_FAILED: (
        "The worker on {host} exited right after it started: read {install_dir}/logs/worker.out "
        "there (its tail is below), fix what it names and restore the slot."
    ),
    Category.REGISTER_TIMEOUT: (
        "The worker on {host} started but did not register within {timeout_s} s: read "
        "{install_dir}/logs/worker.out there; it connects to Redis at {redis_url}, so check that "
        "this URL answers from the worker (tunnel up, password right)."
    ),
    Category.TUNNEL_FAILED: (
        "The worker's Redis tunnel to {manager_ssh} failed, ssh said: {ssh_error}. The manager's "
        "sshd must accept the worker's key (its line in {authorized_keys}) and allow TCP "
        "forwarding to {address} (AllowTcpForwarding yes, no DisableForwarding, PermitOpen "
        "allowing it)."
    ),
    Category.STEP_TIMEOUT: (
        "Step {step} on {host} did not finish within {timeout_s} s: read the log tail for where "
        "it stopped; a slow network or disk needs a longer timeout (deploy_install_timeout_s)."
    ),
    Category.CONNECTION_LOST: (
        "The ssh connection to {host} dropped halfway (the host rebooted, sshd restarted, or the "
        "network cut it): check that {host} is up and answers ssh, then restore the slot "
        "(servetune worker-restore), which redoes what was not done."
    ),
    Category.DEPLOY_INTERRUPTED: (
        "A deploy or restore of {name} stopped halfway because the manager stopped during it: "
        "restore the slot (servetune worker-restore {name}) to finish it."
    ),
    Category.UNKNOWN: (
        "{host}: {reason}. Read the log tail for the cause, fix what it names and deploy again."
    ),
}
"""The suggestion per category: a ``str.format`` template filled by ``failure`` with what was
found. Every field has a default (``_DEFAULTS``), so each line also reads whole on its own."""

_DEFAULTS: dict[str, str] = {
    "host": "HOST",
    "port": "22",
    "user": "USER",
    "name": "NAME",
    "address": "ADDRESS",
    "known_hosts": "~/.ssh/known_hosts",
    "identity_files": "ssh's default keys ~/.ssh/id_ed25519, ~/.ssh/id_rsa, ...",
    "public_key": "~/.ssh/id_ed25519.pub",
    "reason": "see the log tail",
    "python": "python3",
    "found_version": "older",
    "min_version": MIN_PYTHON,
    "path": "the install directory",
    "free_gib": "too few",
    "install_dir": "INSTALL_DIR",
    "index_url": "set in package_index_url",
    "offline": "auto",
    "redis_url": "the URL in INSTALL_DIR/worker.json",
    "manager_ssh": "the manager's sshd",
    "ssh_error": "(see the log tail)",
    "authorized_keys": "the manager's authorized_keys",
    "timeout_s": "N",
    "step": "STEP",
    "fingerprint": "",
}


class _Found(dict[str, str]):
    """What was found, for ``str.format_map``: a field nobody found reads as ``<field>``."""

    def __missing__(self, key: str) -> str:
        return f"<{key}>"


def _q(word: str) -> str:
    """``word`` quoted for a shell the user pastes into, a leading ``~/`` left to expand."""
    if word.startswith("~/"):
        return "~/" + shlex.quote(word[2:])
    return shlex.quote(word)


def _enrich(found: Mapping[str, str]) -> _Found:
    """Defaults plus what was found plus the fields derived from it (quoted commands, ...)."""
    out = _Found(_DEFAULTS)
    out.update({k: v for k, v in found.items() if v not in (None, "")})
    host, port = out["host"], out["port"]
    out["host_q"] = _q(host)
    out["known_hosts_q"] = _q(out["known_hosts"])
    out["host_key_id"] = host if port == "22" else f"[{host}]:{port}"
    out["host_key_id_q"] = _q(out["host_key_id"])
    out["user_host_q"] = _q(f"{out['user']}@{host}")
    if "public_key" not in found and found.get("identity_files"):
        first = found["identity_files"].split(", ")[0]
        out["public_key"] = first if first.endswith(".pub") else first + ".pub"
    out["public_key_q"] = _q(out["public_key"])
    fingerprint = out["fingerprint"]
    out["fingerprint_note"] = f" ({fingerprint})" if fingerprint else ""
    if out["offline"] == "never":
        out["index_action"] = (
            "this slot says --offline never; allow the offline fallback with --offline auto "
            "(or --offline always), or open the index to that host"
        )
    else:
        out["index_action"] = (
            "an offline wheelhouse built on the manager for that host was shipped and installed "
            "instead (nothing to do; --offline always skips the probe)"
        )
    out["redis_url"] = redact(out["redis_url"])
    return out


def failure(
    category: Category,
    message: str,
    *,
    step: str,
    logs: list[str] | None = None,
    **found: str,
) -> DeployFailed:
    """A ``DeployFailed`` of ``category`` whose suggestion is ``SUGGESTIONS[category]`` filled
    with ``found`` (fields: host, port, user, known_hosts, identity_files, public_key, name,
    address, reason, python, found_version, min_version, path, free_gib, install_dir, index_url,
    offline, redis_url, manager_ssh, ssh_error, authorized_keys, timeout_s, fingerprint; values are
    strings, unknown fields are ignored, missing ones read as a generic default).

    ``message`` is the one-line error (secrets removed), ``step`` the step that failed, ``logs``
    the tail of the failing command's output (already through ``tail``). Returns the exception;
    the caller raises it. Never raises itself.
    """
    values = {k: str(v) for k, v in found.items() if v is not None}
    values.setdefault("step", step)
    suggestion = SUGGESTIONS.get(category, SUGGESTIONS[Category.UNKNOWN])
    return DeployFailed(
        category,
        _remove_secrets(message),
        _remove_secrets(suggestion.format_map(_enrich(values))),
        step=step,
        logs=logs,
    )


# ---- secrets ----------------------------------------------------------------------------------

_KEY_BLOCK = re.compile(
    r"-----BEGIN ([A-Z0-9 ]*PRIVATE KEY)-----.*?(?:-----END \1-----|\Z)", re.DOTALL
)
_KEY_BLOCK_HEADLESS = re.compile(r"\A.*?-----END ([A-Z0-9 ]*PRIVATE KEY)-----", re.DOTALL)
_SECRET_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # the RESP form, raw or escaped: *2\r\n$4\r\nAUTH\r\n$6\r\npassword
    (re.compile(r"((?i:AUTH)(?:\\r\\n|\n)\$\d+(?:\\r\\n|\n))[^\s\\]+"), r"\1" + MASK),
    # AUTH [user] password as typed (redis-cli, MONITOR) or as a list item ('AUTH', 'pw')
    (
        re.compile(
            r"((?:\bAUTH\b|['\"](?i:auth)['\"])[ \t,]+)"
            r"(?:['\"]?[^\s'\",]+['\"]?[ \t,]+)?['\"]?[^\s'\",)\]]+"
        ),
        r"\1" + MASK,
    ),
    # "password": "x" (JSON), password=x / PASSWORD: x (settings, env, logs), --requirepass x
    (re.compile(r"(?i)([\"']\w*password\w*[\"'][ \t]*:[ \t]*[\"'])[^\"']*"), r"\1" + MASK),
    (
        re.compile(
            r"(?i)(\b(?!passwordauthentication)\w*password\w*[ \t]*[=:][ \t]*)(?!\*\*\*)[^\s'\",;&]+"
        ),
        r"\1" + MASK,
    ),
    (
        re.compile(r"(--requirepass[ \t=]+|\bredis-cli\b[^\n]*?[ \t]-a[ \t]+)[^\s'\"]+"),
        r"\1" + MASK,
    ),
)


def _remove_secrets(text: str) -> str:
    """``text`` with private key blocks (also one cut at either end), Redis URL passwords, AUTH
    arguments and password fields replaced by ``MASK``."""
    text = _KEY_BLOCK.sub(lambda m: f"-----BEGIN {m.group(1)}----- {MASK}", text)
    text = _KEY_BLOCK_HEADLESS.sub(lambda m: f"{MASK} -----END {m.group(1)}-----", text)
    text = redact(text)
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def tail(text: str, lines: int = 30) -> list[str]:
    """The last ``lines`` non-empty-trailing lines of ``text`` (a command's output), secrets
    removed: private key blocks, passwords in URLs (``redis://:pw@host`` → ``:***@``), AUTH
    arguments, ``password=``/``"password":`` values, ``--requirepass`` and ``redis-cli -a``.
    Carriage returns are dropped. ``lines`` <= 0 gives []. Never raises."""
    if lines <= 0 or not text:
        return []
    cleaned = _remove_secrets(text.replace("\r\n", "\n").replace("\r", "\n"))
    out = cleaned.split("\n")
    while out and not out[-1].strip():
        out.pop()
    return out[-lines:]


# ---- ssh --------------------------------------------------------------------------------------

_CHANGED = re.compile(
    r"REMOTE HOST IDENTIFICATION HAS CHANGED|Host key for \S+ has changed and you have requested"
)
_KNOWN_HOSTS_IN = re.compile(
    r"(?:Offending \S+ key in |Add correct host key in )(\S+?)(?::\d+)?(?: to get rid|\s*$)", re.M
)
_REMOVE_WITH = re.compile(r"ssh-keygen -f \"([^\"]+)\" -R \"([^\"]+)\"")
_FINGERPRINT = re.compile(
    r"key sent by the remote host is\s+(SHA256:[A-Za-z0-9+/=]+?)\.?\s*$", re.M
)
_HOST_KEY_ID_CHANGED = re.compile(r"Host key for (\S+) has changed")
_UNKNOWN_STRICT = re.compile(r"No \S+ host key is known for (\S+) and you have requested strict")
_HOST_KEY_FAILED = "Host key verification failed"
_AUTH = re.compile(r"^(?:(\S+?)@)?(\S+?): Permission denied \(([^)]*)\)", re.M)
_TOO_MANY = re.compile(r"Received disconnect from (\S+) port (\d+):\d+: Too many authentication")
_CONNECT = re.compile(r"connect to host (\S+) port (\d+): (.+?)\s*$", re.M)
_TIMED_OUT = re.compile(r"Connection to (\S+) port (\d+) timed out")
_JUMP_OPEN = re.compile(r"open failed: connect failed: (.+?)\s*$", re.M)
_RESOLVE_REASONS = (
    "Name or service not known",
    "Temporary failure in name resolution",
    "No address associated with hostname",
    "nodename nor servname",
)
_RESOLVE = re.compile(r"Could not resolve hostname (\S+?): (.+?)\s*$", re.M)
_TRIED_KEY = re.compile(r"(?:Offering public key|Will attempt key|Trying private key): (\S+)")
_NOT_FOUND_127 = (
    re.compile(
        r"^\S*?: ?(?:line )?\d*:? ?(?:exec: )?(\S+): (?:command )?not found\s*$", re.M
    ),  # bash, dash
    re.compile(r"command not found: (\S+)"),  # zsh
    re.compile(r"^\S*?: ?(?:line )?\d*:? ?(\S+): No such file or directory\s*$", re.M),
)
_CLOSED_EARLY = re.compile(
    r"^Connection (closed|reset) by (?:authenticating user \S+ )?(\S+) port (\d+)", re.M
)
"""ssh's last words when the server dropped the connection before authentication finished."""
_NO_ROUTE_REASONS = (
    "No route to host",
    "Network is unreachable",
    "Host is unreachable",
    "Permission denied",  # a `prohibit` route or a local firewall REJECT: not authentication
    "Invalid argument",  # a `blackhole` route
    "Cannot assign requested address",
)


def _options(argv: list[str]) -> dict[str, list[str]]:
    """ssh options (lowercase name → values, in order) from ``argv`` and its ``-F`` file."""
    opts: dict[str, list[str]] = {}
    if argv and Path(argv[0]).name == "rsync":  # its ssh is the -e / --rsh command
        for j, arg in enumerate(argv):
            if arg in ("-e", "--rsh") and j + 1 < len(argv):
                return _options(shlex.split(argv[j + 1]))
            if arg.startswith("--rsh="):
                return _options(shlex.split(arg.removeprefix("--rsh=")))
        return opts
    flag_names = {"-p": "port", "-i": "identityfile", "-l": "user", "-J": "proxyjump"}
    config: str | None = None
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            break
        if arg in flag_names and i + 1 < len(argv):
            opts.setdefault(flag_names[arg], []).append(argv[i + 1])
            i += 2
            continue
        if arg == "-o" and i + 1 < len(argv):
            key, _, value = argv[i + 1].replace("=", " ", 1).partition(" ")
            opts.setdefault(key.lower(), []).append(value.strip())
            i += 2
            continue
        if arg == "-F" and i + 1 < len(argv):
            config = argv[i + 1]
            i += 2
            continue
        if len(arg) > 2 and arg[:2] in flag_names:  # -p2222, -i/path
            opts.setdefault(flag_names[arg[:2]], []).append(arg[2:])
        i += 1
    if config:
        try:
            lines = Path(config).read_text(errors="replace").splitlines()
        except OSError:
            lines = []
        for line in lines:
            key, _, value = line.strip().replace("=", " ", 1).partition(" ")
            if key and not key.startswith("#") and key.lower() not in ("host", "match"):
                opts.setdefault(key.lower(), []).append(value.strip())
    return opts


def _split_target(target: str) -> tuple[str, str, str]:
    """(user, host, port) from a display target such as ``user@host:2222`` or ``host``;
    missing parts are ''."""
    user, _, hostport = target.rpartition("@")
    host, port = hostport, ""
    match = re.fullmatch(r"\[(.+)\]:(\d+)|([^:\s]+):(\d+)", hostport)
    if match:
        host, port = (match.group(1), match.group(2)) if match.group(1) else match.group(3, 4)
    return user, host.strip(), port


def _host_port(key_id: str) -> tuple[str, str]:
    """(host, port) of a known_hosts name: ``[host]:port`` or ``host`` (port 22)."""
    match = re.fullmatch(r"\[(.+)\]:(\d+)", key_id)
    return (match.group(1), match.group(2)) if match else (key_id, "22")


def _first(opts: dict[str, list[str]], key: str) -> str:
    values = opts.get(key)
    return values[0] if values else ""


def _meaningful(stderr: str) -> list[str]:
    """stderr lines that are not ssh's debug chatter or decoration."""
    return [
        line.strip()
        for line in stderr.splitlines()
        if line.strip() and not line.startswith("debug") and not line.startswith("@@@")
    ]


def _unique(items: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for item in items:
        if item and item.lower() != "none":
            seen.setdefault(item, None)
    return list(seen)


def classify_ssh(result: CommandResult, *, target: str) -> DeployFailed | None:
    """The ``DeployFailed`` for a failed ssh call, or None when ``result`` is not an ssh-level
    failure (exit 0, or the remote command's own non-zero status other than 126/127).

    ``result``: the ssh ``CommandResult`` (its argv is read for ``-p``, ``-i``, ``-l``,
    ``-o Port/IdentityFile/UserKnownHostsFile/User`` and the ``-F`` config file); ``target``: the
    destination as the user knows it (``user@host``, ``host:2222``, a Host alias), named when
    ssh's own message does not say more. Categories: host_key_changed, host_key_unknown,
    auth_refused, connection_refused, connection_timeout, name_not_resolved, no_route (exit
    255); python_missing (exit 127, or 126: the remote shell could not run the interpreter);
    step_timeout (``timed_out``); unknown for any other exit 255, with ssh's last line.
    An rsync ``result`` (``rsync -e "ssh -F cfg ..."``, exit 12 or 255) is read the same way,
    its ssh options taken from ``-e``; it gives None when ssh itself did not fail.
    The step of the returned error is ''; the caller sets it or uses ``failure`` itself.
    """
    if result.returncode == 0 and not result.timed_out:
        return None
    rsync = bool(result.argv) and Path(result.argv[0]).name == "rsync"
    opts = _options(result.argv)
    t_user, t_host, t_port = _split_target(target)
    port = _first(opts, "port") or t_port or "22"
    user = _first(opts, "user") or t_user
    host = t_host or target
    known_hosts = _first(opts, "userknownhostsfile").split(" ")[0]
    stderr = result.stderr
    logs = tail(stderr)
    lines = _meaningful(stderr)
    last = lines[-1] if lines else f"ssh exited with status {result.returncode}"

    def fail(category: Category, message: str, **found: str) -> DeployFailed:
        base = {"host": host, "port": port, "user": user, "known_hosts": known_hosts}
        return failure(category, message, step="", logs=logs, **(base | found))

    if result.timed_out:
        return fail(
            Category.STEP_TIMEOUT,
            f"ssh to {target} did not finish within {result.duration_s:.0f} s",
            timeout_s=f"{result.duration_s:.0f}",
            reason="timed out",
        )
    if result.returncode in (126, 127) and not rsync:
        for pattern in _NOT_FOUND_127:
            match = pattern.search(stderr)
            if match:
                python = match.group(1)
                break
        else:
            remote = result.argv[-1] if len(result.argv) > 1 else ""
            python = (shlex.split(remote) or ["python3"])[0] if remote else "python3"
        return fail(
            Category.PYTHON_MISSING,
            f"{python} was not found on {target}: {last}",
            python=python,
            reason=last,
        )
    if result.returncode == 2 and not rsync and "Unknown option: -I" in stderr:
        remote = result.argv[-1] if len(result.argv) > 1 else ""
        python = (shlex.split(remote) or ["python"])[0] if remote else "python"
        return fail(  # Python 2 has no -I (isolated mode, 3.4+): it never reaches the agent
            Category.PYTHON_TOO_OLD,
            f"{python} on {target} is Python 2 (it has no -I option); servetune needs 3.11+",
            python=python,
            found_version="2",
        )
    if result.returncode != 255 and not (rsync and result.returncode == 12):
        return None  # rsync: 12 is "protocol stream" (its ssh failed, or the remote's rsync)

    if _CHANGED.search(stderr):
        found: dict[str, str] = {}
        match = _REMOVE_WITH.search(stderr)
        if match:
            found["known_hosts"], key_id = match.group(1), match.group(2)
            found["host"], found["port"] = _host_port(key_id)
        else:
            kh = _KNOWN_HOSTS_IN.search(stderr)
            if kh:
                found["known_hosts"] = kh.group(1)
            changed = _HOST_KEY_ID_CHANGED.search(stderr)
            if changed:
                found["host"], found["port"] = _host_port(changed.group(1))
        fingerprint = _FINGERPRINT.search(stderr)
        if fingerprint:
            found["fingerprint"] = fingerprint.group(1)
        where = f"{found.get('host', host)} port {found.get('port', port)}"
        return fail(
            Category.HOST_KEY_CHANGED,
            f"the host key of {where} has changed; servetune stopped before logging in",
            **found,
        )
    match = _UNKNOWN_STRICT.search(stderr)
    if match or _HOST_KEY_FAILED in stderr:
        found = {}
        if match:
            found["host"], found["port"] = _host_port(match.group(1))
        where = f"{found.get('host', host)} port {found.get('port', port)}"
        return fail(
            Category.HOST_KEY_UNKNOWN,
            f"the host key of {where} is unknown and strict host key checking is on",
            **found,
        )
    match = _AUTH.search(stderr)
    too_many = _TOO_MANY.search(stderr)
    if match or too_many:
        found = {}
        if match:
            found["user"] = match.group(1) or user
            found["host"] = match.group(2)
            methods = match.group(3)
        else:
            assert too_many is not None
            found["host"], found["port"] = too_many.group(1), too_many.group(2)
            methods = "publickey"
        if found["host"] != host:  # refused by a ProxyJump hop: its port is in -J
            for hop in ",".join(opts.get("proxyjump", [])).split(","):
                h_user, h_host, h_port = _split_target(hop.strip())
                if h_host == found["host"]:
                    found["port"] = h_port or "22"
                    found["user"] = found["user"] or h_user
        keys = _unique([*_TRIED_KEY.findall(stderr), *opts.get("identityfile", [])])
        if keys:
            found["identity_files"] = ", ".join(keys)
        who = f"{found.get('user') or user or 'the user'}@{found['host']}"
        return fail(
            Category.AUTH_REFUSED,
            f"{who} refused the authentication ({methods})",
            **found,
        )
    for match in _CONNECT.finditer(stderr):
        c_host, c_port, reason = match.group(1), match.group(2), match.group(3)
        if reason.startswith("Connection refused"):
            return fail(
                Category.CONNECTION_REFUSED,
                f"{c_host}:{c_port} refused the connection",
                host=c_host,
                port=c_port,
                reason=reason,
            )
        if "timed out" in reason.lower():
            return fail(
                Category.CONNECTION_TIMEOUT,
                f"connecting to {c_host}:{c_port} timed out",
                host=c_host,
                port=c_port,
                reason=reason,
            )
        if any(reason.startswith(r) for r in _NO_ROUTE_REASONS):
            return fail(
                Category.NO_ROUTE,
                f"no route to {c_host} port {c_port}: {reason}",
                host=c_host,
                port=c_port,
                address=c_host,
                reason=reason,
            )
    match = _JUMP_OPEN.search(stderr)
    if match:  # the ProxyJump hop could not reach the destination: ssh names no host itself
        reason = match.group(1)
        via = f"{target} (through the jump host)"
        if reason.startswith("Connection refused"):
            return fail(Category.CONNECTION_REFUSED, f"{via} refused the connection", reason=reason)
        if "timed out" in reason.lower():
            return fail(Category.CONNECTION_TIMEOUT, f"connecting to {via} timed out")
        if any(reason.startswith(r) for r in _RESOLVE_REASONS):
            return fail(
                Category.NAME_NOT_RESOLVED,
                f"the jump host cannot resolve {host}: {reason}",
                name=host,
                reason=f"on the jump host: {reason}",
            )
        if any(reason.startswith(r) for r in _NO_ROUTE_REASONS):
            return fail(
                Category.NO_ROUTE,
                f"the jump host has no route to {host}: {reason}",
                address=host,
                reason=f"from the jump host: {reason}",
            )
    match = _TIMED_OUT.search(stderr)
    if match and match.group(1) == "UNKNOWN":  # through a jump host: ssh does not know the name
        match = None
    if match or "timed out" in stderr.lower():
        found = {"host": match.group(1), "port": match.group(2)} if match else {}
        where = f"{found.get('host', host)}:{found.get('port', port)}"
        return fail(
            Category.CONNECTION_TIMEOUT,
            f"connecting to {where} timed out ({last})",
            reason=last,
            **found,
        )
    match = _RESOLVE.search(stderr)
    if match:
        return fail(
            Category.NAME_NOT_RESOLVED,
            f"the host name {match.group(1)} does not resolve: {match.group(2)}",
            name=match.group(1),
            reason=match.group(2),
        )
    match = _CLOSED_EARLY.search(stderr)
    if match:  # TCP accepted, then dropped before the ssh handshake ended: sshd turned us away
        c_host, c_port = match.group(2), match.group(3)
        return DeployFailed(
            Category.CONNECTION_REFUSED,
            f"{c_host}:{c_port} accepted the connection and {match.group(1)} it before the ssh "
            "handshake",
            f"{c_host}:{c_port} closed the connection before the ssh handshake ended: sshd there "
            "turned this machine away (hosts.deny, fail2ban, MaxStartups under load) or the port "
            "is not sshd's; read the host's sshd log (`journalctl -u ssh`) and check the port "
            "(-p) in the ssh command.",
            logs=logs,
        )
    match = _LOST.search(stderr)
    if match:  # connected, then the link went away mid-command
        return fail(
            Category.CONNECTION_LOST,
            f"the ssh connection to {target} dropped: {match.group(0).strip()}",
            reason=match.group(0).strip(),
        )
    if rsync:
        return None  # not ssh's own failure: the caller reports rsync's
    if not lines:
        quiet = "-q" in result.argv or _first(opts, "loglevel").lower() == "quiet"
        last = (
            "ssh exited with 255 and printed nothing: -q / LogLevel QUIET hides its errors, "
            "drop it from the ssh command and deploy again to see why"
            if quiet
            else "ssh exited with 255 and printed nothing"
        )
    return fail(Category.UNKNOWN, f"ssh to {target} failed: {last}", reason=last)


_LOST = re.compile(
    r"Connection to \S+ closed by remote host\.?|client_loop: send disconnect: [^\n]*"
    r"|packet_write_wait: [^\n]*|Timeout, server \S+ not responding\.?"
)
"""ssh's words for a session that was up and then went away (reboot, sshd restart, network)."""

# ---- agent errors -----------------------------------------------------------------------------

_VERSION = re.compile(r"\b(\d+\.\d+(?:\.\d+)?)\b")
_GIB_FREE = re.compile(r"(\d+(?:\.\d+)?)\s*GiB (?:free|available|left)")
_GIB = re.compile(r"(\d+(?:\.\d+)?)\s*GiB")
_PATH = re.compile(r"(?:^|[\s'\"(:])((?:/|~/)[^\s'\":,;)]*)")
_HOST_PORT = re.compile(r"\b((?:\[[0-9A-Fa-f:]+\]|[A-Za-z0-9._-]+):\d{1,5})\b")


def from_agent_error(error: Mapping[str, object], *, step: str, target: str) -> DeployFailed:
    """The ``DeployFailed`` for the agent's error reply ``{"kind", "message", "detail"}`` (and
    optionally ``"found"``: a dict of suggestion fields the agent measured, e.g. path, free_gib,
    python, found_version, min_version, address, ssh_error).

    ``kind`` is a ``Category`` value (an unknown kind becomes Category.UNKNOWN, named in the
    message); fields the agent did not send are read off its message (versions, a path, GiB,
    host:port). ``detail`` (a log) becomes ``logs`` through ``tail``; ``target`` names the host.
    """
    kind = str(error.get("kind") or "unknown")
    message = str(error.get("message") or f"the agent reported {kind} without a message")
    detail = str(error.get("detail") or "")
    try:
        category = Category(kind)
    except ValueError:
        category = Category.UNKNOWN
        message = f"{message} (agent error kind {kind!r})"
    raw_found = error.get("found")
    found: dict[str, str] = {}
    if isinstance(raw_found, Mapping):
        found = {str(k): str(v) for k, v in raw_found.items() if v is not None}
    user, host, _port = _split_target(target)
    found.setdefault("host", host or target)
    if user:
        found.setdefault("user", user)
    found.setdefault("reason", message)
    if category is Category.PYTHON_TOO_OLD:
        versions = _VERSION.findall(message)
        if versions:
            found.setdefault("found_version", versions[0])
        if len(versions) > 1:
            found.setdefault("min_version", versions[1])
    path = _PATH.search(message)
    if path and category in (Category.DISK_FULL, Category.PERMISSION_DENIED):
        found.setdefault("path", path.group(1))
    if path and category in (Category.PYTHON_TOO_OLD, Category.PYTHON_MISSING):
        found.setdefault("python", path.group(1))
    if category is Category.DISK_FULL:
        gib = _GIB_FREE.search(message) or _GIB.search(message)
        if gib:
            found.setdefault("free_gib", gib.group(1))
    if category in (Category.REDIS_UNREACHABLE, Category.TUNNEL_FAILED):
        address = _HOST_PORT.search(message)
        if address:
            found.setdefault("address", address.group(1))
    if category is Category.TUNNEL_FAILED:
        lines = _meaningful(detail)
        found.setdefault("ssh_error", lines[-1] if lines else message)
    failed = failure(category, message, step=step, logs=tail(detail), **found)
    if category is Category.PERMISSION_DENIED:
        specific = _permission_suggestion(message, found.get("path") or "the install directory")
        if specific:
            failed.suggestion = _remove_secrets(specific)
    return failed


def _permission_suggestion(message: str, path: str) -> str | None:
    """A suggestion for a permission_denied whose cause is not missing write access (the
    template's advice): a shared or foreign directory, a file in the path, a read-only file
    system, a file where the directory should be; None for plain EACCES."""
    if "is not a directory of servetune's own" in message:
        return (
            f"{path} is not servetune's to take over ({message.split(': ', 1)[-1]}): set the "
            "slot's install_dir to a new directory of its own, e.g. ~/.servetune or "
            "/opt/servetune (servetune creates it, mode 700)."
        )
    if "ENOTDIR" in message or "Not a directory" in message:
        return (
            f"A part of {path} is a file, not a directory: set the slot's install_dir to a path "
            "whose parents are directories, e.g. ~/.servetune."
        )
    if "EROFS" in message or "Read-only file system" in message:
        return (
            f"{path} is on a read-only file system: set the slot's install_dir to a writable "
            "place, e.g. ~/.servetune."
        )
    if "EEXIST" in message or "File exists" in message:
        return (
            f"{path} exists and is not a directory: set the slot's install_dir to another path, "
            "e.g. ~/.servetune, or remove that file on the host."
        )
    return None
