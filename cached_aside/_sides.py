"""What a call needs from its engine, per concurrency model: a SyncSide (client,
scripts, thread flights) or an AsyncSide per event loop (client, scripts, task
flights, background tasks); and the checks made on clients a user passes in.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from time import monotonic
from typing import Any

import redis
import redis.asyncio
from redis.exceptions import RedisClusterException, RedisError

from ._breaker import CircuitBreaker
from ._errors import ConfigurationError
from ._flights import TaskFlights, ThreadFlights
from ._outbox import Outbox
from ._scripts import ScriptName

logger = logging.getLogger("cached_aside")

# Without a socket timeout a waiter still wakes up this often to look again.
DEFAULT_BLOCK_LIMIT_MS = 1000
# What a failing Redis raises: RedisClusterException (no cluster node reachable) is
# not a RedisError.
REDIS_FAILURES: tuple[type[BaseException], ...] = (RedisError, RedisClusterException)
# redis-py 8.1's asyncio RedisCluster also raises AttributeError ("'NoneType' object
# has no attribute 'writelines'") when tasks use connections that a topology refresh
# during a failover has just closed (see redis/redis-py#3835): an outage, not a bug
# of the caller's.
ASYNC_CLUSTER_FAILURES = (*REDIS_FAILURES, AttributeError)
# After a background reload failed, hits of that key start no other for this long:
# a primary that keeps failing is not asked again on every hit.
REFRESH_RETRY_SECONDS = 1.0
_MAX_RESTING_KEYS = 10_000


class Background:
    """The background reloads (Spawn) of one side: at most one per key at a time,
    and none for REFRESH_RETRY_SECONDS after one failed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: set[str] = set()
        self._resting: dict[str, float] = {}

    def claim(self, key: str) -> bool:
        with self._lock:
            if key in self._running:
                return False
            until = self._resting.get(key)
            if until is not None:
                if monotonic() < until:
                    return False
                del self._resting[key]
            self._running.add(key)
            return True

    def busy(self) -> bool:
        """Whether a background reload is running."""
        return bool(self._running)

    def finish(self, key: str, ok: bool) -> None:
        with self._lock:
            self._running.discard(key)
            if not ok:
                if len(self._resting) >= _MAX_RESTING_KEYS:
                    self._resting.clear()
                self._resting[key] = monotonic() + REFRESH_RETRY_SECONDS


@dataclass(slots=True)
class SyncSide:
    """What a sync call needs: the client, its scripts, the thread flights."""

    client: Any
    scripts: Mapping[ScriptName, Any]
    flights: ThreadFlights
    block_limit_ms: int
    breaker: CircuitBreaker
    outbox: Outbox
    background: Background = field(default_factory=Background)
    failures: tuple[type[BaseException], ...] = REDIS_FAILURES
    route: Callable[[str], Any] | None = None  # a cluster's key -> node, for pipelines


@dataclass(slots=True)
class AsyncSide:
    """What an async call needs in one event loop."""

    client: Any
    scripts: Mapping[ScriptName, Any]
    flights: TaskFlights
    block_limit_ms: int
    breaker: CircuitBreaker
    outbox: Outbox
    background: Background = field(default_factory=Background)
    # Background work of this loop (refreshes, releases after a cancellation): held
    # here because a task nobody references can be collected mid-run.
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    failures: tuple[type[BaseException], ...] = REDIS_FAILURES
    route: Callable[[str], Any] | None = None
    # An asyncio RedisCluster sent many commands before its first initialize() can
    # route some to no node at all (redis-py 8.1): initialize it once, under a lock.
    ready: bool = True
    _initializing: asyncio.Lock | None = None
    closer: Any = None  # an async generator that closes the client with its loop

    async def prepare(self) -> None:
        if self._initializing is None:
            self._initializing = asyncio.Lock()
        async with self._initializing:
            if not self.ready:
                await self.client.initialize()
                self.ready = True


def connection_kwargs(client: Any, role: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(getattr(client, "get_connection_kwargs", dict)())
    if kwargs.get("decode_responses"):
        raise ConfigurationError(
            f"the {role} was created with decode_responses=True; cached_aside needs raw "
            "bytes (msgpack values are binary). Pass a client without decode_responses"
        )
    return kwargs


def warn_if_pool_raises(client: Any, role: str) -> None:
    """A pool that raises past max_connections turns a burst into fail-open loads."""
    pool = getattr(client, "connection_pool", None)
    blocking = (redis.BlockingConnectionPool, redis.asyncio.BlockingConnectionPool)
    if pool is None or isinstance(pool, blocking) or not hasattr(pool, "max_connections"):
        return
    logger.warning(
        "the %s's connection pool raises MaxConnectionsError past %s connections instead "
        "of waiting; in a burst, calls then fail open and load without single-flight. "
        "Give it a redis.BlockingConnectionPool (CacheEngine.from_url does)",
        role,
        pool.max_connections,
    )


def block_limit_ms(connection_kwargs: Mapping[str, Any]) -> int:
    """Longest BLPOP a waiter may issue: well inside the client's socket timeout."""
    timeout = connection_kwargs.get("socket_timeout")
    if not timeout:
        return DEFAULT_BLOCK_LIMIT_MS
    return max(1, min(DEFAULT_BLOCK_LIMIT_MS, int(timeout * 500)))
