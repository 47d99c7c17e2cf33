"""Tags: entries carry tags rendered from the loader's arguments, and
engine.invalidate_tags() drops every entry carrying one, without a scan; lease-
and near-cache-aware. Sync and async, real Redis and fakeredis."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import threading
import time
from collections.abc import Callable, Generator
from typing import Any

import pytest

from cached_aside import CacheEngine, ConfigurationError, NearCache, Outcome, Source, cache_aside
from cached_aside import _engine as engine_module
from cached_aside._batches import invalidate_tags as tags_flow
from cached_aside._effects import Batch, CommandFailed, RunScript, Signal, TagsOf
from cached_aside._flows import TAG_TRIM_LIMIT, Plan, join_tags, put
from cached_aside._keys import KeyTemplate
from cached_aside._scripts import ScriptName

from .conftest import REDIS_URL, Harness, needs_real_redis
from .test_flows import KEY, WHOLE, Stepper, plan
from .test_near import near_engine, until_near  # noqa: F401  # a fixture, and its helper

FAR = 2**50  # a tag set member's score (ms of the Redis clock) far in the future


async def invalidate_tags(h: Harness, *tags: str) -> Any:
    if h.mode == "async":
        return await h.engine.ainvalidate_tags(*tags)
    return h.engine.invalidate_tags(*tags)


def tag_set(h: Harness, text: str) -> str:
    return f"{h.engine.prefix}:tag:{{{text}}}"


def tagged_plan() -> Plan:
    """A stepped function's plan (ttl 30 s, lock_ttl 10 s) with tags=("shop:<id>",)."""

    def get_product(id: int) -> None: ...

    return dataclasses.replace(plan(), tags=(KeyTemplate("shop:<id>", get_product),))


def intercept_tag_flow(
    monkeypatch: pytest.MonkeyPatch,
    before: ScriptName,
    hook: Callable[[], None] | None = None,
    fail: bool = False,
) -> None:
    """Wrap the next invalidate_tags flow: when it is about to send a Batch of
    `before` scripts, run `hook` first (what another process does in that instant),
    or answer that Batch with failures (Redis did not answer)."""
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
            if not fired and type(effect) is Batch and effect.effects:
                first = effect.effects[0]
                if type(first) is RunScript and first.script is before:
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

    monkeypatch.setattr(engine_module, "invalidate_tags", wrapped)


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


async def test_a_tag_drops_every_entry_carrying_it_and_nothing_else(h: Harness) -> None:
    reads: list[str] = []
    product, listing = products(h, reads)
    for shop in (7, 8):
        await h.run(product, shop, "a")
        await h.run(listing, shop)
    assert set(h.raw.zrange(tag_set(h, "shop:7"), 0, -1)) == {
        product.key(7, "a").encode(),
        listing.key(7).encode(),
    }
    outcome = await invalidate_tags(h, "shop:7")
    assert (outcome.deleted, outcome.pending) == (2, 0)
    assert not h.raw.exists(product.key(7, "a"), listing.key(7))
    assert h.raw.exists(product.key(8, "a"), listing.key(8)) == 2
    assert not h.raw.exists(tag_set(h, "shop:7"))  # emptied as it went
    assert (await h.run(product.lookup, 8, "a")).source is Source.CACHE
    assert (await h.run(product.lookup, 7, "a")).source is Source.LOADER
    outcome = await invalidate_tags(h, "catalog", "no-such-tag")
    assert outcome.deleted == 2  # both shops' products; the listings carry no "catalog"
    assert h.raw.exists(listing.key(8)) == 1


async def test_a_tag_invalidated_during_a_load_stores_nothing(h: Harness) -> None:
    reading, release = threading.Event(), threading.Event()
    rows = {"v": 1}

    def load(shop_id: int) -> dict[str, int]:
        row = dict(rows)
        reading.set()
        release.wait(30)
        return row

    async def aload(shop_id: int) -> dict[str, int]:
        row = dict(rows)
        reading.set()
        await asyncio.to_thread(release.wait, 30)  # held without blocking the loop
        return row

    if h.mode == "sync":
        fn = h.cached(load, key="l:<shop_id>", tags=("shop:<shop_id>",))
        loading = asyncio.ensure_future(asyncio.to_thread(fn, 7))
    else:
        fn = cache_aside(key="l:<shop_id>", ttl=30, engine=h.engine, tags=("shop:<shop_id>",))(
            aload
        )
        loading = asyncio.ensure_future(fn(7))
    assert await asyncio.to_thread(reading.wait, 30)
    rows["v"] = 2  # the writer: the primary first, then the tag
    assert (await invalidate_tags(h, "shop:7")).pending == 0
    release.set()
    assert await loading == {"v": 1}  # its own caller gets what it read
    assert not h.raw.exists(fn.key(7))  # but its lease was revoked: nothing stored
    assert await h.run(fn, 7) == {"v": 2}


async def test_foreign_members_of_a_tag_set_are_never_deleted(h: Harness) -> None:
    fn = h.cached(lambda shop_id: {"s": shop_id}, key="f:<shop_id>", tags=("shop:<shop_id>",))
    await h.run(fn, 7)
    h.raw.set("someone-elses-key", "x")
    try:
        h.raw.zadd(tag_set(h, "shop:7"), {"someone-elses-key": FAR, "junk{": FAR})
        assert (await invalidate_tags(h, "shop:7")).deleted == 1
        assert h.raw.get("someone-elses-key") == b"x"
    finally:
        h.raw.delete("someone-elses-key")


async def test_tags_cost_one_command_each_per_load_and_sets_expire(h: Harness) -> None:
    fn = h.cached(lambda id: {"id": id}, key="c:<id>", ttl=30, lock_ttl=5, tags=("t:<id>", "all"))
    await h.run(fn, "x")
    ttl = h.raw.pttl(tag_set(h, "all"))
    assert 30_000 < ttl <= 35_000  # the entry's ttl plus its lock's: then the set goes
    await h.run(fn, "x")  # a hit touches no tag
    assert h.raw.zcard(tag_set(h, "all")) == 1


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
def test_a_tag_drops_near_copies_here_at_once_and_elsewhere_by_tracking(
    near_engine: CacheEngine,  # noqa: F811
) -> None:
    assert REDIS_URL is not None
    version = {"v": 1}
    other = CacheEngine.from_url(REDIS_URL, prefix=near_engine.prefix)  # another process

    def make(engine: CacheEngine) -> Any:
        @cache_aside(
            key="n:<shop_id>", ttl=30, engine=engine, near=NearCache(), tags=("shop:<shop_id>",)
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
        until = time.monotonic() + 2
        while there(7) != {"v": 2}:
            assert time.monotonic() < until, "the other process kept its near copy"
            time.sleep(0.005)
    finally:
        other.close()


async def test_a_reload_right_after_a_tag_invalidation_stays_in_the_tag_set(
    h: Harness, twin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # invalidate_tags() reads a set, invalidates its entries, then prunes them; a
    # process that reloads an entry in between (it read the new row) joins the set
    # again, and the prune must leave it there for the next write's invalidation.
    rows = {"v": 1}

    def load(shop_id: int) -> dict[str, int]:
        return dict(rows)

    fn = h.cached(load, key="p:<shop_id>", tags=("shop:<shop_id>",))
    elsewhere = cache_aside(key="p:<shop_id>", ttl=30, tags=("shop:<shop_id>",), engine=twin())(
        load
    )
    await h.run(fn, 7)
    rows["v"] = 2  # a write, then its tag invalidation

    def another_process_reloads() -> None:
        assert elsewhere(7) == {"v": 2}  # between the invalidation and the prune

    intercept_tag_flow(monkeypatch, ScriptName.TAG_PRUNE, another_process_reloads)
    assert (await invalidate_tags(h, "shop:7")).deleted == 1
    monkeypatch.undo()
    assert h.raw.zrange(tag_set(h, "shop:7"), 0, -1) == [fn.key(7).encode()]
    assert await h.run(fn, 7) == {"v": 2}
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
    assert h.raw.zrange(tag_set(h, "shop:7"), 0, -1) == [fn.key(7).encode()]
    assert await h.run(fn, 7) == {"v": 2}
    rows["v"] = 3
    assert (await invalidate_tags(h, "shop:7")).deleted == 1
    assert await h.run(fn, 7) == {"v": 3}, "the tag did not reach the entry set() wrote"


def test_a_put_whose_tag_redis_refused_invalidates_the_entry_instead() -> None:
    # Written without its tag's set, the entry could outlive every invalidation of
    # the tag: set() drops it instead, and says so (DELETED, not UPDATED).
    plan = tagged_plan()
    flow = Stepper(put(plan, KEY, {"v": 2}, WHOLE))
    assert type(flow.effect) is TagsOf
    batch = flow.reply(("shop:7",))
    assert [effect.script for effect in batch.effects] == [ScriptName.TAG_ADD]
    invalidation = flow.reply([CommandFailed(ConnectionError("down"), wrong_type=False)])
    assert invalidation.script is ScriptName.INVALIDATE
    assert flow.reply(1) is None
    assert flow.result is Outcome.DELETED
    assert plan.stats.snapshot().errors == 1


async def test_update_field_keeps_the_entry_alive_past_its_tag_set(h: Harness) -> None:
    fn = h.cached(
        lambda shop_id: {"name": "old", "price": "1"},
        key="u:<shop_id>",
        as_hash=True,
        ttl=30,
        lock_ttl=0.2,
        tags=("shop:<shop_id>",),
    )
    await h.run(fn, 7)
    # 25 s later (the set outlives the entry by lock_ttl, as the load sized it):
    assert h.raw.pexpire(fn.key(7), 5_000)
    assert h.raw.pexpire(tag_set(h, "shop:7"), 5_200)
    assert await h.run(fn.update_field, 7, "name", "new") is Outcome.UPDATED
    # the entry lives 30 s more, and the set (which had 5.2 s left) at least as long
    assert h.raw.pttl(fn.key(7)) > 5_200
    assert h.raw.pexpiretime(tag_set(h, "shop:7")) >= h.raw.pexpiretime(fn.key(7))
    assert (await invalidate_tags(h, "shop:7")).deleted == 1
    assert not h.raw.exists(fn.key(7)), "invalidate_tags missed an entry carrying the tag"


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
    intercept_tag_flow(monkeypatch, ScriptName.TAG_MEMBERS, fail=True)
    rows["v"] = 2
    assert (await invalidate_tags(h, "shop:7")).pending == 1
    assert h.engine.pending_invalidations() == [tag_set(h, "shop:7")]
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
    intercept_tag_flow(monkeypatch, ScriptName.TAG_MEMBERS, fail=True)
    rows["v"] = 2
    assert (await invalidate_tags(h, "shop:7")).pending == 1
    assert await h.run(fn, 7) == {"v": 2}
    assert h.raw.exists(fn.key(7))  # still in Redis: only the outbox will delete it


async def test_foreign_data_where_a_tag_set_belongs_is_deleted_and_counted(h: Harness) -> None:
    # Another type at a tag's key (foreign data, or an engine whose prefix is this
    # one's plus ":tag") names no entry that can be trusted: the invalidation deletes
    # it and completes, instead of retrying from the outbox for ever.
    fn = h.cached(lambda shop_id: {"s": shop_id}, key="w:<shop_id>", tags=("shop:<shop_id>",))
    await h.run(fn, 7)
    h.raw.delete(tag_set(h, "shop:7"))
    h.raw.set(tag_set(h, "shop:7"), "not a set")
    outcome = await invalidate_tags(h, "shop:7")
    assert (outcome.deleted, outcome.pending) == (0, 0)
    assert not h.engine.pending_invalidations(), "the outbox retries foreign data for ever"
    assert not h.raw.exists(tag_set(h, "shop:7"))
    assert fn.stats().corrupt == 1
    # A load finding foreign data there replaces it with the set, and counts it too.
    h.raw.set(tag_set(h, "shop:8"), "not a set")
    await h.run(fn, 8)
    assert h.raw.zrange(tag_set(h, "shop:8"), 0, -1) == [fn.key(8).encode()]
    assert fn.stats().corrupt == 2
    assert (await invalidate_tags(h, "shop:8")).deleted == 1


async def test_a_pending_tag_over_foreign_data_is_delivered(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    fn = h.cached(lambda shop_id: {"s": shop_id}, key="w:<shop_id>", tags=("shop:<shop_id>",))
    await h.run(fn, 7)

    def foreign_data_arrives() -> None:
        h.raw.delete(tag_set(h, "shop:7"))
        h.raw.set(tag_set(h, "shop:7"), "not a set")

    intercept_tag_flow(monkeypatch, ScriptName.TAG_MEMBERS, foreign_data_arrives, fail=True)
    assert (await invalidate_tags(h, "shop:7")).pending == 1  # the outbox delivers it
    assert await h.engine.asettle() if h.mode == "async" else h.engine.settle()
    assert not h.engine.pending_invalidations()
    assert not h.raw.exists(tag_set(h, "shop:7"))
    assert fn.stats().corrupt == 1


async def test_a_busy_tags_set_drops_the_members_of_expired_entries(h: Harness) -> None:
    # A tag loaded all the time renews its set's expiry for ever: its members must
    # still leave once their entries can no longer live (ttl + lock_ttl after joining).
    # A long-lived entry keeps the set alive; the short entries' time passes on the
    # Redis clock, waited for, so the test holds on a machine of any speed.
    keeper = h.cached(lambda id: {"id": id}, key="gk:<id>", tags=("all",))  # ttl 30 s
    fn = h.cached(lambda id: {"id": id}, key="gr:<id>", ttl=1, lock_ttl=1, tags=("all",))
    await h.run(keeper, "k")
    for id in range(60):  # 2 s for 60 loads: ample on a machine 10x slower than a laptop
        await h.run(fn, id)
    assert h.raw.zcard(tag_set(h, "all")) == 61
    last_short = h.raw.zscore(tag_set(h, "all"), fn.key(59))
    await wait_for_redis_clock(h, past=last_short)  # every one of those entries has expired
    await h.run(fn, "now")
    assert sum(h.raw.exists(fn.key(id)) for id in [*range(60), "now"]) == 1
    members = h.raw.zrange(tag_set(h, "all"), 0, -1, withscores=True)
    assert [member for member, _ in members] == [fn.key("now").encode(), keeper.key("k").encode()]
    # the set goes with its last entry: the keeper's, not the expired entries'
    assert h.raw.pexpiretime(tag_set(h, "all")) == math.ceil(members[-1][1])
    assert (await invalidate_tags(h, "all")).deleted == 2


def redis_ms(time_reply: tuple[int, int]) -> int:
    seconds, microseconds = time_reply
    return seconds * 1000 + microseconds // 1000


async def wait_for_redis_clock(h: Harness, past: float, timeout: float = 30) -> None:
    """Sleep until the Redis clock (ms, as in tags' scores) is past `past`."""
    deadline = time.monotonic() + timeout
    while redis_ms(h.raw.time()) <= past:
        assert time.monotonic() < deadline, "the Redis clock never moved on"
        await asyncio.sleep(0.05)


def test_one_tag_add_drops_a_bounded_number_of_expired_members() -> None:
    flow = Stepper(join_tags(tagged_plan(), [(KEY, Signal.LOAD)]))
    tag_add = flow.reply(("shop:7",)).effects[0]
    assert tag_add.script is ScriptName.TAG_ADD
    assert tag_add.args == (KEY, 30_000 + 10_000, TAG_TRIM_LIMIT)  # ttl + lock_ttl
    assert 1 < TAG_TRIM_LIMIT <= 1000  # more than it adds: the set shrinks to its live part


async def test_a_text_id_is_reached_by_the_tag_text_the_docs_show(h: Harness) -> None:
    # Keys tell "7" from 7 (f("7") and f(7) never share an entry); tags need not:
    # two entries sharing a tag are only ever invalidated together. So a str id from
    # a URL is reached by "shop:7", as the docs show.
    rows = {"v": 1}
    fn = h.cached(lambda shop_id: dict(rows), key="tt:<shop_id>", tags=("shop:<shop_id>",))
    await h.run(fn, "7")  # a path parameter: text
    await h.run(fn, 7)
    assert fn.key("7") != fn.key(7)
    assert (await invalidate_tags(h, "shop:7")).deleted == 2
    await h.run(fn, "a:b/c d")  # separators are still escaped, as in keys
    assert (await invalidate_tags(h, "shop:a%3Ab%2Fc%20d")).deleted == 1


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
    def load(id: int) -> dict[str, Any]:
        return {"id": id, "final": id % 2 == 0}

    fn = h.cached(
        load,
        key="mt:<id>",
        ttl=30,
        grace=10,
        ttl_jitter=0.5,
        cache_if=lambda row: row["final"],
        tags=("all",),
        batch_loader=lambda ids: [load(i) for i in ids],
    )
    assert [r["id"] for r in await h.run(fn.many, [1, 2, 3, 4])] == [1, 2, 3, 4]
    assert h.raw.exists(fn.key(1), fn.key(3)) == 0  # cache_if said no
    for id in (2, 4):
        assert 15_000 <= h.raw.pttl(fn.key(id)) <= 40_000  # ttl less jitter, plus grace
    assert (await invalidate_tags(h, "all")).deleted == 2
    assert h.raw.exists(fn.key(2), fn.key(4)) == 0


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
