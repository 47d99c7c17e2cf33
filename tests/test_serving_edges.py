"""Edges of serving through failures, found by a review of issue 15: a cancelled
probe of the loader breaker, a child forked during a probe, a loader's own
TimeoutError, a reload whose result is not to be cached, and an entry with under a
millisecond left on a function that keeps nothing past its ttl."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from typing import Any

import msgpack
import pytest

from cached_aside import (
    CacheEngine,
    LoaderCircuitOpenError,
    LoaderTimeoutError,
    Source,
    cache_aside,
)
from cached_aside._codecs import (
    COMPRESSED_MARK,
    MAX_DECOMPRESSED_BYTES,
    MSGPACK_CODEC,
    MsgpackCodec,
)
from cached_aside._loads import MAX_ABANDONED_LOADS
from cached_aside._options import Options
from cached_aside._plan import Plan
from cached_aside._reads import Age, peeked
from cached_aside._stats import Stats

from .conftest import (
    PATIENCE,
    REDIS_URL,
    Harness,
    delete_prefix,
    needs_real_redis,
    unique_prefix,
)


async def test_a_cancelled_probe_does_not_keep_the_loader_breaker_open(
    engine: CacheEngine,
) -> None:
    # Was a defect: in the breaker's half-open state, allow()
    # lets one call probe and sets _probing (_breaker.py:56). _guarded_load
    # (_flows.py:418-431) calls success()/failure() only when the loader returns or
    # raises an Exception; a CancelledError (asyncio.wait_for/timeouts in a web
    # handler, a client disconnect) or any BaseException in the probe leaves
    # _probing True for ever: allow() then refuses every later call, so the loader
    # is skipped until a fn.refresh() succeeds: every call without a kept value
    # raises LoaderCircuitOpenError, every other gets stale data, indefinitely.
    # Fix: in _guarded_load, `except BaseException` (re-raised) releases the probe
    # (a `breaker.abandon()` that clears _probing and leaves the state open).
    mode = {"now": "fail"}

    @cache_aside(key="b:<id>", ttl=30, stale_if_error=60, engine=engine)
    async def load(id: str) -> str:
        if mode["now"] == "fail":
            raise RuntimeError("the primary is down")
        if mode["now"] == "hang":
            await asyncio.sleep(5)
        return "ok"

    breaker = load._plan.loader_breaker
    assert breaker is not None
    breaker.cooldown = 0.05
    now = [time.monotonic()]  # the breaker's clock moves when the test says
    breaker.clock = lambda: now[0]
    for id in range(5):
        with pytest.raises(RuntimeError):
            await load(str(id))
    assert breaker.state == "open"
    now[0] += 0.06  # half-open: the next call probes
    mode["now"] = "hang"
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(load("probe"), 0.1)  # the probe is cancelled
    mode["now"] = "ok"  # the primary is back
    now[0] += 0.2
    assert await load("after") == "ok", "the breaker stays open after a cancelled probe"


async def test_a_loaders_own_timeout_error_is_not_reported_as_loader_timeout(
    h: Harness,
) -> None:
    # Was a defect: on Python 3.11+ asyncio.TimeoutError and
    # concurrent.futures.TimeoutError ARE the builtin TimeoutError, so the
    # `except asyncio.TimeoutError` around wait_for (_loads.py:94) and `except
    # FutureTimeoutError` around future.result (_loads.py:152) also catch a
    # TimeoutError the loader raised itself at once (a DB driver's statement or
    # socket timeout): it is reported as "ran past loader_timeout (5 s)" and, with
    # `from None`, the loader's own exception and traceback are lost. Fix: tell the
    # two apart (sync: `outcome.done()` after the wait; async: asyncio.timeout()
    # and check whether the deadline expired) and re-raise the loader's own error.
    def load(id: str) -> str:
        raise TimeoutError("database statement timeout")

    fn = h.cached(load, key="t:<id>", loader_timeout=5)
    with pytest.raises(TimeoutError) as raised:
        await h.run(fn, "a")
    assert not isinstance(raised.value, LoaderTimeoutError), str(raised.value)
    assert "database statement timeout" in str(raised.value)


@needs_real_redis
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_child_forked_during_a_probe_can_load() -> None:
    # Was a defect: the per-function loader breakers are not reset after
    # fork (CacheEngine._after_fork_in_child resets the Redis breaker, flights and
    # stats, not Plan.loader_breaker; _engine.py:590 at HEAD). A child forked while a
    # parent thread was the half-open probe inherits _probing=True, with no thread
    # left to clear it: every call of that function in the child without a kept
    # value raises LoaderCircuitOpenError for the life of the child (gunicorn
    # --preload, multiprocessing); its lock may also be copied held. Fix: keep the
    # loader breakers reachable (the weak `decorated` set) and reset_after_fork()
    # them in the child.
    assert REDIS_URL is not None
    prefix = unique_prefix()
    engine = CacheEngine.from_url(REDIS_URL, prefix=prefix)
    mode = {"now": "fail"}
    probing, release = threading.Event(), threading.Event()

    @cache_aside(key="f:<id>", ttl=30, stale_if_error=60, engine=engine)
    def load(id: str) -> str:
        if mode["now"] == "fail":
            raise RuntimeError("the primary is down")
        if mode["now"] == "hang":
            probing.set()
            release.wait(PATIENCE)
        return "ok"

    breaker = load._plan.loader_breaker
    assert breaker is not None
    breaker.cooldown = 0.05
    now = [time.monotonic()]  # the breaker's clock moves when the test says
    breaker.clock = lambda: now[0]
    try:
        for id in range(5):
            with pytest.raises(RuntimeError):
                load(str(id))
        now[0] += 0.06
        mode["now"] = "hang"
        thread = threading.Thread(target=load, args=("probe",))
        thread.start()
        assert probing.wait(PATIENCE)
        reading, writing = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child
            try:
                mode["now"] = "ok"
                now[0] += 0.1
                try:
                    answer = load("child")
                except Exception as exc:
                    answer = type(exc).__name__
                os.write(writing, json.dumps(answer).encode())
            finally:
                os._exit(0)
        os.close(writing)
        release.set()
        thread.join()
        os.waitpid(pid, 0)
        answer = json.loads(os.read(reading, 1000))
        os.close(reading)
        assert answer == "ok", f"the child got {answer}"
    finally:
        delete_prefix(engine.client(), prefix)
        engine.close()


async def test_a_reload_whose_result_is_not_storable_does_not_leave_the_old_value(
    h: Harness,
) -> None:
    # Was a defect: what_to_store answers RELEASE_ONLY for a result that is not to
    # be stored (cache_if says no; None with negative_ttl=0; _flows.py:460-467), and
    # the store script then only gives the lock back: whatever was cached stays.
    # For a plain miss nothing was cached, but a reload REPLACES an entry:
    # fn.refresh() (documented "reload now and store, whatever is cached") returns
    # "no such record" and leaves the deleted row cached and fresh for its ttl; a
    # grace reload leaves the stale value served to the end of the grace (and
    # every hit starts another load whose answer is dropped). fn.set() gets this
    # right: it invalidates instead. Fix: a STORE kind that deletes the value under
    # the lease ('delete': DEL KEYS[1] if the lock is still ours) for reloads
    # (replace=True and _refresh) and for loads that had a kept value.
    rows: dict[str, Any] = {"a": {"v": 1}}
    fn = h.cached(lambda id: rows.get(id), key="rr:<id>", ttl=30, negative_ttl=0)
    assert await h.run(fn, "a") == {"v": 1}
    del rows["a"]  # the row is deleted; the writer refreshes the entry
    assert await h.run(fn.refresh, "a") is None
    assert await h.run(fn, "a") is None, "refresh() left the deleted row cached"


async def test_a_grace_reload_refused_by_cache_if_does_not_keep_serving_the_old_value(
    h: Harness,
) -> None:
    # Was the same defect through grace: the background reload's result fails cache_if
    # (an order that is no longer final), so it is not stored, and the old value
    # keeps being served as "stale" until the grace runs out.
    rows = {"a": {"status": "final", "v": 1}}
    loads = []

    def load(id: str) -> dict[str, Any]:
        loads.append(id)
        return dict(rows[id])

    fn = h.cached(load, key="rc:<id>", ttl=30, grace=10, cache_if=lambda o: o["status"] == "final")
    await h.run(fn, "a")
    rows["a"] = {"status": "reopened", "v": 2}
    assert h.raw.pexpire(fn.key("a"), 9_000)  # 1 s into its grace
    assert (await h.run(fn.lookup, "a")).source is Source.STALE
    assert await h.engine.asettle() if h.mode == "async" else h.engine.settle()
    result = await h.run(fn.lookup, "a")
    assert result.value == {"status": "reopened", "v": 2}, "the refused reload left it stale"


@pytest.mark.parametrize(("options", "age"), [({"refresh_ahead": 5}, Age.DUE), ({}, Age.FRESH)])
def test_an_entry_with_under_a_millisecond_left_is_not_past_its_ttl(
    options: dict[str, int], age: Age
) -> None:
    """PTTL 0 means under 1 ms left. With nothing kept past the ttl (no grace, no
    stale_if_error) that entry is still fresh: taken for expired, a loader error
    was answered with it as stale, on a function that never asked for that."""
    plan = Plan(
        "get_product",
        MSGPACK_CODEC,
        Options.of(cache_aside(key="product:<id>", ttl=30, **options)),
        Stats("get_product"),
        peek=True,
    )
    found, seen, left = peeked(plan, [msgpack.packb({"v": 1}), 0])
    assert (found, seen, left) == ({"v": 1}, age, 0)


def test_a_value_past_the_decompression_cap_is_stored_plain() -> None:
    """Compressed, a value over the 64 MiB cap on decompression (a guard against
    foreign bombs) would be stored and never read back: every call a corrupt miss."""
    codec = MsgpackCodec(compress_over=1024)
    big = "x" * (MAX_DECOMPRESSED_BYTES + 16)
    payload, _ = codec.encode(big, "t")
    assert not payload[0].startswith(COMPRESSED_MARK)
    assert codec.decode(payload[0]) == big
    small, _ = codec.encode("y" * 4096, "t")
    assert small[0].startswith(COMPRESSED_MARK)  # under the cap: compressed as before


async def test_update_field_does_not_make_a_kept_entry_fresh(h: Harness) -> None:
    # Was a defect: with stale_if_error (or grace), an entry past its ttl stays in
    # Redis for the kept time; UPDATE_FIELD (_scripts.py:122-143) updates any
    # record it finds and PEXPIREs it to ttl + kept (_flows.py:547), so a record
    # older than its ttl (its other fields possibly out of date: ttl is the bound on
    # staleness for writes nobody invalidated) is served as FRESH for another ttl.
    # Without a kept time the same call answers ABSENT and the next call loads. Fix:
    # UPDATE_FIELD takes the kept time (ARGV) and, when PTTL <= kept, deletes the
    # entry (or leaves it as it is) and answers ABSENT; never renews a kept entry.
    rows = {"name": "x", "price": "1"}
    fn = h.cached(lambda id: dict(rows), key="k:<id>", as_hash=True, ttl=30, stale_if_error=60)
    await h.run(fn, "a")
    assert h.raw.pexpire(fn.key("a"), 50_000)  # 10 s past its ttl: kept for errors only
    rows.update(name="y", price="2")  # the write, then the field update
    await h.run(fn.update_field, "a", "name", "y")
    result = await h.run(fn.lookup, "a")
    assert result.source is not Source.CACHE, "a record past its ttl was made fresh again"
    assert result.value == {"name": "y", "price": "2"}


async def test_update_field_does_not_cache_a_record_cache_if_refuses(h: Harness) -> None:
    # Was a defect: set() applies cache_if (what_to_store), update_field()
    # does not (_flows.py:526-551): updating a field so that the record fails the
    # predicate (an order that is no longer final) leaves it cached, and served as
    # fresh for a whole ttl, though cache_if says such records are never cached.
    # Fix: for a function with cache_if, update_field checks the updated record
    # (HGETALL + check, or simply invalidates instead of updating).
    rows = {"a": {"status": "final", "total": "10"}}
    fn = h.cached(
        lambda id: dict(rows[id]),
        key="uc:<id>",
        as_hash=True,
        cache_if=lambda order: order["status"] == "final",
    )
    await h.run(fn, "a")
    rows["a"]["status"] = "reopened"  # the write, then the field update
    await h.run(fn.update_field, "a", "status", "reopened")
    result = await h.run(fn.lookup, "a")
    assert result.source is not Source.CACHE, "cache_if refuses this record, yet it is cached"


async def test_refresh_after_a_write_does_not_take_a_load_that_read_before_it(
    h: Harness,
) -> None:
    # Was a defect: fn.refresh() is documented "after a change you know of", but
    # when a load is in flight (it read the row BEFORE the write) refresh() waits for
    # it and takes its value (miss(replace=True) -> HELD -> woken -> FOUND,
    # _flows.py:343-353 and :554-557): it returns the old row and leaves it cached
    # for a whole ttl, though the caller had written the new one first. set() and
    # invalidate() revoke such a lease; refresh() does not. Fix: reload revokes the
    # lease of the load in flight (DEL the lock and wake its waiters, keeping the
    # value) before taking the lock, so its older result is refused and this
    # reload's stands.
    rows = {"v": 1}
    read, refreshed_sync = threading.Event(), threading.Event()
    refreshed_async = asyncio.Event()
    fn: Any
    if h.mode == "async":

        async def aload(id: int) -> dict[str, int]:
            row = dict(rows)
            if not read.is_set():
                read.set()
                await refreshed_async.wait()  # the slow first load, after its read
            return row

        fn = cache_aside(key="r:<id>", ttl=30, engine=h.engine)(aload)
        loading = asyncio.ensure_future(fn(1))
    else:

        def load(id: int) -> dict[str, int]:
            row = dict(rows)
            if not read.is_set():
                read.set()
                refreshed_sync.wait(PATIENCE)
            return row

        fn = cache_aside(key="r:<id>", ttl=30, engine=h.engine)(load)
        loading = asyncio.ensure_future(asyncio.to_thread(fn, 1))
    assert await asyncio.to_thread(read.wait, PATIENCE)
    rows["v"] = 2  # the write
    try:
        if h.mode == "async":
            refreshed = await fn.refresh(1)
        else:
            refreshed = await asyncio.to_thread(fn.refresh, 1)
    finally:  # the first load ends after the refresh, however slow the machine
        refreshed_sync.set()
        refreshed_async.set()
    assert await loading == {"v": 1}
    assert refreshed == {"v": 2}, "refresh() after a write returned the row read before it"
    assert await h.run(fn, 1) == {"v": 2}


async def test_the_batch_loader_goes_through_the_loader_breaker(h: Harness) -> None:
    # Was a defect: with stale_if_error, "after 5 failures in a row the loader is
    # skipped for 1 s". many()'s batch path calls the batch loader directly
    # (_batches.py:239, LoadSome), never through _guarded_load: it neither counts
    # its failures nor respects an open breaker, so a failing primary keeps being
    # hammered by every many() call. Fix: route LoadSome through the breaker too
    # (skip: raise LoaderCircuitOpenError for the misses; count failures/successes).
    calls = {"single": 0, "batch": 0}

    def load(id: str) -> str:
        calls["single"] += 1
        raise RuntimeError("the primary is down")

    def batch(ids: list[str]) -> list[str]:
        calls["batch"] += 1
        raise RuntimeError("the primary is down")

    fn = h.cached(load, key="bb:<id>", stale_if_error=60, batch_loader=batch)
    frozen = time.monotonic()  # the breaker stays open however slow the machine
    fn._plan.loader_breaker.clock = lambda: frozen
    for id in range(5):
        with pytest.raises(RuntimeError):
            await h.run(fn, str(id))
    assert fn._plan.loader_breaker.state == "open"
    with pytest.raises(LoaderCircuitOpenError):
        await h.run(fn.many, ["x", "y"])
    assert calls["batch"] == 0, "the batch loader was called while the breaker was open"


def test_a_hung_primary_does_not_pile_up_abandoned_loader_threads(engine: CacheEngine) -> None:
    # Was a defect: loader_timeout runs each sync load in a
    # new thread (_loads.py:_within, :149) and abandons it on timeout. Exactly when
    # loader_timeout matters (the primary hangs), every call starts one more thread
    # that stays blocked in the driver: nothing bounds them (without stale_if_error
    # there is no loader breaker either), so a busy service accumulates thousands
    # of stuck threads (and DB connections) and dies of it. Fix: bound the
    # abandoned loads per function (a counter/semaphore: past N still running,
    # fail at once with LoaderTimeoutError instead of starting another thread), or
    # run them on a bounded executor.
    hung = threading.Event()

    @cache_aside(key="h:<id>", ttl=30, loader_timeout=0.01, engine=engine)
    def load(id: int) -> str:
        hung.wait(5)
        return "late"

    def ours() -> int:
        return sum(t.name.startswith("cached_aside loader") for t in threading.enumerate())

    before = ours()
    try:
        for id in range(40):
            with pytest.raises(LoaderTimeoutError):
                load(id)
        assert ours() - before <= MAX_ABANDONED_LOADS, f"{ours() - before} loader threads left"
    finally:
        hung.set()
