"""What the sync and the async driver share, written once: the lookup effects, the
effects performed in process (Hold, Free, SEAL, Postpone, TagsOf, Lead, Land), and a
run's bookkeeping. No redis, asyncio or thread imports here: only the drivers wait.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ._effects import (
    Batch,
    Command,
    CommandFailed,
    Effect,
    Free,
    Hold,
    Land,
    Lead,
    Postpone,
    RunScript,
    Signal,
    TagsOf,
)
from ._flight_registry import Led
from ._flights import TaskFlights, ThreadFlights
from ._loads import Loads
from ._pipelines import Done
from ._plan import Plan
from ._reads import peek_lookup
from ._runtime import Runtime
from ._scripts import peek_call
from ._stamps import version_reads

# Lookups remembered per function (Plan.lookups); past this many the memo starts over.
LOOKUP_MEMO_SIZE = 1024

# A single call's loader, arguments and keyword arguments: made into Loads on a miss
# only, so a hit does not pay for them.
Call = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]
Seal = Callable[[], None]  # stops later callers of this process joining the flow


def no_seal() -> None:
    """The seal of a flow nobody can join (background work, writes)."""


def lookup(plan: Plan, key: str) -> Command | RunScript:
    """The effect that looks an entry up: its read command, or PEEK (value and ttl)."""
    if plan.peek:
        if plan.options.xfetch_beta:  # with the entry's load time
            return peek_lookup(plan, key)
        return peek_call(key, redis_type=plan.codec.redis_type)
    lookups = plan.lookups
    command: Command | None = lookups.get(key)
    if command is None:
        if len(lookups) >= LOOKUP_MEMO_SIZE:
            lookups.clear()
        command = lookups[key] = Command((plan.codec.read_command, key))
    return command


def tagged_lookup(plan: Plan, key: str, loads: Loads | Call) -> Batch:
    """A tagged function's lookup: the entry, then its tags' versions, in one
    pipeline (read_stamped judges the replies)."""
    if isinstance(loads, Loads):
        texts = loads.tags(Signal.LOAD)
    else:
        texts = tuple(tag.render_tag(loads[1], loads[2]) for tag in plan.tags)
    return Batch([lookup(plan, key), *version_reads(key, texts)])


def as_loads(plan: Plan, loads: Loads | Call) -> Loads:
    """A single call's loads, made on a miss."""
    if isinstance(loads, Loads):
        return loads
    loader, args, kwargs = loads
    return Loads(plan, loader, (args,), kwargs)


def as_reply(failure: BaseException) -> CommandFailed:
    """A lookup's failure as the reply the flows judge; an interrupt propagates."""
    if type(failure) is not CommandFailed:
        raise failure
    return failure


class Running:
    """One flow's run: the Holds standing, the flights of a batch it leads, its seal
    and loads, and the seconds it spent on Redis. Performs the effects that need no
    I/O, the same for both drivers."""

    __slots__ = ("flights", "holds", "led", "loads", "runtime", "seal", "seconds")

    def __init__(
        self, runtime: Runtime, flights: ThreadFlights | TaskFlights, loads: Loads, seal: Seal
    ) -> None:
        self.runtime = runtime
        self.flights = flights
        self.loads = loads
        self.seal = seal
        self.seconds = 0.0
        self.holds: list[Hold] = []
        self.led: Led | None = None  # the flights of a batch's keys, led by this flow

    def locally(self, effect: Effect) -> Done:
        """Perform an effect that needs no I/O (an argument that cannot be rendered
        into a tag is thrown into the flow); any other effect is a driver's bug."""
        if effect is Signal.SEAL:
            if self.led is not None:
                self.led.seal()
            self.seal()
        elif effect is Signal.LOAD_TIME:
            return self.loads.last_ms, None
        elif isinstance(effect, Hold):
            self.holds.append(effect)
        elif isinstance(effect, Free):
            self.holds.remove(effect.hold)
        elif isinstance(effect, Postpone):
            self.runtime.outbox.add(effect.items)
        elif isinstance(effect, TagsOf):
            try:
                return self.loads.tags(effect.load), None
            except Exception as exc:  # an argument that cannot be rendered
                return None, exc
        elif isinstance(effect, Lead):
            self.led = self.led or Led(self.flights)
            return self.led.lead(effect.keys), None
        elif isinstance(effect, Land):
            self.led = self.led or Led(self.flights)
            self.led.land(effect.outcomes)
        else:
            raise AssertionError(f"no driver performs {effect!r}")
        return None, None

    def end(self, ended: BaseException | None) -> None:
        """However the flow ended: the flights it led and did not land end with it."""
        if self.led is not None:
            self.led.end(ended)


def queue_refused(rt: Runtime, hold: Hold, replies: Sequence[object]) -> None:
    """Hand the releases Redis did not take to the outbox, which retries them."""
    for release, reply in zip(hold.releases, replies, strict=True):
        if isinstance(reply, BaseException):
            rt.outbox.add_release(release, hold.ttl_ms)
