"""Hit-path cost: a decorated call on a cached key vs the raw redis-py call it
replaces, on the same client, interleaved in rounds so drift hits both alike.

    python -m benchmarks.hit_path [--rounds 40] [--calls 250] [--url redis://...]

Prints median and p99 per call and the ratio of medians (ours / raw).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
import redis
import redis.asyncio

from cached_aside import CacheEngine, cache_aside

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


def measure_sync(
    contenders: dict[str, Callable[[], Any]], rounds: int, calls: int
) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    order = list(contenders.items())
    for round_number in range(rounds):
        for name, call in order if round_number % 2 else reversed(order):
            sink = samples[name]
            for _ in range(calls):
                started = time.perf_counter_ns()
                call()
                sink.append((time.perf_counter_ns() - started) / 1000.0)
    return samples


async def measure_async(
    contenders: dict[str, Callable[[], Awaitable[Any]]], rounds: int, calls: int
) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    order = list(contenders.items())
    for round_number in range(rounds):
        for name, call in order if round_number % 2 else reversed(order):
            sink = samples[name]
            for _ in range(calls):
                started = time.perf_counter_ns()
                await call()
                sink.append((time.perf_counter_ns() - started) / 1000.0)
    return samples


def check_hits_only(loads: int, expected_loads: int) -> None:
    """A hit-path figure is only honest if the timed calls never loaded."""
    if loads != expected_loads:
        raise SystemExit(f"expected {expected_loads} loads (warm-up only), saw {loads}")


def report(title: str, samples: dict[str, list[float]], baseline: str) -> list[dict[str, Any]]:
    base = statistics.median(samples[baseline])
    rows = []
    print(f"\n{title}")
    print(f"  {'contender':<34}{'median µs':>11}{'p99 µs':>10}{'ratio':>8}")
    for name, values in samples.items():
        values = sorted(values)
        median = statistics.median(values)
        p99 = values[int(len(values) * 0.99) - 1]
        rows.append(
            {
                "scenario": title,
                "contender": name,
                "median_us": round(median, 2),
                "p99_us": round(p99, 2),
                "ratio": round(median / base, 3),
            }
        )
        print(f"  {name:<34}{median:>11.1f}{p99:>10.1f}{median / base:>8.3f}")
    return rows


def run(url: str, rounds: int, calls: int) -> list[dict[str, Any]]:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(url)
    engine = CacheEngine(client, prefix=prefix)

    @cache_aside(key="product:<id>", ttl=300, as_hash=True, engine=engine)
    def get_product(id: str) -> dict[str, str]:
        return dict(RECORD)

    @cache_aside(key="packed:<id>", ttl=300, engine=engine)
    def get_packed(id: str) -> dict[str, str]:
        return dict(RECORD)

    get_product("p-001")
    get_packed("p-001")
    hash_key, packed_key = get_product.key("p-001"), get_packed.key("p-001")
    rows = report(
        "sync hit, hash mode",
        measure_sync(
            {
                "raw redis-py HGETALL": lambda: client.hgetall(hash_key),
                "cached_aside (as_hash=True)": lambda: get_product("p-001"),
            },
            rounds,
            calls,
        ),
        "raw redis-py HGETALL",
    )
    rows += report(
        "sync hit, msgpack mode",
        measure_sync(
            {
                "raw redis-py GET + unpackb": lambda: msgpack.unpackb(client.get(packed_key)),
                "cached_aside (msgpack)": lambda: get_packed("p-001"),
            },
            rounds,
            calls,
        ),
        "raw redis-py GET + unpackb",
    )
    check_hits_only(get_product.stats().loads + get_packed.stats().loads, expected_loads=2)
    rows += asyncio.run(run_async(url, prefix, rounds, calls, hash_key, packed_key))
    client.unlink(hash_key, packed_key)
    client.close()
    return rows


async def run_async(
    url: str, prefix: str, rounds: int, calls: int, hash_key: str, packed_key: str
) -> list[dict[str, Any]]:
    client = redis.asyncio.Redis.from_url(url)
    engine = CacheEngine(async_client=client, prefix=prefix)

    @cache_aside(key="product:<id>", ttl=300, as_hash=True, engine=engine)
    async def get_product(id: str) -> dict[str, str]:
        return dict(RECORD)

    @cache_aside(key="packed:<id>", ttl=300, engine=engine)
    async def get_packed(id: str) -> dict[str, str]:
        return dict(RECORD)

    async def raw_packed() -> Any:
        return msgpack.unpackb(await client.get(packed_key))

    rows = report(
        "async hit, hash mode",
        await measure_async(
            {
                "raw redis.asyncio HGETALL": lambda: client.hgetall(hash_key),
                "cached_aside (as_hash=True)": lambda: get_product("p-001"),
            },
            rounds,
            calls,
        ),
        "raw redis.asyncio HGETALL",
    )
    rows += report(
        "async hit, msgpack mode",
        await measure_async(
            {
                "raw redis.asyncio GET + unpackb": raw_packed,
                "cached_aside (msgpack)": lambda: get_packed("p-001"),
            },
            rounds,
            calls,
        ),
        "raw redis.asyncio GET + unpackb",
    )
    check_hits_only(get_product.stats().loads + get_packed.stats().loads, expected_loads=0)
    await client.aclose()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--calls", type=int, default=250)
    args = parser.parse_args()
    print(f"hit path on {args.url}: {args.rounds} rounds x {args.calls} calls per contender")
    run(args.url, args.rounds, args.calls)


if __name__ == "__main__":
    main()
