"""Instructions per operation, counted by callgrind: a cost meter a shared machine's
load cannot move. Each operation runs COUNT and twice COUNT times in fresh processes
(benchmarks/operations.py); the difference over COUNT is its cost, so start-up,
imports and set-up cancel. Only the calling thread is counted.

    python -m benchmarks.instructions            # measure and print
    python -m benchmarks.instructions --check    # fail on a rise over the committed figures
    python -m benchmarks.instructions --record   # write the committed figures
    python -m benchmarks.instructions --source /path/to/checkout --json base.json

The check fails when an operation costs more than MARGIN (5%) above
benchmarks/results/instructions.json. Counts hold only for the versions they were
recorded with: when Python, redis-py, hiredis, msgpack, msgspec, valgrind or the CPU
differ, the check names each difference loudly and compares with MISMATCH_MARGIN
(25%) instead, catching only a gross rise; re-record on that environment to get the
5% check back.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKER = HERE / "operations.py"
RECORDED = HERE / "results" / "instructions.json"
REFERENCE = HERE / "results" / "reference.json"
SECTION = "instructions"
TITLE = "instructions per operation (callgrind)"
MARGIN = 0.05
BATCH_SIZE = 100  # operations.py's BATCH: keys per many() call
MISMATCH_MARGIN = 0.25
# What instruction counts depend on: a difference in any widens the check's margin.
VERSIONS = (
    "python",
    "python_build",
    "redis_py",
    "hiredis",
    "msgpack",
    "msgspec",
    "valgrind",
    "machine",
    "cpu",
)


@dataclass(frozen=True)
class Operation:
    name: str  # benchmarks/operations.py's name for it
    label: str
    count: int  # calls in the smaller run: enough that they outweigh start-up's jitter


OPERATIONS = [
    Operation("sync_hit", "sync hit, msgpack record", 2000),
    Operation("async_hit", "async hit, msgpack record", 600),
    # The same on uvloop's event loop (the bench extra): what the loop itself costs.
    Operation("async_hit_uvloop", "async hit on uvloop, msgpack record", 600),
    Operation("miss", "miss (loader returns at once)", 200),
    Operation("many_hits", "many() of 100, all hits", 25),
    Operation("async_many_hits", "async many() of 100, all hits", 25),
    Operation("near_hit", "near hit", 10000),
    # The near hit's yardstick (issue 27: within 1.2x of cachetools' TTLCache).
    Operation("ttl_cache_item", "cachetools TTLCache cache[key] hit", 10000),
    Operation("ttl_cache_cached", "cachetools @cached(TTLCache) hit", 10000),
]


def totals(text: str) -> int:
    """The instructions a callgrind output file counted (its `totals:` line)."""
    for line in text.splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    raise ValueError("no totals: or summary: line in the callgrind output")


def per_operation(small: int, large: int, count: int) -> float:
    """Instructions per call: the larger run made `count` more calls than the smaller,
    in the same set-up, so what they share cancels."""
    if large <= small:
        raise ValueError(f"the run with {count} more calls counted no more ({small} >= {large})")
    return (large - small) / count


def differences(recorded: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{name: (recorded, now)} for each of VERSIONS that differs."""
    return {
        name: (recorded.get(name), current.get(name))
        for name in VERSIONS
        if recorded.get(name) != current.get(name)
    }


@dataclass(frozen=True)
class Verdict:
    ok: bool
    lines: list[str]


def check(recorded: dict[str, Any], measured: dict[str, Any]) -> Verdict:
    """Each operation measured against its recorded figure: a rise over the margin
    fails; a drop over it says to re-record, so the gain is kept."""
    changed = differences(recorded["environment"], measured["environment"])
    margin = MISMATCH_MARGIN if changed else MARGIN
    lines = []
    if changed:
        lines.append(
            f"WARNING: not the environment the figures were recorded with; comparing with a "
            f"{margin:.0%} margin instead of {MARGIN:.0%} (re-record here with --record):"
        )
        lines += [
            f"WARNING:   {name}: recorded {old!r}, now {new!r}"
            for name, (old, new) in changed.items()
        ]
    ok = True
    for name, now in measured["operations"].items():
        then = recorded["operations"].get(name)
        if then is None:
            lines.append(f"{name}: {now['per_operation']:,.0f}, no recorded figure (--record)")
            continue
        change = now["per_operation"] / then["per_operation"] - 1
        verdict = "ok"
        if change > margin:
            ok, verdict = False, f"FAILED: over {margin:.0%}"
        elif change < -margin:
            verdict = "fell: re-record (--record) to keep the gain"
        lines.append(
            f"{name}: {now['per_operation']:,.0f} instructions, recorded "
            f"{then['per_operation']:,.0f} ({change:+.2%}): {verdict}"
        )
    return Verdict(ok, lines)


def table(measured: dict[str, Any]) -> dict[str, Any]:
    """The figures as a results-file table (benchmarks/figures.py renders it)."""
    source = measured["source"]
    return {
        "title": TITLE,
        "section": SECTION,
        "rows": [
            {
                "operation": figure["label"],
                "instructions per call": round(figure["per_operation"]),
                "calls counted": figure["count"],
            }
            for figure in measured["operations"].values()
        ],
        "notes": [
            "valgrind --tool=callgrind, the calling thread only; (instructions of 2N calls - "
            "those of N calls) / N, each run a fresh process, so start-up cancels",
            f"cached_aside at {source['commit'] or 'an unknown commit'}"
            + (" with uncommitted changes" if source["dirty"] else ""),
            *comparisons(measured["operations"]),
        ],
    }


def comparisons(operations: dict[str, Any]) -> list[str]:
    """Issue 27's item 4 in instructions: many() of 100 against 100 sync hits, the
    near hit against cachetools' TTLCache (both ways of reading one)."""
    cost = {name: figure["per_operation"] for name, figure in operations.items()}
    lines = []
    for many, hit, kind in (
        ("many_hits", "sync_hit", "sync"),
        ("async_many_hits", "async_hit", "async"),
    ):
        if many in cost and hit in cost:
            ratio = cost[many] / (BATCH_SIZE * cost[hit])
            lines.append(
                f"{kind} many() of {BATCH_SIZE}: {ratio:.3f}x the instructions of "
                f"{BATCH_SIZE} {kind} hits"
            )
    for peer in ("ttl_cache_item", "ttl_cache_cached"):
        if "near_hit" in cost and peer in cost:
            label = next(o.label for o in OPERATIONS if o.name == peer)
            lines.append(
                f"near hit: {cost['near_hit'] / cost[peer]:.2f}x the instructions of a {label}"
            )
    return lines


def _version(command: list[str]) -> str | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except OSError:
        return None
    return done.stdout.strip() or None


def environment(url: str, source: Path) -> dict[str, Any]:
    """The benchmark suite's environment record plus what counts depend on."""
    from .__main__ import environment as suite_environment

    about = suite_environment(url)
    about.pop("cached_aside", None)  # the measured checkout is `source`, not the install
    return {
        **about,
        "python_build": f"{platform.python_implementation()} {sys.version}",
        "valgrind": _version(["valgrind", "--version"]),
    }


def describe(source: Path) -> dict[str, Any]:
    """Which code was measured: the checkout's commit and whether it had changes."""
    commit = _version(["git", "-C", str(source), "rev-parse", "--short", "HEAD"])
    status = _version(["git", "-C", str(source), "status", "--porcelain", "--", "cached_aside"])
    return {"path": str(source), "commit": commit, "dirty": bool(status)}


@contextmanager
def server(url: str | None) -> Iterator[str]:
    """`url`, or a redis-server of the meter's own on a free port."""
    if url is not None:
        yield url
        return
    from tests.servers import RedisProcess

    process = RedisProcess().start()
    try:
        yield process.url
    finally:
        process.stop()


def run_worker(
    operation: str, count: int, url: str, source: Path, folder: Path, valgrind: bool
) -> tuple[int, int, dict[str, Any]]:
    """One run of the worker: (instructions of its main thread, of its other threads,
    what it reported)."""
    prefix = f"meter-{uuid.uuid4().hex[:12]}"  # one length: the keys cost the same
    output = folder / f"{operation}-{count}-{prefix}"
    # runpy, from a folder of no modules: the script's own folder (benchmarks/) must
    # not be first on sys.path, and PYTHONPATH must decide which cached_aside runs.
    python = [
        sys.executable,
        "-c",
        "import runpy, sys; sys.argv = sys.argv[1:]; "
        "runpy.run_path(sys.argv[0], run_name='__main__')",
        str(WORKER),
        operation,
        str(count),
        url,
        prefix,
    ]
    command = python
    if valgrind:
        command = [
            "valgrind",
            "--tool=callgrind",
            "--separate-threads=yes",
            f"--callgrind-out-file={output}",
            *python,
        ]
    environ = {**os.environ, "PYTHONPATH": str(source), "PYTHONHASHSEED": "0"}
    done = subprocess.run(
        command, capture_output=True, text=True, cwd=folder, env=environ, timeout=900, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{operation} ({count} calls) failed:\n{done.stderr[-3000:]}")
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if not valgrind:
        return 0, 0, report
    # One file per thread (NAME-01 the main one), and an empty NAME.
    files = sorted(folder.glob(f"{output.name}-[0-9][0-9]"))
    main = [path for path in files if path.name.endswith("-01")]
    if len(main) != 1:
        raise RuntimeError(f"callgrind wrote {[p.name for p in files]}, no one main thread file")
    counts = {path: totals(path.read_text()) for path in files}
    for path in folder.glob(f"{output.name}*"):
        path.unlink()
    return counts[main[0]], sum(counts.values()) - counts[main[0]], report


def expected_loads(operation: str, calls: int) -> int:
    """Loader calls a run of `calls` must make, warm-up included: a hit that loaded
    would be a miss counted as a hit."""
    from .operations import BATCH, WARM_UP

    return {"miss": WARM_UP + calls, "many_hits": BATCH, "async_many_hits": BATCH}.get(operation, 1)


def measure(
    url: str, source: Path, names: list[str], jobs: int, scale: float = 1.0
) -> dict[str, Any]:
    """Every operation in `names`, its two runs side by side on `jobs` processes."""
    chosen = [operation for operation in OPERATIONS if operation.name in names]
    with tempfile.TemporaryDirectory(prefix="cached_aside_meter_") as name:
        folder = Path(name)
        for operation in chosen:  # natively once: fails fast, and writes the .pyc files
            run_worker(operation.name, 1, url, source, folder, valgrind=False)
        runs = [
            (operation, factor * max(1, round(operation.count * scale)))
            for operation in chosen
            for factor in (1, 2)
        ]
        with ThreadPoolExecutor(max(1, jobs)) as pool:
            results = list(
                pool.map(
                    lambda run: run_worker(run[0].name, run[1], url, source, folder, True), runs
                )
            )
    figures = {}
    for index, operation in enumerate(chosen):
        (_, calls), (_, more_calls) = runs[2 * index : 2 * index + 2]
        small, large = results[2 * index : 2 * index + 2]
        for ran, (_, _, report) in ((calls, small), (more_calls, large)):
            wanted = expected_loads(operation.name, ran)
            if report["loads"] != wanted:
                raise RuntimeError(f"{operation.name}: {report['loads']} loads, not {wanted}")
            if not Path(report["cached_aside"]).is_relative_to(source):
                raise RuntimeError(f"measured {report['cached_aside']}, not {source}'s code")
        count = more_calls - calls
        figures[operation.name] = {
            "label": operation.label,
            "count": count,
            "instructions": [small[0], large[0]],
            "per_operation": per_operation(small[0], large[0], count),
            "other_threads_per_operation": (large[1] - small[1]) / count,
            "cached_aside": large[2]["cached_aside"],
        }
    return {
        "environment": environment(url, source),
        "source": describe(source),
        "operations": figures,
    }


def show(measured: dict[str, Any]) -> None:
    source = measured["source"]
    print(
        f"cached_aside from {source['path']} at {source['commit']}"
        + (" (changed)" if source["dirty"] else "")
    )
    for name, figure in measured["operations"].items():
        print(
            f"  {name:10} {figure['per_operation']:>12,.0f} instructions per call "
            f"({figure['count']} calls; other threads {figure['other_threads_per_operation']:,.0f})"
        )


def record(measured: dict[str, Any], reference: Path = REFERENCE) -> None:
    """The committed figures, and their table in the results file the docs render."""
    from .__main__ import merged

    RECORDED.write_text(json.dumps(measured, indent=2) + "\n")
    about = measured["environment"]
    run = {
        "machine": f"{about['node']}: {about['machine']}, Python {about['python']}, "
        f"redis-py {about['redis_py']}, {about['valgrind']}",
        "environment": about,
        "quick": False,
        "sections": [SECTION],
        "tables": [table(measured)],
    }
    reference.write_text(
        json.dumps(merged(json.loads(reference.read_text()), run), indent=2) + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.instructions",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--check", action="store_true", help=f"fail on a rise over {RECORDED.name}")
    action.add_argument(
        "--record",
        action="store_true",
        help=f"write {RECORDED.name} and its table in reference.json",
    )
    parser.add_argument(
        "--source", type=Path, default=ROOT, help="the checkout whose cached_aside to measure"
    )
    parser.add_argument("--url", default=None, help="a server to use (default: one of its own)")
    parser.add_argument("--only", nargs="*", choices=[o.name for o in OPERATIONS], default=None)
    parser.add_argument("--jobs", type=int, default=2, help="valgrind runs at a time")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (Debian: apt-get install valgrind)")
    names = args.only or [operation.name for operation in OPERATIONS]
    with server(args.url) as url:
        measured = measure(url, args.source.resolve(), names, args.jobs)
    show(measured)
    if args.json:
        args.json.write_text(json.dumps(measured, indent=2) + "\n")
    if args.record:
        record(measured)
        print(f"recorded: {RECORDED} and the {SECTION!r} section of {REFERENCE}")
    if args.check:
        verdict = check(json.loads(RECORDED.read_text()), measured)
        print("\n".join(verdict.lines))
        if not verdict.ok:
            raise SystemExit(f"instructions per call rose over the committed figures ({RECORDED})")


if __name__ == "__main__":
    main()
