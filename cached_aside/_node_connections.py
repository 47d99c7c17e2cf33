"""The lean wire on a Redis Cluster: a command on one key goes to its slot's master
on a connection of that node's own (HeldConnections per node for threads, a Pipeline
per node for an event loop). Routing stays redis-py's (its slot table); a redirect
(MOVED, ASK) or TRYAGAIN/CLUSTERDOWN is no failure here: that call goes through the
cluster client, which follows it and updates its slot table for the next call.
"""

from __future__ import annotations

import threading
from typing import Any

from redis.exceptions import (
    AskError,
    ClusterDownError,
    ConnectionError,
    MovedError,
    TimeoutError,
    TryAgainError,
)

from ._compat import warn_once
from ._connections import HeldConnections, Pipeline

# Replies that send a command elsewhere (or later): the cluster client follows them.
REDIRECTS = (MovedError, AskError, TryAgainError, ClusterDownError)
# The node could not be reached or hung: its next call goes through the cluster client,
# so that the client, which learns a new topology only from its own commands, does.
_UNREACHED = (ConnectionError, TimeoutError, OSError)
# Keys whose slot is remembered; past this many the memo starts over.
SLOT_MEMO_SIZE = 4096


class _Nodes:
    """What both twins share: the cluster client, the master of a key (redis-py's
    slot table), counters, and the nodes whose next call goes through the client."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.manager = client.nodes_manager
        # A key's slot never changes (its owner does): computed once per key.
        self.slots: dict[Any, int] = {}
        # Calls a node answered with a redirect (or TRYAGAIN, CLUSTERDOWN): the client
        # served them.
        self.redirects = 0
        self.suspect: set[str] = set()
        self.lock = threading.Lock()
        if getattr(client, "read_from_replicas", False) or getattr(
            client, "load_balancing_strategy", None
        ):
            # The user asked for replica reads; hits read masters: say so, once.
            warn_once(
                "the cluster client reads from replicas, but cache hits read each key's "
                "master (a replica may still hold an entry its master just invalidated)",
                "read_from_replicas applies to the cluster client's own commands only",
            )

    def node(self, args: tuple[Any, ...]) -> Any:
        """The master of the command's key, or None when the client should serve it
        (no node known for the slot, or the node failed on its last call here)."""
        # As sent (wire_args): a script's first key, else the first argument.
        key = args[3] if args[0] == "EVALSHA" else args[1]
        slot = self.slots.get(key)
        if slot is None:
            if len(self.slots) >= SLOT_MEMO_SIZE:
                self.slots.clear()
            slot = self.slots[key] = self.client.keyslot(key)
        owners = self.manager.slots_cache.get(slot)
        if not owners:  # not covered (mid-failover): the client finds out
            return None
        node = owners[0]
        if self.suspect and node.name in self.suspect:
            self.suspect.discard(node.name)
            return None
        return node

    def known(self) -> set[str]:
        """The names of the nodes the client knows now."""
        return set(self.manager.nodes_cache)


class NodeConnections(_Nodes):
    """Held connections per master of a sync RedisCluster; `call` as
    HeldConnections.call: (False, None) to use the client."""

    def __init__(self, client: Any) -> None:
        super().__init__(client)
        self.nodes: dict[str, HeldConnections] = {}
        self.problem: str | None = None

    @property
    def fallbacks(self) -> int:
        """Calls the client served: a node's connection failed, or it redirected."""
        return self.redirects + sum(held.fallbacks for held in list(self.nodes.values()))

    def call(self, args: tuple[Any, ...]) -> tuple[bool, Any]:
        node = self.node(args)
        if node is None:
            return False, None
        held = self.nodes.get(node.name)
        server = node.redis_connection  # None while redis-py makes it: the client's call
        if held is None or server is None or held.pool is not server.connection_pool:
            held = self._add(node)
            if held is None:
                return False, None
        try:
            return held.call(args)
        except REDIRECTS:  # an error reply: consumed, the connection stays
            self.redirects += 1
            with self.lock:
                self._forget_gone()
            return False, None
        except _UNREACHED:
            self.suspect.add(node.name)
            raise

    def call_many(self, commands: list[tuple[Any, ...]]) -> tuple[bool, list[Any]]:
        """A batch spans nodes: redis-py's cluster pipeline sends it (one round trip
        per node)."""
        return False, []

    def _add(self, node: Any) -> HeldConnections | None:
        """The node's held connections, made on its first call (or when redis-py gave
        it a new pool); None while it has no pool."""
        with self.lock:
            self._forget_gone()
            server = node.redis_connection
            if server is None:
                return None
            held = self.nodes.get(node.name)
            if held is None or held.pool is not server.connection_pool:
                held = self.nodes[node.name] = HeldConnections(server.connection_pool)
                self.problem = self.problem or held.problem
            return held

    def _forget_gone(self) -> None:
        """Forget the nodes that left the topology (under the lock): their held
        connections go back as their threads end."""
        known = self.known()
        for name in [name for name in self.nodes if name not in known]:
            del self.nodes[name]

    def reset_after_fork(self) -> None:
        """In a forked child: these connections are the parent's sockets."""
        self.nodes = {}
        self.suspect = set()
        self.lock = threading.Lock()


class _NodePool:
    """An asyncio ClusterNode as the pool a Pipeline takes its connection from."""

    def __init__(self, node: Any) -> None:
        self.node = node

    async def get_connection(self) -> Any:
        return self.node.acquire_connection()

    async def release(self, connection: Any) -> None:
        self.node.release(connection)


class NodePipelines(_Nodes):
    """A Pipeline per master of an asyncio RedisCluster, for one event loop; `call`
    as Pipeline.call, the client serving what a node redirects."""

    def __init__(self, client: Any) -> None:
        super().__init__(client)
        self.nodes: dict[str, Pipeline] = {}

    async def call(self, args: tuple[Any, ...]) -> Any:
        node = self.node(args)
        if node is None:
            return await self.client.execute_command(*args)
        pipeline = self.nodes.get(node.name)
        if pipeline is None or pipeline.pool.node is not node:
            pipeline = await self._add(node)
        try:
            return await pipeline.call(args)
        except REDIRECTS:
            self.redirects += 1
            return await self.client.execute_command(*args)
        except _UNREACHED:
            self.suspect.add(node.name)
            raise

    async def _add(self, node: Any) -> Pipeline:
        """The node's pipeline; those of nodes gone (or replaced) are closed."""
        known = self.known()
        gone = [
            name
            for name, pipeline in self.nodes.items()
            if name not in known or (name == node.name and pipeline.pool.node is not node)
        ]
        for name in gone:
            old = self.nodes.pop(name, None)
            if old is not None:
                await old.close()
        pipeline = self.nodes.get(node.name)
        if pipeline is None:  # another task may have made it meanwhile
            pipeline = self.nodes[node.name] = Pipeline(_NodePool(node))
        return pipeline

    async def close(self) -> None:
        """Give every node's connection back (the loop is closing)."""
        nodes, self.nodes = self.nodes, {}
        for pipeline in nodes.values():
            await pipeline.close()
