"""Single-flight under real concurrency: threads, asyncio tasks, engines that share
only Redis (as two processes do), and real processes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio

from cached_aside import CacheEngine, Outcome, Source, cache_aside
from cached_aside._scripts import ScriptName

from .conftest import REDIS_URL, delete_prefix, needs_real_redis, unique_prefix


def test_fifty_threads_on_a_cold_key_load_once(engine: CacheEngine) -> None:
    calls = []

    @cache_aside(key="cold:<id>", ttl=30, engine=engine)
    def slow(id: str) -> dict[str, str]:
        calls.append(id)
        time.sleep(0.1)
        return {"id": id}

    results: list[Any] = []
    threads = [threading.Thread(target=lambda: results.append(slow("k"))) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == ["k"]
    assert results == [{"id": "k"}] * 50
    stats = slow.stats()
    assert stats.loads == 1
    # the others waited for that load, or (late starters) found it stored
    assert stats.stampedes_suppressed + stats.hits == 49
    assert stats.misses == stats.stampedes_suppressed + 1


async def test_five_hundred_tasks_on_a_cold_key_load_once(engine: CacheEngine) -> None:
    calls = []

    @cache_aside(key="cold:<id>", ttl=30, engine=engine)
    async def slow(id: str) -> list[str]:
        calls.append(id)
        await asyncio.sleep(0.1)
        return [id]

    results = await asyncio.gather(*(slow("k") for _ in range(500)))
    assert calls == ["k"]
    assert results == [["k"]] * 500
    assert slow.stats().stampedes_suppressed == 499


async def test_joined_callers_get_independent_copies(engine: CacheEngine) -> None:
    @cache_aside(key="copy:<id>", ttl=30, engine=engine)
    async def load(id: str) -> dict[str, list[int]]:
        await asyncio.sleep(0.05)
        return {"items": [1, 2]}

    first, second = await asyncio.gather(load("a"), load("a"))
    first["items"].append(3)
    assert second == {"items": [1, 2]}


def test_engines_sharing_only_redis_load_once(engine: CacheEngine, twin: Any) -> None:
    engines = [engine, *(twin() for _ in range(3))]
    calls = []
    functions = []
    for each in engines:

        @cache_aside(key="shared:<id>", ttl=30, engine=each)
        def slow(id: str) -> str:
            calls.append(id)
            time.sleep(0.2)
            return id.upper()

        functions.append(slow)
    results: list[Any] = []
    threads = [
        threading.Thread(target=lambda f=f: results.append(f.lookup("x")))
        for f in functions
        for _ in range(5)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == ["x"]
    assert [r.value for r in results] == ["X"] * 20
    # Everyone else waited for that load, or read it once it was stored (threads take
    # a shared answer only when it is a load, never a plain read).
    stats = [f.stats() for f in functions]
    assert sum(s.stampedes_suppressed + s.hits for s in stats) == 19
    assert sum(s.loads for s in stats) == 1


def test_owner_failure_hands_the_load_to_a_waiter(engine: CacheEngine, twin: Any) -> None:
    other = twin()
    started = threading.Event()
    calls = []

    @cache_aside(key="fail:<id>", ttl=30, lock_ttl=60, engine=engine)
    def failing(id: str) -> str:
        calls.append("owner")
        started.set()
        time.sleep(0.2)
        raise RuntimeError("primary timeout")

    @cache_aside(key="fail:<id>", ttl=30, lock_ttl=60, engine=other)
    def healthy(id: str) -> str:
        calls.append("waiter")
        return "fresh"

    errors: list[BaseException] = []

    def run_owner() -> None:
        try:
            failing("k")
        except RuntimeError as exc:
            errors.append(exc)

    owner = threading.Thread(target=run_owner)
    owner.start()
    assert started.wait(5)
    # The waiter blocks on the lock; when the owner fails it is woken at once and
    # loads itself, long before the 60 s lock ttl (the test's timeout is far shorter).
    result = healthy.lookup("k")
    owner.join()
    assert (result.value, result.source) == ("fresh", Source.LOADER)
    assert calls == ["owner", "waiter"]
    assert len(errors) == 1


def test_invalidation_during_a_load_refuses_the_stale_write(
    engine: CacheEngine, clients: Any
) -> None:
    primary = {"k": "v1"}
    loading = threading.Event()
    proceed = threading.Event()

    @cache_aside(key="lease:<id>", ttl=30, engine=engine)
    def read(id: str) -> str:
        value = primary[id]
        loading.set()
        assert proceed.wait(5)
        return value

    results: list[str] = []
    reader = threading.Thread(target=lambda: results.append(read("k")))
    reader.start()
    assert loading.wait(5)
    primary["k"] = "v2"  # the writer updates the primary ...
    assert read.invalidate("k") is Outcome.ABSENT  # ... and invalidates while the read loads
    proceed.set()
    reader.join()
    assert results == ["v1"]  # the reader began before the write: v1 is its answer
    assert clients[2].exists(read.key("k")) == 0  # but v1 was never stored
    assert read("k") == "v2"


async def test_pool_queues_instead_of_failing(redis_url_or_skip: str) -> None:
    prefix = unique_prefix()
    engine = CacheEngine.from_url(redis_url_or_skip, prefix=prefix, max_connections=4)

    @cache_aside(key="pool:<id>", ttl=30, engine=engine)
    async def load(id: int) -> int:
        await asyncio.sleep(0.01)
        return id

    try:
        results = await asyncio.gather(*(load(i) for i in range(500)))
        assert results == list(range(500))
        assert engine.async_client().connection_pool.max_connections == 4
    finally:
        await engine.aclose()
        cleanup = redis.Redis.from_url(redis_url_or_skip)
        delete_prefix(cleanup, prefix)
        cleanup.close()


@pytest.fixture
def redis_url_or_skip() -> str:
    if REDIS_URL is None:
        pytest.skip("no Redis server reachable at REDIS_URL or 127.0.0.1:6379")
    return REDIS_URL


PROCESS_SCRIPT = textwrap.dedent(
    """
    import sys, threading, time
    from cached_aside import CacheEngine, cache_aside
    url, prefix, log = sys.argv[1:4]
    engine = CacheEngine.from_url(url, prefix=prefix)

    @cache_aside(key="multi:<id>", ttl=30, engine=engine)
    def load(id):
        with open(log, "a") as out:
            out.write("load\\n")
        time.sleep(0.3)
        return {"id": id}

    start = float(sys.argv[4])
    time.sleep(max(0.0, start - time.time()))
    results = []
    threads = [threading.Thread(target=lambda: results.append(load("k"))) for _ in range(20)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert results == [{"id": "k"}] * 20, results
    stats = load.stats()
    print(stats.stampedes_suppressed + stats.hits)  # callers served without loading
    """
)


@needs_real_redis
@pytest.mark.slow
def test_processes_share_one_load(tmp_path: Path) -> None:
    assert REDIS_URL is not None
    prefix = unique_prefix()
    log = tmp_path / "loads.txt"
    start = time.time() + 1.5  # let every interpreter start before the stampede
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", PROCESS_SCRIPT, REDIS_URL, prefix, str(log), str(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = [process.communicate(timeout=60) for process in processes]
    try:
        assert all(p.returncode == 0 for p in processes), outputs
        assert log.read_text().splitlines() == ["load"]
        assert sum(int(out) for out, _ in outputs) == 79
    finally:
        cleanup = redis.Redis.from_url(REDIS_URL)
        delete_prefix(cleanup, prefix)
        cleanup.close()


def test_a_value_stored_by_another_process_is_a_hit(redis_url_or_skip: str) -> None:
    prefix = unique_prefix()
    script = textwrap.dedent(
        """
        import sys
        from cached_aside import CacheEngine, cache_aside
        engine = CacheEngine.from_url(sys.argv[1], prefix=sys.argv[2])
        @cache_aside(key="product:<id>", ttl=30, as_hash=True, engine=engine)
        def get_product(id):
            return {"id": id, "stock": 7}
        print(get_product.lookup("p-1").source.value)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script, redis_url_or_skip, prefix],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    assert out.strip() == "loader"
    engine = CacheEngine.from_url(redis_url_or_skip, prefix=prefix)

    @cache_aside(key="product:<id>", ttl=30, as_hash=True, engine=engine)
    def get_product(id: str) -> dict[str, str]:
        raise AssertionError("must not load: the other process cached it")

    try:
        assert get_product("p-1") == {"id": "p-1", "stock": "7"}
    finally:
        delete_prefix(engine.client(), prefix)
        engine.close()


async def test_a_read_starting_after_invalidate_returns_never_joins_an_older_lookup(
    engine: CacheEngine,
) -> None:
    """A lookup that Redis answered before the delete may serve the read that made it,
    but never a read that starts after invalidate() has returned."""
    version = {"v": 1}

    @cache_aside(key="order:<id>", ttl=30, engine=engine)
    async def read(id: str) -> int:
        return version["v"]

    assert await read("k") == 1  # cached: v1
    side = engine.sides.async_side()
    assert side.pipeline is not None  # commands that answer at once share its connection
    real_call = side.pipeline.call
    invalidate_sha = side.scripts[ScriptName.INVALIDATE].sha
    send_invalidation = asyncio.Event()
    lookup_answered = asyncio.Event()
    deliver_lookup = asyncio.Event()
    hold_lookups = False

    async def held(args: tuple[Any, ...]) -> Any:
        if args[0] == "EVALSHA" and args[1] == invalidate_sha:
            await send_invalidation.wait()
        reply = await real_call(args)
        if args[0] == "GET" and hold_lookups:
            lookup_answered.set()
            await deliver_lookup.wait()  # Redis answered v1; the reply is still in flight
        return reply

    side.pipeline.call = held  # type: ignore[method-assign]
    try:
        version["v"] = 2  # the writer updated the primary and now invalidates
        invalidation = asyncio.create_task(read.invalidate("k"))
        await asyncio.sleep(0)
        hold_lookups = True
        early = asyncio.create_task(read("k"))  # starts while the invalidation is under way
        await lookup_answered.wait()
        hold_lookups = False
        send_invalidation.set()
        assert await invalidation is Outcome.DELETED
        late = asyncio.create_task(read("k"))  # starts after invalidate() returned
        await asyncio.sleep(0.01)
        deliver_lookup.set()
        assert await early == 1  # began before the invalidation returned: a fair answer
        assert await late == 2
    finally:
        side.pipeline.call = real_call  # type: ignore[method-assign]
