"""Invalidate after a SQLAlchemy Session commits (the `sqlalchemy` extra).

`invalidate_on_commit(session, fn, *args)` invalidates now, at the write, and again
once the session's transaction commits; a rollback (of the transaction, or of the
savepoint the call was made in) drops the second one. Sync `Session` and
`AsyncSession` alike, through the session's own events: nothing global is patched.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any, ParamSpec

from sqlalchemy import event
from sqlalchemy.exc import MissingGreenlet
from sqlalchemy.ext.asyncio import AsyncSession, async_scoped_session
from sqlalchemy.orm import Session, SessionTransaction, scoped_session

from .._results import BulkOutcome, Outcome
from ._deferred import (
    AsyncInvalidates,
    AsyncInvalidatesMany,
    DeferredInvalidation,
    Invalidates,
    InvalidatesMany,
    arun_all,
    deferred,
    deferred_many,
    logger,
    refuse_async,
    run_all,
)

try:
    from sqlalchemy.util import await_ as await_in_greenlet
except ImportError:  # SQLAlchemy 2.0 names it await_only
    from sqlalchemy.util import await_only as await_in_greenlet

__all__ = [
    "ainvalidate_many_on_commit",
    "ainvalidate_on_commit",
    "invalidate_many_on_commit",
    "invalidate_on_commit",
]

P = ParamSpec("P")

HELD = "cached_aside.invalidations"  # the session.info key of a session's _Held

# The tasks of async invalidations after commit: the loop keeps only weak references,
# and a task must outlive a cancelled commit (see _run).
_running: set[asyncio.Task[None]] = set()


def invalidate_on_commit(
    session: Session | scoped_session[Any],
    fn: Invalidates[P],
    *args: P.args,
    **kwargs: P.kwargs,
) -> Outcome:
    """Invalidate `fn(*args, **kwargs)`'s entry now and again after `session` commits.

    Call it where you write the row. The invalidation now revokes the lease of any
    load in flight; the one after the commit removes what a reader cached from the old
    row meanwhile and fences its loads again. If the transaction, or the savepoint
    this call was made in, rolls back, the second one is dropped.

    Args:
        session: the Session that writes (a `scoped_session` means its current one).
        fn: a decorated plain function, or such a method read from its instance.
        *args: the loader's arguments, as for `fn.invalidate`.
        **kwargs: the loader's keyword arguments.

    Returns:
        The Outcome of the invalidation now. The one after the commit never raises
        out of `commit()`: a failure is logged (the `cached_aside.integrations`
        logger) and, when Redis did not take it, left to the engine's outbox.

    Raises:
        KeyArgumentError: an argument cannot be part of a key (nothing is held).
        CacheUnavailableError: Redis failed now and `fn` has fail_open=False; the
            invalidation after the commit stays registered.
    """
    refuse_async(fn, "use ainvalidate_on_commit with an AsyncSession")
    _hold(_current(session), deferred(fn, args, kwargs), asynchronous=False)
    return fn.invalidate(*args, **kwargs)


def invalidate_many_on_commit(
    session: Session | scoped_session[Any], fn: InvalidatesMany, items: Iterable[Any]
) -> BulkOutcome:
    """`fn.invalidate_many(items)` now and again after `session` commits; dropped
    on rollback, as for `invalidate_on_commit`. Items as for `fn.many()`."""
    refuse_async(fn, "use ainvalidate_many_on_commit with an AsyncSession")
    listed = list(items)
    _hold(_current(session), deferred_many(fn, listed), asynchronous=False)
    return fn.invalidate_many(listed)


async def ainvalidate_on_commit(
    session: AsyncSession | async_scoped_session[Any],
    fn: AsyncInvalidates[P],
    *args: P.args,
    **kwargs: P.kwargs,
) -> Outcome:
    """`invalidate_on_commit` for an `AsyncSession` and an `async def` function.

    The invalidation after the commit runs inside `await session.commit()` (or the
    end of `async with session.begin():`), before it returns: a request that commits
    and then reads gets the new row. If the task is cancelled meanwhile, the
    invalidations still complete in the background.
    """
    _hold(_current_async(session).sync_session, deferred(fn, args, kwargs), asynchronous=True)
    return await fn.invalidate(*args, **kwargs)


async def ainvalidate_many_on_commit(
    session: AsyncSession | async_scoped_session[Any],
    fn: AsyncInvalidatesMany,
    items: Iterable[Any],
) -> BulkOutcome:
    """`invalidate_many_on_commit` for an `AsyncSession` and an `async def` function."""
    listed = list(items)
    _hold(_current_async(session).sync_session, deferred_many(fn, listed), asynchronous=True)
    return await fn.invalidate_many(listed)


class _Held:
    """A session's invalidations, by the transaction that decides their fate: the
    innermost savepoint when they were registered, else the root transaction (None:
    the next one, when none has begun yet)."""

    __slots__ = ("asynchronous", "by_transaction", "committed")

    def __init__(self) -> None:
        self.by_transaction: dict[SessionTransaction | None, list[DeferredInvalidation]] = {}
        self.committed: SessionTransaction | None = None  # the root, until it ends
        self.asynchronous = False  # some were registered through an AsyncSession


def _current(session: Session | scoped_session[Any]) -> Session:
    return session() if isinstance(session, scoped_session) else session


def _current_async(session: AsyncSession | async_scoped_session[Any]) -> AsyncSession:
    return session() if isinstance(session, async_scoped_session) else session


def _hold(session: Session, invalidation: DeferredInvalidation, asynchronous: bool) -> None:
    held = session.info.get(HELD)
    if held is None:
        held = session.info[HELD] = _Held()
    if not event.contains(session, "after_commit", _committed):
        event.listen(session, "after_transaction_create", _created)
        event.listen(session, "after_commit", _committed)
        event.listen(session, "after_transaction_end", _ended)
    held.asynchronous = held.asynchronous or asynchronous
    deciding = session.get_nested_transaction() or session.get_transaction()
    held.by_transaction.setdefault(deciding, []).append(invalidation)


def _created(session: Session, transaction: SessionTransaction) -> None:
    """A root transaction begins: it takes what was registered before any had."""
    held: _Held | None = session.info.get(HELD)
    if held is not None and transaction.parent is None and None in held.by_transaction:
        held.by_transaction[transaction] = held.by_transaction.pop(None)


def _committed(session: Session) -> None:
    """A savepoint was released or the root committed. Fires before the transaction
    closes, so the one committing is still the session's innermost."""
    held: _Held | None = session.info.get(HELD)
    if held is None:
        return
    transaction = session.get_nested_transaction() or session.get_transaction()
    if transaction is None:
        return
    parent = _deciding(transaction.parent)
    if parent is None:
        held.committed = transaction  # run in _ended, once the session is consistent
        return
    released = held.by_transaction.pop(transaction, None)
    if released:  # a savepoint's invalidations now live or die with its parent
        held.by_transaction.setdefault(parent, []).extend(released)


def _ended(session: Session, transaction: SessionTransaction) -> None:
    """Any transaction ends. Invalidations still held by it either were committed
    (the root: run them) or were rolled back (dropped)."""
    held: _Held | None = session.info.get(HELD)
    if held is None:
        return
    invalidations = held.by_transaction.pop(transaction, None)
    if held.committed is not transaction:
        if invalidations:
            logger.debug("rolled back: %d invalidations dropped", len(invalidations))
        return
    held.committed = None
    if invalidations:
        _run(invalidations, held.asynchronous)


def _deciding(transaction: SessionTransaction | None) -> SessionTransaction | None:
    """The savepoint or root a transaction belongs to: a flush's subtransaction
    decides nothing."""
    while transaction is not None and transaction.parent is not None and not transaction.nested:
        transaction = transaction.parent
    return transaction


def _run(invalidations: list[DeferredInvalidation], asynchronous: bool) -> None:
    """Run after a commit. An AsyncSession commits in a greenlet of the event loop's
    task, so the async invalidations are awaited there, before `await commit()`
    returns. They run as a shielded task: a cancelled commit does not cut them short."""
    if not asynchronous:
        run_all(invalidations)
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        logger.error(
            "%d invalidations after commit were not run: the session was committed "
            "outside an event loop; commit an AsyncSession with `await session.commit()`",
            len(invalidations),
        )
        return
    task = loop.create_task(arun_all(invalidations))
    _running.add(task)
    task.add_done_callback(_running.discard)
    try:
        await_in_greenlet(asyncio.shield(task))
    except MissingGreenlet:  # committed through .sync_session: they run in the background
        logger.debug("invalidations after commit run in the background: no greenlet")
