"""Performing the bulk effects: a Batch as one pipeline (one round trip per node, on a
Redis Cluster too) and a Scan page, with redis-py's sync and asyncio clients.

Like drivers.py, sync and async twins side by side; failures come back as
CommandFailed values, because in a batch some entries may succeed.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import islice
from typing import Any

from redis.exceptions import NoScriptError, ResponseError

from ._effects import Batch, Command, CommandFailed, RunScript, Scan


def failed(exc: BaseException) -> CommandFailed:
    """Wrap a redis-py error for a flow, telling bad data apart from an outage."""
    wrong_type = isinstance(exc, ResponseError) and str(exc).startswith("WRONGTYPE")
    return CommandFailed(exc, wrong_type=wrong_type)


def _queue(pipe: Any, side: Any, effects: Sequence[Command | RunScript]) -> None:
    route = side.route
    for effect in effects:
        if isinstance(effect, Command):
            args, key = effect.args, effect.args[1]
        else:
            sha = side.scripts[effect.script].sha
            args = ("EVALSHA", sha, len(effect.keys), *effect.keys, *effect.args)
            key = effect.keys[0]
        if route is None:
            pipe.execute_command(*args)
        else:
            # Name the node: redis-py 8.1's sync cluster pipeline otherwise asks the
            # server (COMMAND GETKEYS) where every EVALSHA goes, one round trip each.
            pipe.execute_command(*args, target_nodes=route(key))


def _unknown_scripts(replies: list[Any]) -> list[int]:
    """Positions whose script the server did not know (restarted or flushed)."""
    return [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]


def _settle(side: Any, replies: list[Any]) -> list[Any]:
    breaker = side.breaker
    if breaker.failures:
        breaker.success()
    return [failed(reply) if isinstance(reply, side.failures) else reply for reply in replies]


def _refused(side: Any, count: int) -> list[Any] | None:
    breaker = side.breaker
    if breaker.open_until and not breaker.allow():
        return [CommandFailed(breaker.refusal(), wrong_type=False, sent=False)] * count
    return None


def _outage(side: Any, exc: BaseException, count: int) -> list[Any]:
    failure = failed(exc)
    if not failure.wrong_type:
        side.breaker.failure()
    return [failure] * count


def send_batch_sync(side: Any, batch: Batch) -> list[Any]:
    """Replies in order, a CommandFailed in place of each failure."""
    effects = batch.effects
    if not effects:
        return []
    refused = _refused(side, len(effects))
    if refused is not None:
        return refused
    try:
        pipe = side.client.pipeline(transaction=False)
        _queue(pipe, side, effects)
        replies = pipe.execute(raise_on_error=False)
        unknown = _unknown_scripts(replies)
        if unknown:
            for name in {effects[i].script for i in unknown}:  # type: ignore[union-attr]
                side.client.script_load(name.value)
            pipe = side.client.pipeline(transaction=False)
            _queue(pipe, side, [effects[i] for i in unknown])
            for i, reply in zip(unknown, pipe.execute(raise_on_error=False), strict=True):
                replies[i] = reply
    except side.failures as exc:
        return _outage(side, exc, len(effects))
    return _settle(side, replies)


async def send_batch_async(side: Any, batch: Batch) -> list[Any]:
    """Replies in order, a CommandFailed in place of each failure."""
    effects = batch.effects
    if not effects:
        return []
    refused = _refused(side, len(effects))
    if refused is not None:
        return refused
    try:
        pipe = side.client.pipeline(transaction=False)
        _queue(pipe, side, effects)
        replies = await pipe.execute(raise_on_error=False)
        unknown = _unknown_scripts(replies)
        if unknown:
            for name in {effects[i].script for i in unknown}:  # type: ignore[union-attr]
                await side.client.script_load(name.value)
            pipe = side.client.pipeline(transaction=False)
            _queue(pipe, side, [effects[i] for i in unknown])
            for i, reply in zip(unknown, await pipe.execute(raise_on_error=False), strict=True):
                replies[i] = reply
    except side.failures as exc:
        return _outage(side, exc, len(effects))
    return _settle(side, replies)


def _text(keys: list[Any]) -> list[str]:
    return [key.decode("utf-8", "replace") if isinstance(key, bytes) else key for key in keys]


def scan_sync(side: Any, effect: Scan) -> tuple[Any, list[str]]:
    """The next page of a scan over every master: (position or None when done, keys).

    redis-py's scan_iter visits each master of a cluster in turn; the position is
    the iterator itself.
    """
    cursor = effect.position
    if cursor is None:
        cursor = side.client.scan_iter(match=effect.match, count=effect.count)
    keys = list(islice(cursor, effect.count))
    return (cursor if len(keys) == effect.count else None), _text(keys)


async def scan_async(side: Any, effect: Scan) -> tuple[Any, list[str]]:
    cursor = effect.position
    if cursor is None:
        cursor = side.client.scan_iter(match=effect.match, count=effect.count)
    keys: list[Any] = []
    async for key in cursor:
        keys.append(key)
        if len(keys) == effect.count:
            return cursor, _text(keys)
    return None, _text(keys)
