"""Every point at which a call can fail, failed on purpose.

Each flow (a single call, a waiter, a background refresh, many() with and without a
batch loader, with a held entry and with entries kept for stale_if_error, invalidate,
invalidate_many, invalidate_all, update_field, set, and the tagged ones: a miss, many(),
set, update_field, invalidate_tags) is first run once to list the Redis operations it
performs. Then, for each operation in turn and each kind of fault (an error reply, a
refused connection, a lost reply, a cancellation before or after Redis acted, any
BaseException), it runs again with that one operation failing; and once for each way its
loader can fail. After every run, once background work settles: no lock, waiter count or
wake-up token is left in Redis, the next caller (another engine, as another process) is
served without waiting, what is stored is the loader's value, and a value the call
returned is the loader's. Sync and async, real Redis and fakeredis.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from cached_aside import (
    CacheEngine,
    Outcome,
    Source,
    UnstorableValueError,
    XFetch,
    _leases,
    cache_aside,
)
from cached_aside._scripts import ScriptName

from .conftest import REDIS_URL, Harness, delete_prefix, unique_prefix
from .injection import FAULTS, Abandon, Fault, Injector, faulty_clients

pytestmark = pytest.mark.slow
LOCK_TTL = 2  # seconds: long enough that a lock left behind is seen, not expired
FOREIGN_LOCK_MS = 60  # another process's lock, that expires while we wait
RENEWED_LOCK_TTL = 0.15  # seconds: renewed every 50 ms while a slow loader runs
FOREIGN_GONE: dict[str, float] = {}  # when each such lock has expired, by time.monotonic()
_ids = itertools.count()
COVERED: set[str] = set()  # every operation a fault was injected at, across the module


def row(id: str, as_hash: bool) -> dict[str, Any]:
    return {"id": id, "n": "1" if as_hash else 1}


@dataclass
class Loader:
    """The primary: returns a row, or fails the way the run asks."""

    as_hash: bool
    failure: str = ""  # "", "raises", "unstorable", "abandon"
    mode: str = "sync"
    calls: int = 0

    def one(self, id: str) -> Any:
        self.calls += 1
        if self.failure == "raises":
            raise ValueError("the primary failed")
        if self.failure == "abandon":
            raise asyncio.CancelledError() if self.mode == "async" else Abandon()
        if self.failure == "unstorable":
            return {"id": "bad\udcff"} if self.as_hash else {(1, 2): "tuple keys"}
        return row(id, self.as_hash)

    def batch(self, ids: list[str]) -> list[Any]:
        return [self.one(id) for id in ids]


LOADER_FAILURES = {
    "raises": ValueError,
    "unstorable": UnstorableValueError,
    "abandon": (asyncio.CancelledError, Abandon),
}


@dataclass
class Scenario:
    """One flow: `prepare` sets the stage (not injected), `act` is what fails."""

    name: str
    act: Callable[[Harness, Any, list[str]], Awaitable[Any]]
    prepare: Callable[[Harness, Any, list[str]], Awaitable[None]] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    batch: bool = False
    entries: int = 1
    loads: bool = True  # whether loader faults apply
    returns_rows: bool = True  # act returns the loader's rows (or a list of them)
    foreign_lock: bool = False  # prepare leaves another process's lock on ids[0]
    background: bool = False  # the loader runs in the background: callers never see it
    stale_answers: bool = False  # a failed load is answered with the kept value
    renews: bool = False  # the loader runs until its lease was renewed (RENEW sent)


async def _now(value: Any) -> Any:
    return value


async def _call(h: Harness, fn: Any, ids: list[str]) -> Any:
    return await h.run(fn, ids[0])


async def _many(h: Harness, fn: Any, ids: list[str]) -> Any:
    return await h.run(fn.many, ids)


async def _fill(h: Harness, fn: Any, ids: list[str]) -> None:
    await h.run(fn.many, ids)


async def _fill_first(h: Harness, fn: Any, ids: list[str]) -> None:
    await h.run(fn, ids[0])


async def _lock_first(h: Harness, fn: Any, ids: list[str]) -> None:
    h.raw.set(fn.key(ids[0]) + ":lock", "another-process", px=FOREIGN_LOCK_MS)
    # gone by then at the latest: Redis set its expiry before it answered
    FOREIGN_GONE[fn.key(ids[0])] = time.monotonic() + FOREIGN_LOCK_MS / 1000


async def _wait_then_fill_some(h: Harness, fn: Any, ids: list[str]) -> None:
    await h.run(fn, ids[1])
    await _lock_first(h, fn, ids)


def _aged(left_ms: int) -> Callable[[Harness, Any, list[str]], Awaitable[None]]:
    """A prepare step: fill the first entry, then give it `left_ms` to live."""

    async def prepare(h: Harness, fn: Any, ids: list[str]) -> None:
        await h.run(fn, ids[0])
        h.raw.pexpire(fn.key(ids[0]), left_ms)

    return prepare


def _aged_all(left_ms: int) -> Callable[[Harness, Any, list[str]], Awaitable[None]]:
    """A prepare step: fill every entry, then give each `left_ms` to live."""

    async def prepare(h: Harness, fn: Any, ids: list[str]) -> None:
        await h.run(fn.many, ids)
        for id in ids:
            h.raw.pexpire(fn.key(id), left_ms)

    return prepare


SCENARIOS = [
    Scenario("cold miss", _call),
    Scenario("cold miss, hash", _call, options={"as_hash": True}),
    Scenario("waiter", _call, _lock_first, foreign_lock=True),
    Scenario(
        "refresh_ahead reload",
        _call,
        _aged(29_000),  # inside the refresh window (its last 29.99 s), no wait for it
        options={"ttl": 30, "refresh_ahead": 29.99},
        background=True,
    ),
    Scenario(
        "XFetch reload",
        _call,
        _fill_first,
        # A beta so large that the timed entry is due whatever the draw (but u = 1,
        # a chance of 2**-53, or a lead under 30 s, about 3e-8).
        options={"ttl": 30, "refresh_ahead": XFetch(beta=1e12)},
        background=True,
    ),
    Scenario(
        "grace reload",
        _call,
        _aged(9_000),
        options={"ttl": 30, "grace": 10},
        background=True,
    ),
    Scenario(
        "stale_if_error load",
        _call,
        _aged(50_000),
        options={"ttl": 30, "stale_if_error": 60},
        stale_answers=True,
    ),
    Scenario("refresh", lambda h, fn, ids: h.run(fn.refresh, ids[0]), _fill_first),
    Scenario(
        "set",
        lambda h, fn, ids: h.run(fn.set, ids[0], value=row(ids[0], False)),
        _fill,
        loads=False,
        returns_rows=False,
    ),
    Scenario("tagged miss", _call, options={"tags": ("all", "one:<id>")}),
    Scenario(
        "slow miss, lease renewed", _call, options={"lock_ttl": RENEWED_LOCK_TTL}, renews=True
    ),
    Scenario(
        "slow tagged miss, lease renewed",
        _call,
        options={"lock_ttl": RENEWED_LOCK_TTL, "tags": ("all",)},
        renews=True,
    ),
    Scenario(
        "slow many, lease renewed",
        _many,
        batch=True,
        entries=2,
        options={"lock_ttl": RENEWED_LOCK_TTL},
        renews=True,
    ),
    Scenario(
        "tagged set",
        lambda h, fn, ids: h.run(fn.set, ids[0], value=row(ids[0], False)),
        _fill,
        options={"tags": ("all", "one:<id>")},
        loads=False,
        returns_rows=False,
    ),
    Scenario(
        "tagged update_field",
        lambda h, fn, ids: h.run(fn.update_field, ids[0], "n", "2"),
        _fill,
        options={"as_hash": True, "tags": ("all",)},
        loads=False,
        returns_rows=False,
    ),
    Scenario("tagged many, batch loader", _many, batch=True, entries=2, options={"tags": ("all",)}),
    Scenario(
        "invalidate_tags",
        lambda h, fn, ids: (
            h.engine.ainvalidate_tags("all")
            if h.mode == "async"
            else _now(h.engine.invalidate_tags("all"))
        ),
        _fill,
        options={"tags": ("all",)},
        entries=2,
        loads=False,
        returns_rows=False,
    ),
    Scenario("many, batch loader", _many, _fill_first, batch=True, entries=3),
    Scenario(
        "many, batch loader, one held",
        _many,
        _wait_then_fill_some,
        batch=True,
        entries=3,
        foreign_lock=True,
    ),
    Scenario(
        "many, batch loader, stale_if_error",
        _many,
        _aged_all(50_000),
        options={"ttl": 30, "stale_if_error": 60},
        batch=True,
        entries=2,
        stale_answers=True,
    ),
    Scenario("many, one at a time", _many, _fill_first, entries=3),
    Scenario(
        "invalidate",
        lambda h, fn, ids: h.run(fn.invalidate, ids[0]),
        _fill,
        loads=False,
        returns_rows=False,
    ),
    Scenario(
        "update_field",
        lambda h, fn, ids: h.run(fn.update_field, ids[0], "n", "2"),
        _fill,
        options={"as_hash": True},
        loads=False,
        returns_rows=False,
    ),
    Scenario(
        "invalidate_many",
        lambda h, fn, ids: h.run(fn.invalidate_many, ids),
        _fill,
        entries=2,
        loads=False,
        returns_rows=False,
    ),
    Scenario(
        "invalidate_all",
        lambda h, fn, ids: h.run(fn.invalidate_all),
        _fill,
        entries=2,
        loads=False,
        returns_rows=False,
    ),
]


@pytest.fixture
async def rig(backend: str, request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """(injector, engine, raw client, prefix) on faulty clients."""
    injector = Injector()
    sync, asynchronous, raw = faulty_clients(backend, REDIS_URL, injector)
    prefix = unique_prefix()
    engine = CacheEngine(sync, asynchronous, prefix=prefix)
    yield injector, engine, raw, prefix
    await engine.aclose()
    delete_prefix(raw, prefix)
    raw.close()
    sync.close()
    await asynchronous.aclose()


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
async def test_no_fault_leaves_a_key_stuck_or_a_wrong_value(
    scenario: Scenario, mode: str, backend: str, rig: Any
) -> None:
    injector, engine, raw, _ = rig
    injector.mode = mode
    h = Harness(mode, backend, engine, raw)
    as_hash = bool(scenario.options.get("as_hash"))
    loader = Loader(as_hash, mode=mode)
    options: dict[str, Any] = {"ttl": 30, "lock_ttl": LOCK_TTL, **scenario.options}
    if scenario.batch:
        options["batch_loader"] = loader.batch
    template = scenario.name.replace(" ", "-").replace(",", "") + ":<id>"
    fn = h.cached(loader.one, key=template, **options)
    if scenario.renews:
        fn = _renewed_loader(h, loader, injector, template, options)

    # Twice: the first run loads the scripts (fakeredis starts with none), and its
    # retries after NOSCRIPT would shift the index of every later run's operations.
    await _run(h, fn, scenario, injector, {})
    operations = await _run(h, fn, scenario, injector, {})
    assert operations, "the flow performed no Redis operation"
    problems: list[str] = []
    runs = 0
    for index, fault in itertools.product(range(len(operations)), FAULTS):
        runs += 1
        problems += await _check_run(h, fn, scenario, injector, {index: fault}, loader)
    if scenario.loads:
        for failure in LOADER_FAILURES:
            loader.failure = failure
            runs += 1
            problems += await _check_run(h, fn, scenario, injector, {}, loader)
        loader.failure = ""
    # Two faults: the call is abandoned after Redis acted, and the release that
    # follows is refused too; the outbox must still give everything back.
    # Or the release is interrupted itself (a signal handler's exception).
    abandoned = next(f for f in FAULTS if f.name == "cancelled, reply lost")
    refused = next(f for f in FAULTS if f.name == "connection refused")
    interrupted = next(f for f in FAULTS if f.name == "BaseException, reply lost")
    for index, then in itertools.product(range(len(operations)), (refused, interrupted)):
        runs += 1
        plan = {index: abandoned, index + 1: then}
        problems += await _check_run(h, fn, scenario, injector, plan, loader)
    assert not problems, f"{len(problems)} of {runs} runs went wrong:\n" + "\n".join(problems)


def _renewed_loader(
    h: Harness, loader: Loader, injector: Injector, template: str, options: dict[str, Any]
) -> Any:
    """A function whose loader runs until its lease's renewal was sent (three leases
    at most): so a fault meets RENEW too. A load holding no lease (failing open) has
    no renewal to wait for and returns at once."""

    def renewed() -> bool:
        sent = any("RENEW" in op for op in injector.ops)
        return sent or not injector.armed or _leases.running() == 0

    if "batch_loader" in options:
        if h.mode == "async":

            async def batch(ids: list[str]) -> list[Any]:
                await _until_async(renewed)
                return loader.batch(ids)
        else:

            def batch(ids: list[str]) -> list[Any]:  # type: ignore[misc]
                _until(renewed)
                return loader.batch(ids)

        options = {**options, "batch_loader": batch}
    if h.mode == "async":

        async def one(id: str) -> Any:
            await _until_async(renewed)
            return loader.one(id)

        return cache_aside(engine=h.engine, key=template, **options)(one)

    def one_sync(id: str) -> Any:
        _until(renewed)
        return loader.one(id)

    return cache_aside(engine=h.engine, key=template, **options)(one_sync)


def _until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 3 * RENEWED_LOCK_TTL
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)


async def _until_async(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 3 * RENEWED_LOCK_TTL
    while time.monotonic() < deadline:
        if condition():
            return
        await asyncio.sleep(0.005)


async def _run(
    h: Harness, fn: Any, scenario: Scenario, injector: Injector, plan: dict[int, Fault]
) -> list[str]:
    """A dry run: the operations the flow performs when nothing fails."""
    ids = [f"e{next(_ids)}" for _ in range(scenario.entries)]
    h.engine.breaker.success()
    if scenario.prepare is not None:
        await scenario.prepare(h, fn, ids)
    injector.arm(plan)
    try:
        await scenario.act(h, fn, ids)
        await _settle(h, fn, scenario, ids)  # background work fails too
    finally:
        injector.disarm()
    return list(injector.ops)


async def _check_run(
    h: Harness,
    fn: Any,
    scenario: Scenario,
    injector: Injector,
    plan: dict[int, Fault],
    loader: Loader,
) -> list[str]:
    ids = [f"e{next(_ids)}" for _ in range(scenario.entries)]
    h.engine.breaker.success()  # each run starts healthy: an open breaker sends nothing
    if scenario.prepare is not None:
        failure, loader.failure = loader.failure, ""
        await scenario.prepare(h, fn, ids)
        loader.failure = failure
    label = f"{plan or loader.failure!r}"
    injector.arm(plan)
    outcome: Any = None
    raised: BaseException | None = None
    try:
        outcome = await scenario.act(h, fn, ids)
    except BaseException as exc:  # judged below, whatever it is
        raised = exc
    try:
        await _settle(h, fn, scenario, ids)  # background work fails too
    finally:
        injector.disarm()
    if injector.injected:
        for _, op, _ in injector.injected:  # a pipeline covers each command in it too
            COVERED.update([op, *op.removeprefix("pipeline[").removesuffix("]").split(",")])
        label = ", ".join(f"#{index} {op}: {name}" for index, op, name in injector.injected)
    problems = _judge_outcome(scenario, plan, loader, ids, outcome, raised)
    problems += await _judge_redis(h, fn, scenario, ids, completed=raised is None)
    return [f"{scenario.name} [{h.mode}, {label}]: {problem}" for problem in problems]


def _judge_outcome(
    scenario: Scenario,
    plan: dict[int, Fault],
    loader: Loader,
    ids: list[str],
    outcome: Any,
    raised: BaseException | None,
) -> list[str]:
    """A call may end with the fault it was dealt, or answer rightly; nothing else."""
    if raised is not None:
        allowed: list[type[BaseException]] = [
            type(f.make(loader.mode)) for f in plan.values() if not f.redis_error
        ]
        allowed += (
            [Abandon] if any(f.name.startswith("BaseException") for f in plan.values()) else []
        )
        if loader.failure:
            expected = LOADER_FAILURES[loader.failure]
            allowed += list(expected) if isinstance(expected, tuple) else [expected]
        if not isinstance(raised, tuple(allowed)):
            return [f"raised {type(raised).__name__}: {raised}"]
        return []
    quiet = scenario.background or (scenario.stale_answers and loader.failure == "raises")
    if loader.failure in ("raises", "abandon") and scenario.loads and not quiet:
        return [f"answered {outcome!r} although the loader failed"]
    if not scenario.returns_rows:
        if isinstance(outcome, Outcome) or hasattr(outcome, "pending"):
            return []
        return [f"answered {outcome!r}"]
    as_hash = loader.as_hash
    expected_rows = [row(id, as_hash) for id in ids]
    got = outcome if isinstance(outcome, list) else [outcome]
    if got != expected_rows[: len(got)]:
        return [f"answered {outcome!r}, not the loader's rows"]
    return []


async def _settle(h: Harness, fn: Any, scenario: Scenario, ids: list[str]) -> None:
    """Wait for background reloads, releases and the outbox; then another process's
    lock goes, as it would when it expires."""
    settled = await h.engine.asettle() if h.mode == "async" else h.engine.settle()
    assert settled, "background work did not finish"
    if scenario.foreign_lock:
        gone = FOREIGN_GONE.pop(fn.key(ids[0]))
        lock = fn.key(ids[0]) + ":lock"
        now = time.monotonic()
        # Nobody waits on it any more: untouched, another process's lock may as well go
        # now as when it expires. One made to live past its expiry (by more than the
        # rounding to ms of the clocks) is left to be judged.
        if h.raw.get(lock) == b"another-process" and h.raw.pttl(lock) <= (gone - now) * 1000 + 2:
            h.raw.delete(lock)
        else:  # what the call did not wait out of it, and a margin
            await asyncio.sleep(max(0.0, gone + 0.01 - time.monotonic()))


async def _judge_redis(
    h: Harness, fn: Any, scenario: Scenario, ids: list[str], completed: bool
) -> list[str]:
    problems: list[str] = []
    if _leases.running():
        problems.append(f"{_leases.running()} loads' leases are still being renewed")
    if h.engine.pending_invalidations():
        problems.append(f"outbox still holds {h.engine.pending_invalidations()}")
    for id in ids:
        key = fn.key(id)
        left = [suffix for suffix in ("lock", "waiters", "wake") if h.raw.exists(f"{key}:{suffix}")]
        if left:
            problems.append(f"{id}: left {left} in Redis")
    invalidation = scenario.name in (
        "invalidate",
        "invalidate_many",
        "invalidate_all",
        "invalidate_tags",
    )
    # A tag's invalidation leaves its entries in Redis, stamped with a retired version.
    tagged_invalidation = scenario.name == "invalidate_tags"
    if completed and tagged_invalidation and h.raw.exists(f"{h.engine.prefix}:tag:{{all}}"):
        problems.append("an invalidation that returned left its tag's version in Redis")
    if (
        completed
        and invalidation
        and not tagged_invalidation
        and any(h.raw.exists(fn.key(id)) for id in ids)
    ):
        problems.append("an invalidation that returned left its entry in Redis")
    # The next caller, in another process: never waits, gets the loader's row.
    as_hash = bool(scenario.options.get("as_hash"))
    other = CacheEngine(h.raw, prefix=h.engine.prefix)
    try:
        clean = cache_aside(
            key=fn._template.text,
            ttl=30,
            lock_ttl=LOCK_TTL,
            as_hash=as_hash,
            engine=other,
            tags=scenario.options.get("tags", ()),  # tagged entries carry a stamp
        )(lambda id: row(id, as_hash))
        for id in ids:
            result = clean.lookup(id)
            expected = [row(id, as_hash), {**row(id, as_hash), "n": "2"}]  # update_field's
            if result.value not in expected[: 2 if "update_field" in scenario.name else 1]:
                problems.append(f"{id}: the next caller got {result.value!r}")
            if result.source is Source.WAITED or clean.stats().lock_waits:
                problems.append(f"{id}: the next caller waited for a lock")
            if clean.stats().corrupt:
                problems.append(f"{id}: a partial or damaged entry was stored")
    finally:
        other.close()
    return problems


def test_every_script_and_command_was_failed_somewhere() -> None:
    """Runs last in this module: the injection reached every kind of operation."""
    if not COVERED:
        pytest.skip("run with the rest of this module")
    wanted = {"GET", "HGETALL", "BLPOP", "SCAN", "PEEK", *(name.name for name in ScriptName)}
    assert wanted <= COVERED, sorted(wanted - COVERED)
    pipelines = {"GET", "ACQUIRE", "STORE", "INVALIDATE", "UNLINK"}
    assert {f"pipeline[{op}]" for op in pipelines} <= COVERED, sorted(COVERED)
