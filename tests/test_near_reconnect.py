"""The near cache across a listener outage: entries set aside (never served) while
tracking is down, reread from Redis once it is back, and kept only if unchanged."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack
import pytest

from cached_aside import CacheEngine, NearCache, Source, _revalidation, cache_aside
from cached_aside._codecs import MSGPACK_CODEC, MSGPACK_NEGATIVE
from cached_aside._effects import Batch, CommandFailed
from cached_aside._keys import KeyTemplate
from cached_aside._listener import InvalidationListener
from cached_aside._near import MISSING, Reread, Tracking
from cached_aside._near_store import MAX_OUTAGE_SECONDS, NearStore
from cached_aside._revalidation import BATCH_KEYS, reread, revalidate
from cached_aside._stats import Stats

from .conftest import PATIENCE, unique_prefix
from .servers import RedisProcess
from .test_flows import outage, plan
from .test_near import near_clock as near_clock  # the fixture, for these tests too

LONG_MS = 60_000


def filled(keys: list[str], **config: Any) -> NearStore:
    """A store serving `keys` (value: the key itself)."""
    near = NearStore(NearCache(**config), MSGPACK_CODEC.freeze)
    near.switch(True)
    for key in keys:
        near.fill(key, near.expect(key), key, LONG_MS)
    return near


def reread_as(answers: dict[str, Reread]) -> Callable[[list[str]], list[Reread]]:
    return lambda keys: [answers.get(key) for key in keys]


# -- the store, no Redis -----------------------------------------------------------


def test_set_aside_entries_are_not_served_and_reads_fill_nothing() -> None:
    near = filled(["a", "b"])
    ticket = near.expect("c")
    near.aside.suspend()
    assert (near.get("a"), near.get("b")) == (MISSING, MISSING)
    assert near.expect("d") is None
    near.fill("c", ticket, "c", LONG_MS)  # its ticket was cancelled with the outage
    assert sorted(near.aside.resume()) == ["a", "b"]  # what is set aside is what gets reread
    assert near.get("c") is MISSING


def test_reread_entries_are_served_with_their_fresh_value_and_standing() -> None:
    near = filled(["hot", "cold", "gone"])
    for _ in range(5):
        assert near.get("hot") == "hot"
    near.fill("x", near.expect("x"), "x", LONG_MS)  # drains the reads into the policy
    frequency = near._policy.sketch.frequency("hot")
    near.aside.suspend()
    keys = near.aside.resume()
    near.reread = reread_as(
        {"hot": ("hot, changed", LONG_MS), "cold": ("cold", LONG_MS), "x": ("x", LONG_MS)}
    )
    finished = threading.Event()
    revalidate([(near, keys)], finished.set)
    assert finished.is_set()
    assert near.get("hot") == "hot, changed"  # refilled from what Redis holds now
    assert near.get("cold") == "cold"
    assert near.get("gone") is MISSING  # no longer in Redis
    assert near._policy.sketch.frequency("hot") == frequency
    assert "gone" not in near._policy._window
    assert len(near._policy) == 3
    assert near.counts()[4:] == (3, 1)  # hot, cold, x revalidated; gone dropped
    assert near.size() == 3  # no ticket left behind


def test_the_hot_set_is_reread_first() -> None:
    near = filled(["a", "hot", "b", "c"], max_entries=100)  # a window of one entry
    near.get("hot")  # read again in probation: protected
    near.fill("x", near.expect("x"), "x", LONG_MS)  # drains the reads into the policy
    near.aside.suspend()
    order: list[str] = []

    def reread_in_order(keys: list[str]) -> list[Reread]:
        order.extend(keys)
        return [(key, LONG_MS) for key in keys]

    near.reread = reread_in_order
    revalidate([(near, near.aside.resume())], lambda: None)
    assert order == ["hot", "c", "b", "a", "x"]  # protected, probation, window


def test_a_change_reported_after_the_ticket_voids_the_reread() -> None:
    near = filled(["a", "b"])
    near.aside.suspend()
    keys = near.aside.resume()
    taken = dict(near.aside.vouch(keys))
    near.drop(["a"])  # reported while the reread was in flight
    assert near.aside.restore("a", taken["a"], ("old", LONG_MS)) is False
    assert near.aside.restore("b", taken["b"], ("b", LONG_MS)) is True
    assert (near.get("a"), near.get("b")) == (MISSING, "b")


def test_a_caller_reading_the_key_first_wins_over_the_reread() -> None:
    near = filled(["a"])
    near.aside.suspend()
    keys = near.aside.resume()
    ((key, ticket),) = near.aside.vouch(keys)
    fresh = near.expect("a")  # a caller's miss: its ticket replaces the reread's
    near.fill("a", fresh, "from the caller", LONG_MS)
    assert near.aside.restore(key, ticket, ("from the reread", LONG_MS)) is False
    assert near.get("a") == "from the caller"
    assert near.size() == 1
    assert len(near._policy) == 1


def test_tracking_lost_again_during_the_rereads_keeps_them_aside() -> None:
    near = filled(["a", "b"])
    near.aside.suspend()
    keys = near.aside.resume()
    taken = dict(near.aside.vouch(keys))
    near.aside.suspend()  # lost again before the replies were kept
    assert near.aside.restore("a", taken["a"], ("a", LONG_MS)) is False
    assert near.get("a") is MISSING
    assert near.aside.resume() == ["b"]  # the next reconnect rereads what is left


def test_a_local_write_during_the_outage_drops_the_set_aside_copy() -> None:
    near = filled(["a", "b"])
    near.aside.suspend()
    near.drop(["a"])  # this process invalidated it meanwhile
    assert near.aside.resume() == ["b"]
    assert near.held == near._budget.held > 0
    near.clear()
    assert near.held == 0


def test_a_long_outage_empties_the_tier(near_clock: list[float]) -> None:
    near = filled(["a", "b"])
    near.aside.suspend()
    near_clock[0] += MAX_OUTAGE_SECONDS + 1
    assert near.aside.resume() == []
    assert near.size() == 0
    assert near.held == 0
    assert len(near._policy) == 0
    assert near.counts()[5] == 2


def test_entries_past_their_ttl_are_not_reread(near_clock: list[float]) -> None:
    near = NearStore(NearCache(), MSGPACK_CODEC.freeze)
    near.switch(True)
    near.fill("short", near.expect("short"), 1, 1_000)
    near.fill("long", near.expect("long"), 2, LONG_MS)
    near.aside.suspend()
    near_clock[0] += 2
    assert near.aside.resume() == ["long"]


def test_a_failed_reread_drops_its_batch_and_the_rest() -> None:
    keys = [f"k{number}" for number in range(BATCH_KEYS + 10)]
    near = filled(keys)
    near.aside.suspend()
    calls: list[int] = []

    def failing(batch: list[str]) -> list[Reread]:
        calls.append(len(batch))
        raise ConnectionError("Redis went away again")

    near.reread = failing
    done = threading.Event()
    revalidate([(near, near.aside.resume())], done.set)
    assert done.is_set()
    assert calls == [BATCH_KEYS]
    assert near.size() == 0
    assert near.held == 0
    assert near.counts()[4:] == (0, len(keys))


def test_a_reread_of_the_wrong_length_drops_rather_than_misplaces() -> None:
    near = filled(["a", "b"])
    near.aside.suspend()
    near.reread = lambda keys: [("a", LONG_MS)]  # one answer for two keys
    revalidate([(near, near.aside.resume())], lambda: None)
    assert (near.get("a"), near.get("b")) == (MISSING, MISSING)
    assert near.counts()[4:] == (0, 2)


def test_an_unexpected_failure_empties_the_tier_and_still_reports_the_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def freeze(value: Any) -> Any:
        if value == "unfreezable":
            raise RuntimeError("a codec bug")
        return MSGPACK_CODEC.freeze(value)

    near = NearStore(NearCache(), freeze)
    near.switch(True)
    near.fill("a", near.expect("a"), "a", LONG_MS)
    near.aside.suspend()
    near.reread = lambda keys: [("unfreezable", LONG_MS)] * len(keys)
    done = threading.Event()
    revalidate([(near, near.aside.resume())], done.set)
    assert done.is_set()
    assert near.size() == 0
    assert near.held == 0
    assert "revalidation failed" in caplog.text


def keyed(keys: list[str]) -> tuple[NearStore, list[tuple[str, int]]]:
    """A per-key store serving `keys`, whose registrar confirms at once (and the
    requests it was sent, with the store's size then: its tickets, with no values)."""
    near = NearStore(NearCache(tracking="keys"), MSGPACK_CODEC.freeze)
    sent: list[tuple[str, int]] = []

    def register(store: NearStore, key: str, number: int) -> None:
        sent.append((key, store.size()))
        store.registered([(key, number)])

    assert near.registrations is not None
    near.registrations.register = register
    near.switch(True)
    for _ in range(2):  # the first read registers the key, the second one fills
        for key in keys:
            near.fill(key, near.expect(key), key, LONG_MS)
    assert [near.get(key) for key in keys] == keys
    sent.clear()
    return near, sent


def test_per_key_entries_are_registered_again_before_their_tickets() -> None:
    near, sent = keyed(["a", "b"])
    near.aside.suspend()
    near.forget_registrations()  # the registrar's connection went with the listener's
    near.reread = reread_as({"a": ("a", LONG_MS), "b": ("b", LONG_MS)})
    revalidate([(near, near.aside.resume())], lambda: None)
    assert sorted(sent) == [("a", 0), ("b", 0)]  # registered before any ticket
    assert (near.get("a"), near.get("b")) == ("a", "b")
    assert near.counts()[4:] == (2, 0)


def test_a_per_key_entry_whose_registration_is_not_confirmed_goes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_revalidation, "REGISTRATION_SECONDS", 0.0)  # no reply will come
    near, sent = keyed(["a", "b"])
    assert near.registrations is not None
    near.registrations.register = lambda store, key, number: sent.append((key, number))
    near.aside.suspend()
    near.forget_registrations()
    near.reread = reread_as({"a": ("a", LONG_MS), "b": ("b", LONG_MS)})
    revalidate([(near, near.aside.resume())], lambda: None)
    assert sorted(key for key, _ in sent) == ["a", "b"]
    assert (near.get("a"), near.get("b")) == (MISSING, MISSING)  # untracked: not served
    assert near.counts()[4:] == (0, 2)
    assert near.size() == 0  # the rereads' tickets went with them


def test_a_forked_child_forgets_what_was_set_aside() -> None:
    near = filled(["a"])
    near.aside.suspend()
    near.reset_after_fork()
    near.switch(True)
    assert near.aside.resume() == []
    assert near.get("a") is MISSING


# -- the reread flow, stepped by hand ------------------------------------------------


def test_the_reread_judges_each_entry_as_a_lookup_would() -> None:
    p = dataclasses.replace(plan(refresh_ahead=5), peek=True)
    flow = reread(p, ["fresh", "negative", "missing", "due", "failed", "forever"])
    batch = next(flow)
    assert type(batch) is Batch
    assert len(batch.effects) == 6
    replies = [
        [msgpack.packb({"a": 1}), 20_000],
        [MSGPACK_NEGATIVE, 20_000],
        [],
        [msgpack.packb(2), 1_000],  # in its refresh_ahead window: a reload is due
        outage(),
        [msgpack.packb(3), -1],  # no expiry: never kept in process
    ]
    with pytest.raises(StopIteration) as stop:
        flow.send(replies)
    assert stop.value.value == [({"a": 1}, 20_000), (None, 20_000), None, None, None, None]
    assert type(replies[4]) is CommandFailed


def test_a_tagged_functions_entries_are_never_vouched_for() -> None:
    shop = KeyTemplate("shop:<id>", lambda id: None)
    p = dataclasses.replace(plan(), peek=True, tags=(shop,))
    flow = reread(p, ["a", "b"])
    with pytest.raises(StopIteration) as stop:
        next(flow)  # no read: the stamp's tags come from the call's arguments
    assert stop.value.value == [None, None]
    assert p.stats.snapshot() == Stats("x").snapshot()


# -- against a Redis of its own ----------------------------------------------------


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


@pytest.mark.parametrize("tracking", ["bcast", "keys"])
def test_after_an_outage_the_tier_is_reread_not_emptied_and_never_stale(
    tracking: Tracking,
) -> None:
    server = RedisProcess().start()
    prefix = unique_prefix()
    engine = CacheEngine.from_url(server.url, prefix=prefix)
    other = CacheEngine.from_url(server.url, prefix=prefix)  # another process's writes
    try:
        primary = {str(number): f"v{number}" for number in range(1_000)}
        ids = list(primary)

        @cache_aside(key="p:<id>", ttl=60, engine=engine, near=NearCache(tracking=tracking))
        def read(id: str) -> str:
            return primary[id]

        writer = cache_aside(key="p:<id>", ttl=60, engine=other)(read.__wrapped__)

        def all_near() -> bool:
            read.reset_stats()
            read.many(ids)
            return read.stats().near_hits == len(ids)

        wait_for(all_near, "the near cache never held every key")
        listener = engine.nearby.listener
        assert isinstance(listener, InvalidationListener)
        reconnect = threading.Event()
        connect = listener._connect

        def held_back() -> Any:  # the outage lasts until the test has changed keys
            reconnect.wait(PATIENCE)
            return connect()

        listener._connect = held_back
        admin = server.admin()
        admin.client_kill_filter(_id=str(listener.client_id))
        wait_for(lambda: engine.near_state() == "down", "the listener never noticed")
        assert read.lookup("0").source is Source.CACHE  # nothing unverified is served
        primary["1"] = "changed"
        assert writer.refresh("1") == "changed"  # a change the listener cannot report
        admin.delete(read.key("2"))
        reconnect.set()
        wait_for(lambda: engine.near_revalidated_at() is not None, "never revalidated")
        stats = read.stats()
        assert (stats.near_revalidated, stats.near_unverified) == (len(ids) - 1, 1)
        assert read.lookup("1").value == "changed"  # the change made during the outage
        assert read.lookup("2").value == "v2"
        read.reset_stats()
        assert read.many(ids) == [primary[id] for id in ids]
        assert read.stats().near_hits >= 0.9 * len(ids)
        admin.close()
    finally:
        engine.close()
        other.close()
        server.stop()
