"""The near cache on Redis Cluster: one tracking listener per master, and a watch on
the cluster's topology.

Client tracking is per node: a master reports changes to the keys it holds, and no
others. So every master gets its own listener (an InvalidationListener of one node,
BCAST with the engine's prefix), and the near caches are on only while the set of
listeners is exactly the set of masters and every one of them is tracking. Any loss
(a listener's connection, a failover, a master added or gone, a topology nobody can
tell) switches every near cache of the engine off, its entries set aside unserved,
until tracking covers every master again; then they are reread and kept only if
unchanged (`_revalidation`): a value is never served from process memory unless the
node that owns its slot is tracking us. Coarse (one lost master sets aside the slots
of all), but simple enough to be right.

The topology is read every TOPOLOGY_SECONDS with CLUSTER SLOTS: a master added to
the cluster and given slots in between is the one window in which a change could
go unreported, and it is at most that long. In per-key mode a slot moving to another
master is treated the same way (its new master tracks none of our keys).
"""

from __future__ import annotations

import bisect
import logging
import threading
from typing import Any

from redis.crc import key_slot

from ._listener import InvalidationListener, StoreListener, connection_factory
from ._near import Tracking, TrackingState
from ._near_store import NearStore
from ._registrar import slot_of

logger = logging.getLogger("cached_aside")

TOPOLOGY_SECONDS = 0.5


class ClusterListener(StoreListener):
    """The engine's listener on a Redis Cluster; the same face as InvalidationListener
    (attach, detach, drop, clear_all, state, stop) for the engine and its stores."""

    THREAD_NAME = "cached_aside-cluster-topology"

    def __init__(self, client: Any, prefix: str, tracking: Tracking = "bcast") -> None:
        super().__init__(prefix, tracking)
        self._client = client  # a sync RedisCluster: for CLUSTER SLOTS and node settings
        self._judging = threading.Lock()  # one verdict at a time, from any thread
        self._nodes: dict[str, InvalidationListener] = {}  # by "host:port"
        self._masters: frozenset[str] = frozenset()
        # Per-key tracking: the first slot of each range, and its master, from the
        # last CLUSTER SLOTS (a registration goes to the master owning the key).
        # ([first slot of each range], [(its last slot, "host:port")]), replaced whole
        self._slots: tuple[list[int], list[tuple[int, str]]] = ([], [])
        self.topology_changes = 0

    @property
    def connections(self) -> int:
        """Times tracking was (re-)established, over every master's listener."""
        return sum(node.connections for node in list(self._nodes.values()))

    @property
    def messages(self) -> int:
        """Invalidation messages received, over every master's listener."""
        return sum(node.messages for node in list(self._nodes.values()))

    @property
    def keys_reported(self) -> int:
        """Keys those messages named, over every master's listener."""
        return sum(node.keys_reported for node in list(self._nodes.values()))

    def nodes(self) -> dict[str, InvalidationListener]:
        """The listener of each master, by "host:port" (for tests and diagnostics)."""
        return dict(self._nodes)

    def stop(self) -> None:
        self._stop_thread()
        for node in list(self._nodes.values()):
            node.stop()
        self._nodes.clear()
        self._set("down", "stopped")

    # -- what each master's listener reports --------------------------------------

    def node_changed(self) -> None:
        self._judge()

    def invalidate(self, keys: list[bytes] | None) -> None:
        self._report(keys)  # None: FLUSHALL on a master, its slots are empty

    def register(self, store: NearStore, key: str, number: int) -> None:
        """To the listener of the master that owns the key's slot; if the slot
        moved since, that master refuses the EXISTS and the key stays unregistered."""
        owner = self.owner(key)
        node = None if owner is None else self._nodes.get(owner)
        if node is None:
            store.registered([(key, number)], processed=False)
        else:
            node.register(store, key, number)

    def owner(self, key: str) -> str | None:
        """The master ("host:port") owning the key's slot in the last CLUSTER SLOTS."""
        slot = key_slot(key.encode())
        starts, owners = self._slots
        index = bisect.bisect_right(starts, slot) - 1
        if 0 <= index < len(owners) and slot <= owners[index][0]:
            return owners[index][1]
        return None

    # -- the topology --------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            slots = self._slots
            try:
                masters = self._discover()
            except Exception as exc:  # no node answers: nothing vouches for the caches
                self._set("down", f"cluster topology unknown ({type(exc).__name__}: {exc})")
                self._settled.set()
                self._stop.wait(TOPOLOGY_SECONDS)
                continue
            if frozenset(masters) != self._masters:
                self._follow(masters)
            elif self._slots != slots and self.tracking == "keys":
                self._moved()
            self._judge()
            self._stop.wait(TOPOLOGY_SECONDS)

    def _discover(self) -> dict[str, tuple[str, int]]:
        """The masters serving slots now, by "host:port"."""
        masters: dict[str, tuple[str, int]] = {}
        ranges: list[tuple[int, int, str]] = []
        for entry in self._client.execute_command("CLUSTER", "SLOTS"):
            host, port = entry[2][0], int(entry[2][1])
            host = host.decode() if isinstance(host, bytes) else str(host)
            masters[f"{host}:{port}"] = (host, port)
            ranges.append((int(entry[0]), int(entry[1]), f"{host}:{port}"))
        ranges.sort()
        self._slots = ([first for first, _, _ in ranges], [(last, n) for _, last, n in ranges])
        return masters

    def _moved(self) -> None:
        """Per-key mode: a slot changed masters. A key registered on its old master
        while absent was not reported when the slot moved (no key to migrate), and
        the new one tracks nothing for us: so off and on again, registrations
        forgotten, as for a new master (the same window: until CLUSTER SLOTS shows it)."""
        self.topology_changes += 1
        self._set("down", "a slot moved to another master")
        self._forget_registrations()

    def _forget_registrations(self) -> None:
        """Slots changed masters: what any master confirmed vouches for nothing now
        (going down sets entries aside, and keeps registrations, for a reconnect of
        the same connections; here the keys' masters changed)."""
        for store in self._attached():
            store.forget_registrations()

    def _follow(self, masters: dict[str, tuple[str, int]]) -> None:
        """A listener for each master, none for a node that is no master any more.
        Off until all of them track (the verdict that follows says so)."""
        self.topology_changes += 1
        with self._lock:
            self._masters = frozenset(masters)
        self._set("down", "the cluster's masters changed")
        self._forget_registrations()
        for name in [name for name in self._nodes if name not in masters]:
            self._nodes.pop(name).stop()
        template = self._client.get_primaries()[0].redis_connection
        for name, (host, port) in masters.items():
            if name not in self._nodes:
                connect = connection_factory(template, host=host, port=port)
                node = InvalidationListener(
                    connect, self.prefix, tier=self, tracking=self.tracking, group=slot_of
                )
                self._nodes[name] = node
                node.start()

    def _judge(self) -> None:
        """On only while every master, and no other node, is tracking us."""
        with self._judging:
            nodes = dict(self._nodes)
            states = {name: node.state for name, node in nodes.items()}
            if (
                self._masters
                and set(nodes) == self._masters
                and set(states.values()) == {"tracking"}
            ):
                self._set("tracking")
                self._settled.set()
                return
            if "unsupported" in states.values():
                reason = next(n.reason for n in nodes.values() if n.state == "unsupported")
                self._set("unsupported", reason)
                self._settled.set()
                return
            waiting = sorted(name for name, state in states.items() if state != "tracking")
            self._set("down", f"not tracking on {', '.join(waiting) or 'some master'}")
            if all(state != "starting" for state in states.values()):
                self._settled.set()

    def _set(self, state: TrackingState, reason: str = "") -> None:
        """Switch the caches on or off when the verdict changes (a switch on rereads
        what was set aside, so an unchanged verdict must not switch again)."""
        with self._lock:
            changed = state != self.state
            self.state, self.reason = state, reason
            stores = list(self._stores) if changed or reason == "stopped" else []
        self._turn(stores, state, reason)
        if changed and state == "down" and reason != "stopped":
            logger.warning("near cache off on the cluster: %s", reason)

    def _forget_in_child(self) -> None:
        self._judging = threading.Lock()
        self._nodes = {}
        self._masters = frozenset()
