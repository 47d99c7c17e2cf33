"""Compression: a 20 KB record stored plain and with compress_over=, side by side:
bytes in Redis, and a hit's latency (GET, inflate, unpack) in one interleaved run.

    python -m benchmarks --only compression
"""

from __future__ import annotations

import uuid

from cached_aside import CacheEngine, cache_aside

from .runner import Settings, Table, latency_table, measure_sync

COMPRESS_OVER = 1024


def record() -> dict[str, object]:
    """About 20 KB packed: a product page's worth of text and attributes, compressible
    the way real JSON-like rows are (repeated words and keys), not random bytes."""
    reviews = [
        {
            "author": f"customer-{n}",
            "stars": 1 + n % 5,
            "text": f"Review {n}: the pen writes smoothly, the nib is fine and the ink "
            f"flows well; delivery took {2 + n % 4} days and the box was intact.",
        }
        for n in range(135)
    ]
    return {"id": "p-001", "name": "Fountain pen", "price": "24.50", "reviews": reviews}


def run(settings: Settings) -> list[Table]:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    engine = CacheEngine.from_url(settings.url, prefix=prefix)
    row = record()
    plain = cache_aside(key="plain:<id>", ttl=300, engine=engine)(lambda id: row)
    packed = cache_aside(key="zlib:<id>", ttl=300, engine=engine, compress_over=COMPRESS_OVER)(
        lambda id: row
    )
    try:
        plain("p-001")
        packed("p-001")
        client = engine.client()
        sizes = {
            "plain msgpack": client.strlen(plain.key("p-001")),
            f"compress_over={COMPRESS_OVER} (zlib)": client.strlen(packed.key("p-001")),
        }
        samples = measure_sync(
            settings,
            {
                "plain msgpack": lambda: plain("p-001"),
                f"compress_over={COMPRESS_OVER} (zlib)": lambda: packed("p-001"),
            },
            "compression",
        )
        table = latency_table(
            "hit of a 20 KB record, plain vs compressed (sync)", samples, "plain msgpack"
        )
        table.columns.append("bytes in Redis")
        for table_row in table.rows:
            table_row.append(sizes[table_row[0]])
        table.notes = [
            "a hit's whole latency: GET over loopback, zlib inflate, msgpack unpack; on a "
            "network the smaller payload also costs less wire time"
        ]
        return [table]
    finally:
        engine.invalidate_prefix()
        engine.close()
