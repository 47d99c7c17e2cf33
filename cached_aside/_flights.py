"""In-process single-flight: concurrent callers of one key share one read.

The first caller leads; later callers join and receive its answer. A joiner reads
again by itself when the leader was cancelled, or when the leader's lease was
revoked (its value predates an invalidation). Redis's lock then coordinates
processes; this only spares Redis and the primary the duplicates.

A joiner waits at most `patience` (the lock's ttl): a leader stuck longer is
treated as another process would treat it, and the joiner reads by itself.

Threads share only the miss path, and only answers sealed against staleness (a
load whose lease held, or a read sent after the flight stopped taking joiners): a
hit costs one command either way, and any other read may predate an invalidation
that completed while the reading thread waited for the GIL. Tasks
of one event loop share the lookup too: each redis.asyncio call costs ~0.2 ms of
CPU, a dict entry is all that sharing costs, and a task holds the loop from its
reply to the end of its flight.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ._flows import Served

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

    @contextmanager
    def leading(self) -> Iterator[None]:
        """The leader's read: its error is kept for the joiners, and however it ends,
        the flight closes and its joiners wake (threads and tasks alike)."""
        try:
            yield
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            self.registry.close(self)
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


class _Registry:
    def __init__(self) -> None:
        self.active: dict[str, _Flight] = {}

    def close(self, flight: _Flight) -> None:
        if self.active.get(flight.key) is flight:
            self.active.pop(flight.key, None)

    def forget(self, key: str) -> None:
        """Let later callers read afresh instead of joining a read already under way."""
        self.active.pop(key, None)

    def forget_all(self) -> None:
        """forget() for every key: after a bulk invalidation."""
        self.active.clear()

    def reset_after_fork(self) -> None:
        """In a forked child: the leaders of these flights did not come along."""
        self.active = {}


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

    def reset_after_fork(self) -> None:
        self._lock = threading.Lock()  # it may have been held by a thread now gone
        super().reset_after_fork()

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
        current = self.active.setdefault(key, flight)  # atomic under the GIL
        if current is not flight:
            assert current.done is not None
            if not current.done.wait(patience):
                return serve(*args, _no_seal), False
            # A thread can lose the GIL for milliseconds between a reply and its
            # return, long enough for an invalidation elsewhere to complete: take only
            # answers that are fresh for anyone who joined before the seal.
            answer = current.outcome(reads_shared=False)
            return None if answer is None else (answer, True)
        with flight.leading():
            flight.answer = serve(*args, flight.seal)
        return flight.answer, False


def _expire(joined: asyncio.Future[Any]) -> None:
    if not joined.done():
        joined.set_result(_EXPIRED)


class TaskFlights(_Registry):
    """Coalesces calls made from asyncio tasks of one event loop (one thread)."""

    async def run(
        self, key: str, patience: float, serve: Callable[..., Awaitable[Answer]], *args: Any
    ) -> tuple[Answer, bool]:
        """Lead (awaiting `serve(*args, seal)`) or join the read of `key`.

        Returns the answer and whether it was joined. A joiner whose leader takes
        longer than `patience` seconds reads alone.
        """
        while True:
            current = self.active.get(key)
            if current is None:
                break
            loop = asyncio.get_running_loop()
            joined: asyncio.Future[Any] = loop.create_future()
            if current.joiners is None:
                current.joiners = []
            current.joiners.append(joined)
            expiry = loop.call_later(patience, _expire, joined)
            try:
                if await joined == _EXPIRED:
                    return await serve(*args, _no_seal), False
            finally:
                expiry.cancel()
            # No await lies between the leader's reply and the end of its flight, so
            # a shared read is as fresh as the reply itself.
            answer = current.outcome(reads_shared=True)
            if answer is not None:
                return answer, True
        flight = self.active[key] = _Flight(self, key)
        with flight.leading():
            flight.answer = await serve(*args, flight.seal)
        return flight.answer, False
