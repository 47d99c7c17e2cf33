"""Would sharing round trips across threads pay? An experiment, not library code.

cached_aside's asyncio calls of one loop share a connection and go out together; its
threads each hold a connection of their own. This measures a prototype that shares
one connection across threads the same way: a thread finding no write in progress
becomes the flusher, sends every queued GET in one write, reads the replies in order
and hands each to its thread. The rule for adopting it: at least 2x cached_aside's
hits/s at 32 threads on distinct keys, without making a lone thread's hit more than
3% slower.

    python -m benchmarks --only thread_sharing
"""

from __future__ import annotations

import statistics
import threading
import uuid
from typing import Any

import msgpack
import redis

from cached_aside import CacheEngine, cache_aside

from .concurrency import _threads_level
from .hit_path import RECORD
from .runner import Settings, Table


class _Slot:
    __slots__ = ("done", "reply")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.reply: Any = None


class SharedConnection:
    """One redis-py connection whose round trips threads share."""

    def __init__(self, url: str) -> None:
        self._pool = redis.ConnectionPool.from_url(url)
        self._connection = self._pool.get_connection()
        self._lock = threading.Lock()
        self._queued: list[tuple[list[bytes], _Slot]] = []
        self._flushing = False

    def call(self, packed: list[bytes]) -> Any:
        slot = _Slot()
        with self._lock:
            self._queued.append((packed, slot))
            leading = not self._flushing
            self._flushing = True
        if not leading:
            slot.done.wait()
            return slot.reply
        while True:  # the flusher: send what is queued, read it back, until none is
            with self._lock:
                batch, self._queued = self._queued, []
                if not batch:
                    self._flushing = False
                    break
            self._connection.send_packed_command([part for parts, _ in batch for part in parts])
            for _, waiting in batch:
                waiting.reply = self._connection.read_response()
                if waiting is not slot:
                    waiting.done.set()
        return slot.reply

    def close(self) -> None:
        self._pool.release(self._connection)
        self._pool.disconnect()


def run(settings: Settings) -> list[Table]:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    levels = (1, 8) if settings.quick else (1, 8, 32)
    rounds = 1 if settings.quick else 3
    seconds = 0.3 if settings.quick else 1.0
    raw = redis.Redis.from_url(settings.url)
    engine = CacheEngine.from_url(settings.url, prefix=prefix)
    get = cache_aside(key="s:<key>", ttl=600, engine=engine)(lambda key: dict(RECORD))
    shared = SharedConnection(settings.url)
    packed_record = msgpack.packb(RECORD)
    packed: dict[str, list[bytes]] = {}
    for n in range(max(levels)):
        key = f"k{n}"
        get(key)
        raw.set(f"{prefix}:raw:{key}", packed_record, ex=600)
        packed[key] = shared._connection.pack_command("GET", f"{prefix}:raw:{key}")
    calls = {
        "raw redis-py, default pool": lambda key: msgpack.unpackb(raw.get(f"{prefix}:raw:{key}")),
        "cached_aside (a connection per thread)": get,
        "prototype: threads share round trips": lambda key: msgpack.unpackb(
            shared.call(packed[key])
        ),
    }
    table = Table(
        "sharing round trips across threads (sync, distinct keys)",
        ["contender", "threads", "hits/s", "p50 µs", "p99 µs", "errors", "ratio"],
    )
    rates: dict[tuple[str, int], float] = {}
    lone: dict[str, float] = {}
    try:
        for threads in levels:
            results: dict[str, list[dict[str, Any]]] = {name: [] for name in calls}
            for round_number in range(rounds):
                order = list(calls.items())
                for name, call in order if round_number % 2 == 0 else order[::-1]:
                    results[name].append(_threads_level(call, threads, seconds))
            base = statistics.median(r["hits_per_s"] for r in results["raw redis-py, default pool"])
            for name, runs in results.items():
                rate = statistics.median(r["hits_per_s"] for r in runs)
                rates[(name, threads)] = rate
                p50 = statistics.median(r["p50"] for r in runs)
                if threads == 1:
                    lone[name] = p50
                table.rows.append(
                    [
                        name,
                        threads,
                        round(rate),
                        round(p50, 1),
                        round(statistics.median(r["p99"] for r in runs), 1),
                        sum(r["errors"] for r in runs),
                        round(rate / base, 3),
                    ]
                )
    finally:
        for key in list(raw.scan_iter(match=f"{prefix}:*", count=1000)):
            raw.delete(key)
        raw.close()
        shared.close()
        engine.close()
    most = max(levels)
    gain = (
        rates[("prototype: threads share round trips", most)]
        / rates[("cached_aside (a connection per thread)", most)]
    )
    slower = (
        lone["prototype: threads share round trips"]
        / lone["cached_aside (a connection per thread)"]
    )
    adopt = gain >= 2 and slower <= 1.03
    table.notes = [
        f"median of {rounds} interleaved runs of {seconds:g} s; ratio to raw redis-py",
        f"adopt: {'yes' if adopt else 'no'} ({gain:.2f}x cached_aside at {most} threads, "
        f"lone-thread median {100 * (slower - 1):+.1f}%; the rule: >= 2x and <= +3%)",
    ]
    return [table]
