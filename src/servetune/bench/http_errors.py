"""Readable reasons for httpx failures, so no error message ever ends in an empty reason.

httpx's timeouts (and some connection errors) carry an empty message; these name what happened.
"""

from __future__ import annotations

import httpx

_SILENT: dict[type[BaseException], str] = {
    httpx.ConnectTimeout: "no connection within the timeout",
    httpx.ReadTimeout: "connected, but no answer within the timeout",
    httpx.WriteTimeout: "connected, but the request could not be sent within the timeout",
    httpx.PoolTimeout: "no free connection within the timeout",
    httpx.ConnectError: "cannot connect",
    httpx.ReadError: "the connection was closed or reset while reading",
    httpx.WriteError: "the connection was closed or reset while sending",
    TimeoutError: "no answer within the timeout",
}


def describe(e: BaseException, timeout_s: float | None = None) -> str:
    """``Type: message`` on one line; an empty message is replaced by what the type means.

    ``timeout_s`` (seconds), when given, is named in the text of a timeout: e.g.
    ``ReadTimeout: connected, but no answer within 10 s``.
    """
    text = " ".join(str(e).split())
    if not text:
        text = next(
            (why for kind, why in _SILENT.items() if isinstance(e, kind)), "no detail given"
        )
        if timeout_s is not None:
            text = text.replace("the timeout", f"{timeout_s:g} s")
    return f"{type(e).__name__}: {text}"
