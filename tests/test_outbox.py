"""Invalidations Redis did not take: said to be PENDING, kept in the engine's outbox,
never served around in this process, and delivered as soon as Redis answers."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from cached_aside import (
    BulkOutcome,
    CacheEngine,
    CacheUnavailableError,
    NearCache,
    Outcome,
    Source,
    cache_aside,
)
from cached_aside._outbox import Outbox, PendingKey, PendingPattern

from .conftest import (
    PATIENCE,
    REDIS_URL,
    delete_prefix,
    eventually,
    needs_real_redis,
    unique_prefix,
)
from .servers import REDIS_SERVER, RedisProcess, dead_url

DOWN = "redis://127.0.0.1:1/0"  # nothing listens on port 1: every command fails at once


def pattern(start: str) -> PendingPattern:
    return PendingPattern(start, start + "*", lambda key: key.startswith(start), start)


def test_the_outbox_dedupes_blocks_and_collapses_instead_of_dropping(
    caplog: pytest.LogCaptureFixture,
) -> None:
    outbox = Outbox(limit=3)
    started: list[bool] = []
    outbox.start_flusher = lambda: started.append(True)
    whole = pattern("c:{p:")
    for key in ["c:{p:1}", "c:{p:2}", "c:{p:1}"]:
        outbox.add((PendingKey(key, 1000, whole),))
    assert outbox.pending() == ["c:{p:1}", "c:{p:2}"]  # one entry per key
    assert started == [True]  # one flusher, however much arrives
    assert outbox.active
    assert outbox.blocks("c:{p:1}")
    assert not outbox.blocks("c:{p:3}")
    with caplog.at_level(logging.WARNING, logger="cached_aside"):
        for key in ["c:{p:3}", "c:{p:4}"]:
            outbox.add((PendingKey(key, 1000, whole),))
    # Past the limit, the function's keys become one pattern: more is invalidated
    # than asked, nothing is lost, and the outbox stays small.
    assert outbox.pending() == ["c:{p:*"]
    assert outbox.blocks("c:{p:99}")
    assert not outbox.blocks("c:{q:1}")
    assert outbox.collapsed == 1
    assert "outbox full" in caplog.text
    delivery = outbox.take()
    outbox.landed(delivery)
    assert outbox.pending() == []
    assert not outbox.active
    assert outbox.delivered == 1


def test_a_key_queued_again_during_a_delivery_stays_queued() -> None:
    outbox = Outbox()
    whole = pattern("c:{p:")
    outbox.add((PendingKey("c:{p:1}", 1000, whole),))
    delivery = outbox.take()
    outbox.landed(delivery)  # landed...
    outbox.add((PendingKey("c:{p:1}", 1000, whole),))  # ...and failed again since
    assert outbox.pending() == ["c:{p:1}"]


def test_pending_keys_are_served_by_the_loader_until_redis_takes_them() -> None:
    engine = CacheEngine.from_url(DOWN, prefix=unique_prefix())
    calls: list[str] = []

    @cache_aside(key="row:<id>", ttl=30, engine=engine)
    def read(id: str) -> str:
        calls.append(id)
        return id

    strict = cache_aside(key="strict:<id>", ttl=30, engine=engine, fail_open=False)(read)
    assert read.invalidate("a") is Outcome.PENDING  # never ABSENT: nothing was checked
    assert read.invalidate_many(["b", "c"]) == BulkOutcome(0, pending=2)
    with pytest.raises(CacheUnavailableError, match="fail_open=False"):
        strict.invalidate("a")  # raises, and the invalidation is queued all the same
    assert sorted(engine.pending_invalidations()) == [
        read.key("a"),
        read.key("b"),
        read.key("c"),
        strict.key("a"),
    ]
    assert read.lookup("a").source is Source.LOADER  # no Redis asked
    assert read.stats().postponed == 3
    assert read.stats().errors == 3  # the invalidations; the bypassed read sent nothing
    engine.close(timeout=0.05)


def test_close_logs_what_redis_never_took(caplog: pytest.LogCaptureFixture) -> None:
    engine = CacheEngine.from_url(DOWN, prefix=unique_prefix())
    read = cache_aside(key="row:<id>", ttl=30, engine=engine)(lambda id: id)
    read.invalidate("a")
    with caplog.at_level(logging.ERROR, logger="cached_aside"):
        engine.close(timeout=0.1)
    assert "closing with 1 invalidation(s) Redis never took" in caplog.text
    assert read.key("a") in caplog.text


# The backlog lands within about 50 ms of Redis answering again (the retries' interval;
# measured ~3 ms, printed): a bound for a loaded machine, far below an outbox that
# stopped retrying. Speed is the benchmarks' business.
DELIVERED_WITHIN = 5.0


@pytest.fixture
def server() -> Iterator[RedisProcess]:
    if REDIS_SERVER is None:
        pytest.fail("redis-server is not on PATH")
    process = RedisProcess().start()
    yield process
    process.stop()


@pytest.mark.slow
def test_an_invalidation_sent_while_redis_is_paused_lands_when_it_resumes(
    server: RedisProcess, record_property: Any
) -> None:
    """The issue's outage: Redis is paused with SIGSTOP, the primary changes and the
    writer invalidates; this process never serves the old row, and once Redis
    resumes another process (an engine of its own) reads the new row: within
    milliseconds (printed), and within DELIVERED_WITHIN on a loaded machine."""
    prefix = unique_prefix()
    here = CacheEngine.from_url(server.url, prefix=prefix)
    there = CacheEngine.from_url(server.url, prefix=prefix)
    primary = {"a": 1}

    def row(id: str) -> int:
        return primary[id]

    read = cache_aside(key="row:<id>", ttl=60, engine=here)(row)
    read_there = cache_aside(key="row:<id>", ttl=60, engine=there)(row)
    assert read("a") == read_there("a") == 1  # cached in Redis
    server.pause()
    try:
        primary["a"] = 2  # the write to the primary...
        started = time.monotonic()
        outcome = read.invalidate("a")  # ...and its invalidation, while Redis hangs
        took = time.monotonic() - started
        assert outcome is Outcome.PENDING
        assert here.pending_invalidations() == [read.key("a")]
        assert read("a") == 2  # this process: straight to the primary, never the old row
        time.sleep(0.3)
    finally:
        server.resume()
    resumed = time.monotonic()
    landed = seen_there = None
    while time.monotonic() - resumed < DELIVERED_WITHIN and (landed is None or seen_there is None):
        if landed is None and not here.pending_invalidations():
            landed = time.monotonic() - resumed
        if seen_there is None and read_there("a") == 2:
            seen_there = time.monotonic() - resumed
        time.sleep(0.002)
    assert landed is not None, "the outbox did not deliver after Redis resumed"
    assert seen_there is not None, "another process still read the old row"
    assert read("a") == 2
    assert read.lookup("a").source is Source.CACHE
    record_property("invalidate_seconds", round(took, 3))
    record_property("landed_after_resume_ms", round(landed * 1000, 1))
    record_property("other_process_after_resume_ms", round(seen_there * 1000, 1))
    print(  # the closing note quotes these
        f"\noutage: invalidate() answered PENDING in {took * 1000:.0f} ms; outbox landed "
        f"{landed * 1000:.1f} ms after resume; another engine read the new row "
        f"{seen_there * 1000:.1f} ms after resume"
    )
    here.close()
    there.close()


@pytest.mark.slow
def test_the_flusher_delivers_within_a_retry_interval_of_redis_coming_back(
    server: RedisProcess,
) -> None:
    """Killed, not paused: every retry fails at once until the server is back on
    its port; then the backlog lands within the retry interval (50 ms) plus a
    connect."""
    prefix = unique_prefix()
    engine = CacheEngine.from_url(server.url, prefix=prefix)
    read = cache_aside(key="row:<id>", ttl=60, engine=engine)(lambda id: id)
    read("a")
    server.kill()
    assert read.invalidate("a") is Outcome.PENDING
    assert read.invalidate_all() == BulkOutcome(0, pending=1)
    time.sleep(0.3)  # the flusher keeps retrying, 20 times a second at most
    server.start()  # empty: a restart
    back = time.monotonic()
    while engine.pending_invalidations() and time.monotonic() - back < DELIVERED_WITHIN:
        time.sleep(0.002)
    assert engine.pending_invalidations() == []
    assert time.monotonic() - back < DELIVERED_WITHIN
    engine.close()


@pytest.mark.slow
def test_a_tag_invalidated_while_redis_is_paused_is_never_served_around_here(
    server: RedisProcess,
) -> None:
    """Fail-open meets tags and the near cache: invalidate_tags() during the outage is
    PENDING; this process serves neither the near copy nor Redis's old entry of any
    function carrying the tag (typed, msgpack and hash, one or many), and once Redis
    answers the outbox retires the version, so another engine reads the new row."""
    prefix = unique_prefix()
    here = CacheEngine.from_url(server.url, prefix=prefix, near=NearCache(ttl=60))
    there = CacheEngine.from_url(server.url, prefix=prefix)
    primary = {"a": 1}

    def row(id: str) -> Row:
        return Row(id, primary[id])

    tagged = {"ttl": 60, "tags": ("row:<id>",)}
    read = cache_aside(key="row:<id>", engine=here, **tagged)(row)
    record = cache_aside(key="record:<id>", engine=here, as_hash=True, **tagged)(row)
    read_there = cache_aside(key="row:<id>", engine=there, **tagged)(row)
    assert read("a") == record("a") == read_there("a") == Row("a", 1)
    deadline = time.monotonic() + DELIVERED_WITHIN * 6  # a bound on a hang
    while read.lookup("a").source is not Source.NEAR:
        assert time.monotonic() < deadline, "never served from the near cache"
    server.pause()
    try:
        primary["a"] = 2
        assert here.invalidate_tags("row:a") == BulkOutcome(0, pending=1)
        assert read("a") == record("a") == Row("a", 2)
        assert read.many(["a"]) == [Row("a", 2)]
    finally:
        server.resume()
    while here.pending_invalidations():
        assert time.monotonic() < deadline, "the outbox did not deliver after Redis resumed"
        time.sleep(0.002)
    assert read_there("a") == Row("a", 2)
    assert read("a") == record("a") == Row("a", 2)
    here.close()
    there.close()


@dataclasses.dataclass
class Row:
    id: str
    version: int


def open_breaker(engine: CacheEngine) -> None:
    """As after a burst of Redis failures: calls skip Redis for a while."""
    for _ in range(engine.breaker.threshold):
        engine.breaker.failure()


def test_what_is_queued_while_a_pattern_is_delivered_survives_its_landing() -> None:
    outbox = Outbox()
    outbox.start_flusher = lambda: None
    whole = pattern("c:{row:")
    outbox.add((whole,))
    delivery = outbox.take()  # the SCAN of c:{row:* is under way...
    outbox.add((PendingKey("c:{row:7}", 1000, whole),))  # ...the scan may be past it
    outbox.landed(delivery)
    assert outbox.pending() == ["c:{row:7}"]
    outbox.landed(outbox.take())
    outbox.add((whole,))
    delivery = outbox.take()
    outbox.add((whole,))  # invalidate_all() failed again during the delivery
    outbox.landed(delivery)
    assert outbox.pending() == ["c:{row:*"]
    outbox.landed(outbox.take())
    assert outbox.pending() == []


def test_a_full_outbox_drops_the_release_whose_lock_expires_first() -> None:
    from cached_aside._effects import RunScript
    from cached_aside._scripts import ScriptName

    outbox = Outbox(limit=2)
    outbox.start_flusher = lambda: None
    long, short, newer = (
        RunScript(ScriptName.LEAVE, (f"k{n}:waiters", f"k{n}:wake:t"), ("t",)) for n in range(3)
    )
    outbox.add_release(long, 60_000)
    outbox.add_release(short, 100)
    outbox.add_release(newer, 60_000)
    assert [r.effect for r in outbox.peek().releases] == [long, newer]


def test_racing_adds_always_leave_a_flusher_to_deliver_them(engine: CacheEngine) -> None:
    """add() from many threads while the flusher takes and lands: nothing waits
    behind a flusher that gave up its turn on a stale read."""
    read = cache_aside(key="row:<id>", ttl=30, engine=engine)(lambda id: id)
    whole = read._every_key(engine)
    keys = [f"{engine.prefix}:{{row:{n}}}" for n in range(400)]

    def add(part: list[str]) -> None:
        for key in part:
            engine.outbox.add((PendingKey(key, 1000, whole),))

    threads = [threading.Thread(target=add, args=(keys[n::8],)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert engine.settle(5), engine.pending_invalidations()[:5]


@needs_real_redis
def test_a_release_still_pending_when_its_loop_ends_reaches_redis() -> None:
    """One event loop per request: the call is cancelled during its load and the
    handler returns; asyncio.run() cancels the release task before it ran. It goes to
    the outbox instead, and the next caller does not wait out lock_ttl."""
    assert REDIS_URL is not None
    engine = CacheEngine.from_url(REDIS_URL, prefix=unique_prefix())

    loading = threading.Event()

    @cache_aside(key="item:<id>", ttl=60, lock_ttl=30, engine=engine)
    async def get(id: str) -> str:
        loading.set()
        await asyncio.sleep(60)
        return id

    async def handler() -> None:
        task = asyncio.create_task(get("a"))
        assert await eventually(loading.is_set)  # it holds the lock and loads
        task.cancel()  # a timeout in the web handler
        await asyncio.sleep(0)  # its release task is created, not yet run

    asyncio.run(handler())
    assert engine.settle(PATIENCE)
    assert engine.client().exists(get.key("a") + ":lock") == 0
    other = cache_aside(key="item:<id>", ttl=60, lock_ttl=30, engine=engine)(lambda id: id)
    started = time.monotonic()
    assert other.lookup("a").source is Source.LOADER
    assert time.monotonic() - started < 10.0  # not the 30 s of lock_ttl
    delete_prefix(engine.client(), engine.prefix)
    engine.close()


@needs_real_redis
async def test_a_pending_invalidation_blocks_every_functions_near_tier() -> None:
    assert REDIS_URL is not None
    prefix = unique_prefix()
    engine = CacheEngine.from_url(REDIS_URL, prefix=prefix, near=NearCache(ttl=30))
    engine.outbox.start_flusher = lambda: None  # Redis stays out of reach for the outbox
    primary = {"a": "v1"}
    row = cache_aside(key="row:<id>", ttl=60, engine=engine)(lambda id: primary[id])

    @cache_aside(key="row:<id>", ttl=60, engine=engine)
    async def arow(id: str) -> str:
        return primary[id]

    assert row("a") == await arow("a") == "v1"
    deadline = time.monotonic() + PATIENCE  # our own store's report voids first fills
    while (await arow.lookup("a")).source is not Source.NEAR:
        assert time.monotonic() < deadline, "never served from the near cache"
    primary["a"] = "v2"
    open_breaker(engine)
    assert row.invalidate("a") is Outcome.PENDING
    result = await arow.lookup("a")  # the other function's near tier held v1
    assert (result.value, result.source) == ("v2", Source.LOADER)
    engine.breaker.success()
    delete_prefix(engine.client(), prefix)
    await engine.aclose()


@needs_real_redis
def test_many_never_serves_a_reply_read_while_its_key_was_blocked() -> None:
    assert REDIS_URL is not None
    engine = CacheEngine.from_url(REDIS_URL, prefix=unique_prefix())
    primary = {"x": "x-v1", "y": "y-v1"}

    def batch(ids: list[str]) -> list[str]:
        engine.deliveries.flusher.start()  # Redis answers: the invalidation lands during the load
        assert engine.settle(PATIENCE)
        return [primary[i] for i in ids]

    row = cache_aside(key="row:<id>", ttl=10, refresh_ahead=9.9, engine=engine, batch_loader=batch)(
        lambda id: primary[id]
    )
    assert row("y") == "y-v1"
    time.sleep(0.15)  # y is due for a refresh from now on
    engine.outbox.start_flusher = lambda: None  # the delivery waits for the batch load
    primary["y"] = "y-v2"
    open_breaker(engine)
    assert row.invalidate("y") is Outcome.PENDING
    engine.breaker.success()
    assert row.many(["x", "y"]) == ["x-v1", "y-v2"]
    delete_prefix(engine.client(), engine.prefix)
    engine.close()


EXITING_WITH_PENDING = textwrap.dedent(
    """
    import sys
    from cached_aside import CacheEngine, Outcome, cache_aside
    engine = CacheEngine.from_url(sys.argv[1], prefix="exiting")

    @cache_aside(key="r:<id>", ttl=30, engine=engine)
    def load(id):
        return {"id": id}

    assert load.invalidate("a") is Outcome.PENDING  # nothing listens at the URL
    print("pending", flush=True)
    if sys.argv[2] != "unclosed":
        engine.close()
    if sys.argv[2] == "close, then used":
        assert load.invalidate("b") is Outcome.PENDING
    # and the script ends
    """
)


@pytest.mark.parametrize("closing", ["unclosed", "close", "close, then used"])
def test_an_exit_without_close_logs_the_invalidations_redis_never_took(closing: str) -> None:
    """Daemon threads die at interpreter exit, the outbox's flusher with them: the exit
    hook makes the last attempt close() would, and logs what is left (here all: nothing
    listens), where before the process ended without a word. An engine closed before
    the exit had its attempt and its log: once, not again; one used after its close
    has it again at exit, with what it queued since."""
    done = subprocess.run(
        [sys.executable, "-c", EXITING_WITH_PENDING, dead_url(), closing],
        capture_output=True,
        text=True,
        timeout=PATIENCE,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "pending\n"
    said = "closing with 1 invalidation(s) Redis never took (exiting:{r:a})"
    assert done.stderr.count(said) == 1, done.stderr
    again = "closing with 2 invalidation(s) Redis never took (exiting:{r:"
    assert done.stderr.count(again) == (closing == "close, then used"), done.stderr
