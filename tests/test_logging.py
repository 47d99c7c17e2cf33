"""What the library logs: Redis errors once a burst, then once per 10 s per function; every
piece of corrupt data; and what a strict function's callers are told."""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import pytest

from cached_aside import (
    CacheEngine,
    CacheUnavailableError,
    _stats,
    cache_aside,
)

from .conftest import (
    Harness,
    unique_prefix,
)
from .servers import dead_url


def test_redis_errors_are_logged_once_a_burst_then_once_per_10_s_per_function(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """operations.md, "What is logged": the first Redis error of a burst and then at most
    once per 10 s per function, with the number of errors since the last report. The
    clock the log limit reads is the test's."""
    now = [time.monotonic()]
    monkeypatch.setattr(_stats, "time", SimpleNamespace(monotonic=lambda: now[0]))
    engine = CacheEngine.from_url(dead_url(), prefix=unique_prefix())

    @cache_aside(key="burst:<id>", ttl=30, engine=engine)
    def bursting(id: int) -> int:
        return id

    @cache_aside(key="calm:<id>", ttl=30, engine=engine)
    def calm(id: int) -> int:
        return id

    def reports(marker: str) -> list[str]:
        messages = [record.getMessage() for record in caplog.records]
        return [m for m in messages if "Redis failed" in m and marker in m]

    try:
        with caplog.at_level(logging.WARNING, logger="cached_aside"):
            assert [bursting(i) for i in range(40)] == list(range(40))  # failed open
            first = reports("{burst:")
            assert len(first) == 1
            assert "; 1 error(s) since the last report" in first[0]
            now[0] += 9.0
            assert bursting(40) == 40
            assert len(reports("{burst:")) == 1  # 9 s later: still quiet
            assert calm(1) == 1
            assert len(reports("{calm:")) == 1  # another function's first error: logged
            now[0] += 1.5
            assert bursting(41) == 41
            summary = reports("{burst:")
        errors = bursting.stats().errors
        assert errors == 42
        assert len(summary) == 2  # 10.5 s after the first line: one summary
        assert f"; {errors - 1} error(s) since the last report" in summary[1]
    finally:
        engine.close()


async def test_every_piece_of_corrupt_data_is_logged(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """operations.md, "What is logged": on each piece of corrupt data found."""

    def load(id: str) -> dict[str, str]:
        return {"id": id}

    fn = h.cached(load, key="damaged:<id>")
    key = fn.key("a")
    with caplog.at_level(logging.WARNING, logger="cached_aside"):
        h.raw.set(key, b"\xc7\x00garbage that is not msgpack")
        assert await h.run(fn, "a") == {"id": "a"}
        h.raw.delete(key)
        h.raw.rpush(key, "a list, not ours")
        assert await h.run(fn, "a") == {"id": "a"}
    lines = [r.getMessage() for r in caplog.records if "foreign or damaged" in r.getMessage()]
    assert len(lines) == 2
    assert all(repr(key) in line for line in lines)
    assert fn.stats().corrupt == 2


def test_a_strict_function_does_not_claim_to_serve_from_the_loader(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = CacheEngine.from_url("redis://127.0.0.1:1/0", prefix=unique_prefix())
    strict = cache_aside(key="s:<id>", ttl=1, engine=engine, fail_open=False)(lambda id: id)
    with (
        caplog.at_level(logging.WARNING, logger="cached_aside"),
        pytest.raises(CacheUnavailableError),
    ):
        strict("a")
    assert "callers get CacheUnavailableError" in caplog.text
    assert "served by the loader" not in caplog.text
    engine.close(timeout=0.05)
