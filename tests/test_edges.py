"""The edges where a key used to get stuck or stale: cancellations, a store Redis
refuses, a stuck loader, fork(), one event loop per call, a field update racing a
load, long keys, a failing reload, and what a waiter in another process sees."""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import random
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from cached_aside import (
    BulkOutcome,
    CacheEngine,
    CacheUnavailableError,
    ConfigurationError,
    KeyArgumentError,
    Outcome,
    Source,
    _runtime,
    cache_aside,
)

from .conftest import (
    PATIENCE,
    REDIS_URL,
    Harness,
    delete_prefix,
    needs_real_redis,
    unique_prefix,
    wait_until,
)
from .injection import Injector, faulty_clients
from .servers import REDIS_SERVER, RedisProcess


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


@pytest.fixture
def small_server() -> Iterator[RedisProcess]:
    if REDIS_SERVER is None:
        pytest.fail("redis-server is not on PATH")
    process = RedisProcess("--maxmemory-policy", "noeviction").start()
    yield process
    process.stop()


def test_a_store_refused_for_lack_of_memory_gives_the_lock_back(
    small_server: RedisProcess,
) -> None:
    """Redis runs out of memory while the loader runs: the store is refused with
    OOM, the caller still gets the loader's value, and the lock is released (DEL
    works when writes are refused), so another process loads at once."""
    admin = small_server.admin()
    prefix = unique_prefix()
    engine = CacheEngine.from_url(small_server.url, prefix=prefix)
    other = CacheEngine.from_url(small_server.url, prefix=prefix)

    @cache_aside(key="row:<id>", ttl=30, engine=engine)
    def row(id: str) -> str:
        admin.config_set("maxmemory", 100_000)  # far below what Redis already uses
        return id * 100

    assert row("a") == "a" * 100
    assert row.error_kinds() == {"OutOfMemoryError": 1}  # the store, refused
    assert admin.exists(row.key("a") + ":lock") == 0
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        admin.set("still", "full")  # writes are still refused: the release got through
    admin.config_set("maxmemory", 0)
    again = cache_aside(key="row:<id>", ttl=30, engine=other)(lambda id: id * 100)
    assert again.lookup("a").source is Source.LOADER
    assert again.stats().lock_waits == 0
    engine.close()
    other.close()


def test_durations_redis_cannot_expire_are_refused_at_decoration() -> None:
    with pytest.raises(ConfigurationError, match="longer than Redis can expire"):
        cache_aside(key="k:<id>", ttl=sys.maxsize)
    with pytest.raises(ConfigurationError, match="lock_ttl"):
        cache_aside(key="k:<id>", ttl=1, lock_ttl=1e12)


def test_a_key_argument_that_is_not_valid_text_is_a_key_error() -> None:
    fn = cache_aside(key="file:<name>", ttl=1)(lambda name: name)
    with pytest.raises(KeyArgumentError, match="not valid text"):
        fn.key("report\udcff.pdf")  # as os.fsdecode makes of undecodable bytes


@needs_real_redis
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_child_forked_during_a_load_does_not_hang() -> None:
    """A thread is loading k when the process forks: the child's flight registry is
    a copy whose leader stayed behind; the child must read by itself."""
    assert REDIS_URL is not None
    prefix = unique_prefix()
    engine = CacheEngine.from_url(REDIS_URL, prefix=prefix)
    loading, release = threading.Event(), threading.Event()
    owner = os.getpid()

    @cache_aside(key="fork:<id>", ttl=30, engine=engine)
    def load(id: str) -> str:
        loading.set()
        release.wait(PATIENCE)
        return f"{id}-from-{os.getpid()}"

    thread = threading.Thread(target=load, args=("k",))
    thread.start()
    assert loading.wait(PATIENCE)
    reading, writing = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            os.write(writing, json.dumps(load("k")).encode())
        finally:
            os._exit(0)
    os.close(writing)
    waiters = engine.client()
    # the child waits on Redis for the parent's load...
    assert wait_until(lambda: waiters.scard(load.key("k") + ":waiters"))
    release.set()  # ...which stores now and wakes it
    thread.join()
    deadline = time.monotonic() + PATIENCE
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            pytest.fail("the forked child hung on its parent's flight")
        time.sleep(0.01)
    assert json.loads(os.read(reading, 1000)) == f"k-from-{owner}"  # the parent's load
    os.close(reading)
    delete_prefix(engine.client(), prefix)
    engine.close()


@needs_real_redis
def test_one_event_loop_per_call_does_not_leak_connections() -> None:
    """asyncio.run() per call (asgiref's async_to_sync does the same): each loop's
    client is closed with the loop, not kept for ever."""
    assert REDIS_URL is not None
    name = f"leak-{uuid.uuid4().hex[:8]}"
    engine = CacheEngine.from_url(REDIS_URL, prefix=unique_prefix(), client_name=name)

    @cache_aside(key="loop:<id>", ttl=30, engine=engine)
    async def get(id: str) -> str:
        return id

    for _ in range(60):
        assert asyncio.run(get("k")) == "k"
    raw = redis.Redis.from_url(REDIS_URL)
    connected = [c for c in raw.client_list() if c.get("name") == name]
    assert len(connected) <= 1, f"{len(connected)} connections left by 60 closed loops"
    delete_prefix(raw, engine.prefix)
    raw.close()
    engine.close()


def test_update_field_fences_a_load_that_read_the_old_row(engine: CacheEngine) -> None:
    """The load read stock 1; the writer set stock 2 in the primary and patched the
    cache (nothing cached yet: ABSENT). The load's older row must not be stored."""
    primary = {"stock": "1"}
    read_row, go = threading.Event(), threading.Event()

    @cache_aside(key="item:<id>", ttl=30, as_hash=True, engine=engine)
    def item(id: str) -> dict[str, str]:
        row = dict(primary)
        read_row.set()
        go.wait(5)
        return row

    answers: list[dict[str, str]] = []
    loader = threading.Thread(target=lambda: answers.append(item("p")))
    loader.start()
    read_row.wait(5)
    primary["stock"] = "2"
    assert item.update_field("p", field="stock", value="2") is Outcome.ABSENT
    go.set()
    loader.join()
    assert answers == [{"stock": "1"}]  # its caller gets what it read...
    assert item("p") == {"stock": "2"}  # ...but the cache never held the older row


def test_update_field_fences_a_refresh_in_flight(engine: CacheEngine, clients: Any) -> None:
    primary = {"stock": "1"}
    reloading, read_row, go = threading.Event(), threading.Event(), threading.Event()

    @cache_aside(key="item:<id>", ttl=30, refresh_ahead=29.9, as_hash=True, engine=engine)
    def item(id: str) -> dict[str, str]:
        row = dict(primary)
        if reloading.is_set():
            read_row.set()
            go.wait(5)
        return row

    assert item("p") == {"stock": "1"}
    time.sleep(0.15)  # inside the refresh window
    reloading.set()
    assert item("p") == {"stock": "1"}  # served at once; a reload starts
    read_row.wait(5)
    primary["stock"] = "2"
    assert item.update_field("p", "stock", "2") is Outcome.UPDATED
    go.set()
    assert engine.settle()  # the reload has finished
    assert clients[2].hget(item.key("p"), "stock") == b"2"  # not overwritten by the reload


async def test_invalidate_all_keeps_another_templates_long_keys(h: Harness) -> None:
    doc = h.cached(lambda url: {"url": url[:10]}, key="doc:<url>")
    reviews = h.cached(lambda url: ["good"], key="doc:<url>:reviews")
    url = "https://example.com/" + "x" * 260  # shortened to a head and a digest
    await h.run(doc, url)
    await h.run(reviews, url)
    assert await h.run(doc.invalidate_all) == BulkOutcome(1)
    assert h.raw.exists(doc.key(url)) == 0
    assert h.raw.exists(reviews.key(url)) == 1  # same head, another template


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


def test_a_strict_function_does_not_claim_to_serve_from_the_loader(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = CacheEngine.from_url("redis://127.0.0.1:1/0", prefix=unique_prefix())
    strict = cache_aside(key="s:<id>", ttl=1, engine=engine, fail_open=False)(lambda id: id)
    with (
        caplog.at_level(logging.WARNING, logger="cached_aside"),
        pytest.raises(CacheUnavailableError),
    ):
        strict("a")
    assert "callers get CacheUnavailableError" in caplog.text
    assert "served by the loader" not in caplog.text
    engine.close(timeout=0.05)


class Repository:
    """A repository whose reads are cached methods."""

    def __init__(self, engine: CacheEngine) -> None:
        self.engine = engine

    @cache_aside(key="repo:<id>", ttl=30)
    def find(self, id: str) -> dict[str, str]:
        """Find one row."""
        return {"id": id}


def test_a_bound_method_has_the_whole_api(cache_engine: CacheEngine) -> None:
    repo = Repository(cache_engine)
    bound = repo.find
    assert (bound.__name__, bound.__doc__) == ("find", "Find one row.")
    assert bound("x") == {"id": "x"}
    assert bound.lookup("x").source is Source.CACHE
    assert bound.error_kinds() == {}
    assert bound.stats().hits == 1
    assert bound.invalidate("x") is Outcome.DELETED
    assert bound.many(["x", "y"]) == [{"id": "x"}, {"id": "y"}]
    assert bound.invalidate_many(["x"]) == BulkOutcome(1)
    assert bound.invalidate_all() == BulkOutcome(1)


def _wait_in_another_process(url: str, prefix: str, results: Any) -> None:
    # A waiter without the wake-up would sleep out a 2.5 s BLPOP before looking again
    # (half its client's default 5 s socket timeout), not the usual 1 s: woken sooner
    # is told apart from that on a slow machine.
    _runtime.DEFAULT_BLOCK_LIMIT_MS = 2_500  # a spawned process of its own
    engine = CacheEngine(redis.Redis.from_url(url), prefix=prefix)
    fn = cache_aside(key="woken:<id>", ttl=30, engine=engine)(lambda id: "loaded by the waiter")
    result = fn.lookup("k")
    results.put((time.time(), result.value, result.source.value))
    engine.close()


@needs_real_redis
@pytest.mark.slow
def test_a_waiter_in_another_process_returns_right_after_the_store() -> None:
    """The owner's store wakes the waiters it registered: the waiter returns within
    milliseconds of it (measured ~1 ms), not after its BLPOP's timeout (2.5 s here)."""
    assert REDIS_URL is not None
    prefix = unique_prefix()
    raw = redis.Redis.from_url(REDIS_URL)
    client = redis.Redis.from_url(REDIS_URL)
    engine = CacheEngine(client, prefix=prefix)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    waiter: Any = None

    @cache_aside(key="woken:<id>", ttl=30, engine=engine)
    def load(id: str) -> str:
        nonlocal waiter
        waiter = context.Process(target=_wait_in_another_process, args=(REDIS_URL, prefix, results))
        waiter.start()
        deadline = time.monotonic() + PATIENCE
        while not raw.scard(f"{prefix}:{{woken:k}}:waiters"):  # until it is waiting
            assert time.monotonic() < deadline, "the other process never began to wait"
            time.sleep(0.005)
        time.sleep(0.05)  # well inside its BLPOP now
        return "loaded by the owner"

    assert load("k") == "loaded by the owner"
    stored = time.time()
    woke, value, source = results.get(timeout=PATIENCE)
    waiter.join(PATIENCE)
    assert (value, source) == ("loaded by the owner", "waited")
    assert woke - stored < 1.5, f"the waiter returned {woke - stored:.3f} s after the store"
    engine.close()
    client.close()  # the engine's client is ours: the engine does not close it
    delete_prefix(raw, prefix)
    raw.close()
    engine.close()
