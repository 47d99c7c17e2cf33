"""The same repository with `async def` loaders under asyncio.

The SQLite calls run in a worker thread (sqlite3 blocks); everything else is async,
and concurrent requests for one cold page of orders cost the primary a single read.

    .venv/bin/python examples/async_service.py    # from the repository root, after `make venv`

Redis is REDIS_URL, else the local server. The entries live under this example's own
prefix, so they never mix with the demo's or another example's; the run starts cold
and deletes them when it ends (their ttl removes them if it is interrupted).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import tempfile
from pathlib import Path

import redis

from cached_aside import CacheEngine, cache_aside

REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
engine = CacheEngine.from_url(REDIS_URL, prefix="cached_aside_example_async_service")
DATABASE = Path(tempfile.mkdtemp()) / "shop.db"
primary_reads = 0


def _setup() -> None:
    with sqlite3.connect(DATABASE) as db:
        db.execute("CREATE TABLE IF NOT EXISTS orders (user_id INTEGER, page INTEGER, item TEXT)")
        db.executemany(
            "INSERT INTO orders VALUES (?, ?, ?)",
            [(7, 1, "pen"), (7, 1, "ink"), (7, 2, "lamp"), (8, 1, "clips")],
        )


def _query(user_id: int, page: int) -> list[str]:
    with sqlite3.connect(DATABASE) as db:
        rows = db.execute(
            "SELECT item FROM orders WHERE user_id = ? AND page = ? ORDER BY item",
            (user_id, page),
        ).fetchall()
    return [row[0] for row in rows]


@cache_aside(key="service:orders:<user_id>:<page>", ttl=300, engine=engine)  # msgpack
async def list_orders(user_id: int, page: int = 1) -> list[str]:
    global primary_reads
    primary_reads += 1
    await asyncio.sleep(0.05)  # a real database is further away
    return await asyncio.to_thread(_query, user_id, page)


async def add_order(user_id: int, page: int, item: str) -> None:
    def insert() -> None:
        with sqlite3.connect(DATABASE) as db:
            db.execute("INSERT INTO orders VALUES (?, ?, ?)", (user_id, page, item))

    await asyncio.to_thread(insert)
    await list_orders.invalidate(user_id, page)


async def main() -> None:
    try:
        await engine.async_client().ping()
    except redis.RedisError as exc:
        raise SystemExit(
            f"cannot reach Redis at {REDIS_URL} ({exc}): start it or set REDIS_URL"
        ) from None
    print(f"Redis: {REDIS_URL}, keys such as {list_orders.key(7, 1)}")
    _setup()
    await engine.ainvalidate_prefix()  # start cold, whatever an interrupted run left
    pages = await asyncio.gather(*(list_orders(7) for _ in range(100)))
    print(f"100 concurrent requests: {pages[0]}, primary reads: {primary_reads}")
    print(f"again: {(await list_orders.lookup(7, 1)).source.value}")
    await add_order(7, 1, "nib")
    result = await list_orders.lookup(7)
    print(f"after add_order: {result.source.value} {result.value}")
    print(f"primary reads: {primary_reads}, stats: {list_orders.stats().as_dict()}")
    await engine.ainvalidate_prefix()  # leave nothing behind
    await engine.aclose()


if __name__ == "__main__":
    asyncio.run(main())
