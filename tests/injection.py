"""Redis connections that fail on purpose: the n-th write a test makes raises a chosen
exception, before it reaches Redis (refused, never sent) or after Redis performed
it (its reply lost). Faults are injected in redis-py's (and fakeredis's) connection
classes, under every path the library takes: the client, its pipelines and scripts,
held connections and the shared asyncio connection; redis-py's own retries run."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import fakeredis
import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError, OutOfMemoryError, TimeoutError
from redis.retry import Retry

from cached_aside._scripts import ScriptName

SCRIPTS_BY_SHA = {hashlib.sha1(name.value.encode()).hexdigest(): name.name for name in ScriptName}
# The outbox's flusher retries in a thread of its own; its operations are not the
# ones a test steps through.
UNCOUNTED_THREADS = frozenset({"cached_aside-outbox"})
# What the tests' own code sends on connections: not the library's operations.
UNCOUNTED_COMMANDS = frozenset({"SCRIPT LOAD", "CLIENT", "HELLO", "SELECT", "PING"})


class Abandon(BaseException):
    """What no library code may catch and carry on from: stands for KeyboardInterrupt,
    SystemExit, gevent's Timeout and their kin."""


@dataclass(frozen=True)
class Fault:
    name: str
    make: Callable[[str], BaseException]  # the mode ("sync"/"async") -> the exception
    after: bool  # raised after Redis performed the operation: its reply is lost
    redis_error: bool  # a Redis failure, which fail-open must absorb


def _cancelled(mode: str) -> BaseException:
    return asyncio.CancelledError() if mode == "async" else Abandon()


FAULTS = [
    Fault(
        "error reply (OOM)", lambda mode: OutOfMemoryError("OOM command not allowed"), False, True
    ),
    Fault("connection refused", lambda mode: ConnectionError("Connection refused"), False, True),
    Fault("reply lost (timeout)", lambda mode: TimeoutError("Timeout reading"), True, True),
    Fault("cancelled before send", _cancelled, False, False),
    Fault("cancelled, reply lost", _cancelled, True, False),
    Fault("BaseException, reply lost", lambda mode: Abandon(), True, False),
]


def describe(args: tuple[str, ...]) -> str:
    name = args[0].upper()
    if name == "EVALSHA" and len(args) > 1:
        return SCRIPTS_BY_SHA.get(args[1], "EVALSHA")
    if name == "SCRIPT" and len(args) > 1:
        return f"SCRIPT {args[1].upper()}"
    return name


def commands_in(packed: Any) -> list[str]:
    """The operations in a packed write (RESP arrays of bulk strings)."""
    data = packed if isinstance(packed, bytes) else b"".join(packed)
    names, at = [], 0
    while at < len(data):
        end = data.index(b"\r\n", at)
        count, at = int(data[at + 1 : end]), end + 2
        args = []
        for _ in range(count):
            end = data.index(b"\r\n", at)
            length = int(data[at + 1 : end])
            args.append(data[end + 2 : end + 2 + length].decode(errors="replace"))
            at = end + 2 + length + 2
        names.append(describe(tuple(args[:2])))
    return names


@dataclass
class Injector:
    """Counts the writes of an armed test and raises the planned fault at one."""

    mode: str = "sync"
    armed: bool = False
    plan: dict[int, Fault] = field(default_factory=dict)
    ops: list[str] = field(default_factory=list)
    injected: list[tuple[int, str, str]] = field(default_factory=list)  # (index, op, fault)
    # Async clients only: after Redis performed this operation, its caller is held
    # (`reached` is set) until `resume` is set, or until it is cancelled.
    hold_after: str = ""
    reached: asyncio.Event = field(default_factory=asyncio.Event)
    resume: asyncio.Event = field(default_factory=asyncio.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def arm(self, plan: dict[int, Fault]) -> None:
        with self._lock:
            self.plan, self.ops, self.injected, self.armed = plan, [], [], True

    def disarm(self) -> None:
        self.armed = False

    def on_write(self, packed: Any) -> tuple[str, Fault | None]:
        names = [n for n in commands_in(packed) if n not in UNCOUNTED_COMMANDS]
        if not names or not self.armed:
            return (names[0] if names else ""), None
        if threading.current_thread().name in UNCOUNTED_THREADS:
            return names[0], None
        op = names[0] if len(names) == 1 else f"pipeline[{','.join(sorted(set(names)))}]"
        with self._lock:
            index = len(self.ops)
            self.ops.append(op)
            fault = self.plan.get(index)
            if fault is not None:
                self.injected.append((index, op, fault.name))
        return op, fault


class _Faults:
    """Mixed into a connection class: the fault planned for a write is raised at the
    write (not sent) or at the first read after it (sent, reply lost)."""

    injector: Injector
    _fault_at_read: Fault | None = None

    def _before_write(self, packed: Any) -> tuple[str, bool]:
        op, fault = self.injector.on_write(packed)
        self._fault_at_read = None
        if fault is None:
            return op, True
        if fault.after:
            self._fault_at_read = fault
            return op, True
        single = not op.startswith("pipeline[")
        if single and isinstance(fault.make(self.injector.mode), OutOfMemoryError):
            self._fault_at_read = fault  # an error reply instead of its reply: not run
            return op, False
        raise fault.make(self.injector.mode)

    def _at_read(self) -> None:
        fault, self._fault_at_read = self._fault_at_read, None
        if fault is not None:
            raise fault.make(self.injector.mode)


class _SyncFaults(_Faults):
    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        _, send = self._before_write(command)
        if send:
            super().send_packed_command(command, check_health)  # type: ignore[misc]

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        if self._fault_at_read is not None and not self._fault_at_read.after:
            self._at_read()  # the error reply of a write that never went out
        reply = super().read_response(*args, **kwargs)  # type: ignore[misc]
        self._at_read()
        return reply


class _WriterFaults:
    """Mixed into an asyncio connection's stream writer: the library writes to it
    directly (redis-py's send_packed_command writes to it too)."""

    faulty_connection: _AsyncFaults

    def writelines(self, data: Any) -> None:
        parts = list(data)
        connection = self.faulty_connection
        op, send = connection._before_write(parts)
        connection._held_op = op
        if send:
            super().writelines(parts)  # type: ignore[misc]


class _AsyncFaults(_Faults):
    _held_op: str = ""

    async def _connect(self) -> None:
        await super()._connect()  # type: ignore[misc]
        _faulty_writer(self)

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        if self._fault_at_read is not None and not self._fault_at_read.after:
            self._at_read()
        reply = await super().read_response(*args, **kwargs)  # type: ignore[misc]
        injector = self.injector
        if injector.hold_after and getattr(self, "_held_op", "") == injector.hold_after:
            injector.hold_after = ""
            injector.reached.set()
            await injector.resume.wait()  # a real await, where a real cancel lands
        self._at_read()
        return reply


def _faulty_writer(connection: Any) -> None:
    writer = getattr(connection, "_writer", None)
    if writer is None or isinstance(writer, _WriterFaults):
        return
    base = type(writer)
    writer.__class__ = type(f"Faulty{base.__name__}", (_WriterFaults, base), {})
    writer.faulty_connection = connection


def _faulty(pool: Any, mixin: type, injector: Injector) -> None:
    """New connections of `pool` inject `injector`'s faults, and so do those it has."""
    base = pool.connection_class
    faulty = type(f"Faulty{base.__name__}", (mixin, base), {"injector": injector})
    pool.connection_class = faulty
    for name in ("_connections", "_available_connections", "_in_use_connections"):
        for connection in list(getattr(pool, name, ()) or ()):
            if connection is not None and type(connection) is base:
                connection.__class__ = faulty
                if mixin is _AsyncFaults:
                    _faulty_writer(connection)


def faulty_clients(backend: str, url: str | None, injector: Injector) -> tuple[Any, Any, Any]:
    """(sync, async, raw) clients on one data set; the first two inject `injector`'s
    faults, the raw one looks behind the cache. One immediate retry, as engines
    built from a URL have."""
    if backend == "redis":
        assert url is not None
        retry = Retry(NoBackoff(), 1)
        sync = redis.Redis.from_pool(
            redis.BlockingConnectionPool.from_url(url, max_connections=50, retry=retry)
        )
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            url, max_connections=50, retry=redis.asyncio.retry.Retry(NoBackoff(), 1)
        )
        asynchronous = redis.asyncio.Redis.from_pool(pool)
        raw = redis.Redis.from_url(url)
    else:
        server = fakeredis.FakeServer()
        sync = fakeredis.FakeRedis(server=server)
        asynchronous = fakeredis.FakeAsyncRedis(server=server)
        raw = fakeredis.FakeRedis(server=server)
    _faulty(sync.connection_pool, _SyncFaults, injector)
    _faulty(asynchronous.connection_pool, _AsyncFaults, injector)
    return sync, asynchronous, raw


def counting_writes(*clients: Any) -> Injector:
    """Count the writes (round trips) made on these clients' new connections: the
    returned injector's `ops` lists them, one per write ("GET", "ACQUIRE",
    "pipeline[GET]", ...). It injects nothing."""
    injector = Injector()
    for client in clients:
        mixin = (
            _AsyncFaults
            if client.__class__.__module__.startswith(
                ("redis.asyncio", "fakeredis._clients._async")
            )
            or "Async" in type(client).__name__
            else _SyncFaults
        )
        _faulty(client.connection_pool, mixin, injector)
    injector.arm({})
    return injector
