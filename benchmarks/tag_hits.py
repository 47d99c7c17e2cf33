"""What tags cost on a hit: a function without tags, with one tag and with two, next
to the raw redis-py GET, sync and async. A tagged hit reads the entry and its tags'
versions in one pipeline (one round trip), and checks the entry's stamp.

The `tag_hits` section of `python -m benchmarks`; standalone:

    python -m benchmarks.tag_hits [--url redis://127.0.0.1:6379/0] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import uuid
from typing import Any

import msgpack
import redis
import redis.asyncio

from cached_aside import CacheEngine, cache_aside

from .runner import Settings, Table, console, latency_table, measure_async, measure_sync, show

RECORD = {"id": "p-001", "name": "Fountain pen", "price": "24.50", "stock": "41"}


def _functions(engine: CacheEngine, make: Any) -> dict[str, Any]:
    return {
        "cached_aside, no tags": cache_aside(key="plain:<id>", ttl=300, engine=engine)(make()),
        "cached_aside, 1 tag": cache_aside(
            key="one:<id>", ttl=300, engine=engine, tags=("shop:<id>",)
        )(make()),
        "cached_aside, 2 tags": cache_aside(
            key="two:<id>", ttl=300, engine=engine, tags=("shop:<id>", "catalog")
        )(make()),
    }


def run_sync(settings: Settings, prefix: str) -> Table:
    client = redis.Redis.from_url(settings.url)
    engine = CacheEngine.from_url(settings.url, prefix=prefix)

    def make() -> Any:
        return lambda id: dict(RECORD)

    functions = _functions(engine, make)
    for function in functions.values():
        function("p-001")
    raw_key = functions["cached_aside, no tags"].key("p-001")
    contenders = {"raw redis-py GET + unpackb": lambda: msgpack.unpackb(client.get(raw_key))}
    for name, function in functions.items():
        contenders[name] = lambda function=function: function("p-001")
    for name, function in functions.items():
        assert function.stats().loads == 1, f"{name} loaded while timing hits"
    table = latency_table(
        "tagged sync hit, msgpack record",
        measure_sync(settings, contenders, "sync tag hits"),
        "raw redis-py GET + unpackb",
    )
    engine.invalidate_prefix()
    engine.close()
    client.close()
    return table


async def run_async(settings: Settings, prefix: str) -> Table:
    client = redis.asyncio.Redis.from_url(settings.url)
    engine = CacheEngine.from_url(settings.url, prefix=prefix)

    def make() -> Any:
        async def load(id: str) -> dict[str, str]:
            return dict(RECORD)

        return load

    functions = _functions(engine, make)
    for function in functions.values():
        await function("p-001")
    raw_key = functions["cached_aside, no tags"].key("p-001")

    async def raw() -> Any:
        return msgpack.unpackb(await client.get(raw_key))

    contenders: dict[str, Any] = {"raw redis.asyncio GET + unpackb": raw}
    for name, function in functions.items():
        contenders[name] = lambda function=function: function("p-001")
    table = latency_table(
        "tagged async hit, msgpack record",
        await measure_async(settings, contenders, "async tag hits"),
        "raw redis.asyncio GET + unpackb",
    )
    await engine.ainvalidate_prefix()
    await engine.aclose()
    await client.aclose()
    return table


def run(settings: Settings) -> list[Table]:
    """The section: the sync and the async table, each under a key prefix of its own."""
    prefix = f"bench-tags-{uuid.uuid4().hex[:8]}"
    return [run_sync(settings, prefix), asyncio.run(run_async(settings, prefix + "-async"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=Settings.url)
    parser.add_argument("--quick", action="store_true")
    arguments = parser.parse_args()
    settings = Settings(url=arguments.url, quick=arguments.quick)
    if arguments.quick:
        settings.rounds, settings.calls = 5, 100
    out = console()
    for table in run(settings):
        show(out, table)


if __name__ == "__main__":
    main()
