"""Keeping the leases of loads in flight (Leased): while the loader runs, its locks
are renewed every third of their ttl, as Redisson's watchdog does, so that a lease
can be short (a dead holder frees its keys within one) and still outlast a slow
loader. The flows decide what to renew; this module only keeps time: one thread for
every sync load of the process, a timer per async load. A load that ends before its
first renewal costs no Redis round trip.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import threading
from time import monotonic
from typing import Any

from ._effects import Batch, Command, CommandFailed, Leased, RunScript
from ._pipelines import send_batch, send_batch_async
from ._runtime import AsyncRuntime, SyncRuntime

logger = logging.getLogger("cached_aside")

_running: set[Renewal] = set()  # renewals started and not yet stopped, for tests


class Renewal:
    """The renewal of one Leased load's locks: the groups still renewed."""

    __slots__ = ("every", "groups", "stopped")

    def __init__(self, leased: Leased) -> None:
        self.groups: list[tuple[RunScript, ...]] = list(leased.renewals)
        self.every = leased.every_ms / 1000.0
        self.stopped = False
        _running.add(self)

    def batch(self) -> list[Command | RunScript]:
        return [effect for group in self.groups for effect in group]

    def settle(self, replies: list[Any]) -> bool:
        """Keep the groups Redis renewed in full; True while one is left to renew."""
        kept, at = [], 0
        for group in self.groups:
            answers = replies[at : at + len(group)]
            at += len(group)
            if all(type(answer) is not CommandFailed and answer for answer in answers):
                kept.append(group)
        self.groups = kept
        if not kept:
            self.stop()
        return bool(kept)

    def stop(self) -> None:
        """No more renewals: the load ended, or nothing is left to renew."""
        self.stopped = True
        _running.discard(self)


def running() -> int:
    """How many loads' leases are being kept now (0 once every load has ended)."""
    return len(_running)


# -- sync: a thread per Redis client renews its sync loads' leases ---------------
# One thread per runtime, not per process: a renewal waits on its Redis (a hung
# server, a client without socket_timeout), and must not make the leases of loads on
# another engine's healthy server lapse meanwhile. A thread ends when it has nothing
# left to renew; the next load starts another.


class _Renewer:
    """A heap of one runtime's renewals by when they are due, and the thread that
    sends them while any is left. Stopped renewals are skipped lazily."""

    def __init__(self, key: int) -> None:
        self._key = key
        self._due: list[tuple[float, int, SyncRuntime, Renewal]] = []
        self._order = itertools.count()
        self._wake = threading.Condition(threading.Lock())
        self._until = float("inf")  # when the thread wakes by itself next
        self._thread: threading.Thread | None = None

    def start(self, rt: SyncRuntime, renewal: Renewal) -> None:
        due = monotonic() + renewal.every
        with self._wake:
            heapq.heappush(self._due, (due, next(self._order), rt, renewal))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="cached_aside-leases", daemon=True
                )
                self._thread.start()
            elif due < self._until:
                self._wake.notify()

    def _run(self) -> None:
        while True:
            ready = self._next_due()
            if ready is None and self._retire():
                return
            for rt, renewals in ready or ():
                self._renew(rt, renewals)

    def _retire(self) -> bool:
        """End the thread if nothing was started meanwhile (locks taken in renew's order)."""
        with _renewers_lock, self._wake:
            if self._due:
                return False
            self._thread = None
            if _renewers.get(self._key) is self:
                del _renewers[self._key]
            return True

    def _next_due(self) -> list[tuple[SyncRuntime, list[Renewal]]] | None:
        """Wait until renewals are due; those, by runtime; None when none is left."""
        with self._wake:
            while True:
                while self._due and self._due[0][3].stopped:
                    heapq.heappop(self._due)
                if not self._due:
                    return None
                self._until = self._due[0][0]
                left = self._until - monotonic()
                if left <= 0:
                    break
                self._wake.wait(left)
            now = monotonic()
            ready: dict[int, tuple[SyncRuntime, list[Renewal]]] = {}
            while self._due and self._due[0][0] <= now:
                _, _, rt, renewal = heapq.heappop(self._due)
                if not renewal.stopped:
                    ready.setdefault(id(rt), (rt, []))[1].append(renewal)
            self._until = float("inf")  # busy: a start() need not wake it
        return list(ready.values())

    def _renew(self, rt: SyncRuntime, renewals: list[Renewal]) -> None:
        sent = monotonic()
        try:
            replies = send_batch(rt, Batch([e for r in renewals for e in r.batch()]))
        except BaseException:  # a thread has nobody to raise to: these stop
            logger.debug("renewing leases failed", exc_info=True)
            replies = [None] * sum(len(r.batch()) for r in renewals)
        at = 0
        for renewal in renewals:
            size = len(renewal.batch())
            if renewal.settle(replies[at : at + size]) and not renewal.stopped:
                with self._wake:
                    due = sent + renewal.every
                    heapq.heappush(self._due, (due, next(self._order), rt, renewal))
            at += size


_renewers: dict[int, _Renewer] = {}  # by id() of the runtime (a runtime is unhashable)
_renewers_lock = threading.Lock()


def forget_after_fork() -> None:
    """A child has none of its parent's threads or loads: it starts its own renewers
    when it first loads, and never renews the parent's leases."""
    global _renewers_lock
    _renewers.clear()
    _renewers_lock = threading.Lock()  # a parent's thread may have held it
    _running.clear()


def renew(rt: SyncRuntime, leased: Leased) -> Renewal:
    """Keep `leased`'s leases from a thread until the returned Renewal is stopped."""
    renewal = Renewal(leased)
    with _renewers_lock:
        # A dead runtime's id may be reused: sharing its idle renewer is harmless.
        renewer = _renewers.get(id(rt))
        if renewer is None:
            renewer = _renewers[id(rt)] = _Renewer(id(rt))
        renewer.start(rt, renewal)
    return renewal


# -- async: a timer per load, a task once a renewal is due -----------------------


class AsyncRenewal(Renewal):
    """A Renewal on an event loop: nothing runs until the first renewal is due."""

    __slots__ = ("_rt", "_sending", "_task", "_timer")

    def __init__(self, rt: AsyncRuntime, leased: Leased) -> None:
        super().__init__(leased)
        self._rt = rt
        self._task: asyncio.Task[None] | None = None
        self._sending = False
        self._timer = asyncio.get_running_loop().call_later(self.every, self._due)

    def _due(self) -> None:
        if not self.stopped:
            self._task = self._rt.keep(self._renew())

    async def _renew(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.stopped:
            sent = loop.time()
            self._sending = True
            try:
                replies = await send_batch_async(self._rt, Batch(self.batch()))
            except asyncio.CancelledError:
                raise
            except BaseException:  # nobody awaits this task: these leases stop
                logger.debug("renewing leases failed", exc_info=True)
                replies = [None] * len(self.batch())
            finally:
                self._sending = False
            if self.stopped or not self.settle(replies):
                return
            await asyncio.sleep(max(0.0, sent + self.every - loop.time()))

    def stop(self) -> None:
        super().stop()
        self._timer.cancel()
        # A renewal on its way is left to finish (fenced, it is harmless after the
        # store); a sleeping one is woken to end.
        if self._task is not None and not self._task.done() and not self._sending:
            self._task.cancel()


def arenew(rt: AsyncRuntime, leased: Leased) -> AsyncRenewal:
    """Keep `leased`'s leases from this event loop until the returned renewal is
    stopped."""
    return AsyncRenewal(rt, leased)
