"""Where the client and the server run, made a setting of the run instead of the
scheduler's choice. On a VM (this suite's machines) a round trip between two processes
on one CPU costs about a tenth of one between two CPUs, where each reply must wake an
idle CPU; which of the two a run gets changes from run to run and from process to
process (the C client's and Python's could differ within one run), so a ratio between
them means nothing unless both ran with the same placement. A cell pins its server and
its hit-path run (the C client, a child, inherits it) to the CPUs of one placement.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# The hit-path run's CPUs, as "0" or "0,1": set by a cell, read by the run.
CPUS = "CACHED_ASIDE_BENCH_CPUS"


@dataclass(frozen=True)
class Placement:
    name: str
    client: frozenset[int]
    server: frozenset[int]


def available() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def placements() -> list[Placement]:
    """Client and server on one CPU, then on two (when there are two); empty where
    affinity cannot be set."""
    cpus = available()
    if not cpus or not hasattr(os, "sched_setaffinity"):
        return []
    first = frozenset(cpus[:1])
    found = [Placement("one CPU", first, first)]
    if len(cpus) > 1:
        found.append(Placement("two CPUs", first, frozenset(cpus[1:2])))
    return found


def pin_server(pid: int, placement: Placement) -> None:
    os.sched_setaffinity(pid, placement.server)


def client_environment(placement: Placement) -> dict[str, str]:
    return {CPUS: ",".join(str(cpu) for cpu in sorted(placement.client))}


def pin_from_environment() -> str:
    """Pin this process as its cell asked; what the run's placement was, for the notes."""
    wanted = os.environ.get(CPUS)
    if not wanted:
        return "placement: the scheduler's (not pinned); see benchmarks/placement.py"
    cpus = {int(cpu) for cpu in wanted.split(",")}
    os.sched_setaffinity(0, cpus)
    return f"placement: this process and its C client pinned to CPU {wanted}"
