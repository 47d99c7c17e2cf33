"""Leases renewed while the loader runs: a slow loader keeps its lock and loads once,
a lease taken away is renewed no more (and its late write is refused), renewal ends
however the load ends, and a forked child renews nothing of its parent's. Against
real Redis and fakeredis, sync and async."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis

from cached_aside import CacheEngine, LoaderTimeoutError, Source, _leases, cache_aside

from .conftest import Harness, needs_real_redis
from .servers import REDIS_SERVER, RedisProcess

# Leases long enough that a process starved of CPU for a second still renews in time
# (0.3 s lapsed on a loaded machine): these tests observe renewals, they never time them.
LEASE = 2.0  # seconds: renewed every 0.67 s
SLOW_LEASE = 2.0  # the slow-loader test's: renewed every 0.67 s, lost after 2 s unrenewed
HANG = 30.0  # seconds: a generous upper bound on a hang, never reached when all is well
# Renewals watched once a caller waits on a lock: over 3 periods (2 s) after it was
# told the lock's pttl (2 s at most), it waited that out and waits again; and the
# loader held its lock for more than a lease.
WAITED = 4


class Renewals:
    """Watches a lock's pttl from outside: a renewal shows as a rise."""

    def __init__(self, raw: Any, lock_key: str) -> None:
        self.raw = raw
        self.lock_key = lock_key

    def wait(self, count: int) -> None:
        """Block until the lock was renewed `count` times (it must stay held)."""
        deadline = time.monotonic() + HANG
        seen, last = 0, None
        while seen < count:
            assert time.monotonic() < deadline, f"renewed {seen} times, not {count}"
            left = self.raw.pttl(self.lock_key)
            assert left > 0, "the lock lapsed while its loader ran"
            if last is not None and left > last:
                seen += 1
            last = left
            time.sleep(0.01)

    async def await_(self, count: int) -> None:
        """As wait(), from a task (the pttl reads are short sync calls)."""
        deadline = time.monotonic() + HANG
        seen, last = 0, None
        while seen < count:
            assert time.monotonic() < deadline, f"renewed {seen} times, not {count}"
            left = self.raw.pttl(self.lock_key)
            assert left > 0, "the lock lapsed while its loader ran"
            if last is not None and left > last:
                seen += 1
            last = left
            await asyncio.sleep(0.01)


def until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + HANG
    while not condition():
        assert time.monotonic() < deadline, "never happened"
        time.sleep(0.005)


def test_a_slow_loader_keeps_its_lease_and_loads_once_while_many_wait(
    engine: CacheEngine, twin: Any, clients: Any
) -> None:
    """The loader runs for more than a lease (4 renewals of a 2 s lease); 12 callers
    in two engines (two processes, as far as Redis can tell) wait for its one load,
    the other engine's past its wait's bound (the lock's pttl) and again."""
    other = twin()
    release, loading = threading.Event(), threading.Event()
    loads: list[str] = []

    def load(id: str) -> str:
        loads.append(id)
        loading.set()
        assert release.wait(HANG)
        return f"row {id}"

    mine = cache_aside(key="slow:<id>", ttl=30, lock_ttl=SLOW_LEASE, engine=engine)(load)
    theirs = cache_aside(key="slow:<id>", ttl=30, lock_ttl=SLOW_LEASE, engine=other)(load)
    results: list[Any] = []
    first = threading.Thread(target=lambda: results.append(mine.lookup("a")))
    first.start()
    assert loading.wait(HANG)
    callers = [
        threading.Thread(target=lambda fn=fn: results.append(fn.lookup("a")))
        for fn in [mine, theirs] * 6
    ]
    for caller in callers:
        caller.start()
    until(lambda: theirs.stats().lock_waits > 0)  # the other engine waits on the lock
    Renewals(clients[2], mine.key("a") + ":lock").wait(WAITED)
    assert loads == ["a"]
    assert results == []  # every caller, in both engines, still waits for the one load
    release.set()
    for thread in [first, *callers]:
        thread.join(HANG)
    assert loads == ["a"]
    assert [r.value for r in results] == ["row a"] * 13
    assert sorted(r.source.value for r in results).count(Source.LOADER.value) == 1
    assert _leases.running() == 0
    assert clients[2].exists(mine.key("a") + ":lock") == 0


async def test_a_slow_async_loader_keeps_its_lease_and_loads_once_while_many_wait(
    engine: CacheEngine, twin: Any, clients: Any
) -> None:
    other = twin()
    release, loading = asyncio.Event(), asyncio.Event()
    loads: list[str] = []

    async def load(id: str) -> str:
        loads.append(id)
        loading.set()
        await asyncio.wait_for(release.wait(), HANG)
        return f"row {id}"

    mine = cache_aside(key="slow:<id>", ttl=30, lock_ttl=SLOW_LEASE, engine=engine)(load)
    theirs = cache_aside(key="slow:<id>", ttl=30, lock_ttl=SLOW_LEASE, engine=other)(load)
    first = asyncio.create_task(mine.lookup("a"))
    await asyncio.wait_for(loading.wait(), HANG)
    callers = [asyncio.create_task(fn.lookup("a")) for fn in [mine, theirs] * 6]
    deadline = time.monotonic() + HANG
    while not theirs.stats().lock_waits:  # until the other engine waits on the lock
        assert time.monotonic() < deadline, "the other engine never waited"
        await asyncio.sleep(0.005)
    await Renewals(clients[2], mine.key("a") + ":lock").await_(WAITED)
    assert loads == ["a"]
    release.set()
    results = await asyncio.wait_for(asyncio.gather(first, *callers), HANG)
    assert loads == ["a"]
    assert [r.value for r in results] == ["row a"] * 13
    assert [r.source for r in results].count(Source.LOADER) == 1
    assert _leases.running() == 0


def test_a_lease_taken_away_is_renewed_no_more_and_its_late_write_is_refused(
    engine: CacheEngine, twin: Any, clients: Any
) -> None:
    """Fenced, not trusted: when the lock changes hands under a loader (its lease
    lapsed, say its process stalled longer than a lease), its renewal is refused and
    stops, and its late write is refused; the cache keeps the newer value."""
    raw = clients[2]
    release, loading = threading.Event(), threading.Event()

    @cache_aside(key="taken:<id>", ttl=30, lock_ttl=LEASE, engine=engine)
    def slow(id: str) -> str:
        loading.set()
        assert release.wait(HANG)
        return "old"

    @cache_aside(key="taken:<id>", ttl=30, lock_ttl=LEASE, engine=twin())
    def fast(id: str) -> str:
        return "new"

    results: list[str] = []
    owner = threading.Thread(target=lambda: results.append(slow("k")))
    owner.start()
    assert loading.wait(HANG)
    lock = slow.key("k") + ":lock"
    Renewals(raw, lock).wait(1)
    raw.set(lock, "another-holder", px=60_000)
    until(lambda: _leases.running() == 0)  # the next renewal was refused: no more
    assert raw.get(lock) == b"another-holder"
    assert raw.pttl(lock) > 50_000  # and it did not touch the other holder's lock
    raw.delete(lock)  # the other holder is done with it
    assert fast.lookup("k").source is Source.LOADER
    release.set()
    owner.join(HANG)
    assert results == ["old"]  # the slow caller gets what it loaded ...
    assert slow.lookup("k").value == "new"  # ... but the cache keeps the newer value


class Interrupt(BaseException):
    """Stands for KeyboardInterrupt and its kin."""


ENDINGS = ["returns", "raises", "interrupted", "times out", "store refused"]


@pytest.mark.parametrize("ending", ENDINGS)
def test_renewal_stops_however_the_load_ends(
    ending: str, engine: CacheEngine, clients: Any
) -> None:
    raw = clients[2]
    give_up = threading.Event()
    # The loader sees a renewal before the caller gives up on it, however slow the machine.
    options: dict[str, Any] = {"loader_timeout": 2 * LEASE} if ending == "times out" else {}

    @cache_aside(key="ends:<id>", ttl=30, lock_ttl=LEASE, engine=engine, **options)
    def load(id: str) -> str:
        Renewals(raw, load.key(id) + ":lock").wait(1)
        assert _leases.running() == 1
        if ending == "raises":
            raise LookupError("the primary failed")
        if ending == "interrupted":
            raise Interrupt
        if ending == "times out":
            give_up.wait(HANG)  # abandoned by the caller past loader_timeout
        if ending == "store refused":
            load.invalidate(id)  # revokes the lease: the store will be refused
        return "row"

    expected: dict[str, type[BaseException]] = {
        "raises": LookupError,
        "interrupted": Interrupt,
        "times out": LoaderTimeoutError,
    }
    try:
        if ending in expected:
            with pytest.raises(expected[ending]):
                load("a")
        else:
            result = load.lookup("a")
            assert result.value == "row"
        assert _leases.running() == 0
        assert raw.exists(load.key("a") + ":lock") == 0
        assert raw.exists(load.key("a")) == (ending == "returns")
    finally:
        give_up.set()


@pytest.mark.parametrize("ending", [*ENDINGS[:2], "times out", "store refused", "cancelled"])
async def test_async_renewal_stops_however_the_load_ends(
    ending: str, engine: CacheEngine, clients: Any
) -> None:
    raw = clients[2]
    options: dict[str, Any] = {"loader_timeout": 2 * LEASE} if ending == "times out" else {}
    renewing = asyncio.Event()

    @cache_aside(key="ends:<id>", ttl=30, lock_ttl=LEASE, engine=engine, **options)
    async def load(id: str) -> str:
        await Renewals(raw, load.key(id) + ":lock").await_(1)
        renewing.set()
        if ending == "raises":
            raise LookupError("the primary failed")
        if ending in ("times out", "cancelled"):
            await asyncio.sleep(HANG)
        if ending == "store refused":
            await load.invalidate(id)
        return "row"

    call: Callable[[], Awaitable[Any]] = lambda: load.lookup("a")  # noqa: E731
    if ending == "raises":
        with pytest.raises(LookupError):
            await call()
    elif ending == "times out":
        with pytest.raises(LoaderTimeoutError):
            await call()
    elif ending == "cancelled":
        task = asyncio.create_task(call())
        await asyncio.wait_for(renewing.wait(), HANG)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await engine.asettle()  # the release runs in a task of its own
    else:
        assert (await call()).value == "row"
    assert _leases.running() == 0
    assert raw.exists(load.key("a") + ":lock") == 0
    assert raw.exists(load.key("a")) == (ending == "returns")


def test_a_hit_and_a_fast_load_renew_nothing(engine: CacheEngine, clients: Any) -> None:
    """No renewal is due before a third of the lease: a load faster than that (and
    any hit) costs no RENEW."""
    sent: list[Any] = []
    renew = _leases.Renewal.settle

    def counting(self: Any, replies: list[Any]) -> bool:
        sent.append(replies)
        return renew(self, replies)

    fn = cache_aside(key="fast:<id>", ttl=30, lock_ttl=30, engine=engine)(lambda id: id)
    _leases.Renewal.settle = counting  # type: ignore[method-assign]
    try:
        assert [fn.lookup("a").source for _ in range(3)] == [Source.LOADER, *[Source.CACHE] * 2]
    finally:
        _leases.Renewal.settle = renew  # type: ignore[method-assign]
    assert sent == []
    assert _leases.running() == 0


@needs_real_redis
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_child_forked_during_a_load_renews_nothing_of_its_parents(
    engine: CacheEngine, clients: Any
) -> None:
    raw = clients[2]
    release, loading = threading.Event(), threading.Event()

    @cache_aside(key="forked:<id>", ttl=30, lock_ttl=LEASE, engine=engine)
    def load(id: str) -> str:
        loading.set()
        assert release.wait(HANG)
        return id

    owner = threading.Thread(target=load, args=("a",))
    owner.start()
    assert loading.wait(HANG)
    Renewals(raw, load.key("a") + ":lock").wait(1)
    assert _leases.running() == 1
    pid = os.fork()
    if pid == 0:  # the child: no renewal, no renewer thread; its own loads renew
        ok = _leases.running() == 0 and not _leases._renewers
        ok = ok and not any(t.name == "cached_aside-leases" for t in threading.enumerate())
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    release.set()
    owner.join(HANG)
    assert os.waitstatus_to_exitcode(status) == 0
    assert _leases.running() == 0


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not on PATH")
def test_a_hung_server_stalls_no_other_engines_renewals(engine: CacheEngine, clients: Any) -> None:
    """One thread renewed every sync load's leases in the process: a renewal sent to a
    hung server (its client without socket_timeout, as redis.Redis() is built) blocked
    it, and the leases of loads on another engine's healthy server lapsed, so another
    process could load the same keys at once."""
    hung = RedisProcess().start()
    release, loading = threading.Event(), threading.Event()
    started: list[str] = []

    def load(id: str) -> str:
        started.append(id)
        if len(started) == 2:
            loading.set()
        assert release.wait(HANG)
        return id

    client = redis.Redis.from_pool(redis.BlockingConnectionPool(port=hung.port))
    there = CacheEngine(client, prefix=engine.prefix)
    on_hung = cache_aside(key="h:<id>", ttl=30, lock_ttl=LEASE, engine=there)(load)
    healthy = cache_aside(key="h:<id>", ttl=30, lock_ttl=LEASE, engine=engine)(load)
    threads = [threading.Thread(target=fn, args=("a",)) for fn in (on_hung, healthy)]
    try:
        for thread in threads:
            thread.start()
        assert loading.wait(HANG)
        hung.pause()  # the next renewal on it waits for ever (due with the first here)
        # and none lapses here: renewed for a lease after the hung one was due
        Renewals(clients[2], healthy.key("a") + ":lock").wait(4)
    finally:
        hung.resume()
        release.set()
        for thread in threads:
            thread.join(HANG)
        there.close()
        client.close()  # the engine leaves a client it was given to its owner
        hung.stop()
    until(lambda: _leases.running() == 0)


@dataclasses.dataclass
class Stock:
    id: int
    count: int


def test_a_slow_tagged_typed_batch_loads_once_for_two_engines_and_its_entries_hit(
    engine: CacheEngine, twin: Any, clients: Any
) -> None:
    """Leases meet batches, tags and typed values: a batch loader held for many leases
    keeps every key's lock; single callers in two engines wait for it (no load of
    their own), and the entries it stores carry their stamps and hit as the type."""
    release, loading = threading.Event(), threading.Event()
    loads: list[Any] = []

    def batch(ids: list[int]) -> dict[int, Stock]:
        loads.append(sorted(ids))
        loading.set()
        assert release.wait(HANG)
        return {id: Stock(id, 1) for id in ids}

    def one(id: int) -> Stock:
        loads.append(id)
        return Stock(id, 1)

    options: dict[str, Any] = {
        "key": "batch:<id>", "ttl": 30, "lock_ttl": SLOW_LEASE, "tags": ("shop:<id>", "all"),
        "batch_loader": batch,
    }  # fmt: skip
    mine = cache_aside(engine=engine, **options)(one)
    theirs = cache_aside(engine=twin(), **options)(one)
    results: list[Any] = []
    first = threading.Thread(target=lambda: results.append(mine.many([1, 2, 3])))
    first.start()
    assert loading.wait(HANG)
    callers = [
        threading.Thread(target=lambda fn=fn: results.append(fn(2))) for fn in [mine, theirs] * 3
    ]
    for caller in callers:
        caller.start()
    until(lambda: theirs.stats().lock_waits > 0)  # the other engine waits on key 2's lock
    Renewals(clients[2], mine.key(1) + ":lock").wait(WAITED)
    release.set()
    for thread in [first, *callers]:
        thread.join(HANG)
    assert loads == [[1, 2, 3]]
    batches = [result for result in results if isinstance(result, list)]
    assert batches == [[Stock(1, 1), Stock(2, 1), Stock(3, 1)]]
    assert [result for result in results if not isinstance(result, list)] == [Stock(2, 1)] * 6
    for fn in (mine, theirs):
        for id in (1, 2, 3):
            outcome = fn.lookup(id)
            assert (outcome.source, outcome.value) == (Source.CACHE, Stock(id, 1))
    assert _leases.running() == 0
    engine.invalidate_tags("all")
    assert theirs.lookup(1).source is Source.LOADER


@pytest.mark.parametrize("batched", [False, True], ids=["single", "many"])
async def test_a_tagged_load_outlasting_its_tags_versions_keeps_them_and_hits(
    h: Harness, batched: bool
) -> None:
    """Leases meet tag versions: a version lives about twice its entries' ttl from the
    load's start, and a renewed load may run longer; the version then expired under
    it, its store was a miss, and every call loaded again (ttl=1, a 3.5 s loader: never
    a hit). The load keeps its tags' versions alive as it keeps its lock."""
    release = threading.Event()
    loading = threading.Event()
    loads: list[Any] = []

    def load(id: int) -> dict[str, int]:
        loads.append(id)
        loading.set()
        assert release.wait(3 * HANG)  # the test sets it, however it ends
        return {"id": id}

    def load_many(ids: list[int]) -> dict[int, dict[str, int]]:
        return {id: load(id) for id in ids}

    async def aload(id: int) -> dict[str, int]:
        return await asyncio.to_thread(load, id)

    async def aload_many(ids: list[int]) -> dict[int, dict[str, int]]:
        return await asyncio.to_thread(load_many, ids)

    sync = h.mode == "sync"
    fn = cache_aside(
        key="v:<id>", ttl=1, lock_ttl=LEASE, tags=("all", "item:<id>"), engine=h.engine,
        batch_loader=(load_many if sync else aload_many) if batched else None,
    )(load if sync else aload)  # fmt: skip
    call = functools.partial(fn.many, [1]) if batched else functools.partial(fn, 1)
    task = None if sync else asyncio.ensure_future(call())
    caller = threading.Thread(target=call) if sync else None
    if caller is not None:
        caller.start()
    versions = [f"{h.engine.prefix}:tag:{{{text}}}" for text in ("all", "item:1")]
    try:
        assert await asyncio.to_thread(loading.wait, HANG)
        # A version must live ttl + lock_ttl (3 s) from now; left with 2 s, more than
        # a renewal's period and a stall, it is stretched at the next renewal.
        nearly_over = int(LEASE * 1000)
        for version in versions:  # their life nearly over, as after a long load...
            assert h.raw.pexpire(version, nearly_over)
        deadline = time.monotonic() + HANG
        while any(h.raw.pttl(version) <= nearly_over for version in versions):
            # ...until the load's renewal stretches them
            assert time.monotonic() < deadline, "the load let its tags' versions expire"
            await asyncio.sleep(0.01)
    finally:
        release.set()
    if task is not None:
        await asyncio.wait_for(task, HANG)
    if caller is not None:
        caller.join(HANG)
    assert (await h.run(fn.lookup, 1)).source is Source.CACHE
    assert loads == [1]
