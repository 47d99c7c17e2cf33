"""Tags: entries carry the versions of tags rendered from the loader's arguments
(their stamp), and engine.invalidate_tags() retires a tag's version, so every entry
stamped with it is a miss, whatever Redis kept or evicted; near-cache-aware. Sync
and async, real Redis and fakeredis; one eviction test on a server of its own."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable, Generator
from typing import Any

import msgpack
import pytest

from cached_aside import CacheEngine, ConfigurationError, NearCache, Outcome, Source, cache_aside
from cached_aside import _bulk as bulk_module
from cached_aside._batches import invalidate_tags as tags_flow
from cached_aside._cli import describe
from cached_aside._effects import Batch, CommandFailed, Signal, TagsOf
from cached_aside._flows import after_miss
from cached_aside._keys import KeyTemplate
from cached_aside._plan import Plan, Served
from cached_aside._scripts import AcquireStatus, ScriptName
from cached_aside._stamps import STAMP_MARK, VERSION_LENGTH, read_stamped, take_stamps
from cached_aside._writes import put

from .conftest import PATIENCE, REDIS_URL, Harness, needs_real_redis, wait_until
from .injection import counting_writes
from .servers import REDIS_SERVER, RedisProcess
from .test_flows import KEY, WHOLE, Stepper, plan
from .test_near import near_engine, until_near  # noqa: F401  # a fixture, and its helper


async def invalidate_tags(h: Harness, *tags: str) -> Any:
    if h.mode == "async":
        return await h.engine.ainvalidate_tags(*tags)
    return h.engine.invalidate_tags(*tags)


def tag_key(h: Harness, text: str) -> str:
    return f"{h.engine.prefix}:tag:{{{text}}}"


def tagged_plan() -> Plan:
    """A stepped function's plan (ttl 30 s, lock_ttl 10 s) with tags=("shop:<id>",)."""

    def get_product(id: int) -> None: ...

    return dataclasses.replace(plan(), tags=(KeyTemplate("shop:<id>", get_product),))


def intercept_tag_flow(
    monkeypatch: pytest.MonkeyPatch,
    hook: Callable[[], None] | None = None,
    fail: bool = False,
) -> None:
    """Wrap the next invalidate_tags flow: when it is about to send its first Batch
    (the one that reaches the tags), run `hook` first (what another process does in
    that instant), or answer that Batch with failures (Redis did not answer)."""
    original = tags_flow
    fired: list[bool] = []

    def wrapped(*args: Any, **kwargs: Any) -> Generator[Any, Any, Any]:
        flow = original(*args, **kwargs)
        reply: Any = None
        failure: BaseException | None = None
        while True:
            try:
                effect = flow.send(reply) if failure is None else flow.throw(failure)
            except StopIteration as stop:
                return stop.value
            failure = None
            # The flow's first pipeline: the one that reaches the tags.
            if not fired and type(effect) is Batch and effect.effects:
                fired.append(True)
                if hook is not None:
                    hook()
                if fail:
                    refused = ConnectionError("refused")
                    reply = [CommandFailed(refused, wrong_type=False, sent=False)] * len(
                        effect.effects
                    )
                    continue
            try:
                reply = yield effect
            except BaseException as exc:
                failure = exc

    monkeypatch.setattr(bulk_module, "invalidate_tags", wrapped)


def products(h: Harness, reads: list[str]) -> tuple[Any, Any]:
    """Two functions over one shop's catalogue, sharing the shop's tag."""

    def product(shop_id: int, id: str) -> dict[str, Any]:
        reads.append(f"product {shop_id}/{id}")
        return {"shop": shop_id, "id": id}

    def listing(shop_id: int) -> list[str]:
        reads.append(f"listing {shop_id}")
        return ["a", "b"]

    return (
        h.cached(product, key="product:<shop_id>:<id>", tags=("shop:<shop_id>", "catalog")),
        h.cached(listing, key="listing:<shop_id>", tags=("shop:<shop_id>",)),
    )


async def looked(h: Harness, fn: Any, *args: Any) -> Source:
    """Where a call's answer came from."""
    return (await h.run(fn.lookup, *args)).source  # type: ignore[no-any-return]


async def test_a_tag_drops_every_entry_carrying_it_and_nothing_else(h: Harness) -> None:
    reads: list[str] = []
    product, listing = products(h, reads)
    for shop in (7, 8):
        await h.run(product, shop, "a")
        await h.run(listing, shop)
    outcome = await invalidate_tags(h, "shop:7")
    assert (outcome.deleted, outcome.pending) == (1, 0)  # one tag's version retired
    assert await looked(h, product, 8, "a") is Source.CACHE
    assert await looked(h, listing, 8) is Source.CACHE
    assert await looked(h, product, 7, "a") is Source.LOADER
    assert await looked(h, listing, 7) is Source.LOADER
    assert await looked(h, listing, 7) is Source.CACHE  # stored again, with the new version
    outcome = await invalidate_tags(h, "catalog", "no-such-tag")
    assert outcome.deleted == 1  # "catalog" had a version; "no-such-tag" never had one
    assert await looked(h, product, 8, "a") is Source.LOADER  # both shops' products
    assert await looked(h, listing, 8) is Source.CACHE  # the listings carry no "catalog"


async def test_a_tag_invalidated_during_a_load_makes_what_it_stores_a_miss(h: Harness) -> None:
    reading, release = threading.Event(), threading.Event()
    rows = {"v": 1}

    def load(shop_id: int) -> dict[str, int]:
        row = dict(rows)
        reading.set()
        release.wait(PATIENCE)
        return row

    async def aload(shop_id: int) -> dict[str, int]:
        row = dict(rows)
        reading.set()
        await asyncio.to_thread(release.wait, PATIENCE)  # held without blocking the loop
        return row

    if h.mode == "sync":
        fn = h.cached(load, key="l:<shop_id>", tags=("shop:<shop_id>",))
        loading = asyncio.ensure_future(asyncio.to_thread(fn, 7))
    else:
        fn = cache_aside(key="l:<shop_id>", ttl=30, engine=h.engine, tags=("shop:<shop_id>",))(
            aload
        )
        loading = asyncio.ensure_future(fn(7))
    assert await asyncio.to_thread(reading.wait, PATIENCE)
    rows["v"] = 2  # the writer: the primary first, then the tag
    assert (await invalidate_tags(h, "shop:7")).pending == 0
    release.set()
    assert await loading == {"v": 1}  # its own caller gets what it read
    assert h.raw.exists(fn.key(7))  # stored, stamped with the retired version...
    assert await h.run(fn, 7) == {"v": 2}  # ...so it is a miss


async def test_a_negative_entry_cannot_outlive_its_tag(h: Harness) -> None:
    # negative_ttl longer than ttl: the tag's version must live as long as the "not
    # found", or an invalidation after the row appears would not reach it.
    rows: dict[int, dict[str, int]] = {}
    fn = h.cached(
        lambda id: rows.get(id), key="ne:<id>", ttl=1, negative_ttl=60, tags=("shop:<id>",)
    )
    assert await h.run(fn, 7) is None
    assert await looked(h, fn, 7) is Source.NEGATIVE
    assert h.raw.pttl(tag_key(h, "shop:7")) >= h.raw.pttl(fn.key(7)) > 30_000
    rows[7] = {"v": 1}  # the row appears, and its writer invalidates the tag
    assert (await invalidate_tags(h, "shop:7")).deleted == 1
    assert await h.run(fn, 7) == {"v": 1}, "the stale 'not found' was served"


async def test_a_lost_tag_version_makes_its_entries_misses_never_hits(h: Harness) -> None:
    # What eviction, expiry or a flush of the tag's key does: the entries it stamped
    # are misses, and the reload makes a version never seen before.
    rows = {"v": 1}
    fn = h.cached(lambda id: dict(rows), key="lv:<id>", tags=("shop:<id>",))
    await h.run(fn, 7)
    old = h.raw.get(tag_key(h, "shop:7"))
    assert old is not None
    assert len(old) == VERSION_LENGTH
    h.raw.delete(tag_key(h, "shop:7"))
    rows["v"] = 2
    assert await h.run(fn, 7) == {"v": 2}
    assert h.raw.get(tag_key(h, "shop:7")) not in (None, old)


async def test_foreign_data_at_a_tag_key_is_a_miss_repaired_and_counted(h: Harness) -> None:
    rows = {"v": 1}
    fn = h.cached(lambda shop_id: dict(rows), key="w:<shop_id>", tags=("shop:<shop_id>",))
    await h.run(fn, 7)
    rows["v"] = 2
    for foreign in (b"not a version", b"\xff" * VERSION_LENGTH):
        h.raw.set(tag_key(h, "shop:7"), foreign)
        assert await h.run(fn, 7) == {"v": 2}  # a miss, never the old entry
        assert len(h.raw.get(tag_key(h, "shop:7")) or b"") == VERSION_LENGTH  # repaired
        assert await looked(h, fn, 7) is Source.CACHE
    assert fn.stats().corrupt >= 2


async def test_a_tag_set_of_the_old_layout_with_a_non_utf8_member_loses_nothing(
    h: Harness,
) -> None:
    # Another type at a tag's key (a sorted set written by an earlier version, with a
    # member that is not UTF-8): the invalidation completes, nothing raises, and
    # the entry is not served.
    rows = {"v": 1}
    fn = h.cached(lambda shop_id: dict(rows), key="u8:<shop_id>", tags=("shop:<shop_id>",))
    await h.run(fn, 7)
    h.raw.delete(tag_key(h, "shop:7"))
    h.raw.zadd(tag_key(h, "shop:7"), {b"\xff\xfe{bad}": 2**50, fn.key(7): 2**50})
    rows["v"] = 2
    outcome = await invalidate_tags(h, "shop:7")
    assert (outcome.deleted, outcome.pending) == (1, 0)
    assert not h.engine.pending_invalidations()
    assert await h.run(fn, 7) == {"v": 2}
    h.raw.delete(tag_key(h, "shop:7"))
    h.raw.zadd(tag_key(h, "shop:7"), {b"\xff": 1})  # and a read that finds one there
    rows["v"] = 3
    assert await h.run(fn, 7) == {"v": 3}
    assert h.raw.type(tag_key(h, "shop:7")) == b"string"  # repaired
    assert fn.stats().corrupt >= 1


async def test_a_damaged_stamp_is_a_miss_repaired_and_counted(h: Harness) -> None:
    fn = h.cached(lambda id: {"id": id}, key="ds:<id>", tags=("t:<id>",))
    hashed = h.cached(lambda id: {"id": id}, key="dh:<id>", tags=("t:<id>",), as_hash=True)
    await h.run(fn, "a")
    await h.run(hashed, "a")
    h.raw.set(fn.key("a"), b"\xc1T" + b"0" * 40)  # a stamp that was never a version
    h.raw.hset(hashed.key("a"), "__cached_aside_tags__", b"\xff" * 3)
    h.raw.set(fn.key("b"), b"\x81\xa2id\xa1b")  # an untagged entry: no stamp at all
    for each, id in ((fn, "a"), (hashed, "a"), (fn, "b")):
        assert await looked(h, each, id) is Source.LOADER
        assert await looked(h, each, id) is Source.CACHE
    assert fn.stats().corrupt == 2
    assert hashed.stats().corrupt == 1
    outdated = STAMP_MARK + b"\x01" + b"f" * VERSION_LENGTH + b"\xc0"  # well formed, old
    h.raw.set(fn.key("a"), outdated)
    assert await looked(h, fn, "a") is Source.LOADER
    assert fn.stats().corrupt == 2  # an old stamp is no damage


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not on PATH")
def test_allkeys_lru_eviction_never_makes_a_tag_miss_a_live_entry() -> None:
    # A server of its own, full, evicting the least recently used keys: hot entries
    # are read all the time, their tags only when they load. Whatever it evicts, an
    # entry still in Redis after invalidate_tags() must not be served.
    server = RedisProcess(
        "--maxmemory", "3mb", "--maxmemory-policy", "allkeys-lru", "--maxmemory-samples", "10"
    ).start()
    engine = CacheEngine.from_url(server.url, prefix="ev")
    try:
        raw = server.admin()
        rows = {"v": 1}

        @cache_aside(key="hot:<id>", ttl=600, engine=engine, tags=("item:<id>", "all"))
        def hot(id: int) -> dict[str, int]:
            return {"id": id, **rows}

        ids = range(40)
        for id in ids:
            hot(id)
        filler = b"x" * 20_000
        for round in range(400):  # until a tag's key went while its entries stayed
            raw.set(f"filler:{round}", filler)
            for id in ids:
                hot(id)
            kept = [id for id in ids if raw.exists(hot.key(id))]
            if any(not raw.exists(f"ev:tag:{{item:{id}}}") for id in kept):
                break
        assert raw.info("stats")["evicted_keys"] > 0
        rows["v"] = 2  # the write, then its invalidation
        assert engine.invalidate_tags(*(f"item:{id}" for id in ids)).pending == 0
        stale = [id for id in ids if hot(id)["v"] != 2]
        assert not stale, f"served entries of an invalidated tag after eviction: {stale}"
    finally:
        engine.close()
        server.stop()


async def test_two_functions_of_one_name_are_both_blocked_by_a_pending_tag(
    h: Harness, twin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two tagged functions with one qualified name (two modules, or a redefinition):
    # each registers with the engine, so a pending tag blocks both.
    rows = {"v": 1}
    made = []
    for key in ("one:<shop_id>", "two:<shop_id>"):

        def load(shop_id: int) -> dict[str, int]:
            return dict(rows)

        made.append(h.cached(load, key=key, tags=("shop:<shop_id>",)))
    for fn in made:
        assert await h.run(fn, 7) == {"v": 1}
    monkeypatch.setattr(h.engine.outbox, "start_flusher", lambda: None)  # Redis stays away
    intercept_tag_flow(monkeypatch, fail=True)
    rows["v"] = 2
    assert (await invalidate_tags(h, "shop:7")).pending == 1
    for fn in made:
        assert await h.run(fn, 7) == {"v": 2}, "served an entry a pending tag invalidates"


def test_bad_tags_are_refused_early(engine: CacheEngine) -> None:
    def load(shop_id: int) -> None: ...

    with pytest.raises(ConfigurationError, match="tags must be a tuple"):
        cache_aside(key="k:<shop_id>", ttl=1, tags="shop:<shop_id>")(load)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"tags of .*<nope>"):
        cache_aside(key="k:<shop_id>", ttl=1, tags=("shop:<nope>",))(load)
    with pytest.raises(ConfigurationError, match="repeat"):
        cache_aside(key="k:<shop_id>", ttl=1, tags=("a", "a"))(load)
    for bad in ("", "a{b}", 7):
        with pytest.raises(ConfigurationError, match="invalidate_tags"):
            engine.invalidate_tags(bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="at least one tag"):
        engine.invalidate_tags()


@needs_real_redis
@pytest.mark.parametrize("tracking", ["bcast", "keys"])
def test_a_tag_drops_near_copies_here_at_once_and_elsewhere_by_tracking(
    near_engine: CacheEngine,  # noqa: F811
    tracking: Any,
) -> None:
    assert REDIS_URL is not None
    version = {"v": 1}
    other = CacheEngine.from_url(REDIS_URL, prefix=near_engine.prefix)  # another process

    def make(engine: CacheEngine) -> Any:
        @cache_aside(
            key="n:<shop_id>",
            ttl=30,
            engine=engine,
            near=NearCache(tracking=tracking),
            tags=("shop:<shop_id>",),
        )
        def read(shop_id: int) -> dict[str, int]:
            return dict(version)

        return read

    here, there = make(near_engine), make(other)
    try:
        here(7)
        until_near(here, 7)
        until_near(there, 7)
        version["v"] = 2
        assert near_engine.invalidate_tags("shop:7").deleted == 1
        assert here(7) == {"v": 2}  # at once, in this process
        assert wait_until(lambda: there(7) == {"v": 2}), "the other process kept its near copy"
    finally:
        other.close()


async def test_a_reload_right_after_a_tag_invalidation_is_reached_by_the_next(
    h: Harness, twin: Any
) -> None:
    # Another process reloads the entry between two writes: it is stamped with the
    # tag's new version, which the next invalidation retires in turn.
    rows = {"v": 1}

    def load(shop_id: int) -> dict[str, int]:
        return dict(rows)

    fn = h.cached(load, key="p:<shop_id>", tags=("shop:<shop_id>",))
    elsewhere = cache_aside(key="p:<shop_id>", ttl=30, tags=("shop:<shop_id>",), engine=twin())(
        load
    )
    await h.run(fn, 7)
    rows["v"] = 2  # a write, then its tag invalidation
    assert (await invalidate_tags(h, "shop:7")).deleted == 1
    assert elsewhere(7) == {"v": 2}
    assert await looked(h, fn, 7) is Source.CACHE
    rows["v"] = 3  # the next write
    assert (await invalidate_tags(h, "shop:7")).deleted == 1
    assert await h.run(fn, 7) == {"v": 3}, "invalidate_tags missed an entry of its tag"


async def test_an_entry_put_with_set_is_dropped_by_its_tag(h: Harness) -> None:
    rows = {"v": 1}

    def load(shop_id: int) -> dict[str, int]:
        return dict(rows)

    fn = h.cached(load, key="s:<shop_id>", tags=("shop:<shop_id>",))
    rows["v"] = 2
    assert await h.run(fn.set, 7, value={"v": 2}) is Outcome.UPDATED
    assert await looked(h, fn, 7) is Source.CACHE
    rows["v"] = 3
    assert (await invalidate_tags(h, "shop:7")).deleted == 1
    assert await h.run(fn, 7) == {"v": 3}, "the tag did not reach the entry set() wrote"


def test_a_put_whose_tag_redis_refused_invalidates_the_entry_instead() -> None:
    # Written without its tag's version, the entry could outlive every invalidation
    # of the tag: set() drops it instead, and says so (DELETED, not UPDATED).
    plan = tagged_plan()
    flow = Stepper(put(plan, KEY, {"v": 2}, WHOLE))
    assert type(flow.effect) is TagsOf
    batch = flow.reply(("shop:7",))
    assert [effect.script for effect in batch.effects] == [ScriptName.TAG_STAMP]
    invalidation = flow.reply([CommandFailed(ConnectionError("down"), wrong_type=False)])
    assert invalidation.script is ScriptName.INVALIDATE
    assert flow.reply(1) is None
    assert flow.result is Outcome.DELETED
    assert plan.stats.snapshot().errors == 1


async def test_update_field_keeps_the_tag_version_alive_with_the_entry(h: Harness) -> None:
    fn = h.cached(
        lambda shop_id: {"name": "old", "price": "1"},
        key="u:<shop_id>",
        as_hash=True,
        ttl=30,
        lock_ttl=2,  # short (the version's life is ttl + lock_ttl), yet above a stall
        tags=("shop:<shop_id>",),
    )
    await h.run(fn, 7)
    # 20 s later, say (the version outlives the entry, as the load sized it):
    assert h.raw.pexpire(fn.key(7), 10_000)
    assert h.raw.pexpire(tag_key(h, "shop:7"), 20_000)
    assert await h.run(fn.update_field, 7, "name", "new") is Outcome.UPDATED
    assert h.raw.pttl(tag_key(h, "shop:7")) >= h.raw.pttl(fn.key(7)) > 29_000
    result = await h.run(fn.lookup, 7)
    assert (result.source, result.value["name"]) == (Source.CACHE, "new")  # the stamp held
    assert (await invalidate_tags(h, "shop:7")).deleted == 1
    assert await looked(h, fn, 7) is Source.LOADER, "invalidate_tags missed the entry"


async def test_a_pending_tag_blocks_a_function_met_after_it_was_queued(
    h: Harness, twin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = {"v": 1}

    def load(shop_id: int) -> dict[str, int]:
        return dict(rows)

    elsewhere = cache_aside(key="q:<shop_id>", ttl=30, tags=("shop:<shop_id>",), engine=twin())(
        load
    )
    assert elsewhere(7) == {"v": 1}  # another process cached it
    fn = h.cached(load, key="q:<shop_id>", tags=("shop:<shop_id>",))  # not called yet
    monkeypatch.setattr(h.engine.outbox, "start_flusher", lambda: None)  # Redis stays away
    intercept_tag_flow(monkeypatch, fail=True)
    rows["v"] = 2
    assert (await invalidate_tags(h, "shop:7")).pending == 1
    assert h.engine.pending_invalidations() == [tag_key(h, "shop:7")]
    assert await h.run(fn, 7) == {"v": 2}, "served the entry a pending tag invalidates"
    assert h.raw.exists(fn.key(7))  # still in Redis: only the outbox will delete it


async def test_a_pending_tag_blocks_a_function_met_before_it_was_queued(
    h: Harness, twin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = {"v": 1}

    def load(shop_id: int) -> dict[str, int]:
        return dict(rows)

    fn = h.cached(load, key="q:<shop_id>", tags=("shop:<shop_id>",))
    assert await h.run(fn, 8) == {"v": 1}  # met: registered with the engine
    elsewhere = cache_aside(key="q:<shop_id>", ttl=30, tags=("shop:<shop_id>",), engine=twin())(
        load
    )
    assert elsewhere(7) == {"v": 1}
    monkeypatch.setattr(h.engine.outbox, "start_flusher", lambda: None)
    intercept_tag_flow(monkeypatch, fail=True)
    rows["v"] = 2
    assert (await invalidate_tags(h, "shop:7")).pending == 1
    assert await h.run(fn, 7) == {"v": 2}
    assert h.raw.exists(fn.key(7))  # still in Redis: only the outbox will delete it


async def test_a_pending_tag_over_foreign_data_is_delivered(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    fn = h.cached(lambda shop_id: {"s": shop_id}, key="w:<shop_id>", tags=("shop:<shop_id>",))
    await h.run(fn, 7)

    def foreign_data_arrives() -> None:
        h.raw.delete(tag_key(h, "shop:7"))
        h.raw.sadd(tag_key(h, "shop:7"), "not a version")

    intercept_tag_flow(monkeypatch, foreign_data_arrives, fail=True)
    assert (await invalidate_tags(h, "shop:7")).pending == 1  # the outbox delivers it
    assert await h.engine.asettle() if h.mode == "async" else h.engine.settle()
    assert not h.engine.pending_invalidations()
    assert not h.raw.exists(tag_key(h, "shop:7"))
    assert await looked(h, fn, 7) is Source.LOADER


async def test_a_tag_is_one_small_key_that_expires_whatever_its_traffic(h: Harness) -> None:
    # However many entries carry a tag and however busy it is, the tag is one
    # version (16 bytes) that lives twice the longest life of an entry stamped with
    # it (ttl + lock_ttl here), renewed by loads: nothing to trim, nothing to grow.
    fn = h.cached(lambda id: {"id": id}, key="gr:<id>", ttl=30, lock_ttl=5, tags=("all",))
    for id in range(60):
        await h.run(fn, id)
    assert h.raw.strlen(tag_key(h, "all")) == VERSION_LENGTH
    assert 35_000 < h.raw.pttl(tag_key(h, "all")) <= 70_000
    assert h.raw.pexpire(tag_key(h, "all"), 60_000)  # more than one life left: kept
    await h.run(fn, "new")
    assert h.raw.pttl(tag_key(h, "all")) <= 60_000
    assert h.raw.pexpire(tag_key(h, "all"), 34_000)  # less than one life left: renewed
    await h.run(fn, "newer")
    assert h.raw.pttl(tag_key(h, "all")) > 60_000
    before = h.raw.get(tag_key(h, "all"))
    assert await looked(h, fn, 3) is Source.CACHE  # a hit reads the version, never writes
    assert h.raw.get(tag_key(h, "all")) == before


def test_a_load_takes_its_stamp_in_one_script_per_distinct_tag() -> None:
    plan = tagged_plan()
    flow = Stepper(take_stamps(plan, [(KEY, ("shop:7", "all")), ("cache:{other}", ("all",))]))
    scripts = flow.effect.effects
    assert [s.script for s in scripts] == [ScriptName.TAG_STAMP] * 2  # "all" once
    assert [s.args[1] for s in scripts] == [30_000 + 10_000] * 2  # ttl + lock_ttl
    assert scripts[0].args[0] != scripts[1].args[0]  # fresh versions, never reused
    flow.reply([[b"a" * 16, 0], [b"b" * 16, 1]])  # "all" held foreign data, replaced
    assert flow.result == [b"a" * 16 + b"b" * 16, b"b" * 16]
    assert plan.stats.snapshot().corrupt == 1


async def test_a_text_id_is_reached_by_the_tag_text_the_docs_show(h: Harness) -> None:
    # Keys tell "7" from 7 (f("7") and f(7) never share an entry); tags need not:
    # two entries sharing a tag are only ever invalidated together. So a str id from
    # a URL is reached by "shop:7", as the docs show.
    rows = {"v": 1}
    fn = h.cached(lambda shop_id: dict(rows), key="tt:<shop_id>", tags=("shop:<shop_id>",))
    await h.run(fn, "7")  # a path parameter: text
    await h.run(fn, 7)
    assert fn.key("7") != fn.key(7)
    assert (await invalidate_tags(h, "shop:7")).deleted == 1
    assert await looked(h, fn, "7") is Source.LOADER
    assert await looked(h, fn, 7) is Source.LOADER
    await h.run(fn, "a:b/c d")  # separators are still escaped, as in keys
    assert (await invalidate_tags(h, "shop:a%3Ab%2Fc%20d")).deleted == 1
    assert await looked(h, fn, "a:b/c d") is Source.LOADER


# -- tags with the other serving options ------------------------------------------


async def test_no_lock_is_left_when_cache_if_or_a_tag_fails(h: Harness) -> None:
    # a cache_if that raises, or a tag whose argument cannot be rendered,
    # fails the call after the lock was taken; the driver's Hold gives it back.
    def bad_predicate(value: Any) -> bool:
        raise ValueError("cache_if bug")

    fn = h.cached(lambda id: {"id": id}, key="ci:<id>", cache_if=bad_predicate)
    with pytest.raises(ValueError, match="cache_if bug"):
        await h.run(fn, "a")
    assert not h.raw.exists(fn.key("a") + ":lock")

    class Opaque:  # no __str__: its text holds a memory address
        pass

    def tagged(id: str, owner: Any) -> dict[str, str]:
        return {"id": id}

    tg = h.cached(tagged, key="tg:<id>", tags=("owner:<owner>",))
    with pytest.raises(Exception, match="memory address"):
        await h.run(tg, "a", Opaque())
    assert not h.raw.exists(tg.key("a", None) + ":lock")
    rows = {"id": "b"}
    batched = h.cached(
        lambda id: dict(rows),
        key="cb:<id>",
        cache_if=bad_predicate,
        batch_loader=lambda ids: [dict(rows) for _ in ids],
    )
    with pytest.raises(ValueError, match="cache_if bug"):
        await h.run(batched.many, ["x", "y"])
    assert not h.raw.exists(batched.key("x") + ":lock", batched.key("y") + ":lock")


async def test_many_applies_tags_cache_if_and_jitter_like_single_loads(h: Harness) -> None:
    batches: list[list[int]] = []

    def load(id: int) -> dict[str, Any]:
        return {"id": id, "final": id % 2 == 0}

    def batch(ids: list[int]) -> list[dict[str, Any]]:
        batches.append(list(ids))
        return [load(i) for i in ids]

    fn = h.cached(
        load,
        key="mt:<id>",
        ttl=30,
        grace=10,
        ttl_jitter=0.5,
        cache_if=lambda row: row["final"],
        tags=("all",),
        batch_loader=batch,
    )
    assert [r["id"] for r in await h.run(fn.many, [1, 2, 3, 4])] == [1, 2, 3, 4]
    assert h.raw.exists(fn.key(1), fn.key(3)) == 0  # cache_if said no
    for id in (2, 4):
        assert 15_000 <= h.raw.pttl(fn.key(id)) <= 40_000  # ttl less jitter, plus grace
    assert await looked(h, fn, 2) is Source.CACHE  # stamped as a single load stamps
    batches.clear()
    assert [r["id"] for r in await h.run(fn.many, [2, 4])] == [2, 4]
    assert batches == []  # many() reads stamps too: hits
    assert (await invalidate_tags(h, "all")).deleted == 1
    assert [r["id"] for r in await h.run(fn.many, [2, 4])] == [2, 4]
    assert batches == [[2, 4]], "many() served entries of an invalidated tag"
    assert await looked(h, fn, 4) is Source.CACHE


async def test_a_tag_invalidation_removes_the_grace_too(h: Harness) -> None:
    rows = {"v": 1}
    fn = h.cached(lambda id: dict(rows), key="gt:<id>", ttl=30, grace=60, tags=("t:<id>",))
    await h.run(fn, "a")
    assert h.raw.pexpire(fn.key("a"), 30_000)  # 30 s into its grace
    rows["v"] = 2
    assert (await invalidate_tags(h, "t:a")).deleted == 1
    result = await h.run(fn.lookup, "a")
    assert (result.source, result.value) == (Source.LOADER, {"v": 2})


async def test_a_negative_entry_in_its_grace_is_served_stale_and_reloaded(
    h: Harness,
) -> None:
    rows: dict[str, Any] = {}
    fn = h.cached(lambda id: rows.get(id), key="ng:<id>", ttl=30, negative_ttl=5, grace=10)
    assert await h.run(fn, "a") is None
    assert 5_000 < h.raw.pttl(fn.key("a")) <= 15_000  # negative ttl plus grace
    rows["a"] = {"now": "exists"}
    assert h.raw.pexpire(fn.key("a"), 9_000)  # 1 s into its grace
    stale = await h.run(fn.lookup, "a")
    assert (stale.source, stale.value) == (Source.STALE, None)
    assert await h.engine.asettle() if h.mode == "async" else h.engine.settle()
    assert await h.run(fn, "a") == {"now": "exists"}


# -- the tagged miss path, stepped ----------------------------------------------

V1, V2 = b"1" * VERSION_LENGTH, b"2" * VERSION_LENGTH


def test_a_hit_is_served_only_with_a_current_stamp() -> None:
    p = tagged_plan()
    packed = msgpack.packb({"a": 1})
    entry = STAMP_MARK + b"\x01" + V1 + packed
    assert read_stamped(p, [entry, V1]) == packed
    assert read_stamped(p, [entry, V2]) is None  # the tag was invalidated since
    assert read_stamped(p, [entry, None]) is None  # its version is gone (evicted)
    assert read_stamped(p, [packed, V1]) is None  # no stamp: foreign to a tagged function
    down = CommandFailed(ConnectionError("down"), wrong_type=False)
    assert read_stamped(p, [entry, down]) is down  # cannot tell: not a hit


def test_an_outdated_entry_found_by_the_lock_script_is_loaded_over() -> None:
    p = tagged_plan()
    flow = Stepper(after_miss(p, KEY, None, 500))
    assert type(flow.effect) is TagsOf
    batch = flow.reply(("shop:7",))
    acquire, version = batch.effects
    assert (acquire.script, acquire.args[3]) == (ScriptName.ACQUIRE, "0")
    assert version.args == ("GET", "cache:tag:{shop:7}")  # read after the entry
    stale = STAMP_MARK + b"\x01" + V1 + msgpack.packb({"v": 1})
    batch = flow.reply([[AcquireStatus.FOUND, stale], V2])
    assert batch.effects[0].args[3] == "1"  # again, ignoring the outdated entry
    assert type(flow.reply([[AcquireStatus.OWNED], V2])) is TagsOf  # the load's stamp next


def test_a_store_after_a_tag_invalidation_is_not_shared() -> None:
    # The load took V1; the tag was invalidated before its store: callers who joined
    # it must look again (lease_kept False), though its own caller gets its value.
    p = tagged_plan()
    flow = Stepper(after_miss(p, KEY, None, 500))
    flow.reply(("shop:7",))
    flow.reply([[AcquireStatus.OWNED], V1])
    stamps = flow.reply(("shop:7",))
    assert [effect.script for effect in stamps.effects] == [ScriptName.TAG_STAMP]
    assert flow.reply([[V1, 0]]) is Signal.LOAD
    assert flow.reply({"v": 1}) is Signal.SEAL
    store = flow.reply(None)
    assert store.effects[0].script is ScriptName.STORE
    assert store.effects[0].args[4] == STAMP_MARK + b"\x01" + V1 + msgpack.packb({"v": 1})
    flow.reply([1, None])  # stored; the version is gone meanwhile
    assert flow.result == Served({"v": 1}, Source.LOADER, lease_kept=False, shareable=False)
    assert flow.holds == []


def test_foreign_data_at_a_tag_key_found_after_a_wait_is_loaded_over() -> None:
    p = tagged_plan()
    flow = Stepper(after_miss(p, KEY, None, 500))
    flow.reply(("shop:7",))
    entry = STAMP_MARK + b"\x01" + V1 + msgpack.packb({"v": 1})
    wrong = CommandFailed(ValueError("WRONGTYPE"), wrong_type=True)
    batch = flow.reply([[AcquireStatus.FOUND, entry], wrong])
    assert batch.effects[0].args[3] == "1"  # not served, not loaded uncached: replaced


async def test_a_tagged_hit_is_one_round_trip_and_an_untagged_one_unchanged(
    clients: Any,
) -> None:
    sync_client, async_client, _ = clients
    counting = counting_writes(sync_client, async_client)
    engine = CacheEngine(sync_client, async_client, prefix=f"rt-{time.monotonic_ns()}")
    try:
        tagged = cache_aside(key="t:<id>", ttl=30, engine=engine, tags=("shop:<id>", "all"))(
            lambda id: {"id": id}
        )
        plain = cache_aside(key="p:<id>", ttl=30, engine=engine)(lambda id: {"id": id})
        tagged_async = cache_aside(key="a:<id>", ttl=30, engine=engine, tags=("all",))(_async_row)
        for fn in (tagged, plain):
            fn.invalidate(7)  # the server learns the scripts (one extra round trip each)
            fn(7)
        await tagged_async(7)
        counting.ops.clear()
        assert tagged.lookup(7).source is Source.CACHE
        assert plain.lookup(7).source is Source.CACHE
        assert (await tagged_async.lookup(7)).source is Source.CACHE
        assert counting.ops == ["pipeline[GET]", "GET", "pipeline[GET]"]
        counting.ops.clear()
        assert engine.invalidate_tags("shop:7", "all").deleted == 2
        assert counting.ops == ["pipeline[DEL]"]
    finally:
        engine.invalidate_prefix()
        await engine.aclose()


async def _async_row(id: int) -> dict[str, int]:
    return {"id": id}


async def test_the_command_line_reads_a_tagged_entry_and_its_stamp(h: Harness) -> None:
    fn = h.cached(lambda id: {"id": id}, key="cl:<id>", tags=("shop:<id>", "all"))
    hashed = h.cached(lambda id: {"id": id}, key="ch:<id>", tags=("all",), as_hash=True)
    await h.run(fn, "a")
    await h.run(hashed, "a")
    versions = [h.raw.get(tag_key(h, text)).decode() for text in ("shop:a", "all")]
    report = describe(h.raw, fn.key("a"))
    assert report is not None
    assert (report["entry"], report["value"], report["stamp"]) == (
        "msgpack value",
        {"id": "a"},
        versions,
    )
    report = describe(h.raw, hashed.key("a"))
    assert report is not None
    assert (report["entry"], report["value"], report["stamp"]) == (
        "hash record",
        {"id": "a"},
        versions[1:],
    )


@dataclasses.dataclass
class Stocked:
    shop_id: int
    stock: int


@pytest.mark.parametrize("as_hash", [False, True], ids=["msgpack", "hash"])
async def test_typed_tagged_entries_hit_and_drop_with_their_tags(h: Harness, as_hash: bool) -> None:
    """Typed values meet tags: a typed (dataclass) entry carries its stamp, hits as the
    declared type, one or many, and a tag drops it; update_field on a typed hash whose
    tag was invalidated patches a miss, never brings it back."""
    loads: list[int] = []

    def load(shop_id: int) -> Stocked | None:
        loads.append(shop_id)
        return Stocked(shop_id, 3)

    def batch(ids: list[int]) -> dict[int, Stocked]:
        loads.extend(ids)
        return {id: Stocked(id, 3) for id in ids}

    fn = h.cached(
        load, key="ty:<shop_id>", tags=("shop:<shop_id>", "all"), as_hash=as_hash,
        batch_loader=batch,
    )  # fmt: skip
    assert await h.run(fn.many, [1, 2]) == [Stocked(1, 3), Stocked(2, 3)]
    hit = await h.run(fn.lookup, 1)
    assert (hit.source, type(hit.value), hit.value) == (Source.CACHE, Stocked, Stocked(1, 3))
    assert await h.run(fn.many, [1, 2]) == [Stocked(1, 3), Stocked(2, 3)]
    assert loads == [1, 2]
    assert (await invalidate_tags(h, "shop:1")).deleted == 1
    if as_hash:
        assert await h.run(fn.update_field, 1, "stock", 9) is Outcome.UPDATED
    assert await looked(h, fn, 1) is Source.LOADER
    assert await h.run(fn, 1) == Stocked(1, 3)
    if as_hash:
        assert await h.run(fn.update_field, 1, "stock", 9) is Outcome.UPDATED
        assert (await h.run(fn.lookup, 1)).value == Stocked(1, 9)
    assert await looked(h, fn, 2) is Source.CACHE


@pytest.mark.parametrize("batched", [False, True], ids=["single", "many"])
async def test_stale_if_error_never_serves_an_entry_its_tag_dropped(
    h: Harness, batched: bool
) -> None:
    """stale_if_error meets tags: an entry whose tag was invalidated is still in Redis
    (only the version went), and a failing load must not answer with it as STALE;
    an entry of an untouched tag still is."""
    failing = {"now": False}

    def load(shop_id: int) -> dict[str, int]:
        if failing["now"]:
            raise RuntimeError("the primary is down")
        return {"shop": shop_id}

    def batch(ids: list[int]) -> dict[int, dict[str, int]]:
        return {id: load(id) for id in ids}

    fn = h.cached(
        load, key="se:<shop_id>", ttl=30, stale_if_error=60, tags=("shop:<shop_id>",),
        batch_loader=batch,
    )  # fmt: skip
    await h.run(fn.many, [1, 2])
    for id in (1, 2):
        assert h.raw.pexpire(fn.key(id), 30_000)  # past the ttl, kept for stale_if_error
    failing["now"] = True
    await invalidate_tags(h, "shop:1")
    with pytest.raises(RuntimeError, match="primary is down"):
        await h.run(fn.many, [1]) if batched else await h.run(fn, 1)
    kept = await h.run(fn.many, [2]) if batched else [await h.run(fn, 2)]
    assert kept == [{"shop": 2}]
