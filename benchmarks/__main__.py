"""Run the benchmark suite: `python -m benchmarks [--quick] [--only NAME ...]`.

`--merge` updates an existing results file instead of replacing it: the tables of the
sections run replace that file's tables of the same sections (or titles), the others
stay, and the file's `runs` records, per section merged, the environment of the run
its tables came from (the top-level `environment` stays the base run's). To refresh
some sections of the reference without re-running the rest:

    python -m benchmarks --only typed tag_hits --json benchmarks/results/reference.json --merge

Prints a line as each section starts and ends and its progress meanwhile (live bars
on a terminal, plain lines in a log), a table per scenario, writes results.json, and
with --chart a PNG of the hit-path latency distributions, plus concurrency.png (hits/s
against tasks and threads) and fleet.png (hits/s and primary reads against processes,
the near-hit ratio around a listener outage) beside it (needs matplotlib, in the bench extra).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
import redis.utils

from . import (
    batches,
    cells,
    compression,
    concurrency,
    dead_holder,
    early_refresh,
    fleet,
    hit_path,
    near,
    outage,
    race,
    round_trips,
    stampede,
    tag_hits,
    thread_sharing,
    throughput,
    typed,
)
from .runner import BenchProgress, Settings, Table, console, show

SCENARIOS: dict[str, Callable[[Settings], list[Table]]] = {
    "hit_path": hit_path.run,
    "cells": cells.run,
    "round_trips": round_trips.run,
    "stampede": stampede.scenario,
    "throughput": throughput.run,
    "race": race.scenario,
    "batches": batches.run,
    "near": near.run,
    "concurrency": concurrency.run,
    "thread_sharing": thread_sharing.run,
    "compression": compression.run,
    "fleet": fleet.run,
    "typed": typed.run,
    "tag_hits": tag_hits.run,
    "dead_holder": dead_holder.run,
    "outage": outage.run,
    "early_refresh": early_refresh.run,
}


def chart(tables: list[Table], path: Path) -> bool:
    """Box plots of the latency distributions; False when no scenario measured any."""
    with_samples = [table for table in tables if table.samples]
    if not with_samples:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(
        len(with_samples), 1, figsize=(10, 3.2 * len(with_samples)), squeeze=False
    )
    for axis, table in zip(axes[:, 0], with_samples, strict=True):
        names = list(table.samples)
        data = [sorted(values)[: int(len(values) * 0.99)] for values in table.samples.values()]
        axis.boxplot(data, orientation="horizontal", showfliers=False)
        axis.set_yticks(range(1, len(names) + 1), names, fontsize=8)
        axis.set_title(table.title, fontsize=10, loc="left")
        axis.set_xlabel("µs per call (up to p99)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def write_charts(tables: list[Table], path: Path) -> list[Path]:
    """The hit-path chart at `path`, and beside it (same folder) concurrency.png and
    fleet.png, each only when its section ran; the paths written."""
    written = []
    path.parent.mkdir(parents=True, exist_ok=True)
    for target, draw in (
        (path, chart),
        (path.with_name("concurrency.png"), concurrency.chart),
        (path.with_name("fleet.png"), fleet.chart),
    ):
        if draw(tables, target):
            written.append(target)
    return written


def environment(url: str) -> dict[str, Any]:
    """What the figures depend on: the machine, the date, and the versions of Python,
    redis-py, hiredis, msgpack, msgspec, pydantic and the server, written beside the
    results."""
    server = redis.Redis.from_url(url).info("server")
    versions = {}
    for package in ("hiredis", "msgpack", "msgspec", "pydantic", "cached_aside"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    if not redis.utils.HIREDIS_AVAILABLE:  # installed, but hidden (benchmarks/__init__.py)
        versions["hiredis"] = None
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "node": platform.node(),
        "machine": platform.machine(),
        "cpu": cpu or platform.processor(),
        "cpus": os.cpu_count(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "redis_py": redis.__version__,
        **versions,
        "server": "Valkey" if "valkey_version" in server else "Redis",
        "server_version": server.get("valkey_version", server["redis_version"]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
    }


def merged(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`old` results with `new`'s sections in place of theirs: a table of `old` goes
    when its section (or, for files written before tables named theirs, its title) is
    among `new`'s; `runs` says which run each merged section's tables came from."""
    titles = {table["title"] for table in new["tables"]}
    kept = [
        table
        for table in old["tables"]
        if table.get("section") not in new["sections"] and table["title"] not in titles
    ]
    run = {name: new[name] for name in ("machine", "environment", "quick")}
    return {
        **old,
        "sections": [*old["sections"], *(n for n in new["sections"] if n not in old["sections"])],
        "runs": {**old.get("runs", {}), **dict.fromkeys(new["sections"], run)},
        "tables": kept + new["tables"],
    }


def run_sections(
    names: list[str], settings: Settings, progress: BenchProgress
) -> tuple[list[tuple[Table, str]], dict[str, str]]:
    """Each section in turn, its tables shown as it ends; a section that cannot run
    (no server of its own could start, a peer library failed) says so in one line,
    and the others still run: (every table with its section, {section: why it could
    not run})."""
    tables: list[tuple[Table, str]] = []
    failed: dict[str, str] = {}
    for number, name in enumerate(names, 1):
        try:
            with progress.section(f"{name} ({number} of {len(names)})"):
                results = SCENARIOS[name](settings)
        except Exception as exc:
            failed[name] = (f"{type(exc).__name__}: {exc}".splitlines() or [""])[0]
            progress.console.print(f"{name}: could not run: {failed[name]}", highlight=False)
            continue
        for table in results:
            show(progress.console, table)
        tables += [(table, name) for table in results]
    return tables, failed


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--quick", action="store_true", help="small counts: about a minute")
    parser.add_argument("--only", nargs="*", choices=sorted(SCENARIOS), help="scenarios to run")
    parser.add_argument("--json", type=Path, default=Path("results.json"))
    parser.add_argument(
        "--merge",
        action="store_true",
        help="update the --json file: replace only the tables of the sections run, and "
        "record this run's environment for them (see above)",
    )
    parser.add_argument(
        "--chart",
        type=Path,
        default=None,
        help="write the hit-path PNG chart here, and concurrency.png and fleet.png beside "
        "it (for the sections that ran)",
    )
    args = parser.parse_args()
    out = console()
    about = environment(args.url)
    machine = (
        f"{about['node']}: {about['machine']}, Python {about['python']}, "
        f"redis-py {about['redis_py']}, {about['server']} {about['server_version']}"
    )
    out.print(f"[bold]cached_aside benchmarks[/bold] on {args.url} ({machine})")
    names = args.only or list(SCENARIOS)
    started = time.monotonic()
    with BenchProgress(out) as progress:
        settings = Settings(
            url=args.url,
            quick=args.quick,
            progress=progress,
            rounds=8 if args.quick else 30,
            calls=100 if args.quick else 200,
        )
        ran, failed = run_sections(names, settings, progress)
    written = {
        "machine": machine,
        "environment": about,
        "quick": args.quick,
        "sections": [name for name in names if name not in failed],
        "tables": [{**table.as_dict(), "section": name} for table, name in ran],
        "failed": failed,
    }
    if args.merge and args.json.exists():
        written = merged(json.loads(args.json.read_text()), written)
    args.json.write_text(json.dumps(written, indent=2) + "\n")
    out.print(
        f"all {len(names)} section(s) in {time.monotonic() - started:.0f} s; results: {args.json}"
    )
    if args.chart:
        for path in write_charts([table for table, _ in ran], args.chart):
            out.print(f"chart: {path}")
    if failed:
        raise SystemExit(f"{len(failed)} section(s) could not run: {', '.join(failed)}")


if __name__ == "__main__":
    main()
