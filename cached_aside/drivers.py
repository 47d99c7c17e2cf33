"""Drivers run flows against real clients: the sync ones with redis.Redis, the async
ones with redis.asyncio. They are twins on purpose, kept side by side so that their
symmetry shows; the algorithm itself lives in flows.py.

serve_sync/serve_async send the lookup command directly, because a hit is the hot
path and a generator round costs about a microsecond; flows.on_lookup still decides.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from time import perf_counter
from typing import Any, TypeVar

from redis.exceptions import RedisError, ResponseError

from .effects import Command, CommandFailed, Flow, RunScript, Signal
from .flows import Plan, Served, after_miss, on_lookup
from .scripts import ScriptName

T = TypeVar("T")

SyncScripts = Mapping[ScriptName, Callable[..., Any]]
AsyncScripts = Mapping[ScriptName, Callable[..., Awaitable[Any]]]


def failed(exc: RedisError) -> CommandFailed:
    """Wrap a redis-py error for the flow, telling bad data apart from an outage."""
    wrong_type = isinstance(exc, ResponseError) and str(exc).startswith("WRONGTYPE")
    return CommandFailed(exc, wrong_type=wrong_type)


def serve_sync(
    plan: Plan, key: str, side: Any, loader: Callable[..., Any], args: Any, kwargs: Any
) -> tuple[Served, float, bool]:
    """Serve one call from a thread: the lookup, then, on a miss, the miss flow shared
    with the other threads of this process that miss the same key.

    Returns the answer, the seconds spent on Redis, and whether it was shared.
    """
    raw: Any = None
    seconds = 0.0
    if key not in side.flights.active:  # else: another thread is loading it; join
        started = perf_counter()
        try:
            raw = side.client.execute_command(plan.codec.read_command, key)
        except RedisError as exc:
            raw = failed(exc)
        seconds = perf_counter() - started
        hit = on_lookup(plan, raw)
        if hit is not None:
            return hit, seconds, False
    (served, more), joined = side.flights.run(
        key, _miss_sync, plan, key, side, raw, lambda: loader(*args, **kwargs)
    )
    return served, seconds + more, joined


def _miss_sync(
    plan: Plan, key: str, side: Any, raw: Any, load: Callable[[], Any], seal: Callable[[], None]
) -> tuple[Served, float]:
    flow = after_miss(plan, key, raw, side.block_limit_ms)
    return run_sync(flow, side.client, side.scripts, load, seal)


async def serve_async(
    plan: Plan, key: str, side: Any, loader: Callable[..., Any], args: Any, kwargs: Any
) -> tuple[Served, float, bool]:
    """Serve one call from a task: the lookup and, on a miss, the miss flow, both
    shared with the tasks of this event loop that ask for the same key.

    Returns the answer, the seconds spent on Redis, and whether it was shared.
    """
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
    started = perf_counter()
    try:
        raw = await side.client.execute_command(plan.codec.read_command, key)
    except RedisError as exc:
        raw = failed(exc)
    seconds = perf_counter() - started
    hit = on_lookup(plan, raw)
    if hit is not None:
        return hit, seconds
    flow = after_miss(plan, key, raw, side.block_limit_ms)
    served, more = await run_async(
        flow, side.client, side.scripts, lambda: loader(*args, **kwargs), seal
    )
    return served, seconds + more


def run_sync(
    flow: Flow[T],
    client: Any,
    scripts: SyncScripts,
    load: Callable[[], Any],
    seal: Callable[[], None],
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
        if type(effect) is Command:
            started = perf_counter()
            try:
                reply = client.execute_command(*effect.args)
            except RedisError as exc:
                failure = failed(exc)
            except BaseException as exc:  # cancellation too: the flow releases its lock
                failure = exc
            redis_seconds += perf_counter() - started
        elif type(effect) is RunScript:
            started = perf_counter()
            try:
                reply = scripts[effect.script](keys=effect.keys, args=effect.args)
            except RedisError as exc:
                failure = failed(exc)
            except BaseException as exc:  # cancellation too: the flow releases its lock
                failure = exc
            redis_seconds += perf_counter() - started
        elif effect is Signal.LOAD:
            try:
                reply = load()
            except BaseException as exc:
                failure = exc
        elif effect is Signal.SEAL:
            seal()


async def run_async(
    flow: Flow[T],
    client: Any,
    scripts: AsyncScripts,
    load: Callable[[], Awaitable[Any]],
    seal: Callable[[], None],
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
        if type(effect) is Command:
            started = perf_counter()
            try:
                reply = await client.execute_command(*effect.args)
            except RedisError as exc:
                failure = failed(exc)
            except BaseException as exc:  # cancellation too: the flow releases its lock
                failure = exc
            redis_seconds += perf_counter() - started
        elif type(effect) is RunScript:
            started = perf_counter()
            try:
                reply = await scripts[effect.script](keys=effect.keys, args=effect.args)
            except RedisError as exc:
                failure = failed(exc)
            except BaseException as exc:  # cancellation too: the flow releases its lock
                failure = exc
            redis_seconds += perf_counter() - started
        elif effect is Signal.LOAD:
            try:
                reply = await load()
            except BaseException as exc:
                failure = exc
        elif effect is Signal.SEAL:
            seal()
