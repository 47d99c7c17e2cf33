"""The write flows: invalidate, update_field, put and fn.refresh()'s reload, each
revoking the lease of any load in flight; what Redis does not take goes to the
outbox (Postpone). Generators that yield effects, as in _flows.py; no I/O here.
"""

from __future__ import annotations

from typing import Any

from ._codecs import META_FIELD, HashCodec
from ._effects import CommandFailed, Flow, PendingKey, PendingPattern, Postpone, Signal, TagsOf
from ._errors import ConfigurationError
from ._flows import bypass, miss, together
from ._keys import entry_keys, tag_key
from ._loading import tolerate, what_to_store
from ._plan import Plan, Served
from ._results import Outcome
from ._scripts import (
    DROP,
    invalidate_call,
    put_call,
    revoke_call,
    tag_stamp_call,
    update_field_call,
)
from ._stamps import new_version, stamped, take_stamps


def invalidate(plan: Plan, key: str, whole: PendingPattern) -> Flow[Outcome]:
    """Delete an entry and revoke any load in flight, so its older result is refused.

    If Redis does not take it, the invalidation goes to the outbox (`whole` covers the
    key should the outbox be full) and the answer is PENDING, never ABSENT.
    """
    try:
        existed = yield invalidate_call(entry_keys(key), wake_ttl_ms=plan.options.lock_ttl_ms)
    except CommandFailed as failure:
        return (yield from postpone(plan, key, whole, failure))
    return Outcome.DELETED if existed else Outcome.ABSENT


def postpone(plan: Plan, key: str, whole: PendingPattern, failure: CommandFailed) -> Flow[Outcome]:
    """Queue an invalidation Redis did not take; raises after queueing when the
    function does not fail open."""
    plan.stats.postponed()
    yield Postpone((PendingKey(key, plan.options.lock_ttl_ms, whole),))
    tolerate(plan, key, failure)
    return Outcome.PENDING


def update_field(
    plan: Plan, key: str, field: object, value: object, whole: PendingPattern
) -> Flow[Outcome]:
    """Set one field of a cached record and refresh its ttl, only if a record is
    cached; either way, revoke the lease of any load in flight.

    If Redis does not take it, the cached record may disagree with the primary: the
    entry's invalidation goes to the outbox instead, and the answer is PENDING.
    """
    if not isinstance(plan.codec, HashCodec):
        raise ConfigurationError(
            f"{plan.name}.update_field needs as_hash=True; with msgpack storage call "
            f"{plan.name}.invalidate(...) after the write instead"
        )
    where = f"{plan.name}.update_field (key {key!r})"
    text = plan.codec.encode_field(field, value, where)
    options = plan.options
    if options.cache_if is not None:
        # cache_if judges whole records, and this one is in Redis, not here: drop it
        # (the next call loads and judges the row) rather than keep what it may refuse.
        return (yield from invalidate(plan, key, whole))
    update = update_field_call(
        entry_keys(key),
        meta_field=META_FIELD,
        field=field,
        value=text,
        ttl_ms=options.ttl_ms + options.keep_ms,
        wake_ttl_ms=options.lock_ttl_ms,
        keep_ms=options.keep_ms,
    )
    try:
        if plan.tags:
            # The record keeps its stamp; its tags' versions are made to live as long
            # as its renewed ttl, in the same round trip (one lost is only a miss).
            texts = yield TagsOf(Signal.LOAD)
            alive_ms = options.ttl_ms + options.keep_ms + options.lock_ttl_ms
            renewals = [
                tag_stamp_call(tag_key(key, t), version=new_version(), life_ms=alive_ms)
                for t in texts
            ]
        else:
            renewals = []
        updated, _ = yield from together(update, renewals)
    except CommandFailed as failure:
        return (yield from postpone(plan, key, whole, failure))
    return Outcome.UPDATED if updated else Outcome.ABSENT


def reload(plan: Plan, key: str, block_limit_ms: int, whole: PendingPattern) -> Flow[Served]:
    """fn.refresh(): load now and store, whatever is cached. A load already under way
    in another caller may have read the primary before the write that prompted this
    refresh: its lease is revoked first (its result is refused, its waiters look
    again), then this caller takes the lock, loads and stores. If Redis does not take
    the revocation, the entry's invalidation goes to the outbox and the loader answers
    alone, as for a call while an invalidation is pending."""
    try:
        yield revoke_call(entry_keys(key), wake_ttl_ms=plan.options.lock_ttl_ms)
    except CommandFailed as failure:
        # The load in flight may still store what it read before the write: only an
        # invalidation fences it now.
        yield from postpone(plan, key, whole, failure)
        return (yield from bypass(plan, key))
    return (yield from miss(plan, key, False, block_limit_ms, replace=True))


def put(plan: Plan, key: str, value: Any, whole: PendingPattern) -> Flow[Outcome]:
    """fn.set(): store `value` after a write the caller made, revoking the lease of any
    load in flight (it read the row before the write). A value cache_if refuses, or
    None without negative caching, deletes the entry instead; so does a refusal to
    give it its tags' versions (its stamp), which come first. If Redis does not take it, the
    entry's invalidation goes to the outbox and the answer is PENDING."""
    kind, ttl_ms, payload, _ = what_to_store(plan, value, key)
    if kind == DROP:
        return (yield from invalidate(plan, key, whole))
    if plan.tags:
        texts = yield TagsOf(Signal.LOAD)
        stamp = (yield from take_stamps(plan, [(key, texts)]))[0]
        if isinstance(stamp, CommandFailed):  # unstamped, nothing could invalidate it
            outcome = yield from invalidate(plan, key, whole)
            tolerate(plan, key, stamp)
            return outcome
        payload = stamped(plan.codec.redis_type, payload, stamp)  # kind: not DROP
    try:
        yield put_call(
            entry_keys(key),
            kind=kind,
            ttl_ms=ttl_ms,
            wake_ttl_ms=plan.options.lock_ttl_ms,
            payload=payload,
        )
    except CommandFailed as failure:
        return (yield from postpone(plan, key, whole, failure))
    return Outcome.UPDATED
