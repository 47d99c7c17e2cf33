"""The examples run as a user would run them, and the pytest plugin works for users."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from .conftest import REDIS_URL, needs_real_redis

ROOT = Path(__file__).resolve().parent.parent
DEMO_PREFIX = "cached_aside_demo"
pytest_plugins = ["pytester"]


def run_example(name: str) -> str:
    """Run examples/NAME.py as its docstring says; check that its keys live under its
    own prefix, none under the demo's, and that it leaves none behind."""
    assert REDIS_URL is not None
    prefix = f"cached_aside_example_{name.removesuffix('.py')}"
    client = redis.Redis.from_url(REDIS_URL)
    demo_before = set(client.scan_iter(match=f"{DEMO_PREFIX}:*", count=1000))
    completed = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "REDIS_URL": REDIS_URL},
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert f"keys such as {prefix}:{{" in completed.stdout
    demo_after = set(client.scan_iter(match=f"{DEMO_PREFIX}:*", count=1000))
    assert demo_after <= demo_before, "the example wrote under the demo's prefix (or a demo ran)"
    assert list(client.scan_iter(match=f"{prefix}:*", count=1000)) == []
    client.close()
    return completed.stdout


@needs_real_redis
def test_repository_example() -> None:
    out = run_example("repository.py")
    assert "first read: loader" in out
    assert "second read: cache" in out
    assert "after rename: loader   Product(id='p-001', name='Fountain pen, blue', stock=41)" in out
    assert "after a sale: cache    stock 40" in out
    assert "missing id:   None then negative" in out


@needs_real_redis
def test_async_service_example() -> None:
    out = run_example("async_service.py")
    assert "100 concurrent requests: ['ink', 'pen'], primary reads: 1" in out
    assert "after add_order: loader ['ink', 'nib', 'pen']" in out


def test_the_cache_engine_fixture_for_users(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(
        """
        import cached_aside
        from cached_aside import cache_aside

        calls = []

        @cache_aside(key="user:<id>", ttl=30)   # no engine=: the default engine
        def get_user(id):
            calls.append(id)
            return {"id": id}

        def test_cached_once(cache_engine):
            assert get_user(1) == {"id": 1}
            assert get_user(1) == {"id": 1}
            assert calls == [1]
            assert get_user.key(1).startswith(cache_engine.prefix)
            assert cached_aside.default_engine() is cache_engine

        def test_isolated_from_the_previous_test(cache_engine):
            assert get_user.lookup(1).source == "loader"
        """
    )
    monkeypatch.delenv("CACHED_ASIDE_TEST_REDIS_URL", raising=False)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


@pytest.mark.skipif(REDIS_URL is None, reason="no Redis server reachable")
def test_the_cache_engine_fixture_on_real_redis(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(
        """
        from cached_aside import cache_aside

        @cache_aside(key="n:<n>", ttl=30)
        def double(n):
            return n * 2

        def test_real(cache_engine):
            assert double(2) == 4
            assert double.lookup(2).hit
            assert cache_engine.client().exists(double.key(2))
        """
    )
    monkeypatch.setenv("CACHED_ASIDE_TEST_REDIS_URL", REDIS_URL or "")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


@needs_real_redis
def test_catalogue_batches_example() -> None:
    out = run_example("catalogue_batches.py")
    assert "cold page: 51 items (1 missing)" in out
    assert "51 items (1 missing) in" in out
    cold, warm = (line for line in out.splitlines() if " page: " in line)
    assert cold.endswith("1 SQL queries")  # every miss in one query
    assert warm.endswith("0 SQL queries")
    assert "price list changed: 51 entries dropped; 1 SQL query" in out
    assert "now: [1.1, 2.2, 3.3]" in out
