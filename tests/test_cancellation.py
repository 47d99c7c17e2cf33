"""Timeouts and cancellations at any moment give back every lock, waiter set and wake-up list
they took: no key is left stuck."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from cached_aside import (
    CacheEngine,
    Source,
    cache_aside,
)

from .conftest import (
    REDIS_URL,
    delete_prefix,
    unique_prefix,
)
from .injection import Injector, faulty_clients


def leftovers(raw: Any, prefix: str) -> list[str]:
    """Locks, waiter sets and wake-up lists under a prefix: none may outlive a call."""
    found = []
    for suffix in (":lock", ":waiters", ":wake:*"):
        found += [key.decode() for key in raw.scan_iter(match=f"{prefix}:*{suffix}")]
    return found


async def test_timed_out_requests_leave_no_key_stuck(engine: CacheEngine, clients: Any) -> None:
    """800 requests under asyncio.wait_for, many cancelled while the lock script is
    in flight: every lock is given back, and every key is served at once after."""
    rng = random.Random(12)

    @cache_aside(key="slow:<id>", ttl=30, engine=engine)
    async def slow(id: str) -> str:
        await asyncio.sleep(rng.uniform(0.01, 0.03))
        return id

    async def request(number: int) -> str | None:
        await asyncio.sleep(rng.uniform(0, 0.2))  # arrivals spread over 200 ms
        try:
            return await asyncio.wait_for(slow(f"k{number % 40}"), rng.uniform(0.0002, 0.025))
        except asyncio.TimeoutError:
            return None

    await slow.invalidate("warm-up")  # connections made before the storm
    answers = await asyncio.gather(*(request(n) for n in range(800)))
    assert answers.count(None) > 100  # many were cancelled mid-call
    assert all(a == f"k{n % 40}" for n, a in enumerate(answers) if a is not None)
    assert await engine.asettle()  # releases run shielded, in tasks of their own
    assert leftovers(clients[2], engine.prefix) == []
    slow.reset_stats()
    for number in range(40):
        assert (await slow.lookup(f"k{number}")).source in (Source.CACHE, Source.LOADER)
    assert slow.stats().lock_waits == 0


@pytest.mark.parametrize("moment", ["ACQUIRE", "load", "STORE"])
async def test_a_task_cancelled_at_any_moment_gives_everything_back(
    backend: str, moment: str
) -> None:
    """A real task.cancel() (what asyncio.wait_for does on a timeout) landing while
    the lock script's reply is on its way (Redis granted the lock), while the loader
    runs, or while the store's reply is on its way."""
    injector = Injector(mode="async")
    sync, asynchronous, raw = faulty_clients(backend, REDIS_URL, injector)
    engine = CacheEngine(sync, asynchronous, prefix=unique_prefix())
    loading, never = asyncio.Event(), asyncio.Event()

    @cache_aside(key="cancel:<id>", ttl=30, engine=engine)
    async def get(id: str) -> str:
        if moment == "load" and not loading.is_set():
            loading.set()
            await never.wait()
        return id

    injector.hold_after = moment
    injector.armed = True
    call = asyncio.create_task(get("k"))
    await (loading if moment == "load" else injector.reached).wait()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    injector.armed = False
    assert leftovers(raw, engine.prefix) == []  # released before the cancel completed
    assert (await get.lookup("k")).source in (Source.LOADER, Source.CACHE)
    assert get.stats().lock_waits == 0
    await engine.aclose()
    delete_prefix(raw, engine.prefix)
    raw.close()
    sync.close()
    await asynchronous.aclose()
