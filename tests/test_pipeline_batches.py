"""The async Pipeline's batch entries (one entry and one future per call_many) under
random interleavings of calls, batches, cancellations at any await point and
connections killed mid-stream, against a real Redis: each caller gets exactly its own
replies (or fails), never another's, and no future's failure goes unretrieved. And a
reply the reader cannot parse: its connection goes, on the pipeline and on a thread's
held connection, instead of refusing every later reply."""

from __future__ import annotations

import asyncio
import gc
import socket
import threading
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis
import redis.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.exceptions import (
    ConnectionError,
    InvalidResponse,
    RedisError,
    ResponseError,
    TimeoutError,
)

from cached_aside._connections import HeldConnections, Pipeline
from tests.conftest import REDIS_URL, needs_real_redis

pytestmark = needs_real_redis

KEYS = 30
WRONG = -1  # the index of a key of the wrong type (a hash): GET answers an error


def _key(prefix: str, n: int) -> str:
    return f"{prefix}:hash" if n == WRONG else f"{prefix}:{n}"


def _value(prefix: str, n: int) -> bytes:
    return f"{prefix}:{n}".encode()


class NeverRetrieved:
    """Collects what the loop's exception handler is given (asyncio logs a failure
    never retrieved from a future through it when the future is collected)."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.seen.append(context)

    def messages(self) -> list[str]:
        return [str(context.get("message")) for context in self.seen]


async def _seed(prefix: str) -> None:
    assert REDIS_URL is not None
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    await client.mset({_key(prefix, n): _value(prefix, n) for n in range(KEYS)})
    await client.hset(_key(prefix, WRONG), "f", "v")
    await client.aclose()


def _cleanup(prefix: str) -> None:
    assert REDIS_URL is not None
    client = redis.Redis.from_url(REDIS_URL)
    client.delete(*[_key(prefix, n) for n in range(KEYS)], _key(prefix, WRONG))
    client.close()


def _check_call(prefix: str, n: int, outcome: Any) -> None:
    if isinstance(outcome, asyncio.CancelledError | ConnectionError | TimeoutError):
        return
    if n == WRONG:
        assert isinstance(outcome, ResponseError), outcome
    else:
        assert outcome == _value(prefix, n), (n, outcome)


def _check_batch(prefix: str, ns: list[int], raise_error: bool, outcome: Any) -> None:
    if isinstance(outcome, asyncio.CancelledError):
        return
    if raise_error:
        if isinstance(outcome, ConnectionError | TimeoutError):
            return
        if WRONG in ns:
            assert isinstance(outcome, ResponseError), outcome
            return
    assert isinstance(outcome, list), outcome
    assert len(outcome) == len(ns), (ns, outcome)
    failed = [isinstance(reply, ConnectionError | TimeoutError) for reply in outcome]
    # A connection's failure is every command's, never some of them.
    assert all(failed) or not any(failed), outcome
    if all(failed):
        return
    for n, reply in zip(ns, outcome, strict=True):
        _check_call(prefix, n, reply)


# One caller: ("call", key) or ("batch", keys, raise_error); then how many loop
# iterations the driver lets pass before it acts, and whether it cancels the caller or
# kills the pipeline's connection then.
operation = st.one_of(
    st.tuples(st.just("call"), st.integers(WRONG, KEYS - 1)),
    st.tuples(
        st.just("batch"),
        st.lists(st.integers(WRONG, KEYS - 1), min_size=0, max_size=40),
        st.booleans(),
    ),
)
step = st.tuples(
    operation,
    st.integers(0, 6),  # iterations before the next caller starts
    st.sampled_from(["none", "none", "cancel", "cancel-later", "kill"]),
)


async def _kill(pipeline: Pipeline) -> None:
    """Cut the pipeline's socket under it (as a CLIENT KILL or a restart would)."""
    connection = pipeline._connection
    writer = getattr(connection, "_writer", None)
    if writer is not None:
        writer.transport.abort()


async def _scenario(prefix: str, steps: list[Any], socket_timeout: float | None) -> None:
    assert REDIS_URL is not None
    client = redis.asyncio.Redis.from_url(REDIS_URL, socket_timeout=socket_timeout)
    pipeline = Pipeline(client.connection_pool)
    started: list[tuple[Any, asyncio.Task[Any]]] = []
    later: list[asyncio.Task[Any]] = []
    try:
        for op, pause, action in steps:
            if op[0] == "call":
                task = asyncio.ensure_future(pipeline.call(("GET", _key(prefix, op[1]))))
            else:
                commands = [("GET", _key(prefix, n)) for n in op[1]]
                task = asyncio.ensure_future(pipeline.call_many(commands, raise_error=op[2]))
            started.append((op, task))
            for _ in range(pause):
                await asyncio.sleep(0)
            if action == "cancel":
                task.cancel()
            elif action == "cancel-later":
                later.append(task)
            elif action == "kill":
                await _kill(pipeline)
        for _ in range(3):
            await asyncio.sleep(0)
        for task in later:
            task.cancel()
        outcomes = await asyncio.gather(*(t for _, t in started), return_exceptions=True)
        for (op, _), outcome in zip(started, outcomes, strict=True):
            if op[0] == "call":
                _check_call(prefix, op[1], outcome)
            else:
                _check_batch(prefix, op[1], op[2], outcome)
        # The stream is in step afterwards: a call and a batch get their own replies.
        assert await pipeline.call(("GET", _key(prefix, 3))) == _value(prefix, 3)
        assert await pipeline.call_many([("GET", _key(prefix, n)) for n in range(KEYS)]) == [
            _value(prefix, n) for n in range(KEYS)
        ]
    finally:
        await pipeline.close()
        await client.aclose()


def _run(
    prefix: str, steps: list[Any], socket_timeout: float | None, loop_factory: Callable[[], Any]
) -> NeverRetrieved:
    handler = NeverRetrieved()
    loop = loop_factory()
    loop.set_exception_handler(handler)
    try:
        loop.run_until_complete(_scenario(prefix, steps, socket_timeout))
        loop.run_until_complete(asyncio.sleep(0))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    gc.collect()
    return handler


def _loops() -> list[Any]:
    factories: list[Any] = [pytest.param(asyncio.new_event_loop, id="asyncio")]
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return factories
    return [*factories, pytest.param(uvloop.new_event_loop, id="uvloop")]


@pytest.fixture(scope="module")
def seeded() -> Any:
    prefix = f"review-{uuid.uuid4().hex[:10]}"
    asyncio.run(_seed(prefix))
    yield prefix
    _cleanup(prefix)


@pytest.mark.parametrize("loop_factory", _loops())
@settings(
    max_examples=75,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=st.lists(step, min_size=1, max_size=12))
def test_each_caller_gets_its_own_replies_whatever_the_interleaving(
    seeded: str, loop_factory: Any, steps: list[Any]
) -> None:
    handler = _run(seeded, steps, None, loop_factory)
    assert not [m for m in handler.messages() if "never retrieved" in m], handler.seen


def _cancel_when_settled(pipeline: Pipeline, victims: set[asyncio.Task[Any]]) -> None:
    """Cancel a waiting caller's task in the very step its entry is settled (as an
    asyncio.timeout around it, firing in the same loop iteration, would): the task
    wakes with a CancelledError while its future already holds its outcome. A victim
    is known by the future it waits on, whenever it got there (its connection may
    take any number of loop iterations to be made on a slow machine)."""
    settle = pipeline._settle_first

    def settle_then_cancel(reply: Any) -> None:
        entry = pipeline._on_wire[0]
        settle(reply)
        for task in [t for t in victims if t._fut_waiter is entry[1]]:  # type: ignore[attr-defined]
            victims.discard(task)
            task.cancel()

    pipeline._settle_first = settle_then_cancel  # type: ignore[method-assign]


@pytest.mark.parametrize("kind", ["call", "batch"])
async def test_a_caller_cancelled_as_its_error_reply_lands_leaves_no_failure_unretrieved(
    seeded: str, kind: str
) -> None:
    """A waiting caller (not the reader) whose future was just settled with its error
    reply and whose task is cancelled before it wakes: the caller gets the
    cancellation, nothing logs "Future exception was never retrieved" when the future
    is collected (the task's wake-up reads the failure; _abandon marks it for a
    leader, which waits on the read, not on its future), and the next call on the
    same connection gets its own reply."""
    assert REDIS_URL is not None
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    pipeline = Pipeline(client.connection_pool)
    handler = NeverRetrieved()
    asyncio.get_running_loop().set_exception_handler(handler)
    victims: set[asyncio.Task[Any]] = set()
    _cancel_when_settled(pipeline, victims)
    try:
        # The connection made first: else the waiter could still be connecting when
        # the leader's reply is read, and lead its own call.
        assert await pipeline.call(("GET", _key(seeded, 2))) == _value(seeded, 2)
        for _ in range(5):
            leader = asyncio.ensure_future(pipeline.call(("GET", _key(seeded, 1))))
            if kind == "call":
                waiter = asyncio.ensure_future(pipeline.call(("GET", _key(seeded, WRONG))))
            else:
                waiter = asyncio.ensure_future(
                    pipeline.call_many([("GET", _key(seeded, WRONG))], raise_error=True)
                )
            victims.add(waiter)
            assert await leader == _value(seeded, 1)
            with pytest.raises(asyncio.CancelledError):
                await waiter
            assert waiter not in victims  # cancelled by the hook, as its entry settled
            del waiter
            gc.collect()
            assert await pipeline.call(("GET", _key(seeded, 2))) == _value(seeded, 2)
        gc.collect()
        assert not [m for m in handler.messages() if "never retrieved" in m], handler.seen
    finally:
        asyncio.get_running_loop().set_exception_handler(None)
        await pipeline.close()
        await client.aclose()


BIG = 40  # keys with values of a few KiB: a batch's replies take several reads
BIG_VALUE = 3000


def _big_key(prefix: str, n: int) -> str:
    return f"{prefix}:big:{n}"


def _big_value(prefix: str, n: int) -> bytes:
    return (f"{prefix}:{n}:".encode() * BIG_VALUE)[:BIG_VALUE]


def _cut_stream_at(pipeline: Pipeline, reads: int, cuts: list[int]) -> None:
    """The pipeline's connection's stream ends (as a server's close would) at its
    `reads`-th read; cuts[0] counts the cuts made. After each cut the next socket is
    cut the same way while cuts[1] > 0 cuts remain."""
    connection = pipeline._connection
    stream = connection._parser._stream
    real = stream.read
    count = 0

    async def read(n: int = -1) -> bytes:
        nonlocal count
        count += 1
        if count == reads:
            cuts[0] += 1
            return b""
        return await real(n)

    stream.read = read


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    before=st.lists(st.integers(0, BIG - 1), max_size=4),
    batch=st.lists(st.integers(0, BIG - 1), min_size=1, max_size=BIG),
    after=st.lists(st.integers(0, BIG - 1), max_size=4),
    second=st.lists(st.integers(0, BIG - 1), max_size=BIG),
    cut_at=st.integers(1, 6),
    twice=st.booleans(),
)
def test_a_stream_cut_mid_batch_never_hands_a_reply_to_another(
    seeded_big: str,
    before: list[int],
    batch: list[int],
    after: list[int],
    second: list[int],
    cut_at: int,
    twice: bool,
) -> None:
    """Calls and batches written together, the stream cut at any of its reads: what
    was read whole was answered; what was not goes out once more on a new socket
    (a batch whole), its replies its own; cut twice, it fails: never a reply of
    another command, never part of a batch's replies."""
    prefix = seeded_big

    async def scenario() -> None:
        assert REDIS_URL is not None
        client = redis.asyncio.Redis.from_url(REDIS_URL)
        pipeline = Pipeline(client.connection_pool)
        cuts = [0]
        try:
            assert await pipeline.call(("PING",)) in (b"PONG", True)
            _cut_stream_at(pipeline, cut_at, cuts)
            if twice:
                lost = pipeline._lost

                async def lost_and_cut_again(connection: Any, exc: Exception) -> None:
                    await lost(connection, exc)
                    await connection.connect()
                    _cut_stream_at(pipeline, 1, cuts)

                pipeline._lost = lost_and_cut_again  # type: ignore[method-assign]
            work = [
                *(pipeline.call(("GET", _big_key(prefix, n))) for n in before),
                pipeline.call_many([("GET", _big_key(prefix, n)) for n in batch]),
                *(pipeline.call(("GET", _big_key(prefix, n))) for n in after),
                pipeline.call_many([("GET", _big_key(prefix, n)) for n in second]),
            ]
            outcomes = await asyncio.gather(*work, return_exceptions=True)
            if twice:
                pipeline._lost = lost  # type: ignore[method-assign]
            calls = [*before, *after]
            call_outcomes = [*outcomes[: len(before)], *outcomes[len(before) + 1 : -1]]
            for n, outcome in zip(calls, call_outcomes, strict=True):
                assert outcome == _big_value(prefix, n) or isinstance(outcome, ConnectionError), (
                    n,
                    outcome,
                )
                if not twice:
                    assert outcome == _big_value(prefix, n), (n, outcome)
            for ns, outcome in ((batch, outcomes[len(before)]), (second, outcomes[-1])):
                assert isinstance(outcome, list)
                assert len(outcome) == len(ns)
                if all(isinstance(reply, ConnectionError) for reply in outcome) and ns:
                    assert twice, outcome
                    continue
                assert outcome == [_big_value(prefix, n) for n in ns]
            assert await pipeline.call(("GET", _big_key(prefix, 0))) == _big_value(prefix, 0)
        finally:
            await pipeline.close()
            await client.aclose()

    asyncio.run(scenario())


@pytest.fixture(scope="module")
def seeded_big() -> Any:
    assert REDIS_URL is not None
    prefix = f"review-big-{uuid.uuid4().hex[:10]}"
    client = redis.Redis.from_url(REDIS_URL)
    client.mset({_big_key(prefix, n): _big_value(prefix, n) for n in range(BIG)})
    yield prefix
    client.delete(*[_big_key(prefix, n) for n in range(BIG)])
    client.close()


@pytest.mark.parametrize("raise_error", [False, True])
async def test_a_batch_hung_mid_reply_times_out_whole_and_a_call_behind_it_gets_its_own(
    raise_error: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """The server hangs half-way through a batch's third reply: at the deadline every
    command of the batch fails with the timeout (not retried: the server hangs), a
    call written behind it fails too, and a call made afterwards reads a new socket,
    never the hung one's half reply."""
    from tests.test_wire import VALUE, ScriptedServer, _pipeline

    server = ScriptedServer(["whole,whole,half-hang", "whole"])
    pool, pipeline = _pipeline(server.url)
    try:
        batch = asyncio.ensure_future(
            pipeline.call_many([("GET", "k")] * 5, raise_error=raise_error)
        )
        await asyncio.sleep(0)
        behind = asyncio.ensure_future(pipeline.call(("GET", "k")))
        (outcome, after) = await asyncio.gather(batch, behind, return_exceptions=True)
        if raise_error:
            assert isinstance(outcome, TimeoutError), outcome
        else:
            assert isinstance(outcome, list)
            assert len(outcome) == 5
            assert all(isinstance(reply, TimeoutError) for reply in outcome), outcome
        assert after == VALUE or isinstance(after, TimeoutError), after
        assert await pipeline.call_many([("GET", "k"), ("SET", "k", "v")]) == [VALUE, b"OK"]
        assert await pipeline.call(("GET", "k")) == VALUE
    finally:
        await pipeline.close()
        await pool.aclose()
        server.stop()
    gc.collect()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


class GarbleServer:
    """Answers GET <key> with the key's last byte, but GET of a key ending in "?" with
    bytes that are no RESP reply (a protocol error: hiredis's reader refuses it, and
    every reply after it, for good)."""

    def __init__(self) -> None:
        from tests.servers import free_port

        self.port = free_port()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        from tests.test_wire import ANSWERS, _commands

        buffer = bytearray()
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                    for args in _commands(buffer):
                        name = args[0].upper()
                        if name != b"GET":
                            conn.sendall(ANSWERS.get(name, b"+OK\r\n"))
                        elif args[1].endswith(b"?"):
                            conn.sendall(b"?garbled\r\n")
                        else:
                            conn.sendall(b"$1\r\n%s\r\n" % args[1][-1:])
                except OSError:
                    return

    def stop(self) -> None:
        self._listener.close()


async def test_a_garbled_reply_in_a_batch_never_poisons_the_connection_for_good() -> None:
    """A reply hiredis cannot parse leaves its reader in error for good: redis-py's
    read_response drops the connection then. The pipeline must too (the stream's
    place is lost), or every later caller on this loop gets InvalidResponse, for
    ever, and the replies the server did send are never read."""
    server = GarbleServer()
    pool = redis.asyncio.ConnectionPool.from_url(server.url, socket_timeout=5)
    pipeline = Pipeline(pool)
    try:
        replies = await pipeline.call_many([("GET", "a"), ("GET", "b?"), ("GET", "c")])
        assert len(replies) == 3
        assert replies[0] in (b"a", *[r for r in replies if isinstance(r, RedisError)])
        assert isinstance(replies[1], RedisError)
        assert await pipeline.call(("GET", "x")) == b"x"
        assert await pipeline.call_many([("GET", "d"), ("GET", "e")]) == [b"d", b"e"]
    finally:
        await pipeline.close()
        await pool.aclose()
        server.stop()


def test_a_garbled_reply_never_poisons_a_threads_held_connection() -> None:
    """The same on a sync held connection: the reply the reader cannot parse fails its
    caller, its socket goes, and the thread's next calls and batches read their own
    replies on a new one."""
    server = GarbleServer()
    pool = redis.ConnectionPool.from_url(server.url, socket_timeout=5)
    held = HeldConnections(pool)
    try:
        assert held.call(("GET", "a")) == (True, b"a")
        with pytest.raises(InvalidResponse):
            held.call(("GET", "b?"))
        assert held.call(("GET", "x")) == (True, b"x")
        with pytest.raises(InvalidResponse):
            held.call_many([("GET", "a"), ("GET", "b?"), ("GET", "c")])
        assert held.call_many([("GET", "d"), ("GET", "e")]) == (True, [b"d", b"e"])
        assert held.call(("GET", "y")) == (True, b"y")
    finally:
        pool.disconnect()
        server.stop()
