"""many(), invalidate_many(), invalidate_all() and engine.invalidate_prefix(), each
scenario sync and async, against real Redis and fakeredis."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from typing import Any

import fakeredis
import pytest

from cached_aside import (
    BatchLoaderError,
    BulkOutcome,
    CacheEngine,
    CacheUnavailableError,
    ConfigurationError,
    Source,
    cache_aside,
)

from .conftest import (
    Harness,
)
from .injection import counting_writes


class Rows:
    """A loader and a batch loader over one table, recording their calls."""

    def __init__(self, rows: dict[Any, Any]) -> None:
        self.rows = rows
        self.single: list[Any] = []
        self.batches: list[list[Any]] = []

    def load(self, id: Any) -> Any:
        self.single.append(id)
        return self.rows.get(id)

    def load_many(self, ids: list[Any]) -> dict[Any, Any]:
        self.batches.append(list(ids))
        return {id: self.rows[id] for id in ids if id in self.rows}


ROWS = {f"p{i}": {"id": f"p{i}", "n": i} for i in range(20)}


async def test_many_keeps_order_loads_misses_once_and_then_hits(h: Harness) -> None:
    rows = Rows(ROWS)
    fn = h.cached(rows.load, key="product:<id>")
    await h.run(fn, "p3")
    items = ["p1", "p3", "p2", "missing", "p1"]
    first = await h.run(fn.many, items)
    assert first == [ROWS["p1"], ROWS["p3"], ROWS["p2"], None, ROWS["p1"]]
    assert first[0] is not first[4]  # a repeated item gets its own copy
    assert sorted(rows.single) == ["missing", "p1", "p2", "p3"]  # once per distinct miss
    rows.single.clear()
    assert await h.run(fn.many, items) == first
    assert rows.single == []
    assert (await h.run(fn.lookup, "missing")).source is Source.NEGATIVE
    assert (await h.run(fn.lookup, "p2")).source is Source.CACHE


async def test_many_takes_tuples_of_positional_arguments(h: Harness) -> None:
    def page(user: str, number: int) -> list[Any]:
        return [user, number]

    fn = h.cached(page, key="orders:<user>:<number>")
    assert await h.run(fn.many, [("ada", 1), ("bob", 2)]) == [["ada", 1], ["bob", 2]]
    assert (await h.run(fn.lookup, "bob", 2)).source is Source.CACHE
    assert await h.run(fn.many, []) == []


async def test_batch_loader_gets_all_misses_in_one_call(h: Harness) -> None:
    rows = Rows(ROWS)
    fn = h.cached(rows.load, key="product:<id>", as_hash=True, batch_loader=rows.load_many)
    await h.run(fn, "p0")
    result = await h.run(fn.many, ["p0", "p1", "p2", "nope", "p1"])
    assert result[0] == {"id": "p0", "n": "0"}  # hash mode: values come back as str
    assert result[1:] == [{"id": "p1", "n": "1"}, {"id": "p2", "n": "2"}, None, result[1]]
    assert rows.batches == [["p1", "p2", "nope"]]
    assert rows.single == ["p0"]
    # stored by the batch: a single call is now a hit, the missing id a negative hit
    assert (await h.run(fn.lookup, "p2")).source is Source.CACHE
    assert (await h.run(fn.lookup, "nope")).source is Source.NEGATIVE
    assert rows.single == ["p0"]
    stats = fn.stats()
    assert (stats.loads, stats.misses) == (4, 4)  # a batch counts one load per entry
    assert fn.stats().hits >= 2


async def test_batch_loader_may_return_a_list_in_order(h: Harness) -> None:
    def load_list(ids: list[str]) -> list[Any]:
        return [None if id == "x" else id.upper() for id in ids]

    fn = h.cached(lambda id: id.upper(), key="word:<id>", batch_loader=load_list)
    assert await h.run(fn.many, ["a", "x", "b"]) == ["A", None, "B"]
    assert (await h.run(fn.lookup, "x")).source is Source.NEGATIVE


async def test_a_batch_loader_answer_of_the_wrong_shape_releases_every_lock(
    h: Harness,
) -> None:
    answers: list[Any] = [["only one"], "text", ["a", "b"]]

    def shaky(ids: list[str]) -> Any:
        return answers.pop(0)

    fn = h.cached(lambda id: id, key="shape:<id>", batch_loader=shaky, lock_ttl=30)
    with pytest.raises(BatchLoaderError, match="returned 1 values for 2 items"):
        await h.run(fn.many, ["a", "b"])
    with pytest.raises(BatchLoaderError, match="returned str"):
        await h.run(fn.many, ["a", "b"])
    # No lock was left behind (lock_ttl is 30 s): the next batch loads at once.
    assert h.raw.exists(fn.key("a") + ":lock") == 0
    assert await h.run(fn.many, ["a", "b"]) == ["a", "b"]


async def test_a_failing_batch_loader_caches_nothing_and_releases_locks(h: Harness) -> None:
    def broken(ids: list[str]) -> Any:
        raise LookupError("primary down")

    fn = h.cached(lambda id: id, key="broken:<id>", batch_loader=broken, lock_ttl=30)
    with pytest.raises(LookupError, match="primary down"):
        await h.run(fn.many, ["a", "b"])
    assert h.raw.exists(fn.key("a"), fn.key("a") + ":lock", fn.key("b") + ":lock") == 0
    assert await h.run(fn, "a") == "a"  # the single path is not blocked either


async def test_unstorable_value_in_a_batch_names_the_key(h: Harness) -> None:
    fn = h.cached(
        lambda id: {}, key="bad:<id>", as_hash=True, batch_loader=lambda ids: [[1]] * len(ids)
    )
    with pytest.raises(TypeError, match="bad:"):
        await h.run(fn.many, ["a"])
    assert h.raw.exists(fn.key("a") + ":lock") == 0


async def test_invalidate_many(h: Harness) -> None:
    rows = Rows(ROWS)
    fn = h.cached(rows.load, key="product:<id>")
    await h.run(fn.many, ["p1", "p2", "p3", "absent"])
    assert await h.run(fn.invalidate_many, ["p1", "p2", "absent", "never-cached"]) == BulkOutcome(3)
    rows.single.clear()
    assert await h.run(fn.many, ["p1", "p2", "p3"]) == [ROWS["p1"], ROWS["p2"], ROWS["p3"]]
    assert sorted(rows.single) == ["p1", "p2"]


async def test_invalidate_all_drops_this_functions_entries_only(h: Harness) -> None:
    fill = lambda ids: [{"id": id} for id in ids]  # noqa: E731
    # lock_ttl: fakeredis takes more than the default lease to lock 1,101 entries
    product = h.cached(lambda id: {"id": id}, key="product:<id>", batch_loader=fill, lock_ttl=10)
    reviews = h.cached(lambda id: [id], key="product:<id>:reviews")
    other = h.cached(lambda id: id, key="order:<id>")
    ids = [f"p{i}" for i in range(1100)]  # more than one page of 1000 keys
    long_id = "x" * 400  # a key shortened to a head and a digest
    await h.run(product.many, [*ids, long_id])
    await h.run(reviews.many, ids[:10])
    await h.run(other.many, ids[:10])
    assert await h.run(product.invalidate_all) == BulkOutcome(len(ids) + 1)
    assert h.raw.exists(product.key(long_id)) == 0
    assert h.raw.exists(*[product.key(id) for id in ids[:50]]) == 0
    assert h.raw.exists(*[reviews.key(id) for id in ids[:10]]) == 10
    assert h.raw.exists(*[other.key(id) for id in ids[:10]]) == 10
    assert (await h.run(product.lookup, "p1")).source is Source.LOADER
    assert await h.run(product.invalidate_all) == BulkOutcome(1)


async def test_engine_invalidate_prefix(h: Harness) -> None:
    product = h.cached(lambda id: {"id": id}, key="product:<id>")
    order = h.cached(lambda id: id, key="order:<id>")
    await h.run(product.many, ["a", "b"])
    await h.run(order.many, ["a", "b", "c"])
    if h.mode == "async":
        assert await h.engine.ainvalidate_prefix("order:") == BulkOutcome(3)
        assert await h.engine.ainvalidate_prefix() == BulkOutcome(2)
    else:
        assert h.engine.invalidate_prefix("order:") == BulkOutcome(3)
        assert h.engine.invalidate_prefix() == BulkOutcome(2)
    assert h.raw.exists(product.key("a"), order.key("a")) == 0
    with pytest.raises(ConfigurationError, match="without the engine prefix or braces"):
        h.engine.invalidate_prefix("{bad")


async def test_invalidate_all_revokes_a_load_in_flight(h: Harness) -> None:
    # The load holds until the invalidation is done: it is in flight then, however
    # slow the machine.
    started, release = threading.Event(), threading.Event()

    def slow(id: str) -> str:
        started.set()
        assert release.wait(30)
        return "old"

    if h.mode == "async":
        released = asyncio.Event()

        @cache_aside(key="slow:<id>", ttl=30, engine=h.engine)
        async def slow_async(id: str) -> str:
            started.set()
            await released.wait()  # the harness's wrapper would block the loop
            return "old"

        fn = slow_async
        task = asyncio.ensure_future(fn("a"))
        while not started.is_set():  # noqa: ASYNC110 - set by the task itself
            await asyncio.sleep(0.005)
        assert await fn.invalidate_all() == BulkOutcome(0)
        released.set()
        assert await task == "old"  # the caller still gets its answer...
    else:
        fn = h.cached(slow, key="slow:<id>")
        thread = threading.Thread(target=fn, args=("a",))
        thread.start()
        assert await asyncio.to_thread(started.wait, 30)
        try:
            assert fn.invalidate_all() == BulkOutcome(0)
        finally:
            release.set()
            thread.join()
    assert h.raw.exists(fn.key("a")) == 0  # ...but its lease was revoked: nothing stored


def test_bad_batch_input_is_refused_early(engine: CacheEngine) -> None:
    fn = cache_aside(key="p:<id>", ttl=5, engine=engine)(lambda id: id)
    with pytest.raises(TypeError, match="take a list of items"):
        fn.many("abc")
    with pytest.raises(ConfigurationError, match="batch_loader must be a function"):
        cache_aside(key="p:<id>", ttl=5, batch_loader=3)  # type: ignore[arg-type]

    async def async_batch(ids: list[str]) -> list[str]:
        return ids

    with pytest.raises(ConfigurationError, match="must be a plain"):
        cache_aside(key="p:<id>", ttl=5, batch_loader=async_batch)(lambda id: id)

    async def async_single(id: str) -> str:
        return id

    with pytest.raises(ConfigurationError, match="must be an async def"):
        cache_aside(key="p:<id>", ttl=5, batch_loader=lambda ids: ids)(async_single)


def test_methods_batch_with_the_instance(engine: CacheEngine) -> None:
    class Repository:
        def __init__(self, name: str) -> None:
            self.name = name

        def __str__(self) -> str:
            return self.name

        @cache_aside(key="repo:<self>:<id>", ttl=5, engine=engine)
        def get(self, id: str) -> str:
            return f"{self.name}/{id}"

    repo = Repository("books")
    assert repo.get.many(["a", "b"]) == ["books/a", "books/b"]
    assert repo.get.lookup("a").source is Source.CACHE
    assert repo.get.invalidate_many(["a"]) == BulkOutcome(1)
    assert repo.get.invalidate_all() == BulkOutcome(1)


def test_round_trips_of_batches(clients: Any) -> None:
    counting = counting_writes(clients[0])
    engine = CacheEngine(clients[0], prefix=f"rt-{time.monotonic_ns()}")
    rows = Rows(ROWS)
    batched = cache_aside(key="b:<id>", ttl=30, engine=engine, batch_loader=rows.load_many)(
        rows.load
    )
    items = list(ROWS)
    batched.many(items[:1])  # the server learns the scripts (one extra round trip each)
    batched.invalidate_many(items[:1])
    batched.many(items[:1])
    counting.ops.clear()
    batched.many(items)  # 19 cold misses: lookups, locks, one load, stores
    assert counting.ops == ["pipeline[GET]", "pipeline[ACQUIRE]", "pipeline[STORE]"]
    assert len(rows.batches) == 3
    counting.ops.clear()
    batched.many(items)  # 20 hits
    assert counting.ops == ["pipeline[GET]"]
    counting.ops.clear()
    assert batched.invalidate_many(items) == BulkOutcome(20)
    assert counting.ops == ["pipeline[INVALIDATE]"]
    engine.invalidate_prefix()


async def test_redis_down_many_still_answers(backend: str) -> None:
    # Port 1 refuses connections: every command fails at once.
    engine = CacheEngine.from_url("redis://127.0.0.1:1/0", prefix="down")
    rows = Rows(ROWS)
    fn = cache_aside(key="p:<id>", ttl=5, engine=engine, batch_loader=rows.load_many)(rows.load)
    plain = cache_aside(key="q:<id>", ttl=5, engine=engine)(rows.load)
    strict = cache_aside(key="s:<id>", ttl=5, engine=engine, fail_open=False)(rows.load)
    assert fn.many(["p1", "p2", "zz"]) == [ROWS["p1"], ROWS["p2"], None]
    assert rows.batches == [["p1", "p2", "zz"]]
    assert plain.many(["p1", "p2"]) == [ROWS["p1"], ROWS["p2"]]
    assert fn.stats().errors >= 3
    with pytest.raises(CacheUnavailableError):
        strict.many(["p1"])
    # A bulk invalidation Redis did not take is said to be pending, never done.
    assert fn.invalidate_all() == BulkOutcome(0, pending=1)
    with pytest.raises(CacheUnavailableError, match="fail_open=False"):
        strict.invalidate_all()
    assert engine.invalidate_prefix("q:") == BulkOutcome(0, pending=1)
    assert set(engine.pending_invalidations()) == {"down:{p:*", "down:{s:*", "down:{q:*"}
    await engine.aclose(timeout=0.1)


async def test_two_processes_batching_overlapping_keys_load_each_once(
    engine: CacheEngine, twin: Any
) -> None:
    loads: Counter[str] = Counter()
    lock = threading.Lock()

    def slow_batch(ids: list[str]) -> list[str]:
        with lock:
            loads.update(ids)
        time.sleep(0.1)
        return [id.upper() for id in ids]

    def single(id: str) -> str:
        with lock:
            loads[id] += 1
        time.sleep(0.1)
        return id.upper()

    engines = [engine, twin(), twin()]
    functions = [
        # lock_ttl far above any stall: one load per key is the point, not renewal.
        cache_aside(key="w:<id>", ttl=30, lock_ttl=60, engine=e, batch_loader=slow_batch)(single)
        for e in engines
    ]
    ids = [f"k{i}" for i in range(30)]
    results: list[list[str]] = []
    threads = [
        threading.Thread(target=lambda f=f, n=n: results.append(f.many(ids[n * 5 : n * 5 + 20])))
        for n, f in enumerate(functions)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(map(tuple, results)) == sorted(
        tuple(id.upper() for id in ids[n * 5 : n * 5 + 20]) for n in range(3)
    )
    assert set(loads.values()) == {1}  # every key loaded once, across all three engines


def test_batches_survive_a_server_that_forgot_its_scripts() -> None:
    """As after a restart. fakeredis: SCRIPT FLUSH on the shared server is not ours."""
    client = fakeredis.FakeRedis()
    engine = CacheEngine(client, prefix="noscript")
    fn = cache_aside(key="n:<id>", ttl=30, engine=engine, batch_loader=lambda ids: ids)(
        lambda id: id
    )
    fn.many(["a"])
    client.script_flush()
    assert fn.many(["b", "c"]) == ["b", "c"]
    assert fn.lookup("c").source is Source.CACHE
    assert fn.invalidate_many(["a", "b"]) == BulkOutcome(2)


async def test_two_processes_batching_overlapping_keys_load_each_once_async(
    engine: CacheEngine, twin: Any
) -> None:
    loads: Counter[str] = Counter()

    async def slow_batch(ids: list[str]) -> list[str]:
        loads.update(ids)
        await asyncio.sleep(0.1)
        return [id.upper() for id in ids]

    async def single(id: str) -> str:
        loads[id] += 1
        await asyncio.sleep(0.1)
        return id.upper()

    functions = [
        # lock_ttl far above any stall: one load per key is the point, not renewal.
        cache_aside(key="w:<id>", ttl=30, lock_ttl=60, engine=e, batch_loader=slow_batch)(single)
        for e in (engine, twin(), twin())
    ]
    ids = [f"k{i}" for i in range(30)]
    results = await asyncio.gather(
        *(f.many(ids[n * 5 : n * 5 + 20]) for n, f in enumerate(functions))
    )
    assert results == [[id.upper() for id in ids[n * 5 : n * 5 + 20]] for n in range(3)]
    assert set(loads.values()) == {1}  # every key loaded once, across all three engines


async def test_invalidate_all_keeps_another_templates_long_keys(h: Harness) -> None:
    doc = h.cached(lambda url: {"url": url[:10]}, key="doc:<url>")
    reviews = h.cached(lambda url: ["good"], key="doc:<url>:reviews")
    url = "https://example.com/" + "x" * 260  # shortened to a head and a digest
    await h.run(doc, url)
    await h.run(reviews, url)
    assert await h.run(doc.invalidate_all) == BulkOutcome(1)
    assert h.raw.exists(doc.key(url)) == 0
    assert h.raw.exists(reviews.key(url)) == 1  # same head, another template


async def test_a_batch_on_a_peek_function_judges_misses_as_misses(
    h: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """refresh_ahead (or a near cache) looks entries up with PEEK: its replies must
    be unpacked before they are judged, or every miss looks corrupt."""
    rows = {"a": {"id": "a"}, "b": {"id": "b"}}

    def load(id: str) -> dict[str, str]:
        return rows[id]

    fn = h.cached(
        load, key="peek:<id>", refresh_ahead=1, batch_loader=lambda ids: [rows[i] for i in ids]
    )
    with caplog.at_level(logging.WARNING, logger="cached_aside"):
        assert await h.run(fn.many, ["a", "b"]) == [{"id": "a"}, {"id": "b"}]
    assert fn.stats().corrupt == 0
    assert "foreign or damaged" not in caplog.text
