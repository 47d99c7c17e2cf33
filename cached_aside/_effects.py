"""What a flow asks its driver to do, and what the driver throws back into it.

Flows yield these and receive the result; drivers perform them with real clients.
No redis, asyncio or time imports here.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from ._scripts import RunScript as RunScript  # an effect; built by its script's builder

T = TypeVar("T")


@dataclass(slots=True)
class Command:
    """Send one Redis command; the reply comes back parsed by redis-py. A command that
    `blocks` its connection (BLPOP) takes one of the pool's, not a shared one."""

    args: tuple[Any, ...]
    blocks: bool = False


@dataclass(slots=True)
class Spawn:
    """Run `flow` in the background (a thread or a task) and carry on at once.

    At most one background flow per key runs in a process at a time; a second Spawn
    for the same key while one runs is dropped.
    """

    key: str
    flow: Generator[Any, Any, Any]


@dataclass(slots=True)
class Batch:
    """Send many commands and scripts in one pipeline: one round trip per node.

    The reply is a list in the same order, with a CommandFailed in place of each one
    that failed; a batch never throws, because some entries may succeed.
    """

    effects: list[Command | RunScript]


@dataclass(slots=True)
class LoadSome:
    """Call the batch loader once for these positions of the batch; the reply is their
    values in the same order."""

    positions: tuple[int, ...]


@dataclass(slots=True)
class LoadOne:
    """Load one position of a batch (an entry whose lock was held by another caller,
    which then gave it up); the reply is its value."""

    position: int

    @property
    def positions(self) -> tuple[int]:
        return (self.position,)


@dataclass(slots=True)
class Leased:
    """Perform `load` (a load effect) while keeping the leases of the locks it loads
    under: every `every_ms` until it ends, however it ends, the driver sends every
    group of `renewals` in one Batch (a lock's RENEW; a tag's version, TAG_RENEW).
    A group with a reply of 0 or a failure is renewed no more: its lease was revoked
    (or its version is gone), and then expires, so its store is refused (or is a
    miss). The reply is the load's."""

    load: Any  # Signal.LOAD, LoadOne or LoadSome
    renewals: tuple[tuple[RunScript, ...], ...]
    every_ms: int


@dataclass(slots=True)
class Lead:
    """Lead this process's flight of each key (a batch about to load them): until its
    Land, callers of the key in this process join this flow instead of loading. The
    reply is, per key, whether this flow leads it; False: a flight or a reload of the
    key is under way here, to be joined through the single path. A Signal.SEAL stops
    later callers joining every flight the flow leads. However the flow ends, the
    driver ends the flights it did not land, with the flow's error if it raised."""

    keys: tuple[str, ...]


@dataclass(slots=True)
class Land:
    """Hand each led key's outcome to the callers that joined its flight, and end it:
    (key, a Served, the Exception its load raised, or None: the joiners read for
    themselves)."""

    outcomes: tuple[tuple[str, Any], ...]


class Unread(enum.Enum):
    """An entry whose lookup is still to be sent (its raw reply, where one goes)."""

    REPLY = "unread"


UNREAD: Final = Unread.REPLY


@dataclass(slots=True)
class Each:
    """Serve these entries of a many() call one by one, each exactly as a single call
    whose lookup returned `raw` (UNREAD: look it up first), shared with this
    process's callers of the same key and fenced by the same lock: `entries` holds
    (position, key, raw). At most `at_once` run at a time where the driver can
    overlap them (tasks; threads go in order). The reply is, per entry, (Served,
    whether it was shared); if one raises, the others still finish first."""

    plan: Any  # the function's Plan (flows.py imports this module)
    entries: tuple[tuple[int, str, Any], ...]
    at_once: int


@dataclass(slots=True)
class Scan:
    """The next keys matching a glob pattern, from every master; `position` is the
    driver's opaque place (None: start). The reply is (position, keys); position None
    means the scan is complete."""

    match: str
    position: Any
    count: int  # keys per page, and SCAN's COUNT hint


@dataclass(slots=True, eq=False)
class Hold:
    """From here until its Free, the flow may hold a lock, or be counted as a waiter.

    However the flow ends while a Hold stands (a return, an exception from Redis, the
    loader or a codec, a cancellation), the driver runs `releases` (one pipeline for
    several); what Redis does not take, the engine's outbox retries for up to
    `ttl_ms`, after which the lock has expired by itself. Flows never release on
    their error paths themselves.
    """

    releases: tuple[RunScript, ...]
    ttl_ms: int


@dataclass(slots=True)
class Free:
    """The Hold given no longer stands: its lock was consumed or never taken."""

    hold: Hold


@dataclass(frozen=True, slots=True)
class PendingPattern:
    """Every key of a function, or under a prefix: delivered with SCAN + UNLINK."""

    start: str  # every key it covers starts with this text
    match: str  # the SCAN MATCH glob that finds them
    belongs: Callable[[str], bool] = field(compare=False)  # which matches it covers
    name: str = field(default="", compare=False)  # for logs and pending_invalidations()


@dataclass(frozen=True, slots=True)
class PendingKey:
    """One entry's invalidation: delivered with the INVALIDATE script."""

    key: str
    wake_ttl_ms: int = field(compare=False)
    whole: PendingPattern = field(compare=False)  # covers it when the outbox is full


@dataclass(frozen=True, slots=True)
class PendingTag:
    """A tag's invalidation Redis did not take: delivered by deleting the tag's
    version. Until then, this process does not serve the keys of the functions that
    can carry the tag (`covers`: filled in by the outbox, from the functions the
    engine knows, and from each function it meets later)."""

    key: str  # the tag's version key
    text: str = field(compare=False)  # the tag, as invalidate_tags() was given it
    wake_ttl_ms: int = field(compare=False)
    covers: tuple[PendingPattern, ...] = field(default=(), compare=False)


@dataclass(slots=True)
class Postpone:
    """Invalidations Redis did not take: the driver queues them in the engine's
    outbox, which retries them until they land. Until then this process serves the
    keys they cover from the loader only."""

    items: tuple[PendingKey | PendingPattern | PendingTag, ...]


@dataclass(slots=True)
class TagsOf:
    """The tags of the entry `load` loads, rendered from its call's arguments (no
    I/O: the driver holds the arguments)."""

    load: Signal | LoadOne


class Signal(enum.Enum):
    """Effects without parameters."""

    LOAD = "load"  # call the user's loader with the call's arguments
    SEAL = "seal"  # later callers in this process must not join this call any more
    LOAD_TIME = "load time"  # the whole ms this run's last load took (XFetch stores it)


Effect = (
    Command
    | RunScript
    | Spawn
    | Signal
    | Batch
    | LoadSome
    | LoadOne
    | Scan
    | Hold
    | Free
    | Postpone
    | Each
    | TagsOf
    | Leased
    | Lead
    | Land
)
Flow = Generator[Effect, Any, T]


class CommandFailed(Exception):
    """Thrown into a flow when Redis failed to answer; `cause` is redis-py's exception."""

    def __init__(self, cause: BaseException, *, wrong_type: bool, sent: bool = True) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause = cause
        self.wrong_type = wrong_type  # the key holds another Redis type: data, not outage
        self.sent = sent  # False: refused before it left (the breaker is open)
