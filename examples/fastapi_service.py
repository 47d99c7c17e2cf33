"""A product service on FastAPI: cached reads, writes that invalidate after the
commit, and the cache's counters.

    .venv/bin/uvicorn examples.fastapi_service:app    # from the repository root, after `make venv`
    curl -i localhost:8000/products/p-001              # X-Cache: loader, then cache
    curl -X PUT localhost:8000/products/p-001 -H 'content-type: application/json' \\
         -d '{"name": "Fountain pen, blue", "stock": 40}'
    curl localhost:8000/stats

The primary is SQLite through SQLAlchemy's asyncio support (aiosqlite), in the file
$PRODUCTS_DATABASE, else a new one. Redis is REDIS_URL, else the local server; the
entries live under $CACHED_ASIDE_PREFIX, else this example's own prefix. The service
starts cold and deletes its entries when it stops.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Response
from pydantic import BaseModel
from sqlalchemy import String
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from cached_aside import CacheEngine, cache_aside
from cached_aside.integrations.fastapi import CacheEngineDep, engine_of, lifespan
from cached_aside.integrations.sqlalchemy import ainvalidate_on_commit

REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
PREFIX = os.environ.get("CACHED_ASIDE_PREFIX") or "cached_aside_example_fastapi_service"
DATABASE = os.environ.get("PRODUCTS_DATABASE") or f"{tempfile.mkdtemp()}/products.db"


class Base(DeclarativeBase):
    pass


class Product(Base):
    __tablename__ = "products"
    id: Mapped[str] = mapped_column(String, primary_key=True)
    name: Mapped[str]
    stock: Mapped[int]


class ProductChange(BaseModel):
    name: str
    stock: int


database = create_async_engine(f"sqlite+aiosqlite:///{DATABASE}")
sessions = async_sessionmaker(database, expire_on_commit=False)


@cache_aside(key="product:<product_id>", ttl=60)  # the app's engine: lifespan makes it default
async def get_product(product_id: str) -> dict[str, Any] | None:
    async with sessions() as session:
        product = await session.get(Product, product_id)
    return {"id": product.id, "name": product.name, "stock": product.stock} if product else None


@asynccontextmanager
async def primary(app: FastAPI) -> AsyncIterator[None]:
    """The app's own lifespan: the table and its first rows, a cold cache."""
    async with database.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
    async with sessions.begin() as session:
        if await session.get(Product, "p-001") is None:
            session.add_all(
                [
                    Product(id="p-001", name="Fountain pen", stock=41),
                    Product(id="p-002", name="Ink, blue-black", stock=120),
                ]
            )
    engine = engine_of(app)
    await engine.ainvalidate_prefix()  # start cold, whatever an interrupted run left
    yield
    await engine.ainvalidate_prefix()  # leave nothing behind
    await database.dispose()


app = FastAPI(
    title="products",
    lifespan=lifespan(lambda: CacheEngine.from_url(REDIS_URL, prefix=PREFIX), inner=primary),
)


async def session() -> AsyncIterator[AsyncSession]:
    async with sessions() as opened:
        yield opened


SessionDep = Annotated[AsyncSession, Depends(session)]


@app.get("/products/{product_id}")
async def read_product(product_id: str, response: Response) -> dict[str, Any]:
    """Redis first; on a miss one load from SQLite, whatever the concurrency."""
    result = await get_product.lookup(product_id)
    served = {"X-Cache": result.source.value}  # loader, cache, negative, ...
    if result.value is None:
        raise HTTPException(404, f"no product {product_id}", headers=served)
    response.headers.update(served)
    return result.value


@app.put("/products/{product_id}")
async def change_product(
    product_id: str, change: ProductChange, session: SessionDep, response: Response
) -> dict[str, Any]:
    """Write the row; the entry is invalidated now and again after the commit (never
    if the transaction rolls back), so the read below loads the committed row."""
    async with session.begin():  # commits at the end of the block, rolls back on errors
        product = await session.get(Product, product_id)
        if product is None:
            raise HTTPException(404, f"no product {product_id}")
        product.name, product.stock = change.name, change.stock
        await ainvalidate_on_commit(session, get_product, product_id)
    return await read_product(product_id, response)  # X-Cache: loader, the new row


@app.get("/stats")
async def stats(engine: CacheEngineDep) -> dict[str, Any]:
    """The cache's counters: the engine's, and each function's."""
    return {
        "engine": engine.stats().as_dict(),
        "functions": {name: each.as_dict() for name, each in engine.function_stats().items()},
    }


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=8000)
