"""A holder dies mid-load: how long do other processes' callers of its key wait?

A holder process takes a key's lock and runs a loader that never returns; waiter
processes (several threads each) call the same function and wait for it. Once they
are all waiting, at a random moment, the holder is SIGKILLed (an OOM-killed pod);
this measures, for every waiting caller, the time from the kill to its answer. With
leases renewed while the loader runs, that is at most one lease (lock_ttl, 1 s by
default); with a lock that is not renewed, it is whatever the lock had left.

    python -m benchmarks.dead_holder [--trials 5] [--lock-ttl SECONDS]
        [--processes 3] [--threads 4] [--library PATH] [--out results.json]

The `dead_holder` section of `python -m benchmarks` runs this checkout's library with
the default lease and with a 10 s one (the length of the old, unrenewed lock), the
kills of the two taking turns, and tables the delays.

`--library` runs the holder and the waiters on another checkout's cached_aside
(e.g. the main branch, for a before/after figure); this script imports none of it.
Uses REDIS_URL (default redis://127.0.0.1:6379/0) under a random key prefix.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from .runner import Settings, Table

HOLDER = textwrap.dedent(
    """
    import sys, time
    from cached_aside import CacheEngine, cache_aside
    url, prefix, marker, lock_ttl = sys.argv[1:5]
    options = {} if lock_ttl == "default" else {"lock_ttl": float(lock_ttl)}
    engine = CacheEngine.from_url(url, prefix=prefix)

    @cache_aside(key="hot:<id>", ttl=60, engine=engine, **options)
    def load(id):
        open(marker, "w").close()
        time.sleep(3600)  # the primary hangs; the process is killed meanwhile

    load("k")
    """
)

WAITER = textwrap.dedent(
    """
    import json, sys, threading, time
    from cached_aside import CacheEngine, cache_aside
    url, prefix, lock_ttl, threads, out = sys.argv[1:6]
    options = {} if lock_ttl == "default" else {"lock_ttl": float(lock_ttl)}
    engine = CacheEngine.from_url(url, prefix=prefix)

    @cache_aside(key="hot:<id>", ttl=60, engine=engine, **options)
    def load(id):
        return "recovered"

    answers = []
    def call():
        result = load.lookup("k")
        answers.append((time.time(), result.source.value, result.value))

    workers = [threading.Thread(target=call) for _ in range(int(threads))]
    print("ready", flush=True)
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    with open(out, "w") as file:
        json.dump(answers, file)
    """
)


def trial(args: argparse.Namespace, url: str, env: dict[str, str]) -> dict[str, Any]:
    """One kill: the waiters' delays (s) from the kill to their answers."""
    raw = redis.Redis.from_url(url)
    prefix = f"bench-dead-{uuid.uuid4().hex[:10]}"
    lock_ttl = "default" if args.lock_ttl is None else str(args.lock_ttl)
    with tempfile.TemporaryDirectory() as scratch:
        marker = Path(scratch) / "loading"
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER, url, prefix, str(marker), lock_ttl],
            env=env,
            cwd=scratch,  # not this checkout: -c puts the working directory on sys.path
        )
        waiters: list[subprocess.Popen[str]] = []
        try:
            deadline = time.monotonic() + 60
            while not marker.exists():
                if holder.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the holder never started loading")
                time.sleep(0.01)
            lock_key = next(raw.scan_iter(match=f"{prefix}:*:lock"))
            waiters_key = lock_key[: -len(b"lock")] + b"waiters"
            outs = [Path(scratch) / f"answers-{n}.json" for n in range(args.processes)]
            counts = [str(args.threads)]
            for out in outs:
                waiters.append(
                    subprocess.Popen(
                        [sys.executable, "-c", WAITER, url, prefix, lock_ttl, *counts, str(out)],
                        env=env,
                        cwd=scratch,
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                )
            for waiter in waiters:
                assert waiter.stdout is not None
                assert waiter.stdout.readline().strip() == "ready"
            # Every waiter process registered in Redis: they wait for the holder.
            while raw.scard(waiters_key) < args.processes:
                if time.monotonic() > deadline:
                    raise SystemExit("the waiters never registered")
                time.sleep(0.005)
            time.sleep(random.uniform(0, 1.0))  # the kill lands anywhere in a lease
            left_ms = raw.pttl(lock_key)
            killed_at = time.time()
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait()
            for waiter in waiters:
                waiter.wait(120)
            answers = [answer for out in outs for answer in json.loads(out.read_text())]
        finally:
            for process in [holder, *waiters]:
                if process.poll() is None:
                    process.kill()
                    process.wait()
                if process.stdout is not None:
                    process.stdout.close()
            keys = list(raw.scan_iter(match=f"{prefix}:*"))
            if keys:
                raw.unlink(*keys)
            raw.close()
    delays = [at - killed_at for at, _, _ in answers]
    assert all(value == "recovered" for _, _, value in answers), answers
    return {
        "lock_left_at_kill_ms": left_ms,
        "delays_s": delays,
        "loads_after_kill": sum(source == "loader" for _, source, _ in answers),
    }


# The section's contenders: a name and the lock_ttl it runs with (None: the default).
LEASES: dict[str, float | None] = {
    "lock_ttl 1 s (the default), renewed": None,
    "lock_ttl 10 s, renewed": 10.0,
}


def run(settings: Settings) -> list[Table]:
    """The section: `trials` kills per lease length, taking turns, 3 processes x 4
    threads waiting; the waiters' delays from the kill to their answers."""
    trials = settings.scaled(5, 1)
    processes, threads = 3, 4
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    delays: dict[str, list[float]] = {name: [] for name in LEASES}
    one_load = dict.fromkeys(LEASES, True)
    order = list(LEASES.items())
    progress = settings.progress
    task = progress.add_task("dead holder kills", total=trials * len(order)) if progress else None
    for number in range(trials):
        for name, lock_ttl in order if number % 2 == 0 else order[::-1]:
            args = argparse.Namespace(lock_ttl=lock_ttl, processes=processes, threads=threads)
            result = trial(args, settings.url, env)
            delays[name] += result["delays_s"]
            one_load[name] = one_load[name] and result["loads_after_kill"] == 1
            if task is not None and progress:
                progress.advance(task)
    table = Table(
        "dead holder: waiters' delay after the holder's SIGKILL",
        ["contender", "callers", "median s", "max s", "one load per kill"],
    )
    for name, every in delays.items():
        table.rows.append(
            [
                name,
                len(every),
                round(statistics.median(every), 2),
                round(max(every), 2),
                one_load[name],
            ]
        )
    table.notes = [
        f"{trials} kill(s) per contender at a random moment of a lease, "
        f"{processes} processes x {threads} threads waiting; the delay is from the kill "
        "to each caller's answer"
    ]
    return [table]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--lock-ttl", type=float, default=None, help="default: the library's")
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--library", default=None, help="a checkout whose cached_aside to run")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    library = Path(args.library or Path(__file__).resolve().parent.parent).resolve()
    env = {**os.environ, "PYTHONPATH": str(library)}
    trials = []
    for number in range(args.trials):
        result = trial(args, url, env)
        trials.append(result)
        delays = result["delays_s"]
        print(
            f"trial {number + 1}: lock had {result['lock_left_at_kill_ms']} ms left at the kill; "
            f"{len(delays)} callers answered after {min(delays):.3f}-{max(delays):.3f} s "
            f"(one load: {result['loads_after_kill'] == 1})",
            flush=True,
        )
    every = [delay for result in trials for delay in result["delays_s"]]
    summary = {
        "library": str(library),
        "lock_ttl": args.lock_ttl or "default",
        "callers": f"{args.processes} processes x {args.threads} threads",
        "median_s": round(statistics.median(every), 3),
        "max_s": round(max(every), 3),
        "trials": trials,
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "redis": redis.Redis.from_url(url).info("server")["redis_version"],
        },
    }
    print(
        f"waiters' delay after the holder's SIGKILL: median {summary['median_s']} s, "
        f"max {summary['max_s']} s over {len(every)} callers in {len(trials)} trials"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
