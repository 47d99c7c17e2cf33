"""Redis Sentinel: `redis+sentinel://` URLs and engines built from redis-py's Sentinel
clients, against real redis-sentinel processes of the tests' own (a master, a
replica, three sentinels with quorum 2), sync and async; a failover during traffic
costs callers no errors and hits resume on the promoted replica."""

from __future__ import annotations

import asyncio
import random
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio.sentinel
import redis.sentinel

from cached_aside import (
    CacheEngine,
    ConfigurationError,
    NearCache,
    Outcome,
    Source,
    cache_aside,
)
from cached_aside._sentinel import parse_sentinel_url

from .conftest import PATIENCE, eventually, unique_prefix, wait_until
from .servers import (
    REDIS_SENTINEL,
    REDIS_SERVER,
    RedisProcess,
    RedisSentinelProcesses,
    SentinelProcess,
    free_port,
)
from .test_cli import cli

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "integrations" / "sentinel.md"
KEYS = [f"k{i}" for i in range(20)]
# A call begun this soon after the kill may still share a read sent before it (callers
# of one key share a read in flight): its hit is the old master's.
SHARED_READ_SLACK = 0.05
MISSING = (
    "this test runs real redis-sentinel and redis-server processes: install Debian's "
    "redis-sentinel and redis-server packages (apt-get install redis-sentinel "
    "redis-server; .ci/run does when run as root)"
)


def require_servers() -> None:
    """CI runs every test: a missing server is a failure that says what to install."""
    if REDIS_SENTINEL is None or REDIS_SERVER is None:
        pytest.fail(MISSING)


@pytest.fixture(scope="module")
def sentinels() -> Iterator[RedisSentinelProcesses]:
    """One topology for the tests that do not fail it over."""
    require_servers()
    processes = RedisSentinelProcesses().start()
    yield processes
    processes.stop()


@pytest.fixture
def fresh_sentinels() -> Iterator[RedisSentinelProcesses]:
    """A topology of the test's own, to fail over."""
    require_servers()
    processes = RedisSentinelProcesses().start()
    yield processes
    processes.stop()


# -- the URL --------------------------------------------------------------------


def test_sentinel_urls_are_parsed() -> None:
    parsed = parse_sentinel_url(
        "redis+sentinel://user:p%40ss@h1:26380,h2,[::1]:26381/my-master/3"
        "?socket_timeout=0.5&sentinel_password=s3&min_other_sentinels=1&client_name=app"
    )
    assert parsed.sentinels == [("h1", 26380), ("h2", 26379), ("::1", 26381)]
    assert (parsed.service, parsed.tls, parsed.min_other_sentinels) == ("my-master", False, 1)
    assert parsed.options == {
        "username": "user",
        "password": "p@ss",
        "db": 3,
        "socket_timeout": 0.5,
        "client_name": "app",
    }
    assert parsed.sentinel_options == {"password": "s3"}
    tls = parse_sentinel_url("rediss+sentinel://:pw@h:1/svc")
    assert (tls.tls, tls.options, tls.service) == (True, {"password": "pw"}, "svc")
    assert parse_sentinel_url("redis+sentinel://h/svc/?db=2").options == {"db": 2}


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel:///mymaster", "no sentinel address"),
        ("redis+sentinel://h:26379", "no service name"),
        ("redis+sentinel://h:26379/", "no service name"),
        ("redis+sentinel://h:26379,h2:x/mymaster", "bad port in 'h2:x'"),
        ("redis+sentinel://h:0/mymaster", "bad port in 'h:0'"),
        ("redis+sentinel://h:70000/mymaster", "a number from 1 to 65535"),
        ("redis+sentinel://h:/mymaster", "no port after the colon"),
        ("redis+sentinel://h,,h2/mymaster", "an empty sentinel address"),
        ("redis+sentinel://::1:26379/mymaster", "write an IPv6 address as"),
        ("redis+sentinel://h/mymaster/zero", "the database must be a whole number"),
        ("redis+sentinel://h/mymaster/0/1", "too many path segments"),
        ("redis+sentinel://h/mymaster/0?db=1", "the database is given twice"),
        ("redis+sentinel://h/mymaster?sockettimeout=1", "unknown option 'sockettimeout'"),
        ("redis+sentinel://h/mymaster?socket_timeout=soon", "bad value 'soon' for socket_timeout"),
        ("redis+sentinel://h/mymaster?min_other_sentinels=-1", "min_other_sentinels"),
        ("redis+sentinel://:secret@h:x/mymaster", "bad port"),
        ("redis+sentinel://[::1]:/mymaster", "no port after the colon in '\\[::1\\]:'"),
        ("redis+sentinel://h:\u00b2/mymaster", "bad port"),
        ("redis+sentinel://h:\u0663/mymaster", "bad port"),
        ("redis+sentinel://h/mymaster?socket_timeout=-1", "seconds > 0"),
        ("redis+sentinel://h/mymaster?max_connections=0", "max_connections"),
        ("redis+sentinel://h/mymaster?decode_responses=yes", "decode_responses must stay off"),
    ],
)
def test_bad_sentinel_urls_are_refused_when_the_engine_is_built(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as caught:
        CacheEngine.from_url(url)
    assert "secret" not in str(caught.value)  # a password never reaches a log
    assert "expected redis+sentinel://" in str(caught.value)


def test_sentinel_options_that_cannot_apply_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="the sentinels say where the master is"):
        CacheEngine.from_url("redis+sentinel://h/mymaster", host="10.0.0.1")
    with pytest.raises(ConfigurationError, match="sentinel_kwargs must be a dict"):
        CacheEngine.from_url("redis+sentinel://h/mymaster", sentinel_kwargs="password=x")
    with pytest.raises(ConfigurationError, match="ssl_ca_certs: TLS is chosen by the scheme"):
        CacheEngine.from_url("redis+sentinel://h/mymaster", ssl_ca_certs="/ca.pem")
    with pytest.raises(ConfigurationError, match="use rediss"):
        CacheEngine.from_url("redis+sentinel://h/mymaster?ssl_cert_reqs=none")
    with pytest.raises(ConfigurationError, match="ssl: TLS is chosen by the scheme"):
        CacheEngine.from_url("redis+sentinel://h/mymaster", ssl=True)
    # Nothing connects before the first call: these hosts need not exist.
    CacheEngine.from_url("rediss+sentinel://h/mymaster?ssl_cert_reqs=none", ssl_ca_certs="/ca")


# -- through a Sentinel URL, and through clients the user made -----------------------


@pytest.mark.slow
def test_sync_hit_miss_invalidate_through_a_sentinel_url(
    sentinels: RedisSentinelProcesses,
) -> None:
    engine = CacheEngine.from_url(sentinels.url(), prefix="sync")
    loads: list[str] = []

    @cache_aside(key="item:<id>", ttl=60, engine=engine)
    def read(id: str) -> dict[str, str] | None:
        loads.append(id)
        return None if id == "missing" else {"id": id}

    assert read.lookup("a").source is Source.LOADER
    assert read.lookup("a").source is Source.CACHE
    assert read("a") == {"id": "a"}
    assert read.lookup("missing").source is Source.LOADER
    assert read.lookup("missing").source is Source.NEGATIVE
    assert read.invalidate("a") is Outcome.DELETED
    assert read.lookup("a").source is Source.LOADER
    assert loads == ["a", "missing", "a"]
    # On the master the sentinels name, and replicated to the replica.
    master = sentinels.server_on(sentinels.master_port())
    assert master.admin().exists(read.key("a")) == 1
    pool = engine.client().connection_pool
    assert pool.master_address == ("127.0.0.1", master.port)
    engine.close()


@pytest.mark.slow
async def test_async_hit_miss_invalidate_through_a_sentinel_url(
    sentinels: RedisSentinelProcesses,
) -> None:
    engine = CacheEngine.from_url(sentinels.url(), prefix="async")
    loads: list[str] = []

    @cache_aside(key="item:<id>", ttl=60, engine=engine)
    async def read(id: str) -> dict[str, str]:
        loads.append(id)
        await asyncio.sleep(0.01)
        return {"id": id}

    assert await asyncio.gather(*(read("cold") for _ in range(200))) == [{"id": "cold"}] * 200
    assert loads == ["cold"]  # one load for 200 concurrent callers
    assert (await read.lookup("cold")).source is Source.CACHE
    assert await read.invalidate("cold") is Outcome.DELETED
    assert (await read.lookup("cold")).source is Source.LOADER
    assert await read.many(KEYS) == [{"id": id} for id in KEYS]
    assert await read.invalidate_all() is not None
    await engine.aclose()


@pytest.mark.slow
async def test_engine_from_clients_made_with_sentinel_master_for(
    sentinels: RedisSentinelProcesses,
) -> None:
    sync_sentinel = redis.sentinel.Sentinel(sentinels.addresses, socket_timeout=0.25)
    async_sentinel = redis.asyncio.sentinel.Sentinel(sentinels.addresses, socket_timeout=0.25)
    client = sync_sentinel.master_for(sentinels.service, socket_timeout=0.25)
    async_client = async_sentinel.master_for(sentinels.service, socket_timeout=0.25)
    engine = CacheEngine(client, async_client, prefix="made")
    calls: list[str] = []

    @cache_aside(key="item:<id>", ttl=60, engine=engine)
    def read(id: str) -> str:
        calls.append(id)
        return id.upper()

    @cache_aside(key="item:<id>", ttl=60, engine=engine)
    async def aread(id: str) -> str:
        calls.append(f"async {id}")
        return id.upper()

    assert read.lookup("a").source is Source.LOADER
    assert read.lookup("a").source is Source.CACHE
    assert (await aread.lookup("a")).source is Source.CACHE  # the same entry, async
    assert (await aread.lookup("b")).source is Source.LOADER
    assert read.lookup("b").source is Source.CACHE
    assert await aread.invalidate("b") is Outcome.DELETED
    assert read.lookup("b").source is Source.LOADER
    assert calls == ["a", "async b", "b"]
    await engine.aclose()
    client.close()
    sync_sentinel.close()
    await async_client.aclose()
    await async_sentinel.aclose()


@pytest.mark.slow
async def test_tls_through_a_rediss_sentinel_url() -> None:
    require_servers()
    master = RedisProcess(tls=True)
    sentinel = SentinelProcess(master.port, quorum=1, tls_of=master)
    try:
        master.start()
        sentinel.start()
        url = f"rediss+sentinel://127.0.0.1:{sentinel.port}/mymaster/0"
        engine = CacheEngine.from_url(url, prefix="tls", ssl_ca_certs=str(master.ca_file))
        read = cache_aside(key="item:<id>", ttl=60, engine=engine)(lambda id: id * 2)

        @cache_aside(key="item:<id>", ttl=60, engine=engine)
        async def aread(id: str) -> str:
            return id * 2

        assert read.lookup("a").source is Source.LOADER
        assert read.lookup("a").source is Source.CACHE
        assert (await aread.lookup("a")).source is Source.CACHE
        assert master.admin().exists(read.key("a")) == 1  # over TLS, on that master
        await engine.aclose()
        # Without the CA, the sentinel's certificate is refused: TLS is really on.
        untrusting = CacheEngine.from_url(url, prefix="tls")
        plain = cache_aside(key="item:<id>", ttl=60, engine=untrusting)(lambda id: id * 2)
        assert plain.lookup("a").source is Source.LOADER  # failed open
        assert plain.error_kinds()
        untrusting.close()
    finally:
        sentinel.stop()
        master.stop()


@pytest.mark.slow
def test_the_sentinel_pages_examples_run(sentinels: RedisSentinelProcesses) -> None:
    """Both examples of docs/integrations/sentinel.md, against these sentinels."""
    quickstart, own_clients = re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.S)
    hosts = ",".join(f"{host}:{port}" for host, port in sentinels.addresses)
    script = quickstart.replace("127.0.0.1:26379,127.0.0.1:26380,127.0.0.1:26381", hosts)
    assert script != quickstart
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.stdout.split() == ["loader", "cache", "cache"], done.stderr
    documented = '[("127.0.0.1", 26379), ("127.0.0.1", 26380), ("127.0.0.1", 26381)]'
    script = own_clients.replace(documented, repr(sentinels.addresses))
    assert script != own_clients
    script += (
        "from cached_aside import cache_aside\n"
        "f = cache_aside(key='own:<id>', ttl=30, engine=engine)(lambda id: id)\n"
        "print(f.lookup('a').source.value, f.lookup('a').source.value)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.stdout.split() == ["loader", "cache"], done.stderr


# -- failover under traffic -----------------------------------------------------------


@dataclass
class Run:
    calls: list[tuple[float, float, str, Any, Source]] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    def check(self, killed_at: float) -> float:
        """Assert every answer was right; seconds from the kill to the first hit on
        the new master (the end of the first call begun after the kill that hit)."""
        assert self.errors == []
        assert all(value == f"value-{id}" for _, _, id, value, _ in self.calls)
        hits = [
            end
            for start, end, _, _, source in self.calls
            if start > killed_at + SHARED_READ_SLACK and source is Source.CACHE
        ]
        assert hits, "no hits after the failover"
        first = min(hits) - killed_at
        # Not before the sentinels could even agree the master is down (500 ms).
        assert first > 0.5
        return first

    def hit_after(self, at: float) -> bool:
        """Whether a call begun after `at` was a hit (the latest calls first)."""
        for start, _, _, _, source in reversed(self.calls):
            if start <= at:
                return False
            if source is Source.CACHE:
                return True
        return False

    def answered_by_the_loader(self, since: float, until: float) -> int:
        """Calls begun in [since, until) answered by the loader (a caller's own load
        or one it waited for in this process)."""
        return sum(
            1
            for start, _, _, _, source in self.calls
            if since <= start < until and source is not Source.CACHE
        )


def fail_over(processes: RedisSentinelProcesses) -> tuple[float, float, RedisProcess]:
    """SIGKILL the master; (when, seconds until the sentinels agree on its successor,
    the successor)."""
    old = processes.server_on(processes.master_port())
    old.kill()
    killed = time.monotonic()
    promoted = processes.wait_for_new_master(old.port)
    return killed, time.monotonic() - killed, promoted


@pytest.mark.slow
def test_failover_under_threads(fresh_sentinels: RedisSentinelProcesses) -> None:
    engine = CacheEngine.from_url(fresh_sentinels.url(), prefix="fo")

    @cache_aside(key="item:<id>", ttl=60, engine=engine)
    def load(id: str) -> str:
        time.sleep(0.005)
        return f"value-{id}"

    run, stop = Run(), threading.Event()

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            id = rng.choice(KEYS)
            started = time.monotonic()
            try:
                result = load.lookup(id)
                ended = time.monotonic()
                if rng.random() < 0.02:  # writes go on too: the outbox keeps what fails
                    load.invalidate(rng.choice(KEYS))
            except Exception as exc:  # the test is that this never happens
                run.errors.append(exc)
                continue
            run.calls.append((started, ended, id, result.value, result.source))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        killed, promotion, promoted = fail_over(fresh_sentinels)
        time.sleep(1.0)
        # hits resume on the new master: waited for, however slow the machine
        assert wait_until(lambda: run.hit_after(killed + SHARED_READ_SLACK))
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    to_first_hit = run.check(killed)
    assert load.stats().postponed > 0  # invalidations the dead master did not take...
    assert engine.settle()  # ...which the outbox delivered to the new one
    assert engine.pending_invalidations() == []
    assert engine.client().connection_pool.master_address == ("127.0.0.1", promoted.port)
    assert load.invalidate(KEYS[0]) in (Outcome.DELETED, Outcome.ABSENT)
    assert load.lookup(KEYS[0]).source is Source.LOADER
    assert promoted.admin().exists(load.key(KEYS[0])) == 1
    during = run.answered_by_the_loader(killed, killed + to_first_hit)
    print(
        f"\nSentinel failover, 8 threads: {len(run.calls)} calls, {len(run.errors)} errors "
        f"seen by callers, {during} answered by the loader meanwhile; sentinels "
        f"promoted the replica {promotion * 1000:.0f} ms after the SIGKILL, first hit "
        f"{to_first_hit * 1000:.0f} ms after it; Redis errors by kind {load.error_kinds()}"
    )
    engine.close()


@pytest.mark.slow
async def test_failover_under_tasks(fresh_sentinels: RedisSentinelProcesses) -> None:
    engine = CacheEngine.from_url(fresh_sentinels.url(), prefix="fo")

    @cache_aside(key="item:<id>", ttl=60, engine=engine)
    async def load(id: str) -> str:
        await asyncio.sleep(0.005)
        return f"value-{id}"

    run, stopping = Run(), asyncio.Event()

    async def worker(seed: int) -> None:
        rng = random.Random(seed)
        while not stopping.is_set():
            id = rng.choice(KEYS)
            started = time.monotonic()
            try:
                result = await load.lookup(id)
                ended = time.monotonic()
                if rng.random() < 0.02:
                    await load.invalidate(rng.choice(KEYS))
            except Exception as exc:  # the test is that this never happens
                run.errors.append(exc)
                continue
            run.calls.append((started, ended, id, result.value, result.source))
            await asyncio.sleep(0)

    workers = [asyncio.create_task(worker(i)) for i in range(50)]
    try:
        await asyncio.sleep(0.5)
        killed, promotion, promoted = await asyncio.to_thread(fail_over, fresh_sentinels)
        await asyncio.sleep(1.0)
        assert await eventually(lambda: run.hit_after(killed + SHARED_READ_SLACK))
    finally:
        stopping.set()
        await asyncio.gather(*workers)
    to_first_hit = run.check(killed)
    assert load.stats().postponed > 0
    assert await engine.asettle()
    assert engine.pending_invalidations() == []
    assert engine.async_client().connection_pool.master_address == ("127.0.0.1", promoted.port)
    # The outbox's last deliveries may have invalidated any key: load one afresh.
    assert await load.invalidate(KEYS[0]) in (Outcome.DELETED, Outcome.ABSENT)
    assert (await load.lookup(KEYS[0])).source is Source.LOADER
    assert promoted.admin().exists(load.key(KEYS[0])) == 1
    during = run.answered_by_the_loader(killed, killed + to_first_hit)
    print(
        f"\nSentinel failover, 50 tasks: {len(run.calls)} calls, {len(run.errors)} errors "
        f"seen by callers, {during} answered by the loader meanwhile; sentinels "
        f"promoted the replica {promotion * 1000:.0f} ms after the SIGKILL, first hit "
        f"{to_first_hit * 1000:.0f} ms after it; Redis errors by kind {load.error_kinds()}"
    )
    await engine.aclose()


@pytest.mark.slow
def test_threads_idle_through_a_paused_masters_failover_leave_it(
    fresh_sentinels: RedisSentinelProcesses,
) -> None:
    """A master paused (SIGSTOP), replaced, then back: it still calls itself master
    until the sentinels demote it (about 10 s), and writes it takes are lost then.
    Threads that slept through the failover hold connections to it; they drop them
    as soon as the engine's pool has heard of the new master."""
    engine = CacheEngine.from_url(fresh_sentinels.url(), prefix="pause")
    load = cache_aside(key="item:<id>", ttl=60, engine=engine)(lambda id: f"value-{id}")
    stop, sleeping = threading.Event(), threading.Event()
    errors: list[BaseException] = []
    wrong: list[Any] = []

    def worker(seed: int, sleeper: bool) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            if sleeper and sleeping.is_set():
                time.sleep(0.01)
                continue
            id = rng.choice(KEYS)
            try:
                if load(id) != f"value-{id}":
                    wrong.append(id)
            except Exception as exc:  # the test is that this never happens
                errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i, i % 2 == 0)) for i in range(8)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.3)
        sleeping.set()  # half the threads now hold connections they do not use
        old = fresh_sentinels.server_on(fresh_sentinels.master_port())
        old.pause()
        promoted = fresh_sentinels.wait_for_new_master(old.port)
        old.resume()
        pool = engine.client().connection_pool
        deadline = time.monotonic() + PATIENCE
        while pool.master_address != ("127.0.0.1", promoted.port):
            assert time.monotonic() < deadline, "the pool never heard of the new master"
            time.sleep(0.01)
        before = old.admin().info("stats")["total_commands_processed"]
        sleeping.clear()
        time.sleep(0.5)
        served = old.admin().info("stats")["total_commands_processed"] - before
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert (errors, wrong) == ([], [])
    # Without the drop: thousands of commands (hits, and invalidations that are lost).
    assert served < 20
    print(f"\nthreads that slept through a paused master's failover sent it {served} commands")
    engine.close()


@pytest.mark.slow
def test_near_cache_follows_the_master_across_a_failover(
    fresh_sentinels: RedisSentinelProcesses,
) -> None:
    reader = CacheEngine.from_url(fresh_sentinels.url(), prefix="near", near=NearCache(ttl=60))
    writer = CacheEngine.from_url(fresh_sentinels.url(), prefix="near")  # another process
    rows = {"a": "v1"}
    read = cache_aside(key="item:<id>", ttl=60, engine=reader)(lambda id: rows[id])
    write = cache_aside(key="item:<id>", ttl=60, engine=writer)(lambda id: rows[id])
    assert read.lookup("a").source is Source.LOADER
    # The listener starts with the first near-cached function: a Redis hit fills the
    # near cache once it tracks.
    deadline = time.monotonic() + PATIENCE
    while read.lookup("a").source is not Source.NEAR:
        assert time.monotonic() < deadline, "never served from the near cache"
        time.sleep(0.01)
    assert reader.near_state() == "tracking"
    killed, _, promoted = fail_over(fresh_sentinels)
    deadline = time.monotonic() + 2 * PATIENCE
    while reader.near_state() != "tracking" and time.monotonic() < deadline:
        time.sleep(0.01)
    tracking_again = time.monotonic() - killed
    assert reader.near_state() == "tracking"  # on the promoted replica
    # Set aside while nothing vouched for it; reread from the new master.
    while reader.near_revalidated_at() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert read.stats().near_revalidated == 1
    assert read.lookup("a").source is Source.NEAR
    rows["a"] = "v2"
    assert write.invalidate("a") is Outcome.DELETED  # through the new master
    deadline = time.monotonic() + 10  # unreported, the near copy would live 60 s
    while read("a") != "v2" and time.monotonic() < deadline:
        time.sleep(0.002)
    assert read("a") == "v2"  # the change on the new master reached the near cache
    tracking = [c for c in promoted.admin().client_list() if "t" in c["flags"]]
    assert len(tracking) == 1
    print(f"\nnear cache tracking again {tracking_again * 1000:.0f} ms after the SIGKILL")
    reader.close()
    writer.close()


@pytest.mark.slow
async def test_clients_made_with_master_for_follow_a_failover(
    fresh_sentinels: RedisSentinelProcesses,
) -> None:
    """An engine given the user's own master_for() clients: the thread's held
    connection and the loop's shared one reconnect through connect(), which asks
    the sentinels (redis-py's reconnect on send would go back to the dead master),
    and the near cache's listener follows through the sync client's pool."""
    sync_sentinel = redis.sentinel.Sentinel(fresh_sentinels.addresses, socket_timeout=0.25)
    async_sentinel = redis.asyncio.sentinel.Sentinel(fresh_sentinels.addresses, socket_timeout=0.25)
    client = sync_sentinel.master_for(fresh_sentinels.service, socket_timeout=0.25)
    async_client = async_sentinel.master_for(fresh_sentinels.service, socket_timeout=0.25)
    engine = CacheEngine(client, async_client, prefix="made", near=NearCache(ttl=60))
    read = cache_aside(key="item:<id>", ttl=60, engine=engine, near=NearCache(ttl=60))(
        lambda id: id.upper()
    )

    @cache_aside(key="item:<id>", ttl=60, engine=engine)
    async def aread(id: str) -> str:
        return id.upper()

    assert read.lookup("a").source is Source.LOADER
    deadline = time.monotonic() + PATIENCE
    while read.lookup("a").source is not Source.NEAR:
        assert time.monotonic() < deadline, "the near cache never turned on"
        await asyncio.sleep(0.01)
    assert (await aread.lookup("a")).source is Source.CACHE  # the loop's connection is up

    _, _, promoted = await asyncio.to_thread(fail_over, fresh_sentinels)
    sources: list[Source] = []
    deadline = time.monotonic() + 2 * PATIENCE
    while sources[-2:] != [Source.CACHE, Source.CACHE]:
        assert time.monotonic() < deadline, f"sync hits never resumed: {sources[-5:]}"
        sources.append(read.lookup("b").source)
        await asyncio.sleep(0.02)
    async_sources: list[Source] = []
    while async_sources[-2:] != [Source.CACHE, Source.CACHE]:
        assert time.monotonic() < deadline, f"async hits never resumed: {async_sources[-5:]}"
        async_sources.append((await aread.lookup("c")).source)
        await asyncio.sleep(0.02)
    assert promoted.admin().exists(read.key("b"), read.key("c")) == 2  # on the new master
    while engine.near_state() != "tracking":
        assert time.monotonic() < deadline, "the near cache never tracked the new master"
        await asyncio.sleep(0.01)
    assert [c for c in promoted.admin().client_list() if "t" in c["flags"]]
    await engine.aclose()
    client.close()
    sync_sentinel.close()
    await async_client.aclose()
    await async_sentinel.aclose()


async def test_a_near_cache_cannot_listen_through_an_asyncio_sentinel_client_alone() -> None:
    sentinel = redis.asyncio.sentinel.Sentinel([("127.0.0.1", 1)])
    engine = CacheEngine(async_client=sentinel.master_for("mymaster"), prefix="made")

    @cache_aside(key="item:<id>", ttl=60, engine=engine, near=NearCache())
    async def read(id: str) -> str:
        return id

    with pytest.raises(ConfigurationError, match="give it a sync master_for"):
        await read("a")
    await engine.aclose()


def test_the_command_line_takes_a_sentinel_url(sentinels: RedisSentinelProcesses) -> None:
    engine = CacheEngine.from_url(sentinels.url(), prefix="cli")
    read = cache_aside(key="item:<id>", ttl=60, engine=engine)(lambda id: [id, 1])
    read("a")
    code, report = cli("--url", sentinels.url(), "ping")
    assert code == 0
    assert isinstance(report, dict)
    assert (report["reachable"], report["scripts"]) == (True, True)
    code, report = cli("--url", sentinels.url(), "--prefix", "cli", "inspect", "item:<id>", "a")
    assert (code, report["value"]) == (0, ["a", 1])  # type: ignore[index]
    code, report = cli("--url", sentinels.url(), "--prefix", "cli", "invalidate", "item:<id>", "a")
    assert (code, report["existed"]) == (0, True)  # type: ignore[index]
    assert read.lookup("a").source is Source.LOADER
    engine.close()


SECRET = "s3cr3t"  # a password fragment that must never reach an error message


@pytest.mark.parametrize(
    "url",
    [
        # "@" in a password is accepted by the parser (the last "@" ends the userinfo)
        # but the redaction stops at the first: the rest of the password shows.
        f"redis+sentinel://:p@{SECRET}@127.0.0.1:26379/mymaster/0/extra",
        # A "/" in a password (base64 secrets have them) ends the netloc: nothing is
        # redacted and the whole URL, password included, is in the message.
        f"redis+sentinel://:ab/{SECRET}@127.0.0.1:26379/mymaster",
        # A "#" starts a fragment, which the message quotes.
        f"redis+sentinel://:ab#{SECRET}@127.0.0.1:26379/mymaster",
        # "?" starts the query: the password is then read as a port, and quoted.
        f"redis+sentinel://user:{SECRET}?x@127.0.0.1:26379/mymaster",
    ],
)
def test_sentinel_url_errors_never_show_the_password(url: str) -> None:
    """Was a defect: a Sentinel URL with an unencoded
    `@ / # ?` in its password is refused (fine), but the ConfigurationError quotes
    the URL or the part of it where the password went, unredacted: exceptions end up
    in logs and crash reports.

    Fix: redact by the same split the parser uses (everything before the last "@" of
    the text after "://", up to the first "/" after that "@"), and never quote
    fragments, query names or addresses from a URL whose userinfo may be mangled:
    say what is wrong without echoing it.
    """
    with pytest.raises(ConfigurationError) as caught:
        CacheEngine.from_url(url)
    assert SECRET not in str(caught.value)


def test_sentinel_urls_with_encoded_passwords_ipv6_and_options() -> None:
    """Percent-encoded `@ : / # ?` in a password, an IPv6 sentinel with and without
    a port, a username, a db in the path and typed query options all parse."""
    from cached_aside._sentinel import parse_sentinel_url

    parsed = parse_sentinel_url(
        "redis+sentinel://me:p%40s%3As%2Fw%23d%3F@[::1]:26380,[fe80::1],host/svc/3"
        "?socket_timeout=0.5&sentinel_password=x&min_other_sentinels=1"
    )
    assert parsed.sentinels == [("::1", 26380), ("fe80::1", 26379), ("host", 26379)]
    assert parsed.service == "svc"
    assert parsed.options == {
        "username": "me",
        "password": "p@s:s/w#d?",
        "db": 3,
        "socket_timeout": 0.5,
    }
    assert parsed.sentinel_options == {"password": "x"}
    assert parsed.min_other_sentinels == 1


async def test_all_sentinels_down_fails_open_and_counts_the_error() -> None:
    """Every sentinel refusing connections: calls are answered by the loader (sync
    and async), the error is counted as MasterNotFoundError until the breaker opens,
    and closing the engine leaks no socket (the suite's filterwarnings=error and gc
    would say so)."""
    engine = CacheEngine.from_url(
        f"redis+sentinel://127.0.0.1:{free_port()},127.0.0.1:{free_port()}/mymaster",
        prefix=unique_prefix(),
    )

    @cache_aside(key="down:<item>", ttl=5, engine=engine)
    def load(item: int) -> int:
        return item * 2

    @cache_aside(key="adown:<item>", ttl=5, engine=engine)
    async def aload(item: int) -> int:
        return item * 3

    try:
        assert [load(number) for number in range(4)] == [0, 2, 4, 6]
        assert [await aload(number) for number in range(3)] == [0, 3, 6]
        assert load.error_kinds().get("MasterNotFoundError", 0) >= 1
        assert load.stats().errors == 4
    finally:
        await engine.aclose()
