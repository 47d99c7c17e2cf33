"""Hit/miss accounting per decorated function, and burst-limited error logging.

Counters are guarded by a lock because threads share them, except the hit
counters: a near hit costs about a microsecond, and an uncontended lock would add a
fifth to it, so hits are counted by `itertools.count`, whose `next()` is one C call
(atomic under the GIL).
"""

from __future__ import annotations

import bisect
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from ._results import StatsSnapshot as StatsSnapshot  # its old home: importers keep working

logger = logging.getLogger("cached_aside")

# While errors keep coming, one log line per this many seconds summarises them.
ERROR_LOG_INTERVAL_SECONDS = 10.0
# Upper bounds (seconds) of the loader-latency histogram: Prometheus's defaults.
LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf"))


def _counted(counter: itertools.count[int]) -> int:
    """How many times `next()` was called on a counter started at 0: its repr is
    `count(N)`, the one way to read it without counting once more."""
    return int(repr(counter)[6:-1])


class _Burst:
    """Says when to log an event that may repeat fast: the first of a burst, then at
    most once per interval, with the count since the last line."""

    def __init__(self) -> None:
        self._unlogged = 0
        self._last = float("-inf")

    def due(self, now: float) -> int:
        """The count to report now, or 0 to stay quiet. Call under a lock."""
        self._unlogged += 1
        if now - self._last < ERROR_LOG_INTERVAL_SECONDS:
            return 0
        count, self._unlogged, self._last = self._unlogged, 0, now
        return count


# The counters kept under the lock: every StatsSnapshot field but the hits.
# The near cache's own counters, read from its stores (Stats.watch_near).
NEAR_COUNTERS = (
    "near_misses",
    "near_evictions",
    "near_admissions_refused",
    "near_bytes",
    "near_revalidated",
    "near_unverified",
)
_LOCKED_COUNTERS = tuple(
    name
    for name in StatsSnapshot.__dataclass_fields__
    if name not in ("hits", "near_hits", *NEAR_COUNTERS)
)


class NearCounts(Protocol):
    """A near cache as the stats see it."""

    def counts(self) -> tuple[int, int, int, int, int, int]:
        """(misses, evictions, admissions refused, bytes held, revalidated, unverified)."""

    def reset_counts(self) -> None: ...


class Stats:
    """Live counters of one decorated function."""

    def __init__(self, name: str, *, fail_open: bool = True) -> None:
        self.name = name
        self.after_error = (
            "callers are served by the loader" if fail_open else "callers get CacheUnavailableError"
        )
        self._lock = threading.Lock()
        self._error_burst = _Burst()
        self._loader_burst = _Burst()
        self._near: list[NearCounts] = []
        self._start()

    def watch_near(self, store: NearCounts) -> None:
        """Include a near cache's counters (one per engine the function meets)."""
        if all(known is not store for known in self._near):
            self._near.append(store)

    def _start(self) -> None:
        """Every counter at zero. Hits count on their own (see the module's docstring);
        the rest, by StatsSnapshot's field names, under the lock."""
        self._hit_count = itertools.count()
        self._near_hit_count = itertools.count()
        self.hit: Callable[[], int] = self._hit_count.__next__
        self.near_hit: Callable[[], int] = self._near_hit_count.__next__
        self._counts = dict.fromkeys(_LOCKED_COUNTERS, 0)
        self._error_kinds: dict[str, int] = {}
        self._load_counts = [0] * len(LOAD_BUCKETS)
        self._load_seconds = 0.0

    def _add(self, counter: str) -> None:
        with self._lock:
            self._counts[counter] += 1

    def negative_hit(self) -> None:
        self._add("negative_hits")

    def miss(self, *, suppressed: bool = False) -> None:
        with self._lock:
            self._counts["misses"] += 1
            self._counts["stampedes_suppressed"] += suppressed

    def load(self) -> None:
        self._add("loads")

    def lock_wait(self) -> None:
        """A caller began waiting on Redis for another caller's load."""
        self._add("lock_waits")

    def corrupt(self, key: str, *, log: bool = True, mismatch: bool = False) -> None:
        """Count foreign or damaged data at `key`; log it unless the caller does.
        `mismatch`: a typed entry of another shape, expected while a deploy rolls out:
        counted as schema_mismatch, logged at debug level."""
        if mismatch:
            self._add("schema_mismatch")
            logger.debug("%s: an entry of another type shape at %r; reloaded", self.name, key)
            return
        self._add("corrupt")
        if log:
            logger.warning(
                "%s: foreign or damaged data at %r; treated as a miss and rewritten",
                self.name,
                key,
            )

    def error(self, key: str, failure: BaseException) -> None:
        """Count a Redis failure; log the first of a burst and then a summary per interval."""
        cause = getattr(failure, "cause", failure)
        kind = type(cause).__name__
        with self._lock:
            self._counts["errors"] += 1
            self._error_kinds[kind] = self._error_kinds.get(kind, 0) + 1
            count = self._error_burst.due(time.monotonic())
        if count:
            logger.warning(
                "%s: Redis failed at %r (%s); %d error(s) since the last report, %s",
                self.name,
                key,
                failure,
                count,
                self.after_error,
            )

    def loader_error(
        self,
        key: str,
        failure: BaseException,
        served: str = "the cached value is served until it expires",
    ) -> None:
        """Count a loader failure nobody sees raised (a background reload, or a load
        answered with a stale value); log it like Redis errors, once per burst, with
        its traceback. `served` says what callers got instead."""
        with self._lock:
            self._counts["loader_errors"] += 1
            count = self._loader_burst.due(time.monotonic())
        if count:
            logger.warning(
                "%s: loading %r failed (%r); %d failure(s) since the last report; %s",
                self.name,
                key,
                failure,
                count,
                served,
                exc_info=failure,
            )

    def postponed(self) -> None:
        self._add("postponed")

    def stale(self) -> None:
        self._add("stale")

    def reset_after_fork(self) -> None:
        """In a forked child: the lock may have been held by a thread now gone."""
        self._lock = threading.Lock()

    def snapshot(self) -> StatsSnapshot:
        near = [0] * len(NEAR_COUNTERS)
        for store in self._near:
            near = [total + count for total, count in zip(near, store.counts(), strict=True)]
        with self._lock:
            return StatsSnapshot(
                hits=_counted(self._hit_count),
                near_hits=_counted(self._near_hit_count),
                **self._counts,
                **dict(zip(NEAR_COUNTERS, near, strict=True)),
            )

    def loaded_in(self, seconds: float) -> None:
        """Record how long one loader call took."""
        bucket = bisect.bisect_left(LOAD_BUCKETS, seconds)
        with self._lock:
            self._load_counts[bucket] += 1
            self._load_seconds += seconds

    def load_histogram(self) -> tuple[list[tuple[float, int]], float]:
        """Cumulative (upper bound, count) pairs and the total seconds, Prometheus-style."""
        with self._lock:
            counts, total = list(self._load_counts), self._load_seconds
        cumulative, running = [], 0
        for bound, count in zip(LOAD_BUCKETS, counts, strict=True):
            running += count
            cumulative.append((bound, running))
        return cumulative, total

    def error_kinds(self) -> dict[str, int]:
        """Errors by exception type (TimeoutError, ConnectionError, CircuitOpenError...)."""
        with self._lock:
            return dict(self._error_kinds)

    def reset(self) -> None:
        """Every counter back to zero."""
        with self._lock:
            self._start()
        for store in self._near:
            store.reset_counts()
