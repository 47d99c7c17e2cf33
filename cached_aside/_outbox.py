"""The engine's outbox: invalidations and lock releases that Redis did not take, kept
until a background flusher delivers them.

While an invalidation waits here, this process must not serve the keys it covers
from Redis or the near cache, nor store them (`blocks`), so its own readers never see
the value it meant to delete. Bounded: past `limit` keys, one function's keys
collapse into a single pattern that covers them all, so nothing is ever dropped.
No redis or asyncio imports here.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from time import monotonic
from typing import Any

# The pending invalidations are effects (Postpone's items), defined with them so the
# outbox imports the effects and never the other way; named here as well for the
# modules that still import them from the outbox (engine, flows, wrapping, tests).
from ._effects import PendingKey as PendingKey
from ._effects import PendingPattern as PendingPattern
from ._effects import PendingTag as PendingTag
from ._scripts import RunScript

logger = logging.getLogger("cached_aside")

DEFAULT_LIMIT = 10_000


@dataclass(frozen=True, slots=True)
class PendingRelease:
    """A lock (or a waiter's count) to give back; worthless after `until`."""

    effect: RunScript
    until: float = field(compare=False)


@dataclass(slots=True)
class Delivery:
    """One flush: what the outbox held when it began, and the sequence number then:
    what was queued after it (even the same key or pattern again) stays queued when
    this delivery lands."""

    keys: list[PendingKey]
    patterns: list[PendingPattern]
    releases: list[PendingRelease]
    sequence: int = 0
    tags: list[PendingTag] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.keys or self.patterns or self.releases or self.tags)


class Outbox:
    """Pending writes of one engine; thread-safe.

    `active` is the one attribute the hot path reads: False whenever no invalidation
    is pending, so a healthy engine pays a single attribute read per call. Every
    item carries the sequence number of its latest queueing, so a delivery forgets
    only what it carried, never what was queued while it ran.
    """

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = limit
        self.active = False
        # Called (outside the lock) when work arrives and no flusher runs.
        self.start_flusher: Callable[[], None] = lambda: None
        # What a pending tag covers: every function known to carry the tag's text.
        self.tag_covers: Callable[[str], tuple[PendingPattern, ...]] = lambda text: ()
        self.queued = 0  # invalidations that had to wait here
        self.delivered = 0  # invalidations that landed later
        self.collapsed = 0  # times a function's keys collapsed into one pattern
        self._lock = threading.Lock()
        self._sequence = 0
        self._keys: dict[str, tuple[PendingKey, int]] = {}
        self._patterns: dict[str, tuple[PendingPattern, int]] = {}
        self._starts: tuple[str, ...] = ()  # the patterns' starts, read without the lock
        self._releases: dict[tuple[Any, ...], tuple[PendingRelease, int]] = {}
        self._tags: dict[str, tuple[PendingTag, int]] = {}
        self._flushing = False
        self.wake = threading.Event()  # set when work arrives: retry at once

    def add(self, items: tuple[PendingKey | PendingPattern | PendingTag, ...]) -> None:
        with self._lock:
            for item in items:
                self.queued += 1
                self._sequence += 1
                if isinstance(item, PendingPattern):
                    self._add_pattern(item)
                elif isinstance(item, PendingTag):
                    # Under the lock, as cover_tags(): a function met at this moment
                    # is either in tag_covers' answer or finds this tag queued.
                    covers = (*item.covers, *self.tag_covers(item.text))
                    item = replace(item, covers=tuple(dict.fromkeys(covers)))
                    self._tags[item.key] = (item, self._sequence)
                    self._starts = self._pattern_starts()
                else:
                    # Kept even when a pending pattern covers it: that pattern's scan
                    # may be past this key already.
                    self._keys[item.key] = (item, self._sequence)
                    if len(self._keys) > self.limit:
                        self._collapse(item.whole)
            self.active = True
            start = self._claim_flusher()
        self.wake.set()
        if start:
            self.start_flusher()

    def add_release(self, effect: RunScript, ttl_ms: int) -> None:
        pending = PendingRelease(effect, monotonic() + ttl_ms / 1000.0)
        with self._lock:
            self._sequence += 1
            self._releases[(effect.keys, effect.args)] = (pending, self._sequence)
            if len(self._releases) > self.limit:  # the one whose lock expires first
                soonest = min(self._releases, key=lambda name: self._releases[name][0].until)
                del self._releases[soonest]
            start = self._claim_flusher()
        self.wake.set()
        if start:
            self.start_flusher()

    def cover_tags(self, carries: Callable[[str], bool], whole: PendingPattern) -> None:
        """A function met after some tags were queued: the pending tags it `carries`
        (by their text) cover its keys too, so it is not served from Redis either."""
        with self._lock:
            for name, (tag, sequence) in list(self._tags.items()):
                if carries(tag.text) and whole not in tag.covers:
                    self._tags[name] = (replace(tag, covers=(*tag.covers, whole)), sequence)
            self._starts = self._pattern_starts()

    def blocks(self, key: str) -> bool:
        """True while an invalidation covering `key` has not reached Redis."""
        return key in self._keys or self._covered(key)

    def take(self) -> Delivery:
        """What to deliver now. An empty Delivery ends the flusher's turn, in the same
        step, so that an add() racing with it starts a new flusher."""
        with self._lock:
            delivery = self._delivery()
            if not delivery:
                self._flushing = False
            return delivery

    def peek(self) -> Delivery:
        """What a delivery would hold now, without taking the flusher's turn."""
        with self._lock:
            return self._delivery()

    def pending_any(self) -> bool:
        return bool(self._keys or self._patterns or self._releases or self._tags)

    def stand_down(self) -> None:
        """The flusher stops with work left (the engine is closing); kick() or the
        next add() starts another."""
        with self._lock:
            self._flushing = False

    def kick(self) -> None:
        """Start a flusher if work waits and none runs."""
        with self._lock:
            start = self.pending_any() and self._claim_flusher()
        if start:
            self.start_flusher()

    def landed(self, delivery: Delivery) -> None:
        """Forget what Redis took: the items of `delivery`, unless queued again since
        it was taken."""
        with self._lock:
            for item in delivery.keys:
                queued = self._keys.get(item.key)
                if queued is not None and queued[1] <= delivery.sequence:
                    del self._keys[item.key]
                    self.delivered += 1
            for pattern in delivery.patterns:
                queued_pattern = self._patterns.get(pattern.match)
                if queued_pattern is not None and queued_pattern[1] <= delivery.sequence:
                    del self._patterns[pattern.match]
                    self.delivered += 1
            for release in delivery.releases:
                name = (release.effect.keys, release.effect.args)
                queued_release = self._releases.get(name)
                if queued_release is not None and queued_release[1] <= delivery.sequence:
                    del self._releases[name]
            for tag in delivery.tags:
                queued_tag = self._tags.get(tag.key)
                if queued_tag is not None and queued_tag[1] <= delivery.sequence:
                    del self._tags[tag.key]
                    self.delivered += 1
            self._starts = self._pattern_starts()
            self.active = bool(self._keys or self._patterns or self._tags)

    def pending(self) -> list[str]:
        """The keys, the SCAN patterns of bulk invalidations and the tags' version
        keys still waiting."""
        with self._lock:
            return [*self._keys, *self._patterns, *self._tags]

    def reset_after_fork(self, can_flush: bool) -> None:
        """In a forked child: keep the pending work (the child must not serve those
        keys either), with a fresh lock and no flusher (threads do not survive
        fork); start one if the engine can (a sync client), else the next add()."""
        self._lock = threading.Lock()
        self.wake = threading.Event()
        self._flushing = False
        if can_flush:
            self.kick()

    def _delivery(self) -> Delivery:
        now = monotonic()
        expired = [name for name, (r, _) in self._releases.items() if r.until <= now]
        for name in expired:
            del self._releases[name]  # the lock's own ttl has freed it
        return Delivery(
            [item for item, _ in self._keys.values()],
            [pattern for pattern, _ in self._patterns.values()],
            [release for release, _ in self._releases.values()],
            self._sequence,
            [tag for tag, _ in self._tags.values()],
        )

    def _claim_flusher(self) -> bool:
        if self._flushing:
            return False
        self._flushing = True
        return True

    def _covered(self, key: str) -> bool:
        return any(key.startswith(start) for start in self._starts)

    def _pattern_starts(self) -> tuple[str, ...]:
        """What `blocks` checks without the lock: the starts of pending patterns, and
        of the functions a pending tag may cover."""
        starts = [p.start for p, _ in self._patterns.values()]
        starts += [p.start for tag, _ in self._tags.values() for p in tag.covers]
        return tuple(starts)

    def _add_pattern(self, pattern: PendingPattern) -> None:
        self._patterns[pattern.match] = (pattern, self._sequence)
        self._starts = self._pattern_starts()
        for key in [key for key in self._keys if key.startswith(pattern.start)]:
            del self._keys[key]  # queued before the pattern: it covers them

    def _collapse(self, whole: PendingPattern) -> None:
        self.collapsed += 1
        self._add_pattern(whole)
        logger.warning(
            "outbox full (%d keys waiting for Redis): %s is now invalidated as a whole "
            "once Redis answers",
            self.limit,
            whole.name or whole.match,
        )
