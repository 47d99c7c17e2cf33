"""Hit path: a decorated call on a cached key vs the raw redis-py call a user would
write instead (`redis.Redis.from_url(url)` / `redis.asyncio.Redis.from_url(url)` with
redis-py's defaults), vs peer libraries on the same server and record, and against
the floor: the C client (benchmarks/c_client.c, compiled for the run) reading
the same record, a round of it before each round of the Python contenders, with its
round trip and CPU per GET beside this process's CPU per call (benchmarks/c_client.py).
cached_aside is built as its docs say, with `CacheEngine.from_url(url)`.

    python -m benchmarks --only hit_path
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlparse

import msgpack
import redis
import redis.asyncio

from cached_aside import CacheEngine, cache_aside

from . import bare
from .c_client import CClient, Measured, c_client_table, floor_note
from .placement import pin_from_environment
from .runner import (
    Settings,
    Table,
    blocking_client,
    latency_table,
    measure_async,
    measure_sync,
)

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
BENCH_EXTRA = "pip install 'cached_aside[bench]'"
# Every contender's entries outlive the run (seconds): a timed call that found its
# entry expired would be a miss (and a raw GET of an expired key fails to unpack).
TTL = 3600
SYNC_BARE = "bare socket GET + unpackb (Python's floor)"
ASYNC_BARE = "bare asyncio Protocol GET + unpackb (asyncio's floor)"
# The targets, as ratios to the raw call (median, from the same run).
TARGETS = {"msgpack": 0.85, "hash": 0.90}


def target_note(table: Table, contender: str, baseline: str, kind: str) -> str:
    """Judged on the table's own ratio column (medians from this run)."""
    ratios = {row[0]: row[3] for row in table.rows}
    assert ratios[baseline] == 1.0, "the table's baseline is the raw call"
    ratio = ratios[contender]
    verdict = "met" if ratio <= TARGETS[kind] else "missed"
    return f"target: {contender} <= {TARGETS[kind]}x {baseline}: {ratio:.3f}, {verdict}"


class LoadCounter:
    """Counts loader calls, so a hit-path figure can prove no timed call loaded."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def loader(self, name: str) -> Callable[[str], dict[str, str]]:
        def load(id: str) -> dict[str, str]:
            self.calls[name] = self.calls.get(name, 0) + 1
            return dict(RECORD)

        return load

    def check(self) -> None:
        wrong = {name: n for name, n in self.calls.items() if n != 1}
        if wrong:
            raise SystemExit(f"contenders loaded more than once while timing hits: {wrong}")


def hot_path_note(engine: CacheEngine) -> str:
    """Which path the sync hits took: the held connection, or (on a redis-py it
    cannot drive) the client's; a figure must say which it measured."""
    held = engine.sides.sync_side().held  # the engine's own connection path, read not changed
    versions = f"redis-py {redis.__version__}"
    if held is None:
        return f"hot path: the client's ({versions}: no held connection for this client)"
    if held.problem is not None:
        return f"hot path: OFF, the client's ({held.problem})"
    if held.fallbacks:
        return f"hot path: held connection, {held.fallbacks} call(s) fell back ({versions})"
    return f"hot path: held connection, every call ({versions})"


def decode_hash(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {field.decode(): value.decode() for field, value in raw.items()}


def sync_peers(
    settings: Settings, prefix: str, counter: LoadCounter
) -> tuple[dict[str, Any], list[str]]:
    contenders: dict[str, Any] = {}
    notes: list[str] = []
    try:
        from dogpile.cache import make_region

        region = make_region(key_mangler=lambda key: f"{prefix}:dogpile:{key}").configure(
            "dogpile.cache.redis", expiration_time=TTL, arguments={"url": settings.url}
        )
        dogpile = region.cache_on_arguments()(counter.loader("dogpile.cache"))
        dogpile("p-001")
        contenders["dogpile.cache (redis backend)"] = lambda: dogpile("p-001")
    except ImportError:
        notes.append(f"dogpile.cache not installed ({BENCH_EXTRA})")
    try:
        from cachetools import TTLCache, cached

        in_process = cached(TTLCache(maxsize=1024, ttl=TTL))(counter.loader("cachetools"))
        in_process("p-001")
        contenders["cachetools TTLCache (in process)"] = lambda: in_process("p-001")
    except ImportError:
        notes.append(f"cachetools not installed ({BENCH_EXTRA})")
    lru = functools.lru_cache(maxsize=1024)(counter.loader("lru_cache"))
    lru("p-001")
    contenders["functools.lru_cache (in process)"] = lambda: lru("p-001")
    return contenders, notes


def run_sync(settings: Settings, prefix: str, c_client: CClient, measured: Measured) -> list[Table]:
    client = redis.Redis.from_url(settings.url)  # what a user writes: redis-py's defaults
    engine = CacheEngine.from_url(settings.url, prefix=prefix)
    counter = LoadCounter()
    get_product = cache_aside(key="product:<id>", ttl=TTL, as_hash=True, engine=engine)(
        counter.loader("cached_aside hash")
    )
    get_packed = cache_aside(key="packed:<id>", ttl=TTL, engine=engine)(
        counter.loader("cached_aside msgpack")
    )
    get_product("p-001")
    get_packed("p-001")
    hash_key, packed_key = get_product.key("p-001"), get_packed.key("p-001")
    c_client.key = packed_key
    peers, notes = sync_peers(settings, prefix, counter)
    bare_get, bare_close = bare.sync_get(settings.url, packed_key)
    cpu: dict[str, list[float]] = {}
    packed = latency_table(
        "sync hit, msgpack record",
        measure_sync(
            settings,
            {
                "raw redis-py GET + unpackb": lambda: msgpack.unpackb(client.get(packed_key)),
                "cached_aside (msgpack)": lambda: get_packed("p-001"),
                SYNC_BARE: bare_get,
                **peers,
            },
            "sync hit, msgpack",
            cpu=cpu,
            each_round=c_client.round,
        ),
        "raw redis-py GET + unpackb",
    )
    packed.notes = [
        *notes,
        hot_path_note(engine),
        "raw: redis.Redis.from_url(url), defaults; cached_aside: CacheEngine.from_url(url)",
        "peers use their own client on the same server; in-process caches for scale",
        f"{SYNC_BARE}: one GET on a socket of its own, its reply unpacked, nothing else "
        "(benchmarks/bare.py): the least Python spends",
        target_note(packed, "cached_aside (msgpack)", "raw redis-py GET + unpackb", "msgpack"),
        floor_note(packed, "raw redis-py GET + unpackb", c_client),
    ]
    measured.append(("sync", packed, cpu, "raw redis-py GET + unpackb"))
    hashed = latency_table(
        "sync hit, hash record (8 fields)",
        measure_sync(
            settings,
            {
                "raw redis-py HGETALL": lambda: client.hgetall(hash_key),
                "raw HGETALL + decode to str": lambda: decode_hash(client.hgetall(hash_key)),
                "cached_aside (as_hash=True)": lambda: get_product("p-001"),
            },
            "sync hit, hash",
        ),
        "raw redis-py HGETALL",
    )
    hashed.notes = [
        "cached_aside returns str values, as the second row does",
        target_note(hashed, "cached_aside (as_hash=True)", "raw redis-py HGETALL", "hash"),
    ]
    counter.check()
    bare_close()
    client.close()
    engine.close()
    return [packed, hashed]


async def run_async(
    settings: Settings, prefix: str, c_client: CClient, measured: Measured
) -> list[Table]:
    client = redis.asyncio.Redis.from_url(settings.url)  # redis-py's defaults
    engine = CacheEngine.from_url(settings.url, prefix=prefix)
    counter = LoadCounter()

    def async_loader(name: str) -> Callable[[str], Any]:
        load = counter.loader(name)

        async def loader(id: str) -> dict[str, str]:
            return load(id)

        return loader

    get_product = cache_aside(key="product:<id>", ttl=TTL, as_hash=True, engine=engine)(
        async_loader("cached_aside hash")
    )
    get_packed = cache_aside(key="packed:<id>", ttl=TTL, engine=engine)(
        async_loader("cached_aside msgpack")
    )
    await get_product("p-001")
    await get_packed("p-001")
    hash_key, packed_key = get_product.key("p-001"), get_packed.key("p-001")
    peers: dict[str, Any] = {}
    notes: list[str] = []
    closers: list[Any] = []
    try:
        from cashews import Cache as CashewsCache

        cashews = CashewsCache()
        cashews.setup(settings.url)
        cashed = cashews(ttl=TTL, key=prefix + ":cashews:product:{id}")(async_loader("cashews"))
        await cashed("p-001")
        peers["cashews (redis)"] = lambda: cashed("p-001")
        closers.append(cashews.close)
    except ImportError:
        notes.append(f"cashews not installed ({BENCH_EXTRA})")
    try:
        from aiocache import Cache, cached

        address = urlparse(settings.url)
        aio = cached(
            ttl=TTL,
            cache=Cache.REDIS,
            endpoint=address.hostname or "127.0.0.1",
            port=address.port or 6379,
            namespace=f"{prefix}:aiocache",
        )(async_loader("aiocache"))
        await aio("p-001")
        peers["aiocache (redis)"] = lambda: aio("p-001")
        closers.append(aio.cache.close)  # type: ignore[attr-defined]
    except ImportError:
        notes.append(f"aiocache not installed ({BENCH_EXTRA})")

    bare_get, bare_close = await bare.async_get(settings.url, packed_key)
    closers.append(_as_coroutine(bare_close))
    cpu: dict[str, list[float]] = {}

    async def raw_packed() -> Any:
        return msgpack.unpackb(await client.get(packed_key))

    async def raw_decoded() -> Any:
        return decode_hash(await client.hgetall(hash_key))

    try:
        packed = latency_table(
            "async hit, msgpack record",
            await measure_async(
                settings,
                {
                    "raw redis.asyncio GET + unpackb": raw_packed,
                    "cached_aside (msgpack)": lambda: get_packed("p-001"),
                    ASYNC_BARE: bare_get,
                    **peers,
                },
                "async hit, msgpack",
                cpu=cpu,
                each_round=c_client.round,
            ),
            "raw redis.asyncio GET + unpackb",
        )
        packed.notes = [
            *notes,
            "raw: redis.asyncio.Redis.from_url(url), defaults; cached_aside: "
            "CacheEngine.from_url(url)",
            f"{ASYNC_BARE}: one GET on an asyncio Protocol of its own, one future per call, "
            "its reply unpacked, nothing else (benchmarks/bare.py): the least asyncio spends",
            target_note(
                packed, "cached_aside (msgpack)", "raw redis.asyncio GET + unpackb", "msgpack"
            ),
            floor_note(packed, "raw redis.asyncio GET + unpackb", c_client),
        ]
        measured.append(("async", packed, cpu, "raw redis.asyncio GET + unpackb"))
        hashed = latency_table(
            "async hit, hash record (8 fields)",
            await measure_async(
                settings,
                {
                    "raw redis.asyncio HGETALL": lambda: client.hgetall(hash_key),
                    "raw HGETALL + decode to str": raw_decoded,
                    "cached_aside (as_hash=True)": lambda: get_product("p-001"),
                },
                "async hit, hash",
            ),
            "raw redis.asyncio HGETALL",
        )
        hashed.notes = [
            target_note(hashed, "cached_aside (as_hash=True)", "raw redis.asyncio HGETALL", "hash")
        ]
        counter.check()
    finally:
        for close in closers:
            await close()
        await client.aclose()
        await engine.aclose()
    return [packed, hashed]


def _as_coroutine(close: Callable[[], None]) -> Callable[[], Awaitable[None]]:
    async def closing() -> None:
        close()

    return closing


def run(settings: Settings) -> list[Table]:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    placement = pin_from_environment()
    c_client = CClient(settings.url, settings.scaled(5000, 1000))
    try:
        measured: Measured = []
        tables = run_sync(settings, prefix, c_client, measured)
        tables += asyncio.run(run_async(settings, prefix, c_client, measured))
        against_c = c_client_table(c_client, measured)
        against_c.notes.append(placement)
        return [*tables, against_c]
    finally:
        c_client.close()
        cleanup = blocking_client(settings.url)
        for key in cleanup.scan_iter(match=f"{prefix}:*"):
            cleanup.delete(key)
        cleanup.close()
