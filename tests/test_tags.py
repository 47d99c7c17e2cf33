"""Tags: entries carry tags rendered from the loader's arguments, and
engine.invalidate_tags() drops every entry carrying one, without a scan; lease-
and near-cache-aware. Sync and async, real Redis and fakeredis."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from cached_aside import CacheEngine, ConfigurationError, NearCache, Source, cache_aside

from .conftest import REDIS_URL, Harness, needs_real_redis
from .test_near import near_engine, until_near  # noqa: F401  # a fixture, and its helper


async def invalidate_tags(h: Harness, *tags: str) -> Any:
    if h.mode == "async":
        return await h.engine.ainvalidate_tags(*tags)
    return h.engine.invalidate_tags(*tags)


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
    assert h.raw.smembers(f"{h.engine.prefix}:tag:{{shop:7}}") == {
        product.key(7, "a").encode(),
        listing.key(7).encode(),
    }
    outcome = await invalidate_tags(h, "shop:7")
    assert (outcome.deleted, outcome.pending) == (2, 0)
    assert not h.raw.exists(product.key(7, "a"), listing.key(7))
    assert h.raw.exists(product.key(8, "a"), listing.key(8)) == 2
    assert not h.raw.exists(f"{h.engine.prefix}:tag:{{shop:7}}")  # emptied as it went
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
        release.wait(5)
        return row

    fn = h.cached(load, key="l:<shop_id>", tags=("shop:<shop_id>",))
    loading = asyncio.ensure_future(asyncio.to_thread(fn, 7)) if h.mode == "sync" else None
    if loading is None:
        loading = asyncio.ensure_future(fn(7))
    await asyncio.to_thread(reading.wait, 5)
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
        h.raw.sadd(f"{h.engine.prefix}:tag:{{shop:7}}", "someone-elses-key", "junk{")
        assert (await invalidate_tags(h, "shop:7")).deleted == 1
        assert h.raw.get("someone-elses-key") == b"x"
    finally:
        h.raw.delete("someone-elses-key")


async def test_tags_cost_one_command_each_per_load_and_sets_expire(h: Harness) -> None:
    fn = h.cached(lambda id: {"id": id}, key="c:<id>", ttl=30, lock_ttl=5, tags=("t:<id>", "all"))
    await h.run(fn, "x")
    ttl = h.raw.pttl(f"{h.engine.prefix}:tag:{{all}}")
    assert 30_000 < ttl <= 35_000  # the entry's ttl plus its lock's: then the set goes
    await h.run(fn, "x")  # a hit touches no tag
    assert h.raw.scard(f"{h.engine.prefix}:tag:{{all}}") == 1


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
