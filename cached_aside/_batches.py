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
    LoadOne,
    LoadSome,
    Postpone,
    RunScript,
    Scan,
)
from ._errors import BatchLoaderError
from ._flows import (
    NO_STALE,
    RELEASE_ONLY,
    Plan,
    Served,
    aged,
    found_in,
    guarded_load,
    join_tags,
    lock_hold,
    miss,
    on_lookup,
    release_now,
    tolerate,
    what_to_store,
)
from ._keys import entry_keys, split_entry_key, tag_key
from ._outbox import Delivery, PendingKey, PendingPattern, PendingTag
from ._results import BulkOutcome, Source
from ._scripts import AcquireStatus, ScriptName

# Keys deleted per pipeline by invalidate_matching; SCAN is asked for as many.
SCAN_BATCH = 1000
# Misses of one async many() call loaded at once without a batch loader: enough to
# overlap loads, few enough not to drain the connection pool or flood the primary.
MAX_CONCURRENT_MISSES = 32


def lookups(plan: Plan, keys: Sequence[str]) -> Batch:
    """The lookups of many entries, replied to exactly like single lookups."""
    if plan.peek:
        kind = (plan.codec.redis_type,)
        return Batch([RunScript(ScriptName.PEEK, (key,), kind) for key in keys])
    return Batch([Command((plan.codec.read_command, key)) for key in keys])


def load_batch(
    plan: Plan,
    keys: Sequence[str],
    raws: Sequence[Any],
    block_limit_ms: int,
    at: Sequence[int] | None = None,
) -> Flow[list[Served]]:
    """Serve the misses of a many() call through its batch loader.

    Locks every missing entry in one batch, calls the batch loader once for the
    entries this call owns (plus those Redis failed on: fail open), and stores them in
    one batch under the same lease rule as a single load. Entries another caller is
    loading are waited for one by one, as a single call would. `at` gives each
    entry's position in the many() call (its loads name those); default: in order.
    """
    at = range(len(keys)) if at is None else at
    codec, options, stats = plan.codec, plan.options, plan.stats
    answers: list[Served | None] = [None] * len(keys)
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
    replies = yield Batch(
        [
            RunScript(
                ScriptName.ACQUIRE,
                entry_keys(keys[p])[:3],
                (
                    _token(holds[p]),
                    options.lock_ttl_ms,
                    codec.redis_type,
                    "1" if p in corrupt else "0",
                    options.keep_ms,
                ),
            )
            for p in lockable
        ]
    )
    owned: list[int] = []
    unsure: list[int] = []  # the lock script failed: the lock may have been granted
    held: dict[int, tuple[int, Hold] | None] = {}  # the lock's pttl and the entry's Hold
    failed: list[tuple[int, CommandFailed]] = []
    for position, reply in zip(lockable, replies, strict=True):
        if type(reply) is CommandFailed:
            failed.append((position, reply))
            if reply.sent:
                unsure.append(position)
        elif reply[0] == AcquireStatus.OWNED:
            owned.append(position)
        elif reply[0] == AcquireStatus.FOUND:
            found = codec.decode(reply[1])
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
    if owned or uncached:
        yield from _load_and_store_many(plan, keys, owned, sorted(uncached), holds, answers, at)
    yield Free(locked)
    for position, wait in held.items():
        answers[position] = yield from miss(
            plan, keys[position], False, block_limit_ms, LoadOne(at[position]), wait
        )
    served = [answer for answer in answers if answer is not None]
    assert len(served) == len(keys), "every entry of a batch is answered"
    return served


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
    raws = yield lookups(plan, keys)
    answers: list[tuple[Served, bool] | None] = [None] * len(keys)
    to_batch: list[int] = []
    one_by_one: list[int] = []
    for position, raw in enumerate(raws):
        hit = None if position in blocked else on_lookup(plan, raw)
        if hit is not None:
            answers[position] = (hit, False)
        elif batched and position not in blocked and not aged(plan, raw):
            to_batch.append(position)
        else:
            one_by_one.append(position)
    if to_batch:
        served = yield from load_batch(
            plan, [keys[p] for p in to_batch], [raws[p] for p in to_batch], block_limit_ms, to_batch
        )
        for position, answer in zip(to_batch, served, strict=True):
            answers[position] = (answer, False)
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


def _token(hold: Hold) -> str:
    return str(hold.releases[0].args[0])


def _load_and_store_many(
    plan: Plan,
    keys: Sequence[str],
    owned: list[int],
    uncached: list[int],
    holds: Mapping[int, Hold],
    answers: list[Served | None],
    at: Sequence[int],
) -> Flow[None]:
    """Load every owned and uncached entry in one batch loader call and store the
    owned ones in one pipeline. A failure before the stores leaves the locks' Hold
    to the driver; a store Redis did not take keeps its lock in a Hold of its own."""
    options, stats = plan.options, plan.stats
    to_load = tuple(sorted(owned + uncached))
    owning = set(owned)  # a failed lock attempt has a token too, but no lock
    unfenced: set[int] = set()  # owned, but not in their tags' sets: loaded, not stored
    if plan.tags and owned:
        unjoined = yield from join_tags(plan, [(keys[p], LoadOne(at[p])) for p in owned])
        unfenced = {p for p in owned if keys[p] in unjoined}
    for _ in to_load:
        stats.miss()
        stats.load()
    # Through the loader breaker, as a single load: skipped while it is open.
    values = yield from guarded_load(
        plan,
        f"{len(to_load)} keys",
        LoadSome(tuple(at[p] for p in to_load)),
        NO_STALE,
        counted=True,
    )
    stores: list[Command | RunScript] = []
    results: dict[int, Any] = {}
    for position, value in zip(to_load, values, strict=True):
        kind, ttl_ms, payload, results[position] = what_to_store(plan, value, keys[position])
        if position in unfenced:
            kind, ttl_ms, payload = RELEASE_ONLY, 0, []
        if position in owning:
            store_args = (_token(holds[position]), kind, ttl_ms, options.lock_ttl_ms, *payload)
            stores.append(RunScript(ScriptName.STORE, entry_keys(keys[position]), store_args))
    replies = yield Batch(stores)
    refused: list[int] = []
    for position, reply in zip(owned, replies, strict=True):
        kept = True  # a store that failed is no sign of an invalidation
        if type(reply) is CommandFailed:
            refused.append(position)
            tolerate(plan, keys[position], reply)
        else:
            kept = bool(reply)
        answers[position] = Served(results[position], Source.LOADER, lease_kept=kept)
    if refused:  # now: this flow may go on to wait for other entries
        yield from release_now(
            Hold(tuple(holds[p].releases[0] for p in refused), options.lock_ttl_ms)
        )
    for position in uncached:
        answers[position] = Served(results[position], Source.LOADER)


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
        [RunScript(ScriptName.INVALIDATE, entry_keys(key), (wake_ttl_ms,)) for key in keys]
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


def invalidate_tags(
    key_head: str,
    texts: Sequence[str],
    wake_ttl_ms: int,
    everything: PendingPattern,
    foreign: Callable[[str], None],
) -> Flow[tuple[BulkOutcome, list[str]]]:
    """Delete every entry carrying any of these tags, on every node, without a scan:
    read each tag's set, invalidate its entries (revoking loads in flight, as
    invalidate() does), then take them out of the set, each only if it did not join
    again since it was read. A load that joins a set after it was read began after
    the write that called this, so it read the new row; it stays in the set, for the
    next invalidation to find.

    What Redis did not take goes to the outbox: an entry as a PendingKey, a tag whose
    set could not be read as a PendingTag (blocking, here, the functions that can
    carry it). Foreign data where a set belongs is deleted by the script and told to
    `foreign`. Returns the outcome and the keys invalidated."""
    tag_keys = [tag_key(key_head, text) for text in texts]
    replies = yield Batch([RunScript(ScriptName.TAG_MEMBERS, (key,), ()) for key in tag_keys])
    members: dict[str, list[tuple[str, bytes]]] = {}  # entry -> (tag set, score read)
    unread: list[PendingTag] = []
    for text, key, reply in zip(texts, tag_keys, replies, strict=True):
        if type(reply) is CommandFailed:
            unread.append(PendingTag(key, text, wake_ttl_ms, foreign))
            continue
        for entry, score in _tag_members(reply, key, key_head, foreign):
            members.setdefault(entry, []).append((key, score))
    entries = list(members)
    replies = yield Batch(
        [RunScript(ScriptName.INVALIDATE, entry_keys(entry), (wake_ttl_ms,)) for entry in entries]
    )
    deleted = 0
    done: dict[str, list[Any]] = {}  # tag set -> its members now invalidated, with scores
    failed: list[PendingKey] = []
    for entry, reply in zip(entries, replies, strict=True):
        if type(reply) is CommandFailed:
            failed.append(PendingKey(entry, wake_ttl_ms, everything))
            continue
        deleted += int(reply)
        for key, score in members[entry]:
            done.setdefault(key, []).extend((entry, score))
    if done:  # tidy only: a member left behind is invalidated again, harmlessly
        yield Batch(
            [RunScript(ScriptName.TAG_PRUNE, (key,), tuple(gone)) for key, gone in done.items()]
        )
    if failed or unread:
        yield Postpone((*failed, *unread))
    return BulkOutcome(deleted, len(failed) + len(unread)), entries


def _tag_members(
    reply: Sequence[Any], key: str, key_head: str, foreign: Callable[[str], None]
) -> list[tuple[str, bytes]]:
    """The entries a TAG_MEMBERS reply names, with their scores; members that are
    not value keys of the engine (`key_head`) are never trusted."""
    if reply[0] == 1:
        foreign(key)
        return []
    found = []
    for member, score in zip(reply[1::2], reply[2::2], strict=True):
        entry = member.decode() if isinstance(member, bytes) else str(member)
        parts = split_entry_key(entry, key_head)
        if parts is not None and not parts[1]:
            found.append((entry, score))
    return found


def deliver(delivery: Delivery) -> Flow[Delivery]:
    """Send what the outbox holds, keys and releases in one pipeline, then each
    pattern; returns what landed."""
    landed = Delivery([], [], [], delivery.sequence)
    effects: list[Command | RunScript] = [
        RunScript(ScriptName.INVALIDATE, entry_keys(item.key), (item.wake_ttl_ms,))
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
    """One pending tag: read its set and invalidate every entry in it; True if all of
    it landed. The entries' keys are checked against the tag's own engine head."""
    try:
        reply = yield RunScript(ScriptName.TAG_MEMBERS, (tag.key,), ())
    except CommandFailed:
        return False
    head = tag.key[: tag.key.index("tag:{")] + "{"
    members = _tag_members(reply, tag.key, head, tag.foreign)
    replies = yield Batch(
        [
            RunScript(ScriptName.INVALIDATE, entry_keys(entry), (tag.wake_ttl_ms,))
            for entry, _ in members
        ]
    )
    if any(type(reply) is CommandFailed for reply in replies):
        return False
    if members:
        pairs = tuple(part for member in members for part in member)
        yield Batch([RunScript(ScriptName.TAG_PRUNE, (tag.key,), pairs)])
    return True
