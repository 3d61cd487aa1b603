"""Bearer-token auth of the manager's API: who may call /api and /ws, and when it may start.

Bound beyond loopback the manager refuses to start without a token; with one, every /api and
/ws request needs ``Authorization: Bearer <token>`` (WebSockets may send the subprotocol
``bearer.<token>`` instead, since browsers cannot set headers on them).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from pydantic import SecretStr

from servetune.errors import ServetuneError

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PROTECTED_PREFIXES = ("/api", "/ws")
"""Paths that need the token; /docs and /openapi.json stay open."""

SUBPROTOCOL_PREFIX = "bearer."
"""A WebSocket may carry its token as the subprotocol ``bearer.<token>``."""


class TokenRequired(ServetuneError):
    """The manager would listen beyond loopback without an API token."""


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1); False otherwise.

    ``0.0.0.0``, ``::`` and every other name or address count as beyond loopback.
    """
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: SecretStr | None) -> None:
    """Refuse to serve on ``host`` beyond loopback without a token.

    Raises TokenRequired naming SERVETUNE_API_TOKEN and --token-file as the fix.
    """
    if token is None and not is_loopback(host):
        raise TokenRequired(
            f"--host {host} is beyond loopback, so the API needs a token: set "
            "SERVETUNE_API_TOKEN or pass --token-file PATH (a file holding the token), or bind "
            "to 127.0.0.1"
        )


def token_matches(given: str | None, token: SecretStr) -> bool:
    """Constant-time comparison of a presented token with the expected one."""
    if given is None:
        return False
    return hmac.compare_digest(given.encode(), token.get_secret_value().encode())


def bearer_of(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, rest = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and rest.strip():
                return rest.strip()
    return None


def subprotocol_token(scope: Scope) -> str | None:
    """The token of a WebSocket subprotocol ``bearer.<token>``, or None."""
    for proto in scope.get("subprotocols") or []:
        if isinstance(proto, str) and proto.startswith(SUBPROTOCOL_PREFIX):
            return proto[len(SUBPROTOCOL_PREFIX) :]
    return None


class BearerAuth:
    """ASGI middleware: 401 for /api and /ws requests without the right bearer token.

    HTTP gets ``401 {"detail": …}`` with ``WWW-Authenticate: Bearer``; a WebSocket is closed
    before it is accepted (the client sees HTTP 403 from the server, or close code 1008). The
    token is never logged or echoed.
    """

    def __init__(self, app: ASGIApp, token: SecretStr) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on when it is open or carries the token; refuse it otherwise."""
        kind = scope.get("type")
        path = str(scope.get("path", ""))
        if kind not in ("http", "websocket") or not path.startswith(PROTECTED_PREFIXES):
            await self.app(scope, receive, send)
            return
        headers = list(scope.get("headers") or [])
        given = bearer_of(headers)
        if given is None and kind == "websocket":
            given = subprotocol_token(scope)
        if token_matches(given, self.token):
            await self.app(scope, receive, send)
            return
        log.info("refused %s %s: missing or wrong bearer token", kind, path)
        if kind == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1008, "reason": "bearer token needed"})
            return
        body = b'{"detail":"missing or wrong bearer token: send Authorization: Bearer <token>"}'
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
