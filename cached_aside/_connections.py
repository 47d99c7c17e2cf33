"""Commands that skip the client's per-call machinery (dispatch, pool checkout and
release, response callbacks) but nothing of redis-py's connection: its connection
classes (TLS, auth, RESP parser), packing, and, on any failure, its client path
with its retries.

- Threads: each thread holds one connection of the client's pool between calls
  (HeldConnections); a command is packed once per key and sent as is.
- Event loops: the tasks of one loop share round trips (Pipeline): while one batch
  of commands is on the wire, the others queue, and go out together in one write as
  soon as the loop gets to them; a lone caller goes straight out. Replies come back
  in order on the one connection.

Only commands that answer at once come here; BLPOP (it blocks its connection),
pipelines and scans keep using the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import redis
from redis.exceptions import ConnectionError, InvalidResponse, RedisError, TimeoutError

from ._compat import (
    check_codec,
    connection_getter,
    connection_open_test,
    held_path_problem,
    warn_once,
)
from ._timeouts import Watchdog
from ._wire import UNREAD, Memo, drop_async, lean, read, read_async, write, write_async

# A thread may hold a connection while at least this share of the pool stays free:
# held connections never go back while their threads live.
HELD_SHARE = 0.5
_LOST = (ConnectionError, TimeoutError, OSError)  # the connection itself failed
# ...or its stream: a reply hiredis cannot parse leaves its reader refusing every
# later one (redis-py's read_response drops the connection then too).
_BROKEN = (*_LOST, InvalidResponse)
# A batch written on a held connection: the connection, and how its replies are read.
Sent = tuple[Any, Callable[[Any], Any]]


class _Held:
    """A thread's connection; goes back to its pool when the thread ends."""

    __slots__ = ("connection", "owner", "pool")

    def __init__(self, owner: HeldConnections, pool: Any, connection: Any) -> None:
        self.owner, self.pool, self.connection = owner, pool, connection

    def __del__(self) -> None:
        self.owner.held -= 1
        # Its socket closed here, at the thread's end, not left to whoever collects the
        # pool: with the connection in a reference cycle, a collection may finalize the
        # socket before the connection closes it (an unclosed-socket ResourceWarning,
        # seen on redis-py 8.1). The pool reconnects it for its next user.
        with contextlib.suppress(Exception):
            self.connection.disconnect()
        # Collected by a garbage collection that ran inside the pool, on a thread that
        # holds its lock (a plain Lock before redis-py 6): releasing now would wait for
        # that lock forever. The next thread to hold a connection takes this one.
        lock = getattr(self.pool, "_lock", None)
        if lock is not None and not lock.acquire(blocking=False):
            self.owner.returned.append(self.connection)
            return
        if lock is not None:
            lock.release()
        with contextlib.suppress(Exception):  # at thread or interpreter exit: nobody to tell
            self.pool.release(self.connection)


class HeldConnections:
    """One connection per thread, held between calls, for a sync client's pool.

    `call` returns the reply, or None when this path cannot serve the command (the
    caller then uses the client): no connection to spare, or the connection failed
    (redis-py closed it; the client's retry gets the next try).
    """

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.limit = max(1, int((getattr(pool, "max_connections", None) or 2**31) * HELD_SHARE))
        self.held = 0
        self.returned: deque[Any] = deque()  # held by threads gone, not yet back in the pool
        # Calls this path could not serve (the client served them): a silent
        # fallback shows here, and in the hit-path benchmark.
        self.fallbacks = 0
        kind = getattr(pool, "connection_class", None) or redis.Connection
        self.problem = held_path_problem(kind)
        if self.problem is not None:
            warn_once(self.problem)
            self.limit = 0  # never hold: the client serves every call
        self._connected = connection_open_test(kind)
        self._get_args = connection_getter(pool)
        check_codec()
        self._local = threading.local()
        self._memo = Memo()

    def call(self, args: tuple[Any, ...]) -> tuple[bool, Any]:
        """(True, reply) when answered here; (False, None) to use the client. An
        error reply raises, as redis-py's would."""
        held = getattr(self._local, "held", None)
        connection = held and held.connection
        # The hit: an open connection on the lean wire, one write and one read. Else
        # (first call, closed, another kind of connection) call_many's general way.
        if connection is None or connection._sock is None or not lean(connection):
            answered, replies = self.call_many([args], raise_error=True)
            return answered, replies[0] if answered else None
        try:
            write(connection, self._memo.joined(connection, args))
            return True, read(connection)
        except (*_LOST, AttributeError) as exc:  # as in call_many
            connection.disconnect()
            if isinstance(exc, TimeoutError | socket.timeout):
                raise
            self.fallbacks += 1
            return False, None
        except InvalidResponse:  # as in receive
            connection.disconnect()
            raise
        except Exception:  # an error reply: consumed, the stream is fine
            raise
        except BaseException:  # interrupted between the write and its reply
            connection.disconnect()
            raise

    def call_many(
        self, commands: list[tuple[Any, ...]], raise_error: bool = False
    ) -> tuple[bool, list[Any]]:
        """Several commands in one write: (True, replies in order, an error reply's
        exception in its place), or (False, []) to use the client's pipeline."""
        sent = self.send(commands)
        if sent is None:
            return False, []
        answered, replies = self.receive(sent, len(commands))
        if answered and raise_error:  # raised once every reply is read: in step
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
        return answered, replies

    def send(self, commands: list[tuple[Any, ...]]) -> Sent | None:
        """Write `commands` in one write on the thread's connection: what `receive`
        reads their replies with, or None to use the client (nothing was sent)."""
        held = getattr(self._local, "held", None)
        if held is None:
            held = self._hold()
            if held is None:
                self.fallbacks += 1
                return None
        connection = held.connection
        connecting = False
        try:
            # One write: redis-py's sync send_packed_command calls sendall() per item,
            # which made many() of 100 hits 100 system calls (1.3 ms against 0.9 ms).
            joined = [self._memo.batch(connection, commands)]
            if not self._connected(connection):
                # connect(), not send_packed_command's own reconnect, which goes back
                # to the old address: a Sentinel connection asks where the master is
                # now only in connect().
                connecting = True
                connection.connect()
                connecting = False
            if lean(connection):
                write(connection, joined[0])
                return connection, read
            connection.send_packed_command(joined, check_health=False)
            return connection, type(connection).read_response
        except (*_LOST, AttributeError) as exc:  # AttributeError: the pool closed it
            # Whatever is left unread would answer the next command: a new socket
            # (redis-py has usually closed it already). The client retries a socket
            # the server closed; not a timeout, nor a new connection that failed: the
            # server hangs or cannot be reached, and a retry would cost a caller twice.
            connection.disconnect()
            if connecting or isinstance(exc, TimeoutError | socket.timeout):
                raise
            self.fallbacks += 1
            return None
        except BaseException:
            # Interrupted mid-write: the same, and no retry.
            connection.disconnect()
            raise

    def receive(self, sent: Sent, count: int) -> tuple[bool, list[Any]]:
        """The replies of the `count` commands `send` wrote, as call_many's."""
        connection, reading = sent
        replies: list[Any] = []
        try:
            for _ in range(count):
                try:
                    replies.append(reading(connection))
                except _BROKEN:
                    raise
                except Exception as exc:  # an error reply: consumed, the stream is fine
                    replies.append(exc)
        except InvalidResponse:
            # A reply the reader could not parse: it refuses every later one, so the
            # socket goes (redis-py's read_response drops it too), and the caller fails.
            connection.disconnect()
            raise
        except (*_LOST, AttributeError) as exc:  # as in send
            connection.disconnect()
            if isinstance(exc, TimeoutError | socket.timeout):
                raise
            self.fallbacks += 1
            return False, []
        except BaseException:
            # Interrupted between a write and its replies: the same, and no retry.
            connection.disconnect()
            raise
        return True, replies

    def _hold(self) -> _Held | None:
        if self.held >= self.limit:
            return None
        self.held += 1
        try:
            try:
                connection = self.returned.popleft()
            except IndexError:
                connection = self.pool.get_connection(*self._get_args)
        except BaseException:
            self.held -= 1
            raise
        held = self._local.held = _Held(self, self.pool, connection)
        return held

    def reset_after_fork(self) -> None:
        """In a forked child: these connections are the parent's sockets."""
        self._local = threading.local()
        self.held = 0
        self.returned = deque()


# A Pipeline's entry: the packed command(s), the caller's future, and None for one
# call's command or the number of a batch's commands.
_Entry = tuple[list[bytes], "asyncio.Future[Any]", int | None]


def _abandon(futures: Iterable[asyncio.Future[Any]]) -> None:
    """Their caller is gone (cancelled, or raised on an earlier reply): each future is
    cancelled, or, if it already holds a failure, that failure is marked seen, which
    asyncio would otherwise log as never retrieved."""
    for future in futures:
        if not future.cancel() and not future.cancelled():
            future.exception()


class Pipeline:
    """The round trips of one event loop's tasks, shared on one connection.

    The first caller sends its command and reads replies; callers that come while
    it waits queue, and the reader sends them all in one write before its next
    read. When the first caller has its own reply and others still wait, a task
    takes over the reading, so no caller waits for more than its own batch. A
    failure of the connection fails what was on the wire (the callers fail open);
    what was only queued goes out on a new connection.
    """

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self._connection: Any = None
        self._memo = Memo()
        # What waits to go out, and what is out, in order: each entry the packed
        # command(s), the caller's future, and None for one call's command (the
        # future gets its reply) or the number of a batch's commands (it gets their
        # replies, an error reply's exception in its place).
        self._queued: list[_Entry] = []
        self._on_wire: deque[_Entry] = deque()
        self._retried: weakref.WeakSet[asyncio.Future[Any]] = weakref.WeakSet()
        self._reading = False
        self._reader: asyncio.Task[None] | None = None
        self._discarding: set[asyncio.Task[None]] = set()
        self._connecting: asyncio.Lock | None = None
        self._watchdog = Watchdog()
        check_codec()

    async def call(self, args: tuple[Any, ...]) -> Any:
        """The reply to one command (an error reply raises, as redis-py's would).
        call_many's way for one command, with nothing more than it needs: this is
        every async hit."""
        connection = self._connection or await self._connect()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queued.append((self._memo.pack(connection, args), future, None))
        if not self._reading:
            try:
                await self._lead(future)
            except BaseException:
                _abandon((future,))
                raise
        return await future

    async def call_many(
        self, commands: list[tuple[Any, ...]], raise_error: bool = False
    ) -> list[Any]:
        """Replies to several commands sent together, in order; an error reply's
        exception stands in its place (or raises, with `raise_error`)."""
        if not commands:
            return []
        connection = self._connection or await self._connect()
        # One entry, one future for the batch: its replies are read in one go, where
        # a future per command cost a callback, a set_result and an await per key.
        packed = [self._memo.batch(connection, commands)]
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queued.append((packed, future, len(commands)))
        try:
            if not self._reading:
                await self._lead(future)
            replies: list[Any] = await future
        except Exception as exc:  # the connection failed: each command's failure
            if raise_error:
                raise
            return [exc] * len(commands)
        except BaseException:
            _abandon((future,))
            raise
        if raise_error:
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
        return replies

    async def _lead(self, mine: asyncio.Future[Any]) -> None:
        """Read until `mine` has its reply; then, if others still wait, a task reads
        for them."""
        self._reading = True
        try:
            await self._read_until(mine)
        except BaseException:
            self._hand_over()
            raise
        if self._queued or self._on_wire:
            self._hand_over()
        else:
            self._reading = False

    async def _connect(self) -> Any:
        """The pipeline's one connection: taken from the pool once, by one caller at
        a time (others arriving meanwhile wait for it, never take another)."""
        if self._connection is None:
            if self._connecting is None:
                self._connecting = asyncio.Lock()
            async with self._connecting:
                if self._connection is None:
                    getter = connection_getter(self.pool)
                    self._connection = await self.pool.get_connection(*getter)
        return self._connection

    async def _read_until(self, mine: asyncio.Future[Any] | None) -> None:
        """Send what is queued and read replies, until `mine` has its reply (or,
        for the taking-over task, until nothing waits)."""
        while self._queued or self._on_wire:
            if mine is not None and mine.done():
                return
            try:
                connection = self._connection or await self._connect()
            except Exception as exc:  # Redis cannot be reached: all that waits fails
                self._fail_everything(exc)
                continue
            try:
                if self._queued:
                    batch, self._queued = self._queued, []
                    self._on_wire.extend(batch)
                    parts = (
                        batch[0][0]
                        if len(batch) == 1
                        else [part for packed, _, _ in batch for part in packed]
                    )
                    await write_async(connection, parts)
            except Exception as exc:  # nothing, or part, went out: all on the wire is lost
                await self._lost(connection, exc)
                continue
            except BaseException:
                self._drop(connection, ConnectionError("the writing task was cancelled"))
                raise
            # Every reply on the wire, each settling its caller in order, under one
            # deadline for them all kept by the pipeline's one Watchdog: redis-py sets a
            # timeout up and tears it down per reply (asyncio.timeout, per batch), a
            # tenth of what a reply costs. An error reply is its own caller's alone.
            watchdog = self._watchdog
            try:
                if connection.socket_timeout:
                    watchdog.bound(asyncio.get_running_loop(), connection.socket_timeout)
                straight = lean(connection)
                parser = connection._parser
                for _ in range(len(self._on_wire)):
                    # A call's entry takes one reply (an error reply its failure); a
                    # batch's `many`, each error reply in its place in a list.
                    many = self._on_wire[0][2]
                    replies: list[Any] | None = None if many is None else []
                    left = many or 1
                    while left:
                        left -= 1
                        try:
                            if straight:
                                # A reply already read whole needs no coroutine: the
                                # replies of tasks' hits, of a batch, come in one read.
                                # (The reader's gets() spelled out: a call more per hit.)
                                reply = parser._reader.gets() if parser._connected else UNREAD
                                if type(reply) is not bytes:
                                    reply = await read_async(connection, reply)
                            else:
                                reply = await connection.read_response(timeout=math.inf)
                        except _BROKEN:
                            raise
                        except Exception as exc:
                            reply = exc
                        if replies is not None:
                            replies.append(reply)
                    self._settle_first(reply if replies is None else replies)
            except _BROKEN as exc:  # what is still on the wire is retried or failed
                watchdog.unbound()
                await self._lost(connection, exc)
                continue
            except asyncio.CancelledError:
                deadline = watchdog.expired()
                watchdog.unbound()
                if deadline:
                    await self._lost(connection, TimeoutError("Timeout reading from socket"))
                    continue
                # Cancelled mid-read: where the stream stands is unknown. Drop it all.
                self._drop(connection, ConnectionError("the reading task was cancelled"))
                raise
            except BaseException:
                watchdog.unbound()
                self._drop(connection, ConnectionError("the reading task was cancelled"))
                raise
            watchdog.unbound()

    async def _lost(self, connection: Any, exc: Exception) -> None:
        """The connection failed: what it carried goes out once more on a new socket
        (every command sent this way is safe to repeat), as redis-py's one immediate
        retry would; failed again, it fails (and its caller fails open)."""
        # A timeout is not retried: the server hangs, and a caller would wait twice.
        hung = isinstance(exc, TimeoutError | asyncio.TimeoutError | socket.timeout)
        failure = exc if isinstance(exc, RedisError) else ConnectionError(str(exc))
        if hung and not isinstance(exc, RedisError):  # the wire's deadline: say so
            failure = TimeoutError("Timeout reading from socket")
        again = [
            entry
            for entry in self._on_wire
            if not hung and entry[1] not in self._retried and not entry[1].done()
        ]
        self._retried.update(future for _, future, _ in again)
        self._on_wire = deque(entry for entry in self._on_wire if entry not in again)
        self._fail_on_wire(failure)
        self._queued[:0] = again
        if connection is not None:
            # Its own socket again, not another pooled one: after a restart or a
            # CLIENT KILL the pool's idle connections are dead too.
            self._connection = connection
            await connection.disconnect(nowait=True)

    def _fail_everything(self, exc: Exception) -> None:
        failure = exc if isinstance(exc, RedisError) else ConnectionError(str(exc))
        self._on_wire.extend(self._queued)
        self._queued = []
        self._fail_on_wire(failure)

    def _settle_first(self, reply: Any) -> None:
        """The first entry's reply (a call's error reply raises in its caller; a
        batch's list holds each error in its place)."""
        _, future, _ = self._on_wire.popleft()
        if future.done():  # its caller was cancelled meanwhile: the reply goes unread
            return
        if type(reply) is bytes or not isinstance(reply, Exception):
            future.set_result(reply)
        else:
            future.set_exception(reply)

    def _fail_on_wire(self, exc: BaseException) -> None:
        """What the connection carried is lost (it failed, or the loop closes)."""
        self._connection = None
        while self._on_wire:
            _, future, _ = self._on_wire.popleft()
            if not future.done():
                future.set_exception(exc)

    def _drop(self, connection: Any, exc: BaseException) -> None:
        """Give up a connection that failed, or whose state is unknown: fail what it
        carried, and hand it back to its pool closed (it reconnects when next used)."""
        self._fail_on_wire(exc)
        if connection is not None:
            pool = self.pool

            async def discard() -> None:
                await drop_async(connection)
                await pool.release(connection)

            task = asyncio.get_running_loop().create_task(discard())
            self._discarding.add(task)  # a task nobody references can be collected
            task.add_done_callback(self._discarding.discard)

    def _hand_over(self) -> None:
        """Others still wait: a task reads for them."""
        if not (self._queued or self._on_wire):
            self._reading = False
            return
        self._reader = asyncio.get_running_loop().create_task(self._read_for_others())

    async def _read_for_others(self) -> None:
        try:
            await self._read_until(None)
        finally:
            self._reading = False
            if self._queued or self._on_wire:  # cancelled itself (loop shutdown)
                self._drop(self._connection, ConnectionError("the loop closed"))
                for _, future, _ in self._queued:
                    if not future.done():
                        future.set_exception(ConnectionError("the loop closed"))
                self._queued = []

    async def close(self) -> None:
        """Give the connection back (the loop is closing)."""
        self._watchdog.close()
        reader, self._reader = self._reader, None
        if reader is not None and not reader.done():
            reader.cancel()  # it drops (and hands back) the connection it reads from
            await asyncio.gather(reader, return_exceptions=True)
        if self._discarding:
            await asyncio.gather(*self._discarding, return_exceptions=True)
        connection, self._connection = self._connection, None
        if connection is not None:
            await self.pool.release(connection)
