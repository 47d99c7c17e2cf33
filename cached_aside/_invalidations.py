"""Flows that drop many entries at once: invalidate_many, a pattern's keys, tags'
versions, and the outbox's delivery of what Redis did not take before.

One Batch (a pipeline) or SCAN page per step instead of one command per entry.
No redis, asyncio or time imports here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ._effects import (
    Batch,
    Command,
    CommandFailed,
    Flow,
    PendingKey,
    PendingPattern,
    PendingTag,
    Postpone,
    RunScript,
    Scan,
)
from ._keys import entry_keys, tag_key
from ._loading import tolerate
from ._outbox import Delivery
from ._plan import Plan
from ._results import BulkOutcome
from ._scripts import invalidate_call

# Keys deleted per pipeline by invalidate_matching; SCAN is asked for as many.
SCAN_BATCH = 1000


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
