"""Races and forks an adversarial review found, each pinned by a test that failed
before its fix: releases lost with their event loop, batches holding a refused
lock while they wait on other entries, invalidations swallowed by a delivery in
flight, stale values served around a pending invalidation, hangs and forks."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from typing import Any

import pytest
import redis
import redis.asyncio

from cached_aside import (
    CacheEngine,
    NearCache,
    Outcome,
    Source,
    _defaults,
    cache_aside,
)
from cached_aside._outbox import Outbox, PendingKey, PendingPattern

from .conftest import (
    PATIENCE,
    REDIS_URL,
    delete_prefix,
    eventually,
    needs_real_redis,
    unique_prefix,
    wait_until,
)
from .servers import RedisProcess

DOWN = "redis://127.0.0.1:1/0"


def pattern(start: str) -> PendingPattern:
    return PendingPattern(start, start + "*", lambda key: key.startswith(start), start)


def open_breaker(engine: CacheEngine) -> None:
    """As after a burst of Redis failures: calls skip Redis for a while."""
    for _ in range(engine.breaker.threshold):
        engine.breaker.failure()


# -- the outbox -----------------------------------------------------------------------


def test_what_is_queued_while_a_pattern_is_delivered_survives_its_landing() -> None:
    outbox = Outbox()
    outbox.start_flusher = lambda: None
    whole = pattern("c:{row:")
    outbox.add((whole,))
    delivery = outbox.take()  # the SCAN of c:{row:* is under way...
    outbox.add((PendingKey("c:{row:7}", 1000, whole),))  # ...the scan may be past it
    outbox.landed(delivery)
    assert outbox.pending() == ["c:{row:7}"]
    outbox.landed(outbox.take())
    outbox.add((whole,))
    delivery = outbox.take()
    outbox.add((whole,))  # invalidate_all() failed again during the delivery
    outbox.landed(delivery)
    assert outbox.pending() == ["c:{row:*"]
    outbox.landed(outbox.take())
    assert outbox.pending() == []


def test_a_full_outbox_drops_the_release_whose_lock_expires_first() -> None:
    from cached_aside._effects import RunScript
    from cached_aside._scripts import ScriptName

    outbox = Outbox(limit=2)
    outbox.start_flusher = lambda: None
    long, short, newer = (
        RunScript(ScriptName.LEAVE, (f"k{n}:waiters", f"k{n}:wake:t"), ("t",)) for n in range(3)
    )
    outbox.add_release(long, 60_000)
    outbox.add_release(short, 100)
    outbox.add_release(newer, 60_000)
    assert [r.effect for r in outbox.peek().releases] == [long, newer]


def test_racing_adds_always_leave_a_flusher_to_deliver_them(engine: CacheEngine) -> None:
    """add() from many threads while the flusher takes and lands: nothing waits
    behind a flusher that gave up its turn on a stale read."""
    read = cache_aside(key="row:<id>", ttl=30, engine=engine)(lambda id: id)
    whole = read._every_key(engine)
    keys = [f"{engine.prefix}:{{row:{n}}}" for n in range(400)]

    def add(part: list[str]) -> None:
        for key in part:
            engine.outbox.add((PendingKey(key, 1000, whole),))

    threads = [threading.Thread(target=add, args=(keys[n::8],)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert engine.settle(5), engine.pending_invalidations()[:5]


# -- releases that must not be lost ---------------------------------------------------


@needs_real_redis
def test_a_release_still_pending_when_its_loop_ends_reaches_redis() -> None:
    """One event loop per request: the call is cancelled during its load and the
    handler returns; asyncio.run() cancels the release task before it ran. It goes to
    the outbox instead, and the next caller does not wait out lock_ttl."""
    assert REDIS_URL is not None
    engine = CacheEngine.from_url(REDIS_URL, prefix=unique_prefix())

    loading = threading.Event()

    @cache_aside(key="item:<id>", ttl=60, lock_ttl=30, engine=engine)
    async def get(id: str) -> str:
        loading.set()
        await asyncio.sleep(60)
        return id

    async def handler() -> None:
        task = asyncio.create_task(get("a"))
        assert await eventually(loading.is_set)  # it holds the lock and loads
        task.cancel()  # a timeout in the web handler
        await asyncio.sleep(0)  # its release task is created, not yet run

    asyncio.run(handler())
    assert engine.settle(PATIENCE)
    assert engine.client().exists(get.key("a") + ":lock") == 0
    other = cache_aside(key="item:<id>", ttl=60, lock_ttl=30, engine=engine)(lambda id: id)
    started = time.monotonic()
    assert other.lookup("a").source is Source.LOADER
    assert time.monotonic() - started < 10.0  # not the 30 s of lock_ttl
    delete_prefix(engine.client(), engine.prefix)
    engine.close()


@pytest.fixture
def small_server() -> Any:
    process = RedisProcess("--maxmemory-policy", "noeviction").start()
    yield process
    process.stop()


def test_a_batch_gives_back_a_refused_lock_before_it_waits_on_other_entries(
    small_server: RedisProcess,
) -> None:
    """many(['a', 'b']): 'a' is ours, 'b' is another process's slow load. The store of
    'a' is refused (out of memory for an instant); its lock goes back at once, not
    after this call has waited out 'b', so another caller of 'a' does not wait."""
    admin = small_server.admin()
    prefix = unique_prefix()
    mine, owner, third = (CacheEngine.from_url(small_server.url, prefix=prefix) for _ in range(3))
    waited: list[float] = []
    memory_back = threading.Event()

    def ask_for_a() -> None:
        started = time.monotonic()
        cache_aside(key="row:<id>", ttl=60, lock_ttl=3, engine=third)(lambda id: id)("a")
        waited.append(time.monotonic() - started)

    def batch(ids: list[str]) -> list[str]:
        admin.config_set("maxmemory", 1)  # the store that follows is refused

        def recover() -> None:
            time.sleep(0.05)
            admin.config_set("maxmemory", 0)
            memory_back.set()
            ask_for_a()

        threading.Thread(target=recover).start()
        return list(ids)

    row = cache_aside(key="row:<id>", ttl=60, lock_ttl=3, engine=mine, batch_loader=batch)(
        lambda id: id
    )
    slow = cache_aside(key="row:<id>", ttl=60, lock_ttl=3, engine=owner)(
        lambda id: time.sleep(10) or id
    )
    threading.Thread(target=slow, args=("b",), daemon=True).start()
    assert wait_until(lambda: admin.exists(slow.key("b") + ":lock"))  # b is loading
    assert row.many(["a", "b"]) == ["a", "b"]  # waited out b's lock (3 s)
    assert memory_back.is_set()
    assert wait_until(lambda: waited)
    # at once, not when this call's 3 s wait for b was over (a bound for a slow machine)
    assert waited[0] < 2.0, f"the caller of 'a' waited {waited[0]:.2f} s"
    for engine in (mine, owner, third):
        engine.close(timeout=0.1)


# -- never serve around a pending invalidation ---------------------------------------


@needs_real_redis
async def test_a_pending_invalidation_blocks_every_functions_near_tier() -> None:
    assert REDIS_URL is not None
    prefix = unique_prefix()
    engine = CacheEngine.from_url(REDIS_URL, prefix=prefix, near=NearCache(ttl=30))
    engine.outbox.start_flusher = lambda: None  # Redis stays out of reach for the outbox
    primary = {"a": "v1"}
    row = cache_aside(key="row:<id>", ttl=60, engine=engine)(lambda id: primary[id])

    @cache_aside(key="row:<id>", ttl=60, engine=engine)
    async def arow(id: str) -> str:
        return primary[id]

    assert row("a") == await arow("a") == "v1"
    deadline = time.monotonic() + PATIENCE  # our own store's report voids first fills
    while (await arow.lookup("a")).source is not Source.NEAR:
        assert time.monotonic() < deadline, "never served from the near cache"
    primary["a"] = "v2"
    open_breaker(engine)
    assert row.invalidate("a") is Outcome.PENDING
    result = await arow.lookup("a")  # the other function's near tier held v1
    assert (result.value, result.source) == ("v2", Source.LOADER)
    engine.breaker.success()
    delete_prefix(engine.client(), prefix)
    await engine.aclose()


@needs_real_redis
def test_many_never_serves_a_reply_read_while_its_key_was_blocked() -> None:
    assert REDIS_URL is not None
    engine = CacheEngine.from_url(REDIS_URL, prefix=unique_prefix())
    primary = {"x": "x-v1", "y": "y-v1"}

    def batch(ids: list[str]) -> list[str]:
        engine.deliveries.flusher.start()  # Redis answers: the invalidation lands during the load
        assert engine.settle(PATIENCE)
        return [primary[i] for i in ids]

    row = cache_aside(key="row:<id>", ttl=10, refresh_ahead=9.9, engine=engine, batch_loader=batch)(
        lambda id: primary[id]
    )
    assert row("y") == "y-v1"
    time.sleep(0.15)  # y is due for a refresh from now on
    engine.outbox.start_flusher = lambda: None  # the delivery waits for the batch load
    primary["y"] = "y-v2"
    open_breaker(engine)
    assert row.invalidate("y") is Outcome.PENDING
    engine.breaker.success()
    assert row.many(["x", "y"]) == ["x-v1", "y-v2"]
    delete_prefix(engine.client(), engine.prefix)
    engine.close()


async def test_a_batch_on_a_peek_function_judges_misses_as_misses(
    h: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """refresh_ahead (or a near cache) looks entries up with PEEK: its replies must
    be unpacked before they are judged, or every miss looks corrupt."""
    rows = {"a": {"id": "a"}, "b": {"id": "b"}}

    def load(id: str) -> dict[str, str]:
        return rows[id]

    fn = h.cached(
        load, key="peek:<id>", refresh_ahead=1, batch_loader=lambda ids: [rows[i] for i in ids]
    )
    with caplog.at_level(logging.WARNING, logger="cached_aside"):
        assert await h.run(fn.many, ["a", "b"]) == [{"id": "a"}, {"id": "b"}]
    assert fn.stats().corrupt == 0
    assert "foreign or damaged" not in caplog.text


# -- hangs and forks -----------------------------------------------------------------


async def test_aclose_of_an_async_only_engine_returns_while_redis_is_down() -> None:
    client = redis.asyncio.Redis(
        host="127.0.0.1", port=1, socket_timeout=0.1, socket_connect_timeout=0.1
    )
    engine = CacheEngine(async_client=client, prefix=unique_prefix())
    row = cache_aside(key="row:<id>", ttl=60, engine=engine)(_async_identity)
    assert await row.invalidate("a") is Outcome.PENDING
    started = time.monotonic()
    await asyncio.wait_for(engine.aclose(timeout=0.3), PATIENCE)
    assert time.monotonic() - started < 5  # its timeout, give or take a slow machine
    assert not engine.outbox._flushing or engine.deliveries.flusher.task is not None
    await client.aclose()


async def _async_identity(id: str) -> str:
    return id


def test_first_calls_from_many_threads_register_a_function_once(engine: CacheEngine) -> None:
    row = cache_aside(key="row:<id>", ttl=60, engine=engine)(lambda id: id)
    barrier = threading.Barrier(16)

    def first_call() -> None:
        barrier.wait()
        row("a")

    threads = [threading.Thread(target=first_call) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    counted = engine.stats()
    assert counted.hits + counted.misses == 16  # not 16 times each


def _fork_and_report(check: Any) -> Any:
    reading, writing = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(writing, json.dumps(check()).encode())
        finally:
            os._exit(0)
    os.close(writing)
    deadline = time.monotonic() + PATIENCE
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            pytest.fail("the forked child hung")
        time.sleep(0.01)
    report = json.loads(os.read(reading, 10_000) or b"null")
    os.close(reading)
    return report


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_fork_resets_every_engine_even_beside_an_async_only_one() -> None:
    down = redis.asyncio.Redis(host="127.0.0.1", port=1, socket_timeout=0.1)
    async_only = CacheEngine(async_client=down, prefix=unique_prefix())
    other = CacheEngine.from_url(DOWN, prefix=unique_prefix())
    row = cache_aside(key="row:<id>", ttl=60, engine=async_only)(_async_identity)

    async def pending() -> None:
        assert await row.invalidate("a") is Outcome.PENDING
        async_only.deliveries.flusher.stopping.set()  # keep the work pending across the fork

    asyncio.run(pending())
    held = other.sides._lock  # a thread of the parent holds the lock its first call takes
    held.acquire()
    try:
        report = _fork_and_report(
            lambda: {
                "other_unlocked": other.client() is not None,  # would hang on the held lock
                "still_pending": async_only.pending_invalidations(),
                "claimed": async_only.outbox._flushing,
            }
        )
    finally:
        held.release()
    assert report == {
        "other_unlocked": True,
        "still_pending": [row.key("a")],
        "claimed": False,  # no flusher can run without a loop: the next add() starts one
    }
    other.close(timeout=0.05)


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_child_forked_during_configure_can_configure() -> None:
    with _defaults._default_lock:  # another thread is inside configure() at fork time
        finished = _fork_and_report(
            lambda: bool(_defaults.configure(url=DOWN, prefix=unique_prefix()).close(0.01) or True)
        )
    assert finished is True
