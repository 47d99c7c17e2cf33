"""The lean wire on an asyncio Redis Cluster: a Pipeline per master, for one event
loop, on a connection that master's ClusterNode lends (redis-py 8.1 on). Routing,
redirects and the client's fallbacks as for threads (_node_connections.py, whose
Nodes both share).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from ._connections import Pipeline
from ._node_connections import (
    CLIENT_FAILURES,
    REDIRECTS,
    UNREACHED,
    Nodes,
    client_pipelines,
    slot_owners,
)


def node_pipelines_problem() -> str | None:
    """Why an asyncio cluster's hits cannot share a connection per node here, or
    None: redis-py before 8.1 lends a ClusterNode's connections without a release()
    (its own calls put them back by hand, and it may collect a node with one open)."""
    from redis.asyncio.cluster import ClusterNode

    if not hasattr(ClusterNode, "release"):
        return (
            "redis-py before 8.1: an asyncio ClusterNode has no release(); async calls "
            "on a Redis Cluster go through the cluster client (upgrade redis-py for "
            "the lean wire there)"
        )
    return None


class _NodePool:
    """An asyncio ClusterNode as the pool a Pipeline takes its connection from."""

    def __init__(self, node: Any, manager: Any) -> None:
        self.node = node
        self.manager = manager

    async def get_connection(self) -> Any:
        return self.node.acquire_connection()

    async def release(self, connection: Any) -> None:
        if self.manager.nodes_cache.get(self.node.name) is not self.node:
            # The node left the topology (a failover): redis-py closes what it knows
            # of, not a connection it lent out; a node collected with a connection
            # open warns (redis-py 5).
            await connection.disconnect()
        self.node.release(connection)


class NodePipelines(Nodes):
    """A Pipeline per master of an asyncio RedisCluster, for one event loop; `call`
    as Pipeline.call, the client serving what a node redirects."""

    def __init__(self, client: Any, lean: bool = True) -> None:
        super().__init__(client)
        self.nodes: dict[str, Pipeline] = {}
        # False where the node's connections cannot be lent (node_pipelines_problem):
        # every call through the client, a batch through its pipelines as call_many's
        # aside (a node's failure costs only its share; an uncovered slot found again).
        self.lean = lean

    async def call(self, args: tuple[Any, ...]) -> Any:
        node = self.node(args) if self.lean else None
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
        except UNREACHED:
            self.suspect.add(node.name)
            raise

    async def call_many(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """As NodeConnections.call_many: each node's share on that node's pipeline,
        the nodes at once; what the lean wire cannot serve through the client's
        pipeline; a node's failure in place of its share's replies."""
        if not self.lean:
            return await self._through_client(commands)
        replies: list[Any] = [None] * len(commands)
        routed, aside = self.by_node(commands)
        shares: dict[str, tuple[Any, Pipeline, list[int]]] = {}
        for name, (node, positions) in routed.items():
            pipeline = self.nodes.get(name)
            if pipeline is None or pipeline.pool.node is not node:
                pipeline = await self._add(node)
            shares[name] = (node, pipeline, positions)

        async def serve(node: Any, pipeline: Pipeline, positions: list[int]) -> None:
            try:
                got = await pipeline.call_many([commands[i] for i in positions])
            except UNREACHED as exc:
                got = [exc] * len(positions)
            # A Pipeline puts its connection's failure in place of each reply, never
            # raises it: the node is suspect all the same, or the client (which learns
            # a failover only from its own commands) would never be asked.
            if any(isinstance(reply, UNREACHED) for reply in got):
                self.suspect.add(node.name)
            for i, reply in zip(positions, got, strict=True):
                if type(reply) is not bytes and isinstance(reply, REDIRECTS):  # redirected
                    self.redirects += 1
                    aside.append(i)
                else:
                    replies[i] = reply

        if len(shares) == 1:
            await serve(*next(iter(shares.values())))
        elif shares:
            await asyncio.gather(*(serve(*share) for share in shares.values()))
        if aside:
            aside.sort()
            for i, reply in zip(
                aside, await self._through_client([commands[i] for i in aside]), strict=True
            ):
                replies[i] = reply
        return replies

    async def _through_client(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """As NodeConnections._through_client, on the asyncio cluster client, one
        pipeline per node, the nodes at once (a node's failure costs its share)."""
        replies: list[Any] = [None] * len(commands)
        named, uncovered = slot_owners(self.client, commands, range(len(commands)))
        if uncovered and self.refresh_due():
            with contextlib.suppress(*CLIENT_FAILURES):
                await self.manager.initialize()
            named, uncovered = slot_owners(self.client, commands, range(len(commands)))
        unreached = False

        async def execute(pipe: Any, sent: list[int]) -> None:
            nonlocal unreached
            try:
                got = list(await pipe.execute(raise_on_error=False))
            except CLIENT_FAILURES as exc:
                got = [exc] * len(sent)
            unreached = unreached or any(isinstance(reply, UNREACHED) for reply in got)
            for i, reply in zip(sent, got, strict=True):
                replies[i] = reply

        pipelines = client_pipelines(self.client, commands, named, uncovered, per_node=True)
        if len(pipelines) == 1:
            await execute(*pipelines[0])
        else:  # the nodes at once, each failing alone
            outcomes = await asyncio.gather(
                *(execute(pipe, sent) for pipe, sent in pipelines), return_exceptions=True
            )
            for outcome in outcomes:  # none left running, none unretrieved; then raised
                if isinstance(outcome, BaseException):
                    raise outcome
        if unreached and self.refresh_due():
            with contextlib.suppress(*CLIENT_FAILURES):
                await self.manager.initialize()
        return replies

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
            pipeline = self.nodes[node.name] = Pipeline(_NodePool(node, self.manager))
        return pipeline

    async def close(self) -> None:
        """Give every node's connection back (the loop is closing)."""
        nodes, self.nodes = self.nodes, {}
        for pipeline in nodes.values():
            await pipeline.close()
