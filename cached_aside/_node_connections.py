"""The lean wire on a Redis Cluster: a command on one key goes to its slot's master
on a connection of that node's own (HeldConnections per node for threads, a Pipeline
per node for an event loop). Routing stays redis-py's (its slot table); a redirect
(MOVED, ASK) or TRYAGAIN/CLUSTERDOWN is no failure here: that call goes through the
cluster client, which follows it and updates its slot table for the next call.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable
from typing import Any

import redis.asyncio.cluster
import redis.cluster
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ConnectionError,
    MovedError,
    RedisClusterException,
    RedisError,
    TimeoutError,
    TryAgainError,
)

from ._compat import warn_once
from ._connections import HeldConnections, Sent

# Replies that send a command elsewhere (or later): the cluster client follows them.
REDIRECTS = (MovedError, AskError, TryAgainError, ClusterDownError)
# The node could not be reached or hung: its next call goes through the cluster client,
# so that the client, which learns a new topology only from its own commands, does.
UNREACHED = (ConnectionError, TimeoutError, OSError)
# Keys whose slot is remembered; past this many the memo starts over.
SLOT_MEMO_SIZE = 4096
# A batch with keys of a slot the client's table lost asks the cluster for its slots
# again, at most this often (seconds): while a slot stays uncovered, not every batch.
SLOTS_REFRESH_INTERVAL = 0.5
# What the cluster client's pipeline raises for a whole share it sent.
CLIENT_FAILURES = (RedisError, RedisClusterException, OSError)


def _key(args: tuple[Any, ...]) -> str:
    """The key of a command as sent (wire_args): a script's first key, else the
    first argument."""
    key: str = args[3] if args[0] == "EVALSHA" else args[1]
    return key


def slot_owners(
    client: Any, commands: list[tuple[Any, ...]], positions: Iterable[int]
) -> tuple[list[tuple[int, Any]], list[int]]:
    """Each command's node by the client's slot table, with its position; and the
    positions of those whose slot the table does not cover (mid-failover)."""
    named: list[tuple[int, Any]] = []
    uncovered: list[int] = []
    for i in positions:
        try:
            named.append((i, client.get_node_from_key(_key(commands[i]))))
        except CLIENT_FAILURES:
            uncovered.append(i)
    return named, uncovered


def client_pipelines(
    client: Any,
    commands: list[tuple[Any, ...]],
    named: list[tuple[int, Any]],
    uncovered: list[int],
    per_node: bool = False,
) -> list[tuple[Any, list[int]]]:
    """The cluster client's pipelines of `commands`, each with the positions it
    holds: one naming each command's node (with `per_node`, one per node: a node
    that fails costs only its own share, where redis-py's pipeline fails whole);
    and one for the commands whose slot the client's table does not cover, routed
    by the client itself (it fails them there, or on redis-py 8.2 and later
    refreshes its table first)."""
    pipelines: list[tuple[Any, list[int]]] = []
    groups: dict[str, list[tuple[int, Any]]] = {}
    for i, node in named:
        groups.setdefault(node.name if per_node else "", []).append((i, node))
    for group in groups.values():
        pipe = client.pipeline(transaction=False)
        for i, node in group:
            # Named: redis-py's sync cluster pipeline otherwise asks the server (COMMAND
            # GETKEYS) where each EVALSHA goes.
            pipe.execute_command(*commands[i], target_nodes=node)
        pipelines.append((pipe, [i for i, _ in group]))
    if uncovered:
        pipe = client.pipeline(transaction=False)
        for i in uncovered:
            pipe.execute_command(*commands[i])
        pipelines.append((pipe, uncovered))
    return pipelines


def startup_addresses(client: Any) -> tuple[tuple[str, int], ...]:
    """Where a cluster client starts from (its URL's node, or the nodes it was
    given): what restore_startup_nodes falls back on."""
    return tuple(
        (node.host, int(node.port)) for node in client.nodes_manager.startup_nodes.values()
    )


def restore_startup_nodes(
    client: Any, seeds: tuple[tuple[str, int], ...], exc: BaseException
) -> bool:
    """After a failure, give a cluster client back the startup nodes it lost: the
    nodes of its last slot table it lacks (or, if it cannot be connected and that
    adds none, those it started from; with dynamic_startup_nodes=False, only those);
    whether any was given. redis-py before 8 drops a node from its startup nodes on
    each connection error and puts them back only when a refresh succeeds: during a
    failover, callers at once (each error a refresh, which closes every node's
    connections, which fails the calls in flight elsewhere) can drop every reachable
    one, leaving none, or only the master that is gone. Each refresh then asks only
    that one and fails ("Redis Cluster cannot be connected") before any command, so
    nothing is dropped again and the startup nodes never empty: the client never
    reaches the cluster again, every call failing open for good."""
    manager = client.nodes_manager
    startup = manager.startup_nodes
    unreachable = isinstance(exc, RedisClusterException)
    # With dynamic startup nodes a refresh makes them its slot table's nodes; without,
    # they stay those the client was given.
    dynamic = getattr(manager, "_dynamic_startup_nodes", True)
    known = manager.nodes_cache if dynamic else {}
    if startup and not unreachable and startup.keys() >= known.keys():
        return False  # the usual failure: nothing lost
    given = _give(startup, list(known.values()))
    if not given and dynamic:
        # On a sync client the slot table's nodes are the startup nodes' dict, dropped
        # with them; its slots still name them, each with its connections (new nodes
        # in their place would leave those to the collector, unclosed).
        slots = list(manager.slots_cache.values())
        given = _give(startup, [node for owners in slots for node in owners])
    if not given:  # none left, or none that answers: those it started from
        for host, port in seeds:
            if f"{host}:{port}" in startup:
                continue
            seed: Any
            if isinstance(client, redis.asyncio.cluster.RedisCluster):
                seed = redis.asyncio.cluster.ClusterNode(host, port, **manager.connection_kwargs)
            else:
                seed = redis.cluster.ClusterNode(host, port)  # type: ignore[no-untyped-call]
            startup[seed.name] = seed
            given = True
    if given:
        warn_once(
            "the cluster client had lost startup nodes after connection errors; given "
            "back those of its last slot table, or else those it started from",
            "cluster startup nodes given back",
        )
    return given


def _give(startup: dict[str, Any], nodes: list[Any]) -> bool:
    """Put each of `nodes` a client's startup nodes lack among them; whether any."""
    given = False
    for node in nodes:
        if node.name not in startup:
            startup[node.name] = node
            given = True
    return given


class _Share:
    """The commands of a batch bound for one node, on that node's held connection."""

    __slots__ = ("held", "node", "positions", "sent")

    def __init__(self, node: Any, held: HeldConnections, positions: list[int]) -> None:
        self.node = node
        self.held = held
        self.positions = positions
        self.sent: Sent | None = None  # written, replies not yet read


class Nodes:
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
        self.clock = time.monotonic
        self.refreshed_at = -SLOTS_REFRESH_INTERVAL
        self.refreshes = 0  # slot tables a batch asked for (refresh_due)
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
        node = self._master(_key(args))
        if node is None:  # not covered (mid-failover): the client finds out
            return None
        if self.suspect and node.name in self.suspect:
            self.suspect.discard(node.name)
            return None
        return node

    def by_node(
        self, commands: list[tuple[Any, ...]]
    ) -> tuple[dict[str, tuple[Any, list[int]]], list[int]]:
        """node() of every command of a batch: each node's name, the node and the
        positions bound for it; and the positions the client serves. node()'s rules
        (_master, then a suspect node's first command goes to the client), once per
        batch for what node() did per key."""
        master, suspect = self._master, self.suspect
        shares: dict[str, tuple[Any, list[int]]] = {}
        aside: list[int] = []
        for i, args in enumerate(commands):
            node = master(args[3] if args[0] == "EVALSHA" else args[1])  # _key spelled out
            if node is None:  # not covered (mid-failover): the client finds out
                aside.append(i)
                continue
            share = shares.get(node.name)
            if share is None:
                if suspect and node.name in suspect:  # as node(): this call only
                    suspect.discard(node.name)
                    aside.append(i)
                    continue
                share = shares[node.name] = (node, [])
            share[1].append(i)
        return shares, aside

    def _master(self, key: str) -> Any:
        """The master of `key`'s slot by the client's table (the slot remembered per
        key), or None when no node covers it."""
        slot = self.slots.get(key)
        if slot is None:
            if len(self.slots) >= SLOT_MEMO_SIZE:
                self.slots.clear()
            slot = self.slots[key] = self.client.keyslot(key)
        owners = self.manager.slots_cache.get(slot)
        return owners[0] if owners else None

    def known(self) -> set[str]:
        """The names of the nodes the client knows now."""
        return set(self.manager.nodes_cache)

    def refresh_due(self) -> bool:
        """Whether a batch that met an uncovered slot, or a node that failed, asks for
        the slot table now: redis-py's pipelines do so only from 8.2 (and 5.0's single
        commands never find a lost slot), so unasked, those keys would fail open for
        good; once per SLOTS_REFRESH_INTERVAL, whoever asks first."""
        with self.lock:
            now = self.clock()
            if now - self.refreshed_at < SLOTS_REFRESH_INTERVAL:
                return False
            self.refreshed_at = now
            self.refreshes += 1
            return True


class NodeConnections(Nodes):
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
        held = self._held(node)
        if held is None:  # redis-py is making the node's connection: the client's call
            return False, None
        try:
            return held.call(args)
        except REDIRECTS:  # an error reply: consumed, the connection stays
            self.redirects += 1
            with self.lock:
                self._forget_gone()
            return False, None
        except UNREACHED:
            self.suspect.add(node.name)
            raise

    def call_many(self, commands: list[tuple[Any, ...]]) -> tuple[bool, list[Any]]:
        """A batch across masters: each node's share written on that node's held
        connection, every share before any reply is read (one round trip for the
        batch, as redis-py's cluster pipeline); (True, replies in order, an error
        reply's exception in its place). What the lean wire cannot serve (no node
        known, no connection to spare, a connection lost, a redirect) goes through
        the cluster client's pipeline; a node that fails or hangs gets its failure in
        place of its share's replies, and the other nodes' replies stand."""
        replies: list[Any] = [None] * len(commands)
        routed, aside = self.by_node(commands)
        shares: dict[str, _Share] = {}
        for name, (node, positions) in routed.items():
            held = self._held(node)
            if held is None:
                aside += positions
            else:
                shares[name] = _Share(node, held, positions)
        try:
            for share in shares.values():
                try:
                    share.sent = share.held.send([commands[i] for i in share.positions])
                except UNREACHED as exc:
                    self._failed(share, exc, replies)
                    continue
                if share.sent is None:  # nothing sent: the client sends it
                    aside.extend(share.positions)
            for share in shares.values():
                if share.sent is None:
                    continue
                sent, share.sent = share.sent, None
                try:
                    answered, got = share.held.receive(sent, len(share.positions))
                except UNREACHED as exc:
                    self._failed(share, exc, replies)
                    continue
                if not answered:
                    aside.extend(share.positions)
                    continue
                for i, reply in zip(share.positions, got, strict=True):
                    if type(reply) is not bytes and isinstance(reply, REDIRECTS):  # redirected
                        self.redirects += 1
                        aside.append(i)
                    else:
                        replies[i] = reply
        except BaseException:
            # Interrupted with replies unread on other nodes' connections: they would
            # answer those connections' next commands, so the sockets go.
            for share in shares.values():
                if share.sent is not None:
                    share.sent[0].disconnect()
            raise
        if aside:
            if self.redirects:
                with self.lock:
                    self._forget_gone()
            aside.sort()
            for i, reply in zip(
                aside, self._through_client([commands[i] for i in aside]), strict=True
            ):
                replies[i] = reply
        return True, replies

    def _held(self, node: Any) -> HeldConnections | None:
        """The node's held connections (None while redis-py makes its connection)."""
        held = self.nodes.get(node.name)
        server = node.redis_connection
        if held is None or server is None or held.pool is not server.connection_pool:
            return self._add(node)
        return held

    def _failed(self, share: _Share, exc: BaseException, replies: list[Any]) -> None:
        """The node could not be reached or hung: its failure in place of its share's
        replies, and its next call goes through the client."""
        self.suspect.add(share.node.name)
        for i in share.positions:
            replies[i] = exc

    def _through_client(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Through the cluster client's pipeline, which follows redirects; a failure
        in place of each reply it could not get. A slot the client's table lost, and
        a node that failed, have it ask the cluster for its slots (refresh_due)."""
        replies: list[Any] = [None] * len(commands)
        named, uncovered = slot_owners(self.client, commands, range(len(commands)))
        if uncovered and self.refresh_due():
            with contextlib.suppress(*CLIENT_FAILURES):  # those keys fail open
                self.manager.initialize()
            # Every node again: the refresh may have replaced (and closed) those named.
            named, uncovered = slot_owners(self.client, commands, range(len(commands)))
        unreached = False
        for pipe, sent in client_pipelines(self.client, commands, named, uncovered):
            try:
                got = list(pipe.execute(raise_on_error=False))
            except CLIENT_FAILURES as exc:
                got = [exc] * len(sent)
            unreached = unreached or any(isinstance(reply, UNREACHED) for reply in got)
            for i, reply in zip(sent, got, strict=True):
                replies[i] = reply
        if unreached and self.refresh_due():
            # A node hung or went away: where its slots are now, the client learns
            # from its single commands' failures, and redis-py 8.1's pipelines do not
            # ask: asked here, or batches alone would never find a promoted replica.
            with contextlib.suppress(*CLIENT_FAILURES):  # asked at the next failure
                self.manager.initialize()
        return replies

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
