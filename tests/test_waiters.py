"""Waiting on another caller's load: waiters are woken at once by its store, its failure or an
invalidation, in this process and in others, and take the load over when its owner fails or
dies. Engines with clients of their own stand for processes."""

from __future__ import annotations

import asyncio
import multiprocessing
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
import redis.asyncio
import redis.asyncio.retry

from cached_aside import (
    CacheEngine,
    Outcome,
    Source,
    _runtime,
    cache_aside,
)

from .conftest import (
    PATIENCE,
    REDIS_URL,
    WOKEN_WITHIN,
    Harness,
    LoaderFailedError,
    delete_prefix,
    eventually,
    needs_real_redis,
    run_in_threads,
    unique_prefix,
    wait_until,
)


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


def _wait_in_another_process(url: str, prefix: str, results: Any, ready: Any, go: Any) -> None:
    # A waiter without the wake-up would sleep out a 20 s BLPOP (its client has no
    # socket timeout, the owner's lock 60 s to live) before looking again: woken
    # sooner is told apart from that however slow the machine.
    _runtime.DEFAULT_BLOCK_LIMIT_MS = 20_000  # a spawned process of its own
    engine = CacheEngine(redis.Redis.from_url(url), prefix=prefix)
    fn = cache_aside(key="woken:<id>", ttl=30, lock_ttl=60, engine=engine)(
        lambda id: "loaded by the waiter"
    )
    ready.set()  # started and imported: a spawn can take long on a loaded machine
    assert go.wait(120)
    result = fn.lookup("k")
    results.put((time.time(), result.value, result.source.value))
    engine.close()


@needs_real_redis
@pytest.mark.slow
def test_a_waiter_in_another_process_returns_right_after_the_store() -> None:
    """The owner's store wakes the waiters it registered: the waiter returns within
    milliseconds of it (measured ~1 ms), not after its BLPOP's timeout (20 s here)."""
    assert REDIS_URL is not None
    prefix = unique_prefix()
    raw = redis.Redis.from_url(REDIS_URL)
    client = redis.Redis.from_url(REDIS_URL)
    engine = CacheEngine(client, prefix=prefix)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    ready, go = context.Event(), context.Event()
    args = (REDIS_URL, prefix, results, ready, go)
    waiter = context.Process(target=_wait_in_another_process, args=args)
    waiter.start()
    assert ready.wait(120), "the other process never started"  # a bound on a hang

    # A lock far longer than any stall: the waiter must wait, not take the load over.
    @cache_aside(key="woken:<id>", ttl=30, lock_ttl=60, engine=engine)
    def load(id: str) -> str:
        go.set()
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
    assert woke - stored < 10, f"the waiter returned {woke - stored:.3f} s after the store"
    engine.close()
    client.close()  # the engine's client is ours: the engine does not close it
    delete_prefix(raw, prefix)
    raw.close()
    engine.close()


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
        # 200 threads starve the renewer: a lock far above any stall (single flight
        # is the point here, not renewal).
        @cache_aside(key="wait:<id>", ttl=30, lock_ttl=60, engine=each)
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

    run_in_threads(200, call)
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
