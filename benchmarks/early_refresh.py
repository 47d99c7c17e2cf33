"""Early refresh across a fleet: 8 processes read the same hot keys for a few ttls,
with no early refresh, refresh_ahead's fixed window, and XFetch.

Reported per mode: loads per ttl (a ttl over the mean time between a key's loads),
overlapping loads of a key, callers that did not get a cached value at once, the
p99 latency of callers (all, those during a reload of their key, those within
AROUND_S of the moment an entry would expire), and the spread of refresh times (each
reload's lead: how long before its entry's expiry it started; negative: after).
A fixed window reloads at one age, when every process finds the key due at once;
XFetch draws the moment per hit, so it varies from one expiry to the next.

    python -m benchmarks --only early_refresh
    python -m benchmarks.early_refresh [--url URL] [--quick]
    python -m benchmarks.early_refresh --worker CONFIG_JSON   (internal)
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from cached_aside import CacheEngine, XFetch, cache_aside

from .runner import Settings, Table, percentile, print_tables

ROOT = Path(__file__).resolve().parent.parent
TTL_S = 1.0
LOAD_S = 0.05
WINDOW_S = 0.2  # the fixed window: a fifth of the ttl, four loads long
HOT_KEYS = 4
AROUND_S = 0.1  # a caller is "around expiry" within this of an entry's expiry
PAUSE_S = 0.001  # between one process's rounds over the hot keys

# Mode name -> refresh_ahead (a JSON-able description, made into the option by a worker).
MODES: dict[str, Any] = {
    "no early refresh": None,
    f"fixed window {WINDOW_S * 1000:.0f} ms": WINDOW_S,
    "XFetch(beta=1)": {"beta": 1.0},
    "XFetch(beta=4)": {"beta": 4.0},
}


def option(refresh_ahead: Any) -> Any:
    return XFetch(**refresh_ahead) if isinstance(refresh_ahead, dict) else refresh_ahead


def worker(config: dict[str, Any]) -> dict[str, Any]:
    """One process: reads every hot key in turn until the run ends; returns each call's
    start and latency, and how many did not get a cached value."""
    url, prefix = config["url"], config["prefix"]
    # Timeouts and a lock far above any stall of a starved process: this is about
    # early refresh, not fail-open loads or lease renewal.
    engine = CacheEngine.from_url(url, prefix=prefix, socket_timeout=10, socket_connect_timeout=10)
    raw = redis.Redis.from_url(url)

    @cache_aside(
        key="hot:<id>",
        ttl=TTL_S,
        lock_ttl=60,
        fail_open=False,
        refresh_ahead=option(config["refresh_ahead"]),
        engine=engine,
    )
    def load(id: str) -> str:
        started = time.time()
        time.sleep(LOAD_S)
        raw.rpush(f"{prefix}:loads:{id}", f"{started},{time.time()}")
        return id

    load.lookup("warm")  # connected, and the scripts loaded, before the start
    print("ready", flush=True)
    start_at = float(sys.stdin.readline())
    time.sleep(max(0.0, start_at - time.time()))
    stop = start_at + config["seconds"]
    starts: list[float] = []
    latencies: list[float] = []
    waited = 0
    while time.time() < stop:
        for i in range(HOT_KEYS):
            started = time.time()
            result = load.lookup(f"k{i}")
            latencies.append((time.time() - started) * 1000)
            starts.append(started)
            waited += result.source.value != "cache"
        time.sleep(PAUSE_S)
    engine.settle(30)
    return {"starts": starts, "latencies": latencies, "waited": waited}


def trial(url: str, refresh_ahead: Any, processes: int, seconds: float) -> dict[str, Any]:
    """Start `processes` workers at once on the hot keys; what they and the loads saw."""
    prefix = f"bench-early-{uuid.uuid4().hex[:8]}"
    base = {"url": url, "prefix": prefix, "refresh_ahead": refresh_ahead, "seconds": seconds}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "benchmarks.early_refresh", "--worker", json.dumps(base)]
    workers = [
        subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env
        )
        for _ in range(processes)
    ]
    raw = redis.Redis.from_url(url)
    try:
        for w in workers:  # a barrier: each says "ready" once connected
            said = w.stdout.readline().strip() if w.stdout else ""
            if said != "ready":
                raise RuntimeError(f"an early_refresh worker did not start (said {said!r})")
        start_at = time.time() + 0.05
        for w in workers:
            if w.stdin:
                w.stdin.write(f"{start_at}\n")
                w.stdin.flush()
        outputs = [json.loads(w.communicate(timeout=seconds + 120)[0]) for w in workers]
        loads = {
            i: [tuple(map(float, x.split(b","))) for x in raw.lrange(f"{prefix}:loads:k{i}", 0, -1)]
            for i in range(HOT_KEYS)
        }
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
        keys = list(raw.scan_iter(match=f"{prefix}:*"))
        if keys:
            raw.unlink(*keys)
        raw.close()
    return {"outputs": outputs, "loads": loads, "start": start_at, "seconds": seconds}


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """Loads per ttl, overlapping loads, callers served late, latency during reloads
    and around expiry, refresh leads."""
    expiries: list[float] = []  # when each stored entry would expire
    reloads: list[tuple[float, float]] = []  # every load but each key's first
    leads: list[float] = []  # how long before its entry's expiry each reload started
    gaps: list[float] = []
    overlapping = 0
    for each in result["loads"].values():
        expiries += [end + TTL_S for _, end in each]
        reloads += each[1:]
        for (start, end), (next_start, _) in itertools.pairwise(each):
            leads.append((end + TTL_S - next_start) * 1000)
            gaps.append(next_start - start)
            overlapping += next_start < end
    expiries.sort()
    reloads.sort()
    around: list[float] = []
    during: list[float] = []
    every: list[float] = []
    for out in result["outputs"]:
        for started, latency in zip(out["starts"], out["latencies"], strict=True):
            every.append(latency)
            at = bisect.bisect_left(expiries, started - AROUND_S)
            if at < len(expiries) and expiries[at] <= started + AROUND_S:
                around.append(latency)
            at = bisect.bisect_right(reloads, (started, float("inf"))) - 1
            if at >= 0 and reloads[at][0] <= started <= reloads[at][1]:
                during.append(latency)

    def p99(values: list[float]) -> float | None:
        return round(percentile(values, 0.99), 1) if values else None

    def rounded(value: float) -> float | None:
        return round(value, 1) if leads else None

    return {
        "loads per ttl": round(TTL_S / statistics.mean(gaps), 2) if gaps else None,
        "overlapping loads": overlapping,
        "served late": sum(out["waited"] for out in result["outputs"]),
        "calls": len(every),
        "p99 ms": p99(every),
        "p99 during a reload ms": p99(during),
        "p99 around expiry ms": p99(around),
        "lead median ms": rounded(statistics.median(leads)) if leads else None,
        "lead stdev ms": rounded(statistics.pstdev(leads)) if leads else None,
        "lead min ms": rounded(min(leads)) if leads else None,
        "lead max ms": rounded(max(leads)) if leads else None,
    }


COLUMNS = [
    "mode",
    "loads per ttl",
    "overlapping loads",
    "served late",
    "calls",
    "p99 ms",
    "p99 during a reload ms",
    "p99 around expiry ms",
    "lead median ms",
    "lead stdev ms",
    "lead min ms",
    "lead max ms",
]


def run(settings: Settings) -> list[Table]:
    processes = settings.scaled(8, 4)
    seconds = settings.scaled(4.0, 1.5) * TTL_S
    table = Table(
        f"early refresh: {processes} processes on {HOT_KEYS} hot keys, ttl "
        f"{TTL_S * 1000:.0f} ms, loader {LOAD_S * 1000:.0f} ms",
        COLUMNS,
    )
    progress = settings.progress
    task = progress.add_task("early refresh modes", total=len(MODES)) if progress else None
    for name, refresh_ahead in MODES.items():
        figures = summary(trial(settings.url, refresh_ahead, processes, seconds))
        table.rows.append([name, *(figures[column] for column in COLUMNS[1:])])
        if task is not None and progress:
            progress.advance(task)
    table.notes = [
        "loads per ttl: a ttl over the mean time between two loads of a key (about 1: "
        "one load per expiry); overlapping: a key's load started before the last ended",
        "served late: calls not answered from the cache at once (they waited for a load)",
        f"around expiry: calls within {AROUND_S * 1000:.0f} ms of the moment a stored "
        "entry would expire",
        "lead: how long before its entry's expiry a reload started (negative: after it "
        "expired); its stdev is the spread of refresh times",
    ]
    return [table]


def main() -> None:
    parser = argparse.ArgumentParser(description="early refresh: fixed window against XFetch")
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print_tables(run(Settings(url=args.url, quick=args.quick)))


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    print(json.dumps(worker(json.loads(sys.argv[2]))))
elif __name__ == "__main__":
    main()
