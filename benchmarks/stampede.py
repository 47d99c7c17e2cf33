"""Stampede: N cold callers on one key with a 100 ms loader. Reports loader calls,
how long callers take beyond the loader (their latency minus the loader's), and how
soon after the loader returned each caller had its value (the wake-up).

    python -m benchmarks.stampede [--url redis://127.0.0.1:6379/0] [--trials 5]

Scenarios: 50 threads on one engine; 200 threads spread over 4 engines (callers on
the other engines are woken through Redis, as other processes would be); 500
asyncio tasks. Pools stay warm across trials, as in a running service; one warm-up
trial is not reported.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
import uuid
from typing import Any

from cached_aside import CacheEngine, cache_aside

from .runner import (
    Settings,
    Table,
    blocking_async_client,
    blocking_client,
    percentile,
    print_tables,
)

LOADER_SECONDS = 0.1


class ThreadStampede:
    """`callers` threads spread over `engines` engines, released by one barrier."""

    def __init__(self, url: str, prefix: str, callers: int, engines: int) -> None:
        self.callers = callers
        self.engines = [
            CacheEngine(blocking_client(url, max_connections=callers + 10), prefix=prefix)
            for _ in range(engines)
        ]
        self.loads = 0
        self.loaded_at = 0.0
        self.functions: list[Any] = []
        for engine in self.engines:

            @cache_aside(key="stampede:<id>", ttl=60, engine=engine)
            def load(id: str) -> str:
                time.sleep(LOADER_SECONDS)
                self.loads += 1
                self.loaded_at = time.perf_counter()
                return id

            self.functions.append(load)

    def run(self, key: str) -> dict[str, Any]:
        self.loads = 0
        extra: list[float] = []
        ended: list[float] = []
        barrier = threading.Barrier(self.callers)

        def call(i: int) -> None:
            barrier.wait()
            started = time.perf_counter()
            self.functions[i % len(self.functions)](key)
            ended.append(time.perf_counter())
            extra.append((ended[-1] - started - LOADER_SECONDS) * 1000)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(self.callers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wake = [(at - self.loaded_at) * 1000 for at in ended]
        return {"loads": self.loads, "extra_ms": extra, "wake_ms": wake}

    def close(self) -> None:
        for engine in self.engines:
            engine.client().close()


async def task_stampede(url: str, prefix: str, callers: int, trials: int) -> list[dict[str, Any]]:
    engine = CacheEngine(async_client=blocking_async_client(url), prefix=prefix)
    loads = 0
    loaded_at = 0.0

    @cache_aside(key="stampede:<id>", ttl=60, engine=engine)
    async def load(id: str) -> str:
        nonlocal loads, loaded_at
        loads += 1
        await asyncio.sleep(LOADER_SECONDS)
        loaded_at = time.perf_counter()
        return id

    async def call(key: str) -> tuple[float, float]:
        started = time.perf_counter()
        await load(key)
        return started, time.perf_counter()

    runs = []
    for trial in range(-1, trials):  # trial -1 warms up and is not reported
        loads = 0
        times = await asyncio.gather(*(call(f"t{trial}") for _ in range(callers)))
        if trial >= 0:
            extra = [(end - start - LOADER_SECONDS) * 1000 for start, end in times]
            wake = [(end - loaded_at) * 1000 for _, end in times]
            runs.append({"loads": loads, "extra_ms": extra, "wake_ms": wake})
    await engine.async_client().aclose()
    return runs


def run(url: str, trials: int) -> dict[str, list[dict[str, Any]]]:
    prefix = f"stampede-{uuid.uuid4().hex[:8]}"
    scenarios: dict[str, list[dict[str, Any]]] = {}
    for name, callers, engines in (
        ("50 threads, 1 engine", 50, 1),
        ("200 threads, 4 engines", 200, 4),
    ):
        stampede = ThreadStampede(url, f"{prefix}-{engines}", callers, engines)
        stampede.run("warm-up")
        scenarios[name] = [stampede.run(f"k{trial}") for trial in range(trials)]
        stampede.close()
    scenarios["500 asyncio tasks"] = asyncio.run(task_stampede(url, prefix, 500, trials))
    client = blocking_client(url)
    for key in client.scan_iter(match=f"{prefix}*"):
        client.delete(key)
    client.close()
    return scenarios


def scenario(settings: Settings) -> list[Table]:
    trials = settings.scaled(5, 2)
    table = Table(
        f"stampede: cold key, loader {LOADER_SECONDS * 1000:.0f} ms, {trials} trials",
        ["scenario", "loads/trial", "wake p50 ms", "wake p99 ms", "extra p50 ms", "extra p99 ms"],
    )
    for name, runs in run(settings.url, trials).items():
        extra = [value for one in runs for value in one["extra_ms"]]
        wake = [value for one in runs for value in one["wake_ms"]]
        loads = ",".join(str(n) for n in sorted({one["loads"] for one in runs}))
        table.rows.append(
            [
                name,
                loads,
                round(statistics.median(wake), 1),
                round(percentile(wake, 0.99), 1),
                round(statistics.median(extra), 1),
                round(percentile(extra, 0.99), 1),
            ]
        )
    table.notes = [
        "wake: how soon callers had the value once the loader returned",
        "extra: a caller's latency minus the loader's, including the burst's start, where "
        "threads queue for the GIL",
    ]
    return [table]


def main() -> None:
    parser = argparse.ArgumentParser(description="stampede: loader calls and waiter latency")
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print_tables(scenario(Settings(url=args.url, quick=args.quick)))


if __name__ == "__main__":
    main()
