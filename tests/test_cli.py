"""The operations command line against a real Redis, as an operator would run it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import redis

from cached_aside import CacheEngine, cache_aside

from .conftest import REDIS_URL, delete_prefix, unique_prefix

pytestmark = pytest.mark.skipif(REDIS_URL is None, reason="no Redis server reachable")


def cli(*args: str) -> tuple[int, dict[str, object] | str]:
    completed = subprocess.run(
        [sys.executable, "-m", "cached_aside", *args],
        capture_output=True,
        text=True,
        timeout=30,
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


def test_usage_and_unreachable_errors() -> None:
    assert REDIS_URL is not None
    code, message = cli("--url", REDIS_URL, "inspect", "product:<id>")
    assert code == 2
    assert "1 placeholder(s), got 0" in str(message)
    code, message = cli("--url", "redis://127.0.0.1:1/0", "ping")
    assert code == 3
    assert "Redis failed" in str(message)
