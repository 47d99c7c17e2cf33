"""OpenTelemetry spans and metrics for cached calls (the `opentelemetry` extra).

`instrument()` swaps the class of every decorated function for a traced subclass and
`uninstrument()` swaps it back, so a function that is not instrumented runs the core's
own code with nothing added, not even a check. Needs only opentelemetry-api.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterable
from importlib import metadata
from typing import Any, ParamSpec, TypeVar

from opentelemetry import context, metrics, trace
from opentelemetry.metrics import (
    CallbackOptions,
    Histogram,
    Meter,
    MeterProvider,
    Observation,
)
from opentelemetry.trace import Span, Status, StatusCode, Tracer, TracerProvider

from .. import _wrapping
from .._functions import AsyncCachedFunction, CachedFunction
from .._results import CacheResult, Source, StatsSnapshot
from .._stats import LOAD_BUCKETS, Stats
from .._wrapping import CachedBase

__all__ = [
    "COUNTERS",
    "GAUGES",
    "LOADER_DURATION",
    "TracedAsyncCachedFunction",
    "TracedCachedFunction",
    "instrument",
    "is_instrumented",
    "uninstrument",
]

P = ParamSpec("P")
R = TypeVar("R")

SCOPE = "cached_aside"  # the instrumentation scope of the tracer and the meter
# Observable counters, one data point per function (attribute "function"), read from
# the functions' StatsSnapshot when the metric reader collects: name -> (unit, text).
COUNTERS = {
    "hits": ("{call}", "Calls served a cached value by Redis"),
    "near_hits": ("{call}", "Calls served by the in-process near cache"),
    "near_misses": ("{call}", "Near-cache look-ups that found nothing to serve"),
    "near_evictions": ("{entry}", "Near entries pushed out by the entry-count or byte bound"),
    "near_admissions_refused": (
        "{entry}",
        "Values read from Redis that the near cache's W-TinyLFU did not keep",
    ),
    "near_revalidated": ("{entry}", "Near entries set aside while untracked, reread and kept"),
    "near_unverified": ("{entry}", "Near entries set aside while untracked, then dropped"),
    "negative_hits": ("{call}", "Calls served a cached 'no such record'"),
    "misses": ("{call}", "Calls not served from the cache"),
    "loads": ("{load}", "Loader calls"),
    "stampedes_suppressed": ("{call}", "Misses served by another caller's load"),
    "lock_waits": ("{call}", "Misses that waited on Redis for another process's load"),
    "stale": ("{call}", "Calls answered with a value past its ttl (grace, stale_if_error)"),
    "errors": ("{error}", "Redis failures (the call was still answered when fail_open)"),
    "corrupt": ("{entry}", "Foreign or damaged entries found, treated as misses and rewritten"),
    "loader_errors": ("{error}", "Loader failures nobody saw raised (background, stale)"),
    "postponed": ("{invalidation}", "Invalidations Redis did not take, queued in the outbox"),
}
# Observable gauges, read like the counters: name -> (unit, text).
GAUGES = {
    "near_bytes": ("By", "Bytes the near cache's entries take (key, value and a fixed overhead)"),
}
# A histogram recorded at each load (the Metrics API has no observable histogram).
LOADER_DURATION = "cached_aside.loader.duration"


class TracedCachedFunction(CachedFunction[P, R]):
    """A CachedFunction while instrumented: each call and lookup() runs in a span."""

    _otel_name: str
    _otel_attributes: dict[str, str]

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.lookup(*args, **kwargs).value

    def lookup(self, *args: P.args, **kwargs: P.kwargs) -> CacheResult[R]:
        span = _tracer.start_span(self._otel_name, attributes=self._otel_attributes)
        token = context.attach(trace.set_span_in_context(span))  # the loader's spans nest
        try:
            result = super().lookup(*args, **kwargs)
            span.set_attributes(_served(result))
            return result
        except Exception as exc:  # cancellation and exits pass: not the call's failure
            _failed(span, exc)
            raise
        finally:
            context.detach(token)
            span.end()


class TracedAsyncCachedFunction(AsyncCachedFunction[P, R]):
    """An AsyncCachedFunction while instrumented: as TracedCachedFunction."""

    _otel_name: str
    _otel_attributes: dict[str, str]

    async def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return (await self.lookup(*args, **kwargs)).value

    async def lookup(self, *args: P.args, **kwargs: P.kwargs) -> CacheResult[R]:
        span = _tracer.start_span(self._otel_name, attributes=self._otel_attributes)
        token = context.attach(trace.set_span_in_context(span))
        try:
            result = await super().lookup(*args, **kwargs)
            span.set_attributes(_served(result))
            return result
        except Exception as exc:  # CancelledError is a BaseException: it only ends the span
            _failed(span, exc)
            raise
        finally:
            context.detach(token)
            span.end()


def _served(result: CacheResult[Any]) -> dict[str, str | bool | float]:
    source = result.source
    return {
        "cached_aside.source": source.value,
        "cached_aside.hit": result.hit,
        "cached_aside.lock_wait": source is Source.WAITED,
        "cached_aside.redis_ms": result.redis_ms,
    }


def _failed(span: Span, exc: Exception) -> None:
    span.record_exception(exc)
    span.set_attribute("error.type", type(exc).__qualname__)
    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))


_TRACED: dict[type[CachedBase[Any, Any]], type[CachedBase[Any, Any]]] = {
    CachedFunction: TracedCachedFunction,
    AsyncCachedFunction: TracedAsyncCachedFunction,
}
_UNTRACED = {traced: plain for plain, traced in _TRACED.items()}


class _Metrics:
    """The instruments made on one meter provider. Their callbacks answer only while
    this is the current instrumentation's: the Metrics API cannot remove an
    instrument, and a provider hands back the one it has when asked again by name."""

    def __init__(self, meter: Meter) -> None:
        self.loader_duration = _loader_histogram(meter)
        for name, (unit, description) in COUNTERS.items():
            meter.create_observable_counter(
                f"cached_aside.{name}", [self._observer(name)], unit, description
            )
        for name, (unit, description) in GAUGES.items():
            meter.create_observable_gauge(
                f"cached_aside.{name}", [self._observer(name)], unit, description
            )

    def _observer(self, name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            if _metrics is not self:
                return ()
            return [
                Observation(getattr(snapshot, name), {"function": function})
                for function, snapshot in _snapshots().items()
            ]

        return observe


def _loader_histogram(meter: Meter) -> Histogram:
    unit, description = "s", "Loader call duration"
    try:  # the core's Prometheus buckets, as advice; a View on the provider overrides it
        return meter.create_histogram(
            LOADER_DURATION,
            unit,
            description,
            explicit_bucket_boundaries_advisory=LOAD_BUCKETS[:-1],  # +Inf is implicit
        )
    except TypeError:  # opentelemetry-api before 1.30: no advice, the SDK's buckets
        return meter.create_histogram(LOADER_DURATION, unit, description)


def _snapshots() -> dict[str, StatsSnapshot]:
    """Every live decorated function's counters, by name; functions that share a
    qualified name (in two modules) are summed, as one data point must be."""
    totals: dict[str, StatsSnapshot] = {}
    for function in _alive():
        stats = function._plan.stats
        snapshot = stats.snapshot()
        known = totals.get(stats.name)
        totals[stats.name] = snapshot if known is None else known + snapshot
    return totals


def _adopt_new(function: CachedBase[Any, Any]) -> None:
    """A function decorated while instrumented is instrumented as it is made."""
    with _lock:
        if _metrics is not None:
            _adopt(function, _metrics)


_lock = threading.RLock()
_tracer: Tracer = trace.NoOpTracer()
_traces = False  # whether instrument() swaps classes
_metrics: _Metrics | None = None  # set while instrumented
_by_provider: weakref.WeakKeyDictionary[MeterProvider, _Metrics] = weakref.WeakKeyDictionary()


def instrument(
    *,
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
    traces: bool = True,
) -> None:
    """Trace every cached call and export every decorated function's counters.

    Every decorated function alive, and every one decorated afterwards, is switched
    to a traced class: a call (or `lookup()`) runs in a span named `cached_aside
    <qualified name>` with attributes `cached_aside.function`, `.key_template`,
    `.source`, `.hit`, `.lock_wait` and `.redis_ms`; an exception is recorded on it
    (status ERROR) and re-raised. Observable counters (`cached_aside.hits`,
    `.misses`, `.loads`, ... see COUNTERS) are read from the functions' stats when the
    reader collects, and `cached_aside.loader.duration` is recorded at each load.
    Calling it again re-instruments with the new providers.

    Args:
        tracer_provider: where spans go; default: the global one.
        meter_provider: where metrics go; default: the global one.
        traces: False for metrics only: no class is swapped, and calls cost what
            they cost uninstrumented.
    """
    global _tracer, _traces, _metrics
    with _lock:
        if _metrics is not None:
            uninstrument()
        version = _version()
        _tracer = trace.get_tracer(SCOPE, version, tracer_provider)
        _traces = traces
        provider = meter_provider or metrics.get_meter_provider()
        instruments = _by_provider.get(provider)
        if instruments is None:
            meter = metrics.get_meter(SCOPE, version or "", provider)
            instruments = _by_provider[provider] = _Metrics(meter)
        _metrics = instruments
        if _adopt_new not in _wrapping.on_decorated:
            _wrapping.on_decorated.append(_adopt_new)
        for function in _alive():
            _adopt(function, instruments)


def uninstrument() -> None:
    """Undo `instrument()`: every decorated function gets its own class back (calls
    in flight finish traced), and the metrics stop reporting."""
    global _tracer, _traces, _metrics
    with _lock:
        if _metrics is None:
            return
        with contextlib.suppress(ValueError):
            _wrapping.on_decorated.remove(_adopt_new)
        for function in _alive():
            plain = _UNTRACED.get(type(function))
            if plain is not None:
                function.__class__ = plain
            vars(function._plan.stats).pop("loaded_in", None)
        _metrics = None
        _traces = False
        _tracer = trace.NoOpTracer()


def is_instrumented() -> bool:
    """True between `instrument()` and `uninstrument()`."""
    return _metrics is not None


def _adopt(function: CachedBase[Any, Any], instruments: _Metrics) -> None:
    """Switch one function to its traced class (when tracing) and time its loads. A
    class other than the core's two (a subclass of the user's own) is left alone."""
    traced = _TRACED.get(type(function)) if _traces else None
    if traced is not None:
        name, template = function._plan.name, function._template.text
        # Set before the swap: a call in another thread may start the moment it lands.
        vars(function).update(
            _otel_name=f"cached_aside {name}",
            _otel_attributes={
                "cached_aside.function": name,
                "cached_aside.key_template": template,
            },
        )
        function.__class__ = traced
    _time_loads(function._plan.stats, instruments.loader_duration)


def _time_loads(stats: Stats, histogram: Histogram) -> None:
    """Record each load's duration to `histogram` as well as to the stats' own
    buckets: an instance attribute over the method, which uninstrument() deletes.
    The load path pays one record() per load; the hit path nothing."""
    attributes = {"function": stats.name}

    def loaded_in(seconds: float) -> None:
        Stats.loaded_in(stats, seconds)
        histogram.record(seconds, attributes)

    vars(stats)["loaded_in"] = loaded_in


def _alive() -> list[CachedBase[Any, Any]]:
    """Every decorated function alive, copied at once."""
    while True:
        try:
            return list(_wrapping.decorated)
        except RuntimeError:  # a decoration in another thread changed the set: again
            continue


def _version() -> str | None:
    try:
        return metadata.version("cached_aside")
    except metadata.PackageNotFoundError:
        return None
