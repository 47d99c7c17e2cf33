"""The outbox's deliveries: one background thread per engine (a task, for an engine
with only an async client) that retries what the outbox holds until Redis takes it,
and the last attempt of close() and aclose().

Its runtime has a breaker of its own that never opens: these deliveries are how
Redis is found back, and when they land the engine's breaker closes too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import Callable
from time import monotonic
from typing import TypeVar

from ._breaker import CircuitBreaker
from ._drivers import arun, no_seal, run
from ._invalidations import deliver
from ._loads import NO_LOADS
from ._outbox import Delivery, Outbox
from ._runtime import AsyncRuntime, SyncRuntime

logger = logging.getLogger("cached_aside")
R = TypeVar("R", SyncRuntime, AsyncRuntime)

# Soon after a failure, then at most this far apart: a pending invalidation lands
# within about 50 ms of Redis answering again, and a dead Redis costs 20 tries a second.
FIRST_RETRY_SECONDS = 0.005
MAX_RETRY_SECONDS = 0.05
_NEVER_OPENS = 2**62


class Flusher:
    """Delivers one engine's outbox. `sync_runtime` makes (or returns) the engine's
    sync runtime, None when it can have none; then the engine's one async runtime
    (`async_runtime`) runs the flusher as a task of its loop."""

    def __init__(
        self,
        outbox: Outbox,
        breaker: CircuitBreaker,
        sync_runtime: Callable[[], SyncRuntime] | None,
        async_runtime: Callable[[], AsyncRuntime | None],
    ) -> None:
        self.outbox = outbox
        self.breaker = breaker
        self.sync_runtime = sync_runtime
        self.async_runtime = async_runtime
        self.stopping = threading.Event()  # close(): stop retrying
        self.task: asyncio.Task[None] | None = None  # the async flusher, if one runs
        self.told: frozenset[str] = frozenset()  # what the last close logged as left
        outbox.start_flusher = self.start

    def start(self) -> None:
        if self.sync_runtime is not None:
            threading.Thread(target=self._retry, name="cached_aside-outbox", daemon=True).start()
            return
        runtime = self.async_runtime()
        assert runtime is not None, "an engine without clients has nothing to flush"
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # outside its loop (close(), a forked child): the next add() in it
            self.outbox.stand_down()
            return
        self.task = runtime.keep(self._aretry(runtime))
        self.task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():  # maybe before it ran (its loop ended): it kept its turn
            self.outbox.stand_down()

    def _retry(self) -> None:
        assert self.sync_runtime is not None
        runtime = self._own(self.sync_runtime())
        delay = FIRST_RETRY_SECONDS
        while True:
            delivery = self.outbox.take()
            if not delivery:
                return
            if self._settle(delivery, run(deliver(delivery), runtime, NO_LOADS, no_seal)[0]):
                delay = FIRST_RETRY_SECONDS
                continue
            if self.stopping.is_set():
                self.outbox.stand_down()
                if not self.stopping.is_set():  # close() finished meanwhile: carry on
                    self.outbox.kick()
                return
            self.outbox.wake.wait(delay)
            self.outbox.wake.clear()
            delay = min(MAX_RETRY_SECONDS, delay * 2)

    async def _aretry(self, given: AsyncRuntime) -> None:
        runtime = self._own(given)
        delay = FIRST_RETRY_SECONDS
        try:
            while True:
                delivery = self.outbox.take()
                if not delivery:
                    return
                landed = (await arun(deliver(delivery), runtime, NO_LOADS, no_seal))[0]
                if self._settle(delivery, landed):
                    delay = FIRST_RETRY_SECONDS
                    continue
                if self.stopping.is_set():  # aclose() takes over
                    self.outbox.stand_down()
                    return
                await asyncio.sleep(delay)
                delay = min(MAX_RETRY_SECONDS, delay * 2)
        except BaseException:
            self.outbox.stand_down()  # cancelled with its loop: the next add() starts one
            raise

    def flush(self, timeout: float) -> None:
        """close(): a last attempt to deliver everything, for `timeout` seconds."""
        if self.sync_runtime is None or not self.outbox.pending_any():
            return
        runtime = self._own(self.sync_runtime())
        deadline = monotonic() + timeout
        while monotonic() < deadline:
            delivery = self.outbox.peek()
            landed = run(deliver(delivery), runtime, NO_LOADS, no_seal)[0] if delivery else None
            if landed is None or self._settle(delivery, landed):
                break
            self.stopping.wait(MAX_RETRY_SECONDS)
        self.log_undelivered()

    async def aflush(self, given: AsyncRuntime, timeout: float) -> None:
        """aclose() of an engine with only an async client: as flush()."""
        if not self.outbox.pending_any():
            return
        runtime = self._own(given)
        deadline = monotonic() + timeout
        while monotonic() < deadline:
            delivery = self.outbox.peek()
            try:
                flow = arun(deliver(delivery), runtime, NO_LOADS, no_seal)
                landed = (await asyncio.wait_for(flow, deadline - monotonic()))[0]
            except asyncio.TimeoutError:
                break
            if not delivery or self._settle(delivery, landed):
                break
            await asyncio.sleep(MAX_RETRY_SECONDS)
        self.log_undelivered()

    def _own(self, runtime: R) -> R:
        return dataclasses.replace(runtime, breaker=CircuitBreaker(_NEVER_OPENS, 0.0))

    def _settle(self, delivery: Delivery, landed: Delivery) -> bool:
        """Record a delivery; True when all of it landed."""
        self.outbox.landed(landed)
        complete = (
            len(landed.keys) == len(delivery.keys)
            and len(landed.patterns) == len(delivery.patterns)
            and len(landed.releases) == len(delivery.releases)
            and len(landed.tags) == len(delivery.tags)
        )
        if complete and self.breaker.failures:
            self.breaker.success()  # Redis answers: callers need not wait for a probe
        return complete

    def log_undelivered(self) -> None:
        left = self.outbox.pending()
        self.told = frozenset(left)
        if left:
            logger.error(
                "closing with %d invalidation(s) Redis never took (%s%s); those entries "
                "stay in Redis until their ttl runs out",
                len(left),
                ", ".join(left[:5]),
                ", ..." if len(left) > 5 else "",
            )
