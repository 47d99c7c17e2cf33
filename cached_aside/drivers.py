"""Drivers run a flow against real clients: run_sync with redis.Redis, run_async
with redis.asyncio. They are twins on purpose, kept side by side so that their
symmetry shows; the algorithm itself lives in flows.py.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from time import perf_counter
from typing import Any, TypeVar

from redis.exceptions import RedisError, ResponseError

from .effects import Command, CommandFailed, Flow, RunScript, Signal
from .scripts import ScriptName

T = TypeVar("T")

SyncScripts = Mapping[ScriptName, Callable[..., Any]]
AsyncScripts = Mapping[ScriptName, Callable[..., Awaitable[Any]]]


def failed(exc: RedisError) -> CommandFailed:
    """Wrap a redis-py error for the flow, telling bad data apart from an outage."""
    wrong_type = isinstance(exc, ResponseError) and str(exc).startswith("WRONGTYPE")
    return CommandFailed(exc, wrong_type=wrong_type)


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
