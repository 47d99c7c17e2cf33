"""A fleet: several processes, each with many threads, reading a Zipf-distributed key
set through one cached function with a near cache, while 1% of operations write the
primary (a SQLite database on disk, shared by all) and invalidate. Run on a private
Redis and on a private 3-master cluster (with a master killed mid-run on the
cluster, replicas promoted), for 1, 2 and 4 processes; then the tracking modes with 8
processes that each read their own slice of the keys, and the recovery after a
listener outage (`fleet_tracking`). The processes are `fleet_worker`.

Reported per run: hits/s (near and Redis), primary reads per invalidation, the
near-hit share, stale reads, Redis commands/s (INFO commandstats on the private
servers), and errors seen by callers. A read is stale when it returns a version older
than one whose invalidate() had returned before the read began; those within
TRACKING_WINDOW_S of that return are counted apart (another process's near cache
hears of a change a moment later: the documented tracking window), the rest must be 0.

    python -m benchmarks --only fleet
"""

from __future__ import annotations

import multiprocessing
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from cached_aside import CacheEngine, cache_aside
from tests.servers import REDIS_SERVER, RedisClusterProcesses, RedisProcess

from . import fleet_tracking, fleet_worker
from .fleet_worker import KEYS, SLOT, TRACKING_MODES, TRACKING_WINDOW_S, WRITE_SHARE, ZIPF_S
from .runner import Settings, Table

# What a run's total keeps per process rather than summing.
PER_PROCESS = ("timeline", "outage")
# Workers fork from a server that imported them once (a fork of this process could
# copy a lock some thread of it holds; eight fresh interpreters cost seconds).
FORKS = multiprocessing.get_context("forkserver")
FORKS.set_forkserver_preload(["benchmarks.fleet_worker"])
# The chart's panel of the near-hit ratio around a listener outage (one process's).
RECOVERY_PANEL = "near-hit ratio around a listener cut (one process)"
# How long a worker may take to start, and to report after its run.
START_TIMEOUT_S = 120.0


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


def server_counts(urls: list[str]) -> dict[str, tuple[int, float]]:
    """Commands each server has run (INFO commandstats) and the CPU seconds it has
    used (INFO cpu, user + system); a server that does not answer (a killed master)
    is left out."""
    counted: dict[str, tuple[int, float]] = {}
    for url in urls:
        client = redis.Redis.from_url(url, socket_timeout=1)
        try:
            stats = client.info("commandstats")
            cpu = client.info("cpu")
        except redis.RedisError:
            continue
        finally:
            client.close()
        calls = sum(entry["calls"] for entry in stats.values())
        counted[url] = (calls, float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]))
    return counted


def one_run(
    url: str,
    server_urls: list[str],
    processes: int,
    threads: int,
    seconds: float,
    during: Any = None,
    each: Callable[[int], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Start `processes` workers at once on a fresh database; sum what they saw.
    `each(n)` adds to process n's configuration (its slice, tracking mode, outage)."""
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
        configs = [{**base, "seed": n + 1, **(each(n) if each else {})} for n in range(processes)]
        pipes = []
        for config in configs:
            pipe, child_end = FORKS.Pipe()
            FORKS.Process(target=fleet_worker.serve, args=(config, child_end), daemon=True).start()
            child_end.close()
            pipes.append(pipe)
        # A barrier, not a guess at start-up time: each worker says "ready" once
        # connected and tracking, and all are given one start time a moment later.
        for pipe in pipes:
            said = pipe.recv() if pipe.poll(START_TIMEOUT_S) else "nothing"
            if said != "ready":
                raise RuntimeError(f"a fleet worker did not start (said {said!r})")
        start_at = time.time() + 0.05
        for pipe in pipes:
            pipe.send(start_at)
        time.sleep(max(0.0, start_at - time.time()))
        before = server_counts(server_urls)
        if during is not None:
            time.sleep(seconds / 3)
            during()
        outputs = []
        for pipe in pipes:
            output = pipe.recv() if pipe.poll(seconds + START_TIMEOUT_S) else "nothing"
            if not isinstance(output, dict):
                raise RuntimeError(f"a fleet worker did not finish (said {output!r})")
            outputs.append(output)
            pipe.close()
        after = server_counts(server_urls)
    total = {
        name: sum(out[name] for out in outputs)
        for name in outputs[0]
        if name not in PER_PROCESS and name != "stale_age_max"
    }
    total["stale_age_max"] = max(out["stale_age_max"] for out in outputs)
    total["processes"] = [
        {name: out[name] for name in PER_PROCESS if name in out} for out in outputs
    ]
    counted = [url for url in after if url in before]
    total["commands"] = sum(after[url][0] - before[url][0] for url in counted)
    total["redis_cpu"] = sum(after[url][1] - before[url][1] for url in counted)
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
        round(1000 * total["stale_age_max"], 1),
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
    seconds = 1.5 if settings.quick else 4.0
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
            "oldest stale read ms",
            "Redis commands/s",
            "caller errors",
        ],
    )
    # The tracking modes: 8 processes on slices of the keys; the listener outage.
    modes = TRACKING_MODES
    sliced_threads, sliced_seconds = (2, 1.5) if settings.quick else (4, 3.0)
    tracking = fleet_tracking.tracking_table(sliced_threads)
    cut_processes, cut_threads = (2, 2) if settings.quick else (4, 4)
    cut_at, cut_seconds = (0.8, 3.5) if settings.quick else (2.0, 5.0)
    recovery = fleet_tracking.recovery_table(cut_processes, cut_threads)

    def tracking_rows(label: str, url: str, servers: list[str]) -> None:
        for mode in modes:
            total = one_run(
                url,
                servers,
                fleet_tracking.PROCESSES,
                sliced_threads,
                sliced_seconds,
                each=lambda n, mode=mode: fleet_tracking.sliced(n, mode),
            )
            tracking.rows.append(fleet_tracking.tracking_row(label, mode, total))

    def recovery_rows(label: str, url: str, servers: list[str]) -> None:
        for mode in modes:
            total = one_run(
                url,
                servers,
                cut_processes,
                cut_threads,
                cut_seconds,
                each=lambda n, mode=mode: fleet_tracking.cut_off(mode, cut_at),
            )
            recovery.rows.append(fleet_tracking.recovery_row(label, mode, total))
            first = total["processes"][0]
            recovery.curves.setdefault(RECOVERY_PANEL, {})[f"{label}, {mode}"] = (
                fleet_tracking.curve(first["timeline"], first["outage"])
            )

    server = RedisProcess().start()
    try:
        for processes in counts:
            total = one_run(server.url, [server.url], processes, threads, seconds)
            table.rows.append(row("one Redis", processes, total))
        tracking_rows("one Redis", server.url, [server.url])
        recovery_rows("one Redis", server.url, [server.url])
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
        if not settings.quick:
            tracking_rows("3-master cluster", url, masters)
            recovery_rows("3-master cluster", url, masters)
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
        f"{TRACKING_WINDOW_S * 1000:.0f} ms after; must be 0. oldest stale read: how long "
        "after the invalidation returned the latest of them began",
        "Redis commands/s: INFO commandstats summed over the masters at the start (a "
        "killed master's are not counted, a promoted replica's are not either)",
    ]
    return [table, tracking, recovery]


def chart(tables: list[Table], path: Path) -> bool:
    """hits/s and primary reads per write against the number of processes; and, when
    the recovery ran, one process's near-hit ratio around its listener's cut."""
    fleet_table = next((t for t in tables if t.title.startswith("fleet:")), None)
    if fleet_table is None or len(fleet_table.columns) < 3:
        return False
    lines = next((t.curves[RECOVERY_PANEL] for t in tables if RECOVERY_PANEL in t.curves), {})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3 if lines else 2, figsize=(15 if lines else 10, 4))
    rates, reads = axes[0], axes[1]
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
    if lines:
        around = axes[2]
        for name, points in lines.items():
            around.plot([x for x, _ in points], [y for _, y in points], label=name)
        around.axvspan(0, fleet_tracking.OUTAGE_S, alpha=0.15, color="grey")
        around.set_title(
            f"{RECOVERY_PANEL}, per {fleet_tracking.BUCKET_S * 1000:.0f} ms", fontsize=10
        )
        around.set_xlabel("seconds since the cut (shaded: reconnections refused)")
    for axis in axes:
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
