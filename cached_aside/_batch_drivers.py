"""Serving many() calls: one pipelined lookup for every entry, then the misses either
through the batch loader (batches.load_batch, one primary query) or one by one
through the single-call path, shared with this process's other callers of the
same key. Sync and async twins, side by side.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from time import perf_counter
from typing import Any

from ._batches import align, load_batch, lookups
from ._drivers import (
    miss_async,
    miss_sync,
    no_seal,
    run_async,
    run_sync,
    serve_sync,
    timed_load,
    timed_load_async,
)
from ._flows import Plan, Served, after_miss, bypass, on_lookup, refresh_due
from ._pipelines import send_batch_async, send_batch_sync

# Misses of one async many() call loaded at once without a batch loader: enough to
# overlap loads, few enough not to drain the connection pool or flood the primary.
MAX_CONCURRENT_MISSES = 32
# (answer, whether it was shared with another caller of this process)
Answer = tuple[Served, bool]
BatchLoader = Callable[[list[Any]], Any]


def _batch_load(
    plan: Plan, batch_loader: BatchLoader, items: Sequence[Any]
) -> Callable[[Sequence[int]], list[Any]]:
    def load(positions: Sequence[int]) -> list[Any]:
        chosen = [items[p] for p in positions]
        started = perf_counter()
        try:
            returned = batch_loader(chosen)
        finally:
            plan.stats.loaded_in(perf_counter() - started)
        return align(plan.name, chosen, returned)

    return load


def _batch_load_async(
    plan: Plan, batch_loader: BatchLoader, items: Sequence[Any]
) -> Callable[[Sequence[int]], Awaitable[list[Any]]]:
    async def load(positions: Sequence[int]) -> list[Any]:
        chosen = [items[p] for p in positions]
        started = perf_counter()
        try:
            returned = await batch_loader(chosen)
        finally:
            plan.stats.loaded_in(perf_counter() - started)
        return align(plan.name, chosen, returned)

    return load


def _blocked(side: Any, keys: Sequence[str]) -> set[int]:
    """Positions whose invalidation still waits in the outbox: served by the loader."""
    outbox = side.outbox
    if not outbox.active:
        return set()
    return {position for position, key in enumerate(keys) if outbox.blocks(key)}


def _judge(
    plan: Plan, raws: list[Any], batch_loader: BatchLoader | None, blocked: set[int]
) -> tuple[list[Answer | None], list[int], list[int]]:
    """Hits answered; the positions for the batch loader; those for the single path."""
    answers: list[Answer | None] = []
    batched: list[int] = []
    single: list[int] = []
    for position, raw in enumerate(raws):
        if position in blocked:
            answers.append(None)
            single.append(position)
            continue
        hit = on_lookup(plan, raw)
        answers.append(None if hit is None else (hit, False))
        if hit is None:
            # refresh_ahead entries are served from cache and reloaded in the background
            # by the single path, which knows how.
            due = refresh_due(plan, raw)
            (batched if batch_loader is not None and not due else single).append(position)
    return answers, batched, single


def serve_many_sync(
    plan: Plan,
    keys: Sequence[str],
    side: Any,
    loader: Callable[..., Any],
    calls: Sequence[tuple[Any, ...]],
    items: Sequence[Any],
    batch_loader: BatchLoader | None,
) -> list[Answer]:
    """Serve distinct keys; `calls` holds each key's loader arguments, `items` what
    the user passed for it (the batch loader receives those)."""
    raws = send_batch_sync(side, lookups(plan, keys))
    blocked = _blocked(side, keys)
    answers, batched, single = _judge(plan, raws, batch_loader, blocked)
    if batched and batch_loader is not None:
        flow = load_batch(
            plan, [keys[i] for i in batched], [raws[i] for i in batched], side.block_limit_ms
        )
        load_many = _batch_load(plan, batch_loader, [items[i] for i in batched])
        served, _ = run_sync(flow, side, load_many, no_seal)
        for position, answer in zip(batched, served, strict=True):
            answers[position] = (answer, False)
    for position in single:
        key, raw, args = keys[position], raws[position], calls[position]
        load = timed_load(plan, loader, args, {})
        if position in blocked:
            answers[position] = (run_sync(bypass(plan, key), side, load, no_seal)[0], False)
            continue
        if refresh_due(plan, raw):
            refresh = after_miss(plan, key, raw, side.block_limit_ms)
            answers[position] = (run_sync(refresh, side, load, no_seal)[0], False)
            continue
        shared = side.flights.run(key, plan.patience, miss_sync, plan, key, side, raw, load)
        if shared is None:  # the flight's answer was not ours to take: the whole path
            single_answer, _, joined = serve_sync(plan, key, side, loader, args, {})
            answers[position] = (single_answer, joined)
        else:
            (single_answer, _), joined = shared
            answers[position] = (single_answer, joined)
    return _complete(answers)


async def serve_many_async(
    plan: Plan,
    keys: Sequence[str],
    side: Any,
    loader: Callable[..., Any],
    calls: Sequence[tuple[Any, ...]],
    items: Sequence[Any],
    batch_loader: BatchLoader | None,
) -> list[Answer]:
    """As serve_many_sync; the single-path misses run concurrently."""
    if not side.ready:
        await side.prepare()
    raws = await send_batch_async(side, lookups(plan, keys))
    blocked = _blocked(side, keys)
    answers, batched, single = _judge(plan, raws, batch_loader, blocked)
    if batched and batch_loader is not None:
        flow = load_batch(
            plan, [keys[i] for i in batched], [raws[i] for i in batched], side.block_limit_ms
        )
        load_many = _batch_load_async(plan, batch_loader, [items[i] for i in batched])
        served, _ = await run_async(flow, side, load_many, no_seal)
        for position, answer in zip(batched, served, strict=True):
            answers[position] = (answer, False)

    bound = asyncio.Semaphore(MAX_CONCURRENT_MISSES)

    async def one(position: int) -> Answer:
        async with bound:
            return await single_miss(position)

    async def single_miss(position: int) -> Answer:
        key, raw, args = keys[position], raws[position], calls[position]
        load = timed_load_async(plan, loader, args, {})
        if position in blocked:
            return (await run_async(bypass(plan, key), side, load, no_seal))[0], False
        if refresh_due(plan, raw):
            flow = after_miss(plan, key, raw, side.block_limit_ms)
            return (await run_async(flow, side, load, no_seal))[0], False
        (answer, _), joined = await side.flights.run(
            key, plan.patience, miss_async, plan, key, side, raw, load
        )
        return answer, joined

    if single:
        for position, joined_answer in zip(
            single, await asyncio.gather(*(one(p) for p in single)), strict=True
        ):
            answers[position] = joined_answer
    return _complete(answers)


def _complete(answers: list[Answer | None]) -> list[Answer]:
    done = [answer for answer in answers if answer is not None]
    assert len(done) == len(answers), "every entry of many() is answered"
    return done
