"""Single flight as one invariant: whatever the options, a process runs at most one
load of a key at a time, and every caller joined to it gets its outcome (value,
stale value or error) with the right Source. A property test draws the options and
the callers; plain tests name the defects it was written for (issue 22)."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
import textwrap
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
import redis.asyncio.retry
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

import cached_aside._flights
import cached_aside._plan
from cached_aside import (
    CacheEngine,
    LoaderTimeoutError,
    Source,
    cache_aside,
)
from cached_aside._flights import TaskFlights, ThreadFlights
from cached_aside._plan import Served
from cached_aside._scripts import ScriptName

from .conftest import (
    REDIS_URL,
    Harness,
    LoaderFailedError,
    delete_prefix,
    needs_real_redis,
    run_in_threads,
    unique_prefix,
    wait_until,
)
from .injection import counting_writes

HANG = 30.0  # a generous bound on a hang, never a speed claim
# loader_timeout of the "slow" loaders. A run counts as live for half of it (Probe), which
# must cover a loader thread's start on a loaded machine: its timeout is counted from
# before the thread runs, and 0.25 s of start-up made a run and its successor overlap.
SLOW_TIMEOUT = 2.0
TTL = 30
GRACE = 60  # seconds, when drawn
STALE_IF_ERROR = 120  # longer than GRACE: an entry kept past both is "expired"
REFRESH_AHEAD = 10
# A caller waits this long for another's flight before it treats the leader as stuck
# (and a refresh loads regardless): a generous bound, so that callers slow to park on a
# loaded machine are not taken for that.
LOCK_TTL = 10
_examples = itertools.count()


class LoadError(Exception):
    """The loader's own failure."""


@dataclass
class Scenario:
    options: dict[str, Any]
    prior: str  # cold, stale (in grace), expired (kept for stale_if_error), due
    outcome: str  # value, none, raises, slow
    callers: list[str]  # call (lookup), many, refresh
    batched: bool = False  # the function has a batch_loader: many() loads through it


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    options: dict[str, Any] = {
        "ttl": TTL,
        "lock_ttl": LOCK_TTL,
        "grace": draw(st.sampled_from([None, GRACE])),
        "stale_if_error": draw(st.sampled_from([None, STALE_IF_ERROR])),
        "loader_timeout": draw(st.sampled_from([None, SLOW_TIMEOUT])),
        "refresh_ahead": draw(st.sampled_from([None, REFRESH_AHEAD])),
        "negative_ttl": draw(st.sampled_from([0, 30])),
    }
    if draw(st.booleans()):
        options["cache_if"] = lambda value: False  # nothing is stored
    priors = ["cold"]
    if options["grace"]:
        priors.append("stale")
    if options["stale_if_error"]:
        priors.append("expired")
    if options["refresh_ahead"]:
        priors.append("due")
    prior = draw(st.sampled_from(priors))
    outcomes = ["value", "none", "raises"] + (["slow"] if options["loader_timeout"] else [])
    kinds = ["call", "many"]
    if prior in ("cold", "expired"):
        kinds.append("refresh")
    callers = draw(st.lists(st.sampled_from(kinds), min_size=2, max_size=8))
    batched = draw(st.booleans())
    return Scenario(options, prior, draw(st.sampled_from(outcomes)), callers, batched)


@dataclass
class Probe:
    """The loader's runs of one key: how many, and how many at once at most. A load
    past its loader_timeout counts as ended: the library abandoned it."""

    timeout: float | None
    runs: int = 0
    in_loader: int = 0
    most_at_once: int = 0
    starts: list[float] = field(default_factory=list)
    first: float | None = None  # when the first run began
    opened: float | None = None  # when the gate opened
    lock: threading.Lock = field(default_factory=threading.Lock)
    sequence: Callable[[], int] = field(default_factory=lambda: itertools.count().__next__)

    def start(self) -> tuple[int, float]:
        with self.lock:
            now = time.perf_counter()
            if self.first is None:
                self.first = now
            # A hanging run counts until half its timeout has passed: the library gives
            # up on it at the timeout, counted from a moment a little before `s`.
            margin = 0 if self.timeout is None else self.timeout / 2
            live = [
                s for s in self.starts if self.timeout is None or now - s < self.timeout - margin
            ]
            self.most_at_once = max(self.most_at_once, len(live) + 1)
            self.starts.append(now)
            self.runs += 1
            self.in_loader += 1
            return self.sequence(), now

    def joined_in_time(self) -> bool:
        """Whether every caller had joined before a hanging first run timed out."""
        if self.timeout is None or self.first is None or self.opened is None:
            return True
        return self.opened - self.first < self.timeout

    def end(self, started: float) -> None:
        with self.lock:
            self.starts.remove(started)
            self.in_loader -= 1


class Gate:
    """What the loaders block on until every caller has joined (or finished)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.open_sync = threading.Event()
        self.never_sync = threading.Event()
        self.open_async: asyncio.Event | None = asyncio.Event() if mode == "async" else None
        self.never_async: asyncio.Event | None = asyncio.Event() if mode == "async" else None

    def release(self) -> None:
        self.open_sync.set()
        if self.open_async is not None:
            self.open_async.set()

    def finish(self) -> None:
        self.release()
        self.never_sync.set()
        if self.never_async is not None:
            self.never_async.set()


def _result_of(outcome: str, run: int, sequence: int) -> Any:
    if outcome == "value":
        return f"v{run}:{sequence}"
    if outcome == "none":
        return None
    raise LoadError("the primary failed")


def loader_for(h: Harness, scenario: Scenario, probe: Probe, gate: Gate) -> Callable[..., Any]:
    """A loader whose every run waits at the gate, then answers as drawn."""
    outcome = scenario.outcome
    if h.mode == "sync":

        def load(id: str) -> Any:
            sequence, started = probe.start()
            try:
                assert gate.open_sync.wait(HANG)
                if outcome == "slow":
                    gate.never_sync.wait(HANG)
                    return "late"
                return _result_of(outcome, probe.runs, sequence)
            finally:
                probe.end(started)

        return load

    async def aload(id: str) -> Any:
        sequence, started = probe.start()
        try:
            assert gate.open_async is not None
            assert gate.never_async is not None
            await asyncio.wait_for(gate.open_async.wait(), HANG)
            if outcome == "slow":
                await asyncio.wait_for(gate.never_async.wait(), HANG)
                return "late"
            return _result_of(outcome, probe.runs, sequence)
        finally:
            probe.end(started)

    return aload


def batch_loader_for(h: Harness, single: Callable[..., Any]) -> Callable[..., Any]:
    """The batch loader of the same primary: one run of `single` per batch (one key)."""
    if h.mode == "sync":

        def load_batch(ids: list[str]) -> list[Any]:
            assert len(ids) == 1, ids  # every caller asks for the same key
            return [single(ids[0])]

        return load_batch

    async def aload_batch(ids: list[str]) -> list[Any]:
        assert len(ids) == 1, ids
        return [await single(ids[0])]

    return aload_batch


def prime(h: Harness, name: str, scenario: Scenario) -> None:
    """Cache "old" for the key, aged as the scenario's prior says."""
    if scenario.prior == "cold":
        return
    options = {k: v for k, v in scenario.options.items() if k != "cache_if"}

    def old(id: str) -> str:
        return "old"

    primer = cache_aside(key=f"{name}:<id>", engine=h.engine, **options)(old)
    assert primer("k") == "old"
    keep_ms = max(options["grace"] or 0, options["stale_if_error"] or 0) * 1000
    left = {
        "stale": keep_ms - 1000,  # past ttl by a second: in grace
        "expired": keep_ms - (options["grace"] or 0) * 1000 - 1000,  # past grace too
        "due": keep_ms + REFRESH_AHEAD * 1000 // 2,  # fresh, in the refresh_ahead window
    }[scenario.prior]
    assert h.raw.pexpire(primer.key("k"), left)


def _value_and_source(result: Any) -> tuple[Any, Source]:
    return result.value, result.source


def outcome_of(call: Callable[[], Any]) -> tuple[str, Any, Any]:
    try:
        return "ok", *call()
    except (LoadError, LoaderTimeoutError) as exc:
        return "error", type(exc), str(exc)


Outcomes = list[tuple[str, int, tuple[str, Any, Any]]]  # (kind, its ticket, outcome)


def parked(h: Harness, fn: Any, scenario: Scenario, probe: Probe, finished: int) -> bool:
    """Whether every caller has joined a flight, waits on the Redis lock, runs the
    loader, or has its answer: the moment to open the gate."""
    if scenario.prior in ("stale", "due"):
        return finished == len(scenario.callers)  # answered from the cache, reloads behind
    side = h.engine.sides.sync_side() if h.mode == "sync" else h.engine.sides.async_side()
    busy = side.flights.waiting + fn.stats().lock_waits + probe.in_loader
    return finished + busy >= len(scenario.callers)


async def run_callers(
    h: Harness, fn: Any, scenario: Scenario, probe: Probe, gate: Gate
) -> Outcomes:
    """Run every caller at once, and open the gate once they are all parked. Returns
    (kind, the sequence number taken as it began, outcome) per caller."""
    if h.mode == "sync":
        return run_threads(h, fn, scenario, probe, gate)
    return await run_tasks(h, fn, scenario, probe, gate)


def run_threads(h: Harness, fn: Any, scenario: Scenario, probe: Probe, gate: Gate) -> Outcomes:
    kinds = scenario.callers
    results: list[Any] = [None] * len(kinds)

    def caller(position: int, kind: str) -> None:
        ticket = probe.sequence()
        if kind == "call":
            got = outcome_of(lambda: _value_and_source(fn.lookup("k")))
        elif kind == "many":
            got = outcome_of(lambda: (fn.many(["k"])[0], None))
        else:
            got = outcome_of(lambda: (fn.refresh("k"), "refresh"))
        results[position] = (kind, ticket, got)

    threads = [threading.Thread(target=caller, args=pair) for pair in enumerate(kinds)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + HANG
    while time.monotonic() < deadline:
        if parked(h, fn, scenario, probe, sum(r is not None for r in results)):
            break
        time.sleep(0.002)
    probe.opened = time.perf_counter()
    gate.release()
    for thread in threads:
        thread.join(HANG)
    assert not any(thread.is_alive() for thread in threads)
    assert h.engine.settle(HANG)
    return results


async def run_tasks(h: Harness, fn: Any, scenario: Scenario, probe: Probe, gate: Gate) -> Outcomes:
    async def acaller(kind: str) -> tuple[str, int, tuple[str, Any, Any]]:
        ticket = probe.sequence()
        try:
            if kind == "call":
                r = await fn.lookup("k")
                return kind, ticket, ("ok", r.value, r.source)
            if kind == "many":
                return kind, ticket, ("ok", (await fn.many(["k"]))[0], None)
            return kind, ticket, ("ok", await fn.refresh("k"), "refresh")
        except (LoadError, LoaderTimeoutError) as exc:
            return kind, ticket, ("error", type(exc), str(exc))

    tasks = [asyncio.ensure_future(acaller(kind)) for kind in scenario.callers]
    for _ in range(int(HANG / 0.002)):
        if parked(h, fn, scenario, probe, sum(t.done() for t in tasks)):
            break
        await asyncio.sleep(0.002)
    probe.opened = time.perf_counter()
    gate.release()
    done = await asyncio.wait_for(asyncio.gather(*tasks), HANG)
    assert await h.engine.asettle(HANG)
    return list(done)


def expected_for_cache_callers(scenario: Scenario) -> tuple[str, Any, set[Any]]:
    """What a call or many() caller must get: (status, value or error type, Sources
    allowed); a value of "v" means any loaded value."""
    loaded = {Source.LOADER, Source.WAITED, None}
    stale = scenario.options["stale_if_error"] is not None and scenario.prior == "expired"
    if scenario.prior == "stale":
        return "ok", "old", {Source.STALE, None}
    if scenario.prior == "due":
        return "ok", "old", {Source.CACHE, None}
    if scenario.outcome == "value":
        return "ok", "v", loaded
    if scenario.outcome == "none":
        return "ok", None, loaded
    if stale:
        return "ok", "old", {Source.STALE, None}
    return "error", LoadError if scenario.outcome == "raises" else LoaderTimeoutError, set()


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(scenario=scenarios())
async def test_one_load_per_key_at_a_time_and_one_outcome_for_its_callers(
    h: Harness, scenario: Scenario
) -> None:
    probe, results = await run_scenario(h, scenario)
    # A hang the loader_timeout cut before every caller had joined is another example.
    assume(probe.joined_in_time())
    event(f"prior={scenario.prior} outcome={scenario.outcome}")
    event("many() through a batch_loader" if scenario.batched else "no batch_loader")
    event("with refresh()" if "refresh" in scenario.callers else "calls and many() only")

    # One load of the key at a time, whatever the options and callers.
    assert probe.most_at_once == 1, (probe.most_at_once, scenario)
    refreshes = [r for r in results if r[0] == "refresh"]
    if not refreshes:
        # Callers that missed together (or were answered from the cache while one
        # reload ran behind) share exactly one load.
        assert probe.runs == 1, (probe.runs, results, scenario)
    status, value, sources = expected_for_cache_callers(scenario)
    if refreshes and Source.LOADER in sources:
        sources = sources | {Source.CACHE, Source.NEGATIVE}  # it waited for a refresh, looked
    others = [r[2] for r in results if r[0] != "refresh"]
    for got in others:
        assert got[0] == status, (got, scenario)
        if status == "error":
            assert got[1] is value, (got, scenario)
        elif value == "v":
            assert str(got[1]).startswith("v"), (got, scenario)
        else:
            assert got[1] == value, (got, scenario)
        assert status == "error" or got[2] in sources, (got, scenario)
    if not refreshes:
        # Joined callers got the very same outcome, and at most one was the loader.
        assert len({(got[0], got[1]) for got in others}) == 1, (others, scenario)
        assert sum(got[2] is Source.LOADER for got in others) <= 1, (others, scenario)
    for _, ticket, got in refreshes:
        if scenario.outcome == "value":
            assert got[0] == "ok", (got, scenario)
            # A refresh answers with a load begun after it was called.
            assert int(got[1].split(":")[1]) > ticket, (got, ticket, scenario)
        elif scenario.outcome == "none":
            assert got[:2] == ("ok", None), (got, scenario)
        else:
            expected = LoadError if scenario.outcome == "raises" else LoaderTimeoutError
            assert got[:2] == ("error", expected), (got, scenario)


# -- the defects of issue 22, by name ------------------------------------------------


async def run_scenario(h: Harness, scenario: Scenario) -> tuple[Probe, Outcomes]:
    """One scenario, as an example of the property test runs it."""
    name = f"sf{next(_examples)}"
    probe = Probe(scenario.options["loader_timeout"] if scenario.outcome == "slow" else None)
    gate = Gate(h.mode)
    prime(h, name, scenario)
    loader = loader_for(h, scenario, probe, gate)
    loader.__qualname__ = f"{name}_loader"
    given = dict(scenario.options)
    if scenario.batched:
        given["batch_loader"] = batch_loader_for(h, loader)
    fn = cache_aside(key=f"{name}:<id>", engine=h.engine, **given)(loader)
    try:
        return probe, await run_callers(h, fn, scenario, probe, gate)
    finally:
        gate.finish()


def options(**given: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "ttl": TTL,
        "lock_ttl": LOCK_TTL,
        "grace": None,
        "stale_if_error": None,
        "loader_timeout": None,
        "refresh_ahead": None,
        "negative_ttl": 0,
    }
    return base | given


@pytest.mark.parametrize(
    ("given", "outcome"),
    [
        ({"stale_if_error": STALE_IF_ERROR}, "raises"),
        ({"stale_if_error": STALE_IF_ERROR, "loader_timeout": SLOW_TIMEOUT}, "slow"),
    ],
    ids=["loader-raises", "loader-times-out"],
)
async def test_eight_callers_of_an_expired_key_share_the_stale_answer_of_one_failed_load(
    h: Harness, given: dict[str, Any], outcome: str
) -> None:
    # Before: each joiner, handed a stale answer it could not take, loaded again in
    # turn (the loader ran 5 times for 8 threads).
    for _ in range(3):  # a hanging load cut before the 8 callers joined proves nothing
        probe, results = await run_scenario(
            h, Scenario(options(**given), "expired", outcome, ["call"] * 8)
        )
        if probe.joined_in_time():
            break
    assert probe.joined_in_time(), f"8 callers took over {SLOW_TIMEOUT} s to join, 3 times"
    assert probe.runs == 1
    assert [got for _, _, got in results] == [("ok", "old", Source.STALE)] * 8


async def test_eight_refreshes_at_once_load_one_at_a_time_each_after_its_call(h: Harness) -> None:
    # Before: each refresh revoked the one before it and loaded beside it.
    probe, results = await run_scenario(h, Scenario(options(), "cold", "value", ["refresh"] * 8))
    assert probe.most_at_once == 1
    # The first load, and at most one more for the refreshes that came while it ran.
    assert probe.runs <= 2
    for _, ticket, got in results:
        assert got[0] == "ok"
        assert int(got[1].split(":")[1]) > ticket  # loaded after the refresh was called


async def test_callers_that_joined_a_grace_answer_are_told_it_is_stale(h: Harness) -> None:
    # Before: tasks that joined the leader's stale answer were reported as WAITED.
    given = options(grace=GRACE)
    probe, results = await run_scenario(h, Scenario(given, "stale", "value", ["call"] * 8))
    assert [got for _, _, got in results] == [("ok", "old", Source.STALE)] * 8
    assert probe.runs == 1  # the one reload behind


async def test_a_refresh_waits_for_the_reload_behind_instead_of_loading_beside_it(
    h: Harness,
) -> None:
    scenario = Scenario(options(grace=GRACE), "stale", "value", ["call", "refresh"])
    name = f"sf{next(_examples)}"
    probe, gate = Probe(None), Gate(h.mode)
    prime(h, name, scenario)
    loader = loader_for(h, scenario, probe, gate)
    fn = cache_aside(key=f"{name}:<id>", engine=h.engine, **scenario.options)(loader)
    side = h.engine.sides.sync_side() if h.mode == "sync" else h.engine.sides.async_side()
    try:
        assert (await h.run(fn.lookup, "k")).source is Source.STALE  # and reloads behind
        await until(h, lambda: probe.in_loader == 1)
        if h.mode == "sync":
            refreshed: list[Any] = []
            thread = threading.Thread(target=lambda: refreshed.append(fn.refresh("k")))
            thread.start()
            await until(h, lambda: side.flights.waiting == 1 or probe.in_loader == 2)
            gate.release()
            thread.join(HANG)
            value = refreshed[0]
        else:
            task = asyncio.ensure_future(fn.refresh("k"))
            await until(h, lambda: side.flights.waiting == 1 or probe.in_loader == 2)
            gate.release()
            value = await asyncio.wait_for(task, HANG)
    finally:
        gate.finish()
    assert probe.most_at_once == 1
    assert probe.runs == 2
    assert value.startswith("v2:")


async def test_a_call_waiting_for_a_refresh_of_a_tagged_key_reads_it_with_its_tags(
    h: Harness,
) -> None:
    # Before: after waiting for the refresh, the call looked the key up without its tags'
    # versions, judged the stamped entry corrupt and loaded the key a second time.
    scenario = Scenario(options(tags=("shop:<id>",)), "cold", "value", ["refresh", "call"])
    name = f"sf{next(_examples)}"
    probe, gate = Probe(None), Gate(h.mode)
    loader = loader_for(h, scenario, probe, gate)
    fn = cache_aside(key=f"{name}:<id>", engine=h.engine, **scenario.options)(loader)
    side = h.engine.sides.sync_side() if h.mode == "sync" else h.engine.sides.async_side()
    try:
        refresh = Started(h, lambda: fn.refresh("k"))
        await until(h, lambda: probe.in_loader == 1)
        call = Started(h, lambda: fn.lookup("k"))
        await until(h, lambda: side.flights.waiting == 1 or probe.in_loader == 2)
        gate.release()
        refreshed, looked = await refresh.result(), await call.result()
    finally:
        gate.finish()
    assert refreshed[0] == "ok"
    assert looked[0] == "ok"
    assert looked[1].value == refreshed[1]
    assert looked[1].source is Source.CACHE  # read from Redis after the wait, not loaded
    assert probe.runs == 1
    assert fn.stats().corrupt == 0


async def until(h: Harness, condition: Callable[[], bool]) -> None:
    """Wait (a generous bound, never a speed claim) until `condition` holds."""
    for _ in range(int(HANG / 0.002)):
        if condition():
            return
        await asyncio.sleep(0.002)  # threads run on meanwhile; tasks need the loop
    raise AssertionError("the condition never held")


# -- many() with a batch_loader: the batch leads its keys' flights -------------------


class Started:
    """A call running beside the test: a thread (sync) or a task (async)."""

    def __init__(self, h: Harness, call: Callable[[], Any]) -> None:
        self.mode = h.mode
        self.got: list[tuple[str, Any]] = []
        if h.mode == "sync":

            def target() -> None:
                try:
                    self.got.append(("ok", call()))
                except Exception as exc:
                    self.got.append(("error", exc))

            self.thread = threading.Thread(target=target)
            self.thread.start()
        else:
            self.task = asyncio.ensure_future(call())

    async def result(self) -> tuple[str, Any]:
        if self.mode == "sync":
            self.thread.join(HANG)
            assert not self.thread.is_alive()
            return self.got[0]
        try:
            return "ok", await asyncio.wait_for(self.task, HANG)
        except Exception as exc:
            return "error", exc


def batched_function(h: Harness, scenario: Scenario, probe: Probe, gate: Gate, name: str) -> Any:
    """A function of the scenario's options with a batch_loader: one gated run of the
    primary per batch, whatever its size."""
    single = loader_for(h, scenario, probe, gate)
    if h.mode == "sync":

        def load_batch(ids: list[str]) -> list[Any]:
            return [single(ids[0])] * len(ids)

        batch: Callable[..., Any] = load_batch
    else:

        async def aload_batch(ids: list[str]) -> list[Any]:
            return [await single(ids[0])] * len(ids)

        batch = aload_batch
    single.__qualname__ = f"{name}_loader"
    return cache_aside(key=f"{name}:<id>", engine=h.engine, batch_loader=batch, **scenario.options)(
        single
    )


def side_of(h: Harness) -> Any:
    return h.engine.sides.sync_side() if h.mode == "sync" else h.engine.sides.async_side()


async def test_a_refresh_during_a_batch_load_waits_for_it_instead_of_loading_beside_it(
    h: Harness,
) -> None:
    # Before: the refresh revoked the batch's lock and ran the loader beside it.
    name = f"sf{next(_examples)}"
    probe, gate = Probe(None), Gate(h.mode)
    fn = batched_function(h, Scenario(options(), "cold", "value", []), probe, gate, name)
    try:
        batch = Started(h, lambda: fn.many(["k"]))
        await until(h, lambda: probe.in_loader == 1)
        refresh = Started(h, lambda: fn.refresh("k"))
        await until(h, lambda: side_of(h).flights.waiting == 1 or probe.in_loader == 2)
        gate.release()
        got_batch, got_refresh = await batch.result(), await refresh.result()
    finally:
        gate.finish()
    assert probe.most_at_once == 1
    assert probe.runs == 2  # the refresh's load began after its call: once the batch's ended
    assert got_batch[0] == "ok"
    assert got_batch[1][0].startswith("v1:")
    assert got_refresh[0] == "ok"
    assert got_refresh[1].startswith("v2:")


@pytest.mark.parametrize("first", ["batch", "call"])
async def test_a_call_and_a_batch_that_store_nothing_share_one_load(h: Harness, first: str) -> None:
    # Before: whichever came second waited on the Redis lock, found nothing stored
    # (cache_if refused it) and took over: a second load right after the first.
    name = f"sf{next(_examples)}"
    probe, gate = Probe(None), Gate(h.mode)
    scenario = Scenario(options(cache_if=lambda value: False), "cold", "value", [])
    fn = batched_function(h, scenario, probe, gate, name)

    def batch() -> Any:
        return fn.many(["k"])

    def call() -> Any:
        return fn.lookup("k")

    try:
        leader = Started(h, batch if first == "batch" else call)
        await until(h, lambda: probe.in_loader == 1)
        joiner = Started(h, call if first == "batch" else batch)
        await until(
            h,
            lambda: (
                side_of(h).flights.waiting == 1
                or fn.stats().lock_waits == 1
                or probe.in_loader == 2
            ),
        )
        gate.release()
        got_leader, got_joiner = await leader.result(), await joiner.result()
        assert h.engine.settle(HANG) if h.mode == "sync" else await h.engine.asettle(HANG)
    finally:
        gate.finish()
    assert probe.runs == 1
    results = {first: got_leader, ("call" if first == "batch" else "batch"): got_joiner}
    assert results["batch"] == ("ok", ["v1:0"])
    assert results["call"][0] == "ok"
    assert (results["call"][1].value, results["call"][1].source) == (
        "v1:0",
        Source.LOADER if first == "call" else Source.WAITED,
    )


def prime_expired(h: Harness, name: str, ids: list[str]) -> None:
    """Cache "old" for each id, expired past its grace but kept for stale_if_error."""

    def old(id: str) -> str:
        return "old"

    primer = cache_aside(
        key=f"{name}:<id>", engine=h.engine, ttl=TTL, stale_if_error=STALE_IF_ERROR
    )(old)
    for id in ids:
        assert primer(id) == "old"
        assert h.raw.pexpire(primer.key(id), STALE_IF_ERROR * 1000 - 1000)


async def test_a_failed_batch_load_serves_each_kept_value_stale_from_one_load(
    h: Harness,
) -> None:
    # Before: entries kept for stale_if_error left the batch, one load each.
    name = f"sf{next(_examples)}"
    probe, gate = Probe(None), Gate(h.mode)
    prime_expired(h, name, ["a", "b"])
    scenario = Scenario(options(stale_if_error=STALE_IF_ERROR), "expired", "raises", [])
    fn = batched_function(h, scenario, probe, gate, name)
    try:
        batch = Started(h, lambda: fn.many(["a", "b"]))
        await until(h, lambda: probe.in_loader == 1)
        joiner = Started(h, lambda: fn.lookup("b"))
        await until(h, lambda: side_of(h).flights.waiting == 1 or probe.in_loader == 2)
        gate.release()
        got_batch, got_joiner = await batch.result(), await joiner.result()
    finally:
        gate.finish()
    assert probe.runs == 1
    assert got_batch == ("ok", ["old", "old"])
    assert got_joiner[0] == "ok"
    assert (got_joiner[1].value, got_joiner[1].source) == ("old", Source.STALE)


async def test_a_failed_batch_load_raises_for_an_entry_without_a_kept_value(h: Harness) -> None:
    # The rule of a single call: without a kept value, the loader's error; a caller
    # joined to an entry that has one still gets it, as STALE.
    name = f"sf{next(_examples)}"
    probe, gate = Probe(None), Gate(h.mode)
    prime_expired(h, name, ["a"])
    scenario = Scenario(options(stale_if_error=STALE_IF_ERROR), "expired", "raises", [])
    fn = batched_function(h, scenario, probe, gate, name)
    try:
        batch = Started(h, lambda: fn.many(["a", "cold"]))
        await until(h, lambda: probe.in_loader == 1)
        joiner = Started(h, lambda: fn.lookup("a"))
        await until(h, lambda: side_of(h).flights.waiting == 1 or probe.in_loader == 2)
        gate.release()
        got_batch, got_joiner = await batch.result(), await joiner.result()
    finally:
        gate.finish()
    assert probe.runs == 1
    assert got_batch[0] == "error"
    assert isinstance(got_batch[1], LoadError)
    assert (got_joiner[1].value, got_joiner[1].source) == ("old", Source.STALE)
    assert fn.stats().stale >= 1


def test_threads_sharing_a_failed_load_all_get_its_exception(engine: CacheEngine) -> None:
    """consistency.md, "Owner failure": callers in the loader's own process that were
    sharing its call get its exception."""
    calls: list[str] = []

    @cache_aside(key="shared-failure:<id>", ttl=30, engine=engine)
    def load(id: str) -> str:
        calls.append(id)
        # Fails once the 7 others share this load, however late a thread starts.
        assert wait_until(lambda: engine.sides.sync_side().flights.waiting == 7, HANG)
        raise LoaderFailedError(f"primary down for {id}")

    start = threading.Barrier(8)
    outcomes: list[object] = []

    def call() -> None:
        start.wait()
        try:
            outcomes.append(load("k"))
        except LoaderFailedError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=call) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert calls == ["k"]  # one load, whose failure every caller got
    assert len(outcomes) == 8
    assert all(isinstance(o, LoaderFailedError) for o in outcomes)
    assert {str(o) for o in outcomes} == {"primary down for k"}


async def test_tasks_sharing_a_failed_load_all_get_its_exception(engine: CacheEngine) -> None:
    """The same for asyncio tasks of one event loop."""
    calls: list[str] = []

    @cache_aside(key="shared-failure:<id>", ttl=30, engine=engine)
    async def load(id: str) -> str:
        calls.append(id)
        await asyncio.sleep(0.3)
        raise LoaderFailedError(f"primary down for {id}")

    outcomes = await asyncio.gather(*(load("k") for _ in range(8)), return_exceptions=True)
    assert calls == ["k"]
    assert all(isinstance(o, LoaderFailedError) for o in outcomes)
    assert {str(o) for o in outcomes} == {"primary down for k"}


def test_fifty_threads_on_a_cold_key_load_once(engine: CacheEngine) -> None:
    calls = []

    @cache_aside(key="cold:<id>", ttl=30, engine=engine)
    def slow(id: str) -> dict[str, str]:
        calls.append(id)
        time.sleep(0.1)
        return {"id": id}

    results: list[Any] = []
    threads = [threading.Thread(target=lambda: results.append(slow("k"))) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == ["k"]
    assert results == [{"id": "k"}] * 50
    stats = slow.stats()
    assert stats.loads == 1
    # the others waited for that load, or (late starters) found it stored
    assert stats.stampedes_suppressed + stats.hits == 49
    assert stats.misses == stats.stampedes_suppressed + 1


async def test_five_hundred_tasks_on_a_cold_key_load_once(engine: CacheEngine) -> None:
    calls = []

    @cache_aside(key="cold:<id>", ttl=30, engine=engine)
    async def slow(id: str) -> list[str]:
        calls.append(id)
        await asyncio.sleep(0.1)
        return [id]

    results = await asyncio.gather(*(slow("k") for _ in range(500)))
    assert calls == ["k"]
    assert results == [["k"]] * 500
    assert slow.stats().stampedes_suppressed == 499


async def test_joined_callers_get_independent_copies(engine: CacheEngine) -> None:
    @cache_aside(key="copy:<id>", ttl=30, engine=engine)
    async def load(id: str) -> dict[str, list[int]]:
        await asyncio.sleep(0.05)
        return {"items": [1, 2]}

    first, second = await asyncio.gather(load("a"), load("a"))
    first["items"].append(3)
    assert second == {"items": [1, 2]}


def test_engines_sharing_only_redis_load_once(engine: CacheEngine, twin: Any) -> None:
    engines = [engine, *(twin() for _ in range(3))]
    calls = []
    functions = []
    for each in engines:
        # A lock far above any stall: this proves single flight, not lease renewal.
        @cache_aside(key="shared:<id>", ttl=30, lock_ttl=60, engine=each)
        def slow(id: str) -> str:
            calls.append(id)
            time.sleep(0.2)
            return id.upper()

        functions.append(slow)
    results: list[Any] = []
    threads = [
        threading.Thread(target=lambda f=f: results.append(f.lookup("x")))
        for f in functions
        for _ in range(5)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == ["x"]
    assert [r.value for r in results] == ["X"] * 20
    # Everyone else waited for that load, or read it once it was stored (threads take
    # a shared answer only when it is a load, never a plain read).
    stats = [f.stats() for f in functions]
    assert sum(s.stampedes_suppressed + s.hits for s in stats) == 19
    assert sum(s.loads for s in stats) == 1


PROCESS_SCRIPT = textwrap.dedent(
    """
    import sys, threading, time
    from cached_aside import CacheEngine, cache_aside
    url, prefix, log = sys.argv[1:4]
    engine = CacheEngine.from_url(url, prefix=prefix)

    # A lock far above any stall: this proves single flight, not lease renewal.
    @cache_aside(key="multi:<id>", ttl=30, lock_ttl=60, engine=engine)
    def load(id):
        with open(log, "a") as out:
            out.write("load\\n")
        time.sleep(0.3)
        return {"id": id}

    start = float(sys.argv[4])
    time.sleep(max(0.0, start - time.time()))
    results = []
    threads = [threading.Thread(target=lambda: results.append(load("k"))) for _ in range(20)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert results == [{"id": "k"}] * 20, results
    stats = load.stats()
    print(stats.stampedes_suppressed + stats.hits)  # callers served without loading
    """
)


@needs_real_redis
@pytest.mark.slow
def test_processes_share_one_load(tmp_path: Path) -> None:
    assert REDIS_URL is not None
    prefix = unique_prefix()
    log = tmp_path / "loads.txt"
    start = time.time() + 1.5  # let every interpreter start before the stampede
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", PROCESS_SCRIPT, REDIS_URL, prefix, str(log), str(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = [process.communicate(timeout=60) for process in processes]
    try:
        assert all(p.returncode == 0 for p in processes), outputs
        assert log.read_text().splitlines() == ["load"]
        assert sum(int(out) for out, _ in outputs) == 79
    finally:
        cleanup = redis.Redis.from_url(REDIS_URL)
        delete_prefix(cleanup, prefix)
        cleanup.close()


TRIALS = 30


def test_fifty_threads_on_two_engines_load_once_in_every_trial(
    engine: CacheEngine, twin: Any
) -> None:
    engines = [engine, twin()]
    loads: list[str] = []
    functions = []
    for each in engines:
        # A lock far above any stall: this proves single flight, not lease renewal.
        @cache_aside(key="trial:<id>", ttl=30, lock_ttl=60, engine=each)
        def load(id: str) -> str:
            loads.append(id)
            time.sleep(0.02)
            return id

        functions.append(load)
    for trial in range(TRIALS):
        results: list[str] = []

        def call(i: int, key: str = f"k{trial}", out: list[str] = results) -> None:
            out.append(functions[i % 2](key))

        run_in_threads(50, call)
        assert results == [f"k{trial}"] * 50
    assert sorted(loads) == sorted(f"k{t}" for t in range(TRIALS))  # one load per trial


async def test_five_hundred_tasks_load_once_in_every_trial(engine: CacheEngine) -> None:
    loads: list[str] = []

    @cache_aside(key="trial:<id>", ttl=30, engine=engine)
    async def load(id: str) -> str:
        loads.append(id)
        await asyncio.sleep(0.01)
        return id

    for trial in range(TRIALS):
        assert await asyncio.gather(*(load(f"k{trial}") for _ in range(500))) == [f"k{trial}"] * 500
    assert loads == [f"k{t}" for t in range(TRIALS)]


PROCESS_TRIALS_SCRIPT = textwrap.dedent(
    """
    import sys, threading, time
    from cached_aside import CacheEngine, cache_aside
    url, prefix, log, start, trials = sys.argv[1:6]
    engine = CacheEngine.from_url(url, prefix=prefix)

    # A lock far longer than any stall of a CPU-starved process: this proves single
    # flight, not lease renewal (the 1 s default lapsed before its renewal ran).
    @cache_aside(key="trial:<id>", ttl=30, lock_ttl=60, engine=engine)
    def load(id):
        with open(log, "a") as out:
            out.write(id + "\\n")
        time.sleep(0.05)
        return id

    for trial in range(int(trials)):
        time.sleep(max(0.0, float(start) + trial * 0.25 - time.time()))
        results = []
        threads = [threading.Thread(target=lambda: results.append(load(f"k{trial}")))
                   for _ in range(20)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert results == [f"k{trial}"] * 20, results
    """
)


@pytest.mark.slow
def test_four_processes_of_twenty_threads_load_once_in_every_trial(tmp_path: Path) -> None:
    if REDIS_URL is None:
        pytest.skip("no Redis server reachable at REDIS_URL or 127.0.0.1:6379")
    prefix = unique_prefix()
    log = tmp_path / "loads.txt"
    start = time.time() + 2.0
    argv = [
        sys.executable,
        "-c",
        PROCESS_TRIALS_SCRIPT,
        REDIS_URL,
        prefix,
        str(log),
        str(start),
        str(TRIALS),
    ]
    processes = [subprocess.Popen(argv, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    try:
        errors = [process.communicate(timeout=120)[1] for process in processes]
        assert all(p.returncode == 0 for p in processes), errors
        assert sorted(log.read_text().split()) == sorted(f"k{t}" for t in range(TRIALS))
    finally:
        cleanup = redis.Redis.from_url(REDIS_URL)
        delete_prefix(cleanup, prefix)
        cleanup.close()


async def test_five_hundred_tasks_cost_a_few_round_trips_and_one_lock_attempt(
    engine: CacheEngine,
) -> None:
    """Each task looks for itself (a lookup is never shared: its reply may predate a
    task that began after another process's invalidation), but their lookups go out
    together on the loop's shared connection, and only the first miss takes the lock
    and loads: the others join it."""

    @cache_aside(key="count:<id>", ttl=30, engine=engine)
    async def load(id: str) -> str:
        # Hold the load until every other task has joined, however slow the machine.
        flight = engine.sides.async_side().flights.active[load.key(id)]
        for _ in range(500):
            if len(flight.joiners or ()) == 499:
                break
            await asyncio.sleep(0.01)
        return id

    for script in ScriptName:  # known to the server: no NOSCRIPT round trips counted
        await engine.async_client().script_load(script.value)
    counted = counting_writes(engine.async_client())
    assert await asyncio.gather(*(load("k") for _ in range(500))) == ["k"] * 500
    sent = counted.ops
    # the first lookup alone, the 499 others in one write (with the lock attempt, or
    # just before it), the store: never a round trip per task
    assert len(sent) <= 4, sent
    assert sum("ACQUIRE" in op for op in sent) == 1, sent
    assert load.stats().loads == 1


# -- a refresh waits for every call's load of its process -----------------------------


def _served() -> tuple[Any, float]:
    return Served(value="v", source=Source.LOADER), 0.0


@pytest.mark.parametrize("gone", ["forgotten", "sealed"])
def test_a_refresh_waits_for_a_calls_flight_that_no_longer_takes_joiners(gone: str) -> None:
    """Was a defect (the property test above found it: two loads of a key at once): a
    refresh ending calls forget() on the key, so that no later caller joins a read
    from before it; a call's flight waiting on that refresh was forgotten, yet woke
    and loaded, and the next refresh, finding no flight of the key, revoked the lock
    and loaded beside it. A sealed flight (a waiter woken looks again and may take
    the lock) is no different. Such flights are still running: a refresh waits for
    them."""
    flights = ThreadFlights()
    inside, release = threading.Event(), threading.Event()

    def serve(seal: Callable[[], None]) -> tuple[Any, float]:
        if gone == "sealed":
            seal()
        else:
            flights.forget("k")
        inside.set()
        assert release.wait(HANG)
        return _served()

    call = threading.Thread(target=flights.run, args=("k", HANG, serve))
    call.start()
    try:
        assert inside.wait(HANG)
        with flights._lock:  # a refresh arriving while the call loads
            role, reload, before = flights._reload_turn("k")
        assert role == "lead"
        assert before is not None, "the refresh would load beside the call's load"
        assert not flights.active  # no caller joins the flight, though
    finally:
        release.set()
        call.join(HANG)
    assert flights._take_turn(reload) is None  # the call's flight ended: its turn
    assert flights.running == {}


async def test_a_task_refresh_waits_for_a_forgotten_calls_flight() -> None:
    """As above, for tasks."""
    flights = TaskFlights()
    inside, release = asyncio.Event(), asyncio.Event()

    async def serve(seal: Callable[[], None]) -> tuple[Any, float]:
        flights.forget("k")
        inside.set()
        await release.wait()
        return _served()

    call = asyncio.ensure_future(flights.run("k", HANG, serve))
    try:
        await asyncio.wait_for(inside.wait(), HANG)
        role, reload, before = flights._reload_turn("k")
        assert (role, before is not None) == ("lead", True)
    finally:
        release.set()
        await asyncio.wait_for(call, HANG)
    assert flights._take_turn(reload) is None
    assert flights.running == {}


@pytest.mark.parametrize("method", ["run", "reload"])
def test_a_refresh_waits_for_a_joiner_that_gave_up_on_its_leader_and_reads_alone(
    method: str,
) -> None:
    """Was a defect: a joiner whose patience ran out reads by itself (a call's joiner,
    or a refresh that joined another's reload), and that read may load (its leader
    failed meanwhile and freed the lock), yet it was no flight of the registry; once
    the leader ended, a refresh found the key free, revoked the lock and loaded
    beside it. A read alone runs as a flight too."""
    flights = ThreadFlights()
    start = getattr(flights, method)
    leading, leader_goes = threading.Event(), threading.Event()
    alone, alone_goes = threading.Event(), threading.Event()

    def lead(seal: Callable[[], None]) -> tuple[Any, float]:
        leading.set()  # not sealed: a reload's load has not begun, refreshes join it
        assert leader_goes.wait(HANG)
        return _served()

    def read_alone(seal: Callable[[], None]) -> tuple[Any, float]:
        alone.set()
        assert alone_goes.wait(HANG)
        return _served()

    leader = threading.Thread(target=start, args=("k", HANG, lead))
    leader.start()
    # No patience at all: the joiner gives up on the leader at once.
    joiner = threading.Thread(target=start, args=("k", 0.0, read_alone))
    try:
        assert leading.wait(HANG)
        joiner.start()
        assert alone.wait(HANG)
        leader_goes.set()
        leader.join(HANG)
        assert not leader.is_alive()
        with flights._lock:  # a refresh arriving while only the lone read loads
            role, reload, before = flights._reload_turn("k")
        assert role == "lead"
        assert before is not None, "the refresh would load beside the lone read"
    finally:
        leader_goes.set()
        alone_goes.set()
        leader.join(HANG)
        joiner.join(HANG)
    assert flights._take_turn(reload) is None
    assert flights.running == {}


def test_a_refresh_waits_for_a_joiner_that_loads_alone_after_its_leader_failed(
    engine: CacheEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The defect above, end to end (the loader ran twice at once before): a joiner
    gives up on its hanging leader and waits on the Redis lock; the leader fails and
    frees the lock, the joiner takes it and loads; a refresh arriving then waits for
    that load instead of revoking its lock and loading beside it."""
    monkeypatch.setattr(cached_aside._plan, "PATIENCE_FLOOR_S", 0.0)  # patience: lock_ttl
    guard = threading.Lock()
    runs, at_once, most = 0, 0, 0
    first_in, first_goes = threading.Event(), threading.Event()
    second_in, second_goes = threading.Event(), threading.Event()
    third_in = threading.Event()

    def load(id: str) -> str:
        nonlocal runs, at_once, most
        with guard:
            runs += 1
            run, at_once = runs, at_once + 1
            most = max(most, at_once)
        try:
            if run == 1:
                first_in.set()
                assert first_goes.wait(HANG)
                raise LoadError("the primary failed")
            if run == 2:
                second_in.set()
                assert second_goes.wait(HANG)
            else:
                third_in.set()
            return f"v{run}"
        finally:
            with guard:
                at_once -= 1

    fn = cache_aside(key="alone:<id>", ttl=TTL, lock_ttl=1, engine=engine)(load)
    flights = engine.sides.sync_side().flights
    results: dict[str, Any] = {}

    def caller(name: str, call: Callable[[], Any]) -> None:
        results[name] = outcome_of(lambda: (call(), None))

    threads = [
        threading.Thread(target=caller, args=("leader", lambda: fn("k"))),
        threading.Thread(target=caller, args=("joiner", lambda: fn("k"))),
        threading.Thread(target=caller, args=("refresh", lambda: fn.refresh("k"))),
    ]
    try:
        threads[0].start()
        assert first_in.wait(HANG)
        threads[1].start()
        assert wait_until(lambda: fn.stats().lock_waits >= 1, HANG)  # gave up: on Redis
        first_goes.set()
        threads[0].join(HANG)
        assert second_in.wait(HANG)  # the joiner loads alone
        threads[2].start()
        assert wait_until(lambda: third_in.is_set() or flights.waiting >= 1, HANG)
    finally:
        first_goes.set()
        second_goes.set()
        for thread in threads:
            if thread.ident is not None:
                thread.join(HANG)
    assert most == 1, "two loads of the key at once"
    assert results == {
        "leader": ("error", LoadError, "the primary failed"),
        "joiner": ("ok", "v2", None),
        "refresh": ("ok", "v3", None),
    }


@pytest.mark.parametrize("join", ["run", "reload"])
async def test_a_task_refresh_waits_for_a_joiner_that_gave_up_and_reads_alone(join: str) -> None:
    """As above, for tasks: a call's joiner and a refresh's joiner reading alone."""
    flights = TaskFlights()
    leading, leader_goes = asyncio.Event(), asyncio.Event()
    alone, alone_goes = asyncio.Event(), asyncio.Event()

    async def lead(seal: Callable[[], None]) -> tuple[Any, float]:
        leading.set()
        await leader_goes.wait()
        return _served()

    async def read_alone(seal: Callable[[], None]) -> tuple[Any, float]:
        alone.set()
        await alone_goes.wait()
        return _served()

    way = flights.run if join == "run" else flights.reload
    leader = asyncio.ensure_future(way("k", HANG, lead))
    await asyncio.wait_for(leading.wait(), HANG)
    joiner = asyncio.ensure_future(way("k", 0.0, read_alone))  # gives up at once
    try:
        await asyncio.wait_for(alone.wait(), HANG)
        leader_goes.set()
        await asyncio.wait_for(leader, HANG)
        role, reload, before = flights._reload_turn("k")
        assert (role, before is not None) == ("lead", True)
    finally:
        leader_goes.set()
        alone_goes.set()
        await asyncio.wait_for(asyncio.gather(leader, joiner), HANG)
    assert flights._take_turn(reload) is None
    assert flights.running == {}


class _Interrupt(BaseException):
    """Stands for a KeyboardInterrupt, which lands at any Python call of the main
    thread (pytest would take a real one as the user's)."""


def test_a_call_interrupted_as_it_registers_its_flight_leaves_nothing_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Was a defect: an interrupt landing in started() (a Python call, where the
    interpreter delivers a KeyboardInterrupt) left the flight in `active`, so every
    later caller of the key joined it and waited its patience out, and after a fork
    nothing ever ended it. Registered inside `with flight:`, it ends with the call."""
    flights = ThreadFlights()
    monkeypatch.setattr(
        flights, "started", lambda flight: (_ for _ in ()).throw(_Interrupt()), raising=False
    )
    with pytest.raises(_Interrupt):
        flights.run("k", HANG, lambda seal: _served())
    assert flights.active == {}
    assert flights.running == {}
    monkeypatch.undo()
    assert flights.run("k", HANG, lambda seal: _served()) == (_served(), False)  # led at once


def test_a_refresh_interrupted_as_it_takes_its_turn_leaves_nothing_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same for fn.refresh(): an interrupt landing as its reload gets its Event
    (a Python call, after _reload_turn registered the reload) left the reload in
    `reloading` for good: every later refresh joined it and waited twice its
    patience, and every call about to load waited for it first."""
    flights = ThreadFlights()
    made = 0

    class Interrupting(threading.Event):
        def __init__(self) -> None:
            nonlocal made
            made += 1
            raise _Interrupt()

    # This module's threading only: other threads of the test run make Events too.
    only_here = types.SimpleNamespace(Event=Interrupting, Lock=threading.Lock)
    monkeypatch.setattr(cached_aside._flights, "threading", only_here)
    with pytest.raises(_Interrupt):
        flights.reload("k", HANG, lambda seal: _served())
    monkeypatch.undo()
    assert made == 1
    assert flights.reloading == {}
    assert flights.following == {}
    assert flights.running == {}
    assert flights.reload("k", HANG, lambda seal: _served()) == (_served(), False)
