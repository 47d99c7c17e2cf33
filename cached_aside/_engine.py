"""CacheEngine: the Redis clients, key prefix, in-process flights, near-cache
listener and stats shared by every decorated function.

Clients are created lazily. An engine built from a URL serves sync and async
loaders alike, with one redis.asyncio client per event loop (an asyncio client
cannot cross loops).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from time import monotonic
from types import TracebackType
from typing import Any, TypeVar

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.retry
import redis.cluster
from redis.backoff import NoBackoff
from redis.retry import Retry

from ._batches import invalidate_pattern, invalidate_tags
from ._breaker import DEFAULT_COOLDOWN_SECONDS, DEFAULT_FAILURES, CircuitBreaker, NodeBreakers
from ._cluster_listener import ClusterListener
from ._codecs import Codec
from ._connections import HeldConnections, Pipeline
from ._drivers import arun, no_seal, run
from ._effects import Flow
from ._errors import ConfigurationError
from ._flusher import Flusher
from ._keys import KeyTemplate, glob_escape, split_entry_key, validate_prefix
from ._listener import InvalidationListener, connection_factory
from ._loads import NO_LOADS
from ._near import NearBudget, NearCache, NearStore
from ._outbox import Outbox, PendingPattern
from ._results import BulkOutcome
from ._runtime import (
    ASYNC_CLUSTER_FAILURES,
    DEFAULT_BLOCK_LIMIT_MS,
    UNREACHABLE,
    AsyncRuntime,
    Background,
    SyncRuntime,
    Unreached,
    block_limit_ms,
    connection_kwargs,
    unrouted,
    warn_if_pool_raises,
)
from ._scripts import ScriptName
from ._sentinel import SentinelClients, is_sentinel_url
from ._stats import Stats, StatsSnapshot
from ._urls import check_keywords, check_url
from ._validate import instance, seconds, whole

logger = logging.getLogger("cached_aside")
R = TypeVar("R", SyncRuntime, AsyncRuntime)
# A tagged function as the engine knows it: its tag templates, the pattern of every
# key it owns, its lock ttl, its counters.
_Tagged = tuple[tuple[KeyTemplate, ...], PendingPattern, int, Stats]

CLUSTER_SCHEME = "redis+cluster://"
DEFAULT_PREFIX = "cache"
# A hung Redis costs a caller this once (a timeout is not retried), and only until
# the breaker opens; a healthy local or same-zone Redis answers in well under 1 ms.
DEFAULT_SOCKET_TIMEOUT = 0.25
DEFAULT_CONNECT_TIMEOUT = 0.25
DEFAULT_MAX_CONNECTIONS = 64
# What the clients' one immediate retry is for: a connection the server closed.
RETRIED: tuple[type[Exception], ...] = (redis.exceptions.ConnectionError,)
DEFAULT_POOL_TIMEOUT = 5.0
# How long a near cache's first use waits for the listener's handshake.
NEAR_HANDSHAKE_SECONDS = 2.0
SETTLE_POLL_SECONDS = 0.005
# How long close() and aclose() keep trying to deliver what the outbox holds.
CLOSE_FLUSH_SECONDS = 1.0


class CacheEngine:
    """Redis clients, a key prefix and shared state for many decorated functions.

    Args:
        client: a `redis.Redis` for sync loaders (raw bytes, no decode_responses).
        async_client: a `redis.asyncio.Redis` for async loaders.
        prefix: the first part of every key, e.g. "cache" gives `cache:{product:p-001}`.
        breaker_failures: Redis failures in a row that open the circuit breaker
            (default 3): calls then skip Redis for `breaker_cooldown`.
        breaker_cooldown: seconds the breaker stays open before one call probes
            Redis again (default 0.5).
        near: a NearCache for every function on this engine decorated without near=.

    Either client may be omitted; calling a loader of the missing kind raises
    ConfigurationError. Use `CacheEngine.from_url` to get both, created lazily.

    Attributes:
        prefix: the key prefix given.
        near: the engine-wide NearCache, or None.
        breaker: the circuit breaker shared by the engine's clients; its `state`
            is "closed", "open" or "half-open", and `opened` counts openings. On a
            Redis Cluster it holds one breaker per node (`breaker.nodes`): a dead
            master costs only its own slots, and `state` is "open" while any is.

    Raises:
        ConfigurationError: a bad prefix or option, or a client made with
            decode_responses=True.
    """

    def __init__(
        self,
        client: Any = None,
        async_client: Any = None,
        *,
        prefix: str = DEFAULT_PREFIX,
        breaker_failures: int = DEFAULT_FAILURES,
        breaker_cooldown: float = DEFAULT_COOLDOWN_SECONDS,
        near: NearCache | None = None,
    ) -> None:
        self.prefix = validate_prefix(prefix)
        instance("near", near, NearCache, "a NearCache or None")
        # The near cache of functions decorated without near= (near=False opts out),
        # and the one byte budget all of them share.
        self.near = near
        self._near_budget = None if near is None else NearBudget(near.max_bytes)
        whole("breaker_failures", breaker_failures)
        seconds("breaker_cooldown", breaker_cooldown)
        # One breaker per engine (its sync and async clients talk to the same Redis),
        # and on a Redis Cluster one per node within it: a dead master costs only its
        # own slots.
        clusters = (redis.cluster.RedisCluster, redis.asyncio.cluster.RedisCluster)
        on_cluster = isinstance(client, clusters) or isinstance(async_client, clusters)
        kind = NodeBreakers if on_cluster else CircuitBreaker
        self.breaker = kind(breaker_failures, float(breaker_cooldown))
        self.key_head = f"{prefix}:{{"  # value keys are key_head + rendered + "}"
        self._lock = threading.Lock()
        # Functions meet the engine under this one: their first calls may race.
        self._meeting = threading.RLock()
        self._make_client: Callable[[], Any] | None = None
        self._make_async_client: Callable[[], Any] | None = None
        self._owns_clients = False
        self._cluster = False  # made from a redis+cluster:// URL
        self._sync: SyncRuntime | None = None
        self._unreached: SyncRuntime | None = None  # while a cluster cannot be reached
        self._given_async: AsyncRuntime | None = None
        # Dropped by the side's closer when its loop shuts down (asyncio.run does).
        self._async_by_loop: dict[asyncio.AbstractEventLoop, AsyncRuntime] = {}
        self._last_async: tuple[object, AsyncRuntime | None] = (None, None)
        self._stats: list[Stats] = []
        # Functions with tags=, by their stats (one per decorated function: two with one
        # qualified name stay two): their tag templates, every key they own, their
        # lock ttl and their counters (a pending tag blocks their keys; its waiters'
        # wake-ups).
        self._tagged: dict[int, _Tagged] = {}
        self._listener: InvalidationListener | ClusterListener | None = None
        self.outbox = Outbox()
        self.outbox.tag_covers = self._tag_covers
        _engines.add(self)
        if client is not None:
            self._sync = self._make_sync_side(client)
        if async_client is not None:
            self._given_async = self._make_async_side(async_client)
        self._flusher = Flusher(self.outbox, self.breaker, None, lambda: self._given_async)
        if client is not None:
            self._flusher.sync_runtime = self._sync_side

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        socket_timeout: float = DEFAULT_SOCKET_TIMEOUT,
        socket_connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        pool_timeout: float = DEFAULT_POOL_TIMEOUT,
        breaker_failures: int = DEFAULT_FAILURES,
        breaker_cooldown: float = DEFAULT_COOLDOWN_SECONDS,
        near: NearCache | None = None,
        **client_options: Any,
    ) -> CacheEngine:
        """An engine whose sync and async clients are made from `url` on first use.

        Args:
            url: `redis://`, `rediss://` (TLS), `unix://`, `redis+cluster://` for
                a Redis Cluster (one node's address; the others are discovered), or
                `redis+sentinel://[:password@]host:26379,host2:26379/<service>[/<db>]`
                for the master of a Sentinel service (`rediss+sentinel://`: TLS).
            prefix: the first part of every key (default "cache").
            socket_timeout: seconds a command may take (default 0.25): a hung Redis
                costs a caller this once (a timeout is not retried), until the breaker
                opens.
            socket_connect_timeout: seconds to connect (default 0.25).
            max_connections: connections per pool (default 64; one pool for sync
                calls, one per event loop for async calls).
            pool_timeout: seconds a call waits for a free connection (default 5):
                pools block instead of failing, so 500 concurrent tasks queue.
            breaker_failures: as for CacheEngine (default 3).
            breaker_cooldown: as for CacheEngine (default 0.5 s).
            near: as for CacheEngine.
            **client_options: passed to redis-py's connection pool, e.g.
                `username`, `password`, `ssl_ca_certs`, `client_name`; with Sentinel,
                `sentinel_kwargs` for the connections to the sentinels.

        Raises:
            ConfigurationError: a malformed URL, a non-positive timeout or size, or
                decode_responses=True.
        """
        if not isinstance(url, str) or "://" not in url:
            raise ConfigurationError(f"url must look like redis://host:6379/0, got {url!r}")
        seconds("socket_timeout", socket_timeout)
        seconds("socket_connect_timeout", socket_connect_timeout)
        seconds("pool_timeout", pool_timeout)
        whole("max_connections", max_connections)
        if client_options.get("decode_responses"):
            raise ConfigurationError("decode_responses must stay off: cached_aside reads raw bytes")
        on_cluster = url.lower().startswith(CLUSTER_SCHEME)
        if not is_sentinel_url(url):
            check_url(url)  # here, not in every call: redis-py reads the URL on connect
            check_keywords(client_options, on_cluster)
        options: dict[str, Any] = {
            "max_connections": max_connections,
            "timeout": pool_timeout,
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": socket_connect_timeout,
            **client_options,
        }
        # One immediate retry heals a pooled connection the server closed (a restart);
        # redis-py's default backs off for seconds, which a cache must not do. A
        # timeout is not retried: a hung server would cost the caller a second one.
        # The asyncio client runs only its own Retry class.
        sync_options = {"retry": Retry(NoBackoff(), 1, RETRIED), **options}
        async_options = {"retry": redis.asyncio.retry.Retry(NoBackoff(), 1, RETRIED), **options}
        # Checked before the engine exists: a bad Sentinel URL fails here, not on use.
        sentinel = (
            SentinelClients(url, sync_options, async_options) if is_sentinel_url(url) else None
        )
        if sentinel is not None:
            check_keywords(client_options, False, extra=("sentinel_kwargs",))
        engine = cls(
            prefix=prefix,
            breaker_failures=breaker_failures,
            breaker_cooldown=breaker_cooldown,
            near=near,
        )
        if sentinel is not None:
            engine._owns_clients = True
            engine._flusher.sync_runtime = engine._sync_side
            engine._make_client, engine._make_async_client = sentinel.makers()
            return engine
        if on_cluster:
            # One node's address is enough: the client discovers the others.
            node_url = "redis" + url[len(CLUSTER_SCHEME) - len("://") :]
            timeouts = {
                "socket_timeout": socket_timeout,
                "socket_connect_timeout": socket_connect_timeout,
                **client_options,
            }
            engine._owns_clients = engine._cluster = True
            engine.breaker = engine._flusher.breaker = NodeBreakers(
                breaker_failures, float(breaker_cooldown)
            )
            engine._flusher.sync_runtime = engine._sync_side
            # redis-py's cluster default retries a timed-out command for about 7 s
            # (backoff, and a topology refresh that asks the hung node too): a cache
            # must fail open long before; one immediate retry, as for one Redis.
            engine._make_client = lambda: redis.cluster.RedisCluster.from_url(
                node_url, **{"retry": Retry(NoBackoff(), 1, RETRIED), **timeouts}
            )
            engine._make_async_client = lambda: redis.asyncio.cluster.RedisCluster.from_url(
                node_url,
                **{"retry": redis.asyncio.retry.Retry(NoBackoff(), 1, RETRIED), **timeouts},
            )
            return engine
        engine._owns_clients = True
        engine._flusher.sync_runtime = engine._sync_side
        engine._make_client = lambda: redis.Redis.from_pool(
            redis.BlockingConnectionPool.from_url(url, **sync_options)
        )
        engine._make_async_client = lambda: redis.asyncio.Redis.from_pool(
            redis.asyncio.BlockingConnectionPool.from_url(url, **async_options)
        )
        return engine

    # -- what the wrappers use -------------------------------------------------

    def client(self) -> Any:
        """The engine's sync Redis client (made on first use by an engine built from a
        URL): for your own commands on the same server, with the same settings. While
        a Redis Cluster cannot be reached, a stand-in whose commands raise
        redis.ConnectionError (the real client is made once the cluster answers).

        Raises:
            ConfigurationError: the engine was given no sync client and has no URL.
        """
        return self._sync_side().client

    def async_client(self) -> Any:
        """This event loop's asyncio Redis client (one per loop; call it inside one).

        Raises:
            ConfigurationError: the engine was given no async client and has no URL.
        """
        return self._async_side().client

    def check(self, *, tags: bool = True, near: bool | None = None) -> None:
        """Check now, loudly, that Redis answers and lets this engine do its work.

        Calls otherwise fail open: a bad URL, a server down at start-up or a missing
        ACL permission shows only as errors counted while the loader serves. This
        tries, on scratch keys under the prefix, every command the features send and
        every command their scripts call (with the sync client), and raises if any
        is refused. For a start-up probe: `configure(..., check=True)` runs it.

        Args:
            tags: check what functions with `tags=` need too (today nothing
                beyond every function's commands: a tag is a version key).
            near: check the near cache's listener (CLIENT TRACKING, the invalidation
                channel); default: when the engine has an engine-wide near cache.

        Raises:
            ConfigurationError: the server cannot be reached or logged in to, or the
                user may not run a command a feature needs (each one named).
        """
        from ._check import check  # the check's module is needed only here

        near = self.near is not None if near is None else near
        check(
            self.client(),
            self.prefix,
            tags=tags,
            near=near,
            listener_connection=self._listener_connection() if near else None,
        )

    def _sync_side(self) -> SyncRuntime:
        side = self._sync
        if side is not None:
            return side
        if self._make_client is None:
            raise ConfigurationError(
                "this CacheEngine has no sync client; pass client=redis.Redis(...) or use "
                "CacheEngine.from_url(...) to call plain (non-async) functions"
            )
        unreached = self._unreached
        if unreached is not None and unreached.breaker.time_left():
            return unreached  # the breaker spaces the attempts to reach the cluster
        with self._lock:
            if self._sync is None:
                try:
                    client = self._make_client()
                except UNREACHABLE as exc:
                    # A cluster client asks the cluster for its topology when it is
                    # built: fail open until it can, trying again as the breaker lets.
                    return self._unreached_side(exc)
                self._sync = self._make_sync_side(client)
                if self._unreached is not None:  # the cluster answered at last
                    gate, self._unreached = self._unreached.breaker, None
                    if gate.failures:
                        gate.success()
                    if isinstance(self.breaker, NodeBreakers):
                        self.breaker.reached()
            return self._sync

    def _unreached_side(self, failure: BaseException) -> SyncRuntime:
        """The side sync calls use while the cluster cannot be reached: every command
        fails as Redis trouble, counted on the breaker; calls are served by loaders."""
        side = self._unreached
        if side is None:
            stub = Unreached(failure)
            side = self._unreached = SyncRuntime(
                client=stub,
                scripts=dict.fromkeys(ScriptName, stub),
                block_limit_ms=DEFAULT_BLOCK_LIMIT_MS,
                breaker=unrouted(self.breaker),
                outbox=self.outbox,
            )
        side.client.failure = failure
        return side

    def _async_side(self) -> AsyncRuntime:
        if self._given_async is not None:
            return self._given_async
        loop = asyncio.get_running_loop()
        last_loop, side = self._last_async
        if last_loop is loop and side is not None:
            return side
        side = self._async_by_loop.get(loop)
        if side is None:
            if self._make_async_client is None:
                raise ConfigurationError(
                    "this CacheEngine has no async client; pass async_client="
                    "redis.asyncio.Redis(...) or use CacheEngine.from_url(...) to call "
                    "async functions"
                )
            self._sweep_closed_loops()
            side = self._async_by_loop[loop] = self._make_async_side(self._make_async_client())
            _close_with_loop(self, loop, side)
        self._last_async = (loop, side)
        return side

    def _sweep_closed_loops(self) -> None:
        """Drop the sides of loops closed without shutting down their async generators
        (a hand-made loop.close()): nothing can run on them any more."""
        for loop in [loop for loop in self._async_by_loop if loop.is_closed()]:
            del self._async_by_loop[loop]

    def _forget_loop(self, loop: asyncio.AbstractEventLoop, side: AsyncRuntime) -> None:
        if self._async_by_loop.get(loop) is side:
            del self._async_by_loop[loop]
        if self._last_async[1] is side:
            self._last_async = (None, None)

    def _register_stats(self, stats: Stats) -> None:
        """Include a function's counters in `engine.stats()`, once."""
        if all(known is not stats for known in self._stats):
            self._stats.append(stats)

    # -- for users -------------------------------------------------------------

    def stats(self) -> StatsSnapshot:
        """Counters summed over every function using this engine."""
        total = StatsSnapshot()
        for stats in list(self._stats):
            total += stats.snapshot()
        return total

    def function_stats(self) -> dict[str, StatsSnapshot]:
        """Counters per function, by qualified name."""
        return {stats.name: stats.snapshot() for stats in list(self._stats)}

    def _tracked(self) -> list[Stats]:
        """The live counters of every function that has used this engine."""
        return list(self._stats)

    def reset_stats(self) -> None:
        """Set every function's counters on this engine back to zero."""
        for stats in list(self._stats):
            stats.reset()

    def _near_store(self, config: NearCache, codec: Codec, name: str) -> NearStore:
        """A near cache for one function, attached to this engine's invalidation
        listener (started on first use).

        Raises ConfigurationError when the server cannot track keys and the config
        does not accept TTL-only staleness.
        """
        store = NearStore(config, codec.freeze, self._near_budget if config is self.near else None)
        make = self._listener_maker()  # outside the lock: it may make the client
        with self._lock:
            if self._listener is None:
                self._listener = make()
            listener = self._listener
        listener.attach(store)
        state = listener.wait_settled(NEAR_HANDSHAKE_SECONDS)
        if state == "unsupported" and not config.allow_untracked:
            listener.detach(store)
            raise ConfigurationError(
                f"{name}: near cache refused: this Redis cannot track keys for it "
                f"({listener.reason}), so another process's change would go unseen "
                "until the entry expires. Use a Redis 6+ server that allows CLIENT "
                "TRACKING, or accept that with NearCache(ttl=..., allow_untracked=True)"
            )
        return store

    def near_state(self) -> str:
        """The invalidation listener's state: "tracking", "down", "unsupported",
        "starting", or "off" when no function uses a near cache."""
        listener = self._listener
        return "off" if listener is None else listener.state

    def _listener_maker(self) -> Callable[[], InvalidationListener | ClusterListener]:
        """Makes the engine's invalidation listener: of the server the engine's clients
        use, or of every master of its cluster."""
        given = [side.client for side in (self._sync, self._given_async) if side is not None]
        if self._cluster or any(isinstance(client, redis.cluster.RedisCluster) for client in given):
            # A sync cluster client: the topology, node settings. The engine's own is
            # read afresh each time: a cluster down at first use is reached later.
            client = _CurrentSyncClient(self) if self._cluster else self.client()
            return lambda: ClusterListener(client, self.key_head)
        if any(isinstance(client, redis.asyncio.cluster.RedisCluster) for client in given):
            raise ConfigurationError(
                "a near cache on Redis Cluster reads the cluster's topology with a sync "
                "client: build the engine with CacheEngine.from_url('redis+cluster://...') "
                "or give it a redis.cluster.RedisCluster too"
            )
        connect = self._listener_connection()
        return lambda: InvalidationListener(connect, self.key_head)

    def _listener_connection(self) -> Callable[[], Any]:
        """Makes the listener's connection, to the server the engine's clients use."""
        client = self._sync.client if self._sync is not None else None
        if client is None and self._make_client is not None:
            client = self.client()
        if client is None and self._given_async is not None:
            client = self._given_async.client
        return connection_factory(client)

    def invalidate_prefix(self, text: str = "") -> BulkOutcome:
        """Delete every entry whose key, inside the braces, starts with `text` ("" for
        all of this engine's entries), on every node.

        SCAN + UNLINK: Redis is never blocked. If Redis fails part way, the rest waits
        in the outbox (`pending=1`) and is retried until it lands.
        """
        runtime = self._sync_side()
        try:
            return run(invalidate_pattern(self._matching(text)), runtime, NO_LOADS, no_seal)[0]
        finally:
            runtime.flights.forget_all()
            self._clear_near()

    async def ainvalidate_prefix(self, text: str = "") -> BulkOutcome:
        """invalidate_prefix() for async code, on this event loop's client."""
        runtime = self._async_side()
        flow = invalidate_pattern(self._matching(text))
        try:
            return (await arun(flow, runtime, NO_LOADS, no_seal))[0]
        finally:
            runtime.flights.forget_all()
            self._clear_near()

    def invalidate_tags(self, *tags: str) -> BulkOutcome:
        """Delete every entry carrying any of these tags (as rendered: "shop:7" for
        tags=("shop:<shop_id>",) and shop_id=7 or "7"), on every node, and revoke
        their loads in flight, as invalidate() would each.

        Costs one DEL per tag, pipelined (per node on a Cluster): each tag's version
        is retired, and every entry stamped with it reads as a miss from then on; no
        scan. `deleted` counts the tags that had a version. What Redis did not take
        waits in the outbox (`pending`), and is retried until it lands.
        """
        texts = _tag_texts(tags)
        runtime = self._sync_side()
        try:
            return run(self._tags_flow(texts), runtime, NO_LOADS, no_seal)[0]
        finally:
            self._forget(runtime, [], True)

    async def ainvalidate_tags(self, *tags: str) -> BulkOutcome:
        """invalidate_tags() for async code, on this event loop's client."""
        texts = _tag_texts(tags)
        runtime = self._async_side()
        try:
            return (await arun(self._tags_flow(texts), runtime, NO_LOADS, no_seal))[0]
        finally:
            self._forget(runtime, [], True)

    def _tags_flow(self, texts: list[str]) -> Flow[BulkOutcome]:
        tagged = list(self._tagged.values())
        wake_ttl_ms = max((lock_ttl_ms for _, _, lock_ttl_ms, _ in tagged), default=10_000)
        return invalidate_tags(self.key_head, texts, wake_ttl_ms)

    def _carrying(self, text: str) -> list[_Tagged]:
        """The functions met so far that can carry the tag `text`."""
        tagged = list(self._tagged.values())  # one step: registrations may race
        return [each for each in tagged if any(t.owns(text) for t in each[0])]

    def _tag_covers(self, text: str) -> tuple[PendingPattern, ...]:
        """What a pending tag blocks: every key of each function that can carry it."""
        return tuple(whole for _, whole, _, _ in self._carrying(text))

    def _forget(self, runtime: Any, keys: list[str], everything: bool) -> None:
        """Read-your-writes after a bulk invalidation: this process's readers start
        afresh, and its near tier drops the keys (Redis's reports come later)."""
        if everything:
            runtime.flights.forget_all()
            self._clear_near()
            return
        for key in keys:
            runtime.flights.forget(key)
        if self._listener is not None and keys:
            self._listener.drop(keys)

    def _register_tagged(
        self,
        name: str,
        tags: tuple[KeyTemplate, ...],
        whole: PendingPattern,
        lock_ttl_ms: int,
        stats: Stats,
    ) -> None:
        """A function with tags= met the engine: pending tags it can carry, queued
        before, now block its keys too (and every tag queued from now on does)."""
        with self._lock:
            self._tagged[id(stats)] = (tags, whole, lock_ttl_ms, stats)
        self.outbox.cover_tags(lambda text: any(t.owns(text) for t in tags), whole)

    def settle(self, timeout: float = 5.0) -> bool:
        """Wait until the engine's background work is done: refresh_ahead reloads in
        threads and the outbox's deliveries. Returns False if `timeout` seconds were
        not enough (Redis down, say). For tests and orderly shutdowns."""
        deadline = monotonic() + timeout
        while self._busy():
            if monotonic() >= deadline:
                return False
            time.sleep(SETTLE_POLL_SECONDS)
        return True

    async def asettle(self, timeout: float = 5.0) -> bool:
        """settle() for async code: also waits for this loop's background tasks
        (reloads, and releases after a cancellation)."""
        deadline = monotonic() + timeout
        loop = asyncio.get_running_loop()
        while True:
            side = self._given_async or self._async_by_loop.get(loop)
            tasks = [task for task in side.tasks if not task.done()] if side else []
            if tasks:
                await asyncio.wait(tasks, timeout=max(0.0, deadline - monotonic()))
            if not self._busy() and not any(not task.done() for task in tasks):
                return True
            if monotonic() >= deadline:
                return False
            await asyncio.sleep(SETTLE_POLL_SECONDS)

    def _busy(self) -> bool:
        sides = [self._sync, self._given_async, *self._async_by_loop.values()]
        busy = any(side.background.busy() for side in sides if side is not None)
        return busy or self.outbox.pending_any()

    def pending_invalidations(self) -> list[str]:
        """Invalidations Redis has not taken yet (keys, and patterns of bulk ones),
        which the outbox keeps retrying; empty when all is well."""
        return self.outbox.pending()

    def _clear_near(self) -> None:
        """Read-your-writes: Redis's reports of the deletions arrive a moment later."""
        if self._listener is not None:
            self._listener.clear_all()

    def _matching(self, text: str) -> PendingPattern:
        if not isinstance(text, str) or any(c in text for c in "{}"):
            raise ConfigurationError(
                f"invalidate_prefix takes the start of a rendered key such as 'product:', "
                f"without the engine prefix or braces; got {text!r}"
            )
        head = self.key_head

        def belongs(key: str) -> bool:
            parts = split_entry_key(key, head)
            return parts is not None and parts[0].startswith(text)

        start = head + text
        return PendingPattern(start, glob_escape(start) + "*", belongs, f"{start}*")

    def close(self, timeout: float = CLOSE_FLUSH_SECONDS) -> None:
        """Try once more, for up to `timeout` seconds, to deliver the invalidations the
        outbox holds (logging those Redis never took), stop the invalidation listener,
        and close the sync client's connections if this engine created the client."""
        self._flusher.stopping.set()
        self.outbox.wake.set()
        try:
            self._flusher.flush(timeout)
        finally:
            self._flusher.stopping.clear()
            self.outbox.kick()  # anything left is still retried while the process runs
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.stop()
        if self._owns_clients and self._sync is not None:
            self._sync.client.close()
            self._sync = None

    async def aclose(self, timeout: float = CLOSE_FLUSH_SECONDS) -> None:
        """Let this loop's background work finish (for up to `timeout` seconds), try
        to deliver what the outbox holds (as close()), then close the connections the
        engine made (clients you passed in stay yours to close)."""
        loop = asyncio.get_running_loop()
        self._flusher.stopping.set()  # an async flusher hands over to the last attempt
        sides = [self._given_async, self._async_by_loop.get(loop)]
        pending = [
            task
            for side in sides
            if side is not None
            for task in side.tasks
            if task.get_loop() is loop and task is not self._flusher.task
        ]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        side = self._given_async or self._async_by_loop.get(loop)
        if side is not None and self._flusher.sync_runtime is None:
            await self._flusher.aflush(side, timeout)
        self._flusher.stopping.clear()
        self.close(timeout)
        if self._given_async is not None and self._given_async.pipeline is not None:
            await self._given_async.pipeline.close()  # its connection goes back to your pool
        if not self._owns_clients:
            return
        side = self._async_by_loop.pop(loop, None)
        self._last_async = (None, None)
        if side is not None:
            await side.closer.aclose()  # closes the client, once: not again at loop end

    def _after_fork_in_child(self) -> None:
        """Reset what fork() copied but cannot work in the child: locks a thread of the
        parent may have held, flights whose leaders stayed behind, event loops."""
        self._lock = threading.Lock()
        self._meeting = threading.RLock()
        self.breaker.reset_after_fork()
        for stats in self._stats:
            stats.reset_after_fork()
        for side in (self._sync, self._given_async):
            if side is not None:
                side.flights.reset_after_fork()
                side.background = Background()
        if self._given_async is not None:
            self._given_async.tasks = set()
        self._async_by_loop = {}
        self._last_async = (None, None)
        self._unreached = None
        self._flusher.stopping = threading.Event()
        self._flusher.task = None
        self.outbox.reset_after_fork(can_flush=self._flusher.sync_runtime is not None)

    def __enter__(self) -> CacheEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> CacheEngine:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"CacheEngine(prefix={self.prefix!r})"

    def _make_sync_side(self, client: Any) -> SyncRuntime:
        runtime = self._runtime(SyncRuntime, client, "client")
        if isinstance(client, redis.cluster.RedisCluster):
            runtime.route = client.get_node_from_key
        elif hasattr(client, "connection_pool"):
            runtime.held = HeldConnections(client.connection_pool)
        return runtime

    def _make_async_side(self, client: Any) -> AsyncRuntime:
        runtime = self._runtime(AsyncRuntime, client, "async_client")
        if isinstance(client, redis.asyncio.cluster.RedisCluster):
            runtime.ready = False
            runtime.failures = ASYNC_CLUSTER_FAILURES
            runtime.route = client.get_node_from_key
        elif hasattr(client, "connection_pool"):
            runtime.pipeline = Pipeline(client.connection_pool)
        return runtime

    def _runtime(self, kind: type[R], client: Any, role: str) -> R:
        """A runtime around `client`, after checking it suits the library."""
        kwargs = connection_kwargs(client, role)
        warn_if_pool_raises(client, role)
        return kind(
            client=client,
            scripts={name: client.register_script(name.value) for name in ScriptName},
            block_limit_ms=block_limit_ms(kwargs),
            breaker=self.breaker,
            outbox=self.outbox,
        )


class _CurrentSyncClient:
    """The engine's sync client as it is when used (a stand-in while a cluster is not
    reached, the cluster client once it is)."""

    def __init__(self, engine: CacheEngine) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine._sync_side().client, name)


_engines: weakref.WeakSet[CacheEngine] = weakref.WeakSet()


def _reset_engines_after_fork() -> None:
    for engine in list(_engines):
        try:
            engine._after_fork_in_child()
        except Exception:  # one engine's trouble must not leave the others as they were
            logger.exception("resetting %r after fork() failed", engine)


os.register_at_fork(after_in_child=_reset_engines_after_fork)


def _close_with_loop(
    engine: CacheEngine, loop: asyncio.AbstractEventLoop, side: AsyncRuntime
) -> None:
    """Close `side`'s client and drop it from `engine` when `loop` shuts down.

    asyncio.run(), asyncio.Runner and asgiref's async_to_sync close every async
    generator of a loop before closing it (loop.shutdown_asyncgens()): a generator
    started here, suspended at its only yield, runs its finally block then, on the
    loop, where the client can still be closed properly.
    """
    owner = weakref.ref(engine)

    async def closer() -> AsyncIterator[None]:
        try:
            yield
        finally:
            alive = owner()
            if alive is not None:
                alive._forget_loop(loop, side)
            if side.tasks:  # releases after cancellations: let them reach Redis
                await asyncio.wait(list(side.tasks), timeout=CLOSE_FLUSH_SECONDS)
            if side.pipeline is not None:
                await side.pipeline.close()
            await side.client.aclose()

    generator = closer()
    step: Any = generator.__anext__()  # registers the generator with the running loop
    with contextlib.suppress(StopIteration):
        step.send(None)  # runs it to its yield: nothing in between awaits
    side.closer = generator  # the loop holds its generators weakly


def _tag_texts(tags: tuple[object, ...]) -> list[str]:
    """The tags of an invalidate_tags() call, checked: rendered text, no braces."""
    if not tags:
        raise ConfigurationError("invalidate_tags needs at least one tag, e.g. 'shop:7'")
    for tag in tags:
        if not isinstance(tag, str) or not tag or "{" in tag or "}" in tag:
            raise ConfigurationError(
                f"invalidate_tags takes tags as their templates render them, e.g. "
                f"'shop:7' for tags=('shop:<shop_id>',); got {tag!r}"
            )
    return list(dict.fromkeys(tags))  # type: ignore[arg-type]
