"""The same repository with `async def` loaders under asyncio.

The SQLite calls run in a worker thread (sqlite3 blocks); everything else is async,
and concurrent requests for one cold product cost the primary a single read.

    python examples/async_service.py         # REDIS_URL, else local Redis, else fakeredis
"""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
from pathlib import Path

from cached_aside import cache_aside, configure
from cached_aside.demo import choose_engine

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


@cache_aside(key="user:<user_id>:orders:<page>", ttl=300)  # msgpack storage
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
    engine, label = choose_engine(None)
    configure(engine=engine)
    print(f"Redis: {label}")
    _setup()
    await list_orders.invalidate(7)  # start cold, whatever an earlier run left
    pages = await asyncio.gather(*(list_orders(7) for _ in range(100)))
    print(f"100 concurrent requests: {pages[0]}, primary reads: {primary_reads}")
    print(f"again: {(await list_orders.lookup(7, 1)).source.value}")
    await add_order(7, 1, "nib")
    result = await list_orders.lookup(7)
    print(f"after add_order: {result.source.value} {result.value}")
    print(f"primary reads: {primary_reads}, stats: {list_orders.stats().as_dict()}")
    await list_orders.invalidate(7)
    await engine.aclose()


if __name__ == "__main__":
    asyncio.run(main())
