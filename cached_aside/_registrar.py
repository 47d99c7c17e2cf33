"""The registrar of per-key tracking: a second connection of a listener that makes
Redis track, one batch at a time, the keys its near caches want to keep.

It enables `CLIENT TRACKING on REDIRECT <listener's id>` (default mode, not BCAST)
and sends `EXISTS` naming the keys (one per hash slot: on a cluster, a command may
not span slots), a read-only command Redis tracks the keys of. Its own daemon thread
sends them, never a caller's. When the reply to a batch arrives, the stores hear
which registrations Redis processed (`NearStore.registered`); a refused one is
abandoned. If the connection fails, Redis forgot every key it tracked: the registrar
says so (`on_lost`), and its listener switches the near caches off (emptied, every
registration forgotten) until both connections are back.
"""

from __future__ import annotations

import threading
import weakref
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from redis.crc import key_slot
from redis.exceptions import ResponseError

if TYPE_CHECKING:
    from ._near_store import NearStore

# The registrar's connection is proved alive as the listener's is: a PING when idle
# this long, answered within the deadline (an EXISTS reply too).
IDLE_PING_SECONDS = 0.5
REPLY_DEADLINE_SECONDS = 1.0
# Keys named by one batch at most (its EXISTS commands go out pipelined).
MAX_BATCH_KEYS = 1_000

Request = tuple["NearStore", str, int]  # store, key, request number


class RegistrarLostError(ConnectionError):
    """The registrar's connection failed or stopped answering."""


def one_group(key: str) -> int:
    """On one server, every key can go in one EXISTS."""
    return 0


def slot_of(key: str) -> int:
    """On a cluster, one EXISTS per hash slot."""
    return key_slot(key.encode())


class Registrar:
    """One registrar connection, for one connection of its listener (`redirect`):
    made by `open()` on the listener's thread, served by its own thread until
    `close()` or a failure (`on_lost(reason)`, once)."""

    THREAD_NAME = "cached_aside-registrar"

    def __init__(
        self,
        connect: Callable[[], Any],
        on_lost: Callable[[str], None],
        group: Callable[[str], int] = one_group,
    ) -> None:
        self._connect = connect
        self._on_lost = on_lost
        self._group = group
        self._queue: list[Request] = []
        # The stores it registered keys for: they forget them when it is done.
        self._served: weakref.WeakSet[NearStore] = weakref.WeakSet()
        self._wake = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = threading.Event()
        self.batches = 0  # EXISTS batches sent, for tests and diagnostics
        self.client_id: int | None = None  # the connection's CLIENT ID, for CLIENT KILL

    def open(self, redirect: int) -> None:
        """Connect and enable tracking towards `redirect`, then serve from a thread.

        Raises:
            RegistrarLostError: tracking refused: the listener that opened it just
                tracked, so its connection is gone (no such client to redirect to)
                or this reached another server (a failover): worth another try.
            ConnectionError: as connecting raises it.
        """
        connection = self._connect()
        try:
            connection.connect()
            connection.send_command("CLIENT", "ID")
            self.client_id = connection.read_response()
            connection.send_command("CLIENT", "TRACKING", "on", "REDIRECT", redirect)
            connection.read_response()
        except ResponseError as exc:
            connection.disconnect()
            raise RegistrarLostError(f"tracking refused to the registrar: {exc}") from exc
        except BaseException:
            connection.disconnect()
            raise
        self._thread = threading.Thread(
            target=self._serve, args=(connection,), name=self.THREAD_NAME, daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Stop the thread (its connection closes: Redis forgets its keys)."""
        self._stop.set()
        with self._wake:
            self._wake.notify()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)

    def submit(self, store: NearStore, key: str, number: int) -> None:
        """Queue a registration; abandoned at once when this registrar is done."""
        with self._wake:
            if not (self._stop.is_set() or self.lost.is_set()):
                self._served.add(store)
                self._queue.append((store, key, number))
                self._wake.notify()
                return
        store.registered([(key, number)], processed=False)

    # -- the thread ------------------------------------------------------------------

    def _serve(self, connection: Any) -> None:
        try:
            while not self._stop.is_set():
                batch = self._take()
                if batch:
                    self._send(connection, batch)
                elif not self._stop.is_set():
                    connection.send_command("PING")
                    self._read(connection)
        except Exception as exc:  # Redis forgot every key this connection registered
            if not self._stop.is_set():
                self.lost.set()
                self._on_lost(f"registrar lost ({type(exc).__name__}: {exc})")
        finally:
            connection.disconnect()
            with self._wake:
                left, self._queue = self._queue, []
            self._answer(left, processed=False)
            # Redis forgot what this connection tracked, however the stores were
            # switched meanwhile: what it confirmed vouches for nothing any more.
            for store in list(self._served):
                store.forget_registrations()

    def _take(self) -> list[Request]:
        with self._wake:
            if not self._queue:
                self._wake.wait(IDLE_PING_SECONDS)
            batch = self._queue[:MAX_BATCH_KEYS]
            del self._queue[:MAX_BATCH_KEYS]
            return batch

    def _send(self, connection: Any, batch: list[Request]) -> None:
        groups: dict[int, list[Request]] = defaultdict(list)
        for request in batch:
            groups[self._group(request[1])].append(request)
        try:
            for requests in groups.values():
                connection.send_command("EXISTS", *{key: None for _, key, _ in requests})
        except BaseException:
            self._answer(batch, processed=False)
            raise
        self.batches += 1
        for index, requests in enumerate(groups.values()):
            try:
                self._read(connection)
            except ResponseError:  # not this node's slot any more, say: not tracked
                self._answer(requests, processed=False)
            except BaseException:
                unanswered = list(groups.values())[index:]
                self._answer([r for group in unanswered for r in group], processed=False)
                raise
            else:
                self._answer(requests, processed=True)

    def _read(self, connection: Any) -> Any:
        if not connection.can_read(timeout=REPLY_DEADLINE_SECONDS):
            raise RegistrarLostError("no reply in time")
        return connection.read_response()

    @staticmethod
    def _answer(requests: list[Request], processed: bool) -> None:
        """Tell each store what became of its requests."""
        by_store: dict[NearStore, list[tuple[str, int]]] = defaultdict(list)
        for store, key, number in requests:
            by_store[store].append((key, number))
        for store, keys in by_store.items():
            store.registered(keys, processed)
