"""Serving through expiry and primary failures: grace (stale-while-revalidate),
stale_if_error, loader_timeout and the loader breaker; each sync and async, on real
Redis and fakeredis. An entry's age is set with PEXPIRE: an entry stored for ttl +
kept time with N ms left is (kept - N) ms past its ttl."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import msgpack
import pytest

from cached_aside import (
    CacheEngine,
    ConfigurationError,
    LoaderCircuitOpenError,
    LoaderTimeoutError,
    NearCache,
    Outcome,
    Source,
    cache_aside,
)
from cached_aside._codecs import (
    MSGPACK_CODEC,
)
from cached_aside._loads import MAX_ABANDONED_LOADS
from cached_aside._options import Options
from cached_aside._plan import Plan
from cached_aside._reads import Age, peeked
from cached_aside._stats import Stats

from .conftest import Harness, needs_real_redis
from .test_near import near_engine, until_near  # noqa: F401  # a fixture, and its helper


class Versioned:
    """A loader returning the primary's current version of a row; it can be made to
    fail, and counts its calls."""

    def __init__(self) -> None:
        self.version = 1
        self.calls = 0
        self.failing = False

    def __call__(self, id: str) -> dict[str, Any]:
        self.calls += 1
        if self.failing:
            raise RuntimeError("the primary is down")
        return {"id": id, "v": self.version}


def age(h: Harness, key: str, left_ms: int) -> None:
    """Make the entry at `key` have `left_ms` to live."""
    assert h.raw.pexpire(key, left_ms)


async def settle(h: Harness) -> None:
    assert await h.engine.asettle() if h.mode == "async" else h.engine.settle()


async def test_grace_serves_stale_while_one_caller_reloads(h: Harness) -> None:
    rows = Versioned()
    fn = h.cached(rows, key="g:<id>", ttl=30, grace=10)
    assert (await h.run(fn, "a"))["v"] == 1
    assert 30_000 < h.raw.pttl(fn.key("a")) <= 40_000  # stored for ttl + grace
    rows.version = 2
    age(h, fn.key("a"), 9_000)  # 1 s past its ttl: inside the grace
    first = await h.run(fn.lookup, "a")
    assert (first.source, first.value["v"], first.hit) == (Source.STALE, 1, False)
    await settle(h)
    after = await h.run(fn.lookup, "a")
    assert (after.source, after.value["v"]) == (Source.CACHE, 2)
    assert rows.calls == 2  # the first load and one reload
    stats = fn.stats()
    assert (stats.stale, stats.loads) == (1, 2)


async def test_past_the_grace_a_call_loads(h: Harness) -> None:
    rows = Versioned()
    fn = h.cached(rows, key="g:<id>", ttl=30, grace=2, stale_if_error=10)
    await h.run(fn, "a")
    rows.version = 2
    age(h, fn.key("a"), 5_000)  # 5 s past its ttl: beyond grace, kept for errors only
    result = await h.run(fn.lookup, "a")
    assert (result.source, result.value["v"]) == (Source.LOADER, 2)


async def test_invalidate_removes_the_entry_and_its_grace(h: Harness) -> None:
    rows = Versioned()
    fn = h.cached(rows, key="g:<id>", ttl=30, grace=60)
    await h.run(fn, "a")
    age(h, fn.key("a"), 30_000)
    rows.version = 2
    assert await h.run(fn.invalidate, "a") is Outcome.DELETED
    result = await h.run(fn.lookup, "a")
    assert (result.source, result.value["v"]) == (Source.LOADER, 2)  # never stale


async def test_stale_if_error_answers_a_failed_load_with_the_kept_value(
    h: Harness, twin: Any
) -> None:
    rows = Versioned()
    fn = h.cached(rows, key="s:<id>", ttl=30, stale_if_error=60)
    await h.run(fn, "a")
    rows.failing = True
    age(h, fn.key("a"), 50_000)  # 10 s past its ttl
    result = await h.run(fn.lookup, "a")
    assert (result.source, result.value["v"]) == (Source.STALE, 1)
    # Another process, which never saw the value, is answered the same way.
    other = cache_aside(key="s:<id>", ttl=30, stale_if_error=60, engine=twin())(fn.__wrapped__)
    other_result = await h.run(other.lookup, "a")
    assert (other_result.source, other_result.value["v"]) == (Source.STALE, 1)
    stats = fn.stats()
    assert (stats.stale, stats.loader_errors) == (1, 1)
    # The lock went with the failed load: once the primary is back, a call loads.
    rows.failing = False
    rows.version = 2
    assert (await h.run(fn, "a"))["v"] == 2


async def test_without_a_stale_value_the_loader_error_propagates(h: Harness) -> None:
    rows = Versioned()
    rows.failing = True
    fn = h.cached(rows, key="s:<id>", ttl=30, stale_if_error=60)
    with pytest.raises(RuntimeError, match="primary is down"):
        await h.run(fn, "never-cached")
    # A value past even stale_if_error is gone from Redis: the same.
    other_rows = Versioned()
    plain = h.cached(other_rows, key="t:<id>", ttl=30, stale_if_error=1)
    await h.run(plain, "a")
    h.raw.delete(plain.key("a"))
    other_rows.failing = True
    with pytest.raises(RuntimeError):
        await h.run(plain, "a")


async def test_the_loader_breaker_stops_hammering_and_then_probes(h: Harness) -> None:
    rows = Versioned()
    fn = h.cached(rows, key="b:<id>", ttl=30, stale_if_error=60)
    await h.run(fn, "a")
    rows.failing = True
    calls_before = rows.calls
    for _ in range(8):
        age(h, fn.key("a"), 50_000)
        assert (await h.run(fn.lookup, "a")).source is Source.STALE
    assert rows.calls - calls_before == 5  # then skipped: the breaker opened
    with pytest.raises(LoaderCircuitOpenError, match="no stale value"):
        await h.run(fn, "never-cached")
    rows.failing = False
    rows.version = 2
    assert (await h.run(fn.refresh, "a"))["v"] == 2  # a deliberate reload probes at once
    assert fn._plan.loader_breaker.state == "closed"  # type: ignore[union-attr]
    assert (await h.run(fn, "b"))["v"] == 2


async def test_a_load_past_loader_timeout_fails_and_frees_the_lock(engine: CacheEngine) -> None:
    release = threading.Event()

    @cache_aside(key="slow:<id>", ttl=30, lock_ttl=30, loader_timeout=0.05, engine=engine)
    def slow(id: str) -> str:
        if not release.is_set():
            release.wait(30)  # abandoned by the timeout; ends when released
        return "ok"

    @cache_aside(key="aslow:<id>", ttl=30, lock_ttl=30, loader_timeout=0.05, engine=engine)
    async def aslow(id: str) -> str:
        if not release.is_set():
            await asyncio.sleep(30)  # cancelled by the timeout
        return "ok"

    started = time.monotonic()
    with pytest.raises(LoaderTimeoutError, match="loader_timeout"):
        slow("a")
    with pytest.raises(LoaderTimeoutError):
        await aslow("a")
    release.set()
    # The locks went with the timed-out calls: nobody waits out lock_ttl (30 s).
    assert slow("a") == "ok"
    assert await aslow("a") == "ok"
    assert time.monotonic() - started < 10  # a bound for a slow machine


async def test_a_load_past_loader_timeout_answers_with_the_kept_value(
    engine: CacheEngine,
) -> None:
    slow_now, release = threading.Event(), threading.Event()

    @cache_aside(key="slow:<id>", ttl=30, loader_timeout=0.05, stale_if_error=60, engine=engine)
    def slow(id: str) -> str:
        if slow_now.is_set():
            release.wait(30)  # past loader_timeout, however slow the machine
        return "v"

    assert slow("a") == "v"
    slow_now.set()
    engine.client().pexpire(slow.key("a"), 50_000)  # 10 s past its ttl
    try:
        result = slow.lookup("a")
    finally:
        release.set()
    assert (result.source, result.value) == (Source.STALE, "v")
    assert slow.stats().loader_errors == 1


async def test_an_invalidation_during_a_stale_serving_reload_stores_nothing(
    h: Harness,
) -> None:
    reading = threading.Event()
    release = threading.Event()
    rows = Versioned()

    def loader(id: str) -> dict[str, Any]:
        row = rows(id)
        if rows.calls > 1:  # the background reload: hold it after its read
            reading.set()
            release.wait(30)
        return row

    async def aloader(id: str) -> dict[str, Any]:
        row = rows(id)
        if rows.calls > 1:  # held without blocking the loop the test runs on
            reading.set()
            await asyncio.to_thread(release.wait, 30)
        return row

    if h.mode == "sync":
        fn = h.cached(loader, key="r:<id>", ttl=30, grace=10)
    else:
        fn = cache_aside(key="r:<id>", ttl=30, grace=10, engine=h.engine)(aloader)
    await h.run(fn, "a")
    rows.version = 2
    age(h, fn.key("a"), 9_000)
    assert (await h.run(fn.lookup, "a")).source is Source.STALE
    assert await asyncio.to_thread(reading.wait, 30)  # the reload read version 2
    rows.version = 3  # the writer: update the primary, then invalidate
    assert await h.run(fn.invalidate, "a") is Outcome.DELETED
    release.set()
    await settle(h)
    assert not h.raw.exists(fn.key("a"))  # the reload's older row was refused
    result = await h.run(fn.lookup, "a")
    assert (result.source, result.value["v"]) == (Source.LOADER, 3)


async def test_many_serves_entries_in_their_grace_and_reloads_them(h: Harness) -> None:
    rows = Versioned()
    fn = h.cached(rows, key="m:<id>", ttl=30, grace=10)
    assert [r["v"] for r in await h.run(fn.many, ["a", "b"])] == [1, 1]
    rows.version = 2
    age(h, fn.key("a"), 9_000)
    assert [r["v"] for r in await h.run(fn.many, ["a", "b"])] == [1, 1]
    await settle(h)
    assert [r["v"] for r in await h.run(fn.many, ["a", "b"])] == [2, 1]


def test_bad_stale_options_are_refused_at_decoration() -> None:
    def load(id: str) -> None: ...

    cases: list[tuple[dict[str, Any], str]] = [
        ({"grace": -1}, "grace must be >= 0"),
        ({"stale_if_error": "1m"}, "stale_if_error must be a number of seconds"),
        ({"loader_timeout": -1}, "loader_timeout must be >= 0"),
    ]
    for options, message in cases:
        with pytest.raises(ConfigurationError, match=message):
            cache_aside(key="k:<id>", ttl=30, **options)(load)
    # The lease is renewed while the loader runs: a timeout may outlast it.
    cache_aside(key="k:<id>", ttl=30, loader_timeout=20, lock_ttl=0.5)(load)


@needs_real_redis
def test_near_copies_live_no_longer_than_the_fresh_part(near_engine: CacheEngine) -> None:  # noqa: F811
    # 1 s: ample to see the first near hit on a slow machine
    @cache_aside(key="n:<id>", ttl=1, grace=30, engine=near_engine, near=NearCache())
    def read(id: str) -> dict[str, str]:
        return {"id": id}

    read("a")
    until_near(read, "a")
    time.sleep(1.05)  # past the ttl: the near copy is gone, Redis serves it stale
    assert read.lookup("a").source is Source.STALE


async def test_a_cancelled_probe_does_not_keep_the_loader_breaker_open(
    engine: CacheEngine,
) -> None:
    # Was a defect: in the breaker's half-open state, allow()
    # lets one call probe and sets _probing (_breaker.py:56). _guarded_load
    # (_flows.py:418-431) calls success()/failure() only when the loader returns or
    # raises an Exception; a CancelledError (asyncio.wait_for/timeouts in a web
    # handler, a client disconnect) or any BaseException in the probe leaves
    # _probing True for ever: allow() then refuses every later call, so the loader
    # is skipped until a fn.refresh() succeeds: every call without a kept value
    # raises LoaderCircuitOpenError, every other gets stale data, indefinitely.
    # Fix: in _guarded_load, `except BaseException` (re-raised) releases the probe
    # (a `breaker.abandon()` that clears _probing and leaves the state open).
    mode = {"now": "fail"}

    @cache_aside(key="b:<id>", ttl=30, stale_if_error=60, engine=engine)
    async def load(id: str) -> str:
        if mode["now"] == "fail":
            raise RuntimeError("the primary is down")
        if mode["now"] == "hang":
            await asyncio.sleep(5)
        return "ok"

    breaker = load._plan.loader_breaker
    assert breaker is not None
    breaker.cooldown = 0.05
    now = [time.monotonic()]  # the breaker's clock moves when the test says
    breaker.clock = lambda: now[0]
    for id in range(5):
        with pytest.raises(RuntimeError):
            await load(str(id))
    assert breaker.state == "open"
    now[0] += 0.06  # half-open: the next call probes
    mode["now"] = "hang"
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(load("probe"), 0.1)  # the probe is cancelled
    mode["now"] = "ok"  # the primary is back
    now[0] += 0.2
    assert await load("after") == "ok", "the breaker stays open after a cancelled probe"


async def test_a_loaders_own_timeout_error_is_not_reported_as_loader_timeout(
    h: Harness,
) -> None:
    # Was a defect: on Python 3.11+ asyncio.TimeoutError and
    # concurrent.futures.TimeoutError ARE the builtin TimeoutError, so the
    # `except asyncio.TimeoutError` around wait_for (_loads.py:94) and `except
    # FutureTimeoutError` around future.result (_loads.py:152) also catch a
    # TimeoutError the loader raised itself at once (a DB driver's statement or
    # socket timeout): it is reported as "ran past loader_timeout (5 s)" and, with
    # `from None`, the loader's own exception and traceback are lost. Fix: tell the
    # two apart (sync: `outcome.done()` after the wait; async: asyncio.timeout()
    # and check whether the deadline expired) and re-raise the loader's own error.
    def load(id: str) -> str:
        raise TimeoutError("database statement timeout")

    fn = h.cached(load, key="t:<id>", loader_timeout=5)
    with pytest.raises(TimeoutError) as raised:
        await h.run(fn, "a")
    assert not isinstance(raised.value, LoaderTimeoutError), str(raised.value)
    assert "database statement timeout" in str(raised.value)


async def test_a_grace_reload_refused_by_cache_if_does_not_keep_serving_the_old_value(
    h: Harness,
) -> None:
    # Was the same defect through grace: the background reload's result fails cache_if
    # (an order that is no longer final), so it is not stored, and the old value
    # keeps being served as "stale" until the grace runs out.
    rows = {"a": {"status": "final", "v": 1}}
    loads = []

    def load(id: str) -> dict[str, Any]:
        loads.append(id)
        return dict(rows[id])

    fn = h.cached(load, key="rc:<id>", ttl=30, grace=10, cache_if=lambda o: o["status"] == "final")
    await h.run(fn, "a")
    rows["a"] = {"status": "reopened", "v": 2}
    assert h.raw.pexpire(fn.key("a"), 9_000)  # 1 s into its grace
    assert (await h.run(fn.lookup, "a")).source is Source.STALE
    assert await h.engine.asettle() if h.mode == "async" else h.engine.settle()
    result = await h.run(fn.lookup, "a")
    assert result.value == {"status": "reopened", "v": 2}, "the refused reload left it stale"


@pytest.mark.parametrize(("options", "age"), [({"refresh_ahead": 5}, Age.DUE), ({}, Age.FRESH)])
def test_an_entry_with_under_a_millisecond_left_is_not_past_its_ttl(
    options: dict[str, int], age: Age
) -> None:
    """PTTL 0 means under 1 ms left. With nothing kept past the ttl (no grace, no
    stale_if_error) that entry is still fresh: taken for expired, a loader error
    was answered with it as stale, on a function that never asked for that."""
    plan = Plan(
        "get_product",
        MSGPACK_CODEC,
        Options.of(cache_aside(key="product:<id>", ttl=30, **options)),
        Stats("get_product"),
        peek=True,
    )
    found, seen, left = peeked(plan, [msgpack.packb({"v": 1}), 0])
    assert (found, seen, left) == ({"v": 1}, age, 0)


async def test_the_batch_loader_goes_through_the_loader_breaker(h: Harness) -> None:
    # Was a defect: with stale_if_error, "after 5 failures in a row the loader is
    # skipped for 1 s". many()'s batch path calls the batch loader directly
    # (_batches.py:239, LoadSome), never through _guarded_load: it neither counts
    # its failures nor respects an open breaker, so a failing primary keeps being
    # hammered by every many() call. Fix: route LoadSome through the breaker too
    # (skip: raise LoaderCircuitOpenError for the misses; count failures/successes).
    calls = {"single": 0, "batch": 0}

    def load(id: str) -> str:
        calls["single"] += 1
        raise RuntimeError("the primary is down")

    def batch(ids: list[str]) -> list[str]:
        calls["batch"] += 1
        raise RuntimeError("the primary is down")

    fn = h.cached(load, key="bb:<id>", stale_if_error=60, batch_loader=batch)
    frozen = time.monotonic()  # the breaker stays open however slow the machine
    fn._plan.loader_breaker.clock = lambda: frozen
    for id in range(5):
        with pytest.raises(RuntimeError):
            await h.run(fn, str(id))
    assert fn._plan.loader_breaker.state == "open"
    with pytest.raises(LoaderCircuitOpenError):
        await h.run(fn.many, ["x", "y"])
    assert calls["batch"] == 0, "the batch loader was called while the breaker was open"


def test_a_hung_primary_does_not_pile_up_abandoned_loader_threads(engine: CacheEngine) -> None:
    # Was a defect: loader_timeout runs each sync load in a
    # new thread (_loads.py:_within, :149) and abandons it on timeout. Exactly when
    # loader_timeout matters (the primary hangs), every call starts one more thread
    # that stays blocked in the driver: nothing bounds them (without stale_if_error
    # there is no loader breaker either), so a busy service accumulates thousands
    # of stuck threads (and DB connections) and dies of it. Fix: bound the
    # abandoned loads per function (a counter/semaphore: past N still running,
    # fail at once with LoaderTimeoutError instead of starting another thread), or
    # run them on a bounded executor.
    hung = threading.Event()

    @cache_aside(key="h:<id>", ttl=30, loader_timeout=0.01, engine=engine)
    def load(id: int) -> str:
        hung.wait(5)
        return "late"

    def ours() -> int:
        return sum(t.name.startswith("cached_aside loader") for t in threading.enumerate())

    before = ours()
    try:
        for id in range(40):
            with pytest.raises(LoaderTimeoutError):
                load(id)
        assert ours() - before <= MAX_ABANDONED_LOADS, f"{ours() - before} loader threads left"
    finally:
        hung.set()
