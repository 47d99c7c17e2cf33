"""The cache-aside algorithm of a read past its hit (lock, load, store, wait, serve an
aged entry), written once as generators that yield effects.

A driver performs each effect and sends the result back, or throws the failure in,
so sync and async callers run the very same steps and lock release lives in one
place. No redis, asyncio or time imports here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ._codecs import Found
from ._effects import (
    Batch,
    Command,
    CommandFailed,
    Flow,
    Free,
    Hold,
    LoadOne,
    RunScript,
    Signal,
    Spawn,
    TagsOf,
)
from ._errors import CacheUnavailableError, LoaderCircuitOpenError
from ._keys import EntryKeys, entry_keys
from ._loading import (
    NO_STALE,
    STALE_SERVED,
    guarded_load,
    leased,
    load_store,
    tolerate,
    what_to_store,
)
from ._plan import Plan, Served
from ._reads import Age, peeked
from ._results import Source
from ._scripts import (
    DROP,
    RELEASE_ONLY,
    AcquireStatus,
    acquire_call,
    leave_call,
    store_call,
)
from ._stamps import (
    Verdict,
    stamp_of,
    stamped,
    take_stamps,
    unstamped,
    version_reads,
)

# A waiter never blocks for less than this, so a lock about to expire is not polled hot.
MIN_WAIT_MS = 5


def after_miss(plan: Plan, key: str, raw: Any, block_limit_ms: int) -> Flow[Served]:
    """Everything but a plain hit, given the lookup's reply (None: not looked up)."""
    if type(raw) is CommandFailed:
        if not raw.wrong_type:
            return (yield from _load_uncached(plan, key, raw))
        return (yield from miss(plan, key, True, block_limit_ms))
    stale: Any = NO_STALE
    if plan.peek:
        found, age, _ = peeked(plan, raw)
        value = None if found is Found.NEGATIVE else found
        if age is Age.DUE or age is Age.STALE:
            # Serve the cached value now; one background reload per process, and one
            # across processes through the lock, replaces it.
            yield Spawn(key, _refresh(plan, key, block_limit_ms, raw[1]))
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


def _refresh(plan: Plan, key: str, block_limit_ms: int, seen_ms: int) -> Flow[bool]:
    """Reload an entry in the background, the one a lookup found with `seen_ms` left
    to live; False when its loader failed (callers keep getting the cached value, and
    the driver waits before trying again)."""
    keys = entry_keys(key)
    token = os.urandom(16).hex()
    hold = lock_hold(plan, keys, token)
    yield hold
    try:
        # The entry seen counts as not cached (it is the one being replaced), and one
        # with longer to live is a newer store: a process whose lookup came just
        # before another's refresh stored does not reload it a second time.
        reply = yield acquire_call(
            keys,
            token=token,
            lock_ttl_ms=plan.options.lock_ttl_ms,
            redis_type=plan.codec.redis_type,
            ignore_cached=False,
            keep_ms=max(seen_ms, 1),
        )
        if reply[0] == AcquireStatus.FOUND:
            yield Free(hold)  # the lock script took this caller off the waiters
            return True
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
            # The tags' versions, if any, read after the entry in the same round trip.
            reply, versions = yield from together(acquire, version_reads(keys.value, texts))
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
                stamp = stamp_of(versions)
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
    if value is STALE_SERVED:
        # This load's outcome: its joiners get the same stale answer, not a load each.
        return Served(stale, Source.STALE, shareable=True)
    kind, ttl_ms, payload, result = what_to_store(plan, value, keys.value)
    # XFetch: the load time goes beside the entry, for every process that reads it.
    load_ms = (yield Signal.LOAD_TIME) if plan.options.xfetch_beta else None
    if isinstance(stamp, CommandFailed):  # no version to stamp it with: store nothing
        kind, ttl_ms, payload = RELEASE_ONLY, 0, []
    elif texts and kind == plan.codec.redis_type:
        payload = stamped(kind, payload, stamp)
    # From here on, callers in this process start their own read instead of joining
    # this one, so none of them is handed a value stored before its call began.
    yield Signal.SEAL
    try:
        store = load_store(
            keys,
            token=token,
            kind=kind,
            ttl_ms=ttl_ms,
            wake_ttl_ms=options.lock_ttl_ms,
            payload=payload,
            load_ms=load_ms,
        )
        stored = yield from _store(keys, store, texts, stamp)
    except CommandFailed as failure:
        # The lock may still stand (an OOM or READONLY refusal, a lost reply): the
        # Hold stays, and the driver releases it when this flow returns.
        tolerate(plan, keys.value, failure)
        return Served(result, Source.LOADER, shareable=True)
    yield Free(hold)  # stored, or refused because the lease was revoked: nothing left
    return Served(result, Source.LOADER, lease_kept=bool(stored), shareable=bool(stored))


def _store(keys: EntryKeys, store: RunScript, texts: tuple[str, ...], stamp: Any) -> Flow[Any]:
    """The STORE script (raising its failure). For a tagged entry, the tags' versions
    are read after it in the same round trip: if one changed since the load took
    them, a tag invalidation came meanwhile, and the answer is 0 (as for a revoked
    lease: the value is not handed to callers who joined the load)."""
    if not texts or store.args[1] == RELEASE_ONLY or store.args[1] == DROP:
        return (yield store)
    stored, versions = yield from together(store, version_reads(keys.value, texts))
    return stored if stamp_of(versions) == stamp else 0


def together(first: RunScript, rest: Sequence[Command | RunScript]) -> Flow[tuple[Any, list[Any]]]:
    """`first`, and `rest` after it in the same round trip: first's reply (its failure
    raised, as when sent alone) and the replies of the rest (failures in place)."""
    if not rest:
        return (yield first), []
    replies = yield Batch([first, *rest])
    if type(replies[0]) is CommandFailed:
        raise replies[0]
    return replies[0], replies[1:]


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
