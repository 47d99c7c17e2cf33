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
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import Any, TypeVar

from .effects import (
    Batch,
    Command,
    CommandFailed,
    Flow,
    LoadOne,
    LoadSome,
    RunScript,
    Scan,
    Signal,
    Spawn,
)
from .flows import Plan, Served, after_miss, on_lookup
from .pipelines import failed, scan_async, scan_sync, send_batch_async, send_batch_sync
from .scripts import ScriptName

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
            key, miss_sync, plan, key, side, raw, timed_load(plan, loader, args, kwargs)
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
    (served, seconds), joined = await side.flights.run(
        key, _read_async, plan, key, side, loader, args, kwargs
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
    """Run a flow to its end; returns its result and the seconds spent waiting on Redis."""
    redis_seconds = 0.0
    reply: Any = None
    failure: BaseException | None = None
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
        elif type(effect) is Spawn:
            if effect.key not in side.background:
                side.background.add(effect.key)
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


def _send_sync(side: Any, effect: Command | RunScript) -> tuple[Any, BaseException | None]:
    """One command or script through the breaker; returns the reply or the failure."""
    breaker = side.breaker
    if breaker.open_until and not breaker.allow():
        return None, CommandFailed(breaker.refusal(), wrong_type=False)
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
    except BaseException as exc:  # interrupts too: the flow releases its lock
        return None, exc
    if breaker.failures:
        breaker.success()
    return reply, None


def _background_sync(effect: Spawn, side: Any, load: Callable[[], Any]) -> None:
    try:
        run_sync(effect.flow, side, load, no_seal)
    except Exception:
        logger.warning("background work on %r failed", effect.key, exc_info=True)
    finally:
        side.background.discard(effect.key)


async def run_async(
    flow: Flow[T], side: Any, load: Callable[..., Awaitable[Any]], seal: Callable[[], None]
) -> tuple[T, float]:
    """Run a flow to its end; returns its result and the seconds spent waiting on Redis."""
    redis_seconds = 0.0
    reply: Any = None
    failure: BaseException | None = None
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
        elif type(effect) is Spawn:
            if effect.key not in side.background:
                side.background.add(effect.key)
                task = asyncio.get_running_loop().create_task(_background_async(effect, side, load))
                side.tasks.add(task)  # a task nobody references can be collected mid-run
                task.add_done_callback(side.tasks.discard)
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


async def _send_async(side: Any, effect: Command | RunScript) -> tuple[Any, BaseException | None]:
    """One command or script through the breaker; returns the reply or the failure."""
    breaker = side.breaker
    if breaker.open_until and not breaker.allow():
        return None, CommandFailed(breaker.refusal(), wrong_type=False)
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
    except BaseException as exc:  # cancellation too: the flow releases its lock
        return None, exc
    if breaker.failures:
        breaker.success()
    return reply, None


async def _background_async(effect: Spawn, side: Any, load: Callable[[], Awaitable[Any]]) -> None:
    try:
        await run_async(effect.flow, side, load, no_seal)
    except Exception:
        logger.warning("background work on %r failed", effect.key, exc_info=True)
    finally:
        side.background.discard(effect.key)
