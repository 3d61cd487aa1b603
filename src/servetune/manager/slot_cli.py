"""The `servetune worker-deploy`, `worker-restore`, `worker-slots` and `worker-remove` commands:
worker slots on a manager through its REST API (``/api/worker-slots``), as `submit` talks to it.

Exit statuses: 0 the worker runs, 1 the deploy failed (or the manager could not be reached),
2 bad input (the manager's 422 problems, an unknown slot, an ssh command that cannot be parsed).
"""

from __future__ import annotations

import inspect
import re
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from servetune.core.spec import Problem
from servetune.errors import DeployFailed, SpecInvalid
from servetune.manager.cli import TokenFileOption, call_manager, manager_base
from servetune.manager.cli import _read_token as read_token
from servetune.remote.models import OfflineMode, RedisVia
from servetune.remote.ssh import parse_ssh_command

DEFAULT_MANAGER = "http://127.0.0.1:8400"
"""The manager `servetune manager` serves by default."""
DEPLOY_TIMEOUT_S = 3600.0
"""How long the CLI waits for the manager's answer to a deploy or restore, s."""
DEPLOY_STOP_TIMEOUT_S = 120.0
"""How long a removal may take on the manager (ssh connect, agent, the worker's stop grace), s;
the CLI waits twice that."""

ManagerOption = Annotated[
    str,
    typer.Option(
        "--manager",
        envvar="SERVETUNE_MANAGER_URL",
        help="Base URL of the manager, e.g. http://host:8400.",
    ),
]


def _call(method: str, base: str, path: str, token: Any, **kwargs: Any) -> Any:
    """``call_manager`` for the slot commands: a 422 names the worker slot's problems."""
    return call_manager(method, base, path, token, subject="worker slot", **kwargs)


def default_slot_name(ssh_command: str) -> str:
    """The host part of ``ssh_command``'s destination as a slot name (``ssh -p 22 me@gpu-1``
    → ``gpu-1``): characters a name cannot hold become '-'. Raises SpecInvalid (field
    ssh_command) when the command cannot be parsed."""
    try:
        target = parse_ssh_command(ssh_command)
    except DeployFailed as e:
        raise SpecInvalid(
            [Problem("ssh_command", f"{e}; {e.suggestion}")], subject="worker slot"
        ) from None
    host = target.destination.removeprefix("ssh://").rsplit("@", 1)[-1]
    if host.startswith("["):  # [v6]:port
        host = re.sub(r":[0-9]+$", "", host).strip("[]")
    elif host.count(":") == 1:  # host:port (a bare IPv6 address has more colons)
        host = host.split(":", 1)[0]
    name = re.sub(r"[^A-Za-z0-9._-]", "-", host)
    if ":" in host:  # an IPv6 address: ::1 -> ipv6-1, fd00::5 -> ipv6-fd00-5
        name = "ipv6-" + re.sub(r"-+", "-", name).strip("-")
    name = name.lstrip("._-")[:63]
    if not name:
        raise SpecInvalid(
            [Problem("name", f"no slot name can be made from {host!r}; give one with --name")],
            subject="worker slot",
        )
    return name


def _find_slot(base: str, name: str, token: Any) -> dict[str, Any] | None:
    slots = _call("GET", base, "/api/worker-slots", token)["items"]
    return next((s for s in slots if s["name"] == name), None)


def _slot_named(base: str, name: str, token: Any) -> dict[str, Any]:
    """The saved worker slot called ``name``; raises SpecInvalid (field name) when none is."""
    slot = _find_slot(base, name, token)
    if slot is None:
        raise SpecInvalid(
            [
                Problem(
                    "name", f"no worker slot named {name!r}; `servetune worker-slots` lists them"
                )
            ],
            subject="request",
        )
    return slot


def print_report(report: dict[str, Any], console: Console) -> None:
    """Print a DeployReport (JSON): a table of its steps (name, status, duration_s, detail),
    then the worker id and GPUs, or ``error [category]: message``, ``suggestion: …`` and the
    log tail."""
    table = Table("step", "status", "duration_s", "detail", box=None, pad_edge=False)
    colours = {"ok": "green", "warning": "yellow", "failed": "red", "skipped": "dim"}
    for step in report.get("steps", []):
        status = step["status"]
        detail = step.get("detail") or ""
        if step.get("category") and status != "ok":
            detail = f"[{step['category']}] {detail}".strip()
        table.add_row(
            escape(step["name"]),
            f"[{colours.get(status, 'white')}]{escape(status)}[/]",
            f"{step['duration_s']:.1f}",
            escape(detail),
        )
    console.print(table)
    if report["success"] and report.get("action") == "remove":
        console.print(escape(report["message"]), highlight=False, soft_wrap=True)
        for step in report.get("steps", []):
            if step["status"] == "warning" and step.get("suggestion"):
                console.print(
                    f"suggestion: {escape(step['suggestion'])}", highlight=False, soft_wrap=True
                )
        return
    if report["success"]:
        gpus = ", ".join(report.get("gpus") or []) or "none"
        console.print(
            f"worker {escape(str(report.get('worker_id')))} registered "
            f"({report['action']} took {report.get('duration_s', 0.0):.1f} s); GPUs: "
            f"{escape(gpus)}",
            highlight=False,
            soft_wrap=True,
        )
        return
    for line in report.get("logs") or []:
        console.print(f"  [dim]{escape(line)}[/]", highlight=False, soft_wrap=True)
    category = escape(f"[{report.get('category')}]")
    console.print(
        f"[red]error {category}[/]: {escape(report['message'])}",
        highlight=False,
        soft_wrap=True,
    )
    if report.get("suggestion"):
        console.print(
            f"suggestion: {escape(report['suggestion'])}", highlight=False, soft_wrap=True
        )


def _finish(report: dict[str, Any], console: Console) -> None:
    print_report(report, console)
    if not report["success"]:
        raise typer.Exit(1)


def worker_deploy(
    ssh_command: Annotated[
        str,
        typer.Argument(
            metavar="SSH_COMMAND",
            help='How you reach the host, as one argument: "ssh -p 2222 -i ~/.ssh/key user@host"',
        ),
    ],
    name: Annotated[
        str | None, typer.Option(help="Slot name (default: the host part of the ssh command).")
    ] = None,
    install_dir: Annotated[
        str | None, typer.Option(help="Remote install directory (default: ~/.servetune).")
    ] = None,
    python: Annotated[
        str | None, typer.Option(help="Remote interpreter, >= 3.11 (default: python3).")
    ] = None,
    redis_via: Annotated[
        RedisVia | None,
        typer.Option(help="How the worker reaches Redis (default: forward, an ssh tunnel)."),
    ] = None,
    manager_ssh: Annotated[
        str | None,
        typer.Option(
            help="forward: the manager's sshd as the worker reaches it, user@host[:port] (the "
            "manager reads its host key there too, so it must reach it as well)."
        ),
    ] = None,
    redis_address: Annotated[
        str | None, typer.Option(help="direct: Redis as the worker reaches it, host:port.")
    ] = None,
    max_parallel: Annotated[
        int | None, typer.Option(min=1, max=64, help="Trials the worker runs at once.")
    ] = None,
    offline: Annotated[
        OfflineMode | None,
        typer.Option(help="auto: probe the index; always: ship a wheelhouse; never: the index."),
    ] = None,
    manager_url: ManagerOption = DEFAULT_MANAGER,
    token_file: TokenFileOption = None,
) -> None:
    """Deploy a worker on a host you reach with SSH_COMMAND, through the manager.

    Saves the host as a worker slot (or updates the slot of that name with the options given),
    then deploys: prints each step with its duration, then the worker id and its GPUs, or the
    error's category and a suggestion.

    Exit status: 0 the worker runs, 1 the deploy failed, 2 bad input.
    """
    base = manager_base(manager_url)
    token = read_token(token_file)
    if name is not None and not name.strip():  # e.g. --name "$HOST" with HOST unset
        raise SpecInvalid(
            [Problem("name", "--name is empty; give the slot a name or leave --name out")],
            subject="worker slot",
        )
    slot_name = name or default_slot_name(ssh_command)
    given = {
        "install_dir": install_dir,
        "python": python,
        "redis_via": redis_via.value if redis_via is not None else None,
        "manager_ssh": manager_ssh,
        "redis_address": redis_address,
        "max_parallel": max_parallel,
        "offline": offline.value if offline is not None else None,
    }
    fields = {"ssh_command": ssh_command, **{k: v for k, v in given.items() if v is not None}}
    console = Console()
    existing = _find_slot(base, slot_name, token)
    if existing is None:
        slot = _call(
            "POST", base, "/api/worker-slots", token, json={"name": slot_name, **fields}, ok=(201,)
        )
        console.print(f"worker slot [bold]{escape(slot_name)}[/] saved (id {slot['id']})")
    else:
        slot = _call("PATCH", base, f"/api/worker-slots/{existing['id']}", token, json=fields)
        console.print(f"worker slot [bold]{escape(slot_name)}[/] (id {slot['id']}) updated")
    console.print(f"deploying on {escape(ssh_command)} …", highlight=False, soft_wrap=True)
    body = {"offline": offline.value} if offline is not None else None
    report = _run_on_manager("deploy", slot_name, base, slot["id"], token, body)
    _finish(report, console)


def _run_on_manager(
    action: str, name: str, base: str, slot_id: int, token: Any, body: Any = None
) -> Any:
    """POST the deploy or restore (``action``) of slot ``slot_id`` and wait for its report. On
    Ctrl-C, says that the manager goes on with it (the request cannot stop it) and exits 130."""
    try:
        return _call(
            "POST",
            base,
            f"/api/worker-slots/{slot_id}/{action}",
            token,
            json=body,
            timeout_s=DEPLOY_TIMEOUT_S,
        )
    except KeyboardInterrupt:
        Console(stderr=True).print(
            f"interrupted: the manager goes on with the {action} of worker slot "
            f"{escape(name)}; `servetune worker-slots` shows how it ends",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(130) from None


def worker_restore(
    name: Annotated[str, typer.Argument(help="The worker slot's name.")],
    manager_url: ManagerOption = DEFAULT_MANAGER,
    token_file: TokenFileOption = None,
) -> None:
    """Bring back the worker of the worker slot NAME, through the manager.

    Nothing is restarted when the worker runs and is registered; a dead worker's leftovers are
    stopped and it starts again. Exit status as worker-deploy.
    """
    base = manager_base(manager_url)
    token = read_token(token_file)
    slot = _slot_named(base, name, token)
    console = Console()
    console.print(f"restoring worker slot [bold]{escape(name)}[/] (id {slot['id']}) …")
    report = _run_on_manager("restore", name, base, slot["id"], token)
    _finish(report, console)


def worker_remove(
    name: Annotated[str, typer.Argument(help="The worker slot's name.")],
    keep_worker: Annotated[
        bool, typer.Option("--keep-worker", help="Leave its worker running on the host.")
    ] = False,
    manager_url: ManagerOption = DEFAULT_MANAGER,
    token_file: TokenFileOption = None,
) -> None:
    """Forget the worker slot NAME: its worker on the host is stopped (a running trial is handed
    back), its Redis tunnel key leaves the manager's authorized_keys, its reverse tunnel stops,
    and its stopped worker leaves the manager's worker list.

    A host that cannot be reached does not keep the slot: the stop step says so, with how to
    stop the worker there. Exit status 0 once removed.
    """
    base = manager_base(manager_url)
    token = read_token(token_file)
    slot = _slot_named(base, name, token)
    query = "?keep_worker=true" if keep_worker else ""
    timeout_s = 2 * DEPLOY_STOP_TIMEOUT_S
    report = _call(
        "DELETE", base, f"/api/worker-slots/{slot['id']}{query}", token, timeout_s=timeout_s
    )
    print_report(report, Console())


def worker_slots(
    manager_url: ManagerOption = DEFAULT_MANAGER,
    token_file: TokenFileOption = None,
) -> None:
    """List the manager's worker slots: name, status, worker, last seen, ssh command, error."""
    base = manager_base(manager_url)
    slots = _call("GET", base, "/api/worker-slots", read_token(token_file))["items"]
    console = Console()
    if not slots:
        console.print('no worker slots; add one with `servetune worker-deploy "ssh user@host"`')
        return
    table = Table("name", "status", "worker", "last seen (UTC)", "ssh command", "error")
    for s in slots:
        seen = (s.get("last_seen_at") or "")[:19].replace("T", " ")
        error = f"[{s['category']}] {s['error']}" if s.get("error") else ""
        table.add_row(
            escape(s["name"]),
            escape(s["status"]),
            escape(s.get("worker_id") or ""),
            seen,
            escape(s["ssh_command"]),
            escape(error),
        )
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add `worker-deploy`, `worker-restore`, `worker-slots` and `worker-remove` to the main
    command line."""
    for name, command in (
        ("worker-deploy", worker_deploy),
        ("worker-restore", worker_restore),
        ("worker-slots", worker_slots),
        ("worker-remove", worker_remove),
    ):
        app.command(name, help=help_text(command.__doc__ or ""))(command)


def help_text(docstring: str) -> str:
    """``docstring`` with each paragraph on one line: the help then wraps at the terminal's
    width instead of breaking where the source lines end."""
    paragraphs = inspect.cleandoc(docstring).split("\n\n")
    return "\n\n".join(" ".join(p.split()) for p in paragraphs)
