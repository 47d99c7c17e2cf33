"""The floor of the hit path: the C client (`redis-benchmark -c 1 -P 1`) reading the
same record over one connection, a round of it before each round of the Python
contenders, and the table of every contender as a ratio to its round trip and CPU.
"""

from __future__ import annotations

import csv
import io
import resource
import shutil
import statistics
import subprocess
from urllib.parse import urlparse

from .runner import Table

# (mode, msgpack table, CPU µs per call by contender, its raw baseline): for the C
# client's table.
Measured = list[tuple[str, Table, dict[str, list[float]], str]]


class CClient:
    """The C client's GETs of one key over one connection, no pipelining
    (`redis-benchmark -c 1 -P 1`), a round per `round()`: its round trip per GET (its
    median latency, p50) and its CPU per GET (user + system of the child,
    from getrusage, less a start-up measured alone). `problem` says why there are
    no figures."""

    STARTS = 5  # runs of one GET, whose median CPU is the start-up's

    def __init__(self, url: str, gets: int) -> None:
        self.gets = gets
        self.key = "cached_aside:c-client:unset"  # the record's, once the run knows it
        self.round_trip_us: list[float] = []
        self.cpu_us: list[float] = []
        self.problem: str | None = None
        self.start_up_us = 0.0
        if shutil.which("redis-benchmark") is None:
            self.problem = "redis-benchmark is not installed (Debian's redis-tools has it)"
            return
        address = urlparse(url)
        self.command = ["redis-benchmark", "-h", address.hostname or "127.0.0.1"]
        self.command += ["-p", str(address.port or 6379), "-c", "1", "-P", "1", "--csv"]
        if address.username:
            self.command += ["--user", address.username]
        if address.password:
            self.command += ["-a", address.password]
        self.command += ["-n", "{gets}", "GET", "{key}"]
        starts = [self._run(1, start_up=True) for _ in range(self.STARTS)]
        if self.problem is None:
            self.start_up_us = statistics.median(cpu for _, cpu in starts)

    def _run(self, gets: int, start_up: bool = False) -> tuple[float, float]:
        """(median µs per GET, CPU µs of the whole run), or (0, 0) and `problem`
        set; a `start_up` run's µs per GET is 0 (of one GET, it may print none)."""
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
        # The median, not the mean (rps): on a busy machine a few calls that wait for
        # the CPU make the mean many times the median, as they would the Python calls'.
        found = [row for row in csv.DictReader(io.StringIO(done.stdout)) if row.get("rps")]
        if not found:
            self.problem = f"redis-benchmark printed no GET figure ({done.stderr.strip()[:200]})"
            return 0.0, 0.0
        return float(found[-1]["p50_latency_ms"]) * 1000, cpu * 1e6

    def round(self) -> None:
        """One round of `gets` GETs, its figures appended."""
        round_trip, cpu = self._run(self.gets)
        if self.problem is None:
            self.round_trip_us.append(round_trip)
            self.cpu_us.append(max(0.0, cpu - self.start_up_us) / self.gets)

    def figures(self) -> tuple[float, float] | str:
        """(median µs per GET, median CPU µs per GET) over the rounds, or why none."""
        if self.problem is not None:
            return self.problem
        if not self.round_trip_us:
            return "no round ran"
        return statistics.median(self.round_trip_us), statistics.median(self.cpu_us)

    def describe(self) -> str:
        return f"redis-benchmark -c 1 -P 1 -n {self.gets} GET (the msgpack record's key)"


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
                "C client (redis-benchmark)",
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
        f"contenders (sync and async); its µs per GET is the median of its requests' "
        f"latencies (redis-benchmark's p50, to 1 µs), median over "
        f"{len(c_client.round_trip_us)} rounds",
        "CPU per call: user + system time over a round's calls, median over rounds; "
        "this process's for the Python contenders (its other threads included), the "
        f"child's for the C client less its start-up ({c_client.start_up_us:.0f} µs, "
        "the median of runs of one GET)",
        "ratio to raw redis-py: to the raw call of the row's own mode (the C client's: "
        "to the sync one)",
    ]
    return table
