"""The lean wire (cached_aside/_wire.py): replies parsed by hiredis straight off a
held connection's socket, and an event loop's shared connection's stream. Driven
against a scripted server on a free port that cuts a reply in half (then closes, or
hangs), against Redis in RESP3 with a push frame before a reply, across a fork, and
with a cancellation mid-reply: a reply is never lost silently, and never answers
another command. The memo of packed commands keeps a hit's command, not a stored
value."""

from __future__ import annotations

import asyncio
import builtins
import gc
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio
from redis.exceptions import ConnectionError, TimeoutError

from cached_aside import CacheEngine, cache_aside
from cached_aside import _wire as wire
from cached_aside._connections import HeldConnections, Pipeline
from cached_aside._timeouts import COUNTS_CANCELS, Watchdog
from tests.conftest import PATIENCE, REDIS_URL, delete_prefix, needs_real_redis, unique_prefix
from tests.servers import REDIS_SERVER, RedisProcess, free_port, server_speaks_tls

VALUE = b"0123456789abcdef"
WHOLE = b"$%d\r\n%s\r\n" % (len(VALUE), VALUE)
HALF = WHOLE[: len(WHOLE) // 2]
# What the handshake needs: HELLO's map names the protocol (RESP3, redis-py 8's default).
ANSWERS = {b"HELLO": b"%1\r\n$5\r\nproto\r\n:3\r\n"}
# Socket timeouts: long enough for a loaded machine to write a whole reply, and the
# bound on how long the hanging server's caller waits.
HANG_TIMEOUT = 1.0


def _commands(buffer: bytearray) -> Iterator[list[bytes]]:
    """The RESP arrays of bulk strings complete in `buffer` (consumed from it)."""
    while True:
        data = bytes(buffer)
        try:
            end = data.index(b"\r\n")
            count, at = int(data[1:end]), end + 2
            args = []
            for _ in range(count):
                end = data.index(b"\r\n", at)
                length = int(data[at + 1 : end])
                if len(data) < end + 2 + length + 2:
                    return
                args.append(data[end + 2 : end + 2 + length])
                at = end + 2 + length + 2
        except ValueError:
            return
        del buffer[:at]
        yield args


class ScriptedServer:
    """Answers +OK to everything but GET, whose replies the test scripts per
    connection: `plan[n]` for the n-th connection (the last for any later), its GETs
    in turn ("whole,half-close": one whole reply, then half of one and a close; the
    last step repeats). Steps: "whole", "half-close", "half-hang"."""

    def __init__(self, plan: list[str]) -> None:
        self.plan = plan
        self.port = free_port()
        self.connections = 0
        self.cut = threading.Event()  # a reply was cut in half
        self.closed_by_client = threading.Event()  # a hung connection was closed
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _serve(self) -> None:
        self._listener.settimeout(0.05)
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except builtins.TimeoutError:  # redis's TimeoutError is imported here
                continue
            except OSError:
                return
            plan = self.plan[min(self.connections, len(self.plan) - 1)]
            self.connections += 1
            threading.Thread(target=self._talk, args=(conn, plan), daemon=True).start()

    def _talk(self, conn: socket.socket, plan: str) -> None:
        steps = plan.split(",")
        buffer = bytearray()
        hung = False
        conn.settimeout(0.05)
        with conn:
            while not self._stop.is_set():
                try:
                    data = conn.recv(65536)
                except builtins.TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    self.closed_by_client.set()
                    return
                if hung:  # a reply was left half sent: nothing more, whatever comes
                    continue
                buffer += data
                try:
                    for args in _commands(buffer):
                        name = args[0].upper()
                        if name != b"GET":
                            conn.sendall(ANSWERS.get(name, b"+OK\r\n"))
                            continue
                        script = steps.pop(0) if len(steps) > 1 else steps[0]
                        if script == "whole":
                            conn.sendall(WHOLE)
                            continue
                        conn.sendall(HALF)
                        self.cut.set()
                        if script == "half-close":
                            return
                        # half-hang: send nothing more (not even to the commands queued
                        # behind it); wait for the client to give up
                        hung = True
                        break
                except OSError:  # the client closed meanwhile: nobody to answer
                    return

    def stop(self) -> None:
        self._stop.set()
        self._listener.close()
        self._thread.join(PATIENCE)


@pytest.fixture
def scripted() -> Iterator[Any]:
    servers: list[ScriptedServer] = []

    def start(*plan: str) -> ScriptedServer:
        servers.append(ScriptedServer(list(plan)))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def _held(url: str, protocol: int) -> tuple[Any, HeldConnections]:
    pool = redis.BlockingConnectionPool.from_url(
        url, max_connections=4, socket_timeout=HANG_TIMEOUT, protocol=protocol
    )
    return pool, HeldConnections(pool)


def _lean_connection(held: HeldConnections) -> Any:
    connection = held._local.held.connection
    assert wire.lean(connection), "the test must run on the lean wire (hiredis installed)"
    return connection


# --- threads: the held connection ----------------------------------------------


@pytest.mark.parametrize("protocol", [2, 3])
def test_a_reply_cut_by_a_close_fails_over_and_the_next_call_reads_a_new_socket(
    scripted: Any, protocol: int
) -> None:
    server = scripted("whole,half-close", "whole")
    pool, held = _held(server.url, protocol)
    assert held.call(("GET", "k")) == (True, VALUE)  # the connection is held now
    assert held.call(("GET", "k")) == (False, None)  # the client's retry serves it
    assert held.fallbacks == 1
    _lean_connection(held)
    assert held.call(("GET", "k")) == (True, VALUE)  # not the half left behind
    assert server.connections == 2
    pool.disconnect()


@pytest.mark.parametrize("protocol", [2, 3])
def test_a_reply_cut_by_a_hang_times_out_and_never_answers_the_next_call(
    scripted: Any, protocol: int
) -> None:
    server = scripted("whole,half-hang", "whole")
    pool, held = _held(server.url, protocol)
    assert held.call(("GET", "k")) == (True, VALUE)  # the connection is held now
    with pytest.raises(TimeoutError):  # raised, not retried: the server hangs
        held.call(("GET", "k"))
    assert server.closed_by_client.wait(PATIENCE)  # the half-read socket was dropped
    assert held.call(("GET", "k")) == (True, VALUE)
    _lean_connection(held)
    assert server.connections == 2
    pool.disconnect()


@needs_real_redis
def test_resp3_push_frames_before_a_reply_are_handled_not_returned() -> None:
    """A connection that tracks its keys (RESP3, no redirect) gets invalidation
    pushes in its own stream: the lean reader hands them to redis-py's push handler
    and returns the reply that follows."""
    assert REDIS_URL is not None
    prefix = unique_prefix()
    pool = redis.BlockingConnectionPool.from_url(REDIS_URL, max_connections=4, protocol=3)
    raw = redis.Redis.from_url(REDIS_URL)
    held = HeldConnections(pool)
    raw.mset({f"{prefix}:a": b"1", f"{prefix}:b": b"other"})
    try:
        assert held.call(("CLIENT", "TRACKING", "ON")) == (True, b"OK")
        assert held.call(("GET", f"{prefix}:a")) == (True, b"1")  # now tracked
        _lean_connection(held)
        raw.set(f"{prefix}:a", b"2")  # an invalidation push goes to the held connection
        for _ in range(3):
            assert held.call(("GET", f"{prefix}:b")) == (True, b"other")
            assert held.call(("GET", f"{prefix}:a")) == (True, b"2")
            raw.set(f"{prefix}:a", b"2")
        assert held.fallbacks == 0
    finally:
        delete_prefix(raw, prefix)
        raw.close()
        pool.disconnect()


@needs_real_redis
def test_a_forked_child_reads_on_a_socket_of_its_own() -> None:
    """The parent's held connection and its half-read buffer stay the parent's: the
    child's hits open their own socket and read their own replies."""
    assert REDIS_URL is not None
    prefix = unique_prefix()
    engine = CacheEngine.from_url(REDIS_URL, prefix=prefix)

    @cache_aside(key="fork:<id>", ttl=30, engine=engine)
    def load(id: str) -> str:
        return f"{id}-from-{os.getpid()}"

    parent = os.getpid()
    assert load("k") == f"k-from-{parent}"
    assert load("k") == f"k-from-{parent}"  # a hit, on the held connection
    reading, writing = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            hits = [load("k") for _ in range(5)]
            os.write(writing, json.dumps(hits).encode())
        finally:
            os._exit(0)
    os.close(writing)
    deadline = time.monotonic() + PATIENCE  # a bound on a hang, not a speed
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            pytest.fail("the forked child hung")
        time.sleep(0.01)
    assert json.loads(os.read(reading, 10000)) == [f"k-from-{parent}"] * 5
    os.close(reading)
    assert load("k") == f"k-from-{parent}"  # the parent's connection is still its own
    delete_prefix(engine.client(), prefix)
    engine.close()


@pytest.mark.skipif(
    not server_speaks_tls(), reason=f"the server ({REDIS_SERVER}) was built without TLS"
)
async def test_tls_connections_ride_the_lean_wire() -> None:
    """An SSL socket (sync) and an SSL stream (async) are read by hiredis straight."""
    server = RedisProcess(tls=True).start()
    try:
        options = {"ssl_ca_certs": str(server.ca_file), "max_connections": 4}
        pool = redis.BlockingConnectionPool.from_url(server.url, **options)
        held = HeldConnections(pool)
        assert held.call(("SET", "k", VALUE)) == (True, b"OK")
        assert held.call(("GET", "k")) == (True, VALUE)  # the held connection's own path
        assert held.fallbacks == 0
        _lean_connection(held)
        assert type(held._local.held.connection) is redis.SSLConnection
        async_pool = redis.asyncio.BlockingConnectionPool.from_url(server.url, **options)
        pipeline = Pipeline(async_pool)
        assert await pipeline.call(("GET", "k")) == VALUE
        assert wire.lean(pipeline._connection)
        await pipeline.close()
        await async_pool.aclose()
        pool.disconnect()
    finally:
        server.stop()


# --- event loops: the shared connection -----------------------------------------


def _pipeline(url: str) -> tuple[Any, Pipeline]:
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url, max_connections=4, socket_timeout=HANG_TIMEOUT
    )
    return pool, Pipeline(pool)


async def test_an_async_reply_cut_by_a_close_goes_out_once_more_on_a_new_socket(
    scripted: Any,
) -> None:
    server = scripted("half-close", "whole")
    pool, pipeline = _pipeline(server.url)
    assert await pipeline.call(("GET", "k")) == VALUE
    assert wire.lean(pipeline._connection)
    assert server.connections == 2
    await pipeline.close()
    await pool.aclose()


async def test_an_async_reply_cut_twice_fails_its_caller(scripted: Any) -> None:
    server = scripted("half-close")
    pool, pipeline = _pipeline(server.url)
    with pytest.raises(ConnectionError):
        await pipeline.call(("GET", "k"))
    assert server.connections == 2  # tried once more, then failed: never a half reply
    await pipeline.close()
    await pool.aclose()


async def test_an_async_reply_cut_by_a_hang_times_out_and_never_answers_another(
    scripted: Any,
) -> None:
    server = scripted("half-hang", "whole")
    pool, pipeline = _pipeline(server.url)
    with pytest.raises(TimeoutError):
        await pipeline.call(("GET", "k"))
    assert await pipeline.call(("GET", "k")) == VALUE
    assert server.connections == 2
    # The server thread sees the close when it next polls its socket: waited for, not
    # assumed (a loaded machine lags).
    assert await asyncio.to_thread(server.closed_by_client.wait, PATIENCE)
    await pipeline.close()
    await pool.aclose()


@pytest.mark.parametrize("outside", ["just before", "with"])
async def test_a_cancellation_from_outside_as_the_deadline_fires_stays_a_cancellation(
    scripted: Any, outside: str
) -> None:
    """A reply hangs; its deadline fires in the same loop step as a cancellation from
    outside (asked just before the deadline's, or just after it): the caller ends
    cancelled, as asyncio.timeout leaves it, not with the deadline's TimeoutError (the
    outside cancellation was swallowed before). Python 3.10 counts no cancellations:
    there the deadline's TimeoutError wins."""
    server = scripted("half-hang", "whole")
    pool, pipeline = _pipeline(server.url)
    loop = asyncio.get_running_loop()
    caller: asyncio.Task[Any] | None = None
    cancelled = []

    class Racing(Watchdog):  # cancels the caller in the step the deadline fires
        def _check(self) -> None:
            firing = self._task is caller and loop.time() >= self._due
            if firing and outside == "just before":
                cancelled.append(caller.cancel())  # type: ignore[union-attr]
            super()._check()
            if firing and outside == "with":
                cancelled.append(caller.cancel())  # type: ignore[union-attr]

    pipeline._watchdog = Racing()
    caller = asyncio.create_task(pipeline.call(("GET", "k")))
    expected = asyncio.CancelledError if COUNTS_CANCELS else TimeoutError
    with pytest.raises(expected):
        await caller
    assert cancelled == [True]
    assert server.connections == 1  # not sent again as a timed-out read is
    assert await pipeline.call(("GET", "k")) == VALUE  # the next call, on a new socket
    await pipeline.close()
    await pool.aclose()


async def test_a_caller_cancelled_mid_reply_leaves_nothing_for_the_next(scripted: Any) -> None:
    server = scripted("half-hang", "whole")
    pool, pipeline = _pipeline(server.url)
    first = asyncio.create_task(pipeline.call(("GET", "k")))
    assert await asyncio.to_thread(server.cut.wait, PATIENCE)  # half the reply is in
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await pipeline.call(("GET", "k")) == VALUE  # its own reply, on a new socket
    assert wire.lean(pipeline._connection)
    assert await asyncio.to_thread(server.closed_by_client.wait, PATIENCE)
    assert server.connections == 2
    await pipeline.close()
    await pool.aclose()


def test_a_connection_class_with_its_own_reading_is_served_by_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An override (Sentinel's failover checks, an instrumentation) is never skipped:
    its read_response serves every reply, and the log says the lean path is off."""
    reads: list[str] = []

    class Counted(redis.Connection):
        def read_response(self, *args: Any, **kwargs: Any) -> Any:
            reads.append("read")
            return super().read_response(*args, **kwargs)

    connection = Counted(host="127.0.0.1", port=free_port())
    with caplog.at_level("WARNING", logger="cached_aside"):
        assert not wire.lean(connection)
        assert not wire.lean(connection)
    assert [r.getMessage() for r in caplog.records].count(
        "the lean reply path is off: Counted reads or writes its own way; its methods "
        "serve every call"
    ) == 1
    assert wire.lean(redis.Connection(host="127.0.0.1", port=free_port())) == bool(
        redis.utils.HIREDIS_AVAILABLE
    )


def test_a_parser_that_sets_replies_aside_is_left_to_redis_py(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Some redis-py releases' hiredis parser keeps a reply that can_read() took
    (_next_response) for its read_response: reading past it would lose that reply."""

    class Plain(redis.Connection):  # redis-py's reading, a class of its own to decide
        pass

    connection = Plain(host="127.0.0.1", port=free_port())
    if not redis.utils.HIREDIS_AVAILABLE:
        assert not wire.lean(connection)
        return
    connection._parser._next_response = object()
    with caplog.at_level("WARNING", logger="cached_aside"):
        assert not wire.lean(connection)
    assert "hiredis parser can set a reply aside" in caplog.text


def test_the_memo_keeps_a_hits_command_not_a_stored_value() -> None:
    """A hot key's command is packed once; a store's command carries its value (and a
    token never sent twice): kept, a memo of 4096 commands held 4096 values (100 misses
    of 1 MiB values kept 100 MiB)."""
    memo = wire.Memo()
    connection = redis.Connection(host="127.0.0.1", port=free_port())
    hit = ("GET", "prefix:{item:1}")
    assert memo.joined(connection, hit) is memo.joined(connection, hit)
    assert memo.pack(connection, hit) is memo.pack(connection, hit)
    for token in range(3):
        store = ("EVALSHA", "0" * 40, 1, "prefix:{item:1}", str(token), os.urandom(1 << 20))
        assert memo.joined(connection, store) == b"".join(connection.pack_command(*store))
        assert b"".join(memo.pack(connection, store)) == b"".join(connection.pack_command(*store))
    kept = [*memo._joined.values(), *(b"".join(parts) for parts in memo._packed.values())]
    assert len(kept) == 2
    assert sum(map(len, kept)) < 1024


async def test_a_batch_whose_caller_is_cancelled_leaves_no_future_behind(
    scripted: Any, caplog: pytest.LogCaptureFixture
) -> None:
    server = scripted("half-hang", "whole")
    pool, pipeline = _pipeline(server.url)
    batch = asyncio.create_task(pipeline.call_many([("GET", "k"), ("GET", "k"), ("GET", "k")]))
    assert await asyncio.to_thread(server.cut.wait, PATIENCE)  # half the first reply is in
    batch.cancel()
    with pytest.raises(asyncio.CancelledError):
        await batch
    assert await pipeline.call(("GET", "k")) == VALUE  # its own reply, on a new socket
    await pipeline.close()
    await pool.aclose()
    gc.collect()  # a future failed after its caller left would log when collected
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


async def test_a_batch_cut_mid_reply_goes_out_once_more_whole_on_a_new_socket(
    scripted: Any,
) -> None:
    """A batch is one entry on the wire: its first reply came whole, its second was cut
    by a close; the whole batch goes out again on a new socket and every command gets
    its own reply (never the first socket's leftovers, never one reply twice)."""
    server = scripted("whole,half-close", "whole")
    pool, pipeline = _pipeline(server.url)
    assert await pipeline.call_many([("GET", "k")] * 3) == [VALUE] * 3
    assert server.connections == 2
    assert await pipeline.call_many([("GET", "k"), ("SET", "k", "v")]) == [VALUE, b"OK"]
    await pipeline.close()
    await pool.aclose()


async def test_a_batch_cut_twice_fails_each_of_its_commands(scripted: Any) -> None:
    server = scripted("whole,half-close")
    pool, pipeline = _pipeline(server.url)
    replies = await pipeline.call_many([("GET", "k")] * 3)
    assert len(replies) == 3
    assert all(isinstance(reply, ConnectionError) for reply in replies)  # none half read
    with pytest.raises(ConnectionError):
        await pipeline.call_many([("GET", "k")] * 2, raise_error=True)
    await pipeline.close()
    await pool.aclose()


# --- the same on uvloop's event loop ------------------------------------------------
# uvloop (the bench extra) gives the pipeline its own transports and timers: the
# pipeline's scenarios above run again on it, each in a loop of its own.

UVLOOP_SCENARIOS = [
    test_an_async_reply_cut_by_a_close_goes_out_once_more_on_a_new_socket,
    test_an_async_reply_cut_twice_fails_its_caller,
    test_an_async_reply_cut_by_a_hang_times_out_and_never_answers_another,
    test_a_caller_cancelled_mid_reply_leaves_nothing_for_the_next,
]


@pytest.mark.parametrize("scenario", UVLOOP_SCENARIOS, ids=lambda scenario: scenario.__name__)
def test_the_pipelines_scenarios_hold_on_uvloop(scripted: Any, scenario: Any) -> None:
    import uvloop

    uvloop.run(scenario(scripted))


def test_a_cancelled_batch_leaves_no_future_behind_on_uvloop(
    scripted: Any, caplog: pytest.LogCaptureFixture
) -> None:
    import uvloop

    uvloop.run(test_a_batch_whose_caller_is_cancelled_leaves_no_future_behind(scripted, caplog))


@needs_real_redis
def test_async_hits_ride_the_lean_wire_on_uvloop() -> None:
    import uvloop

    assert REDIS_URL is not None
    prefix = unique_prefix()
    engine = CacheEngine.from_url(REDIS_URL, prefix=prefix)
    loads: list[str] = []

    @cache_aside(key="uv:<id>", ttl=60, engine=engine)
    async def load(id: str) -> dict[str, str]:
        loads.append(id)
        return {"id": id}

    async def scenario() -> None:
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        for _ in range(50):
            assert await load("a") == {"id": "a"}
        pipeline = engine.sides.async_side().pipeline
        assert isinstance(pipeline, Pipeline)
        assert wire.lean(pipeline._connection)  # hits read straight off its stream
        await load.invalidate("a")
        assert await load("a") == {"id": "a"}
        await engine.aclose()

    try:
        uvloop.run(scenario())
        assert loads == ["a", "a"]  # once, and once more after the invalidation
    finally:
        cleanup = redis.Redis.from_url(REDIS_URL)
        delete_prefix(cleanup, prefix)
        cleanup.close()
