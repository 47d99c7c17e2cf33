"""Redis servers of the tests' own, failing under the calls: killed, restarted empty,
paused, hung, out of memory, a replica refusing writes, still loading its data, closing
connections. Every call still gets the primary's answer, locks are given back, the
primary is protected by in-process single-flight, and the cache heals by itself."""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
import redis.asyncio
import redis.asyncio.retry
import redis.connection

import cached_aside._connections
from cached_aside import (
    CacheEngine,
    CacheUnavailableError,
    NearCache,
    Source,
    cache_aside,
)
from cached_aside._connections import Pipeline

from .conftest import (
    WOKEN_WITHIN,
    Harness,
    eventually,
    unique_prefix,
    wait_until,
)
from .servers import REDIS_SERVER, RedisProcess

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not on PATH"),
]
KEYS = [f"k{i}" for i in range(20)]
# Hits resume once the breaker's 0.5 s cool-down ends and a probe reconnects (about
# 0.5 s, printed): a generous bound for a loaded machine, far below a client that
# backs off for seconds or a breaker that never closes.
FIRST_HIT_WITHIN = 5.0


@pytest.fixture
def server() -> Iterator[RedisProcess]:
    process = RedisProcess().start()
    yield process
    process.stop()


class Primary:
    """A loader that counts loads per key and how many of one key ran at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.loads: dict[str, int] = defaultdict(int)
        self.running: dict[str, int] = defaultdict(int)
        self.most_at_once = 0

    def enter(self, id: str) -> None:
        with self.lock:
            self.loads[id] += 1
            self.running[id] += 1
            self.most_at_once = max(self.most_at_once, self.running[id])

    def leave(self, id: str) -> str:
        with self.lock:
            self.running[id] -= 1
        return f"value-{id}"


@dataclass
class Run:
    calls: list[tuple[float, str, Any, Source]] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    # Each key's latest hit, by when its call started: what the phases wait on.
    last_hit: dict[str, float] = field(default_factory=dict)

    def record(self, started: float, id: str, result: Any) -> None:
        self.calls.append((started, id, result.value, result.source))
        if result.source is Source.CACHE:
            self.last_hit[id] = max(started, self.last_hit.get(id, started))

    def every_key_hit_after(self, at: float) -> bool:
        """Whether each key was a hit in a call that started after `at` (the cache
        warm again, every key reloaded)."""
        return len(self.last_hit) == len(KEYS) and min(self.last_hit.values()) > at

    def check(self, recovered_at: float) -> float:
        """Assert every answer was right; returns seconds to the first hit after recovery."""
        assert self.errors == []
        assert self.calls
        assert all(value == f"value-{id}" for _, id, value, _ in self.calls)
        hits = [
            at for at, _, _, source in self.calls if at > recovered_at and source is Source.CACHE
        ]
        assert hits, "no hits after Redis came back"
        return min(hits) - recovered_at


def call_in_threads(
    function: Any, run: Run, stop: threading.Event, workers: int = 8
) -> list[threading.Thread]:
    def worker(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            id = rng.choice(KEYS)
            started = time.monotonic()
            try:
                result = function.lookup(id)
            except Exception as exc:  # the test is that this never happens
                run.errors.append(exc)
                continue
            run.record(started, id, result)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
    for thread in threads:
        thread.start()
    return threads


def test_killed_and_restarted_under_threads(server: RedisProcess) -> None:
    engine = CacheEngine.from_url(server.url, prefix="fault")
    primary = Primary()

    @cache_aside(key="item:<id>", ttl=60, engine=engine)
    def load(id: str) -> str:
        primary.enter(id)
        time.sleep(0.005)
        return primary.leave(id)

    run, stop = Run(), threading.Event()
    threads = call_in_threads(load, run, stop)
    assert wait_until(lambda: run.every_key_hit_after(0.0))  # warm
    server.kill()
    killed = time.monotonic()
    loads_before = sum(primary.loads.values())
    # Down until the breaker opened, and opened again when its probe found Redis
    # still gone: every state of the outage passed, the callers answered throughout.
    assert wait_until(lambda: engine.breaker.opened >= 2)  # a bound on a hang
    loads_during = sum(primary.loads.values()) - loads_before
    outage = time.monotonic() - killed
    server.start()  # same port, empty
    restarted = time.monotonic()
    # Until every key was reloaded (one load per key per process) and hit again.
    assert wait_until(lambda: run.every_key_hit_after(restarted))  # a bound on a hang
    stop.set()
    for thread in threads:
        thread.join()
    to_first_hit = run.check(restarted)
    assert primary.most_at_once == 1  # one load per key per process, outage included
    assert engine.breaker.opened >= 1
    assert to_first_hit < FIRST_HIT_WITHIN
    print(
        f"\nthreads: {len(run.calls)} calls, 0 errors seen by callers, {loads_during} loads "
        f"during the {outage:.1f} s outage, first hit {to_first_hit * 1000:.0f} ms after restart, "
        f"Redis errors by kind {load.error_kinds()}"
    )
    engine.close()


async def test_killed_and_restarted_under_tasks(server: RedisProcess) -> None:
    engine = CacheEngine.from_url(server.url, prefix="fault")
    primary = Primary()

    @cache_aside(key="item:<id>", ttl=60, engine=engine)
    async def load(id: str) -> str:
        primary.enter(id)
        await asyncio.sleep(0.005)
        return primary.leave(id)

    run, stopping = Run(), asyncio.Event()

    async def worker(seed: int) -> None:
        rng = random.Random(seed)
        while not stopping.is_set():
            id = rng.choice(KEYS)
            started = time.monotonic()
            try:
                result = await load.lookup(id)
            except Exception as exc:  # the test is that this never happens
                run.errors.append(exc)
                continue
            run.record(started, id, result)
            await asyncio.sleep(0)

    workers = [asyncio.create_task(worker(i)) for i in range(50)]
    assert await eventually(lambda: run.every_key_hit_after(0.0))  # warm
    server.kill()
    killed = time.monotonic()
    loads_before = sum(primary.loads.values())
    # Down until the breaker opened, and opened again when its probe found Redis
    # still gone: every state of the outage passed, the callers answered throughout.
    assert await eventually(lambda: engine.breaker.opened >= 2)  # a bound on a hang
    loads_during = sum(primary.loads.values()) - loads_before
    outage = time.monotonic() - killed
    await asyncio.to_thread(server.start)
    restarted = time.monotonic()
    # Until every key was reloaded (one load per key per process) and hit again.
    assert await eventually(lambda: run.every_key_hit_after(restarted))  # a bound on a hang
    stopping.set()
    await asyncio.gather(*workers)
    to_first_hit = run.check(restarted)
    assert primary.most_at_once == 1
    assert to_first_hit < FIRST_HIT_WITHIN
    print(
        f"\ntasks: {len(run.calls)} calls, 0 errors seen by callers, {loads_during} loads "
        f"during the {outage:.1f} s outage, first hit {to_first_hit * 1000:.0f} ms after restart, "
        f"Redis errors by kind {load.error_kinds()}"
    )
    await engine.aclose()


def test_paused_server_costs_callers_a_few_timeouts_then_nothing(server: RedisProcess) -> None:
    engine = CacheEngine.from_url(server.url, prefix="pause")
    primary = Primary()

    @cache_aside(key="item:<id>", ttl=60, engine=engine)
    def load(id: str) -> str:
        primary.enter(id)
        return primary.leave(id)

    run, stop = Run(), threading.Event()
    threads = call_in_threads(load, run, stop)
    assert wait_until(lambda: run.every_key_hit_after(0.0))  # warm
    server.pause()
    paused = time.monotonic()
    time.sleep(2.0)  # the pause: long enough for calls skipping Redis to outnumber timeouts
    server.resume()
    resumed = time.monotonic()
    assert wait_until(lambda: run.every_key_hit_after(resumed))  # a bound on a hang
    stop.set()
    for thread in threads:
        thread.join()
    run.check(resumed)
    kinds = load.error_kinds()
    during = [call for call in run.calls if paused <= call[0] < resumed]
    # The breaker turned a hung server into quick answers: a handful of calls waited
    # for a socket timeout, every other call during the pause skipped Redis.
    assert kinds.get("CircuitOpenError", 0) > 10 * kinds.get("TimeoutError", 0)
    assert len(during) > 100
    print(f"\npaused 2 s: {len(during)} calls answered during the pause; errors by kind {kinds}")
    engine.close()


def test_scripts_survive_a_script_flush_and_a_restart(server: RedisProcess) -> None:
    engine = CacheEngine.from_url(server.url, prefix="scripts")
    calls: list[str] = []

    @cache_aside(key="item:<id>", ttl=60, engine=engine)
    def load(id: str) -> str:
        calls.append(id)
        return id

    assert load("a") == "a"
    engine.client().script_flush()
    assert load("b") == "b"  # NOSCRIPT: redis-py's Script loads it again
    server.kill()
    server.start()
    time.sleep(engine.breaker.cooldown)  # the breaker may have opened; let it probe
    assert load("c") == "c"
    assert load.lookup("c").source is Source.CACHE
    assert calls == ["a", "b", "c"]
    engine.close()


def test_fail_open_false_raises_cache_unavailable(server: RedisProcess) -> None:

    engine = CacheEngine.from_url(server.url, prefix="strict")
    calls: list[str] = []

    @cache_aside(key="item:<id>", ttl=60, engine=engine, fail_open=False)
    def load(id: str) -> str:
        calls.append(id)
        return id

    assert load("a") == "a"
    server.kill()
    with pytest.raises(CacheUnavailableError, match="fail_open=False"):
        load("a")
    with pytest.raises(CacheUnavailableError):
        load.invalidate("a")
    assert calls == ["a"]  # the loader was not called behind the caller's back
    engine.close(timeout=0)  # its last try at the invalidation would wait 1 s on a dead server


def test_a_call_on_a_hung_server_waits_out_one_timeout(
    server: RedisProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counted, not timed: each call before the breaker opens waits out one socket
    timeout (it waited out three or four: the held connection's, then the client's
    and its retry's, and a reconnect's handshake); then the breaker opens after
    `breaker_failures` of them and calls skip Redis. benchmarks/outage.py times it."""
    timeouts: list[str] = []
    read = redis.connection.AbstractConnection.read_response
    lean_read = cached_aside._connections.read  # the hit's read: the lean wire

    def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return read(self, *args, **kwargs)
        except redis.TimeoutError:
            timeouts.append("read")
            raise

    def counting_lean(connection: Any) -> Any:
        try:
            return lean_read(connection)
        except redis.TimeoutError:
            timeouts.append("lean read")
            raise

    monkeypatch.setattr(redis.connection.AbstractConnection, "read_response", counting)
    monkeypatch.setattr(cached_aside._connections, "read", counting_lean)
    engine = CacheEngine.from_url(server.url, prefix="hung", socket_timeout=0.2)

    @cache_aside(key="item:<id>", ttl=60, engine=engine)
    def load(id: str) -> str:
        return f"value-{id}"

    for id in ("w1", "w2"):  # warm: the client, its pool, this thread's connection
        load(id)
    server.pause()
    per_call = []
    for i in range(engine.breaker.threshold + 2):
        before = len(timeouts)
        assert load(f"cold{i}") == f"value-cold{i}"  # served by the loader
        per_call.append(len(timeouts) - before)
    server.resume()
    threshold = engine.breaker.threshold
    assert per_call == [1] * threshold + [0, 0]
    assert engine.breaker.opened == 1
    assert load.error_kinds() == {"TimeoutError": threshold, "CircuitOpenError": 2}
    engine.close()


@pytest.mark.parametrize(
    "url",
    [
        "redis://no-such-host.invalid:6379/0",  # the name does not resolve
        "redis+cluster://no-such-host.invalid:7000",  # nor the cluster node's
        "redis+sentinel://no-such-host.invalid:26379/mymaster",  # nor the sentinel's
    ],
)
async def test_a_host_that_does_not_resolve_fails_open(url: str) -> None:
    """Sync and async calls are served by the loader, each failure counted, until the
    breaker opens; the engine was built without error (nothing connects then)."""
    engine = CacheEngine.from_url(url, breaker_cooldown=60)
    loads: list[str] = []

    @cache_aside(key="dns:<id>", ttl=30, engine=engine)
    def load(id: str) -> str:
        loads.append(id)
        return id.upper()

    @cache_aside(key="adns:<id>", ttl=30, engine=engine)
    async def aload(id: str) -> str:
        loads.append(id)
        return id.upper()

    for id in ("a", "b", "c", "d"):
        assert load(id) == id.upper()
        assert await aload(id) == id.upper()
    assert len(loads) == 8
    assert engine.stats().errors == 8
    assert engine.breaker.opened >= 1
    await engine.aclose()


async def test_an_async_call_on_a_hung_server_loses_its_connection_once(
    server: RedisProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counted, not timed: the loop's shared connection gives up once per call on a
    hung server (it sent the command again after a timeout, and waited again)."""
    lost: list[str] = []
    original = Pipeline._lost

    async def counting(self: Pipeline, connection: Any, exc: Exception) -> None:
        lost.append(type(exc).__name__)
        await original(self, connection, exc)

    monkeypatch.setattr(Pipeline, "_lost", counting)
    engine = CacheEngine.from_url(server.url, prefix="ahung", socket_timeout=0.2)

    @cache_aside(key="item:<id>", ttl=60, engine=engine)
    async def load(id: str) -> str:
        return f"value-{id}"

    for id in ("w1", "w2"):
        await load(id)
    server.pause()
    per_call = []
    try:
        for i in range(engine.breaker.threshold + 2):
            before = len(lost)
            assert await load(f"cold{i}") == f"value-cold{i}"
            per_call.append(len(lost) - before)
    finally:
        server.resume()
    # Never twice in one call. Until the breaker opens, each call's lookup gives up
    # once; on a loaded machine one may instead time out reconnecting (counted, not
    # a loss of the connection), so the breaker can open a call sooner.
    assert all(lost <= 1 for lost in per_call), per_call
    assert per_call[0] == 1, per_call
    assert per_call[-2:] == [0, 0], per_call  # the breaker open: nobody waits on it
    await engine.aclose()


@pytest.fixture
def servers() -> Iterator[Callable[..., RedisProcess]]:
    """Starts redis-servers of the test's own (arguments as for RedisProcess), each
    stopped by PID afterwards however the test ends."""
    if REDIS_SERVER is None:
        pytest.fail("redis-server is not on PATH")
    made: list[RedisProcess] = []

    def start(*extra: str) -> RedisProcess:
        made.append(RedisProcess(*extra))
        return made[-1].start()

    yield start
    for process in made:
        process.stop()


def test_the_near_cache_listener_losing_redis_is_logged(
    server: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """operations.md, "What is logged": when the near cache's listener loses Redis (the
    tier goes off until it is back)."""
    engine = CacheEngine.from_url(server.url, prefix=unique_prefix(), near=NearCache())

    @cache_aside(key="near:<id>", ttl=30, engine=engine)
    def load(id: str) -> str:
        return id

    def said_off() -> bool:
        return any("near cache off" in record.getMessage() for record in caplog.records)

    try:
        with caplog.at_level(logging.WARNING, logger="cached_aside"):
            assert load("a") == "a"
            assert engine.near_state() == "tracking"
            assert not said_off()
            server.kill()
            assert wait_until(said_off)
        assert engine.near_state() == "down"
    finally:
        engine.close()


@pytest.mark.parametrize("drop", ["client kill", "restart"])
@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_pooled_connection_the_server_closed_costs_no_error(
    server: RedisProcess, mode: str, drop: str
) -> None:
    """configuration.md: the single immediate retry heals a pooled connection the server
    closed (after a restart): the next call is still a hit, with no error counted."""
    admin = server.admin()
    engine = CacheEngine.from_url(server.url, prefix=unique_prefix())
    h = Harness(mode, "private server", engine, admin)

    def load(id: str) -> str:
        return id.upper()

    fn = h.cached(load, key="dropped:<id>")
    try:
        assert (await h.run(fn.lookup, "a")).source is Source.LOADER
        assert (await h.run(fn.lookup, "a")).source is Source.CACHE  # its connections pooled
        if drop == "client kill":
            assert admin.client_kill_filter(_type="normal", skipme=True) >= 1
        else:
            admin.save()  # the restarted server loads the entry back
            server.kill()
            server.start()
        result = await h.run(fn.lookup, "a")
        assert (result.value, result.source) == ("A", Source.CACHE)
        assert fn.stats().errors == 0
    finally:
        admin.close()
        await engine.aclose()


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_waiters_connection_dropped_mid_wait_is_retried_at_once(
    patient_waiters: None, server: RedisProcess, mode: str
) -> None:
    """configuration.md: one immediate retry, no backoff. A waiter blocked in BLPOP whose
    connection the server kills blocks again at once on a new one, and gets the
    owner's value the moment it is stored, with no error counted."""
    prefix = unique_prefix()
    admin = server.admin()
    owner_engine = CacheEngine.from_url(server.url, prefix=prefix)
    # A 5 s socket timeout lets the waiter block 2.5 s per BLPOP: the kill lands mid-wait.
    waiter_engine = CacheEngine.from_url(server.url, prefix=prefix, socket_timeout=5.0)
    loading, release = threading.Event(), threading.Event()

    @cache_aside(key="dropped-wait:<id>", ttl=30, engine=owner_engine)
    def owner(id: str) -> str:
        loading.set()
        assert release.wait(10)
        return id.upper()

    def never(id: str) -> str:
        return "loaded by the waiter"

    side = Harness(mode, "private server", waiter_engine, admin)
    waiter = side.cached(never, key="dropped-wait:<id>")
    released_at: list[float] = []
    killed: list[int] = []

    def blocked() -> list[int]:
        return [int(c["id"]) for c in admin.client_list() if "b" in c["flags"]]

    def drop_then_release() -> None:
        assert wait_until(blocked)
        for client_id in blocked():
            killed.append(admin.client_kill_filter(_id=client_id))
        released_at.append(time.monotonic())
        release.set()

    owner_thread = threading.Thread(target=owner, args=("k",))
    owner_thread.start()
    dropper = threading.Thread(target=drop_then_release)
    try:
        assert await asyncio.to_thread(loading.wait, 5)
        dropper.start()
        result = await side.run(waiter.lookup, "k")
        done_at = time.monotonic()
    finally:
        release.set()
        await asyncio.to_thread(owner_thread.join, 10)
        if dropper.ident is not None:
            await asyncio.to_thread(dropper.join, 10)
        admin.close()
        await waiter_engine.aclose()
        await owner_engine.aclose()
    assert killed == [1]
    assert (result.value, result.source) == ("K", Source.WAITED)
    assert waiter.stats().errors == 0
    # Retried at once: woken by the store, not after a backoff or a 2.5 s BLPOP.
    assert done_at - released_at[0] < WOKEN_WITHIN


async def test_a_replica_refusing_writes_fails_open(
    servers: Callable[..., RedisProcess],
) -> None:
    """operations.md: `READONLY`... with fail_open=True the loader runs and the caller
    gets its value; nothing is cached (a failover pointed the engine at a replica)."""
    master, replica = servers(), servers()
    engine = CacheEngine.from_url(replica.url, prefix=unique_prefix())
    admin = replica.admin()
    try:
        # Redis waits repl-diskless-sync-delay (5 s) before a replica's first sync:
        # as long as this test would wait for it.
        primary = master.admin()
        primary.config_set("repl-diskless-sync-delay", 0)
        primary.close()
        admin.replicaof("127.0.0.1", master.port)
        link_up = lambda: admin.info("replication")["master_link_status"] == "up"  # noqa: E731
        assert wait_until(link_up, timeout=20)

        @cache_aside(key="readonly:<id>", ttl=30, engine=engine)
        def plain(id: str) -> str:
            return id.upper()

        @cache_aside(key="readonly-async:<id>", ttl=30, engine=engine)
        async def coroutine(id: str) -> str:
            return id.upper()

        for number in range(3):
            result = plain.lookup(f"a{number}")
            assert (result.value, result.source) == (f"A{number}", Source.LOADER)
            result = await coroutine.lookup(f"a{number}")
            assert (result.value, result.source) == (f"A{number}", Source.LOADER)
        for fn in (plain, coroutine):
            kinds = fn.error_kinds()
            assert "ReadOnlyError" in kinds
            assert set(kinds) <= {"ReadOnlyError", "CircuitOpenError"}
            assert fn.stats().errors >= 3
        assert admin.dbsize() == 0
        admin.replicaof("NO", "ONE")  # writable again: what the outbox holds lands
        assert await engine.asettle()
    finally:
        admin.close()
        await engine.aclose()


async def test_a_server_still_loading_its_data_fails_open(
    servers: Callable[..., RedisProcess],
) -> None:
    """operations.md: `LOADING`... with fail_open=True the loader runs. A real server
    reloading its RDB file, slowed per key (key-load-delay) so that the load lasts
    long enough to call it meanwhile."""
    server = servers("--key-load-delay", "50", "--loading-process-events-interval-bytes", "1024")
    admin = server.admin()
    pipe = admin.pipeline(transaction=False)
    for number in range(30_000):
        pipe.set(f"filler:{number}", number)
    pipe.execute()
    admin.save()
    admin.close()
    server.kill()
    starter = threading.Thread(target=server.start)  # returns once loading is over
    probe = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=2, retry=None)
    engine = CacheEngine.from_url(server.url, prefix=unique_prefix())

    def loading() -> bool:
        try:
            probe.ping()
        except redis.exceptions.BusyLoadingError:
            return True
        except redis.ConnectionError:
            return False
        return False

    try:
        starter.start()
        assert await eventually(loading)

        @cache_aside(key="loading:<id>", ttl=30, engine=engine)
        def plain(id: str) -> str:
            return id.upper()

        @cache_aside(key="loading-async:<id>", ttl=30, engine=engine)
        async def coroutine(id: str) -> str:
            return id.upper()

        first = plain.lookup("a")
        second = await coroutine.lookup("a")
        assert loading()  # both calls met the server loading
        assert (first.value, first.source) == ("A", Source.LOADER)
        assert (second.value, second.source) == ("A", Source.LOADER)
        assert "BusyLoadingError" in plain.error_kinds()
        assert "BusyLoadingError" in coroutine.error_kinds()
    finally:
        probe.close()
        if starter.ident is not None:
            await asyncio.to_thread(starter.join, 60)
        await engine.aclose()


@pytest.fixture
def small_server() -> Iterator[RedisProcess]:
    if REDIS_SERVER is None:
        pytest.fail("redis-server is not on PATH")
    process = RedisProcess("--maxmemory-policy", "noeviction").start()
    yield process
    process.stop()


def test_a_store_refused_for_lack_of_memory_gives_the_lock_back(
    small_server: RedisProcess,
) -> None:
    """Redis runs out of memory while the loader runs: the store is refused with
    OOM, the caller still gets the loader's value, and the lock is released (DEL
    works when writes are refused), so another process loads at once."""
    admin = small_server.admin()
    prefix = unique_prefix()
    engine = CacheEngine.from_url(small_server.url, prefix=prefix)
    other = CacheEngine.from_url(small_server.url, prefix=prefix)

    @cache_aside(key="row:<id>", ttl=30, engine=engine)
    def row(id: str) -> str:
        admin.config_set("maxmemory", 100_000)  # far below what Redis already uses
        return id * 100

    assert row("a") == "a" * 100
    assert row.error_kinds() == {"OutOfMemoryError": 1}  # the store, refused
    assert admin.exists(row.key("a") + ":lock") == 0
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        admin.set("still", "full")  # writes are still refused: the release got through
    admin.config_set("maxmemory", 0)
    again = cache_aside(key="row:<id>", ttl=30, engine=other)(lambda id: id * 100)
    assert again.lookup("a").source is Source.LOADER
    assert again.stats().lock_waits == 0
    engine.close()
    other.close()


def test_a_batch_gives_back_a_refused_lock_before_it_waits_on_other_entries(
    small_server: RedisProcess,
) -> None:
    """many(['a', 'b']): 'a' is ours, 'b' is another process's slow load. The store of
    'a' is refused (out of memory for an instant); its lock goes back at once, not
    after this call has waited out 'b', so another caller of 'a' does not wait.
    'b' loads until the caller of 'a' has its answer (10 s at most, as long as it
    slept before): the batch ends only after that answer, whether or not 'a' waited."""
    admin = small_server.admin()
    prefix = unique_prefix()
    mine, owner, third = (CacheEngine.from_url(small_server.url, prefix=prefix) for _ in range(3))
    waited: list[float] = []
    memory_back = threading.Event()
    a_answered = threading.Event()

    def ask_for_a() -> None:
        started = time.monotonic()
        cache_aside(key="row:<id>", ttl=60, lock_ttl=3, engine=third)(lambda id: id)("a")
        waited.append(time.monotonic() - started)
        a_answered.set()

    def load_b(id: str) -> str:
        a_answered.wait(10)
        return id

    def batch(ids: list[str]) -> list[str]:
        admin.config_set("maxmemory", 1)  # the store that follows is refused

        def recover() -> None:
            time.sleep(0.05)
            admin.config_set("maxmemory", 0)
            memory_back.set()
            ask_for_a()

        threading.Thread(target=recover).start()
        return list(ids)

    row = cache_aside(key="row:<id>", ttl=60, lock_ttl=3, engine=mine, batch_loader=batch)(
        lambda id: id
    )
    slow = cache_aside(key="row:<id>", ttl=60, lock_ttl=3, engine=owner)(load_b)
    threading.Thread(target=slow, args=("b",), daemon=True).start()
    assert wait_until(lambda: admin.exists(slow.key("b") + ":lock"))  # b is loading
    assert row.many(["a", "b"]) == ["a", "b"]  # waited for b's load (its lease renewed)
    assert memory_back.is_set()
    assert wait_until(lambda: waited)
    # at once, not when the lock's 3 s ttl or this call's wait for b was over (a bound
    # for a slow machine)
    assert waited[0] < 2.0, f"the caller of 'a' waited {waited[0]:.2f} s"
    for engine in (mine, owner, third):
        engine.close(timeout=0.1)
