"""Redis killed, restarted empty, or paused, while threads and tasks keep calling:
every call still gets the primary's answer, the primary is protected by in-process
single-flight, and the cache heals by itself."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
import redis.connection

from cached_aside import CacheEngine, Source, cache_aside
from cached_aside._connections import Pipeline

from .conftest import eventually, wait_until
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

    def hit_after(self, at: float) -> bool:
        """Whether a call that started after `at` was a hit (the latest calls first)."""
        for started, _, _, source in reversed(self.calls):
            if started <= at:
                return False
            if source is Source.CACHE:
                return True
        return False


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
            run.calls.append((started, id, result.value, result.source))

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
    time.sleep(0.8)
    server.kill()
    loads_before = sum(primary.loads.values())
    time.sleep(1.5)
    loads_during = sum(primary.loads.values()) - loads_before
    server.start()  # same port, empty
    restarted = time.monotonic()
    time.sleep(1.5)
    assert wait_until(lambda: run.hit_after(restarted))  # a bound on a hang
    stop.set()
    for thread in threads:
        thread.join()
    to_first_hit = run.check(restarted)
    assert primary.most_at_once == 1  # one load per key per process, outage included
    assert engine.breaker.opened >= 1
    assert to_first_hit < FIRST_HIT_WITHIN
    print(
        f"\nthreads: {len(run.calls)} calls, 0 errors seen by callers, {loads_during} loads "
        f"during the 1.5 s outage, first hit {to_first_hit * 1000:.0f} ms after restart, "
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
            run.calls.append((started, id, result.value, result.source))
            await asyncio.sleep(0)

    workers = [asyncio.create_task(worker(i)) for i in range(50)]
    await asyncio.sleep(0.8)
    server.kill()
    loads_before = sum(primary.loads.values())
    await asyncio.sleep(1.5)
    loads_during = sum(primary.loads.values()) - loads_before
    await asyncio.to_thread(server.start)
    restarted = time.monotonic()
    await asyncio.sleep(1.5)
    assert await eventually(lambda: run.hit_after(restarted))  # a bound on a hang
    stopping.set()
    await asyncio.gather(*workers)
    to_first_hit = run.check(restarted)
    assert primary.most_at_once == 1
    assert to_first_hit < FIRST_HIT_WITHIN
    print(
        f"\ntasks: {len(run.calls)} calls, 0 errors seen by callers, {loads_during} loads "
        f"during the 1.5 s outage, first hit {to_first_hit * 1000:.0f} ms after restart, "
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
    time.sleep(0.5)
    server.pause()
    paused = time.monotonic()
    time.sleep(2.0)
    server.resume()
    resumed = time.monotonic()
    time.sleep(1.0)
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
    from cached_aside import CacheUnavailableError

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
    engine.close()


def test_a_call_on_a_hung_server_waits_out_one_timeout(
    server: RedisProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counted, not timed: each call before the breaker opens waits out one socket
    timeout (it waited out three or four: the held connection's, then the client's
    and its retry's, and a reconnect's handshake); then the breaker opens after
    `breaker_failures` of them and calls skip Redis. benchmarks/outage.py times it."""
    timeouts: list[str] = []
    read = redis.connection.AbstractConnection.read_response

    def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return read(self, *args, **kwargs)
        except redis.TimeoutError:
            timeouts.append("read")
            raise

    monkeypatch.setattr(redis.connection.AbstractConnection, "read_response", counting)
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
    assert per_call == [1] * engine.breaker.threshold + [0, 0]
    await engine.aclose()
