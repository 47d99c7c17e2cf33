"""Invalidations held back until a database transaction commits: what the SQLAlchemy
and Django integrations share. Running them never raises an Exception: the database
has committed by then, and a cache error must not read as a failed commit.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, ParamSpec, Protocol

from .._errors import CacheUnavailableError
from .._results import BulkOutcome, Outcome

__all__ = [
    "AsyncInvalidates",
    "AsyncInvalidatesMany",
    "DeferredInvalidation",
    "Invalidates",
    "InvalidatesMany",
    "arun_all",
    "deferred",
    "deferred_many",
    "refuse_async",
    "run_all",
]

logger = logging.getLogger("cached_aside.integrations")

P = ParamSpec("P")


class Invalidates(Protocol[P]):
    """A decorated plain function, or such a method bound to its instance."""

    def key(self, *args: P.args, **kwargs: P.kwargs) -> str: ...

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> Outcome: ...


class AsyncInvalidates(Protocol[P]):
    """A decorated `async def` function, or such a method bound to its instance."""

    def key(self, *args: P.args, **kwargs: P.kwargs) -> str: ...

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> Awaitable[Outcome]: ...


class InvalidatesMany(Protocol):
    """A decorated plain function's `invalidate_many`."""

    def invalidate_many(self, items: Iterable[Any]) -> BulkOutcome: ...


class AsyncInvalidatesMany(Protocol):
    """A decorated `async def` function's `invalidate_many`."""

    def invalidate_many(self, items: Iterable[Any]) -> Awaitable[BulkOutcome]: ...


class DeferredInvalidation:
    """One invalidation to run again once the transaction commits.

    `name` is what the logs show: the entry's key, or the function and item count.
    """

    __slots__ = ("call", "name")

    def __init__(self, call: Callable[[], object], name: str) -> None:
        self.call = call
        self.name = name

    def __repr__(self) -> str:
        return f"<DeferredInvalidation {self.name}>"


def refuse_async(fn: Any, instead: str) -> None:
    """A sync commit cannot await an `async def` function's invalidation: say so at the
    write, where the caller sees it, not in a log line after the commit."""
    for method in ("invalidate", "invalidate_many"):
        if inspect.iscoroutinefunction(getattr(fn, method, None)):
            raise TypeError(
                f"{getattr(fn, '__qualname__', fn)!r} is an async def function: its "
                f"invalidation cannot run after a sync commit; {instead}"
            )


def deferred(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> DeferredInvalidation:
    """`fn.invalidate(*args, **kwargs)`, for later. Rendering the key now checks the
    arguments while the caller can still see the error, not after the commit."""
    key = fn.key(*args, **kwargs)
    return DeferredInvalidation(lambda: fn.invalidate(*args, **kwargs), key)


def deferred_many(fn: Any, items: Sequence[Any]) -> DeferredInvalidation:
    """`fn.invalidate_many(items)`, for later."""
    name = f"{getattr(fn, '__qualname__', repr(fn))}.invalidate_many({len(items)} items)"
    return DeferredInvalidation(lambda: fn.invalidate_many(items), name)


def run_all(invalidations: Iterable[DeferredInvalidation]) -> None:
    """Run invalidations of plain functions, in order; log what failed, raise nothing."""
    for each in invalidations:
        try:
            result = each.call()
            if inspect.isawaitable(result):
                _close(result)
                logger.error(
                    "%s: an async function's invalidation cannot run after a sync "
                    "commit; register it with the async helper (ainvalidate_on_commit)",
                    each.name,
                )
                continue
        except Exception as exc:  # the commit happened: report, never raise
            _failed(each, exc)
        else:
            _report(each, result)


async def arun_all(invalidations: Iterable[DeferredInvalidation]) -> None:
    """Run invalidations of `async def` (or plain) functions, in order; log what
    failed, raise nothing but a cancellation."""
    for each in invalidations:
        try:
            result = each.call()
            if inspect.isawaitable(result):
                result = await result
        except Exception as exc:  # the commit happened: report, never raise
            _failed(each, exc)
        else:
            _report(each, result)


def _report(each: DeferredInvalidation, result: object) -> None:
    """PENDING is not an error (the outbox delivers it) but a commit's caller never
    sees the Outcome, so the log says it instead."""
    pending = result is Outcome.PENDING or (isinstance(result, BulkOutcome) and not result.complete)
    if pending:
        logger.warning(
            "invalidation after commit of %s is pending: Redis did not take it; the "
            "engine's outbox retries it until it lands",
            each.name,
        )


def _failed(each: DeferredInvalidation, exc: Exception) -> None:
    if isinstance(exc, CacheUnavailableError):  # fail_open=False: queued all the same
        logger.warning(
            "invalidation after commit of %s is pending (%s); the database committed, "
            "and the engine's outbox retries it until it lands",
            each.name,
            exc,
        )
        return
    logger.error(
        "invalidation after commit of %s failed; the database committed",
        each.name,
        exc_info=exc,
    )


def _close(awaitable: Awaitable[Any]) -> None:
    """An awaitable that will never be awaited: close a coroutine, so that Python does
    not warn that it was never awaited."""
    close = getattr(awaitable, "close", None)
    if close is not None:
        close()
