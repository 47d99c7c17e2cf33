"""Hit path: a decorated call on a cached key vs the raw redis-py call a user would
write instead (`redis.Redis.from_url(url)` / `redis.asyncio.Redis.from_url(url)` with
redis-py's defaults), vs peer libraries on the same server and record, and against
the floor: the C client (`redis-benchmark -c 1 -P 1`, when it is installed) reading
the same record, a round of it before each round of the Python contenders, with its
round trip and CPU per GET beside this process's CPU per call.
cached_aside is built as its docs say, with `CacheEngine.from_url(url)`.

    python -m benchmarks --only hit_path
"""

from __future__ import annotations

import asyncio
import csv
import functools
import io
import resource
import shutil
import statistics
import subprocess
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

import msgpack
import redis
import redis.asyncio

from cached_aside import CacheEngine, cache_aside

from .runner import (
    Settings,
    Table,
    blocking_client,
    latency_table,
    measure_async,
    measure_sync,
)

RECORD = {
    "id": "p-001",
    "name": "Fountain pen",
    "price": "24.50",
    "stock": "41",
    "colour": "blue",
    "weight_g": "18",
    "sku": "FP-001-BL",
    "category": "pens",
}
BENCH_EXTRA = "pip install 'cached_aside[bench]'"
# Every contender's entries outlive the run (seconds): a timed call that found its
# entry expired would be a miss (and a raw GET of an expired key fails to unpack).
TTL = 3600
# The targets, as ratios to the raw call (median, from the same run).
TARGETS = {"msgpack": 0.85, "hash": 0.90}


# (mode, msgpack table, CPU µs per call by contender, its raw baseline): for the C
# client's table.
Measured = list[tuple[str, Table, dict[str, list[float]], str]]


class CClient:
    """The C client's GETs of one key over one connection, no pipelining
    (`redis-benchmark -c 1 -P 1`), a round per `round()`: its round trip per GET (its
    median latency, p50) and its CPU per GET (user + system of the child,
    from getrusage, less a start-up measured alone). `problem` says why there are
    no figures."""

    STARTS = 5  # runs of one GET, whose median CPU is the start-up's

    def __init__(self, url: str, gets: int) -> None:
        self.gets = gets
        self.key = "cached_aside:c-client:unset"  # the record's, once the run knows it
        self.round_trip_us: list[float] = []
        self.cpu_us: list[float] = []
        self.problem: str | None = None
        self.start_up_us = 0.0
        if shutil.which("redis-benchmark") is None:
            self.problem = "redis-benchmark is not installed (Debian's redis-tools has it)"
            return
        address = urlparse(url)
        self.command = ["redis-benchmark", "-h", address.hostname or "127.0.0.1"]
        self.command += ["-p", str(address.port or 6379), "-c", "1", "-P", "1", "--csv"]
        if address.username:
            self.command += ["--user", address.username]
        if address.password:
            self.command += ["-a", address.password]
        self.command += ["-n", "{gets}", "GET", "{key}"]
        starts = [self._run(1, start_up=True) for _ in range(self.STARTS)]
        if self.problem is None:
            self.start_up_us = statistics.median(cpu for _, cpu in starts)

    def _run(self, gets: int, start_up: bool = False) -> tuple[float, float]:
        """(median µs per GET, CPU µs of the whole run), or (0, 0) and `problem`
        set; a `start_up` run's µs per GET is 0 (of one GET, it may print none)."""
        if self.problem is not None:
            return 0.0, 0.0
        command = [part.format(gets=gets, key=self.key) for part in self.command]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            self.problem = f"redis-benchmark failed ({exc})"
            return 0.0, 0.0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
        if start_up and done.returncode == 0:
            return 0.0, cpu * 1e6
        # --csv: a header, then "GET key","rps","avg_latency_ms",...,"p50_latency_ms",...
        # The median, not the mean (rps): on a busy machine a few calls that wait for
        # the CPU make the mean many times the median, as they would the Python calls'.
        found = [row for row in csv.DictReader(io.StringIO(done.stdout)) if row.get("rps")]
        if not found:
            self.problem = f"redis-benchmark printed no GET figure ({done.stderr.strip()[:200]})"
            return 0.0, 0.0
        return float(found[-1]["p50_latency_ms"]) * 1000, cpu * 1e6

    def round(self) -> None:
        """One round of `gets` GETs, its figures appended."""
        round_trip, cpu = self._run(self.gets)
        if self.problem is None:
            self.round_trip_us.append(round_trip)
            self.cpu_us.append(max(0.0, cpu - self.start_up_us) / self.gets)

    def figures(self) -> tuple[float, float] | str:
        """(median µs per GET, median CPU µs per GET) over the rounds, or why none."""
        if self.problem is not None:
            return self.problem
        if not self.round_trip_us:
            return "no round ran"
        return statistics.median(self.round_trip_us), statistics.median(self.cpu_us)

    def describe(self) -> str:
        return f"redis-benchmark -c 1 -P 1 -n {self.gets} GET (the msgpack record's key)"


def floor_note(table: Table, baseline: str, c_client: CClient) -> str:
    figures = c_client.figures()
    if isinstance(figures, str):
        return f"floor: C client: {figures}"
    base = next(row[1] for row in table.rows if row[0] == baseline)
    return (
        f"floor: C client ({c_client.describe()}), a round before each of these: "
        f"{figures[0]:.1f} µs per GET, median of its {len(c_client.round_trip_us)} rounds "
        f"so far ({figures[0] / base:.3f}x {baseline})"
    )


def c_client_table(c_client: CClient, tables: Measured) -> Table:
    """Every contender of the msgpack tables against the C client of the same run:
    round trip and CPU per call, as ratios to it and to the mode's raw redis-py call."""
    table = Table(
        "hit path against the C client (same run)",
        [
            "contender",
            "median µs",
            "ratio to C client",
            "ratio to raw redis-py",
            "CPU µs per call",
            "CPU ratio to C client",
        ],
    )
    figures = c_client.figures()
    if isinstance(figures, str):
        table.notes.append(f"no C client figures: {figures}")
        c_round_trip = c_cpu = None
    else:
        c_round_trip, c_cpu = figures
    sync_raw = next(row[1] for row in tables[0][1].rows if row[0] == tables[0][3])

    def ratio(value: float, base: float | None) -> float | str:
        return round(value / base, 3) if base else "-"

    if c_round_trip is not None and c_cpu is not None:
        table.rows.append(
            [
                "C client (redis-benchmark)",
                round(c_round_trip, 1),
                1.0,
                ratio(c_round_trip, sync_raw),
                round(c_cpu, 1),
                1.0,
            ]
        )
    for mode, latencies, cpu, baseline in tables:
        raw = next(row[1] for row in latencies.rows if row[0] == baseline)
        for name, median, _p99, _ratio in latencies.rows:
            per_call = statistics.median(cpu[name])
            table.rows.append(
                [
                    f"{mode}: {name}",
                    median,
                    ratio(median, c_round_trip),
                    ratio(median, raw),
                    round(per_call, 2),
                    ratio(per_call, c_cpu),
                ]
            )
    table.notes += [
        f"C client: {c_client.describe()}, one round before each round of the Python "
        f"contenders (sync and async); its µs per GET is the median of its requests' "
        f"latencies (redis-benchmark's p50, to 1 µs), median over "
        f"{len(c_client.round_trip_us)} rounds",
        "CPU per call: user + system time over a round's calls, median over rounds; "
        "this process's for the Python contenders (its other threads included), the "
        f"child's for the C client less its start-up ({c_client.start_up_us:.0f} µs, "
        "the median of runs of one GET)",
        "ratio to raw redis-py: to the raw call of the row's own mode (the C client's: "
        "to the sync one)",
    ]
    return table


def target_note(table: Table, contender: str, baseline: str, kind: str) -> str:
    """Judged on the table's own ratio column (medians from this run)."""
    ratios = {row[0]: row[3] for row in table.rows}
    assert ratios[baseline] == 1.0, "the table's baseline is the raw call"
    ratio = ratios[contender]
    verdict = "met" if ratio <= TARGETS[kind] else "missed"
    return f"target: {contender} <= {TARGETS[kind]}x {baseline}: {ratio:.3f}, {verdict}"


class LoadCounter:
    """Counts loader calls, so a hit-path figure can prove no timed call loaded."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def loader(self, name: str) -> Callable[[str], dict[str, str]]:
        def load(id: str) -> dict[str, str]:
            self.calls[name] = self.calls.get(name, 0) + 1
            return dict(RECORD)

        return load

    def check(self) -> None:
        wrong = {name: n for name, n in self.calls.items() if n != 1}
        if wrong:
            raise SystemExit(f"contenders loaded more than once while timing hits: {wrong}")


def hot_path_note(engine: CacheEngine) -> str:
    """Which path the sync hits took: the held connection, or (on a redis-py it
    cannot drive) the client's; a figure must say which it measured."""
    held = engine.sides.sync_side().held  # the engine's own connection path, read not changed
    versions = f"redis-py {redis.__version__}"
    if held is None:
        return f"hot path: the client's ({versions}: no held connection for this client)"
    if held.problem is not None:
        return f"hot path: OFF, the client's ({held.problem})"
    if held.fallbacks:
        return f"hot path: held connection, {held.fallbacks} call(s) fell back ({versions})"
    return f"hot path: held connection, every call ({versions})"


def decode_hash(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {field.decode(): value.decode() for field, value in raw.items()}


def sync_peers(
    settings: Settings, prefix: str, counter: LoadCounter
) -> tuple[dict[str, Any], list[str]]:
    contenders: dict[str, Any] = {}
    notes: list[str] = []
    try:
        from dogpile.cache import make_region

        region = make_region(key_mangler=lambda key: f"{prefix}:dogpile:{key}").configure(
            "dogpile.cache.redis", expiration_time=TTL, arguments={"url": settings.url}
        )
        dogpile = region.cache_on_arguments()(counter.loader("dogpile.cache"))
        dogpile("p-001")
        contenders["dogpile.cache (redis backend)"] = lambda: dogpile("p-001")
    except ImportError:
        notes.append(f"dogpile.cache not installed ({BENCH_EXTRA})")
    try:
        from cachetools import TTLCache, cached

        in_process = cached(TTLCache(maxsize=1024, ttl=TTL))(counter.loader("cachetools"))
        in_process("p-001")
        contenders["cachetools TTLCache (in process)"] = lambda: in_process("p-001")
    except ImportError:
        notes.append(f"cachetools not installed ({BENCH_EXTRA})")
    lru = functools.lru_cache(maxsize=1024)(counter.loader("lru_cache"))
    lru("p-001")
    contenders["functools.lru_cache (in process)"] = lambda: lru("p-001")
    return contenders, notes


def run_sync(settings: Settings, prefix: str, c_client: CClient, measured: Measured) -> list[Table]:
    client = redis.Redis.from_url(settings.url)  # what a user writes: redis-py's defaults
    engine = CacheEngine.from_url(settings.url, prefix=prefix)
    counter = LoadCounter()
    get_product = cache_aside(key="product:<id>", ttl=TTL, as_hash=True, engine=engine)(
        counter.loader("cached_aside hash")
    )
    get_packed = cache_aside(key="packed:<id>", ttl=TTL, engine=engine)(
        counter.loader("cached_aside msgpack")
    )
    get_product("p-001")
    get_packed("p-001")
    hash_key, packed_key = get_product.key("p-001"), get_packed.key("p-001")
    c_client.key = packed_key
    peers, notes = sync_peers(settings, prefix, counter)
    cpu: dict[str, list[float]] = {}
    packed = latency_table(
        "sync hit, msgpack record",
        measure_sync(
            settings,
            {
                "raw redis-py GET + unpackb": lambda: msgpack.unpackb(client.get(packed_key)),
                "cached_aside (msgpack)": lambda: get_packed("p-001"),
                **peers,
            },
            "sync hit, msgpack",
            cpu=cpu,
            each_round=c_client.round,
        ),
        "raw redis-py GET + unpackb",
    )
    packed.notes = [
        *notes,
        hot_path_note(engine),
        "raw: redis.Redis.from_url(url), defaults; cached_aside: CacheEngine.from_url(url)",
        "peers use their own client on the same server; in-process caches for scale",
        target_note(packed, "cached_aside (msgpack)", "raw redis-py GET + unpackb", "msgpack"),
        floor_note(packed, "raw redis-py GET + unpackb", c_client),
    ]
    measured.append(("sync", packed, cpu, "raw redis-py GET + unpackb"))
    hashed = latency_table(
        "sync hit, hash record (8 fields)",
        measure_sync(
            settings,
            {
                "raw redis-py HGETALL": lambda: client.hgetall(hash_key),
                "raw HGETALL + decode to str": lambda: decode_hash(client.hgetall(hash_key)),
                "cached_aside (as_hash=True)": lambda: get_product("p-001"),
            },
            "sync hit, hash",
        ),
        "raw redis-py HGETALL",
    )
    hashed.notes = [
        "cached_aside returns str values, as the second row does",
        target_note(hashed, "cached_aside (as_hash=True)", "raw redis-py HGETALL", "hash"),
    ]
    counter.check()
    client.close()
    engine.close()
    return [packed, hashed]


async def run_async(
    settings: Settings, prefix: str, c_client: CClient, measured: Measured
) -> list[Table]:
    client = redis.asyncio.Redis.from_url(settings.url)  # redis-py's defaults
    engine = CacheEngine.from_url(settings.url, prefix=prefix)
    counter = LoadCounter()

    def async_loader(name: str) -> Callable[[str], Any]:
        load = counter.loader(name)

        async def loader(id: str) -> dict[str, str]:
            return load(id)

        return loader

    get_product = cache_aside(key="product:<id>", ttl=TTL, as_hash=True, engine=engine)(
        async_loader("cached_aside hash")
    )
    get_packed = cache_aside(key="packed:<id>", ttl=TTL, engine=engine)(
        async_loader("cached_aside msgpack")
    )
    await get_product("p-001")
    await get_packed("p-001")
    hash_key, packed_key = get_product.key("p-001"), get_packed.key("p-001")
    peers: dict[str, Any] = {}
    notes: list[str] = []
    closers: list[Any] = []
    try:
        from cashews import Cache as CashewsCache

        cashews = CashewsCache()
        cashews.setup(settings.url)
        cashed = cashews(ttl=TTL, key=prefix + ":cashews:product:{id}")(async_loader("cashews"))
        await cashed("p-001")
        peers["cashews (redis)"] = lambda: cashed("p-001")
        closers.append(cashews.close)
    except ImportError:
        notes.append(f"cashews not installed ({BENCH_EXTRA})")
    try:
        from aiocache import Cache, cached

        address = urlparse(settings.url)
        aio = cached(
            ttl=TTL,
            cache=Cache.REDIS,
            endpoint=address.hostname or "127.0.0.1",
            port=address.port or 6379,
            namespace=f"{prefix}:aiocache",
        )(async_loader("aiocache"))
        await aio("p-001")
        peers["aiocache (redis)"] = lambda: aio("p-001")
        closers.append(aio.cache.close)  # type: ignore[attr-defined]
    except ImportError:
        notes.append(f"aiocache not installed ({BENCH_EXTRA})")

    cpu: dict[str, list[float]] = {}

    async def raw_packed() -> Any:
        return msgpack.unpackb(await client.get(packed_key))

    async def raw_decoded() -> Any:
        return decode_hash(await client.hgetall(hash_key))

    try:
        packed = latency_table(
            "async hit, msgpack record",
            await measure_async(
                settings,
                {
                    "raw redis.asyncio GET + unpackb": raw_packed,
                    "cached_aside (msgpack)": lambda: get_packed("p-001"),
                    **peers,
                },
                "async hit, msgpack",
                cpu=cpu,
                each_round=c_client.round,
            ),
            "raw redis.asyncio GET + unpackb",
        )
        packed.notes = [
            *notes,
            "raw: redis.asyncio.Redis.from_url(url), defaults; cached_aside: "
            "CacheEngine.from_url(url)",
            target_note(
                packed, "cached_aside (msgpack)", "raw redis.asyncio GET + unpackb", "msgpack"
            ),
            floor_note(packed, "raw redis.asyncio GET + unpackb", c_client),
        ]
        measured.append(("async", packed, cpu, "raw redis.asyncio GET + unpackb"))
        hashed = latency_table(
            "async hit, hash record (8 fields)",
            await measure_async(
                settings,
                {
                    "raw redis.asyncio HGETALL": lambda: client.hgetall(hash_key),
                    "raw HGETALL + decode to str": raw_decoded,
                    "cached_aside (as_hash=True)": lambda: get_product("p-001"),
                },
                "async hit, hash",
            ),
            "raw redis.asyncio HGETALL",
        )
        hashed.notes = [
            target_note(hashed, "cached_aside (as_hash=True)", "raw redis.asyncio HGETALL", "hash")
        ]
        counter.check()
    finally:
        for close in closers:
            await close()
        await client.aclose()
        await engine.aclose()
    return [packed, hashed]


def run(settings: Settings) -> list[Table]:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    try:
        c_client = CClient(settings.url, settings.scaled(5000, 1000))
        measured: Measured = []
        tables = run_sync(settings, prefix, c_client, measured)
        tables += asyncio.run(run_async(settings, prefix, c_client, measured))
        return [*tables, c_client_table(c_client, measured)]
    finally:
        cleanup = blocking_client(settings.url)
        for key in cleanup.scan_iter(match=f"{prefix}:*"):
            cleanup.delete(key)
        cleanup.close()
