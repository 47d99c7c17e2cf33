"""The near cache's memory bound and admission policy: a byte budget that holds under
any sizes and operations, W-TinyLFU keeping the hot set through a scan (where LRU
does not), and the counters the stats and Prometheus export. No Redis needed."""

from __future__ import annotations

import tracemalloc
from collections import OrderedDict
from typing import Any

import fakeredis
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cached_aside import CacheEngine, ConfigurationError, NearCache, cache_aside
from cached_aside._codecs import MSGPACK_CODEC
from cached_aside._near import MISSING
from cached_aside._near_budget import ENTRY_OVERHEAD_BYTES, NearBudget, weigh
from cached_aside._near_store import NearStore

TTL_MS = 60_000


def store(budget: NearBudget | None = None, **config: Any) -> NearStore:
    made = NearStore(NearCache(**config), MSGPACK_CODEC.freeze, budget)
    made.switch(True)
    return made


def read(near: NearStore, key: str, value: Any) -> Any:
    """What the engine does: the near cache, else Redis (here: `value`) and a fill."""
    found = near.get(key)
    if found is MISSING:
        near.fill(key, near.expect(key), value, TTL_MS)
    return found


@pytest.mark.parametrize(
    ("config", "option"),
    [
        ({"max_bytes": 0}, "max_bytes"),
        ({"max_bytes": -1}, "max_bytes"),
        ({"max_bytes": 1.5}, "max_bytes"),
        ({"max_bytes": True}, "max_bytes"),
        ({"max_bytes": "1MB"}, "max_bytes"),
        ({"max_entries": 0}, "max_entries"),
    ],
)
def test_bad_budgets_are_refused_naming_the_option(config: dict[str, Any], option: str) -> None:
    with pytest.raises(ConfigurationError, match=rf"NearCache\({option}=\.\.\.\)"):
        NearCache(**config)


def test_an_entry_counts_its_key_value_and_the_measured_overhead() -> None:
    """The fixed overhead is what tracemalloc sees an entry cost beyond its key and
    value (dict slots, policy segment, tuple, sketch share), rounded up."""
    count = 20_000
    keys = [f"cache:{{product:{n}}}" for n in range(count)]
    value = b"x" * 40  # one object: its size is counted per entry, allocated once here
    near = store(max_entries=count)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for key in keys:
            near.fill(key, near.expect(key), value, TTL_MS)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert near.size() == count
    assert grown / count <= ENTRY_OVERHEAD_BYTES
    assert near.held == sum(weigh(key, value) for key in keys)
    flat = {"id": "7", "price": 9.5}
    assert weigh("k", flat) > weigh("k", {}) > weigh("", None)


# -- the budget holds, whatever happens --------------------------------------------

operations = st.lists(
    st.tuples(
        st.sampled_from(["read", "read", "read", "fill", "drop", "abandon", "clear"]),
        st.integers(0, 2),  # which store
        st.integers(0, 40),  # which key
        st.integers(0, 3000),  # the value's size
    ),
    max_size=200,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    operations,
    st.integers(1_000, 20_000),
    st.integers(1, 30),
)
def test_the_byte_budget_holds_under_any_sizes_and_operations(
    steps: list[tuple[str, int, int, int]], max_bytes: int, max_entries: int
) -> None:
    budget = NearBudget(max_bytes)
    config = NearCache(max_entries=max_entries, max_bytes=max_bytes)
    stores = [NearStore(config, MSGPACK_CODEC.freeze, budget) for _ in range(3)]
    for near in stores:
        near.switch(True)
    for action, which, number, size in steps:
        near, key = stores[which], f"k{number}"
        if action == "read":
            read(near, key, "v" * size)
        elif action == "fill":  # a fresh read that replaces what is kept
            near.fill(key, near.expect(key), b"b" * size, TTL_MS)
        elif action == "drop":
            near.drop([key])
        elif action == "abandon":  # a read that raised: its ticket is never used
            near.expect(key)
        else:
            near.clear()
        assert budget.held <= max_bytes
        assert budget.held == sum(s.held for s in stores)
        for s in stores:
            assert s.held == sum(weigh(k, entry[2]) for k, entry in s._data.items())
            assert len(s._data) == len(s._policy)  # the policy tracks exactly what is kept
            assert s.size() <= max_entries


def test_an_entry_larger_than_the_budget_is_refused_without_emptying_the_tier() -> None:
    near = store(max_bytes=4_000)
    read(near, "small", "s")
    read(near, "huge", "h" * 10_000)
    assert (near.get("small"), near.get("huge")) == ("s", MISSING)
    assert near.counts()[2] == 1  # refused


def test_one_engine_budget_is_shared_by_its_functions_and_an_own_near_has_its_own() -> None:
    engine = CacheEngine(
        fakeredis.FakeRedis(server=fakeredis.FakeServer()),
        prefix="budget",
        near=NearCache(ttl=30, allow_untracked=True, max_bytes=40_000),
    )
    own = NearCache(ttl=30, allow_untracked=True, max_bytes=1_000_000)

    @cache_aside(key="a:<id>", ttl=30, engine=engine)
    def first(id: int) -> str:
        return "a" * 500

    @cache_aside(key="b:<id>", ttl=30, engine=engine)
    def second(id: int) -> str:
        return "b" * 500

    @cache_aside(key="c:<id>", ttl=30, engine=engine, near=own)
    def third(id: int) -> str:
        return "c" * 500

    for n in range(200):
        for fn in (first, second, third):
            fn(n)
            fn(n)  # from Redis now, and kept near
    functions = engine.function_stats()
    shared = sum(functions[fn.__qualname__].near_bytes for fn in (first, second))
    assert 0 < shared <= 40_000
    assert functions[third.__qualname__].near_bytes > 40_000  # its own budget: all 200 kept
    total = engine.stats()
    assert total.near_bytes == shared + functions[third.__qualname__].near_bytes
    assert total.near_evictions + total.near_admissions_refused > 0
    assert total.near_misses > 0
    engine.close()


# -- a scan does not flush the hot set ---------------------------------------------


class LruModel:
    """The near cache before W-TinyLFU: least recently used out first."""

    def __init__(self, most: int) -> None:
        self.most = most
        self.kept: OrderedDict[str, None] = OrderedDict()

    def read(self, key: str) -> None:
        if key in self.kept:
            self.kept.move_to_end(key)
            return
        self.kept[key] = None
        while len(self.kept) > self.most:
            self.kept.popitem(last=False)


def hot_then_scan(reader: Any) -> list[str]:
    """Twenty hot keys read ten times each, then a thousand cold keys read once each."""
    hot = [f"hot{n}" for n in range(20)]
    for _ in range(10):
        for key in hot:
            reader(key)
    for n in range(1_000):
        reader(f"cold{n}")
    return hot


def test_a_scan_of_cold_keys_leaves_the_hot_set_where_lru_loses_it() -> None:
    lru = LruModel(100)
    hot = hot_then_scan(lru.read)
    assert not any(key in lru.kept for key in hot)  # LRU: the scan pushed out every one

    near = store(max_entries=100)
    hot = hot_then_scan(lambda key: read(near, key, key))
    assert [near.get(key) for key in hot] == hot
    assert near.counts()[2] > 900  # the cold keys were turned away, one by one


def test_under_a_byte_budget_too_the_scan_is_refused() -> None:
    near = store(max_entries=100_000, max_bytes=60_000)  # room for about 100 entries
    hot = hot_then_scan(lambda key: read(near, key, key * 10))
    assert [near.get(key) for key in hot] == [key * 10 for key in hot]
    assert near.held <= 60_000


def test_a_key_that_turns_hot_gets_in() -> None:
    near = store(max_entries=50)
    hot_then_scan(lambda key: read(near, key, key))
    for _ in range(12):  # asked for again and again: it outranks the coldest entry
        read(near, "new", "new")
    assert near.get("new") == "new"


def test_a_function_holding_one_entry_takes_room_from_the_others() -> None:
    budget = NearBudget(7_000)
    big, small = store(budget), store(budget)
    for n in range(8):
        for _ in range(3):
            read(small, f"s{n}", "s" * 100)
    for _ in range(5):  # asked for more often than any of small's entries
        read(big, "only", "b" * 4_000)
    assert big.get("only") == "b" * 4_000
    assert budget.held <= 7_000
    assert small.counts()[1] > 0  # evicted from the other function
