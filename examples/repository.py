"""A product repository over SQLite with cached reads.

Reads go through @cache_aside (hash storage, one field per attribute of the Product
dataclass the reader is annotated to return: a hit gives back a Product); a write to
the primary is followed by `invalidate`; a hot counter (stock, after a sale) is
patched in the cache with `update_field` instead of dropping the whole entry.

    .venv/bin/python examples/repository.py    # from the repository root, after `make venv`

Redis is REDIS_URL, else the local server. The entries live under this example's own
prefix, so they never mix with the demo's or another example's; the run starts cold
and deletes them when it ends (their ttl removes them if it is interrupted).
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from cached_aside import CacheEngine, cache_aside

REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
engine = CacheEngine.from_url(REDIS_URL, prefix="cached_aside_example_repository")


@dataclass
class Product:
    id: str
    name: str
    stock: int


class ProductRepository:
    """Products in SQLite; `get` is cached, writes keep the cache honest."""

    def __init__(self, path: Path, latency_ms: float = 50) -> None:
        self.path = path
        self.latency_ms = latency_ms
        self.primary_reads = 0
        with self._db() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS products "
                "(id TEXT PRIMARY KEY, name TEXT NOT NULL, stock INTEGER NOT NULL)"
            )
            db.execute("INSERT OR REPLACE INTO products VALUES ('p-001', 'Fountain pen', 41)")

    def _db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path)

    # `self` is not in the key: every repository instance shares the cache entries.
    @cache_aside(key="repository:product:<product_id>", ttl=60, as_hash=True, engine=engine)
    def get(self, product_id: str) -> Product | None:
        self.primary_reads += 1
        time.sleep(self.latency_ms / 1000)  # a real database is further away
        with self._db() as db:
            row = db.execute(
                "SELECT id, name, stock FROM products WHERE id = ?", (product_id,)
            ).fetchone()
        return None if row is None else Product(*row)

    def rename(self, product_id: str, name: str) -> None:
        with self._db() as db:
            db.execute("UPDATE products SET name = ? WHERE id = ?", (name, product_id))
        self.get.invalidate(product_id)  # after the commit, not before

    def sell(self, product_id: str) -> int:
        with self._db() as db:
            db.execute("UPDATE products SET stock = stock - 1 WHERE id = ?", (product_id,))
            (stock,) = db.execute(
                "SELECT stock FROM products WHERE id = ?", (product_id,)
            ).fetchone()
        # Patch the hot field only if the record is cached; never creates a partial one.
        self.get.update_field(product_id, "stock", stock)
        return int(stock)


def main() -> None:
    try:
        engine.client().ping()
    except redis.RedisError as exc:
        raise SystemExit(
            f"cannot reach Redis at {REDIS_URL} ({exc}): start it or set REDIS_URL"
        ) from None
    repository = ProductRepository(Path(tempfile.mkdtemp()) / "shop.db")
    print(f"Redis: {REDIS_URL}, keys such as {repository.get.key('p-001')}")
    engine.invalidate_prefix()  # start cold, whatever an interrupted run left
    for step in ("first read", "second read"):
        result = repository.get.lookup("p-001")
        print(f"{step}: {result.source.value:<8} {result.value}")
    repository.rename("p-001", "Fountain pen, blue")
    print(
        f"after rename: {repository.get.lookup('p-001').source.value:<8} {repository.get('p-001')}"
    )
    stock = repository.sell("p-001")
    print(f"after a sale: {repository.get.lookup('p-001').source.value:<8} stock {stock}")
    first = repository.get("p-404")
    print(f"missing id:   {first} then {repository.get.lookup('p-404').source.value}")
    print(f"primary reads: {repository.primary_reads}, stats: {repository.get.stats().as_dict()}")
    engine.invalidate_prefix()  # leave nothing behind
    engine.close()


if __name__ == "__main__":
    main()
