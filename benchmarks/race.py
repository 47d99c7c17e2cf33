"""Stale reads under concurrent writes: cached_aside vs plain hand-written cache-aside.

Readers read through the cache with slow loaders; writers update a real SQLite file
and then invalidate. Afterwards a checker counts reads that returned a version older
than an invalidation that had completed before the read began, and entries left in
Redis that differ from the primary.

    python -m benchmarks.race [--reads 3000] [--url redis://127.0.0.1:6379/0]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import random
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import msgpack
import redis
import redis.asyncio

from cached_aside import CacheEngine, cache_aside

from .runner import Settings, Table, blocking_async_client, blocking_client, print_tables


class Primary:
    """A table of versions in a real SQLite file; one connection per thread."""

    def __init__(self, path: Path, keys: list[str]) -> None:
        self.path = path
        self._local = threading.local()
        with sqlite3.connect(path) as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE items (id TEXT PRIMARY KEY, version INTEGER NOT NULL)")
            db.executemany("INSERT INTO items VALUES (?, 1)", [(k,) for k in keys])

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        return db  # type: ignore[no-any-return]

    def read(self, key: str) -> int:
        row = self._db().execute("SELECT version FROM items WHERE id = ?", (key,)).fetchone()
        return int(row[0])

    def bump(self, key: str) -> int:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        db.execute("UPDATE items SET version = version + 1 WHERE id = ?", (key,))
        version = int(db.execute("SELECT version FROM items WHERE id = ?", (key,)).fetchone()[0])
        db.execute("COMMIT")
        return version


@dataclass
class Log:
    reads: list[tuple[str, int, float]] = field(default_factory=list)  # key, version, began
    invalidations: list[tuple[str, int, float]] = field(default_factory=list)  # key, version, ended


def count_stale_reads(log: Log) -> int:
    """Reads that returned a version older than an invalidation completed before they began."""
    by_key: dict[str, list[tuple[float, int]]] = {}
    for key, version, ended in log.invalidations:
        by_key.setdefault(key, []).append((ended, version))
    newest_before: dict[str, tuple[list[float], list[int]]] = {}
    for key, entries in by_key.items():
        entries.sort()
        times, best, top = [], [], 0
        for ended, version in entries:
            top = max(top, version)
            times.append(ended)
            best.append(top)
        newest_before[key] = (times, best)
    stale = 0
    for key, version, began in log.reads:
        times, best = newest_before.get(key, ([], []))
        index = bisect.bisect_left(times, began) - 1
        if index >= 0 and best[index] > version:
            stale += 1
    return stale


class Cache(Protocol):
    def get(self, key: str) -> int: ...
    def invalidate(self, key: str) -> None: ...
    def cached_version(self, key: str) -> int | None: ...


@dataclass
class Workload:
    keys: int = 6
    readers: int = 6
    writers: int = 2
    reads: int = 3000
    load_delay_ms: float = 4.0
    write_pause_ms: float = 4.0
    read_pause_ms: float = 1.0  # keeps reads and writes interleaved on fast backends
    seed: int = 7
    # Readers go on past `reads` until the writers have invalidated this often: a race
    # run on a slow machine (or a slow disk under the primary) is still a race.
    min_invalidations: int = 0

    def key_names(self) -> list[str]:
        return [f"item-{i}" for i in range(self.keys)]


def slow_loader(
    primary: Primary, workload: Workload, rng: random.Random
) -> Callable[[str], dict[str, int]]:
    def load(key: str) -> dict[str, int]:
        version = primary.read(key)
        time.sleep(rng.uniform(0, workload.load_delay_ms) / 1000)  # the slow part of a load
        return {"version": version}

    return load


def run_threads(cache_for: Callable[[int], Cache], primary: Primary, workload: Workload) -> Log:
    """Run readers and writers as threads; `cache_for(i)` gives reader/writer i its cache."""
    log = Log()
    keys = workload.key_names()
    done = threading.Event()

    def reader(index: int) -> None:
        rng = random.Random(workload.seed + index)
        cache = cache_for(index)
        count = 0
        while count < workload.reads // workload.readers or (
            len(log.invalidations) < workload.min_invalidations
        ):
            count += 1
            key = rng.choice(keys)
            began = time.perf_counter()
            log.reads.append((key, cache.get(key), began))
            time.sleep(rng.uniform(0, workload.read_pause_ms) / 1000)

    def writer(index: int) -> None:
        rng = random.Random(workload.seed + 1000 + index)
        cache = cache_for(index)
        while not done.is_set():
            key = rng.choice(keys)
            version = primary.bump(key)
            cache.invalidate(key)
            log.invalidations.append((key, version, time.perf_counter()))
            time.sleep(rng.uniform(0, workload.write_pause_ms) / 1000)

    readers = [threading.Thread(target=reader, args=(i,)) for i in range(workload.readers)]
    writers = [threading.Thread(target=writer, args=(i,)) for i in range(workload.writers)]
    for thread in readers + writers:
        thread.start()
    for thread in readers:
        thread.join()
    done.set()
    for thread in writers:
        thread.join()
    return log


class PlainCache:
    """Cache-aside as it is usually written by hand: GET, else load and SET; DEL to invalidate."""

    def __init__(
        self, client: redis.Redis, prefix: str, load: Callable[[str], dict[str, int]]
    ) -> None:
        self.client, self.prefix, self.load = client, prefix, load

    def get(self, key: str) -> int:
        raw = self.client.get(f"{self.prefix}:{key}")
        if raw is not None:
            return int(msgpack.unpackb(raw)["version"])
        value = self.load(key)
        self.client.set(f"{self.prefix}:{key}", msgpack.packb(value), ex=60)
        return value["version"]

    def invalidate(self, key: str) -> None:
        self.client.delete(f"{self.prefix}:{key}")

    def cached_version(self, key: str) -> int | None:
        raw = self.client.get(f"{self.prefix}:{key}")
        return None if raw is None else int(msgpack.unpackb(raw)["version"])


class OurCache:
    """cached_aside on its own engine: two of these behave like two processes."""

    def __init__(self, engine: CacheEngine, load: Callable[[str], dict[str, int]]) -> None:
        self.function = cache_aside(key="item:<key>", ttl=60, engine=engine)(load)
        self.client = engine.client()

    def get(self, key: str) -> int:
        return int(self.function(key)["version"])

    def invalidate(self, key: str) -> None:
        self.function.invalidate(key)

    def cached_version(self, key: str) -> int | None:
        raw = self.client.get(self.function.key(key))
        return None if raw is None else int(msgpack.unpackb(raw)["version"])


@dataclass
class Outcome:
    reads: int
    invalidations: int
    stale_reads: int
    stale_entries: int  # entries left in Redis that differ from the primary


def judge(log: Log, caches: list[Any], primary: Primary, keys: list[str]) -> Outcome:
    stale_entries = 0
    for key in keys:
        cached = caches[0].cached_version(key)
        if cached is not None and cached != primary.read(key):
            stale_entries += 1
    return Outcome(len(log.reads), len(log.invalidations), count_stale_reads(log), stale_entries)


def run_plain(client: redis.Redis, workload: Workload, directory: Path) -> Outcome:
    primary = Primary(directory / f"plain-{uuid.uuid4().hex}.db", workload.key_names())
    prefix = f"race-plain-{uuid.uuid4().hex[:8]}"
    cache = PlainCache(client, prefix, slow_loader(primary, workload, random.Random(workload.seed)))
    try:
        log = run_threads(lambda i: cache, primary, workload)
        return judge(log, [cache], primary, workload.key_names())
    finally:
        for key in client.scan_iter(match=f"{prefix}:*"):
            client.delete(key)


def run_ours(engines: list[CacheEngine], workload: Workload, directory: Path) -> Outcome:
    primary = Primary(directory / f"ours-{uuid.uuid4().hex}.db", workload.key_names())
    rng = random.Random(workload.seed)
    caches = [OurCache(engine, slow_loader(primary, workload, rng)) for engine in engines]
    log = run_threads(lambda i: caches[i % len(caches)], primary, workload)
    return judge(log, caches, primary, workload.key_names())


async def run_ours_async(
    engines: list[CacheEngine], workload: Workload, directory: Path
) -> Outcome:
    """The same workload with asyncio tasks and async loaders."""
    primary = Primary(directory / f"ours-async-{uuid.uuid4().hex}.db", workload.key_names())
    rng = random.Random(workload.seed)
    keys = workload.key_names()
    log = Log()
    functions: list[Any] = []
    for engine in engines:

        async def load(key: str) -> dict[str, int]:
            version = await asyncio.to_thread(primary.read, key)
            await asyncio.sleep(rng.uniform(0, workload.load_delay_ms) / 1000)
            return {"version": version}

        functions.append(cache_aside(key="item:<key>", ttl=60, engine=engine)(load))
    done = asyncio.Event()

    async def reader(index: int) -> None:
        local = random.Random(workload.seed + index)
        function = functions[index % len(functions)]
        count = 0
        while count < workload.reads // workload.readers or (
            len(log.invalidations) < workload.min_invalidations
        ):
            count += 1
            key = local.choice(keys)
            began = time.perf_counter()
            log.reads.append((key, int((await function(key))["version"]), began))
            await asyncio.sleep(local.uniform(0, workload.read_pause_ms) / 1000)

    async def writer(index: int) -> None:
        local = random.Random(workload.seed + 1000 + index)
        function = functions[index % len(functions)]
        while not done.is_set():
            key = local.choice(keys)
            version = await asyncio.to_thread(primary.bump, key)
            await function.invalidate(key)
            log.invalidations.append((key, version, time.perf_counter()))
            await asyncio.sleep(local.uniform(0, workload.write_pause_ms) / 1000)

    writers = [asyncio.create_task(writer(i)) for i in range(workload.writers)]
    await asyncio.gather(*(reader(i) for i in range(workload.readers)))
    done.set()
    await asyncio.gather(*writers)
    client = engines[0].async_client()
    stale_entries = 0
    for key in keys:
        raw = await client.get(functions[0].key(key))
        if raw is not None and msgpack.unpackb(raw)["version"] != primary.read(key):
            stale_entries += 1
    return Outcome(len(log.reads), len(log.invalidations), count_stale_reads(log), stale_entries)


def scenario(settings: Settings, reads: int | None = None) -> list[Table]:
    workload = Workload(reads=reads or settings.scaled(3000, 600))
    prefix = f"race-{uuid.uuid4().hex[:8]}"
    client = blocking_client(settings.url)
    engines = [CacheEngine(blocking_client(settings.url), prefix=prefix) for _ in range(2)]

    async def with_tasks(directory: Path) -> Outcome:
        async_engines = [
            CacheEngine(async_client=blocking_async_client(settings.url), prefix=prefix + "a")
            for _ in range(2)
        ]
        outcome = await run_ours_async(async_engines, workload, directory)
        for engine in async_engines:
            await engine.async_client().aclose()
        return outcome

    with tempfile.TemporaryDirectory() as directory:
        outcomes = {
            "plain cache-aside (GET, else load and SET; DEL)": run_plain(
                client, workload, Path(directory)
            ),
            "cached_aside, threads over two engines": run_ours(engines, workload, Path(directory)),
            "cached_aside, asyncio tasks over two engines": asyncio.run(
                with_tasks(Path(directory))
            ),
        }
    for key in client.scan_iter(match=f"{prefix}*"):
        client.delete(key)
    client.close()
    for engine in engines:  # clients given to the engines: ours to close
        engine.client().close()
    table = Table(
        "stale reads under concurrent writes",
        ["algorithm", "reads", "writes", "stale reads", "stale entries left"],
    )
    for name, outcome in outcomes.items():
        table.rows.append(
            [name, outcome.reads, outcome.invalidations, outcome.stale_reads, outcome.stale_entries]
        )
    table.notes = [
        "stale: returned a version older than an invalidation completed before the read began",
        f"{workload.keys} keys, loads sleep 0-{workload.load_delay_ms:g} "
        "ms after reading the SQLite primary",
    ]
    return [table]


def main() -> None:
    parser = argparse.ArgumentParser(description="stale reads: cached_aside vs plain cache-aside")
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--reads", type=int, default=3000)
    args = parser.parse_args()
    print_tables(scenario(Settings(url=args.url), reads=args.reads))


if __name__ == "__main__":
    main()
