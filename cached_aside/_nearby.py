"""Nearby: the near caches of an engine's functions and the one invalidation
listener they share (of one server, or of every master of a cluster), started with
the first near cache and stopped when the engine closes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

import redis.asyncio.cluster
import redis.cluster

from ._cluster_listener import ClusterListener
from ._codecs import Codec
from ._connector import Connector
from ._drivers import no_seal, run
from ._errors import ConfigurationError
from ._listener import InvalidationListener, connection_factory
from ._loads import NO_LOADS
from ._near import NearCache, Reread, Tracking
from ._near_budget import NearBudget
from ._near_store import NearStore
from ._plan import Plan
from ._revalidation import reread
from ._sides import Sides
from ._validate import instance

# How long a near cache's first use waits for the listener's handshake.
NEAR_HANDSHAKE_SECONDS = 2.0


class Nearby:
    """The listener's lifecycle and the near stores attached to it. `default` is the
    near cache of functions decorated without near= (checked here)."""

    def __init__(
        self, default: NearCache | None, key_head: str, connector: Connector, sides: Sides
    ) -> None:
        instance("near", default, NearCache, "a NearCache or None")
        self.default = default
        # The one byte budget of every function using the default near cache.
        self._budget = None if default is None else NearBudget(default.max_bytes)
        self._key_head = key_head
        self._connector, self._sides = connector, sides
        self._lock = threading.Lock()
        self.listener: InvalidationListener | ClusterListener | None = None

    def store(
        self, config: NearCache, codec: Codec, name: str, plan: Plan | None = None
    ) -> NearStore:
        """A near cache for one function, attached to the listener (started on first
        use); given the function's `plan`, its entries are reread after a reconnect
        (else dropped).

        Raises:
            ConfigurationError: the server cannot track keys and the config does not
                accept TTL-only staleness.
        """
        store = NearStore(config, codec.freeze, self._budget if config is self.default else None)
        if plan is not None:
            store.reread = self._rereader(plan)
        make = self._listener_maker(config.tracking)  # outside the lock: it may make the client
        with self._lock:
            if self.listener is None:
                self.listener = make()
            listener = self.listener
        if listener.tracking != config.tracking:
            raise ConfigurationError(
                f"{name}: NearCache(tracking={config.tracking!r}) on an engine whose near "
                f"caches already track {listener.tracking!r}: one engine's listener "
                "tracks one way; give every NearCache on this engine the same tracking="
            )
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

    def _rereader(self, plan: Plan) -> Callable[[list[str]], list[Reread]]:
        """Rereads keys of `plan`'s function on the engine's sync side, as lookups
        (never loading); a key whose invalidation waits in the outbox is not vouched
        for (Redis may still hold the old value)."""

        def reread_keys(keys: list[str]) -> list[Reread]:
            side = self._sides.sync_side()
            found = run(reread(plan, keys), side, NO_LOADS, no_seal)[0]
            outbox = side.outbox
            if not outbox.active:
                return found
            return [
                None if outbox.blocks(key) else entry
                for key, entry in zip(keys, found, strict=True)
            ]

        return reread_keys

    def state(self) -> str:
        """The listener's state, or "off" when no function uses a near cache."""
        listener = self.listener
        return "off" if listener is None else listener.state

    def revalidated_at(self) -> float | None:
        """time.monotonic() when the last revalidation after a reconnect ended."""
        listener = self.listener
        return None if listener is None else listener.revalidated_at

    def drop(self, keys: Iterable[str]) -> None:
        """Read-your-writes: Redis's reports of these deletions arrive a moment later."""
        keys = list(keys)
        if self.listener is not None and keys:
            self.listener.drop(keys)

    def clear(self) -> None:
        """As drop(), for every key."""
        if self.listener is not None:
            self.listener.clear_all()

    def connection(self) -> Callable[[], Any]:
        """Makes the listener's connection, to the server the engine's clients use."""
        return connection_factory(self._sides.listener_client())

    def _listener_maker(
        self, tracking: Tracking
    ) -> Callable[[], InvalidationListener | ClusterListener]:
        """Makes the listener: of the server the engine's clients use, or of every
        master of its cluster."""
        given = self._sides.given_clients()
        if self._connector.cluster or any(
            isinstance(client, redis.cluster.RedisCluster) for client in given
        ):
            # A sync cluster client: the topology, node settings. The engine's own is
            # read afresh each time: a cluster down at first use is reached later.
            client = (
                self._sides.current_sync_client()
                if self._connector.cluster
                else self._sides.sync_side().client
            )
            return lambda: ClusterListener(client, self._key_head, tracking)
        if any(isinstance(client, redis.asyncio.cluster.RedisCluster) for client in given):
            raise ConfigurationError(
                "a near cache on Redis Cluster reads the cluster's topology with a sync "
                "client: build the engine with CacheEngine.from_url('redis+cluster://...') "
                "or give it a redis.cluster.RedisCluster too"
            )
        connect = self.connection()
        return lambda: InvalidationListener(connect, self._key_head, tracking=tracking)

    # -- lifecycle -----------------------------------------------------------------------

    def close(self, timeout: float) -> None:
        """Stop the listener (a near cache used again starts another)."""
        listener, self.listener = self.listener, None
        if listener is not None:
            listener.stop()

    async def aclose(self, timeout: float) -> None:
        """As close(); the listener is a thread."""
        self.close(timeout)

    def busy(self) -> bool:
        """Never: the listener is not work to wait for."""
        return False

    def after_fork(self) -> None:
        """No listener thread came along, and the stores were filled while the
        parent's connection vouched for them: empty them and listen anew."""
        self._lock = threading.Lock()
        if self.listener is not None:
            self.listener.restart_in_child()
