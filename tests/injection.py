"""Redis clients that fail on purpose: the n-th Redis operation a test performs raises
a chosen exception, before it reaches Redis (refused, never sent) or after Redis
performed it (its reply lost). Real redis-py and fakeredis clients, sync and async,
subclassed so that the library's own code paths (scripts, pipelines, SCAN) run."""

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
from redis.exceptions import ConnectionError, OutOfMemoryError, TimeoutError

from cached_aside._scripts import ScriptName

SCRIPTS_BY_SHA = {hashlib.sha1(name.value.encode()).hexdigest(): name.name for name in ScriptName}
# The outbox's flusher retries in a thread of its own; its operations are not the
# ones a test steps through.
UNCOUNTED_THREADS = frozenset({"cached_aside-outbox"})


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


def describe(args: tuple[Any, ...]) -> str:
    name = str(args[0]).upper()
    if name == "EVALSHA":
        sha = args[1].decode() if isinstance(args[1], bytes) else str(args[1])
        return SCRIPTS_BY_SHA.get(sha, "EVALSHA")
    return name


@dataclass
class Injector:
    """Counts the operations of an armed test and raises the planned fault at one."""

    mode: str = "sync"
    armed: bool = False
    plan: dict[int, Fault] = field(default_factory=dict)
    ops: list[str] = field(default_factory=list)
    injected: list[tuple[int, str, str]] = field(default_factory=list)  # (index, op, fault)
    # Async clients only: after Redis performed this operation, the caller is held
    # here (`reached` is set) until `resume` is set, or until it is cancelled.
    hold_after: str = ""
    reached: asyncio.Event = field(default_factory=asyncio.Event)
    resume: asyncio.Event = field(default_factory=asyncio.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def arm(self, plan: dict[int, Fault]) -> None:
        with self._lock:
            self.plan, self.ops, self.injected, self.armed = plan, [], [], True

    def disarm(self) -> None:
        self.armed = False

    def before(self, op: str) -> Fault | None:
        if not self.armed or threading.current_thread().name in UNCOUNTED_THREADS:
            return None
        with self._lock:
            index = len(self.ops)
            self.ops.append(op)
            fault = self.plan.get(index)
            if fault is not None:
                self.injected.append((index, op, fault.name))
        if fault is not None and not fault.after:
            raise fault.make(self.mode)
        return fault

    def after(self, fault: Fault | None) -> None:
        if fault is not None:
            raise fault.make(self.mode)


class _SyncPipe:
    def __init__(self, pipe: Any, injector: Injector) -> None:
        self._pipe, self._injector, self._ops = pipe, injector, []

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self._ops.append(describe(args))
        return self._pipe.execute_command(*args, **options)

    def execute(self, raise_on_error: bool = True) -> Any:
        fault = self._injector.before(f"pipeline[{','.join(sorted(set(self._ops)))}]")
        result = self._pipe.execute(raise_on_error=raise_on_error)
        self._injector.after(fault)
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)


class _AsyncPipe(_SyncPipe):
    async def execute(self, raise_on_error: bool = True) -> Any:  # type: ignore[override]
        fault = self._injector.before(f"pipeline[{','.join(sorted(set(self._ops)))}]")
        result = await self._pipe.execute(raise_on_error=raise_on_error)
        self._injector.after(fault)
        return result


class _SyncFaults:
    injector: Injector

    def execute_command(self, *args: Any, **options: Any) -> Any:
        fault = self.injector.before(describe(args))
        result = super().execute_command(*args, **options)  # type: ignore[misc]
        self.injector.after(fault)
        return result

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        return _SyncPipe(super().pipeline(transaction, shard_hint), self.injector)  # type: ignore[misc]


class _AsyncFaults:
    injector: Injector

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        op = describe(args)
        fault = self.injector.before(op)
        result = await super().execute_command(*args, **options)  # type: ignore[misc]
        if op == self.injector.hold_after:
            self.injector.hold_after = ""
            self.injector.reached.set()
            await self.injector.resume.wait()  # a real await, where a real cancel lands
        self.injector.after(fault)
        return result

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        return _AsyncPipe(super().pipeline(transaction, shard_hint), self.injector)  # type: ignore[misc]


class FaultyRedis(_SyncFaults, redis.Redis):
    pass


class FaultyAsyncRedis(_AsyncFaults, redis.asyncio.Redis):
    pass


class FaultyFakeRedis(_SyncFaults, fakeredis.FakeRedis):
    pass


class FaultyFakeAsyncRedis(_AsyncFaults, fakeredis.FakeAsyncRedis):
    pass


def faulty_clients(backend: str, url: str | None, injector: Injector) -> tuple[Any, Any, Any]:
    """(sync, async, raw) clients on one data set; the first two inject `injector`'s
    faults, the raw one looks behind the cache."""
    if backend == "redis":
        assert url is not None
        sync = FaultyRedis.from_pool(redis.BlockingConnectionPool.from_url(url, max_connections=50))
        pool = redis.asyncio.BlockingConnectionPool.from_url(url, max_connections=50)
        asynchronous = FaultyAsyncRedis.from_pool(pool)
        raw = redis.Redis.from_url(url)
    else:
        server = fakeredis.FakeServer()
        sync = FaultyFakeRedis(server=server)
        asynchronous = FaultyFakeAsyncRedis(server=server)
        raw = fakeredis.FakeRedis(server=server)
    sync.injector = asynchronous.injector = injector
    return sync, asynchronous, raw
