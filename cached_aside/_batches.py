"""Flows for many entries at once: many() with a batch loader, invalidate_many, and
dropping every entry whose key matches a pattern.

Each step sends one Batch (a pipeline: one round trip per node) instead of one
command per entry; the per-entry rules are the ones in flows.py. No redis, asyncio
or time imports here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
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
    PendingKey,
    PendingPattern,
    PendingTag,
    Postpone,
    RunScript,
    Scan,
    Signal,
    TagsOf,
)
from ._errors import BatchLoaderError, CacheUnavailableError
from ._flows import lock_hold, miss, release_now
from ._keys import entry_keys, tag_key
from ._loading import NO_STALE, guarded_load, leased, tolerate, what_to_store
from ._outbox import Delivery
from ._plan import Plan, Served
from ._reads import ANSWER, BATCH, aged, batch_step, found_in, on_lookup, served_aged
from ._results import BulkOutcome, Source
from ._scripts import (
    RELEASE_ONLY,
    AcquireStatus,
    acquire_call,
    invalidate_call,
    peek_call,
    store_call,
)
from ._stamps import Verdict, judge_stamped, stamp_of, stamped, take_stamps, unstamped

# Keys deleted per pipeline by invalidate_matching; SCAN is asked for as many.
SCAN_BATCH = 1000
# Misses of one async many() call loaded at once without a batch loader: enough to
# overlap loads, few enough not to drain the connection pool or flood the primary.
MAX_CONCURRENT_MISSES = 32


def lookups(plan: Plan, keys: Sequence[str]) -> Batch:
    """The lookups of many entries, replied to exactly like single lookups."""
    if plan.peek:
        kind = plan.codec.redis_type
        return Batch([peek_call(key, redis_type=kind) for key in keys])
    return Batch([Command((plan.codec.read_command, key)) for key in keys])


def tagged_lookups(
    plan: Plan, keys: Sequence[str], texts: Sequence[tuple[str, ...]]
) -> Flow[tuple[list[Any], set[int]]]:
    """The lookups of many entries of a tagged function with their tags' versions,
    each version read once, in one pipeline after the entries; returns each entry's
    reply as an untagged lookup's (read_stamped), and the positions of the entries
    found with a stamp that is not current (foreign ones counted)."""
    reads, places = _with_versions(lookups(plan, keys).effects, keys, texts)
    replies = yield Batch(reads)
    raws, outdated = [], set()
    for position, place in enumerate(places):
        raw, verdict = judge_stamped(plan, [replies[i] for i in place])
        raws.append(raw)
        if verdict is not Verdict.CURRENT:
            outdated.add(position)
            if verdict is Verdict.FOREIGN:
                plan.stats.corrupt(keys[position])
    return raws, outdated


def _with_versions(
    effects: Sequence[Command | RunScript], keys: Sequence[str], texts: Sequence[tuple[str, ...]]
) -> tuple[list[Command | RunScript], list[list[int]]]:
    """Effects followed by the GET of every distinct tag version they need; and for
    each effect, the positions of its reply and of its tags' versions' replies."""
    reads: list[Command | RunScript] = list(effects)
    seen: dict[str, int] = {}
    places = []
    for position, (key, tags) in enumerate(zip(keys, texts, strict=True)):
        place = [position]
        for text in tags:
            version_key = tag_key(key, text)
            if version_key not in seen:
                seen[version_key] = len(reads)
                reads.append(Command(("GET", version_key)))
            place.append(seen[version_key])
        places.append(place)
    return reads, places


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
        reads, places = _with_versions(acquires, [keys[p] for p in lockable], texts)
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
        raws, outdated = yield from tagged_lookups(plan, keys, texts)
    else:
        raws, outdated = (yield lookups(plan, keys)), set()
    answers: list[tuple[Served, bool] | None] = [None] * len(keys)
    to_batch: list[int] = []
    one_by_one: list[int] = []
    for position, raw in enumerate(raws):
        pending = position in blocked
        hit = None if pending else on_lookup(plan, raw)
        step = batch_step(pending, hit is not None, batched, hit is None and served_aged(plan, raw))
        if hit is not None and step is ANSWER:
            answers[position] = (hit, False)
        elif step is BATCH:
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
    for position, value in zip(to_load, values, strict=True):
        kind, ttl_ms, payload, results[position] = what_to_store(plan, value, keys[position])
        stamp = stamps.get(position)
        if type(stamp) is CommandFailed:  # no version to stamp it with: store nothing
            kind, ttl_ms, payload = RELEASE_ONLY, 0, []
        elif stamp is not None and kind == plan.codec.redis_type:
            payload = stamped(kind, payload, stamp)
        if position in owning:
            store = store_call(
                entry_keys(keys[position]),
                token=_token(holds[position]),
                kind=kind,
                ttl_ms=ttl_ms,
                wake_ttl_ms=options.lock_ttl_ms,
                payload=payload,
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


def invalidate_many(plan: Plan, keys: Sequence[str], whole: PendingPattern) -> Flow[BulkOutcome]:
    """Delete many entries and revoke their loads in flight. Those Redis did not take
    go to the outbox; raises after queueing them when the function does not fail open."""
    wake_ttl_ms = plan.options.lock_ttl_ms
    replies = yield Batch(
        [invalidate_call(entry_keys(key), wake_ttl_ms=wake_ttl_ms) for key in keys]
    )
    existed = 0
    failed: list[tuple[str, CommandFailed]] = []
    for key, reply in zip(keys, replies, strict=True):
        if type(reply) is CommandFailed:
            failed.append((key, reply))
        else:
            existed += int(reply)
    if failed:
        for _ in failed:
            plan.stats.postponed()
        yield Postpone(tuple(PendingKey(key, wake_ttl_ms, whole) for key, _ in failed))
        for key, failure in failed:
            tolerate(plan, key, failure)
    return BulkOutcome(existed, len(failed))


def invalidate_pattern(pattern: PendingPattern, plan: Plan | None = None) -> Flow[BulkOutcome]:
    """invalidate_matching() for a function (`plan`) or a whole engine; what Redis
    did not finish goes to the outbox, and with a plan that does not fail open,
    raises after queueing."""
    deleted, failure = yield from invalidate_matching(pattern.match, pattern.belongs)
    if failure is None:
        return BulkOutcome(deleted)
    yield Postpone((pattern,))
    if plan is not None:
        plan.stats.postponed()
        tolerate(plan, pattern.name or pattern.match, failure)
    return BulkOutcome(deleted, 1)


def invalidate_matching(
    match: str, belongs: Callable[[str], bool]
) -> Flow[tuple[int, CommandFailed | None]]:
    """UNLINK every key that matches the glob and `belongs`, a batch at a time; returns
    how many value keys were deleted, and the failure that stopped it part way.

    SCAN never blocks Redis the way KEYS does, and UNLINK frees memory off the main
    thread. The entries' locks go too, which revokes the leases of loads in flight.

    Why not a generation number in every key: a hit would need the current
    generation first, either one more round trip on every hit or a per-process copy
    that other processes' bumps leave stale. Bulk invalidation is rare; hits are not.
    """
    deleted = 0
    position: Any = None
    while True:
        try:
            position, found = yield Scan(match, position, SCAN_BATCH)
        except CommandFailed as failure:
            return deleted, failure
        doomed = [key for key in found if belongs(key)]
        if doomed:
            replies = yield Batch([Command(("UNLINK", key)) for key in doomed])
            for key, reply in zip(doomed, replies, strict=True):
                if type(reply) is CommandFailed:
                    return deleted, reply
                if key.endswith("}"):
                    deleted += int(reply)
        if position is None:
            return deleted, None


def invalidate_tags(key_head: str, texts: Sequence[str], wake_ttl_ms: int) -> Flow[BulkOutcome]:
    """Retire each tag's version: one DEL per tag, in one pipeline, on every node. Every
    entry stamped with a retired version is a miss from then on, wherever it is and
    whatever else Redis kept or evicted; a load in flight, stamped before, stores an
    entry that is a miss too. What Redis did not take goes to the outbox as a
    PendingTag (blocking, here, the functions that can carry it). Returns the
    outcome: `deleted` counts the tags that had a version."""
    tag_keys = [tag_key(key_head, text) for text in texts]
    replies = yield Batch([Command(("DEL", key)) for key in tag_keys])
    retired = 0
    unsent: list[PendingTag] = []
    for text, key, reply in zip(texts, tag_keys, replies, strict=True):
        if type(reply) is CommandFailed:
            unsent.append(PendingTag(key, text, wake_ttl_ms))
        else:
            retired += int(reply)
    if unsent:
        yield Postpone(tuple(unsent))
    return BulkOutcome(retired, len(unsent))


def deliver(delivery: Delivery) -> Flow[Delivery]:
    """Send what the outbox holds, keys and releases in one pipeline, then each
    pattern; returns what landed."""
    landed = Delivery([], [], [], delivery.sequence)
    effects: list[Command | RunScript] = [
        invalidate_call(entry_keys(item.key), wake_ttl_ms=item.wake_ttl_ms)
        for item in delivery.keys
    ]
    effects += [release.effect for release in delivery.releases]
    if effects:
        replies = yield Batch(effects)
        for item, reply in zip(delivery.keys, replies, strict=False):
            if type(reply) is not CommandFailed:
                landed.keys.append(item)
        for release, reply in zip(delivery.releases, replies[len(delivery.keys) :], strict=True):
            if type(reply) is not CommandFailed:
                landed.releases.append(release)
    for pattern in delivery.patterns:
        _, failure = yield from invalidate_matching(pattern.match, pattern.belongs)
        if failure is not None:
            return landed  # Redis is failing again: the rest waits for the next attempt
        landed.patterns.append(pattern)
    for tag in delivery.tags:
        if (yield from _deliver_tag(tag)):
            landed.tags.append(tag)
        else:
            break
    return landed


def _deliver_tag(tag: PendingTag) -> Flow[bool]:
    """One pending tag: retire its version; True if Redis took it."""
    replies = yield Batch([Command(("DEL", tag.key))])
    return type(replies[0]) is not CommandFailed
