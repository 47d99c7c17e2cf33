"""Invalidate after a Django transaction commits (the `django` extra), through
`transaction.on_commit`; add "cached_aside.integrations.django" to INSTALLED_APPS to
build the default engine from `settings.CACHED_ASIDE` (see `apps`).

`invalidate_on_commit(fn, *args)` invalidates now, at the write, and again once the
transaction commits; Django drops the second one if the transaction, or the savepoint
(inner `atomic` block) it was made in, rolls back.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# Django ships no type hints (and django-stubs needs a mypy plugin): its names are Any.
from django.db import DEFAULT_DB_ALIAS, connections, transaction

from ..._results import BulkOutcome, Outcome
from .._deferred import (
    DeferredInvalidation,
    Invalidates,
    InvalidatesMany,
    deferred,
    deferred_many,
    refuse_async,
    run_all,
)

__all__ = ["invalidate_many_on_commit", "invalidate_on_commit"]

ASYNC_REFUSED = (
    "Django's on_commit runs plain functions: use this helper with plain def "
    "functions, or await fn.invalidate(...) yourself once the transaction has committed"
)


def invalidate_on_commit(
    fn: Invalidates[...], *args: Any, using: str | None = None, **kwargs: Any
) -> Outcome:
    """Invalidate `fn(*args, **kwargs)`'s entry now and again after the transaction
    of database `using` commits.

    Call it where you write the row. The invalidation now revokes the lease of any
    load in flight; the one after the commit removes what a reader cached from the old
    row meanwhile and fences its loads again. Outside `atomic` (autocommit), the write
    has committed already: it invalidates once, now.

    Args:
        fn: a decorated plain function, or such a method read from its instance.
        *args: the loader's arguments, as for `fn.invalidate`.
        using: the database alias (default: "default"). A loader keyword argument
            named `using` must be passed positionally.
        **kwargs: the loader's keyword arguments.

    Returns:
        The Outcome of the invalidation now. The one after the commit never raises
        out of the commit: a failure is logged (the `cached_aside.integrations`
        logger) and, when Redis did not take it, left to the engine's outbox.

    Raises:
        KeyArgumentError: an argument cannot be part of a key (nothing is registered).
        TransactionManagementError: in manual transaction management, as
            `transaction.on_commit` does.
        CacheUnavailableError: Redis failed now and `fn` has fail_open=False; the
            invalidation after the commit stays registered.
    """
    refuse_async(fn, ASYNC_REFUSED)
    invalidation = deferred(fn, args, kwargs)
    if _committed_already(using):
        return fn.invalidate(*args, **kwargs)
    _register(invalidation, using)
    return fn.invalidate(*args, **kwargs)


def invalidate_many_on_commit(
    fn: InvalidatesMany, items: Iterable[Any], *, using: str | None = None
) -> BulkOutcome:
    """`fn.invalidate_many(items)` now and again after the transaction commits;
    dropped on rollback, as for `invalidate_on_commit`. Items as for `fn.many()`."""
    refuse_async(fn, ASYNC_REFUSED)
    listed = list(items)
    if not _committed_already(using):
        _register(deferred_many(fn, listed), using)
    return fn.invalidate_many(listed)


def _committed_already(using: str | None) -> bool:
    """Autocommit and no `atomic` block: the write is committed, and Django would run
    an on_commit callback at once; one invalidation is enough."""
    connection = connections[using or DEFAULT_DB_ALIAS]
    return not connection.in_atomic_block and bool(transaction.get_autocommit(using))


def _register(invalidation: DeferredInvalidation, using: str | None) -> None:
    transaction.on_commit(lambda: run_all((invalidation,)), using=using)
