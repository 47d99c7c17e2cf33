"""The floor of the hit path: a C client reading the same record over one connection,
one GET at a time, a round of it before each round of the Python contenders, and the
table of every contender as a ratio to its round trip and CPU.

The C client is benchmarks/c_client.c, compiled for the run (`cc -O2`): plain socket
calls, each GET timed, so its median is exact. Where no C compiler is found,
`redis-benchmark -c 1 -P 1` stands in, and the notes say its round trip is read from a
histogram whose buckets near a one-CPU round trip are several µs wide.
"""

from __future__ import annotations

import csv
import io
import resource
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from .runner import Table

# (mode, msgpack table, CPU µs per call by contender, its raw baseline): for the C
# client's table.
Measured = list[tuple[str, Table, dict[str, list[float]], str]]
SOURCE = Path(__file__).with_name("c_client.c")
LABEL = "C client"


def compiled(folder: Path) -> Path | None:
    """benchmarks/c_client.c built in `folder`, or None without a C compiler."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    binary = folder / "c_client"
    done = subprocess.run(
        [compiler, "-O2", "-o", str(binary), str(SOURCE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return binary if done.returncode == 0 else None


class CClient:
    """The C client's GETs of one key over one connection, one at a time, a round per
    `round()`: its round trip per GET (the median) and its CPU per GET (user +
    system). `problem` says why there are no figures."""

    STARTS = 5  # redis-benchmark: runs of one GET, whose median CPU is the start-up's

    def __init__(self, url: str, gets: int) -> None:
        self.gets = gets
        self.key = "cached_aside:c-client:unset"  # the record's, once the run knows it
        self.round_trip_us: list[float] = []
        self.cpu_us: list[float] = []
        self.problem: str | None = None
        self.start_up_us = 0.0
        address = urlparse(url)
        self.host, self.port = address.hostname or "127.0.0.1", str(address.port or 6379)
        self.auth = [address.username or "default", address.password] if address.password else []
        self._folder = tempfile.TemporaryDirectory(prefix="cached_aside_c_client_")
        self.binary = compiled(Path(self._folder.name))
        if self.binary is not None:
            return
        if shutil.which("redis-benchmark") is None:
            self.problem = "no C compiler, and redis-benchmark is not installed"
            return
        self.command = ["redis-benchmark", "-h", self.host, "-p", self.port]
        self.command += ["-c", "1", "-P", "1", "--csv"]
        if address.username:
            self.command += ["--user", address.username]
        if address.password:
            self.command += ["-a", address.password]
        self.command += ["-n", "{gets}", "GET", "{key}"]
        starts = [self._benchmark(1, start_up=True) for _ in range(self.STARTS)]
        if self.problem is None:
            self.start_up_us = statistics.median(cpu for _, cpu in starts)

    def close(self) -> None:
        """Remove the compiled client."""
        self._folder.cleanup()

    def _compiled(self, gets: int) -> tuple[float, float]:
        """(median µs per GET, CPU µs per GET) from the compiled client."""
        assert self.binary is not None
        command = [str(self.binary), self.host, self.port, self.key, str(gets), *self.auth]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
            median, _p99, cpu = (float(figure) for figure in done.stdout.split())
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            self.problem = f"the C client failed ({exc})"
            return 0.0, 0.0
        return median, cpu

    def _benchmark(self, gets: int, start_up: bool = False) -> tuple[float, float]:
        """redis-benchmark's (p50 µs per GET, CPU µs of the whole run), or (0, 0) and
        `problem` set; a `start_up` run's µs per GET is 0 (of one GET, it may print none)."""
        if self.problem is not None:
            return 0.0, 0.0
        command = [part.format(gets=gets, key=self.key) for part in self.command]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            self.problem = f"redis-benchmark failed ({exc})"
            return 0.0, 0.0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
        if start_up and done.returncode == 0:
            return 0.0, cpu * 1e6
        # --csv: a header, then "GET key","rps","avg_latency_ms",...,"p50_latency_ms",...
        found = [row for row in csv.DictReader(io.StringIO(done.stdout)) if row.get("rps")]
        if not found:
            self.problem = f"redis-benchmark printed no GET figure ({done.stderr.strip()[:200]})"
            return 0.0, 0.0
        return float(found[-1]["p50_latency_ms"]) * 1000, cpu * 1e6

    def round(self) -> None:
        """One round of `gets` GETs, its figures appended."""
        if self.problem is not None:
            return
        if self.binary is not None:
            round_trip, cpu = self._compiled(self.gets)
        else:
            round_trip, cpu = self._benchmark(self.gets)
            cpu = max(0.0, cpu - self.start_up_us) / self.gets
        if self.problem is None:
            self.round_trip_us.append(round_trip)
            self.cpu_us.append(cpu)

    def figures(self) -> tuple[float, float] | str:
        """(median µs per GET, median CPU µs per GET) over the rounds, or why none."""
        if self.problem is not None:
            return self.problem
        if not self.round_trip_us:
            return "no round ran"
        return statistics.median(self.round_trip_us), statistics.median(self.cpu_us)

    def describe(self) -> str:
        if self.binary is not None:
            return f"benchmarks/c_client.c, {self.gets} GETs of the msgpack record's key"
        return f"redis-benchmark -c 1 -P 1 -n {self.gets} GET (the msgpack record's key)"

    def how_measured(self) -> str:
        if self.binary is not None:
            return (
                "its µs per GET is the median of its GETs' round trips (each timed with "
                "CLOCK_MONOTONIC), its CPU per GET from getrusage around them"
            )
        return (
            "its µs per GET is redis-benchmark's p50, read from a histogram whose buckets "
            "near a one-CPU round trip are several µs wide (no C compiler for "
            "benchmarks/c_client.c); its "
            f"CPU from getrusage of the child, less its start-up ({self.start_up_us:.0f} µs, "
            "the median of runs of one GET)"
        )


def floor_note(table: Table, baseline: str, c_client: CClient) -> str:
    figures = c_client.figures()
    if isinstance(figures, str):
        return f"floor: C client: {figures}"
    base = next(row[1] for row in table.rows if row[0] == baseline)
    return (
        f"floor: C client ({c_client.describe()}), a round before each of these: "
        f"{figures[0]:.1f} µs per GET, median of its {len(c_client.round_trip_us)} rounds "
        f"so far ({figures[0] / base:.3f}x {baseline})"
    )


def c_client_table(c_client: CClient, tables: Measured) -> Table:
    """Every contender of the msgpack tables against the C client of the same run:
    round trip and CPU per call, as ratios to it and to the mode's raw redis-py call."""
    table = Table(
        "hit path against the C client (same run)",
        [
            "contender",
            "median µs",
            "ratio to C client",
            "ratio to raw redis-py",
            "CPU µs per call",
            "CPU ratio to C client",
        ],
    )
    figures = c_client.figures()
    if isinstance(figures, str):
        table.notes.append(f"no C client figures: {figures}")
        c_round_trip = c_cpu = None
    else:
        c_round_trip, c_cpu = figures
    sync_raw = next(row[1] for row in tables[0][1].rows if row[0] == tables[0][3])

    def ratio(value: float, base: float | None) -> float | str:
        return round(value / base, 3) if base else "-"

    if c_round_trip is not None and c_cpu is not None:
        table.rows.append(
            [
                LABEL,
                round(c_round_trip, 1),
                1.0,
                ratio(c_round_trip, sync_raw),
                round(c_cpu, 1),
                1.0,
            ]
        )
    for mode, latencies, cpu, baseline in tables:
        raw = next(row[1] for row in latencies.rows if row[0] == baseline)
        for name, median, _p99, _ratio in latencies.rows:
            per_call = statistics.median(cpu[name])
            table.rows.append(
                [
                    f"{mode}: {name}",
                    median,
                    ratio(median, c_round_trip),
                    ratio(median, raw),
                    round(per_call, 2),
                    ratio(per_call, c_cpu),
                ]
            )
    table.notes += [
        f"C client: {c_client.describe()}, one round before each round of the Python "
        f"contenders (sync and async); {c_client.how_measured()}; median over "
        f"{len(c_client.round_trip_us)} rounds",
        "CPU per call: user + system time over a round's calls, median over rounds; "
        "this process's for the Python contenders (its other threads included)",
        "ratio to raw redis-py: to the raw call of the row's own mode (the C client's: "
        "to the sync one)",
    ]
    return table
