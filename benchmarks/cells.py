"""The hit path in four cells: Redis and Valkey, each with and without hiredis. Each
cell is a run of its own of the hit-path section (`python -m benchmarks --only
hit_path`, a subprocess, so that hiredis can be hidden before redis-py loads) against
a server of its own, the C client measured in that same run; the table gives each
cell's sync and async hit as ratios to that cell's C client and raw redis-py call.

    python -m benchmarks --only cells
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tests.servers import RedisProcess, _embedded

from . import NO_HIREDIS
from .hit_path import ASYNC_BARE, SYNC_BARE
from .placement import Placement, client_environment, pin_server, placements
from .runner import Settings, Table

ROOT = Path(__file__).resolve().parent.parent
TITLE = "hit path in four cells: server x parser, against the C client of each run"
AGAINST_C = "hit path against the C client (same run)"
SYNC_RAW = "sync: raw redis-py GET + unpackb"
ASYNC_RAW = "async: raw redis.asyncio GET + unpackb"
SYNC_HIT = "sync: cached_aside (msgpack)"
ASYNC_HIT = "async: cached_aside (msgpack)"
C_CLIENT = "C client"
# Issue 27's "done means", as ratios to the C client: (round trip, CPU per GET).
TARGETS = {"sync": (1.3, 1.5), "async": (1.5, 2.0)}
CELL_SECONDS = 1800  # a bound on a hang of one cell's run, not a speed


def servers() -> dict[str, str | None]:
    """Each server's binary, or None when it is not installed."""
    return {"Redis": shutil.which("redis-server"), "Valkey": _embedded("valkey-server")}


def run_cell(
    url: str, hiredis: bool, quick: bool, folder: Path, placement: Placement | None = None
) -> dict[str, Any]:
    """One hit-path run on `url`, hiredis hidden unless `hiredis`, pinned to the
    client CPUs of `placement` (the server's are pinned by the caller): its results."""
    results = folder / f"cell-{'hiredis' if hiredis else 'resp'}-{os.getpid()}.json"
    command = [sys.executable, "-m", "benchmarks", "--only", "hit_path", "--url", url]
    command += ["--json", str(results), *(["--quick"] if quick else [])]
    environ = {**os.environ, "PYTHONPATH": str(ROOT), NO_HIREDIS: "0" if hiredis else "1"}
    if placement is not None:
        environ.update(client_environment(placement))
    done = subprocess.run(
        command,
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=CELL_SECONDS,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the hit-path run failed:\n{(done.stdout + done.stderr)[-2000:]}")
    found: dict[str, Any] = json.loads(results.read_text())
    return found


def summary(found: dict[str, Any], placement: str = "not pinned") -> list[Any]:
    """A cell's row from its results file: the C client's round trip and CPU, then
    for sync and async the hit's µs, its ratios to the C client (round trip, CPU)
    and to the raw redis-py call of its mode, then the bare Python floors' ratios to
    the C client (round trip, CPU)."""
    about = found["environment"]
    parser = f"hiredis {about['hiredis']}" if about.get("hiredis") else "redis-py's parser"
    table = next(t for t in found["tables"] if t["title"] == AGAINST_C)
    rows = {row["contender"]: row for row in table["rows"]}
    c_client = rows.get(C_CLIENT)
    row: list[Any] = [f"{about['server']} {about['server_version']}, {parser}", placement]
    row += [c_client["median µs"], c_client["CPU µs per call"]] if c_client else ["-", "-"]
    for hit in (SYNC_HIT, ASYNC_HIT):
        ours = rows[hit]
        row += [
            ours["median µs"],
            ours["ratio to C client"],
            ours["CPU ratio to C client"],
            ours["ratio to raw redis-py"],
        ]
    for floor in (f"sync: {SYNC_BARE}", f"async: {ASYNC_BARE}"):
        bare = rows.get(floor)
        row += [bare["ratio to C client"], bare["CPU ratio to C client"]] if bare else ["-", "-"]
    return row


def verdicts(table: Table) -> list[str]:
    """Issue 27's targets judged on each cell's row: met or missed, by how much."""
    lines = []
    for row in table.rows:
        cell = f"{row[0]}, {row[1]}"
        for mode, first, floor in (("sync", 5, 12), ("async", 9, 14)):
            round_trip, cpu = row[first], row[first + 1]
            if not isinstance(round_trip, float) or not isinstance(cpu, float):
                lines.append(f"target: {cell}, {mode}: no C client figure to judge by")
                continue
            most_round_trip, most_cpu = TARGETS[mode]
            met = round_trip <= most_round_trip and cpu <= most_cpu
            bare_round_trip, bare_cpu = row[floor], row[floor + 1]
            below = ""
            if isinstance(bare_round_trip, float) and isinstance(bare_cpu, float):
                below = (
                    f" (the bare {mode} Python floor: {bare_round_trip:.2f}x, {bare_cpu:.2f}x"
                    + (
                        ", itself above the target"
                        if bare_round_trip > most_round_trip or bare_cpu > most_cpu
                        else ""
                    )
                    + ")"
                )
            lines.append(
                f"target: {cell}, {mode} hit <= {most_round_trip}x the C client's round "
                f"trip and <= {most_cpu}x its CPU: {round_trip:.2f}x, {cpu:.2f}x, "
                f"{'met' if met else 'missed'}{below}"
            )
    return lines


def run(settings: Settings) -> list[Table]:
    table = Table(
        TITLE,
        [
            "cell",
            "placement",
            "C client µs",
            "C client CPU µs",
            "sync hit µs",
            "sync ratio to C client",
            "sync CPU ratio to C client",
            "sync ratio to raw redis-py",
            "async hit µs",
            "async ratio to C client",
            "async CPU ratio to C client",
            "async ratio to raw redis-py",
            "bare sync ratio to C client",
            "bare sync CPU ratio to C client",
            "bare async ratio to C client",
            "bare async CPU ratio to C client",
        ],
    )
    with tempfile.TemporaryDirectory(prefix="cached_aside_cells_") as name:
        for server, binary in servers().items():
            if binary is None:
                table.notes.append(f"no {server} cells: its server binary is not installed")
                continue
            process = RedisProcess(binary=binary).start()
            try:
                for placement in placements() or [None]:
                    if placement is not None:
                        pin_server(process.process.pid, placement)
                    for hiredis in (True, False):
                        found = run_cell(
                            process.url, hiredis, settings.quick, Path(name), placement
                        )
                        where = placement.name if placement else "not pinned"
                        table.rows.append(summary(found, where))
            finally:
                process.stop()
    table.notes += [
        "each cell: a hit-path run of its own (`python -m benchmarks --only hit_path`) on a "
        "fresh server of its own, hiredis hidden (CACHED_ASIDE_BENCH_NO_HIREDIS=1) in the "
        "cells without it; medians over interleaved rounds, the C client (benchmarks/c_client.c) "
        "a round before each Python round",
        "ratios to the C client and to the raw redis-py call of the same mode, in the same "
        "cell's run; cells ran one after another, so compare ratios, not µs, across cells",
        "placement: the server and the cell's run (the C client, its child, too) pinned to "
        "one CPU, or to two (client on one, server on the other); on a VM a round trip "
        "across CPUs wakes an idle CPU for each reply and costs several times one within "
        "a CPU, so each placement is a cell of its own (benchmarks/placement.py)",
        "bare: the least Python spends on the same GET (benchmarks/bare.py): a blocking "
        "socket, or an asyncio Protocol with one future per call; what a contender spends "
        "above it is its own",
        *verdicts(table),
    ]
    return [table]
