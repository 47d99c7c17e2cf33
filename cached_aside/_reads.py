"""The read path's one rule: at each step of a call's read, what it may read next
(the loader alone, the near tier, Redis, this process's flight of the key), and how
a lookup's reply and a shared answer are judged. Pure: drivers and wrappers ask it
and perform the answer. No redis, asyncio or time imports here.
"""

from __future__ import annotations

import enum
import math
import random
from typing import Any, Final

from ._codecs import Found
from ._effects import CommandFailed
from ._keys import load_ms_key
from ._plan import Plan, Served
from ._results import Source
from ._scripts import RunScript, peek_call, timed_peek_call


class Step(enum.Enum):
    """Where a read goes next."""

    # Only the loader, caching nothing: the key's invalidation waits in the outbox, so
    # Redis, and any near tier (Redis never reported the change), may hold the old value.
    LOADER = "loader"
    NEAR = "near"  # the near tier; on a near miss, the step after it
    LOOK = "look"  # this caller sends the lookup itself
    # This process's flight of the key: join it, or lead it (and look, unless the
    # reply is in hand already).
    FLIGHT = "flight"
    WAIT = "wait"  # for this process's fn.refresh() of the key, then look once more
    MISS = "miss"  # the miss flow (after_miss): lock, load, store, or serve an aged entry
    BATCH = "batch"  # many(): the batch loader, with the batch's other misses
    ANSWER = "answer"  # the reply in hand answers the call


# The steps as module globals: reading an Enum member as a class attribute costs
# about 50 ns on Python 3.11, and the rule is asked on every hit.
LOADER: Final = Step.LOADER
NEAR: Final = Step.NEAR
LOOK: Final = Step.LOOK
FLIGHT: Final = Step.FLIGHT
WAIT: Final = Step.WAIT
MISS: Final = Step.MISS
BATCH: Final = Step.BATCH
ANSWER: Final = Step.ANSWER


def first_step(pending: bool, near: bool, shared: bool) -> Step:
    """Where a call's read begins.

    Args:
        pending: an invalidation of the key waits in the outbox.
        near: the function has a near tier this call has not asked yet.
        shared: the read goes through this process's flights at once: a thread or
            task joins a miss of the key already under way, and a reply in hand
            (many()'s pipeline) needs no lookup.
    """
    if pending:
        return LOADER
    if near:
        return NEAR
    return FLIGHT if shared else LOOK


# first_step as a table, read on the hit path, where a subscript costs less than a
# call: FIRST_STEPS[pending][near][shared] is first_step(pending, near, shared).
FIRST_STEPS: Final = tuple(
    tuple(tuple(first_step(p, n, s) for s in (False, True)) for n in (False, True))
    for p in (False, True)
)


def on_miss(refreshing: bool, aged: bool) -> Step:
    """After a lookup that did not answer (or none: a thread that joined a flight):
    wait for this process's fn.refresh() of the key when one is loading it (its
    result, not a load beside it: the refresh revoked the lock this would take),
    unless the reply is an entry after_miss serves at once (`aged`: due for a
    refresh_ahead reload, or in its grace). After that wait, the miss flow."""
    return WAIT if refreshing and not aged else MISS


def batch_step(pending: bool, hit: bool, batched: bool, aged: bool) -> Step:
    """One entry of many(), after the batch's lookups: a blocked key is served from
    the loader (by the single path, which re-checks it), a hit answers, a miss goes to
    the batch loader when there is one, and an aged entry (served at once, reloaded
    behind) goes the single way, which knows how."""
    if pending:
        return LOADER
    if hit:
        return ANSWER
    return BATCH if batched and not aged else FLIGHT


def near_keeps(joined: bool, ttl_ms: int) -> bool:
    """Whether a Redis read's answer fills the near tier: only the caller's own read
    (a shared one may predate its ticket) of an entry whose remaining ttl the lookup
    told."""
    return not joined and ttl_ms > 0


def as_joiner(plan: Plan, served: Served) -> Served:
    """A caller that shared another caller's read: counted as what it got, with a
    copy of the value of its own."""
    stats = plan.stats
    if served.source is Source.CACHE:
        stats.hit()
    elif served.source is Source.NEGATIVE:
        stats.negative_hit()
    elif served.source is Source.STALE:  # a stale answer stays one for every joiner
        stats.stale()
    else:
        stats.miss(suppressed=True)
        return Served(plan.codec.copy(served.value), Source.WAITED)
    return Served(plan.codec.copy(served.value), served.source)


def on_lookup(plan: Plan, raw: Any) -> Served | None:
    """Judge the reply to the lookup: the answer on a hit, None on a miss.

    This is the whole hit path: drivers send the lookup themselves and start the
    `after_miss` flow only when this returns None (also for a hit whose entry is due
    for a refresh_ahead reload).
    """
    if type(raw) is CommandFailed:
        return None
    if plan.peek:
        found, age, left = peeked(plan, raw)
        if age is not Age.FRESH:
            return None
        if type(found) is not Found:
            plan.stats.hit()
            return Served(found, Source.CACHE, ttl_ms=left)
        if found is Found.NEGATIVE:
            plan.stats.negative_hit()
            return Served(None, Source.NEGATIVE, ttl_ms=left)
        return None
    found = plan.codec.decode(raw)
    if type(found) is not Found:
        plan.stats.hit()
        return Served(found, Source.CACHE)
    if found is Found.NEGATIVE:
        plan.stats.negative_hit()
        return Served(None, Source.NEGATIVE)
    return None


def found_in(plan: Plan, raw: Any) -> Any:
    """What a lookup reply holds: a decoded value, or a Found member (a PEEK reply is
    unpacked first)."""
    return peeked(plan, raw)[0] if plan.peek else plan.codec.decode(raw)


def aged(plan: Plan, raw: Any) -> bool:
    """True when a lookup reply holds an entry that on_lookup declined for its age
    alone (due for a refresh_ahead reload, in its grace, or kept for stale_if_error):
    the single path knows how to serve it."""
    return plan.peek and type(raw) is not CommandFailed and peeked(plan, raw)[1] is not Age.FRESH


def served_aged(plan: Plan, raw: Any) -> bool:
    """True when after_miss answers this lookup reply from the cache at once (due for
    a refresh_ahead reload, or in its grace) and reloads behind: no load to wait for."""
    if not plan.peek or type(raw) is CommandFailed:
        return False
    age = peeked(plan, raw)[1]
    return age is Age.DUE or age is Age.STALE


class Age(enum.Enum):
    """How old a cached entry is, told by the PEEK script's pttl."""

    FRESH = "fresh"
    DUE = "due"  # fresh, inside the refresh_ahead window: serve, and reload behind
    STALE = "stale"  # past ttl, inside grace: serve as stale, and reload behind
    EXPIRED = "expired"  # past ttl and grace, kept for stale_if_error: a miss


def peeked(plan: Plan, raw: Any) -> tuple[Any, Age, int]:
    """The PEEK script's reply as (decoded value or Found, its age, the ms it stays
    fresh: -1 when it never expires, 0 when it is past its ttl).

    An entry is stored for ttl + keep_ms (grace, stale_if_error): while no more than
    keep_ms are left it is past its ttl, and how far past tells stale from expired.
    """
    if not raw:
        return Found.MISS, Age.FRESH, -1
    if len(raw) == 1:
        return Found.CORRUPT, Age.FRESH, -1  # the key holds another Redis type
    found = plan.codec.decode(raw[0])
    left = raw[1]
    if left < 0 or (type(found) is Found and found is not Found.NEGATIVE):
        return found, Age.FRESH, left
    options = plan.options
    keep = options.keep_ms
    if keep and left <= keep:
        return found, Age.STALE if keep - left < options.grace_ms else Age.EXPIRED, 0
    left -= keep
    window = options.refresh_ahead_ms
    if window and left <= window and type(found) is not Found:
        beta = options.xfetch_beta
        if not beta or xfetch_due(left, _load_ms(raw), beta, _draw(raw)):
            return found, Age.DUE, left
    return found, Age.FRESH, left


def xfetch_due(left_ms: int, load_ms: int, beta: float, draw: float) -> bool:
    """XFetch's rule (Vattani, Chierichetti and Lowenstein, VLDB 2015): an entry with
    `left_ms` of freshness whose last load took `load_ms` is due for a reload when
    -load_ms * beta * ln(draw) >= left_ms, for a draw uniform in (0, 1]. Its chance
    is exp(-left_ms / (load_ms * beta)): nil far from expiry, certain at it. An
    unknown load time (0: never stored, or the entry was written by set()) makes
    it never due early: the entry expires, and the load that follows is timed."""
    if load_ms <= 0:
        return False
    return -load_ms * beta * math.log(draw) >= left_ms


def _load_ms(raw: list[Any]) -> int:
    """The entry's last load time in a timed PEEK reply; 0 when unknown."""
    held = raw[2] if len(raw) > 2 else None
    return int(held) if held else 0


def _draw(raw: list[Any]) -> float:
    """The reply's one draw in (0, 1]: taken at its first judgement and kept with it
    (its fourth element), so every later judgement of the same reply (the driver's
    routing, after_miss) agrees. A test passes a reply with its draw in place."""
    if len(raw) > 3:
        return float(raw[3])
    draw = 1.0 - random.random()
    if type(raw) is list:  # as every client parses a script's reply
        raw.append(draw)
    return draw


def peek_lookup(plan: Plan, key: str) -> RunScript:
    """The PEEK lookup of an entry; an XFetch function's reads its load time too."""
    if plan.options.xfetch_beta:
        return timed_peek_call(key, load_ms_key(key), redis_type=plan.codec.redis_type)
    return peek_call(key, redis_type=plan.codec.redis_type)
