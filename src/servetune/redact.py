"""Secrets kept out of log records: the API token, bearer credentials, Redis URL passwords.

``install_secret_filter`` masks them in every record of every logger before any handler formats it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

__all__ = ["MASK", "SecretFilter", "install_secret_filter", "redact"]

MASK = "***"
"""What a secret is replaced with."""

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # Authorization: Bearer x / Basic x / x, as a header line, a dict item or a (name, value) pair
    (
        re.compile(
            r"(?i)(authorization['\"]?\s*[:=,]\s*(?:b?['\"])?(?:(?:bearer|basic|token)\s+)?)"
            r"(?!\*\*\*)[^\s'\",;)\]}]+"
        ),
        r"\1" + MASK,
    ),
    (re.compile(r"(?i)\b(bearer)(\s+|\.)(?!\*\*\*)[^\s'\",;)\]}]+"), r"\1\2" + MASK),
    # scheme://user:password@host → scheme://user:***@host (redis, rediss, postgres, …)
    (re.compile(r"([a-z][a-z0-9+.-]*://[^:/@\s'\"]*):[^@\s/'\"]+@"), r"\1:" + MASK + "@"),
    (re.compile(r"(?i)([?&]password=)[^&\s'\"]+"), r"\1" + MASK),
)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every literal in ``secrets`` and every bearer credential, Authorization
    header value and URL password replaced by ``MASK``. Empty secrets are ignored."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


class SecretFilter(logging.Filter):
    """A filter that rewrites a record's message (and its formatted traceback) with ``redact``.

    It never drops a record. ``secrets``: literal values to mask (the API token, passwords);
    ``add(secret)`` adds one later.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets: set[str] = {s for s in secrets if s}

    def add(self, secret: str | None) -> None:
        """Mask ``secret`` too from now on (None or empty: nothing)."""
        if secret:
            self.secrets.add(secret)

    def filter(self, record: logging.LogRecord) -> bool:
        """Mask the record in place; always True."""
        if getattr(record, "_servetune_redacted", False):
            return True
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: leave it to the handler's own error path
            return True
        masked = redact(message, self.secrets)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self.secrets)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, self.secrets)
        record._servetune_redacted = True
        return True


_installed: SecretFilter | None = None


def install_secret_filter(secrets: Iterable[str] = ()) -> SecretFilter:
    """Mask ``secrets`` (and bearer credentials, Authorization values, URL passwords) in every
    log record from now on; the filter (one per process: a second call adds its secrets to it).

    The filter goes on every handler present now (of the root logger and of every other logger)
    and into the log-record factory, so records handled by handlers added later are masked too.
    """
    global _installed
    if _installed is None:
        _installed = SecretFilter()
        previous = logging.getLogRecordFactory()
        chosen = _installed

        def factory(*args: object, **kwargs: object) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            chosen.filter(record)
            return record

        logging.setLogRecordFactory(factory)
    for secret in secrets:
        _installed.add(secret)
    loggers: list[logging.Logger | logging.PlaceHolder] = [logging.getLogger()]
    loggers += list(logging.root.manager.loggerDict.values())
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if _installed not in handler.filters:
                handler.addFilter(_installed)
    return _installed
