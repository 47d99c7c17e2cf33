"""What every scenario shares: settings, interleaved measurement, and result tables.

Contenders are measured in rounds, alternating their order, so that drift in a
shared machine's speed hits all of them alike; tables report medians, p99 and the
ratio to a baseline measured in the same run, never a lone absolute time.
"""

from __future__ import annotations

import os
import socket
import statistics
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import redis
import redis.asyncio
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table as RichTable
from rich.text import Text


class BenchProgress(Progress):
    """What the run is doing: a line as each section starts and ends (with its
    duration) and as each measurement ends; between them, live bars on a terminal,
    and on a log (CI, a pipe) a plain line as a measurement starts and every
    PLAIN_EVERY_SECONDS while it runs. Lines are printed between rounds, outside the
    timed calls, so the results are the same with or without a terminal.
    """

    PLAIN_EVERY_SECONDS = 10.0

    def __init__(self, console: Console) -> None:
        self.live_bars = console.is_terminal and not console.is_dumb_terminal
        super().__init__(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            _CountColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=not self.live_bars,
            refresh_per_second=4,  # the display thread competes with the timed calls
        )
        self._section_tasks: list[TaskID] = []
        self._last_line: dict[TaskID, float] = {}

    def _line(self, text: str) -> None:
        self.console.print(text, highlight=False)

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Announce a section, show it running (spinner and time on a terminal), and
        report its duration; the measurements it started leave the display with it."""
        started = time.monotonic()
        self._line(f"[bold]{escape(name)}[/bold]: started")
        spinner = super().add_task(f"[bold]{escape(name)}[/bold]", total=None)
        try:
            yield
        except BaseException:
            self._line(f"[bold]{escape(name)}[/bold]: failed after {_seconds(started)}")
            raise
        finally:
            for task in [*self._section_tasks, spinner]:
                self.remove_task(task)
                self._last_line.pop(task, None)
            self._section_tasks.clear()
        self._line(f"[bold]{escape(name)}[/bold]: done in {_seconds(started)}")

    def add_task(
        self,
        description: str,
        start: bool = True,
        total: float | None = 100.0,
        completed: int = 0,
        visible: bool = True,
        **fields: Any,
    ) -> TaskID:
        task = super().add_task(description, start, total, completed, visible, **fields)
        self._section_tasks.append(task)
        self._last_line[task] = time.monotonic()
        if not self.live_bars:
            self._line(f"  {escape(description)}: {completed}/{_count(total)}")
        return task

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        task = self._tasks[task_id]
        was_finished = task.finished
        super().advance(task_id, advance)
        count = f"{_count(task.completed)}/{_count(task.total)}"
        if task.finished and not was_finished:
            self._line(f"  {escape(task.description)}: {count} in {task.finished_time:.1f} s")
        elif (
            not self.live_bars
            and time.monotonic() - self._last_line[task_id] >= self.PLAIN_EVERY_SECONDS
        ):
            self._last_line[task_id] = time.monotonic()
            self._line(f"  {escape(task.description)}: {count}, {task.elapsed or 0:.0f} s so far")


class _CountColumn(ProgressColumn):
    """Done/total, or nothing for a task of unknown size (a section's own row)."""

    def render(self, task: Task) -> Text:
        if task.total is None:
            return Text("")
        return Text(f"{_count(task.completed)}/{_count(task.total)}", style="progress.download")


def _count(value: float | None) -> str:
    return "?" if value is None else f"{value:g}"


def _seconds(started: float) -> str:
    return f"{time.monotonic() - started:.1f} s"


@dataclass
class Settings:
    url: str = "redis://127.0.0.1:6379/0"
    quick: bool = False
    rounds: int = 30
    calls: int = 200
    progress: Progress | None = None
    # A contender's timed run, where a scenario times one: None for the scenario's own
    # (shorter when quick); the tests run the harness for less, measuring nothing.
    seconds: float | None = None

    def scaled(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def timed(self, full: float, quick: float) -> float:
        """Seconds a contender's timed run lasts: `seconds` if set, else the scenario's."""
        if self.seconds is not None:
            return self.seconds
        return quick if self.quick else full


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    samples: dict[str, list[float]] = field(default_factory=dict)  # for charts, not printed
    # For line charts, not printed: panel -> contender -> [(x, y), ...].
    curves: dict[str, dict[str, list[tuple[float, float]]]] = field(default_factory=dict)

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


class ConnectionCounter:
    """This process's open TCP connections to the server: what a contender opened,
    read from /proc (Linux), so that other clients of a shared server do not count.
    Elsewhere, the server's connected_clients (which counts everyone's)."""

    def __init__(self, url: str) -> None:
        self.url = url
        address = urlparse(url)
        port = address.port or 6379
        infos = socket.getaddrinfo(address.hostname or "127.0.0.1", port, type=socket.SOCK_STREAM)
        self._remote = {_proc_address(info[4][0], port) for info in infos}
        self.local = os.path.exists("/proc/self/fd") and os.path.exists("/proc/net/tcp")

    def count(self) -> int:
        if not self.local:
            client = redis.Redis.from_url(self.url)
            try:
                return int(client.info("clients")["connected_clients"]) - 1
            finally:
                client.close()
        inodes = set()
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:  # closed meanwhile
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        count = 0
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                with open(table) as lines:
                    next(lines)
                    for line in lines:
                        fields = line.split()
                        # st 01: established
                        if fields[3] == "01" and fields[2] in self._remote and fields[9] in inodes:
                            count += 1
            except OSError:
                continue
        return count


def _proc_address(ip: str, port: int) -> str:
    """An address as /proc/net/tcp{,6} spells it: the IP's 32-bit words in host
    order (little-endian here), hex, then the port."""
    packed = socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)
    words = [packed[i : i + 4][::-1] for i in range(0, len(packed), 4)]
    return "".join(word.hex().upper() for word in words) + f":{port:04X}"


def threads_level(
    call: Callable[[str], Any],
    threads: int,
    seconds: float,
    counter: ConnectionCounter | None = None,
) -> dict[str, Any]:
    """`threads` threads, thread n looping `call("k<n>")` for `seconds`: hits/s,
    p50 and p99 µs, errors by kind, and (with a counter) connections at mid-run
    beyond those before the threads started."""
    samples: list[list[float]] = [[] for _ in range(threads)]
    errors: list[str] = []
    deadline = [0.0]
    ended = [0.0] * threads

    def start() -> None:  # once every thread is ready: the run's seconds begin now
        deadline[0] = time.perf_counter() + seconds

    barrier = threading.Barrier(threads + 1, action=start, timeout=60)
    # A thread's connection closes when the thread ends (cached_aside's held ones do):
    # each stays until the connections are counted, so the count sees them all however
    # late the count comes on a slow machine.
    counted = threading.Event()

    def loop(n: int) -> None:
        key, sink, clock = f"k{n}", samples[n], time.perf_counter
        try:
            call(key)
        except Exception as exc:
            errors.append(type(exc).__name__)
        barrier.wait()
        while clock() < deadline[0]:
            began = clock()
            try:
                call(key)
            except Exception as exc:  # counted, never raised: the table reports them
                errors.append(type(exc).__name__)
                continue
            sink.append((clock() - began) * 1e6)
        ended[n] = clock()
        counted.wait(60)

    before = counter.count() if counter else 0
    workers = [threading.Thread(target=loop, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    try:
        barrier.wait()
        began = deadline[0] - seconds
        peak = before
        if counter:
            time.sleep(seconds / 2)
            peak = counter.count()
    finally:
        counted.set()
        for worker in workers:
            worker.join()
    elapsed = max(ended) - began  # the last call's end: a thread waiting to be counted is idle
    every = [value for sink in samples for value in sink]
    return {
        "hits_per_s": len(every) / elapsed,
        "p50": percentile(every, 0.5) if every else 0.0,
        "p99": percentile(every, 0.99) if every else 0.0,
        "connections": max(0, peak - before),
        "errors": errors,
    }


def _order(contenders: dict[str, Any], round_number: int) -> list[tuple[str, Any]]:
    items = list(contenders.items())
    return items if round_number % 2 == 0 else items[::-1]


def measure_sync(
    settings: Settings,
    contenders: dict[str, Callable[[], Any]],
    label: str,
    cpu: dict[str, list[float]] | None = None,
    each_round: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Per-call latencies in microseconds, interleaved in rounds; with `cpu`, each
    contender's CPU time (user + system, this process) per call of each round, in µs;
    `each_round` runs at the start of every round (another contender's turn)."""
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    task = settings.progress.add_task(label, total=settings.rounds) if settings.progress else None
    clock, cpu_clock = time.perf_counter_ns, time.process_time_ns
    for round_number in range(settings.rounds):
        if each_round is not None:
            each_round()
        for name, call in _order(contenders, round_number):
            sink = samples[name]
            cpu_started = cpu_clock()
            for _ in range(settings.calls):
                started = clock()
                call()
                sink.append((clock() - started) / 1000.0)
            if cpu is not None:
                cpu.setdefault(name, []).append(
                    (cpu_clock() - cpu_started) / 1000.0 / settings.calls
                )
        if task is not None and settings.progress:
            settings.progress.advance(task)
    return samples


async def measure_async(
    settings: Settings,
    contenders: dict[str, Callable[[], Awaitable[Any]]],
    label: str,
    cpu: dict[str, list[float]] | None = None,
    each_round: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Per-call latencies in microseconds, interleaved in rounds; `cpu` and
    `each_round` as measure_sync's (`each_round` blocks the loop, between rounds)."""
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    task = settings.progress.add_task(label, total=settings.rounds) if settings.progress else None
    clock, cpu_clock = time.perf_counter_ns, time.process_time_ns
    for round_number in range(settings.rounds):
        if each_round is not None:
            each_round()
        for name, call in _order(contenders, round_number):
            sink = samples[name]
            cpu_started = cpu_clock()
            for _ in range(settings.calls):
                started = clock()
                await call()
                sink.append((clock() - started) / 1000.0)
            if cpu is not None:
                cpu.setdefault(name, []).append(
                    (cpu_clock() - cpu_started) / 1000.0 / settings.calls
                )
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
        # Escaped: a name such as `cache[key]` is text, not Rich markup.
        rich_table.add_row(
            *(
                escape(cell_text(cell, column))
                for cell, column in zip(row, table.columns, strict=True)
            )
        )
    console.print(rich_table)
    for note in table.notes:
        console.print(f"  [dim]{escape(note)}[/dim]")


def console() -> Console:
    """Rich's console; wide enough for the tables when output goes to a file or CI log."""
    return Console(width=None if sys.stdout.isatty() else 140)


def print_tables(tables: list[Table]) -> None:
    console_ = console()
    for table in tables:
        show(console_, table)
