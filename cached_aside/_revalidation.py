"""Revalidation after a reconnect: the near entries set aside while tracking was down
are reread from Redis, a batch per pipelined round trip, off the callers' threads,
and served again only if no change was reported since their tickets were taken.

`reread` is the flow (pure, the lookups `many()` sends); `revalidate` is run on a
short-lived thread by the listener once tracking is back. No redis or asyncio
imports here.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from time import monotonic, sleep
from typing import Final

from ._batches import lookups
from ._codecs import Found
from ._effects import CommandFailed, Flow
from ._near import Reread
from ._near_keys import TrackedKeys
from ._near_store import NearStore
from ._plan import Plan
from ._reads import Age, peeked

logger = logging.getLogger("cached_aside")

# Keys reread per round trip: one pipeline of PEEK scripts each.
BATCH_KEYS: Final = 500
THREAD_NAME: Final = "cached_aside-revalidation"

# Per-key tracking: how long a batch waits for the registrar's replies before it is
# reread (a key unconfirmed by then is dropped, not trusted), and how often it looks.
REGISTRATION_SECONDS: Final = 1.0
REGISTRATION_POLL_SECONDS: Final = 0.002


def reread(plan: Plan, keys: Sequence[str]) -> Flow[list[Reread]]:
    """What each key's Redis entry holds now, read as a lookup reads it (value and
    pttl through the function's codec), never loading: (value, ms left) for a fresh
    value or negative entry, None for anything else. A tagged function's entries
    are never vouched for: the tags their stamps must match are known only from
    the call's arguments."""
    if plan.tags:
        return [None] * len(keys)
    raws = yield lookups(plan, keys)
    return [_judged(plan, raw) for raw in raws]


def _judged(plan: Plan, raw: object) -> Reread:
    if type(raw) is CommandFailed:
        return None
    found, age, left = peeked(plan, raw)
    if age is not Age.FRESH or left <= 0:
        return None
    if found is Found.NEGATIVE:
        return None, left
    return None if type(found) is Found else (found, left)


def start(
    rereads: list[tuple[NearStore, list[str]]],
    done: Callable[[], None],
) -> threading.Thread:
    """Revalidate each store's keys on a thread of its own; `done` is called at the end."""
    thread = threading.Thread(
        target=revalidate, args=(rereads, done), name=THREAD_NAME, daemon=True
    )
    thread.start()
    return thread


def revalidate(
    rereads: list[tuple[NearStore, list[str]]],
    done: Callable[[], None],
) -> None:
    """Reread every store's keys set aside, a batch at a time. A key is served again
    only with its fresh value and ttl, and only if its ticket, taken before the read
    (tracking was back already; in per-key mode, after its registration with the new
    connection was confirmed), was not cancelled by a change or clear. Fail safe: a
    batch whose read fails drops its keys, and so do the batches after it."""
    try:
        for store, keys in rereads:
            try:
                _revalidate_store(store, keys)
            except Exception:  # a bug, not Redis: nothing set aside may linger
                logger.exception("near cache: revalidation failed; the tier is emptied")
                store.clear()
    finally:
        done()


def _revalidate_store(store: NearStore, keys: list[str]) -> None:
    failed = store.reread is None
    for first in range(0, len(keys), BATCH_KEYS):
        batch = keys[first : first + BATCH_KEYS]
        if not failed and store.registrations is not None:
            try:
                _register(store, store.registrations, batch)
            except Exception as exc:
                failed = _failed(len(batch), exc)
        taken = store.aside.vouch(batch)
        if not taken:  # tracking dropped again: the keys wait for the next reconnect
            continue
        names = [key for key, _ in taken]
        found: list[Reread] = [None] * len(taken)
        if not failed and store.reread is not None:
            try:
                found = store.reread(names)
                if len(found) != len(names):
                    raise ValueError(f"{len(found)} rereads for {len(names)} keys")
            except Exception as exc:
                failed, found = _failed(len(names), exc), [None] * len(taken)
        for (key, ticket), entry in zip(taken, found, strict=True):
            store.aside.restore(key, ticket, entry)


def _register(store: NearStore, registrations: TrackedKeys[NearStore], keys: list[str]) -> None:
    """Per-key tracking: have the new registrar register `keys`, and wait (a
    bounded time) for its replies, before the batch's tickets are taken: a ticket
    taken after a key's confirmation vouches for its read (`TrackedKeys.vouches`)."""
    registrations.request(store, keys)
    deadline = monotonic() + REGISTRATION_SECONDS
    while registrations.awaiting(keys) and monotonic() < deadline:
        sleep(REGISTRATION_POLL_SECONDS)


def _failed(count: int, exc: Exception) -> bool:
    """Say so: nothing vouches for these keys, nor for the rest (they are dropped)."""
    logger.warning(
        "near cache: rereading %d entries after a reconnect failed (%r); "
        "they and the rest are dropped",
        count,
        exc,
    )
    return True
