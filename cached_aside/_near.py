"""NearCache: an in-process tier in front of Redis, kept honest by Redis itself.

Frozen values bounded by entry count and by a byte budget, chosen by W-TinyLFU
(`_admission`), each expiring no later than its Redis entry. The engine's
invalidation listener drops entries the moment Redis reports a change; while it cannot
vouch for that, the entries wait aside, unserved, until `_revalidation` rereads them.
No redis or asyncio imports here.
"""

from __future__ import annotations

import enum
import itertools
import sys
import threading
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from time import monotonic
from typing import Any, Final, Literal

from ._admission import Policy
from ._codecs import Frozen
from ._errors import ConfigurationError
from ._keys import is_tag_key
from ._registrations import Registrations
from ._stats import _counted
from ._validate import Duration, flag, milliseconds, whole


class Near(enum.Enum):
    MISSING = "missing"


MISSING: Final = Near.MISSING
DEFAULT_MAX_ENTRIES = 10_000
# What an entry costs besides its key and value: its slots in the store's dict and a
# policy segment, its tuple, expiry float and size int, its share of the frequency
# sketch. tracemalloc measured 249-299 bytes from 1,000 to 140,000 entries on CPython
# 3.11 (dicts grow in steps); tests/test_near_budget.py checks it stays below this.
ENTRY_OVERHEAD_BYTES: Final = 320
Tracking = Literal["keys", "bcast"]
TRACKING_MODES: Final = ("keys", "bcast")
# Reads (hits and misses) waiting to be told to the policy; a ring that drops the
# oldest when full, so that a hit costs one append and no lock (Caffeine's read buffer).
READ_BUFFER: Final = 512
# Entries set aside when tracking dropped are reread when it comes back, unless the
# outage lasted longer than this: then the tier starts empty, as a new one would.
MAX_OUTAGE_SECONDS: Final = 60.0
# What a reread of one key found: its value and the ms its Redis entry has left, or
# None when the key cannot be vouched for (gone, changed type, aged, a failure).
Reread = tuple[Any, int] | None


@dataclass(frozen=True, slots=True)
class NearCache:
    """Configuration of a function's in-process tier: `near=NearCache(...)`.

    Args:
        max_entries: what the tier keeps per function, at most: its values and the
            tickets of reads in flight together; tickets go first (the oldest), then
            the values W-TinyLFU ranks lowest.
        max_bytes: the most the tier's entries may take, counted as key + value +
            a fixed overhead per entry (see the near-cache docs). On the engine's
            `near=` it is one budget shared by every function using the engine's
            near cache; a function's own `near=NearCache(...)` has its own. None:
            bounded by max_entries only.
        ttl: the longest an entry lives in process (seconds or timedelta); never longer
            than what its Redis entry has left. None: only that bound.
        allow_untracked: where the server cannot track keys (fakeredis, some managed
            services), serve near entries anyway, accepting that another process's
            change is seen only when the entry expires. Needs a `ttl`.
        tracking: how Redis tells this process of changes. "bcast": of every change
            under the engine's prefix, whether or not this process holds the key.
            "keys": only of keys this process registered (a key's first read from
            Redis registers it and is not kept; the next one is). One engine's near
            caches all use the same mode.
    """

    max_entries: int = DEFAULT_MAX_ENTRIES
    ttl: Duration | None = None
    allow_untracked: bool = False
    max_bytes: int | None = None
    tracking: Tracking = "bcast"

    def __post_init__(self) -> None:
        if self.tracking not in TRACKING_MODES:
            raise ConfigurationError(
                f'NearCache(tracking=...) must be "keys" or "bcast", not {self.tracking!r}'
            )
        whole("NearCache(max_entries=...)", self.max_entries)
        if self.max_bytes is not None:
            whole("NearCache(max_bytes=...)", self.max_bytes)
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
        self._stores: weakref.WeakSet[NearStore] = weakref.WeakSet()

    def join(self, store: NearStore) -> None:
        self._stores.add(store)

    def reset_after_fork(self) -> None:
        """A fresh lock (a thread gone in the child may have held it); every store
        empties itself."""
        self.lock = threading.Lock()
        self.held = 0

    def make_room(self, store: NearStore, key: str, weight: int) -> None:
        """Back within max_bytes after `store` kept `key`, under the lock. The new
        entry competes, by frequency, with the entry worth least in the store that
        holds the most bytes (and has another entry): the loser goes, until the
        budget holds."""
        most = self.max_bytes
        if most is None or self.held <= most:
            return
        if weight > most:  # could never fit: do not empty the tier trying
            store._refuse(key)
            return
        frequency = store._policy.sketch.frequency(key)
        while self.held > most:
            holder, victim = self._least_worth(store, key)
            if victim is None or frequency <= holder._policy.sketch.frequency(victim):
                store._refuse(key)
                return
            holder._evict(victim)

    def _least_worth(self, store: NearStore, key: str) -> tuple[NearStore, str | None]:
        """The store holding the most bytes that has an entry to give up (other than
        `key` itself), and that entry."""
        for holder in sorted(self._stores, key=_bytes_held, reverse=True):
            victim = holder._policy.victim(spare=key if holder is store else "")
            if victim is not None:
                return holder, victim
        return store, None


def _bytes_held(store: NearStore) -> int:
    return store.held


class NearStore:
    """One function's entries. Reads take no lock; fills, drops and clears take the
    budget's, so that a fill checked against its ticket cannot land after a drop or a
    clear.

    A reader takes a ticket (`expect`) before it asks Redis; a change to that key
    reported meanwhile, or a clear, cancels the ticket, and `fill` then refuses the
    value read before the change. A read that keeps nothing gives its ticket back
    (`forget`); tickets count against max_entries with the values, so reads that end
    some other way (an exception) cannot grow the store either.

    Hits and misses are queued in a lossy ring (`_reads`) and told to the W-TinyLFU
    policy at the next fill, so that a hit stays a dict look-up and an append.
    """

    def __init__(
        self, config: NearCache, freeze: Callable[[Any], Frozen], budget: NearBudget | None = None
    ) -> None:
        self.config = config
        self._freeze = freeze
        self._ttl = config.ttl_seconds
        self._budget = NearBudget(config.max_bytes) if budget is None else budget
        self._budget.join(self)
        # key -> (expires at, copier, frozen, bytes): a hit hands out copier(frozen).
        self._data: dict[str, tuple[float, Callable[[Any], Any], Any, int]] = {}
        self._policy = Policy(config.max_entries)
        self._reads: deque[str] = deque(maxlen=READ_BUFFER)
        # key -> ticket, oldest first; written without the lock (one atomic step each)
        self._tickets: OrderedDict[str, int] = OrderedDict()
        self._numbers = itertools.count(1)
        self.held = 0  # bytes of this store's entries; changed under the budget's lock
        self._miss_count = itertools.count()
        self._evictions = self._refusals = 0
        # Off until the engine's listener confirms that Redis reports changes.
        self.enabled = False
        # Per-key tracking: what Redis tracks for this store, and how to ask it to
        # (set by the listener the store is attached to; see `_registrations`).
        self.registrations = (
            Registrations(self._numbers, config.max_entries) if config.tracking == "keys" else None
        )
        self.register: Callable[[NearStore, str, int], None] | None = None
        # Entries kept while tracking was down (never served from here; their bytes
        # and policy standing still count), since when, and what their rereads made.
        self._suspect: dict[str, tuple[float, Callable[[Any], Any], Any, int]] = {}
        self._suspended_at: float | None = None
        self.revalidated = self.unverified = 0
        # How the wrapper rereads keys for `_revalidation` (None: drop them instead).
        self.reread: Callable[[list[str]], list[Reread]] | None = None

    def get(self, key: str) -> Any:
        """The value (a fresh copy), or MISSING."""
        entry = self._data.get(key)
        if entry is None or entry[0] <= monotonic():  # an expired one goes at the next fill
            next(self._miss_count)
            return MISSING
        self._reads.append(key)
        return entry[1](entry[2])

    def expect(self, key: str) -> int | None:
        """A ticket for a read about to be sent to Redis; None while the tier is off."""
        if not self.enabled:
            return None
        number = next(self._numbers)
        self._reads.append(key)  # a miss is a read too: the key's frequency grows
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
        with self._budget.lock:
            if self._tickets.get(key) == ticket:
                self._tickets.pop(key, None)

    def size(self) -> int:
        """What the tier keeps: values and the tickets of reads in flight."""
        return len(self._data) + len(self._tickets)

    def counts(self) -> tuple[int, int, int, int, int, int]:
        """(misses, evictions, admissions refused, bytes held, entries revalidated
        and entries dropped unverified after a reconnect), for the stats."""
        return (
            _counted(self._miss_count),
            self._evictions,
            self._refusals,
            self.held,
            self.revalidated,
            self.unverified,
        )

    def reset_counts(self) -> None:
        self._miss_count = itertools.count()
        self._evictions = self._refusals = self.revalidated = self.unverified = 0

    def _shrink(self) -> None:
        """Back within max_entries: the oldest tickets first (losing one costs a
        refused fill, one more Redis read later), then the values the policy ranks
        lowest."""
        limit = self.config.max_entries
        with self._budget.lock:
            tickets = self._tickets
            while len(tickets) > 1 and len(tickets) + len(self._data) > limit:
                try:
                    tickets.popitem(last=False)
                except KeyError:  # taken by a reader meanwhile (expect takes no lock)
                    break
            self._drain()
            self._cut(limit - len(tickets))

    def fill(self, key: str, ticket: int | None, value: Any, redis_ttl_ms: int) -> None:
        """Keep a value read from Redis, if nothing changed since the ticket was taken."""
        if ticket is None or redis_ttl_ms <= 0:  # -1: no expiry; never keep those here
            return
        lifetime = redis_ttl_ms / 1000.0
        if self._ttl is not None and self._ttl < lifetime:
            lifetime = self._ttl
        copier, frozen = self._freeze(value)
        weight = weigh(key, frozen)
        budget = self._budget
        request = None
        with budget.lock:
            if not self.enabled or self._tickets.get(key) != ticket:
                return
            self._tickets.pop(key, None)
            registrations = self.registrations
            if registrations is None or registrations.vouches(key, ticket):
                self._keep(key, copier, frozen, weight, lifetime)
            elif self.register is not None:
                request = registrations.request(key)
        if request is not None and self.register is not None:
            self.register(self, key, request)  # outside the lock: the registrar's queue

    def _keep(
        self, key: str, copier: Callable[[Any], Any], frozen: Any, weight: int, lifetime: float
    ) -> None:
        """Under the lock: the entry in, and the bounds kept."""
        if key in self._suspect:  # read afresh before its reread: this one wins
            self._remove(key)
        self._drain()
        old = self._data.get(key)
        if old is None:
            self._policy.add(key)
        else:
            self._count_bytes(-old[3])
        self._data[key] = (monotonic() + lifetime, copier, frozen, weight)
        self._count_bytes(weight)
        self._cut(self.config.max_entries - len(self._tickets))
        if key in self._data:
            self._budget.make_room(self, key, weight)

    def _drain(self) -> None:
        """Tell the policy the reads queued since the last fill; drop the expired
        entries they met. Under the lock."""
        reads, data, policy = self._reads, self._data, self._policy
        record, now = policy.sketch.record, monotonic()
        while reads:
            try:
                key = reads.popleft()
            except IndexError:  # emptied by another drain (after a fork, say)
                break
            record(key)
            entry = data.get(key)
            if entry is None:
                continue
            if entry[0] <= now:
                self._remove(key)
            else:
                policy.touch(key)

    def _cut(self, most: int) -> None:
        evicted, refused = self._policy.shrink(max(most, 0))
        for key in evicted:
            self._discard(key)
        for key in refused:
            self._discard(key)
        self._evictions += len(evicted)
        self._refusals += len(refused)

    def _count_bytes(self, change: int) -> None:
        self.held += change
        self._budget.held += change

    def _discard(self, key: str) -> None:
        entry = self._data.pop(key, None) or self._suspect.pop(key, None)
        if entry is not None:
            self._count_bytes(-entry[3])

    def _remove(self, key: str) -> None:
        self._policy.remove(key)
        self._discard(key)

    def _evict(self, key: str) -> None:
        self._remove(key)
        self._evictions += 1

    def _refuse(self, key: str) -> None:
        self._remove(key)
        self._refusals += 1

    def drop(self, keys: Iterable[str]) -> None:
        """Forget these keys and cancel tickets for them: Redis changed them. A tag's
        version changed (invalidate_tags()) empties the tier: entries do not say here
        which tags they carry."""
        keys = list(keys)
        with self._budget.lock:
            if self.registrations is not None:  # Redis tracks none of them any more
                self.registrations.forget(keys)
            if any(is_tag_key(key) for key in keys):
                self._empty()
                return
            for key in keys:
                self._remove(key)
                self._tickets.pop(key, None)

    def clear(self, registrations: bool = False) -> None:
        """Empty the tier; and forget what Redis tracked for it (`registrations`)
        when Redis forgot it too (FLUSHALL)."""
        with self._budget.lock:
            self._empty()
            if registrations and self.registrations is not None:
                self.registrations.clear()

    def switch(self, on: bool, untracked: bool = False) -> None:
        """Turn the tier on (tracking confirmed) or off (emptied: nothing vouches for it).
        Either way the connections that registered keys are new or gone: so are
        their registrations. On `untracked` (allow_untracked, a server that cannot
        track) there is nothing to register with: the ttl alone bounds staleness."""
        with self._budget.lock:
            self.enabled = on
            self._empty()
            if untracked:
                self.registrations = None
            elif self.registrations is not None:
                self.registrations.clear()

    # -- per-key tracking: the registrar's replies, and a hook for revalidation ----

    def registered(self, keys: Iterable[tuple[str, int]], processed: bool = True) -> None:
        """The registrar's answer to these registrations (key, request number):
        processed, reads sent from now on may fill; or not (refused, never sent),
        the next fill asks again."""
        registrations = self.registrations
        if registrations is not None:
            answer = registrations.confirm if processed else registrations.abandon
            with self._budget.lock:
                for key, number in keys:
                    answer(key, number)

    def forget_registrations(self) -> None:
        """The registrar's connection closed: Redis tracks none of its keys now."""
        if self.registrations is not None:
            with self._budget.lock:
                self.registrations.clear()

    def request_registration(self, keys: Iterable[str]) -> None:
        """Ask Redis to track these keys (per-key mode; nothing in BCAST mode),
        e.g. entries kept across a reconnect: a value read after the reply
        (`vouches`) may be kept."""
        registrations, register = self.registrations, self.register
        if registrations is None or register is None:
            return
        with self._budget.lock:
            requests = [(key, registrations.request(key)) for key in keys]
        for key, number in requests:
            if number is not None:
                register(self, key, number)

    def awaiting_registration(self, keys: Iterable[str]) -> bool:
        """Whether a registration of any of these keys is on its way (per-key mode)."""
        registrations = self.registrations
        if registrations is None:
            return False
        with self._budget.lock:
            return registrations.awaiting(keys)

    def vouches(self, key: str, ticket: int) -> bool:
        """Whether Redis reports any change of `key` made after the read that took
        `ticket` was sent: always in BCAST mode, in per-key mode once registered."""
        registrations = self.registrations
        return registrations is None or registrations.vouches(key, ticket)

    # -- a reconnect: set aside, then reread (`_revalidation` drives these) ----------

    def suspend(self) -> None:
        """Off, the entries set aside unserved (the hit path finds none), tickets
        cancelled: tracking dropped, and may come back."""
        with self._budget.lock:
            self.enabled = False
            self._suspect.update(self._data)
            self._data = {}
            self._tickets.clear()
            if self._suspended_at is None:
                self._suspended_at = monotonic()

    def resume(self) -> list[str]:
        """On again (tracking is back): the keys set aside, still within their
        ttl, to reread, those the policy ranks highest first; the others go, and
        all go after a long outage."""
        with self._budget.lock:
            self.enabled = True
            since, self._suspended_at = self._suspended_at, None
            now = monotonic()
            if since is None or now - since > MAX_OUTAGE_SECONDS:
                self.unverified += len(self._suspect)
                self._empty()
                return []
            for key in [key for key, entry in self._suspect.items() if entry[0] <= now]:
                self._remove(key)
                self.unverified += 1
            return [key for key in self._policy.ranked() if key in self._suspect]

    def vouch(self, keys: list[str]) -> list[tuple[str, int]]:
        """Tickets for the rereads of these keys, those still set aside; none while
        off. A change or clear reported from now on cancels them."""
        with self._budget.lock:
            if not self.enabled:
                return []
            taken = [(key, next(self._numbers)) for key in keys if key in self._suspect]
            self._tickets.update(taken)
            return taken

    def restore(self, key: str, ticket: int, found: Reread) -> bool:
        """Serve a set-aside key again with what its reread found, if its ticket
        still holds; else it goes. Its policy standing is kept."""
        entry = None
        if found is not None and found[1] > 0:
            lifetime = found[1] / 1000.0
            if self._ttl is not None and self._ttl < lifetime:
                lifetime = self._ttl
            copier, frozen = self._freeze(found[0])
            entry = (monotonic() + lifetime, copier, frozen, weigh(key, frozen))
        with self._budget.lock:
            ours = self._tickets.get(key) == ticket
            if ours:
                self._tickets.pop(key, None)
            valid = ours and self.enabled and self.vouches(key, ticket)
            old = self._suspect.pop(key, None)
            if old is None:
                return False
            self._count_bytes(-old[3])
            if entry is None or not valid:
                self._policy.remove(key)
                self.unverified += 1
                return False
            self._data[key] = entry
            self._count_bytes(entry[3])
            self.revalidated += 1
            self._budget.make_room(self, key, entry[3])
            return True

    def _empty(self) -> None:
        self._suspect.clear()
        self._suspended_at = None
        self._data.clear()
        self._policy.clear()
        self._tickets.clear()
        self._reads.clear()
        self._count_bytes(-self.held)

    def reset_after_fork(self) -> None:
        """Off and empty, with a fresh lock: called in a forked child."""
        self._budget.reset_after_fork()
        self.enabled = False
        self._suspended_at = None  # as _empty(), which the budget's reset rules out
        self._suspect.clear()
        self._data.clear()
        self._policy.clear()
        self._tickets.clear()
        self._reads.clear()
        self.held = 0
        if self.registrations is not None:
            self.registrations.clear()


TrackingState = Literal["starting", "tracking", "down", "unsupported"]
