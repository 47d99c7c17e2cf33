"""The algorithm stepped by hand: scripted Redis replies, no Redis, no event loop."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cached_aside import CacheUnavailableError, cache_aside
from cached_aside._batches import SCAN_BATCH, invalidate_matching, load_batch
from cached_aside._codecs import HASH_CODEC, MSGPACK_CODEC, MSGPACK_NEGATIVE, Codec, Found
from cached_aside._effects import (
    Batch,
    Command,
    CommandFailed,
    Free,
    Hold,
    Leased,
    LoadOne,
    LoadSome,
    Postpone,
    RunScript,
    Scan,
    Signal,
)
from cached_aside._flows import after_miss
from cached_aside._keys import KeyTemplate
from cached_aside._options import Options
from cached_aside._outbox import PendingKey, PendingPattern
from cached_aside._plan import Plan, Served
from cached_aside._reads import on_lookup
from cached_aside._results import Outcome, Source
from cached_aside._scripts import AcquireStatus, ScriptName
from cached_aside._stats import Stats
from cached_aside._writes import invalidate, reload, update_field

KEY = "cache:{product:1}"


def outage() -> CommandFailed:
    return CommandFailed(ConnectionError("refused"), wrong_type=False)


def plan(codec: Codec = MSGPACK_CODEC, **options: Any) -> Plan:
    settings: dict[str, Any] = {"ttl": 30, "lock_ttl": 10, "as_hash": codec is HASH_CODEC}
    settings.update(options)
    decorator = cache_aside(key="product:<id>", **settings)
    return Plan("get_product", codec, Options.of(decorator), Stats("get_product"))


class Stepper:
    """Drives a flow one effect at a time. Hold and Free are kept as a driver keeps
    them (`holds`: what a driver would release if the flow ended now), not shown. A
    Leased load is shown as its load; the Leased itself is kept in `leases`."""

    def __init__(self, flow: Any) -> None:
        self.flow = flow
        self.holds: list[Hold] = []
        self.leases: list[Leased] = []
        self.result: Any = None
        self.effect: Any = None
        self._advance(lambda: next(flow))

    def reply(self, value: Any) -> Any:
        return self._advance(lambda: self.flow.send(value))

    def fail(self, exc: BaseException) -> Any:
        return self._advance(lambda: self.flow.throw(exc))

    def released(self) -> list[tuple[Any, ...]]:
        """(script, first key, first argument) of each release a driver would run."""
        return [(r.script, r.keys[0], r.args[:1]) for hold in self.holds for r in hold.releases]

    def _advance(self, step: Any) -> Any:
        try:
            effect = step()
            while type(effect) in (Hold, Free):
                if type(effect) is Hold:
                    self.holds.append(effect)
                else:
                    self.holds.remove(effect.hold)
                effect = self.flow.send(None)
            if type(effect) is Leased:
                self.leases.append(effect)
                effect = effect.load
            self.effect = effect
        except StopIteration as stop:
            self.effect, self.result = None, stop.value
        return self.effect


def test_hit_is_decided_from_the_lookup_reply_alone() -> None:
    p = plan()
    assert p.codec.read_command == "GET"
    assert on_lookup(p, msgpack.packb({"a": 1})) == Served({"a": 1}, Source.CACHE)
    assert p.stats.snapshot().hits == 1


def test_negative_hit() -> None:
    p = plan()
    assert on_lookup(p, MSGPACK_NEGATIVE) == Served(None, Source.NEGATIVE)
    assert p.stats.snapshot().negative_hits == 1


@pytest.mark.parametrize("raw", [None, b"\xc7 not msgpack", outage()])
def test_misses_corruption_and_outages_leave_the_hit_path(raw: Any) -> None:
    p = plan()
    assert on_lookup(p, raw) is None
    assert p.stats.snapshot().hits == 0


def _typed(value: Any) -> Any:
    """`value` with the type of every part spelled out: 1, 1.0 and True are equal."""
    if isinstance(value, dict):
        return ("dict", [(_typed(k), _typed(v)) for k, v in value.items()])
    if isinstance(value, list):
        return ("list", [_typed(v) for v in value])
    return (type(value).__name__, value)


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary()
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8))
    | st.builds(msgpack.Timestamp, st.integers(-(2**40), 2**40), st.integers(0, 999_999_999))
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(
            st.text() | st.integers(-(2**63), 2**64 - 1) | st.binary() | st.none(),
            inner,
            max_size=4,
        )
    ),
    max_leaves=20,
)


@given(_values)
def test_the_msgpack_codec_reads_back_what_msgpack_itself_would(value: Any) -> None:
    """Hits are read by msgspec's decoder: for everything encode() stores, the same
    values and types as msgpack.unpackb(raw=False, strict_map_key=False), and the
    same as the miss that stored it handed its caller."""
    payload, result = MSGPACK_CODEC.encode(value, "f")
    expected = msgpack.unpackb(payload[0], raw=False, strict_map_key=False)
    assert _typed(MSGPACK_CODEC.decode(payload[0])) == _typed(expected) == _typed(result)
    assert _typed(MSGPACK_CODEC.copy(result)) == _typed(result)


def test_the_msgpack_codec_keeps_what_msgpack_alone_reads_its_own_way() -> None:
    """An ext type comes back as msgpack's ExtType on a hit as on the miss, and a
    msgpack Timestamp as a Timestamp (msgspec would make it a datetime, and one past
    datetime's range an error): both as msgpack read them; copies too. A key msgpack
    would read as an unhashable list is refused at the store, as before."""
    for value in (
        {"e": msgpack.ExtType(5, b"ab")},
        [msgpack.Timestamp(1, 0)],
        {"t": msgpack.Timestamp(2**40, 5)},
    ):
        payload, result = MSGPACK_CODEC.encode(value, "f")
        assert _typed(MSGPACK_CODEC.decode(payload[0])) == _typed(result) == _typed(value)
        assert _typed(MSGPACK_CODEC.copy(result)) == _typed(value)
        copier, kept = MSGPACK_CODEC.freeze(result)  # the near cache's copy
        assert _typed(copier(kept)) == _typed(value)
    with pytest.raises(TypeError, match="msgpack cannot store"):
        MSGPACK_CODEC.encode({(1, 2): "x"}, "f")


@pytest.mark.parametrize(
    "raw",
    [
        msgpack.packb(1) + b"\x01",  # trailing bytes
        b"\x92\x01",  # cut short
        b"\xa2\xff\xfe",  # not UTF-8
        b"\xdd\xff\xff\xff\xff",  # an array longer than the data
        b"\x91" * 100_000 + b"\x01",  # nested past any recursion limit
        b"\xd7\xff" + b"\xff" * 8,  # a timestamp whose nanoseconds are out of range
    ],
)
def test_damaged_msgpack_is_corrupt(raw: bytes) -> None:
    assert MSGPACK_CODEC.decode(raw) is Found.CORRUPT


def test_miss_locks_loads_seals_and_stores() -> None:
    p = plan(HASH_CODEC)
    flow = Stepper(after_miss(p, KEY, {}, 500))
    acquire = flow.effect
    assert isinstance(acquire, RunScript)
    assert acquire.script is ScriptName.ACQUIRE
    assert acquire.keys == (KEY, f"{KEY}:lock", f"{KEY}:waiters")
    token = acquire.args[0]
    assert flow.reply([AcquireStatus.OWNED]) is Signal.LOAD
    assert flow.reply({"stock": 3}) is Signal.SEAL
    store = flow.reply(None)
    assert isinstance(store, RunScript)
    assert store.script is ScriptName.STORE
    assert store.args[:4] == (token, "hash", 30_000, 10_000)
    assert store.args[4:] == ("__cached_aside__", 1, "stock", "3")
    assert [r[0] for r in flow.released()] == [ScriptName.STORE, ScriptName.LEAVE]
    flow.reply(1)
    assert flow.result == Served({"stock": "3"}, Source.LOADER, lease_kept=True, shareable=True)
    assert p.stats.snapshot().loads == 1
    assert flow.holds == []  # the store consumed the lock: nothing left to release


def test_revoked_lease_is_reported() -> None:
    flow = Stepper(after_miss(plan(), KEY, None, 500))
    flow.reply([AcquireStatus.OWNED])
    flow.reply("v1")
    flow.reply(None)
    flow.reply(0)  # the store script found another token: an invalidation came first
    assert flow.result == Served("v1", Source.LOADER, lease_kept=False)


def test_value_found_under_the_lock_is_not_loaded_again() -> None:
    p = plan()
    flow = Stepper(after_miss(p, KEY, None, 500))
    assert len(flow.holds) == 1  # armed before the lock script left: its reply may be lost
    flow.reply([AcquireStatus.FOUND, msgpack.packb("v")])
    assert flow.result == Served("v", Source.CACHE)
    assert p.stats.snapshot().loads == 0
    assert flow.holds == []


def test_waiter_blocks_on_the_wake_list_bounded_by_lock_and_socket() -> None:
    p = plan()
    flow = Stepper(after_miss(p, KEY, None, 400))
    token = flow.effect.args[0]
    wait = flow.reply([AcquireStatus.HELD, 9_000])
    # Its own wake-up list: given up, it takes back exactly its registration.
    assert wait == Command(("BLPOP", f"{KEY}:wake:{token}", "0.400"), blocks=True)
    assert flow.released()[-1] == (ScriptName.LEAVE, f"{KEY}:waiters", (token,))
    # Timed out: seal (later callers read for themselves), then look again.
    assert flow.reply(None) is Signal.SEAL
    again = flow.reply(None)
    assert isinstance(again, RunScript)
    assert again.script is ScriptName.ACQUIRE
    assert flow.reply([AcquireStatus.HELD, 2]) == Command(
        ("BLPOP", f"{KEY}:wake:{token}", "0.005"), blocks=True
    )
    assert flow.reply([b"wake", b"1"]) is Signal.SEAL
    flow.reply(None)
    flow.reply([AcquireStatus.FOUND, msgpack.packb([1])])
    # Read after the seal: fresh for everyone who joined before it.
    assert flow.result == Served([1], Source.WAITED, shareable=True)
    stats = p.stats.snapshot()
    assert (stats.misses, stats.stampedes_suppressed, stats.loads) == (1, 1, 0)
    assert stats.lock_waits == 1  # once per call, however many times it looked again


@pytest.mark.parametrize(
    "failure",
    [
        ValueError("bad row"),
        KeyboardInterrupt(),
        GeneratorExit(),
        CommandFailed(OSError(), wrong_type=False),
    ],
    ids=["loader", "interrupt", "exit", "redis"],
)
def test_whatever_ends_a_load_leaves_the_lock_to_the_drivers_release(
    failure: BaseException,
) -> None:
    flow = Stepper(after_miss(plan(fail_open=False), KEY, None, 500))
    token = flow.effect.args[0]
    assert flow.reply([AcquireStatus.OWNED]) is Signal.LOAD
    with pytest.raises(type(failure)):
        flow.fail(failure)
    # The flow released nothing itself: its Hold stands, and a driver releases it.
    assert flow.released() == [
        (ScriptName.STORE, KEY, (token,)),
        (ScriptName.LEAVE, f"{KEY}:waiters", (token,)),
    ]


def test_a_lost_lock_reply_keeps_the_lock_armed_and_fails_open() -> None:
    flow = Stepper(after_miss(plan(), KEY, None, 500))
    assert flow.fail(CommandFailed(TimeoutError(), wrong_type=False)) is Signal.LOAD
    flow.reply("v")
    assert flow.result == Served("v", Source.LOADER, shareable=True)
    assert len(flow.released()) == 2  # Redis may have granted it before the timeout


def test_a_lock_the_breaker_never_sent_is_not_released() -> None:
    flow = Stepper(after_miss(plan(), KEY, None, 500))
    flow.fail(CommandFailed(ConnectionError(), wrong_type=False, sent=False))
    flow.reply("v")
    assert flow.holds == []


def test_a_refused_store_leaves_the_lock_armed() -> None:
    p = plan()
    flow = Stepper(after_miss(p, KEY, None, 500))
    flow.reply([AcquireStatus.OWNED])
    flow.reply("v")
    flow.reply(None)  # SEAL
    flow.fail(CommandFailed(RuntimeError("OOM command not allowed"), wrong_type=False))
    assert flow.result == Served("v", Source.LOADER, shareable=True)
    assert [r[0] for r in flow.released()] == [ScriptName.STORE, ScriptName.LEAVE]


def test_outage_fails_open_to_the_loader() -> None:
    p = plan()
    flow = Stepper(after_miss(p, KEY, outage(), 500))
    assert flow.effect is Signal.LOAD
    flow.reply(("a", "b"))
    assert flow.result == Served(["a", "b"], Source.LOADER, shareable=True)
    assert p.stats.snapshot().errors == 1


def test_outage_raises_when_fail_open_is_off() -> None:
    with pytest.raises(CacheUnavailableError, match="fail_open=False"):
        Stepper(after_miss(plan(fail_open=False), KEY, outage(), 500))


def test_wrong_type_is_corruption_not_outage() -> None:
    p = plan()
    wrong_type = CommandFailed(RuntimeError("WRONGTYPE"), wrong_type=True)
    acquire = Stepper(after_miss(p, KEY, wrong_type, 500)).effect
    assert isinstance(acquire, RunScript)
    assert acquire.args[3] == "1"
    assert p.stats.snapshot().corrupt == 1


WHOLE = PendingPattern("cache:{product:", "cache:{product:*", lambda key: True)


def test_invalidate_runs_one_script() -> None:
    flow = Stepper(invalidate(plan(), KEY, WHOLE))
    assert isinstance(flow.effect, RunScript)
    assert flow.effect.script is ScriptName.INVALIDATE
    flow.reply(1)
    assert flow.result is Outcome.DELETED
    absent = Stepper(invalidate(plan(), KEY, WHOLE))
    absent.reply(0)
    assert absent.result is Outcome.ABSENT


def test_an_invalidation_redis_did_not_take_is_postponed_never_absent() -> None:
    p = plan()
    flow = Stepper(invalidate(p, KEY, WHOLE))
    postpone = flow.fail(outage())
    assert postpone == Postpone((PendingKey(KEY, 10_000, WHOLE),))
    flow.reply(None)
    assert flow.result is Outcome.PENDING
    assert (p.stats.snapshot().postponed, p.stats.snapshot().errors) == (1, 1)
    strict = Stepper(invalidate(plan(fail_open=False), KEY, WHOLE))
    assert isinstance(strict.fail(outage()), Postpone)  # queued first, then raised
    with pytest.raises(CacheUnavailableError):
        strict.reply(None)


def test_update_field_fences_loads_and_is_postponed_as_an_invalidation() -> None:
    flow = Stepper(update_field(plan(HASH_CODEC), KEY, "stock", 2, WHOLE))
    script = flow.effect
    assert script.script is ScriptName.UPDATE_FIELD
    assert script.keys == (KEY, f"{KEY}:lock", f"{KEY}:waiters", f"{KEY}:wake")
    flow.reply(0)
    assert flow.result is Outcome.ABSENT
    failing = Stepper(update_field(plan(HASH_CODEC), KEY, "stock", 2, WHOLE))
    assert isinstance(failing.fail(outage()), Postpone)
    failing.reply(None)
    assert failing.result is Outcome.PENDING


def test_refresh_revokes_the_load_in_flight_before_it_takes_the_lock() -> None:
    # A load in flight may have read the row before the write that prompted the
    # refresh: its lease goes first, so its older result is refused and this one stands.
    flow = Stepper(reload(plan(), KEY, 500, WHOLE))
    revoke = flow.effect
    assert revoke.script is ScriptName.REVOKE
    assert revoke.keys == (KEY, f"{KEY}:lock", f"{KEY}:waiters", f"{KEY}:wake")
    acquire = flow.reply(1)
    assert acquire.script is ScriptName.ACQUIRE
    assert acquire.args[3] == "1"  # whatever is cached is being replaced
    # Sealed before the load: a later refresh of this process must not join a load
    # that may have begun before its own write.
    assert flow.reply([AcquireStatus.OWNED]) is Signal.SEAL
    assert flow.reply(None) is Signal.LOAD


def test_a_refresh_redis_could_not_revoke_is_postponed_and_served_by_the_loader() -> None:
    p = plan()
    flow = Stepper(reload(p, KEY, 500, WHOLE))
    assert flow.fail(outage()) == Postpone((PendingKey(KEY, 10_000, WHOLE),))
    assert flow.reply(None) is Signal.LOAD  # no lock: the old load could still store
    flow.reply({"a": 1})
    assert flow.result == Served({"a": 1}, Source.LOADER, shareable=True)
    assert (p.stats.snapshot().postponed, p.stats.snapshot().errors) == (1, 1)
    strict = Stepper(reload(plan(fail_open=False), KEY, 500, WHOLE))
    assert isinstance(strict.fail(outage()), Postpone)
    with pytest.raises(CacheUnavailableError):
        strict.reply(None)


# -- batches --------------------------------------------------------------------

KEYS = ["cache:{p:1}", "cache:{p:2}", "cache:{p:3}", "cache:{p:4}"]


def test_a_batch_locks_in_one_pipeline_loads_once_and_stores_in_one_pipeline() -> None:
    p = plan()
    flow = Stepper(load_batch(p, KEYS, [None, None, None, outage()], 500))
    locks = flow.effect
    assert isinstance(locks, Batch)
    # the fourth lookup failed: Redis is not asked to lock it, only the loader
    assert [e.keys[0] for e in locks.effects] == KEYS[:3]  # type: ignore[union-attr]
    replies = [
        [AcquireStatus.OWNED],
        [AcquireStatus.FOUND, msgpack.packb("cached")],
        outage(),  # this lock attempt failed: load it, store nothing
    ]
    # The lock whose script failed may have been granted: it is given back at once,
    # before the load, since others may wait on it while this batch loads and waits.
    release = flow.reply(replies)
    assert isinstance(release, Batch)
    assert [(e.script, e.keys[0]) for e in release.effects] == [  # type: ignore[union-attr]
        (ScriptName.STORE, KEYS[2]),
        (ScriptName.LEAVE, f"{KEYS[2]}:waiters"),
    ]
    load = flow.reply([1, outage()])  # the LEAVE did not get through: it stays held
    assert load == LoadSome((0, 2, 3))
    assert [(r[0], r[1]) for r in flow.released()] == [
        (ScriptName.STORE, KEYS[0]),
        (ScriptName.LEAVE, f"{KEYS[2]}:waiters"),
    ]
    # Its callers in this process that come from here on read for themselves.
    assert flow.reply(["one", None, "four"]) is Signal.SEAL
    stores = flow.reply(None)
    assert isinstance(stores, Batch)
    assert [e.keys[0] for e in stores.effects] == [KEYS[0]]  # type: ignore[union-attr]
    flow.reply([0])  # the store found another token: invalidated meanwhile
    assert [r[1] for r in flow.released()] == [f"{KEYS[2]}:waiters"]
    assert flow.result == [
        Served("one", Source.LOADER, lease_kept=False),
        Served("cached", Source.CACHE),
        Served(None, Source.LOADER, shareable=True),
        Served("four", Source.LOADER, shareable=True),
    ]
    stats = p.stats.snapshot()
    assert (stats.loads, stats.misses, stats.hits, stats.errors) == (3, 3, 1, 2)


def test_a_held_entry_in_a_batch_is_waited_for_and_loaded_alone_if_its_owner_vanished() -> None:
    p = plan()
    flow = Stepper(load_batch(p, KEYS[:1], [None], 500))
    token = flow.effect.effects[0].args[0]
    wait = flow.reply([[AcquireStatus.HELD, 50]])
    # The single path waits under the batch's token: one registration, one list.
    assert wait == Command(("BLPOP", f"{KEYS[0]}:wake:{token}", "0.050"), blocks=True)
    assert [r[0] for r in flow.released()] == [ScriptName.STORE, ScriptName.LEAVE]
    assert flow.reply(None) is Signal.SEAL  # timed out: look again
    again = flow.reply(None)
    assert isinstance(again, RunScript)
    assert again.script is ScriptName.ACQUIRE
    assert flow.reply([AcquireStatus.OWNED]) == LoadOne(0)  # one entry, not the batch
    flow.reply("v")  # SEAL
    flow.reply(None)  # STORE
    flow.reply(1)
    assert flow.result == [Served("v", Source.LOADER, shareable=True)]


def test_a_failing_batch_loader_leaves_every_lock_it_took_to_the_drivers_release() -> None:
    flow = Stepper(load_batch(plan(), KEYS[:3], [None, None, None], 500))
    flow.reply([[AcquireStatus.OWNED], [AcquireStatus.OWNED], [AcquireStatus.HELD, 90]])
    with pytest.raises(LookupError):
        flow.fail(LookupError("primary down"))
    assert [(r[0], r[1]) for r in flow.released()] == [
        (ScriptName.STORE, KEYS[0]),
        (ScriptName.STORE, KEYS[1]),
        (ScriptName.STORE, KEYS[2]),  # registered as a waiter: its whole Hold stands
        (ScriptName.LEAVE, f"{KEYS[2]}:waiters"),
    ]


def test_a_failed_batch_answers_entries_kept_for_errors_stale_and_gives_back_its_locks() -> None:
    p = dataclasses.replace(plan(stale_if_error=60), peek=True)
    kept = [msgpack.packb("old"), 50_000]  # PEEK: past its ttl, kept for stale_if_error
    flow = Stepper(load_batch(p, KEYS[:3], [kept, [], []], 500))
    load = flow.reply([[AcquireStatus.OWNED], [AcquireStatus.OWNED], [AcquireStatus.HELD, 90]])
    assert load == LoadSome((0, 1))  # the kept entry loads with the batch
    failure = LookupError("primary down")
    releases = flow.fail(failure)
    # Every lock and the waiter's place go back now, not when many() ends.
    assert isinstance(releases, Batch)
    assert [(e.script, e.keys[0]) for e in releases.effects] == [  # type: ignore[union-attr]
        (ScriptName.STORE, KEYS[0]),
        (ScriptName.STORE, KEYS[1]),
        (ScriptName.STORE, KEYS[2]),
        (ScriptName.LEAVE, f"{KEYS[2]}:waiters"),
    ]
    flow.reply([1, 1, 1, 1])
    assert flow.holds == []
    # The kept value answers its entry; the entry without one gets the error; the
    # held entry is not waited for (many() raises the error).
    assert flow.result == [Served("old", Source.STALE, shareable=True), failure, None]
    assert p.stats.snapshot().stale == 1


def test_a_failed_batch_whose_entries_all_had_kept_values_still_waits_for_the_held_one() -> None:
    p = dataclasses.replace(plan(stale_if_error=60), peek=True)
    kept = [msgpack.packb("old"), 50_000]
    flow = Stepper(load_batch(p, KEYS[:2], [kept, []], 500))
    assert flow.reply([[AcquireStatus.OWNED], [AcquireStatus.HELD, 90]]) == LoadSome((0,))
    releases = flow.fail(LookupError("primary down"))
    assert [(e.script, e.keys[0]) for e in releases.effects] == [(ScriptName.STORE, KEYS[0])]
    wait = flow.reply([1])
    assert isinstance(wait, Command)
    assert wait.args[0] == "BLPOP"  # nothing to raise: the held entry is still served
    assert flow.reply([f"{KEYS[1]}:wake", "1"]) is Signal.SEAL
    assert flow.reply(None).script is ScriptName.ACQUIRE
    flow.reply([AcquireStatus.FOUND, msgpack.packb("new")])
    assert flow.result == [
        Served("old", Source.STALE, shareable=True),
        Served("new", Source.WAITED, shareable=True),
    ]
    assert flow.holds == []


def test_invalidate_matching_pages_and_deletes_only_what_belongs() -> None:
    flow = Stepper(invalidate_matching("cache:{p:*", lambda key: not key.endswith("x}")))
    assert flow.effect == Scan("cache:{p:*", None, SCAN_BATCH)
    page = flow.reply(("cursor", ["cache:{p:1}", "cache:{p:1}:lock", "cache:{p:x}"]))
    assert page == Batch(
        [Command(("UNLINK", "cache:{p:1}")), Command(("UNLINK", "cache:{p:1}:lock"))]
    )
    assert flow.reply([1, 1]) == Scan("cache:{p:*", "cursor", SCAN_BATCH)
    flow.reply((None, ["cache:{p:2}"]))
    flow.reply([1])
    assert flow.result == (2, None)  # value keys only: locks are not entries
    failing = Stepper(invalidate_matching("cache:{*", lambda key: True))
    failing.reply((None, ["cache:{a}", "cache:{b}"]))
    failure = outage()
    failing.reply([1, failure])
    assert failing.result == (1, failure)  # stopped part way: said, never hidden


def test_a_load_under_a_lock_renews_its_lease_every_third_of_lock_ttl() -> None:
    p = plan()
    flow = Stepper(after_miss(p, KEY, None, 500))
    token = flow.effect.args[0]
    assert flow.reply([AcquireStatus.OWNED]) is Signal.LOAD
    (lease,) = flow.leases
    assert lease.load is Signal.LOAD
    assert lease.every_ms == 10_000 // 3
    renew = RunScript(ScriptName.RENEW, (f"{KEY}:lock", f"{KEY}:waiters"), (token, 10_000))
    assert lease.renewals == ((renew,),)  # fenced by the token; the waiters' set too


def test_a_tagged_load_renews_its_lock_and_its_tags_versions() -> None:
    """A tagged store reads its tags' versions again in its own round trip, so a
    version lost while the loader ran makes the store a miss: a load slower than a
    version lives keeps it alive (TAG_RENEW, which never makes one), in a group of
    its own, so a version gone stops only its own renewal, never the lock's."""
    p = dataclasses.replace(plan(), tags=(KeyTemplate("shop:<id>", lambda id: None),))
    flow = Stepper(after_miss(p, KEY, None, 500))
    flow.reply(("shop:1",))  # the lock script, the tag's version read with it
    flow.reply([[AcquireStatus.OWNED], b"0123456789abcdef"])
    flow.reply(("shop:1",))  # TAG_STAMP, before the loader reads the primary
    assert flow.reply([[b"0123456789abcdef", 0]]) is Signal.LOAD
    ((renew,), (version,)) = flow.leases[0].renewals
    assert renew.script is ScriptName.RENEW
    assert version.script is ScriptName.TAG_RENEW
    assert version.keys == ("cache:tag:{shop:1}",)
    assert version.args == (30_000 + 10_000,)  # ttl + lock_ttl: TAG_STAMP's life


def test_a_batch_renews_the_lease_of_each_lock_it_owns_and_no_other() -> None:
    flow = Stepper(load_batch(plan(), KEYS[:3], [None, None, None], 500))
    tokens = [e.args[0] for e in flow.effect.effects]
    load = flow.reply([[AcquireStatus.OWNED], [AcquireStatus.OWNED], outage()])
    if isinstance(load, Batch):  # the failed lock attempt is given back first
        load = flow.reply([1, 1])
    assert load == LoadSome((0, 1, 2))
    (lease,) = flow.leases
    assert [group[0].keys[0] for group in lease.renewals] == [f"{k}:lock" for k in KEYS[:2]]
    assert [group[0].args[0] for group in lease.renewals] == tokens[:2]
