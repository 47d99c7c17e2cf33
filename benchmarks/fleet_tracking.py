"""The fleet's tracking figures, as tables: what each tracking mode costs with
PROCESSES processes that each read their own slice of the keys (and a few shared hot
keys), and the near-hit ratio around a listener outage, with the time from reconnect
until it is back to RECOVERED of its level before. Configuration and arithmetic only:
`benchmarks.fleet` runs the processes.
"""

from __future__ import annotations

import itertools
import statistics
from typing import Any

from .fleet_worker import KEYS, TRACKING_WINDOW_S
from .runner import Table

PROCESSES = 8
# Every process reads these hot keys (ids 0..SHARED_KEYS-1) for SHARED_SHARE of its
# reads, and its own slice of the rest otherwise.
SHARED_KEYS = 100
SHARED_SHARE = 0.1
SLICE_KEYS = (KEYS - SHARED_KEYS) // PROCESSES
OUTAGE_S = 1.0
BUCKET_S = 0.05
RECOVERED = 0.9
# The near-hit level before the outage: the ratio over this long before the cut.
LEVEL_S = 0.5
# The near-hit ratio over this long after the reconnect: the reads that went to Redis.
AFTER_S = 1.0


def sliced(n: int, tracking: str) -> dict[str, Any]:
    """Process n's configuration: its own slice, the shared hot keys, the mode."""
    return {
        "slice": [SHARED_KEYS + n * SLICE_KEYS, SLICE_KEYS],
        "shared": [SHARED_KEYS, SHARED_SHARE],
        "tracking": tracking,
    }


def cut_off(tracking: str, at: float) -> dict[str, Any]:
    """A process whose listener is cut off Redis `at` seconds in, for OUTAGE_S."""
    return {"tracking": tracking, "timeline": True, "outage": [at, OUTAGE_S]}


def tracking_table(threads: int) -> Table:
    return Table(
        f"fleet tracking: {PROCESSES} processes x {threads} threads, each reading its own "
        f"{SLICE_KEYS:,} keys, and {SHARED_KEYS} shared hot keys {SHARED_SHARE:.0%} of "
        "the time",
        [
            "server",
            "tracking",
            "ops/s",
            "near-hit %",
            "messages per write",
            "keys reported per write",
            "Redis CPU ms/s",
            "Redis CPU µs per write",
            f"stale < {TRACKING_WINDOW_S * 1000:.0f} ms",
            "oldest stale read ms",
            "stale reads",
            "caller errors",
        ],
        notes=[
            "messages per write: invalidation messages received by every process's "
            "listener, summed, over the invalidating writes; a write also makes the next "
            "read load and store the key again, which Redis reports too",
            "keys reported per write: the keys those messages named (BCAST gathers the "
            "changes of one event-loop turn into one message per listener)",
            "Redis CPU: INFO cpu used_cpu_user + used_cpu_sys of the private server(s) "
            "over the run, per second and per invalidating write",
            f"stale reads: later than {TRACKING_WINDOW_S * 1000:.0f} ms after the "
            "invalidation returned; must be 0. oldest stale read: how long after the "
            "invalidation returned the latest of them began",
        ],
    )


def tracking_row(server: str, tracking: str, total: dict[str, Any]) -> list[Any]:
    seconds, writes = total["seconds"], max(1, total["writes"])
    return [
        server,
        tracking,
        round((total["reads"] + total["writes"]) / seconds),
        round(100 * total["near_hits"] / max(1, total["reads"]), 1),
        round(total["messages"] / writes, 2),
        round(total["keys_reported"] / writes, 2),
        round(1000 * total["redis_cpu"] / seconds, 1),
        round(1e6 * total["redis_cpu"] / writes, 1),
        total["stale_in_window"],
        round(1000 * total["stale_age_max"], 1),
        total["stale"],
        total["errors"],
    ]


def recovery_table(processes: int, threads: int) -> Table:
    return Table(
        f"fleet recovery: {processes} processes x {threads} threads, each one's listener "
        f"cut off Redis for {OUTAGE_S:g} s",
        [
            "server",
            "tracking",
            "near-hit % before",
            "near-hit % while cut",
            "reconnect s after the cut",
            f"near-hit % first {AFTER_S:g} s after reconnect",
            f"back to {RECOVERED:.0%} s after reconnect",
            "slowest process s",
            "entries reread",
            "entries dropped unverified",
            "stale reads",
            "caller errors",
        ],
        notes=[
            f"each process: CLIENT KILL of its listener's connection, reconnections "
            f"refused for {OUTAGE_S:g} s, then its own retry reconnects (the retry's "
            "back-off sets when)",
            f"back to {RECOVERED:.0%}: from the reconnect to the end of the first "
            f"{BUCKET_S * 1000:.0f} ms in which the near-hit ratio is at least "
            f"{RECOVERED:.0%} of its level over the {LEVEL_S:g} s before the cut; the "
            "median over the processes, then the slowest; '-' if not within the run",
            "entries reread: near entries kept aside while cut and served again after a "
            "reread (stats near_revalidated), over the processes; dropped unverified: "
            "those dropped instead (near_unverified)",
            f"stale reads: later than {TRACKING_WINDOW_S * 1000:.0f} ms after the "
            "invalidation returned; must be 0",
        ],
    )


def recovery_row(server: str, tracking: str, total: dict[str, Any]) -> list[Any]:
    found = [recovery(p["timeline"], p["outage"]) for p in total["processes"]]
    times = [one["recovered"] for one in found]
    done = [time for time in times if time is not None]
    slowest = max(done) if len(done) == len(times) else None
    reconnects = [one["reconnect"] for one in found]
    if None in reconnects:  # a listener still down at the end: no recovery to time
        reconnects = [float("inf")]
    return [
        server,
        tracking,
        round(100 * statistics.median(one["before"] for one in found), 1),
        round(100 * statistics.median(one["cut"] for one in found), 1),
        round(statistics.median(reconnects), 2),
        round(100 * statistics.median(one["after"] for one in found), 1),
        "-" if len(done) * 2 <= len(times) else round(statistics.median(done), 2),
        "-" if slowest is None else round(slowest, 2),
        total["near_revalidated"],
        total["near_unverified"],
        total["stale"],
        total["errors"],
    ]


def curve(timeline: list[list[Any]], outage: dict[str, float]) -> list[tuple[float, float]]:
    """The near-hit ratio of each BUCKET_S of a timeline in which reads ended, against
    seconds since the cut."""
    cut, end = outage["cut"], timeline[-1][0]
    points = []
    for bucket in itertools.count(1):
        moment = bucket * BUCKET_S
        if moment > end:
            break
        if _at(timeline, moment)[1] > _at(timeline, moment - BUCKET_S)[1]:  # any reads
            points.append((round(moment - cut, 3), ratio(timeline, moment - BUCKET_S, moment)))
    return points


def recovery(timeline: list[list[Any]], outage: dict[str, float]) -> dict[str, Any]:
    """One process's recovery from its timeline ([seconds, reads, near hits,
    tracking] samples) and its outage's start: the near-hit ratio before the cut
    and while cut, the reconnect's delay after the cut, the ratio over AFTER_S
    after it, and the time from the
    reconnect until a BUCKET_S window's ratio is back to RECOVERED of the level
    before (None: not within the timeline)."""
    cut = outage["cut"]
    down = next((s[0] for s in timeline if s[0] >= cut and not s[3]), cut)
    reconnect = next((s[0] for s in timeline if s[0] > down and s[3]), None)
    before = ratio(timeline, cut - LEVEL_S, cut)
    result: dict[str, Any] = {
        "before": before,
        "cut": ratio(timeline, down, reconnect if reconnect is not None else timeline[-1][0]),
        "reconnect": None if reconnect is None else reconnect - cut,
        "after": 0.0,
        "recovered": None,
    }
    if reconnect is None:
        return result
    result["after"] = ratio(timeline, reconnect, reconnect + AFTER_S)
    for bucket in itertools.count(1):
        end = reconnect + bucket * BUCKET_S
        if end > timeline[-1][0]:
            break
        if ratio(timeline, end - BUCKET_S, end) >= RECOVERED * before:
            result["recovered"] = end - reconnect
            break
    return result


def ratio(timeline: list[list[Any]], start: float, end: float) -> float:
    """Near hits over reads between the last samples at or before start and end."""
    first = _at(timeline, start)
    last = _at(timeline, end)
    reads = last[1] - first[1]
    return 0.0 if reads <= 0 else min(1.0, (last[2] - first[2]) / reads)


def _at(timeline: list[list[Any]], moment: float) -> list[Any]:
    found = timeline[0]
    for sample in timeline:
        if sample[0] > moment:
            break
        found = sample
    return found
