"""Replies parsed by hiredis straight off an established redis-py connection (its
socket for threads, its stream for event loops), and commands written straight to
the socket or stream: the per-call layers of redis-py (read_response, its parser's
wrappers, send_packed_command) skipped, everything once per connection (connect,
TLS, AUTH, HELLO) left to redis-py. Commands are packed once per key (Memo).

A connection this cannot drive (no hiredis, another parser, a class that reads or
writes its own way, such as Sentinel's or an instrumented one) goes through its own
methods, and the log says so once. The caller drops the connection on any failure
raised here but an error reply (a RedisError that is no ConnectionError).
"""

from __future__ import annotations

import asyncio
import importlib
from typing import Any

import redis
import redis.asyncio
from redis import exceptions

from ._compat import warn_once
from ._timeouts import timeout as _timeout


def _module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:  # hiredis not installed, or a redis-py without this parser
        return None


_hiredis = _module("hiredis")
_parsers = _module("redis._parsers.hiredis")
# What the parsers' reader returns while a reply is incomplete (redis-py 5.0.1 on).
_NOT_ENOUGH_DATA: Any = getattr(_parsers, "NOT_ENOUGH_DATA", None)


class _NoPush:
    """Stands for hiredis's push frame type where it has none (before hiredis 3.2)."""


# RESP3 push frames, which may come before a reply.
_PUSH: Any = getattr(_hiredis, "PushNotification", None) or _NoPush
_CLOSED = "Connection closed by server."
# What this module uses of a parser that its __init__ sets (the others its
# on_connect sets: _sock, _reader, and the async one's _connected).
_SYNC_PARTS = ("_buffer", "handle_push_response")
_ASYNC_PARTS = ("_stream", "_read_size", "handle_push_response")

# Commands packed per key are kept up to this many; then the memo starts over.
PACKED_MEMO_SIZE = 4096
# ...and only those up to this size: a hit's command is a few dozen bytes, while a
# store's carries its value (and a token never sent twice), kept for nothing.
PACKED_MEMO_BYTES = 1024
# (connection class, parser class) -> whether this module reads its replies.
_decided: dict[tuple[type, type], bool] = {}


class Memo:
    """Packed commands by their arguments: a hot key's command is packed once."""

    __slots__ = ("_joined", "_packed")

    def __init__(self) -> None:
        self._packed: dict[tuple[Any, ...], list[bytes]] = {}
        self._joined: dict[tuple[Any, ...], bytes] = {}

    def batch(self, connection: Any, commands: list[tuple[Any, ...]]) -> bytes:
        """Several commands as one write; those packed before without a call each."""
        known = self._joined.get
        return b"".join([known(args) or self.joined(connection, args) for args in commands])

    def joined(self, connection: Any, args: tuple[Any, ...]) -> bytes:
        """The command as one write."""
        joined = self._joined.get(args)
        if joined is None:
            joined = b"".join(connection.pack_command(*args))
            if len(joined) <= PACKED_MEMO_BYTES:
                if len(self._joined) >= PACKED_MEMO_SIZE:
                    self._joined.clear()
                self._joined[args] = joined
        return joined

    def pack(self, connection: Any, args: tuple[Any, ...]) -> list[bytes]:
        packed = self._packed.get(args)
        if packed is None:
            packed = connection.pack_command(*args)
            if sum(map(len, packed)) <= PACKED_MEMO_BYTES:
                if len(self._packed) >= PACKED_MEMO_SIZE:
                    self._packed.clear()
                self._packed[args] = packed
        return packed


def lean(connection: Any) -> bool:
    """Whether this module may read (and, for a sync one, write) on `connection`;
    decided once per connection and parser class."""
    try:
        return _decided[connection.__class__, connection._parser.__class__]
    except (KeyError, AttributeError):
        known = _decided[type(connection), type(getattr(connection, "_parser", None))] = _decide(
            connection
        )
        return known


def _decide(connection: Any) -> bool:
    """Only redis-py's own reading and writing over hiredis's reader may be skipped:
    an override (Sentinel's failover checks, a test's hooks) must run."""
    kind, parser = type(connection), getattr(connection, "_parser", None)
    if isinstance(connection, redis.asyncio.connection.AbstractConnection):
        base: Any = redis.asyncio.connection.AbstractConnection
        parser_kind = getattr(_parsers, "_AsyncHiredisParser", None)
        parts: tuple[str, ...] = _ASYNC_PARTS
        names: tuple[str, ...] = ("read_response",)  # write_async checks its stream
    else:
        base = redis.connection.AbstractConnection
        parser_kind, parts = getattr(_parsers, "_HiredisParser", None), _SYNC_PARTS
        names = ("read_response", "send_packed_command")
    if _hiredis is None or _NOT_ENOUGH_DATA is None or parser_kind is None:
        problem = (
            "hiredis is not installed: replies are parsed by redis-py's pure-Python "
            "parser (pip install hiredis)"
        )
    elif type(parser) is not parser_kind:
        problem = f"{kind.__name__} parses with {type(parser).__name__}, not hiredis's reader"
    elif not all(hasattr(parser, part) for part in parts):
        missing = ", ".join(part for part in parts if not hasattr(parser, part))
        problem = (
            f"redis-py {redis.__version__}'s {type(parser).__name__} has no {missing}, "
            "which the lean path reads"
        )
    elif any(getattr(kind, name, None) is not getattr(base, name) for name in names):
        problem = f"{kind.__name__} reads or writes its own way; its methods serve every call"
    elif hasattr(parser, "_next_response"):
        # Some redis-py releases' parser sets a reply aside in can_read(), for its
        # read_response to return next: reading past it would lose that reply.
        problem = (
            f"redis-py {redis.__version__}'s hiredis parser can set a reply aside; "
            "its read_response serves every call"
        )
    else:
        return True
    warn_once(problem, "the lean reply path is off")
    return False


def write(connection: Any, data: bytes) -> None:
    """Send `data` on a sync connection's socket (connected), as redis-py would."""
    try:
        connection._sock.sendall(data)
    except OSError as exc:
        raise _socket_failure(exc, "writing to") from exc


def _socket_failure(exc: OSError, doing: str) -> exceptions.RedisError:
    """redis-py's error for a failed socket call: a TimeoutError when socket_timeout
    elapsed (no errno), else a ConnectionError (with an errno, the OS gave up)."""
    if isinstance(exc, TimeoutError) and exc.errno is None:
        return exceptions.TimeoutError(f"Timeout {doing} socket")
    return exceptions.ConnectionError(f"Error while {doing} socket: {exc}")


def read(connection: Any) -> Any:
    """The next reply on a sync connection; an error reply raises, as redis-py's
    read_response would."""
    parser = connection._parser
    reader = parser._reader
    if reader is None:  # disconnected meanwhile
        raise exceptions.ConnectionError(_CLOSED)
    while True:
        reply = reader.gets()
        if reply is _NOT_ENOUGH_DATA:
            buffer = parser._buffer
            try:
                count = parser._sock.recv_into(buffer)
            except OSError as exc:
                raise _socket_failure(exc, "reading from") from exc
            if not count:
                raise exceptions.ConnectionError(_CLOSED)
            reader.feed(buffer, 0, count)
        elif type(reply) is _PUSH:  # RESP3 push before the reply: its handler, as redis-py's
            parser.handle_push_response(reply)
        elif type(reply) is bytes:
            return reply
        else:
            return _checked(reply)


UNREAD: Any = object()  # read_async's reply when its caller has not asked the reader


async def read_async(connection: Any, reply: Any = UNREAD) -> Any:
    """The next reply on an asyncio connection (no deadline of its own: the caller
    bounds it); an error reply raises. `reply`: what the caller's own
    `connection._parser._reader.gets()` gave while connected (a reply already read
    whole needs no coroutine: Pipeline takes those itself), else UNREAD."""
    parser = connection._parser
    if not parser._connected:
        raise exceptions.ConnectionError(_CLOSED)
    reader = parser._reader
    if reply is UNREAD:
        reply = reader.gets()
    while True:
        if reply is _NOT_ENOUGH_DATA:
            data = await parser._stream.read(parser._read_size)
            if not data:
                raise exceptions.ConnectionError(_CLOSED)
            reader.feed(data)
        elif type(reply) is _PUSH:
            await parser.handle_push_response(reply)
        elif type(reply) is bytes:
            return reply
        else:
            return _checked(reply)
        reply = reader.gets()


async def write_async(connection: Any, parts: list[bytes]) -> None:
    """Hand the bytes to the connection's stream. redis-py's send_packed_command
    wraps every write in asyncio.wait_for (a task per call: ~25 µs here); a write to
    a socket that has room does not wait, so only a write that must wait for room
    is bounded by the socket timeout, as redis-py bounds it."""
    writer = getattr(connection, "_writer", None)
    if writer is None and not connection.is_connected:
        # As in HeldConnections.call_many: a Sentinel connection finds the current
        # master only in connect().
        await connection.connect()
        writer = getattr(connection, "_writer", None)
    if _timeout is None or not isinstance(writer, asyncio.StreamWriter) or writer.is_closing():
        # Not connected (send_packed_command connects), or another kind of stream
        # (fakeredis's): redis-py's way.
        await connection.send_packed_command(parts, check_health=False)
        return
    try:
        writer.writelines(parts)
        if writer.transport.get_write_buffer_size():
            async with _timeout(connection.socket_timeout):
                await writer.drain()
    except asyncio.TimeoutError:
        await drop_async(connection)
        raise exceptions.TimeoutError("Timeout writing to socket") from None
    except OSError as exc:
        await drop_async(connection)
        raise exceptions.ConnectionError(f"Error while writing to socket: {exc}") from exc


async def drop_async(connection: Any) -> None:
    """Disconnect an asyncio connection given up on, its transport aborted: closed, it
    would wait for its unsent writes to drain, for ever if the server stopped reading
    (its socket left open, "closing"), and a half-sent command could still go out."""
    transport = getattr(getattr(connection, "_writer", None), "transport", None)
    if transport is not None:
        transport.abort()
    await connection.disconnect(nowait=True)


def _checked(reply: Any) -> Any:
    """An error reply raises (a ConnectionError one, such as LOADING, drops the
    connection), as redis-py's read_response raises it."""
    if isinstance(reply, exceptions.RedisError):
        raise reply
    if type(reply) is list and reply and isinstance(reply[0], exceptions.ConnectionError):
        raise reply[0]
    return reply
