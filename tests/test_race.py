"""The randomized race: readers with slow loaders, writers that update a real SQLite
file and invalidate. The plain algorithm is run on the same workload to show the
checker can fail."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from benchmarks.race import Workload, run_ours, run_ours_async, run_plain
from cached_aside import CacheEngine

# Readers go on until 60 invalidations: the race is run on a machine of any speed.
WORKLOAD = Workload(reads=1500, seed=11, min_invalidations=60)


@pytest.mark.slow
def test_plain_cache_aside_serves_stale_reads(clients: Any, tmp_path: Path) -> None:
    outcome = run_plain(clients[2], WORKLOAD, tmp_path)
    assert outcome.invalidations > 50
    assert outcome.stale_reads > 0  # the checker catches the textbook algorithm


@pytest.mark.slow
def test_no_stale_reads_with_threads(
    engine: CacheEngine, more_clients: Any, tmp_path: Path
) -> None:
    other = CacheEngine(*more_clients(), prefix=engine.prefix)  # "another process"
    outcome = run_ours([engine, other], WORKLOAD, tmp_path)
    assert outcome.invalidations > 50
    assert (outcome.stale_reads, outcome.stale_entries) == (0, 0)


@pytest.mark.slow
async def test_no_stale_reads_with_tasks(
    engine: CacheEngine, more_clients: Any, tmp_path: Path
) -> None:
    other = CacheEngine(*more_clients(), prefix=engine.prefix)
    outcome = await run_ours_async([engine, other], WORKLOAD, tmp_path)
    assert outcome.invalidations > 50
    assert (outcome.stale_reads, outcome.stale_entries) == (0, 0)
