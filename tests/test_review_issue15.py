"""Adversarial review of issue 15 (grace, stale_if_error and the loader breaker,
loader_timeout, refresh, set, cache_if, ttl_jitter, compress_over, tags).

Each failing test names the defect it shows and the fix suggested; the passing ones
pin subtle behaviour that matters. Sync and async, real Redis and fakeredis."""

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
from cached_aside._codecs import MSGPACK_CODEC
from cached_aside._effects import Signal
from cached_aside._flows import Plan, after_miss
from cached_aside._options import Options
from cached_aside._scripts import AcquireStatus, ScriptName
from cached_aside._stats import Stats

from .conftest import REDIS_URL, Harness, delete_prefix, needs_real_redis, unique_prefix
from .test_flows import KEY, Stepper


async def invalidate_tags(h: Harness, *tags: str) -> Any:
    if h.mode == "async":
        return await h.engine.ainvalidate_tags(*tags)
    return h.engine.invalidate_tags(*tags)


# -- refresh, update_field ---------------------------------------------------------


async def test_refresh_after_a_write_does_not_take_a_load_that_read_before_it(
    h: Harness,
) -> None:
    # DEFECT (medium): fn.refresh() is documented "after a change you know of", but
    # when a load is in flight (it read the row BEFORE the write) refresh() waits for
    # it and takes its value (miss(replace=True) -> HELD -> woken -> FOUND,
    # _flows.py:343-353 and :554-557): it returns the old row and leaves it cached
    # for a whole ttl, though the caller had written the new one first. set() and
    # invalidate() revoke such a lease; refresh() does not. Fix: reload revokes the
    # lease of the load in flight (DEL the lock and wake its waiters, keeping the
    # value) before taking the lock, so its older result is refused and this
    # reload's stands.
    rows = {"v": 1}
    read = threading.Event()
    fn: Any
    if h.mode == "async":

        async def aload(id: int) -> dict[str, int]:
            row = dict(rows)
            if not read.is_set():
                read.set()
                await asyncio.sleep(0.3)  # the slow first load, after its read
            return row

        fn = cache_aside(key="r:<id>", ttl=30, engine=h.engine)(aload)
        loading = asyncio.ensure_future(fn(1))
    else:

        def load(id: int) -> dict[str, int]:
            row = dict(rows)
            if not read.is_set():
                read.set()
                time.sleep(0.3)
            return row

        fn = cache_aside(key="r:<id>", ttl=30, engine=h.engine)(load)
        loading = asyncio.ensure_future(asyncio.to_thread(fn, 1))
    await asyncio.to_thread(read.wait, 5)
    rows["v"] = 2  # the write
    if h.mode == "async":
        refreshed = await fn.refresh(1)
    else:
        refreshed = await asyncio.to_thread(fn.refresh, 1)
    assert await loading == {"v": 1}
    assert refreshed == {"v": 2}, "refresh() after a write returned the row read before it"
    assert await h.run(fn, 1) == {"v": 2}


async def test_update_field_does_not_make_a_kept_entry_fresh(h: Harness) -> None:
    # DEFECT (medium): with stale_if_error (or grace), an entry past its ttl stays in
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
    rows.update(price="2")
    await h.run(fn.update_field, "a", "name", "y")
    result = await h.run(fn.lookup, "a")
    assert result.source is not Source.CACHE, "a record past its ttl was made fresh again"
    assert result.value == {"name": "y", "price": "2"}


async def test_a_reload_whose_result_is_not_storable_does_not_leave_the_old_value(
    h: Harness,
) -> None:
    # DEFECT (medium): what_to_store answers RELEASE_ONLY for a result that is not to
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
    # The same defect through grace: the background reload's result fails cache_if
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


async def test_update_field_does_not_cache_a_record_cache_if_refuses(h: Harness) -> None:
    # DEFECT (low-medium): set() applies cache_if (what_to_store), update_field()
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


# -- the loader breaker, loader_timeout --------------------------------------------


async def test_a_cancelled_probe_does_not_keep_the_loader_breaker_open(
    engine: CacheEngine,
) -> None:
    # DEFECT (high for asyncio services): in the breaker's half-open state, allow()
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
    for id in range(5):
        with pytest.raises(RuntimeError):
            await load(str(id))
    assert breaker.state == "open"
    await asyncio.sleep(0.06)  # half-open: the next call probes
    mode["now"] = "hang"
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(load("probe"), 0.1)  # the probe is cancelled
    mode["now"] = "ok"  # the primary is back
    await asyncio.sleep(0.2)
    assert await load("after") == "ok", "the breaker stays open after a cancelled probe"


async def test_a_loaders_own_timeout_error_is_not_reported_as_loader_timeout(
    h: Harness,
) -> None:
    # DEFECT (low, diagnostics): on Python 3.11+ asyncio.TimeoutError and
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


def test_a_hung_primary_does_not_pile_up_abandoned_loader_threads(engine: CacheEngine) -> None:
    # DEFECT (medium under a hung primary): loader_timeout runs each sync load in a
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
        assert ours() - before <= 16, f"{ours() - before} loader threads left running"
    finally:
        hung.set()


@needs_real_redis
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_child_forked_during_a_probe_can_load() -> None:
    # DEFECT (medium-low): the per-function loader breakers are not reset after
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
            release.wait(5)
        return "ok"

    breaker = load._plan.loader_breaker
    assert breaker is not None
    breaker.cooldown = 0.05
    try:
        for id in range(5):
            with pytest.raises(RuntimeError):
                load(str(id))
        time.sleep(0.06)
        mode["now"] = "hang"
        thread = threading.Thread(target=load, args=("probe",))
        thread.start()
        assert probing.wait(5)
        reading, writing = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child
            try:
                mode["now"] = "ok"
                time.sleep(0.1)
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


async def test_the_batch_loader_ignores_the_loader_breaker(h: Harness) -> None:
    # DEFECT (low): with stale_if_error, "after 5 failures in a row the loader is
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
    for id in range(5):
        with pytest.raises(RuntimeError):
            await h.run(fn, str(id))
    assert fn._plan.loader_breaker.state == "open"
    with pytest.raises((LoaderCircuitOpenError, RuntimeError)):
        await h.run(fn.many, ["x", "y"])
    assert calls["batch"] == 0, "the batch loader was called while the breaker was open"


async def test_a_large_compressed_value_is_cached_or_refused_not_silently_dropped(
    h: Harness,
) -> None:
    # DEFECT (low, "a failure looks like a normal answer"): with compress_over, a
    # value whose packed form exceeds MAX_DECOMPRESSED_BYTES (64 MiB) is stored
    # compressed (MsgpackCodec.encode, _codecs.py:229-231 has no bound) but every
    # read of it decodes as CORRUPT (_decompressed, :47-57): each call reloads and
    # rewrites it, counted only as "corrupt". Without compress_over the same value
    # caches fine. Fix: in encode, store a value above the bound uncompressed (or
    # raise UnstorableValueError), so what is written can be read back.
    big = "x" * (64 * 1024 * 1024 + 16)
    loads = []

    def load(id: str) -> str:
        loads.append(id)
        return big

    fn = h.cached(load, key="z:<id>", compress_over=1024)
    await h.run(fn, "a")
    result = await h.run(fn.lookup, "a")
    assert len(result.value) == len(big)
    assert (result.source, fn.stats().corrupt) == (Source.CACHE, 0), "stored, never read back"


def test_without_stale_if_error_a_failed_load_is_never_answered_stale() -> None:
    # DEFECT (low, a 1 ms window): _peeked (_flows.py:159) takes `left <= keep` as
    # "past its ttl" also when nothing is kept (keep 0, a function that peeks for
    # refresh_ahead or a near cache): PTTL 0 (under 1 ms left) makes the entry
    # EXPIRED, after_miss hands it to miss() as `stale`, and a loader error is then
    # answered with that value, source "stale", on a function that never asked
    # for stale_if_error. Fix: `if keep and left <= keep:` (and keep the stale
    # fallback to functions with stale_if_error_ms).
    stepped = Plan(
        "get_product",
        MSGPACK_CODEC,
        Options.of(cache_aside(key="product:<id>", ttl=30, refresh_ahead=5)),
        Stats("get_product"),
        peek=True,
    )
    flow = Stepper(after_miss(stepped, KEY, [msgpack.packb({"v": 1}), 0], 1000))
    assert flow.effect.script is ScriptName.ACQUIRE
    assert flow.reply([AcquireStatus.OWNED]) is Signal.LOAD
    try:
        flow.fail(RuntimeError("the primary is down"))
    except RuntimeError:
        return  # the loader's error propagates: right
    pytest.fail(f"answered {flow.result!r} instead of raising")


# -- pinned: behaviour that holds and matters --------------------------------------


async def test_pin_no_lock_is_left_when_cache_if_or_a_tag_fails(h: Harness) -> None:
    # Fine: a cache_if that raises, or a tag whose argument cannot be rendered,
    # fails the call after the lock was taken; the driver's Hold gives it back.
    def bad_predicate(value: Any) -> bool:
        raise ValueError("cache_if bug")

    fn = h.cached(lambda id: {"id": id}, key="ci:<id>", cache_if=bad_predicate)
    with pytest.raises(ValueError, match="cache_if bug"):
        await h.run(fn, "a")
    assert not h.raw.exists(fn.key("a") + ":lock")

    class Opaque:  # no __str__: its text holds a memory address
        pass

    def tagged(id: str, owner: Any) -> dict[str, str]:
        return {"id": id}

    tg = h.cached(tagged, key="tg:<id>", tags=("owner:<owner>",))
    with pytest.raises(Exception, match="memory address"):
        await h.run(tg, "a", Opaque())
    assert not h.raw.exists(tg.key("a", None) + ":lock")
    rows = {"id": "b"}
    batched = h.cached(
        lambda id: dict(rows),
        key="cb:<id>",
        cache_if=bad_predicate,
        batch_loader=lambda ids: [dict(rows) for _ in ids],
    )
    with pytest.raises(ValueError, match="cache_if bug"):
        await h.run(batched.many, ["x", "y"])
    assert not h.raw.exists(batched.key("x") + ":lock", batched.key("y") + ":lock")


async def test_pin_many_applies_tags_cache_if_and_jitter_like_single_loads(h: Harness) -> None:
    def load(id: int) -> dict[str, Any]:
        return {"id": id, "final": id % 2 == 0}

    fn = h.cached(
        load,
        key="mt:<id>",
        ttl=30,
        grace=10,
        ttl_jitter=0.5,
        cache_if=lambda row: row["final"],
        tags=("all",),
        batch_loader=lambda ids: [load(i) for i in ids],
    )
    assert [r["id"] for r in await h.run(fn.many, [1, 2, 3, 4])] == [1, 2, 3, 4]
    assert h.raw.exists(fn.key(1), fn.key(3)) == 0  # cache_if said no
    for id in (2, 4):
        assert 15_000 <= h.raw.pttl(fn.key(id)) <= 40_000  # ttl less jitter, plus grace
    assert (await invalidate_tags(h, "all")).deleted == 2
    assert h.raw.exists(fn.key(2), fn.key(4)) == 0


async def test_pin_a_tag_invalidation_removes_the_grace_too(h: Harness) -> None:
    rows = {"v": 1}
    fn = h.cached(lambda id: dict(rows), key="gt:<id>", ttl=30, grace=60, tags=("t:<id>",))
    await h.run(fn, "a")
    assert h.raw.pexpire(fn.key("a"), 30_000)  # 30 s into its grace
    rows["v"] = 2
    assert (await invalidate_tags(h, "t:a")).deleted == 1
    result = await h.run(fn.lookup, "a")
    assert (result.source, result.value) == (Source.LOADER, {"v": 2})


async def test_pin_a_negative_entry_in_its_grace_is_served_stale_and_reloaded(
    h: Harness,
) -> None:
    rows: dict[str, Any] = {}
    fn = h.cached(lambda id: rows.get(id), key="ng:<id>", ttl=30, negative_ttl=5, grace=10)
    assert await h.run(fn, "a") is None
    assert 5_000 < h.raw.pttl(fn.key("a")) <= 15_000  # negative ttl plus grace
    rows["a"] = {"now": "exists"}
    assert h.raw.pexpire(fn.key("a"), 9_000)  # 1 s into its grace
    stale = await h.run(fn.lookup, "a")
    assert (stale.source, stale.value) == (Source.STALE, None)
    assert await h.engine.asettle() if h.mode == "async" else h.engine.settle()
    assert await h.run(fn, "a") == {"now": "exists"}
