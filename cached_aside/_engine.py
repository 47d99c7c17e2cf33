"""CacheEngine: the front that decorated functions and users hold. It builds its
parts (connector, sides, catalog, deliveries, near caches, bulk invalidations) once
and delegates to them; each part owns its own lifecycle (close, aclose, busy, fork).
"""

from __future__ import annotations

import logging
import weakref
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ._bulk import Bulk, key_head
from ._catalog import Catalog
from ._connector import (
    DEFAULT_BREAKER_COOLDOWN_SECONDS,
    DEFAULT_BREAKER_FAILURES,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_POOL_TIMEOUT,
    DEFAULT_SOCKET_TIMEOUT,
    Connector,
)
from ._deliveries import Deliveries
from ._nearby import Nearby
from ._sides import Sides

if TYPE_CHECKING:  # for annotations only
    from ._near import NearCache
    from ._results import BulkOutcome, StatsSnapshot

logger = logging.getLogger("cached_aside")

DEFAULT_PREFIX = "cache"
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
        breaker_failures: int = DEFAULT_BREAKER_FAILURES,
        breaker_cooldown: float = DEFAULT_BREAKER_COOLDOWN_SECONDS,
        near: NearCache | None = None,
    ) -> None:
        connector = Connector(client, async_client)
        self._adopt(_Parts(connector, prefix, breaker_failures, breaker_cooldown, near))

    def _adopt(self, parts: _Parts) -> None:
        """Take the parts on, and show the ones the wrappers and exporters use."""
        self._parts, self.prefix, self.near = parts, parts.prefix, parts.near
        self.key_head, self.breaker, self.outbox = parts.key_head, parts.breaker, parts.outbox
        self.sides, self.catalog, self.nearby = parts.sides, parts.catalog, parts.nearby
        self.deliveries = parts.deliveries
        _engines.add(self)

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
        breaker_failures: int = DEFAULT_BREAKER_FAILURES,
        breaker_cooldown: float = DEFAULT_BREAKER_COOLDOWN_SECONDS,
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
        connector = Connector.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_connect_timeout,
            max_connections=max_connections,
            pool_timeout=pool_timeout,
            client_options=client_options,
        )
        engine = cls.__new__(cls)
        engine._adopt(_Parts(connector, prefix, breaker_failures, breaker_cooldown, near))
        return engine

    def client(self) -> Any:
        """The engine's sync Redis client (made on first use by an engine built from a
        URL): for your own commands on the same server, with the same settings. While
        a Redis Cluster cannot be reached, a stand-in whose commands raise
        redis.ConnectionError (the real client is made once the cluster answers).

        Raises:
            ConfigurationError: the engine was given no sync client and has no URL.
        """
        return self.sides.sync_side().client

    def async_client(self) -> Any:
        """This event loop's asyncio Redis client (one per loop; call it inside one).

        Raises:
            ConfigurationError: the engine was given no async client and has no URL.
        """
        return self.sides.async_side().client

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
        near = self.near is not None if near is None else near
        listener = self.nearby.connection() if near else None
        self._parts.connector.check(self.client(), self.prefix, tags, listener)

    def invalidate_prefix(self, text: str = "") -> BulkOutcome:
        """Delete every entry whose key, inside the braces, starts with `text` ("" for
        all of this engine's entries), on every node.

        SCAN + UNLINK: Redis is never blocked. If Redis fails part way, the rest waits
        in the outbox (`pending=1`) and is retried until it lands.
        """
        return self._parts.bulk.by_prefix(self.sides.sync_side(), text)

    async def ainvalidate_prefix(self, text: str = "") -> BulkOutcome:
        """invalidate_prefix() for async code, on this event loop's client."""
        return await self._parts.bulk.aby_prefix(self.sides.async_side(), text)

    def invalidate_tags(self, *tags: str) -> BulkOutcome:
        """Delete every entry carrying any of these tags (as rendered: "shop:7" for
        tags=("shop:<shop_id>",) and shop_id=7 or "7"), on every node, and revoke
        their loads in flight, as invalidate() would each.

        Costs one DEL per tag, pipelined (per node on a Cluster): each tag's version
        is retired, and every entry stamped with it reads as a miss from then on; no
        scan. `deleted` counts the tags that had a version. What Redis did not take
        waits in the outbox (`pending`), and is retried until it lands.
        """
        return self._parts.bulk.by_tags(self.sides.sync_side(), tags)

    async def ainvalidate_tags(self, *tags: str) -> BulkOutcome:
        """invalidate_tags() for async code, on this event loop's client."""
        return await self._parts.bulk.aby_tags(self.sides.async_side(), tags)

    def pending_invalidations(self) -> list[str]:
        """Invalidations Redis has not taken yet (keys, and patterns of bulk ones),
        which the outbox keeps retrying; empty when all is well."""
        return self.deliveries.pending()

    def stats(self) -> StatsSnapshot:
        """Counters summed over every function using this engine."""
        return self.catalog.total()

    def function_stats(self) -> dict[str, StatsSnapshot]:
        """Counters per function, by qualified name."""
        return self.catalog.by_name()

    def reset_stats(self) -> None:
        """Set every function's counters on this engine back to zero."""
        self.catalog.reset()

    def near_state(self) -> str:
        """The invalidation listener's state: "tracking", "down", "unsupported",
        "starting", or "off" when no function uses a near cache."""
        return self.nearby.state()

    def near_revalidated_at(self) -> float | None:
        """`time.monotonic()` when the near cache last finished rereading the entries
        it set aside while its listener was not tracking (see the near-cache docs),
        or None if it never had to."""
        return self.nearby.revalidated_at()

    def settle(self, timeout: float = 5.0) -> bool:
        """Wait until the engine's background work is done: refresh_ahead reloads in
        threads and the outbox's deliveries. Returns False if `timeout` seconds were
        not enough (Redis down, say). For tests and orderly shutdowns."""
        return self.sides.settle(timeout, self._parts.busy)

    async def asettle(self, timeout: float = 5.0) -> bool:
        """settle() for async code: also waits for this loop's background tasks
        (reloads, and releases after a cancellation)."""
        return await self.sides.asettle(timeout, self._parts.busy)

    def close(self, timeout: float = CLOSE_FLUSH_SECONDS) -> None:
        """Let refresh_ahead reloads running in threads finish (each would keep its
        key's lock past an exit), then try once more, each for up to `timeout` seconds,
        to deliver the invalidations the outbox holds (logging those Redis never took),
        stop the invalidation listener, and close the sync client's connections if
        this engine created the client."""
        self._parts.close(timeout)

    async def aclose(self, timeout: float = CLOSE_FLUSH_SECONDS) -> None:
        """Let this loop's background work and the reloads in threads finish (for up
        to `timeout` seconds), try to deliver what the outbox holds (as close()), then
        close the connections the engine made (clients you passed in stay yours to
        close)."""
        await self._parts.aclose(timeout)

    def after_fork(self) -> None:
        """In a forked child: reset what fork() copied but cannot work there (locks a
        thread of the parent may have held, flights whose leaders stayed behind,
        threads, event loops), part by part."""
        self._parts.after_fork()

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


class _Parts:
    """An engine's parts, built once from its Connector (nothing rewires them
    afterwards), and their lifecycle walked in the order they need."""

    def __init__(
        self,
        connector: Connector,
        prefix: str,
        breaker_failures: int,
        breaker_cooldown: float,
        near: NearCache | None,
    ) -> None:
        self.connector, self.prefix, self.near = connector, prefix, near
        self.key_head = key_head(prefix)
        self.breaker = breaker = connector.breaker(breaker_failures, breaker_cooldown)
        # The flusher asks for a side only once work arrives: the sides exist by then.
        self.deliveries = Deliveries(
            breaker,
            (lambda: self.sides.sync_side()) if connector.has_sync else None,
            lambda: self.sides.given_async(),
        )
        self.outbox = self.deliveries.outbox
        self.catalog = Catalog(self.outbox)
        self.sides = Sides(connector, breaker, self.outbox)
        self.nearby = Nearby(near, self.key_head, connector, self.sides)
        self.bulk = Bulk(self.key_head, self.catalog, self.nearby)

    def close(self, timeout: float) -> None:
        """Reloads in threads first (left running, one would hold its key's lock past
        the close: at interpreter exit, till the lock's ttl), then the parts."""
        self.sides.settle(timeout, self.sides.reloading)
        self._close_parts(timeout)

    def _close_parts(self, timeout: float) -> None:
        """Deliveries first (they need the sync client), the sync client last."""
        for part in (self.deliveries, self.nearby, self.catalog, self.sides):
            part.close(timeout)

    async def aclose(self, timeout: float) -> None:
        """This loop's background work and the reloads in threads, the last deliveries
        (on the async client when there is no other), the parts, this loop's client."""
        self.deliveries.stop_retrying()  # an async flusher hands over to the last attempt
        await self.sides.drain(timeout, but=self.deliveries.task)
        await self.sides.settled(timeout, self.sides.reloading)
        await self.deliveries.aclose(timeout)
        self._close_parts(timeout)
        await self.sides.aclose(timeout)

    def at_exit(self, timeout: float) -> None:
        """Interpreter exit, the engine not closed: what its daemon threads would lose
        (a reload holding its key's lock, invalidations in the outbox) is finished or
        logged, each for up to `timeout` seconds. Connections are left to exit. An
        engine closed and not used since has nothing left to do here."""
        self.sides.settle(timeout, self.sides.reloading)
        self.deliveries.at_exit(timeout)

    def busy(self) -> bool:
        """Background reloads on any side, or deliveries pending."""
        return self.sides.busy() or self.deliveries.busy()

    def after_fork(self) -> None:
        """The breaker's lock and probe, then each part's own reset."""
        self.breaker.reset_after_fork()
        for part in (self.catalog, self.sides, self.deliveries, self.nearby):
            part.after_fork()


# Every engine alive, for the one fork hook (_lifecycle.py) to walk.
_engines: weakref.WeakSet[CacheEngine] = weakref.WeakSet()


def engines() -> list[CacheEngine]:
    """The engines alive now."""
    return list(_engines)
