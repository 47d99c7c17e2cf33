"""Every benchmark scenario in its quickest form, so the suite cannot rot. Asserts
structure and counts (one load, one round trip per hit), never timings."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.utils

from benchmarks import __main__ as bench_main
from benchmarks import (
    batches,
    c_client,
    cells,
    compression,
    concurrency,
    fleet,
    fleet_tracking,
    fleet_worker,
    hit_path,
    near,
    race,
    round_trips,
    stampede,
    thread_sharing,
    throughput,
    typed,
)
from benchmarks.__main__ import write_charts
from benchmarks.placement import placements
from benchmarks.runner import BenchProgress, Settings, Table, console

from .conftest import REDIS_URL

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(REDIS_URL is None, reason="the benchmarks measure a real Redis server"),
]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def settings() -> Settings:
    assert REDIS_URL is not None
    # Timed runs of a tenth of a second: a call starts in each, which is all the
    # structure asserted here needs (a call begun before its deadline is counted).
    return Settings(url=REDIS_URL, quick=True, rounds=2, calls=20, seconds=0.1)


def rows(table: Table) -> dict[str, list[Any]]:
    return {row[0]: row[1:] for row in table.rows}


# aiocache 0.12 calls redis-py methods deprecated since redis 5 (setex, close).
@pytest.mark.filterwarnings("ignore:Call to deprecated:DeprecationWarning")
def test_hit_path_has_every_contender(settings: Settings) -> None:
    tables = {t.title: t for t in hit_path.run(settings)}
    against_c = tables.pop("hit path against the C client (same run)")
    packed = rows(tables["sync hit, msgpack record"])
    assert packed["raw redis-py GET + unpackb"][2] == 1.0  # the baseline's ratio
    # The figure says which path it measured: the held connection, every call.
    assert any(
        note.startswith("hot path: held connection, every call")
        for note in tables["sync hit, msgpack record"].notes
    ), tables["sync hit, msgpack record"].notes
    assert {
        "cached_aside (msgpack)",
        "dogpile.cache (redis backend)",
        "cachetools TTLCache (in process)",
        "functools.lru_cache (in process)",
    } <= set(packed)
    async_packed = rows(tables["async hit, msgpack record"])
    assert {"cached_aside (msgpack)", "cashews (redis)", "aiocache (redis)"} <= set(async_packed)
    assert "cached_aside (as_hash=True)" in rows(tables["async hit, hash record (8 fields)"])
    for table in tables.values():
        assert all(median > 0 and p99 >= median for median, p99, _ in rows(table).values())
        # Every table judges cached_aside against its target, in this run's figures.
        (target,) = [note for note in table.notes if note.startswith("target: cached_aside")]
        assert target.endswith((", met", ", missed"))
    floors = [note for t in tables.values() for note in t.notes if note.startswith("floor: C")]
    assert len(floors) == 2  # sync and async msgpack: a figure, or why there is none
    if shutil.which("cc") or shutil.which("redis-benchmark"):
        assert all(" µs per GET, median of its " in note for note in floors)
    # Every msgpack contender, sync and async, against the C client of the same run,
    # with its CPU per call; the C client's row when it ran.
    versus = rows(against_c)
    assert {f"sync: {name}" for name in packed} | {
        f"async: {name}" for name in async_packed
    } == set(versus) - {"C client"}
    assert versus["sync: raw redis-py GET + unpackb"][2] == 1.0  # to its own mode's raw call
    assert versus["async: raw redis.asyncio GET + unpackb"][2] == 1.0
    assert all(row[3] > 0 for row in versus.values())  # CPU per call
    if shutil.which("cc") or shutil.which("redis-benchmark"):
        c_client = versus["C client"]
        assert c_client[0] > 0
        assert c_client[3] > 0
        assert c_client[1] == c_client[4] == 1.0
        # One C round before each Python round, sync and async: 2 x settings.rounds.
        assert f"median over {2 * settings.rounds} rounds" in against_c.notes[0]
        assert all(isinstance(row[1], float) for row in versus.values())


def test_the_c_client_times_each_get_and_falls_back_to_redis_benchmark(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert REDIS_URL is not None
    key = f"bench-test-{uuid.uuid4().hex[:8]}:c-client"
    writer = redis.Redis.from_url(REDIS_URL)
    writer.set(key, b"x" * 100, ex=60)
    try:
        compiled = c_client.CClient(REDIS_URL, 200)
        compiled.key = key
        compiled.round()
        assert compiled.binary is not None  # this machine has a C compiler
        round_trip, cpu = compiled.figures()  # type: ignore[misc]
        assert round_trip > 0
        assert cpu > 0
        assert "benchmarks/c_client.c" in compiled.describe()
        assert "CLOCK_MONOTONIC" in compiled.how_measured()
        compiled.close()
        monkeypatch.setattr(c_client, "compiled", lambda folder: None)  # no compiler
        fallback = c_client.CClient(REDIS_URL, 200)
        fallback.key = key
        fallback.round()
        assert fallback.problem is None
        assert fallback.figures()[0] > 0  # type: ignore[index]
        assert "redis-benchmark" in fallback.describe()
        assert "several µs wide" in fallback.how_measured()  # its p50 is coarse: said
        fallback.close()
    finally:
        writer.delete(key)
        writer.close()


def _cell_results(hiredis: str | None) -> dict[str, Any]:
    """A hit-path results file as a cell's run writes it, figures chosen."""
    figures = {
        cells.C_CLIENT: (20.0, 1.0, 0.4, 10.0, 1.0),
        cells.SYNC_HIT: (25.0, 1.25, 0.5, 14.0, 1.4),
        cells.ASYNC_HIT: (32.0, 1.6, 0.7, 19.0, 1.9),
        f"sync: {cells.SYNC_BARE}": (22.0, 1.1, 0.4, 9.0, 0.9),
        f"async: {cells.ASYNC_BARE}": (34.0, 1.7, 0.6, 21.0, 2.1),
    }
    columns = (
        "median µs",
        "ratio to C client",
        "ratio to raw redis-py",
        "CPU µs per call",
        "CPU ratio to C client",
    )
    rows = [
        {"contender": name, **dict(zip(columns, row, strict=True))} for name, row in figures.items()
    ]
    return {
        "environment": {"server": "Valkey", "server_version": "8.1.8", "hiredis": hiredis},
        "tables": [{"title": cells.AGAINST_C, "rows": rows, "notes": []}],
    }


def test_a_cell_is_judged_against_the_c_client_of_its_own_run() -> None:
    row = cells.summary(_cell_results(None), "one CPU")
    assert row[:4] == ["Valkey 8.1.8, redis-py's parser", "one CPU", 20.0, 10.0]
    assert row[4:12] == [25.0, 1.25, 1.4, 0.5, 32.0, 1.6, 1.9, 0.7]
    assert row[12:] == [1.1, 0.9, 1.7, 2.1]  # the bare floors, sync then async
    assert cells.summary(_cell_results("3.5.0"))[:2] == [
        "Valkey 8.1.8, hiredis 3.5.0",
        "not pinned",
    ]
    table = Table(cells.TITLE, [], rows=[row])
    # Sync within 1.3x round trip and 1.5x CPU; async within 1.5x and 2x: 1.6x misses,
    # and the bare asyncio floor (1.7x, 2.1x) is itself above the target.
    assert cells.verdicts(table) == [
        "target: Valkey 8.1.8, redis-py's parser, one CPU, sync hit <= 1.3x the C client's "
        "round trip and <= 1.5x its CPU: 1.25x, 1.40x, met (the bare sync Python floor: "
        "1.10x, 0.90x)",
        "target: Valkey 8.1.8, redis-py's parser, one CPU, async hit <= 1.5x the C client's "
        "round trip and <= 2.0x its CPU: 1.60x, 1.90x, missed (the bare async Python floor: "
        "1.70x, 2.10x, itself above the target)",
    ]


@pytest.mark.filterwarnings("ignore:Call to deprecated:DeprecationWarning")
def test_a_cell_without_hiredis_runs_the_hit_path_on_redis_pys_parser(tmp_path: Path) -> None:
    assert REDIS_URL is not None
    placement = placements()[0]  # client and server on one CPU
    found = cells.run_cell(
        REDIS_URL, hiredis=False, quick=True, folder=tmp_path, placement=placement
    )
    assert found["environment"]["hiredis"] is None  # hidden, though installed here
    (against_c,) = [table for table in found["tables"] if table["title"] == cells.AGAINST_C]
    cpu = min(placement.client)
    assert f"placement: this process and its C client pinned to CPU {cpu}" in against_c["notes"]
    row = cells.summary(found)
    assert row[0].endswith(", redis-py's parser")
    assert all(isinstance(cell, float) and cell > 0 for cell in row[4:])
    notes = [note for table in found["tables"] for note in table["notes"]]
    assert "hot path: held connection, every call (redis-py " + redis.__version__ + ")" in notes


def test_hiding_hiredis_makes_redis_py_use_its_own_parser() -> None:
    probe = "import benchmarks, redis.utils; print(redis.utils.HIREDIS_AVAILABLE)"
    for hidden, expected in (("1", "False"), ("0", str(redis.utils.HIREDIS_AVAILABLE))):
        done = subprocess.run(
            [sys.executable, "-c", probe],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), "CACHED_ASIDE_BENCH_NO_HIREDIS": hidden},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert done.stdout.strip() == expected


def test_round_trips_per_operation(settings: Settings) -> None:
    commands, memory = round_trips.run(settings)
    sent = {name: row[0] for name, row in rows(commands).items()}
    assert sent["hit, msgpack"] == sent["hit, hash"] == sent["negative hit"] == 1
    assert sent["cold miss, msgpack"] == sent["cold miss, hash"] == 3
    assert sent["invalidate"] == sent["update_field"] == sent["hit, refresh_ahead"] == 1
    assert sent["many() of 100, cold, batch_loader"] == 3
    assert sent["many() of 100, all hits"] == sent["invalidate_many() of 100"] == 1
    assert sent["invalidate_all(), 100 entries"] == 2  # one SCAN page, one UNLINK pipeline
    assert rows(commands)["hit, msgpack"][1] == "get 1"
    assert all(row[0] > 0 for row in rows(memory).values())


def test_stampede_loads_once(settings: Settings) -> None:
    (table,) = stampede.scenario(settings)
    assert [row[0] for row in rows(table).values()] == ["1", "1", "1"]


def test_throughput_counts_both_contenders(settings: Settings) -> None:
    (table,) = throughput.run(settings)
    assert all(one > 0 and two > 0 for one, two, _ in rows(table).values())


def test_batches_compare_many_with_sequential_calls(settings: Settings) -> None:
    assert REDIS_URL is not None
    tables = batches.many_vs_sequential(settings, REDIS_URL, "one Redis")
    assert [set(rows(table)) for table in tables] == [
        {"100 sequential calls", "many() of 100"},
        {"100 sequential awaits", "await many() of 100"},
    ]
    for table in tables:  # issue 27's target, judged in each table
        (target,) = [note for note in table.notes if note.startswith("target: many() of 100")]
        assert re.search(r": \d+\.\d{3}, (met|missed by \d+\.\d\dx)$", target), target
    entries, _, _, per_second, *pings = batches.invalidate_all_timing(REDIS_URL, 1500)
    assert entries == 1500  # invalidate_all deleted every one (asserted inside too)
    assert per_second > 0
    assert all(ping > 0 for ping in pings)


def test_near_cache_scenario_measures_hits_and_propagation(settings: Settings) -> None:
    assert REDIS_URL is not None
    table = near.near_hit(settings)
    hits = rows(table)
    assert {near.CACHED_TTL, near.ITEM_TTL, near.NEAR} <= set(hits)
    # Issue 27's target, judged against both ways of reading a TTLCache.
    targets = [note for note in table.notes if note.startswith("target: near hit <= 1.2x")]
    assert [note.split(": ")[1] for note in targets] == [
        f"near hit <= 1.2x {near.CACHED_TTL}",
        f"near hit <= 1.2x {near.ITEM_TTL}",
    ]
    assert all(note.endswith((", met", ", missed")) for note in targets)
    (spread,) = near.propagation(REDIS_URL, changes=5).rows
    assert spread[0] == 5  # every change reached the other process (asserted per change)
    assert spread[4] > 0  # which was answering from its near cache in between


def test_race_finds_stale_reads_only_in_the_plain_algorithm(settings: Settings) -> None:
    (table,) = race.scenario(settings, reads=300)
    stale = {name: row[2] for name, row in rows(table).items()}
    plain = next(name for name in stale if name.startswith("plain"))
    assert all(count == 0 for name, count in stale.items() if name != plain)


@pytest.mark.filterwarnings("ignore:Call to deprecated:DeprecationWarning")
def test_the_runner_writes_results_and_a_chart(tmp_path: Path) -> None:
    assert REDIS_URL is not None
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--only",
            "hit_path",
            "round_trips",
            "--url",
            REDIS_URL,
            "--json",
            str(tmp_path / "results.json"),
            "--chart",
            str(tmp_path / "c.png"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert "round trips per operation" in completed.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    titles = [table["title"] for table in results["tables"]]
    assert titles[0] == "sync hit, msgpack record"
    assert "round trips per operation" in titles
    assert (tmp_path / "c.png").stat().st_size > 10_000
    # Where and with what: the figures the docs quote are only true with these.
    about = results["environment"]
    assert about["redis_py"] == redis.__version__
    assert about["python"] == platform.python_version()
    assert about["server"] in ("Redis", "Valkey")
    assert about["server_version"]
    assert {"hiredis", "msgpack", "cpu", "cpus", "date"} <= set(about)


@pytest.mark.filterwarnings("ignore:Call to deprecated:DeprecationWarning")
def test_concurrency_measures_every_contender_and_draws(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(concurrency, "QUICK_TASKS", (1, 200, 500))  # the targets' levels
    tables = concurrency.run(settings)
    distinct, hot, threads = tables
    makers, _ = concurrency.contenders()
    for table in (distinct, hot):
        assert sorted((row[0], row[1]) for row in table.rows) == sorted(
            (name, tasks) for name in makers for tasks in (1, 200, 500)
        )
        for name, tasks, hits, p50, p99, connections, errors, _ in table.rows:
            assert hits > 0, (name, tasks)  # every contender served hits at every level
            assert 0 < p50 <= p99
            if name == concurrency.CACHED:
                assert errors == 0
                assert 1 <= connections <= 2  # one shared connection per loop
            if name == concurrency.RAW_BLOCKING:
                assert errors == 0
                assert connections <= 50  # its bound
    # Judged at both ratios: the first issue's 4x and issue 27's 8x.
    targets = [note for note in distinct.notes if note.startswith("target: 200 tasks")]
    assert [note.split(": ")[2].split(" the")[0] for note in targets] == [">= 4x", ">= 8x"]
    assert (
        "target: 500 tasks never see MaxConnectionsError: cached_aside 0 error(s) "
        "(distinct and hot key), met"
    ) in distinct.notes
    assert sorted((row[0], row[1]) for row in threads.rows) == sorted(
        (name, n) for name in (concurrency.RAW_SYNC, concurrency.CACHED) for n in (1, 8, 32)
    )
    for name, n, hits, _, _, connections, errors, _ in threads.rows:
        assert hits > 0
        assert errors == 0
        assert 1 <= connections <= n + 1, (name, n)  # a connection per thread at most
    # The runner's charts: the hit-path chart needs samples, concurrency.png its curves.
    written = write_charts(tables, tmp_path / "charts" / "hit_path.png")
    assert written == [tmp_path / "charts" / "concurrency.png"]
    assert written[0].stat().st_size > 10_000


def test_thread_sharing_reports_a_verdict(settings: Settings) -> None:
    table, lone = thread_sharing.run(settings)
    names = {
        thread_sharing.RAW,
        thread_sharing.CACHED,
        thread_sharing.SHARED,
        thread_sharing.TWIN,
        thread_sharing.PATCHED,
    }
    assert sorted((row[0], row[1]) for row in table.rows) == sorted(
        (name, n) for name in names for n in thread_sharing.THREADS
    )
    assert all(row[2] > 0 and row[5] == 0 for row in table.rows)  # hits, no errors
    assert set(rows(lone)) == names
    assert rows(lone)[thread_sharing.CACHED][2] == 1.0
    (adopt,) = [note for note in table.notes if note.startswith("adopt: ")]
    assert re.fullmatch(
        r"adopt: (yes|no) \(\d+\.\d\d× at 32 threads, lone-thread latency [+-]\d+\.\d%\)",  # noqa: RUF001
        adopt,
    )


def test_compression_compares_bytes_and_hits(settings: Settings) -> None:
    (table,) = compression.run(settings)
    sizes = {row[0]: row[4] for row in table.rows}
    plain, packed = sizes["plain msgpack"], sizes["compress_over=1024 (zlib)"]
    assert plain > 19_000
    assert packed < plain / 5


def test_fleet_runs_processes_without_stale_reads_or_errors() -> None:
    server = fleet.RedisProcess().start()
    try:
        total = fleet.one_run(server.url, [server.url], 2, 2, 0.5)
    finally:
        server.stop()
    assert total["reads"] > 0
    assert total["writes"] > 0
    assert (total["stale"], total["errors"]) == (0, 0)
    assert total["loads"] <= 2 * total["writes"] + 10  # warm: loads follow the writes
    assert total["commands"] > 0


def test_early_refresh_measures_leads_without_overlapping_loads() -> None:
    """Structure, and what holds by design whatever the timing: no two loads of a key
    at once; with no early refresh a reload starts only once its entry expired; with
    the fixed window, never before the window."""
    from benchmarks import early_refresh

    assert REDIS_URL is not None
    none, fixed = (
        early_refresh.summary(early_refresh.trial(REDIS_URL, mode, 2, 1.5))
        for mode in (None, early_refresh.WINDOW_S)
    )
    for figures in (none, fixed):
        assert figures["overlapping loads"] == 0
        assert figures["calls"] > 0
        assert figures["served late"] >= early_refresh.HOT_KEYS  # the first loads
        assert figures["loads per ttl"] > 0
    assert none["lead max ms"] <= 0
    assert fixed["lead max ms"] <= early_refresh.WINDOW_S * 1000 + 50


def test_dead_holder_measures_every_waiter_after_the_kill() -> None:
    import argparse
    import os

    from benchmarks import dead_holder

    assert REDIS_URL is not None
    # A lease that outlives a CPU-starved holder's stall (0.3 s lapsed before the kill).
    args = argparse.Namespace(lock_ttl=2.0, processes=2, threads=2)
    root = Path(__file__).resolve().parent.parent
    result = dead_holder.trial(args, REDIS_URL, {**os.environ, "PYTHONPATH": str(root)})
    assert len(result["delays_s"]) == 4  # every waiting caller answered, after the kill
    assert all(delay > 0 for delay in result["delays_s"])
    assert result["loads_after_kill"] == 1  # one of them loaded, the others waited for it


def test_outage_pauses_a_server_of_its_own() -> None:
    """Structure only: each first call is answered (the loader's value), the breaker
    opens once, every call up to it counted as an error; timings are the script's."""
    from benchmarks import outage

    results = outage.measure(calls=5)
    for mode in ("sync", "async"):
        report = results[mode]
        assert len(report["per_call_s"]) == 5
        assert report["breaker_opened"] == 1
        assert report["errors"] == 5  # three timeouts, then two refusals by the breaker


def test_typed_measures_every_codec_and_the_hit(settings: Settings) -> None:
    codecs, hits = typed.run(settings)
    assert set(rows(codecs)) == {
        "untyped msgpack (dict)",
        "typed (dataclass, msgspec)",
        "pickle (dataclass)",
        "typed (pydantic model)",
        "pydantic model_dump/model_validate + msgpack",
    }
    sizes = {name: row[-1] for name, row in rows(hits).items()}
    assert sizes["typed (dataclass)"] == sizes["untyped msgpack (dict)"] + 10  # the fingerprint
    assert rows(hits)["untyped msgpack (dict)"][2] == 1.0


def test_tag_hits_measures_each_tag_count_sync_and_async(settings: Settings) -> None:
    from benchmarks import tag_hits

    sync, async_ = tag_hits.run(settings)
    assert sync.title == "tagged sync hit, msgpack record"
    assert async_.title == "tagged async hit, msgpack record"
    for table in (sync, async_):
        names = list(rows(table))
        assert names[1:] == ["cached_aside, no tags", "cached_aside, 1 tag", "cached_aside, 2 tags"]
        assert rows(table)[names[0]][-1] == 1.0  # the raw GET is the baseline


def test_dead_holder_section_tables_each_lease(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Structure only: every waiter of every kill is counted, one load per kill."""
    from benchmarks import dead_holder

    monkeypatch.setattr(dead_holder, "LEASES", {"short": 0.3, "longer": 0.6})
    # A socket timeout on a starved machine is a Redis failure, answered by the loader
    # (fail open): a second load that says nothing of the leases this test is about.
    separator = "&" if "?" in settings.url else "?"
    patient = f"{settings.url}{separator}socket_timeout=5&socket_connect_timeout=5"
    (table,) = dead_holder.run(dataclasses.replace(settings, url=patient))
    assert list(rows(table)) == ["short", "longer"]
    for callers, _median, _max, one_load in rows(table).values():
        assert callers == 12  # 3 processes x 4 threads, one kill each (quick)
        assert one_load is True


def test_outage_section_tables_both_modes(settings: Settings) -> None:
    from benchmarks import outage

    (table,) = outage.run(settings)
    assert [row[0] for row in table.rows] == ["sync", "async"]
    for _mode, threshold, *_, opened in table.rows:
        assert threshold == 3
        assert opened == 1


def test_merge_replaces_only_the_sections_run_and_says_which_run() -> None:
    from benchmarks.__main__ import merged

    old = {
        "machine": "old",
        "environment": {"date": "then"},
        "quick": False,
        "sections": ["hit_path", "typed"],
        "tables": [
            {"title": "sync hit", "rows": [], "notes": []},  # no section: an older file
            {"title": "codec cost", "rows": [{"x": 1}], "notes": []},
        ],
    }
    new = {
        "machine": "new",
        "environment": {"date": "now"},
        "quick": True,
        "sections": ["typed", "outage"],
        "tables": [
            {"title": "codec cost", "rows": [{"x": 2}], "notes": [], "section": "typed"},
            {"title": "hung server", "rows": [], "notes": [], "section": "outage"},
        ],
    }
    result = merged(old, new)
    assert [t["title"] for t in result["tables"]] == ["sync hit", "codec cost", "hung server"]
    assert result["tables"][1]["rows"] == [{"x": 2}]
    assert result["sections"] == ["hit_path", "typed", "outage"]
    assert result["environment"] == {"date": "then"}  # the base run's, for the rest
    assert result["runs"]["typed"]["environment"] == {"date": "now"}
    assert result["runs"]["outage"]["quick"] is True
    again = merged(result, {**new, "sections": ["typed"], "tables": new["tables"][:1]})
    assert [t["title"] for t in again["tables"]] == ["sync hit", "hung server", "codec cost"]


def test_a_section_that_cannot_run_says_so_and_the_others_report(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(settings: Settings) -> list[Table]:
        raise ConnectionError("Error 111 connecting to 127.0.0.1:38245.\nConnection refused.")

    def fine(settings: Settings) -> list[Table]:
        return [Table("a table", ["what", "figure"], [["x", 1]])]

    monkeypatch.setattr(bench_main, "SCENARIOS", {"broken": broken, "fine": fine})
    out = console()
    with BenchProgress(out) as progress:
        settings.progress = progress
        ran, failed = bench_main.run_sections(["broken", "fine"], settings, progress)
    assert [(table.title, section) for table, section in ran] == [("a table", "fine")]
    assert failed == {"broken": "ConnectionError: Error 111 connecting to 127.0.0.1:38245."}
    printed = capsys.readouterr().out
    assert "broken: could not run: ConnectionError: Error 111" in printed
    assert "Traceback" not in printed


CALLGRIND_OUTPUT = """# callgrind format
version: 1
creator: callgrind-3.19.0
cmd:  python -c ...
events: Ir
summary: 1431517163
fn=(1) main
0 12
totals: 1431517163
"""


def test_the_meter_reads_callgrind_and_takes_the_difference_over_the_calls() -> None:
    from benchmarks import instructions

    assert instructions.totals(CALLGRIND_OUTPUT) == 1431517163
    with pytest.raises(ValueError, match="no totals"):
        instructions.totals("events: Ir\n")
    # 2000 more calls cost 128,116,000 more instructions: start-up cancels.
    assert instructions.per_operation(1_430_000_000, 1_558_116_000, 2000) == 64_058
    with pytest.raises(ValueError, match="counted no more"):
        instructions.per_operation(1_430_000_000, 1_430_000_000, 2000)


def _meter_figures(environment: dict[str, Any], **per_operation: float) -> dict[str, Any]:
    return {
        "environment": environment,
        "source": {"path": "/x", "commit": "90dff68", "dirty": False},
        "operations": {
            name: {"label": name, "count": 10, "per_operation": figure}
            for name, figure in per_operation.items()
        },
    }


def test_the_meter_check_fails_on_a_rise_over_five_percent_and_only_then() -> None:
    from benchmarks import instructions

    about = {name: f"{name} 1" for name in instructions.VERSIONS}
    recorded = _meter_figures(about, sync_hit=100_000, miss=500_000)
    same = instructions.check(recorded, _meter_figures(about, sync_hit=104_900, miss=500_100))
    assert same.ok
    assert not any(line.startswith("WARNING") for line in same.lines)
    risen = instructions.check(recorded, _meter_figures(about, sync_hit=105_100, miss=500_000))
    assert not risen.ok
    assert "sync_hit: 105,100 instructions, recorded 100,000 (+5.10%): FAILED: over 5%" in (
        risen.lines
    )
    fell = instructions.check(recorded, _meter_figures(about, sync_hit=90_000, miss=500_000))
    assert fell.ok
    assert any("re-record (--record)" in line for line in fell.lines)
    new = instructions.check(recorded, _meter_figures(about, near_hit=9_000))
    assert new.ok
    assert new.lines == ["near_hit: 9,000, no recorded figure (--record)"]


def test_the_meter_table_sets_many_and_the_near_hit_against_their_yardsticks() -> None:
    from benchmarks import instructions

    measured = _meter_figures(
        {},
        sync_hit=60_000,
        many_hits=4_800_000,
        async_hit=100_000,
        async_many_hits=5_000_000,
        near_hit=10_000,
        ttl_cache_item=5_000,
        ttl_cache_cached=8_000,
    )
    notes = instructions.table(measured)["notes"]
    assert notes[2:] == [
        "sync many() of 100: 0.800x the instructions of 100 sync hits",
        "async many() of 100: 0.500x the instructions of 100 async hits",
        "near hit: 2.00x the instructions of a cachetools TTLCache cache[key] hit",
        "near hit: 1.25x the instructions of a cachetools @cached(TTLCache) hit",
    ]
    assert instructions.comparisons(_meter_figures({}, sync_hit=1)["operations"]) == []


def test_the_meter_check_names_each_version_that_differs_and_widens_its_margin() -> None:
    from benchmarks import instructions

    about = {name: f"{name} 1" for name in instructions.VERSIONS}
    elsewhere = {**about, "python": "3.12.1", "hiredis": None}
    recorded = _meter_figures(about, sync_hit=100_000)
    wider = instructions.check(recorded, _meter_figures(elsewhere, sync_hit=120_000))
    assert wider.ok  # a 20% rise passes, but not silently:
    warnings = [line for line in wider.lines if line.startswith("WARNING")]
    assert "25% margin instead of 5%" in warnings[0]
    assert warnings[1:] == [
        "WARNING:   python: recorded 'python 1', now '3.12.1'",
        "WARNING:   hiredis: recorded 'hiredis 1', now None",
    ]
    gross = instructions.check(recorded, _meter_figures(elsewhere, sync_hit=126_000))
    assert not gross.ok
    assert instructions.differences(about, about) == {}


def test_the_committed_instruction_figures_are_those_the_docs_render() -> None:
    from benchmarks import figures, instructions

    committed = json.loads(instructions.RECORDED.read_text())
    assert set(committed["operations"]) == {op.name for op in instructions.OPERATIONS}
    for name in ("python", "python_build", "redis_py", "hiredis", "valgrind", "cpu"):
        assert committed["environment"][name], name
    rendered = figures.table(figures.load(), instructions.TITLE)
    for figure in committed["operations"].values():
        assert f"| {figure['label']} | {round(figure['per_operation']):,} |" in rendered


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="needs valgrind")
@pytest.mark.timeout(600)  # two Python start-ups under valgrind: a bound on a hang
def test_the_meter_counts_a_sync_hit_under_callgrind() -> None:
    """One real pair of runs, few calls: the figure is of the order recorded (a
    refactor may move it; the 5% check is `make bench`'s, on the full counts)."""
    from benchmarks import instructions

    assert REDIS_URL is not None
    measured = instructions.measure(REDIS_URL, ROOT, ["sync_hit"], jobs=2, scale=0.05)
    figure = measured["operations"]["sync_hit"]
    assert figure["count"] == 100
    assert figure["cached_aside"] == str(ROOT / "cached_aside" / "__init__.py")
    recorded = json.loads(instructions.RECORDED.read_text())["operations"]["sync_hit"]
    assert 0.5 < figure["per_operation"] / recorded["per_operation"] < 2
    assert measured["source"]["path"] == str(ROOT)


def test_fleet_slices_keep_each_process_to_its_own_keys_and_the_shared_ones() -> None:
    for n in range(fleet_tracking.PROCESSES):
        config = fleet_tracking.sliced(n, "bcast")
        first, count = config["slice"]
        draw = fleet_worker.key_sampler(config, seed=n)
        drawn = {draw() for _ in range(2000)}
        shared = {id for id in drawn if id < fleet_tracking.SHARED_KEYS}
        assert shared  # both kinds are read
        assert drawn - shared
        assert all(first <= id < first + count for id in drawn - shared)


def test_fleet_tracking_counts_every_listener_s_messages_and_redis_cpu() -> None:
    server = fleet.RedisProcess().start()
    try:
        total = fleet.one_run(
            server.url,
            [server.url],
            fleet_tracking.PROCESSES,
            1,
            1.0,
            each=lambda n: fleet_tracking.sliced(n, "bcast"),
        )
    finally:
        server.stop()
    assert total["writes"] > 0
    assert total["near_hits"] > 0
    # BCAST: every process's listener hears of every write (and of the reload after it).
    assert total["messages"] >= total["writes"]
    assert total["keys_reported"] >= total["messages"]
    assert total["redis_cpu"] > 0
    assert (total["stale"], total["errors"]) == (0, 0)
    row = fleet_tracking.tracking_row("one Redis", "bcast", total)
    assert len(row) == len(fleet_tracking.tracking_table(1).columns)


def test_fleet_recovery_reads_the_reconnect_and_the_refill_off_a_timeline() -> None:
    """A made-up timeline (each sample counts the reads of the 10 ms up to it): 80%
    near hits, none from the cut (1.0 s) to the reconnect (2.0 s), none for 0.2 s
    more, then 80% again."""
    timeline: list[list[Any]] = []
    reads = near = 0
    for step in range(301):
        moment = step / 100
        reads += 10
        near += 8 if moment <= 1.0 or moment > 2.2 else 0
        timeline.append([moment, reads, near, not 1.0 < moment < 2.0])
    found = fleet_tracking.recovery(timeline, {"cut": 1.0, "restored": 2.0})
    assert found["before"] == pytest.approx(0.8)
    assert found["cut"] == 0.0
    assert found["reconnect"] == pytest.approx(1.0)
    assert found["recovered"] == pytest.approx(0.25)  # the first 50 ms at 80% ends then
    assert 0.5 < found["after"] < 0.8


def test_fleet_recovery_cuts_each_listener_and_sees_it_reconnect() -> None:
    server = fleet.RedisProcess().start()
    try:
        total = fleet.one_run(
            server.url,
            [server.url],
            2,
            2,
            4.0,
            each=lambda n: fleet_tracking.cut_off("bcast", 0.5),
        )
    finally:
        server.stop()
    assert (total["stale"], total["errors"]) == (0, 0)
    assert total["near_revalidated"] > 0  # kept aside while cut, reread after
    for process in total["processes"]:
        assert process["outage"]["restored"] > process["outage"]["cut"]
        found = fleet_tracking.recovery(process["timeline"], process["outage"])
        assert found["before"] > 0.3  # a warm near cache before the cut
        assert found["cut"] < 0.05  # nothing served from memory while cut off
        assert found["reconnect"] is not None
        assert found["reconnect"] >= fleet_tracking.OUTAGE_S  # refused until then
        assert found["after"] > 0  # near hits again after the reconnect
    row = fleet_tracking.recovery_row("one Redis", "bcast", total)
    assert len(row) == len(fleet_tracking.recovery_table(2, 2).columns)


def test_fleet_per_key_tracking_tells_fewer_processes_of_a_write_than_bcast() -> None:
    """8 processes on slices of their own: BCAST tells every one of every write,
    per-key tracking only those that registered the key (mostly the writer alone)."""
    server = fleet.RedisProcess().start()
    per_write = {}
    try:
        for mode in fleet_worker.TRACKING_MODES:
            total = fleet.one_run(
                server.url,
                [server.url],
                fleet_tracking.PROCESSES,
                1,
                1.0,
                each=lambda n, mode=mode: fleet_tracking.sliced(n, mode),
            )
            assert (total["stale"], total["errors"]) == (0, 0)
            assert total["writes"] > 0
            per_write[mode] = total["messages"] / total["writes"]
    finally:
        server.stop()
    assert per_write["bcast"] >= fleet_tracking.PROCESSES  # each write reaches all 8
    assert per_write["keys"] * 3 < per_write["bcast"]


def test_a_threads_level_counts_every_threads_connection_however_slow_the_start() -> None:
    """Was a flake (a fresh-clone CI run: cached_aside at 8 threads counted 0
    connections): the run's deadline was set before the threads were ready, so when
    their first calls (each opening a connection) took longer than the run, they
    stopped at once, and a thread's held connection closes when the thread ends, all
    before the mid-run count. The run now starts when every thread is ready, and a
    thread waits to be counted before it ends."""
    import threading
    import time

    from benchmarks.runner import threads_level

    class Connections:  # a connection per thread, closed when its thread ends
        open = 0
        lock = threading.Lock()

        def __init__(self) -> None:
            with Connections.lock:
                Connections.open += 1

        def __del__(self) -> None:
            with Connections.lock:
                Connections.open -= 1

        @staticmethod
        def count() -> int:
            return Connections.open

    held = threading.local()
    seconds = 0.05

    def call(key: str) -> None:
        if getattr(held, "connection", None) is None:
            time.sleep(4 * seconds)  # a first call slower than the whole run
            held.connection = Connections()

    result = threads_level(call, 4, seconds, Connections)  # type: ignore[arg-type]  # count() alone
    assert result["connections"] == 4
    assert result["hits_per_s"] > 0
    assert Connections.open == 0  # every thread ended, its connection with it
