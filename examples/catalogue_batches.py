"""A catalogue page: fifty products at once with many(), one SQL query for the misses
(batch_loader), and a price-list change that drops every cached product with
invalidate_all().

    .venv/bin/python examples/catalogue_batches.py    # from the repository root, after `make venv`

Redis is REDIS_URL, else the local server. The entries live under this example's own
prefix, so they never mix with the demo's or another example's; the run starts cold
and deletes them when it ends (their ttl removes them if it is interrupted).
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from cached_aside import CacheEngine, cache_aside

REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
engine = CacheEngine.from_url(REDIS_URL, prefix="cached_aside_example_catalogue_batches")
DATABASE = Path(tempfile.mkdtemp()) / "catalogue.db"
LATENCY_SECONDS = 0.02  # a real database is further away
queries = 0


def _query(sql: str, parameters: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    global queries
    queries += 1
    time.sleep(LATENCY_SECONDS)
    with sqlite3.connect(DATABASE) as db:
        return db.execute(sql, parameters).fetchall()


def load_products(ids: list[str]) -> dict[str, dict[str, Any]]:
    """All the misses in one query; ids that match no row are left out (None)."""
    marks = ",".join("?" * len(ids))
    rows = _query(f"SELECT id, name, price FROM products WHERE id IN ({marks})", tuple(ids))
    return {id: {"id": id, "name": name, "price": price} for id, name, price in rows}


@cache_aside(key="catalogue:product:<id>", ttl=300, batch_loader=load_products, engine=engine)
def get_product(id: str) -> dict[str, Any] | None:
    rows = _query("SELECT id, name, price FROM products WHERE id = ?", (id,))
    return {"id": rows[0][0], "name": rows[0][1], "price": rows[0][2]} if rows else None


def main() -> None:
    try:
        engine.client().ping()
    except redis.RedisError as exc:
        raise SystemExit(
            f"cannot reach Redis at {REDIS_URL} ({exc}): start it or set REDIS_URL"
        ) from None
    print(f"Redis: {REDIS_URL}, keys such as {get_product.key('p-000')}")
    with sqlite3.connect(DATABASE) as db:
        db.execute("CREATE TABLE products (id TEXT PRIMARY KEY, name TEXT, price REAL)")
        db.executemany(
            "INSERT INTO products VALUES (?, ?, ?)",
            [(f"p-{n:03d}", f"Product {n}", 1.0 + n) for n in range(200)],
        )
    page = [f"p-{n:03d}" for n in range(50)] + ["p-999"]  # one id that does not exist
    get_product.invalidate_all()  # start cold, whatever an interrupted run left
    for label in ("cold page", "warm page"):
        before, started = queries, time.perf_counter()
        products = get_product.many(page)
        elapsed = (time.perf_counter() - started) * 1000
        print(
            f"{label}: {len(products)} items ({products.count(None)} missing) in "
            f"{elapsed:.1f} ms, {queries - before} SQL queries"
        )
    with sqlite3.connect(DATABASE) as db:
        db.execute("UPDATE products SET price = price * 1.1")  # a new price list
    dropped = get_product.invalidate_all().deleted
    before = queries
    repriced = get_product.many(page[:3])
    print(f"price list changed: {dropped} entries dropped; {queries - before} SQL query")
    print(f"now: {[round(p['price'], 2) for p in repriced if p]}")
    print(f"stats: {get_product.stats().as_dict()}")
    get_product.invalidate_all()  # leave nothing behind
    engine.close()


if __name__ == "__main__":
    main()
