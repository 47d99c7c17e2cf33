"""The lean wire's guarantees (issue 27), each driven through it by a cached function,
sync and async: an ACL user (and one refused its keys), a password-only server in
RESP2 and RESP3 (a hash entry too), a write the server stops reading, a server
restarted on its port, and an error reply that must not shift the replies after it.
Each test checks that the lean path served: redis-py's per-call read_response and
send_packed_command never ran for a hit, the lean reads and writes did."""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
import redis.asyncio
from redis.exceptions import ResponseError

from cached_aside import CacheEngine, cache_aside
from cached_aside import _connections as connections
from cached_aside import _wire as wire
from cached_aside._connections import HeldConnections
from tests.conftest import PATIENCE, REDIS_URL, delete_prefix, needs_real_redis, unique_prefix
from tests.servers import RedisProcess

PASSWORD = "lean-s3cret"
# Generous for a loaded machine (a 0.25 s timeout counts a stall as an error), and the
# bound on how long a call waits for a server that stopped reading.
SOCKET_TIMEOUT = 2.0
# More than the kernel's socket buffers on both ends hold (net.ipv4.tcp_wmem and
# tcp_rmem allow 4 + 32 MiB here): a write of it waits on a server that stopped reading.
STALLING_SIZE = 64 << 20
HITS = 10
# The engine's own threads: what they send (pending releases, lease renewals) is no
# caller's call.
BACKGROUND = ("cached_aside-outbox", "cached_aside-leases")


class WireSpy:
    """Counts what redis-py's own per-call methods serve (sync and asyncio alike) and
    what the lean wire reads and writes: the connections it used, the kinds of the
    replies it read, and what its reads and writes raised."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.redis_py: Counter[str] = Counter()
        self.lean: Counter[str] = Counter()
        self.reply_types: list[type] = []
        # (lean function, what it raised, the socket or stream it had been called on)
        self.raised: list[tuple[str, type, Any]] = []
        self.connections: list[Any] = []
        for base, asynchronous in (
            (redis.connection.AbstractConnection, False),
            (redis.asyncio.connection.AbstractConnection, True),
        ):
            for name in ("read_response", "send_packed_command"):
                wrapped = self._redis_py(getattr(base, name), name, asynchronous)
                # On the base class: the connection classes still inherit it, so the
                # lean path's check (no override) still lets them through.
                monkeypatch.setattr(base, name, wrapped)
        for name in ("read", "write"):
            monkeypatch.setattr(connections, name, self._lean(getattr(wire, name), name))
        for name in ("read_async", "write_async"):
            monkeypatch.setattr(connections, name, self._lean_async(getattr(wire, name), name))

    def reset(self) -> None:
        self.redis_py.clear()
        self.lean.clear()
        self.reply_types.clear()
        self.raised.clear()
        self.connections.clear()

    def raised_kinds(self) -> set[type]:
        return {kind for _, kind, _ in self.raised}

    def _redis_py(self, method: Any, name: str, asynchronous: bool) -> Any:
        if asynchronous:

            @functools.wraps(method)
            async def counted_async(connection: Any, *args: Any, **kwargs: Any) -> Any:
                self.redis_py[name] += 1
                return await method(connection, *args, **kwargs)

            return counted_async

        @functools.wraps(method)
        def counted(connection: Any, *args: Any, **kwargs: Any) -> Any:
            if threading.current_thread().name not in BACKGROUND:
                self.redis_py[name] += 1
            return method(connection, *args, **kwargs)

        return counted

    def _seen(self, name: str, connection: Any) -> Any:
        self.lean[name] += 1
        self.connections.append(connection)
        return stream_of(connection)

    def _lean(self, function: Any, name: str) -> Any:
        def counted(connection: Any, *args: Any) -> Any:
            if threading.current_thread().name in BACKGROUND:
                return function(connection, *args)
            stream = self._seen(name, connection)
            try:
                reply = function(connection, *args)
            except Exception as exc:
                self.raised.append((name, type(exc), stream))
                raise
            if name == "read":
                self.reply_types.append(type(reply))
            return reply

        return counted

    def _lean_async(self, function: Any, name: str) -> Any:
        async def counted(connection: Any, *args: Any) -> Any:
            stream = self._seen(name, connection)
            try:
                reply = await function(connection, *args)
            except Exception as exc:
                self.raised.append((name, type(exc), stream))
                raise
            if name == "read_async":
                self.reply_types.append(type(reply))
            return reply

        return counted

    def served_lean(self, reads: int) -> Any:
        """The one connection the lean wire used since the last reset, for exactly
        `reads` reads, with nothing through redis-py's per-call methods meanwhile."""
        assert self.redis_py == Counter(), "redis-py's own methods served part of it"
        assert self.lean["read"] + self.lean["read_async"] == reads
        assert len({id(connection) for connection in self.connections}) == 1
        connection = self.connections[-1]
        assert wire.lean(connection)
        return connection


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> WireSpy:
    return WireSpy(monkeypatch)


@pytest.fixture(params=["sync", "async"])
def calls(request: pytest.FixtureRequest) -> Iterator[Calls]:
    made = Calls(str(request.param))
    yield made
    made.close()


class Calls:
    """A test's calls in its mode. Sync calls all run on one thread of their own (so
    on one held connection), awaited with PATIENCE as a bound on a hang."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self._thread = ThreadPoolExecutor(1) if mode == "sync" else None

    def cached(self, engine: CacheEngine, loader: Callable[..., Any], **options: Any) -> Any:
        """Decorate the plain `loader` for this mode."""
        options.setdefault("ttl", 60)
        if self.mode == "async":
            plain = loader

            @functools.wraps(plain)
            async def loader(*args: Any) -> Any:
                return plain(*args)

        return cache_aside(engine=engine, **options)(loader)

    async def __call__(self, function: Callable[..., Any], *args: Any) -> Any:
        if self._thread is None:
            return await asyncio.wait_for(function(*args), PATIENCE)
        return await asyncio.wait_for(
            asyncio.wrap_future(self._thread.submit(function, *args)), PATIENCE
        )

    async def command(self, engine: CacheEngine, *args: Any) -> Any:
        """A command on the connection the engine's hits ride in this mode."""
        if self.mode == "async":
            pipeline = engine.sides.async_side().pipeline
            assert pipeline is not None
            return await pipeline.call(args)
        held = engine.sides.sync_side().held
        assert held is not None
        answered, reply = await self(held.call, args)
        assert answered
        return reply

    def fallbacks(self, engine: CacheEngine) -> int:
        """Calls the held connections could not serve (the sync side's counter)."""
        if self.mode == "async":
            return 0
        held = engine.sides.sync_side().held
        assert held is not None
        return held.fallbacks

    def close(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=True)


def stream_of(connection: Any) -> Any:
    """A connection's socket (sync) or stream writer (asyncio): a new one after a
    reconnection, None while disconnected."""
    if isinstance(connection, redis.asyncio.connection.AbstractConnection):
        return connection._writer
    return connection._sock


async def close_engine(engine: CacheEngine, calls: Calls) -> None:
    if calls.mode == "async":
        await engine.aclose()
    else:
        engine.close()


# --- logging in: an ACL user, a password, RESP2 and RESP3 ------------------------


@pytest.fixture(scope="module")
def acl_server() -> Iterator[RedisProcess]:
    """A server with two users: one granted the tests' keys, one only other keys."""
    process = RedisProcess().start()
    with process.admin() as admin:
        admin.execute_command("ACL", "SETUSER", "lean", "on", f">{PASSWORD}", "~t-*", "+@all")
        admin.execute_command("ACL", "SETUSER", "walled", "on", f">{PASSWORD}", "~other:*", "+@all")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def password_server() -> Iterator[RedisProcess]:
    """A server with only a password (requirepass): AUTH <password>, no user name."""
    process = RedisProcess().start()  # it waits for a PING without a password
    with process.admin() as admin:
        admin.config_set("requirepass", PASSWORD)
    yield process
    process.stop()


@pytest.fixture
async def acl_engine(acl_server: RedisProcess, calls: Calls) -> AsyncIterator[CacheEngine]:
    url = f"redis://lean:{PASSWORD}@127.0.0.1:{acl_server.port}/0"
    engine = CacheEngine.from_url(url, prefix=unique_prefix(), socket_timeout=SOCKET_TIMEOUT)
    yield engine
    await close_engine(engine, calls)


async def test_an_acl_users_hits_ride_the_lean_wire(
    acl_engine: CacheEngine, calls: Calls, spy: WireSpy
) -> None:
    loads: list[int] = []

    def load(id: int) -> dict[str, int]:
        loads.append(id)
        return {"id": id}

    read = calls.cached(acl_engine, load, key="item:<id>")
    assert await calls(read, 1) == {"id": 1}  # the miss (and the login) first
    spy.reset()
    for _ in range(HITS):
        assert await calls(read, 1) == {"id": 1}
    assert loads == [1]
    connection = spy.served_lean(HITS)
    assert calls.fallbacks(acl_engine) == 0
    # The connection the hits rode is logged in as the URL's user.
    assert await calls.command(acl_engine, "ACL", "WHOAMI") == b"lean"
    assert spy.connections[-1] is connection


async def test_a_user_refused_the_keys_fails_open_on_the_lean_wire(
    acl_server: RedisProcess, calls: Calls, spy: WireSpy
) -> None:
    """NOPERM is an error reply: the loader answers, the error is counted, and the
    connection (its stream in step) serves the next call."""
    url = f"redis://walled:{PASSWORD}@127.0.0.1:{acl_server.port}/0"
    engine = CacheEngine.from_url(url, prefix=unique_prefix(), socket_timeout=SOCKET_TIMEOUT)
    loads: list[int] = []

    def load(id: int) -> str:
        loads.append(id)
        return f"loaded-{id}"

    read = calls.cached(engine, load, key="item:<id>")
    try:
        assert await calls(read, 0) == "loaded-0"  # connects (and logs in) first
        spy.reset()
        for id in (1, 2):
            assert await calls(read, id) == f"loaded-{id}"  # a value, never the error
        assert loads == [0, 1, 2]
        assert read.error_kinds().get("NoPermissionError", 0) >= 3
        assert redis.exceptions.NoPermissionError in spy.raised_kinds()  # by the lean read
        connection = spy.served_lean(spy.lean["read"] + spy.lean["read_async"])
        assert calls.fallbacks(engine) == 0
        stream = stream_of(connection)
        assert await calls.command(engine, "ACL", "WHOAMI") == b"walled"
        assert stream_of(spy.connections[-1]) is stream  # the same socket all along
    finally:
        await close_engine(engine, calls)


@pytest.mark.parametrize("protocol", [2, 3])
async def test_a_password_only_server_in_resp2_and_resp3_serves_hits_lean(
    password_server: RedisProcess, calls: Calls, spy: WireSpy, protocol: int
) -> None:
    """A hash entry's reply is a map in RESP3 (hiredis gives a dict) and a flat list
    in RESP2: both decoded right with no response callback of redis-py's."""
    url = f"redis://:{PASSWORD}@127.0.0.1:{password_server.port}/0?protocol={protocol}"
    engine = CacheEngine.from_url(url, prefix=unique_prefix(), socket_timeout=SOCKET_TIMEOUT)
    loads: list[str] = []

    def item(id: int) -> dict[str, int]:
        loads.append(f"item-{id}")
        return {"id": id, "protocol": protocol}

    def profile(id: int) -> dict[str, str]:
        loads.append(f"profile-{id}")
        return {"id": str(id), "name": f"name-{id}"}

    read_item = calls.cached(engine, item, key="item:<id>")
    read_profile = calls.cached(engine, profile, key="profile:<id>", as_hash=True)
    try:
        assert await calls(read_item, 1) == {"id": 1, "protocol": protocol}
        assert await calls(read_profile, 1) == {"id": "1", "name": "name-1"}
        spy.reset()
        for _ in range(HITS):
            assert await calls(read_item, 1) == {"id": 1, "protocol": protocol}
            assert await calls(read_profile, 1) == {"id": "1", "name": "name-1"}
        assert loads == ["item-1", "profile-1"]
        connection = spy.served_lean(2 * HITS)
        assert connection.protocol == protocol
        assert calls.fallbacks(engine) == 0
        # The hash hits' replies as hiredis parsed them, straight off the wire.
        assert set(spy.reply_types) == {bytes, dict if protocol == 3 else list}
    finally:
        await close_engine(engine, calls)


# --- a server that stops reading, a server restarted ----------------------------


@pytest.fixture
def own_server() -> Iterator[RedisProcess]:
    process = RedisProcess().start()
    yield process
    process.stop()  # resumes it first if it is paused


async def test_a_write_the_server_stops_reading_times_out_and_drops_the_connection(
    own_server: RedisProcess, calls: Calls, spy: WireSpy
) -> None:
    """The loader pauses the server, then the store's write of a value larger than the
    socket buffers cannot finish: it times out (the loader's value is the answer, the
    error counted) and the connection is dropped; resumed, the next calls ride a new
    socket, lean, with the right values."""
    engine = CacheEngine.from_url(
        own_server.url,
        prefix=unique_prefix(),
        socket_timeout=SOCKET_TIMEOUT,
        breaker_failures=1000,  # the wire is under test here, not the breaker
    )
    big = os.urandom(STALLING_SIZE)
    paused = threading.Event()

    def load(id: str) -> bytes:
        if id == "big" and not paused.is_set():
            own_server.pause()
            paused.set()
            return big
        return f"small-{id}".encode()

    read = calls.cached(engine, load, key="blob:<id>")
    try:
        assert await calls(read, "small") == b"small-small"  # the store's script loaded
        assert await calls(read, "small") == b"small-small"
        spy.reset()
        assert await calls(read, "big") == big  # the write stalls: the loader answers
        assert paused.is_set()
        writing = "write" if calls.mode == "sync" else "write_async"
        name, kind, old_stream = spy.raised[0]
        assert (name, kind) == (writing, redis.exceptions.TimeoutError)  # the lean write
        assert read.error_kinds().get("TimeoutError", 0) >= 1
        assert old_stream is not None
        own_server.resume()
        spy.reset()
        assert await calls(read, "small") == b"small-small"  # reconnects
        spy.reset()
        for _ in range(HITS):
            assert await calls(read, "small") == b"small-small"
        connection = spy.served_lean(HITS)
        fresh = stream_of(connection)
        assert fresh is not None
        assert fresh is not old_stream
        if calls.mode == "sync":
            assert old_stream.fileno() == -1  # the stalled socket was closed
        else:
            assert old_stream.is_closing()
    finally:
        own_server.resume()
        await close_engine(engine, calls)


async def test_after_a_restart_hits_ride_the_lean_wire_on_a_new_socket(
    own_server: RedisProcess, calls: Calls, spy: WireSpy
) -> None:
    """The server is killed and started again on its port (its data gone): the first
    call falls over once (or fails open), then hits are lean again, on a new socket."""
    engine = CacheEngine.from_url(
        own_server.url, prefix=unique_prefix(), socket_timeout=SOCKET_TIMEOUT
    )
    loads: list[int] = []

    def load(id: int) -> str:
        loads.append(id)
        return f"value-{id}-{len(loads)}"

    read = calls.cached(engine, load, key="item:<id>")
    try:
        assert await calls(read, 1) == "value-1-1"
        spy.reset()
        assert await calls(read, 1) == "value-1-1"
        old_stream = stream_of(spy.served_lean(1))
        own_server.kill()
        own_server.start()
        fallbacks = calls.fallbacks(engine)
        assert await calls(read, 1) == "value-1-2"  # the data went with the server
        assert calls.fallbacks(engine) - fallbacks <= 1
        with own_server.admin() as admin:
            assert admin.exists(read.key(1)) == 1  # stored again, on the new server
        spy.reset()
        for _ in range(HITS):
            assert await calls(read, 1) == "value-1-2"
        assert loads == [1, 1]
        connection = spy.served_lean(HITS)
        assert stream_of(connection) is not old_stream
        assert calls.fallbacks(engine) - fallbacks <= 1
    finally:
        await close_engine(engine, calls)


# --- an error reply keeps the stream in step ------------------------------------


@needs_real_redis
@pytest.mark.parametrize("protocol", [2, 3])
async def test_an_error_reply_never_shifts_the_next_calls_reply(
    calls: Calls, spy: WireSpy, protocol: int
) -> None:
    """A hash where a string entry belongs answers WRONGTYPE: the call loads (and
    replaces it), and every call after gets its own reply, on the same socket."""
    assert REDIS_URL is not None
    prefix = unique_prefix()
    url = f"{REDIS_URL}?protocol={protocol}" if "?" not in REDIS_URL else REDIS_URL
    engine = CacheEngine.from_url(url, prefix=prefix, socket_timeout=SOCKET_TIMEOUT)
    raw = redis.Redis.from_url(REDIS_URL)

    def load(id: int) -> str:
        return f"value-{id}"

    read = calls.cached(engine, load, key="item:<id>")
    try:
        for id in (1, 2, 3):
            assert await calls(read, id) == f"value-{id}"  # cached, scripts loaded
        raw.delete(read.key(2))
        raw.hset(read.key(2), "not", "a string")
        spy.reset()
        for _ in range(3):
            assert await calls(read, 1) == "value-1"
            assert await calls(read, 2) == "value-2"  # WRONGTYPE once, then the store
            assert await calls(read, 3) == "value-3"
        # The lean read raised the error reply.
        assert any(issubclass(kind, ResponseError) for kind in spy.raised_kinds())
        connection = spy.served_lean(spy.lean["read"] + spy.lean["read_async"])
        assert raw.type(read.key(2)) == b"string"
        stream = stream_of(connection)
        spy.reset()
        # Straight on the connection, an error reply then a reply of its own.
        for _ in range(3):
            with pytest.raises(ResponseError, match="WRONGTYPE"):
                await calls.command(engine, "LPUSH", read.key(1), "x")
            assert await calls.command(engine, "PING") == b"PONG"
        assert stream_of(spy.served_lean(6)) is stream
        assert calls.fallbacks(engine) == 0
    finally:
        delete_prefix(raw, prefix)
        raw.close()
        await close_engine(engine, calls)


@needs_real_redis
def test_an_error_reply_on_a_threads_first_call_keeps_its_connection(spy: WireSpy) -> None:
    """A thread's first command goes the general way (call_many); an error reply there
    is read whole like any other, and must not cost the connection: dropped, the next
    call connects again (connect, HELLO, CLIENT SETINFO...), and a user refused every
    key (NOPERM) or a server whose scripts are gone connects again on every call."""
    assert REDIS_URL is not None
    prefix = unique_prefix()
    raw = redis.Redis.from_url(REDIS_URL)
    raw.hset(f"{prefix}:hash", "field", "value")
    raw.set(f"{prefix}:string", b"s")
    pool = redis.BlockingConnectionPool.from_url(REDIS_URL, max_connections=4)
    held = HeldConnections(pool)
    try:
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            held.call(("GET", f"{prefix}:hash"))  # the thread's first call
        connection = held._local.held.connection
        stream = connection._sock
        assert stream is not None, "an error reply dropped the held connection"
        spy.reset()
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            held.call_many([("GET", f"{prefix}:hash"), ("GET", f"{prefix}:string")], True)
        assert held.call(("GET", f"{prefix}:string")) == (True, b"s")
        assert spy.served_lean(3) is connection
        assert connection._sock is stream
        assert held.fallbacks == 0
    finally:
        delete_prefix(raw, prefix)
        raw.close()
        pool.disconnect()
