"""The circuit breaker on its own, with a hand-driven clock."""

from __future__ import annotations

import pytest

from cached_aside import CacheEngine, ConfigurationError
from cached_aside._breaker import CircuitBreaker


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
