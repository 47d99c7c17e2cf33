"""Typed values: the return annotation (or returns=) is the schema, and a hit gives back
the declared type, equal to what the loader returned: msgpack and hash mode, single
and many(), sync and async, through the near cache."""

from __future__ import annotations

import datetime
import inspect
import time
from decimal import Decimal
from typing import Any

import msgpack
import pytest

from cached_aside import (
    CacheEngine,
    NearCache,
    Outcome,
    Source,
    UnstorableValueError,
    cache_aside,
)

from .conftest import Harness
from .typed_models import AWARE, FLAT, HASH_RECORDS, PRODUCT, ROUND_TRIPS, FlatProduct, Product


def annotated(loader: Any, kind: Any) -> Any:
    """The loader with `kind` as its return annotation, as if written `-> kind | None`."""
    loader.__annotations__ = {"id": str, "return": kind | None}
    return loader


def same(left: Any, right: Any) -> bool:
    """Equal, of the same type, and aware datetimes in the same offset (== alone
    compares instants)."""
    if type(left) is not type(right) or left != right:
        return False
    if isinstance(left, datetime.datetime | datetime.time):
        return left.utcoffset() == right.utcoffset()
    return True


async def served(h: Harness, fn: Any, *args: Any) -> tuple[Any, Source]:
    outcome = await h.run(fn.lookup, *args)
    return outcome.value, outcome.source


@pytest.mark.parametrize(
    ("kind", "value"), [c[1:] for c in ROUND_TRIPS], ids=[c[0] for c in ROUND_TRIPS]
)
async def test_a_hit_gives_back_the_declared_type(h: Harness, kind: Any, value: Any) -> None:
    loads: list[str] = []

    def load(id: str) -> Any:
        loads.append(id)
        return value

    fn = h.cached(annotated(load, kind), key="t:<id>")
    missed, source = await served(h, fn, "a")
    assert source is Source.LOADER
    assert same(missed, value)
    hit, source = await served(h, fn, "a")
    assert source is Source.CACHE
    assert same(hit, value)
    assert loads == ["a"]
    assert same(await h.run(fn, "a"), value)


@pytest.mark.parametrize(
    ("kind", "value"), [c[1:] for c in ROUND_TRIPS], ids=[c[0] for c in ROUND_TRIPS]
)
async def test_many_and_the_batch_loader_give_back_the_declared_type(
    h: Harness, kind: Any, value: Any
) -> None:
    def load(id: str) -> Any:
        return value

    def load_batch(ids: list[str]) -> dict[str, Any]:
        return {id: value for id in ids if id != "none"}

    fn = h.cached(annotated(load, kind), key="t:<id>", batch_loader=load_batch)
    for _ in range(2):  # misses, then hits
        values = await h.run(fn.many, ["a", "none", "b"])
        assert same(values[0], value)
        assert same(values[2], value)
        assert values[1] is None
    assert fn.stats().hits == 2


@pytest.mark.parametrize(
    ("kind", "value"), [c[1:] for c in ROUND_TRIPS], ids=[c[0] for c in ROUND_TRIPS]
)
async def test_near_hits_give_back_the_declared_type(h: Harness, kind: Any, value: Any) -> None:
    def load(id: str) -> Any:
        return value

    near = NearCache(ttl=30, allow_untracked=True)
    fn = h.cached(annotated(load, kind), key="t:<id>", near=near)
    await h.run(fn, "a")
    deadline = time.monotonic() + 10  # a bound on a hang: tracking voids early fills
    while (outcome := await h.run(fn.lookup, "a")).source is not Source.NEAR:
        assert time.monotonic() < deadline, "never served from the near cache"
    assert same(outcome.value, value)
    if type(value).__hash__ is None:  # mutable: each hit hands out its own copy
        assert outcome.value is not (await h.run(fn.lookup, "a")).value


@pytest.mark.parametrize(
    ("kind", "value"), [c[1:] for c in HASH_RECORDS], ids=[c[0] for c in HASH_RECORDS]
)
async def test_a_hash_record_decodes_each_field_to_its_type(
    h: Harness, kind: Any, value: Any
) -> None:
    fn = h.cached(annotated(lambda id: value, kind), key="t:<id>", as_hash=True)
    missed, _ = await served(h, fn, "a")
    hit, source = await served(h, fn, "a")
    assert source is Source.CACHE
    assert same(missed, value)
    assert same(hit, value)
    assert same((await h.run(fn.many, ["a", "b"]))[1], value)


async def test_a_typed_hash_is_readable_text_field_by_field(h: Harness) -> None:
    fn = h.cached(annotated(lambda id: FLAT, FlatProduct), key="t:<id>", as_hash=True)
    await h.run(fn, "a")
    stored = h.raw.hgetall(f"{h.engine.prefix}:{{t:a}}")
    assert stored[b"name"] == b"Fountain pen"
    assert stored[b"stock"] == b"41"
    assert stored[b"price"] == b"12.50"
    assert stored[b"label"] == b"sale"
    assert stored[b"created"] == b"2024-06-01T12:30:15.123456+02:00"
    assert stored[b"photo"] == b"\x89PNG\x00\xff"
    assert stored[b"discontinued"] == b'"2025-01-31"'


async def test_update_field_encodes_by_the_fields_type(h: Harness) -> None:
    fn = h.cached(annotated(lambda id: FLAT, FlatProduct), key="t:<id>", as_hash=True)
    await h.run(fn, "a")
    assert await h.run(fn.update_field, "a", "stock", 40) is Outcome.UPDATED
    later = datetime.datetime(2025, 1, 1, tzinfo=AWARE.tzinfo)
    assert await h.run(fn.update_field, "a", "created", later) is Outcome.UPDATED
    hit, source = await served(h, fn, "a")
    assert source is Source.CACHE
    assert hit.stock == 40
    assert same(hit.created, later)


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("stock", "41", "field 'stock' is declared int"),
        ("stock", 4.5, "field 'stock' is declared int"),
        ("stock", True, "field 'stock' is declared int"),
        ("name", 7, "field 'name' is declared str"),
        ("created", "yesterday", "field 'created' is declared datetime"),
        ("price", [1], "field 'price' is declared Decimal"),
        ("colour", "red", "FlatProduct has no field 'colour'"),
        (3, "x", "FlatProduct has no field 3"),
    ],
)
async def test_update_field_refuses_what_the_type_does_not_hold_before_writing(
    h: Harness, field: Any, value: Any, says: str
) -> None:
    fn = h.cached(annotated(lambda id: FLAT, FlatProduct), key="t:<id>", as_hash=True)
    await h.run(fn, "a")
    key = f"{h.engine.prefix}:{{t:a}}"
    before = h.raw.hgetall(key)
    with pytest.raises(UnstorableValueError, match=says):
        await h.run(fn.update_field, "a", field, value)
    assert h.raw.hgetall(key) == before
    assert same(await h.run(fn, "a"), FLAT)


async def test_a_value_the_annotation_does_not_describe_is_refused_naming_the_field(
    h: Harness,
) -> None:
    row = {"id": "p-1", "name": "pen", "price": {"amount": "1"}, "stock": "41"}
    fn = h.cached(annotated(lambda id: row, Product), key="t:<id>")
    with pytest.raises(UnstorableValueError, match=r"stock"):
        await h.run(fn, "a")
    assert fn.stats().loads == 1


async def test_returns_types_a_loader_without_annotation(h: Harness) -> None:
    fn = h.cached(lambda id: PRODUCT, key="t:<id>", returns=Product)
    await h.run(fn, "a")
    hit, source = await served(h, fn, "a")
    assert source is Source.CACHE
    assert same(hit, PRODUCT)


async def test_untyped_annotations_keep_todays_bytes(h: Harness) -> None:
    value = {"id": "p-1", "stock": 41, "tags": ["a"]}

    def load(id: str) -> dict[str, Any] | None:
        return value

    fn = h.cached(load, key="t:<id>")
    await h.run(fn, "a")
    assert h.raw.get(f"{h.engine.prefix}:{{t:a}}") == msgpack.packb(value)
    assert (await h.run(fn, "a")) == value


async def test_typed_entries_are_standard_msgpack_another_language_reads(h: Harness) -> None:
    fn = h.cached(annotated(lambda id: PRODUCT, Product), key="t:<id>")
    await h.run(fn, "a")
    fingerprint, body = msgpack.unpackb(h.raw.get(f"{h.engine.prefix}:{{t:a}}"))
    assert len(fingerprint) == 8
    assert body["created"] == "2024-06-01T12:30:15.123456+02:00"  # the offset is kept
    assert body["price"] == {"amount": "12.50", "currency": "EUR"}
    assert body["color"] == "blue"


async def test_typed_values_compress_like_untyped_ones(h: Harness) -> None:
    long = Product(**{**_fields(PRODUCT), "name": "x" * 2000})
    fn = h.cached(annotated(lambda id: long, Product), key="t:<id>", compress_over=100)
    await h.run(fn, "a")
    assert h.raw.get(f"{h.engine.prefix}:{{t:a}}")[:2] == b"\xc1Z"
    hit, source = await served(h, fn, "a")
    assert source is Source.CACHE
    assert same(hit, long)


def _fields(value: Any) -> dict[str, Any]:
    return {name: getattr(value, name) for name in inspect.signature(type(value)).parameters}


async def test_money_amounts_keep_their_precision(h: Harness) -> None:
    amount = Decimal("0.1") + Decimal("0.2")
    fn = h.cached(annotated(lambda id: amount, Decimal), key="t:<id>")
    await h.run(fn, "a")
    assert str(await h.run(fn, "a")) == "0.3"


async def test_set_and_refresh_store_the_declared_type(h: Harness) -> None:
    fn = h.cached(annotated(lambda id: PRODUCT, Product), key="t:<id>")
    changed = Product(**{**_fields(PRODUCT), "stock": 7})
    assert await h.run(fn.set, "a", value=changed) is Outcome.UPDATED
    hit, source = await served(h, fn, "a")
    assert (source, hit) == (Source.CACHE, changed)
    assert same(await h.run(fn.refresh, "a"), PRODUCT)
    with pytest.raises(UnstorableValueError, match="stock"):
        await h.run(fn.set, "a", value={**_fields(PRODUCT), "stock": "7"})


@pytest.mark.parametrize(
    ("kind", "value"), [c[1:] for c in HASH_RECORDS], ids=[c[0] for c in HASH_RECORDS]
)
async def test_near_hits_of_a_typed_hash_give_back_the_declared_type(
    h: Harness, kind: Any, value: Any
) -> None:
    near = NearCache(ttl=30, allow_untracked=True)
    fn = h.cached(annotated(lambda id: value, kind), key="t:<id>", as_hash=True, near=near)
    await h.run(fn, "a")
    deadline = time.monotonic() + 10  # a bound on a hang: tracking voids early fills
    while (outcome := await h.run(fn.lookup, "a")).source is not Source.NEAR:
        assert time.monotonic() < deadline, "never served from the near cache"
    assert same(outcome.value, value)


def load_products(ids: list[str]) -> dict[str, Product]:
    return dict.fromkeys(ids, PRODUCT)


async def test_the_batch_loaders_annotation_types_an_unannotated_loader(
    engine: CacheEngine,
) -> None:
    fn = cache_aside(key="t:<id>", ttl=30, engine=engine, batch_loader=load_products)(
        lambda id: PRODUCT
    )
    assert fn.many(["a", "b"]) == [PRODUCT, PRODUCT]
    hits = fn.many(["a", "b"])
    assert all(same(hit, PRODUCT) for hit in hits)
    assert fn.stats().hits == 2


async def test_cache_if_judges_the_declared_type(h: Harness) -> None:
    """A loader may return a mapping of the declared record's fields (it becomes the
    record); cache_if got that mapping, not the record the caller and every hit get,
    and a predicate written for the type (`p.stock > 0`) raised on it."""
    judged: list[type] = []

    def in_stock(product: Any) -> bool:
        judged.append(type(product))
        return bool(product.stock > 0)

    def load(id: str) -> Any:
        return {**_fields(PRODUCT), "stock": 0 if id == "gone" else 3}

    def batch(ids: list[str]) -> dict[str, Any]:
        return {id: load(id) for id in ids}

    fn = h.cached(annotated(load, Product), key="t:<id>", cache_if=in_stock, batch_loader=batch)
    assert (await h.run(fn, "a")).stock == 3
    assert (await h.run(fn.lookup, "a")).source is Source.CACHE
    assert [p.stock for p in await h.run(fn.many, ["b", "gone"])] == [3, 0]
    assert (await h.run(fn.lookup, "gone")).source is Source.LOADER  # refused: not stored
    assert set(judged) == {Product}
