"""Redis connections of the fleet: clients that reconnect by themselves, masked URLs, and the
translation of redis-py's errors into ``RedisUnavailable``.

Every client made here retries a command that fails on a lost connection with exponential backoff
for about ``retry_for_s`` (30 s), so a Redis restart costs a delay, not a crash.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.exceptions import AuthenticationError, ConnectionError, RedisError, TimeoutError
from redis.retry import Retry as SyncRetry

from servetune.errors import RedisUnavailable

__all__ = [
    "RedisUnavailable",
    "client_options",
    "client_url",
    "connect",
    "connect_sync",
    "is_auth_error",
    "redis_errors",
    "retries_for",
    "safe_url",
    "translate",
]

logger = logging.getLogger(__name__)

BACKOFF_BASE_S = 0.05
"""First retry delay is 2 × this, doubling on each failure up to ``BACKOFF_CAP_S``."""
BACKOFF_CAP_S = 1.0
"""Longest wait between two retries, s (so a Redis back after an outage is used within 1 s)."""
HEALTH_CHECK_INTERVAL_S = 10
"""A connection idle longer than this is PINGed before use (a dead one is replaced)."""
SOCKET_CONNECT_TIMEOUT_S = 5.0
"""Timeout of one TCP connect to Redis, s."""
SOCKET_TIMEOUT_S = 30.0
"""Timeout of one reply, s: longer than any blocking read servetune issues (XREADGROUP BLOCK)."""

_QUERY_PASSWORD = re.compile(r"(?i)((?:^|&)password=)[^&]*")
_URL_HELP = "use redis://[:password@]host:port/db, rediss://… for TLS, or unix:///path/redis.sock"


def safe_url(url: str) -> str:
    """``url`` with its password replaced by ``***``: safe for logs and error messages.

    ``redis://:secret@h:1/0`` → ``redis://:***@h:1/0``; ``redis://user:pw@h`` →
    ``redis://user:***@h``; a ``password=`` query value is masked too; a URL without a password
    comes back unchanged. Never raises: something that does not parse as a URL gives a placeholder.
    """
    try:
        parts = urlsplit(url)
    except (ValueError, TypeError, AttributeError):
        return "<a Redis URL that does not parse>"
    masked = url
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, colon, _password = userinfo.partition(":")
        if colon:
            masked = masked.replace(f"//{netloc}", f"//{user}:***@{hostport}", 1)
    if parts.query:
        head, _, query = masked.partition("?")
        masked = head + "?" + _QUERY_PASSWORD.sub(r"\1***", query)
    return masked


def retries_for(retry_for_s: float) -> int:
    """How many retries the backoff (``BACKOFF_BASE_S`` doubling, capped at ``BACKOFF_CAP_S``)
    needs before its waits add up to ``retry_for_s`` seconds (at least 1)."""
    waited_s, retries = 0.0, 0
    backoff = ExponentialBackoff(cap=BACKOFF_CAP_S, base=BACKOFF_BASE_S)
    while waited_s < retry_for_s:
        retries += 1
        waited_s += backoff.compute(retries)
    return max(1, retries)


def is_auth_error(error: BaseException) -> bool:
    """True for a refused authentication (AUTH failed, NOAUTH, WRONGPASS): never worth a retry.

    redis-py raises these as ``AuthenticationError``, a ``ConnectionError`` subclass, so a
    retry on connection errors would otherwise repeat them until its budget is spent.
    """
    if isinstance(error, AuthenticationError):
        return True
    return isinstance(error, RedisError) and str(error).startswith(("NOAUTH", "WRONGPASS"))


class _SyncRetry(SyncRetry):
    """redis-py's Retry that gives up at once on a refused authentication (``is_auth_error``).

    redis-py uses the same Retry for commands, health-check PINGs and (here) pool hand-outs, so
    this one rule covers them all.
    """

    def call_with_retry(self, do: Any, fail: Any) -> Any:
        """``do()`` retried on connection errors; an authentication error is raised at once."""

        def fail_fast(error: Exception) -> None:
            if is_auth_error(error):
                raise error
            fail(error)

        return super().call_with_retry(do, fail_fast)


class _AsyncRetry(AsyncRetry):
    """The asyncio twin of ``_SyncRetry``."""

    async def call_with_retry(self, do: Any, fail: Any) -> Any:
        """``await do()`` retried on connection errors; an authentication error is raised at once."""

        async def fail_fast(error: Exception) -> None:
            if is_auth_error(error):
                raise error
            await fail(error)

        return await super().call_with_retry(do, fail_fast)


def client_options(retry_for_s: float = 30.0, *, sync: bool = False) -> dict[str, Any]:
    """The keyword arguments ``connect`` gives redis-py's ``from_url`` (retry, backoff, timeouts,
    health checks, bytes responses); for clients of other classes built on redis-py (ARQ's).

    The retry never repeats a refused authentication (``is_auth_error``): it fails at once.
    """
    backoff = ExponentialBackoff(cap=BACKOFF_CAP_S, base=BACKOFF_BASE_S)
    retries = retries_for(retry_for_s)
    retry = _SyncRetry(backoff, retries) if sync else _AsyncRetry(backoff, retries)
    return {
        "decode_responses": False,
        "retry": retry,
        # redis-py re-raises at once unless the error type is listed here too
        "retry_on_error": [ConnectionError, TimeoutError],
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
        "socket_connect_timeout": SOCKET_CONNECT_TIMEOUT_S,
        "socket_timeout": SOCKET_TIMEOUT_S,
        "socket_keepalive": True,
    }


def _bad_url(url: str, error: Exception) -> RedisUnavailable:
    return RedisUnavailable(
        f"redis_url {safe_url(url)!r} is not a Redis URL ({error}); {_URL_HELP} "
        "(--redis or SERVETUNE_REDIS_URL)"
    )


class _Outage:
    """Failures of one connection hand-out: a refused password ends it at once; the first
    failure is logged as a warning, and the recovery after it as info (never once per retry)."""

    def __init__(self, pool: redis.ConnectionPool | redis.asyncio.ConnectionPool) -> None:
        self.pool = pool
        self.since: float | None = None
        # a caller that reports outages itself (the worker's heartbeat thread) turns these down
        self.level = logging.WARNING if getattr(pool, "log_outages", True) else logging.DEBUG

    def failed(self, error: Exception) -> None:
        # redis-py's AuthenticationError is a ConnectionError the retry would repeat in vain
        if is_auth_error(error):
            raise error
        if self.since is None:
            self.since = time.monotonic()
            logger.log(
                self.level,
                "Redis at %s is unreachable (%s): retrying for up to ~%.0f s",
                _pool_url(self.pool),
                error,
                _retry_budget_s(self.pool),
            )

    def done(self) -> None:
        if self.since is not None:
            logger.log(
                min(self.level, logging.INFO),
                "Redis at %s is reachable again after %.1f s",
                _pool_url(self.pool),
                time.monotonic() - self.since,
            )


class _ReconnectingPool(redis.asyncio.ConnectionPool):
    """redis-py's asyncio pool, whose hand-out of a connection retries too.

    redis-py retries a command that fails on its connection, but (re)connects a pooled connection
    before that, outside the retry: a command issued while Redis is down would fail at once.
    Here that connect is retried with the clients' backoff as well.
    """

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        get = super().get_connection
        retry = self.connection_kwargs.get("retry")
        if retry is None:
            return await get(*args, **kwargs)
        outage = _Outage(self)

        async def fail(error: Exception) -> None:
            outage.failed(error)

        connection = await retry.call_with_retry(lambda: get(*args, **kwargs), fail)
        outage.done()
        return connection


class _ReconnectingSyncPool(redis.ConnectionPool):
    """The synchronous twin of ``_ReconnectingPool``."""

    log_outages = True
    """False: its outage lines are logged at DEBUG (the caller reports outages itself)."""

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        get = super().get_connection
        retry = self.connection_kwargs.get("retry")
        if retry is None:
            return get(*args, **kwargs)
        outage = _Outage(self)
        connection = retry.call_with_retry(lambda: get(*args, **kwargs), outage.failed)
        outage.done()
        return connection


def _pool_url(pool: redis.ConnectionPool | redis.asyncio.ConnectionPool) -> str:
    kw = pool.connection_kwargs
    auth = ""
    if kw.get("password"):
        auth = f"{kw.get('username') or ''}:***@"
    elif kw.get("username"):
        auth = f"{kw['username']}@"
    if kw.get("path"):
        return f"unix://{auth}{kw['path']}?db={kw.get('db', 0)}"
    scheme = "rediss" if "SSL" in pool.connection_class.__name__ else "redis"
    return (
        f"{scheme}://{auth}{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"
    )


def _retry_budget_s(pool: redis.ConnectionPool | redis.asyncio.ConnectionPool) -> float:
    retry = pool.connection_kwargs.get("retry")
    retries = getattr(retry, "_retries", 0)
    backoff = ExponentialBackoff(cap=BACKOFF_CAP_S, base=BACKOFF_BASE_S)
    return sum(backoff.compute(n) for n in range(1, retries + 1))


def connect(
    url: str,
    *,
    retry_for_s: float = 30.0,
    client_class: type[redis.asyncio.Redis] = redis.asyncio.Redis,
) -> redis.asyncio.Redis:
    """An asyncio Redis client on ``url`` (responses as bytes) that reconnects by itself.

    A command that fails on a lost connection or a timeout, or finds Redis down when it starts,
    is retried with exponential backoff (0.1 s doubling to 1 s) for about ``retry_for_s`` seconds
    before the error reaches the caller; idle connections are health-checked every
    ``HEALTH_CHECK_INTERVAL_S``. Nothing is sent until the first command. ``client_class`` may
    be a subclass of redis-py's asyncio client (ARQ's ``ArqRedis``). Close it with ``aclose()``.
    Raises RedisUnavailable when ``url`` is not a Redis URL.
    """
    try:
        pool = _ReconnectingPool.from_url(url, **client_options(retry_for_s, sync=False))
    except ValueError as e:
        raise _bad_url(url, e) from e
    client = client_class(connection_pool=pool)
    client.auto_close_connection_pool = True  # aclose() closes the pool, as from_url's would
    return client


def connect_sync(
    url: str,
    *,
    retry_for_s: float = 30.0,
    socket_timeout_s: float | None = None,
    log_outages: bool = True,
) -> redis.Redis:
    """The synchronous twin of ``connect`` (for threads such as the log handler's shipper).

    ``socket_timeout_s``: the longest wait for one connect or reply, s (default
    ``SOCKET_CONNECT_TIMEOUT_S`` / ``SOCKET_TIMEOUT_S``). ``log_outages=False`` logs the
    "unreachable" and "reachable again" lines at DEBUG, for a caller that reports outages itself.
    Raises RedisUnavailable when ``url`` is not a Redis URL.
    """
    options = client_options(retry_for_s, sync=True)
    if socket_timeout_s is not None:
        options["socket_timeout"] = socket_timeout_s
        options["socket_connect_timeout"] = min(SOCKET_CONNECT_TIMEOUT_S, socket_timeout_s)
    try:
        pool = _ReconnectingSyncPool.from_url(url, **options)
    except ValueError as e:
        raise _bad_url(url, e) from e
    pool.log_outages = log_outages
    client = redis.Redis(connection_pool=pool)
    client.auto_close_connection_pool = True
    return client


def client_url(r: redis.Redis | redis.asyncio.Redis) -> str:
    """The URL a client talks to, rebuilt from its connection settings, password masked."""
    return _pool_url(r.connection_pool)


def translate(error: RedisError, url: str, doing: str) -> RedisUnavailable:
    """The ``RedisUnavailable`` for a redis-py error raised while ``doing`` something.

    ``url`` must already be masked (``safe_url`` or ``client_url``). The message says what to
    check: the password (AUTH refused), the server and the path to it (connection refused or
    timed out, after the client's retries), or the error Redis answered.
    """
    text = str(error)
    if is_auth_error(error):
        return RedisUnavailable(
            f"Redis at {url} refused to authenticate while {doing} ({text}): put the password "
            "in the URL (redis://:PASSWORD@host:port/0) and check it matches redis-server's "
            "requirepass"
        )
    if isinstance(error, ConnectionError | TimeoutError):
        return RedisUnavailable(
            f"Redis at {url} is unreachable while {doing} ({type(error).__name__}: {text}), "
            "after retrying: is redis-server running there, and reachable from this host "
            "(address, port, firewall, SSH tunnel, TLS with rediss://)?"
        )
    return RedisUnavailable(f"Redis at {url} failed while {doing}: {type(error).__name__}: {text}")


@contextlib.contextmanager
def redis_errors(r: redis.Redis | redis.asyncio.Redis, doing: str) -> Iterator[None]:
    """Translate redis-py errors raised in the block into ``RedisUnavailable`` (``from`` them).

    Works around ``await`` calls too: ``with redis_errors(r, "reading events"): await r.get(k)``.
    """
    try:
        yield
    except RedisError as e:
        raise translate(e, client_url(r), doing) from e
