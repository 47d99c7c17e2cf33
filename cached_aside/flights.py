"""In-process single-flight: concurrent callers of one key share one read.

The first caller leads and runs the flow; later callers join and receive its
answer. A joiner retries by itself when the leader was cancelled, or when the
leader's lease was revoked (its value predates an invalidation). Redis's lock then
coordinates processes; this only spares Redis and the primary the duplicates.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

from .flows import Served

T = TypeVar("T")
Answer = tuple[Served, float]


class _Outcome:
    __slots__ = ("answer", "error", "sealed")

    def __init__(self) -> None:
        self.answer: Answer | None = None
        self.error: BaseException | None = None
        self.sealed = False

    def reusable(self) -> bool:
        """Whether a joiner may take this outcome instead of reading again."""
        if self.error is not None:
            return isinstance(self.error, Exception)  # not cancellation or interrupts
        return self.answer is not None and self.answer[0].lease_kept


class _ThreadFlight(_Outcome):
    __slots__ = ("done",)

    def __init__(self) -> None:
        super().__init__()
        self.done = threading.Lock()
        self.done.acquire()


class ThreadFlights:
    """Coalesces calls made from threads."""

    def __init__(self) -> None:
        self._flights: dict[str, _ThreadFlight] = {}

    def run(self, key: str, lead: Callable[[Callable[[], None]], Answer]) -> tuple[Answer, bool]:
        """Lead or join the read of `key`; returns the answer and whether it was joined."""
        while True:
            flight = _ThreadFlight()
            current = self._flights.setdefault(key, flight)  # atomic under the GIL
            if current is flight:
                return self._lead(key, flight, lead), False
            with current.done:
                pass
            if current.reusable():
                if current.error is not None:
                    raise current.error
                assert current.answer is not None
                return current.answer, True

    def _lead(
        self, key: str, flight: _ThreadFlight, lead: Callable[[Callable[[], None]], Answer]
    ) -> Answer:
        def seal() -> None:
            if not flight.sealed:
                flight.sealed = True
                if self._flights.get(key) is flight:
                    del self._flights[key]

        try:
            flight.answer = lead(seal)
            return flight.answer
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            seal()
            flight.done.release()

    def forget(self, key: str) -> None:
        """Let later callers read afresh instead of joining a read already under way."""
        self._flights.pop(key, None)


class _TaskFlight(_Outcome):
    __slots__ = ("joiners",)

    def __init__(self) -> None:
        super().__init__()
        self.joiners: list[asyncio.Future[None]] = []


class TaskFlights:
    """Coalesces calls made from asyncio tasks of one event loop."""

    def __init__(self) -> None:
        self._flights: dict[str, _TaskFlight] = {}

    async def run(
        self, key: str, lead: Callable[[Callable[[], None]], Awaitable[Answer]]
    ) -> tuple[Answer, bool]:
        """Lead or join the read of `key`; returns the answer and whether it was joined."""
        while True:
            current = self._flights.get(key)
            if current is None:
                flight = self._flights[key] = _TaskFlight()
                return await self._lead(key, flight, lead), False
            joined: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            current.joiners.append(joined)
            await joined
            if current.reusable():
                if current.error is not None:
                    raise current.error
                assert current.answer is not None
                return current.answer, True

    async def _lead(
        self, key: str, flight: _TaskFlight, lead: Callable[[Callable[[], None]], Awaitable[Answer]]
    ) -> Answer:
        def seal() -> None:
            if not flight.sealed:
                flight.sealed = True
                if self._flights.get(key) is flight:
                    del self._flights[key]

        try:
            flight.answer = await lead(seal)
            return flight.answer
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            seal()
            for joined in flight.joiners:
                if not joined.done():
                    joined.set_result(None)

    def forget(self, key: str) -> None:
        """Let later callers read afresh instead of joining a read already under way."""
        self._flights.pop(key, None)
