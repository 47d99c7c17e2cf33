"""No stale reads (docs/consistency.md): what a load or a read saw before an invalidation
or an update_field is never stored nor handed to a caller who came after it; and the
randomized race against a real SQLite file, run on the plain algorithm too to show the
checker can fail."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from benchmarks.race import Workload, run_ours, run_ours_async, run_plain
from cached_aside import (
    CacheEngine,
    Outcome,
    cache_aside,
)
from cached_aside._scripts import ScriptName


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


# Readers go on until 60 invalidations: the race is run on a machine of any speed.
WORKLOAD = Workload(reads=1500, seed=11, min_invalidations=60)


@pytest.mark.slow
def test_plain_cache_aside_serves_stale_reads(clients: Any, tmp_path: Path) -> None:
    outcome = run_plain(clients[2], WORKLOAD, tmp_path)
    assert outcome.invalidations > 50
    assert outcome.stale_reads > 0  # the checker catches the textbook algorithm


@pytest.mark.slow
def test_no_stale_reads_with_threads(
    engine: CacheEngine, more_clients: Any, tmp_path: Path
) -> None:
    other = CacheEngine(*more_clients(), prefix=engine.prefix)  # "another process"
    outcome = run_ours([engine, other], WORKLOAD, tmp_path)
    assert outcome.invalidations > 50
    assert (outcome.stale_reads, outcome.stale_entries) == (0, 0)


@pytest.mark.slow
async def test_no_stale_reads_with_tasks(
    engine: CacheEngine, more_clients: Any, tmp_path: Path
) -> None:
    other = CacheEngine(*more_clients(), prefix=engine.prefix)
    outcome = await run_ours_async([engine, other], WORKLOAD, tmp_path)
    assert outcome.invalidations > 50
    assert (outcome.stale_reads, outcome.stale_entries) == (0, 0)


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


async def test_a_task_starting_after_another_process_invalidates_never_joins_an_older_lookup(
    engine: CacheEngine, twin: Any
) -> None:
    """The same across processes, where this one hears nothing of the invalidation:
    a task's lookup is answered v1 by Redis and its reply waits (in the socket, for
    the loop to read it: held here in hand) while another process invalidates, and a
    task that begins once that invalidation returned must not be handed v1. Tasks
    joined such a lookup before (the randomized race under load caught one stale read
    in ~3000): now, as threads, they share only the miss path."""
    primary = {"k": 1}

    async def load(id: str) -> int:
        return primary[id]

    read = cache_aside(key="joined:<id>", ttl=30, engine=engine)(load)
    writer = cache_aside(key="joined:<id>", ttl=30, engine=twin())(load)
    assert await read("k") == 1  # cached: v1
    side = engine.sides.async_side()
    assert side.pipeline is not None
    real_call = side.pipeline.call
    answered = asyncio.Event()
    deliver = asyncio.Event()
    held: list[Any] = []

    async def hold_the_first_lookup(args: tuple[Any, ...]) -> Any:
        reply = await real_call(args)
        if args[0] == "GET" and not held:
            held.append(reply)
            answered.set()
            await deliver.wait()  # Redis answered v1; this process has not read it yet
        return reply

    side.pipeline.call = hold_the_first_lookup  # type: ignore[method-assign]
    try:
        early = asyncio.create_task(read("k"))
        await answered.wait()
        primary["k"] = 2
        assert await writer.invalidate("k") is Outcome.DELETED  # another process's
        late = asyncio.create_task(read("k"))  # begins after that invalidation returned
        for _ in range(10):
            await asyncio.sleep(0)  # the late task has run up to its own wait
        deliver.set()
        assert await early == 1  # began before the invalidation: a fair answer
        assert await late == 2
    finally:
        side.pipeline.call = real_call  # type: ignore[method-assign]
