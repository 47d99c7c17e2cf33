"""Another process with a near cache, for tests and benchmarks: it reads one entry as
fast as it can and reports every change of value it sees.

    python -m tests.near_watcher URL PREFIX ID [TRACKING]

The loader reads the primary from the Redis key `primary-<PREFIX>:<ID>` (outside the
engine's prefix). Prints "ready" once the value is served from the near cache, then
one JSON line {"value": ..., "at": time.monotonic()} per change (reading about every
0.2 ms); on stdin's end, a JSON line with its stats.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

import redis

from cached_aside import CacheEngine, NearCache, Source, cache_aside


def main(url: str, prefix: str, id: str, tracking: Any = "bcast") -> None:
    primary = redis.Redis.from_url(url)
    engine = CacheEngine.from_url(url, prefix=prefix)

    @cache_aside(
        key="item:<id>", ttl=60, as_hash=True, engine=engine, near=NearCache(tracking=tracking)
    )
    def read(id: str) -> dict[str, Any]:
        value = primary.get(f"primary-{prefix}:{id}")
        return {"v": (value or b"").decode()}

    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    deadline = time.monotonic() + 30  # a bound on a hang, for a slow machine
    while read.lookup(id).source is not Source.NEAR:
        if time.monotonic() > deadline:
            raise SystemExit("the near cache never served a hit")
        time.sleep(0.001)
    # read before saying ready: a change sent after "ready" must differ from `last`
    # (read after it, on a loaded machine the first change could already be `last`)
    last = read(id)
    print("ready", flush=True)
    while not stop.is_set():
        value = read(id)
        if value != last:
            print(json.dumps({"value": value, "at": time.monotonic()}), flush=True)
            last = value
        # A service also waits on I/O between reads; a loop that never yields would
        # hold the GIL and delay the listener thread by up to the 5 ms switch interval.
        time.sleep(0.0002)
    print(json.dumps(read.stats().as_dict()), flush=True)
    engine.close()


if __name__ == "__main__":
    main(*sys.argv[1:5])
