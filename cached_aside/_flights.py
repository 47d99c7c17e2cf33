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

from ._plan import Served

Answer = tuple[Served, float]


def _no_seal() -> None:
    """The seal of a read nobody can join."""


_EXPIRED = "expired"  # a task joiner's patience ran out


class _Flight:
    """One read in progress; `seal` stops later callers from joining it."""

    __slots__ = ("answer", "done", "error", "joiners", "key", "registry")

    def __init__(self, registry: _Registry, key: str) -> None:
        self.registry = registry
        self.key = key
        self.answer: Answer | None = None
        self.error: BaseException | None = None
        self.done: threading.Event | None = None  # set when the leader is done (threads)
        self.joiners: list[asyncio.Future[Any]] | None = None  # (tasks)

    def seal(self) -> None:
        self.registry.close(self)

    # `with flight:` is the leader's read: its error is kept for the joiners, and
    # however it ends, the flight closes and its joiners wake (threads and tasks
    # alike). Methods rather than a @contextmanager: this is on every hit, and a
    # generator-based one costs a generator and two more calls.
    def __enter__(self) -> _Flight:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: object
    ) -> None:
        if error is not None:
            self.error = error
        self.finish()

    def finish(self) -> None:
        """Close the flight, forget it as running, and wake its joiners."""
        self.registry.close(self)
        self.registry.ended(self)
        self.wake()

    def wake(self) -> None:
        """Wake the flight's joiners, threads and tasks alike."""
        if self.done is not None:
            self.done.set()
        for joined in self.joiners or ():
            if not joined.done():
                joined.set_result(None)

    def outcome(self, *, reads_shared: bool) -> Answer | None:
        """For a joiner: the leader's answer, None to read again, or the leader's error.

        A shareable answer (a load whose lease held until the store, or a read sent
        after the flight was sealed) is fresh for every joiner. Any other read is
        handed over only when `reads_shared`: it may predate the joiner.
        """
        error = self.error
        if error is not None:
            if isinstance(error, Exception):
                raise error
            return None  # the leader was cancelled or interrupted
        answer = self.answer
        if answer is None or not answer[0].lease_kept:
            return None
        if not reads_shared and not answer[0].shareable:
            return None
        return answer


class _Reload(_Flight):
    """An fn.refresh() flight: joinable by other refreshes until its load begins (it
    seals itself then), and known to its registry until it ends, so later refreshes
    wait for it. Plain calls never join it, as they keep outcomes of their own (a
    stale value on a failure, say): a call about to load waits for it (refreshing)
    and then looks again."""

    __slots__ = ("open", "refresh")

    def __init__(self, registry: _Registry, key: str) -> None:
        super().__init__(registry, key)
        self.open = True
        self.refresh = True  # False: a background reload

    def seal(self) -> None:
        self.open = False

    def finish(self) -> None:
        """As a read's, but the registry forgets the reload before its joiners wake,
        so that a refresh woken to take its turn finds the key free."""
        self.registry.end_reload(self)
        self.wake()


class _Registry:
    def __init__(self) -> None:
        self.active: dict[str, _Flight] = {}  # the flight a caller of the key joins
        # Every call's flight from its start to its end, sealed or forgotten ones too
        # (a sealed flight may still load: a waiter woken looks again and may take the
        # lock), for refreshes to wait for: a refresh revokes the lock, so the Redis
        # lock cannot keep it from loading beside a load of this process.
        self.running: dict[str, list[_Flight]] = {}
        self.reloading: dict[str, _Reload] = {}  # a refresh in progress, until it ends
        self.following: dict[str, _Reload] = {}  # the refresh to run after the flight
        self.waiting = 0  # callers waiting for another's flight now (for observers)

    def close(self, flight: _Flight) -> None:
        if self.active.get(flight.key) is flight:
            self.active.pop(flight.key, None)

    def end_reload(self, flight: _Reload) -> None:
        for place in (self.reloading, self.following):
            if place.get(flight.key) is flight:
                del place[flight.key]

    def started(self, flight: _Flight) -> None:
        self.running.setdefault(flight.key, []).append(flight)

    def ended(self, flight: _Flight) -> None:
        flights = self.running.get(flight.key)
        if flights is not None and flight in flights:
            flights.remove(flight)
            if not flights:
                del self.running[flight.key]

    def _in_progress(self, key: str) -> _Flight | None:
        """A refresh in progress, else a call's flight running (the first)."""
        flights = self.running.get(key)
        return self.reloading.get(key) or (flights[0] if flights else None)

    def _reload_turn(self, key: str) -> tuple[str, _Reload, _Flight | None]:
        """What a refresh of `key` does now: ("join", the reload to join, None), or
        ("lead", its new reload, the flight to wait for first, if any)."""
        current = self.reloading.get(key)
        if current is not None and current.open:
            return "join", current, None  # its load has not begun: it is fresh for us
        before = current or self._in_progress(key)
        if before is None:
            flight = self.reloading[key] = _Reload(self, key)
            return "lead", flight, None
        following = self.following.get(key)
        if following is not None:
            return "join", following, None
        following = self.following[key] = _Reload(self, key)
        return "lead", following, before

    def behind(self, key: str) -> _Reload | None:
        """A background reload (refresh_ahead, grace) of `key`, known until it ends so
        that fn.refresh() waits for it; None while a refresh is under way instead."""
        if key in self.reloading or key in self.following:
            return None
        flight = self.reloading[key] = _Reload(self, key)
        flight.open = flight.refresh = False  # nothing to join: it reloads for nobody
        return flight

    def refreshing(self, key: str) -> _Reload | None:
        """The fn.refresh() of `key` under way, which a call about to load waits for
        (then looks again) rather than load beside it."""
        flight = self.reloading.get(key)
        return flight if flight is not None and flight.refresh else None

    def _take_turn(self, flight: _Reload) -> _Flight | None:
        """The reload `flight` starts if no flight of its key runs: None; else the
        flight to wait for first."""
        key = flight.key
        before = self._in_progress(key)
        if before is not None and before is not flight:
            return before
        if self.following.get(key) is flight:
            del self.following[key]
        self.reloading[key] = flight
        return None

    def take(self, key: str) -> _Flight | None:
        """A new flight of `key` for a batch to lead, or None while a flight or a
        reload of the key is under way here (the batch joins it instead)."""
        if key in self.active or key in self.reloading:
            return None
        flight = self.active[key] = _Flight(self, key)
        self.started(flight)
        return flight

    def forget(self, key: str) -> None:
        """Let later callers read afresh instead of joining a read already under way."""
        self.active.pop(key, None)

    def forget_all(self) -> None:
        """forget() for every key: after a bulk invalidation."""
        self.active.clear()

    def reset_after_fork(self) -> None:
        """In a forked child: the leaders of these flights did not come along."""
        self.active = {}
        self.running = {}
        self.reloading = {}
        self.following = {}
        self.waiting = 0


class Led:
    """The flights one flow leads for the keys of a batch (Lead, Land effects): each
    ends with the outcome landed for it, else as the flow ended."""

    __slots__ = ("flights", "registry")

    def __init__(self, registry: _Registry) -> None:
        self.registry = registry
        self.flights: dict[str, _Flight] = {}

    def lead(self, keys: tuple[str, ...]) -> tuple[bool, ...]:
        led = []
        for key in keys:
            flight = self.registry.take(key)
            if flight is not None:
                self.flights[key] = flight
            led.append(flight is not None)
        return tuple(led)

    def seal(self) -> None:
        for flight in self.flights.values():
            self.registry.close(flight)

    def land(self, outcomes: tuple[tuple[str, Any], ...]) -> None:
        for key, outcome in outcomes:
            flight = self.flights.pop(key)
            if isinstance(outcome, BaseException):
                flight.error = outcome
            elif outcome is not None:
                flight.answer = (outcome, 0.0)
            flight.finish()

    def end(self, error: BaseException | None) -> None:
        """However the flow ended: the flights it did not land end with its error
        (None: it returned, and their joiners read for themselves)."""
        flights, self.flights = self.flights, {}
        for flight in flights.values():
            flight.error = error
            flight.finish()


class ThreadFlights(_Registry):
    """Coalesces calls made from threads."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()

    def close(self, flight: _Flight) -> None:
        with self._lock:  # compare-and-delete: never remove a newer flight
            super().close(flight)

    def forget(self, key: str) -> None:
        with self._lock:
            super().forget(key)

    def forget_all(self) -> None:
        with self._lock:
            super().forget_all()

    def end_reload(self, flight: _Reload) -> None:
        with self._lock:
            super().end_reload(flight)

    def ended(self, flight: _Flight) -> None:
        with self._lock:
            super().ended(flight)

    def take(self, key: str) -> _Flight | None:
        with self._lock:
            flight = super().take(key)
            if flight is not None:
                flight.done = threading.Event()
            return flight

    def behind(self, key: str) -> _Reload | None:
        with self._lock:
            flight = super().behind(key)
            if flight is not None:
                flight.done = threading.Event()
            return flight

    def reset_after_fork(self) -> None:
        self._lock = threading.Lock()  # it may have been held by a thread now gone
        super().reset_after_fork()

    def wait_for(self, flight: _Flight, patience: float) -> bool:
        """Wait for `flight` to end; False when `patience` ran out first."""
        return self._wait(flight, patience)

    def _wait(self, flight: _Flight, patience: float) -> bool:
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
        flight = _Flight(self, key)
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
        flight = _Flight(self, key)
        # An Event wakes every joiner at once; a held lock would hand over one by one.
        flight.done = threading.Event()
        with self._lock:  # a refresh may be taking its turn (_reload_turn) right now
            current = self.active.setdefault(key, flight)
            if current is flight:
                self.started(flight)
        if current is not flight:
            if not self._wait(current, patience):
                return self._alone(key, serve, args), False
            # A thread can lose the GIL for milliseconds between a reply and its
            # return, long enough for an invalidation elsewhere to complete: take only
            # answers that are fresh for anyone who joined before the seal.
            answer = current.outcome(reads_shared=False)
            return None if answer is None else (answer, True)
        with flight:
            flight.answer = serve(*args, flight.seal)
        return flight.answer, False

    def reload(
        self, key: str, patience: float, serve: Callable[..., Answer], *args: Any
    ) -> tuple[Answer, bool]:
        """fn.refresh(): join a reload of `key` whose load has not begun, or lead the
        next one once the key's flight in progress has ended. Returns the answer and
        whether it was joined."""
        while True:
            with self._lock:
                role, flight, before = self._reload_turn(key)
                if flight.done is None:
                    flight.done = threading.Event()
            if role == "join":
                # Twice the patience: its leader may wait for the flight before it first.
                if not self._wait(flight, 2 * patience):
                    return self._alone(key, serve, args), False
                answer = flight.outcome(reads_shared=False)
                if answer is not None:
                    return answer, True
                continue
            with flight:
                while before is not None and self._wait(before, patience):
                    with self._lock:
                        before = self._take_turn(flight)
                if before is not None:  # stuck past the lock's ttl: go ahead regardless
                    with self._lock:
                        self.following.pop(key, None)
                        self.reloading[key] = flight
                flight.answer = serve(*args, flight.seal)
            return flight.answer, False


def _expire(joined: asyncio.Future[Any]) -> None:
    if not joined.done():
        joined.set_result(_EXPIRED)


class TaskFlights(_Registry):
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
        flight = self.active[key] = _Flight(self, key)
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

    async def wait_for(self, flight: _Flight, patience: float) -> bool:
        """Wait for `flight` to end; False when `patience` ran out first."""
        return await self._wait(flight, patience)

    async def _alone(
        self, key: str, serve: Callable[..., Awaitable[Answer]], args: tuple[Any, ...]
    ) -> Answer:
        """As ThreadFlights._alone, for tasks."""
        flight = _Flight(self, key)
        self.started(flight)
        with flight:
            return await serve(*args, _no_seal)

    async def _wait(self, flight: _Flight, patience: float) -> bool:
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
