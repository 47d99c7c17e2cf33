"""What a driver needs from its engine, per concurrency model: a SyncRuntime (client,
scripts, thread flights) or an AsyncRuntime per event loop (client, scripts, task
flights, background tasks), both with the engine's breaker and outbox; how a
command's failure is told to a flow; and the checks made on clients a user passes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from time import monotonic
from typing import Any, TypeVar

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from redis.exceptions import ConnectionError, RedisClusterException, RedisError, ResponseError

from ._breaker import CircuitBreaker, NodeBreakers
from ._compat import warn_once
from ._connections import HeldConnections, Pipeline
from ._effects import CommandFailed
from ._errors import ConfigurationError
from ._flights import TaskFlights, ThreadFlights
from ._node_connections import NodeConnections, restore_startup_nodes, startup_addresses
from ._node_pipelines import NodePipelines, node_pipelines_problem
from ._outbox import Outbox
from ._scripts import ScriptName

logger = logging.getLogger("cached_aside")

# Without a socket timeout a waiter still wakes up this often to look again.
DEFAULT_BLOCK_LIMIT_MS = 1000
# What a failing Redis raises: RedisClusterException (no cluster node reachable) is
# not a RedisError.
REDIS_FAILURES: tuple[type[BaseException], ...] = (RedisError, RedisClusterException)
# What building or initializing a cluster client raises when no node can be reached;
# OSError: a socket error redis-py let through unwrapped (a resolver's gaierror, say).
UNREACHABLE: tuple[type[BaseException], ...] = (*REDIS_FAILURES, OSError)
# redis-py 8.1's asyncio RedisCluster also raises AttributeError ("'NoneType' object
# has no attribute 'writelines'") when tasks use connections that a topology refresh
# during a failover has just closed (see redis/redis-py#3835): an outage, not a bug
# of the caller's.
ASYNC_CLUSTER_FAILURES = (*REDIS_FAILURES, AttributeError)
# After a background reload failed, hits of that key start no other for this long:
# a primary that keeps failing is not asked again on every hit.
REFRESH_RETRY_SECONDS = 1.0
_MAX_RESTING_KEYS = 10_000
R = TypeVar("R", "SyncRuntime", "AsyncRuntime")


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


@dataclass(slots=True, kw_only=True)
class Runtime:
    """What both drivers need: a client, its scripts, and the engine's breaker and
    outbox. Also how a command ends, so that both drivers (and pipelines) count and
    report failures the same way."""

    client: Any
    scripts: Mapping[ScriptName, Any]
    block_limit_ms: int
    breaker: CircuitBreaker
    outbox: Outbox
    background: Background = field(default_factory=Background)
    failures: tuple[type[BaseException], ...] = REDIS_FAILURES
    route: Callable[[str], Any] | None = None  # a cluster's key -> node, for pipelines
    seeds: tuple[tuple[str, int], ...] = ()  # a cluster client's startup nodes, at first

    def refusal(self, count: int = 1, key: str | None = None) -> list[CommandFailed] | None:
        """While the breaker (of `key`'s node, on a cluster) is open: a refusal for
        each command, none of them sent."""
        breaker = self.breaker_of(key)
        if breaker.open_until and not breaker.allow():
            return [CommandFailed(breaker.refusal(), wrong_type=False, sent=False)] * count
        return None

    def failure(self, exc: BaseException, key: str | None = None) -> CommandFailed:
        """A redis-py error as a flow sees it, counted on the breaker (of `key`'s
        node) unless it is bad data (a key of another type) rather than an outage."""
        failure = failed(exc)
        if not failure.wrong_type:
            self.breaker_of(key).failure()
            if self.route is not None:  # none left, or none reachable (redis-py < 8)
                restore_startup_nodes(self.client, self.seeds, exc)
        return failure

    def answered(self, key: str | None = None) -> None:
        """Redis answered: a breaker counting failures starts over."""
        breaker = self.breaker_of(key)
        if breaker.failures:
            breaker.success()
        self.reached()

    def reached(self) -> None:
        """A cluster answered: what its unrouted breaker counted is over."""
        if type(self.breaker) is NodeBreakers:
            self.breaker.reached()

    def breaker_of(self, key: str | None) -> CircuitBreaker:
        """The breaker a command on `key` goes through: its node's on a cluster."""
        breaker = self.breaker
        if key is None or self.route is None or type(breaker) is not NodeBreakers:
            return breaker
        try:
            node = self.route(key)
        except self.failures:  # no node known for the slot: never reached, mid-failover
            return breaker.unrouted()
        return breaker if node is None else breaker.node(node.name)


@dataclass(slots=True, kw_only=True)
class SyncRuntime(Runtime):
    """What a sync call needs: the above, the thread flights, and the connections
    threads hold for commands that answer at once (None: through the client)."""

    flights: ThreadFlights = field(default_factory=ThreadFlights)
    held: HeldConnections | NodeConnections | None = None


@dataclass(slots=True, kw_only=True)
class AsyncRuntime(Runtime):
    """What an async call needs in one event loop."""

    flights: TaskFlights = field(default_factory=TaskFlights)
    # The loop's shared connection for commands that answer at once (None: through
    # the client).
    pipeline: Pipeline | NodePipelines | None = None
    # Background work of this loop (refreshes, releases after a cancellation): held
    # here because a task nobody references can be collected mid-run.
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    # An asyncio RedisCluster sent many commands before its first initialize() can
    # route some to no node at all (redis-py 8.1): initialize it once, under a lock.
    ready: bool = True
    closer: Any = None  # an async generator that closes the client with its loop
    _initializing: asyncio.Lock | None = None

    async def prepare(self) -> CommandFailed | None:
        """Initialize the cluster client once; its failure when the cluster cannot be
        reached (counted on the unrouted breaker, which also spaces the attempts)."""
        if self._initializing is None:
            self._initializing = asyncio.Lock()
        async with self._initializing:
            if self.ready:
                return None
            gate = unrouted(self.breaker)
            if gate.open_until and not gate.allow():
                return CommandFailed(gate.refusal(), wrong_type=False, sent=False)
            try:
                await self.client.initialize()
            except (*self.failures, *UNREACHABLE) as exc:
                gate.failure()
                return failed(exc)
            except BaseException:
                gate.abandon()
                raise
            self.ready = True
            if gate.failures:
                gate.success()
            if type(self.breaker) is NodeBreakers:
                self.breaker.reached()
            return None

    def keep(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run `work` as a task of this loop that aclose() and asettle() wait for."""
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)  # a task nobody references can be collected mid-run
        task.add_done_callback(self.tasks.discard)
        return task


def unrouted(breaker: CircuitBreaker) -> CircuitBreaker:
    """The breaker that counts a cluster's failures before any node is known."""
    return breaker.unrouted() if type(breaker) is NodeBreakers else breaker


class Unreached:
    """Stands for a sync cluster client whose cluster could not be reached when it was
    built: every command fails as Redis trouble (the call is served by its loader),
    and the engine builds the client again once the breaker lets it."""

    def __init__(self, failure: BaseException) -> None:
        self.failure = failure

    def _down(self) -> ConnectionError:
        return ConnectionError(f"Redis Cluster not reached: {self.failure}")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # copy, pickle, hasattr of protocols: not a command
            raise AttributeError(name)
        raise self._down()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise self._down()

    def close(self) -> None:
        """Nothing to close."""


def failed(exc: BaseException) -> CommandFailed:
    """Wrap a redis-py error for a flow, telling bad data apart from an outage."""
    wrong_type = isinstance(exc, ResponseError) and str(exc).startswith("WRONGTYPE")
    return CommandFailed(exc, wrong_type=wrong_type)


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


def sync_runtime(client: Any, breaker: CircuitBreaker, outbox: Outbox) -> SyncRuntime:
    """The sync runtime around `client` (checked), with the pool's held connections
    (on a cluster, a cluster's router and held connections per node)."""
    runtime = _runtime(SyncRuntime, client, "client", breaker, outbox)
    if isinstance(client, redis.cluster.RedisCluster):
        runtime.route = client.get_node_from_key
        runtime.seeds = startup_addresses(client)
        runtime.held = NodeConnections(client)
    elif hasattr(client, "connection_pool"):
        runtime.held = HeldConnections(client.connection_pool)
    return runtime


def async_runtime(client: Any, breaker: CircuitBreaker, outbox: Outbox) -> AsyncRuntime:
    """The async runtime around `client` (checked), with the loop's shared connection
    (on a cluster, a cluster's router and a shared connection per node)."""
    runtime = _runtime(AsyncRuntime, client, "async_client", breaker, outbox)
    if isinstance(client, redis.asyncio.cluster.RedisCluster):
        runtime.ready = False
        runtime.failures = ASYNC_CLUSTER_FAILURES
        runtime.route = client.get_node_from_key
        runtime.seeds = startup_addresses(client)
        problem = node_pipelines_problem()
        runtime.pipeline = NodePipelines(client, lean=problem is None)
        if problem is not None:
            warn_once(problem, "the lean wire is off for async cluster calls")
    elif hasattr(client, "connection_pool"):
        runtime.pipeline = Pipeline(client.connection_pool)
    return runtime


def _runtime(kind: type[R], client: Any, role: str, breaker: CircuitBreaker, outbox: Outbox) -> R:
    """A runtime around `client`, after checking it suits the library."""
    kwargs = connection_kwargs(client, role)
    warn_if_pool_raises(client, role)
    return kind(
        client=client,
        scripts={name: client.register_script(name.value) for name in ScriptName},
        block_limit_ms=block_limit_ms(kwargs),
        breaker=breaker,
        outbox=outbox,
    )
