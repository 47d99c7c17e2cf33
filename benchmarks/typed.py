"""Typed values: an 8-field record stored typed (a dataclass, through msgspec), untyped
(the same data as a msgpack dict of text and numbers, as users convert by hand today),
with pickle (cashews' and dogpile's default) and through pydantic's model_dump /
model_validate: the codec's cost per entry, the bytes stored, and a hit against Redis.

    python -m benchmarks --only typed
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import pickle
import statistics
import time
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import msgpack
import msgspec
import pydantic

from cached_aside import CacheEngine, cache_aside
from cached_aside._typed import schema_of
from cached_aside._typed_codecs import TypedCodec

from .runner import Settings, Table, latency_table, measure_sync


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclasses.dataclass(slots=True)
class Product:
    id: str
    name: str
    price: Decimal
    stock: int
    color: Color
    created: datetime.datetime
    sku: uuid.UUID
    tags: list[str]


class ProductModel(pydantic.BaseModel):
    id: str
    name: str
    price: Decimal
    stock: int
    color: Color
    created: datetime.datetime
    sku: uuid.UUID
    tags: list[str]


PRODUCT = Product(
    id="p-001",
    name="Fountain pen, medium nib",
    price=Decimal("24.50"),
    stock=41,
    color=Color.BLUE,
    created=datetime.datetime(
        2024, 6, 1, 12, 30, 15, tzinfo=datetime.timezone(datetime.timedelta(hours=2))
    ),
    sku=uuid.UUID("12345678-1234-5678-1234-567812345678"),
    tags=["pens", "gifts", "writing"],
)
MODEL = ProductModel(**{f.name: getattr(PRODUCT, f.name) for f in dataclasses.fields(Product)})
# The untyped contender: the same data, as text and numbers msgpack stores natively.
ROW: dict[str, Any] = msgspec.to_builtins(PRODUCT)


def _codecs() -> dict[str, tuple[Callable[[], bytes], Callable[[bytes], Any]]]:
    """(encode, decode) per contender, each a whole entry's work."""
    schema = schema_of(Product, lambda: None, None, "bench")
    model_schema = schema_of(ProductModel, lambda: None, None, "bench")
    assert schema is not None
    assert model_schema is not None
    typed, model = TypedCodec(schema), TypedCodec(model_schema)
    return {
        "untyped msgpack (dict)": (
            lambda: msgpack.packb(ROW, use_bin_type=True),
            lambda data: msgpack.unpackb(data, raw=False, strict_map_key=False),
        ),
        "typed (dataclass, msgspec)": (lambda: typed.encode(PRODUCT, "")[0][0], typed.decode),
        "pickle (dataclass)": (lambda: pickle.dumps(PRODUCT), pickle.loads),
        "typed (pydantic model)": (lambda: model.encode(MODEL, "")[0][0], model.decode),
        "pydantic model_dump/model_validate + msgpack": (
            lambda: msgpack.packb(MODEL.model_dump(mode="json")),
            lambda data: ProductModel.model_validate(msgpack.unpackb(data)),
        ),
    }


def _per_call_us(call: Callable[[], Any], calls: int) -> float:
    clock = time.perf_counter_ns
    started = clock()
    for _ in range(calls):
        call()
    return (clock() - started) / 1000.0 / calls


def codec_table(settings: Settings) -> Table:
    """Encode and decode µs per entry (medians over rounds) and the bytes stored."""
    codecs = _codecs()
    encoded = {name: encode() for name, (encode, _) in codecs.items()}
    calls = settings.scaled(2000, 200)
    timings: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in codecs}
    for round_number in range(settings.rounds):
        order = list(codecs.items())
        for name, (encode, decode) in order if round_number % 2 else reversed(order):
            data = encoded[name]
            timings[name][0].append(_per_call_us(encode, calls))
            timings[name][1].append(_per_call_us(lambda: decode(data), calls))  # noqa: B023
    base = statistics.median(timings["untyped msgpack (dict)"][1])
    table = Table(
        "codec cost of an 8-field record (no Redis)",
        ["contender", "encode µs", "decode µs", "decode ratio", "bytes"],
    )
    for name, (encodes, decodes) in timings.items():
        decode_us = statistics.median(decodes)
        table.rows.append(
            [
                name,
                round(statistics.median(encodes), 2),
                round(decode_us, 2),
                round(decode_us / base, 3),
                len(encoded[name]),
            ]
        )
    table.notes = [
        "typed entries carry an 8-digit fingerprint of the type's shape (10 bytes); "
        "datetimes are RFC 3339 text with their offset, UUIDs and Decimals text"
    ]
    return table


def run(settings: Settings) -> list[Table]:
    engine = CacheEngine.from_url(settings.url, prefix=f"bench-{uuid.uuid4().hex[:8]}")
    untyped = cache_aside(key="untyped:<id>", ttl=300, engine=engine)(lambda id: ROW)
    typed = cache_aside(key="typed:<id>", ttl=300, engine=engine, returns=Product)(
        lambda id: PRODUCT
    )
    model = cache_aside(key="model:<id>", ttl=300, engine=engine, returns=ProductModel)(
        lambda id: MODEL
    )
    try:
        functions = {
            "untyped msgpack (dict)": untyped,
            "typed (dataclass)": typed,
            "typed (pydantic model)": model,
        }
        for function in functions.values():
            function("p-001")
        client = engine.client()
        raw = client.get(untyped.key("p-001"))
        pickled_key = f"{engine.prefix}:pickled"
        client.set(pickled_key, pickle.dumps(PRODUCT), px=300_000)
        samples = measure_sync(
            settings,
            {
                **{name: (lambda f=f: f("p-001")) for name, f in functions.items()},
                "raw redis-py GET + pickle.loads": lambda: pickle.loads(client.get(pickled_key)),
            },
            "typed",
        )
        assert typed("p-001") == PRODUCT
        assert raw is not None
        table = latency_table(
            "sync hit of an 8-field record, typed vs untyped", samples, "untyped msgpack (dict)"
        )
        table.columns.append("bytes in Redis")
        sizes = {name: client.strlen(f.key("p-001")) for name, f in functions.items()}
        sizes["raw redis-py GET + pickle.loads"] = client.strlen(pickled_key)
        for row in table.rows:
            row.append(sizes[row[0]])
        table.notes = [
            "a hit's whole latency over loopback: GET, then decode to the declared type "
            "(the dataclass's datetime, Decimal, UUID and enum parsed from their text)"
        ]
        client.delete(pickled_key)
        return [codec_table(settings), table]
    finally:
        engine.invalidate_prefix()
        engine.close()
