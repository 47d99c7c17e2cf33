"""Sending effects to Redis through the breakers: one command or script (send), a
Batch as one pipeline (one round trip per node, on a Redis Cluster too) and a Scan
page, with redis-py's sync and asyncio clients.

Sync and async twins side by side, as in _drivers.py; failures come back as
CommandFailed values in place of their replies, because in a batch some entries
may succeed.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import islice
from typing import Any

from redis.exceptions import NoScriptError

from ._effects import Batch, Command, RunScript, Scan
from ._runtime import AsyncRuntime, Runtime, SyncRuntime, failed

Done = tuple[object, BaseException | None]  # an effect's reply, or what the flow is thrown


def send(rt: SyncRuntime, effect: Command | RunScript) -> Done:
    """One command or script through the breaker; returns the reply or the failure
    (a CommandFailed, or an interrupt, which the flow gets to release its Holds)."""
    if rt.breaker.open_until:  # one attribute read while all is well
        refused = rt.refusal(1, key_of(effect))
        if refused is not None:
            return None, refused[0]
    try:
        answered = False
        held = rt.held
        # type() is, not isinstance(): this is the hit path, and isinstance() costs more
        if held is not None and not (type(effect) is Command and effect.blocks):
            try:  # not contextlib.suppress, which costs three calls more per hit
                answered, reply = held.call(wire_args(rt, effect))
            except NoScriptError:
                answered = False  # the client's Script loads it
        if not answered:
            if isinstance(effect, Command):
                reply = rt.client.execute_command(*effect.args)
            else:
                reply = rt.scripts[effect.script](keys=effect.keys, args=effect.args)
    except rt.failures as exc:
        return None, rt.failure(exc, key_of(effect))
    except BaseException as exc:
        return None, exc
    if rt.breaker.failures:
        rt.answered(key_of(effect))
    return reply, None


def send_batch(rt: SyncRuntime, batch: Batch) -> list[Any]:
    """Replies in order, a CommandFailed in place of each failure."""
    effects = batch.effects
    if rt.breaker.open_until and rt.route is not None and effects:
        refused = _refused_by_node(rt, effects)  # a node's breaker is open: not to it
        if refused:
            rest = [effect for i, effect in enumerate(effects) if i not in refused]
            sent = iter(_send_batch(rt, rest) if rest else [])
            return [refused[i] if i in refused else next(sent) for i in range(len(effects))]
        return _send_batch(rt, effects)
    refused_all = rt.refusal(len(effects))
    if not effects or refused_all is not None:
        return refused_all or []
    return _send_batch(rt, effects)


def _send_batch(rt: SyncRuntime, effects: Sequence[Command | RunScript]) -> list[Any]:
    """Send a batch the breakers let through."""
    try:
        replies = _send_together(rt, effects)
        unknown = _unknown_scripts(replies)
        if unknown:  # the server restarted or flushed its scripts: load, send those again
            for name in _script_names(effects, unknown):
                rt.client.script_load(name.value)
            again = _send_together(rt, [effects[i] for i in unknown])
            for i, reply in zip(unknown, again, strict=True):
                replies[i] = reply
    except rt.failures as exc:
        return _failed_together(rt, effects, exc)
    return _settled(rt, effects, replies)


def _send_together(rt: SyncRuntime, effects: Sequence[Command | RunScript]) -> list[Any]:
    """In one write on the thread's held connection, else through a client pipeline."""
    if rt.held is not None:
        answered, replies = rt.held.call_many(batch_args(rt, effects))
        if answered:
            return replies
    return list(_pipeline(rt, effects).execute(raise_on_error=False))


async def asend(rt: AsyncRuntime, effect: Command | RunScript) -> Done:
    """As send(); a cancellation comes back as the failure, for the flow's Holds."""
    if rt.breaker.open_until:  # one attribute read while all is well
        refused = rt.refusal(1, key_of(effect))
        if refused is not None:
            return None, refused[0]
    try:
        pipeline = rt.pipeline
        if pipeline is None or (type(effect) is Command and effect.blocks):
            reply = await _athrough_client(rt, effect)
        else:
            try:
                reply = await pipeline.call(wire_args(rt, effect))
            except NoScriptError:
                reply = await _athrough_client(rt, effect)  # the client's Script loads it
    except rt.failures as exc:
        return None, rt.failure(exc, key_of(effect))
    except BaseException as exc:
        return None, exc
    if rt.breaker.failures:
        rt.answered(key_of(effect))
    return reply, None


async def _athrough_client(rt: AsyncRuntime, effect: Command | RunScript) -> object:
    if isinstance(effect, Command):
        return await rt.client.execute_command(*effect.args)
    return await rt.scripts[effect.script](keys=effect.keys, args=effect.args)


async def send_batch_async(rt: AsyncRuntime, batch: Batch) -> list[Any]:
    """Replies in order, a CommandFailed in place of each failure."""
    effects = batch.effects
    if rt.breaker.open_until and rt.route is not None and effects:
        refused = _refused_by_node(rt, effects)  # a node's breaker is open: not to it
        if refused:
            rest = [effect for i, effect in enumerate(effects) if i not in refused]
            sent = iter(await _send_batch_async(rt, rest) if rest else [])
            return [refused[i] if i in refused else next(sent) for i in range(len(effects))]
        return await _send_batch_async(rt, effects)
    refused_all = rt.refusal(len(effects))
    if not effects or refused_all is not None:
        return refused_all or []
    return await _send_batch_async(rt, effects)


async def _send_batch_async(rt: AsyncRuntime, effects: Sequence[Command | RunScript]) -> list[Any]:
    """Send a batch the breakers let through."""
    try:
        replies = await _asend_together(rt, effects)
        unknown = _unknown_scripts(replies)
        if unknown:
            for name in _script_names(effects, unknown):
                await rt.client.script_load(name.value)
            again = await _asend_together(rt, [effects[i] for i in unknown])
            for i, reply in zip(unknown, again, strict=True):
                replies[i] = reply
    except rt.failures as exc:
        return _failed_together(rt, effects, exc)
    return _settled(rt, effects, replies)


async def _asend_together(rt: AsyncRuntime, effects: Sequence[Command | RunScript]) -> list[Any]:
    """Through the loop's shared connection (with whatever else goes out; on a
    cluster, each node's), else through a client pipeline."""
    if rt.pipeline is not None:
        return await rt.pipeline.call_many(batch_args(rt, effects))
    return list(await _pipeline(rt, effects).execute(raise_on_error=False))


def key_of(effect: Command | RunScript) -> str:
    """The key a command or script works on (every command sent names its key
    first), for the breaker of its node on a cluster."""
    key: str = effect.args[1] if isinstance(effect, Command) else effect.keys[0]
    return key


def _script_names(effects: Sequence[Command | RunScript], unknown: list[int]) -> set[Any]:
    """The scripts Redis did not know (it restarted, or flushed them)."""
    return {e.script for i in unknown if isinstance(e := effects[i], RunScript)}


def _refused_by_node(rt: Runtime, effects: Sequence[Command | RunScript]) -> dict[int, Any]:
    """On a cluster with a node's breaker open: the refusals of the effects bound for
    open nodes, by position; the others go out."""
    refused: dict[int, Any] = {}
    for i, effect in enumerate(effects):
        refusal = rt.refusal(1, key_of(effect))
        if refusal is not None:
            refused[i] = refusal[0]
    return refused


def _failed_together(
    rt: Runtime, effects: Sequence[Command | RunScript], exc: BaseException
) -> list[Any]:
    """The whole batch failed: held against the node when the batch had one (or
    there are no nodes), never against healthy nodes a mixed batch also touched."""
    keys = {key_of(effect) for effect in effects}
    nodes = {_node_name(rt, key) for key in keys} if rt.route else set()
    failure = rt.failure(exc, next(iter(keys)) if len(nodes) <= 1 else None)
    return [failure] * len(effects)


def _node_name(rt: Runtime, key: str) -> str | None:
    """The name of `key`'s node on a cluster; None when no node covers its slot."""
    assert rt.route is not None
    try:
        return getattr(rt.route(key), "name", None)
    except rt.failures:  # mid-failover: no node known for the slot
        return None


def wire_args(rt: Runtime, effect: Command | RunScript) -> tuple[Any, ...]:
    """The arguments of the command that performs `effect`: a script by its sha."""
    if type(effect) is RunScript:
        script = rt.scripts[effect.script]
        return ("EVALSHA", script.sha, len(effect.keys), *effect.keys, *effect.args)
    return effect.args


def batch_args(rt: Runtime, effects: Sequence[Command | RunScript]) -> list[tuple[Any, ...]]:
    """wire_args of each effect of a batch, a Command's spelled out: a many() of hits
    sends one per key."""
    return [e.args if type(e) is Command else wire_args(rt, e) for e in effects]


def scan(rt: SyncRuntime, effect: Scan) -> tuple[Any, list[str]]:
    """The next page of a scan over every master: (position or None when done, keys).

    redis-py's scan_iter visits each master of a cluster in turn; the position is
    the iterator itself.
    """
    cursor = effect.position
    if cursor is None:
        cursor = rt.client.scan_iter(match=effect.match, count=effect.count)
    keys = list(islice(cursor, effect.count))
    return (cursor if len(keys) == effect.count else None), _text(keys)


async def scan_async(rt: AsyncRuntime, effect: Scan) -> tuple[Any, list[str]]:
    cursor = effect.position
    if cursor is None:
        cursor = rt.client.scan_iter(match=effect.match, count=effect.count)
    keys: list[Any] = []
    async for key in cursor:
        keys.append(key)
        if len(keys) == effect.count:
            return cursor, _text(keys)
    return None, _text(keys)


def _pipeline(rt: Runtime, effects: Sequence[Command | RunScript]) -> Any:
    pipe = rt.client.pipeline(transaction=False)
    route = rt.route
    for effect in effects:
        if isinstance(effect, Command):
            args, key = effect.args, effect.args[1]
        else:
            sha = rt.scripts[effect.script].sha
            args = ("EVALSHA", sha, len(effect.keys), *effect.keys, *effect.args)
            key = effect.keys[0]
        if route is None:
            pipe.execute_command(*args)
        else:
            # Name the node: redis-py 8.1's sync cluster pipeline otherwise asks the
            # server (COMMAND GETKEYS) where every EVALSHA goes, one round trip each.
            pipe.execute_command(*args, target_nodes=route(key))
    return pipe


def _unknown_scripts(replies: list[Any]) -> list[int]:
    """Positions whose script the server did not know (restarted or flushed)."""
    return [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]


def _settled(rt: Runtime, effects: Sequence[Command | RunScript], replies: list[Any]) -> list[Any]:
    """Each reply as the flow sees it; each failure held against its own node."""
    if rt.route is None:
        rt.answered()
        failures = rt.failures
        return [
            r
            if type(r) is bytes  # a lookup's reply, most of a batch: no failure to look for
            else rt.failure(r)
            if isinstance(r, failures)
            else failed(r)
            if isinstance(r, OSError)
            else r
            for r in replies
        ]
    settled: list[Any] = []
    # A node that failed has its one failure in place of each reply of its share:
    # counted once on its breaker, as a batch that failed whole is, not once per key.
    counted: dict[int, Any] = {}
    # While no node's breaker counts failures an answer changes none (asend's rule):
    # its key is not routed again (a CRC16 and a slot lookup per key of a batch).
    counting = rt.breaker.failures
    # Failures are counted once every answer is in: an answer ends the unrouted
    # breaker's count (reached), which must not wipe what this same batch counted
    # there (a slot no node covers), whatever the order of its replies.
    failing: list[int] = []
    for effect, reply in zip(effects, replies, strict=True):
        if type(reply) is bytes:  # a lookup's reply, most of a batch
            if counting:
                rt.answered(key_of(effect))
        elif isinstance(reply, rt.failures):
            failing.append(len(settled))
        elif isinstance(reply, OSError):
            reply = failed(reply)
        elif counting:
            rt.answered(key_of(effect))
        settled.append(reply)
    for i in failing:
        reply = settled[i]
        failure = counted.get(id(reply))
        if failure is None:
            failure = counted[id(reply)] = rt.failure(reply, key_of(effects[i]))
        settled[i] = failure
    return settled


def _text(keys: list[Any]) -> list[str]:
    return [key.decode("utf-8", "replace") if isinstance(key, bytes) else key for key in keys]
