"""A circuit breaker in front of Redis: after repeated failures, calls skip Redis for a
cool-down instead of each paying a timeout, then one probe tests the water.

The closed state, the one that matters for speed, costs a caller two attribute reads
(`open_until` and `failures`); everything else happens only after a failure.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from ._errors import CachedAsideError

DEFAULT_FAILURES = 3
DEFAULT_COOLDOWN_SECONDS = 0.5


class CircuitOpenError(CachedAsideError, ConnectionError):
    """Redis was skipped: the breaker is open after repeated failures."""


class CircuitBreaker:
    """Closed, open for `cooldown` seconds after `failures` failures in a row, then
    half-open: one caller probes Redis while the others keep skipping it."""

    def __init__(
        self,
        failures: int = DEFAULT_FAILURES,
        cooldown: float = DEFAULT_COOLDOWN_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = failures
        self.cooldown = cooldown
        self.clock = clock
        self.failures = 0
        self.open_until = 0.0  # 0: closed
        self.opened = 0  # how many times it opened, for stats and metrics
        self._probing = False
        self._lock = threading.Lock()

    @property
    def state(self) -> str:
        if not self.open_until:
            return "closed"
        return "open" if self.clock() < self.open_until else "half-open"

    def allow(self) -> bool:
        """Whether a call may go to Redis now (always, when closed)."""
        if not self.open_until:
            return True
        with self._lock:
            if self.clock() < self.open_until or self._probing:
                return False
            self._probing = True  # the one probe of this half-open period
            return True

    def success(self) -> None:
        with self._lock:
            self.failures = 0
            self.open_until = 0.0
            self._probing = False

    def failure(self) -> None:
        with self._lock:
            self.failures += 1
            if self._probing or self.failures >= self.threshold:
                if not self.open_until or self._probing:
                    self.opened += 1
                self.open_until = self.clock() + self.cooldown
                self._probing = False

    def reset_after_fork(self) -> None:
        """In a forked child: the lock may have been held by a thread now gone."""
        self._lock = threading.Lock()
        self._probing = False

    def time_left(self) -> float:
        """Seconds until the breaker lets a probe through (0 when closed or due)."""
        return max(0.0, self.open_until - self.clock()) if self.open_until else 0.0

    def refusal(self) -> CircuitOpenError:
        return CircuitOpenError(
            f"Redis skipped for {self.time_left():.1f} s more after "
            f"{self.failures} failures in a row"
        )
