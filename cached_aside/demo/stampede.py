"""A burst: N threads released at once, each call timed from the moment of release.

No HTTP and no Redis here: the caller passes what each thread runs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Timed(Generic[T]):
    """One caller of a burst.

    Attributes:
        start_ms: when its call began, in milliseconds after the burst was released.
        duration_ms: how long its call took.
        value: what the call returned, or None when it raised.
        error: the exception's type and message when it raised, else None.
    """

    start_ms: float
    duration_ms: float
    value: T | None
    error: str | None = None


def burst(call: Callable[[], T], n: int) -> list[Timed[T]]:
    """Runs `call` in n threads that all start together; returns them in thread order."""
    released: list[float] = []
    # The barrier's action runs once every thread has arrived and before any is let
    # go, so no caller can start before the clock does: offsets are never negative.
    barrier = threading.Barrier(n, action=lambda: released.append(time.perf_counter()))
    timed: list[Timed[T] | None] = [None] * n

    def caller(index: int) -> None:
        barrier.wait()
        started = time.perf_counter()
        value: T | None = None
        error = None
        try:
            value = call()
        except Exception as exc:  # one failed caller is shown, not lost with its thread
            error = f"{type(exc).__name__}: {exc}"
        ended = time.perf_counter()
        timed[index] = Timed((started - released[0]) * 1000, (ended - started) * 1000, value, error)

    threads = [threading.Thread(target=caller, args=(index,)) for index in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [each for each in timed if each is not None]
