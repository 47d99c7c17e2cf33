"""Would sharing round trips across threads pay? An experiment, not library code.

cached_aside's asyncio calls of one loop share a connection and go out together; its
threads each hold a connection of their own. This measures a prototype that shares
one redis-py connection across threads the same way: a thread finding no flush in
progress becomes the flusher, sends every queued GET in one write, reads the replies
in order and hands each to its thread. The rule for adopting it (issue 14): at least
2x cached_aside's hits/s at 32 threads on distinct keys, without making a lone
thread's hit more than 3% slower.

Contenders, threads 1, 8, 32 on distinct keys: the raw redis-py call; cached_aside as
it is; the bare prototype (a GET packed beforehand, then unpackb); its twin, the same
GET on a connection each thread holds (so the two differ only in the sharing); and
cached_aside with the prototype put in place of its per-thread connections, which is
what adopting it would give and what the verdict is judged on. A lone thread's
latency is measured apart, one call at a time in interleaved rounds.

    python -m benchmarks --only thread_sharing
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import msgpack
import redis

from cached_aside import CacheEngine, cache_aside

from .hit_path import RECORD
from .runner import Settings, Table, latency_table, measure_sync, threads_level

RAW = "raw redis-py, default pool"
CACHED = "cached_aside (a connection per thread)"
SHARED = "prototype: threads share round trips"
TWIN = "prototype's twin: a held connection per thread"
PATCHED = "cached_aside + the prototype (patched in)"
THREADS = (1, 8, 32)
GAIN_NEEDED = 2.0  # x cached_aside's hits/s at the most threads
LONE_SLOWER_ALLOWED = 0.03  # a lone thread's median hit latency


class SharedConnection:
    """One redis-py Connection whose round trips threads share.

    A caller finding no flush in progress becomes the flusher: it sends its own
    command and everything queued in one write, reads the replies in order (its own
    first), hands each to its waiting thread, and goes on until nothing is queued.
    A caller finding a flush in progress queues its command with a held lock, which
    the flusher releases when the reply is in. A failure fails what the flush
    carried and what was queued (the connection reconnects on the next write).
    """

    def __init__(self, url: str) -> None:
        self._pool = redis.ConnectionPool.from_url(url)
        self._connection = self._pool.get_connection()
        self._lock = threading.Lock()
        # [packed command, reply, error, lock the waiter blocks on]
        self._queued: list[list[Any]] = []
        self._flushing = False
        self.flushes = 0  # batches sent: proof that calls came this way

    def pack(self, *args: Any) -> bytes:
        """A command packed once, to be sent as is on every call."""
        return b"".join(self._connection.pack_command(*args))

    def call(self, packed: bytes) -> Any:
        with self._lock:
            if self._flushing:
                waiting = threading.Lock()
                waiting.acquire()
                slot = [packed, None, None, waiting]
                self._queued.append(slot)
            else:
                self._flushing = True
                slot = None
        if slot is None:
            return self._flush(packed)
        waiting.acquire()  # released by the flusher once the reply is in
        if slot[2] is not None:
            raise slot[2]
        return slot[1]

    def _flush(self, own: bytes) -> Any:
        self.flushes += 1
        connection = self._connection
        batch: list[list[Any]] = []
        reply: Any = None
        try:
            with self._lock:
                batch, self._queued = self._queued, []
            # One write for the lot: redis-py sends each list item with its own
            # sendall, so the commands are joined first.
            connection.send_packed_command([b"".join([own, *(slot[0] for slot in batch)])])
            reply = connection.read_response()
            while True:
                for slot in batch:
                    slot[1] = connection.read_response()
                    slot[3].release()
                with self._lock:
                    batch, self._queued = self._queued, []
                    if not batch:
                        self._flushing = False
                        return reply
                connection.send_packed_command([b"".join(slot[0] for slot in batch)])
        except BaseException as exc:
            connection.disconnect()
            with self._lock:
                lost, self._queued = batch + self._queued, []
                self._flushing = False
            for slot in lost:
                if slot[3].locked():
                    slot[2] = exc
                    slot[3].release()
            raise

    def close(self) -> None:
        self._pool.release(self._connection)
        self._pool.disconnect()


class _Held:
    """A thread's connection; back to its pool when the thread ends (its local goes)."""

    __slots__ = ("connection", "pool")

    def __init__(self, pool: redis.ConnectionPool) -> None:
        self.pool, self.connection = pool, pool.get_connection()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit: nobody to tell
            self.pool.release(self.connection)


class HeldConnection:
    """The prototype's twin without the sharing: each thread sends the same packed
    GET on a connection of its own, held between calls (as cached_aside's threads
    do). Prototype against twin isolates what sharing costs and gives."""

    def __init__(self, url: str) -> None:
        self._pool = redis.ConnectionPool.from_url(url)
        self._local = threading.local()

    def call(self, packed: bytes) -> Any:
        held = getattr(self._local, "held", None)
        if held is None:
            held = self._local.held = _Held(self._pool)
        connection = held.connection
        connection.send_packed_command([packed])
        return connection.read_response()

    def close(self) -> None:
        self._pool.disconnect()


class SharingHeld:
    """The prototype in cached_aside's own hit path: stands in for the engine's
    per-thread held connections (the object its sync driver sends a hit's command
    through), so a hit runs all of the library's code and only the round trip is
    shared. Set on one engine of this experiment, through a private attribute: the
    library itself is unchanged. Batches (call_many) take the client's way."""

    def __init__(self, shared: SharedConnection) -> None:
        self._shared = shared
        self._packed: dict[tuple[Any, ...], bytes] = {}

    def call(self, args: tuple[Any, ...]) -> tuple[bool, Any]:
        packed = self._packed.get(args)
        if packed is None:
            packed = self._packed[args] = self._shared.pack(*args)
        return True, self._shared.call(packed)

    def call_many(
        self, commands: list[tuple[Any, ...]], raise_error: bool = False
    ) -> tuple[bool, list[Any]]:
        return False, []


def run(settings: Settings) -> list[Table]:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    rounds = 1 if settings.quick else 5
    seconds = settings.timed(1.0, 0.25)
    raw = redis.Redis.from_url(settings.url)  # redis-py's defaults
    engine = CacheEngine.from_url(settings.url, prefix=prefix)
    get = cache_aside(key="s:<key>", ttl=600, engine=engine)(lambda key: dict(RECORD))
    shared = SharedConnection(settings.url)
    twin = HeldConnection(settings.url)
    patched_engine = CacheEngine.from_url(settings.url, prefix=prefix)
    patched_shared = SharedConnection(settings.url)
    patched_engine.client()  # makes its sync side, whose held connections are swapped:
    patched_engine.sides.sync_side().held = SharingHeld(patched_shared)  # type: ignore[assignment]
    patched = cache_aside(key="s:<key>", ttl=600, engine=patched_engine)(lambda key: dict(RECORD))
    packed: dict[str, bytes] = {}
    try:
        packed_record = msgpack.packb(RECORD)
        for n in range(max(THREADS)):
            key = f"k{n}"
            get(key)  # a miss here; every timed call is a hit
            raw.set(f"{prefix}:raw:{key}", packed_record, ex=600)
            packed[key] = shared.pack("GET", f"{prefix}:raw:{key}")
        calls: dict[str, Callable[[str], Any]] = {
            RAW: lambda key: msgpack.unpackb(raw.get(f"{prefix}:raw:{key}")),
            CACHED: get,
            SHARED: lambda key: msgpack.unpackb(shared.call(packed[key])),
            TWIN: lambda key: msgpack.unpackb(twin.call(packed[key])),
            PATCHED: patched,
        }
        for key in packed:
            if patched(key) != RECORD or patched.lookup(key).source.value != "cache":
                raise SystemExit(f"the patched-in prototype did not serve {key} from Redis")
        if not patched_shared.flushes:
            raise SystemExit("cached_aside's hits did not go through the patched-in prototype")
        table = throughput(settings, calls, rounds, seconds)
        lone = latency_table(
            "sharing round trips: a lone thread, one call at a time",
            measure_sync(
                settings,
                {name: functools.partial(call, "k0") for name, call in calls.items()},
                "a lone thread",
            ),
            CACHED,
        )
    finally:
        for key in list(raw.scan_iter(match=f"{prefix}:*", count=1000)):
            raw.delete(key)
        raw.close()
        shared.close()
        twin.close()
        engine.close()
        patched_engine.close()
        patched_shared.close()
    table.notes = [
        f"median of {rounds} interleaved run(s) of {seconds:g} s; ratio to raw redis-py "
        "(redis.Redis.from_url(url)); thread n reads its own key k<n>",
        "the prototype and its twin send a GET packed beforehand and unpackb the reply "
        "(no key rendering, no cache-aside checks); the twin is the prototype without "
        "the sharing",
        *table.notes,
    ]
    lone.notes = [
        f"{settings.rounds} interleaved rounds of {settings.calls} calls; ratio to "
        "cached_aside; in the table above, 1 thread is the same contenders looping"
    ]
    table.notes += verdict(table, lone)
    return [table, lone]


def throughput(
    settings: Settings, calls: dict[str, Callable[[str], Any]], rounds: int, seconds: float
) -> Table:
    table = Table(
        "sharing round trips across threads (sync, distinct keys)",
        ["contender", "threads", "hits/s", "p50 µs", "p99 µs", "errors", "ratio"],
    )
    task = (
        settings.progress.add_task("threads", total=len(THREADS) * rounds * len(calls))
        if settings.progress
        else None
    )
    for threads in THREADS:
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in calls}
        for round_number in range(rounds):
            order = list(calls.items())
            for name, call in order if round_number % 2 == 0 else order[::-1]:
                results[name].append(threads_level(call, threads, seconds))
                if task is not None and settings.progress:
                    settings.progress.advance(task)
        base = statistics.median(r["hits_per_s"] for r in results[RAW])
        for name, runs in results.items():
            rate = statistics.median(r["hits_per_s"] for r in runs)
            errors = Counter(kind for r in runs for kind in r["errors"])
            if errors:
                table.notes.append(
                    f"errors, {name}, {threads} threads: "
                    + ", ".join(f"{count:,} {kind}" for kind, count in errors.most_common())
                )
            table.rows.append(
                [
                    name,
                    threads,
                    round(rate),
                    round(statistics.median(r["p50"] for r in runs), 1),
                    round(statistics.median(r["p99"] for r in runs), 1),
                    errors.total(),
                    round(rate / base, 3),
                ]
            )
    return table


def verdict(table: Table, lone: Table) -> list[str]:
    """The adopt line, by issue 14's rule (hits/s at the most threads, and a lone
    thread's median hit latency, against cached_aside today) applied to the
    prototype patched into cached_aside's hit path; with the figures it rests on,
    and the bare prototype against cached_aside and against its twin."""
    most = max(THREADS)
    rates = {row[0]: row[2] for row in table.rows if row[1] == most}
    latency = {row[0]: (row[1], row[2]) for row in lone.rows}

    def compare(ours: str, other: str) -> tuple[float, float, float]:
        (p50, p99), (their_p50, their_p99) = latency[ours], latency[other]
        return rates[ours] / rates[other], p50 / their_p50 - 1, p99 / their_p99 - 1

    def text(ours: str, other: str) -> str:
        gain, p50, p99 = compare(ours, other)
        return (
            f"{gain:.2f}x at {most} threads; a lone thread p50 {100 * p50:+.1f}%, "
            f"p99 {100 * p99:+.1f}%"
        )

    gain, slower, _ = compare(PATCHED, CACHED)
    adopt = gain >= GAIN_NEEDED and slower <= LONE_SLOWER_ALLOWED
    return [
        f"the bare prototype against cached_aside: {text(SHARED, CACHED)} (it skips the "
        "library's per-hit work, so it flatters the sharing)",
        f"the sharing alone (the bare prototype against its twin): {text(SHARED, TWIN)}",
        f"cached_aside with the prototype against cached_aside: {text(PATCHED, CACHED)}",
        f"the rule: >= {GAIN_NEEDED:g}x cached_aside's hits/s at {most} threads, a lone "
        f"thread's median no more than {100 * LONE_SLOWER_ALLOWED:g}% slower (lone-thread "
        "figures from the table below); judged on cached_aside with the prototype",
        f"adopt: {'yes' if adopt else 'no'} ({gain:.2f}× at {most} threads, "  # noqa: RUF001
        f"lone-thread latency {100 * slower:+.1f}%)",
    ]
