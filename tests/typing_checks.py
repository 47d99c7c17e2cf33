"""Checked by mypy --strict in `make lint`, never run: what a type checker sees of
decorated functions and methods (a regression here is a type error, not a test
failure)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import assert_type

from cached_aside import BulkOutcome, CacheResult, Outcome, XFetch, cache_aside


@cache_aside(key="product:<id>", ttl=30, as_hash=True)
def get_product(id: str) -> dict[str, str] | None:
    return {"id": id}


@cache_aside(key="order:<id>", ttl=30)
async def get_order(id: int) -> list[int]:
    return [id]


@cache_aside(key="price:<sku>", ttl=60, refresh_ahead=XFetch(beta=1.0, window=5))
def get_price(sku: str) -> int:
    return 1999


@dataclass(frozen=True)
class Product:
    id: str
    stock: int


@cache_aside(key="typed:<id>", ttl=30)
def get_typed(id: str) -> Product | None:
    return Product(id, 1)


@cache_aside(key="typed-hash:<id>", ttl=30, as_hash=True, returns=Product)
async def get_returned(id: str) -> Product:
    return Product(id, 1)


class Repository:
    @cache_aside(key="repo:<id>", ttl=30)
    def find(self, id: str) -> dict[str, int]:
        return {}

    @cache_aside(key="arepo:<id>", ttl=30)
    async def afind(self, id: str) -> float:
        return 1.0


async def check() -> None:
    assert_type(get_product("p-1"), dict[str, str] | None)
    assert_type(get_price("a-1"), int)
    assert_type(get_product.invalidate("p-1"), Outcome)
    assert_type(get_product.update_field("p-1", "stock", "4"), Outcome)
    assert_type(get_product.many(["a"]), list[dict[str, str] | None])
    assert_type(get_product.invalidate_many(["a"]), BulkOutcome)
    assert_type(get_product.lookup("p-1"), CacheResult[dict[str, str] | None])
    assert_type(await get_order(1), list[int])
    assert_type(get_typed("p-1"), Product | None)
    assert_type(get_typed.many(["a"]), list[Product | None])
    assert_type(get_typed.lookup("p-1"), CacheResult[Product | None])
    assert_type(await get_returned("p-1"), Product)
    assert_type(await get_returned.update_field("p-1", "stock", 4), Outcome)
    assert_type(await get_order.invalidate(1), Outcome)
    repo = Repository()
    assert_type(repo.find("x"), dict[str, int])
    assert_type(repo.find.invalidate("x"), Outcome)
    assert_type(repo.find.lookup("x"), CacheResult[dict[str, int]])
    assert_type(await repo.afind("x"), float)
    assert_type(await repo.afind.invalidate_all(), BulkOutcome)
    repo.find(1)  # type: ignore[arg-type]  # the method's own parameter types hold
