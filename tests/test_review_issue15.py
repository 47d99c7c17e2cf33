"""Adversarial review of issue 15 (grace, stale_if_error and the loader breaker,
loader_timeout, refresh, set, cache_if, ttl_jitter, compress_over, tags).

Each failing test names the defect it shows and the fix suggested; the passing ones
pin subtle behaviour that matters. Sync and async, real Redis and fakeredis."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator
from typing import Any

import pytest

from cached_aside import (
    Outcome,
    Source,
    cache_aside,
)
from cached_aside import _engine as engine_module
from cached_aside._batches import invalidate_tags as tags_flow
from cached_aside._effects import Batch, Command, CommandFailed

from .conftest import Harness


async def invalidate_tags(h: Harness, *tags: str) -> Any:
    if h.mode == "async":
        return await h.engine.ainvalidate_tags(*tags)
    return h.engine.invalidate_tags(*tags)


def tag_set(h: Harness, text: str) -> str:
    return f"{h.engine.prefix}:tag:{{{text}}}"


def _first_command(effect: object) -> str | None:
    if type(effect) is Batch and effect.effects and type(effect.effects[0]) is Command:
        return str(effect.effects[0].args[0])
    return None


def intercept_tag_flow(
    monkeypatch: pytest.MonkeyPatch,
    before: str,
    hook: Callable[[], None] | None = None,
    fail: bool = False,
) -> None:
    """Wrap the next invalidate_tags flow: when it is about to send a Batch whose
    first command is `before` (e.g. "SREM"), run `hook` first (what another process
    does in that instant), or answer that Batch with failures (Redis did not answer)."""
    original = tags_flow
    fired: list[bool] = []

    def wrapped(*args: Any, **kwargs: Any) -> Generator[Any, Any, Any]:
        flow = original(*args, **kwargs)
        reply: Any = None
        failure: BaseException | None = None
        effect: Any
        while True:
            try:
                effect = flow.send(reply) if failure is None else flow.throw(failure)
            except StopIteration as stop:
                return stop.value
            failure = None
            if not fired and _first_command(effect) == before:
                fired.append(True)
                if hook is not None:
                    hook()
                if fail:
                    reply = [
                        CommandFailed(ConnectionError("refused"), wrong_type=False, sent=False)
                        for _ in effect.effects
                    ]
                    continue
            try:
                reply = yield effect
            except BaseException as exc:
                failure = exc

    monkeypatch.setattr(engine_module, "invalidate_tags", wrapped)


# -- tags --------------------------------------------------------------------------


async def test_a_reload_right_after_a_tag_invalidation_stays_in_the_tag_set(
    h: Harness, twin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # DEFECT (high): invalidate_tags() reads a tag's set (SMEMBERS), invalidates the
    # entries, then tidies the set with SREM of what it read
    # (cached_aside/_batches.py:400-401, and _deliver_tag at :459-460). Another process
    # that misses the key right after the INVALIDATE (the usual case for a hot key)
    # takes the lock and runs TAG_ADD: SADD of a member that is still there is a
    # no-op, and the SREM that follows removes it. That load read the new row and
    # stores it legitimately, but its entry is now in no tag set: the NEXT write's
    # invalidate_tags() does not find it, and the old row is served for a whole ttl.
    # Fix: take the set atomically before invalidating (a script that RENAMEs the set
    # to a per-call scratch key in the same slot, then SMEMBERS/INVALIDATE/DEL the
    # scratch key; a lost reply leaves the scratch key for the outbox to finish),
    # so that a TAG_ADD after the take builds a new set nobody tidies.
    rows = {"v": 1}

    def load(shop_id: int) -> dict[str, int]:
        return dict(rows)

    fn = h.cached(load, key="p:<shop_id>", tags=("shop:<shop_id>",))
    elsewhere = cache_aside(key="p:<shop_id>", ttl=30, tags=("shop:<shop_id>",), engine=twin())(
        load
    )
    await h.run(fn, 7)
    rows["v"] = 2  # a write, then its tag invalidation

    def another_process_reloads() -> None:
        assert elsewhere(7) == {"v": 2}  # between the INVALIDATE and the SREM

    intercept_tag_flow(monkeypatch, "SREM", another_process_reloads)
    assert (await invalidate_tags(h, "shop:7")).deleted == 1
    monkeypatch.undo()
    assert await h.run(fn, 7) == {"v": 2}
    rows["v"] = 3  # the next write
    await invalidate_tags(h, "shop:7")
    assert await h.run(fn, 7) == {"v": 3}, "invalidate_tags missed an entry of its tag"


async def test_an_entry_put_with_set_is_dropped_by_its_tag(h: Harness) -> None:
    # DEFECT (high): fn.set() (the PUT script, cached_aside/_flows.py:560-574) writes
    # the entry but never adds it to its tags' sets, unlike a load (join_tags,
    # _flows.py:372). An entry written by set() (the recommended cache-put after a
    # write) is invisible to invalidate_tags() until its ttl runs out; it is also
    # the case after an earlier invalidate_tags() tidied the set. Fix: put() yields
    # TagsOf for the call's arguments and runs TAG_ADD for each tag before PUT (a
    # refused TAG_ADD turns the put into an invalidation, as join_tags does for loads).
    rows = {"v": 1}

    def load(shop_id: int) -> dict[str, int]:
        return dict(rows)

    fn = h.cached(load, key="s:<shop_id>", tags=("shop:<shop_id>",))
    rows["v"] = 2
    assert await h.run(fn.set, 7, value={"v": 2}) is Outcome.UPDATED
    assert await h.run(fn, 7) == {"v": 2}
    rows["v"] = 3
    await invalidate_tags(h, "shop:7")
    assert await h.run(fn, 7) == {"v": 3}, "the tag did not reach the entry set() wrote"


async def test_update_field_keeps_the_entry_alive_past_its_tag_set(h: Harness) -> None:
    # DEFECT (medium): update_field() renews the entry's ttl (UPDATE_FIELD's PEXPIRE
    # ttl + kept time, _flows.py:547) but not its tags' sets, which were sized at the
    # entry's load to ttl + kept + lock_ttl (join_tags, _flows.py:440). An entry
    # updated late in its life outlives its tag set, and invalidate_tags() misses it.
    # Fix: update_field (and set) refresh the tag sets' expiry (TAG_ADD) like a load.
    fn = h.cached(
        lambda shop_id: {"name": "old", "price": "1"},
        key="u:<shop_id>",
        as_hash=True,
        ttl=30,
        lock_ttl=0.2,
        tags=("shop:<shop_id>",),
    )
    await h.run(fn, 7)
    # 29.9 s later (the set outlives the entry by lock_ttl, as join_tags sized it):
    assert h.raw.pexpire(fn.key(7), 100)
    assert h.raw.pexpire(tag_set(h, "shop:7"), 300)
    assert await h.run(fn.update_field, 7, "name", "new") is Outcome.UPDATED
    await asyncio.sleep(0.35)  # the set is gone; the entry lives 30 s more
    assert h.raw.exists(fn.key(7))
    await invalidate_tags(h, "shop:7")
    assert not h.raw.exists(fn.key(7)), "invalidate_tags missed an entry carrying the tag"


async def test_a_pending_tag_blocks_a_function_met_after_it_was_queued(
    h: Harness, twin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # DEFECT (medium-low): a tag whose set Redis did not read waits in the outbox as
    # a PendingTag whose `covers` is computed once, when it is queued, from the
    # functions this engine has met so far (_engine.py _tags_flow/covering, filled by
    # _register_tagged on a function's first call). A tagged function first called
    # after that is not blocked: this process serves it from Redis, including the
    # entry the pending tag is meant to delete. Fix: register tagged functions at
    # decoration (or check a function's own tag templates against the pending tags
    # when it meets the engine, and at its first blocks()).
    rows = {"v": 1}

    def load(shop_id: int) -> dict[str, int]:
        return dict(rows)

    elsewhere = cache_aside(key="q:<shop_id>", ttl=30, tags=("shop:<shop_id>",), engine=twin())(
        load
    )
    assert elsewhere(7) == {"v": 1}  # another process cached it
    fn = h.cached(load, key="q:<shop_id>", tags=("shop:<shop_id>",))  # not called yet
    monkeypatch.setattr(h.engine.outbox, "start_flusher", lambda: None)  # Redis stays away
    intercept_tag_flow(monkeypatch, "SMEMBERS", fail=True)
    rows["v"] = 2
    assert (await invalidate_tags(h, "shop:7")).pending == 1
    assert h.engine.pending_invalidations()
    assert await h.run(fn, 7) == {"v": 2}, "served the entry a pending tag invalidates"


async def test_a_tag_set_that_cannot_be_read_wedges_the_outbox(h: Harness) -> None:
    # DEFECT (low): a tag's set key holding another type (another engine whose prefix
    # is this one's plus ":tag": its value key "<p>:tag:{shop:7}" IS this engine's tag
    # set; or foreign data) makes SMEMBERS fail with WRONGTYPE. invalidate_tags
    # queues it as a PendingTag (_batches.py:378-379) and _deliver_tag fails on it on
    # every attempt (:440-443): the outbox never drains, retries every 50 ms for
    # ever, and every function that can carry the tag is served from the loader only
    # for the life of the process. Fix: treat a wrong-type reply as data, not outage
    # (CommandFailed.wrong_type): log it and drop the tag (or DEL the foreign key).
    fn = h.cached(lambda shop_id: {"s": shop_id}, key="w:<shop_id>", tags=("shop:<shop_id>",))
    await h.run(fn, 7)
    h.raw.delete(tag_set(h, "shop:7"))
    h.raw.set(tag_set(h, "shop:7"), "not a set")
    await invalidate_tags(h, "shop:7")
    await asyncio.sleep(0.3)
    assert not h.engine.pending_invalidations(), "the outbox retries a WRONGTYPE for ever"


async def test_a_busy_tags_set_does_not_keep_members_of_expired_entries_for_ever(
    h: Harness,
) -> None:
    # DEFECT (medium, Redis memory and invalidate_tags cost): TAG_ADD
    # (_scripts.py:190-200) adds a member and extends the set's expiry on every load;
    # members leave only through invalidate_tags(). A tag that is loaded all the time
    # ("catalog", "shop:<big shop>") therefore never expires, and it keeps a member
    # for every entry ever loaded under it, long after those entries expired: the
    # set grows without bound, and the next invalidate_tags() reads it whole
    # (SMEMBERS), sends one INVALIDATE per dead member in one pipeline and one
    # SREM with all of them. The docs' "sets expire by themselves" holds only for
    # tags nobody loads any more. Fix: a sorted set scored by each member's expiry
    # (ZADD key alive_until; TAG_ADD also ZREMRANGEBYSCORE -inf now, bounded), read
    # with ZRANGEBYSCORE now +inf; or SSCAN-and-prune in bounded steps.
    fn = h.cached(lambda id: {"id": id}, key="gr:<id>", ttl=0.05, tags=("catalog",))
    for id in range(60):
        await h.run(fn, id)
    await asyncio.sleep(0.1)  # every one of those entries has expired
    await h.run(fn, "now")
    live = sum(h.raw.exists(fn.key(id)) for id in [*range(60), "now"])
    assert live == 1
    assert h.raw.scard(tag_set(h, "catalog")) <= 10, "the set keeps every member it ever had"


async def test_a_text_id_is_reached_by_the_tag_text_the_docs_show(h: Harness) -> None:
    # DEFECT (medium, usability: a silent miss): tags render like keys, where a str
    # that looks like a number is escaped so "7" and 7 never share an entry
    # (_keys.py _escape_text: "7" -> "%37"). Ids from URLs, headers and JSON are
    # often str: the entry joins "shop:%37", and invalidate_tags("shop:7"), the
    # form the docs and the decorator's docstring show, answers deleted=0 like
    # "nothing cached", while the old row stays. Keys need that escaping, tags do
    # not: two tags sharing a set only invalidate more, never serve a wrong value.
    # Fix: render tag placeholders without the typed-looking escape (or give
    # functions a tag renderer, fn.tags_of(*args), and document it as the way in).
    rows = {"v": 1}
    fn = h.cached(lambda shop_id: dict(rows), key="tt:<shop_id>", tags=("shop:<shop_id>",))
    await h.run(fn, "7")  # a path parameter: text
    rows["v"] = 2
    outcome = await invalidate_tags(h, "shop:7")
    assert outcome.deleted == 1, "invalidate_tags('shop:7') missed the entry of shop_id='7'"


# -- refresh, update_field ---------------------------------------------------------


# -- the loader breaker, loader_timeout --------------------------------------------


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


async def test_pin_a_pending_tag_blocks_a_function_met_before_it_was_queued(
    h: Harness, twin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fine (the contrast to the defect above): a tagged function this engine has
    # met is served from the loader while its tag waits in the outbox.
    rows = {"v": 1}

    def load(shop_id: int) -> dict[str, int]:
        return dict(rows)

    fn = h.cached(load, key="q:<shop_id>", tags=("shop:<shop_id>",))
    assert await h.run(fn, 8) == {"v": 1}  # met: registered with the engine
    elsewhere = cache_aside(key="q:<shop_id>", ttl=30, tags=("shop:<shop_id>",), engine=twin())(
        load
    )
    assert elsewhere(7) == {"v": 1}
    monkeypatch.setattr(h.engine.outbox, "start_flusher", lambda: None)
    intercept_tag_flow(monkeypatch, "SMEMBERS", fail=True)
    rows["v"] = 2
    assert (await invalidate_tags(h, "shop:7")).pending == 1
    assert await h.run(fn, 7) == {"v": 2}
    assert h.raw.exists(fn.key(7))  # still in Redis: only the outbox will delete it
