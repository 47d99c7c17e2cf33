"""Sides: the runtimes calls run on. One sync side (or, while a cluster cannot be
reached, a stand-in whose commands fail), and one async side per event loop, made
with the loop's first call and closed and dropped when the loop shuts down.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from time import monotonic
from typing import Any

from ._breaker import CircuitBreaker, NodeBreakers
from ._connector import Connector
from ._errors import ConfigurationError
from ._outbox import Outbox
from ._runtime import (
    DEFAULT_BLOCK_LIMIT_MS,
    UNREACHABLE,
    AsyncRuntime,
    Background,
    SyncRuntime,
    Unreached,
    async_runtime,
    sync_runtime,
    unrouted,
)
from ._scripts import ScriptName

SETTLE_POLL_SECONDS = 0.005


class Sides:
    """The sync side and the async sides of one engine, over its Connector's clients.

    Clients given to the engine get their side at once (a client unfit for the
    library fails there); clients made from a URL get theirs on first use.
    """

    def __init__(self, connector: Connector, breaker: CircuitBreaker, outbox: Outbox) -> None:
        self._connector = connector
        self._breaker, self._outbox = breaker, outbox
        self._lock = threading.Lock()
        self._sync: SyncRuntime | None = None
        self._unreached: SyncRuntime | None = None  # while a cluster cannot be reached
        self._given_async: AsyncRuntime | None = None
        # Dropped by the side's closer when its loop shuts down (asyncio.run does).
        self._by_loop: dict[asyncio.AbstractEventLoop, AsyncRuntime] = {}
        self._last_async: tuple[object, AsyncRuntime | None] = (None, None)
        if connector.client is not None:
            self._sync = sync_runtime(connector.client, breaker, outbox)
        if connector.async_client is not None:
            self._given_async = async_runtime(connector.async_client, breaker, outbox)

    # -- the sides calls run on ------------------------------------------------------

    def sync_side(self) -> SyncRuntime:
        """The sync side, made on first use from a URL.

        Raises:
            ConfigurationError: the engine has no sync client and no URL.
        """
        side = self._sync
        if side is not None:
            return side
        make = self._connector.make_client
        if make is None:
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
                    client = make()
                except UNREACHABLE as exc:
                    # A cluster client asks the cluster for its topology when it is
                    # built: fail open until it can, trying again as the breaker lets.
                    return self._unreached_side(exc)
                self._sync = sync_runtime(client, self._breaker, self._outbox)
                if self._unreached is not None:  # the cluster answered at last
                    gate, self._unreached = self._unreached.breaker, None
                    if gate.failures:
                        gate.success()
                    if isinstance(self._breaker, NodeBreakers):
                        self._breaker.reached()
            return self._sync

    def async_side(self) -> AsyncRuntime:
        """The running event loop's side (one per loop: a client cannot cross loops).

        Raises:
            ConfigurationError: the engine has no async client and no URL.
        """
        if self._given_async is not None:
            return self._given_async
        loop = asyncio.get_running_loop()
        last_loop, side = self._last_async
        if last_loop is loop and side is not None:
            return side
        side = self._by_loop.get(loop)
        if side is None:
            make = self._connector.make_async_client
            if make is None:
                raise ConfigurationError(
                    "this CacheEngine has no async client; pass async_client="
                    "redis.asyncio.Redis(...) or use CacheEngine.from_url(...) to call "
                    "async functions"
                )
            self._sweep_closed_loops()
            client = make()
            side = self._by_loop[loop] = async_runtime(client, self._breaker, self._outbox)
            _close_with_loop(self, loop, side)
        self._last_async = (loop, side)
        return side

    def given_async(self) -> AsyncRuntime | None:
        """The side of the async client given to the engine, if one was."""
        return self._given_async

    def given_clients(self) -> list[Any]:
        """The clients the engine was given, or has made so far."""
        return [side.client for side in (self._sync, self._given_async) if side is not None]

    def listener_client(self) -> Any:
        """A client of the server the engine uses, for the listener's connection."""
        if self._sync is not None:
            return self._sync.client
        if self._connector.make_client is not None:
            return self.sync_side().client
        return self._given_async.client if self._given_async is not None else None

    def current_sync_client(self) -> Any:
        """The sync client as it is whenever it is used (see _CurrentSyncClient)."""
        return _CurrentSyncClient(self)

    # -- lifecycle -------------------------------------------------------------------

    def busy(self) -> bool:
        """Whether a background reload runs on any side."""
        sides = [self._sync, self._given_async, *self._by_loop.values()]
        return any(side.background.busy() for side in sides if side is not None)

    def settle(self, timeout: float, busy: Callable[[], bool]) -> bool:
        """CacheEngine.settle(): wait until `busy` (the engine's parts, these sides
        among them) says done; False after `timeout` seconds."""
        deadline = monotonic() + timeout
        while busy():
            if monotonic() >= deadline:
                return False
            time.sleep(SETTLE_POLL_SECONDS)
        return True

    async def asettle(self, timeout: float, busy: Callable[[], bool]) -> bool:
        """CacheEngine.asettle(): settle(), and this loop's background tasks done."""
        deadline = monotonic() + timeout
        loop = asyncio.get_running_loop()
        while True:
            tasks = [task for task in self.loop_tasks(loop) if not task.done()]
            if tasks:
                await asyncio.wait(tasks, timeout=max(0.0, deadline - monotonic()))
            if not busy() and all(task.done() for task in tasks):
                return True
            if monotonic() >= deadline:
                return False
            await asyncio.sleep(SETTLE_POLL_SECONDS)

    def reloading(self) -> bool:
        """Whether a background reload (refresh_ahead) runs in a thread."""
        side = self._sync
        return side is not None and side.background.busy()

    async def settled(self, timeout: float, busy: Callable[[], bool]) -> bool:
        """settle() from a task: wait until `busy` says done; False after `timeout` s."""
        deadline = monotonic() + timeout
        while busy():
            if monotonic() >= deadline:
                return False
            await asyncio.sleep(SETTLE_POLL_SECONDS)
        return True

    async def drain(self, timeout: float, but: asyncio.Task[None] | None) -> None:
        """Let this loop's background tasks (all `but` one) finish, for `timeout` s."""
        loop = asyncio.get_running_loop()
        pending = [task for task in self.loop_tasks(loop) if task is not but]
        if pending:
            await asyncio.wait(pending, timeout=timeout)

    def loop_tasks(self, loop: asyncio.AbstractEventLoop) -> list[asyncio.Task[None]]:
        """The background tasks (reloads, releases after a cancellation) on `loop`."""
        sides = [self._given_async, self._by_loop.get(loop)]
        return [
            task
            for side in sides
            if side is not None
            for task in side.tasks
            if task.get_loop() is loop
        ]

    def close(self, timeout: float) -> None:
        """Close the sync client, if the engine made it."""
        if self._connector.owns_clients and self._sync is not None:
            self._sync.client.close()
            self._sync = None

    async def aclose(self, timeout: float) -> None:
        """Hand the given async client's connection back to its pool; close this
        loop's client, if the engine made it (once: not again when the loop ends)."""
        if self._given_async is not None and self._given_async.pipeline is not None:
            await self._given_async.pipeline.close()  # its connection goes back to your pool
        if not self._connector.owns_clients:
            return
        side = self._by_loop.pop(asyncio.get_running_loop(), None)
        self._last_async = (None, None)
        if side is not None:
            await side.closer.aclose()

    def after_fork(self) -> None:
        """Forget what belongs to the parent: flights whose leaders stayed behind, its
        reloads, its connections, its event loops."""
        self._lock = threading.Lock()
        for side in (self._sync, self._given_async):
            if side is not None:
                side.flights.reset_after_fork()
                side.background = Background()
        if self._sync is not None and self._sync.held is not None:
            self._sync.held.reset_after_fork()  # the parent's sockets
        if self._given_async is not None:
            self._given_async.tasks = set()
        self._by_loop = {}
        self._last_async = (None, None)
        self._unreached = None

    # -- making sides ----------------------------------------------------------------

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
                breaker=unrouted(self._breaker),
                outbox=self._outbox,
            )
        side.client.failure = failure
        return side

    def _sweep_closed_loops(self) -> None:
        """Drop the sides of loops closed without shutting down their async generators
        (a hand-made loop.close()): nothing can run on them any more."""
        for loop in [loop for loop in self._by_loop if loop.is_closed()]:
            del self._by_loop[loop]

    def _forget_loop(self, loop: asyncio.AbstractEventLoop, side: AsyncRuntime) -> None:
        if self._by_loop.get(loop) is side:
            del self._by_loop[loop]
        if self._last_async[1] is side:
            self._last_async = (None, None)


class _CurrentSyncClient:
    """The engine's sync client as it is when used (a stand-in while a cluster is not
    reached, the cluster client once it is)."""

    def __init__(self, sides: Sides) -> None:
        self._sides = sides

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sides.sync_side().client, name)


# How long a loop's closer lets releases after cancellations reach Redis.
LOOP_END_SECONDS = 1.0


def _close_with_loop(sides: Sides, loop: asyncio.AbstractEventLoop, side: AsyncRuntime) -> None:
    """Close `side`'s client and drop it from `sides` when `loop` shuts down.

    asyncio.run(), asyncio.Runner and asgiref's async_to_sync close every async
    generator of a loop before closing it (loop.shutdown_asyncgens()): a generator
    started here, suspended at its only yield, runs its finally block then, on the
    loop, where the client can still be closed properly.
    """
    owner = weakref.ref(sides)

    async def closer() -> AsyncIterator[None]:
        try:
            yield
        finally:
            alive = owner()
            if alive is not None:
                alive._forget_loop(loop, side)
            if side.tasks:  # releases after cancellations: let them reach Redis
                await asyncio.wait(list(side.tasks), timeout=LOOP_END_SECONDS)
            if side.pipeline is not None:
                await side.pipeline.close()
            await side.client.aclose()

    generator = closer()
    step: Any = generator.__anext__()  # registers the generator with the running loop
    with contextlib.suppress(StopIteration):
        step.send(None)  # runs it to its yield: nothing in between awaits
    side.closer = generator  # the loop holds its generators weakly
