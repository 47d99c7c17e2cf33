"""refresh_ahead: a hot key is reloaded before it expires and never misses; hits in the refresh
window start one background reload per process; a failing reload rests instead of being tried
on every hit."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from cached_aside import (
    CacheEngine,
    Source,
    _runtime,
    cache_aside,
)

from .conftest import (
    PATIENCE,
    REDIS_URL,
    Harness,
    delete_prefix,
    eventually,
    run_in_threads,
    unique_prefix,
)


async def settle(mode: str, engine: CacheEngine, timeout: float) -> bool:
    """Wait for an engine's background work: reload threads, or this loop's tasks."""
    if mode == "sync":
        return engine.settle(timeout)
    return await engine.asettle(timeout)


def versions(mode: str, calls: list[str], hold: Callable[[int], Any]) -> Callable[..., Any]:
    """A loader for `mode` answering "v<n>" on its n-th call; `hold(n)` runs first (a
    sync callable; in async mode awaited if it returns an awaitable)."""
    if mode == "sync":

        def load(id: str) -> str:
            calls.append(id)
            number = len(calls)
            hold(number)
            return f"v{number}"

        return load

    async def aload(id: str) -> str:
        calls.append(id)
        number = len(calls)
        held = hold(number)
        if held is not None:
            await held
        return f"v{number}"

    return aload


def until(mode: str, event: threading.Event) -> Any:
    """Wait for `event`: blocking in a thread, or polling in a task."""
    if mode == "sync":
        assert event.wait(PATIENCE)
        return None
    return eventually(event.is_set)


async def test_hits_in_the_refresh_window_start_one_reload_per_process(h: Harness) -> None:
    """consistency.md, "Refresh ahead": the caller gets the cached value at once and a
    background thread (or task) reloads; at most one such refresh runs per key per
    process. Any second refresh of the key would find the first one's lock and queue
    as a waiter: none may."""
    calls: list[str] = []
    hits_done = threading.Event()
    waiting: list[int] = []

    def hold(number: int) -> Any:
        if number == 1:
            return None
        if h.mode == "sync":
            assert hits_done.wait(PATIENCE)
            time.sleep(0.1)  # room for any other refresh of this key to reach Redis
            waiting.append(h.raw.scard(fn.key("k") + ":waiters"))
            return None

        async def later() -> None:
            assert await eventually(hits_done.is_set)
            await asyncio.sleep(0.1)
            waiting.append(h.raw.scard(fn.key("k") + ":waiters"))

        return later()

    fn = cache_aside(key="hot:<id>", ttl=30, refresh_ahead=20, engine=h.engine)(
        versions(h.mode, calls, hold)
    )
    assert await h.run(fn, "k") == "v1"
    h.raw.pexpire(fn.key("k"), 15_000)  # inside the 20 s window, far from expiry
    answers = [await h.run(fn.lookup, "k") for _ in range(50)]
    hits_done.set()
    assert all((a.value, a.source) == ("v1", Source.CACHE) for a in answers)
    assert await settle(h.mode, h.engine, PATIENCE)
    assert calls == ["k", "k"]  # one reload
    assert waiting == [0]  # and no other refresh of this process waiting on its lock
    assert h.raw.pttl(fn.key("k")) > 20_000
    assert await h.run(fn, "k") == "v2"


async def test_a_process_losing_the_refresh_race_waits_for_the_winners_store(
    h: Harness, twin: Any
) -> None:
    """consistency.md, "Refresh ahead": processes that lose the race for the lock wait
    for the winner's store in the background: one reload in total, and the loser's
    hits neither block nor start refreshes of their own meanwhile."""
    go = threading.Event()
    winner_calls: list[str] = []
    loser_calls: list[str] = []
    loser_engine = twin()

    def hold(number: int) -> Any:
        return until(h.mode, go) if number > 1 else None

    # A lock far above any stall: the loser must wait for the winner, not outlive it.
    options: dict[str, Any] = {"ttl": 30, "refresh_ahead": 20, "lock_ttl": 60}
    winner = cache_aside(key="race:<id>", engine=h.engine, **options)(
        versions(h.mode, winner_calls, hold)
    )
    loser = cache_aside(key="race:<id>", engine=loser_engine, **options)(
        versions(h.mode, loser_calls, lambda number: None)
    )
    waiters = winner.key("k") + ":waiters"
    assert await h.run(winner, "k") == "v1"
    h.raw.pexpire(winner.key("k"), 15_000)  # inside the 20 s window, far from expiry
    try:
        assert (await h.run(winner.lookup, "k")).source is Source.CACHE  # starts the reload
        assert await eventually(lambda: len(winner_calls) == 2)  # loading, under the lock
        answers = [await h.run(loser.lookup, "k") for _ in range(20)]
        assert all((a.value, a.source) == ("v1", Source.CACHE) for a in answers)
        # The loser's one refresh lost the lock and waits, in the background:
        assert await eventually(lambda: h.raw.scard(waiters) == 1)
        assert not await settle(h.mode, loser_engine, 0.1)
        assert h.raw.scard(waiters) == 1
    finally:
        go.set()
    assert await settle(h.mode, loser_engine, PATIENCE)  # woken by the winner's store
    assert await settle(h.mode, h.engine, PATIENCE)
    assert (len(winner_calls), loser_calls) == (2, [])  # one reload across both
    again = await h.run(loser.lookup, "k")
    assert (again.value, again.source) == ("v2", Source.CACHE)


async def test_a_failing_reload_is_tried_once_not_on_every_hit(
    h: Harness, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    failing = {"on": False}
    calls: list[str] = []

    def load(id: str) -> str:
        calls.append(id)
        if failing["on"]:
            raise LookupError("the primary is down")
        return id

    fn = h.cached(load, key="reload:<id>", ttl=30, refresh_ahead=29.9)
    await h.run(fn, "a")
    await asyncio.sleep(0.15)  # inside the refresh window from here on
    failing["on"] = True
    calls.clear()
    # The hits below fall within REFRESH_RETRY_SECONDS of the failure however slow
    # the machine: the clock that rest reads stands still.
    frozen = time.monotonic()
    monkeypatch.setattr(_runtime, "monotonic", lambda: frozen)
    with caplog.at_level(logging.WARNING, logger="cached_aside"):
        for _ in range(10):
            assert await h.run(fn, "a") == "a"  # the cached value, however the reload fares
            await asyncio.sleep(0.02)
        assert await h.engine.asettle() if h.mode == "async" else h.engine.settle()
    assert calls == ["a"]  # one reload in the retry rest, not one per hit
    assert fn.stats().loader_errors == 1
    assert caplog.text.count("the cached value is served until it expires") == 1


def test_refresh_ahead_keeps_a_hot_key_from_ever_missing(engine: CacheEngine, twin: Any) -> None:
    engines = [engine, twin()]
    versions = iter(range(1, 1000))
    loads: list[int] = []
    functions = []
    for each in engines:
        # Refreshes are due 0.2 s after each store, and the entry outlives a 1 s stall.
        @cache_aside(key="hot:<id>", ttl=1.2, refresh_ahead=1.0, engine=each)
        def load(id: str) -> int:
            version = next(versions)
            loads.append(version)
            time.sleep(0.02)
            return version

        functions.append(load)
    assert functions[0]("k") == 1
    seen: list[tuple[Source, int]] = []
    stop = time.monotonic() + 2.5  # more than two ttls: without refreshes it would expire
    hang = time.monotonic() + PATIENCE

    served: set[int] = set()

    def reading() -> bool:  # past `stop`, until the last load's value was served
        done = len(loads) >= 4 and loads[-1] in served
        return time.monotonic() < hang and (time.monotonic() < stop or not done)

    def reader(i: int) -> None:
        while reading():
            result = functions[i % 2].lookup("k")
            seen.append((result.source, result.value))
            served.add(result.value)
            time.sleep(0.005)

    run_in_threads(4, reader)
    assert {source for source, _ in seen} == {Source.CACHE}  # no reader ever missed
    assert len(loads) >= 4  # refreshed about every 0.2 s
    # Each refresh loaded once and its value was served: no load was wasted.
    assert {version for _, version in seen} | {1} == set(loads)
    assert loads == sorted(loads)


async def test_refresh_ahead_with_tasks(engine: CacheEngine) -> None:
    loads: list[int] = []

    # Refreshes are due 0.2 s after each store, and the entry outlives a 1 s stall.
    @cache_aside(key="hot:<id>", ttl=1.2, refresh_ahead=1.0, engine=engine)
    async def load(id: str) -> int:
        loads.append(len(loads) + 1)
        await asyncio.sleep(0.01)
        return loads[-1]

    await load("k")
    sources: set[Source] = set()
    stop = time.monotonic() + 2.5  # more than two ttls: without refreshes it would expire
    hang = time.monotonic() + PATIENCE

    async def reader() -> None:
        while time.monotonic() < hang and (time.monotonic() < stop or len(loads) < 4):
            sources.add((await load.lookup("k")).source)
            await asyncio.sleep(0.005)

    await asyncio.gather(*(reader() for _ in range(5)))
    assert sources == {Source.CACHE}
    assert len(loads) >= 4
    assert len(engine.sides.async_side().tasks) <= 1  # background refreshes finish


def test_refresh_ahead_must_be_shorter_than_ttl() -> None:
    with pytest.raises(ValueError, match="refresh_ahead"):
        cache_aside(key="x:<id>", ttl=1, refresh_ahead=1)


@pytest.mark.parametrize("closing", ["close", "aclose"])
async def test_closing_lets_a_reload_in_a_thread_finish_and_release_its_lock(
    engine: CacheEngine, clients: Any, closing: str
) -> None:
    """Was a gap: close() returned while a refresh_ahead reload ran in its thread, which
    kept the key's lock; at interpreter exit the daemon thread dies with it held, and
    other processes' callers of the key wait out the lock's ttl (test_xfetch's eight
    processes once waited 60 s, then flagged a load beside the dead one). close() and
    aclose() now let such reloads finish first (for up to `timeout`)."""
    raw = clients[2]
    calls: list[str] = []
    reloading, closing_started = threading.Event(), threading.Event()

    def load(id: str) -> str:
        calls.append(id)
        if len(calls) == 2:  # the reload behind a hit in the refresh window
            reloading.set()
            assert closing_started.wait(PATIENCE)
            time.sleep(0.1)  # the close has begun: it must wait for this
        return f"v{len(calls)}"

    fn = cache_aside(key="hot:<id>", ttl=30, refresh_ahead=20, lock_ttl=60, engine=engine)(load)
    assert fn("k") == "v1"
    assert raw.pexpire(fn.key("k"), 15_000)  # inside the window
    assert fn("k") == "v1"  # served at once, the reload starts behind
    assert await asyncio.to_thread(reloading.wait, PATIENCE)
    closing_started.set()
    if closing == "close":
        await asyncio.to_thread(engine.close, PATIENCE)
    else:
        await engine.aclose(PATIENCE)
    assert calls == ["k", "k"]
    assert raw.exists(fn.key("k") + ":lock") == 0, "the reload still held its lock"
    assert raw.pttl(fn.key("k")) > 20_000  # its value stored
    assert engine.settle(0)


EXITING_MID_RELOAD = textwrap.dedent(
    """
    import sys, time
    from cached_aside import CacheEngine, cache_aside
    url, prefix = sys.argv[1:3]
    engine = CacheEngine.from_url(url, prefix=prefix)
    calls = []

    @cache_aside(key="hot:<id>", ttl=30, refresh_ahead=20, lock_ttl=60, engine=engine)
    def load(id):
        calls.append(id)
        if len(calls) == 2:
            time.sleep(0.3)  # the reload: still running when the script ends
        return f"v{len(calls)}"

    assert load("k") == "v1"
    assert engine.client().pexpire(load.key("k"), 15_000)
    assert load("k") == "v1"  # the reload starts behind; the script ends, unclosed
    print(load.key("k"))
    """
)


def test_an_exit_without_close_lets_a_reload_in_a_thread_finish_and_release_its_lock() -> None:
    """A script that never closes its engine: at interpreter exit the reload's daemon
    thread would die holding the key's lock (60 s here, other processes waiting it
    out); the exit hook lets it finish and release."""
    assert REDIS_URL is not None
    prefix = unique_prefix()
    done = subprocess.run(
        [sys.executable, "-c", EXITING_MID_RELOAD, REDIS_URL, prefix],
        capture_output=True,
        text=True,
        timeout=PATIENCE,
    )
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip()
    raw = redis.Redis.from_url(REDIS_URL)
    try:
        assert raw.exists(key + ":lock") == 0, "the reload died holding its lock"
        assert raw.pttl(key) > 20_000  # its value stored
    finally:
        delete_prefix(raw, prefix)
        raw.close()
