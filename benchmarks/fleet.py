"""A fleet: several processes, each with many threads, reading a Zipf-distributed key
set through one cached function with a near cache, while 1% of operations write the
primary (a SQLite database on disk, shared by all) and invalidate. Run on a private
Redis and on a private 3-master cluster (with a master killed mid-run on the
cluster, replicas promoted), for 1, 2 and 4 processes.

Reported per run: hits/s (near and Redis), primary reads per invalidation, the
near-hit share, stale reads, Redis commands/s (INFO commandstats on the private
servers), and errors seen by callers. A read is stale when it returns a version older
than one whose invalidate() had returned before the read began; those within
TRACKING_WINDOW_S of that return are counted apart (another process's near cache
hears of a change a moment later: the documented tracking window), the rest must be 0.

    python -m benchmarks --only fleet
    python -m benchmarks.fleet --worker CONFIG_JSON   (internal)
"""

from __future__ import annotations

import bisect
import itertools
import json
import mmap
import random
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from cached_aside import CacheEngine, NearCache, cache_aside
from tests.servers import REDIS_SERVER, RedisClusterProcesses, RedisProcess

from .runner import Settings, Table

KEYS = 10_000
ZIPF_S = 1.1
WRITE_SHARE = 0.01
TRACKING_WINDOW_S = 0.05
SLOT = 8  # bytes per int64 / float64 in the shared arrays


def zipf_sampler(n: int, s: float, seed: int) -> Any:
    """Draws ids 0..n-1 with probability proportional to 1 / (rank + 1) ** s."""
    weights = list(itertools.accumulate(1.0 / (rank + 1) ** s for rank in range(n)))
    total = weights[-1]
    rng = random.Random(seed)
    return lambda: bisect.bisect_left(weights, rng.random() * total)


def worker(config: dict[str, Any]) -> dict[str, Any]:
    """One process of the fleet; prints its counts as JSON."""
    with open(config["memory"], "r+b") as file:
        memory = mmap.mmap(file.fileno(), 2 * KEYS * SLOT)
    view = memoryview(memory)
    versions = view[: KEYS * SLOT].cast("q")
    published_at = view[KEYS * SLOT : 2 * KEYS * SLOT].cast("d")
    engine = CacheEngine.from_url(config["url"], prefix=config["prefix"], near=NearCache())
    loads = itertools.count()
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
    lock = threading.Lock()
    kinds: list[str] = []  # the first few errors, for the log
    # Connected before the start (the connection, not the first read, is made here),
    # then one start time for the fleet from the parent: however slowly this process
    # started, it runs its full `seconds` with the others.
    engine.client().ping()
    print("ready", flush=True)
    start_at = float(sys.stdin.readline())
    deadline = start_at + config["seconds"]

    def run(seed: int) -> None:
        draw = zipf_sampler(KEYS, ZIPF_S, seed)
        rng = random.Random(seed)
        mine = dict.fromkeys(counts, 0)
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
                        versions[id] = version
                        published_at[id] = time.time()
                    mine["writes"] += 1
                    continue
                before, since = versions[id], published_at[id]
                value = get(id)
                mine["reads"] += 1
                if value["v"] < before:
                    late = time.time() - since
                    mine["stale_in_window" if late < TRACKING_WINDOW_S else "stale"] += 1
            except Exception as exc:  # a caller's error: the fleet must see none
                mine["errors"] += 1
                if len(kinds) < 5:
                    kinds.append(f"{type(exc).__name__}: {exc}"[:200])
        with lock:
            for name, count in mine.items():
                counts[name] += count

    threads = [
        threading.Thread(target=run, args=(config["seed"] * 1000 + n,))
        for n in range(config["threads"])
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats = get.stats()
    result = {
        **counts,
        "loads": int(repr(loads)[6:-1]),
        "near_hits": stats.near_hits,
        "hits": stats.hits,
    }
    if kinds:
        print("fleet worker errors:", *kinds, sep="\n  ", file=sys.stderr)
    engine.close()
    for shared in (versions, published_at, view):
        shared.release()
    memory.close()
    return result


def warm(url: str, prefix: str, path: Path) -> None:
    """Fill Redis with every row first, so that the run measures a warm fleet: its
    primary reads are those the writes cause, not the first touch of each key."""
    engine = CacheEngine.from_url(url, prefix=prefix)
    connection = sqlite3.connect(path)

    def rows(ids: list[int]) -> list[dict[str, int]]:
        marks = ",".join("?" * len(ids))
        found = dict(connection.execute(f"SELECT id, v FROM rows WHERE id IN ({marks})", ids))
        return [{"id": id, "v": found[id]} for id in ids]

    @cache_aside(key="row:<id>", ttl=60, engine=engine, batch_loader=rows)
    def get(id: int) -> dict[str, int]:
        raise AssertionError("warmed in batches")

    for first in range(0, KEYS, 1000):
        get.many(list(range(first, first + 1000)))
    connection.close()
    engine.close()


def commands(urls: list[str]) -> dict[str, int]:
    """Commands each server has run (INFO commandstats); a server that does not answer
    (a killed master) is left out."""
    counted: dict[str, int] = {}
    for url in urls:
        client = redis.Redis.from_url(url, socket_timeout=1)
        try:
            stats = client.info("commandstats")
        except redis.RedisError:
            continue
        finally:
            client.close()
        counted[url] = sum(entry["calls"] for entry in stats.values())
    return counted


def one_run(
    url: str,
    server_urls: list[str],
    processes: int,
    threads: int,
    seconds: float,
    during: Any = None,
) -> dict[str, Any]:
    """Start `processes` workers at once on a fresh database; sum what they saw."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "primary.sqlite"
        with sqlite3.connect(path) as connection:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("CREATE TABLE rows (id INTEGER PRIMARY KEY, v INTEGER)")
            connection.executemany("INSERT INTO rows VALUES (?, 1)", ((i,) for i in range(KEYS)))
        prefix = f"bench-fleet-{uuid.uuid4().hex[:8]}"
        warm(url, prefix, path)
        # The versions whose invalidation returned, and when: a file every worker maps.
        published = Path(folder) / "published"
        published.write_bytes(bytes(2 * KEYS * SLOT))
        base = {
            "url": url,
            "prefix": prefix,
            "db": str(path),
            "memory": str(published),
            "threads": threads,
            "seconds": seconds,
        }
        workers = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.fleet",
                    "--worker",
                    json.dumps({**base, "seed": n + 1}),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for n in range(processes)
        ]
        # A barrier, not a guess at start-up time: each worker says "ready" once
        # connected, and all are given one start time a moment later.
        for w in workers:
            said = w.stdout.readline().strip() if w.stdout else ""
            if said != "ready":
                raise RuntimeError(f"a fleet worker did not start (said {said!r})")
        start_at = time.time() + 0.05
        for w in workers:
            if w.stdin:
                w.stdin.write(f"{start_at}\n")
                w.stdin.flush()
        time.sleep(max(0.0, start_at - time.time()))
        before = commands(server_urls)
        if during is not None:
            time.sleep(seconds / 3)
            during()
        outputs = [json.loads(w.communicate(timeout=seconds + 120)[0]) for w in workers]
        after = commands(server_urls)
    total = {name: sum(out[name] for out in outputs) for name in outputs[0]}
    total["commands"] = sum(after[url] - before[url] for url in after if url in before)
    total["seconds"] = seconds
    return total


def row(label: str, processes: int, total: dict[str, Any]) -> list[Any]:
    seconds = total["seconds"]
    served = total["near_hits"] + total["hits"]
    return [
        label,
        processes,
        round(served / seconds),
        round(total["loads"] / max(1, total["writes"]), 2),
        round(100 * total["near_hits"] / max(1, total["reads"]), 1),
        total["stale"],
        total["stale_in_window"],
        round(total["commands"] / seconds),
        total["errors"],
    ]


def run(settings: Settings) -> list[Table]:
    if REDIS_SERVER is None:
        table = Table("fleet", ["note"])
        table.rows.append(["redis-server is not on PATH: the fleet needs private servers"])
        return [table]
    counts = (1, 2) if settings.quick else (1, 2, 4)
    threads = 4 if settings.quick else 16
    seconds = 1.5 if settings.quick else 5.0
    table = Table(
        f"fleet: processes x {threads} threads, Zipf({ZIPF_S}) over {KEYS:,} keys, "
        f"{WRITE_SHARE:.0%} writes that invalidate, near cache on",
        [
            "server",
            "processes",
            "hits/s",
            "primary reads per write",
            "near-hit %",
            "stale reads",
            f"stale < {TRACKING_WINDOW_S * 1000:.0f} ms",
            "Redis commands/s",
            "caller errors",
        ],
    )
    server = RedisProcess().start()
    try:
        for processes in counts:
            total = one_run(server.url, [server.url], processes, threads, seconds)
            table.rows.append(row("one Redis", processes, total))
    finally:
        server.stop()
    cluster = RedisClusterProcesses(masters=3, replicas=1).start()
    try:
        url = cluster.url.replace("redis://", "redis+cluster://")
        masters = [
            node.url
            for node in cluster.nodes
            if node.admin().info("replication")["role"] == "master"
        ]
        for processes in counts:
            total = one_run(url, masters, processes, threads, seconds)
            table.rows.append(row("3-master cluster", processes, total))
        victim = next(node for node in cluster.nodes if node.url == masters[0])
        total = one_run(url, masters, counts[-1], threads, seconds, during=victim.kill)
        table.rows.append(row("cluster, a master killed mid-run", counts[-1], total))
    finally:
        cluster.stop()
    table.notes = [
        "primary reads per write: loader calls over invalidating writes, on a warm cache "
        "(each write makes the next read of that key load once in the whole fleet; a write "
        "racing a load of the same key fences it, and that read loads again)",
        f"stale reads: a version older than one invalidated before the read began, later than "
        f"{TRACKING_WINDOW_S * 1000:.0f} ms after; must be 0",
        "Redis commands/s: INFO commandstats summed over the masters at the start (a "
        "killed master's are not counted, a promoted replica's are not either)",
    ]
    return [table]


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    print(json.dumps(worker(json.loads(sys.argv[2]))))


def chart(tables: list[Table], path: Path) -> bool:
    """hits/s and primary reads per write against the number of processes."""
    fleet_table = next((t for t in tables if t.title.startswith("fleet:")), None)
    if fleet_table is None or len(fleet_table.columns) < 3:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (rates, reads) = plt.subplots(1, 2, figsize=(10, 4))
    for server in ("one Redis", "3-master cluster"):
        rows = [row for row in fleet_table.rows if row[0] == server]
        if not rows:
            continue
        processes = [row[1] for row in rows]
        rates.plot(processes, [row[2] for row in rows], marker="o", label=server)
        reads.plot(processes, [row[3] for row in rows], marker="o", label=server)
    rates.set_title("hits/s (near and Redis)", fontsize=10)
    reads.set_title("primary reads per invalidating write", fontsize=10)
    for axis in (rates, reads):
        axis.set_xlabel("processes")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return True
