"""Documented claims that no other test noticed breaking (an audit mutated the library
and watched the suite pass), from docs/consistency.md, docs/operations.md,
docs/configuration.md and docs/guide.md: each test here fails when its claim does.

Engines with clients of their own stand for processes. Timings are behaviour checks,
with thresholds at least 3x away from both the working and the broken timing."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import redis
import redis.asyncio.retry
from redis.backoff import NoBackoff
from redis.retry import Retry

from cached_aside import CacheEngine, NearCache, Outcome, Source, _stats, cache_aside

from .conftest import (
    REDIS_URL,
    WOKEN_WITHIN,
    Harness,
    LoaderFailedError,
    delete_prefix,
    eventually,
    needs_real_redis,
    unique_prefix,
    wait_until,
)
from .servers import REDIS_SERVER, RedisProcess, dead_url


async def settle(mode: str, engine: CacheEngine, timeout: float) -> bool:
    """Wait for an engine's background work: reload threads, or this loop's tasks."""
    if mode == "sync":
        return engine.settle(timeout)
    return await engine.asettle(timeout)


@pytest.fixture
def servers() -> Iterator[Callable[..., RedisProcess]]:
    """Starts redis-servers of the test's own (arguments as for RedisProcess), each
    stopped by PID afterwards however the test ends."""
    if REDIS_SERVER is None:
        pytest.fail("redis-server is not on PATH")
    made: list[RedisProcess] = []

    def start(*extra: str) -> RedisProcess:
        made.append(RedisProcess(*extra))
        return made[-1].start()

    yield start
    for process in made:
        process.stop()


@pytest.fixture
def server(servers: Callable[..., RedisProcess]) -> RedisProcess:
    return servers()


@pytest.fixture
async def redis_engine() -> AsyncIterator[CacheEngine]:
    """An engine on the shared real Redis, under a prefix of its own."""
    if REDIS_URL is None:
        pytest.skip("no Redis server reachable at REDIS_URL or 127.0.0.1:6379")
    engine = CacheEngine.from_url(REDIS_URL, prefix=unique_prefix())
    yield engine
    await engine.aclose()
    cleanup = redis.Redis.from_url(REDIS_URL)
    delete_prefix(cleanup, engine.prefix)
    cleanup.close()


# -- waking waiters -------------------------------------------------------------------


async def test_a_failed_load_wakes_other_processes_waiters_at_once(
    patient_waiters: None, h: Harness, twin: Any
) -> None:
    """consistency.md, "Owner failure": if the loader raises, the lock is released and
    the waiters in other processes are woken at once; the first to retake the lock
    loads. Two waiting processes here: one loads, the other gets its value. Their
    clients' BLPOPs are long: a waiter nobody wakes sits out 2.5 s."""
    template = "owner-fails:<id>"
    loads: list[str] = []

    def fresh(id: str) -> str:
        loads.append(id)
        return "fresh"

    waiter = h.cached(fresh, key=template)
    other = cache_aside(key=template, ttl=30, engine=twin())(fresh)  # sync, in a thread
    waiters = waiter.key("k") + ":waiters"
    failed_at: list[float] = []

    @cache_aside(key=template, ttl=30, engine=twin())
    def owner(id: str) -> str:
        assert wait_until(lambda: h.raw.scard(waiters) == 2)  # both others wait on Redis
        failed_at.append(time.monotonic())
        raise LoaderFailedError("primary timeout")

    errors: list[BaseException] = []
    finished: list[tuple[Any, float]] = []

    def run_owner() -> None:
        try:
            owner("k")
        except LoaderFailedError as exc:
            errors.append(exc)

    def run_other() -> None:
        result = other.lookup("k")
        finished.append((result, time.monotonic()))

    owner_thread = threading.Thread(target=run_owner)
    owner_thread.start()
    assert await eventually(lambda: h.raw.exists(waiter.key("k") + ":lock"))
    other_thread = threading.Thread(target=run_other)
    other_thread.start()
    result = await h.run(waiter.lookup, "k")
    done_at = time.monotonic()
    await asyncio.to_thread(owner_thread.join, 10)
    await asyncio.to_thread(other_thread.join, 10)
    (other_result, other_done_at) = finished[0]
    assert len(errors) == 1
    assert loads == ["k"]  # one of the woken waiters loaded, once
    assert {result.source, other_result.source} == {Source.LOADER, Source.WAITED}
    assert result.value == other_result.value == "fresh"
    assert done_at - failed_at[0] < WOKEN_WITHIN
    assert other_done_at - failed_at[0] < WOKEN_WITHIN


async def test_invalidate_wakes_the_waiters_of_a_load_in_flight(
    patient_waiters: None, h: Harness, twin: Any
) -> None:
    """consistency.md, "Leases": `.invalidate()` deletes the lock along with the value...
    The waiters are woken and one of them loads afresh."""
    template = "invalidated:<id>"
    primary = {"k": "v1"}
    loading, release = threading.Event(), threading.Event()

    @cache_aside(key=template, ttl=30, engine=twin())
    def owner(id: str) -> str:
        value = primary[id]
        loading.set()
        assert release.wait(10)
        return value

    def read(id: str) -> str:
        return primary[id]

    waiter = h.cached(read, key=template)
    writer = cache_aside(key=template, ttl=30, engine=twin())(read)
    waiters = waiter.key("k") + ":waiters"
    invalidated_at: list[float] = []

    def invalidate_once_waited_on() -> None:
        assert wait_until(lambda: h.raw.scard(waiters) == 1)
        primary["k"] = "v2"  # the writer updates the primary, then invalidates
        assert writer.invalidate("k") is Outcome.ABSENT
        invalidated_at.append(time.monotonic())

    owned: list[str] = []
    owner_thread = threading.Thread(target=lambda: owned.append(owner("k")))
    owner_thread.start()
    writer_thread = threading.Thread(target=invalidate_once_waited_on)
    try:
        assert await asyncio.to_thread(loading.wait, 5)
        writer_thread.start()
        result = await h.run(waiter.lookup, "k")
        done_at = time.monotonic()
        owner_still_loading = owner_thread.is_alive()
    finally:
        release.set()
        await asyncio.to_thread(owner_thread.join, 10)
        await asyncio.to_thread(writer_thread.join, 10)
    assert owner_still_loading
    assert (result.value, result.source) == ("v2", Source.LOADER)  # loaded afresh
    assert done_at - invalidated_at[0] < WOKEN_WITHIN
    assert owned == ["v1"]  # the owner's read began before the write: its answer
    again = await h.run(waiter.lookup, "k")
    assert (again.value, again.source) == ("v2", Source.CACHE)  # v1 was never stored


# -- what is logged -------------------------------------------------------------------


def test_redis_errors_are_logged_once_a_burst_then_once_per_10_s_per_function(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """operations.md, "What is logged": the first Redis error of a burst and then at most
    once per 10 s per function, with the number of errors since the last report. The
    clock the log limit reads is the test's."""
    now = [time.monotonic()]
    monkeypatch.setattr(_stats, "time", SimpleNamespace(monotonic=lambda: now[0]))
    engine = CacheEngine.from_url(dead_url(), prefix=unique_prefix())

    @cache_aside(key="burst:<id>", ttl=30, engine=engine)
    def bursting(id: int) -> int:
        return id

    @cache_aside(key="calm:<id>", ttl=30, engine=engine)
    def calm(id: int) -> int:
        return id

    def reports(marker: str) -> list[str]:
        messages = [record.getMessage() for record in caplog.records]
        return [m for m in messages if "Redis failed" in m and marker in m]

    try:
        with caplog.at_level(logging.WARNING, logger="cached_aside"):
            assert [bursting(i) for i in range(40)] == list(range(40))  # failed open
            first = reports("{burst:")
            assert len(first) == 1
            assert "; 1 error(s) since the last report" in first[0]
            now[0] += 9.0
            assert bursting(40) == 40
            assert len(reports("{burst:")) == 1  # 9 s later: still quiet
            assert calm(1) == 1
            assert len(reports("{calm:")) == 1  # another function's first error: logged
            now[0] += 1.5
            assert bursting(41) == 41
            summary = reports("{burst:")
        errors = bursting.stats().errors
        assert errors == 42
        assert len(summary) == 2  # 10.5 s after the first line: one summary
        assert f"; {errors - 1} error(s) since the last report" in summary[1]
    finally:
        engine.close()


async def test_every_piece_of_corrupt_data_is_logged(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """operations.md, "What is logged": on each piece of corrupt data found."""

    def load(id: str) -> dict[str, str]:
        return {"id": id}

    fn = h.cached(load, key="damaged:<id>")
    key = fn.key("a")
    with caplog.at_level(logging.WARNING, logger="cached_aside"):
        h.raw.set(key, b"\xc7\x00garbage that is not msgpack")
        assert await h.run(fn, "a") == {"id": "a"}
        h.raw.delete(key)
        h.raw.rpush(key, "a list, not ours")
        assert await h.run(fn, "a") == {"id": "a"}
    lines = [r.getMessage() for r in caplog.records if "foreign or damaged" in r.getMessage()]
    assert len(lines) == 2
    assert all(repr(key) in line for line in lines)
    assert fn.stats().corrupt == 2


def test_the_near_cache_listener_losing_redis_is_logged(
    server: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """operations.md, "What is logged": when the near cache's listener loses Redis (the
    tier goes off until it is back)."""
    engine = CacheEngine.from_url(server.url, prefix=unique_prefix(), near=NearCache())

    @cache_aside(key="near:<id>", ttl=30, engine=engine)
    def load(id: str) -> str:
        return id

    def said_off() -> bool:
        return any("near cache off" in record.getMessage() for record in caplog.records)

    try:
        with caplog.at_level(logging.WARNING, logger="cached_aside"):
            assert load("a") == "a"
            assert engine.near_state() == "tracking"
            assert not said_off()
            server.kill()
            assert wait_until(said_off)
        assert engine.near_state() == "down"
    finally:
        engine.close()


# -- defaults -------------------------------------------------------------------------


async def test_negative_ttl_defaults_to_a_fifth_of_ttl_at_most_60_s(h: Harness) -> None:
    """guide.md: `negative_ttl` default: 20% of `ttl`, at most 60 s."""

    def absent(id: str) -> None:
        return None

    short = h.cached(absent, key="absent-short:<id>", ttl=100)
    long = h.cached(absent, key="absent-long:<id>", ttl=1000)
    assert await h.run(short, "a") is None
    assert await h.run(long, "a") is None
    assert 19_000 < h.raw.pttl(short.key("a")) <= 20_000
    assert 59_000 < h.raw.pttl(long.key("a")) <= 60_000


async def test_lock_ttl_defaults_to_1_s(h: Harness) -> None:
    """guide.md: `lock_ttl`: the lease of the single-flight lock, default 1 s."""
    seen: list[int] = []

    def load(id: str) -> str:
        seen.append(h.raw.pttl(fn.key(id) + ":lock"))  # while the load is in flight
        return id

    fn = h.cached(load, key="locked:<id>")
    assert await h.run(fn, "a") == "a"
    assert len(seen) == 1
    assert 500 < seen[0] <= 1_000


# -- engines from a URL: the retry and the breaker --------------------------------------


@pytest.mark.parametrize("drop", ["client kill", "restart"])
@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_pooled_connection_the_server_closed_costs_no_error(
    server: RedisProcess, mode: str, drop: str
) -> None:
    """configuration.md: the single immediate retry heals a pooled connection the server
    closed (after a restart): the next call is still a hit, with no error counted."""
    admin = server.admin()
    engine = CacheEngine.from_url(server.url, prefix=unique_prefix())
    h = Harness(mode, "private server", engine, admin)

    def load(id: str) -> str:
        return id.upper()

    fn = h.cached(load, key="dropped:<id>")
    try:
        assert (await h.run(fn.lookup, "a")).source is Source.LOADER
        assert (await h.run(fn.lookup, "a")).source is Source.CACHE  # its connections pooled
        if drop == "client kill":
            assert admin.client_kill_filter(_type="normal", skipme=True) >= 1
        else:
            admin.save()  # the restarted server loads the entry back
            server.kill()
            server.start()
        result = await h.run(fn.lookup, "a")
        assert (result.value, result.source) == ("A", Source.CACHE)
        assert fn.stats().errors == 0
    finally:
        admin.close()
        await engine.aclose()


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_waiters_connection_dropped_mid_wait_is_retried_at_once(
    patient_waiters: None, server: RedisProcess, mode: str
) -> None:
    """configuration.md: one immediate retry, no backoff. A waiter blocked in BLPOP whose
    connection the server kills blocks again at once on a new one, and gets the
    owner's value the moment it is stored, with no error counted."""
    prefix = unique_prefix()
    admin = server.admin()
    owner_engine = CacheEngine.from_url(server.url, prefix=prefix)
    # A 5 s socket timeout lets the waiter block 2.5 s per BLPOP: the kill lands mid-wait.
    waiter_engine = CacheEngine.from_url(server.url, prefix=prefix, socket_timeout=5.0)
    loading, release = threading.Event(), threading.Event()

    @cache_aside(key="dropped-wait:<id>", ttl=30, engine=owner_engine)
    def owner(id: str) -> str:
        loading.set()
        assert release.wait(10)
        return id.upper()

    def never(id: str) -> str:
        return "loaded by the waiter"

    side = Harness(mode, "private server", waiter_engine, admin)
    waiter = side.cached(never, key="dropped-wait:<id>")
    released_at: list[float] = []
    killed: list[int] = []

    def blocked() -> list[int]:
        return [int(c["id"]) for c in admin.client_list() if "b" in c["flags"]]

    def drop_then_release() -> None:
        assert wait_until(blocked)
        for client_id in blocked():
            killed.append(admin.client_kill_filter(_id=client_id))
        released_at.append(time.monotonic())
        release.set()

    owner_thread = threading.Thread(target=owner, args=("k",))
    owner_thread.start()
    dropper = threading.Thread(target=drop_then_release)
    try:
        assert await asyncio.to_thread(loading.wait, 5)
        dropper.start()
        result = await side.run(waiter.lookup, "k")
        done_at = time.monotonic()
    finally:
        release.set()
        await asyncio.to_thread(owner_thread.join, 10)
        if dropper.ident is not None:
            await asyncio.to_thread(dropper.join, 10)
        admin.close()
        await waiter_engine.aclose()
        await owner_engine.aclose()
    assert killed == [1]
    assert (result.value, result.source) == ("K", Source.WAITED)
    assert waiter.stats().errors == 0
    # Retried at once: woken by the store, not after a backoff or a 2.5 s BLPOP.
    assert done_at - released_at[0] < WOKEN_WITHIN


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_engines_from_a_url_retry_once_without_backoff(mode: str) -> None:
    """configuration.md: one immediate retry, for a connection the server closed, none
    for a timeout (a hung server would cost a caller twice); redis-py's own default
    backs off for seconds. Read from the pools of the engine's own clients."""
    engine = CacheEngine.from_url(dead_url(), prefix=unique_prefix())
    closed = (redis.exceptions.ConnectionError,)
    try:
        if mode == "sync":
            retry = engine.client().connection_pool.connection_kwargs["retry"]
            assert retry == Retry(NoBackoff(), 1, closed)
        else:
            retry = engine.async_client().connection_pool.connection_kwargs["retry"]
            assert retry == redis.asyncio.retry.Retry(NoBackoff(), 1, closed)
    finally:
        await engine.aclose()


def test_the_breaker_opens_after_3_failures_and_skips_redis_for_half_a_second() -> None:
    """operations.md, "Circuit breaker": after 3 failures in a row an engine skips Redis
    for 0.5 s...; `error_kinds()` counts them as CircuitOpenError. Then one caller
    probes. The clock the breaker reads is the test's."""
    engine = CacheEngine.from_url(dead_url(), prefix=unique_prefix())
    now = [time.monotonic()]
    engine.breaker.clock = lambda: now[0]

    @cache_aside(key="breaker:<id>", ttl=30, engine=engine)
    def load(id: int) -> int:
        return id

    try:
        for number in range(3):
            assert engine.breaker.state == "closed"
            assert load(number) == number
        assert engine.breaker.state == "open"
        assert load.error_kinds() == {"ConnectionError": 3}
        assert load(3) == 3
        assert load.error_kinds() == {"ConnectionError": 3, "CircuitOpenError": 1}
        now[0] += 0.49
        assert engine.breaker.state == "open"
        now[0] += 0.02  # half a second after it opened
        assert engine.breaker.state == "half-open"
        assert load(4) == 4  # the probe: it tries Redis, fails, and the breaker opens again
        assert load.error_kinds() == {"ConnectionError": 4, "CircuitOpenError": 1}
        assert engine.breaker.state == "open"
        assert engine.breaker.opened == 2
        assert load(5) == 5
        assert load.error_kinds() == {"ConnectionError": 4, "CircuitOpenError": 2}
    finally:
        engine.close()


async def test_one_breaker_serves_an_engines_sync_and_async_clients() -> None:
    """operations.md, "Circuit breaker": one breaker per engine, shared by its sync and
    async clients. Failures of either side open it for both."""
    for failing_side in ("sync", "async"):
        engine = CacheEngine.from_url(dead_url(), prefix=unique_prefix())

        @cache_aside(key="sync-side:<id>", ttl=30, engine=engine)
        def plain(id: int) -> int:
            return id

        @cache_aside(key="async-side:<id>", ttl=30, engine=engine)
        async def coroutine(id: int) -> int:
            return id

        try:
            for number in range(3):
                if failing_side == "sync":
                    assert plain(number) == number
                else:
                    assert await coroutine(number) == number
            assert engine.breaker.state == "open"
            if failing_side == "sync":
                assert plain.error_kinds() == {"ConnectionError": 3}
                assert await coroutine(9) == 9
                assert coroutine.error_kinds() == {"CircuitOpenError": 1}  # Redis skipped
            else:
                assert coroutine.error_kinds() == {"ConnectionError": 3}
                assert plain(9) == 9
                assert plain.error_kinds() == {"CircuitOpenError": 1}
        finally:
            await engine.aclose()


# -- same-process sharers of a failed load ----------------------------------------------


def test_threads_sharing_a_failed_load_all_get_its_exception(engine: CacheEngine) -> None:
    """consistency.md, "Owner failure": callers in the loader's own process that were
    sharing its call get its exception."""
    calls: list[str] = []

    @cache_aside(key="shared-failure:<id>", ttl=30, engine=engine)
    def load(id: str) -> str:
        calls.append(id)
        time.sleep(0.3)
        raise LoaderFailedError(f"primary down for {id}")

    start = threading.Barrier(8)
    outcomes: list[object] = []

    def call() -> None:
        start.wait()
        try:
            outcomes.append(load("k"))
        except LoaderFailedError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=call) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert calls == ["k"]  # one load, whose failure every caller got
    assert len(outcomes) == 8
    assert all(isinstance(o, LoaderFailedError) for o in outcomes)
    assert {str(o) for o in outcomes} == {"primary down for k"}


async def test_tasks_sharing_a_failed_load_all_get_its_exception(engine: CacheEngine) -> None:
    """The same for asyncio tasks of one event loop."""
    calls: list[str] = []

    @cache_aside(key="shared-failure:<id>", ttl=30, engine=engine)
    async def load(id: str) -> str:
        calls.append(id)
        await asyncio.sleep(0.3)
        raise LoaderFailedError(f"primary down for {id}")

    outcomes = await asyncio.gather(*(load("k") for _ in range(8)), return_exceptions=True)
    assert calls == ["k"]
    assert all(isinstance(o, LoaderFailedError) for o in outcomes)
    assert {str(o) for o in outcomes} == {"primary down for k"}


# -- refresh ahead --------------------------------------------------------------------


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
        assert event.wait(5)
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
            assert hits_done.wait(5)
            time.sleep(0.1)  # room for any other refresh of this key to reach Redis
            waiting.append(h.raw.scard(fn.key("k") + ":waiters"))
            return None

        async def later() -> None:
            assert await eventually(hits_done.is_set)
            await asyncio.sleep(0.1)
            waiting.append(h.raw.scard(fn.key("k") + ":waiters"))

        return later()

    fn = cache_aside(key="hot:<id>", ttl=30, refresh_ahead=5, engine=h.engine)(
        versions(h.mode, calls, hold)
    )
    assert await h.run(fn, "k") == "v1"
    h.raw.pexpire(fn.key("k"), 3_000)  # inside the 5 s window
    answers = [await h.run(fn.lookup, "k") for _ in range(50)]
    hits_done.set()
    assert all((a.value, a.source) == ("v1", Source.CACHE) for a in answers)
    assert await settle(h.mode, h.engine, 5)
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

    winner = cache_aside(key="race:<id>", ttl=30, refresh_ahead=5, engine=h.engine)(
        versions(h.mode, winner_calls, hold)
    )
    loser = cache_aside(key="race:<id>", ttl=30, refresh_ahead=5, engine=loser_engine)(
        versions(h.mode, loser_calls, lambda number: None)
    )
    waiters = winner.key("k") + ":waiters"
    assert await h.run(winner, "k") == "v1"
    h.raw.pexpire(winner.key("k"), 3_000)  # inside the 5 s window
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
    assert await settle(h.mode, loser_engine, 5)  # woken by the winner's store
    assert await settle(h.mode, h.engine, 5)
    assert (len(winner_calls), loser_calls) == (2, [])  # one reload across both
    again = await h.run(loser.lookup, "k")
    assert (again.value, again.source) == ("v2", Source.CACHE)


# -- what a thread may take from another ------------------------------------------------


class GatedJson:
    """A JSON serializer whose loads() holds one thread on its second call: user code
    running inside that thread's read, between Redis's reply and the read's end."""

    def __init__(self) -> None:
        self.held: threading.Thread | None = None
        self.held_calls = 0
        self.inside = threading.Event()
        self.release = threading.Event()

    def dumps(self, value: Any) -> bytes:
        return json.dumps(value).encode()

    def loads(self, data: bytes) -> Any:
        if threading.current_thread() is self.held:
            self.held_calls += 1
            if self.held_calls == 2:  # the first decodes the lookup, the second in the read
                self.inside.set()
                assert self.release.wait(10)
        return json.loads(data)


def test_a_thread_never_takes_another_threads_plain_read(
    engine: CacheEngine, twin: Any, clients: Any
) -> None:
    """consistency.md, "What a shared call may hand over": if the other thread merely
    read a value that was already in Redis, the joiner looks for itself (a thread can
    lose the GIL between a reply and its return, long enough for another process's
    invalidation to complete). A refresh_ahead hit is such a read. Here the leader is
    held between Redis's reply (v1) and its return, another process invalidates, and a
    second thread joins the leader's read: it must not be handed v1. (_flights.py:
    "Threads share only the miss path, and only answers sealed against staleness".)"""
    raw = clients[2]
    primary = {"k": "v1"}
    serializer = GatedJson()

    def read(id: str) -> str:
        return primary[id]

    fn = cache_aside(
        key="plain:<id>", ttl=30, refresh_ahead=5, serializer=serializer, engine=engine
    )(read)
    writer = cache_aside(key="plain:<id>", ttl=30, engine=twin())(read)
    assert fn("k") == "v1"
    raw.pexpire(fn.key("k"), 3_000)  # inside the window: a hit that starts a reload
    answers: dict[str, str] = {}
    leader = threading.Thread(target=lambda: answers.update(leader=fn("k")))
    joiner = threading.Thread(target=lambda: answers.update(joiner=fn("k")))
    serializer.held = leader
    leader.start()
    try:
        assert serializer.inside.wait(5), "the leader never decoded inside its read"
        primary["k"] = "v2"
        assert writer.invalidate("k") is Outcome.DELETED  # completes while v1 is held
        joiner.start()
        time.sleep(0.2)  # the joiner joins the leader's read, still in flight
    finally:
        serializer.release.set()
        leader.join(10)
        if joiner.ident is not None:
            joiner.join(10)
    assert engine.settle()
    assert answers == {"leader": "v1", "joiner": "v2"}


# -- Redis refusing, loading; the command line -------------------------------------------


async def test_a_replica_refusing_writes_fails_open(
    servers: Callable[..., RedisProcess],
) -> None:
    """operations.md: `READONLY`... with fail_open=True the loader runs and the caller
    gets its value; nothing is cached (a failover pointed the engine at a replica)."""
    master, replica = servers(), servers()
    engine = CacheEngine.from_url(replica.url, prefix=unique_prefix())
    admin = replica.admin()
    try:
        # Redis waits repl-diskless-sync-delay (5 s) before a replica's first sync:
        # as long as this test would wait for it.
        primary = master.admin()
        primary.config_set("repl-diskless-sync-delay", 0)
        primary.close()
        admin.replicaof("127.0.0.1", master.port)
        link_up = lambda: admin.info("replication")["master_link_status"] == "up"  # noqa: E731
        assert wait_until(link_up, timeout=20)

        @cache_aside(key="readonly:<id>", ttl=30, engine=engine)
        def plain(id: str) -> str:
            return id.upper()

        @cache_aside(key="readonly-async:<id>", ttl=30, engine=engine)
        async def coroutine(id: str) -> str:
            return id.upper()

        for number in range(3):
            result = plain.lookup(f"a{number}")
            assert (result.value, result.source) == (f"A{number}", Source.LOADER)
            result = await coroutine.lookup(f"a{number}")
            assert (result.value, result.source) == (f"A{number}", Source.LOADER)
        for fn in (plain, coroutine):
            kinds = fn.error_kinds()
            assert "ReadOnlyError" in kinds
            assert set(kinds) <= {"ReadOnlyError", "CircuitOpenError"}
            assert fn.stats().errors >= 3
        assert admin.dbsize() == 0
        admin.replicaof("NO", "ONE")  # writable again: what the outbox holds lands
        assert await engine.asettle()
    finally:
        admin.close()
        await engine.aclose()


async def test_a_server_still_loading_its_data_fails_open(
    servers: Callable[..., RedisProcess],
) -> None:
    """operations.md: `LOADING`... with fail_open=True the loader runs. A real server
    reloading its RDB file, slowed per key (key-load-delay) so that the load lasts
    long enough to call it meanwhile."""
    server = servers("--key-load-delay", "50", "--loading-process-events-interval-bytes", "1024")
    admin = server.admin()
    pipe = admin.pipeline(transaction=False)
    for number in range(30_000):
        pipe.set(f"filler:{number}", number)
    pipe.execute()
    admin.save()
    admin.close()
    server.kill()
    starter = threading.Thread(target=server.start)  # returns once loading is over
    probe = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=2, retry=None)
    engine = CacheEngine.from_url(server.url, prefix=unique_prefix())

    def loading() -> bool:
        try:
            probe.ping()
        except redis.exceptions.BusyLoadingError:
            return True
        except redis.ConnectionError:
            return False
        return False

    try:
        starter.start()
        assert await eventually(loading)

        @cache_aside(key="loading:<id>", ttl=30, engine=engine)
        def plain(id: str) -> str:
            return id.upper()

        @cache_aside(key="loading-async:<id>", ttl=30, engine=engine)
        async def coroutine(id: str) -> str:
            return id.upper()

        first = plain.lookup("a")
        second = await coroutine.lookup("a")
        assert loading()  # both calls met the server loading
        assert (first.value, first.source) == ("A", Source.LOADER)
        assert (second.value, second.source) == ("A", Source.LOADER)
        assert "BusyLoadingError" in plain.error_kinds()
        assert "BusyLoadingError" in coroutine.error_kinds()
    finally:
        probe.close()
        if starter.ident is not None:
            await asyncio.to_thread(starter.join, 60)
        await engine.aclose()


@needs_real_redis
def test_the_command_line_invalidate_revokes_a_load_in_flight(redis_engine: CacheEngine) -> None:
    """operations.md, "The command line": `cached-aside invalidate` deletes and revokes
    loads in flight: a load that began before it cannot store its value after it."""
    assert REDIS_URL is not None
    raw = redis_engine.client()
    primary = {"a": "v1"}
    loading, release = threading.Event(), threading.Event()

    @cache_aside(key="cli:<id>", ttl=30, engine=redis_engine)
    def load(id: str) -> str:
        value = primary[id]
        loading.set()
        assert release.wait(60)
        return value

    answers: list[str] = []
    reader = threading.Thread(target=lambda: answers.append(load("a")))
    reader.start()
    try:
        assert loading.wait(5)
        assert raw.exists(load.key("a") + ":lock") == 1
        primary["a"] = "v2"
        completed = subprocess.run(
            [sys.executable, "-m", "cached_aside", "--url", REDIS_URL, "invalidate", load.key("a")],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert json.loads(completed.stdout) == {"key": load.key("a"), "existed": False}
        assert raw.exists(load.key("a") + ":lock") == 0
    finally:
        release.set()
        reader.join(10)
    assert answers == ["v1"]  # began before the invalidation: its own answer
    assert raw.exists(load.key("a")) == 0  # but never stored
    assert load("a") == "v2"
