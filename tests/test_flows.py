"""The algorithm stepped by hand: scripted Redis replies, no Redis, no event loop."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from cached_aside import CacheUnavailableError
from cached_aside.batches import SCAN_BATCH, invalidate_matching, load_batch
from cached_aside.codecs import HASH_CODEC, MSGPACK_CODEC, MSGPACK_NEGATIVE, Codec
from cached_aside.effects import (
    Batch,
    Command,
    CommandFailed,
    LoadOne,
    LoadSome,
    RunScript,
    Scan,
    Signal,
)
from cached_aside.flows import Plan, Served, Source, after_miss, invalidate, on_lookup
from cached_aside.options import build_options
from cached_aside.scripts import AcquireStatus, ScriptName
from cached_aside.stats import Stats

KEY = "cache:{product:1}"


def outage() -> CommandFailed:
    return CommandFailed(ConnectionError("refused"), wrong_type=False)


def plan(codec: Codec = MSGPACK_CODEC, **options: Any) -> Plan:
    settings: dict[str, Any] = {
        "ttl": 30,
        "negative_ttl": None,
        "lock_ttl": 10,
        "as_hash": codec is HASH_CODEC,
        "fail_open": True,
    }
    settings.update(options)
    return Plan("get_product", codec, build_options(**settings), Stats("get_product"))


class Stepper:
    """Drives a flow one effect at a time."""

    def __init__(self, flow: Any) -> None:
        self.flow = flow
        self.effect = next(flow)
        self.result: Any = None

    def reply(self, value: Any) -> Any:
        return self._advance(lambda: self.flow.send(value))

    def fail(self, exc: BaseException) -> Any:
        return self._advance(lambda: self.flow.throw(exc))

    def _advance(self, step: Any) -> Any:
        try:
            self.effect = step()
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
    flow.reply(1)
    assert flow.result == Served({"stock": "3"}, Source.LOADER, lease_kept=True, shareable=True)
    assert p.stats.snapshot().loads == 1


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
    flow.reply([AcquireStatus.FOUND, msgpack.packb("v")])
    assert flow.result == Served("v", Source.CACHE)
    assert p.stats.snapshot().loads == 0


def test_waiter_blocks_on_the_wake_list_bounded_by_lock_and_socket() -> None:
    p = plan()
    flow = Stepper(after_miss(p, KEY, None, 400))
    wait = flow.reply([AcquireStatus.HELD, 9_000])
    assert wait == Command(("BLPOP", f"{KEY}:wake", "0.400"))
    # Timed out: seal (later callers read for themselves), then look again.
    assert flow.reply(None) is Signal.SEAL
    again = flow.reply(None)
    assert isinstance(again, RunScript)
    assert again.script is ScriptName.ACQUIRE
    assert flow.reply([AcquireStatus.HELD, 2]) == Command(("BLPOP", f"{KEY}:wake", "0.005"))
    assert flow.reply([b"wake", b"1"]) is Signal.SEAL
    flow.reply(None)
    flow.reply([AcquireStatus.FOUND, msgpack.packb([1])])
    # Read after the seal: fresh for everyone who joined before it.
    assert flow.result == Served([1], Source.WAITED, shareable=True)
    stats = p.stats.snapshot()
    assert (stats.misses, stats.stampedes_suppressed, stats.loads) == (1, 1, 0)
    assert stats.lock_waits == 1  # once per call, however many times it looked again


def test_loader_error_releases_the_lock_and_propagates() -> None:
    flow = Stepper(after_miss(plan(), KEY, None, 500))
    token = flow.effect.args[0]
    assert flow.reply([AcquireStatus.OWNED]) is Signal.LOAD
    release = flow.fail(ValueError("bad row"))
    assert isinstance(release, RunScript)
    assert release.args[:2] == (token, "release")
    with pytest.raises(ValueError, match="bad row"):
        flow.reply(1)


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


def test_invalidate_runs_one_script() -> None:
    flow = Stepper(invalidate(plan(), KEY))
    assert isinstance(flow.effect, RunScript)
    assert flow.effect.script is ScriptName.INVALIDATE
    flow.reply(1)
    assert flow.result is True


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
    load = flow.reply(replies)
    assert load == LoadSome((0, 2, 3))
    stores = flow.reply(["one", None, "four"])
    assert isinstance(stores, Batch)
    assert [e.keys[0] for e in stores.effects] == [KEYS[0]]  # type: ignore[union-attr]
    flow.reply([0])  # the store found another token: invalidated meanwhile
    assert flow.result == [
        Served("one", Source.LOADER, lease_kept=False),
        Served("cached", Source.CACHE),
        Served(None, Source.LOADER),
        Served("four", Source.LOADER),
    ]
    stats = p.stats.snapshot()
    assert (stats.loads, stats.misses, stats.hits, stats.errors) == (3, 3, 1, 2)


def test_a_held_entry_in_a_batch_is_waited_for_and_loaded_alone_if_its_owner_vanished() -> None:
    p = plan()
    flow = Stepper(load_batch(p, KEYS[:1], [None], 500))
    wait = flow.reply([[AcquireStatus.HELD, 50]])
    assert wait == Command(("BLPOP", f"{KEYS[0]}:wake", "0.050"))
    assert flow.reply(None) is Signal.SEAL  # timed out: look again
    again = flow.reply(None)
    assert isinstance(again, RunScript)
    assert again.script is ScriptName.ACQUIRE
    assert flow.reply([AcquireStatus.OWNED]) == LoadOne(0)  # one entry, not the batch
    flow.reply("v")  # SEAL
    flow.reply(None)  # STORE
    flow.reply(1)
    assert flow.result == [Served("v", Source.LOADER, shareable=True)]


def test_a_failing_batch_loader_releases_every_lock_it_took() -> None:
    flow = Stepper(load_batch(plan(), KEYS[:2], [None, None], 500))
    flow.reply([[AcquireStatus.OWNED], [AcquireStatus.OWNED]])
    release = flow.fail(LookupError("primary down"))
    assert isinstance(release, Batch)
    assert [e.args[1] for e in release.effects] == ["release", "release"]  # type: ignore[union-attr]
    with pytest.raises(LookupError):
        flow.reply([1, 1])


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
    assert flow.result == 2  # value keys only: locks are not entries
    failing = Stepper(invalidate_matching("cache:{*", lambda key: True))
    failing.reply((None, ["cache:{a}"]))
    with pytest.raises(CommandFailed):
        failing.reply([outage()])
