"""The operations the instruction meter counts, run as a script (under callgrind): one
operation COUNT times after its setup. Standard library, msgpack and the public API of
cached_aside only (and cachetools, for the peer the near hit is judged against), so it
measures whichever checkout PYTHONPATH puts first.

    python benchmarks/operations.py OPERATION COUNT URL PREFIX
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import cached_aside
from cached_aside import CacheEngine, NearCache, Source, cache_aside

# The hit path's record (benchmarks/hit_path.py), copied: this script imports no
# benchmark module, so it runs against a checkout that has none.
RECORD = {
    "id": "p-001",
    "name": "Fountain pen",
    "price": "24.50",
    "stock": "41",
    "colour": "blue",
    "weight_g": "18",
    "sku": "FP-001-BL",
    "category": "pens",
}
BATCH = 100
# Calls made before the counted ones, in every run alike: they open connections and
# fill caches, so what is counted is the steady state.
WARM_UP = 20
SECONDS = 60.0  # socket timeouts: a bound on a hang only


class Loads:
    """The loader, counting its calls: a hit that loaded would be a miss measured."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, id: str) -> dict[str, str]:
        self.count += 1
        return dict(RECORD)

    async def load_async(self, id: str) -> dict[str, str]:
        return self(id)


def sync_hit(engine: CacheEngine, loads: Loads, count: int) -> None:
    get = cache_aside(key="hit:<id>", ttl=600, engine=engine)(loads)
    repeat(lambda: get("p-001"), count)


def miss(engine: CacheEngine, loads: Loads, count: int) -> None:
    # A fresh key per call, all of one length: the key's bytes cost the same each time.
    get = cache_aside(key="miss:<id>", ttl=600, engine=engine)(loads)
    ids = iter(range(WARM_UP + count))
    repeat(lambda: get(f"{next(ids):012d}"), count)


def many_hits(engine: CacheEngine, loads: Loads, count: int) -> None:
    get = cache_aside(key="many:<id>", ttl=600, engine=engine)(loads)
    ids = [f"{number:06d}" for number in range(BATCH)]
    get.many(ids)
    repeat(lambda: get.many(ids), count)


def near_hit(engine: CacheEngine, loads: Loads, count: int) -> None:
    get = cache_aside(key="near:<id>", ttl=600, engine=engine, near=NearCache())(loads)
    deadline = time.monotonic() + 30  # a bound on a hang (valgrind is slow), not a speed
    while get.lookup("p-001").source is not Source.NEAR:
        if time.monotonic() > deadline:
            raise SystemExit("the near cache never filled")
        time.sleep(0.01)
    repeat(lambda: get("p-001"), count)


def ttl_cache_item(engine: CacheEngine, loads: Loads, count: int) -> None:
    """The near hit's yardstick: a cachetools TTLCache hit, `cache[key]`."""
    from cachetools import TTLCache

    cache: TTLCache[str, dict[str, str]] = TTLCache(maxsize=1024, ttl=600)
    cache["p-001"] = loads("p-001")
    repeat(lambda: cache["p-001"], count)


def ttl_cache_cached(engine: CacheEngine, loads: Loads, count: int) -> None:
    """A cachetools `@cached(TTLCache)` hit: the decorator's key building included,
    as a near hit's is."""
    from cachetools import TTLCache, cached

    get = cached(TTLCache(maxsize=1024, ttl=600))(loads)
    repeat(lambda: get("p-001"), count)


def repeat(call: Callable[[], Any], count: int) -> None:
    for _ in range(WARM_UP):
        call()
    for _ in range(count):
        call()


async def async_hit(engine: CacheEngine, loads: Loads, count: int) -> None:
    get = cache_aside(key="hit:<id>", ttl=600, engine=engine)(loads.load_async)
    for _ in range(WARM_UP):
        await get("p-001")
    for _ in range(count):
        await get("p-001")
    await engine.aclose()


async def async_many_hits(engine: CacheEngine, loads: Loads, count: int) -> None:
    get = cache_aside(key="many:<id>", ttl=600, engine=engine)(loads.load_async)
    ids = [f"{number:06d}" for number in range(BATCH)]
    await get.many(ids)
    for _ in range(WARM_UP):
        await get.many(ids)
    for _ in range(count):
        await get.many(ids)
    await engine.aclose()


SYNC = {
    "sync_hit": sync_hit,
    "miss": miss,
    "many_hits": many_hits,
    "near_hit": near_hit,
    "ttl_cache_item": ttl_cache_item,
    "ttl_cache_cached": ttl_cache_cached,
}
OPERATIONS = [*SYNC, "async_hit", "async_hit_uvloop", "async_many_hits"]


def main(argv: list[str]) -> None:
    operation, count, url, prefix = argv[0], int(argv[1]), argv[2], argv[3]
    # Under valgrind code runs some fifty times slower: the default 0.25 s timeouts
    # would fire on a busy machine, and a hit that fails open loads, a miss counted.
    engine = CacheEngine.from_url(
        url, prefix=prefix, socket_timeout=SECONDS, socket_connect_timeout=SECONDS
    )
    loads = Loads()
    # What start-up left on the heap is set aside from the collector: a full collection
    # walks every object it tracks, so whether one falls into the N or the 2N run,
    # and how long it takes, would follow the size of the imports, not the operation
    # (one more field on a dataclass once moved the sync hit by 2%).
    gc.collect()
    gc.freeze()
    if operation == "async_hit":
        asyncio.run(async_hit(engine, loads, count))
    elif operation == "async_many_hits":
        asyncio.run(async_many_hits(engine, loads, count))
    elif operation == "async_hit_uvloop":
        import uvloop  # the bench extra's

        uvloop.run(async_hit(engine, loads, count))
    else:
        SYNC[operation](engine, loads, count)
        engine.close()
    # What ran and what it loaded, for the meter to check: one line of JSON.
    print(json.dumps({"cached_aside": cached_aside.__file__, "loads": loads.count}))


if __name__ == "__main__":
    main(sys.argv[1:])
