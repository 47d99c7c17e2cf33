"""Domain types the typed-value tests store: one of each kind the docs promise, defined
at module level as a repository module would (annotations are resolved by name)."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import sys
import uuid
from decimal import Decimal
from typing import Any, NamedTuple, TypedDict

import attrs
import msgspec
import pydantic

PARIS_SUMMER = datetime.timezone(datetime.timedelta(hours=2))
NEPAL = datetime.timezone(datetime.timedelta(hours=5, minutes=45))


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


if sys.version_info >= (3, 11):

    class Label(enum.StrEnum):
        NEW = "new"
        SALE = "sale"

else:  # pragma: no cover

    class Label(str, enum.Enum):
        NEW = "new"
        SALE = "sale"


@dataclasses.dataclass(frozen=True)
class Money:
    amount: Decimal
    currency: str = "EUR"


@dataclasses.dataclass(slots=True)
class Product:
    """Eight fields of the kinds a repository returns (the benchmark's record too)."""

    id: str
    name: str
    price: Money
    stock: int
    color: Color
    created: datetime.datetime
    sku: uuid.UUID
    labels: frozenset[Label] = frozenset()


@dataclasses.dataclass
class FlatProduct:
    """A flat record for hash mode: one field per attribute."""

    id: str
    name: str
    stock: int
    price: Decimal
    level: Level
    label: Label
    created: datetime.datetime
    sku: uuid.UUID
    photo: bytes = b""
    discontinued: datetime.date | None = None


class Customer(pydantic.BaseModel):
    id: int
    email: str
    joined: datetime.datetime
    balance: Decimal
    tags: set[str] = set()


@attrs.define
class Shipment:
    id: str
    sent: datetime.date
    transit: datetime.timedelta
    window: tuple[datetime.time, datetime.time]


@attrs.frozen
class Coordinates:
    lat: float
    lon: float


class Stock(msgspec.Struct):
    sku: uuid.UUID
    count: int
    where: Coordinates | None = None


class Row(TypedDict):
    id: int
    title: str
    seen: datetime.datetime


class Point(NamedTuple):
    x: int
    y: int
    label: str = ""


AWARE = datetime.datetime(2024, 6, 1, 12, 30, 15, 123456, tzinfo=PARIS_SUMMER)
NAIVE = datetime.datetime(2024, 6, 1, 12, 30, 15, 654321)
SKU = uuid.UUID("12345678-1234-5678-1234-567812345678")

PRODUCT = Product(
    id="p-1",
    name="Fountain pen",
    price=Money(Decimal("12.50")),
    stock=41,
    color=Color.BLUE,
    created=AWARE,
    sku=SKU,
    labels=frozenset({Label.NEW, Label.SALE}),
)

FLAT = FlatProduct(
    id="p-1",
    name="Fountain pen",
    stock=41,
    price=Decimal("12.50"),
    level=Level.HIGH,
    label=Label.SALE,
    created=AWARE,
    sku=SKU,
    photo=b"\x89PNG\x00\xff",
    discontinued=datetime.date(2025, 1, 31),
)

# (id, declared type, a value the loader returns); ids name each case in test output.
ROUND_TRIPS: list[tuple[str, Any, Any]] = [
    ("dataclass-nested-slots", Product, PRODUCT),
    ("dataclass-frozen-default", Money, Money(Decimal("0.10"))),
    ("pydantic", Customer, Customer(id=7, email="a@b.c", joined=AWARE, balance=Decimal("-3.5"))),
    (
        "attrs",
        Shipment,
        Shipment(
            "s-1",
            datetime.date(2024, 2, 29),
            datetime.timedelta(days=2, microseconds=7),
            (datetime.time(8, 0), datetime.time(17, 30, tzinfo=NEPAL)),
        ),
    ),
    ("struct", Stock, Stock(SKU, 3, Coordinates(48.85, 2.35))),
    ("typeddict", Row, Row(id=1, title="x", seen=NAIVE)),
    ("namedtuple", Point, Point(1, 2, "a")),
    ("enum", Color, Color.RED),
    ("intenum", Level, Level.HIGH),
    ("strenum", Label, Label.SALE),
    ("datetime-aware", datetime.datetime, AWARE),
    ("datetime-naive", datetime.datetime, NAIVE),
    ("date", datetime.date, datetime.date(1999, 12, 31)),
    ("time", datetime.time, datetime.time(23, 59, 59, 999999, tzinfo=NEPAL)),
    ("timedelta", datetime.timedelta, datetime.timedelta(days=-1, seconds=5)),
    ("uuid", uuid.UUID, SKU),
    ("decimal", Decimal, Decimal("3.14159265358979323846264338327950288")),
    ("bytes-in-tuple", tuple[bytes, int], (b"\x00\x01", 2)),
    ("set", set[int], {1, 2, 3}),
    ("frozenset", frozenset[str], frozenset({"a", "b"})),
    ("tuple-variadic", tuple[int, ...], (1, 2, 3)),
    ("optional-field", dict[str, datetime.datetime | None], {"a": AWARE, "b": None}),
    ("union", int | datetime.date, datetime.date(2020, 1, 1)),
    ("list-of-records", list[Money], [Money(Decimal(1)), Money(Decimal(2), "USD")]),
    (
        "dict-of-records",
        dict[str, Customer],
        {"c": Customer(id=1, email="e", joined=NAIVE, balance=Decimal(0), tags={"vip"})},
    ),
    ("dict-int-keys", dict[int, Point], {1: Point(0, 0)}),
]

HASH_RECORDS: list[tuple[str, Any, Any]] = [
    ("dataclass", FlatProduct, FLAT),
    ("pydantic", Customer, Customer(id=7, email="a@b.c", joined=AWARE, balance=Decimal("9.99"))),
    ("attrs", Coordinates, Coordinates(1.5, -2.25)),
    ("struct", Stock, Stock(SKU, 3, Coordinates(1.0, 2.0))),
    ("typeddict", Row, Row(id=1, title="t", seen=NAIVE)),
]
