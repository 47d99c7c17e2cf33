"""Prometheus metrics for an engine (the `prometheus` extra).

A collector that reads the engine's counters when Prometheus scrapes, so the hot path
pays nothing for metrics. `register(engine)` adds it to a registry.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry

from ._engine import CacheEngine

COUNTERS = {
    "hits": "Calls served a cached value by Redis",
    "near_hits": "Calls served by the in-process near cache",
    "misses": "Calls not served from the cache",
    "negative_hits": "Calls served a cached 'no such record'",
    "loads": "Loader calls",
    "stampedes_suppressed": "Misses served by another caller's load",
    "lock_waits": "Misses that waited on Redis for another process's load",
    "corrupt": "Foreign or damaged entries found, treated as misses and rewritten",
    "loader_errors": "Loader failures nobody saw raised (background reloads, stale answers)",
    "postponed": "Invalidations Redis did not take, queued in the engine's outbox",
    "stale": "Calls answered with a value past its ttl (grace, stale_if_error)",
    "schema_mismatch": "Typed entries of another shape of the declared type, reloaded",
    "near_misses": "Near-cache look-ups that found nothing to serve",
    "near_evictions": "Near entries pushed out by the entry-count or byte bound",
    "near_admissions_refused": "Values read from Redis the near cache's W-TinyLFU did not keep",
    "near_revalidated": "Near entries set aside while tracking was down, reread and kept",
    "near_unverified": "Near entries set aside while tracking was down and dropped unverified",
}


class CacheCollector(Collector):
    """Exports every function of one engine, labelled by the function's name."""

    def __init__(self, engine: CacheEngine, namespace: str = "cached_aside") -> None:
        self.engine = engine
        self.namespace = namespace

    def collect(self) -> Iterator[Metric]:
        families = {
            name: CounterMetricFamily(f"{self.namespace}_{name}", text, labels=["function"])
            for name, text in COUNTERS.items()
        }
        errors = CounterMetricFamily(
            f"{self.namespace}_errors",
            "Redis errors, by exception type",
            labels=["function", "kind"],
        )
        near_bytes = GaugeMetricFamily(
            f"{self.namespace}_near_bytes",
            "Bytes the near cache's entries take (key, value and a fixed overhead each)",
            labels=["function"],
        )
        latency = HistogramMetricFamily(
            f"{self.namespace}_loader_seconds", "Loader call duration", labels=["function"]
        )
        for function in self.engine.catalog:
            stats = function.stats
            snapshot = stats.snapshot().as_dict()
            for name, family in families.items():
                family.add_metric([stats.name], snapshot[name])
            near_bytes.add_metric([stats.name], snapshot["near_bytes"])
            for kind, count in stats.error_kinds().items():
                errors.add_metric([stats.name, kind], count)
            buckets, total = stats.load_histogram()
            latency.add_metric(
                [stats.name],
                [
                    ("+Inf" if bound == float("inf") else repr(bound), count)
                    for bound, count in buckets
                ],
                sum_value=total,
            )
        yield from families.values()
        yield errors
        yield near_bytes
        yield latency
        breaker = self.engine.breaker
        state = GaugeMetricFamily(
            f"{self.namespace}_breaker_open", "1 while Redis is being skipped (open or half-open)"
        )
        state.add_metric([], 0 if breaker.state == "closed" else 1)
        yield state
        openings = CounterMetricFamily(
            f"{self.namespace}_breaker_openings", "Times the circuit breaker opened"
        )
        openings.add_metric([], breaker.opened)
        yield openings
        outbox = self.engine.outbox
        pending = GaugeMetricFamily(
            f"{self.namespace}_pending_invalidations",
            "Invalidations waiting in the outbox for Redis (keys and bulk patterns)",
        )
        pending.add_metric([], len(outbox.pending()))
        yield pending
        delivered = CounterMetricFamily(
            f"{self.namespace}_outbox_delivered",
            "Invalidations the outbox delivered after Redis had failed to take them",
        )
        delivered.add_metric([], outbox.delivered)
        yield delivered
        collapsed = CounterMetricFamily(
            f"{self.namespace}_outbox_collapsed",
            "Times a full outbox replaced a function's keys by one bulk invalidation",
        )
        collapsed.add_metric([], outbox.collapsed)
        yield collapsed


def register(engine: CacheEngine, registry: CollectorRegistry = REGISTRY) -> CacheCollector:
    """Export `engine`'s counters from a Prometheus registry.

    Args:
        engine: the engine whose functions to export, labelled by function name.
        registry: prometheus_client's registry; default: its global REGISTRY.

    Returns:
        The collector, already registered (`registry.unregister(it)` to stop).
    """
    collector = CacheCollector(engine)
    registry.register(collector)
    return collector
