"""Drivers run flows against real clients: the sync ones with redis.Redis and threads,
the async ones with redis.asyncio and tasks. They are twins on purpose, kept side by
side so that their symmetry shows; the algorithm itself lives in flows.py.

serve_sync/serve_async send the lookup directly, because a hit is the hot path and a
generator round costs about a microsecond there; flows.on_lookup still decides.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Coroutine
from time import perf_counter
from typing import Any, TypeVar

from ._effects import (
    Batch,
    Command,
    CommandFailed,
    Flow,
    Free,
    Hold,
    LoadOne,
    LoadSome,
    Postpone,
    RunScript,
    Scan,
    Signal,
    Spawn,
)
from ._flows import Plan, Served, after_miss, bypass, on_lookup
from ._pipelines import failed, scan_async, scan_sync, send_batch_async, send_batch_sync
from ._scripts import ScriptName

T = TypeVar("T")
logger = logging.getLogger("cached_aside")


def no_seal() -> None:
    """The seal of a flow nobody can join (background work, writes)."""
    return None


def no_load(*_: Any) -> Any:
    """The load of a flow that never loads (writes, invalidations)."""
    raise AssertionError("this flow never loads")


async def no_load_async(*_: Any) -> Any:
    raise AssertionError("this flow never loads")


def timed_load(plan: Plan, loader: Callable[..., Any], args: Any, kwargs: Any) -> Callable[[], Any]:
    """The call's load, timed into the function's loader-latency histogram."""

    def load() -> Any:
        started = perf_counter()
        try:
            return loader(*args, **kwargs)
        finally:
            plan.stats.loaded_in(perf_counter() - started)

    return load


def timed_load_async(
    plan: Plan, loader: Callable[..., Any], args: Any, kwargs: Any
) -> Callable[[], Awaitable[Any]]:
    async def load() -> Any:
        started = perf_counter()
        try:
            return await loader(*args, **kwargs)
        finally:
            plan.stats.loaded_in(perf_counter() - started)

    return load


def serve_sync(
    plan: Plan, key: str, side: Any, loader: Callable[..., Any], args: Any, kwargs: Any
) -> tuple[Served, float, bool]:
    """Serve one call from a thread: the lookup, then, on a miss, the miss flow shared
    with the other threads of this process that miss the same key.

    Returns the answer, the seconds spent on Redis, and whether it was shared.
    """
    outbox = side.outbox
    if outbox.active and outbox.blocks(key):
        load = timed_load(plan, loader, args, kwargs)
        return (*run_sync(bypass(plan, key), side, load, no_seal), False)
    seconds = 0.0
    look = key not in side.flights.active  # else: another thread is loading it; join
    while True:
        raw: Any = None
        if look:
            breaker = side.breaker
            started = perf_counter()
            if breaker.open_until and not breaker.allow():
                raw = CommandFailed(breaker.refusal(), wrong_type=False)
            else:
                try:
                    if plan.peek:
                        raw = side.scripts[ScriptName.PEEK](
                            keys=(key,), args=(plan.codec.redis_type,)
                        )
                    else:
                        raw = side.client.execute_command(plan.codec.read_command, key)
                    if breaker.failures:
                        breaker.success()
                except side.failures as exc:
                    raw = failed(exc)
                    if not raw.wrong_type:
                        breaker.failure()
            seconds += perf_counter() - started
            hit = on_lookup(plan, raw)
            if hit is not None:
                return hit, seconds, False
        shared = side.flights.run(
            key,
            plan.patience,
            miss_sync,
            plan,
            key,
            side,
            raw,
            timed_load(plan, loader, args, kwargs),
        )
        if shared is not None:
            (served, more), joined = shared
            return served, seconds + more, joined
        look = True  # the flight's answer was not ours to take: look for ourselves


def miss_sync(
    plan: Plan, key: str, side: Any, raw: Any, load: Callable[[], Any], seal: Callable[[], None]
) -> tuple[Served, float]:
    return run_sync(after_miss(plan, key, raw, side.block_limit_ms), side, load, seal)


async def miss_async(
    plan: Plan,
    key: str,
    side: Any,
    raw: Any,
    load: Callable[[], Awaitable[Any]],
    seal: Callable[[], None],
) -> tuple[Served, float]:
    return await run_async(after_miss(plan, key, raw, side.block_limit_ms), side, load, seal)


async def serve_async(
    plan: Plan, key: str, side: Any, loader: Callable[..., Any], args: Any, kwargs: Any
) -> tuple[Served, float, bool]:
    """Serve one call from a task: the lookup and, on a miss, the miss flow, both
    shared with the tasks of this event loop that ask for the same key.

    Returns the answer, the seconds spent on Redis, and whether it was shared.
    """
    if not side.ready:
        await side.prepare()
    outbox = side.outbox
    if outbox.active and outbox.blocks(key):
        load = timed_load_async(plan, loader, args, kwargs)
        return (*(await run_async(bypass(plan, key), side, load, no_seal)), False)
    (served, seconds), joined = await side.flights.run(
        key, plan.patience, _read_async, plan, key, side, loader, args, kwargs
    )
    return served, seconds, joined


async def _read_async(
    plan: Plan,
    key: str,
    side: Any,
    loader: Callable[..., Any],
    args: Any,
    kwargs: Any,
    seal: Callable[[], None],
) -> tuple[Served, float]:
    breaker = side.breaker
    started = perf_counter()
    if breaker.open_until and not breaker.allow():
        raw = CommandFailed(breaker.refusal(), wrong_type=False)
    else:
        try:
            if plan.peek:
                raw = await side.scripts[ScriptName.PEEK](
                    keys=(key,), args=(plan.codec.redis_type,)
                )
            else:
                raw = await side.client.execute_command(plan.codec.read_command, key)
            if breaker.failures:
                breaker.success()
        except side.failures as exc:
            raw = failed(exc)
            if not raw.wrong_type:
                breaker.failure()
    seconds = perf_counter() - started
    hit = on_lookup(plan, raw)
    if hit is not None:
        return hit, seconds
    flow = after_miss(plan, key, raw, side.block_limit_ms)
    served, more = await run_async(flow, side, timed_load_async(plan, loader, args, kwargs), seal)
    return served, seconds + more


def run_sync(
    flow: Flow[T], side: Any, load: Callable[..., Any], seal: Callable[[], None]
) -> tuple[T, float]:
    """Run a flow to its end; returns its result and the seconds spent waiting on Redis.

    Every Hold still standing when the flow ends, however it ends, is released here:
    the one place that guarantees no lock outlives its flow.
    """
    redis_seconds = 0.0
    reply: Any = None
    failure: BaseException | None = None
    holds: list[Hold] = []
    try:
        while True:
            try:
                effect = flow.send(reply) if failure is None else flow.throw(failure)
            except StopIteration as stop:
                return stop.value, redis_seconds
            reply = failure = None
            if type(effect) is Command or type(effect) is RunScript:
                started = perf_counter()
                reply, failure = _send_sync(side, effect)
                redis_seconds += perf_counter() - started
            elif type(effect) is Hold:
                holds.append(effect)
            elif type(effect) is Free:
                holds.remove(effect.hold)
            elif type(effect) is Spawn:
                if side.background.claim(effect.key):
                    threading.Thread(
                        target=_background_sync, args=(effect, side, load), daemon=True
                    ).start()
            elif effect is Signal.LOAD:
                try:
                    reply = load()
                except BaseException as exc:
                    failure = exc
            elif effect is Signal.SEAL:
                seal()
            elif type(effect) is Batch:
                started = perf_counter()
                reply = send_batch_sync(side, effect)
                redis_seconds += perf_counter() - started
            elif type(effect) is Postpone:
                side.outbox.add(effect.items)
            elif type(effect) is Scan:
                try:
                    reply = scan_sync(side, effect)
                except side.failures as exc:
                    failure = failed(exc)
                    side.breaker.failure()  # as for any other command
            elif type(effect) is LoadSome or type(effect) is LoadOne:
                try:
                    reply = load(effect.positions)
                    if type(effect) is LoadOne:
                        reply = reply[0]
                except BaseException as exc:
                    failure = exc
    finally:
        if holds:
            _release_sync(side, holds)


def _release_sync(side: Any, holds: list[Hold]) -> None:
    """Perform the releases of a flow's standing Holds; the outbox retries those
    Redis does not take."""
    for hold in holds:
        if len(hold.releases) == 1:
            replies = [_send_sync(side, hold.releases[0])[1]]
        else:
            replies = send_batch_sync(side, Batch(list(hold.releases)))
        _queue_refused(side, hold, replies)


def _queue_refused(side: Any, hold: Hold, replies: list[Any]) -> None:
    """Hand the releases Redis did not take to the outbox, which retries them."""
    for release, reply in zip(hold.releases, replies, strict=True):
        if isinstance(reply, BaseException):
            side.outbox.add_release(release, hold.ttl_ms)


def _send_sync(side: Any, effect: Command | RunScript) -> tuple[Any, BaseException | None]:
    """One command or script through the breaker; returns the reply or the failure."""
    breaker = side.breaker
    if breaker.open_until and not breaker.allow():
        return None, CommandFailed(breaker.refusal(), wrong_type=False, sent=False)
    try:
        if isinstance(effect, Command):
            reply = side.client.execute_command(*effect.args)
        else:
            reply = side.scripts[effect.script](keys=effect.keys, args=effect.args)
    except side.failures as exc:
        failure = failed(exc)
        if not failure.wrong_type:
            breaker.failure()
        return None, failure
    except BaseException as exc:  # interrupts too: the flow's Holds are released
        return None, exc
    if breaker.failures:
        breaker.success()
    return reply, None


def _background_sync(effect: Spawn, side: Any, load: Callable[[], Any]) -> None:
    ok = False
    try:
        ok = run_sync(effect.flow, side, load, no_seal)[0] is not False
    except BaseException:  # a thread has nobody to raise to
        logger.warning("background work on %r failed", effect.key, exc_info=True)
    finally:
        side.background.finish(effect.key, ok)


async def run_async(
    flow: Flow[T], side: Any, load: Callable[..., Awaitable[Any]], seal: Callable[[], None]
) -> tuple[T, float]:
    """Run a flow to its end; returns its result and the seconds spent waiting on Redis.

    As run_sync, every Hold standing when the flow ends is released here, a
    cancelled task's too: the release is shielded from a second cancellation.
    """
    redis_seconds = 0.0
    reply: Any = None
    failure: BaseException | None = None
    holds: list[Hold] = []
    try:
        while True:
            try:
                effect = flow.send(reply) if failure is None else flow.throw(failure)
            except StopIteration as stop:
                return stop.value, redis_seconds
            reply = failure = None
            if type(effect) is Command or type(effect) is RunScript:
                started = perf_counter()
                reply, failure = await _send_async(side, effect)
                redis_seconds += perf_counter() - started
            elif type(effect) is Hold:
                holds.append(effect)
            elif type(effect) is Free:
                holds.remove(effect.hold)
            elif type(effect) is Spawn:
                if side.background.claim(effect.key):
                    _keep(side, _background_async(effect, side, load))
            elif effect is Signal.LOAD:
                try:
                    reply = await load()
                except BaseException as exc:
                    failure = exc
            elif effect is Signal.SEAL:
                seal()
            elif type(effect) is Batch:
                started = perf_counter()
                reply = await send_batch_async(side, effect)
                redis_seconds += perf_counter() - started
            elif type(effect) is Postpone:
                side.outbox.add(effect.items)
            elif type(effect) is Scan:
                try:
                    reply = await scan_async(side, effect)
                except side.failures as exc:
                    failure = failed(exc)
                    side.breaker.failure()  # as for any other command
            elif type(effect) is LoadSome or type(effect) is LoadOne:
                try:
                    reply = await load(effect.positions)
                    if type(effect) is LoadOne:
                        reply = reply[0]
                except BaseException as exc:
                    failure = exc
    finally:
        if holds:
            # A task of its own, awaited through a shield: a second cancellation of
            # this one stops the waiting, never the release.
            await asyncio.shield(_keep(side, _release_async(side, holds)))


def _keep(side: Any, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    """Run `work` as a task of this loop that aclose() waits for."""
    task = asyncio.get_running_loop().create_task(work)
    side.tasks.add(task)  # a task nobody references can be collected mid-run
    task.add_done_callback(side.tasks.discard)
    return task


async def _release_async(side: Any, holds: list[Hold]) -> None:
    for hold in holds:
        if len(hold.releases) == 1:
            replies = [(await _send_async(side, hold.releases[0]))[1]]
        else:
            replies = await send_batch_async(side, Batch(list(hold.releases)))
        _queue_refused(side, hold, replies)


async def _send_async(side: Any, effect: Command | RunScript) -> tuple[Any, BaseException | None]:
    """One command or script through the breaker; returns the reply or the failure."""
    breaker = side.breaker
    if breaker.open_until and not breaker.allow():
        return None, CommandFailed(breaker.refusal(), wrong_type=False, sent=False)
    try:
        if isinstance(effect, Command):
            reply = await side.client.execute_command(*effect.args)
        else:
            reply = await side.scripts[effect.script](keys=effect.keys, args=effect.args)
    except side.failures as exc:
        failure = failed(exc)
        if not failure.wrong_type:
            breaker.failure()
        return None, failure
    except BaseException as exc:  # cancellation too: the flow's Holds are released
        return None, exc
    if breaker.failures:
        breaker.success()
    return reply, None


async def _background_async(effect: Spawn, side: Any, load: Callable[[], Awaitable[Any]]) -> None:
    ok = False
    try:
        ok = (await run_async(effect.flow, side, load, no_seal))[0] is not False
    except Exception:
        logger.warning("background work on %r failed", effect.key, exc_info=True)
    finally:
        side.background.finish(effect.key, ok)
