"""The cache-aside algorithm, written once as generators that yield effects.

A driver performs each effect and sends the result back, or throws the failure in,
so sync and async callers run the very same steps and lock release lives in one
place. No redis, asyncio or time imports here.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from typing import Any

from .codecs import META_FIELD, Codec, Found, HashCodec, check_field, field_text
from .effects import Command, CommandFailed, Effect, Flow, RunScript, Signal, Spawn
from .errors import CacheUnavailableError, ConfigurationError, UnstorableValueError
from .keys import EntryKeys, entry_keys
from .options import Options
from .scripts import AcquireStatus, ScriptName
from .stats import Stats

RELEASE_ONLY = "release"
# A waiter never blocks for less than this, so a lock about to expire is not polled hot.
MIN_WAIT_MS = 5


class Source(str, enum.Enum):
    """Where a caller's value came from."""

    NEAR = "near"  # the in-process near cache
    CACHE = "cache"  # a cached value
    NEGATIVE = "negative"  # a cached "no such record"
    LOADER = "loader"  # this call ran the loader
    WAITED = "waited"  # another caller's load, waited for


@dataclass(frozen=True, slots=True)
class Plan:
    """What the flows need to know about one decorated function."""

    name: str
    codec: Codec
    options: Options
    stats: Stats
    # Look up with the PEEK script (value and ttl): refresh_ahead or a near cache is on.
    peek: bool = False


@dataclass(slots=True)
class Served:
    """A flow's answer.

    lease_kept is False when an invalidation revoked the load's lease. shareable is
    True when the value is fresh for anyone who joined this call before it was sealed:
    a load whose lease held until the store, or a read sent after the seal.
    """

    value: Any
    source: Source
    lease_kept: bool = True
    shareable: bool = False
    ttl_ms: int = -1  # the entry's remaining ttl, when the lookup told (PEEK)


def on_lookup(plan: Plan, raw: Any) -> Served | None:
    """Judge the reply to the lookup: the answer on a hit, None on a miss.

    This is the whole hit path: drivers send the lookup themselves and start the
    `after_miss` flow only when this returns None (also for a hit whose entry is due
    for a refresh_ahead reload).
    """
    if type(raw) is CommandFailed:
        return None
    if plan.peek:
        found, due = _unpack_peek(plan, raw)
        if due:
            return None
        if type(found) is not Found:
            plan.stats.hit()
            return Served(found, Source.CACHE, ttl_ms=raw[1])
        if found is Found.NEGATIVE:
            plan.stats.negative_hit()
            return Served(None, Source.NEGATIVE, ttl_ms=raw[1])
        return None
    found = plan.codec.decode(raw)
    if type(found) is not Found:
        plan.stats.hit()
        return Served(found, Source.CACHE)
    if found is Found.NEGATIVE:
        plan.stats.negative_hit()
        return Served(None, Source.NEGATIVE)
    return None


def refresh_due(plan: Plan, raw: Any) -> bool:
    """True when a lookup reply is a hit that on_lookup declined only because its
    entry is due for a refresh_ahead reload."""
    return plan.peek and type(raw) is not CommandFailed and _unpack_peek(plan, raw)[1]


def _unpack_peek(plan: Plan, raw: Any) -> tuple[Any, bool]:
    """The PEEK script's reply as (decoded value or Found, whether a refresh is due)."""
    if not raw:
        return Found.MISS, False
    if len(raw) == 1:
        return Found.CORRUPT, False  # the key holds another Redis type
    found = plan.codec.decode(raw[0])
    window = plan.options.refresh_ahead_ms
    due = window > 0 and type(found) is not Found and 0 <= raw[1] <= window
    return found, due


def after_miss(plan: Plan, key: str, raw: Any, block_limit_ms: int) -> Flow[Served]:
    """Everything but a plain hit, given the lookup's reply (None: not looked up)."""
    if type(raw) is CommandFailed:
        if not raw.wrong_type:
            return (yield from _load_uncached(plan, key, raw))
        return (yield from miss(plan, key, True, block_limit_ms))
    if plan.peek:
        found, due = _unpack_peek(plan, raw)
        if due:
            # Serve the cached value now; one background reload per process, and one
            # across processes through the lock, replaces it before it expires.
            yield Spawn(key, _refresh(plan, key, block_limit_ms))
            plan.stats.hit()
            return Served(found, Source.CACHE)
    else:
        found = plan.codec.decode(raw)
    return (yield from miss(plan, key, found is Found.CORRUPT, block_limit_ms))


def _refresh(plan: Plan, key: str, block_limit_ms: int) -> Flow[None]:
    keys = entry_keys(key)
    token = os.urandom(16).hex()
    try:
        # Ignore the cached value: it is the one being replaced.
        reply = yield RunScript(
            ScriptName.ACQUIRE,
            keys[:3],
            (token, plan.options.lock_ttl_ms, plan.codec.redis_type, "1"),
        )
        if reply[0] == AcquireStatus.OWNED:
            yield from _load_and_store(plan, keys, token)
            return
        # Another caller is reloading: wait for its store here, in the background, so
        # this process does not ask again on every hit until then.
        yield _wait_for_wake_up(keys, int(reply[1]), block_limit_ms)
    except CommandFailed as failure:
        plan.stats.error(key, failure)


def _wait_for_wake_up(keys: EntryKeys, lock_pttl_ms: int, block_limit_ms: int) -> Command:
    """Block until the owner's store pushes a token, or until its lock would have
    expired (it may have died); never longer than the socket timeout allows."""
    wait_ms = min(max(lock_pttl_ms, MIN_WAIT_MS), block_limit_ms)
    return Command(("BLPOP", keys.wake, f"{wait_ms / 1000:.3f}"))


def miss(
    plan: Plan,
    key: str,
    corrupt: bool,
    block_limit_ms: int,
    load: Effect = Signal.LOAD,
    held_ms: int | None = None,
) -> Flow[Served]:
    """Look and lock in one step, then load (owner), take the value (found) or wait.

    `load` is the effect that runs the loader: Signal.LOAD for a single call, LoadOne
    for one entry of a batch. `held_ms`: a batch's lock script already found the lock
    held for that long (and counted this caller as a waiter), so wait first.
    """
    codec, options, stats = plan.codec, plan.options, plan.stats
    keys = entry_keys(key)
    token = os.urandom(16).hex()
    waited = False
    if corrupt:
        stats.corrupt(key)
    if held_ms is not None:
        stats.lock_wait()
        waited = True
        try:
            yield _wait_for_wake_up(keys, held_ms, block_limit_ms)
        except CommandFailed as failure:
            return (yield from _load_uncached(plan, key, failure, load))
        yield Signal.SEAL
    while True:
        try:
            # Look up and lock in one step: a caller that missed just before another
            # stored the value finds it here instead of loading a second time.
            reply = yield RunScript(
                ScriptName.ACQUIRE,
                keys[:3],
                (token, options.lock_ttl_ms, codec.redis_type, "1" if corrupt else "0"),
            )
        except CommandFailed as failure:
            return (yield from _load_uncached(plan, key, failure, load))
        status = reply[0]
        if status == AcquireStatus.OWNED:
            stats.miss()
            return (yield from _load_and_store(plan, keys, token, load))
        if status == AcquireStatus.FOUND:
            found = codec.decode(reply[1])
            if found is Found.CORRUPT or found is Found.MISS:
                if not corrupt:
                    stats.corrupt(key)
                corrupt = True
                continue
            value = None if found is Found.NEGATIVE else found
            if waited:
                stats.miss(suppressed=True)
                return Served(value, Source.WAITED, shareable=True)
            if value is None:
                stats.negative_hit()
                return Served(None, Source.NEGATIVE)
            stats.hit()
            return Served(value, Source.CACHE)
        if not waited:
            stats.lock_wait()
        waited = True
        corrupt = False  # the owner's store replaces whatever was there
        try:
            yield _wait_for_wake_up(keys, int(reply[1]), block_limit_ms)
        except CommandFailed as failure:
            return (yield from _load_uncached(plan, key, failure, load))
        # The next look is what this call's joiners will be handed. Everyone who joined
        # so far began before it is sent; later callers start a read of their own.
        yield Signal.SEAL


def _load_and_store(
    plan: Plan, keys: EntryKeys, token: str, load: Effect = Signal.LOAD
) -> Flow[Served]:
    codec, options = plan.codec, plan.options
    plan.stats.load()
    try:
        value = yield load
    except GeneratorExit:
        raise
    except BaseException:
        yield from _release(plan, keys, token)
        raise
    kind: str
    if value is None:
        result = None
        if options.negative_ttl_ms:
            kind, ttl_ms, payload = (
                codec.redis_type,
                options.negative_ttl_ms,
                codec.negative_payload(),
            )
        else:
            kind, ttl_ms, payload = RELEASE_ONLY, 0, []
    else:
        try:
            payload, result = codec.encode(value, f"{plan.name} (key {keys.value!r})")
        except UnstorableValueError:
            yield from _release(plan, keys, token)
            raise
        kind, ttl_ms = codec.redis_type, options.ttl_ms
    # From here on, callers in this process start their own read instead of joining
    # this one, so none of them is handed a value stored before its call began.
    yield Signal.SEAL
    try:
        stored = yield RunScript(
            ScriptName.STORE, keys, (token, kind, ttl_ms, options.lock_ttl_ms, *payload)
        )
    except CommandFailed as failure:
        tolerate(plan, keys.value, failure)
        return Served(result, Source.LOADER, shareable=True)
    return Served(result, Source.LOADER, lease_kept=bool(stored), shareable=bool(stored))


def _release(plan: Plan, keys: EntryKeys, token: str) -> Flow[None]:
    try:
        yield RunScript(ScriptName.STORE, keys, (token, RELEASE_ONLY, 0, plan.options.lock_ttl_ms))
    except CommandFailed as failure:
        plan.stats.error(keys.value, failure)  # the lock's ttl frees it anyway


def _load_uncached(
    plan: Plan, key: str, failure: CommandFailed, load: Effect = Signal.LOAD
) -> Flow[Served]:
    """Fail open: Redis is unusable, so the loader answers and nothing is cached."""
    tolerate(plan, key, failure)
    plan.stats.miss()
    plan.stats.load()
    value = yield load
    # Shared with this process's joiners: during an outage that makes N callers one load.
    if value is None:
        return Served(None, Source.LOADER, shareable=True)
    _, result = plan.codec.encode(value, f"{plan.name} (key {key!r})")
    return Served(result, Source.LOADER, shareable=True)


def tolerate(plan: Plan, key: str, failure: CommandFailed) -> None:
    plan.stats.error(key, failure)
    if not plan.options.fail_open:
        raise CacheUnavailableError(
            f"{plan.name}: Redis failed for {key!r} ({failure}) and fail_open=False"
        ) from failure.cause


def invalidate(plan: Plan, key: str) -> Flow[bool]:
    """Delete an entry and revoke any load in flight, so its older result is refused."""
    try:
        existed = yield RunScript(
            ScriptName.INVALIDATE, entry_keys(key), (plan.options.lock_ttl_ms,)
        )
    except CommandFailed as failure:
        tolerate(plan, key, failure)
        return False
    return bool(existed)


def update_field(plan: Plan, key: str, field: object, value: object) -> Flow[bool]:
    """Set one field of a cached record and refresh its ttl, only if a record is cached."""
    if not isinstance(plan.codec, HashCodec):
        raise ConfigurationError(
            f"{plan.name}.update_field needs as_hash=True; with msgpack storage call "
            f"{plan.name}.invalidate(...) after the write instead"
        )
    where = f"{plan.name}.update_field (key {key!r})"
    text = field_text(check_field(field, where), value, where)
    try:
        updated = yield RunScript(
            ScriptName.UPDATE_FIELD, (key,), (META_FIELD, field, text, plan.options.ttl_ms)
        )
    except CommandFailed as failure:
        tolerate(plan, key, failure)
        return False
    return bool(updated)
