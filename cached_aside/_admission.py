"""W-TinyLFU for one near cache: which keys stay when it is full, as in Caffeine.

A count-min sketch with a doorkeeper estimates how often each key was asked for
lately; a small LRU window takes new keys, and a key leaving it enters the segmented
main LRU only if it was asked for more often than the entry it would push out. Pure
bookkeeping over keys: no values, no locks, no clock (the near cache calls it under
its lock).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from typing import Final

# Depth of the sketch: four counters per key, the estimate is their minimum.
DEPTH: Final = 4
# Counters stop at 15 (Caffeine's 4 bits): enough to rank, and aging halves them.
MOST: Final = 15
# After this many recorded reads per counter column the counters are halved, so that
# keys hot long ago lose their standing (Caffeine: ten times the capacity).
SAMPLE_FACTOR: Final = 10
# The window takes 1% of the entries (at least one), protected 80% of the rest.
WINDOW_SHARE: Final = 0.01
PROTECTED_SHARE: Final = 0.8
# The sketch's first size, in entries; it doubles as the store fills, up to max_entries.
SKETCH_START: Final = 256
_HALVE: Final = bytes(count >> 1 for count in range(256))
_MASK64: Final = (1 << 64) - 1
# One odd multiplier per row (Caffeine's seeds).
SEEDS: Final = (0xC3A5C85C97CB3127, 0xB492B66FBE98F273, 0x9AE16A3B2F90404F, 0xCBF29CE484222325)


class FrequencySketch:
    """How often each key was recorded lately, within an error the width bounds.

    A key's first sighting only sets its bits in the doorkeeper (a Bloom filter), so
    keys seen once, the bulk of a scan, never reach the counters.
    """

    def __init__(self, capacity: int) -> None:
        # Four counters per entry kept per row, as Caffeine's sketch has, so that the
        # estimates of keys read once stay near zero between two agings.
        width = 64
        while width < capacity * 4:
            width <<= 1
        self.capacity = capacity
        self._shift = 64 - (width.bit_length() - 1)  # the top bits of a 64-bit product
        self._width = width
        self._counters = bytearray(width * DEPTH)
        self._sample = capacity * SAMPLE_FACTOR
        # Bits for eight times the keys one sample can bring: few false "seen before".
        bits = 64
        while bits < self._sample * 8:
            bits <<= 1
        self._bits = bits - 1
        self._doorkeeper = bytearray(bits >> 3)
        self._recorded = 0

    def _cells(self, key: str) -> tuple[int, list[int]]:
        """The key's hash, and its counter in each row: a multiplicative hash per row,
        so that two keys sharing one counter rarely share the others."""
        hashed = hash(key) & _MASK64
        shift, width = self._shift, self._width
        return hashed, [
            row * width + (((hashed * seed) & _MASK64) >> shift) for row, seed in enumerate(SEEDS)
        ]

    def record(self, key: str) -> None:
        """One more read of `key`."""
        hashed, cells = self._cells(key)
        counters = self._counters
        if self._seen(hashed, mark=True):  # the first sighting only marks it
            for cell in cells:
                if counters[cell] < MOST:
                    counters[cell] += 1
        self._recorded += 1
        if self._recorded >= self._sample:
            self._age()

    def frequency(self, key: str) -> int:
        """The estimate: at most the true count since the last aging, plus errors."""
        hashed, cells = self._cells(key)
        counters = self._counters
        least = min(counters[cell] for cell in cells)
        return least + 1 if self._seen(hashed, mark=False) else least

    def _seen(self, hashed: int, *, mark: bool) -> bool:
        """Whether the doorkeeper has both of the key's bits; `mark`: set them."""
        doorkeeper, bits = self._doorkeeper, self._bits
        first, second = hashed & bits, (hashed >> 32) & bits
        seen = bool(doorkeeper[first >> 3] & (1 << (first & 7))) and bool(
            doorkeeper[second >> 3] & (1 << (second & 7))
        )
        if mark and not seen:
            doorkeeper[first >> 3] |= 1 << (first & 7)
            doorkeeper[second >> 3] |= 1 << (second & 7)
        return seen

    def _age(self) -> None:
        """Halve every counter and forget the doorkeeper: recent reads count most."""
        self._counters = bytearray(self._counters.translate(_HALVE))
        self._doorkeeper = bytearray(len(self._doorkeeper))
        self._recorded //= 2


class Policy:
    """W-TinyLFU over one near cache's keys, bounded by entry count.

    The near cache tells it what was read (`record`, `touch`), added and removed, and
    asks which keys to drop (`shrink`) or which one is worth least (`victim`).
    """

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        # Sized for what is kept now and grown with it (Caffeine's ensureCapacity), so an
        # idle near cache with a large max_entries takes little memory.
        self.sketch = FrequencySketch(min(capacity, SKETCH_START))
        self._window_most = max(1, int(capacity * WINDOW_SHARE))
        self._protected_most = int((capacity - self._window_most) * PROTECTED_SHARE)
        # Least recently used first in each.
        self._window: OrderedDict[str, None] = OrderedDict()
        self._probation: OrderedDict[str, None] = OrderedDict()
        self._protected: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._window) + len(self._probation) + len(self._protected)

    def add(self, key: str) -> None:
        """A new key: into the window, where it builds up reads before it competes."""
        self._window[key] = None
        sketch = self.sketch
        if len(self) > sketch.capacity and sketch.capacity < self._capacity:
            # Counts are lost, as in Caffeine; it happens a few times in a store's life.
            self.sketch = FrequencySketch(min(self._capacity, sketch.capacity * 2))

    def touch(self, key: str) -> None:
        """A read of a kept key: a second read in probation earns it protection."""
        if key in self._window:
            self._window.move_to_end(key)
        elif key in self._probation:
            del self._probation[key]
            self._protected[key] = None
            while len(self._protected) > self._protected_most:
                demoted, _ = self._protected.popitem(last=False)
                self._probation[demoted] = None
        elif key in self._protected:
            self._protected.move_to_end(key)

    def remove(self, key: str) -> None:
        for segment in (self._window, self._probation, self._protected):
            if segment.pop(key, False) is None:
                return

    def ranked(self) -> list[str]:
        """Every key, those worth most first: protected, then probation, then the
        window, each most recently read first."""
        return [
            key
            for segment in (self._protected, self._probation, self._window)
            for key in reversed(segment)
        ]

    def clear(self) -> None:
        self._window.clear()
        self._probation.clear()
        self._protected.clear()

    def victim(self, spare: str) -> str | None:
        """The key worth least: probation's oldest, else the window's, else
        protected's; never `spare` (the key competing with it)."""
        for segment in (self._probation, self._window, self._protected):
            for key in itertools.islice(segment, 2):  # the oldest, unless it is `spare`
                if key != spare:
                    return key
        return None

    def shrink(self, most: int) -> tuple[list[str], list[str]]:
        """Keys to drop so that at most `most` stay: (evicted, refused). Keys leaving
        the window are candidates; each one that is not read more often than
        probation's oldest entry is refused, else that entry is evicted."""
        evicted: list[str] = []
        refused: list[str] = []
        candidates: list[str] = []
        while len(self._window) > self._window_most:
            key, _ = self._window.popitem(last=False)
            self._probation[key] = None
            candidates.append(key)
        frequency = self.sketch.frequency
        while len(self) > most:
            # Without a key just out of the window, the window's oldest competes.
            candidate = candidates.pop() if candidates else next(iter(self._window), None)
            victim = self.victim(spare="" if candidate is None else candidate)
            if victim is None or (
                candidate is not None and frequency(candidate) <= frequency(victim)
            ):
                if candidate is None:  # nothing left to compare: the store is empty
                    break
                self.remove(candidate)
                refused.append(candidate)
            else:
                self.remove(victim)
                if victim in candidates:
                    candidates.remove(victim)
                evicted.append(victim)
                if candidate is not None:
                    candidates.append(candidate)  # still a candidate, still over?
        return evicted, refused
