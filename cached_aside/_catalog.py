"""Catalog: every decorated function that has met an engine, with its counters and
its tags, registered by identity (two functions with one name stay two). Readers
(stats, the CLI, prometheus, integrations) use its public read-only face.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

from ._effects import PendingPattern
from ._keys import KeyTemplate
from ._outbox import Outbox
from ._results import StatsSnapshot
from ._stats import Stats

# What a pending tag's waiters are woken after when no tagged function is known.
DEFAULT_WAKE_TTL_MS = 10_000


@dataclass(frozen=True, slots=True, eq=False)
class Registered:
    """One decorated function as its engine knows it.

    Attributes:
        name: the function's qualified name (not unique: two may share one).
        stats: its live counters.
        tags: its tag templates (empty without tags=).
        covers: what covers every key it owns on the engine.
        lock_ttl_ms: its lock ttl, for waking the waiters of a retired tag.
    """

    name: str
    stats: Stats
    tags: tuple[KeyTemplate, ...]
    covers: PendingPattern
    lock_ttl_ms: int

    def can_carry(self, text: str) -> bool:
        """Whether an entry of this function can carry the rendered tag `text`."""
        return any(template.owns(text) for template in self.tags)


class Catalog:
    """The functions of one engine. Iterating gives each `Registered`, in the order
    they first met the engine; the rest of the face reads it too."""

    def __init__(self, outbox: Outbox) -> None:
        self._outbox = outbox
        self._lock = threading.Lock()
        # Functions meet the engine under this one: their first calls may race.
        self.meeting = threading.RLock()
        # By the identity of the function's counters, held here: an id never reused.
        self._functions: dict[int, Registered] = {}
        outbox.tag_covers = self.tag_covers  # once, as the engine is built

    def join(
        self,
        *,
        name: str,
        stats: Stats,
        tags: tuple[KeyTemplate, ...],
        covers: PendingPattern,
        lock_ttl_ms: int,
    ) -> None:
        """A function met the engine (again: its entry is replaced). Pending tags it
        can carry, queued before, now block its keys too, as every later one does."""
        function = Registered(name, stats, tags, covers, lock_ttl_ms)
        with self._lock:
            self._functions[id(stats)] = function
        if tags:
            self._outbox.cover_tags(function.can_carry, covers)

    # -- the read-only face ------------------------------------------------------------

    def __iter__(self) -> Iterator[Registered]:
        return iter(list(self._functions.values()))  # one step: registrations may race

    def __len__(self) -> int:
        return len(self._functions)

    def total(self) -> StatsSnapshot:
        """Counters summed over every function."""
        total = StatsSnapshot()
        for function in self:
            total += function.stats.snapshot()
        return total

    def by_name(self) -> dict[str, StatsSnapshot]:
        """Counters per function, by qualified name."""
        return {function.stats.name: function.stats.snapshot() for function in self}

    def carrying(self, text: str) -> list[Registered]:
        """The functions that can carry the tag `text`."""
        return [function for function in self if function.can_carry(text)]

    def tag_covers(self, text: str) -> tuple[PendingPattern, ...]:
        """What a pending tag blocks: every key of each function that can carry it."""
        return tuple(function.covers for function in self.carrying(text))

    def wake_ttl_ms(self) -> int:
        """How long a retired tag's waiters may wait: the longest lock ttl of a tagged
        function."""
        tagged = [function.lock_ttl_ms for function in self if function.tags]
        return max(tagged, default=DEFAULT_WAKE_TTL_MS)

    # -- lifecycle -----------------------------------------------------------------------

    def reset(self) -> None:
        """Set every function's counters back to zero."""
        for function in self:
            function.stats.reset()

    def close(self, timeout: float) -> None:
        """Nothing to release: the functions outlive the engine's connections."""

    async def aclose(self, timeout: float) -> None:
        """As close()."""

    def busy(self) -> bool:
        """Never: counting is not background work."""
        return False

    def after_fork(self) -> None:
        """Locks a thread of the parent may have held; counters' locks too."""
        self._lock = threading.Lock()
        self.meeting = threading.RLock()
        for function in self:
            function.stats.reset_after_fork()
