"""NearStore: one function's in-process tier. Frozen values bounded by entry count and by
a byte budget (`_near_budget`), chosen by W-TinyLFU (`_admission`), each expiring no
later than its Redis entry. The engine's invalidation listener drops entries the moment
Redis reports a change; while it cannot vouch for that, the entries wait aside,
unserved, until `_revalidation` rereads them. No redis or asyncio imports here.
"""

from __future__ import annotations

import itertools
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from time import monotonic
from typing import Any, Final

from ._admission import Policy
from ._codecs import Frozen
from ._keys import is_tag_key
from ._near import MISSING, NearCache, Reread
from ._near_budget import NearBudget, weigh
from ._near_keys import TrackedKeys
from ._stats import _counted

# Reads (hits and misses) waiting to be told to the policy; a ring that drops the
# oldest when full, so that a hit costs one append and no lock (Caffeine's read buffer).
READ_BUFFER: Final = 512
# Entries set aside when tracking dropped are reread when it comes back, unless the
# outage lasted longer than this: then the tier starts empty, as a new one would.
MAX_OUTAGE_SECONDS: Final = 60.0
# key -> (expires at, copier, frozen, bytes): a hit hands out copier(frozen).
Entry = tuple[float, Callable[[Any], Any], Any, int]


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
        self._data: dict[str, Entry] = {}
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
        # Per-key tracking: what Redis tracks for this store, and how to ask it to.
        self.registrations: TrackedKeys[NearStore] | None = (
            TrackedKeys(self._numbers, config.max_entries, self._budget)
            if config.tracking == "keys"
            else None
        )
        # Its entries while tracking is down, until they are reread.
        self.aside = SetAside(self)
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
            self.aside.revalidated,
            self.aside.unverified,
        )

    def reset_counts(self) -> None:
        self._miss_count = itertools.count()
        self._evictions = self._refusals = self.aside.revalidated = self.aside.unverified = 0

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
            else:
                request = registrations.claim(key)
        if request is not None and registrations is not None:
            registrations.send(self, key, request)  # outside the lock: the registrar's queue

    def _keep(
        self, key: str, copier: Callable[[Any], Any], frozen: Any, weight: int, lifetime: float
    ) -> None:
        """Under the lock: the entry in, and the bounds kept."""
        if key in self.aside.entries:  # read afresh before its reread: this one wins
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
        entry = self._data.pop(key, None) or self.aside.entries.pop(key, None)
        if entry is not None:
            self._count_bytes(-entry[3])

    def _remove(self, key: str) -> None:
        self._policy.remove(key)
        self._discard(key)

    # -- what the budget asks of the stores sharing it (`_near_budget.Holder`) -----

    def frequency(self, key: str) -> int:
        return self._policy.sketch.frequency(key)

    def victim(self, spare: str) -> str | None:
        return self._policy.victim(spare=spare)

    def evict(self, key: str) -> None:
        self._remove(key)
        self._evictions += 1

    def refuse(self, key: str) -> None:
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

    # -- per-key tracking: the registrar's calls (`TrackedKeys` does the work) ------

    def registered(self, keys: Iterable[tuple[str, int]], processed: bool = True) -> None:
        """The registrar's answer to these registrations: see `TrackedKeys.registered`."""
        if self.registrations is not None:
            self.registrations.registered(keys, processed)

    def forget_registrations(self) -> None:
        """The registrar's connection closed: Redis tracks none of its keys now."""
        if self.registrations is not None:
            self.registrations.forget_all()

    def _empty(self, counted: bool = True) -> None:
        """Nothing kept, set aside or in flight; its bytes given back to the budget
        unless it was reset (`counted=False`)."""
        self.aside.clear()
        self._data.clear()
        self._policy.clear()
        self._tickets.clear()
        self._reads.clear()
        if counted:
            self._count_bytes(-self.held)
        self.held = 0

    def reset_after_fork(self) -> None:
        """Off and empty, with a fresh lock: called in a forked child."""
        self._budget.reset_after_fork()
        self.enabled = False
        self._empty(counted=False)
        if self.registrations is not None:
            self.registrations.clear()


class SetAside:
    """A store's entries while tracking is down: never served (the hit path finds
    none), their bytes and policy standing still counted, until `_revalidation`
    rereads them; since when, and what the rereads made. The listener and
    `_revalidation` drive it; it works on its store's table under the store's lock."""

    def __init__(self, store: NearStore) -> None:
        self._owner = weakref.ref(store)  # no cycle: the store owns this
        self.entries: dict[str, Entry] = {}
        self.since: float | None = None
        self.revalidated = self.unverified = 0

    def clear(self) -> None:
        """Under the lock: none set aside any more."""
        self.entries.clear()
        self.since = None

    def _store(self) -> NearStore:
        store = self._owner()
        if store is None:  # only its store calls it, or holds it for callers
            raise ReferenceError("the near store of these entries is gone")
        return store

    def suspend(self) -> None:
        """Off, the entries set aside unserved (the hit path finds none), tickets
        cancelled: tracking dropped, and may come back."""
        store = self._store()
        with store._budget.lock:
            store.enabled = False
            self.entries.update(store._data)
            store._data = {}
            store._tickets.clear()
            if self.since is None:
                self.since = monotonic()

    def resume(self) -> list[str]:
        """On again (tracking is back): the keys set aside, still within their
        ttl, to reread, those the policy ranks highest first; the others go, and
        all go after a long outage."""
        store = self._store()
        with store._budget.lock:
            store.enabled = True
            since, self.since = self.since, None
            now = monotonic()
            if since is None or now - since > MAX_OUTAGE_SECONDS:
                self.unverified += len(self.entries)
                store._empty()
                return []
            for key in [key for key, entry in self.entries.items() if entry[0] <= now]:
                store._remove(key)
                self.unverified += 1
            return [key for key in store._policy.ranked() if key in self.entries]

    def vouch(self, keys: list[str]) -> list[tuple[str, int]]:
        """Tickets for the rereads of these keys, those still set aside; none while
        off. A change or clear reported from now on cancels them."""
        store = self._store()
        with store._budget.lock:
            if not store.enabled:
                return []
            taken = [(key, next(store._numbers)) for key in keys if key in self.entries]
            store._tickets.update(taken)
            return taken

    def restore(self, key: str, ticket: int, found: Reread) -> bool:
        """Serve a set-aside key again with what its reread found, if its ticket
        still holds; else it goes. Its policy standing is kept."""
        store, entry = self._store(), None
        if found is not None and found[1] > 0:
            lifetime = found[1] / 1000.0
            if store._ttl is not None and store._ttl < lifetime:
                lifetime = store._ttl
            copier, frozen = store._freeze(found[0])
            entry = (monotonic() + lifetime, copier, frozen, weigh(key, frozen))
        with store._budget.lock:
            ours = store._tickets.get(key) == ticket
            if ours:
                store._tickets.pop(key, None)
            registrations = store.registrations
            valid = (
                ours
                and store.enabled
                and (registrations is None or registrations.vouches(key, ticket))
            )
            old = self.entries.pop(key, None)
            if old is None:
                return False
            store._count_bytes(-old[3])
            if entry is None or not valid:
                store._policy.remove(key)
                self.unverified += 1
                return False
            store._data[key] = entry
            store._count_bytes(entry[3])
            self.revalidated += 1
            store._budget.make_room(store, key, entry[3])
            return True
