"""The cache-aside algorithm, written once as generators that yield effects.

A driver performs each effect and sends the result back, or throws the failure in,
so sync and async callers run the very same steps and lock release lives in one
place. No redis, asyncio or time imports here.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from ._breaker import CircuitBreaker
from ._codecs import META_FIELD, Codec, Found, HashCodec
from ._effects import (
    Batch,
    Command,
    CommandFailed,
    Flow,
    Free,
    Hold,
    Leased,
    LoadOne,
    LoadSome,
    Postpone,
    RunScript,
    Signal,
    Spawn,
    TagsOf,
)
from ._errors import CacheUnavailableError, ConfigurationError, LoaderCircuitOpenError
from ._keys import EntryKeys, KeyTemplate, entry_keys, tag_key
from ._options import Options
from ._outbox import PendingKey, PendingPattern
from ._results import Outcome, Source
from ._scripts import (
    DROP,
    RELEASE_ONLY,
    AcquireStatus,
    acquire_call,
    invalidate_call,
    leave_call,
    put_call,
    renew_call,
    revoke_call,
    store_call,
    tag_stamp_call,
    update_field_call,
)
from ._stamps import (
    Verdict,
    new_version,
    stamp_of,
    stamped,
    take_stamps,
    unstamped,
    version_reads,
    version_renewals,
)
from ._stats import Stats

# A waiter never blocks for less than this, so a lock about to expire is not polled hot.
MIN_WAIT_MS = 5
# Seconds a joiner of this process waits for its leader beyond the lease and the
# loader_timeout: the leader renews its lease while it lives, so a long load is no
# sign of a dead leader; past this bound the joiner waits through Redis instead.
PATIENCE_FLOOR_S = 10.0


@dataclass(frozen=True, slots=True)
class Plan:
    """What the flows need to know about one decorated function."""

    name: str
    codec: Codec
    options: Options
    stats: Stats
    # Look up with the PEEK script (value and ttl): refresh_ahead, grace,
    # stale_if_error or a near cache is on.
    peek: bool = False
    # With stale_if_error: skips a loader that keeps failing, serving stale values.
    loader_breaker: CircuitBreaker | None = None
    # tags=: templates over the loader's arguments; each entry carries their versions.
    tags: tuple[KeyTemplate, ...] = ()

    @property
    def patience(self) -> float:
        """How long a caller waits for another caller of its process before it reads
        by itself (and waits through Redis, as another process does). A leader renews
        its lease while it lives, so this is not the lease: it waits as long as Redis
        waiters would (the loader_timeout, if any), and at least PATIENCE_FLOOR_S, which
        only keeps a stuck leader from holding its joiners for ever."""
        options = self.options
        return max(options.lock_ttl_ms, options.loader_timeout_ms) / 1000.0 + PATIENCE_FLOOR_S


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
        found, age, left = _peeked(plan, raw)
        if age is not Age.FRESH:
            return None
        if type(found) is not Found:
            plan.stats.hit()
            return Served(found, Source.CACHE, ttl_ms=left)
        if found is Found.NEGATIVE:
            plan.stats.negative_hit()
            return Served(None, Source.NEGATIVE, ttl_ms=left)
        return None
    found = plan.codec.decode(raw)
    if type(found) is not Found:
        plan.stats.hit()
        return Served(found, Source.CACHE)
    if found is Found.NEGATIVE:
        plan.stats.negative_hit()
        return Served(None, Source.NEGATIVE)
    return None


def found_in(plan: Plan, raw: Any) -> Any:
    """What a lookup reply holds: a decoded value, or a Found member (a PEEK reply is
    unpacked first)."""
    return _peeked(plan, raw)[0] if plan.peek else plan.codec.decode(raw)


def aged(plan: Plan, raw: Any) -> bool:
    """True when a lookup reply holds an entry that on_lookup declined for its age
    alone (due for a refresh_ahead reload, in its grace, or kept for stale_if_error):
    the single path knows how to serve it."""
    return plan.peek and type(raw) is not CommandFailed and _peeked(plan, raw)[1] is not Age.FRESH


def served_aged(plan: Plan, raw: Any) -> bool:
    """True when after_miss answers this lookup reply from the cache at once (due for
    a refresh_ahead reload, or in its grace) and reloads behind: no load to wait for."""
    if not plan.peek or type(raw) is CommandFailed:
        return False
    age = _peeked(plan, raw)[1]
    return age is Age.DUE or age is Age.STALE


class Age(enum.Enum):
    """How old a cached entry is, told by the PEEK script's pttl."""

    FRESH = "fresh"
    DUE = "due"  # fresh, inside the refresh_ahead window: serve, and reload behind
    STALE = "stale"  # past ttl, inside grace: serve as stale, and reload behind
    EXPIRED = "expired"  # past ttl and grace, kept for stale_if_error: a miss


class _NoStale(enum.Enum):
    NO_STALE = "no stale value"


NO_STALE: Final = _NoStale.NO_STALE  # a miss with no stale value to fall back on


def _peeked(plan: Plan, raw: Any) -> tuple[Any, Age, int]:
    """The PEEK script's reply as (decoded value or Found, its age, the ms it stays
    fresh: -1 when it never expires, 0 when it is past its ttl).

    An entry is stored for ttl + keep_ms (grace, stale_if_error): while no more than
    keep_ms are left it is past its ttl, and how far past tells stale from expired.
    """
    if not raw:
        return Found.MISS, Age.FRESH, -1
    if len(raw) == 1:
        return Found.CORRUPT, Age.FRESH, -1  # the key holds another Redis type
    found = plan.codec.decode(raw[0])
    left = raw[1]
    if left < 0 or (type(found) is Found and found is not Found.NEGATIVE):
        return found, Age.FRESH, left
    options = plan.options
    keep = options.keep_ms
    if keep and left <= keep:
        return found, Age.STALE if keep - left < options.grace_ms else Age.EXPIRED, 0
    left -= keep
    window = options.refresh_ahead_ms
    if window and left <= window and type(found) is not Found:
        return found, Age.DUE, left
    return found, Age.FRESH, left


def after_miss(plan: Plan, key: str, raw: Any, block_limit_ms: int) -> Flow[Served]:
    """Everything but a plain hit, given the lookup's reply (None: not looked up)."""
    if type(raw) is CommandFailed:
        if not raw.wrong_type:
            return (yield from _load_uncached(plan, key, raw))
        return (yield from miss(plan, key, True, block_limit_ms))
    stale: Any = NO_STALE
    if plan.peek:
        found, age, _ = _peeked(plan, raw)
        value = None if found is Found.NEGATIVE else found
        if age is Age.DUE or age is Age.STALE:
            # Serve the cached value now; one background reload per process, and one
            # across processes through the lock, replaces it.
            yield Spawn(key, _refresh(plan, key, block_limit_ms))
            if age is Age.DUE:
                plan.stats.hit()
                return Served(value, Source.CACHE)
            plan.stats.stale()
            return Served(value, Source.STALE)
        if age is Age.EXPIRED:
            stale = value  # past grace: load, and answer with it only if the load fails
    else:
        found = plan.codec.decode(raw)
    damaged = found if found is Found.CORRUPT or found is Found.MISMATCH else False
    return (yield from miss(plan, key, damaged, block_limit_ms, stale=stale))


def _refresh(plan: Plan, key: str, block_limit_ms: int) -> Flow[bool]:
    """Reload an entry in the background; False when its loader failed (callers keep
    getting the cached value, and the driver waits before trying again)."""
    keys = entry_keys(key)
    token = os.urandom(16).hex()
    hold = lock_hold(plan, keys, token)
    yield hold
    try:
        # Ignore the cached value: it is the one being replaced.
        reply = yield acquire_call(
            keys,
            token=token,
            lock_ttl_ms=plan.options.lock_ttl_ms,
            redis_type=plan.codec.redis_type,
            ignore_cached=True,
        )
        if reply[0] == AcquireStatus.OWNED:
            try:
                yield from _load_and_store(plan, keys, hold)
            except (CommandFailed, CacheUnavailableError):
                raise  # Redis, not the loader: counted where it failed
            except LoaderCircuitOpenError:
                return False  # the loader keeps failing: try again later
            except Exception as exc:  # the loader or the codec
                plan.stats.loader_error(key, exc)
                return False
            return True
        # Another caller is reloading: wait for its store here, in the background, so
        # this process does not ask again on every hit until then.
        yield _wait_for_wake_up(keys, token, int(reply[1]), block_limit_ms)
    except CommandFailed as failure:
        plan.stats.error(key, failure)
    except CacheUnavailableError:
        pass  # the store failed with fail_open=False: counted, and nobody to tell
    return True


def lock_hold(plan: Plan, keys: EntryKeys, token: str) -> Hold:
    """The Hold of a caller about to ask for the lock with `token`: released, it
    gives back the lock if it has it, and its place among the waiters and its
    wake-up token if the lock script registered it as a waiter."""
    options = plan.options
    release = store_call(
        keys, token=token, kind=RELEASE_ONLY, ttl_ms=0, wake_ttl_ms=options.lock_ttl_ms
    )
    leave = leave_call(keys, token=token)
    return Hold((release, leave), options.lock_ttl_ms)


def release_now(hold: Hold) -> Flow[None]:
    """Give back what `hold` stands for now, not when the flow ends: others may be
    waiting for it while this flow still waits on something else. What Redis does
    not take stays held, for the driver (and the outbox) to give back."""
    yield hold
    replies = yield Batch(list(hold.releases))
    refused = tuple(
        r for r, reply in zip(hold.releases, replies, strict=True) if type(reply) is CommandFailed
    )
    yield Free(hold)
    if refused:
        yield Hold(refused, hold.ttl_ms)


def _wait_for_wake_up(
    keys: EntryKeys, token: str, lock_pttl_ms: int, block_limit_ms: int
) -> Command:
    """Block until the owner's store pushes a token on this waiter's list, or until
    its lock would have expired (it may have died); never longer than the socket
    timeout allows."""
    wait_ms = min(max(lock_pttl_ms, MIN_WAIT_MS), block_limit_ms)
    return Command(("BLPOP", keys.wake_list(token), f"{wait_ms / 1000:.3f}"), blocks=True)


def miss(
    plan: Plan,
    key: str,
    corrupt: bool | Found,
    block_limit_ms: int,
    load: Signal | LoadOne = Signal.LOAD,
    held: tuple[int, Hold] | None = None,
    stale: Any = NO_STALE,
    replace: bool = False,
) -> Flow[Served]:
    """Look and lock in one step, then load (owner), take the value (found) or wait.

    `load` is the effect that runs the loader: Signal.LOAD for a single call, LoadOne
    for one entry of a batch. `held`: a batch's lock script already found the lock
    held (for that many ms) and registered this caller as a waiter under the token of
    the Hold given, which stands: wait first. `stale`: the value kept past its ttl,
    the answer if the load fails (stale_if_error). `replace`: ignore what is cached
    (fn.refresh()), unless another caller's load is waited for first. `corrupt`: the
    lookup found an unusable entry (True, or the Found member saying why: CORRUPT, or
    MISMATCH for a typed entry of another shape), counted here and replaced.
    """
    codec, options, stats = plan.codec, plan.options, plan.stats
    keys = entry_keys(key)
    waited = False
    outdated = False  # found an entry whose tags were invalidated since its load
    texts: tuple[str, ...] = (yield TagsOf(load)) if plan.tags else ()
    if corrupt:
        stats.corrupt(key, mismatch=corrupt is Found.MISMATCH)
    if held is None:
        token = os.urandom(16).hex()
        # Armed before the lock script is sent: its reply may be lost (a timeout, a
        # cancellation) after Redis granted the lock or registered a waiter.
        hold = lock_hold(plan, keys, token)
        yield hold
    else:
        held_ms, hold = held
        token = hold.releases[0].args[0]
        stats.lock_wait()
        waited = True
        try:
            yield _wait_for_wake_up(keys, token, held_ms, block_limit_ms)
        except CommandFailed as failure:
            return (yield from _load_uncached(plan, key, failure, load))
        yield Signal.SEAL
    while True:
        try:
            # Look up and lock in one step: a caller that missed just before another
            # stored the value finds it here instead of loading a second time.
            acquire = acquire_call(
                keys,
                token=token,
                lock_ttl_ms=options.lock_ttl_ms,
                redis_type=codec.redis_type,
                ignore_cached=bool(corrupt or replace or outdated),
                keep_ms=options.keep_ms,
            )
            if texts:  # the tags' versions, read after the entry, in the same round trip
                replies = yield Batch([acquire, *version_reads(keys.value, texts)])
                reply = replies[0]
                if type(reply) is CommandFailed:
                    raise reply
            else:
                reply = yield acquire
        except CommandFailed as failure:
            if not failure.sent and not waited:
                yield Free(hold)  # refused before it left: nothing of ours in Redis
            return (yield from _load_uncached(plan, key, failure, load))
        status = reply[0]
        if status == AcquireStatus.OWNED:
            stats.miss()
            if replace:
                # fn.refresh() promises a load begun after its call: later refreshes of
                # this process wait for this one to end instead of joining it.
                yield Signal.SEAL
            return (yield from _load_and_store(plan, keys, hold, load, stale, probe=replace))
        if status == AcquireStatus.FOUND:
            entry = reply[1]
            if texts:
                stamp = stamp_of(replies[1:])
                if isinstance(stamp, CommandFailed) and stamp.wrong_type:
                    outdated = True  # foreign data at a tag's key: the load repairs it
                    continue
                if isinstance(stamp, CommandFailed):  # cannot tell whether it is current
                    yield Free(hold)
                    return (yield from _load_uncached(plan, key, stamp, load))
                entry, verdict = unstamped(entry, stamp)
                if verdict is Verdict.OUTDATED:
                    outdated = True
                    continue
            found = codec.decode(entry)
            if type(found) is Found and found is not Found.NEGATIVE:  # no value to serve
                if not corrupt:
                    stats.corrupt(key, mismatch=found is Found.MISMATCH)
                corrupt = True
                continue
            yield Free(hold)  # the lock script took this caller off the waiters
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
        corrupt = replace = outdated = False  # the owner's store replaces what was there
        try:
            yield _wait_for_wake_up(keys, token, int(reply[1]), block_limit_ms)
        except CommandFailed as failure:
            return (yield from _load_uncached(plan, key, failure, load))
        # The next look is what this call's joiners will be handed. Everyone who joined
        # so far began before it is sent; later callers start a read of their own.
        yield Signal.SEAL


def _load_and_store(
    plan: Plan,
    keys: EntryKeys,
    hold: Hold,
    load: Signal | LoadOne = Signal.LOAD,
    stale: Any = NO_STALE,
    *,
    probe: bool = False,
) -> Flow[Served]:
    """Load and store under the lock `hold` stands for. Whatever goes wrong before
    the store script answers (the loader, the codec, Redis) leaves the Hold to the
    driver, which releases the lock; a failed load answers with `stale` if there is
    one (stale_if_error). `probe`: a deliberate reload (fn.refresh()) calls the
    loader even while its breaker is open, as the breaker's probe would."""
    options = plan.options
    token = hold.releases[0].args[0]
    texts: tuple[str, ...] = ()
    stamp: bytes | CommandFailed = b""
    if plan.tags:  # the tags' versions, taken before the loader reads the primary
        texts = yield TagsOf(load)
        stamp = (yield from take_stamps(plan, [(keys.value, texts)]))[0]
        if type(stamp) is CommandFailed:
            tolerate(plan, keys.value, stamp)
    kept = leased(plan, [(keys, token)], load, [(keys.value, texts)])
    value = yield from guarded_load(plan, keys.value, kept, stale, probe)
    if value is _STALE_SERVED:
        # This load's outcome: its joiners get the same stale answer, not a load each.
        return Served(stale, Source.STALE, shareable=True)
    kind, ttl_ms, payload, result = what_to_store(plan, value, keys.value)
    if isinstance(stamp, CommandFailed):  # no version to stamp it with: store nothing
        kind, ttl_ms, payload = RELEASE_ONLY, 0, []
    elif texts and kind == plan.codec.redis_type:
        payload = stamped(kind, payload, stamp)
    # From here on, callers in this process start their own read instead of joining
    # this one, so none of them is handed a value stored before its call began.
    yield Signal.SEAL
    try:
        store = store_call(
            keys,
            token=token,
            kind=kind,
            ttl_ms=ttl_ms,
            wake_ttl_ms=options.lock_ttl_ms,
            payload=payload,
        )
        stored = yield from _store(keys, store, texts, stamp)
    except CommandFailed as failure:
        # The lock may still stand (an OOM or READONLY refusal, a lost reply): the
        # Hold stays, and the driver releases it when this flow returns.
        tolerate(plan, keys.value, failure)
        return Served(result, Source.LOADER, shareable=True)
    yield Free(hold)  # stored, or refused because the lease was revoked: nothing left
    return Served(result, Source.LOADER, lease_kept=bool(stored), shareable=bool(stored))


class _Stale(enum.Enum):
    SERVED = "the load failed and the stale value answers"


_STALE_SERVED: Final = _Stale.SERVED


def leased(
    plan: Plan,
    locks: Sequence[tuple[EntryKeys, str]],
    load: Signal | LoadOne | LoadSome,
    tagged: Sequence[tuple[str, tuple[str, ...]]] = (),
) -> Leased:
    """`load`, run under the locks given (each entry's keys and its token) with their
    leases kept while it runs: each lock is renewed every third of lock_ttl, fenced
    by its token, so a slow loader still loads once and a dead holder's lock lapses
    within one lock_ttl. The versions its `tagged` entries (key, tags' texts) were
    stamped with are kept alive too (never made again): its store reads them back,
    and one expired under a slow load would make the store a miss."""
    options = plan.options
    renewals: tuple[tuple[RunScript, ...], ...] = tuple(
        (renew_call(keys, token=token, lease_ms=options.lock_ttl_ms),) for keys, token in locks
    )
    renewals += version_renewals(plan, tagged)
    return Leased(load, renewals, max(1, options.lock_ttl_ms // 3))


def guarded_load(
    plan: Plan,
    key: str,
    load: Signal | LoadOne | LoadSome | Leased,
    stale: Any,
    probe: bool = False,
    counted: bool = False,
) -> Flow[Any]:
    """Run the loader, through the function's loader breaker if it has one. With a
    stale value to fall back on, a failed (or skipped) load yields _STALE_SERVED;
    without one, the failure propagates (LoaderCircuitOpenError while skipped)."""
    stats, breaker = plan.stats, plan.loader_breaker
    probing = breaker is not None and breaker.open_until != 0  # half-open: a probe
    if breaker is not None and not probe and not breaker.allow():
        if stale is NO_STALE:
            raise LoaderCircuitOpenError(
                f"{plan.name}: the loader is skipped for {breaker.time_left():.1f} s more "
                f"after {breaker.failures} failures in a row, and no stale value of "
                f"{key!r} is left to serve"
            )
        stats.stale()
        return _STALE_SERVED
    if not counted:  # a batch counts one load per entry itself
        stats.load()
    try:
        value = yield load
    except Exception as exc:  # the loader failed (or timed out); never CancelledError
        if breaker is not None:
            breaker.failure()
        if stale is NO_STALE:
            raise
        stats.loader_error(key, exc, served="the stale value is served (stale_if_error)")
        stats.stale()
        return _STALE_SERVED
    except BaseException:  # cancelled: no verdict, but the next caller may probe
        if probing and breaker is not None:
            breaker.abandon()
        raise
    if breaker is not None and (breaker.failures or breaker.open_until):
        breaker.success()
    return value


def _store(keys: EntryKeys, store: RunScript, texts: tuple[str, ...], stamp: Any) -> Flow[Any]:
    """The STORE script (raising its failure). For a tagged entry, the tags' versions
    are read after it in the same round trip: if one changed since the load took
    them, a tag invalidation came meanwhile, and the answer is 0 (as for a revoked
    lease: the value is not handed to callers who joined the load)."""
    if not texts or store.args[1] == RELEASE_ONLY or store.args[1] == DROP:
        return (yield store)
    replies = yield Batch([store, *version_reads(keys.value, texts)])
    if type(replies[0]) is CommandFailed:
        raise replies[0]
    return replies[0] if stamp_of(replies[1:]) == stamp else 0


def what_to_store(plan: Plan, value: Any, key: str) -> tuple[str, int, list[Any], Any]:
    """What a load's result becomes in Redis: (the store script's kind, ttl in ms,
    payload, the value callers get). The one place that applies negative caching,
    cache_if, ttl_jitter and the time kept past the ttl, for single and batch loads."""
    codec, options = plan.codec, plan.options
    if value is None:
        if options.negative_ttl_ms:
            negative_ttl_ms = options.negative_ttl_ms + options.keep_ms
            return codec.redis_type, negative_ttl_ms, codec.negative_payload(), None
        return DROP, 0, [], None
    payload, result = codec.encode(value, f"{plan.name} (key {key!r})")
    # A typed function's predicate judges the declared type, what callers get (a
    # mapping its loader returned is a record by now); an untyped one the raw result.
    judged = result if getattr(codec, "schema", None) is not None else value
    if options.cache_if is not None and not options.cache_if(judged):
        return DROP, 0, [], result
    return codec.redis_type, options.value_ttl_ms(), payload, result


def _load_uncached(
    plan: Plan, key: str, failure: CommandFailed | None, load: Signal | LoadOne = Signal.LOAD
) -> Flow[Served]:
    """Fail open (Redis is unusable) or bypass the cache (an invalidation of `key`
    is still on its way): the loader answers and nothing is cached."""
    if failure is not None:
        tolerate(plan, key, failure)
    plan.stats.miss()
    plan.stats.load()
    value = yield load
    # Shared with this process's joiners: during an outage that makes N callers one load.
    if value is None:
        return Served(None, Source.LOADER, shareable=True)
    _, result = plan.codec.encode(value, f"{plan.name} (key {key!r})")
    return Served(result, Source.LOADER, shareable=True)


def bypass(plan: Plan, key: str, load: Signal | LoadOne = Signal.LOAD) -> Flow[Served]:
    """Serve `key` from the loader alone while its invalidation waits in the outbox:
    Redis may still hold the value it meant to delete."""
    return _load_uncached(plan, key, None, load)


def tolerate(plan: Plan, key: str, failure: CommandFailed) -> None:
    plan.stats.error(key, failure)
    if not plan.options.fail_open:
        raise CacheUnavailableError(
            f"{plan.name}: Redis failed for {key!r} ({failure}) and fail_open=False"
        ) from failure.cause


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
            replies = yield Batch([update, *renewals])
            updated = replies[0]
            if type(updated) is CommandFailed:
                raise updated
        else:
            updated = yield update
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
        if type(stamp) is CommandFailed:  # unstamped, nothing could invalidate it
            outcome = yield from invalidate(plan, key, whole)
            tolerate(plan, key, stamp)
            return outcome
        payload = stamped(kind, payload, stamp)  # type: ignore[arg-type]
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
