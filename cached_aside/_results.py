"""What callers get back: where a value came from, what a write to the cache did, and
the counters of a function or an engine.

A failure never looks like a normal answer: an invalidation Redis did not take is
PENDING, never the ABSENT that means "nothing was cached". No I/O here.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from typing import Generic, TypeVar

R = TypeVar("R")


class Source(str, enum.Enum):
    """Where a caller's value came from."""

    NEAR = "near"
    """The in-process near cache."""
    CACHE = "cache"
    """A value cached in Redis."""
    NEGATIVE = "negative"
    """A cached "no such record" (the loader returned None)."""
    LOADER = "loader"
    """This call ran the loader."""
    WAITED = "waited"
    """Another caller's load, waited for."""
    STALE = "stale"
    """A value past its ttl: inside `grace` (a reload runs behind it), or kept for
    `stale_if_error` and served because the load failed."""

    def __str__(self) -> str:
        return self.value  # print(result.source) shows "cache", as the docs write it


HIT_SOURCES = frozenset({Source.NEAR, Source.CACHE, Source.NEGATIVE})


@dataclass(frozen=True, slots=True)
class CacheResult(Generic[R]):
    """One call's value and how it was served.

    Attributes:
        value: what the call returns.
        hit: True when served from the cache (a value or a cached "none").
        source: "near", "cache", "negative", "loader" (this call loaded),
            "waited" (another caller's load) or "stale" (past its ttl: grace, or
            stale_if_error after a failed load).
        redis_ms: time spent waiting on Redis for this call, in milliseconds.
    """

    value: R
    hit: bool
    source: Source
    redis_ms: float


class Outcome(enum.Enum):
    """What `invalidate()`, `update_field()` or `set()` did.

    Deliberately neither true nor false: "Redis failed" and "nothing was cached" are
    different answers, so compare with a member (`is Outcome.PENDING`).
    """

    DELETED = "deleted"
    """An entry (a value or a negative sentinel) existed and is gone."""
    UPDATED = "updated"
    """update_field or set: the cache now holds the new value."""
    ABSENT = "absent"
    """Nothing was cached (nothing written); loads in flight were fenced all the same."""
    PENDING = "pending"
    """Redis did not take it: the invalidation waits in the engine's outbox and is
    retried until it lands; meanwhile this process serves the key from the loader."""

    def __bool__(self) -> bool:
        raise TypeError(
            f"{self} is neither true nor false: compare it with Outcome.DELETED, "
            "Outcome.UPDATED, Outcome.ABSENT or Outcome.PENDING"
        )


@dataclass(frozen=True, slots=True)
class BulkOutcome:
    """What `invalidate_many()`, `invalidate_all()` or `invalidate_prefix()` did.

    Attributes:
        deleted: entries that existed and are gone.
        pending: invalidations Redis did not take (keys, or one whole pattern), now
            in the engine's outbox and retried until they land.
    """

    deleted: int
    pending: int = 0

    @property
    def complete(self) -> bool:
        """True when nothing is left for the outbox to deliver."""
        return self.pending == 0


@dataclass(frozen=True, slots=True)
class StatsSnapshot:
    """A function's (or an engine's, summed) counters at one moment.

    Attributes:
        hits: calls served a value cached in Redis.
        near_hits: calls served by the in-process near cache.
        misses: calls not served from the cache.
        negative_hits: calls served a cached "no such record".
        loads: loader calls.
        stampedes_suppressed: misses that got another caller's load instead of loading.
        errors: Redis failures (the call was still answered when fail_open).
        corrupt: foreign or damaged data found in Redis, treated as a miss and rewritten
            (including a tag's version key, or an entry's stamp).
        lock_waits: misses that waited on Redis for another process's load.
        loader_errors: loader failures nobody saw raised: background reloads
            (refresh_ahead, grace), and loads answered with a stale value
            (stale_if_error).
        postponed: invalidations Redis did not take, queued in the engine's outbox.
        stale: calls answered with a value past its ttl (grace, stale_if_error).
        schema_mismatch: typed entries written for another shape of the declared type
            (an older or newer deploy; or untyped), treated as a miss and rewritten.
        near_misses: near-cache look-ups that found nothing to serve.
        near_evictions: near entries pushed out by the entry-count or byte bound.
        near_admissions_refused: values read from Redis that the near cache's
            W-TinyLFU policy did not keep (asked for less often than what they would
            push out).
        near_bytes: bytes the near entries take now (a gauge; see the near-cache docs
            for what counts).
        near_revalidated: near entries set aside while the invalidation listener
            was not tracking, reread from Redis once it was again, and kept.
        near_unverified: near entries set aside likewise and dropped instead: gone
            or changed in Redis, expired, reported changed meanwhile, unreadable,
            or the outage outlasted the bound (see the near-cache docs).
    """

    hits: int = 0
    near_hits: int = 0
    misses: int = 0
    negative_hits: int = 0
    loads: int = 0
    stampedes_suppressed: int = 0
    errors: int = 0
    corrupt: int = 0
    lock_waits: int = 0
    loader_errors: int = 0
    postponed: int = 0
    stale: int = 0
    schema_mismatch: int = 0
    near_misses: int = 0
    near_evictions: int = 0
    near_admissions_refused: int = 0
    near_bytes: int = 0
    near_revalidated: int = 0
    near_unverified: int = 0

    @property
    def hit_rate_pct(self) -> float:
        """(hits + near_hits + negative_hits) / (those + misses), in percent."""
        served = self.hits + self.near_hits + self.negative_hits
        total = served + self.misses
        return round(100.0 * served / total, 2) if total else 0.0

    def as_dict(self) -> dict[str, float]:
        """Every counter and hit_rate_pct, for metrics exporters and logs."""
        return {**asdict(self), "hit_rate_pct": self.hit_rate_pct}

    def __add__(self, other: StatsSnapshot) -> StatsSnapshot:
        mine, theirs = asdict(self), asdict(other)
        return StatsSnapshot(**{name: mine[name] + theirs[name] for name in mine})
