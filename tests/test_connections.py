"""The connection-level path (cached_aside/_connections.py) on its own: what it
shares, what it hands back, and that a reply can never answer another command,
whatever happens between a write and its reply; and an engine's blocking pool, which
queues callers instead of failing them."""

from __future__ import annotations

import asyncio
import builtins
import gc
import logging
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import fakeredis
import pytest
import redis
import redis.asyncio
from redis.exceptions import ConnectionError, ResponseError, TimeoutError

from cached_aside import CacheEngine, cache_aside
from cached_aside import _compat as connections
from cached_aside._connections import HeldConnections, Pipeline
from cached_aside._timeouts import Watchdog, timeout
from tests.conftest import REDIS_URL, delete_prefix, needs_real_redis, unique_prefix
from tests.injection import FAULTS, Abandon, counting_writes
from tests.servers import RedisProcess


@pytest.fixture
def prefix() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def async_client(backend: str, prefix: str) -> AsyncIterator[Any]:
    if backend == "redis":
        assert REDIS_URL is not None
        client: Any = redis.asyncio.Redis.from_url(REDIS_URL)
    else:
        client = fakeredis.FakeAsyncRedis()
    yield client
    await client.delete(*[key async for key in client.scan_iter(match=f"{prefix}:*")] or ["-"])
    await client.aclose()


@pytest.fixture
def sync_client(backend: str, prefix: str) -> Iterator[Any]:
    if backend == "redis":
        assert REDIS_URL is not None
        client: Any = redis.Redis.from_pool(
            redis.BlockingConnectionPool.from_url(REDIS_URL, max_connections=4)
        )
    else:
        client = fakeredis.FakeRedis()
        client.connection_pool.max_connections = 4
    yield client
    delete_prefix(client, prefix)
    client.close()


# --- the tasks of one event loop ---------------------------------------------


async def test_concurrent_tasks_share_round_trips(async_client: Any, prefix: str) -> None:
    keys = [f"{prefix}:{n}" for n in range(200)]
    await async_client.mset({key: key.encode() for key in keys})
    writes = counting_writes(async_client)
    # The first reply is held until the others have come: whether a reply takes a
    # loop iteration (a socket) or none (fakeredis on 3.12+) must not decide what
    # is counted.
    writes.hold_after = "GET"
    pipeline = Pipeline(async_client.connection_pool)

    calls = asyncio.gather(*(pipeline.call(("GET", key)) for key in keys))
    await asyncio.wait_for(writes.reached.wait(), 10)
    for _ in range(10_000):  # every other task runs once, and queues
        if len(pipeline._queued) == len(keys) - 1:
            break
        await asyncio.sleep(0)
    writes.resume.set()
    replies = await calls

    assert replies == [key.encode() for key in keys]
    # The first task goes out alone; the 199 that came while it waited go in one write.
    assert writes.ops == ["GET", "pipeline[GET]"], writes.ops
    await pipeline.close()


async def test_a_lone_caller_goes_straight_out(async_client: Any, prefix: str) -> None:
    await async_client.set(f"{prefix}:k", b"v")
    writes = counting_writes(async_client)
    pipeline = Pipeline(async_client.connection_pool)
    for _ in range(5):
        assert await pipeline.call(("GET", f"{prefix}:k")) == b"v"
    assert writes.ops == ["GET"] * 5
    await pipeline.close()


async def test_an_error_reply_fails_only_its_own_caller(async_client: Any, prefix: str) -> None:
    await async_client.hset(f"{prefix}:hash", "f", "v")
    await async_client.set(f"{prefix}:string", b"s")
    pipeline = Pipeline(async_client.connection_pool)
    calls = [("GET", f"{prefix}:string"), ("GET", f"{prefix}:hash")] * 10

    replies = await asyncio.gather(*(pipeline.call(c) for c in calls), return_exceptions=True)

    for call, reply in zip(calls, replies, strict=True):
        if call[1].endswith("hash"):
            assert isinstance(reply, ResponseError)
            assert "WRONGTYPE" in str(reply)
        else:
            assert reply == b"s"
    mixed = await pipeline.call_many(calls[:2])
    assert mixed[0] == b"s"
    assert isinstance(mixed[1], ResponseError)
    await pipeline.close()


async def test_calls_and_batches_sharing_the_wire_each_get_their_own_replies(
    async_client: Any, prefix: str
) -> None:
    """Tasks' calls and batches of different sizes queued together go out in one write
    and are read in order: each gets exactly its own replies, an error reply in its
    place (or raised, with raise_error, after the batch's every reply was read)."""
    keys = [f"{prefix}:{n}" for n in range(40)]
    await async_client.mset({key: key.encode() for key in keys})
    await async_client.hset(f"{prefix}:hash", "f", "v")
    pipeline = Pipeline(async_client.connection_pool)
    wrong = ("GET", f"{prefix}:hash")

    async def batch(size: int, start: int) -> list[Any]:
        chosen = [("GET", key) for key in keys[start : start + size]]
        return await pipeline.call_many([*chosen, wrong])

    for _ in range(3):
        work = [
            *(pipeline.call(("GET", key)) for key in keys[:10]),
            *(batch(size, start) for size, start in ((1, 0), (5, 3), (17, 20), (3, 37))),
            pipeline.call(wrong),
            pipeline.call_many([("GET", keys[0]), wrong, ("GET", keys[1])], raise_error=True),
        ]
        answers = await asyncio.gather(*work, return_exceptions=True)
        assert answers[:10] == [key.encode() for key in keys[:10]]
        for (size, start), got in zip(
            ((1, 0), (5, 3), (17, 20), (3, 37)), answers[10:14], strict=True
        ):
            assert got[:-1] == [key.encode() for key in keys[start : start + size]]
            assert isinstance(got[-1], ResponseError)
        assert isinstance(answers[14], ResponseError)
        assert isinstance(answers[15], ResponseError)
        assert await pipeline.call(("GET", keys[5])) == keys[5].encode()  # in step
    await pipeline.close()


async def test_a_cancelled_caller_never_lets_its_reply_answer_another(
    async_client: Any, prefix: str, backend: str
) -> None:
    await async_client.mset({f"{prefix}:a": b"a", f"{prefix}:b": b"b"})
    pipeline = Pipeline(async_client.connection_pool)
    for _ in range(20):
        first = asyncio.ensure_future(pipeline.call(("GET", f"{prefix}:a")))
        await asyncio.sleep(0)  # it has written and waits for its reply
        first.cancel()
        (outcome,) = await asyncio.gather(first, return_exceptions=True)
        if backend == "redis":  # (fakeredis answers before the task ever waits)
            assert isinstance(outcome, asyncio.CancelledError)
        else:
            assert outcome in (b"a",) or isinstance(outcome, asyncio.CancelledError)
        assert await pipeline.call(("GET", f"{prefix}:b")) == b"b"
    await pipeline.close()


async def test_a_caller_cancelled_while_others_wait_leaves_them_their_replies(
    async_client: Any, prefix: str, backend: str
) -> None:
    keys = [f"{prefix}:{n}" for n in range(50)]
    await async_client.mset({key: key.encode() for key in keys})
    pipeline = Pipeline(async_client.connection_pool)
    tasks = [asyncio.ensure_future(pipeline.call(("GET", key))) for key in keys]
    await asyncio.sleep(0)
    tasks[0].cancel()  # the task reading for the others
    tasks[25].cancel()  # one only queued
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for key, result in zip(keys, results, strict=True):
        # Each answer is its own key's, or a failure (the caller fails open): never
        # another key's value.
        assert result == key.encode() or isinstance(result, BaseException), (key, result)
    if backend == "redis":  # (fakeredis answers before a task ever waits)
        assert isinstance(results[0], asyncio.CancelledError)
        assert isinstance(results[25], asyncio.CancelledError)
        # Only the first was on the wire: the queued ones go out on a new socket.
        assert sum(result == key.encode() for key, result in zip(keys, results, strict=True)) == 48
    assert await pipeline.call(("GET", keys[7])) == keys[7].encode()
    await pipeline.close()


async def test_fakeredis_streams_keep_their_connection(prefix: str) -> None:
    """fakeredis's stream writer is not asyncio's: its writes take redis-py's way,
    and the connection is never taken for lost."""
    client = fakeredis.FakeAsyncRedis()
    await client.set(f"{prefix}:k", b"v")
    pipeline = Pipeline(client.connection_pool)
    lost: list[BaseException] = []
    real_lost = pipeline._lost

    async def spy(connection: Any, exc: Exception) -> None:
        lost.append(exc)
        await real_lost(connection, exc)

    pipeline._lost = spy  # type: ignore[method-assign]
    for _ in range(10):
        assert await pipeline.call(("GET", f"{prefix}:k")) == b"v"
    assert lost == []
    await pipeline.close()
    await client.aclose()


@needs_real_redis
async def test_a_killed_connection_is_tried_once_more_on_a_new_socket(prefix: str) -> None:
    assert REDIS_URL is not None
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    admin = redis.Redis.from_url(REDIS_URL)
    try:
        await client.set(f"{prefix}:k", b"v")
        pipeline = Pipeline(client.connection_pool)
        name = f"{prefix}-pipeline"
        await pipeline.call(("CLIENT", "SETNAME", name))
        for _ in range(3):
            ids = [c["id"] for c in admin.client_list() if c.get("name") == name]
            assert len(ids) == 1
            admin.client_kill_filter(_id=ids[0])
            # The write may still succeed on the dead socket; the read fails; the
            # command goes out again on a new one, which the caller never notices.
            assert await pipeline.call(("GET", f"{prefix}:k")) == b"v"
            await pipeline.call(("CLIENT", "SETNAME", name))
        await pipeline.close()
    finally:
        await client.delete(f"{prefix}:k")
        await client.aclose()
        admin.close()


@needs_real_redis
async def test_a_write_that_cannot_drain_times_out_and_drops_the_socket() -> None:
    """A paused server stops reading: once the socket's buffers fill, the write waits,
    bounded by the socket timeout as redis-py's own writes are."""
    server = RedisProcess().start()
    client = redis.asyncio.Redis.from_url(server.url, socket_timeout=0.3)
    try:
        pipeline = Pipeline(client.connection_pool)
        assert await pipeline.call(("PING",)) in (b"PONG", True)
        server.pause()
        big = b"x" * (64 << 20)  # more than the kernel buffers hold
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises((TimeoutError, ConnectionError)):
            await pipeline.call(("SET", "big", big))
        assert loop.time() - started < 5
        server.resume()
        assert await pipeline.call(("GET", "nothing-here")) is None
        await pipeline.close()
    finally:
        server.resume()
        await client.aclose()
        server.stop()


@needs_real_redis
def test_a_held_write_that_cannot_drain_times_out_and_drops_the_socket() -> None:
    """The same for a thread's held connection: the write gives up after the socket
    timeout, a TimeoutError as redis-py's, and the next call has a new socket."""
    server = RedisProcess().start()
    pool = redis.BlockingConnectionPool.from_url(server.url, socket_timeout=0.3)
    try:
        held = HeldConnections(pool)
        assert held.call(("PING",))[1] in (b"PONG", True)
        first = held._local.held.connection._sock
        server.pause()
        big = b"x" * (64 << 20)  # more than the kernel buffers hold
        with pytest.raises(TimeoutError):
            held.call(("SET", "big", big))
        server.resume()
        assert held.call(("GET", "nothing-here")) == (True, None)
        assert held._local.held.connection._sock is not first
    finally:
        server.resume()
        pool.disconnect()
        server.stop()


async def test_close_hands_the_connection_back(async_client: Any, prefix: str) -> None:
    pool = async_client.connection_pool
    pipeline = Pipeline(pool)
    await pipeline.call(("GET", f"{prefix}:k"))
    assert len(pool._in_use_connections) == 1
    await pipeline.close()
    assert len(pool._in_use_connections) == 0


# --- threads --------------------------------------------------------------------


def test_a_thread_holds_one_connection(sync_client: Any, prefix: str) -> None:
    sync_client.set(f"{prefix}:k", b"v")
    writes = counting_writes(sync_client)
    held = HeldConnections(sync_client.connection_pool)
    for _ in range(5):
        assert held.call(("GET", f"{prefix}:k")) == (True, b"v")
    assert writes.ops == ["GET"] * 5
    assert held.held == 1


def test_a_thread_that_ends_closes_its_connections_socket_and_gives_it_back(
    sync_client: Any, prefix: str
) -> None:
    """Closed at the thread's end, not left for the collector to finalize after the
    pool goes (a ResourceWarning on redis-py 8.1); the pool reconnects it."""
    sync_client.set(f"{prefix}:k", b"v")
    pool = sync_client.connection_pool
    held = HeldConnections(pool)
    kept: list[Any] = []

    def call() -> None:
        assert held.call(("GET", f"{prefix}:k")) == (True, b"v")
        kept.append(held._local.held.connection)

    thread = threading.Thread(target=call)
    thread.start()
    thread.join()
    del thread
    gc.collect()
    (connection,) = kept
    assert held.held == 0
    assert connection._sock is None  # closed, by us
    queue = getattr(pool, "pool", None)  # a BlockingConnectionPool's free ones
    free = list(queue.queue) if queue is not None else pool._available_connections
    assert connection in free  # and back in the pool
    assert held.call(("GET", f"{prefix}:k")) == (True, b"v")  # reconnected for the next


def test_threads_hold_at_most_half_the_pool(sync_client: Any, prefix: str) -> None:
    held = HeldConnections(sync_client.connection_pool)  # a pool of 4: 2 may be held
    answers: list[tuple[bool, Any]] = []
    barrier = threading.Barrier(3)
    done = threading.Event()

    def call() -> None:
        answers.append(held.call(("GET", f"{prefix}:k")))
        barrier.wait()
        done.wait()  # the thread (and the connection it holds) lives on

    threads = [threading.Thread(target=call) for _ in range(3)]
    for thread in threads:
        thread.start()
        thread.join(0.2)
    try:
        assert sorted(answer[0] for answer in answers) == [False, True, True]
        assert held.held == 2
    finally:
        done.set()
        for thread in threads:
            thread.join()
    del threads

    gc.collect()
    assert held.held == 0  # threads ended: their connections went back


def test_an_error_reply_raises_and_the_stream_stays_usable(sync_client: Any, prefix: str) -> None:
    sync_client.hset(f"{prefix}:hash", "f", "v")
    sync_client.set(f"{prefix}:string", b"s")
    held = HeldConnections(sync_client.connection_pool)
    with pytest.raises(ResponseError):
        held.call_many([("GET", f"{prefix}:hash"), ("GET", f"{prefix}:string")], raise_error=True)
    assert held.call(("GET", f"{prefix}:string")) == (True, b"s")
    answered, replies = held.call_many([("GET", f"{prefix}:hash"), ("GET", f"{prefix}:string")])
    assert answered
    assert isinstance(replies[0], ResponseError)
    assert replies[1] == b"s"


@pytest.mark.parametrize("fault", [f for f in FAULTS if f.after], ids=lambda f: f.name)
def test_a_reply_lost_between_write_and_read_never_answers_the_next_command(
    sync_client: Any, prefix: str, fault: Any
) -> None:
    sync_client.mset({f"{prefix}:a": b"a", f"{prefix}:b": b"b"})
    held = HeldConnections(sync_client.connection_pool)
    held.call(("GET", f"{prefix}:a"))
    injector = counting_writes(sync_client)
    injector.arm({0: fault})
    if fault.redis_error:  # a lost reply is a timeout: raised, not retried through the
        # client (the server may hang: a retry would cost the caller a second timeout)
        with pytest.raises(redis.TimeoutError):
            held.call(("GET", f"{prefix}:a"))
    else:  # an interrupt propagates, with no retry
        with pytest.raises(Abandon):
            held.call(("GET", f"{prefix}:a"))
    injector.disarm()
    assert held.call(("GET", f"{prefix}:b")) == (True, b"b")


@needs_real_redis
def test_a_killed_held_connection_falls_back_then_reconnects(prefix: str) -> None:
    assert REDIS_URL is not None
    client = redis.Redis.from_url(REDIS_URL)
    admin = redis.Redis.from_url(REDIS_URL)
    try:
        client.set(f"{prefix}:k", b"v")
        held = HeldConnections(client.connection_pool)
        name = f"{prefix}-held"
        assert held.call(("CLIENT", "SETNAME", name))[0]
        ids = [c["id"] for c in admin.client_list() if c.get("name") == name]
        admin.client_kill_filter(_id=ids[0])
        assert held.call(("GET", f"{prefix}:k")) == (False, None)  # the client retries it
        assert held.call(("GET", f"{prefix}:k")) == (True, b"v")  # a new socket
    finally:
        client.delete(f"{prefix}:k")
        client.close()
        admin.close()


# --- the hot path never switches itself off silently ---------------------------


@needs_real_redis
def test_a_hit_takes_the_held_connection_on_this_redis_py(
    prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Built as the docs say (from_url): every hit is answered on the thread's held
    connection, none by the client's slower path. A redis-py whose connections lack
    what the path needs (is_connected before 8.0, get_connection's command name
    before 5.3) shows here as hits served by the client."""
    assert REDIS_URL is not None
    answered: list[bool] = []
    call = HeldConnections.call

    def counted(self: HeldConnections, args: tuple[Any, ...]) -> tuple[bool, Any]:
        result = call(self, args)
        answered.append(result[0])
        return result

    monkeypatch.setattr(HeldConnections, "call", counted)
    engine = CacheEngine.from_url(REDIS_URL, prefix=prefix)
    try:
        read = cache_aside(key="item:<n>", ttl=30, engine=engine)(lambda n: {"n": n})
        assert read(1) == {"n": 1}  # the miss: load and store
        answered.clear()
        for _ in range(100):
            assert read(1) == {"n": 1}
        assert read.stats().hits == 100
        assert answered.count(True) == 100, f"{answered.count(False)} of 100 took the client"
        held = engine.sides.sync_side().held
        assert held is not None
        assert (held.problem, held.fallbacks) == (None, 0)
    finally:
        delete_prefix(engine.client(), prefix)
        engine.close()


def test_a_connection_class_the_path_cannot_drive_is_reported_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connections, "_warned", set())

    class Foreign:  # no is_connected, not one of redis-py's connections
        def pack_command(self, *args: Any) -> list[bytes]:
            raise AssertionError("never used")

        send_packed_command = read_response = connect = disconnect = pack_command

    pool = redis.ConnectionPool(connection_class=Foreign)
    with caplog.at_level(logging.WARNING, logger="cached_aside"):
        first, second = HeldConnections(pool), HeldConnections(pool)
    assert first.problem is not None
    assert f"redis-py {redis.__version__}" in first.problem
    assert "is_connected" in first.problem
    assert "pip install" in first.problem
    assert first.call(("GET", "k")) == (False, None)  # the client serves it
    assert second.fallbacks == 0
    assert [r.getMessage() for r in caplog.records].count(
        f"the held-connection hot path is off: {first.problem}"
    ) == 1


@needs_real_redis
def test_a_held_connection_collected_inside_its_pool_never_waits_for_the_pools_lock(
    prefix: str,
) -> None:
    """A thread's held connection can be collected by a garbage collection that runs
    while this thread is inside the pool, holding its lock (redis-py before 6 uses a
    plain Lock: this deadlocked): it is handed to the next thread to hold one."""
    assert REDIS_URL is not None
    raw = redis.Redis.from_url(REDIS_URL)
    client = redis.Redis.from_url(REDIS_URL)
    client.connection_pool._lock = threading.Lock()  # as redis-py 5.x has it
    raw.set(f"{prefix}:k", b"v")
    held = HeldConnections(client.connection_pool)
    done = threading.Event()

    def in_a_thread() -> None:
        assert held.call(("GET", f"{prefix}:k")) == (True, b"v")
        cycle: list[Any] = [held._local.held]
        cycle.append(cycle)  # only a garbage collection frees it now

    worker = threading.Thread(target=in_a_thread)
    worker.start()
    worker.join()
    assert held.held == 1

    def collect_inside_the_pool() -> None:
        with client.connection_pool._lock:
            gc.collect()
        done.set()

    threading.Thread(target=collect_inside_the_pool, daemon=True).start()
    try:
        assert done.wait(10), "the collection waited for the pool's lock"
        assert (held.held, len(held.returned)) == (0, 1)
        assert held.call(("GET", f"{prefix}:k")) == (True, b"v")
        assert not held.returned  # taken by the next hold
        client.close()
    finally:
        raw.delete(f"{prefix}:k")
        raw.close()


# --- asyncio.timeout, and its stand-in on Python 3.10 ----------------------------


async def test_the_deadline_leaves_the_block_as_a_timeout_error_an_oserror() -> None:
    started = asyncio.get_running_loop().time()
    with pytest.raises(builtins.TimeoutError) as raised:  # not redis-py's TimeoutError
        async with timeout(0.05):
            await asyncio.sleep(30)  # only the deadline ends it
    assert isinstance(raised.value, OSError)  # what the pipeline's _LOST catches
    assert isinstance(raised.value, asyncio.TimeoutError)
    assert asyncio.get_running_loop().time() - started < 30


async def test_a_cancellation_from_outside_stays_a_cancellation() -> None:
    entered = asyncio.Event()

    async def guarded() -> None:
        async with timeout(30):
            entered.set()
            await asyncio.sleep(30)

    task = asyncio.ensure_future(guarded())
    await asyncio.wait_for(entered.wait(), 10)
    task.cancel()
    (outcome,) = await asyncio.gather(task, return_exceptions=True)
    assert isinstance(outcome, asyncio.CancelledError)


# --- the pipeline's Watchdog: one timer for a stream of bounded waits -------------


async def test_the_watchdog_cancels_a_wait_past_its_deadline_and_says_it_did() -> None:
    loop = asyncio.get_running_loop()
    watchdog = Watchdog()
    never: asyncio.Future[None] = loop.create_future()
    watchdog.bound(loop, 0.01)
    with pytest.raises(asyncio.CancelledError):
        await never  # only the deadline ends it
    assert watchdog.expired()
    assert not watchdog.expired()  # told once
    task = asyncio.current_task()
    assert task is not None
    if sys.version_info >= (3, 11):
        assert task.cancelling() == 0  # uncancelled: the task is not left cancelling
    watchdog.unbound()


async def test_the_watchdog_arms_one_timer_for_many_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    armed: list[float] = []
    call_at = loop.call_at

    def counting(when: float, callback: Any, *args: Any) -> asyncio.TimerHandle:
        armed.append(when)
        return call_at(when, callback, *args)

    monkeypatch.setattr(loop, "call_at", counting)
    watchdog = Watchdog()
    for _ in range(1000):  # back-to-back waits, each well inside its deadline
        watchdog.bound(loop, 60)
        await asyncio.sleep(0)
        watchdog.unbound()
    assert len(armed) == 1  # asyncio.timeout would have armed 1,000
    watchdog.bound(loop, 0.5)  # a shorter deadline than the armed timer's: re-armed
    assert len(armed) == 2
    assert armed[1] < armed[0]
    watchdog.close()


async def test_a_wait_cancelled_from_outside_is_no_timeout() -> None:
    loop = asyncio.get_running_loop()
    watchdog = Watchdog()
    entered = asyncio.Event()
    seen: list[bool] = []

    async def bounded() -> None:
        watchdog.bound(loop, 60)
        try:
            entered.set()
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            seen.append(watchdog.expired())
            raise
        finally:
            watchdog.unbound()

    task = asyncio.ensure_future(bounded())
    await asyncio.wait_for(entered.wait(), 10)
    task.cancel()
    (outcome,) = await asyncio.gather(task, return_exceptions=True)
    assert isinstance(outcome, asyncio.CancelledError)
    assert seen == [False]
    watchdog.close()


async def test_a_wait_that_ended_before_its_deadline_is_never_cancelled() -> None:
    loop = asyncio.get_running_loop()
    watchdog = Watchdog()
    watchdog.bound(loop, 0.01)
    watchdog.unbound()  # the wait ended in time; the timer still fires later
    await asyncio.sleep(0.05)  # past the deadline: the timer lapses, cancelling nothing
    await asyncio.sleep(0)  # would raise CancelledError had the task been cancelled
    assert not watchdog.expired()


def test_msgpacks_pure_python_fallback_is_reported_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import msgpack

    assert connections.msgpack_problem() is None  # this environment's is compiled
    monkeypatch.setattr(connections, "_warned", set())
    fallback = type("Packer", (), {"__module__": "msgpack.fallback"})  # as pip left it
    monkeypatch.setattr(msgpack, "Packer", fallback)
    with caplog.at_level(logging.WARNING, logger="cached_aside"):
        HeldConnections(redis.ConnectionPool())
        Pipeline(redis.asyncio.ConnectionPool())
    warned = [r.getMessage() for r in caplog.records if "pure-Python" in r.getMessage()]
    assert len(warned) == 1, warned
    assert "pip install" in warned[0]


async def test_pool_queues_instead_of_failing(redis_url_or_skip: str) -> None:
    prefix = unique_prefix()
    engine = CacheEngine.from_url(redis_url_or_skip, prefix=prefix, max_connections=4)

    @cache_aside(key="pool:<id>", ttl=30, engine=engine)
    async def load(id: int) -> int:
        await asyncio.sleep(0.01)
        return id

    try:
        results = await asyncio.gather(*(load(i) for i in range(500)))
        assert results == list(range(500))
        assert engine.async_client().connection_pool.max_connections == 4
    finally:
        await engine.aclose()
        cleanup = redis.Redis.from_url(redis_url_or_skip)
        delete_prefix(cleanup, prefix)
        cleanup.close()
