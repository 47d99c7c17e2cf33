"""The engine's lifecycle: built from a URL, functions registered once, one side per event loop,
close and aclose, and what a forked child inherits (every engine reset, nothing of its
parent's held)."""

from __future__ import annotations

import ast
import asyncio
import inspect
import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
import redis.asyncio.retry
from redis.backoff import NoBackoff
from redis.retry import Retry

import cached_aside
from cached_aside import (
    CacheEngine,
    Outcome,
    _defaults,
    cache_aside,
)
from cached_aside._catalog import Catalog
from cached_aside._lifecycle import PARTS
from cached_aside._outbox import Outbox
from cached_aside._stats import Stats

from .conftest import (
    PATIENCE,
    REDIS_URL,
    delete_prefix,
    needs_real_redis,
    unique_prefix,
    wait_until,
)
from .servers import dead_url


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


@needs_real_redis
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_child_forked_during_a_probe_can_load() -> None:
    # Was a defect: the per-function loader breakers are not reset after
    # fork (CacheEngine.after_fork resets the Redis breaker, flights and
    # stats, not Plan.loader_breaker; _engine.py:590 at HEAD). A child forked while a
    # parent thread was the half-open probe inherits _probing=True, with no thread
    # left to clear it: every call of that function in the child without a kept
    # value raises LoaderCircuitOpenError for the life of the child (gunicorn
    # --preload, multiprocessing); its lock may also be copied held. Fix: keep the
    # loader breakers reachable (the weak `decorated` set) and reset_after_fork()
    # them in the child.
    assert REDIS_URL is not None
    prefix = unique_prefix()
    engine = CacheEngine.from_url(REDIS_URL, prefix=prefix)
    mode = {"now": "fail"}
    probing, release = threading.Event(), threading.Event()

    @cache_aside(key="f:<id>", ttl=30, stale_if_error=60, engine=engine)
    def load(id: str) -> str:
        if mode["now"] == "fail":
            raise RuntimeError("the primary is down")
        if mode["now"] == "hang":
            probing.set()
            release.wait(PATIENCE)
        return "ok"

    breaker = load._plan.loader_breaker
    assert breaker is not None
    breaker.cooldown = 0.05
    now = [time.monotonic()]  # the breaker's clock moves when the test says
    breaker.clock = lambda: now[0]
    try:
        for id in range(5):
            with pytest.raises(RuntimeError):
                load(str(id))
        now[0] += 0.06
        mode["now"] = "hang"
        thread = threading.Thread(target=load, args=("probe",))
        thread.start()
        assert probing.wait(PATIENCE)
        reading, writing = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child
            try:
                mode["now"] = "ok"
                now[0] += 0.1
                try:
                    answer = load("child")
                except Exception as exc:
                    answer = type(exc).__name__
                os.write(writing, json.dumps(answer).encode())
            finally:
                os._exit(0)
        os.close(writing)
        release.set()
        thread.join()
        os.waitpid(pid, 0)
        answer = json.loads(os.read(reading, 1000))
        os.close(reading)
        assert answer == "ok", f"the child got {answer}"
    finally:
        delete_prefix(engine.client(), prefix)
        engine.close()


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


DOWN = "redis://127.0.0.1:1/0"


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


# -- the parts: each alone, and the one fork hook ---------------------------------

PACKAGE = Path(cached_aside.__file__).parent


def test_the_package_has_one_fork_hook() -> None:
    calls = [
        f"{path.name}:{node.lineno}"
        for path in PACKAGE.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.Attribute) and node.attr == "register_at_fork"
    ]
    assert len(calls) == 1, calls
    assert calls[0].startswith("_lifecycle.py:"), calls


def test_every_part_follows_the_lifecycle() -> None:
    for part in PARTS:
        assert inspect.iscoroutinefunction(part.aclose), part
        for name in ("close", "busy", "after_fork"):
            assert callable(getattr(part, name)), (part, name)


def _join(catalog: Catalog, name: str, stats: Stats) -> None:
    covers: Any = None  # no tags: nothing reads what a function covers
    catalog.join(name=name, stats=stats, tags=(), covers=covers, lock_ttl_ms=1000)


def test_the_catalog_keeps_two_functions_of_one_name_apart() -> None:
    catalog = Catalog(Outbox())
    first, second = Stats("fn"), Stats("fn")
    _join(catalog, "fn", first)
    _join(catalog, "fn", second)
    _join(catalog, "fn", first)  # met again (another engine in between): still one
    first.miss()
    second.miss()
    second.miss()
    assert [function.stats for function in catalog] == [first, second]
    assert catalog.total().misses == 3
    catalog.reset()
    assert catalog.total().misses == 0


@needs_real_redis
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_child_resets_every_part_a_parent_thread_held() -> None:
    assert REDIS_URL is not None
    engine = CacheEngine.from_url(REDIS_URL, prefix=unique_prefix())
    row = cache_aside(key="row:<id>", ttl=60, engine=engine)(lambda id: id)
    assert row("a") == "a"
    held = engine.sides.sync_side().held
    assert held is not None
    locks = [engine.catalog._lock, engine.sides._lock, engine.nearby._lock]
    for lock in locks:  # as if threads of the parent were inside them at fork time
        lock.acquire()
    try:

        def child() -> dict[str, Any]:
            parents = held.held  # the parent's connections are not the child's
            other = cache_aside(key="other:<id>", ttl=60, engine=engine)(lambda id: id)
            return {
                "held": parents,
                "served": [row("a"), other("b")],  # joins the catalog: its lock is new
                "functions": len(engine.catalog),
            }

        report = _fork_and_report(child)
    finally:
        for lock in locks:
            lock.release()
    assert held.held == 1  # this thread's connection, kept for its next command
    assert report == {"held": 0, "served": ["a", "b"], "functions": 2}
    engine.invalidate_prefix("")
    engine.close()


def test_an_engine_closes_its_parts_in_order_and_twice_is_harmless() -> None:
    engine = CacheEngine.from_url("redis://127.0.0.1:1/0", prefix=unique_prefix())
    engine.close(timeout=0.01)
    engine.close(timeout=0.01)
    assert engine.near_state() == "off"
    assert engine.pending_invalidations() == []

    async def closing() -> None:
        await engine.aclose(timeout=0.01)

    asyncio.run(closing())
