"""The drivers: run flows against real clients, the sync ones with redis.Redis and
threads, the async ones with redis.asyncio and tasks. They perform effects and
decide nothing; the algorithm lives in _flows.py and _batches.py. Twins on purpose,
kept side by side so that their symmetry shows; what they share (the effects that
need no I/O, what a failed release becomes) is written once below them.

serve/aserve send a call's lookup themselves, because a hit is the hot path and a
generator round costs about a microsecond there; flows.on_lookup still decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from time import perf_counter
from typing import Any, Final, TypeVar

from redis.exceptions import NoScriptError

from ._effects import (
    UNREAD,
    Batch,
    Command,
    CommandFailed,
    Each,
    Effect,
    Flow,
    Free,
    Hold,
    Land,
    Lead,
    Leased,
    LoadOne,
    LoadSome,
    Postpone,
    RunScript,
    Scan,
    Signal,
    Spawn,
    TagsOf,
)
from ._flights import Led
from ._flows import Plan, Served, after_miss, bypass, on_lookup, served_aged
from ._leases import arenew, renew
from ._loads import Loads
from ._pipelines import key_of, scan, scan_async, send_batch, send_batch_async, wire_args
from ._runtime import AsyncRuntime, Runtime, SyncRuntime
from ._scripts import peek_call
from ._stamps import read_stamped, version_reads

T = TypeVar("T")
logger = logging.getLogger("cached_aside")
LOOK: Final[Any] = UNREAD  # serve()'s raw when the lookup is still to be sent
# A single call's loader, arguments and keyword arguments: made into Loads on a miss
# only, so a hit does not pay for them.
Call = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]
Seal = Callable[[], None]  # stops later callers of this process joining the flow


def no_seal() -> None:
    """The seal of a flow nobody can join (background work, writes)."""


def lookup(plan: Plan, key: str) -> Command | RunScript:
    """The effect that looks an entry up: its read command, or PEEK (value and ttl)."""
    if plan.peek:
        return peek_call(key, redis_type=plan.codec.redis_type)
    return Command((plan.codec.read_command, key))


def tagged_lookup(plan: Plan, key: str, loads: Loads | Call) -> Batch:
    """A tagged function's lookup: the entry, then its tags' versions, in one
    pipeline (read_stamped judges the replies)."""
    if type(loads) is Loads:
        texts = loads.tags(Signal.LOAD)
    else:
        _, args, kwargs = loads  # type: ignore[misc]
        texts = tuple(tag.render_tag(args, kwargs) for tag in plan.tags)
    return Batch([lookup(plan, key), *version_reads(key, texts)])


# -- sync ---------------------------------------------------------------------------


def serve(
    plan: Plan, key: str, rt: SyncRuntime, loads: Loads | Call, raw: object = LOOK
) -> tuple[Served, float, bool]:
    """Serve one call from a thread: the lookup (unless `raw` is its reply already),
    then, on a miss, the miss flow shared with the other threads of this process
    that miss the same key. Returns the answer, the seconds spent on Redis, and
    whether it was shared. A Call is made into Loads only on a miss."""
    if rt.outbox.active and rt.outbox.blocks(key):
        return (*run(bypass(plan, key), rt, _loads(plan, loads), no_seal), False)
    seconds = 0.0
    look = raw is LOOK and key not in rt.flights.active  # else: join the thread loading it
    while True:
        if look:
            started = perf_counter()
            if plan.tags:
                raw = read_stamped(plan, send_batch(rt, tagged_lookup(plan, key, loads)))
            else:
                raw, failure = send(rt, lookup(plan, key))
                if failure is not None:
                    raw = _as_reply(failure)
            seconds += perf_counter() - started
            hit = on_lookup(plan, raw)
            if hit is not None:
                return hit, seconds, False
        shared = rt.flights.run(key, plan.patience, _miss, plan, key, rt, raw, _loads(plan, loads))
        if shared is not None:
            (served, more), joined = shared
            return served, seconds + more, joined
        look = True  # the flight's answer was not ours to take: look for ourselves


def _miss(
    plan: Plan, key: str, rt: SyncRuntime, raw: object, loads: Loads, seal: Seal
) -> tuple[Served, float]:
    seconds = 0.0
    refresh = rt.flights.refreshing(key)
    if refresh is not None and (raw is LOOK or not served_aged(plan, raw)):
        # An fn.refresh() of this process is loading the key: its result, not a load
        # beside it (the refresh revoked the lock it would take).
        rt.flights.wait_for(refresh, plan.patience)
        started = perf_counter()
        raw, failure = send(rt, lookup(plan, key))
        seconds = perf_counter() - started
        if failure is not None:
            raw = _as_reply(failure)
        hit = on_lookup(plan, raw)
        if hit is not None:
            return hit, seconds
    flow = after_miss(plan, key, None if raw is LOOK else raw, rt.block_limit_ms)
    served, more = run(flow, rt, loads, seal)
    return served, seconds + more


def run(flow: Flow[T], rt: SyncRuntime, loads: Loads, seal: Seal) -> tuple[T, float]:
    """Run a flow to its end; returns its result and the seconds spent on Redis.

    Every Hold still standing when the flow ends, however it ends, is released here:
    the one place that guarantees no lock outlives its flow.
    """
    redis_seconds = 0.0
    reply: Any = None
    failure: BaseException | None = None
    holds: list[Hold] = []
    led: Led | None = None  # the flights of a batch's keys, led by this flow
    ended: BaseException | None = None
    try:
        while True:
            try:
                effect = flow.send(reply) if failure is None else flow.throw(failure)
            except StopIteration as stop:
                return stop.value, redis_seconds
            reply = failure = None
            kind = type(effect)
            started = perf_counter()
            if kind is Command or kind is RunScript:
                reply, failure = send(rt, effect)  # type: ignore[arg-type]
            elif kind is Batch:
                reply = send_batch(rt, effect)  # type: ignore[arg-type]
            elif kind is Scan:
                try:
                    reply = scan(rt, effect)  # type: ignore[arg-type]
                except rt.failures as exc:
                    failure = rt.failure(exc)
            elif kind is Each:
                reply = _each(effect, rt, loads)  # type: ignore[arg-type]
            elif kind is Spawn:
                if rt.background.claim(effect.key):  # type: ignore[union-attr]
                    spawned = threading.Thread(target=_background, args=(effect, rt, loads))
                    spawned.daemon = True
                    spawned.start()
            elif effect is Signal.LOAD or kind is LoadSome or kind is LoadOne:
                try:
                    reply = loads.run(effect)  # type: ignore[arg-type]
                except BaseException as exc:
                    failure = exc
            elif kind is Leased:
                renewal = renew(rt, effect)  # type: ignore[arg-type]
                try:
                    reply = loads.run(effect.load)  # type: ignore[union-attr]
                except BaseException as exc:
                    failure = exc
                finally:
                    renewal.stop()
            elif kind is TagsOf:
                try:
                    reply = loads.tags(effect.load)  # type: ignore[union-attr]
                except Exception as exc:  # an argument that cannot be rendered
                    failure = exc
            elif kind is Lead or kind is Land:
                led = led or Led(rt.flights)
                reply = _fly(effect, led)  # type: ignore[arg-type]
            else:
                if effect is Signal.SEAL and led is not None:
                    led.seal()
                _perform_locally(effect, rt, holds, seal)
            if kind is Command or kind is RunScript or kind is Batch:
                redis_seconds += perf_counter() - started
    except BaseException as exc:
        ended = exc
        raise
    finally:
        try:
            if holds:
                _release_all(rt, holds)
        finally:
            if led is not None:
                led.end(ended)


def send(rt: SyncRuntime, effect: Command | RunScript) -> tuple[object, BaseException | None]:
    """One command or script through the breaker; returns the reply or the failure
    (a CommandFailed, or an interrupt, which the flow gets to release its Holds)."""
    if rt.breaker.open_until:  # one attribute read while all is well
        refused = rt.refusal(1, key_of(effect))
        if refused is not None:
            return None, refused[0]
    try:
        answered = False
        held = rt.held
        if held is not None and (type(effect) is RunScript or not effect.blocks):  # type: ignore[union-attr]
            with contextlib.suppress(NoScriptError):  # the client's Script loads it
                answered, reply = held.call(wire_args(rt, effect))
        if not answered:
            reply = _through_client(rt, effect)
    except rt.failures as exc:
        return None, rt.failure(exc, key_of(effect))
    except BaseException as exc:
        return None, exc
    if rt.breaker.failures:
        rt.answered(key_of(effect))
    return reply, None


def _through_client(rt: SyncRuntime, effect: Command | RunScript) -> object:
    if type(effect) is Command:
        return rt.client.execute_command(*effect.args)
    return rt.scripts[effect.script](keys=effect.keys, args=effect.args)  # type: ignore[union-attr]


def _each(effect: Each, rt: SyncRuntime, loads: Loads) -> list[tuple[Served, bool]]:
    answers = []
    for position, key, raw in effect.entries:
        served, _, joined = serve(effect.plan, key, rt, loads.at(position), raw)
        answers.append((served, joined))
    return answers


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
        _queue_refused(rt, hold, replies)
    if interrupt is not None:
        raise interrupt


def _background(effect: Spawn, rt: SyncRuntime, loads: Loads) -> None:
    ok = False
    try:
        flight = rt.flights.behind(effect.key)
        if flight is None:  # fn.refresh() is reloading the key already
            ok = True
            return
        with flight.leading():
            ok = run(effect.flow, rt, loads, no_seal)[0] is not False
    except BaseException:  # a thread has nobody to raise to
        logger.warning("background work on %r failed", effect.key, exc_info=True)
    finally:
        rt.background.finish(effect.key, ok)


# -- async --------------------------------------------------------------------------


async def aserve(
    plan: Plan, key: str, rt: AsyncRuntime, loads: Loads | Call, raw: object = LOOK
) -> tuple[Served, float, bool]:
    """Serve one call from a task: the lookup (unless `raw` is its reply already)
    and, on a miss, the miss flow, both shared with the tasks of this event loop
    that ask for the same key. Returns the answer, the seconds spent on Redis, and
    whether it was shared."""
    if not rt.ready:
        unreached = await rt.prepare()
        if unreached is not None and raw is LOOK:
            raw = unreached  # the cluster was not reached: what a failed lookup is
    if rt.outbox.active and rt.outbox.blocks(key):
        return (*(await arun(bypass(plan, key), rt, _loads(plan, loads), no_seal)), False)
    (served, seconds), joined = await rt.flights.run(
        key, plan.patience, _aread, plan, key, rt, raw, loads
    )
    return served, seconds, joined


async def _aread(
    plan: Plan, key: str, rt: AsyncRuntime, raw: object, loads: Loads | Call, seal: Seal
) -> tuple[Served, float]:
    seconds = 0.0
    if raw is LOOK:
        started = perf_counter()
        if plan.tags:
            batch = tagged_lookup(plan, key, loads)
            raw = read_stamped(plan, await send_batch_async(rt, batch))
        else:
            raw, failure = await asend(rt, lookup(plan, key))
            if failure is not None:
                raw = _as_reply(failure)
        seconds = perf_counter() - started
        hit = on_lookup(plan, raw)
        if hit is not None:
            return hit, seconds
    refresh = rt.flights.refreshing(key)
    if refresh is not None and not served_aged(plan, raw):
        # As in _miss: wait for this loop's fn.refresh() of the key, then look again.
        await rt.flights.wait_for(refresh, plan.patience)
        started = perf_counter()
        raw, failure = await asend(rt, lookup(plan, key))
        seconds += perf_counter() - started
        if failure is not None:
            raw = _as_reply(failure)
        hit = on_lookup(plan, raw)
        if hit is not None:
            return hit, seconds
    flow = after_miss(plan, key, raw, rt.block_limit_ms)
    served, more = await arun(flow, rt, _loads(plan, loads), seal, prepared=True)
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
    redis_seconds = 0.0
    reply: Any = None
    failure: BaseException | None = None
    holds: list[Hold] = []
    led: Led | None = None  # the flights of a batch's keys, led by this flow
    ended: BaseException | None = None
    try:
        while True:
            try:
                effect = flow.send(reply) if failure is None else flow.throw(failure)
            except StopIteration as stop:
                return stop.value, redis_seconds
            reply = failure = None
            kind = type(effect)
            started = perf_counter()
            if kind is Command or kind is RunScript:
                reply, failure = await asend(rt, effect)  # type: ignore[arg-type]
            elif kind is Batch:
                reply = await send_batch_async(rt, effect)  # type: ignore[arg-type]
            elif kind is Scan:
                try:
                    reply = await scan_async(rt, effect)  # type: ignore[arg-type]
                except rt.failures as exc:
                    failure = rt.failure(exc)
            elif kind is Each:
                reply = await _aeach(effect, rt, loads)  # type: ignore[arg-type]
            elif kind is Spawn:
                if rt.background.claim(effect.key):  # type: ignore[union-attr]
                    rt.keep(_abackground(effect, rt, loads))  # type: ignore[arg-type]
            elif effect is Signal.LOAD or kind is LoadSome or kind is LoadOne:
                try:
                    reply = await loads.arun(effect)  # type: ignore[arg-type]
                except BaseException as exc:
                    failure = exc
            elif kind is Leased:
                arenewal = arenew(rt, effect)  # type: ignore[arg-type]
                try:
                    reply = await loads.arun(effect.load)  # type: ignore[union-attr]
                except BaseException as exc:
                    failure = exc
                finally:
                    arenewal.stop()
            elif kind is TagsOf:
                try:
                    reply = loads.tags(effect.load)  # type: ignore[union-attr]
                except Exception as exc:  # an argument that cannot be rendered
                    failure = exc
            elif kind is Lead or kind is Land:
                led = led or Led(rt.flights)
                reply = _fly(effect, led)  # type: ignore[arg-type]
            else:
                if effect is Signal.SEAL and led is not None:
                    led.seal()
                _perform_locally(effect, rt, holds, seal)
            if kind is Command or kind is RunScript or kind is Batch:
                redis_seconds += perf_counter() - started
    except BaseException as exc:
        ended = exc
        raise
    finally:
        try:
            if holds:
                await asyncio.shield(_release_in_task(rt, holds))
        finally:
            if led is not None:
                led.end(ended)


async def asend(
    rt: AsyncRuntime, effect: Command | RunScript
) -> tuple[object, BaseException | None]:
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
    if type(effect) is Command:
        return await rt.client.execute_command(*effect.args)
    return await rt.scripts[effect.script](keys=effect.keys, args=effect.args)  # type: ignore[union-attr]


async def _aeach(effect: Each, rt: AsyncRuntime, loads: Loads) -> list[tuple[Served, bool]]:
    at_once = asyncio.Semaphore(effect.at_once)

    async def one(position: int, key: str, raw: object) -> tuple[Served, bool]:
        async with at_once:
            served, _, joined = await aserve(effect.plan, key, rt, loads.at(position), raw)
            return served, joined

    # All finish before one's error is raised: none keeps loading for a caller gone.
    answers = await asyncio.gather(
        *(one(*entry) for entry in effect.entries), return_exceptions=True
    )
    for answer in answers:
        if isinstance(answer, BaseException):
            raise answer
    return answers  # type: ignore[return-value]


def _release_in_task(rt: AsyncRuntime, holds: list[Hold]) -> asyncio.Task[None]:
    """The releases, in a task of their own; whatever it has not settled when it ends
    (cancelled before it ran, say, as its loop shut down) goes to the outbox."""
    unsettled = list(holds)
    task = rt.keep(_arelease(rt, unsettled))

    def hand_over_the_rest(_: asyncio.Task[None]) -> None:
        for hold in unsettled:
            _queue_refused(rt, hold, [ConnectionError("never sent")] * len(hold.releases))

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
        _queue_refused(rt, hold, replies)


async def _abackground(effect: Spawn, rt: AsyncRuntime, loads: Loads) -> None:
    ok = False
    try:
        flight = rt.flights.behind(effect.key)
        if flight is None:  # fn.refresh() is reloading the key already
            ok = True
            return
        with flight.leading():
            ok = (await arun(effect.flow, rt, loads, no_seal))[0] is not False
    except Exception:
        logger.warning("background work on %r failed", effect.key, exc_info=True)
    finally:
        rt.background.finish(effect.key, ok)


# -- shared by both -----------------------------------------------------------------


def _perform_locally(effect: Effect, rt: Runtime, holds: list[Hold], seal: Seal) -> None:
    """The effects that need no I/O: the same for both drivers."""
    if effect is Signal.SEAL:
        seal()
    elif type(effect) is Hold:
        holds.append(effect)
    elif type(effect) is Free:
        holds.remove(effect.hold)
    elif type(effect) is Postpone:
        rt.outbox.add(effect.items)
    else:
        raise AssertionError(f"no driver performs {effect!r}")


def _fly(effect: Lead | Land, led: Led) -> tuple[bool, ...] | None:
    """A batch's flights in this process: lead them (Lead), or end some (Land)."""
    if type(effect) is Lead:
        return led.lead(effect.keys)
    led.land(effect.outcomes)  # type: ignore[union-attr]
    return None


def _queue_refused(rt: Runtime, hold: Hold, replies: Sequence[object]) -> None:
    """Hand the releases Redis did not take to the outbox, which retries them."""
    for release, reply in zip(hold.releases, replies, strict=True):
        if isinstance(reply, BaseException):
            rt.outbox.add_release(release, hold.ttl_ms)


def _loads(plan: Plan, loads: Loads | Call) -> Loads:
    if type(loads) is Loads:
        return loads
    loader, args, kwargs = loads  # type: ignore[misc]
    return Loads(plan, loader, (args,), kwargs)


def _as_reply(failure: BaseException) -> CommandFailed:
    """A lookup's failure as the reply the flows judge; an interrupt propagates."""
    if type(failure) is not CommandFailed:
        raise failure
    return failure
