"""Property tests of typed values: hypothesis draws a nested annotated type (records,
containers, optionals of the supported scalars) and values of it; a hit must give back
exactly what the loader returned."""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import fakeredis
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cached_aside import CacheEngine, Source, cache_aside
from cached_aside._typed import schema_of
from cached_aside._typed_codecs import TypedCodec, TypedHashCodec

from .typed_models import Color, Label, Level

# RFC 3339 offsets are whole minutes, as are all real-world ones.
offsets = st.integers(-23 * 60 - 59, 23 * 60 + 59).map(
    lambda minutes: datetime.timezone(datetime.timedelta(minutes=minutes))
)
SCALARS: list[tuple[Any, st.SearchStrategy[Any]]] = [
    (int, st.integers(-(2**63), 2**64 - 1)),
    (float, st.floats(allow_nan=False)),
    (str, st.text()),
    (bytes, st.binary()),
    (bool, st.booleans()),
    (Decimal, st.decimals(allow_nan=False, allow_infinity=False)),
    (datetime.datetime, st.datetimes(timezones=st.none() | offsets)),
    (datetime.date, st.dates()),
    (datetime.time, st.times(timezones=st.none() | offsets)),
    (datetime.timedelta, st.timedeltas()),
    (uuid.UUID, st.uuids()),
    (Color, st.sampled_from(Color)),
    (Level, st.sampled_from(Level)),
    (Label, st.sampled_from(Label)),
]
HASHABLE: list[tuple[Any, st.SearchStrategy[Any]]] = [
    (int, st.integers(-(2**63), 2**63 - 1)),
    (str, st.text()),
    (uuid.UUID, st.uuids()),
    (datetime.date, st.dates()),
]
_names = itertools.count()

Typed = tuple[Any, st.SearchStrategy[Any]]


def _record(fields: list[Typed]) -> Typed:
    """A dataclass with one field per drawn type."""
    names = [f"f{i}" for i in range(len(fields))]
    kind = dataclasses.make_dataclass(
        f"Record{next(_names)}", [(n, k) for n, (k, _) in zip(names, fields, strict=True)]
    )
    values = st.tuples(*(v for _, v in fields)).map(lambda vs: kind(*vs))
    return kind, values


def _extend(inner: st.SearchStrategy[Typed]) -> st.SearchStrategy[Typed]:
    hashable = st.sampled_from(HASHABLE)
    return st.one_of(
        inner.map(lambda t: (list[t[0]], st.lists(t[1], max_size=4))),  # type: ignore[name-defined]
        inner.map(lambda t: (tuple[t[0], ...], st.lists(t[1], max_size=4).map(tuple))),  # type: ignore[name-defined]
        inner.map(lambda t: (dict[str, t[0]], st.dictionaries(st.text(), t[1], max_size=4))),  # type: ignore[name-defined]
        inner.map(lambda t: (t[0] | None, st.none() | t[1])),
        hashable.map(lambda t: (frozenset[t[0]], st.frozensets(t[1], max_size=4))),  # type: ignore[name-defined]
        hashable.map(lambda t: (set[t[0]], st.sets(t[1], max_size=4))),  # type: ignore[name-defined]
        st.lists(inner, min_size=1, max_size=5).map(_record),
    )


TYPES = st.recursive(st.sampled_from(SCALARS), _extend, max_leaves=8)


def same(left: Any, right: Any) -> bool:
    """Equal, and every datetime and time inside in the same offset."""
    if type(left) is not type(right) or left != right:
        return False
    if isinstance(left, datetime.datetime | datetime.time):
        return left.utcoffset() == right.utcoffset()
    if isinstance(left, list | tuple):
        return all(same(a, b) for a, b in zip(left, right, strict=True))
    if isinstance(left, dict):
        return all(same(left[k], right[k]) for k in left)
    if dataclasses.is_dataclass(left):
        return all(
            same(getattr(left, f.name), getattr(right, f.name)) for f in dataclasses.fields(left)
        )
    return True


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_nested_value_survives_the_codec(data: st.DataObject) -> None:
    kind, values = data.draw(TYPES)
    value = data.draw(values)
    schema = schema_of(kind, lambda: None, None, "f")
    if schema is None or value is None:  # untyped, or the negative sentinel
        return
    codec = TypedCodec(schema)
    payload, result = codec.encode(value, "f")
    assert same(result, value)
    assert same(codec.decode(payload[0]), value)
    copier, frozen = codec.freeze(value)
    assert same(copier(frozen), value)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(SCALARS), min_size=1, max_size=8).map(_record), st.data())
def test_any_flat_record_survives_a_hash(record: Typed, data: st.DataObject) -> None:
    kind, values = record
    value = data.draw(values)
    schema = schema_of(kind, lambda: None, None, "f")
    assert schema is not None
    codec = TypedHashCodec(schema)
    payload, result = codec.encode(value, "f")
    assert same(result, value)
    stored = {
        str(k).encode(): v if isinstance(v, bytes) else str(v).encode()
        for k, v in zip(payload[::2], payload[1::2], strict=True)
    }
    assert same(codec.decode(stored), value)


@pytest.fixture(scope="module")
def engine() -> Iterator[CacheEngine]:
    server = fakeredis.FakeServer()
    made = CacheEngine(fakeredis.FakeRedis(server=server), prefix="typed-properties")
    yield made
    made.close()


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.data())
def test_a_hit_equals_the_loaded_value(engine: CacheEngine, data: st.DataObject) -> None:
    kind, values = data.draw(TYPES)
    value = data.draw(values)
    fn = cache_aside(key="p:<id>", ttl=30, engine=engine, returns=kind)(lambda id: value)
    key = str(next(_names))
    assert same(fn(key), value)
    outcome = fn.lookup(key)
    assert outcome.source is Source.CACHE or value is None
    assert same(outcome.value, value)
