"""Run the benchmark suite: `python -m benchmarks [--quick] [--only NAME ...]`.

Prints a line as each section starts and ends and its progress meanwhile (live bars
on a terminal, plain lines in a log), a table per scenario, writes results.json, and
with --chart a PNG of the hit-path latency distributions, plus concurrency.png (hits/s
against tasks and threads) and fleet.png (hits/s and primary reads against processes)
beside it (needs matplotlib, in the bench extra).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import redis

from . import (
    batches,
    compression,
    concurrency,
    fleet,
    hit_path,
    near,
    race,
    round_trips,
    stampede,
    thread_sharing,
    throughput,
)
from .runner import BenchProgress, Settings, Table, console, show

SCENARIOS: dict[str, Callable[[Settings], list[Table]]] = {
    "hit_path": hit_path.run,
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


def run_sections(
    names: list[str], settings: Settings, progress: BenchProgress
) -> tuple[list[Table], dict[str, str]]:
    """Each section in turn, its tables shown as it ends; a section that cannot run
    (no server of its own could start, a peer library failed) says so in one line,
    and the others still run: (every table, {section: why it could not run})."""
    tables: list[Table] = []
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
        tables += results
    return tables, failed


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--quick", action="store_true", help="small counts: about a minute")
    parser.add_argument("--only", nargs="*", choices=sorted(SCENARIOS), help="scenarios to run")
    parser.add_argument("--json", type=Path, default=Path("results.json"))
    parser.add_argument(
        "--chart",
        type=Path,
        default=None,
        help="write the hit-path PNG chart here, and concurrency.png and fleet.png beside "
        "it (for the sections that ran)",
    )
    args = parser.parse_args()
    out = console()
    server = redis.Redis.from_url(args.url).info("server")
    machine = (
        f"{platform.node()}: {platform.machine()}, Python {platform.python_version()}, "
        f"redis-py {redis.__version__}, Redis {server['redis_version']}"
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
        tables, failed = run_sections(names, settings, progress)
    args.json.write_text(
        json.dumps(
            {
                "machine": machine,
                "quick": args.quick,
                "tables": [t.as_dict() for t in tables],
                "failed": failed,
            },
            indent=2,
        )
    )
    out.print(
        f"all {len(names)} section(s) in {time.monotonic() - started:.0f} s; results: {args.json}"
    )
    if args.chart:
        for path in write_charts(tables, args.chart):
            out.print(f"chart: {path}")
    if failed:
        raise SystemExit(f"{len(failed)} section(s) could not run: {', '.join(failed)}")


if __name__ == "__main__":
    main()
