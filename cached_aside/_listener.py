"""The engine's invalidation listener: one connection that asks Redis to report every
change under the engine's prefix, and drops those keys from the engine's near caches.

The connection enables `CLIENT TRACKING on REDIRECT <its own id> BCAST PREFIX <prefix>`
and subscribes to `__redis__:invalidate` (RESP2, so Redis 6 and 7 both speak it).
Any change by anyone reaches it: invalidate, update_field, expiry, eviction, a DEL
typed into redis-cli. One daemon thread serves sync and async functions alike.
Correctness first: whenever it is not connected and tracking, every near cache of
the engine is off, its entries set aside unserved; once tracking is back, they are
reread (`_revalidation`) and served again only if unchanged.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from time import monotonic
from typing import Any, Protocol

import redis.asyncio.sentinel
import redis.connection
import redis.sentinel
from redis.exceptions import ResponseError

from ._errors import ConfigurationError
from ._keys import tag_key
from ._near import Tracking, TrackingState
from ._near_store import NearStore
from ._registrar import Registrar, one_group
from ._revalidation import start

logger = logging.getLogger("cached_aside")

INVALIDATION_CHANNEL = b"__redis__:invalidate"
# A PING this often, answered within PONG_DEADLINE, proves a quiet connection alive.
PING_INTERVAL_SECONDS = 0.5
PONG_DEADLINE_SECONDS = 1.0
POLL_SECONDS = 0.05
FIRST_RETRY_SECONDS = 0.05
MAX_RETRY_SECONDS = 1.0


# What the invalidation listener's connection copies from the client's pool.
_LISTENER_SETTINGS = frozenset(
    {
        "host",
        "port",
        "path",
        "db",
        "username",
        "password",
        "credential_provider",
        "socket_timeout",
        "socket_connect_timeout",
        "socket_keepalive",
        "socket_keepalive_options",
        "client_name",
        "server",  # fakeredis's in-memory server
    }
)


def connection_factory(client: Any, **address: Any) -> Callable[[], Any]:
    """Makes connections to the server `client` uses (or to `address`, host and port,
    with its settings): its address and credentials, not its pool's machinery (retry
    objects, handlers of RESP3-only notifications), and RESP2, in which
    invalidations arrive as Pub/Sub messages."""
    pool = getattr(client, "connection_pool", None)
    if pool is None:
        raise ConfigurationError(f"a near cache cannot listen through {client!r}")
    kind = pool.connection_class
    kwargs = {
        name: value
        for name, value in pool.connection_kwargs.items()
        if name in _LISTENER_SETTINGS or name.startswith("ssl_")
    }
    if isinstance(pool, redis.asyncio.sentinel.SentinelConnectionPool):
        raise ConfigurationError(
            "a near cache listens with a sync connection, and an asyncio Sentinel "
            "client has none to offer: build the engine from a redis+sentinel:// URL, "
            "or give it a sync master_for() client too"
        )
    if kind.__module__.startswith("redis.asyncio"):
        # The listener is a thread: the sync twin of the async connection class.
        kind = getattr(redis.connection, kind.__name__, None)
        if kind is None:
            raise ConfigurationError(
                f"a near cache cannot listen through {pool.connection_class!r}"
            )
    if issubclass(kind, redis.sentinel.SentinelManagedConnection) and not address:
        # It asks its pool, which asks the sentinels, where the master is now.
        kwargs["connection_pool"] = pool
    kwargs["protocol"] = 2
    kwargs.update(address)
    return lambda: kind(**kwargs)


class ListenerLostError(ConnectionError):
    """The listener's connection stopped answering its PINGs."""


class Tier(Protocol):
    """What a listener of one node of a cluster reports to: its state changes and the
    keys its node reports changed."""

    def node_changed(self) -> None: ...

    def invalidate(self, keys: list[bytes] | None) -> None: ...


class StoreListener:
    """What every listener of an engine does for the near stores attached to it:
    keep them, switch them on and off, start its thread on first use (and again in
    a forked child), and pass on what Redis reports changed. Subclasses say what
    the thread runs (`_loop`) and when a store may serve (`_serves`)."""

    THREAD_NAME = "cached_aside-invalidations"

    def __init__(self, prefix: str, tracking: Tracking = "bcast") -> None:
        self.prefix = prefix
        self.tracking: Tracking = tracking  # every store attached to it uses this mode
        self._stores: list[NearStore] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._settled = threading.Event()  # the first attempt ended, one way or another
        self.state: TrackingState = "starting"
        self.reason = ""
        # time.monotonic() when the last revalidation after a reconnect ended
        self.revalidated_at: float | None = None

    def _loop(self) -> None:
        raise NotImplementedError

    def register(self, store: NearStore, key: str, number: int) -> None:
        """Per-key tracking: have Redis track `key` for `store` (request `number`)."""
        raise NotImplementedError

    def _serves(self, store: NearStore) -> bool:
        """Whether `store` may serve from memory in the listener's present state."""
        return self.state == "tracking"

    def _turn(self, stores: list[NearStore], state: TrackingState, reason: str) -> None:
        """Switch `stores` for the state just entered: tracking is back, so reread
        what was set aside (a thread of its own, after tracking is in place: a change
        after a reread is reported); tracking lost, so set the entries aside; else
        (unsupported, stopped) on or off, and empty."""
        rereads = []
        for store in stores:
            if state == "tracking":
                rereads.append((store, store.aside.resume()))
            elif state == "down" and reason != "stopped":
                store.aside.suspend()
            else:
                store.switch(
                    self._serves(store), state == "unsupported" and store.config.allow_untracked
                )
        if any(keys for _, keys in rereads):
            start(rereads, self._revalidated)

    def _revalidated(self) -> None:
        self.revalidated_at = monotonic()

    def attach(self, store: NearStore) -> None:
        """Serve `store` from now on, starting the listener on first use."""
        if store.registrations is not None:
            store.registrations.register = self.register
        with self._lock:
            self._stores.append(store)
            if self._serves(store):
                store.switch(True, untracked=self.state == "unsupported")
            self._start_locked()

    def _start_locked(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self.THREAD_NAME, daemon=True)
            self._thread.start()

    def detach(self, store: NearStore) -> None:
        with self._lock:
            if store in self._stores:
                self._stores.remove(store)

    def _attached(self) -> list[NearStore]:
        with self._lock:
            return list(self._stores)

    def clear_all(self) -> None:
        """Empty every attached near cache: a bulk invalidation by this process."""
        for store in self._attached():
            store.clear()

    def drop(self, keys: list[str]) -> None:
        """Drop these keys from every attached store: this process changed them."""
        for store in self._attached():
            store.drop(keys)

    def wait_settled(self, timeout: float) -> TrackingState:
        """Wait for the first attempt to end; the state it left."""
        self._settled.wait(timeout)
        return self.state

    def _stop_thread(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)

    def _report(self, keys: list[bytes] | None) -> None:
        """What Redis reported changed, to every attached store (None: everything)."""
        stores = self._attached()
        if keys is None:  # FLUSHALL / FLUSHDB: everything is gone, tracked keys too
            for store in stores:
                store.clear(registrations=True)
            return
        names = [key.decode("utf-8", "replace") for key in keys]
        for store in stores:
            store.drop(names)

    def _forget_in_child(self) -> None:
        """What else of the parent's a subclass forgets after fork()."""

    def restart_in_child(self) -> None:
        """After fork(): the thread did not come along, and the caches were filled
        while the parent's connection vouched for them. Empty them and listen anew."""
        self._lock = threading.Lock()  # it may have been held by a thread now gone
        self._stop = threading.Event()
        self._settled = threading.Event()
        self.state, self.reason = "starting", "forked"
        self._forget_in_child()
        for store in self._stores:
            store.reset_after_fork()
        self._thread = None
        if self._stores:
            self._start_locked()


class InvalidationListener(StoreListener):
    """Tracks one key prefix for the near caches attached to it; or, for a cluster's
    listener (`tier`), on one node, reporting to the tier, which owns the caches."""

    def __init__(
        self,
        connect: Callable[[], Any],
        prefix: str,
        tier: Tier | None = None,
        tracking: Tracking = "bcast",
        group: Callable[[str], int] = one_group,
    ) -> None:
        super().__init__(prefix, tracking)
        self._tier = tier
        self._connect = connect
        self._group = group  # which keys one EXISTS of the registrar may name together
        self.registrar: Registrar | None = None  # per-key mode, while connected
        self.connections = 0  # times tracking was (re-)established
        self.client_id: int | None = None  # the connection's CLIENT ID, for CLIENT KILL
        self.messages = 0  # invalidation messages received (a FLUSHALL's null one too)
        self.keys_reported = 0  # keys those messages named

    def _serves(self, store: NearStore) -> bool:
        untracked = self.state == "unsupported" and store.config.allow_untracked
        return self.state == "tracking" or untracked

    def start(self) -> None:
        """Listen for a tier (which attaches no stores)."""
        with self._lock:
            self._start_locked()

    def stop(self) -> None:
        self._stop_thread()
        self._switch("down", "stopped")

    def _switch(self, state: TrackingState, reason: str = "") -> None:
        if self._tier is not None:
            self.state, self.reason = state, reason
            self._tier.node_changed()
            return
        with self._lock:
            changed = state != self.state
            self.state, self.reason = state, reason
            self._turn(self._stores, state, reason)
        if changed and state == "down" and reason != "stopped":
            logger.warning(
                "near cache off: the invalidation listener lost Redis (%s); reconnecting", reason
            )

    def _loop(self) -> None:
        delay = FIRST_RETRY_SECONDS
        while not self._stop.is_set():
            connection = registrar = None
            try:
                connection = self._connect()
                connection.connect()
                self._track(connection)
                if self.tracking == "keys":
                    registrar = Registrar(self._connect, self._registrar_lost, self._group)
                    registrar.open(self.client_id or 0)
                    self.registrar = registrar
                self.connections += 1
                self._switch("tracking")
                self._settled.set()
                delay = FIRST_RETRY_SECONDS
                self._listen(connection)
            except ResponseError as exc:  # no tracking here (or no permission for it)
                self._switch("unsupported", str(exc))
                self._settled.set()
                return
            except Exception as exc:  # any failure means: nothing vouches for the caches
                self._switch("down", f"{type(exc).__name__}: {exc}")
                self._settled.set()
            finally:
                self.registrar = None
                if registrar is not None:
                    registrar.close()
                if connection is not None:
                    connection.disconnect()
            self._stop.wait(delay)
            delay = min(MAX_RETRY_SECONDS, delay * 2)

    def _forget_in_child(self) -> None:
        self.registrar = None  # its thread stayed in the parent

    def _registrar_lost(self, reason: str) -> None:
        """From the registrar's thread: Redis forgot the keys it tracked, so nothing
        vouches for the caches; the listener's loop reconnects both."""
        self._switch("down", reason)

    def register(self, store: NearStore, key: str, number: int) -> None:
        registrar = self.registrar
        if registrar is None:
            store.registered([(key, number)], processed=False)
        else:
            registrar.submit(store, key, number)

    def _track(self, connection: Any) -> None:
        connection.send_command("CLIENT", "ID")
        own_id = self.client_id = connection.read_response()
        # tags' version keys, always: invalidate_tags() empties the near caches
        prefixes = ["PREFIX", tag_key(self.prefix, "")[:-1]]
        if self.tracking == "bcast":  # per-key: the registrar's keys, redirected here
            prefixes = ["PREFIX", self.prefix, *prefixes]
        connection.send_command("CLIENT", "TRACKING", "on", "REDIRECT", own_id, "BCAST", *prefixes)
        connection.read_response()
        connection.send_command("SUBSCRIBE", INVALIDATION_CHANNEL)
        connection.read_response()

    def _listen(self, connection: Any) -> None:
        last_ping = monotonic()
        awaiting_pong_since: float | None = None
        registrar = self.registrar
        while not self._stop.is_set():
            if registrar is not None and registrar.lost.is_set():
                raise ListenerLostError("its registrar's connection was lost")
            if connection.can_read(timeout=POLL_SECONDS):
                message = connection.read_response()
                if message[0] == b"pong":
                    awaiting_pong_since = None
                elif message[0] == b"message" and message[1] == INVALIDATION_CHANNEL:
                    self.messages += 1
                    self.keys_reported += len(message[2] or ())
                    self._invalidate(message[2])
                continue
            now = monotonic()
            if (
                awaiting_pong_since is not None
                and now - awaiting_pong_since > PONG_DEADLINE_SECONDS
            ):
                raise ListenerLostError("no answer to PING")
            if now - last_ping >= PING_INTERVAL_SECONDS:
                connection.send_command("PING")
                last_ping = now
                if awaiting_pong_since is None:
                    awaiting_pong_since = now

    def _invalidate(self, keys: list[bytes] | None) -> None:
        if self._tier is not None:
            self._tier.invalidate(keys)
            return
        self._report(keys)
