"""The least a Python client can spend on a hit: one GET written to a socket of its
own, its bulk reply read and unpacked, nothing else (no pool, no parser object, no
timeout, no error handling). Sync on a blocking socket; async on an asyncio Protocol
with one future per call. Between the C client and the Python contenders, these say
how much of a contender's cost is the runtime's (the interpreter, the event loop)
and how much is its own.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlparse

import msgpack

_CRLF = b"\r\n"


def _command(key: str) -> bytes:
    encoded = key.encode()
    return b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(encoded), encoded)


def _complete(data: bytes) -> int:
    """The length of a whole bulk reply at the start of `data`, or 0 if incomplete."""
    end = data.find(_CRLF)
    if end < 0:
        return 0
    if data[:1] != b"$":
        raise RuntimeError(f"not a bulk reply: {data[:40]!r}")
    size = end + 2 + int(data[1:end]) + 2
    return size if len(data) >= size else 0


def _value(data: bytes) -> Any:
    end = data.find(_CRLF)
    return msgpack.unpackb(data[end + 2 : end + 2 + int(data[1:end])])


def sync_get(url: str, key: str) -> tuple[Callable[[], Any], Callable[[], None]]:
    """A call that GETs and unpacks `key`, and a close."""
    address = urlparse(url)
    sock = socket.create_connection((address.hostname or "127.0.0.1", address.port or 6379))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    command = _command(key)

    def get() -> Any:
        sock.sendall(command)
        data = sock.recv(65536)
        while not _complete(data):
            data += sock.recv(65536)
        return _value(data)

    return get, sock.close


class _Replies(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.waiter: asyncio.Future[bytes] | None = None

    def data_received(self, data: bytes) -> None:
        self.data += data
        if self.waiter is not None and _complete(self.data):
            waiter, self.waiter = self.waiter, None
            reply, self.data = self.data, b""
            waiter.set_result(reply)


async def async_get(url: str, key: str) -> tuple[Callable[[], Awaitable[Any]], Callable[[], None]]:
    """As sync_get, on the running loop."""
    address = urlparse(url)
    loop = asyncio.get_running_loop()
    transport, replies = await loop.create_connection(
        _Replies, address.hostname or "127.0.0.1", address.port or 6379
    )
    transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    command = _command(key)

    async def get() -> Any:
        waiter = replies.waiter = loop.create_future()
        transport.write(command)
        return _value(await waiter)

    return get, transport.close
