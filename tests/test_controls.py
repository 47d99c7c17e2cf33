"""Per-call controls and storage options: fn.refresh(), fn.set(), cache_if, ttl_jitter
and compress_over; each sync and async, on real Redis and fakeredis."""

from __future__ import annotations

import asyncio
import threading
import zlib
from typing import Any

import msgpack
import pytest

from cached_aside import (
    CacheEngine,
    ConfigurationError,
    Outcome,
    Source,
    UnstorableValueError,
    _plan,
    cache_aside,
)
from cached_aside._codecs import (
    COMPRESSED_MARK,
    MAX_DECOMPRESSED_BYTES,
    MsgpackCodec,
)

from .conftest import (
    PATIENCE,
    Harness,
)


class Rows:
    """The primary: rows by id, and the reads made of it."""

    def __init__(self, **rows: Any) -> None:
        self.rows = dict(rows)
        self.reads: list[str] = []

    def __call__(self, id: str) -> Any:
        self.reads.append(id)
        return self.rows.get(id)


async def test_refresh_reloads_and_stores_whatever_is_cached(h: Harness) -> None:
    rows = Rows(a={"v": 1})
    fn = h.cached(rows, key="r:<id>")
    assert await h.run(fn, "a") == {"v": 1}
    rows.rows["a"] = {"v": 2}
    assert await h.run(fn.refresh, "a") == {"v": 2}
    result = await h.run(fn.lookup, "a")
    assert (result.source, result.value) == (Source.CACHE, {"v": 2})
    assert rows.reads == ["a", "a"]
    assert await h.run(fn.refresh, "new") is None  # a missing row: cached as such
    assert (await h.run(fn.lookup, "new")).source is Source.NEGATIVE


async def test_set_stores_the_value_and_fences_a_load_in_flight(h: Harness) -> None:
    rows = Rows(a={"stock": 1})
    fn = h.cached(rows, key="s:<id>")
    assert await h.run(fn.set, "a", value={"stock": 5}) is Outcome.UPDATED
    result = await h.run(fn.lookup, "a")
    assert (result.source, result.value) == (Source.CACHE, {"stock": 5})
    assert rows.reads == []
    assert await h.run(fn.set, "b", value=None) is Outcome.UPDATED  # "no such row"
    assert (await h.run(fn.lookup, "b")).source is Source.NEGATIVE
    with pytest.raises(UnstorableValueError):
        await h.run(fn.set, "c", value={"x": object()})


async def test_set_revokes_the_lease_of_an_older_load(engine: CacheEngine) -> None:
    """A load read stock 1; the writer made it 2 and set() it; the load's store of 1
    must be refused."""
    reading, release = threading.Event(), threading.Event()
    primary = {"stock": 1}

    @cache_aside(key="p:<id>", ttl=30, engine=engine, as_hash=True)
    def read(id: str) -> dict[str, Any]:
        row = dict(primary)
        reading.set()
        release.wait(5)
        return row

    loaded: list[Any] = []
    loading = threading.Thread(target=lambda: loaded.append(read("a")))
    loading.start()
    assert reading.wait(5)
    primary["stock"] = 2
    assert read.set("a", value=primary) is Outcome.UPDATED
    release.set()
    loading.join(5)
    assert loaded == [{"stock": "1"}]  # the loader's answer, to its own caller
    assert read("a") == {"stock": "2"}  # but the cache kept the newer one


async def test_set_in_hash_mode_and_with_nothing_storable(h: Harness) -> None:
    fn = h.cached(Rows(), key="h:<id>", as_hash=True, negative_ttl=0)
    assert await h.run(fn.set, "a", value={"name": "Pen", "stock": 4}) is Outcome.UPDATED
    assert await h.run(fn, "a") == {"name": "Pen", "stock": "4"}
    # None with negative caching off: nothing to store, so the entry goes.
    assert await h.run(fn.set, "a", value=None) is Outcome.DELETED
    assert not h.raw.exists(fn.key("a"))


async def test_cache_if_returns_but_does_not_store_what_it_refuses(h: Harness) -> None:
    rows = Rows(draft={"status": "draft"}, final={"status": "final"})
    fn = h.cached(rows, key="o:<id>", cache_if=lambda order: order["status"] == "final")
    for _ in range(2):
        assert await h.run(fn, "draft") == {"status": "draft"}
        assert await h.run(fn, "final") == {"status": "final"}
    assert rows.reads == ["draft", "final", "draft"]  # the draft is read every time
    assert not h.raw.exists(fn.key("draft"))
    assert await h.run(fn.set, "draft", value={"status": "draft"}) is Outcome.ABSENT


async def test_ttl_jitter_spreads_expiries_below_the_ttl(h: Harness) -> None:
    fn = h.cached(Rows(**{f"k{i}": i for i in range(40)}), key="j:<id>", ttl=100, ttl_jitter=0.2)
    await h.run(fn.many, [f"k{i}" for i in range(40)])
    ttls = [h.raw.pttl(fn.key(f"k{i}")) for i in range(40)]
    assert all(79_000 < ttl <= 100_000 for ttl in ttls), ttls
    assert max(ttls) - min(ttls) > 2_000  # spread, not all at once


async def test_compression_of_large_values_round_trips_and_is_marked(h: Harness) -> None:
    record = {"id": "p-1", "description": "a fountain pen " * 1400, "n": 7}  # ~20 KB
    rows = Rows(big=record, small={"id": "s"})
    fn = h.cached(rows, key="z:<id>", compress_over=1024)
    assert await h.run(fn, "big") == record
    assert await h.run(fn, "small") == {"id": "s"}
    stored = h.raw.get(fn.key("big"))
    assert stored.startswith(COMPRESSED_MARK)
    assert len(stored) < len(msgpack.packb(record)) / 10
    assert not h.raw.get(fn.key("small")).startswith(COMPRESSED_MARK)  # under the bar
    result = await h.run(fn.lookup, "big")
    assert (result.source, result.value) == (Source.CACHE, record)
    # A function without compress_over reads what one with it wrote.
    reader = h.cached(rows, key="z:<id>")
    assert await h.run(reader, "big") == record
    assert rows.reads == ["big", "small"]


@pytest.mark.parametrize(
    "foreign",
    [
        COMPRESSED_MARK + b"not zlib at all",
        COMPRESSED_MARK + zlib.compress(b"\xc1 not msgpack"),
        COMPRESSED_MARK + zlib.compress(msgpack.packb({"a": 1}))[:-4],  # truncated
        b"\xc1\x00",  # the negative sentinel's byte, then junk
    ],
)
async def test_foreign_bytes_behind_the_mark_are_a_miss_and_repaired(
    h: Harness, foreign: bytes
) -> None:
    rows = Rows(a={"v": 1})
    fn = h.cached(rows, key="z:<id>", compress_over=10)
    h.raw.set(fn.key("a"), foreign)
    assert await h.run(fn, "a") == {"v": 1}
    assert fn.stats().corrupt == 1
    assert await h.run(fn, "a") == {"v": 1}
    assert rows.reads == ["a"]  # rewritten: the second call hit


def test_bad_control_options_are_refused_at_decoration() -> None:
    def load(id: str) -> None: ...

    cases: list[tuple[dict[str, Any], str]] = [
        ({"ttl_jitter": 1.0}, r"ttl_jitter must be a fraction of the ttl in \[0, 1\)"),
        ({"ttl_jitter": -0.1}, "ttl_jitter"),
        ({"ttl_jitter": True}, "ttl_jitter"),
        ({"cache_if": "final"}, "cache_if must be a function"),
        ({"compress_over": 0}, "compress_over must be a whole number >= 1"),
        ({"compress_over": 1024, "as_hash": True}, "compress_over= compresses msgpack"),
    ]
    for options, message in cases:
        with pytest.raises(ConfigurationError, match=message):
            cache_aside(key="k:<id>", ttl=30, **options)(load)


async def test_a_reload_whose_result_is_not_storable_does_not_leave_the_old_value(
    h: Harness,
) -> None:
    # Was a defect: what_to_store answers RELEASE_ONLY for a result that is not to
    # be stored (cache_if says no; None with negative_ttl=0; _flows.py:460-467), and
    # the store script then only gives the lock back: whatever was cached stays.
    # For a plain miss nothing was cached, but a reload REPLACES an entry:
    # fn.refresh() (documented "reload now and store, whatever is cached") returns
    # "no such record" and leaves the deleted row cached and fresh for its ttl; a
    # grace reload leaves the stale value served to the end of the grace (and
    # every hit starts another load whose answer is dropped). fn.set() gets this
    # right: it invalidates instead. Fix: a STORE kind that deletes the value under
    # the lease ('delete': DEL KEYS[1] if the lock is still ours) for reloads
    # (replace=True and _refresh) and for loads that had a kept value.
    rows: dict[str, Any] = {"a": {"v": 1}}
    fn = h.cached(lambda id: rows.get(id), key="rr:<id>", ttl=30, negative_ttl=0)
    assert await h.run(fn, "a") == {"v": 1}
    del rows["a"]  # the row is deleted; the writer refreshes the entry
    assert await h.run(fn.refresh, "a") is None
    assert await h.run(fn, "a") is None, "refresh() left the deleted row cached"


def test_a_value_past_the_decompression_cap_is_stored_plain() -> None:
    """Compressed, a value over the 64 MiB cap on decompression (a guard against
    foreign bombs) would be stored and never read back: every call a corrupt miss."""
    codec = MsgpackCodec(compress_over=1024)
    big = "x" * (MAX_DECOMPRESSED_BYTES + 16)
    payload, _ = codec.encode(big, "t")
    assert not payload[0].startswith(COMPRESSED_MARK)
    assert codec.decode(payload[0]) == big
    small, _ = codec.encode("y" * 4096, "t")
    assert small[0].startswith(COMPRESSED_MARK)  # under the cap: compressed as before


@pytest.mark.parametrize("where", ["elsewhere", "here"])
async def test_refresh_after_a_write_does_not_take_a_load_that_read_before_it(
    h: Harness, where: str, twin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Was a defect: fn.refresh() is documented "after a change you know of", but
    # when a load is in flight (it read the row BEFORE the write) refresh() waited
    # for it and took its value (miss(replace=True) -> HELD -> woken -> FOUND): it
    # returned the old row and left it cached for a whole ttl, though the caller had
    # written the new one first. set() and invalidate() revoke such a lease. Fix:
    # reload revokes the lease of the load in flight (DEL the lock and wake its
    # waiters, keeping the value) before taking the lock, so its older result is
    # refused and this reload's stands.
    # "elsewhere": the slow load is another process's (a twin engine), which the
    # refresh does not wait for. "here": it is this engine's own, which the refresh
    # waits for (one load per key in a process) until its patience runs out, the load
    # still running: the patience is shortened to the lock's ttl, as every
    # loader, however slow, must not hold the test for the 10 s floor.
    if where == "here":
        monkeypatch.setattr(_plan, "PATIENCE_FLOOR_S", 0.0)
    loading_engine = twin() if where == "elsewhere" else h.engine
    rows = {"v": 1}
    read, refreshed_sync = threading.Event(), threading.Event()
    refreshed_async = asyncio.Event()
    fn: Any
    if h.mode == "async":

        async def aload(id: int) -> dict[str, int]:
            row = dict(rows)
            if not read.is_set():
                read.set()
                await refreshed_async.wait()  # the slow first load, after its read
            return row

        fn = cache_aside(key="r:<id>", ttl=30, engine=h.engine)(aload)
        slow = cache_aside(key="r:<id>", ttl=30, engine=loading_engine)(aload)
        loading = asyncio.ensure_future(slow(1))
    else:

        def load(id: int) -> dict[str, int]:
            row = dict(rows)
            if not read.is_set():
                read.set()
                refreshed_sync.wait(PATIENCE)
            return row

        fn = cache_aside(key="r:<id>", ttl=30, engine=h.engine)(load)
        slow = cache_aside(key="r:<id>", ttl=30, engine=loading_engine)(load)
        loading = asyncio.ensure_future(asyncio.to_thread(slow, 1))
    assert await asyncio.to_thread(read.wait, PATIENCE)
    rows["v"] = 2  # the write
    try:
        if h.mode == "async":
            refreshed = await fn.refresh(1)
        else:
            refreshed = await asyncio.to_thread(fn.refresh, 1)
    finally:  # the first load ends after the refresh, however slow the machine
        refreshed_sync.set()
        refreshed_async.set()
    assert await loading == {"v": 1}
    assert refreshed == {"v": 2}, "refresh() after a write returned the row read before it"
    assert await h.run(fn, 1) == {"v": 2}
    assert await h.run(slow, 1) == {"v": 2}, "the older load's result was stored"
