"""Typed values across schema changes and bad declarations: an entry written by another
shape of the type is a counted miss, never a wrong value or an exception; a type that
cannot be stored exactly is refused at decoration."""

from __future__ import annotations

import dataclasses
import datetime
import functools
from pathlib import Path
from typing import Any

import pytest

from cached_aside import ConfigurationError, Source, cache_aside
from cached_aside._codecs import Found
from cached_aside._typed import schema_of
from cached_aside._typed_codecs import TypedCodec

from .conftest import Harness, needs_real_redis
from .documented import fenced, marked, run_documented
from .typed_models import Money, Product


@dataclasses.dataclass
class V1:
    id: str
    name: str
    stock: int


@dataclasses.dataclass
class Added:  # a field added, with a default: V1's entries would decode "fine"
    id: str
    name: str
    stock: int
    price: float = 0.0


@dataclasses.dataclass
class Removed:
    id: str
    name: str


@dataclasses.dataclass
class Renamed:
    id: str
    title: str
    stock: int


@dataclasses.dataclass
class Retyped:
    id: str
    name: str
    stock: float


@dataclasses.dataclass
class SameShape:  # another class name, the same fields: the same entries
    id: str
    name: str
    stock: int


def loader_of(kind: Any, value: Any) -> Any:
    def load(id: str) -> Any:
        return value

    load.__annotations__ = {"id": str, "return": kind | None}
    return load


V1_VALUE = V1("a", "pen", 41)
CHANGES = [
    (Added, Added("a", "pen", 41, 12.5)),
    (Removed, Removed("a", "pen")),
    (Renamed, Renamed("a", "pen", 41)),
    (Retyped, Retyped("a", "pen", 41.5)),
]


@pytest.mark.parametrize("as_hash", [False, True], ids=["msgpack", "hash"])
@pytest.mark.parametrize(("kind", "value"), CHANGES, ids=["added", "removed", "renamed", "retyped"])
async def test_an_entry_of_another_shape_is_a_counted_miss_both_ways(
    h: Harness, kind: Any, value: Any, as_hash: bool
) -> None:
    """A rolling deploy: the old and the new version of a class read each other's
    entries; each reloads and overwrites, neither decodes the other's."""
    old = h.cached(loader_of(V1, V1_VALUE), key="t:<id>", as_hash=as_hash)
    new = h.cached(loader_of(kind, value), key="t:<id>", as_hash=as_hash)
    assert await h.run(old, "a") == V1_VALUE
    outcome = await h.run(new.lookup, "a")
    assert (outcome.source, outcome.value) == (Source.LOADER, value)
    assert new.stats().schema_mismatch == 1
    assert new.stats().corrupt == 0
    assert (await h.run(new.lookup, "a")).source is Source.CACHE  # overwritten
    outcome = await h.run(old.lookup, "a")
    assert (outcome.source, outcome.value) == (Source.LOADER, V1_VALUE)
    assert old.stats().schema_mismatch == 1


@pytest.mark.parametrize("as_hash", [False, True], ids=["msgpack", "hash"])
async def test_many_counts_and_reloads_entries_of_another_shape(h: Harness, as_hash: bool) -> None:
    old = h.cached(loader_of(V1, V1_VALUE), key="t:<id>", as_hash=as_hash)
    value = Added("a", "pen", 41, 12.5)
    new = h.cached(
        loader_of(Added, value), key="t:<id>", as_hash=as_hash, batch_loader=lambda ids: [value]
    )
    await h.run(old, "a")
    assert await h.run(new.many, ["a"]) == [value]
    assert new.stats().schema_mismatch == 1
    assert await h.run(new.many, ["a"]) == [value]
    assert new.stats().hits == 1


@pytest.mark.parametrize("as_hash", [False, True], ids=["msgpack", "hash"])
async def test_an_untyped_entry_is_a_schema_mismatch_and_a_typed_one_corrupt_to_untyped(
    h: Harness, as_hash: bool
) -> None:
    """Typing a function that was untyped: its old entries are reloaded. (A typed
    hash is foreign data to an untyped reader; see the docs for msgpack.)"""
    untyped = h.cached(lambda id: {"id": "a", "name": "pen", "stock": 41}, key="t:<id>")
    if as_hash:
        untyped = h.cached(
            lambda id: {"id": "a", "name": "pen", "stock": 41}, key="t:<id>", as_hash=True
        )
    typed = h.cached(loader_of(V1, V1_VALUE), key="t:<id>", as_hash=as_hash)
    await h.run(untyped, "a")
    assert await h.run(typed, "a") == V1_VALUE
    assert typed.stats().schema_mismatch == 1
    if as_hash:
        assert await h.run(untyped, "a") == {"id": "a", "name": "pen", "stock": "41"}
        assert untyped.stats().corrupt == 1


async def test_same_fields_under_another_class_name_share_entries(h: Harness) -> None:
    old = h.cached(loader_of(V1, V1_VALUE), key="t:<id>")
    new = h.cached(loader_of(SameShape, SameShape("a", "x", 0)), key="t:<id>")
    await h.run(old, "a")
    outcome = await h.run(new.lookup, "a")
    assert (outcome.source, outcome.value) == (Source.CACHE, SameShape("a", "pen", 41))


async def test_damaged_bytes_are_corrupt_not_a_schema_mismatch(h: Harness) -> None:
    fn = h.cached(loader_of(V1, V1_VALUE), key="t:<id>")
    h.raw.set(f"{h.engine.prefix}:{{t:a}}", b"\xc7\x00\x01garbage")
    assert await h.run(fn, "a") == V1_VALUE
    assert (fn.stats().corrupt, fn.stats().schema_mismatch) == (1, 0)


def test_decoding_never_names_a_class_from_the_data() -> None:
    """Whatever the bytes say, a typed codec returns its declared type or no value."""
    schema = schema_of(Money, lambda: None, None, "f")
    assert schema is not None
    codec = TypedCodec(schema)
    head = codec.encode(Money(1), "f")[0][0][:10]  # type: ignore[arg-type]
    for body in (
        b"\x82\xa6amount\xa11\xa8__class__\xaaos.system",  # an extra key is ignored
        b"\xd4\x01\x00",  # an ext type (pickle-ish payloads) is refused
        b"\xa5hello",
    ):
        found = codec.decode(head + body)
        assert found is Found.CORRUPT or type(found) is Money


def test_fingerprints_follow_the_shape_not_the_name() -> None:
    def fingerprint(kind: Any) -> str:
        schema = schema_of(kind, lambda: None, None, "f")
        assert schema is not None
        return schema.fingerprint

    assert fingerprint(V1) == fingerprint(SameShape)
    assert len({fingerprint(k) for k in (V1, Added, Removed, Renamed, Retyped)}) == 5
    assert fingerprint(list[V1]) != fingerprint(V1)


class Plain:
    def __init__(self, x: int) -> None:
        self.x = x


@dataclasses.dataclass
class Other:
    id: str


@pytest.mark.parametrize(
    ("returns", "says"),
    [
        (Plain, "cannot store Plain values"),
        (V1 | Other, "cannot be decoded unambiguously"),
        (str | datetime.datetime, "cannot be decoded unambiguously"),
        (list[Plain], "cannot store Plain values"),
    ],
)
def test_types_that_cannot_round_trip_are_refused_at_decoration(returns: Any, says: str) -> None:
    with pytest.raises(ConfigurationError, match=says):
        cache_aside(key="k:<id>", ttl=1, returns=returns)(lambda id: None)


def test_as_hash_needs_a_record_type() -> None:
    with pytest.raises(ConfigurationError, match="as_hash=True stores a record"):
        cache_aside(key="k:<id>", ttl=1, as_hash=True, returns=list[Money])(lambda id: None)


def test_an_unresolvable_annotation_is_refused_with_the_way_out() -> None:
    def load(id: str) -> Undefined:  # type: ignore[name-defined]  # noqa: F821
        return None

    with pytest.raises(ConfigurationError, match="returns=TheType"):
        cache_aside(key="k:<id>", ttl=1)(load)
    cache_aside(key="k:<id>", ttl=1, returns=Any)(load)  # the way out: untyped


def test_only_the_return_annotation_is_resolved() -> None:
    """A parameter typed with a name imported under TYPE_CHECKING (a session) is fine."""

    def load(id: str, session: NotImported) -> V1 | None:  # type: ignore[name-defined]  # noqa: F821
        return None

    fn = cache_aside(key="k:<id>", ttl=1)(load)
    assert isinstance(fn._plan.codec, TypedCodec)

    class Loader:
        def __call__(self, id: str) -> V1 | None:
            return None

    assert isinstance(cache_aside(key="k:<id>", ttl=1)(Loader())._plan.codec, TypedCodec)
    assert isinstance(
        cache_aside(key="k:<id>", ttl=1)(functools.partial(load, session=None))._plan.codec,
        TypedCodec,
    )


def test_returns_with_a_serializer_is_refused() -> None:
    class Json:
        def dumps(self, value: Any) -> bytes:
            return b""

        def loads(self, data: bytes) -> Any:
            return None

    with pytest.raises(ConfigurationError, match="drop one of the two"):
        cache_aside(key="k:<id>", ttl=1, serializer=Json(), returns=Product)(lambda id: None)


def test_untyped_annotations_are_not_typed() -> None:
    for kind in (
        Any,
        dict,
        dict[str, Any],
        list[int],
        int | None,
        str,
        bytes,
        list[dict[str, int]],
    ):
        assert schema_of(kind, lambda: None, None, "f") is None
    assert schema_of(tuple[int, int], lambda: None, None, "f") is not None


def test_prometheus_exports_schema_mismatch() -> None:
    from cached_aside.prometheus import COUNTERS

    assert "schema_mismatch" in COUNTERS


@needs_real_redis
def test_the_typed_values_page_runs_as_written(tmp_path: Path) -> None:
    page = Path(__file__).resolve().parent.parent / "docs" / "typed-values.md"
    completed = run_documented(
        tmp_path,
        fenced(marked(page, "typed"), "python"),
        'configure(prefix="typed-docs")',
        lambda prefix: f'configure(prefix="{prefix}")',
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == "cache True 2:00:00\nTrue\nupdated 40\n"


@pytest.mark.parametrize("as_hash", [False, True], ids=["msgpack", "hash"])
async def test_a_tagged_entry_of_another_shape_is_a_miss_even_kept_for_stale(
    h: Harness, as_hash: bool
) -> None:
    """Schema changes meet tags and stale_if_error: the old shape's stamped entry is a
    counted miss; with the loader failing, its kept copy is never served as the new
    type (the caller gets the error), and a tag still drops the new entry."""
    failing = {"now": False}
    value = Added("a", "pen", 41, 12.5)

    def load(id: str) -> Any:
        if failing["now"]:
            raise RuntimeError("the primary is down")
        return value

    load.__annotations__ = {"id": str, "return": Added | None}
    options = {"key": "t:<id>", "as_hash": as_hash, "tags": ("all",), "stale_if_error": 60}
    old = h.cached(loader_of(V1, V1_VALUE), **options)
    new = h.cached(load, **options)
    assert await h.run(old, "a") == V1_VALUE
    assert h.raw.pexpire(old.key("a"), 30_000)  # past its ttl, kept for stale_if_error
    failing["now"] = True
    with pytest.raises(RuntimeError, match="primary is down"):
        await h.run(new.lookup, "a")
    failing["now"] = False
    outcome = await h.run(new.lookup, "a")
    assert (outcome.source, outcome.value) == (Source.LOADER, value)
    assert new.stats().schema_mismatch >= 1
    assert (await h.run(new.lookup, "a")).source is Source.CACHE
    if h.mode == "async":
        await h.engine.ainvalidate_tags("all")
    else:
        h.engine.invalidate_tags("all")
    assert (await h.run(new.lookup, "a")).source is Source.LOADER
