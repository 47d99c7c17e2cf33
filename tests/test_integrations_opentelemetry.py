"""cached_aside.integrations.opentelemetry: spans and metrics seen through the SDK's
in-memory span exporter and metric reader, for sync and async functions and methods,
on real Redis and fakeredis; uninstrument() leaves the core's own classes behind."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from opentelemetry import trace
from opentelemetry.metrics import Meter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from cached_aside import (
    AsyncCachedFunction,
    CachedFunction,
    CacheEngine,
    NearCache,
    Source,
    cache_aside,
)
from cached_aside import _wrapping as wrapping_module
from cached_aside._stats import LOAD_BUCKETS
from cached_aside.integrations.opentelemetry import (
    COUNTERS,
    GAUGES,
    LOADER_DURATION,
    TracedAsyncCachedFunction,
    TracedCachedFunction,
    instrument,
    is_instrumented,
    uninstrument,
)

from .conftest import (
    PATIENCE,
    REDIS_URL,
    Harness,
    delete_prefix,
    needs_real_redis,
    unique_prefix,
)
from .documented import fenced, marked, run_documented

ROOT = Path(__file__).resolve().parent.parent
# Bucket bounds given as advice: opentelemetry-api 1.30 and later.
ADVICE = (
    "explicit_bucket_boundaries_advisory" in inspect.signature(Meter.create_histogram).parameters
)


class Telemetry:
    """An SDK tracer provider and meter provider that keep what they receive."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def instrument(self) -> None:
        instrument(tracer_provider=self.tracer_provider, meter_provider=self.meter_provider)

    def spans(self, function: Any = None) -> list[ReadableSpan]:
        """Finished spans, in the order they ended; only `function`'s, if given."""
        spans = list(self.exporter.get_finished_spans())
        if function is None:
            return spans
        name = f"cached_aside {function.__qualname__}"
        return [span for span in spans if span.name == name]

    def points(self, function: Any) -> dict[str, Any]:
        """`function`'s data point of each cached_aside metric, collected now."""
        data = self.reader.get_metrics_data()
        found: dict[str, Any] = {}
        if data is None:
            return found
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    for point in metric.data.data_points:
                        if point.attributes.get("function") == function.__qualname__:
                            found[metric.name] = point
        return found

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    """Instrumented for the test, with providers of its own; uninstrumented after."""
    made = Telemetry()
    made.instrument()
    yield made
    uninstrument()
    made.shutdown()


def attributes(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def named(loader: Callable[..., Any]) -> Callable[..., Any]:
    """Give a loader a qualified name no other function has: metrics are per name, and
    a function of an earlier test may linger (in a reference cycle) until collected."""
    loader.__qualname__ = f"{loader.__qualname__}_{uuid.uuid4().hex[:8]}"
    return loader


# -- spans --------------------------------------------------------------------------


async def test_a_miss_then_a_hit_make_two_spans(h: Harness, telemetry: Telemetry) -> None:
    def load(id: str) -> str:
        return f"record {id}"

    fn = h.cached(load, key="product:<id>")
    assert type(fn) is (TracedAsyncCachedFunction if h.mode == "async" else TracedCachedFunction)
    assert await h.run(fn, "p-1") == "record p-1"
    result = await h.run(fn.lookup, "p-1")
    assert (result.value, result.source) == ("record p-1", Source.CACHE)

    first, second = telemetry.spans(fn)
    assert len(telemetry.spans()) == 2
    assert attributes(first) == {
        "cached_aside.function": load.__qualname__,
        "cached_aside.key_template": "product:<id>",
        "cached_aside.source": "loader",
        "cached_aside.hit": False,
        "cached_aside.lock_wait": False,
        "cached_aside.redis_ms": attributes(first)["cached_aside.redis_ms"],
    }
    assert attributes(second)["cached_aside.source"] == "cache"
    assert attributes(second)["cached_aside.hit"] is True
    assert attributes(second)["cached_aside.redis_ms"] == result.redis_ms > 0
    # The template, never the rendered key with the caller's arguments in it.
    values = [str(value) for span in (first, second) for value in attributes(span).values()]
    assert not any("p-1" in value for value in values)
    assert all(span.status.status_code is StatusCode.UNSET for span in (first, second))


async def test_the_loader_runs_inside_the_call_span(h: Harness, telemetry: Telemetry) -> None:
    seen: list[trace.SpanContext] = []
    queries = trace.get_tracer("shop", tracer_provider=telemetry.tracer_provider)

    def load(id: str) -> str:
        seen.append(trace.get_current_span().get_span_context())
        with queries.start_as_current_span("SELECT"):
            return id

    fn = h.cached(load, key="product:<id>")
    await h.run(fn, "p-1")
    query, call = telemetry.spans()
    assert query.name == "SELECT"
    assert call.name == f"cached_aside {load.__qualname__}"
    assert seen == [call.context]
    assert query.parent is not None
    assert query.parent.span_id == call.context.span_id
    # And the span is no longer current once the call returned.
    assert not trace.get_current_span().get_span_context().is_valid


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_decorated_method_makes_one_span_a_call(
    engine: CacheEngine, telemetry: Telemetry, mode: str
) -> None:
    if mode == "sync":

        class Repository:
            @cache_aside(key="product:<product_id>", ttl=30, engine=engine)
            def get(self, product_id: str) -> str:
                return f"record {product_id}"

        repository = Repository()
        assert repository.get("p-1") == "record p-1"
        result = repository.get.lookup("p-1")
        method: Any = vars(Repository)["get"]
        assert type(method) is TracedCachedFunction
    else:

        class AsyncRepository:
            @cache_aside(key="product:<product_id>", ttl=30, engine=engine)
            async def get(self, product_id: str) -> str:
                return f"record {product_id}"

        async_repository = AsyncRepository()
        assert await async_repository.get("p-1") == "record p-1"
        result = await async_repository.get.lookup("p-1")
        method = vars(AsyncRepository)["get"]
        assert type(method) is TracedAsyncCachedFunction
    assert result.source is Source.CACHE
    spans = telemetry.spans()  # one span a call: the bound method calls the function's
    assert [span.name for span in spans] == [f"cached_aside {method.__qualname__}"] * 2
    assert [attributes(span)["cached_aside.source"] for span in spans] == ["loader", "cache"]


async def test_a_loader_error_is_recorded_and_re_raised(h: Harness, telemetry: Telemetry) -> None:
    class PrimaryDownError(Exception):
        pass

    error = PrimaryDownError("primary down")

    def load(id: str) -> str:
        raise error

    fn = h.cached(load, key="product:<id>")
    with pytest.raises(PrimaryDownError) as raised:
        await h.run(fn, "p-1")
    assert raised.value is error
    (span,) = telemetry.spans(fn)
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "PrimaryDownError: primary down"
    assert attributes(span)["error.type"] == PrimaryDownError.__qualname__
    assert "cached_aside.source" not in attributes(span)  # nothing was served
    (event,) = span.events
    assert event.name == "exception"
    assert attributes(event)["exception.message"] == "primary down"


async def test_a_cancelled_call_ends_its_span_and_propagates(
    engine: CacheEngine, telemetry: Telemetry
) -> None:
    started = asyncio.Event()

    @cache_aside(key="slow:<id>", ttl=30, engine=engine)
    async def slow(id: str) -> str:
        started.set()
        await asyncio.Event().wait()  # never set
        return id

    task = asyncio.ensure_future(slow("s-1"))
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (span,) = telemetry.spans(slow)
    assert span.status.status_code is StatusCode.UNSET  # a cancellation is not a failure
    assert span.events == ()
    assert not trace.get_current_span().get_span_context().is_valid


async def test_a_caller_that_waited_for_another_load_says_lock_wait(
    engine: CacheEngine, telemetry: Telemetry
) -> None:
    loads: list[str] = []

    @cache_aside(key="product:<id>", ttl=30, engine=engine)
    async def get(id: str) -> str:
        loads.append(id)
        await asyncio.sleep(0.05)
        return id

    results = await asyncio.gather(get.lookup("p-1"), get.lookup("p-1"))
    assert loads == ["p-1"]
    assert sorted(result.source.value for result in results) == ["loader", "waited"]
    by_source = {attributes(span)["cached_aside.source"]: span for span in telemetry.spans(get)}
    assert attributes(by_source["waited"])["cached_aside.lock_wait"] is True
    assert attributes(by_source["waited"])["cached_aside.hit"] is False
    assert attributes(by_source["loader"])["cached_aside.lock_wait"] is False


# -- metrics ------------------------------------------------------------------------


async def test_metric_values_match_the_stats(h: Harness, telemetry: Telemetry) -> None:
    @named
    def load(id: str) -> str | None:
        return None if id == "gone" else id

    fn = h.cached(load, key="product:<id>")
    for id in ("p-1", "p-1", "p-1", "p-2", "gone", "gone"):
        await h.run(fn, id)
    stats = fn.stats()
    assert (stats.hits, stats.misses, stats.negative_hits, stats.loads) == (2, 3, 1, 3)

    points = telemetry.points(fn)
    for name in COUNTERS:
        assert points[f"cached_aside.{name}"].value == getattr(stats, name), name
    latency = points[LOADER_DURATION]
    buckets, total = fn._plan.stats.load_histogram()
    assert latency.count == stats.loads
    assert latency.sum == pytest.approx(total)
    if ADVICE:  # the Prometheus export's buckets, so the two agree
        assert list(latency.explicit_bounds) == list(LOAD_BUCKETS[:-1])
        counts = latency.bucket_counts
        assert [sum(counts[: i + 1]) for i in range(len(counts))] == [n for _, n in buckets]

    await h.run(fn, "p-1")  # read at collection time: the next collection sees it
    assert telemetry.points(fn)["cached_aside.hits"].value == 3


@needs_real_redis
def test_the_near_caches_counters_and_bytes_are_exported(telemetry: Telemetry) -> None:
    """Hits, misses, evictions, refused admissions and bytes held: what the stats and
    Prometheus export, OpenTelemetry exports too."""
    assert REDIS_URL is not None
    engine = CacheEngine.from_url(REDIS_URL, prefix=unique_prefix())
    try:

        @cache_aside(key="p:<id>", ttl=30, engine=engine, near=NearCache(max_entries=4))
        def read(id: str) -> str:
            return id * 100

        deadline = time.monotonic() + PATIENCE
        while read.lookup("hot").source is not Source.NEAR:  # tracking confirms a moment later
            assert time.monotonic() < deadline, "never served from the near cache"
        for _ in range(3):
            read("hot")
        for round in range(3):  # more keys than max_entries: some go, some are refused
            for id in ("a", "b", "c", "d", "e", "f"):
                read(f"{id}{round}")  # loaded
                read(f"{id}{round}")  # read from Redis: offered to the near cache
        stats = read.stats()
        assert stats.near_hits >= 4
        assert stats.near_misses > 0
        assert stats.near_bytes > 0
        assert stats.near_evictions + stats.near_admissions_refused > 0

        points = telemetry.points(read)
        for name in ("near_hits", "near_misses", "near_evictions", "near_admissions_refused"):
            assert name in COUNTERS
            assert points[f"cached_aside.{name}"].value == getattr(stats, name), name
        assert set(GAUGES) == {"near_bytes"}
        assert points["cached_aside.near_bytes"].value == stats.near_bytes
    finally:
        engine.close()
        raw = redis.Redis.from_url(REDIS_URL)
        delete_prefix(raw, engine.prefix)
        raw.close()


async def test_functions_of_one_name_are_summed(engine: CacheEngine, telemetry: Telemetry) -> None:
    """Two modules may both define `get`: one data point per name, their sum."""
    name = f"get_{uuid.uuid4().hex[:8]}"

    def make(prefix: str) -> Any:
        def get(id: str) -> str:
            return id

        get.__qualname__ = name
        return cache_aside(key=prefix + ":<id>", ttl=30, engine=engine)(get)

    one, other = make("one"), make("other")
    one("a")
    one("a")
    other("b")
    points = telemetry.points(one)
    assert points["cached_aside.misses"].value == 2
    assert points["cached_aside.hits"].value == 1
    assert points[LOADER_DURATION].count == 2


async def test_metrics_only_leaves_the_classes_alone(h: Harness) -> None:
    @named
    def load(id: str) -> str:
        return id

    plain = AsyncCachedFunction if h.mode == "async" else CachedFunction
    telemetry = Telemetry()
    try:
        instrument(
            tracer_provider=telemetry.tracer_provider,
            meter_provider=telemetry.meter_provider,
            traces=False,
        )
        fn = h.cached(load, key="product:<id>")
        assert type(fn) is plain  # the hit path is the core's own
        await h.run(fn, "p-1")
        await h.run(fn, "p-1")
        assert telemetry.spans() == []
        points = telemetry.points(fn)
        assert (points["cached_aside.hits"].value, points["cached_aside.misses"].value) == (1, 1)
        assert points[LOADER_DURATION].count == 1
    finally:
        uninstrument()
        telemetry.shutdown()


# -- instrument / uninstrument ------------------------------------------------------


async def test_uninstrument_restores_the_core_classes(h: Harness) -> None:
    @named
    def load(id: str) -> str:
        return id

    fn = h.cached(load, key="product:<id>")  # decorated before instrument()
    plain = AsyncCachedFunction if h.mode == "async" else CachedFunction
    assert type(fn) is plain
    telemetry = Telemetry()
    try:
        telemetry.instrument()
        assert is_instrumented()
        assert type(fn) is not plain
        await h.run(fn, "p-1")
        assert len(telemetry.spans(fn)) == 1
        assert "loaded_in" in vars(fn._plan.stats)
        points = telemetry.points(fn)
        assert points["cached_aside.misses"].value == 1
        assert points[LOADER_DURATION].count == 1
    finally:
        uninstrument()
    assert not is_instrumented()
    assert type(fn) is plain
    assert type(fn).__call__ is plain.__call__  # the core's hit path, untouched
    assert "loaded_in" not in vars(fn._plan.stats)
    assert type(wrapping_module.decorated) is weakref.WeakSet
    await h.run(fn, "p-1")
    await h.run(fn, "p-2")
    assert len(telemetry.spans(fn)) == 1  # no span since
    # The counters stopped reporting; the histogram keeps what it recorded before.
    points = telemetry.points(fn)
    assert set(points) <= {LOADER_DURATION}  # (SDK 1.20 drops a point with no new data)
    assert all(point.count == 1 for point in points.values())
    later = h.cached(load, key="other:<id>")
    assert type(later) is plain  # decorations after uninstrument() stay plain
    uninstrument()  # twice is harmless
    telemetry.shutdown()


async def test_instrument_again_moves_to_the_new_providers(engine: CacheEngine) -> None:
    @cache_aside(key="product:<id>", ttl=30, engine=engine)
    @named
    def get(id: str) -> str:
        return id

    first, second = Telemetry(), Telemetry()
    try:
        first.instrument()
        get("a")
        second.instrument()  # replaces the first
        get("a")
        assert [attributes(span)["cached_aside.source"] for span in first.spans(get)] == ["loader"]
        assert [attributes(span)["cached_aside.source"] for span in second.spans(get)] == ["cache"]
        assert "cached_aside.hits" not in first.points(get)
        assert second.points(get)["cached_aside.hits"].value == 1
        first.instrument()  # back to the first: its instruments answer again
        assert first.points(get)["cached_aside.hits"].value == 1
        assert "cached_aside.hits" not in second.points(get)
    finally:
        uninstrument()
        first.shutdown()
        second.shutdown()


def run_python(code: str) -> None:
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert completed.returncode == 0, completed.stderr


def test_importing_cached_aside_does_not_import_opentelemetry() -> None:
    # redis-py (8.x) imports opentelemetry itself when it is installed, so what is
    # checked is that cached_aside adds none of its modules to those.
    run_python(
        "import sys, redis, msgpack\n"
        "before = set(sys.modules)\n"
        "import cached_aside, cached_aside.integrations\n"
        "added = [m for m in set(sys.modules) - before if m.startswith('opentelemetry')]\n"
        "assert not added, added\n"
        "assert 'cached_aside.integrations.opentelemetry' not in sys.modules\n"
    )
    # And without opentelemetry at all, cached_aside imports and caches as ever.
    run_python(
        "import sys\n"
        "sys.modules['opentelemetry'] = None  # any import of it fails\n"
        "import fakeredis, cached_aside\n"
        "server = fakeredis.FakeServer()\n"
        "engine = cached_aside.CacheEngine(fakeredis.FakeRedis(server=server), prefix='x')\n"
        "get = cached_aside.cache_aside(key='k:<id>', ttl=5, engine=engine)(lambda id: id)\n"
        "assert get('a') == 'a' and get.lookup('a').hit\n"
        "assert not any(m.startswith('opentelemetry') for m in sys.modules if sys.modules[m])\n"
    )


# -- the documentation's example runs as written ------------------------------------

DOC = ROOT / "docs" / "integrations" / "opentelemetry.md"


@needs_real_redis
def test_the_documented_example_runs(tmp_path: Path) -> None:
    completed = run_documented(
        tmp_path,
        fenced(marked(DOC, "example"), r"\w+"),
        'configure(prefix="otel_example")',
        lambda prefix: f'configure(prefix="{prefix}")',
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == fenced(marked(DOC, "output"), r"\w+")
    assert completed.stderr == ""
