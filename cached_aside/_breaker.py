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

# The name NodeBreakers gives the breaker of commands that no node is known for.
UNROUTED = "unrouted"


class CircuitOpenError(CachedAsideError, ConnectionError):
    """Redis was skipped: the breaker is open after repeated failures."""


class CircuitBreaker:
    """Closed, open for `cooldown` seconds after `failures` failures in a row, then
    half-open: one caller probes Redis while the others keep skipping it."""

    def __init__(
        self, failures: int, cooldown: float, clock: Callable[[], float] = time.monotonic
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

    def abandon(self) -> None:
        """The probe ended without a verdict (it was cancelled): the breaker stays
        as it is, and the next caller past the cooldown probes instead."""
        with self._lock:
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


class NodeBreakers(CircuitBreaker):
    """A Redis Cluster engine's breakers: one per node, so a dead master costs only
    its own slots. Seen as one breaker (what the hot path reads, `engine.breaker`),
    it is open while any node's is, and counts failures while any node does; calls
    that name a key go through their node's breaker (`node`)."""

    def __init__(self, failures: int, cooldown: float) -> None:
        super().__init__(failures, cooldown)
        self.nodes: dict[str, CircuitBreaker] = {}

    def unrouted(self) -> CircuitBreaker:
        """The breaker of commands no node is known for: the cluster was never reached
        (unreachable at first use), or a slot has no node mid-failover."""
        return self.node(UNROUTED)

    def reached(self) -> None:
        """The cluster answered: what the unrouted breaker counted is over."""
        if UNROUTED in self.nodes:
            with self._lock:
                self.nodes.pop(UNROUTED, None)
            self.sum_up()

    def node(self, name: str) -> CircuitBreaker:
        """The breaker of one node (by redis-py's name, "host:port")."""
        breaker = self.nodes.get(name)
        if breaker is None:
            with self._lock:
                breaker = self.nodes.setdefault(name, _NodeBreaker(self))
        return breaker

    @property
    def state(self) -> str:
        states = {breaker.state for breaker in list(self.nodes.values())}
        return "open" if "open" in states else "half-open" if "half-open" in states else "closed"

    def allow(self) -> bool:
        return True  # a call that names no key is not held back by one node

    def success(self) -> None:
        """Every node answers (the outbox delivered everything, a test resets)."""
        for breaker in list(self.nodes.values()):
            CircuitBreaker.success(breaker)
        self.sum_up()

    def failure(self) -> None:
        """A failure that names no node (a scan across nodes): not held against any."""

    def reset_after_fork(self) -> None:
        super().reset_after_fork()
        for breaker in list(self.nodes.values()):
            breaker.reset_after_fork()

    def sum_up(self) -> None:
        """Recompute what the hot path reads, after a node's breaker changed."""
        breakers = list(self.nodes.values())
        self.open_until = max((b.open_until for b in breakers), default=0.0)
        self.failures = sum(b.failures for b in breakers)
        self.opened = sum(b.opened for b in breakers)


class _NodeBreaker(CircuitBreaker):
    """One node's breaker, which keeps its engine's sums up to date."""

    def __init__(self, engine_wide: NodeBreakers) -> None:
        super().__init__(engine_wide.threshold, engine_wide.cooldown, engine_wide.clock)
        self._engine_wide = engine_wide

    def success(self) -> None:
        super().success()
        self._engine_wide.sum_up()

    def failure(self) -> None:
        super().failure()
        self._engine_wide.sum_up()
