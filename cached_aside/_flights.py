"""In-process single-flight: concurrent callers of one key share one read.

The first caller leads; later callers join and receive its answer. A joiner reads
again by itself when the leader was cancelled, or when the leader's lease was
revoked (its value predates an invalidation). Redis's lock then coordinates
processes; this only spares Redis and the primary the duplicates.

A joiner waits at most `patience` (Plan.patience): a leader stuck longer is
treated as another process would treat it, and the joiner reads by itself.

fn.refresh() calls share a reload too, but only one whose load has not begun (its
flow seals it then): a refresh arriving later waits for the key's flight in
progress, whatever it is, and leads or joins the next reload; a call about to load
waits for a refresh under way, then looks again. So a process runs at most one load
per key at a time (background reloads included), and every caller joined to a load
gets its outcome.

Threads and tasks share only the miss path, and only answers sealed against
staleness (a load whose lease held, or a read sent after the flight stopped taking
joiners): a hit costs one command either way (tasks' commands go out together on
the loop's shared connection), and any other read may predate an invalidation that
completed before the joiner began: a thread's while it waited for the GIL, a
task's while its reply waited in the socket for the loop to read it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from ._flight_registry import Answer, Flight, Registry, Reload


def _no_seal() -> None:
    """The seal of a read nobody can join."""


_EXPIRED = "expired"  # a task joiner's patience ran out


class ThreadFlights(Registry):
    """Coalesces calls made from threads."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()

    def close(self, flight: Flight) -> None:
        with self._lock:  # compare-and-delete: never remove a newer flight
            super().close(flight)

    def forget(self, key: str) -> None:
        with self._lock:
            super().forget(key)

    def forget_all(self) -> None:
        with self._lock:
            super().forget_all()

    def end_reload(self, flight: Reload) -> None:
        with self._lock:
            super().end_reload(flight)

    def ended(self, flight: Flight) -> None:
        with self._lock:
            super().ended(flight)

    def take(self, key: str) -> Flight | None:
        with self._lock:
            flight = super().take(key)
            if flight is not None:
                flight.done = threading.Event()
            return flight

    def behind(self, key: str) -> Reload | None:
        with self._lock:
            flight = super().behind(key)
            if flight is not None:
                flight.done = threading.Event()
            return flight

    def reset_after_fork(self) -> None:
        self._lock = threading.Lock()  # it may have been held by a thread now gone
        super().reset_after_fork()

    def wait_for(self, flight: Flight, patience: float) -> bool:
        """Wait for `flight` to end; False when `patience` ran out first."""
        return self._wait(flight, patience)

    def _wait(self, flight: Flight, patience: float) -> bool:
        assert flight.done is not None
        with self._lock:
            self.waiting += 1
        try:
            return flight.done.wait(patience)
        finally:
            with self._lock:
                self.waiting -= 1

    def _alone(self, key: str, serve: Callable[..., Answer], args: tuple[Any, ...]) -> Answer:
        """A read by itself, its patience with another's flight out: nobody joins it,
        but it may load (or revoke the lock, a refresh's), so refreshes wait for it."""
        flight = Flight(self, key)
        flight.done = threading.Event()
        with flight:
            with self._lock:
                self.started(flight)
            return serve(*args, _no_seal)

    def run(
        self, key: str, patience: float, serve: Callable[..., Answer], *args: Any
    ) -> tuple[Answer, bool] | None:
        """Lead (calling `serve(*args, seal)`) or join the read of `key`.

        Returns the answer and whether it was joined, or None when the caller must
        read for itself: the leader's answer was not a load it can share. A joiner
        whose leader takes longer than `patience` seconds reads alone.
        """
        flight = Flight(self, key)
        # An Event wakes every joiner at once; a held lock would hand over one by one.
        flight.done = threading.Event()
        # Registered inside `with flight:`, so that it ends however the call ends: a
        # KeyboardInterrupt lands at any Python call, started() and __enter__
        # included, and would have left it in `active` for good. Not ours to lead,
        # it ends here having been nobody's (nothing to close, nobody to wake).
        with flight:
            with self._lock:  # a refresh may be taking its turn (_reload_turn) now
                current = self.active.setdefault(key, flight)
                if current is flight:
                    self.started(flight)
            if current is flight:
                flight.answer = serve(*args, flight.seal)
                return flight.answer, False
        if not self._wait(current, patience):
            return self._alone(key, serve, args), False
        # A thread can lose the GIL for milliseconds between a reply and its return,
        # long enough for an invalidation elsewhere to complete: take only answers
        # that are fresh for anyone who joined before the seal.
        answer = current.outcome(reads_shared=False)
        return None if answer is None else (answer, True)

    def reload(
        self, key: str, patience: float, serve: Callable[..., Answer], *args: Any
    ) -> tuple[Answer, bool]:
        """fn.refresh(): join a reload of `key` whose load has not begun, or lead the
        next one once the key's flight in progress has ended. Returns the answer and
        whether it was joined."""
        while True:
            led: Reload | None = None
            try:  # a reload this call leads ends however the call ends (as run's)
                with self._lock:
                    role, flight, before = self._reload_turn(key)
                    if role == "lead":  # no Python call in between: no interrupt lands
                        led = flight
                    if flight.done is None:
                        flight.done = threading.Event()
                if led is not None:
                    while before is not None and self._wait(before, patience):
                        with self._lock:
                            before = self._take_turn(led)
                    if before is not None:  # stuck past the lock's ttl: go ahead anyway
                        with self._lock:
                            self.following.pop(key, None)
                            self.reloading[key] = led
                    led.answer = serve(*args, led.seal)
                    return led.answer, False
            except BaseException as error:
                if led is not None:
                    led.error = error  # as `with flight:` keeps it, for the joiners
                raise
            finally:
                if led is not None:
                    led.finish()
            # Twice the patience: its leader may wait for the flight before it first.
            if not self._wait(flight, 2 * patience):
                return self._alone(key, serve, args), False
            answer = flight.outcome(reads_shared=False)
            if answer is not None:
                return answer, True


def _expire(joined: asyncio.Future[Any]) -> None:
    if not joined.done():
        joined.set_result(_EXPIRED)


class TaskFlights(Registry):
    """Coalesces calls made from asyncio tasks of one event loop (one thread)."""

    async def run(
        self, key: str, patience: float, serve: Callable[..., Awaitable[Answer]], *args: Any
    ) -> tuple[Answer, bool] | None:
        """Lead (awaiting `serve(*args, seal)`) or join the miss of `key`.

        Returns the answer and whether it was joined, or None when the caller must
        read for itself: the leader's answer was not a load it can share (a read
        may predate the joiner: its reply can wait in the socket while an
        invalidation completes and the joiner begins). A joiner whose leader takes
        longer than `patience` seconds reads alone.
        """
        current = self.active.get(key)
        if current is not None:
            if not await self._wait(current, patience):
                return await self._alone(key, serve, args), False
            answer = current.outcome(reads_shared=False)
            return None if answer is None else (answer, True)
        flight = self.active[key] = Flight(self, key)
        self.started(flight)
        try:
            flight.answer = await serve(*args, flight.seal)
        except BaseException as error:
            flight.error = error
            raise
        finally:
            if self.active.get(key) is flight:
                del self.active[key]
            self.ended(flight)
            if flight.joiners:
                flight.wake()
        return flight.answer, False

    async def reload(
        self, key: str, patience: float, serve: Callable[..., Awaitable[Answer]], *args: Any
    ) -> tuple[Answer, bool]:
        """As ThreadFlights.reload, for tasks."""
        while True:
            role, flight, before = self._reload_turn(key)
            if role == "join":
                if not await self._wait(flight, 2 * patience):
                    return await self._alone(key, serve, args), False
                answer = flight.outcome(reads_shared=False)
                if answer is not None:
                    return answer, True
                continue
            with flight:
                while before is not None and await self._wait(before, patience):
                    before = self._take_turn(flight)
                if before is not None:  # stuck past the lock's ttl: go ahead regardless
                    self.following.pop(key, None)
                    self.reloading[key] = flight
                flight.answer = await serve(*args, flight.seal)
            return flight.answer, False

    async def wait_for(self, flight: Flight, patience: float) -> bool:
        """Wait for `flight` to end; False when `patience` ran out first."""
        return await self._wait(flight, patience)

    async def _alone(
        self, key: str, serve: Callable[..., Awaitable[Answer]], args: tuple[Any, ...]
    ) -> Answer:
        """As ThreadFlights._alone, for tasks."""
        flight = Flight(self, key)
        self.started(flight)
        with flight:
            return await serve(*args, _no_seal)

    async def _wait(self, flight: Flight, patience: float) -> bool:
        loop = asyncio.get_running_loop()
        joined: asyncio.Future[Any] = loop.create_future()
        if flight.joiners is None:
            flight.joiners = []
        flight.joiners.append(joined)
        expiry = loop.call_later(patience, _expire, joined)
        self.waiting += 1
        try:
            return bool(await joined != _EXPIRED)
        finally:
            expiry.cancel()
            self.waiting -= 1
