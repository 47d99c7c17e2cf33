"""The registry behind single flight (_flights.py): which flight of a key is in
progress, which callers may still join it, the reloads queued behind it, and what a
batch flow leads (Led). No waiting here: ThreadFlights and TaskFlights wait, each its
own way.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from ._plan import Served

Answer = tuple[Served, float]


class Flight:
    """One read in progress; `seal` stops later callers from joining it."""

    __slots__ = ("answer", "done", "error", "joiners", "key", "registry")

    def __init__(self, registry: Registry, key: str) -> None:
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
    def __enter__(self) -> Flight:
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


class Reload(Flight):
    """An fn.refresh() flight: joinable by other refreshes until its load begins (it
    seals itself then), and known to its registry until it ends, so later refreshes
    wait for it. Plain calls never join it, as they keep outcomes of their own (a
    stale value on a failure, say): a call about to load waits for it (refreshing)
    and then looks again."""

    __slots__ = ("open", "refresh")

    def __init__(self, registry: Registry, key: str) -> None:
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


class Registry:
    def __init__(self) -> None:
        self.active: dict[str, Flight] = {}  # the flight a caller of the key joins
        # Every call's flight from its start to its end, sealed or forgotten ones too
        # (a sealed flight may still load: a waiter woken looks again and may take the
        # lock), for refreshes to wait for: a refresh revokes the lock, so the Redis
        # lock cannot keep it from loading beside a load of this process.
        self.running: dict[str, list[Flight]] = {}
        self.reloading: dict[str, Reload] = {}  # a refresh in progress, until it ends
        self.following: dict[str, Reload] = {}  # the refresh to run after the flight
        self.waiting = 0  # callers waiting for another's flight now (for observers)

    def close(self, flight: Flight) -> None:
        if self.active.get(flight.key) is flight:
            self.active.pop(flight.key, None)

    def end_reload(self, flight: Reload) -> None:
        for place in (self.reloading, self.following):
            if place.get(flight.key) is flight:
                del place[flight.key]

    def started(self, flight: Flight) -> None:
        self.running.setdefault(flight.key, []).append(flight)

    def ended(self, flight: Flight) -> None:
        flights = self.running.get(flight.key)
        if flights is not None and flight in flights:
            flights.remove(flight)
            if not flights:
                del self.running[flight.key]

    def _in_progress(self, key: str) -> Flight | None:
        """A refresh in progress, else a call's flight running (the first)."""
        flights = self.running.get(key)
        return self.reloading.get(key) or (flights[0] if flights else None)

    def _reload_turn(self, key: str) -> tuple[str, Reload, Flight | None]:
        """What a refresh of `key` does now: ("join", the reload to join, None), or
        ("lead", its new reload, the flight to wait for first, if any)."""
        current = self.reloading.get(key)
        if current is not None and current.open:
            return "join", current, None  # its load has not begun: it is fresh for us
        before = current or self._in_progress(key)
        if before is None:
            flight = self.reloading[key] = Reload(self, key)
            return "lead", flight, None
        following = self.following.get(key)
        if following is not None:
            return "join", following, None
        following = self.following[key] = Reload(self, key)
        return "lead", following, before

    def behind(self, key: str) -> Reload | None:
        """A background reload (refresh_ahead, grace) of `key`, known until it ends so
        that fn.refresh() waits for it; None while a refresh is under way instead."""
        if key in self.reloading or key in self.following:
            return None
        flight = self.reloading[key] = Reload(self, key)
        flight.open = flight.refresh = False  # nothing to join: it reloads for nobody
        return flight

    def refreshing(self, key: str) -> Reload | None:
        """The fn.refresh() of `key` under way, which a call about to load waits for
        (then looks again) rather than load beside it."""
        flight = self.reloading.get(key)
        return flight if flight is not None and flight.refresh else None

    def _take_turn(self, flight: Reload) -> Flight | None:
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

    def take(self, key: str) -> Flight | None:
        """A new flight of `key` for a batch to lead, or None while a flight or a
        reload of the key is under way here (the batch joins it instead)."""
        if key in self.active or key in self.reloading:
            return None
        flight = self.active[key] = Flight(self, key)
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

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.flights: dict[str, Flight] = {}

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
