"""The circuit breaker: on its own with a hand-driven clock, then in an engine whose
Redis refuses every connection."""

from __future__ import annotations

import time

import pytest

from cached_aside import (
    CacheEngine,
    ConfigurationError,
    cache_aside,
)
from cached_aside._breaker import CircuitBreaker

from .conftest import (
    unique_prefix,
)
from .servers import dead_url


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_failures_in_a_row_and_probes_after_the_cooldown() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures=3, cooldown=2.0, clock=clock)
    assert breaker.allow()
    breaker.failure()
    breaker.failure()
    assert breaker.state == "closed"
    breaker.failure()
    assert (breaker.state, breaker.allow(), breaker.opened) == ("open", False, 1)
    clock.now += 2.1
    assert breaker.state == "half-open"
    assert breaker.allow() is True  # the one probe
    assert breaker.allow() is False  # everyone else keeps skipping Redis
    breaker.success()
    assert (breaker.state, breaker.failures) == ("closed", 0)
    assert breaker.allow()


def test_a_failed_probe_opens_it_again() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures=1, cooldown=1.0, clock=clock)
    breaker.failure()
    clock.now += 1.5
    assert breaker.allow()
    breaker.failure()
    assert breaker.state == "open"
    assert breaker.opened == 2
    assert "skipped for 1.0 s more" in str(breaker.refusal())


def test_a_success_resets_the_count() -> None:
    breaker = CircuitBreaker(failures=2, cooldown=1.0, clock=Clock())
    breaker.failure()
    breaker.success()
    breaker.failure()
    assert breaker.state == "closed"


@pytest.mark.parametrize(
    ("options", "message"),
    [({"breaker_failures": 0}, "breaker_failures"), ({"breaker_cooldown": -1}, "breaker_cooldown")],
)
def test_engine_validates_breaker_options(options: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        CacheEngine(prefix="x", **options)  # type: ignore[arg-type]


def test_the_breaker_opens_after_3_failures_and_skips_redis_for_half_a_second() -> None:
    """operations.md, "Circuit breaker": after 3 failures in a row an engine skips Redis
    for 0.5 s...; `error_kinds()` counts them as CircuitOpenError. Then one caller
    probes. The clock the breaker reads is the test's."""
    engine = CacheEngine.from_url(dead_url(), prefix=unique_prefix())
    now = [time.monotonic()]
    engine.breaker.clock = lambda: now[0]

    @cache_aside(key="breaker:<id>", ttl=30, engine=engine)
    def load(id: int) -> int:
        return id

    try:
        for number in range(3):
            assert engine.breaker.state == "closed"
            assert load(number) == number
        assert engine.breaker.state == "open"
        assert load.error_kinds() == {"ConnectionError": 3}
        assert load(3) == 3
        assert load.error_kinds() == {"ConnectionError": 3, "CircuitOpenError": 1}
        now[0] += 0.49
        assert engine.breaker.state == "open"
        now[0] += 0.02  # half a second after it opened
        assert engine.breaker.state == "half-open"
        assert load(4) == 4  # the probe: it tries Redis, fails, and the breaker opens again
        assert load.error_kinds() == {"ConnectionError": 4, "CircuitOpenError": 1}
        assert engine.breaker.state == "open"
        assert engine.breaker.opened == 2
        assert load(5) == 5
        assert load.error_kinds() == {"ConnectionError": 4, "CircuitOpenError": 2}
    finally:
        engine.close()


async def test_one_breaker_serves_an_engines_sync_and_async_clients() -> None:
    """operations.md, "Circuit breaker": one breaker per engine, shared by its sync and
    async clients. Failures of either side open it for both."""
    for failing_side in ("sync", "async"):
        engine = CacheEngine.from_url(dead_url(), prefix=unique_prefix())

        @cache_aside(key="sync-side:<id>", ttl=30, engine=engine)
        def plain(id: int) -> int:
            return id

        @cache_aside(key="async-side:<id>", ttl=30, engine=engine)
        async def coroutine(id: int) -> int:
            return id

        try:
            for number in range(3):
                if failing_side == "sync":
                    assert plain(number) == number
                else:
                    assert await coroutine(number) == number
            assert engine.breaker.state == "open"
            if failing_side == "sync":
                assert plain.error_kinds() == {"ConnectionError": 3}
                assert await coroutine(9) == 9
                assert coroutine.error_kinds() == {"CircuitOpenError": 1}  # Redis skipped
            else:
                assert coroutine.error_kinds() == {"ConnectionError": 3}
                assert plain(9) == 9
                assert plain.error_kinds() == {"CircuitOpenError": 1}
        finally:
            await engine.aclose()
