"""Throughput under concurrency: N asyncio tasks in one loop (each on its own key, or
all on one hot key), and N threads, each looping hits for a fixed time; hits/s,
per-call p50 and p99, connections opened, and errors, next to what a user would
write with redis-py (the default pool, and a 50-connection blocking pool) and the
peers. cached_aside's async calls share one connection per loop and go out together
(auto-pipelining); its threads each hold one connection.

    python -m benchmarks --only concurrency
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlparse

import msgpack
import redis
import redis.asyncio

from cached_aside import CacheEngine, cache_aside

from .hit_path import RECORD
from .runner import Settings, Table, percentile

TASKS = (1, 10, 100, 200, 500)
THREADS = (1, 8, 32)
Maker = Callable[[str, str], Awaitable[tuple[Callable[[str], Awaitable[Any]], Any]]]


def connected(url: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        return int(client.info("clients")["connected_clients"])
    finally:
        client.close()


async def raw_default(url: str, prefix: str) -> tuple[Any, Any]:
    client = redis.asyncio.Redis.from_url(url)

    async def get(key: str) -> Any:
        return msgpack.unpackb(await client.get(f"{prefix}:raw:{key}"))

    return get, client.aclose


async def raw_blocking(url: str, prefix: str) -> tuple[Any, Any]:
    pool = redis.asyncio.BlockingConnectionPool.from_url(url, max_connections=50)
    client = redis.asyncio.Redis.from_pool(pool)

    async def get(key: str) -> Any:
        return msgpack.unpackb(await client.get(f"{prefix}:raw:{key}"))

    return get, client.aclose


async def cached(url: str, prefix: str) -> tuple[Any, Any]:
    engine = CacheEngine.from_url(url, prefix=prefix)

    @cache_aside(key="c:<key>", ttl=600, engine=engine)
    async def get(key: str) -> dict[str, str]:
        return dict(RECORD)

    return get, engine.aclose


class Swallowed(logging.Handler):
    """Counts what a peer logs and answers anyway (aiocache fails open on Redis errors,
    MaxConnectionsError included): errors its callers never see, but errors."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


SWALLOWED = Swallowed()


async def with_aiocache(url: str, prefix: str) -> tuple[Any, Any]:
    from aiocache import Cache
    from aiocache import cached as aiocached

    peer_logger = logging.getLogger("aiocache")
    if SWALLOWED not in peer_logger.handlers:
        peer_logger.addHandler(SWALLOWED)
        peer_logger.propagate = False

    address = urlparse(url)
    fn = aiocached(
        ttl=600,
        cache=Cache.REDIS,
        endpoint=address.hostname or "127.0.0.1",
        port=address.port or 6379,
        namespace=f"{prefix}:aiocache",
    )(_async_record)
    return fn, fn.cache.close  # type: ignore[attr-defined]


async def with_cashews(url: str, prefix: str) -> tuple[Any, Any]:
    from cashews import Cache as CashewsCache

    cache = CashewsCache()
    cache.setup(url)
    fn = cache(ttl="10m", key=prefix + ":cashews:{key}")(_async_record)
    return fn, cache.close


async def _async_record(key: str) -> dict[str, str]:
    return dict(RECORD)


async def fill(url: str, prefix: str, keys: list[str]) -> None:
    client = redis.asyncio.Redis.from_url(url)
    packed = msgpack.packb(RECORD)
    async with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.set(f"{prefix}:raw:{key}", packed, ex=600)
        await pipe.execute()
    await client.aclose()


async def one_level(
    make: Maker, url: str, prefix: str, tasks: int, hot: bool, seconds: float
) -> dict[str, Any]:
    """`tasks` tasks looping hits for `seconds`; returns counts and latencies."""
    keys = ["hot"] * tasks if hot else [f"k{n}" for n in range(tasks)]
    before = connected(url)
    get, close = await make(url, prefix)
    errors = 0
    swallowed_before = SWALLOWED.count
    samples: list[float] = []
    calls = 0
    peak = before
    try:
        for key in set(keys):
            await get(key)  # warm: every contender's entry is cached before timing
        start = asyncio.Event()
        deadline = 0.0

        async def loop(key: str) -> None:
            nonlocal calls, errors
            await start.wait()
            clock = time.perf_counter
            while clock() < deadline:
                began = clock()
                try:
                    await get(key)
                except Exception:
                    errors += 1
                    continue
                samples.append((clock() - began) * 1e6)
                calls += 1

        runners = [asyncio.ensure_future(loop(key)) for key in keys]
        await asyncio.sleep(0)
        began = time.perf_counter()
        deadline = began + seconds
        start.set()
        await asyncio.sleep(seconds / 2)
        peak = connected(url)
        await asyncio.gather(*runners)
        elapsed = time.perf_counter() - began
    finally:
        await close()
    return {
        "hits_per_s": calls / elapsed,
        "p50": percentile(samples, 0.5) if samples else 0.0,
        "p99": percentile(samples, 0.99) if samples else 0.0,
        "connections": max(0, peak - before),
        "errors": errors + SWALLOWED.count - swallowed_before,
    }


def contenders() -> tuple[dict[str, Maker], list[str]]:
    makers: dict[str, Maker] = {
        "raw redis.asyncio, default pool": raw_default,
        "raw redis.asyncio, 50-conn blocking pool": raw_blocking,
        "cached_aside": cached,
    }
    notes = []
    try:
        import aiocache  # noqa: F401

        makers["aiocache"] = with_aiocache
    except ImportError:
        notes.append("aiocache not installed")
    try:
        import cashews  # noqa: F401

        makers["cashews"] = with_cashews
    except ImportError:
        notes.append("cashews not installed")
    return makers, notes


async def run_async(settings: Settings, prefix: str) -> tuple[list[Table], dict[str, Any]]:
    makers, notes = contenders()
    levels = (1, 10, 200) if settings.quick else TASKS
    rounds = 1 if settings.quick else 3
    seconds = 0.3 if settings.quick else 1.0
    await fill(
        url=settings.url, prefix=prefix, keys=["hot", *(f"k{n}" for n in range(max(levels)))]
    )
    tables = []
    curves: dict[str, Any] = {}
    for hot in (False, True):
        kind = "one hot key" if hot else "distinct keys"
        table = Table(
            f"async throughput, {kind}: tasks in one loop",
            ["contender", "tasks", "hits/s", "p50 µs", "p99 µs", "connections", "errors", "ratio"],
        )
        for tasks in levels:
            results: dict[str, list[dict[str, Any]]] = {name: [] for name in makers}
            for round_number in range(rounds):
                order = list(makers.items())
                for name, make in order if round_number % 2 == 0 else order[::-1]:
                    results[name].append(
                        await one_level(make, settings.url, prefix, tasks, hot, seconds)
                    )
                if settings.progress:
                    pass
            base = statistics.median(
                r["hits_per_s"] for r in results["raw redis.asyncio, 50-conn blocking pool"]
            )
            for name, runs in results.items():
                rate = statistics.median(r["hits_per_s"] for r in runs)
                table.rows.append(
                    [
                        name,
                        tasks,
                        round(rate),
                        round(statistics.median(r["p50"] for r in runs), 1),
                        round(statistics.median(r["p99"] for r in runs), 1),
                        max(r["connections"] for r in runs),
                        sum(r["errors"] for r in runs),
                        round(rate / base, 3),
                    ]
                )
                curves.setdefault(f"async, {kind}", {}).setdefault(name, []).append((tasks, rate))
        table.notes = [
            *notes,
            f"median of {rounds} interleaved runs of {seconds:g} s; ratio to the 50-connection "
            "blocking pool; connections: INFO clients at mid-run minus before",
            "errors: raised to the caller, or logged and answered by the loader (aiocache)",
        ]
        tables.append(table)
    target = next(
        (row for row in tables[0].rows if row[0] == "cached_aside" and row[1] == 200), None
    )
    if target is not None:
        blocking = next(
            r for r in tables[0].rows if r[0].startswith("raw redis.asyncio, 50") and r[1] == 200
        )
        verdict = "met" if target[7] >= 4 and target[4] <= blocking[4] else "missed"
        tables[0].notes.append(
            f"target: 200 tasks, distinct keys >= 4x the blocking pool with a p99 no worse: "
            f"{target[7]:.2f}x, p99 {target[4]} vs {blocking[4]} µs, {verdict}"
        )
    return tables, curves


def run_threads(settings: Settings, prefix: str) -> tuple[Table, dict[str, Any]]:
    levels = (1, 8) if settings.quick else THREADS
    rounds = 1 if settings.quick else 3
    seconds = 0.3 if settings.quick else 1.0
    client = redis.Redis.from_url(settings.url)
    engine = CacheEngine.from_url(settings.url, prefix=prefix)
    get = cache_aside(key="t:<key>", ttl=600, engine=engine)(lambda key: dict(RECORD))
    for n in range(max(levels)):
        get(f"k{n}")
    raw_key = f"{prefix}:raw:k"

    def raw(key: str) -> Any:
        return msgpack.unpackb(client.get(raw_key + key[1:]))

    calls: dict[str, Callable[[str], Any]] = {
        "raw redis-py, default pool": raw,
        "cached_aside": get,
    }
    table = Table(
        "sync throughput, distinct keys: threads",
        ["contender", "threads", "hits/s", "p50 µs", "p99 µs", "errors", "ratio"],
    )
    curves: dict[str, Any] = {}
    for threads in levels:
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in calls}
        for round_number in range(rounds):
            order = list(calls.items())
            for name, call in order if round_number % 2 == 0 else order[::-1]:
                results[name].append(_threads_level(call, threads, seconds))
        base = statistics.median(r["hits_per_s"] for r in results["raw redis-py, default pool"])
        for name, runs in results.items():
            rate = statistics.median(r["hits_per_s"] for r in runs)
            table.rows.append(
                [
                    name,
                    threads,
                    round(rate),
                    round(statistics.median(r["p50"] for r in runs), 1),
                    round(statistics.median(r["p99"] for r in runs), 1),
                    sum(r["errors"] for r in runs),
                    round(rate / base, 3),
                ]
            )
            curves.setdefault("sync, threads", {}).setdefault(name, []).append((threads, rate))
    table.notes = [f"median of {rounds} interleaved runs of {seconds:g} s; ratio to raw redis-py"]
    client.close()
    engine.close()
    return table, curves


def _threads_level(call: Callable[[str], Any], threads: int, seconds: float) -> dict[str, Any]:
    samples: list[list[float]] = [[] for _ in range(threads)]
    errors = [0]
    barrier = threading.Barrier(threads + 1)
    deadline = [0.0]

    def loop(n: int) -> None:
        key, sink, clock = f"k{n}", samples[n], time.perf_counter
        call(key)
        barrier.wait()
        while clock() < deadline[0]:
            began = clock()
            try:
                call(key)
            except Exception:
                errors[0] += 1
                continue
            sink.append((clock() - began) * 1e6)

    workers = [threading.Thread(target=loop, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    deadline[0] = time.perf_counter() + seconds + 0.01
    barrier.wait()
    began = time.perf_counter()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - began
    every = [value for sink in samples for value in sink]
    return {
        "hits_per_s": len(every) / elapsed,
        "p50": percentile(every, 0.5) if every else 0.0,
        "p99": percentile(every, 0.99) if every else 0.0,
        "errors": errors[0],
    }


def run(settings: Settings) -> list[Table]:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    try:
        tables, curves = asyncio.run(run_async(settings, prefix))
        filler = redis.Redis.from_url(settings.url)
        packed = msgpack.packb(RECORD)
        for n in range(max(THREADS)):
            filler.set(f"{prefix}:raw:{n}", packed, ex=600)
        filler.close()
        threads_table, thread_curves = run_threads(settings, prefix)
        tables.append(threads_table)
        curves.update(thread_curves)
        tables[0].curves = curves  # type: ignore[attr-defined]  # for the chart
        return tables
    finally:
        cleanup = redis.Redis.from_url(settings.url)
        for key in cleanup.scan_iter(match=f"{prefix}:*", count=1000):
            cleanup.delete(key)
        cleanup.close()


def chart(tables: list[Table], path: Any) -> bool:
    """hits/s against concurrency, one panel per kind, one line per contender."""
    curves = next((getattr(t, "curves", None) for t in tables if hasattr(t, "curves")), None)
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(curves), figsize=(5.2 * len(curves), 4), squeeze=False)
    for axis, (title, lines) in zip(axes[0], curves.items(), strict=True):
        for name, points in lines.items():
            xs, ys = zip(*points, strict=True)
            axis.plot(xs, ys, marker="o", label=name)
        axis.set_xscale("log")
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("tasks" if title.startswith("async") else "threads")
        axis.set_ylabel("hits/s")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return True
