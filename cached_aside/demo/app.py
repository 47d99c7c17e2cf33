"""The demo's API as plain methods returning (status, JSON body): no HTTP here, so
the same calls serve the web page, curl and the tests."""

from __future__ import annotations

import re
import statistics
import threading
import time
from collections import Counter
from typing import Any

import msgspec

from cached_aside import CacheEngine, CacheResult, Source, cache_aside

from .catalogue import FIELDS, Catalogue, CatalogueError, Product, checked_value
from .stampede import Timed, burst

MAX_STAMPEDE = 500
# The hash's reserved field (README, "Redis holds"): "none" marks the negative sentinel.
META_FIELD = "__cached_aside__"
NEGATIVE_MARK = b"none"
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
Reply = tuple[int, dict[str, Any]]
# One stampede caller's lookup and, when it ran the loader, the primary's time in ms.
Read = tuple[CacheResult[Product | None], float | None]


class Refused(Exception):
    """A request the demo turns away; becomes a 4xx reply with a JSON error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def checked_id(id: str) -> str:
    if not _ID.fullmatch(id):
        raise Refused(400, "ids are 1 to 64 letters, digits, '-' or '_'")
    return id


class DemoApp:
    """A cached product repository over the catalogue, and what the page can do with it."""

    def __init__(
        self, engine: CacheEngine, catalogue: Catalogue, redis_label: str, ttl_seconds: float = 60
    ) -> None:
        self.engine = engine
        self.catalogue = catalogue
        self.redis_label = redis_label
        self.ttl_seconds = ttl_seconds
        self._primary_ms = threading.local()

        @cache_aside(
            key="product:<id>", ttl=ttl_seconds, as_hash=True, negative_ttl=15, engine=engine
        )
        def get_product(id: str) -> Product | None:
            started = time.perf_counter()
            try:
                return catalogue.read(id)
            finally:
                self._primary_ms.value = (time.perf_counter() - started) * 1000

        self.get_product = get_product

    # -- endpoints -------------------------------------------------------------

    def info(self) -> Reply:
        return 200, {
            "redis": self.redis_label,
            "primary_latency_ms": self.catalogue.latency_ms,
            "ttl_seconds": self.ttl_seconds,
            "products": self.catalogue.ids(),
            "fields": list(FIELDS),
            "max_stampede": MAX_STAMPEDE,
        }

    def read(self, id: str) -> Reply:
        checked_id(id)
        self._primary_ms.value = None
        result = self.get_product.lookup(id)
        body = {
            "id": id,
            "record": as_json(result.value),
            "hit": result.hit,
            "source": result.source.value,
            "redis_ms": round(result.redis_ms, 3),
            "primary_ms": None
            if self._primary_ms.value is None
            else round(self._primary_ms.value, 1),
            "key": self.get_product.key(id),
            **self._ttl(id),
        }
        if result.value is None:
            return 404, {"error": f"no product {id!r}", **body}
        return 200, body

    def ttl(self, id: str) -> Reply:
        body = {"id": checked_id(id), **self._ttl(id)}
        if not self.catalogue.exists(id):
            return 404, {"error": f"no product {id!r}", **body}
        return 200, body

    def invalidate(self, id: str) -> Reply:
        """Delete the cached entry (value or negative sentinel): the next read loads.

        Answers the Outcome's value: "deleted", "absent" (nothing was cached) or
        "pending" (Redis did not take it; the engine's outbox retries it). An unknown
        id is still invalidated, as it may hold a negative sentinel, and answers 404.
        """
        checked_id(id)
        body = {"id": id, "invalidation": self.get_product.invalidate(id).value}
        if not self.catalogue.exists(id):
            return 404, {"error": f"no product {id!r}", **body}
        return 200, body

    def update_primary(self, id: str, body: Any) -> Reply:
        """Write to the primary, then invalidate: the next read loads the new row."""
        field, value = self._field_change(id, body)
        stored = self.catalogue.update(id, field, value)
        outcome = self.get_product.invalidate(id)
        return 200, {"id": id, "field": field, "value": stored, "invalidation": outcome.value}

    def update_primary_route(self, body: Any, id: str) -> Reply:
        return self.update_primary(id, body)

    def update_cache_route(self, body: Any, id: str) -> Reply:
        return self.update_hot_field(id, body)

    def update_hot_field(self, id: str, body: Any) -> Reply:
        """Change one field in the cached record only (update_field), if it is cached."""
        field, value = self._field_change(id, body)
        outcome = self.get_product.update_field(id, field, value)
        return 200, {
            "id": id,
            "field": field,
            "value": str(value),
            "update": outcome.value,
            **self._ttl(id),
        }

    def stampede(self, body: Any) -> Reply:
        """Invalidate a product, then read it from N threads at once.

        Besides the summary, answers each caller's timing (offsets from the burst's
        release, in thread order) and what the readers got, for the record card.
        """
        id, n = self._stampede_request(body)
        self.get_product.invalidate(id)
        reads_before = self.catalogue.reads
        timed = burst(lambda: self._timed_read(id), n)
        ordered = sorted(each.duration_ms for each in timed)
        served = [each.value for each in timed if each.value is not None]
        # The card shows the load's result: the loader's own read, else any reader's.
        result, primary_ms = next(
            (read for read in served if read[0].source is Source.LOADER),
            served[0] if served else (None, None),
        )
        return 200, {
            "id": id,
            "n": n,
            "primary_reads": self.catalogue.reads - reads_before,
            "sources": dict(Counter(_source(each) for each in timed)),
            "latency_ms": {
                "p50": round(statistics.median(ordered), 1),
                "p99": round(ordered[min(n - 1, int(n * 0.99))], 1),
                "max": round(ordered[-1], 1),
            },
            "primary_latency_ms": self.catalogue.latency_ms,
            "callers": [
                {
                    "caller": index,
                    "source": _source(each),
                    "start_ms": round(each.start_ms, 3),
                    "duration_ms": round(each.duration_ms, 3),
                    **({"error": each.error} if each.error else {}),
                }
                for index, each in enumerate(timed)
            ],
            "record": None if result is None else as_json(result.value),
            "redis_ms": None if result is None else round(result.redis_ms, 3),
            "primary_ms": None if primary_ms is None else round(primary_ms, 1),
            "key": self.get_product.key(id),
            **self._ttl(id),
        }

    def stats(self) -> Reply:
        stats = self.get_product.stats()
        return 200, {**stats.as_dict(), "primary_reads": self.catalogue.reads}

    def reset_stats(self) -> Reply:
        self.get_product.reset_stats()
        self.catalogue.reads = 0
        return self.stats()

    # -- helpers ---------------------------------------------------------------

    def _stampede_request(self, body: Any) -> tuple[str, int]:
        if not isinstance(body, dict):
            raise Refused(400, 'send a JSON object like {"id": "p-001", "n": 50}')
        id, n = body.get("id", "p-001"), body.get("n", 50)
        checked_id(id if isinstance(id, str) else "")
        if isinstance(n, str) and n.strip().isdigit():
            n = int(n)
        if isinstance(n, bool) or not isinstance(n, int):
            raise Refused(400, f"n must be a whole number from 1 to {MAX_STAMPEDE}")
        if not 1 <= n <= MAX_STAMPEDE:
            raise Refused(400, f"n must be from 1 to {MAX_STAMPEDE}, got {n}")
        if not self.catalogue.exists(id):
            raise Refused(404, f"no product {id!r}")
        return id, n

    def _timed_read(self, id: str) -> Read:
        self._primary_ms.value = None  # set by the loader, in this thread, if it runs
        result = self.get_product.lookup(id)
        primary_ms: float | None = self._primary_ms.value
        return result, primary_ms

    def _ttl(self, id: str) -> dict[str, Any]:
        client = self.engine.client()
        key = self.get_product.key(id)
        ttl_ms = client.pttl(key)
        negative = ttl_ms > 0 and client.hget(key, META_FIELD) == NEGATIVE_MARK
        return {
            "ttl_ms": ttl_ms if ttl_ms > 0 else None,
            "cached": ttl_ms > 0,
            "negative": negative,
        }

    def _field_change(self, id: str, body: Any) -> tuple[str, str | int]:
        checked_id(id)
        if not isinstance(body, dict) or "field" not in body or "value" not in body:
            raise Refused(400, 'send a JSON object like {"field": "stock", "value": 40}')
        field, value = body["field"], body["value"]
        if not isinstance(field, str) or field not in FIELDS:
            raise Refused(400, f"unknown field {field!r}; use one of {', '.join(FIELDS)}")
        try:
            checked = checked_value(field, value)
        except CatalogueError as exc:
            raise Refused(400, str(exc)) from None
        if not self.catalogue.exists(id):
            raise Refused(404, f"no product {id!r}")
        return field, checked


def as_json(record: Product | None) -> dict[str, Any] | None:
    """A record as the page shows it: the price as its text, "24.50"."""
    return None if record is None else msgspec.to_builtins(record)


def _source(timed: Timed[Read]) -> str:
    """A stampede caller's source: "loader", "waited", "cache"..., or "error"."""
    return "error" if timed.value is None else timed.value[0].source.value
