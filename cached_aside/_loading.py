"""How a flow loads, for single calls and batches alike: under leases kept alive
while the loader runs, through the function's loader breaker (with stale_if_error's
fallback), and what a result becomes in Redis. Generators that yield effects; no I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any, Final

from ._effects import CommandFailed, Flow, Leased, LoadOne, LoadSome, RunScript, Signal
from ._errors import CacheUnavailableError, LoaderCircuitOpenError
from ._keys import EntryKeys
from ._plan import Plan
from ._scripts import DROP, renew_call, store_call, timed_store_call
from ._stamps import version_renewals


class _NoStale(enum.Enum):
    NO_STALE = "no stale value"


NO_STALE: Final = _NoStale.NO_STALE  # a miss with no stale value to fall back on


class _Stale(enum.Enum):
    SERVED = "the load failed and the stale value answers"


STALE_SERVED: Final = _Stale.SERVED


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
    stale value to fall back on, a failed (or skipped) load yields STALE_SERVED;
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
        return STALE_SERVED
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
        return STALE_SERVED
    except BaseException:  # cancelled: no verdict, but the next caller may probe
        if probing and breaker is not None:
            breaker.abandon()
        raise
    if breaker is not None and (breaker.failures or breaker.open_until):
        breaker.success()
    return value


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


def tolerate(plan: Plan, key: str, failure: CommandFailed) -> None:
    plan.stats.error(key, failure)
    if not plan.options.fail_open:
        raise CacheUnavailableError(
            f"{plan.name}: Redis failed for {key!r} ({failure}) and fail_open=False"
        ) from failure.cause


def load_store(
    keys: EntryKeys,
    *,
    token: str,
    kind: str,
    ttl_ms: int,
    wake_ttl_ms: int,
    payload: Sequence[Any],
    load_ms: int | None,
) -> RunScript:
    """The store of a load's result under its lock: STORE, or with `load_ms` (an
    XFetch function's, from Signal.LOAD_TIME) STORE_TIMED, which keeps it beside."""
    if load_ms is None:
        return store_call(
            keys, token=token, kind=kind, ttl_ms=ttl_ms, wake_ttl_ms=wake_ttl_ms, payload=payload
        )
    return timed_store_call(
        keys,
        token=token,
        kind=kind,
        ttl_ms=ttl_ms,
        wake_ttl_ms=wake_ttl_ms,
        load_ms=load_ms,
        payload=payload,
    )
