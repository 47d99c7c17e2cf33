"""Redis Cluster: a real three-master cluster of the tests' own, keys over every
slot range, sync and async."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pytest
import redis.asyncio.cluster
import redis.cluster
from redis.exceptions import ConnectionError, RedisClusterException

from cached_aside import (
    BulkOutcome,
    CacheEngine,
    NearCache,
    Outcome,
    Source,
    XFetch,
    _reads,
    cache_aside,
)
from cached_aside._keys import entry_keys
from cached_aside._near import Tracking
from cached_aside._node_connections import restore_startup_nodes, startup_addresses

from .conftest import PATIENCE, wait_until
from .servers import REDIS_SERVER, RedisClusterProcesses, free_port
from .test_cli import cli

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not on PATH"),
]
KEYS = [f"k{i}" for i in range(120)]


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterProcesses]:
    processes = RedisClusterProcesses(masters=3).start()
    yield processes
    processes.stop()


@pytest.fixture
def client(cluster: RedisClusterProcesses) -> Iterator[redis.cluster.RedisCluster]:
    node = redis.cluster.RedisCluster.from_url(cluster.url)
    yield node
    node.close()


def test_an_entrys_keys_share_one_slot_and_entries_spread(
    client: redis.cluster.RedisCluster,
) -> None:
    engine = CacheEngine(client, prefix="slots")
    fn = cache_aside(key="item:<id>", ttl=60, engine=engine)(lambda id: id)
    owners = set()
    for id in KEYS:
        keys = entry_keys(fn.key(id))
        slots = {client.keyslot(key) for key in (*keys, keys.wake_list("0123abcd"))}
        assert len(slots) == 1  # value, lock, waiters, each waiter's wake-up list: one slot
        owners.add(client.get_node_from_key(keys.value).name)
    assert len(owners) == 3  # the entries live on every master


def test_cluster_sync(client: redis.cluster.RedisCluster) -> None:
    engine = CacheEngine(client, prefix="sync")
    loads: list[str] = []

    @cache_aside(key="item:<id>", ttl=60, engine=engine)
    def read(id: str) -> dict[str, str] | None:
        loads.append(id)
        time.sleep(0.02 if id == "cold" else 0)
        return None if id.startswith("missing") else {"id": id}

    @cache_aside(key="item:<id>", ttl=60, as_hash=True, engine=engine)
    def record(id: str) -> dict[str, str]:
        return {"id": id, "stock": "1"}

    assert [read(id) for id in KEYS] == [{"id": id} for id in KEYS]
    assert all(read.lookup(id).source is Source.CACHE for id in KEYS)
    assert read("missing-1") is None
    assert read.lookup("missing-1").source is Source.NEGATIVE
    assert all(read.invalidate(id) is Outcome.DELETED for id in KEYS[:30])
    assert read.lookup(KEYS[0]).source is Source.LOADER
    record("p")
    assert record.update_field("p", "stock", "7") is Outcome.UPDATED
    assert record("p") == {"id": "p", "stock": "7"}
    loads.clear()
    results: list[Any] = []
    threads = [threading.Thread(target=lambda: results.append(read("cold"))) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (loads, len(results)) == (["cold"], 50)
    client.delete(*(key for id in KEYS for key in entry_keys(read.key(id))), "x")


def test_cluster_a_waiter_in_another_process_is_woken_by_the_store(
    client: redis.cluster.RedisCluster, cluster: RedisClusterProcesses
) -> None:
    """The store script wakes each waiter on its own list, named from the waiters
    set: keys the script derives, in the entry's slot, which a cluster node accepts."""
    other_client = redis.cluster.RedisCluster.from_url(cluster.url)
    here, there = CacheEngine(client, prefix="wake"), CacheEngine(other_client, prefix="wake")
    loading, go = threading.Event(), threading.Event()

    @cache_aside(key="w:<id>", ttl=60, engine=here)
    def slow(id: str) -> str:
        loading.set()
        go.wait(30)
        return "the owner's load"

    waiting = cache_aside(key="w:<id>", ttl=60, engine=there)(lambda id: "a second load")
    owner = threading.Thread(target=slow, args=("k",))
    owner.start()
    loading.wait(30)
    results: list[Any] = []
    waiter = threading.Thread(target=lambda: results.append(waiting.lookup("k")))
    waiter.start()
    keys = entry_keys(slow.key("k"))
    deadline = time.monotonic() + 30
    while not client.scard(keys.waiters) and time.monotonic() < deadline:
        time.sleep(0.005)
    go.set()
    owner.join(30)
    waiter.join(30)
    assert [(r.value, r.source) for r in results] == [("the owner's load", Source.WAITED)]
    assert client.exists(keys.lock, keys.waiters) == 0
    client.delete(keys.value)
    other_client.close()


async def test_cluster_async_from_a_cluster_url(cluster: RedisClusterProcesses) -> None:
    url = cluster.url.replace("redis://", "redis+cluster://")
    engine = CacheEngine.from_url(url, prefix="async")
    loads: list[str] = []

    @cache_aside(key="item:<id>", ttl=60, engine=engine)
    async def read(id: str) -> dict[str, str]:
        loads.append(id)
        await asyncio.sleep(0.02)
        return {"id": id}

    # Many concurrent commands before the client ever initialized: the trap redis-py
    # 8.1 falls into unless the engine initializes it first.
    results = await asyncio.gather(*(read(KEYS[i % 60]) for i in range(600)))
    assert results == [{"id": KEYS[i % 60]} for i in range(600)]
    assert sorted(loads) == sorted(KEYS[:60])
    assert (await read.lookup(KEYS[5])).source is Source.CACHE
    assert await read.invalidate(KEYS[5]) is Outcome.DELETED
    loads.clear()
    assert await asyncio.gather(*(read("cold") for _ in range(500))) == [{"id": "cold"}] * 500
    assert loads == ["cold"]
    await engine.aclose()


def test_cluster_batches_sync(client: redis.cluster.RedisCluster) -> None:
    engine = CacheEngine(client, prefix="batch")
    batches: list[list[str]] = []

    def load_many(ids: list[str]) -> dict[str, dict[str, str]]:
        batches.append(ids)
        return {id: {"id": id} for id in ids if not id.startswith("missing")}

    @cache_aside(key="item:<id>", ttl=60, engine=engine, batch_loader=load_many)
    def read(id: str) -> dict[str, str]:
        raise AssertionError("many() with a batch_loader never calls the single loader")

    @cache_aside(key="other:<id>", ttl=60, engine=engine)
    def other(id: str) -> str:
        return id

    items = [*KEYS, "missing-1"]
    expected = [{"id": id} for id in KEYS] + [None]
    assert read.many(items) == expected  # entries on all three masters
    assert batches == [items]
    assert read.many(items) == expected
    assert batches == [items]  # all hits
    assert other.many(KEYS[:40]) == KEYS[:40]
    assert read.invalidate_many(KEYS[:30]) == BulkOutcome(30)
    assert [client.exists(read.key(id)) for id in KEYS[28:32]] == [0, 0, 1, 1]
    assert read.invalidate_all() == BulkOutcome(len(items) - 30)  # SCAN on every master
    assert other.many(KEYS[:40]) == KEYS[:40]
    assert engine.invalidate_prefix("other:") == BulkOutcome(40)
    assert not list(client.scan_iter(match="batch:*"))


def test_cluster_tags_span_masters_without_cross_slot_scripts(
    client: redis.cluster.RedisCluster,
) -> None:
    # An entry and its tags' versions live in different slots: the hit reads them in
    # one pipeline (one round trip per node, sent together), and no script spans two.
    engine = CacheEngine(client, prefix="tags")
    loads: list[str] = []

    @cache_aside(key="item:<id>", ttl=60, engine=engine, tags=("group:<group>", "all"))
    def read(group: int, id: str) -> dict[str, Any]:
        loads.append(id)
        return {"group": group, "id": id}

    for index, id in enumerate(KEYS):
        read(index % 3, id)
    slots = {client.keyslot(read.key(index % 3, id)) for index, id in enumerate(KEYS)}
    assert len({client.nodes_manager.get_node_from_slot(slot).name for slot in slots}) == 3
    loads.clear()
    for index, id in enumerate(KEYS):
        assert read.lookup(index % 3, id).source is Source.CACHE
    assert engine.invalidate_tags("group:1") == BulkOutcome(1)  # one version retired
    assert all(read.lookup(1, id).source is Source.LOADER for id in KEYS[1::3])
    assert read.lookup(0, KEYS[0]).source is Source.CACHE
    assert engine.invalidate_tags("all") == BulkOutcome(1)
    loads.clear()
    for index, id in enumerate(KEYS):
        read(index % 3, id)
    assert loads == KEYS  # every entry a miss, on every node
    # set() stamps its entry too; "7" and 7 share a tag.
    assert read.set("2", "x", value={"group": 2, "id": "x"}) is Outcome.UPDATED
    assert read.lookup(2, "x").source is Source.CACHE
    assert engine.invalidate_tags("group:2").deleted == 1
    assert read.lookup(2, "x").source is Source.LOADER


def test_cluster_a_slow_tagged_batch_renews_its_leases(
    client: redis.cluster.RedisCluster,
) -> None:
    """Renewals go to every master in one pipeline each, a lock's RENEW with its
    entry's keys; the stored entries carry the tag's version, so one invalidation of
    the tag reaches them all."""
    engine = CacheEngine(client, prefix="leases")
    ids = KEYS[:6]
    renewed: list[int] = []

    def rows(items: list[str]) -> list[dict[str, str]]:
        lock = read.key(items[0]) + ":lock"
        deadline, last = time.monotonic() + PATIENCE, client.pttl(lock)
        while len(renewed) < 2:  # two renewals of the first lock, seen from outside
            assert time.monotonic() < deadline, "the lease was not renewed"
            left = client.pttl(lock)
            assert left > 0, "the lock lapsed while its loader ran"
            if left > last:
                renewed.append(left)
            last = left
            time.sleep(0.01)
        return [{"id": id} for id in items]

    @cache_aside(
        key="r:<id>", ttl=60, lock_ttl=2.0, engine=engine, batch_loader=rows, tags=("all",)
    )
    def read(id: str) -> dict[str, str]:
        return {"id": id}

    slots = {client.keyslot(read.key(id)) for id in ids}
    assert len({client.nodes_manager.get_node_from_slot(slot).name for slot in slots}) > 1
    assert read.many(ids) == [{"id": id} for id in ids]
    assert all(client.exists(read.key(id)) for id in ids)  # stored: every lease held
    assert engine.invalidate_tags("all") == BulkOutcome(1)  # the tag's one version
    assert all(read.lookup(id).source is Source.LOADER for id in ids)


def test_cluster_grace_stale_if_error_set_and_refresh(client: redis.cluster.RedisCluster) -> None:
    engine = CacheEngine(client, prefix="stale")
    rows = dict.fromkeys(KEYS, 1)
    failing = False

    @cache_aside(key="item:<id>", ttl=30, grace=10, stale_if_error=60, engine=engine)
    def read(id: str) -> int:
        if failing:
            raise RuntimeError("the primary is down")
        return rows[id]

    assert read.many(KEYS[:30]) == [1] * 30
    for id in KEYS[:30]:
        rows[id] = 2
        client.pexpire(read.key(id), 55_000)  # 5 s past its ttl: inside the grace
    assert [read.lookup(id).source for id in KEYS[:30]] == [Source.STALE] * 30
    assert engine.settle()
    assert [read(id) for id in KEYS[:30]] == [2] * 30  # reloaded on every master
    failing = True
    for id in KEYS[:30]:
        client.pexpire(read.key(id), 45_000)  # 15 s past: beyond grace, kept for errors
    assert {read.lookup(id).source for id in KEYS[:30]} == {Source.STALE}
    failing = False
    assert read.set(KEYS[0], value=7) is Outcome.UPDATED
    assert read(KEYS[0]) == 7
    rows[KEYS[0]] = 8
    assert read.refresh(KEYS[0]) == 8
    assert read.lookup(KEYS[0]).source is Source.CACHE
    read.invalidate_all()


def test_cluster_xfetch_keeps_the_load_time_in_the_entrys_slot(
    client: redis.cluster.RedisCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """STORE_TIMED and PEEK_TIMED touch the entry and its load time: one slot each, on
    every master; a due hit is served and reloaded behind."""
    engine = CacheEngine(client, prefix="xfetch")
    rows = dict.fromkeys(KEYS, 1)

    # beta so large that any entry with a known load time is due, with the draw e^-1.
    @cache_aside(key="item:<id>", ttl=30, refresh_ahead=XFetch(beta=1e6), engine=engine)
    def read(id: str) -> int:
        return rows[id]

    assert [read(id) for id in KEYS[:30]] == [1] * 30
    assert all(int(client.get(read.key(id) + ":load_ms")) >= 1 for id in KEYS[:30])
    monkeypatch.setattr(_reads, "random", type("Fixed", (), {"random": lambda: 1 - 0.3679}))
    for id in KEYS[:30]:
        rows[id] = 2
    assert [read.lookup(id).value for id in KEYS[:30]] == [1] * 30  # served, then reloaded
    assert engine.settle()
    assert [client.get(read.key(id)) for id in KEYS[:30]] == [b"\x02"] * 30  # msgpack's 2
    read.invalidate_all()


def _upper(id: str) -> str:
    raise AssertionError("many() with a batch_loader never calls the single loader")


def test_cluster_many_in_three_processes_loads_each_key_once(
    client: redis.cluster.RedisCluster, cluster: RedisClusterProcesses
) -> None:
    loads: list[str] = []
    lock = threading.Lock()

    def slow_batch(ids: list[str]) -> list[str]:
        with lock:
            loads.extend(ids)
        time.sleep(0.1)
        return [id.upper() for id in ids]

    clients = [redis.cluster.RedisCluster.from_url(cluster.url) for _ in range(3)]
    engines = [CacheEngine(c, prefix="manyx") for c in clients]  # three "processes"
    functions = [
        # lock_ttl far above any stall: one load per key is the point, not renewal.
        cache_aside(key="w:<id>", ttl=30, lock_ttl=60, engine=e, batch_loader=slow_batch)(_upper)
        for e in engines
    ]
    results: list[list[str]] = []
    threads = [
        threading.Thread(target=lambda f=f, n=n: results.append(f.many(KEYS[n * 10 : n * 10 + 40])))
        for n, f in enumerate(functions)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 3
    assert sorted(loads) == sorted(set(loads))  # no key loaded twice, on any master
    assert set(loads) == set(KEYS[:60])
    functions[0].invalidate_all()
    for engine, each in zip(engines, clients, strict=True):
        engine.close()
        each.close()


async def test_cluster_tags_async(cluster: RedisClusterProcesses) -> None:
    url = cluster.url.replace("redis://", "redis+cluster://")
    engine = CacheEngine.from_url(url, prefix="atags")

    @cache_aside(key="item:<id>", ttl=60, engine=engine, tags=("all",))
    async def read(id: str) -> str:
        return id

    await read.many(KEYS[:30])
    assert [(await read.lookup(id)).source for id in KEYS[:3]] == [Source.CACHE] * 3
    assert await engine.ainvalidate_tags("all") == BulkOutcome(1)
    assert [(await read.lookup(id)).source for id in KEYS[:3]] == [Source.LOADER] * 3
    await engine.aclose()


async def test_cluster_batches_async(cluster: RedisClusterProcesses) -> None:
    url = cluster.url.replace("redis://", "redis+cluster://")
    engine = CacheEngine.from_url(url, prefix="abatch")
    loads: list[str] = []

    @cache_aside(key="item:<id>", ttl=60, engine=engine)
    async def read(id: str) -> str:
        loads.append(id)
        await asyncio.sleep(0.01)
        return id.upper()

    # many() as the first command a fresh cluster client sends
    assert await read.many(KEYS) == [id.upper() for id in KEYS]
    assert sorted(loads) == sorted(KEYS)
    assert await read.many(KEYS) == [id.upper() for id in KEYS]
    assert len(loads) == len(KEYS)
    assert await read.invalidate_many(KEYS[:10]) == BulkOutcome(10)
    assert await read.invalidate_all() == BulkOutcome(len(KEYS) - 10)
    assert await engine.ainvalidate_prefix() == BulkOutcome(0)
    await engine.aclose()


def _victim(cluster: RedisClusterProcesses, engine: CacheEngine, key: str) -> Any:
    """The server process of the master that holds `key`."""
    port = engine.client().get_node_from_key(key).port
    return next(node for node in cluster.nodes if node.port == port)


def test_failover_sync_callers_keep_correct_answers_and_hits_resume() -> None:
    cluster = RedisClusterProcesses(masters=3, replicas=1).start()
    try:
        engine = CacheEngine.from_url(cluster.url.replace("redis://", "redis+cluster://"))

        @cache_aside(key="item:<id>", ttl=60, engine=engine)
        def read(id: str) -> dict[str, str]:
            time.sleep(0.002)
            return {"id": id}

        assert read.many(KEYS) == [{"id": id} for id in KEYS]
        victim_key = KEYS[0]
        victim = _victim(cluster, engine, read.key(victim_key))
        stop = threading.Event()
        wrong: list[Any] = []
        errors: list[BaseException] = []
        calls = [0]

        def caller(offset: int) -> None:
            while not stop.is_set():
                for id in KEYS[offset::4]:
                    try:
                        value = read(id)
                    except BaseException as exc:  # any error seen by a caller fails the test
                        errors.append(exc)
                        return
                    calls[0] += 1
                    if value != {"id": id}:
                        wrong.append((id, value))

        threads = [threading.Thread(target=caller, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(0.3)
        killed_at = time.monotonic()
        victim.kill()
        lost, resumed = None, None
        while time.monotonic() - killed_at < 60:  # a bound on a hang, not a speed
            # A hit counts once a lookup missed since the kill: the first lookups may
            # share a read a caller made before it.
            hit = read.lookup(victim_key).hit
            if not hit and lost is None:
                lost = time.monotonic() - killed_at
            if hit and lost is not None:
                resumed = time.monotonic() - killed_at
                break
            time.sleep(0.05)
        stop.set()
        for thread in threads:
            thread.join(10)
        print(
            f"\nfailover: {calls[0]} calls, "
            f"hits lost {lost} s and resumed {resumed} s after SIGKILL"
        )
        assert (errors, wrong) == ([], [])
        assert resumed is not None, "hits never resumed on the killed master's slots"

        def moved_off_the_victim() -> bool:
            # The client learns the new owner from a command of its own (a MOVED reply
            # or a refresh after a refused connection), not from hits on held ones.
            client = engine.client()
            with contextlib.suppress(redis.RedisError):
                client.exists(read.key(victim_key))
            return bool(client.get_node_from_key(read.key(victim_key)).port != victim.port)

        assert wait_until(moved_off_the_victim), "the client still routes to the killed master"
        engine.close()
    finally:
        cluster.stop()


async def test_failover_async_callers_keep_correct_answers_and_hits_resume() -> None:
    cluster = RedisClusterProcesses(masters=3, replicas=1).start()
    try:
        engine = CacheEngine.from_url(cluster.url.replace("redis://", "redis+cluster://"))

        @cache_aside(key="item:<id>", ttl=60, engine=engine)
        async def read(id: str) -> dict[str, str]:
            await asyncio.sleep(0.002)
            return {"id": id}

        assert await read.many(KEYS) == [{"id": id} for id in KEYS]
        side = engine.sides.async_side()
        # The URL's own node: redis-py before 8 rediscovers a cluster from its startup
        # nodes, which it drops one by one at each connection error; with 20 callers
        # they all went (seen on 5.0.8: that client never reached the cluster again)
        # until the engine gave them back (restore_startup_nodes).
        seed = int(cluster.url.rsplit(":", 1)[1].split("/")[0])
        victim_key = next(
            id for id in KEYS if side.client.get_node_from_key(read.key(id)).port == seed
        )
        port = side.client.get_node_from_key(read.key(victim_key)).port
        victim = next(node for node in cluster.nodes if node.port == port)
        stop = asyncio.Event()
        wrong: list[Any] = []
        calls = [0]

        async def caller(offset: int) -> None:
            while not stop.is_set():
                for id in KEYS[offset::20]:
                    value = await read(id)  # an error here fails the test
                    calls[0] += 1
                    if value != {"id": id}:
                        wrong.append((id, value))

        tasks = [asyncio.ensure_future(caller(n)) for n in range(20)]
        await asyncio.sleep(0.3)
        killed_at = time.monotonic()
        victim.kill()
        lost, resumed = None, None
        while time.monotonic() - killed_at < 60:  # a bound on a hang, not a speed
            # A hit counts once a lookup missed since the kill: the first lookups may
            # join a read a caller made before it.
            hit = (await read.lookup(victim_key)).hit
            if not hit and lost is None:
                lost = time.monotonic() - killed_at
            if hit and lost is not None:
                resumed = time.monotonic() - killed_at
                break
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*tasks)
        print(
            f"\nfailover (asyncio): {calls[0]} calls, "
            f"hits lost {lost} s and resumed {resumed} s after SIGKILL"
        )
        assert wrong == []
        assert resumed is not None, "hits never resumed on the killed master's slots"
        await engine.aclose()
    finally:
        cluster.stop()


def test_a_hung_master_costs_only_its_own_slots() -> None:
    """One breaker per node: while one master hangs, its keys skip Redis once its
    breaker opens, and every other master's keys are still served from Redis."""
    cluster = RedisClusterProcesses(masters=3).start()
    try:
        for node in cluster.nodes:  # the healthy masters keep serving their slots
            node.admin().config_set("cluster-require-full-coverage", "no")
        engine = CacheEngine.from_url(cluster.url.replace("redis://", "redis+cluster://"))
        now = [time.monotonic()]  # the breakers' clock: time passes when the test says
        engine.breaker.clock = lambda: now[0]

        @cache_aside(key="item:<id>", ttl=60, engine=engine)
        def read(id: str) -> dict[str, str]:
            return {"id": id}

        read.many(KEYS)
        victim = _victim(cluster, engine, read.key(KEYS[0]))
        on_victim = [id for id in KEYS if _victim(cluster, engine, read.key(id)) is victim]
        elsewhere = [id for id in KEYS if id not in on_victim]
        victim.pause()
        try:
            for id in on_victim[:5]:  # each fails open; the third opens its breaker
                assert read(id) == {"id": id}
            assert engine.breaker.state == "open"
            # A node's breaker is made when it first counts a failure (or a refusal is
            # asked of it): the healthy masters have none yet, or closed ones.
            states = {name: b.state for name, b in engine.breaker.nodes.items()}
            assert [s for s in states.values() if s != "closed"] == ["open"], states
            assert states[f"127.0.0.1:{victim.port}"] == "open"
            (hung,) = [b for b in engine.breaker.nodes.values() if b.state == "open"]
            failed_before = hung.failures
            skipped = [read.lookup(id) for id in on_victim[5:25]]
            # skipped, not timed out: a command sent to the hung node would have failed
            # (a socket timeout each) and been counted on its breaker
            assert hung.failures == failed_before
            assert {result.source for result in skipped} == {Source.LOADER}
            served = [read.lookup(id) for id in elsewhere]
            assert {result.source for result in served} == {Source.CACHE}
            # Batches: what is bound for the open node is refused, the rest goes out
            # (redis-py's cluster pipeline may still fail all of it while it refreshes
            # its topology past the hung node: then the batch fails open).
            assert read.many(elsewhere[:20]) == [{"id": id} for id in elsewhere[:20]]
            mixed = on_victim[:3] + elsewhere[:3]
            assert read.many(mixed) == [{"id": id} for id in mixed]
            outcome = read.invalidate_many(elsewhere[:3])
            assert outcome.deleted + outcome.pending == 3
        finally:
            victim.resume()
        now[0] += engine.breaker.cooldown + 0.1
        deadline = time.monotonic() + 30
        while not read.lookup(on_victim[0]).hit:  # the probe heals it
            assert time.monotonic() < deadline, "the healed master's keys never hit again"
            time.sleep(0.05)
        assert engine.breaker.state == "closed"
        assert engine.settle()  # what the outbox held landed
        assert not any(client_exists(engine, read.key(id)) for id in elsewhere[:3])
        engine.close()
    finally:
        cluster.stop()


def client_exists(engine: CacheEngine, key: str) -> bool:
    return bool(engine.client().exists(key))


def _collect_what_redis_py_dropped() -> None:
    """redis-py 8.1 drops a node that left the cluster (a killed master, a cluster
    down at first use) without closing its pool: the sockets of its own connections
    are found by the collector, which may finalize a socket before its connection
    closes it (a ResourceWarning blamed on whichever test collects). Collected here,
    where that is known; the library's own sockets are closed where it leaves them
    (tests/test_connections.py)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def _until(predicate: Any, seconds: float = 30.0, what: str = "") -> float:
    """Poll until `predicate`; `seconds` bounds a hang (generously), it claims no speed."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < seconds, f"never: {what}"
        time.sleep(0.01)
    return time.monotonic() - started


@pytest.mark.parametrize("tracking", ["bcast", "keys"])
def test_near_cache_on_a_cluster_tracks_every_master(
    cluster: RedisClusterProcesses, tracking: Tracking
) -> None:
    url = cluster.url.replace("redis://", "redis+cluster://")
    prefix = f"near-{tracking}"
    here = CacheEngine.from_url(url, prefix=prefix, near=NearCache(tracking=tracking))
    there = CacheEngine.from_url(url, prefix=prefix, near=NearCache(tracking=tracking))
    version = {"v": 1}

    def make(engine: CacheEngine) -> Any:
        @cache_aside(key="item:<id>", ttl=60, engine=engine)
        def read(id: str) -> dict[str, Any]:
            return {"id": id, **version}

        return read

    read, other = make(here), make(there)
    try:
        ids = KEYS[:30]  # on all three masters
        for id in ids:
            read(id)
            _until(lambda id=id: read.lookup(id).source is Source.NEAR, what="near fill")
        assert here.near_state() == "tracking"
        assert len(here.nearby.listener.nodes()) == 3  # type: ignore[union-attr]
        version["v"] = 2
        for id in ids:
            assert other.invalidate(id) is Outcome.DELETED
        # Every master reports to this process: no near copy of the old value survives.
        took = max(_until(lambda id=id: read(id)["v"] == 2, 10, "report") for id in ids)
        print(
            f"\ncluster near cache ({tracking}): reports from 3 masters within {took * 1000:.1f} ms"
        )
        listener = here.nearby.listener
        assert listener is not None
        # Per-key: only the keys this process read are reported (the tag prefix is
        # broadcast in both modes, and no tag changed here).
        assert listener.keys_reported >= len(ids)
        if tracking == "keys":
            assert listener.keys_reported == len(ids)
    finally:
        here.close()
        there.close()


@pytest.mark.parametrize("tracking", ["bcast", "keys"])
def test_near_cache_on_a_cluster_turns_off_when_a_masters_listener_dies(
    cluster: RedisClusterProcesses, client: redis.cluster.RedisCluster, tracking: Tracking
) -> None:
    """In per-key mode the connection killed is the registrar's: Redis forgets the
    keys it tracked, which is as bad as losing the listener."""
    url = cluster.url.replace("redis://", "redis+cluster://")
    near = NearCache(tracking=tracking)
    engine = CacheEngine.from_url(url, prefix=f"nearkill-{tracking}", near=near)
    version = {"v": 1}

    @cache_aside(key="item:<id>", ttl=60, engine=engine)
    def read(id: str) -> dict[str, Any]:
        return {"id": id, **version}

    try:
        ids = KEYS[:30]  # on all three masters
        for id in ids:
            read(id)
            _until(lambda id=id: read.lookup(id).source is Source.NEAR, what="near fill")
        listener = engine.nearby.listener
        name, node = next(iter(listener.nodes().items()))  # type: ignore[union-attr]
        host, port = name.rsplit(":", 1)
        killer = redis.Redis(host=host, port=int(port))
        victim = node.client_id if node.registrar is None else node.registrar.client_id
        killer.client_kill_filter(_id=victim)
        killer.close()
        _until(lambda: engine.near_state() == "down", 15, "near off after the kill")
        assert read.lookup(KEYS[0]).source is not Source.NEAR  # set aside at once
        version["v"] = 2
        client.delete(read.key(KEYS[0]))  # a change nobody may miss
        _until(lambda: engine.near_state() == "tracking", 30, "tracking again")
        assert read(KEYS[0])["v"] == 2
        # The entries of every master were reread, not thrown away: served from
        # process memory again without a load.
        _until(lambda: engine.near_revalidated_at() is not None, 30, "rereads done")
        _until(
            lambda: read.stats().near_revalidated >= len(ids) - 1,
            30,
            "every master's entries reread",
        )
        # On a starved machine a listener may miss a PONG and go down once more,
        # setting the entries aside again: they come back by the next reread.
        _until(
            lambda: {read.lookup(id).source for id in ids[1:]} == {Source.NEAR},
            30,
            "served from memory again",
        )
    finally:
        engine.close()


def test_near_cache_on_a_cluster_follows_a_failover() -> None:
    cluster = RedisClusterProcesses(masters=3, replicas=1).start()
    try:
        url = cluster.url.replace("redis://", "redis+cluster://")
        engine = CacheEngine.from_url(url, prefix="nearfail", near=NearCache())
        writer = CacheEngine.from_url(url, prefix="nearfail")
        version = {"v": 1}

        def make(engine: CacheEngine) -> Any:
            @cache_aside(key="item:<id>", ttl=60, engine=engine)
            def read(id: str) -> dict[str, Any]:
                return {"id": id, **version}

            return read

        read, write = make(engine), make(writer)
        read(KEYS[0])
        _until(lambda: read.lookup(KEYS[0]).source is Source.NEAR, what="near fill")
        before = set(engine.nearby.listener.nodes())  # type: ignore[union-attr]
        victim = _victim(cluster, engine, read.key(KEYS[0]))
        killed_at = time.monotonic()
        victim.kill()
        _until(lambda: engine.near_state() != "tracking", 30, "near off after the kill")
        assert read(KEYS[0])["v"] == 1  # answered: Redis or the loader, never stuck
        _until(lambda: set(engine.nearby.listener.nodes()) != before, 60, "the new master")  # type: ignore[union-attr]
        back = _until(lambda: engine.near_state() == "tracking", 60, "tracking again")
        _until(lambda: read.lookup(KEYS[0]).source is Source.NEAR, 30, "near again")
        version["v"] = 2
        if write.invalidate(KEYS[0]) is Outcome.PENDING:  # its client had the old map
            assert writer.settle()
        # The promoted master reports the change: the near copy goes.
        _until(lambda: read(KEYS[0])["v"] == 2, 10, "the change on the new master")
        print(
            f"\ncluster near cache: tracking again {time.monotonic() - killed_at:.2f} s "
            f"after SIGKILL of a master ({back:.2f} s after the new master appeared)"
        )
        engine.close()
        writer.close()
    finally:
        cluster.stop()
        _collect_what_redis_py_dropped()


def test_the_command_line_takes_a_cluster_url(cluster: RedisClusterProcesses) -> None:
    url = "redis+cluster" + cluster.url.removeprefix("redis")
    engine = CacheEngine.from_url(url, prefix="cli")
    read = cache_aside(key="item:<id>", ttl=60, engine=engine)(lambda id: [id, 1])
    read("a")
    code, report = cli("--url", url, "ping")
    assert code == 0
    assert isinstance(report, dict)
    assert (report["reachable"], report["scripts"], report["mode"]) == (True, True, "cluster")
    code, report = cli("--url", url, "--prefix", "cli", "inspect", "item:<id>", "a")
    assert (code, report["value"]) == (0, ["a", 1])  # type: ignore[index]
    code, report = cli("--url", url, "--prefix", "cli", "invalidate", "item:<id>", "a")
    assert (code, report["existed"]) == (0, True)  # type: ignore[index]
    assert read.lookup("a").source is Source.LOADER
    engine.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_cluster_down_at_first_use_fails_open_then_heals(mode: str) -> None:
    """The engine's first call finds no node of the cluster: calls are served by the
    loader (they raised RedisClusterUnreachableError before), counted as Redis errors,
    the breaker opens after three; once the cluster is up, calls start hitting."""
    processes = RedisClusterProcesses(masters=3)  # ports chosen, nothing running yet
    engine = CacheEngine.from_url(
        f"redis+cluster://127.0.0.1:{processes.nodes[0].port}",
        breaker_cooldown=0.05,
        socket_timeout=2,
        socket_connect_timeout=2,
    )
    calls: list[str] = []

    def load(id: str) -> dict[str, str]:
        calls.append(id)
        return {"id": id}

    if mode == "sync":
        cached = cache_aside(key="down-first:<id>", ttl=30, engine=engine)(load)

        def call(id: str) -> Any:
            return cached.lookup(id)
    else:

        async def aload(id: str) -> dict[str, str]:
            return load(id)

        acached = cache_aside(key="down-first:<id>", ttl=30, engine=engine)(aload)
        loop = asyncio.new_event_loop()

        def call(id: str) -> Any:
            return loop.run_until_complete(acached.lookup(id))

    try:
        for _ in range(5):
            result = call("a")
            assert (result.value, result.source) == ({"id": "a"}, Source.LOADER)
        assert len(calls) == 5
        assert engine.stats().errors == 5
        assert engine.breaker.opened >= 1
        processes.start()
        deadline = time.monotonic() + 60  # a bound on a hang, not a speed claim
        while call("a").source is not Source.CACHE:
            assert time.monotonic() < deadline, "the engine never reached the cluster"
            time.sleep(0.05)
        before = len(calls)
        values = [call(id).value for id in ("a", "b", "b")]
        assert values == [{"id": "a"}, {"id": "b"}, {"id": "b"}]
        assert len(calls) == before + 1  # "b" loaded once, then a hit
        assert engine.breaker.state == "closed"
    finally:
        if mode == "async":
            loop.run_until_complete(engine.aclose())
            loop.close()
        engine.close()
        processes.stop()
        _collect_what_redis_py_dropped()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_cluster_client_stranded_without_startup_nodes_finds_the_cluster_again(
    cluster: RedisClusterProcesses, mode: str
) -> None:
    """redis-py before 8 drops a node from the client's startup nodes at each
    connection error and puts them back only when a refresh succeeds: callers at once
    in a failover can drop them all, and the client never reaches the cluster again
    (seen with 20 asyncio callers on redis-py 5.0.8: "Redis Cluster cannot be
    connected ...: None" for good). Stranded so here (no startup node left, a key's
    slot on a master that is gone), the engine fails open, gives the client the nodes
    of its last slot table back, and hits resume."""
    engine = CacheEngine.from_url(
        cluster.url.replace("redis://", "redis+cluster://"), breaker_cooldown=0.01
    )
    stranded = _Stranded.of(engine, mode, "stranded")
    call, key, client = stranded.call, stranded.key, stranded.client
    gone = stranded.gone()

    dropped: list[Any] = []
    try:
        assert call("a").source is Source.LOADER
        assert call("a").source is Source.CACHE
        manager = client.nodes_manager
        # What the test drops is closed by it, not left to the collector.
        if mode == "async":
            stranded.disconnect_dropped()
        else:  # closed at the end: redis-py may share them with its slot table
            dropped = [*manager.startup_nodes.values(), *manager.nodes_cache.values()]
        manager.startup_nodes.clear()
        manager.slots_cache[client.keyslot(key)] = [gone]
        stranded.fails_open_then_hits_again(engine)
        assert manager.startup_nodes
    finally:
        stranded.close(engine)
        if mode == "sync":
            for node in dropped:
                if node.redis_connection is not None:
                    node.redis_connection.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_cluster_client_left_only_unreachable_startup_nodes_finds_the_cluster_again(
    cluster: RedisClusterProcesses, mode: str
) -> None:
    """The stranding above, one pop short: the callers' errors drop every reachable
    node from the startup nodes but one that is gone (its own callers' errors not
    among the last: the breaker was refusing them). Each refresh then asks only that
    node, fails ("Redis Cluster cannot be connected"), and on redis-py 5.0.8's
    asyncio client comes before any command, so nothing is dropped again: the startup
    nodes never empty, and a rule that waits for them to empty never gives the
    client its nodes back; every call fails open for good."""
    engine = CacheEngine.from_url(
        cluster.url.replace("redis://", "redis+cluster://"), breaker_cooldown=0.01
    )
    stranded = _Stranded.of(engine, mode, "left")
    call, key, client = stranded.call, stranded.key, stranded.client
    left, gone = stranded.gone(), stranded.gone()

    try:
        assert call("a").source is Source.LOADER
        assert call("a").source is Source.CACHE
        manager = client.nodes_manager
        if mode == "async":
            stranded.disconnect_dropped()
        manager.startup_nodes.clear()
        manager.startup_nodes[left.name] = left  # the one startup node left: gone
        manager.slots_cache[client.keyslot(key)] = [gone]  # the last error's node
        stranded.fails_open_then_hits_again(engine)
    finally:
        stranded.close(engine)
        _collect_what_redis_py_dropped()


def test_a_cluster_client_without_dynamic_startup_nodes_keeps_its_own(
    cluster: RedisClusterProcesses,
) -> None:
    """A client told to keep the startup nodes it was given (dynamic_startup_nodes=
    False: a load balancer's address, say) keeps them through failures: the engine
    gives back what was lost, never the slot table's nodes in their place."""
    client = redis.cluster.RedisCluster.from_url(cluster.url, dynamic_startup_nodes=False)
    try:
        manager = client.nodes_manager
        given = set(manager.startup_nodes)
        assert set(manager.nodes_cache) - given  # the slot table knows more nodes
        seeds = startup_addresses(client)
        assert not restore_startup_nodes(client, seeds, ConnectionError("a node failed"))
        assert not restore_startup_nodes(client, seeds, RedisClusterException("no node"))
        assert set(manager.startup_nodes) == given
        manager.startup_nodes.clear()  # all dropped (redis-py before 8): its own again
        assert restore_startup_nodes(client, seeds, RedisClusterException("no node"))
        assert set(manager.startup_nodes) == given
    finally:
        client.close()


@dataclasses.dataclass
class _Stranded:
    """What the stranded-client tests share: a cached function of an engine, called
    from a thread or an event loop of its own (`mode`), its key for "a", and its
    cluster client."""

    call: Callable[[str], Any]
    key: str
    client: Any
    loop: asyncio.AbstractEventLoop | None

    @classmethod
    def of(cls, engine: CacheEngine, mode: str, name: str) -> _Stranded:
        def load(id: str) -> dict[str, str]:
            return {"id": id}

        if mode == "sync":
            cached = cache_aside(key=f"{name}-sync:<id>", ttl=30, engine=engine)(load)
            client = engine.sides.sync_side().client
            return cls(cached.lookup, cached.key("a"), client, None)

        async def aload(id: str) -> dict[str, str]:
            return load(id)

        acached = cache_aside(key=f"{name}-async:<id>", ttl=30, engine=engine)(aload)
        loop = asyncio.new_event_loop()
        client = loop.run_until_complete(_async_side(engine)).client
        return cls(
            lambda id: loop.run_until_complete(acached.lookup(id)), acached.key("a"), client, loop
        )

    def gone(self) -> Any:
        """A master at a free port, nothing listening: one that is gone."""
        if self.loop is None:
            return redis.cluster.ClusterNode("127.0.0.1", free_port(), "primary")
        kwargs = self.client.nodes_manager.connection_kwargs
        return redis.asyncio.cluster.ClusterNode("127.0.0.1", free_port(), "primary", **kwargs)

    def disconnect_dropped(self) -> None:
        """Close the asyncio startup nodes the test is about to drop (those not also
        in the slot table), not leave them to the collector."""
        assert self.loop is not None
        manager = self.client.nodes_manager
        kept = {id(node) for node in manager.nodes_cache.values()}
        dropped = [n for n in manager.startup_nodes.values() if id(n) not in kept]
        self.loop.run_until_complete(_disconnect(dropped))

    def fails_open_then_hits_again(self, engine: CacheEngine) -> None:
        """Stranded: "a" is served by the loader, the failure counted; then, the
        client given its nodes back, hits resume."""
        errors = engine.stats().errors
        result = self.call("a")  # its master cannot be reached: served by the loader
        assert (result.value, result.source) == ({"id": "a"}, Source.LOADER)
        assert engine.stats().errors > errors
        deadline = time.monotonic() + 30  # a bound on a hang, not a speed claim
        while (result := self.call("a")).source is not Source.CACHE:
            assert result.value == {"id": "a"}
            assert time.monotonic() < deadline, "the client never found the cluster again"
            time.sleep(0.02)

    def close(self, engine: CacheEngine) -> None:
        if self.loop is not None:
            self.loop.run_until_complete(engine.aclose())
            self.loop.close()
        engine.close()


async def _async_side(engine: CacheEngine) -> Any:
    return engine.sides.async_side()


async def _disconnect(nodes: list[Any]) -> None:
    await asyncio.gather(*(node.disconnect() for node in nodes))


@dataclasses.dataclass
class Priced:
    id: str
    stock: int
    price: Decimal


def test_cluster_typed_values_with_tags_msgpack_and_hash(
    client: redis.cluster.RedisCluster,
) -> None:
    """Typed values meet Cluster and tags: entries over every master hit as the declared
    type (one and many), a typed hash takes update_field, the start-up check passes,
    and a tag drops them all."""
    engine = CacheEngine(client, prefix="typed")

    def load(id: str) -> Priced:
        return Priced(id, 1, Decimal("2.50"))

    read = cache_aside(key="item:<id>", ttl=60, engine=engine, tags=("all",))(load)
    record = cache_aside(key="record:<id>", ttl=60, engine=engine, tags=("all",), as_hash=True)(
        load
    )
    for fn in (read, record):
        assert fn.many(KEYS) == [load(id) for id in KEYS]
        hits = [fn.lookup(id) for id in KEYS]
        assert {(hit.source, type(hit.value)) for hit in hits} == {(Source.CACHE, Priced)}
    assert record.update_field(KEYS[0], "stock", 9) is Outcome.UPDATED
    assert record(KEYS[0]).stock == 9
    engine.check(tags=True)
    assert engine.invalidate_tags("all").deleted == 1
    assert all(read.lookup(id).source is Source.LOADER for id in KEYS)
    assert all(record.lookup(id).source is Source.LOADER for id in KEYS)
    engine.close()
