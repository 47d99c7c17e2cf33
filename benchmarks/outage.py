"""What a hung Redis costs a caller: `python -m benchmarks.outage [--calls N] [--json]`.

Starts a redis-server of its own (needs `redis-server` on PATH), warms an engine
built from its URL (socket_timeout 0.25 s, the default), pauses the server with
SIGSTOP, and times each of the first calls, sync and async, each on a key of its
own: a call should wait out one socket timeout, until the breaker opens (after
`breaker_failures` of them) and the rest skip Redis. The server is resumed and
stopped by PID at the end.

The `outage` section of `python -m benchmarks` tables the same measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from typing import Any

import redis

import cached_aside
from cached_aside import CacheEngine, cache_aside
from tests.servers import RedisProcess

from .runner import Settings, Table

SOCKET_TIMEOUT = 0.25


def measure(calls: int) -> dict[str, Any]:
    """Seconds per call, in order, for the first `calls` sync and async calls on a
    paused server, and what the breaker did."""
    server = RedisProcess().start()
    try:
        results: dict[str, Any] = {}
        for mode in ("sync", "async"):
            engine = CacheEngine.from_url(server.url, socket_timeout=SOCKET_TIMEOUT)
            results[mode] = (_sync if mode == "sync" else _async)(engine, server, calls)
            server.resume()
        return results
    finally:
        server.stop()


def _sync(engine: CacheEngine, server: RedisProcess, calls: int) -> dict[str, Any]:
    @cache_aside(key="outage:<id>", ttl=30, engine=engine)
    def load(id: str) -> str:
        return id

    for i in range(3):  # warm: the client, its pool, this thread's held connection
        load(f"warm{i}")
    server.pause()
    seconds = []
    for i in range(calls):
        started = time.perf_counter()
        assert load(f"cold{i}") == f"cold{i}"
        seconds.append(time.perf_counter() - started)
    report = _report(seconds, engine)
    server.resume()
    engine.close()
    return report


def _async(engine: CacheEngine, server: RedisProcess, calls: int) -> dict[str, Any]:
    @cache_aside(key="outage:<id>", ttl=30, engine=engine)
    async def load(id: str) -> str:
        return id

    async def run() -> dict[str, Any]:
        for i in range(3):
            await load(f"warm{i}")
        server.pause()
        seconds = []
        for i in range(calls):
            started = time.perf_counter()
            assert await load(f"acold{i}") == f"acold{i}"
            seconds.append(time.perf_counter() - started)
        report = _report(seconds, engine)
        server.resume()
        await engine.aclose()
        return report

    return asyncio.run(run())


def _report(seconds: list[float], engine: CacheEngine) -> dict[str, Any]:
    threshold = engine.breaker.threshold
    paying = seconds[:threshold]
    return {
        "per_call_s": [round(s, 3) for s in seconds],
        "until_breaker_opens_median_s": round(statistics.median(paying), 3),
        "after_breaker_opens_max_s": round(max(seconds[threshold:], default=0.0), 4),
        "breaker_opened": engine.breaker.opened,
        "threshold": threshold,
        "errors": engine.stats().errors,
    }


def run(settings: Settings) -> list[Table]:
    """The section: the first calls on a paused server, sync and async, in one table."""
    calls = 6
    results = measure(calls)
    table = Table(
        f"hung server: the first {calls} calls on a paused redis-server",
        [
            "mode",
            "calls until the breaker opens",
            "median s until it opens",
            "max ms after it opens",
            "socket timeouts per paying call",
            "breaker opened",
        ],
    )
    for mode in ("sync", "async"):
        report = results[mode]
        paying = report["per_call_s"][: report["threshold"]]
        table.rows.append(
            [
                mode,
                report["threshold"],
                report["until_breaker_opens_median_s"],
                round(report["after_breaker_opens_max_s"] * 1000, 2),
                round(statistics.median(paying) / SOCKET_TIMEOUT, 2),
                report["breaker_opened"],
            ]
        )
    table.notes = [
        f"socket_timeout {SOCKET_TIMEOUT} s (the default of engines built from a URL); "
        "SIGSTOP after a warm-up, each call on a key of its own"
    ]
    return [table]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.outage")
    parser.add_argument("--calls", type=int, default=6)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    results = measure(args.calls)
    results["machine"] = {
        "python": platform.python_version(),
        "redis_py": redis.__version__,
        "cached_aside": getattr(cached_aside, "__version__", "?"),
        "socket_timeout_s": SOCKET_TIMEOUT,
    }
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for mode in ("sync", "async"):
        report = results[mode]
        print(
            f"{mode}: per call {report['per_call_s']} s; median until the breaker opens "
            f"{report['until_breaker_opens_median_s']} s, then at most "
            f"{report['after_breaker_opens_max_s']} s; breaker opened "
            f"{report['breaker_opened']}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
