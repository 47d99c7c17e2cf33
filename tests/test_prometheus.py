"""The Prometheus collector reads the engine's counters at scrape time."""

from __future__ import annotations

import fakeredis
import pytest

from cached_aside import CacheEngine, Outcome, cache_aside

prometheus_client = pytest.importorskip("prometheus_client", reason="the prometheus extra")


def test_metrics_per_function() -> None:
    from cached_aside.prometheus import register

    engine = CacheEngine(fakeredis.FakeRedis(server=fakeredis.FakeServer()), prefix="metrics")
    registry = prometheus_client.CollectorRegistry()
    register(engine, registry)

    @cache_aside(key="p:<id>", ttl=30, engine=engine)
    def get_product(id: str) -> dict[str, str] | None:
        return {"id": id} if id != "gone" else None

    get_product("a")
    get_product("a")
    get_product("gone")
    get_product("gone")
    text = prometheus_client.generate_latest(registry).decode()
    name = 'function="test_metrics_per_function.<locals>.get_product"'
    assert f"cached_aside_hits_total{{{name}}} 1.0" in text
    assert f"cached_aside_misses_total{{{name}}} 2.0" in text
    assert f"cached_aside_negative_hits_total{{{name}}} 1.0" in text
    assert f"cached_aside_near_hits_total{{{name}}} 0.0" in text
    assert f"cached_aside_loads_total{{{name}}} 2.0" in text
    assert f"cached_aside_loader_seconds_count{{{name}}} 2.0" in text
    assert f'cached_aside_loader_seconds_bucket{{{name},le="+Inf"}} 2.0' in text
    assert "cached_aside_breaker_open 0.0" in text
    assert "cached_aside_breaker_openings_total 0.0" in text


def test_errors_by_kind_and_breaker() -> None:
    from cached_aside.prometheus import register

    engine = CacheEngine.from_url("redis://127.0.0.1:1/0", prefix="metrics", breaker_failures=1)
    registry = prometheus_client.CollectorRegistry()
    register(engine, registry)

    @cache_aside(key="p:<id>", ttl=30, engine=engine)
    def read(id: str) -> str:
        return id

    assert read("a") == "a"  # nothing listens on port 1: fail open
    assert read("a") == "a"  # breaker open: Redis skipped
    text = prometheus_client.generate_latest(registry).decode()
    assert 'kind="ConnectionError"} 1.0' in text
    assert 'kind="CircuitOpenError"} 1.0' in text
    assert "cached_aside_breaker_open 1.0" in text
    assert "cached_aside_breaker_openings_total 1.0" in text
    assert "cached_aside_pending_invalidations 0.0" in text
    assert read.invalidate("a") is Outcome.PENDING  # the backlog shows
    text = prometheus_client.generate_latest(registry).decode()
    assert "cached_aside_pending_invalidations 1.0" in text
    assert 'cached_aside_postponed_total{function="' in text
    engine.close(timeout=0.05)


def test_near_cache_counters_and_bytes() -> None:
    from cached_aside import NearCache
    from cached_aside.prometheus import register

    engine = CacheEngine(
        fakeredis.FakeRedis(server=fakeredis.FakeServer()),
        prefix="metrics",
        near=NearCache(ttl=30, allow_untracked=True, max_entries=2),
    )
    registry = prometheus_client.CollectorRegistry()
    register(engine, registry)

    @cache_aside(key="p:<id>", ttl=30, engine=engine)
    def get_product(id: str) -> str:
        return id * 100

    for id in ("a", "a", "b", "b", "c", "c", "d", "d", "d"):  # load, then kept near
        get_product(id)
    snapshot = engine.stats()
    assert snapshot.near_hits > 0
    assert snapshot.near_bytes > 0
    assert snapshot.near_evictions + snapshot.near_admissions_refused > 0
    text = prometheus_client.generate_latest(registry).decode()
    name = 'function="test_near_cache_counters_and_bytes.<locals>.get_product"'
    for metric, value in (
        ("near_hits_total", snapshot.near_hits),
        ("near_misses_total", snapshot.near_misses),
        ("near_evictions_total", snapshot.near_evictions),
        ("near_admissions_refused_total", snapshot.near_admissions_refused),
        ("near_bytes", snapshot.near_bytes),
    ):
        assert f"cached_aside_{metric}{{{name}}} {float(value)}" in text
    engine.close()
