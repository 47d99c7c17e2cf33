"""What callers get back: where a value came from, and what a write to the cache did.

A failure never looks like a normal answer: an invalidation Redis did not take is
PENDING, never the ABSENT that means "nothing was cached". No I/O here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
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
