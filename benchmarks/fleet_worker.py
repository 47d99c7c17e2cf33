"""One process of the fleet benchmark (`benchmarks/fleet.py` starts several): threads
reading keys through one near-cached function, 1% of them writing the primary and
invalidating; it prints what it saw as JSON. Optionally it reads only its own slice of
the keys, records its near-hit ratio over time, and cuts its invalidation listener off
Redis for a while (CLIENT KILL, then reconnects refused) to time the recovery.
Started by `benchmarks.fleet` through a forkserver that has imported this module
once (`serve`), so that eight processes do not each pay Python's and redis-py's imports.
"""

from __future__ import annotations

import bisect
import itertools
import mmap
import random
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import redis

from cached_aside import CacheEngine, NearCache, cache_aside
from tests.servers import dead_url

KEYS = 10_000
ZIPF_S = 1.1
WRITE_SHARE = 0.01
TRACKING_WINDOW_S = 0.05
SLOT = 8  # bytes per int64 / float64 in the shared arrays
# How often a worker that records its timeline notes its reads, near hits and state.
SAMPLE_S = 0.01
# How long a worker waits for its near cache to be tracking before it says "ready".
TRACKING_WAIT_S = 30.0


def zipf_sampler(n: int, s: float, seed: int) -> Callable[[], int]:
    """Draws ids 0..n-1 with probability proportional to 1 / (rank + 1) ** s."""
    weights = list(itertools.accumulate(1.0 / (rank + 1) ** s for rank in range(n)))
    total = weights[-1]
    rng = random.Random(seed)
    return lambda: bisect.bisect_left(weights, rng.random() * total)


def key_sampler(config: dict[str, Any], seed: int) -> Callable[[], int]:
    """Zipf over every key; or, with `slice` [first, count], Zipf over this process's
    own slice, and with `shared` [count, share] that share of draws Zipf over the
    hot keys 0..count-1 that every process reads."""
    if config.get("slice") is None:
        return zipf_sampler(KEYS, ZIPF_S, seed)
    first, count = config["slice"]
    hot, share = config.get("shared") or (0, 0.0)
    own = zipf_sampler(count, ZIPF_S, seed)
    shared = zipf_sampler(hot, ZIPF_S, seed + 1) if hot else own
    rng = random.Random(seed + 2)
    return lambda: shared() if rng.random() < share else first + own()


# The near cache's tracking modes (NearCache(tracking=...)), each run by the fleet.
TRACKING_MODES = ("bcast", "keys")


def message_counter(listener: Any) -> Callable[[], tuple[int, int]]:
    """(invalidation messages, keys they named) the listener received so far."""
    return lambda: (listener.messages, listener.keys_reported)


def listeners(listener: Any, url: str) -> list[tuple[redis.Redis, Any]]:
    """Each tracking connection's listener, with a client of its server to kill it
    through: the one of a server, or one per master of a cluster."""
    nodes = getattr(listener, "nodes", None)
    if nodes is None:
        return [(redis.Redis.from_url(url), listener)]
    found = []
    for address, node in nodes().items():
        host, _, port = address.rpartition(":")
        found.append((redis.Redis(host=host, port=int(port)), node))
    return found


def cut(listener: Any, url: str, seconds: float) -> None:
    """The listener's connection dies (CLIENT KILL ID) and every reconnection is
    refused (made to a port nothing listens on) for `seconds`; then its own way of
    connecting is back, and its next retry succeeds."""
    closed = dead_url()
    cut_off = listeners(listener, url)
    saved = [(node, node._connect) for _, node in cut_off]
    for node, _ in saved:
        node._connect = lambda: redis.connection.Connection.from_url(closed, protocol=2)
    try:
        for admin, node in cut_off:
            admin.client_kill_filter(_id=node.client_id)
            admin.close()
        time.sleep(seconds)
    finally:
        for node, connect in saved:
            node._connect = connect


def serve(config: dict[str, Any], pipe: Connection) -> None:
    """A worker process's entry: says "ready" on `pipe` when it is, receives the
    fleet's start time, and sends back what it saw (or what failed)."""

    def ready() -> float:
        pipe.send("ready")
        return float(pipe.recv())

    try:
        pipe.send(worker(config, ready))
    except BaseException as exc:
        pipe.send(f"failed: {type(exc).__name__}: {exc}")
        raise
    finally:
        pipe.close()


def worker(config: dict[str, Any], ready: Callable[[], float]) -> dict[str, Any]:
    """One process of the fleet; returns its counts (and timeline, if asked).
    `ready()` says it is connected and tracking, and returns the fleet's start time."""
    with open(config["memory"], "r+b") as file:
        memory = mmap.mmap(file.fileno(), 2 * KEYS * SLOT)
    view = memoryview(memory)
    versions = view[: KEYS * SLOT].cast("q")
    published_at = view[KEYS * SLOT : 2 * KEYS * SLOT].cast("d")
    engine = CacheEngine.from_url(
        config["url"],
        prefix=config["prefix"],
        near=NearCache(tracking=config.get("tracking", "bcast")),
    )
    loads = itertools.count()
    reads = itertools.count()
    local = threading.local()

    def db() -> sqlite3.Connection:
        connection = getattr(local, "db", None)
        if connection is None:
            connection = local.db = sqlite3.connect(config["db"], timeout=30)
        return connection

    @cache_aside(key="row:<id>", ttl=60, engine=engine)
    def get(id: int) -> dict[str, int]:
        next(loads)
        (version,) = db().execute("SELECT v FROM rows WHERE id = ?", (id,)).fetchone()
        return {"id": id, "v": version}

    counts = {"reads": 0, "writes": 0, "stale_in_window": 0, "stale": 0, "errors": 0}
    ages: list[float] = []  # stale reads began this long after the invalidation returned
    lock = threading.Lock()
    kinds: list[str] = []  # the first few errors, for the log
    # Connected and tracking before the start (the first call meets the near cache),
    # then one start time for the fleet from the parent: however slowly this process
    # started, it runs its full `seconds` with the others.
    get(KEYS - 1)
    waited = time.monotonic() + TRACKING_WAIT_S
    while engine.near_state() != "tracking" and time.monotonic() < waited:
        time.sleep(0.01)
    engine.reset_stats()
    listener = engine.nearby.listener
    received = message_counter(listener)
    start_at = ready()
    deadline = start_at + config["seconds"]
    messages_before = received()

    def run(seed: int) -> None:
        draw = key_sampler(config, seed)
        rng = random.Random(seed)
        mine = dict.fromkeys(counts, 0)
        late_ones: list[float] = []
        while time.time() < start_at:
            time.sleep(0.001)
        while time.time() < deadline:
            id = draw()
            try:
                if rng.random() < WRITE_SHARE:
                    connection = db()
                    with connection:
                        connection.execute("UPDATE rows SET v = v + 1 WHERE id = ?", (id,))
                        (version,) = connection.execute(
                            "SELECT v FROM rows WHERE id = ?", (id,)
                        ).fetchone()
                    get.invalidate(id)
                    if versions[id] < version:
                        # The time first: a reader that sees the version sees its time.
                        published_at[id] = time.time()
                        versions[id] = version
                    mine["writes"] += 1
                    continue
                began = time.time()
                before, since = versions[id], published_at[id]
                value = get(id)
                next(reads)
                mine["reads"] += 1
                if value["v"] < before:
                    late = began - since
                    late_ones.append(late)
                    mine["stale_in_window" if late < TRACKING_WINDOW_S else "stale"] += 1
            except Exception as exc:  # a caller's error: the fleet must see none
                mine["errors"] += 1
                if len(kinds) < 5:
                    kinds.append(f"{type(exc).__name__}: {exc}"[:200])
        with lock:
            for name, count in mine.items():
                counts[name] += count
            ages.extend(late_ones)

    timeline: list[tuple[float, int, int, bool]] = []

    def sample() -> None:
        """(seconds since the start, reads, near hits, tracking) every SAMPLE_S."""
        while time.time() < start_at:
            time.sleep(0.001)
        while time.time() < deadline:
            stats = get.stats()
            timeline.append(
                (
                    round(time.time() - start_at, 4),
                    int(repr(reads)[6:-1]),
                    stats.near_hits,
                    engine.near_state() == "tracking",
                )
            )
            time.sleep(SAMPLE_S)

    outage: dict[str, float] = {}

    def cut_at(at: float, seconds: float) -> None:
        time.sleep(max(0.0, start_at + at - time.time()))
        outage["cut"] = time.time() - start_at
        cut(listener, config["url"], seconds)
        outage["restored"] = time.time() - start_at

    threads = [
        threading.Thread(target=run, args=(config["seed"] * 1000 + n,))
        for n in range(config["threads"])
    ]
    if config.get("timeline"):
        threads.append(threading.Thread(target=sample))
    if config.get("outage"):
        threads.append(threading.Thread(target=cut_at, args=config["outage"]))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats = get.stats()
    messages, keys_reported = received()
    result = {
        **counts,
        "loads": int(repr(loads)[6:-1]),
        "near_hits": stats.near_hits,
        "hits": stats.hits,
        "near_revalidated": stats.near_revalidated,
        "near_unverified": stats.near_unverified,
        "messages": messages - messages_before[0],
        "keys_reported": keys_reported - messages_before[1],
        "stale_age_max": max(ages, default=0.0),
    }
    if config.get("timeline"):
        result["timeline"] = timeline
    if outage:
        result["outage"] = outage
    if kinds:
        print("fleet worker errors:", *kinds, sep="\n  ", file=sys.stderr)
    engine.close()
    for shared in (versions, published_at, view):
        shared.release()
    memory.close()
    return result
