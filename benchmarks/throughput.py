"""Throughput: cached calls per second from one process and from two at once, next to
the raw redis-py call, each worker a process of its own looping for a fixed time.

    python -m benchmarks.throughput --worker KIND URL PREFIX SECONDS   (internal)
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

import msgpack

from cached_aside import CacheEngine, cache_aside

from .hit_path import RECORD
from .runner import Settings, Table, blocking_client

KINDS = ("raw redis-py GET + unpackb", "cached_aside (msgpack)")


def worker(kind: str, url: str, prefix: str, seconds: float) -> int:
    client = blocking_client(url)
    engine = CacheEngine(client, prefix=prefix)
    get_packed = cache_aside(key="packed:<id>", ttl=300, engine=engine)(lambda id: dict(RECORD))
    key = get_packed.key("p-001")
    call = (
        (lambda: msgpack.unpackb(client.get(key)))
        if kind == KINDS[0]
        else (lambda: get_packed("p-001"))
    )
    call()
    calls = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for _ in range(100):
            call()
        calls += 100
    client.close()
    return calls


def run(settings: Settings) -> list[Table]:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    seconds = settings.timed(3.0, 1.0)
    rounds = 1 if settings.quick else 3
    client = blocking_client(settings.url)  # given to the engine: ours to close
    engine = CacheEngine(client, prefix=prefix)
    cache_aside(key="packed:<id>", ttl=300, engine=engine)(lambda id: dict(RECORD))("p-001")
    results: dict[tuple[str, int], list[float]] = {}
    task = settings.progress.add_task("throughput", total=rounds * 4) if settings.progress else None
    for round_number in range(rounds):
        order = [(kind, n) for n in (1, 2) for kind in KINDS]
        for kind, processes in order if round_number % 2 == 0 else order[::-1]:
            argv = [
                sys.executable,
                "-m",
                "benchmarks.throughput",
                "--worker",
                kind,
                settings.url,
                prefix,
                str(seconds),
            ]
            workers = [
                subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) for _ in range(processes)
            ]
            total = sum(int(w.communicate(timeout=seconds + 60)[0]) for w in workers)
            results.setdefault((kind, processes), []).append(total / seconds)
            if task is not None and settings.progress:
                settings.progress.advance(task)
    client.delete(f"{prefix}:{{packed:p-001}}")
    engine.close()
    client.close()
    table = Table(
        "throughput, cached calls per second (sync)",
        ["contender", "1 process", "2 processes", "ratio (1 process)"],
    )
    base = max(results[(KINDS[0], 1)])
    for kind in KINDS:
        one, two = max(results[(kind, 1)]), max(results[(kind, 2)])
        table.rows.append([kind, round(one), round(two), round(one / base, 3)])
    table.notes = [f"best of {rounds} runs of {seconds:g} s each; one connection per process"]
    return [table]


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    print(worker(sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5])))
