"""Per-key tracking (`NearCache(tracking="keys")`) beside BCAST: the rule of when a
read may fill, stepped by hand with a registrar the test answers; then against a
real Redis, what each mode is told and what losing the registrar does."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import fakeredis
import pytest
import redis
from redis.exceptions import ResponseError

from cached_aside import CacheEngine, ConfigurationError, NearCache, Source, cache_aside
from cached_aside._cluster_listener import ClusterListener
from cached_aside._codecs import MSGPACK_CODEC
from cached_aside._listener import InvalidationListener
from cached_aside._near import MISSING
from cached_aside._near_store import NearStore
from cached_aside._registrar import Registrar, RegistrarLostError, slot_of

from .conftest import PATIENCE, REDIS_URL, delete_prefix, needs_real_redis, unique_prefix
from .servers import RedisClusterProcesses, RedisProcess

# -- the rule, stepped by hand ----------------------------------------------------


class Requests:
    """Registrations the test confirms (or not) when it chooses."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, int]] = []

    def __call__(self, store: NearStore, key: str, number: int) -> None:
        self.requests.append((key, number))


def keys_store(**config: Any) -> tuple[NearStore, Requests]:
    store = NearStore(NearCache(tracking="keys", **config), MSGPACK_CODEC.freeze)
    registrar = Requests()
    assert store.registrations is not None
    store.registrations.register = registrar
    store.switch(True)
    return store, registrar


def read(store: NearStore, key: str) -> int:
    """A read from Redis: its ticket, taken before it was sent."""
    ticket = store.expect(key)
    assert ticket is not None
    return ticket


def test_a_value_read_before_its_registration_was_confirmed_is_not_kept() -> None:
    store, registrar = keys_store()
    first = read(store, "k")
    store.fill("k", first, "v1", 30_000)
    assert store.get("k") is MISSING  # never registered: a later write would go unseen
    assert [key for key, _ in registrar.requests] == ["k"]
    racing = read(store, "k")  # sent before Redis's reply arrived
    store.registered(registrar.requests)
    store.fill("k", racing, "v1", 30_000)
    assert store.get("k") is MISSING  # a write between it and the registration: unseen
    assert len(registrar.requests) == 1  # tracked already: no second registration
    after = read(store, "k")
    store.fill("k", after, "v1", 30_000)
    assert store.get("k") == "v1"


def test_a_change_after_confirmation_drops_the_entry_and_its_registration() -> None:
    store, registrar = keys_store()
    store.fill("k", read(store, "k"), "v1", 30_000)
    store.registered(registrar.requests)
    store.fill("k", read(store, "k"), "v1", 30_000)
    assert store.get("k") == "v1"
    store.drop(["k"])  # Redis reported it, and stopped tracking it
    assert store.get("k") is MISSING
    store.fill("k", read(store, "k"), "v2", 30_000)
    assert store.get("k") is MISSING  # registered again first
    assert [key for key, _ in registrar.requests] == ["k", "k"]


def test_a_reply_overtaken_by_a_report_of_the_key_confirms_nothing() -> None:
    """Redis processed the registration, then a write (reported, untracked again);
    the report reached us before the registrar's reply did."""
    store, registrar = keys_store()
    store.fill("k", read(store, "k"), "v1", 30_000)
    store.drop(["k"])
    store.registered(registrar.requests)
    store.fill("k", read(store, "k"), "v2", 30_000)
    assert store.get("k") is MISSING


@pytest.mark.parametrize("lost", ["switched off", "flushed", "forked"])
def test_losing_a_connection_forgets_every_registration(lost: str) -> None:
    store, registrar = keys_store()
    store.fill("k", read(store, "k"), "v1", 30_000)
    store.registered(registrar.requests)
    if lost == "switched off":
        store.switch(False)
        store.switch(True)
    elif lost == "flushed":
        store.clear(registrations=True)
    else:
        store.reset_after_fork()
        store.switch(True)
    assert store.registrations is not None
    assert len(store.registrations) == 0
    store.fill("k", read(store, "k"), "v1", 30_000)
    assert store.get("k") is MISSING  # nothing served that Redis does not track


class SwitchedOffMidTicket(OrderedDict[str, int]):
    """A store's tickets, where the listener switches the tier off while a reader
    is inside expect(): after it saw the tier on, before its ticket is written."""

    def __init__(self, store: NearStore) -> None:
        super().__init__()
        self.store: NearStore | None = store

    def pop(self, key: str, *default: Any) -> Any:
        store, self.store = self.store, None
        if store is not None:
            store.switch(False)  # the listener lost Redis right then
        return super().pop(key, *default)


@pytest.mark.parametrize("tracking", ["bcast", "keys"])
def test_a_ticket_taken_as_the_tier_switched_off_fills_nothing_once_back_on(
    tracking: Any,
) -> None:
    """The read behind that ticket was sent while nothing tracked the key: a write
    then went unreported, so its value may not be kept once tracking is back."""
    store = NearStore(NearCache(tracking=tracking), MSGPACK_CODEC.freeze)
    registrar = Requests()
    if store.registrations is not None:
        store.registrations.register = registrar
    store.switch(True)
    store._tickets = SwitchedOffMidTicket(store)
    ticket = store.expect("k")
    assert ticket is not None  # it saw the tier on
    assert not store.enabled
    store.switch(True)  # tracking again (per-key: the key registered anew, too)
    if store.registrations is not None:
        store.registrations.request(store, ["k"])
        store.registrations.registered(registrar.requests, processed=True)
    store.fill("k", ticket, "v-before-an-unreported-write", 30_000)
    assert store.get("k") is MISSING


def test_a_refused_registration_is_asked_again() -> None:
    store, registrar = keys_store()
    store.fill("k", read(store, "k"), "v1", 30_000)
    store.registered(registrar.requests, processed=False)  # MOVED, say
    store.fill("k", read(store, "k"), "v1", 30_000)
    assert [key for key, _ in registrar.requests] == ["k", "k"]


def test_registrations_stay_within_max_entries() -> None:
    store, registrar = keys_store(max_entries=3)
    for index in range(10):
        key = f"k{index}"
        store.fill(key, read(store, key), "v", 30_000)
        store.registered(registrar.requests[-1:])
    assert store.registrations is not None
    assert len(store.registrations) == 3


def test_bcast_stores_keep_the_first_read_and_register_nothing() -> None:
    store = NearStore(NearCache(), MSGPACK_CODEC.freeze)
    store.switch(True)
    store.fill("k", read(store, "k"), "v1", 30_000)
    assert store.get("k") == "v1"
    assert store.registrations is None


def test_where_nothing_can_track_allow_untracked_fills_without_registering() -> None:
    engine = CacheEngine(fakeredis.FakeRedis(), prefix="near-fake-keys")
    near = NearCache(ttl=0.2, allow_untracked=True, tracking="keys")
    untracked = cache_aside(key="q:<id>", ttl=30, engine=engine, near=near)(lambda id: [id])
    assert untracked("a") == ["a"]
    assert [untracked.lookup("a").source for _ in range(2)] == [Source.CACHE, Source.NEAR]
    assert engine.near_state() == "unsupported"
    engine.close()


def test_bad_tracking_modes_are_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"NearCache\(tracking=...\) must be"):
        NearCache(tracking="per-key")  # type: ignore[arg-type]


# -- the registrar, with a scripted connection ----------------------------------


class ScriptedConnection:
    """Answers as Redis would; refuses EXISTS naming a key in `refused` (MOVED, say);
    fails every command once `broken` is set."""

    def __init__(self, refused: frozenset[str] = frozenset()) -> None:
        self.refused = refused
        self.sent: list[tuple[Any, ...]] = []
        self.replies: list[Any] = []
        self.broken = threading.Event()

    def connect(self) -> None: ...

    def disconnect(self) -> None: ...

    def send_command(self, *args: Any) -> None:
        if self.broken.is_set():
            raise ConnectionError("connection reset")
        self.sent.append(args)
        if args[:2] == ("CLIENT", "ID"):
            self.replies.append(41)
        elif args[0] == "CLIENT" and "REDIRECT" in self.refused:
            self.replies.append(ResponseError("The client ID you want redirect to does not exist"))
        elif args[0] == "EXISTS" and self.refused & set(args[1:]):
            self.replies.append(ResponseError("MOVED 1 127.0.0.1:7001"))
        else:
            self.replies.append(b"OK")

    def can_read(self, timeout: float) -> bool:
        return bool(self.replies)

    def read_response(self) -> Any:
        reply = self.replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply


class Answers:
    """Stands for a store: what the registrar told it."""

    def __init__(self, expected: int) -> None:
        self.processed: list[str] = []
        self.refused: list[str] = []
        self._expected = expected
        self.all_in = threading.Event()
        self.forgotten = False

    def forget_registrations(self) -> None:
        self.forgotten = True

    def registered(self, keys: list[tuple[str, int]], processed: bool = True) -> None:
        (self.processed if processed else self.refused).extend(key for key, _ in keys)
        if len(self.processed) + len(self.refused) >= self._expected:
            self.all_in.set()


def test_the_registrar_sends_one_exists_per_slot_and_abandons_the_refused() -> None:
    keys = ["{a}:1", "{a}:2", "{b}:1"]
    connection = ScriptedConnection(refused=frozenset({"{b}:1"}))
    registrar = Registrar(lambda: connection, on_lost=lambda reason: None, group=slot_of)
    answers = Answers(expected=len(keys))
    registrar.open(redirect=7)
    try:
        assert connection.sent[1] == ("CLIENT", "TRACKING", "on", "REDIRECT", 7)
        with registrar._wake:  # one batch: all queued before its thread looks
            for number, key in enumerate(keys):
                registrar.submit(answers, key, number)  # type: ignore[arg-type]
        assert answers.all_in.wait(PATIENCE)
    finally:
        registrar.close()
    assert answers.forgotten  # closed: Redis tracks none of its keys now
    assert sorted(answers.processed) == ["{a}:1", "{a}:2"]
    assert answers.refused == ["{b}:1"]
    exists = sorted(args for args in connection.sent if args[0] == "EXISTS")
    assert exists == [("EXISTS", "{a}:1", "{a}:2"), ("EXISTS", "{b}:1")]


def test_a_registrar_refused_tracking_is_a_failure_to_retry_not_unsupported() -> None:
    """The listener's connection went between its own handshake and the registrar's:
    no client to redirect to. A ResponseError would turn the near cache off for good."""
    connection = ScriptedConnection(refused=frozenset({"REDIRECT"}))
    registrar = Registrar(lambda: connection, on_lost=lambda reason: None)
    with pytest.raises(RegistrarLostError, match="does not exist"):
        registrar.open(redirect=7)
    assert isinstance(RegistrarLostError(), ConnectionError)


def test_a_failed_registrar_says_so_once_and_abandons_what_it_holds() -> None:
    connection = ScriptedConnection()
    lost: list[str] = []
    registrar = Registrar(lambda: connection, on_lost=lost.append)
    registrar.open(redirect=7)
    store, _ = keys_store()
    registrations = store.registrations
    assert registrations is not None
    registrations.register = registrar.submit
    store.fill("k", read(store, "k"), "v", 30_000)
    until(lambda: registrations.vouches("k", 1 << 62), "the registration confirmed")
    connection.broken.set()  # its next PING fails
    try:
        assert registrar.lost.wait(PATIENCE)
    finally:
        registrar.close()
    assert len(lost) == 1
    assert "registrar lost" in lost[0]
    assert store.registrations is not None
    assert len(store.registrations) == 0  # whatever the listener did with the store
    answers = Answers(expected=1)
    registrar.submit(answers, "k", 1)  # type: ignore[arg-type]
    assert answers.refused == ["k"]  # abandoned at once: the next fill asks again


# -- against real Redis ------------------------------------------------------------


@pytest.fixture
def engines() -> Iterator[Callable[[], CacheEngine]]:
    """Makes engines on one prefix, each with a listener of its own (as another
    process's)."""
    if REDIS_URL is None:
        pytest.skip("client tracking needs a real Redis server")
    url, prefix = REDIS_URL, unique_prefix()
    made: list[CacheEngine] = []

    def make() -> CacheEngine:
        made.append(CacheEngine.from_url(url, prefix=prefix))
        return made[-1]

    yield make
    for engine in made:
        engine.close()
    raw = redis.Redis.from_url(url)
    delete_prefix(raw, prefix)
    raw.close()


def until(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + PATIENCE  # a bound on a hang, no speed claim
    while not predicate():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.005)


@needs_real_redis
@pytest.mark.parametrize("tracking", ["bcast", "keys"])
def test_only_keys_this_process_read_are_reported_in_keys_mode(
    engines: Callable[[], CacheEngine], tracking: Any
) -> None:
    here, writer = engines(), engines()

    @cache_aside(key="p:<id>", ttl=30, engine=here, near=NearCache(tracking=tracking))
    def read(id: str) -> str:
        return "v"

    write = cache_aside(key="p:<id>", ttl=30, engine=writer)(lambda id: "v")
    read("held")
    until(lambda: read.lookup("held").source is Source.NEAR, "a near hit")
    listener = here.nearby.listener
    assert isinstance(listener, InvalidationListener)
    reported = listener.keys_reported
    write("never-read")  # a key this process never read changes...
    write.invalidate("never-read")
    write.invalidate("held")  # ...then one it holds; reports arrive in order
    until(lambda: read.lookup("held").source is not Source.NEAR, "the report of 'held'")
    until(lambda: listener.keys_reported > reported, "the report counted")
    told = listener.keys_reported - reported
    if tracking == "keys":
        assert told == 1  # 'held' alone
    else:
        assert told >= 3  # every change under the prefix: 'never-read' twice, 'held'


@needs_real_redis
def test_the_registrar_lost_empties_the_tier_and_nothing_unverified_is_served(
    engines: Callable[[], CacheEngine],
) -> None:
    engine = engines()
    primary = {"v": "1"}

    @cache_aside(key="p:<id>", ttl=30, engine=engine, near=NearCache(tracking="keys"))
    def read(id: str) -> str:
        return primary["v"]

    read("x")
    until(lambda: read.lookup("x").source is Source.NEAR, "a near hit")
    listener = engine.nearby.listener
    assert isinstance(listener, InvalidationListener)
    assert listener.registrar is not None
    connections = listener.connections
    admin = redis.Redis.from_url(REDIS_URL or "")
    try:
        admin.client_kill_filter(_id=listener.registrar.client_id)
        # Redis forgot what the registrar tracked: this change is reported to no one.
        primary["v"] = "2"
        admin.delete(read.key("x"))
        until(lambda: listener.connections > connections, "both connections back")
        assert read("x") == "2"  # emptied when the registrar was lost: no stale read
        until(lambda: read.lookup("x").source is Source.NEAR, "refilled, registered anew")
        primary["v"] = "3"
        admin.delete(read.key("x"))  # tracked by the new registrar: reported
        until(lambda: read("x") == "3", "the change reported")
    finally:
        admin.close()


@needs_real_redis
def test_one_engine_refuses_two_tracking_modes(engines: Callable[[], CacheEngine]) -> None:
    engine = engines()
    keys = cache_aside(key="a:<id>", ttl=30, engine=engine, near=NearCache(tracking="keys"))(
        lambda id: id
    )
    bcast = cache_aside(key="b:<id>", ttl=30, engine=engine, near=NearCache())(lambda id: id)
    assert keys("x") == "x"
    with pytest.raises(ConfigurationError, match=r"tracking='bcast'.*already track 'keys'"):
        bcast("x")


@needs_real_redis
@pytest.mark.parametrize("tracking", ["bcast", "keys"])
def test_readers_racing_another_processs_writes_end_on_the_last_value(
    engines: Callable[[], CacheEngine], tracking: Any
) -> None:
    """Reads race changes in another process; once the changes stop, the near cache
    serves the last value (a fill kept without a registration would keep an old one
    for the whole ttl)."""
    here, writer = engines(), engines()
    primary = {"v": 0}

    @cache_aside(key="p:<id>", ttl=60, engine=here, near=NearCache(tracking=tracking))
    def read(id: str) -> int:
        return primary["v"]

    other = cache_aside(key="p:<id>", ttl=60, engine=writer)(lambda id: primary["v"])
    done = threading.Event()
    reads = [0]

    def reader() -> None:
        while not done.is_set():
            read("x")
            reads[0] += 1

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for version in range(1, 100):
            primary["v"] = version
            other.invalidate("x")
            seen = reads[0]  # let the reader read, and fill, between changes
            until(lambda seen=seen: reads[0] >= seen + 3, "the reader reading")
    finally:
        done.set()
        thread.join()
    until(lambda: read("x") == 99, "the last value")
    until(lambda: read.lookup("x").source is Source.NEAR, "a near hit")
    assert {read("x") for _ in range(100)} == {99}


def test_keys_pushed_out_of_redis_tracking_table_are_dropped_not_kept_stale() -> None:
    """tracking-table-max-keys: Redis stops tracking the oldest keys and reports them
    as changed; the same path as a change drops them, so none stays unseen."""
    server = RedisProcess("--tracking-table-max-keys", "2").start()
    engine = CacheEngine.from_url(server.url, prefix="table")
    admin = redis.Redis.from_url(server.url)
    version = {"v": 1}
    try:
        near = NearCache(tracking="keys")
        read = cache_aside(key="p:<id>", ttl=60, engine=engine, near=near)(lambda id: version["v"])
        ids = [str(index) for index in range(5)]
        for id in ids:
            read(id)
            until(lambda id=id: read.lookup(id).source is Source.NEAR, "a near hit")
        listener = engine.nearby.listener
        assert isinstance(listener, InvalidationListener)
        until(lambda: listener.keys_reported >= len(ids) - 2, "the table's evictions")
        for id in ids:  # back in the near cache: registered again first
            until(lambda id=id: read.lookup(id).source is Source.NEAR, "a near hit again")
        version["v"] = 2
        admin.delete(*(read.key(id) for id in ids))  # reported only for tracked keys
        for id in ids:
            until(lambda id=id: read(id) == 2, f"key {id} read anew")
    finally:
        engine.close()
        admin.close()
        server.stop()


def test_a_registration_on_a_slots_old_master_vouches_for_nothing_after_the_slot_moved() -> None:
    """A key registered while absent: Redis tracks it on the master that owned its
    slot. The slot moves (no key to migrate, so no report); the key is then written
    on its new master, which tracks nothing for us. The old registration must not
    let a read from the new master fill: no change there would ever be reported."""
    cluster = RedisClusterProcesses(masters=3).start()
    url = cluster.url.replace("redis://", "redis+cluster://")
    here = CacheEngine.from_url(url, prefix="moved", near=NearCache(tracking="keys"))
    there = CacheEngine.from_url(url, prefix="moved")
    version = {"v": 1}
    try:
        read = cache_aside(key="p:<id>", ttl=60, engine=here)(lambda id: version["v"])
        write = cache_aside(key="p:<id>", ttl=60, engine=there)(lambda id: version["v"])
        read("warm")  # the near tier and its listener, tracking every master
        until(lambda: here.near_state() == "tracking", "tracking")
        store, key = read._near, read.key("x")
        assert store is not None
        registrations = store.registrations
        assert registrations is not None
        registrations.request(store, [key])  # while the key is absent
        until(lambda: registrations.vouches(key, 1 << 62), "the registration confirmed")
        listener = here.nearby.listener
        assert isinstance(listener, ClusterListener)
        slot = slot_of(key)
        admins = {node.port: node.admin() for node in cluster.nodes}
        ids = {port: admin.execute_command("CLUSTER", "MYID") for port, admin in admins.items()}
        old = int(str(listener.owner(key)).rsplit(":", 1)[1])
        assert admins[old].execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
        new = next(port for port in admins if port != old)  # any other master
        admins[new].execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[old])
        admins[old].execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[new])
        for admin in admins.values():
            admin.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[new])
        until(lambda: listener.owner(key) == f"127.0.0.1:{new}", "the move seen")
        until(lambda: here.near_state() == "tracking", "tracking")
        write("x")  # the key, on its new master
        read("x")
        until(lambda: read.lookup("x").source is Source.NEAR, "kept")
        version["v"] = 2
        write.invalidate("x")  # reported only if the new master tracks the key for us
        until(lambda: read("x") == 2, "the change reported")
    finally:
        here.close()
        there.close()
        cluster.stop()
