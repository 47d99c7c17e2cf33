"""The operations command line against a real Redis, as an operator would run it."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator

import pytest
import redis
import redis.asyncio.retry

from cached_aside import CacheEngine, cache_aside
from cached_aside._keys import entry_keys

from .conftest import (
    REDIS_URL,
    delete_prefix,
    needs_real_redis,
    unique_prefix,
)

pytestmark = pytest.mark.skipif(REDIS_URL is None, reason="no Redis server reachable")


def cli(*args: str, prefix: str | None = None) -> tuple[int, dict[str, object] | str]:
    """Run the command line; `prefix` sets CACHED_ASIDE_PREFIX, else it is unset."""
    environment = {k: v for k, v in os.environ.items() if k != "CACHED_ASIDE_PREFIX"}
    if prefix is not None:
        environment["CACHED_ASIDE_PREFIX"] = prefix
    completed = subprocess.run(
        [sys.executable, "-m", "cached_aside", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=environment,
        check=False,
    )
    try:
        return completed.returncode, json.loads(completed.stdout)
    except ValueError:
        return completed.returncode, completed.stderr


@pytest.fixture
def prefix() -> object:
    assert REDIS_URL is not None
    name = unique_prefix()
    yield name
    client = redis.Redis.from_url(REDIS_URL)
    delete_prefix(client, name)
    client.close()


def test_ping() -> None:
    assert REDIS_URL is not None
    code, report = cli("--url", REDIS_URL, "ping")
    assert code == 0
    assert isinstance(report, dict)
    assert (report["reachable"], report["scripts"]) == (True, True)


def test_inspect_and_invalidate(prefix: str) -> None:
    assert REDIS_URL is not None
    engine = CacheEngine.from_url(REDIS_URL, prefix=prefix)
    product = cache_aside(key="product:<id>", ttl=60, as_hash=True, engine=engine)(
        lambda id: {"id": id, "stock": 4} if id != "gone" else None
    )
    orders = cache_aside(key="user:<user_id>:orders", ttl=60, engine=engine)(
        lambda user_id: [user_id, "pen"]
    )
    product("p-1")
    product("gone")
    orders(7)
    base = ("--url", REDIS_URL, "--prefix", prefix)
    code, report = cli(*base, "inspect", "product:<id>", "p-1")
    assert code == 0
    assert isinstance(report, dict)
    assert (report["entry"], report["value"]) == ("hash record", {"id": "p-1", "stock": "4"})
    assert 0 < report["ttl_ms"] <= 60_000  # type: ignore[operator]
    assert report["lock"] == {"held": False, "ttl_ms": None, "waiters": 0}
    code, report = cli(*base, "inspect", "user:<user_id>:orders", "7")  # 7 read as the int 7
    assert (code, report["value"]) == (0, [7, "pen"])  # type: ignore[index]
    code, report = cli(*base, "inspect", product.key("gone"))  # a full key works too
    assert "negative sentinel" in report["entry"]  # type: ignore[index]
    code, report = cli(*base, "invalidate", "product:<id>", "p-1")
    assert (code, report["existed"]) == (0, True)  # type: ignore[index]
    code, report = cli(*base, "inspect", "product:<id>", "p-1")
    assert (code, report["cached"]) == (1, False)  # type: ignore[index]
    engine.close()


def test_invalidate_exits_1_when_nothing_existed(prefix: str) -> None:
    assert REDIS_URL is not None
    engine = CacheEngine.from_url(REDIS_URL, prefix=prefix)
    product = cache_aside(key="product:<id>", ttl=60, engine=engine)(lambda id: {"id": id})
    product("p-1")
    base = ("--url", REDIS_URL, "--prefix", prefix)
    assert cli(*base, "invalidate", "product:<id>", "p-1") == (
        0,
        {"key": product.key("p-1"), "existed": True},
    )
    assert cli(*base, "invalidate", "product:<id>", "p-1") == (
        1,
        {"key": product.key("p-1"), "existed": False},
    )
    assert cli(*base, "invalidate", "product:<id>", "never-cached") == (
        1,
        {"key": product.key("never-cached"), "existed": False},
    )
    engine.close()


def test_prefix_comes_from_the_environment(prefix: str) -> None:
    assert REDIS_URL is not None
    engine = CacheEngine.from_url(REDIS_URL, prefix=prefix)
    product = cache_aside(key="product:<id>", ttl=60, engine=engine)(lambda id: {"id": id})
    product("p-1")
    code, report = cli("--url", REDIS_URL, "inspect", "product:<id>", "p-1", prefix=prefix)
    assert (code, report["key"], report["value"]) == (  # type: ignore[index]
        0,
        product.key("p-1"),
        {"id": "p-1"},
    )
    # --prefix wins over the environment; the library's default "cache" without either
    code, report = cli(
        "--url", REDIS_URL, "--prefix", f"{prefix}-other", "inspect", "product:<id>", "p-1",
        prefix=prefix,
    )  # fmt: skip
    assert (code, report) == (1, {"key": f"{prefix}-other:{{product:p-1}}", "cached": False})
    code, report = cli("--url", REDIS_URL, "inspect", "product:<id>", f"{prefix}-absent")
    assert (code, report) == (1, {"key": f"cache:{{product:{prefix}-absent}}", "cached": False})
    code, message = cli("--url", REDIS_URL, "inspect", "product:<id>", "p-1", prefix="a b")
    assert code == 2
    assert "prefix 'a b'" in str(message)
    engine.close()


def test_help_names_the_environment_and_exit_codes() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "cached_aside", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert completed.returncode == 0
    for text in ("CACHED_ASIDE_PREFIX", "CACHED_ASIDE_REDIS_URL", "REDIS_URL", "exit codes"):
        assert text in completed.stdout
    assert "1  nothing cached under the key" in completed.stdout


def test_inspect_counts_the_waiters_of_a_held_lock(prefix: str) -> None:
    """One engine holds the lock while loading; another (as another process would)
    registers as a waiter in Redis. Same-engine callers would wait in process."""
    assert REDIS_URL is not None
    engines = [CacheEngine.from_url(REDIS_URL, prefix=prefix) for _ in range(2)]
    raw = redis.Redis.from_url(REDIS_URL)
    release = threading.Event()
    loads: list[str] = []

    def load(id: str) -> dict[str, str]:
        loads.append(id)
        release.wait(60)  # holds the lock past the CLI's start-up, however slow
        return {"id": id}

    holding, waiting = (
        cache_aside(key="product:<id>", ttl=60, lock_ttl=20, engine=engine)(load)
        for engine in engines
    )
    results: list[object] = []
    holder = threading.Thread(target=lambda: results.append(holding("p-1")))
    holder.start()
    deadline = time.monotonic() + 30
    while not loads and time.monotonic() < deadline:
        time.sleep(0.01)
    waiter = threading.Thread(target=lambda: results.append(waiting("p-1")))
    waiter.start()
    waiters_key = entry_keys(holding.key("p-1")).waiters
    while not raw.exists(waiters_key) and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        code, report = cli("--url", REDIS_URL, "--prefix", prefix, "inspect", holding.key("p-1"))
        assert (code, report["type"]) == (0, "none")  # type: ignore[index]
        lock = report["lock"]  # type: ignore[index]
        assert (lock["held"], lock["waiters"]) == (True, 1)  # type: ignore[index]
        assert 0 < lock["ttl_ms"] <= 20_000  # type: ignore[index]
    finally:
        release.set()
        holder.join(10)
        waiter.join(10)
    assert (loads, results) == (["p-1"], [{"id": "p-1"}, {"id": "p-1"}])
    raw.close()
    for engine in engines:
        engine.close()


def test_usage_and_unreachable_errors() -> None:
    assert REDIS_URL is not None
    code, message = cli("--url", REDIS_URL, "inspect", "product:<id>")
    assert code == 2
    assert "1 placeholder(s), got 0" in str(message)
    code, message = cli("--url", "redis://127.0.0.1:1/0", "ping")
    assert code == 3
    assert "Redis failed" in str(message)


class Text:
    """A custom serializer: the command line cannot decode what it writes."""

    @staticmethod
    def dumps(value: object) -> bytes:
        return json.dumps(value).encode()

    @staticmethod
    def loads(data: bytes) -> object:
        return json.loads(data)


def test_inspect_decodes_every_entry_kind_the_library_writes(prefix: str) -> None:
    """Compressed msgpack and a custom serializer's output were reported as "foreign
    or damaged"; data we wrote is never called that."""
    assert REDIS_URL is not None
    engine = CacheEngine.from_url(REDIS_URL, prefix=prefix)
    big = cache_aside(key="big:<id>", ttl=60, compress_over=64, engine=engine)(
        lambda id: {"id": id, "text": "x" * 500}
    )
    custom = cache_aside(key="custom:<id>", ttl=60, serializer=Text(), engine=engine)(
        lambda id: {"id": id}
    )
    maybe = cache_aside(key="maybe:<id>", ttl=60, engine=engine)(lambda id: None)
    big("b")
    custom("c")
    maybe("m")
    base = ("--url", REDIS_URL, "--prefix", prefix)
    code, report = cli(*base, "inspect", "big:<id>", "b")
    assert isinstance(report, dict)
    assert code == 0
    assert str(report["entry"]).startswith("msgpack value, compressed")
    assert report["value"] == {"id": "b", "text": "x" * 500}
    code, report = cli(*base, "inspect", "custom:<id>", "c")
    assert isinstance(report, dict)
    assert code == 0
    assert str(report["entry"]).startswith("written with a custom serializer")
    assert report["raw"] == repr(b'{"id": "c"}')
    code, report = cli(*base, "inspect", "maybe:<id>", "m")
    assert isinstance(report, dict)
    assert report["entry"] == "negative sentinel (the loader returned None)"
    raw = redis.Redis.from_url(REDIS_URL)
    raw.set(f"{prefix}:{{junk:1}}", b"\xc1Znot zlib")
    raw.set(f"{prefix}:{{junk:2}}", b"\xc7\x00")  # truncated msgpack
    raw.close()
    for id, entry in (("1", "compressed msgpack whose zlib"), ("2", "foreign or damaged")):
        code, report = cli(*base, "inspect", "junk:<id>", id)
        assert isinstance(report, dict)
        assert entry in str(report["entry"])
    engine.close()


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://127.0.0.1:1",  # no node of the cluster answers
        "redis://no-such-host.invalid:6379/0",  # the name does not resolve
        "redis://127.0.0.1:1/0",  # refused
    ],
)
def test_every_connection_failure_exits_3_with_one_line(url: str) -> None:
    """A cluster that is down printed a traceback and exited 1."""
    for command in (("ping",), ("inspect", "cache:{k}"), ("invalidate", "cache:{k}")):
        code, message = cli("--url", url, *command)
        assert code == 3, message
        assert isinstance(message, str)
        assert message.startswith("cached-aside: Redis failed: ")
        assert message.count("\n") == 1
        assert "Traceback" not in message


@dataclasses.dataclass
class Item:
    id: str
    stock: int


def test_inspect_decodes_typed_and_tagged_typed_entries(prefix: str) -> None:
    """A typed hash holds the shape's fingerprint in a reserved field: inspect called
    every typed hash "foreign or damaged" (it counted that field as a record's)."""
    assert REDIS_URL is not None
    engine = CacheEngine.from_url(REDIS_URL, prefix=prefix)

    def load(id: str) -> Item:
        return Item(id, 4)

    typed = cache_aside(key="typed:<id>", ttl=60, engine=engine)(load)
    record = cache_aside(key="record:<id>", ttl=60, as_hash=True, engine=engine)(load)
    tagged = cache_aside(key="tagged:<id>", ttl=60, as_hash=True, tags=("shop",), engine=engine)(
        load
    )
    typed("a")
    record("a")
    tagged("a")
    base = ("--url", REDIS_URL, "--prefix", prefix)
    code, report = cli(*base, "inspect", "typed:<id>", "a")
    assert isinstance(report, dict)
    assert (code, report["entry"]) == (0, "msgpack value")
    for template in ("record:<id>", "tagged:<id>"):
        code, report = cli(*base, "inspect", template, "a")
        assert isinstance(report, dict)
        assert (code, report["entry"]) == (0, "typed hash record"), report
        assert report["value"] == {"id": "a", "stock": "4"}
        assert len(str(report["shape"])) == 8
    assert report["stamp"] == [
        redis.Redis.from_url(REDIS_URL).get(f"{prefix}:tag:{{shop}}").decode()
    ]
    engine.close()


@pytest.fixture
async def redis_engine() -> AsyncIterator[CacheEngine]:
    """An engine on the shared real Redis, under a prefix of its own."""
    if REDIS_URL is None:
        pytest.skip("no Redis server reachable at REDIS_URL or 127.0.0.1:6379")
    engine = CacheEngine.from_url(REDIS_URL, prefix=unique_prefix())
    yield engine
    await engine.aclose()
    cleanup = redis.Redis.from_url(REDIS_URL)
    delete_prefix(cleanup, engine.prefix)
    cleanup.close()


@needs_real_redis
def test_the_command_line_invalidate_revokes_a_load_in_flight(redis_engine: CacheEngine) -> None:
    """operations.md, "The command line": `cached-aside invalidate` deletes and revokes
    loads in flight: a load that began before it cannot store its value after it."""
    assert REDIS_URL is not None
    raw = redis_engine.client()
    primary = {"a": "v1"}
    loading, release = threading.Event(), threading.Event()

    @cache_aside(key="cli:<id>", ttl=30, engine=redis_engine)
    def load(id: str) -> str:
        value = primary[id]
        loading.set()
        assert release.wait(60)
        return value

    answers: list[str] = []
    reader = threading.Thread(target=lambda: answers.append(load("a")))
    reader.start()
    try:
        assert loading.wait(5)
        assert raw.exists(load.key("a") + ":lock") == 1
        primary["a"] = "v2"
        completed = subprocess.run(
            [sys.executable, "-m", "cached_aside", "--url", REDIS_URL, "invalidate", load.key("a")],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert json.loads(completed.stdout) == {"key": load.key("a"), "existed": False}
        assert raw.exists(load.key("a") + ":lock") == 0
    finally:
        release.set()
        reader.join(10)
    assert answers == ["v1"]  # began before the invalidation: its own answer
    assert raw.exists(load.key("a")) == 0  # but never stored
    assert load("a") == "v2"
