"""Deliveries: an engine's outbox of writes Redis did not take, and the flusher that
retries them until it does; their last attempt when the engine closes.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

from ._breaker import CircuitBreaker
from ._flusher import Flusher
from ._outbox import Outbox
from ._runtime import AsyncRuntime, SyncRuntime


class Deliveries:
    """The outbox and its flusher. `sync_runtime` gives the engine's sync side (None
    when it can have none); the flusher then runs on the one given async side."""

    def __init__(
        self,
        breaker: CircuitBreaker,
        sync_runtime: Callable[[], SyncRuntime] | None,
        async_runtime: Callable[[], AsyncRuntime | None],
    ) -> None:
        self.outbox = Outbox()
        self.flusher = Flusher(self.outbox, breaker, sync_runtime, async_runtime)

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The async flusher's task, while one runs."""
        return self.flusher.task

    def pending(self) -> list[str]:
        """What Redis has not taken yet (keys, and patterns of bulk invalidations)."""
        return self.outbox.pending()

    def busy(self) -> bool:
        """Whether anything waits to be delivered."""
        return self.outbox.pending_any()

    def stop_retrying(self) -> None:
        """aclose(): an async flusher hands over to the last attempt."""
        self.flusher.stopping.set()

    def close(self, timeout: float) -> None:
        """A last attempt, for up to `timeout` seconds, to deliver what is pending
        (logging what Redis never took); what is left is still retried afterwards."""
        self.flusher.stopping.set()
        self.outbox.wake.set()
        try:
            self.flusher.flush(timeout)
        finally:
            self.flusher.stopping.clear()
            self.outbox.kick()  # anything left is still retried while the process runs

    async def aclose(self, timeout: float) -> None:
        """close() for an engine with only an async client: its last attempt runs on
        that client, in this loop."""
        side = self.flusher.async_runtime()
        if side is not None and self.flusher.sync_runtime is None:
            await self.flusher.aflush(side, timeout)
        self.flusher.stopping.clear()

    def at_exit(self, timeout: float) -> None:
        """Interpreter exit: a last attempt, as close(), when a sync client can make
        it (an async-only engine's loop is gone by now); whatever is left is logged,
        never dropped in silence. Nothing new since a close() logged what was left
        (the Django integration closes at exit too): that was the last attempt."""
        if not self.outbox.pending_any() or set(self.outbox.pending()) <= self.flusher.told:
            return
        if self.flusher.sync_runtime is not None:
            self.close(timeout)
        else:
            self.flusher.log_undelivered()

    def after_fork(self) -> None:
        """No flusher came along; start one if the engine can (a sync client), else
        the next add() does. The pending work stays: the child must not serve it."""
        self.flusher.stopping = threading.Event()
        self.flusher.task = None
        self.outbox.reset_after_fork(can_flush=self.flusher.sync_runtime is not None)
