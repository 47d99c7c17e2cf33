"""The byte budget of near caches: what an entry weighs, and the bytes the stores that
share a budget hold, kept within its most by evicting whichever entry is worth least.
No redis or asyncio imports here.
"""

from __future__ import annotations

import sys
import threading
import weakref
from typing import Any, Final, Protocol

# What an entry costs besides its key and value: its slots in the store's dict and a
# policy segment, its tuple, expiry float and size int, its share of the frequency
# sketch. tracemalloc measured 249-299 bytes from 1,000 to 140,000 entries on CPython
# 3.11 (dicts grow in steps); tests/test_near_budget.py checks it stays below this.
ENTRY_OVERHEAD_BYTES: Final = 320


class Holder(Protocol):
    """What a budget needs of a store sharing it (`Holder`)."""

    held: int  # bytes of the store's entries

    def frequency(self, key: str) -> int:
        """How often `key` was read lately (W-TinyLFU's sketch)."""

    def victim(self, spare: str) -> str | None:
        """The entry the store would give up first, other than `spare`."""

    def evict(self, key: str) -> None:
        """Let `key` go to make room."""

    def refuse(self, key: str) -> None:
        """Let `key`, just kept, go again: it is worth less than what it would push out."""


def weigh(key: str, frozen: Any) -> int:
    """The bytes an entry is counted as: its key, what is kept of its value, and
    ENTRY_OVERHEAD_BYTES. A frozen value is bytes, a scalar, or a flat dict or list
    of scalars (the codecs' `freeze`), so one level down is all there is."""
    size = sys.getsizeof(key) + sys.getsizeof(frozen) + ENTRY_OVERHEAD_BYTES
    kind = type(frozen)
    if kind is dict:
        size += sum(sys.getsizeof(name) + sys.getsizeof(item) for name, item in frozen.items())
    elif kind is list:
        size += sum(map(sys.getsizeof, frozen))
    return size


class NearBudget:
    """The bytes held by the near caches that share it (every function on the
    engine's near cache, or one function's own) and the most they may hold. Its lock
    guards their fills, drops and clears."""

    def __init__(self, max_bytes: int | None) -> None:
        self.max_bytes = max_bytes
        self.held = 0
        self.lock = threading.Lock()
        self._stores: weakref.WeakSet[Holder] = weakref.WeakSet()

    def join(self, store: Holder) -> None:
        self._stores.add(store)

    def reset_after_fork(self) -> None:
        """A fresh lock (a thread gone in the child may have held it); every store
        empties itself."""
        self.lock = threading.Lock()
        self.held = 0

    def make_room(self, store: Holder, key: str, weight: int) -> None:
        """Back within max_bytes after `store` kept `key`, under the lock. The new
        entry competes, by frequency, with the entry worth least in the store that
        holds the most bytes (and has another entry): the loser goes, until the
        budget holds."""
        most = self.max_bytes
        if most is None or self.held <= most:
            return
        if weight > most:  # could never fit: do not empty the tier trying
            store.refuse(key)
            return
        frequency = store.frequency(key)
        while self.held > most:
            holder, victim = self._least_worth(store, key)
            if victim is None or frequency <= holder.frequency(victim):
                store.refuse(key)
                return
            holder.evict(victim)

    def _least_worth(self, store: Holder, key: str) -> tuple[Holder, str | None]:
        """The store holding the most bytes that has an entry to give up (other than
        `key` itself), and that entry."""
        for holder in sorted(self._stores, key=_bytes_held, reverse=True):
            victim = holder.victim(key if holder is store else "")
            if victim is not None:
                return holder, victim
        return store, None


def _bytes_held(store: Holder) -> int:
    return store.held
