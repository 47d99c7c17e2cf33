"""NearCache: an in-process tier in front of Redis, kept honest by Redis itself.

A bounded LRU of frozen values, each expiring no later than its Redis entry. The
engine's invalidation listener drops entries the moment Redis reports a change, and
empties the whole tier whenever it cannot vouch for that (no connection, no
tracking). No redis or asyncio imports here.
"""

from __future__ import annotations

import enum
import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from time import monotonic
from typing import Any, Final, Literal

from ._codecs import Frozen
from ._errors import ConfigurationError
from ._keys import is_tag_key
from ._validate import Duration, flag, milliseconds, whole


class Near(enum.Enum):
    MISSING = "missing"


MISSING: Final = Near.MISSING
DEFAULT_MAX_ENTRIES = 10_000


@dataclass(frozen=True, slots=True)
class NearCache:
    """Configuration of a function's in-process tier: `near=NearCache(...)`.

    Args:
        max_entries: what the tier keeps per function, at most: its values and the
            tickets of reads in flight together; tickets go first (the oldest), then
            the least recently used values.
        ttl: the longest an entry lives in process (seconds or timedelta); never longer
            than what its Redis entry has left. None: only that bound.
        allow_untracked: where the server cannot track keys (fakeredis, some managed
            services), serve near entries anyway, accepting that another process's
            change is seen only when the entry expires. Needs a `ttl`.
    """

    max_entries: int = DEFAULT_MAX_ENTRIES
    ttl: Duration | None = None
    allow_untracked: bool = False

    def __post_init__(self) -> None:
        whole("NearCache(max_entries=...)", self.max_entries)
        if self.ttl is not None:
            milliseconds("NearCache(ttl=...)", self.ttl)
        flag("NearCache(allow_untracked=...)", self.allow_untracked)
        if self.allow_untracked and self.ttl is None:
            raise ConfigurationError(
                "NearCache(allow_untracked=True) needs a ttl: without tracking, the ttl is "
                "the only bound on how long another process's change stays unseen"
            )

    @property
    def ttl_seconds(self) -> float | None:
        """`ttl` in seconds, or None when only the Redis entry's ttl bounds it."""
        return None if self.ttl is None else milliseconds("ttl", self.ttl) / 1000.0


class NearStore:
    """One function's entries. Reads take no lock; fills, drops and clears do, so
    that a fill checked against its ticket cannot land after a drop or a clear.

    A reader takes a ticket (`expect`) before it asks Redis; a change to that key
    reported meanwhile, or a clear, cancels the ticket, and `fill` then refuses the
    value read before the change. A read that keeps nothing gives its ticket back
    (`forget`); tickets count against max_entries with the values, so reads that end
    some other way (an exception) cannot grow the store either.
    """

    def __init__(self, config: NearCache, freeze: Callable[[Any], Frozen]):
        self.config = config
        self._freeze = freeze
        self._ttl = config.ttl_seconds
        # key -> (expires at, copier, frozen): a hit hands out copier(frozen).
        self._data: OrderedDict[str, tuple[float, Callable[[Any], Any], Any]] = OrderedDict()
        # key -> ticket, oldest first; written without the lock (one atomic step each)
        self._tickets: OrderedDict[str, int] = OrderedDict()
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()
        # Off until the engine's listener confirms that Redis reports changes.
        self.enabled = False

    def get(self, key: str) -> Any:
        """The value (a fresh copy), or MISSING."""
        entry = self._data.get(key)
        if entry is None:
            return MISSING
        if entry[0] <= monotonic():
            self._data.pop(key, None)
            return MISSING
        try:  # noqa: SIM105 - contextlib.suppress costs a microsecond on the hot path
            self._data.move_to_end(key)
        except KeyError:  # dropped by the listener just now: it was still valid then
            pass
        return entry[1](entry[2])

    def expect(self, key: str) -> int | None:
        """A ticket for a read about to be sent to Redis; None while the tier is off."""
        if not self.enabled:
            return None
        number = next(self._numbers)
        tickets = self._tickets
        tickets.pop(key, None)  # to the end: the oldest tickets are the first to go
        tickets[key] = number
        if len(tickets) + len(self._data) > self.config.max_entries:
            self._shrink()
        return number

    def forget(self, key: str, ticket: int | None) -> None:
        """Give back the ticket of a read that keeps nothing here (a load, a miss, a
        value not stored): unless a newer read took the key's ticket since."""
        if ticket is None or self._tickets.get(key) != ticket:
            return
        with self._lock:
            if self._tickets.get(key) == ticket:
                self._tickets.pop(key, None)

    def size(self) -> int:
        """What the tier keeps: values and the tickets of reads in flight."""
        return len(self._data) + len(self._tickets)

    def _shrink(self) -> None:
        """Back within max_entries: the oldest tickets first (losing one costs a
        refused fill, one more Redis read later), then the least recently used
        values."""
        limit = self.config.max_entries
        with self._lock:
            tickets, data = self._tickets, self._data
            while len(tickets) > 1 and len(tickets) + len(data) > limit:
                try:
                    tickets.popitem(last=False)
                except KeyError:  # taken by a reader meanwhile (expect takes no lock)
                    break
            while data and len(tickets) + len(data) > limit:
                data.popitem(last=False)

    def fill(self, key: str, ticket: int | None, value: Any, redis_ttl_ms: int) -> None:
        """Keep a value read from Redis, if nothing changed since the ticket was taken."""
        if ticket is None or redis_ttl_ms <= 0:  # -1: no expiry; never keep those here
            return
        lifetime = redis_ttl_ms / 1000.0
        if self._ttl is not None and self._ttl < lifetime:
            lifetime = self._ttl
        copier, frozen = self._freeze(value)
        with self._lock:
            if not self.enabled or self._tickets.get(key) != ticket:
                return
            self._tickets.pop(key, None)
            self._data[key] = (monotonic() + lifetime, copier, frozen)
            self._data.move_to_end(key)
            while self._data and len(self._data) + len(self._tickets) > self.config.max_entries:
                self._data.popitem(last=False)

    def drop(self, keys: Iterable[str]) -> None:
        """Forget these keys and cancel tickets for them: Redis changed them. A tag's
        version changed (invalidate_tags()) empties the tier: entries do not say here
        which tags they carry."""
        keys = list(keys)
        if any(is_tag_key(key) for key in keys):
            self.clear()
            return
        with self._lock:
            for key in keys:
                self._data.pop(key, None)
                self._tickets.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._tickets.clear()

    def switch(self, on: bool) -> None:
        """Turn the tier on (tracking confirmed) or off (emptied: nothing vouches for it)."""
        with self._lock:
            self.enabled = on
            self._data.clear()
            self._tickets.clear()

    def reset_after_fork(self) -> None:
        """Off and empty, with a fresh lock: called in a forked child."""
        self._lock = threading.Lock()
        self.enabled = False
        self._data.clear()
        self._tickets.clear()


TrackingState = Literal["starting", "tracking", "down", "unsupported"]
