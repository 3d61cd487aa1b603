"""Secrets masked in log records: tokens, bearer credentials, Authorization values, URL passwords.

Pure functions and a real logging handler; no sockets.
"""

from __future__ import annotations

import io
import logging

import pytest

from servetune.redact import SecretFilter, redact


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("< authorization: Bearer abc.def", "< authorization: Bearer ***"),
        ("(b'authorization', b'Bearer xyz')", "(b'authorization', b'Bearer ***')"),
        ("sec-websocket-protocol: bearer.t0k", "sec-websocket-protocol: bearer.***"),
        ('{"Authorization": "Basic zzz"}', '{"Authorization": "Basic ***"}'),
        ("redis://:pw@127.0.0.1:1/0", "redis://:***@127.0.0.1:1/0"),
        ("rediss://user:pw@h/2?password=q", "rediss://user:***@h/2?password=***"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ],
)
def test_redact_masks_credentials(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_filter_masks_the_literal_token_in_message_args_and_traceback() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(SecretFilter(["s3cr3t"]))
    logger = logging.getLogger("test_redact.private")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("token is %s", "s3cr3t")
        try:
            raise ValueError("bad s3cr3t")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    assert "s3cr3t" not in out.getvalue()
    assert "token is ***" in out.getvalue() and "ValueError: bad ***" in out.getvalue()
