"""The holes of textbook cache-aside, each closed and proven: repeated stampedes,
owner failure and death, loaders slower than their lock, refresh-ahead."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from cached_aside import CacheEngine, Source, cache_aside
from cached_aside._scripts import ScriptName

from .conftest import REDIS_URL, delete_prefix, unique_prefix
from .injection import counting_writes

TRIALS = 30


def run_threads(count: int, target: Any) -> None:
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def test_fifty_threads_on_two_engines_load_once_in_every_trial(
    engine: CacheEngine, twin: Any
) -> None:
    engines = [engine, twin()]
    loads: list[str] = []
    functions = []
    for each in engines:

        @cache_aside(key="trial:<id>", ttl=30, engine=each)
        def load(id: str) -> str:
            loads.append(id)
            time.sleep(0.02)
            return id

        functions.append(load)
    for trial in range(TRIALS):
        results: list[str] = []

        def call(i: int, key: str = f"k{trial}", out: list[str] = results) -> None:
            out.append(functions[i % 2](key))

        run_threads(50, call)
        assert results == [f"k{trial}"] * 50
    assert sorted(loads) == sorted(f"k{t}" for t in range(TRIALS))  # one load per trial


async def test_five_hundred_tasks_load_once_in_every_trial(engine: CacheEngine) -> None:
    loads: list[str] = []

    @cache_aside(key="trial:<id>", ttl=30, engine=engine)
    async def load(id: str) -> str:
        loads.append(id)
        await asyncio.sleep(0.01)
        return id

    for trial in range(TRIALS):
        assert await asyncio.gather(*(load(f"k{trial}") for _ in range(500))) == [f"k{trial}"] * 500
    assert loads == [f"k{t}" for t in range(TRIALS)]


def test_two_hundred_waiters_finish_after_one_load(engine: CacheEngine, twin: Any) -> None:
    engines = [
        engine,
        twin(),
        twin(),
        twin(),
    ]
    loaded_at: list[float] = []
    functions = []
    for each in engines:

        @cache_aside(key="wait:<id>", ttl=30, engine=each)
        def load(id: str) -> str:
            time.sleep(0.1)
            loaded_at.append(time.monotonic())
            return "value"

        functions.append(load)
    finished: list[tuple[float, Source]] = []
    barrier = threading.Barrier(200)

    def call(i: int) -> None:
        barrier.wait()
        result = functions[i % 4].lookup("k")
        finished.append((time.monotonic(), result.source))

    run_threads(200, call)
    sources = [source for _, source in finished]
    assert len(loaded_at) == 1
    assert len(finished) == 200
    assert sources.count(Source.LOADER) == 1
    # Everyone else waited for that load, or (a slow starter) found it already stored.
    assert set(sources) - {Source.LOADER} <= {Source.WAITED, Source.CACHE}
    assert all(at >= loaded_at[0] for at, _ in finished)
    suppressed = sum(f.stats().stampedes_suppressed for f in functions)
    assert suppressed == sources.count(Source.WAITED)


async def test_owner_failure_hands_the_load_to_a_waiting_task(
    engine: CacheEngine, twin: Any
) -> None:
    other = twin()
    started = asyncio.Event()
    calls: list[str] = []

    @cache_aside(key="fail:<id>", ttl=30, lock_ttl=60, engine=engine)
    async def failing(id: str) -> str:
        calls.append("owner")
        started.set()
        await asyncio.sleep(0.1)
        raise RuntimeError("primary timeout")

    @cache_aside(key="fail:<id>", ttl=30, lock_ttl=60, engine=other)
    async def healthy(id: str) -> str:
        calls.append("waiter")
        return "fresh"

    owner = asyncio.create_task(failing("k"))
    await started.wait()
    waiter = await healthy.lookup("k")  # woken at once, long before the 60 s lock ttl
    with pytest.raises(RuntimeError, match="primary timeout"):
        await owner
    assert (waiter.value, waiter.source) == ("fresh", Source.LOADER)
    assert calls == ["owner", "waiter"]


OWNER_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from cached_aside import CacheEngine, cache_aside
    url, prefix, marker = sys.argv[1:4]
    engine = CacheEngine.from_url(url, prefix=prefix)

    @cache_aside(key="dies:<id>", ttl=30, lock_ttl=3.0, engine=engine)
    def load(id):
        open(marker, "w").close()
        time.sleep(60)
        return "never"

    load("k")
    """
)


def test_owner_killed_mid_load_is_replaced_after_the_lock_expires(tmp_path: Path) -> None:
    if REDIS_URL is None:
        pytest.skip("no Redis server reachable at REDIS_URL or 127.0.0.1:6379")
    prefix = unique_prefix()
    marker = tmp_path / "loading"
    owner = subprocess.Popen([sys.executable, "-c", OWNER_SCRIPT, REDIS_URL, prefix, str(marker)])
    engine = CacheEngine.from_url(REDIS_URL, prefix=prefix)
    try:
        deadline = time.monotonic() + 20
        while not marker.exists():
            assert owner.poll() is None
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # While it lives, the owner renews its 1 s lease: seen rising, twice.
        lock, last, rises = engine.key_head + "dies:k}:lock", None, 0
        while rises < 2:
            assert time.monotonic() < deadline, "the owner's lease was not renewed"
            left = engine.client().pttl(lock)
            assert left > 0, "the owner's lock lapsed while it lived"
            rises += last is not None and left > last
            last = left
            time.sleep(0.02)
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(10)

        @cache_aside(key="dies:<id>", ttl=30, lock_ttl=3.0, engine=engine)
        def load(id: str) -> str:
            return "recovered"

        # the dead owner's lock outlives the kill: 3 s is ample for the steps between
        assert engine.client().exists(load.key("k") + ":lock") == 1
        result = load.lookup("k")  # waits for the dead owner's lock to expire
        assert (result.value, result.source) == ("recovered", Source.LOADER)
        assert load.stats().loads == 1
    finally:
        if owner.poll() is None:
            owner.kill()
        delete_prefix(engine.client(), prefix)
        engine.close()


PROCESS_TRIALS_SCRIPT = textwrap.dedent(
    """
    import sys, threading, time
    from cached_aside import CacheEngine, cache_aside
    url, prefix, log, start, trials = sys.argv[1:6]
    engine = CacheEngine.from_url(url, prefix=prefix)

    @cache_aside(key="trial:<id>", ttl=30, engine=engine)
    def load(id):
        with open(log, "a") as out:
            out.write(id + "\\n")
        time.sleep(0.05)
        return id

    for trial in range(int(trials)):
        time.sleep(max(0.0, float(start) + trial * 0.25 - time.time()))
        results = []
        threads = [threading.Thread(target=lambda: results.append(load(f"k{trial}")))
                   for _ in range(20)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert results == [f"k{trial}"] * 20, results
    """
)


@pytest.mark.slow
def test_four_processes_of_twenty_threads_load_once_in_every_trial(tmp_path: Path) -> None:
    if REDIS_URL is None:
        pytest.skip("no Redis server reachable at REDIS_URL or 127.0.0.1:6379")
    prefix = unique_prefix()
    log = tmp_path / "loads.txt"
    start = time.time() + 2.0
    argv = [
        sys.executable,
        "-c",
        PROCESS_TRIALS_SCRIPT,
        REDIS_URL,
        prefix,
        str(log),
        str(start),
        str(TRIALS),
    ]
    processes = [subprocess.Popen(argv, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    try:
        errors = [process.communicate(timeout=120)[1] for process in processes]
        assert all(p.returncode == 0 for p in processes), errors
        assert sorted(log.read_text().split()) == sorted(f"k{t}" for t in range(TRIALS))
    finally:
        cleanup = redis.Redis.from_url(REDIS_URL)
        delete_prefix(cleanup, prefix)
        cleanup.close()


def test_refresh_ahead_keeps_a_hot_key_from_ever_missing(engine: CacheEngine, twin: Any) -> None:
    engines = [engine, twin()]
    versions = iter(range(1, 1000))
    loads: list[int] = []
    functions = []
    for each in engines:

        @cache_aside(key="hot:<id>", ttl=1.0, refresh_ahead=0.6, engine=each)
        def load(id: str) -> int:
            version = next(versions)
            loads.append(version)
            time.sleep(0.02)
            return version

        functions.append(load)
    assert functions[0]("k") == 1
    seen: list[tuple[Source, int]] = []
    stop = time.monotonic() + 2.5  # more than two ttls: without refreshes it would expire

    def reader(i: int) -> None:
        while time.monotonic() < stop:
            result = functions[i % 2].lookup("k")
            seen.append((result.source, result.value))
            time.sleep(0.005)

    run_threads(4, reader)
    assert {source for source, _ in seen} == {Source.CACHE}  # no reader ever missed
    assert len(loads) >= 4  # refreshed about every 0.4 s
    # Each refresh loaded once and its value was served: no load was wasted.
    assert {version for _, version in seen} | {1} == set(loads)
    assert loads == sorted(loads)


async def test_refresh_ahead_with_tasks(engine: CacheEngine) -> None:
    loads: list[int] = []

    @cache_aside(key="hot:<id>", ttl=0.6, refresh_ahead=0.4, engine=engine)
    async def load(id: str) -> int:
        loads.append(len(loads) + 1)
        await asyncio.sleep(0.01)
        return loads[-1]

    await load("k")
    sources: set[Source] = set()
    stop = time.monotonic() + 1.5

    async def reader() -> None:
        while time.monotonic() < stop:
            sources.add((await load.lookup("k")).source)
            await asyncio.sleep(0.005)

    await asyncio.gather(*(reader() for _ in range(5)))
    assert sources == {Source.CACHE}
    assert len(loads) >= 4
    assert len(engine.sides.async_side().tasks) <= 1  # background refreshes finish


def test_refresh_ahead_must_be_shorter_than_ttl() -> None:
    with pytest.raises(ValueError, match="refresh_ahead"):
        cache_aside(key="x:<id>", ttl=1, refresh_ahead=1)


async def test_five_hundred_tasks_cost_one_lookup_and_one_lock_attempt(engine: CacheEngine) -> None:
    @cache_aside(key="count:<id>", ttl=30, engine=engine)
    async def load(id: str) -> str:
        # Hold the load until every other task has joined, however slow the machine.
        flight = engine.sides.async_side().flights.active[load.key(id)]
        for _ in range(500):
            if len(flight.joiners or ()) == 499:
                break
            await asyncio.sleep(0.01)
        return id

    for script in ScriptName:  # known to the server: no NOSCRIPT round trips counted
        await engine.async_client().script_load(script.value)
    counted = counting_writes(engine.async_client())
    assert await asyncio.gather(*(load("k") for _ in range(500))) == ["k"] * 500
    sent = counted.ops
    assert (sent.count("GET"), sent.count("ACQUIRE")) == (1, 1), sent
    assert load.stats().loads == 1
