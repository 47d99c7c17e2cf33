"""The lean wire on Redis Cluster (`_node_connections.py`): hits go to their slot's
master on a connection held per node, redirects (MOVED, ASK) are followed by the
cluster client, a killed connection falls over once; sync and async."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis.asyncio.cluster
import redis.cluster

from cached_aside import CacheEngine, Source, _compat, cache_aside
from cached_aside._keys import entry_keys
from cached_aside._node_connections import NodeConnections, NodePipelines

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


def loaded(loads: list[str]) -> Callable[[str], dict[str, str]]:
    def load(id: str) -> dict[str, str]:
        loads.append(id)
        return {"id": id}

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
