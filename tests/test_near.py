"""The near cache: the in-process tier, and Redis keeping every process's copies
honest. Tracking needs a real Redis; the store's rules are also tested without one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis

from cached_aside import (
    CacheEngine,
    ConfigurationError,
    NearCache,
    Outcome,
    Source,
    _near_store,
    cache_aside,
)
from cached_aside._codecs import HASH_CODEC, MSGPACK_CODEC
from cached_aside._near import MISSING, Tracking
from cached_aside._near_store import NearStore

from .conftest import PATIENCE, REDIS_URL, delete_prefix, needs_real_redis, unique_prefix
from .servers import REDIS_CLI, REDIS_SERVER, RedisProcess, server_speaks_tls

ROOT = Path(__file__).resolve().parent.parent


# -- the store's rules, no Redis -------------------------------------------------


@pytest.fixture
def near_clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The clock near caches read, standing still until the test moves it
    (`near_clock[0] += seconds`): a near entry's own expiry, told apart from time
    a slow machine takes."""
    now = [time.monotonic()]
    monkeypatch.setattr(_near_store, "monotonic", lambda: now[0])
    return now


def store(**config: Any) -> NearStore:
    made = NearStore(NearCache(**config), MSGPACK_CODEC.freeze)
    made.switch(True)
    return made


def test_a_change_reported_during_the_read_voids_the_fill() -> None:
    near = store()
    ticket = near.expect("k")
    near.drop(["k"])  # Redis reported a change while our read was on its way
    near.fill("k", ticket, {"v": 1}, 10_000)
    assert near.get("k") is MISSING
    ticket = near.expect("k")
    near.fill("k", ticket, {"v": 2}, 10_000)
    assert near.get("k") == {"v": 2}


def test_a_newer_reader_voids_an_older_readers_fill() -> None:
    near = store()
    older = near.expect("k")
    newer = near.expect("k")
    near.fill("k", older, "old", 10_000)
    assert near.get("k") is MISSING
    near.fill("k", newer, "new", 10_000)
    assert near.get("k") == "new"


def test_entries_never_outlive_their_redis_entry_or_the_near_ttl(
    near_clock: list[float],
) -> None:
    near = store(ttl=10)
    near.fill("short", near.expect("short"), "x", 50)  # 50 ms left in Redis
    near.fill("long", near.expect("long"), "y", 60_000)
    near.fill("forever", near.expect("forever"), "z", -1)  # no expiry in Redis: not kept
    assert near.get("short") == "x"
    assert near.get("forever") is MISSING
    near_clock[0] += 0.049
    assert near.get("short") == "x"
    near_clock[0] += 0.002
    assert near.get("short") is MISSING
    assert near.get("long") == "y"


def test_least_recently_used_entries_go_first() -> None:
    near = store(max_entries=2)
    for key in ("a", "b"):
        near.fill(key, near.expect(key), key, 10_000)
    near.get("a")
    near.fill("c", near.expect("c"), "c", 10_000)
    assert (near.get("a"), near.get("b"), near.get("c")) == ("a", MISSING, "c")


def test_tickets_count_against_the_bound_oldest_first() -> None:
    near = store(max_entries=3)
    near.fill("a", near.expect("a"), "a", 10_000)
    first = near.expect("x")  # reads that never come back (they raised, say)
    for key in ("y", "z", "w"):
        near.expect(key)
    assert near.size() == 3  # the oldest tickets went first...
    near.fill("x", first, "x", 10_000)
    assert near.get("x") is MISSING  # ...and a fill without its ticket is refused
    assert near.get("a") == "a"  # values stay while there are tickets to give up
    newer = near.expect("y")
    near.forget("y", first)  # not its ticket any more: kept
    near.fill("y", newer, "y", 10_000)
    assert near.get("y") == "y"


def test_off_means_empty_and_no_fills() -> None:
    near = store()
    near.fill("a", near.expect("a"), 1, 10_000)
    ticket = near.expect("b")
    near.switch(False)  # the listener lost Redis
    assert near.get("a") is MISSING
    near.fill("b", ticket, 2, 10_000)
    assert near.expect("c") is None
    near.switch(True)
    assert near.get("b") is MISSING


@pytest.mark.parametrize(
    "value",
    [{"a": 1, "b": "x"}, [1, 2], {"nested": {"list": [1, 2]}}, [[1], {"a": []}], "text", 5, None],
)
def test_every_near_hit_is_a_fresh_copy(value: Any) -> None:
    near = store()
    near.fill("k", near.expect("k"), value, 10_000)
    first = near.get("k")
    if isinstance(first, dict):
        first["added"] = True
        for inner in first.values():
            if isinstance(inner, dict | list):
                inner.clear()
    elif isinstance(first, list):
        first.append("added")
    assert near.get("k") == value


def test_hash_records_are_copied_too() -> None:
    near = NearStore(NearCache(), HASH_CODEC.freeze)
    near.switch(True)
    record = {"name": "Pen"}
    near.fill("k", near.expect("k"), record, 10_000)
    record["name"] = "changed by the caller after the fill"
    near.get("k")["name"] = "changed by a reader"
    assert near.get("k") == {"name": "Pen"}


def test_bad_near_settings_are_refused_at_decoration() -> None:
    with pytest.raises(ConfigurationError, match="max_entries"):
        NearCache(max_entries=0)
    with pytest.raises(ConfigurationError, match="needs a ttl"):
        NearCache(allow_untracked=True)
    with pytest.raises(ConfigurationError, match=r"ttl=...\) must be"):
        NearCache(ttl=-1)
    with pytest.raises(ConfigurationError, match="near must be a NearCache"):
        cache_aside(key="p:<id>", ttl=5, near="yes")  # type: ignore[arg-type]


# -- where the server cannot track ------------------------------------------------


def test_fakeredis_is_refused_unless_ttl_only_staleness_is_accepted(
    near_clock: list[float],
) -> None:
    engine = CacheEngine(fakeredis.FakeRedis(), prefix="near-fake")
    tracked = cache_aside(key="p:<id>", ttl=30, engine=engine, near=NearCache())(lambda id: id)
    with pytest.raises(ConfigurationError, match=r"cannot track keys.*allow_untracked=True"):
        tracked("a")
    untracked = cache_aside(
        key="q:<id>", ttl=30, engine=engine, near=NearCache(ttl=0.2, allow_untracked=True)
    )(lambda id: [id])
    assert untracked("a") == ["a"]
    assert [untracked.lookup("a").source for _ in range(2)] == [Source.CACHE, Source.NEAR]
    assert engine.near_state() == "unsupported"
    untracked.invalidate("a")  # this process's own change is seen at once
    assert untracked.lookup("a").source is Source.LOADER
    engine.close()


def test_misses_never_stored_stay_within_the_near_bound() -> None:
    """A read that stores nothing (cache_if refused, the loader raised, None without
    negative caching) gives its ticket back, and whatever is left behind counts
    against max_entries: 100,000 distinct such misses keep the tier within it."""
    engine = CacheEngine(fakeredis.FakeRedis(), prefix=unique_prefix())
    near = NearCache(max_entries=500, ttl=30, allow_untracked=True)

    def load(id: int) -> Any:
        if id % 3 == 0:
            raise LookupError("the primary failed")
        return None if id % 3 == 1 else {"draft": id}

    fn = cache_aside(
        key="miss:<id>",
        ttl=30,
        negative_ttl=0,
        cache_if=lambda row: "draft" not in row,
        near=near,
        engine=engine,
    )(load)
    for id in range(3_000):  # through the decorated function, every way a read stores nothing
        if id % 3 == 0:
            with pytest.raises(LookupError):
                fn(id)
        else:
            fn(id)
    tier = fn._near
    assert tier is not None
    assert tier.size() == 0  # every read gave its ticket back
    for id in range(3_000, 100_000):  # the bulk: reads that never come back at all
        tier.expect(fn.key(id))
    assert tier.size() <= 500
    assert fn(1) is None  # still served
    assert fn.lookup(2).value == {"draft": 2}
    fn.set(7, value={"id": 7})
    assert fn.lookup(7).source is Source.CACHE
    assert fn.lookup(7).source is Source.NEAR  # and still a near cache
    assert tier.size() <= 500
    engine.close()


# -- against real Redis ------------------------------------------------------------


@pytest.fixture
def near_engine() -> Iterator[CacheEngine]:
    if REDIS_URL is None:
        pytest.skip("client tracking needs a real Redis server")
    engine = CacheEngine.from_url(REDIS_URL, prefix=unique_prefix())
    yield engine
    engine.close()
    raw = redis.Redis.from_url(REDIS_URL)
    delete_prefix(raw, engine.prefix)
    raw.close()


@pytest.fixture(params=["bcast", "keys"])
def tracking(request: pytest.FixtureRequest) -> Tracking:
    """Both tracking modes pass the coherence tests."""
    mode: Tracking = request.param
    return mode


def until_near(fn: Any, *args: Any) -> None:
    """Read until served from the near cache (our own store's tracking reports
    arrive a moment after it, and void the first fills)."""
    deadline = time.monotonic() + PATIENCE
    while fn.lookup(*args).source is not Source.NEAR:
        assert time.monotonic() < deadline, "never served from the near cache"


@needs_real_redis
def test_near_hits_are_counted_apart_and_return_copies(
    near_engine: CacheEngine, tracking: Tracking
) -> None:
    loads: list[str] = []

    @cache_aside(key="p:<id>", ttl=30, engine=near_engine, near=NearCache(tracking=tracking))
    def read(id: str) -> dict[str, Any]:
        loads.append(id)
        return {"id": id, "tags": ["a"]}

    assert read("x") == {"id": "x", "tags": ["a"]}
    until_near(read, "x")
    value = read("x")
    value["tags"].append("mutated")
    assert read("x") == {"id": "x", "tags": ["a"]}
    stats = read.stats()
    assert stats.near_hits >= 3
    assert stats.hits >= 1  # the Redis hits that filled it
    assert loads == ["x"]
    assert near_engine.near_state() == "tracking"


@needs_real_redis
def test_near_hits_from_many_threads_are_all_counted_and_reset(near_engine: CacheEngine) -> None:
    """Hits are counted without a lock (itertools.count): none may be lost."""

    @cache_aside(key="p:<id>", ttl=30, engine=near_engine, near=NearCache())
    def read(id: str) -> dict[str, str]:
        return {"id": id}

    read("x")
    until_near(read, "x")
    read.reset_stats()
    threads = [threading.Thread(target=lambda: [read("x") for _ in range(5_000)]) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats = read.stats()
    assert stats.near_hits + stats.hits == 40_000  # a fill voided by a report hits Redis
    assert stats.misses == 0
    read.reset_stats()
    assert (read.stats().near_hits, read.stats().hits) == (0, 0)


@needs_real_redis
def test_this_processes_own_changes_are_seen_at_once(
    near_engine: CacheEngine, tracking: Tracking
) -> None:
    version = {"v": "1"}

    @cache_aside(
        key="p:<id>", ttl=30, as_hash=True, engine=near_engine, near=NearCache(tracking=tracking)
    )
    def read(id: str) -> dict[str, str]:
        return dict(version)

    read("x")
    until_near(read, "x")
    version["v"] = "2"
    read.invalidate("x")
    assert read("x") == {"v": "2"}  # no wait for Redis's report
    until_near(read, "x")
    assert read.update_field("x", "v", "3") is Outcome.UPDATED
    assert read("x") == {"v": "3"}
    until_near(read, "x")
    read.invalidate_many(["x"])
    version["v"] = "4"
    assert read("x") == {"v": "4"}
    until_near(read, "x")
    read.invalidate_all()
    version["v"] = "5"
    assert read("x") == {"v": "5"}


@needs_real_redis
def test_a_near_entry_is_not_served_after_its_redis_entry_expired(
    near_engine: CacheEngine,
) -> None:
    loads: list[str] = []

    # 2 s: ample to see the first near hit on a slow machine
    @cache_aside(key="p:<id>", ttl=2, engine=near_engine, near=NearCache())
    def read(id: str) -> str:
        loads.append(id)
        return f"v{len(loads)}"

    read("x")
    until_near(read, "x")
    time.sleep(2.05)
    result = read.lookup("x")
    assert (result.source, result.value) == (Source.LOADER, "v2")


@needs_real_redis
def test_near_ttl_bounds_staleness_below_the_redis_ttl(
    near_engine: CacheEngine, near_clock: list[float]
) -> None:
    @cache_aside(key="p:<id>", ttl=30, engine=near_engine, near=NearCache(ttl=0.1))
    def read(id: str) -> str:
        return "v"

    read("x")
    until_near(read, "x")
    near_clock[0] += 0.12
    assert read.lookup("x").source is Source.CACHE


@needs_real_redis
def test_a_change_made_with_redis_cli_drops_the_copy(
    near_engine: CacheEngine, tracking: Tracking
) -> None:
    primary = {"v": "1"}

    @cache_aside(key="p:<id>", ttl=30, engine=near_engine, near=NearCache(tracking=tracking))
    def read(id: str) -> str:
        return primary["v"]

    read("x")
    until_near(read, "x")
    primary["v"] = "2"
    subprocess.run(
        [REDIS_CLI or "redis-cli", "-u", REDIS_URL, "DEL", read.key("x")],
        check=True,
        capture_output=True,
    )
    deadline = time.monotonic() + 10  # unreported, the copy would live 30 s
    while read("x") != "2":
        assert time.monotonic() < deadline, "the DEL was never reported"


@needs_real_redis
def test_listener_killed_the_tier_empties_and_refills_without_stale_reads(
    near_engine: CacheEngine, tracking: Tracking
) -> None:
    primary = {"v": "1"}

    @cache_aside(key="p:<id>", ttl=30, engine=near_engine, near=NearCache(tracking=tracking))
    def read(id: str) -> str:
        return primary["v"]

    read("x")
    until_near(read, "x")
    listener = near_engine.nearby.listener
    assert listener is not None
    connections = listener.connections
    admin = redis.Redis.from_url(REDIS_URL or "")
    admin.client_kill_filter(_id=listener.client_id)
    # A change the killed connection can no longer report:
    primary["v"] = "2"
    admin.delete(read.key("x"))
    deadline = time.monotonic() + PATIENCE
    while listener.connections == connections:
        assert time.monotonic() < deadline, "the listener did not reconnect"
        assert read("x") in ("1", "2")
        time.sleep(0.005)
    assert read("x") == "2"  # emptied when the connection dropped: no stale read
    until_near(read, "x")  # and refilled once tracking is back
    assert near_engine.near_state() == "tracking"
    admin.close()


@needs_real_redis
async def test_async_functions_share_the_engines_listener(
    near_engine: CacheEngine, tracking: Tracking
) -> None:
    version = {"v": 1}

    @cache_aside(key="a:<id>", ttl=30, engine=near_engine, near=NearCache(tracking=tracking))
    async def read(id: str) -> dict[str, int]:
        return dict(version)

    @cache_aside(key="s:<id>", ttl=30, engine=near_engine, near=NearCache(tracking=tracking))
    def read_sync(id: str) -> int:
        return 1

    read_sync("x")
    await read("x")
    deadline = time.monotonic() + PATIENCE
    while (await read.lookup("x")).source is not Source.NEAR:
        assert time.monotonic() < deadline
    assert await read.many(["x", "y"]) == [{"v": 1}, {"v": 1}]
    version["v"] = 2
    await read.invalidate("x")
    assert await read("x") == {"v": 2}
    assert near_engine.nearby.listener is not None
    assert len(near_engine.nearby.listener._stores) == 2  # one listener, both functions
    await near_engine.aclose()


@needs_real_redis
@pytest.mark.slow
def test_another_process_sees_invalidate_update_field_and_del(tracking: Tracking) -> None:
    assert REDIS_URL is not None
    prefix = unique_prefix()
    raw = redis.Redis.from_url(REDIS_URL)
    engine = CacheEngine.from_url(REDIS_URL, prefix=prefix)

    @cache_aside(key="item:<id>", ttl=60, as_hash=True, engine=engine)
    def read(id: str) -> dict[str, Any]:
        value = raw.get(f"primary-{prefix}:{id}")
        return {"v": (value or b"").decode()}

    primary = f"primary-{prefix}:x"
    raw.set(primary, "v1")
    watcher = subprocess.Popen(
        [sys.executable, "-m", "tests.near_watcher", REDIS_URL, prefix, "x", tracking],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert watcher.stdout is not None
    try:
        assert watcher.stdout.readline().strip() == "ready"

        def seen_after(change: Any) -> tuple[dict[str, str], float]:
            started = time.monotonic()
            change()
            line = watcher.stdout.readline()  # type: ignore[union-attr]
            report = json.loads(line)
            return report["value"], (report["at"] - started) * 1000.0

        def invalidate() -> None:
            raw.set(primary, "v2")
            read.invalidate("x")

        def redis_cli_del() -> None:
            raw.set(primary, "v4")
            subprocess.run(
                [REDIS_CLI or "redis-cli", "-u", REDIS_URL, "DEL", read.key("x")],
                check=True,
                capture_output=True,
            )

        results = [
            ("invalidate", seen_after(invalidate), {"v": "v2"}),
            ("update_field", seen_after(lambda: read.update_field("x", "v", "v3")), {"v": "v3"}),
            ("redis-cli DEL", seen_after(redis_cli_del), {"v": "v4"}),
        ]
        report = ", ".join(f"{name} {ms:.1f} ms" for name, (_, ms), _ in results)
        print(f"\npropagation to another process: {report}")
        for name, (value, ms), expected in results:
            assert value == expected, name
            # unreported, the other process would keep its copy for the 60 s ttl
            assert ms < 10_000, f"{name} took {ms:.0f} ms to reach the other process"
        watcher.stdin.close()  # type: ignore[union-attr]
        stats = json.loads(watcher.stdout.readline())
        assert stats["near_hits"] > 0  # it really was answering from its near cache
    finally:
        watcher.kill()
        watcher.wait(10)
        for stream in (watcher.stdin, watcher.stdout):
            if stream is not None and not stream.closed:
                stream.close()
        engine.close()
        delete_prefix(raw, prefix)
        raw.delete(primary)
        raw.close()


@needs_real_redis
def test_a_forked_child_starts_empty_and_listens_for_itself(
    near_engine: CacheEngine, tracking: Tracking
) -> None:
    @cache_aside(key="p:<id>", ttl=30, engine=near_engine, near=NearCache(tracking=tracking))
    def read(id: str) -> str:
        return "v"

    read("x")
    until_near(read, "x")
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what it saw, then leave without running pytest
        verdict = "ok"
        try:
            if read.lookup("x").source is Source.NEAR:
                verdict = "served the parent's copy: nothing vouched for it"
            else:
                until_near(read, "x")  # its own listener took over
        except BaseException as exc:
            verdict = repr(exc)
        os.write(writer, verdict.encode())
        os._exit(0)
    os.close(writer)
    with os.fdopen(reader) as pipe:
        verdict = pipe.read()
    os.waitpid(pid, 0)
    assert verdict == "ok"


@needs_real_redis
def test_closing_the_engine_stops_its_listener(near_engine: CacheEngine) -> None:
    fn = cache_aside(key="p:<id>", ttl=30, engine=near_engine, near=NearCache())(lambda id: id)
    fn("x")
    listener = near_engine.nearby.listener
    assert listener is not None
    assert listener._thread is not None
    near_engine.close()
    assert not listener._thread.is_alive()
    assert near_engine.near_state() == "off"


@pytest.mark.skipif(
    not server_speaks_tls(), reason=f"the server ({REDIS_SERVER}) was built without TLS"
)
def test_the_listener_speaks_tls_and_credentials_like_the_client() -> None:
    server = RedisProcess(tls=True).start()
    try:
        engine = CacheEngine.from_url(server.url, prefix="tls", ssl_ca_certs=str(server.ca_file))
        fn = cache_aside(key="p:<id>", ttl=30, engine=engine, near=NearCache())(lambda id: [id])
        fn("a")
        until_near(fn, "a")
        assert engine.near_state() == "tracking"
        engine.close()
    finally:
        server.stop()


@needs_real_redis
def test_an_engine_wide_near_cache_with_a_per_function_opt_out() -> None:
    assert REDIS_URL is not None
    engine = CacheEngine.from_url(REDIS_URL, prefix=unique_prefix(), near=NearCache(ttl=5))
    try:
        default = cache_aside(key="a:<id>", ttl=30, engine=engine)(lambda id: id)
        opted_out = cache_aside(key="b:<id>", ttl=30, engine=engine, near=False)(lambda id: id)
        own = cache_aside(key="c:<id>", ttl=30, engine=engine, near=True)(lambda id: id)
        for fn in (default, opted_out, own):
            fn("x")
        until_near(default, "x")
        until_near(own, "x")
        assert {opted_out.lookup("x").source for _ in range(20)} == {Source.CACHE}
    finally:
        engine.invalidate_prefix()
        engine.close()
    with pytest.raises(ConfigurationError, match="near must be a NearCache or None"):
        CacheEngine(prefix="x", near=True)  # type: ignore[arg-type]
