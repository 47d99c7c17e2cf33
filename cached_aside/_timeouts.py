"""`timeout(seconds)`: asyncio.timeout where Python has it (3.11+), and on 3.10 the
same contract: the block is cancelled at the deadline, which leaves it as a
TimeoutError (an OSError, as on 3.11, and an asyncio.TimeoutError)."""

from __future__ import annotations

import asyncio
import sys
from types import TracebackType
from typing import Any

if sys.version_info >= (3, 11):  # pragma: no cover - one branch per Python
    timeout: Any = asyncio.timeout
else:  # pragma: no cover

    class DeadlineError(TimeoutError, asyncio.TimeoutError):
        """Python 3.10 keeps the two TimeoutErrors apart; 3.11 made them one."""

    class timeout:
        """asyncio.timeout's contract on 3.10: at the deadline the task is cancelled
        and the cancellation leaves the block as a TimeoutError. A cancellation
        from outside (the deadline not reached) stays a cancellation."""

        def __init__(self, delay: float | None) -> None:
            self._delay = delay
            self._handle: asyncio.TimerHandle | None = None
            self._task: asyncio.Task[Any] | None = None
            self._expired = False

        async def __aenter__(self) -> timeout:
            if self._delay is not None:
                self._task = asyncio.current_task()
                self._handle = asyncio.get_running_loop().call_later(self._delay, self._expire)
            return self

        def _expire(self) -> None:
            assert self._task is not None
            self._expired = self._task.cancel()

        async def __aexit__(
            self,
            kind: type[BaseException] | None,
            exc: BaseException | None,
            tb: TracebackType | None,
        ) -> None:
            if self._handle is not None:
                self._handle.cancel()
            if self._expired and kind is asyncio.CancelledError:
                raise DeadlineError("the deadline passed") from exc


# Python 3.11+ counts the cancellations asked of a task (Task.cancelling()).
COUNTS_CANCELS = sys.version_info >= (3, 11)


class Watchdog:
    """One timer for a stream of short bounded waits, one at a time: asyncio.timeout
    schedules and cancels a timer per wait (on a hit, a tenth of its cost), this one
    re-arms lazily. `bound()` marks a wait's start and deadline, `unbound()` its end;
    the timer fires at most once per `seconds` while waits keep coming: it cancels a
    wait past its deadline, else moves on to the current one's. A wait cancelled
    this way ends as a TimeoutError (`expired()` tells the waiter); a cancellation
    from outside stays a cancellation."""

    __slots__ = ("_cancelling", "_due", "_fired", "_handle", "_loop", "_task")

    def __init__(self) -> None:
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[Any] | None = None
        self._due = 0.0
        self._fired = False
        self._cancelling = 0

    def bound(self, loop: asyncio.AbstractEventLoop, seconds: float) -> None:
        """The current task's wait starts now, and may last `seconds`."""
        self._task = task = asyncio.current_task(loop)
        if COUNTS_CANCELS and task is not None:
            # What is asked of the task already: a cancellation asked from outside
            # while the deadline fires stays a cancellation (as asyncio.timeout's).
            self._cancelling = task.cancelling()
        self._fired = False
        self._due = due = loop.time() + seconds
        handle = self._handle
        if handle is None or self._loop is not loop or handle.when() > due:
            if handle is not None:
                handle.cancel()
            self._loop = loop
            self._handle = loop.call_at(due, self._check)

    def unbound(self) -> None:
        self._task = None

    def expired(self) -> bool:
        """Whether the cancellation being handled came from this watchdog alone
        (once): if a cancellation was asked from outside too, before the deadline or
        with it, that one stands (Python 3.11+; 3.10 counts no cancellations, so
        there the deadline's TimeoutError wins)."""
        if not self._fired:
            return False
        self._fired = False
        task = asyncio.current_task()
        if task is not None and COUNTS_CANCELS:
            return task.uncancel() <= self._cancelling
        return True

    def close(self) -> None:
        """Stop the timer (the loop is closing)."""
        handle, self._handle, self._task = self._handle, None, None
        if handle is not None:
            handle.cancel()

    def _check(self) -> None:
        self._handle = None
        task, loop = self._task, self._loop
        if task is None or loop is None:
            return  # no wait now: the timer lapses until the next one
        if loop.time() < self._due:
            self._handle = loop.call_at(self._due, self._check)
            return
        self._task = None
        self._fired = task.cancel()
