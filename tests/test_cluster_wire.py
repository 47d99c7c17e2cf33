"""The lean wire on Redis Cluster (`_node_connections.py`): hits go to their slot's
master on a connection held per node, redirects (MOVED, ASK) are followed by the
cluster client, a killed connection falls over once; sync and async."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis.asyncio.cluster
import redis.cluster

from cached_aside import CacheEngine, Source, _compat, _connections, _wire, cache_aside
from cached_aside._keys import entry_keys
from cached_aside._node_connections import NodeConnections
from cached_aside._node_pipelines import NodePipelines

from .conftest import wait_until
from .servers import REDIS_SERVER, RedisClusterProcesses

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not on PATH"),
]
IDS = [f"id{i}" for i in range(60)]


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
    return f"wire-{uuid.uuid4().hex[:8]}"


class Counted:
    """Wraps a client's execute_command (sync or async) and counts the calls: the
    commands redis-py's cluster client sent for us."""

    def __init__(self, client: Any) -> None:
        self.calls: list[tuple[Any, ...]] = []
        inner = client.execute_command
        if isinstance(client, redis.asyncio.cluster.RedisCluster):

            async def counting_async(*args: Any, **kwargs: Any) -> Any:
                self.calls.append(args)
                return await inner(*args, **kwargs)

            client.execute_command = counting_async
        else:

            def counting(*args: Any, **kwargs: Any) -> Any:
                self.calls.append(args)
                return inner(*args, **kwargs)

            client.execute_command = counting


# Tests of the asyncio cluster's connection per node: redis-py 8.1 and later lend a
# node's connections (node_pipelines_problem()); before, every async call goes through
# the cluster client and these do not apply (the matrix deselects them there, and says
# why). What async batches must do on every version is tested without the mark.
async_node_pipelines = pytest.mark.async_node_pipelines


def on_reads(monkeypatch: pytest.MonkeyPatch, wrap: Callable[[Any], Any]) -> None:
    """Every reply a held connection reads goes through `wrap(read)`: the lean
    reader's where it runs (this redis-py and parser), else redis-py's read_response,
    which held connections read with there."""
    if _wire.lean(redis.Connection()):
        monkeypatch.setattr(_connections, "read", wrap(_connections.read))
    else:
        monkeypatch.setattr(redis.Connection, "read_response", wrap(redis.Connection.read_response))


def on_writes(monkeypatch: pytest.MonkeyPatch, wrap: Callable[[Any], Any]) -> None:
    """As on_reads, for each write of a held connection: (connection, data)."""
    if _wire.lean(redis.Connection()):
        monkeypatch.setattr(_connections, "write", wrap(_connections.write))
    else:
        sends = redis.Connection.send_packed_command

        def writing(connection: Any, command: Any, *args: Any, **kwargs: Any) -> Any:
            return wrap(lambda c, data: sends(c, data, *args, **kwargs))(connection, command)

        monkeypatch.setattr(redis.Connection, "send_packed_command", writing)


def node_connections(engine: CacheEngine) -> NodeConnections:
    held = engine.sides.sync_side().held
    assert isinstance(held, NodeConnections)
    return held


class Slot:
    """Moves one slot between two masters as redis-cli --cluster reshard does:
    IMPORTING/MIGRATING, MIGRATE of its keys, then NODE on every master."""

    def __init__(self, cluster: RedisClusterProcesses, client: Any, key: str) -> None:
        self.slot = client.keyslot(key)
        self.admins = {node.port: node.admin() for node in cluster.nodes}
        self.ids = {
            port: admin.execute_command("CLUSTER", "MYID") for port, admin in self.admins.items()
        }
        self.old = client.get_node_from_key(key).port
        self.new = next(port for port in self.admins if port != self.old)

    def migrate(self) -> None:
        """The slot's keys moved to the new master, the slot still the old one's: the
        old one answers ASK for them."""
        old, new = self.admins[self.old], self.admins[self.new]
        new.execute_command("CLUSTER", "SETSLOT", self.slot, "IMPORTING", self.ids[self.old])
        old.execute_command("CLUSTER", "SETSLOT", self.slot, "MIGRATING", self.ids[self.new])
        keys = old.execute_command("CLUSTER", "GETKEYSINSLOT", self.slot, 1000)
        assert keys, "nothing to migrate"
        old.execute_command("MIGRATE", "127.0.0.1", self.new, "", 0, 5000, "KEYS", *keys)

    def assign(self) -> None:
        """The slot is the new master's: the old one answers MOVED."""
        for admin in self.admins.values():
            admin.execute_command("CLUSTER", "SETSLOT", self.slot, "NODE", self.ids[self.new])

    def close(self) -> None:
        for admin in self.admins.values():
            admin.close()


def loaded(loads: list[str], tag: str = "id") -> Callable[[str], dict[str, str]]:
    def load(id: str) -> dict[str, str]:
        loads.append(id)
        return {tag: id}

    return load


def test_hits_on_every_master_go_over_held_connections(
    client: redis.cluster.RedisCluster, prefix: str
) -> None:
    engine = CacheEngine(client, prefix=prefix)
    loads: list[str] = []
    read = cache_aside(key="item:<id>", ttl=60, engine=engine)(loaded(loads))
    assert [read(id) for id in IDS] == [{"id": id} for id in IDS]  # stored
    counted = Counted(client)
    assert [read(id) for id in IDS] == [{"id": id} for id in IDS]  # hits
    assert loads == IDS  # each loaded once: the second round were hits
    assert counted.calls == []  # none through redis-py's cluster client
    held = node_connections(engine)
    masters = {client.get_node_from_key(read.key(id)).name for id in IDS}
    assert len(masters) == 3
    assert set(held.nodes) == masters  # a connection held on each master
    assert held.fallbacks == 0
    client.delete(*(read.key(id) for id in IDS))
    engine.close()


def test_a_moved_slot_is_followed_by_the_client_then_hits_go_to_the_new_master(
    client: redis.cluster.RedisCluster, cluster: RedisClusterProcesses, prefix: str
) -> None:
    engine = CacheEngine(client, prefix=prefix)
    loads: list[str] = []
    read = cache_aside(key="item:<id>", ttl=60, engine=engine)(loaded(loads))
    assert read("m") == {"id": "m"}
    assert read("m") == {"id": "m"}  # a hit: the old master's held connection
    key = entry_keys(read.key("m")).value
    slot = Slot(cluster, client, key)
    held = node_connections(engine)
    try:
        slot.migrate()
        slot.assign()
        counted = Counted(client)
        result = read.lookup("m")
        assert (result.value, result.source) == ({"id": "m"}, Source.CACHE)  # no error, no load
        assert held.redirects == 1  # MOVED: the cluster client served that one
        assert len(counted.calls) == 1
        assert client.get_node_from_key(key).port == slot.new  # its slot table learned
        for _ in range(3):
            assert read("m") == {"id": "m"}
        assert len(counted.calls) == 1  # the later hits went to the new master directly
        assert held.redirects == 1
        assert f"127.0.0.1:{slot.new}" in held.nodes
        assert loads == ["m"]
    finally:
        slot.close()
        client.delete(key)
        engine.close()


def test_an_ask_during_a_migration_is_answered_through_the_client(
    client: redis.cluster.RedisCluster, cluster: RedisClusterProcesses, prefix: str
) -> None:
    engine = CacheEngine(client, prefix=prefix)
    loads: list[str] = []
    read = cache_aside(key="item:<id>", ttl=60, engine=engine)(loaded(loads))
    assert read("a") == {"id": "a"}
    assert read("a") == {"id": "a"}
    key = entry_keys(read.key("a")).value
    slot = Slot(cluster, client, key)
    held = node_connections(engine)
    try:
        slot.migrate()  # the key is on the new master, the slot still the old one's
        counted = Counted(client)
        for _ in range(2):
            result = read.lookup("a")
            assert (result.value, result.source) == ({"id": "a"}, Source.CACHE)
        # ASK moves no slot: each hit is asked on the old master, then the client
        # sends it (ASKING) to the new one.
        assert (held.redirects, len(counted.calls)) == (2, 2)
        assert client.get_node_from_key(key).port == slot.old
        assert loads == ["a"]
    finally:
        slot.assign()  # the migration finished: the cluster as whole as before
        slot.close()
        client.delete(key)
        engine.close()


def test_a_killed_held_connection_falls_over_once_then_reconnects(
    client: redis.cluster.RedisCluster, cluster: RedisClusterProcesses, prefix: str
) -> None:
    engine = CacheEngine(client, prefix=prefix)
    loads: list[str] = []
    read = cache_aside(key="item:<id>", ttl=60, engine=engine)(loaded(loads))
    assert read("c") == {"id": "c"}
    assert read("c") == {"id": "c"}
    node = client.get_node_from_key(read.key("c"))
    held = node_connections(engine)
    connection = held.nodes[node.name]._local.held.connection
    victim = next(n for n in cluster.nodes if n.port == node.port)
    admin = victim.admin()
    try:
        # Every client connection to that master (the held one among them) closed.
        assert admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes") >= 1
        counted = Counted(client)
        assert read("c") == {"id": "c"}  # the client served it, after its own retry
        assert held.fallbacks == 1
        assert len(counted.calls) == 1
        for _ in range(3):
            assert read("c") == {"id": "c"}
        assert (held.fallbacks, len(counted.calls)) == (1, 1)  # held again, reconnected
        assert held.nodes[node.name]._local.held.connection is connection
        assert connection._sock is not None
        assert loads == ["c"]
    finally:
        admin.close()
        client.delete(read.key("c"))
        engine.close()


@async_node_pipelines
async def test_async_hits_on_every_master_share_a_connection_per_node(
    cluster: RedisClusterProcesses, prefix: str
) -> None:
    client = redis.asyncio.cluster.RedisCluster.from_url(cluster.url)
    engine = CacheEngine(async_client=client, prefix=prefix)
    loads: list[str] = []

    @cache_aside(key="item:<id>", ttl=60, engine=engine)
    async def read(id: str) -> dict[str, str]:
        loads.append(id)
        return {"id": id}

    try:
        assert [await read(id) for id in IDS] == [{"id": id} for id in IDS]
        counted = Counted(client)
        assert [await read(id) for id in IDS] == [{"id": id} for id in IDS]
        assert loads == IDS
        assert counted.calls == []
        pipelines = engine.sides.async_side().pipeline
        assert isinstance(pipelines, NodePipelines)
        masters = {client.get_node_from_key(read.key(id)).name for id in IDS}
        assert len(masters) == 3
        assert set(pipelines.nodes) == masters
        await client.delete(*(read.key(id) for id in IDS))
    finally:
        await engine.aclose()
        await client.aclose()


@async_node_pipelines
async def test_async_a_moved_slot_is_followed_then_hits_go_to_the_new_master(
    cluster: RedisClusterProcesses, prefix: str
) -> None:
    client = redis.asyncio.cluster.RedisCluster.from_url(cluster.url)
    engine = CacheEngine(async_client=client, prefix=prefix)
    loads: list[str] = []

    @cache_aside(key="item:<id>", ttl=60, engine=engine)
    async def read(id: str) -> dict[str, str]:
        loads.append(id)
        return {"id": id}

    try:
        assert await read("m") == {"id": "m"}
        assert await read("m") == {"id": "m"}
        key = entry_keys(read.key("m")).value
        slot = Slot(cluster, client, key)
        try:
            slot.migrate()
            slot.assign()
            counted = Counted(client)
            result = await read.lookup("m")
            assert (result.value, result.source) == ({"id": "m"}, Source.CACHE)
            pipelines = engine.sides.async_side().pipeline
            assert isinstance(pipelines, NodePipelines)
            assert (pipelines.redirects, len(counted.calls)) == (1, 1)
            for _ in range(3):
                assert await read("m") == {"id": "m"}
            assert (pipelines.redirects, len(counted.calls)) == (1, 1)
            assert f"127.0.0.1:{slot.new}" in pipelines.nodes
            assert loads == ["m"]
        finally:
            slot.close()
            await client.delete(key)
    finally:
        await engine.aclose()
        await client.aclose()


def test_after_a_master_hangs_hits_resume_on_its_promoted_replica() -> None:
    """Nothing but hits on the hung master's key, each timing out on the lean path:
    redis-py learns a new topology only from its own commands, so a node the lean
    path failed on sends its next call through the client (which asks for a
    refresh), or hits would never find the replica promoted in its place."""
    cluster = RedisClusterProcesses(masters=3, replicas=1).start()
    client = redis.cluster.RedisCluster.from_url(cluster.url, socket_timeout=1.0)
    engine = CacheEngine(client, prefix=f"wire-{uuid.uuid4().hex[:8]}")
    try:
        loads: list[str] = []
        read = cache_aside(key="item:<id>", ttl=60, engine=engine)(loaded(loads))
        seed = int(cluster.url.rsplit(":", 1)[1].split("/")[0])
        id = next(id for id in IDS if client.get_node_from_key(read.key(id)).port != seed)
        port = client.get_node_from_key(read.key(id)).port
        assert wait_until(lambda: read.lookup(id).source is Source.CACHE)  # stored
        victim = next(node for node in cluster.nodes if node.port == port)
        assert wait_until(lambda: replicated(cluster, victim.port, read.key(id)))
        victim.pause()
        # A bound on a hang, not a speed: the replica's election, the breaker's cooldown.
        assert wait_until(lambda: read.lookup(id).source is Source.CACHE, 90)
        assert client.get_node_from_key(read.key(id)).port != port
    finally:
        engine.close()
        client.close()
        cluster.stop()


def replicated(cluster: RedisClusterProcesses, master: int, key: str) -> bool:
    """Whether the master's replica has `key`."""
    for node in cluster.nodes:
        admin = node.admin()
        try:
            info = admin.info("replication")
            if info["role"] == "slave" and info["master_port"] == master:
                admin.execute_command("READONLY")
                return bool(admin.exists(key))
        finally:
            admin.close()
    return False


@async_node_pipelines
async def test_async_an_ask_and_a_killed_connection_are_served_by_the_client(
    cluster: RedisClusterProcesses, prefix: str
) -> None:
    client = redis.asyncio.cluster.RedisCluster.from_url(cluster.url)
    engine = CacheEngine(async_client=client, prefix=prefix)
    loads: list[str] = []

    @cache_aside(key="item:<id>", ttl=60, engine=engine)
    async def read(id: str) -> dict[str, str]:
        loads.append(id)
        return {"id": id}

    try:
        for id in ("a", "c"):
            assert await read(id) == {"id": id}
            assert await read(id) == {"id": id}
        pipelines = engine.sides.async_side().pipeline
        assert isinstance(pipelines, NodePipelines)
        key = entry_keys(read.key("a")).value
        slot = Slot(cluster, client, key)
        try:
            slot.migrate()  # the key on the new master, the slot still the old one's
            counted = Counted(client)
            for _ in range(2):
                result = await read.lookup("a")
                assert (result.value, result.source) == ({"id": "a"}, Source.CACHE)
            assert (pipelines.redirects, len(counted.calls)) == (2, 2)
        finally:
            slot.assign()
            slot.close()
            await client.delete(key)
        node = client.get_node_from_key(read.key("c"))
        admin = next(n for n in cluster.nodes if n.port == node.port).admin()
        try:
            assert admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes") >= 1
        finally:
            admin.close()
        counted = Counted(client)
        for _ in range(3):  # the first goes out again on a new socket (the Pipeline's retry)
            result = await read.lookup("c")
            assert (result.value, result.source) == ({"id": "c"}, Source.CACHE)
        assert counted.calls == []
        assert loads == ["a", "c"]
        await client.delete(read.key("c"))
    finally:
        await engine.aclose()
        await client.aclose()


def test_nodes_gone_from_the_topology_are_forgotten_and_one_without_a_pool_skipped() -> None:
    """Bookkeeping alone (no server: nothing is sent)."""

    class Node:
        def __init__(self, name: str, pooled: bool = True) -> None:
            self.name = name
            self.redis_connection = (
                redis.Redis(connection_pool=redis.ConnectionPool(port=1)) if pooled else None
            )

    class Manager:
        def __init__(self) -> None:
            self.nodes_cache: dict[str, Node] = {}
            self.slots_cache: dict[int, list[Node]] = {}

    class Client:
        def __init__(self) -> None:
            self.nodes_manager = Manager()

        def keyslot(self, key: str) -> int:
            return int(key)

    client = Client()
    one, two, unpooled = Node("one"), Node("two"), Node("unpooled", pooled=False)
    client.nodes_manager.nodes_cache = {"one": one, "unpooled": unpooled}
    client.nodes_manager.slots_cache = {1: [one], 3: [unpooled]}
    held = NodeConnections(client)
    assert held.call(("GET", "3")) == (False, None)  # no pool yet: the client serves it
    assert held.call(("GET", "2")) == (False, None)  # a slot no node covers
    assert held._add(one) is held.nodes["one"]
    client.nodes_manager.nodes_cache = {"two": two}  # "one" left the cluster
    assert held._add(two) is held.nodes["two"]
    assert set(held.nodes) == {"two"}


def test_replica_reads_asked_of_the_cluster_client_are_said_once_to_skip_hits(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hits read masters (an invalidation is seen at once); a user who asked the
    client for replica reads is told, once, not left to find out."""
    monkeypatch.setattr(_compat, "_warned", set())

    class Manager:
        def __init__(self) -> None:
            self.nodes_cache: dict[str, Any] = {}
            self.slots_cache: dict[int, list[Any]] = {}

    class Client:
        def __init__(self) -> None:
            self.nodes_manager = Manager()
            self.read_from_replicas = True

    with caplog.at_level(logging.WARNING, logger="cached_aside"):
        NodeConnections(Client())
        NodeConnections(Client())
    said = [r.getMessage() for r in caplog.records if "replica" in r.getMessage()]
    assert len(said) == 1, said
    assert "read_from_replicas" in said[0]
    assert "master" in said[0]


# --- batches: many() across masters ------------------------------------------------
# Each node's share of a batch goes out on that node's own connection, every share
# before any reply is read; what a node redirects, or what the lean wire cannot serve,
# goes through the cluster client's pipeline; a node that fails or hangs costs only
# its own share.


class Piped:
    """Counts the pipelines redis-py's cluster client made for us."""

    def __init__(self, client: Any) -> None:
        self.made = 0
        inner = client.pipeline

        def counting(*args: Any, **kwargs: Any) -> Any:
            self.made += 1
            return inner(*args, **kwargs)

        client.pipeline = counting


def expected(ids: list[str], tag: str = "id") -> list[dict[str, str]]:
    return [{tag: id} for id in ids]


def test_a_batch_across_masters_goes_out_on_each_nodes_held_connection(
    client: redis.cluster.RedisCluster, prefix: str
) -> None:
    engine = CacheEngine(client, prefix=prefix)
    loads: list[str] = []
    read = cache_aside(key="item:<id>", ttl=60, engine=engine)(loaded(loads))
    try:
        assert read.many(IDS) == expected(IDS)  # stored
        counted, piped = Counted(client), Piped(client)
        assert read.many(IDS) == expected(IDS)  # hits
        assert sorted(loads) == sorted(IDS)  # each loaded once
        assert (counted.calls, piped.made) == ([], 0)  # nothing through the client
        held = node_connections(engine)
        assert len({client.get_node_from_key(read.key(id)).name for id in IDS}) == 3
        assert len(held.nodes) == 3
        assert (held.fallbacks, held.redirects) == (0, 0)
    finally:
        client.delete(*(read.key(id) for id in IDS))
        engine.close()


def test_a_batch_sends_what_a_node_redirects_through_the_client_and_the_rest_direct(
    client: redis.cluster.RedisCluster, cluster: RedisClusterProcesses, prefix: str
) -> None:
    engine = CacheEngine(client, prefix=prefix)
    loads: list[str] = []
    read = cache_aside(key="item:<id>", ttl=60, engine=engine)(loaded(loads))
    assert read.many(IDS) == expected(IDS)
    key = entry_keys(read.key(IDS[0])).value
    slot = Slot(cluster, client, key)
    held = node_connections(engine)
    try:
        piped = Piped(client)
        slot.migrate()  # ASK for IDS[0]: the client asks the new master, once per batch
        for _ in range(2):
            assert read.many(IDS) == expected(IDS)
        assert (held.redirects, piped.made) == (2, 2)
        assert client.get_node_from_key(key).port == slot.old  # an ASK moves no slot
        slot.assign()  # MOVED: the client follows it and learns the slot's new master
        assert read.many(IDS) == expected(IDS)
        assert (held.redirects, piped.made) == (3, 3)
        assert client.get_node_from_key(key).port == slot.new
        assert read.many(IDS) == expected(IDS)  # all direct again
        assert (held.redirects, piped.made) == (3, 3)
        assert sorted(loads) == sorted(IDS)  # never a load: every key was a hit
        assert held.fallbacks == held.redirects  # no connection failed
    finally:
        slot.close()
        client.delete(*(read.key(id) for id in IDS))
        engine.close()


def test_a_batch_after_a_nodes_connection_was_killed_sends_that_share_through_the_client(
    client: redis.cluster.RedisCluster, cluster: RedisClusterProcesses, prefix: str
) -> None:
    engine = CacheEngine(client, prefix=prefix)
    loads: list[str] = []
    read = cache_aside(key="item:<id>", ttl=60, engine=engine)(loaded(loads))
    assert read.many(IDS) == expected(IDS)
    assert read.many(IDS) == expected(IDS)
    held = node_connections(engine)
    node = client.get_node_from_key(read.key(IDS[0]))
    admin = next(n for n in cluster.nodes if n.port == node.port).admin()
    try:
        assert admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes") >= 1
        piped = Piped(client)
        assert read.many(IDS) == expected(IDS)
        assert (held.fallbacks, piped.made) == (1, 1)  # that node's share, once
        for _ in range(2):
            assert read.many(IDS) == expected(IDS)
        assert (held.fallbacks, piped.made) == (1, 1)  # reconnected, direct again
        assert sorted(loads) == sorted(IDS)
    finally:
        admin.close()
        client.delete(*(read.key(id) for id in IDS))
        engine.close()


def test_a_batch_interrupted_mid_reply_leaves_no_node_a_reply_behind(
    client: redis.cluster.RedisCluster, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every share written, the first reply interrupted: the other nodes' replies are
    still on their sockets, and would answer those connections' next commands; so
    every connection the batch wrote on is closed, and the next batch is right."""
    engine = CacheEngine(client, prefix=prefix)
    loads: list[str] = []
    read = cache_aside(key="item:<id>", ttl=60, engine=engine)(loaded(loads))
    other = cache_aside(key="other:<id>", ttl=60, engine=engine)(lambda id: {"other": id})
    assert read.many(IDS) == expected(IDS)
    assert other.many(IDS) == [{"other": id} for id in IDS]
    held = node_connections(engine)
    assert len(held.nodes) == 3

    def interrupted(reads: Any) -> Any:
        def reading(connection: Any, *args: Any, **kwargs: Any) -> Any:
            raise KeyboardInterrupt

        return reading

    try:
        with monkeypatch.context() as patched:
            on_reads(patched, interrupted)
            with pytest.raises(KeyboardInterrupt):
                read.many(IDS)
        sockets = [nodes._local.held.connection._sock for nodes in held.nodes.values()]
        assert sockets == [None, None, None]
        assert other.many(IDS) == [{"other": id} for id in IDS]  # its own replies
        assert read.many(IDS) == expected(IDS)
        assert sorted(loads) == sorted(IDS)
    finally:
        client.delete(*(read.key(id) for id in IDS), *(other.key(id) for id in IDS))
        engine.close()


@async_node_pipelines
async def test_async_a_batch_across_masters_shares_each_nodes_connection_and_follows_a_move(
    cluster: RedisClusterProcesses, prefix: str
) -> None:
    client = redis.asyncio.cluster.RedisCluster.from_url(cluster.url)
    engine = CacheEngine(async_client=client, prefix=prefix)
    loads: list[str] = []

    @cache_aside(key="item:<id>", ttl=60, engine=engine)
    async def read(id: str) -> dict[str, str]:
        loads.append(id)
        return {"id": id}

    try:
        assert await read.many(IDS) == expected(IDS)
        counted, piped = Counted(client), Piped(client)
        assert await read.many(IDS) == expected(IDS)
        assert (counted.calls, piped.made) == ([], 0)
        pipelines = engine.sides.async_side().pipeline
        assert isinstance(pipelines, NodePipelines)
        assert len(pipelines.nodes) == 3
        key = entry_keys(read.key(IDS[0])).value
        slot = Slot(cluster, client, key)
        try:
            slot.migrate()
            slot.assign()
            assert await read.many(IDS) == expected(IDS)
            assert (pipelines.redirects, piped.made) == (1, 1)
            # redis-py's async cluster pipeline may follow the MOVED by a call of the
            # client's own: for that key alone
            followed = list(counted.calls)
            assert {args[1] for args in followed} <= {key}
            assert await read.many(IDS) == expected(IDS)
            assert (pipelines.redirects, piped.made) == (1, 1)  # the new master, direct
            assert f"127.0.0.1:{slot.new}" in pipelines.nodes
        finally:
            slot.close()
        node = client.get_node_from_key(read.key(IDS[1]))
        admin = next(n for n in cluster.nodes if n.port == node.port).admin()
        try:
            assert admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes") >= 1
        finally:
            admin.close()
        for _ in range(2):  # the Pipeline sends a share again on a new socket
            assert await read.many(IDS) == expected(IDS)
        assert (counted.calls, piped.made) == (followed, 1)
        assert sorted(loads) == sorted(IDS)
        await client.delete(*(read.key(id) for id in IDS))
    finally:
        await engine.aclose()
        await client.aclose()


def test_a_hung_master_costs_a_batch_only_its_own_share() -> None:
    """One master hangs (SIGSTOP): a batch's share bound for it times out and those
    keys fail open to the loader; the other masters' keys are still hits, sync and
    async. (redis-py's cluster pipeline fails the whole batch on a node's timeout.)"""
    cluster = RedisClusterProcesses(masters=3).start()
    try:
        for node in cluster.nodes:  # the healthy masters keep serving their slots
            node.admin().config_set("cluster-require-full-coverage", "no")
        sync_client = redis.cluster.RedisCluster.from_url(cluster.url, socket_timeout=0.5)
        async_client = redis.asyncio.cluster.RedisCluster.from_url(cluster.url, socket_timeout=0.5)
        engine = CacheEngine(sync_client, async_client=async_client, prefix="wire-hung")
        loads: list[str] = []
        read = cache_aside(key="item:<id>", ttl=60, engine=engine)(loaded(loads))

        @cache_aside(key="item:<id>", ttl=60, engine=engine)
        async def aread(id: str) -> dict[str, str]:
            loads.append(id)
            return {"id": id}

        assert read.many(IDS) == expected(IDS)
        # Not the node the clients start from: the async client meets the cluster
        # while the victim hangs.
        seed = int(cluster.url.rsplit(":", 1)[1].split("/")[0])
        port = next(
            port for id in IDS if (port := sync_client.get_node_from_key(read.key(id)).port) != seed
        )
        victim = next(node for node in cluster.nodes if node.port == port)
        on_victim = [id for id in IDS if sync_client.get_node_from_key(read.key(id)).port == port]
        assert 0 < len(on_victim) < len(IDS)
        loads.clear()
        victim.pause()
        try:
            assert read.many(IDS) == expected(IDS)
            assert sorted(loads) == sorted(on_victim)  # the others were hits
            loads.clear()

            async def batch() -> list[dict[str, str]]:
                try:
                    return await aread.many(IDS)
                finally:
                    await engine.aclose()
                    await async_client.aclose()

            assert asyncio.run(batch()) == expected(IDS)
            assert sorted(loads) == sorted(on_victim)
        finally:
            victim.resume()
        engine.close()
        sync_client.close()
    finally:
        cluster.stop()
