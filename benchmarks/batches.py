"""Batches: many() of 100 cached keys against 100 sequential calls, on one Redis and
on a local three-master cluster; and invalidate_all() over 100k entries, with the
latency another client sees from Redis meanwhile (SCAN + UNLINK must not block it).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis

from cached_aside import CacheEngine, cache_aside
from tests.servers import REDIS_SERVER, RedisClusterProcesses

from .hit_path import RECORD
from .runner import Settings, Table, latency_table, measure_async, measure_sync, percentile

BATCH = 100
TARGET_RATIO = 0.05  # issue 27: many() of 100 at most this much of 100 single calls' time


@contextmanager
def local_cluster() -> Iterator[str | None]:
    """A three-master cluster of our own (redis+cluster:// URL), or None without
    redis-server."""
    if REDIS_SERVER is None:
        yield None
        return
    cluster = RedisClusterProcesses(masters=3).start()
    try:
        yield cluster.url.replace("redis://", "redis+cluster://")
    finally:
        cluster.stop()


def _functions(engine: CacheEngine) -> tuple[Any, Any]:
    def fill(ids: list[str]) -> list[dict[str, Any]]:
        return [dict(RECORD, id=id) for id in ids]

    @cache_aside(key="item:<id>", ttl=600, engine=engine, batch_loader=fill)
    def item(id: str) -> dict[str, Any]:
        return dict(RECORD, id=id)

    async def fill_async(ids: list[str]) -> list[dict[str, Any]]:
        return fill(ids)

    @cache_aside(key="item:<id>", ttl=600, engine=engine, batch_loader=fill_async)
    async def item_async(id: str) -> dict[str, Any]:
        return dict(RECORD, id=id)

    return item, item_async


def many_vs_sequential(settings: Settings, url: str, where: str) -> list[Table]:
    engine = CacheEngine.from_url(url, prefix=f"bench-{uuid.uuid4().hex[:8]}")
    item, item_async = _functions(engine)
    ids = [f"p-{n:03d}" for n in range(BATCH)]
    item.many(ids)
    rounds = Settings(url, settings.quick, settings.rounds, max(3, settings.calls // 20))
    rounds.progress = settings.progress
    sync = measure_sync(
        rounds,
        {
            f"{BATCH} sequential calls": lambda: [item(id) for id in ids],
            f"many() of {BATCH}": lambda: item.many(ids),
        },
        f"many() sync, {where}",
    )

    async def measure() -> dict[str, list[float]]:
        async def sequential() -> None:
            for id in ids:
                await item_async(id)

        async def batched() -> None:
            await item_async.many(ids)

        samples = await measure_async(
            rounds,
            {f"{BATCH} sequential awaits": sequential, f"await many() of {BATCH}": batched},
            f"many() async, {where}",
        )
        await engine.aclose()
        return samples

    async_samples = asyncio.run(measure())
    engine.invalidate_prefix()
    engine.close()
    tables = [
        latency_table(f"{BATCH} cached keys, sync, {where}", sync, f"{BATCH} sequential calls"),
        latency_table(
            f"{BATCH} cached keys, async, {where}", async_samples, f"{BATCH} sequential awaits"
        ),
    ]
    for table in tables:
        table.samples = {}  # per-batch times do not belong on the per-call chart
        table.notes.append(target_note(table))
    return tables


def target_note(table: Table) -> str:
    """Issue 27's target, judged on the table's ratio column (medians, same run)."""
    (ratio,) = [row[3] for row in table.rows if "many()" in row[0]]
    verdict = "met" if ratio <= TARGET_RATIO else f"missed by {ratio / TARGET_RATIO:.2f}x"
    return (
        f"target: many() of {BATCH} <= {TARGET_RATIO}x {BATCH} single calls: {ratio:.3f}, {verdict}"
    )


def probe(url: str) -> None:
    """Worker: PING every millisecond until stdin closes, then print the round trips
    in ms as JSON. A process of its own, so our GIL is not what it measures."""
    client = redis.Redis.from_url(url)
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    client.ping()
    print("ready", flush=True)
    latencies: list[float] = []
    while True:  # at least one ping, however short the measured work
        started = time.perf_counter()
        client.ping()
        latencies.append((time.perf_counter() - started) * 1000.0)
        if stop.is_set():
            break
        time.sleep(0.001)
    print(json.dumps(latencies))


@contextmanager
def pinging(url: str) -> Iterator[list[float]]:
    """Runs `probe` in a subprocess for the duration; the list fills in at the end."""
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.batches", "--probe", url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    latencies: list[float] = []
    assert process.stdout is not None
    process.stdout.readline()  # "ready": connected, and pinging from now on
    try:
        yield latencies
    finally:
        out, _ = process.communicate("", timeout=30)
        latencies.extend(json.loads(out))


def invalidate_all_timing(url: str, entries: int) -> list[Any]:
    """[entries, fill s, invalidate_all s, entries/s, ping p99 ms, ping max ms]"""
    engine = CacheEngine.from_url(url, prefix=f"bench-{uuid.uuid4().hex[:8]}")
    item, _ = _functions(engine)
    started = time.perf_counter()
    for first in range(0, entries, 1000):
        item.many([f"p-{n}" for n in range(first, min(entries, first + 1000))])
    filled = time.perf_counter() - started
    # On a cluster: one master (the one the URL names) answering the probe.
    with pinging(url.replace("redis+cluster://", "redis://")) as pings:
        started = time.perf_counter()
        deleted = item.invalidate_all().deleted
        seconds = time.perf_counter() - started
    engine.close()
    assert deleted == entries, (deleted, entries)
    return [
        entries,
        round(filled, 2),
        round(seconds, 2),
        round(entries / seconds),
        round(percentile(pings, 0.99), 2),
        round(max(pings), 2),
        round(statistics.median(pings), 2),
    ]


def run(settings: Settings) -> list[Table]:
    entries = settings.scaled(100_000, 10_000)
    tables = many_vs_sequential(settings, settings.url, "one Redis")
    bulk = Table(
        "invalidate_all()",
        [
            "where",
            "entries",
            "fill s (many + batch_loader)",
            "invalidate_all s",
            "entries/s",
            "PING p99 ms meanwhile",
            "PING max ms",
            "PING median ms",
        ],
    )
    bulk.rows.append(["one Redis", *invalidate_all_timing(settings.url, entries)])
    with local_cluster() as cluster_url:
        if cluster_url is None:
            bulk.notes.append("cluster rows skipped: redis-server is not on PATH")
        else:
            tables += many_vs_sequential(settings, cluster_url, "local cluster (3 masters)")
            bulk.rows.append(["local cluster", *invalidate_all_timing(cluster_url, entries)])
    bulk.notes.append(
        "PING: another process's round trip, every ms, while invalidate_all() ran (on a "
        "cluster, to one master): SCAN pages of 1000 and UNLINK pipelines leave Redis "
        "answering."
    )
    return [*tables, bulk]


if __name__ == "__main__":
    if sys.argv[1:2] == ["--probe"]:
        probe(sys.argv[2])
