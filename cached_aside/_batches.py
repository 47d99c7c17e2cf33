"""Flows for many entries at once: many() (one pipeline of lookups) and its misses
through the batch loader (one lock batch, one loader call, one store batch).

The per-entry rules are the ones in flows.py. No redis, asyncio or time imports here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from ._codecs import Found
from ._effects import (
    UNREAD,
    Batch,
    Command,
    CommandFailed,
    Each,
    Flow,
    Free,
    Hold,
    Land,
    Lead,
    LoadOne,
    LoadSome,
    RunScript,
    Signal,
    TagsOf,
)
from ._errors import BatchLoaderError, CacheUnavailableError
from ._flows import lock_hold, miss, release_now

# Bulk invalidation lives in _invalidations; these names stay importable from here for
# the modules that still do (engine, wrapping, flusher and tests) until they move.
from ._invalidations import SCAN_BATCH as SCAN_BATCH
from ._invalidations import deliver as deliver
from ._invalidations import invalidate_many as invalidate_many
from ._invalidations import invalidate_matching as invalidate_matching
from ._invalidations import invalidate_pattern as invalidate_pattern
from ._invalidations import invalidate_tags as invalidate_tags
from ._keys import entry_keys
from ._loading import NO_STALE, guarded_load, leased, load_store, tolerate, what_to_store
from ._plan import Plan, Served
from ._reads import (
    BATCH,
    aged,
    batch_step,
    found_in,
    on_lookup,
    peek_lookup,
    served_aged,
)
from ._results import Source
from ._scripts import (
    RELEASE_ONLY,
    AcquireStatus,
    acquire_call,
)
from ._stamps import (
    Verdict,
    stamp_of,
    stamped,
    tagged_lookups,
    take_stamps,
    unstamped,
    version_reads_after,
)

# Misses of one async many() call loaded at once without a batch loader: enough to
# overlap loads, few enough not to drain the connection pool or flood the primary.
MAX_CONCURRENT_MISSES = 32


def lookups(plan: Plan, keys: Sequence[str]) -> Batch:
    """The lookups of many entries, replied to exactly like single lookups."""
    if plan.peek:
        return Batch([peek_lookup(plan, key) for key in keys])
    return Batch([Command((plan.codec.read_command, key)) for key in keys])


def load_batch(
    plan: Plan,
    keys: Sequence[str],
    raws: Sequence[Any],
    block_limit_ms: int,
    at: Sequence[int] | None = None,
    outdated: frozenset[int] = frozenset(),
) -> Flow[list[Served | Exception | None]]:
    """Serve the misses of a many() call through its batch loader.

    Locks every missing entry in one batch, calls the batch loader once for the
    entries this call owns (plus those Redis failed on: fail open), and stores them in
    one batch under the same lease rule as a single load. Entries another caller is
    loading are waited for one by one, as a single call would. `at` gives each
    entry's position in the many() call (its loads name those); default: in order.
    `outdated`: positions of entries found with a stamp that is not current, to be
    loaded whatever is cached.

    An entry kept past its ttl for stale_if_error is loaded with the others; if the
    batch load fails, it answers with its kept value (Source.STALE) and each entry
    without one with the load's error (an Exception in its place), as a single call
    would, and the entries other callers were loading are not waited for (None).
    """
    at = range(len(keys)) if at is None else at
    codec, options, stats = plan.codec, plan.options, plan.stats
    answers: list[Served | Exception | None] = [None] * len(keys)
    stale = [found_in(plan, raw) if aged(plan, raw) else NO_STALE for raw in raws]
    stale = [None if kept is Found.NEGATIVE else kept for kept in stale]
    uncached: list[int] = []  # Redis failed: load, but store nothing
    lockable: list[int] = []
    corrupt: set[int] = set()
    for position, (key, raw) in enumerate(zip(keys, raws, strict=True)):
        if type(raw) is CommandFailed and not raw.wrong_type:
            tolerate(plan, key, raw)
            uncached.append(position)
            continue
        found = Found.CORRUPT if type(raw) is CommandFailed else found_in(plan, raw)
        if found is Found.CORRUPT or found is Found.MISMATCH:
            stats.corrupt(key, mismatch=found is Found.MISMATCH)
            corrupt.add(position)
        lockable.append(position)
    holds = {
        position: lock_hold(plan, entry_keys(keys[position]), os.urandom(16).hex())
        for position in lockable
    }
    # Armed before the lock scripts leave: a reply may be lost after Redis granted.
    attempt = Hold(tuple(r for hold in holds.values() for r in hold.releases), options.lock_ttl_ms)
    yield attempt
    acquires: list[Command | RunScript] = [
        acquire_call(
            entry_keys(keys[p]),
            token=_token(holds[p]),
            lock_ttl_ms=options.lock_ttl_ms,
            redis_type=codec.redis_type,
            ignore_cached=p in corrupt or p in outdated,
            keep_ms=options.keep_ms,
        )
        for p in lockable
    ]
    stamps: list[Any] = []  # with tags: the stamp each entry found must carry
    if plan.tags:
        texts = []
        for p in lockable:
            texts.append((yield TagsOf(LoadOne(at[p]))))
        reads, places = version_reads_after(acquires, [keys[p] for p in lockable], texts)
        sent = yield Batch(reads)
        replies = sent[: len(acquires)]
        stamps = [stamp_of([sent[i] for i in place[1:]]) for place in places]
    else:
        replies = yield Batch(acquires)
    owned: list[int] = []
    unsure: list[int] = []  # the lock script failed: the lock may have been granted
    held: dict[int, tuple[int, Hold] | None] = {}  # the lock's pttl and the entry's Hold
    failed: list[tuple[int, CommandFailed]] = []
    for index, (position, reply) in enumerate(zip(lockable, replies, strict=True)):
        if type(reply) is CommandFailed:
            failed.append((position, reply))
            if reply.sent:
                unsure.append(position)
        elif reply[0] == AcquireStatus.OWNED:
            owned.append(position)
        elif reply[0] == AcquireStatus.FOUND:
            entry, verdict = reply[1], Verdict.CURRENT
            if stamps:  # a stamp not current, or not read: the single path judges it
                stamp = stamps[index]
                verdict = Verdict.OUTDATED
                if type(stamp) is not CommandFailed:
                    entry, verdict = unstamped(entry, stamp)
            found = codec.decode(entry) if verdict is Verdict.CURRENT else Found.CORRUPT
            if found is Found.NEGATIVE:
                stats.negative_hit()
                answers[position] = Served(None, Source.NEGATIVE)
            elif type(found) is not Found:
                stats.hit()
                answers[position] = Served(found, Source.CACHE)
            else:
                held[position] = None  # corrupt after all: the single path repairs it
        else:
            held[position] = (int(reply[1]), holds[position])  # registered as a waiter
    # Narrow the Hold to the locks this call holds, those it may hold, and each
    # registration as a waiter (handed to the single path below).
    locked = Hold(tuple(holds[p].releases[0] for p in owned), options.lock_ttl_ms)
    yield locked
    if unsure:  # loaded without a lock: any such lock is useless, and others wait on it
        yield from release_now(
            Hold(tuple(r for p in unsure for r in holds[p].releases), options.lock_ttl_ms)
        )
    for wait in held.values():
        if wait is not None:
            yield wait[1]
    yield Free(attempt)
    for position, failure in failed:
        tolerate(plan, keys[position], failure)
        uncached.append(position)
    failed_load = False
    if owned or uncached:
        failed_load = yield from _load_and_store_many(
            plan, keys, owned, sorted(uncached), holds, answers, at, stale
        )
    if not failed_load:
        yield Free(locked)
    else:
        # Nothing was stored: the locks go back now, and with an error to raise (an
        # entry without a kept value) so do the waiters' places: many() may go on
        # serving others, and nothing more is waited for.
        erred = any(isinstance(answer, Exception) for answer in answers)
        rest = [locked, *(w[1] for w in held.values() if erred and w is not None)]
        for hold in rest:
            yield Free(hold)
        releases = tuple(r for hold in rest for r in hold.releases)
        if releases:
            yield from release_now(Hold(releases, options.lock_ttl_ms))
        if erred:
            return answers
    for position, wait in held.items():
        answers[position] = yield from miss(
            plan,
            keys[position],
            False,
            block_limit_ms,
            LoadOne(at[position]),
            wait,
            stale[position],
        )
    assert all(answer is not None for answer in answers), "every entry of a batch is answered"
    return answers


def many(
    plan: Plan,
    keys: Sequence[str],
    batched: bool,
    blocked: frozenset[int],
    block_limit_ms: int,
) -> Flow[list[tuple[Served, bool]]]:
    """Serve distinct keys at once: one pipeline of lookups, then the misses through
    the batch loader when there is one (`batched`), else one by one as single calls
    would be (shared with this process's callers of the same key). Entries due for
    a refresh_ahead reload, and `blocked` ones (their invalidation waits in the
    outbox), always take the single path, which knows how. Answers are in order,
    each with whether it was shared with another caller.
    """
    if plan.tags:
        texts = []
        for position in range(len(keys)):
            texts.append((yield TagsOf(LoadOne(position))))
        raws, outdated = yield from tagged_lookups(plan, lookups(plan, keys), keys, texts)
    else:
        raws, outdated = (yield lookups(plan, keys)), set()
    answers: list[tuple[Served, bool] | None] = [None] * len(keys)
    to_batch: list[int] = []
    one_by_one: list[int] = []
    for position, raw in enumerate(raws):
        pending = position in blocked
        hit = None if pending else on_lookup(plan, raw)
        if hit is not None:  # batch_step(False, True, ...): a hit answers
            answers[position] = (hit, False)
            continue
        step = batch_step(pending, False, batched, served_aged(plan, raw))
        if step is BATCH:
            to_batch.append(position)
        else:
            one_by_one.append(position)
    if to_batch:
        to_batch, joining = yield from _lead(keys, to_batch)
        one_by_one = sorted(one_by_one + joining)
    error: Exception | None = None
    if to_batch:
        served = yield from load_batch(
            plan,
            [keys[p] for p in to_batch],
            [raws[p] for p in to_batch],
            block_limit_ms,
            to_batch,
            frozenset(i for i, p in enumerate(to_batch) if p in outdated),
        )
        yield Land(tuple((keys[p], answer) for p, answer in zip(to_batch, served, strict=True)))
        for position, answer in zip(to_batch, served, strict=True):
            if isinstance(answer, Exception):
                error = error or answer
            elif answer is not None:
                answers[position] = (answer, False)
        if error is not None:
            raise error  # a load without a kept value failed: as a single call would
    if one_by_one:
        # A reply read while its key was blocked is never used: by the time the entry
        # is served the outbox may have delivered, and the reply predates that.
        entries = tuple((p, keys[p], UNREAD if p in blocked else raws[p]) for p in one_by_one)
        replies = yield Each(plan, entries, MAX_CONCURRENT_MISSES)
        for position, reply in zip(one_by_one, replies, strict=True):
            answers[position] = reply
    done = [answer for answer in answers if answer is not None]
    assert len(done) == len(keys), "every entry of many() is answered"
    return done


def _lead(keys: Sequence[str], positions: list[int]) -> Flow[tuple[list[int], list[int]]]:
    """Lead this process's flight of each entry about to be batched: its callers here
    join the batch. Returns the positions led, and those whose flight (or reload) is
    under way already: they join it through the single path instead of loading."""
    led = yield Lead(tuple(keys[p] for p in positions))
    return (
        [p for p, leads in zip(positions, led, strict=True) if leads],
        [p for p, leads in zip(positions, led, strict=True) if not leads],
    )


def _token(hold: Hold) -> str:
    return str(hold.releases[0].args[0])


def _load_and_store_many(
    plan: Plan,
    keys: Sequence[str],
    owned: list[int],
    uncached: list[int],
    holds: Mapping[int, Hold],
    answers: list[Served | Exception | None],
    at: Sequence[int],
    stale: Sequence[Any],
) -> Flow[bool]:
    """Load every owned and uncached entry in one batch loader call and store the
    owned ones in one pipeline. A failure before the stores leaves the locks' Hold
    to the driver; a store Redis did not take keeps its lock in a Hold of its own.
    A failed load with a kept value for any entry (stale_if_error) answers each
    entry with its kept value or the error, stores nothing, and returns True."""
    options, stats = plan.options, plan.stats
    to_load = tuple(sorted(owned + uncached))
    owning = set(owned)  # a failed lock attempt has a token too, but no lock
    stamps: dict[int, Any] = {}  # with tags: each owned entry's stamp, or the failure
    tagged: list[tuple[str, tuple[str, ...]]] = []
    if plan.tags and owned:
        for p in owned:
            tagged.append((keys[p], (yield TagsOf(LoadOne(at[p])))))
        taken = yield from take_stamps(plan, tagged)
        stamps = dict(zip(owned, taken, strict=True))
        for p, stamp in stamps.items():
            if type(stamp) is CommandFailed:
                tolerate(plan, keys[p], stamp)
    for _ in to_load:
        stats.miss()
        stats.load()
    # Through the loader breaker, as a single load: skipped while it is open.
    locks = [(entry_keys(keys[p]), _token(holds[p])) for p in owned]
    load = leased(plan, locks, LoadSome(tuple(at[p] for p in to_load)), tagged)
    kept_any = any(stale[p] is not NO_STALE for p in to_load)
    try:
        values = yield from guarded_load(plan, f"{len(to_load)} keys", load, NO_STALE, counted=True)
    except Exception as exc:  # the loader, its timeout, or its breaker; never CancelledError
        if not kept_any or isinstance(exc, CacheUnavailableError | CommandFailed):
            raise
        _serve_kept(plan, keys, to_load, stale, answers, exc)
        return True
    stores: list[Command | RunScript] = []
    results: dict[int, Any] = {}
    # XFetch: each entry's load time is the batch's (it loaded them all at once).
    load_ms = (yield Signal.LOAD_TIME) if options.xfetch_beta else None
    for position, value in zip(to_load, values, strict=True):
        kind, ttl_ms, payload, results[position] = what_to_store(plan, value, keys[position])
        stamp = stamps.get(position)
        if type(stamp) is CommandFailed:  # no version to stamp it with: store nothing
            kind, ttl_ms, payload = RELEASE_ONLY, 0, []
        elif stamp is not None and kind == plan.codec.redis_type:
            payload = stamped(kind, payload, stamp)
        if position in owning:
            store = load_store(
                entry_keys(keys[position]),
                token=_token(holds[position]),
                kind=kind,
                ttl_ms=ttl_ms,
                wake_ttl_ms=options.lock_ttl_ms,
                payload=payload,
                load_ms=load_ms,
            )
            stores.append(store)
    # As a single load: callers of this process that come from here on read for
    # themselves, so none is handed a value stored before its call began.
    yield Signal.SEAL
    replies = yield Batch(stores)
    refused: list[int] = []
    for position, reply in zip(owned, replies, strict=True):
        kept = True  # a store that failed is no sign of an invalidation
        if type(reply) is CommandFailed:
            refused.append(position)
            tolerate(plan, keys[position], reply)
        else:
            kept = bool(reply)
        answers[position] = Served(
            results[position], Source.LOADER, lease_kept=kept, shareable=kept
        )
    if refused:  # now: this flow may go on to wait for other entries
        yield from release_now(
            Hold(tuple(holds[p].releases[0] for p in refused), options.lock_ttl_ms)
        )
    for position in uncached:
        answers[position] = Served(results[position], Source.LOADER, shareable=True)
    return False


def _serve_kept(
    plan: Plan,
    keys: Sequence[str],
    loaded: Sequence[int],
    stale: Sequence[Any],
    answers: list[Served | Exception | None],
    error: Exception,
) -> None:
    """A failed batch load, as a failed single load is answered: each entry with a
    value kept for stale_if_error gets it (Source.STALE), the others the error."""
    served = 0
    for position in loaded:
        if stale[position] is NO_STALE:
            answers[position] = error
            continue
        served += 1
        plan.stats.stale()
        answers[position] = Served(stale[position], Source.STALE, shareable=True)
    plan.stats.loader_error(
        f"{len(loaded)} keys", error, served=f"the kept values of {served} keys are served"
    )


def align(name: str, items: Sequence[Any], returned: object) -> list[Any]:
    """The batch loader's answer as one value per item, in the items' order.

    It may return a sequence of the same length, or a mapping from item to value in
    which a missing item means None ("no such record").
    """
    if isinstance(returned, Mapping):
        return [returned.get(item) for item in items]
    if isinstance(returned, Sequence) and not isinstance(returned, str | bytes):
        if len(returned) != len(items):
            raise BatchLoaderError(
                f"{name}: the batch_loader returned {len(returned)} values for "
                f"{len(items)} items; return one value per item, in order (None for a "
                "missing record), or a dict keyed by item"
            )
        return list(returned)
    raise BatchLoaderError(
        f"{name}: the batch_loader returned {type(returned).__qualname__}; return a list "
        "with one value per item, in order, or a dict keyed by item"
    )
