"""The drivers: run flows against real clients, the sync ones with redis.Redis and
threads, the async ones with redis.asyncio and tasks. They perform effects and
decide nothing: the algorithm lives in _flows.py and _batches.py, where a read goes
in _reads.py, and what needs no I/O in _driving.py. Twins only in their I/O lines,
kept side by side so that their symmetry shows.

serve/aserve send a call's lookup themselves, because a hit is the hot path and a
generator round costs about a microsecond there; reads.on_lookup still decides.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from time import perf_counter
from typing import Any, TypeVar

from ._driving import (
    Call,
    Running,
    Seal,
    as_loads,
    as_reply,
    lookup,
    no_seal,
    queue_refused,
    tagged_lookup,
)
from ._effects import (
    UNREAD,
    Batch,
    Command,
    Each,
    Effect,
    Flow,
    Hold,
    Leased,
    LoadOne,
    LoadSome,
    RunScript,
    Scan,
    Signal,
    Spawn,
)
from ._flows import after_miss, bypass
from ._leases import arenew, renew
from ._loads import Loads
from ._pipelines import Done, asend, scan, scan_async, send, send_batch, send_batch_async
from ._plan import Plan, Served
from ._reads import FIRST_STEPS, LOADER, LOOK, WAIT, on_lookup, on_miss, served_aged
from ._runtime import AsyncRuntime, SyncRuntime
from ._stamps import read_stamped

__all__ = ["arun", "asend", "aserve", "no_seal", "run", "send", "serve"]

T = TypeVar("T")
logger = logging.getLogger("cached_aside")


# -- sync ---------------------------------------------------------------------------


def serve(
    plan: Plan, key: str, rt: SyncRuntime, loads: Loads | Call, raw: object = UNREAD
) -> tuple[Served, float, bool]:
    """Serve one call from a thread: the lookup (unless `raw` is its reply already),
    then, on a miss, the miss flow shared with the other threads of this process
    that miss the same key. Returns the answer, the seconds spent on Redis, and
    whether it was shared. A Call is made into Loads only on a miss."""
    pending = rt.outbox.active and rt.outbox.blocks(key)
    # Shared: the reply is in hand, or another thread of this process reads the key.
    step = FIRST_STEPS[pending][False][raw is not UNREAD or key in rt.flights.active]
    if step is LOADER:
        return (*run(bypass(plan, key), rt, as_loads(plan, loads), no_seal), False)
    seconds = 0.0
    while True:
        if step is LOOK:
            started = perf_counter()
            if plan.tags:
                raw = _look(plan, key, rt, loads)
            else:  # the hit path: one call fewer
                raw, failure = send(rt, lookup(plan, key))
                if failure is not None:
                    raw = as_reply(failure)
            seconds += perf_counter() - started
            hit = on_lookup(plan, raw)
            if hit is not None:
                return hit, seconds, False
        shared = rt.flights.run(
            key, plan.patience, _miss, plan, key, rt, raw, as_loads(plan, loads)
        )
        if shared is not None:
            (served, more), joined = shared
            return served, seconds + more, joined
        step = LOOK  # the flight's answer was not ours to take: look for ourselves


def _miss(
    plan: Plan, key: str, rt: SyncRuntime, raw: object, loads: Loads, seal: Seal
) -> tuple[Served, float]:
    seconds = 0.0
    refresh = rt.flights.refreshing(key)
    if on_miss(refresh is not None, raw is not UNREAD and served_aged(plan, raw)) is WAIT:
        assert refresh is not None
        rt.flights.wait_for(refresh, plan.patience)
        started = perf_counter()
        raw = _look(plan, key, rt, loads)  # tagged: with its versions, as the first look
        seconds = perf_counter() - started
        hit = on_lookup(plan, raw)
        if hit is not None:
            return hit, seconds
    flow = after_miss(plan, key, None if raw is UNREAD else raw, rt.block_limit_ms)
    served, more = run(flow, rt, loads, seal)
    return served, seconds + more


def _look(plan: Plan, key: str, rt: SyncRuntime, loads: Loads | Call) -> object:
    """The lookup's reply, a failure as its reply; a tagged entry read with its tags'
    versions (stamp checked), so every look of a key is judged the same way."""
    if plan.tags:
        return read_stamped(plan, send_batch(rt, tagged_lookup(plan, key, loads)))
    raw, failure = send(rt, lookup(plan, key))
    return raw if failure is None else as_reply(failure)


def run(flow: Flow[T], rt: SyncRuntime, loads: Loads, seal: Seal) -> tuple[T, float]:
    """Run a flow to its end; returns its result and the seconds spent on Redis.

    Every Hold still standing when the flow ends, however it ends, is released here:
    the one place that guarantees no lock outlives its flow.
    """
    running = Running(rt, rt.flights, loads, seal)
    reply: Any = None
    failure: BaseException | None = None
    ended: BaseException | None = None
    try:
        while True:
            try:
                effect = flow.send(reply) if failure is None else flow.throw(failure)
            except StopIteration as stop:
                return stop.value, running.seconds
            reply, failure = _perform(effect, rt, running)
    except BaseException as exc:
        ended = exc
        raise
    finally:
        try:
            if running.holds:
                _release_all(rt, running.holds)
        finally:
            running.end(ended)


def _perform(effect: Effect, rt: SyncRuntime, running: Running) -> Done:
    """One effect, with the I/O of threads; the rest is Running's."""
    if isinstance(effect, (Command, RunScript, Batch)):
        started = perf_counter()
        done = send(rt, effect) if not isinstance(effect, Batch) else (send_batch(rt, effect), None)
        running.seconds += perf_counter() - started
        return done
    if isinstance(effect, Scan):
        try:
            return scan(rt, effect), None
        except rt.failures as exc:
            return None, rt.failure(exc)
    if isinstance(effect, Each):
        return [_one(effect, entry, rt, running.loads) for entry in effect.entries], None
    if isinstance(effect, Spawn):
        if rt.background.claim(effect.key):
            threading.Thread(
                target=_background, args=(effect, rt, running.loads), daemon=True
            ).start()
        return None, None
    if effect is Signal.LOAD or isinstance(effect, (LoadSome, LoadOne, Leased)):
        renewal = renew(rt, effect) if isinstance(effect, Leased) else None
        try:
            return running.loads.run(effect.load if isinstance(effect, Leased) else effect), None
        except BaseException as exc:
            return None, exc
        finally:
            if renewal is not None:
                renewal.stop()
    return running.locally(effect)


def _one(effect: Each, entry: tuple[int, str, Any], rt: SyncRuntime, loads: Loads) -> Any:
    position, key, raw = entry
    served, _, joined = serve(effect.plan, key, rt, loads.at(position), raw)
    return served, joined


def _release_all(rt: SyncRuntime, holds: list[Hold]) -> None:
    """Every Hold's releases, however each ends: what Redis did not take goes to the
    outbox, and an interrupt (a signal handler's exception) is raised only once
    every Hold has been released or handed over."""
    interrupt: BaseException | None = None
    for hold in holds:
        try:
            if len(hold.releases) == 1:
                replies: list[object] = [send(rt, hold.releases[0])[1]]
            else:
                replies = send_batch(rt, Batch(list(hold.releases)))
        except BaseException as exc:
            interrupt = interrupt or exc
            replies = [exc] * len(hold.releases)
        queue_refused(rt, hold, replies)
    if interrupt is not None:
        raise interrupt


def _background(effect: Spawn, rt: SyncRuntime, loads: Loads) -> None:
    ok = False
    try:
        flight = rt.flights.behind(effect.key)
        if flight is None:  # fn.refresh() is reloading the key already
            ok = True
            return
        with flight:
            ok = run(effect.flow, rt, loads, no_seal)[0] is not False
    except BaseException:  # a thread has nobody to raise to
        logger.warning("background work on %r failed", effect.key, exc_info=True)
    finally:
        rt.background.finish(effect.key, ok)


# -- async --------------------------------------------------------------------------


async def aserve(
    plan: Plan, key: str, rt: AsyncRuntime, loads: Loads | Call, raw: object = UNREAD
) -> tuple[Served, float, bool]:
    """Serve one call from a task: the lookup (unless `raw` is its reply already,
    or another task of this event loop misses the key now), then, on a miss, the miss
    flow shared with the tasks of this loop that miss the same key. Returns the
    answer, the seconds spent on Redis, and whether it was shared. As serve() for
    threads: a lookup is never shared, as its reply may predate a caller that joined
    after it went out (an invalidation completed in between)."""
    if not rt.ready:
        unreached = await rt.prepare()
        if unreached is not None and raw is UNREAD:
            raw = unreached  # the cluster was not reached: what a failed lookup is
    pending = rt.outbox.active and rt.outbox.blocks(key)
    step = FIRST_STEPS[pending][False][raw is not UNREAD or key in rt.flights.active]
    if step is LOADER:
        return (*(await arun(bypass(plan, key), rt, as_loads(plan, loads), no_seal)), False)
    seconds = 0.0
    while True:
        if step is LOOK:
            started = perf_counter()
            if plan.tags:
                raw = await _alook(plan, key, rt, loads)
            else:  # the hit path: one coroutine fewer
                raw, failure = await asend(rt, lookup(plan, key))
                if failure is not None:
                    raw = as_reply(failure)
            seconds += perf_counter() - started
            hit = on_lookup(plan, raw)
            if hit is not None:
                return hit, seconds, False
        shared = await rt.flights.run(
            key, plan.patience, _amiss, plan, key, rt, raw, as_loads(plan, loads)
        )
        if shared is not None:
            (served, more), joined = shared
            return served, seconds + more, joined
        step = LOOK  # the flight's answer was not ours to take: look for ourselves


async def _alook(plan: Plan, key: str, rt: AsyncRuntime, loads: Loads | Call) -> object:
    """As _look, from a task."""
    if plan.tags:
        return read_stamped(plan, await send_batch_async(rt, tagged_lookup(plan, key, loads)))
    raw, failure = await asend(rt, lookup(plan, key))
    return raw if failure is None else as_reply(failure)


async def _amiss(
    plan: Plan, key: str, rt: AsyncRuntime, raw: object, loads: Loads, seal: Seal
) -> tuple[Served, float]:
    """As _miss, from a task."""
    seconds = 0.0
    refresh = rt.flights.refreshing(key)
    if on_miss(refresh is not None, raw is not UNREAD and served_aged(plan, raw)) is WAIT:
        assert refresh is not None
        await rt.flights.wait_for(refresh, plan.patience)
        started = perf_counter()
        raw = await _alook(plan, key, rt, loads)  # tagged: with its versions, as the first look
        seconds = perf_counter() - started
        hit = on_lookup(plan, raw)
        if hit is not None:
            return hit, seconds
    flow = after_miss(plan, key, None if raw is UNREAD else raw, rt.block_limit_ms)
    served, more = await arun(flow, rt, loads, seal, prepared=True)
    return served, seconds + more


async def arun(
    flow: Flow[T], rt: AsyncRuntime, loads: Loads, seal: Seal, *, prepared: bool = False
) -> tuple[T, float]:
    """Run a flow to its end; returns its result and the seconds spent on Redis.

    As run(), every Hold standing when the flow ends is released here, a cancelled
    task's too: the release runs in a task of its own, shielded from a second
    cancellation. `prepared`: aserve tried to reach the cluster for this call already.
    """
    if not rt.ready and not prepared:
        await rt.prepare()
    running = Running(rt, rt.flights, loads, seal)
    reply: Any = None
    failure: BaseException | None = None
    ended: BaseException | None = None
    try:
        while True:
            try:
                effect = flow.send(reply) if failure is None else flow.throw(failure)
            except StopIteration as stop:
                return stop.value, running.seconds
            reply, failure = await _aperform(effect, rt, running)
    except BaseException as exc:
        ended = exc
        raise
    finally:
        try:
            if running.holds:
                await asyncio.shield(_release_in_task(rt, running.holds))
        finally:
            running.end(ended)


async def _aperform(effect: Effect, rt: AsyncRuntime, running: Running) -> Done:
    """One effect, with the I/O of tasks; the rest is Running's."""
    if isinstance(effect, (Command, RunScript, Batch)):
        started = perf_counter()
        if isinstance(effect, Batch):
            done: Done = (await send_batch_async(rt, effect), None)
        else:
            done = await asend(rt, effect)
        running.seconds += perf_counter() - started
        return done
    if isinstance(effect, Scan):
        try:
            return await scan_async(rt, effect), None
        except rt.failures as exc:
            return None, rt.failure(exc)
    if isinstance(effect, Each):
        return await _aeach(effect, rt, running.loads), None
    if isinstance(effect, Spawn):
        if rt.background.claim(effect.key):
            rt.keep(_abackground(effect, rt, running.loads))
        return None, None
    if effect is Signal.LOAD or isinstance(effect, (LoadSome, LoadOne, Leased)):
        renewal = arenew(rt, effect) if isinstance(effect, Leased) else None
        try:
            return await running.loads.arun(
                effect.load if isinstance(effect, Leased) else effect
            ), None
        except BaseException as exc:
            return None, exc
        finally:
            if renewal is not None:
                renewal.stop()
    return running.locally(effect)


async def _aeach(effect: Each, rt: AsyncRuntime, loads: Loads) -> list[Any]:
    at_once = asyncio.Semaphore(effect.at_once)

    async def one(entry: tuple[int, str, Any]) -> Any:
        async with at_once:
            position, key, raw = entry
            served, _, joined = await aserve(effect.plan, key, rt, loads.at(position), raw)
            return served, joined

    # All finish before one's error is raised: none keeps loading for a caller gone.
    answers = await asyncio.gather(*map(one, effect.entries), return_exceptions=True)
    for answer in answers:
        if isinstance(answer, BaseException):
            raise answer
    return answers


def _release_in_task(rt: AsyncRuntime, holds: list[Hold]) -> asyncio.Task[None]:
    """The releases, in a task of their own; whatever it has not settled when it ends
    (cancelled before it ran, say, as its loop shut down) goes to the outbox."""
    unsettled = list(holds)
    task = rt.keep(_arelease(rt, unsettled))

    def hand_over_the_rest(_: asyncio.Task[None]) -> None:
        for hold in unsettled:
            queue_refused(rt, hold, [ConnectionError("never sent")] * len(hold.releases))

    task.add_done_callback(hand_over_the_rest)
    return task


async def _arelease(rt: AsyncRuntime, unsettled: list[Hold]) -> None:
    while unsettled:
        hold = unsettled[0]
        if len(hold.releases) == 1:
            replies: list[object] = [(await asend(rt, hold.releases[0]))[1]]
        else:
            replies = await send_batch_async(rt, Batch(list(hold.releases)))
        unsettled.pop(0)
        queue_refused(rt, hold, replies)


async def _abackground(effect: Spawn, rt: AsyncRuntime, loads: Loads) -> None:
    ok = False
    try:
        flight = rt.flights.behind(effect.key)
        if flight is None:  # fn.refresh() is reloading the key already
            ok = True
            return
        with flight:
            ok = (await arun(effect.flow, rt, loads, no_seal))[0] is not False
    except Exception:
        logger.warning("background work on %r failed", effect.key, exc_info=True)
    finally:
        rt.background.finish(effect.key, ok)
