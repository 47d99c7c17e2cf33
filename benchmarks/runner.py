"""What every scenario shares: settings, interleaved measurement, and result tables.

Contenders are measured in rounds, alternating their order, so that drift in a
shared machine's speed hits all of them alike; tables report medians, p99 and the
ratio to a baseline measured in the same run, never a lone absolute time.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio
from rich.console import Console
from rich.progress import Progress
from rich.table import Table as RichTable


@dataclass
class Settings:
    url: str = "redis://127.0.0.1:6379/0"
    quick: bool = False
    rounds: int = 30
    calls: int = 200
    progress: Progress | None = None

    def scaled(self, full: int, quick: int) -> int:
        return quick if self.quick else full


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    samples: dict[str, list[float]] = field(default_factory=dict)  # for charts, not printed

    def as_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "rows": [dict(zip(self.columns, row, strict=True)) for row in self.rows],
            "notes": self.notes,
        }


def blocking_client(url: str, max_connections: int = 64) -> redis.Redis:
    """A client whose pool waits for a free connection, as CacheEngine.from_url makes."""
    pool = redis.BlockingConnectionPool.from_url(url, max_connections=max_connections)
    return redis.Redis.from_pool(pool)


def blocking_async_client(url: str, max_connections: int = 64) -> redis.asyncio.Redis:
    pool = redis.asyncio.BlockingConnectionPool.from_url(url, max_connections=max_connections)
    return redis.asyncio.Redis.from_pool(pool)


def _order(contenders: dict[str, Any], round_number: int) -> list[tuple[str, Any]]:
    items = list(contenders.items())
    return items if round_number % 2 == 0 else items[::-1]


def measure_sync(
    settings: Settings, contenders: dict[str, Callable[[], Any]], label: str
) -> dict[str, list[float]]:
    """Per-call latencies in microseconds, interleaved in rounds."""
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    task = settings.progress.add_task(label, total=settings.rounds) if settings.progress else None
    clock = time.perf_counter_ns
    for round_number in range(settings.rounds):
        for name, call in _order(contenders, round_number):
            sink = samples[name]
            for _ in range(settings.calls):
                started = clock()
                call()
                sink.append((clock() - started) / 1000.0)
        if task is not None and settings.progress:
            settings.progress.advance(task)
    return samples


async def measure_async(
    settings: Settings, contenders: dict[str, Callable[[], Awaitable[Any]]], label: str
) -> dict[str, list[float]]:
    """Per-call latencies in microseconds, interleaved in rounds."""
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    task = settings.progress.add_task(label, total=settings.rounds) if settings.progress else None
    clock = time.perf_counter_ns
    for round_number in range(settings.rounds):
        for name, call in _order(contenders, round_number):
            sink = samples[name]
            for _ in range(settings.calls):
                started = clock()
                await call()
                sink.append((clock() - started) / 1000.0)
        if task is not None and settings.progress:
            settings.progress.advance(task)
    return samples


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def latency_table(title: str, samples: dict[str, list[float]], baseline: str) -> Table:
    base = statistics.median(samples[baseline])
    table = Table(title, ["contender", "median µs", "p99 µs", "ratio"], samples=samples)
    for name, values in samples.items():
        median = statistics.median(values)
        table.rows.append(
            [name, round(median, 1), round(percentile(values, 0.99), 1), round(median / base, 3)]
        )
    return table


def cell_text(cell: object, column: str) -> str:
    if isinstance(cell, bool) or not isinstance(cell, int | float):
        return str(cell)
    if isinstance(cell, int):
        return f"{cell:,}"
    return f"{cell:.3f}" if "ratio" in column else f"{cell:,.1f}"


def show(console: Console, table: Table) -> None:
    rich_table = RichTable(title=table.title, title_justify="left", title_style="bold")
    for index, column in enumerate(table.columns):
        rich_table.add_column(column, justify="left" if index == 0 else "right")
    for row in table.rows:
        rich_table.add_row(
            *(cell_text(cell, column) for cell, column in zip(row, table.columns, strict=True))
        )
    console.print(rich_table)
    for note in table.notes:
        console.print(f"  [dim]{note}[/dim]")


def console() -> Console:
    """Rich's console; wide enough for the tables when output goes to a file or CI log."""
    return Console(width=None if sys.stdout.isatty() else 140)


def print_tables(tables: list[Table]) -> None:
    console_ = console()
    for table in tables:
        show(console_, table)
