"""Cluster batches on the lean wire (`NodeConnections.call_many`,
`NodePipelines.call_many`) under faults: a share interrupted, cancelled or timing out
mid-reply leaves no reply behind; a master that hangs, a slot the client does not
cover and scripts a master forgot are each found again by batches alone; threads,
a forked child, one node, no command; and `HeldConnections.call_many`'s raise_error
after its split into send and receive."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio.cluster
import redis.cluster

from cached_aside import CacheEngine, _wire, cache_aside
from cached_aside._connections import HeldConnections
from cached_aside._keys import entry_keys
from cached_aside._node_connections import SLOTS_REFRESH_INTERVAL
from cached_aside._node_pipelines import NodePipelines

from .conftest import REDIS_URL, eventually
from .servers import REDIS_SERVER, RedisClusterProcesses
from .test_cluster_wire import (
    async_node_pipelines,
    expected,
    loaded,
    node_connections,
    on_reads,
    on_writes,
    replicated,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not on PATH"),
]
IDS = [f"id{i}" for i in range(30)]


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


@pytest.fixture
def prefix() -> str:
    return f"faults-{uuid.uuid4().hex[:8]}"


def port_of(client: Any, key: str) -> int:
    return int(client.get_node_from_key(key).port)


# --- interrupted, cancelled or timed out mid-batch ---------------------------------


def test_a_batch_interrupted_mid_write_closes_what_it_wrote_and_the_next_is_right(
    client: redis.cluster.RedisCluster, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first node's share written, the second's write interrupted: the first
    node's replies are on its socket, unread; its connection must go."""
    engine = CacheEngine(client, prefix=prefix)
    loads: list[str] = []
    read = cache_aside(key="item:<id>", ttl=60, engine=engine)(loaded(loads))
    other = cache_aside(key="other:<id>", ttl=60, engine=engine)(loaded([], "other"))
    try:
        assert read.many(IDS) == expected(IDS)
        assert other.many(IDS) == expected(IDS, "other")
        held = node_connections(engine)
        written: list[int] = []

        def interrupted(writes: Any) -> Any:
            def writing(connection: Any, data: Any) -> Any:
                if written:
                    raise KeyboardInterrupt
                written.append(connection.port)
                return writes(connection, data)

            return writing

        with monkeypatch.context() as patched:
            on_writes(patched, interrupted)
            with pytest.raises(KeyboardInterrupt):
                read.many(IDS)
        closed = {
            name: nodes._local.held.connection._sock is None for name, nodes in held.nodes.items()
        }
        assert closed[f"127.0.0.1:{written[0]}"]  # its replies were never read
        for _ in range(2):
            assert other.many(IDS) == expected(IDS, "other")  # its own replies
            assert read.many(IDS) == expected(IDS)
        assert sorted(loads) == sorted(IDS)  # never a load after the first
    finally:
        client.delete(*(read.key(id) for id in IDS), *(other.key(id) for id in IDS))
        engine.close()


def test_a_share_timing_out_mid_reply_fails_only_its_keys_and_leaves_no_reply_behind(
    client: redis.cluster.RedisCluster, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One node's share times out after its first reply: its keys fail open to the
    loader (never another command's reply), the node's next share goes through the
    client, and its socket, which held the rest of its replies, is gone. The timeout
    counts once on the node's breaker (not once per key of the share), so one slow
    reply does not open it."""
    engine = CacheEngine(client, prefix=prefix)
    loads: list[str] = []
    read = cache_aside(key="item:<id>", ttl=60, engine=engine)(loaded(loads))
    other = cache_aside(key="other:<id>", ttl=60, engine=engine)(loaded([], "other"))
    try:
        assert read.many(IDS) == expected(IDS)
        assert other.many(IDS) == expected(IDS, "other")
        held = node_connections(engine)
        victim = port_of(client, read.key(IDS[0]))
        on_victim = [id for id in IDS if port_of(client, read.key(id)) == victim]
        assert len(on_victim) > 1  # a reply read, the others left on the socket
        count = [0]

        def timing_out(reads: Any) -> Any:
            def reading(connection: Any, *args: Any, **kwargs: Any) -> Any:
                if connection.port == victim:
                    count[0] += 1
                    if count[0] == 2:
                        raise redis.TimeoutError("Timeout reading from socket")
                return reads(connection, *args, **kwargs)

            return reading

        loads.clear()
        with monkeypatch.context() as patched:
            on_reads(patched, timing_out)
            assert read.many(IDS) == expected(IDS)
        assert sorted(loads) == sorted(on_victim)  # failed open, the others hits
        name = f"127.0.0.1:{victim}"
        assert name in held.suspect
        assert engine.breaker.nodes[name].state == "closed"  # one timeout, counted once
        loads.clear()
        for _ in range(2):
            assert other.many(IDS) == expected(IDS, "other")
            assert read.many(IDS) == expected(IDS)
        assert loads == []
    finally:
        client.delete(*(read.key(id) for id in IDS), *(other.key(id) for id in IDS))
        engine.close()


@async_node_pipelines
async def test_async_a_batch_cancelled_with_one_share_mid_reply_leaves_no_reply_behind(
    cluster: RedisClusterProcesses, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two nodes' shares answered, the third's cancelled after its first reply: its
    other replies are still on its socket and must answer nobody."""
    client = redis.asyncio.cluster.RedisCluster.from_url(cluster.url)
    engine = CacheEngine(async_client=client, prefix=prefix)
    loads: list[str] = []

    @cache_aside(key="item:<id>", ttl=60, engine=engine)
    async def read(id: str) -> dict[str, str]:
        loads.append(id)
        return {"id": id}

    @cache_aside(key="other:<id>", ttl=60, engine=engine)
    async def other(id: str) -> dict[str, str]:
        return {"other": id}

    try:
        assert await read.many(IDS) == expected(IDS)
        assert await other.many(IDS) == expected(IDS, "other")
        pipelines = engine.sides.async_side().pipeline
        assert isinstance(pipelines, NodePipelines)
        assert len(pipelines.nodes) == 3
        victim = port_of(client, read.key(IDS[0]))
        elsewhere = len([id for id in IDS if port_of(client, read.key(id)) != victim])
        stuck = asyncio.Event()
        stalled = [True]
        given = [0]  # replies the other nodes' readers gave

        class Reader:
            """A node connection's reply reader, counting the replies it gives; the
            victim's gives its first, then says the rest has not arrived (so its
            reader awaits the socket, where nothing more comes: stuck mid-share)."""

            def __init__(self, reader: Any, on_victim: bool) -> None:
                self.reader, self.on_victim, self.count = reader, on_victim, 0

            def gets(self, *args: Any) -> Any:
                if self.on_victim and self.count == 1 and stalled[0]:
                    stuck.set()
                    return _wire._NOT_ENOUGH_DATA
                reply = self.reader.gets(*args)
                if reply is not _wire._NOT_ENOUGH_DATA:
                    self.count += 1
                    given[0] += 0 if self.on_victim else 1
                return reply

            def __getattr__(self, name: str) -> Any:
                return getattr(self.reader, name)

        def stalling(connection: Any, on_victim: bool) -> None:
            """Without the lean reader (no hiredis) the pipeline reads with redis-py's
            read_response: the same stall there, the victim's waiting for ever."""
            reads = connection.read_response
            count = [0]

            async def read_response(*args: Any, **kwargs: Any) -> Any:
                if on_victim and count[0] == 1:
                    stuck.set()
                    await asyncio.Event().wait()  # until cancelled
                reply = await reads(*args, **kwargs)
                count[0] += 1
                given[0] += 0 if on_victim else 1
                return reply

            connection.read_response = read_response

        connections = [pipeline._connection for pipeline in pipelines.nodes.values()]
        parsers = {}
        for name, pipeline in pipelines.nodes.items():
            on_victim = name == f"127.0.0.1:{victim}"
            if _wire.lean(pipeline._connection):
                parser = parsers[name] = pipeline._connection._parser
                parser._reader = Reader(parser._reader, on_victim)
            else:
                stalling(pipeline._connection, on_victim)
        task = asyncio.ensure_future(read.many(IDS))
        await asyncio.wait_for(stuck.wait(), 30)
        assert await eventually(lambda: given[0] == elsewhere)  # the other shares, done
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The rest of the victim's share "arrives" (its pipeline's reader reads on for
        # nobody, as with a slow reply), and every connection reads with its own
        # reader again.
        stalled[0] = False
        for parser in parsers.values():
            parser._reader = parser._reader.reader
        for connection in connections:
            connection.__dict__.pop("read_response", None)
        for _ in range(2):
            assert await other.many(IDS) == expected(IDS, "other")
            assert await read.many(IDS) == expected(IDS)
            assert [await other(id) for id in IDS[:3]] == expected(IDS[:3], "other")
        assert sorted(loads) == sorted(IDS)  # never a load after the first
        await client.delete(*(read.key(id) for id in IDS), *(other.key(id) for id in IDS))
    finally:
        await engine.aclose()
        await client.aclose()


# --- found again by batches alone --------------------------------------------------


def test_async_after_a_master_hangs_batches_alone_resume_on_its_promoted_replica() -> None:
    """Nothing but async batches: a share's timeout comes back in place of its
    replies (a Pipeline never raises it), and must make the node suspect all the
    same, so that a command of its next share goes through the cluster client,
    which alone learns the failover; else every batch times out on the hung master
    for good."""
    cluster = RedisClusterProcesses(masters=3, replicas=1).start()
    try:

        async def batches() -> bool:
            client = redis.asyncio.cluster.RedisCluster.from_url(cluster.url, socket_timeout=1.0)
            engine = CacheEngine(async_client=client, prefix="faults-hung")
            loads: list[str] = []

            @cache_aside(key="item:<id>", ttl=60, engine=engine)
            async def read(id: str) -> dict[str, str]:
                loads.append(id)
                return {"id": id}

            try:
                assert await read.many(IDS) == expected(IDS)
                seed = int(cluster.url.rsplit(":", 1)[1].split("/")[0])
                port = next(p for id in IDS if (p := port_of(client, read.key(id))) != seed)
                on_victim = [id for id in IDS if port_of(client, read.key(id)) == port]
                victim = next(node for node in cluster.nodes if node.port == port)
                assert await eventually(
                    lambda: all(replicated(cluster, port, read.key(id)) for id in on_victim)
                )
                victim.pause()
                try:
                    # A bound on a hang, not a speed: the replica's election, the breaker.
                    deadline = time.monotonic() + 40
                    while time.monotonic() < deadline:
                        loads.clear()
                        assert await read.many(IDS) == expected(IDS)
                        if not loads:
                            return port_of(client, read.key(on_victim[0])) != port
                        await asyncio.sleep(0.05)
                    return False
                finally:
                    victim.resume()
            finally:
                await engine.aclose()
                await client.aclose()

        assert asyncio.run(batches())
    finally:
        cluster.stop()


def test_a_slot_the_client_does_not_cover_is_found_again_by_a_batch(
    cluster: RedisClusterProcesses, client: redis.cluster.RedisCluster, prefix: str
) -> None:
    """The client's slot table lost a slot (a refresh mid-failover read it uncovered):
    its keys fail open, and the client is asked to find the slot again, as a single
    command through it would (redis-py refreshes its table on SlotNotCoveredError);
    never sent, a batch's keys of that slot would fail for good."""
    engine = CacheEngine(client, prefix=prefix)
    loads: list[str] = []
    read = cache_aside(key="item:<id>", ttl=60, engine=engine)(loaded(loads))
    try:
        assert read.many(IDS) == expected(IDS)
        slot = client.keyslot(read.key(IDS[0]))
        client.nodes_manager.slots_cache.pop(slot)
        loads.clear()
        assert read.many(IDS) == expected(IDS)
        assert loads == []  # found at once, and a hit
        assert client.nodes_manager.slots_cache.get(slot)

        async def batches() -> None:
            aclient = redis.asyncio.cluster.RedisCluster.from_url(cluster.url)
            aengine = CacheEngine(async_client=aclient, prefix=prefix)

            @cache_aside(key="item:<id>", ttl=60, engine=aengine)
            async def aread(id: str) -> dict[str, str]:
                loads.append(id)
                return {"id": id}

            try:
                assert await aread.many(IDS) == expected(IDS)
                aclient.nodes_manager.slots_cache.pop(slot)
                assert await aread.many(IDS) == expected(IDS)
                assert loads == []
                assert aclient.nodes_manager.slots_cache.get(slot)
            finally:
                await aengine.aclose()
                await aclient.aclose()

        asyncio.run(batches())
    finally:
        client.delete(*(read.key(id) for id in IDS))
        engine.close()


def test_batches_ask_for_the_slot_table_at_most_once_an_interval(
    client: redis.cluster.RedisCluster, prefix: str
) -> None:
    """While a slot stays uncovered, not every batch asks the cluster for its slots:
    once per SLOTS_REFRESH_INTERVAL on the engine's clock, whichever batch asks first."""
    engine = CacheEngine(client, prefix=prefix)
    loads: list[str] = []
    read = cache_aside(key="item:<id>", ttl=60, engine=engine)(loaded(loads))
    held = node_connections(engine)
    now = [1000.0]
    held.clock = lambda: now[0]
    slot = client.keyslot(read.key(IDS[0]))
    try:
        assert read.many(IDS) == expected(IDS)
        before = held.refreshes
        client.nodes_manager.slots_cache.pop(slot)
        assert read.many(IDS) == expected(IDS)
        assert client.nodes_manager.slots_cache.get(slot), "found again"
        for _ in range(2):
            # Lost again within the interval: answered all the same (redis-py 8.2's
            # pipeline finds the slot itself; before it, those keys fail open).
            client.nodes_manager.slots_cache.pop(slot, None)
            assert read.many(IDS) == expected(IDS)
        assert held.refreshes == before + 1  # the first batch asked; not the others
        now[0] += SLOTS_REFRESH_INTERVAL
        client.nodes_manager.slots_cache.pop(slot, None)
        assert read.many(IDS) == expected(IDS)
        assert client.nodes_manager.slots_cache.get(slot), "found again"
        assert held.refreshes == before + 2
    finally:
        client.delete(*(read.key(id) for id in IDS))
        engine.close()


def test_scripts_a_master_forgot_are_reloaded_for_a_batch(
    cluster: RedisClusterProcesses, client: redis.cluster.RedisCluster, prefix: str
) -> None:
    """SCRIPT FLUSH on every master between batches of misses (acquires and stores
    are scripts), sync and async, and for invalidate_many(): each NOSCRIPT entry is
    sent again once its script is loaded; every value is stored, no lock is left."""
    admins = [node.admin() for node in cluster.nodes]
    engine = CacheEngine(client, prefix=prefix)
    loads: list[str] = []
    read = cache_aside(key="item:<id>", ttl=60, engine=engine)(loaded(loads))

    def flush() -> None:
        for admin in admins:
            admin.script_flush()

    def locks() -> list[Any]:
        return [id for id in IDS if client.exists(entry_keys(read.key(id)).lock)]

    try:
        assert read.many(IDS[:2]) == expected(IDS[:2])  # the scripts loaded once
        flush()
        assert read.many(IDS) == expected(IDS)
        assert read.many(IDS) == expected(IDS)  # stored: hits
        assert sorted(loads) == sorted(IDS)
        assert locks() == []
        flush()
        read.invalidate_many(IDS)
        assert client.exists(*(read.key(id) for id in IDS)) == 0
        loads.clear()

        async def batches() -> None:
            aclient = redis.asyncio.cluster.RedisCluster.from_url(cluster.url)
            aengine = CacheEngine(async_client=aclient, prefix=prefix)

            @cache_aside(key="item:<id>", ttl=60, engine=aengine)
            async def aread(id: str) -> dict[str, str]:
                loads.append(id)
                return {"id": id}

            try:
                assert await aread.many(IDS[:2]) == expected(IDS[:2])
                flush()
                assert await aread.many(IDS) == expected(IDS)
                assert await aread.many(IDS) == expected(IDS)
                assert sorted(loads) == sorted(IDS)
                flush()
                await aread.invalidate_many(IDS)
                assert await aclient.exists(*(read.key(id) for id in IDS)) == 0
            finally:
                await aengine.aclose()
                await aclient.aclose()

        asyncio.run(batches())
        assert locks() == []
    finally:
        for admin in admins:
            admin.close()
        client.delete(*(read.key(id) for id in IDS))
        engine.close()


# --- threads, fork, one node, no command -------------------------------------------


def test_threads_batching_on_one_engine_each_get_their_own_replies(
    client: redis.cluster.RedisCluster, prefix: str
) -> None:
    """Several threads batch on one engine, each its own function (its own values):
    a reply given to another thread's command would show as the wrong value."""
    engine = CacheEngine(client, prefix=prefix)
    functions = [
        cache_aside(key=f"t{n}:<id>", ttl=60, engine=engine)(loaded([], f"t{n}")) for n in range(4)
    ]
    wrong: list[Any] = []
    start = threading.Barrier(len(functions))
    made: list[Any] = []
    inner = client.pipeline
    client.pipeline = lambda *args, **kwargs: made.append(args) or inner(*args, **kwargs)  # type: ignore[method-assign]

    def batches(n: int) -> None:
        start.wait()
        for _ in range(20):
            got = functions[n].many(IDS)
            if got != expected(IDS, f"t{n}"):
                wrong.append(got)

    try:
        threads = [threading.Thread(target=batches, args=(n,)) for n in range(len(functions))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not any(thread.is_alive() for thread in threads)
        assert wrong == []
        held = node_connections(engine)
        assert (len(held.nodes), held.fallbacks, made) == (3, 0, [])  # all on the lean wire
    finally:
        client.delete(*(f.key(id) for f in functions for id in IDS))
        engine.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_a_forked_child_batches_on_sockets_of_its_own(
    client: redis.cluster.RedisCluster, prefix: str
) -> None:
    engine = CacheEngine(client, prefix=prefix)
    loads: list[str] = []
    read = cache_aside(key="item:<id>", ttl=60, engine=engine)(loaded(loads))
    other = cache_aside(key="other:<id>", ttl=60, engine=engine)(loaded([], "other"))
    try:
        assert read.many(IDS) == expected(IDS)
        assert other.many(IDS) == expected(IDS, "other")
        held = node_connections(engine)
        parents = {id(nodes._local.held.connection._sock) for nodes in held.nodes.values()}
        assert len(parents) == 3
        pid = os.fork()
        if pid == 0:  # the child: never the parent's sockets
            code = 1
            try:
                ok = all(
                    [
                        read.many(IDS) == expected(IDS),
                        other.many(IDS) == expected(IDS, "other"),
                        len(held.nodes) == 3,
                        not parents
                        & {id(nodes._local.held.connection._sock) for nodes in held.nodes.values()},
                    ]
                )
                code = 0 if ok else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        for _ in range(2):  # the parent's sockets still in step
            assert read.many(IDS) == expected(IDS)
            assert other.many(IDS) == expected(IDS, "other")
        assert {id(nodes._local.held.connection._sock) for nodes in held.nodes.values()} == parents
        assert sorted(loads) == sorted(IDS)
    finally:
        client.delete(*(read.key(id) for id in IDS), *(other.key(id) for id in IDS))
        engine.close()


def test_a_batch_on_one_node_and_an_empty_batch(
    cluster: RedisClusterProcesses, client: redis.cluster.RedisCluster, prefix: str
) -> None:
    engine = CacheEngine(client, prefix=prefix)
    loads: list[str] = []
    read = cache_aside(key="item:<id>", ttl=60, engine=engine)(loaded(loads))
    ids = [f"n{i}" for i in range(200)]
    port = port_of(client, read.key(ids[0]))
    ids = [id for id in ids if port_of(client, read.key(id)) == port][:20]
    try:
        assert read.many([]) == []
        read.invalidate_many([])
        assert read.many(ids) == expected(ids)
        assert read.many(ids) == expected(ids)
        assert sorted(loads) == sorted(ids)
        held = node_connections(engine)
        assert list(held.nodes) == [f"127.0.0.1:{port}"]
        assert held.fallbacks == 0

        async def batches() -> None:
            aclient = redis.asyncio.cluster.RedisCluster.from_url(cluster.url)
            aengine = CacheEngine(async_client=aclient, prefix=prefix)

            @cache_aside(key="item:<id>", ttl=60, engine=aengine)
            async def aread(id: str) -> dict[str, str]:
                loads.append(id)
                return {"id": id}

            try:
                assert await aread.many([]) == []
                await aread.invalidate_many([])
                assert await aread.many(ids) == expected(ids)
                pipelines = aengine.sides.async_side().pipeline
                assert isinstance(pipelines, NodePipelines)
                # Where a node's connections cannot be lent, none is made: the client's.
                nodes = [f"127.0.0.1:{port}"] if pipelines.lean else []
                assert list(pipelines.nodes) == nodes
            finally:
                await aengine.aclose()
                await aclient.aclose()

        asyncio.run(batches())
        assert sorted(loads) == sorted(ids)
    finally:
        client.delete(*(read.key(id) for id in ids))
        engine.close()


# --- HeldConnections.call_many after its split (one Redis) -------------------------


@pytest.mark.skipif(REDIS_URL is None, reason="no Redis server reachable")
def test_held_call_many_raises_an_error_reply_after_reading_every_reply() -> None:
    assert REDIS_URL is not None
    client = redis.Redis.from_url(REDIS_URL)
    key = f"faults-{uuid.uuid4().hex[:8]}"
    held = HeldConnections(client.connection_pool)
    try:
        assert held.call_many([("SET", key, "1")]) == (True, [b"OK"])
        commands = [("GET", key), ("HGET", key, "f"), ("GET", key)]
        with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
            held.call_many(commands, raise_error=True)
        assert held.call_many([("GET", key)], raise_error=True) == (True, [b"1"])  # in step
        answered, replies = held.call_many(commands)
        assert answered
        assert replies[0] == replies[2] == b"1"
        assert isinstance(replies[1], redis.ResponseError)
        connection = held._local.held.connection
        killer = redis.Redis.from_url(REDIS_URL)
        try:
            own = held.call_many([("CLIENT", "ID")])[1][0]
            assert killer.client_kill_filter(_id=own) == 1
        finally:
            killer.close()
        # Lost: no reply, nothing raised, even with raise_error; the next is right.
        assert held.call_many(commands, raise_error=True) == (False, [])
        assert connection._sock is None
        assert held.call_many([("GET", key)], raise_error=True) == (True, [b"1"])
    finally:
        client.delete(key)
        client.close()


def test_a_batch_failing_whole_on_a_slot_no_node_covers_fails_open_not_raising() -> None:
    """Bookkeeping alone: a whole batch failed, and one of its keys' slots is in no
    node's hands (mid-failover). Finding the nodes to hold the failure against must
    not raise in turn (it did: the slot table's SlotNotCoveredError escaped the
    handler), so every entry gets the failure and the caller its fail-open answer."""
    from redis.exceptions import RedisClusterException, RedisError, SlotNotCoveredError

    from cached_aside._effects import Command
    from cached_aside._pipelines import _failed_together
    from cached_aside._runtime import failed

    counted: list[str | None] = []

    def route(key: str) -> Any:
        raise SlotNotCoveredError(f"no node covers {key}'s slot")

    def failure(exc: BaseException, key: str | None = None) -> Any:
        counted.append(key)
        return failed(exc)

    rt: Any = type(
        "Runtime",
        (),
        {"route": staticmethod(route), "failures": (RedisError, RedisClusterException)},
    )()
    rt.failure = failure
    effects = [Command(("GET", "a")), Command(("GET", "b"))]
    outage = redis.ConnectionError("the cluster is down")
    replies = _failed_together(rt, effects, outage)
    assert [reply.cause for reply in replies] == [outage, outage]
    assert len(counted) == 1  # the batch's one failure, counted once


def test_a_batchs_answers_route_no_key_while_no_breaker_counts_and_keep_a_failing_nodes_count() -> (
    None
):
    """Bookkeeping of a batch's replies on a cluster (_settled): while no node's
    breaker counts failures, answers route no key again (a CRC16 and a slot lookup
    per key, most of a cluster batch's cost) and make no breaker; a node whose share
    failed has its failure counted once, and the other nodes' answers in the same
    batch do not wipe it; once a node counts failures, its answers reset it."""
    from types import SimpleNamespace

    from cached_aside._breaker import NodeBreakers
    from cached_aside._effects import Command
    from cached_aside._pipelines import _settled
    from cached_aside._runtime import SyncRuntime

    routed: list[str] = []

    def route(key: str) -> Any:
        routed.append(key)
        return SimpleNamespace(name=f"node-{key[0]}")  # keys "a..." on node-a, "b..." on node-b

    manager = SimpleNamespace(startup_nodes={"seed": object()}, nodes_cache={}, slots_cache={})
    client = SimpleNamespace(nodes_manager=manager)
    breaker = NodeBreakers(3, 1.0)
    rt = SyncRuntime(
        client=client, scripts={}, block_limit_ms=1000, breaker=breaker, outbox=None, route=route
    )  # type: ignore[arg-type]
    effects = [Command(("GET", key)) for key in ("a1", "b1", "a2", "b2")]

    assert _settled(rt, effects, [b"1", b"2", b"3", None]) == [b"1", b"2", b"3", None]
    assert routed == []
    assert breaker.nodes == {}

    outage = redis.TimeoutError("node-a hangs")  # one failure for node-a's whole share
    settled = _settled(rt, effects, [outage, b"2", outage, b"4"])
    assert [type(reply).__name__ for reply in settled] == ["CommandFailed", "bytes"] * 2
    assert breaker.nodes["node-a"].failures == 1  # counted once, kept
    assert "node-b" not in breaker.nodes or breaker.nodes["node-b"].failures == 0
    assert breaker.failures == 1

    assert _settled(rt, effects, [b"1", b"2", b"3", b"4"]) == [b"1", b"2", b"3", b"4"]
    assert breaker.nodes["node-a"].failures == 0  # node-a answered: its count is over
    assert breaker.failures == 0


def test_a_batchs_answers_keep_the_count_of_a_slot_no_node_covers_in_the_same_batch() -> None:
    """A batch whose keys on covered slots answer while a key on a slot no node covers
    (mid-failover) fails: that failure is counted on the unrouted breaker and stands,
    as it does when the answers come first in the batch, and as a single call's
    answer leaves it (asend's rule: no breaker counts, nothing to reset). The answers
    must not wipe a count their own batch made, whatever the order of its replies:
    else a slot left uncovered never opens its breaker from batches."""
    from types import SimpleNamespace

    from cached_aside._breaker import UNROUTED, NodeBreakers
    from cached_aside._effects import Command
    from cached_aside._pipelines import _settled
    from cached_aside._runtime import SyncRuntime

    def route(key: str) -> Any:
        if key.startswith("x"):  # "x...": a slot no node covers
            raise redis.exceptions.SlotNotCoveredError(f"no node covers {key}'s slot")
        return SimpleNamespace(name=f"node-{key[0]}")

    manager = SimpleNamespace(startup_nodes={"seed": object()}, nodes_cache={}, slots_cache={})
    client = SimpleNamespace(nodes_manager=manager)
    for keys in (("x1", "a1"), ("a1", "x1")):
        breaker = NodeBreakers(3, 1.0)
        rt = SyncRuntime(
            client=client,
            scripts={},
            block_limit_ms=1000,
            breaker=breaker,
            outbox=None,  # type: ignore[arg-type]
            route=route,
        )
        effects = [Command(("GET", key)) for key in keys]
        lost = redis.exceptions.SlotNotCoveredError("no node covers the slot")
        replies = [lost if key.startswith("x") else b"1" for key in keys]
        _settled(rt, effects, replies)
        assert UNROUTED in breaker.nodes, keys
        assert breaker.nodes[UNROUTED].failures == 1, keys
        assert breaker.failures == 1, keys
