"""What the user holds: CachedFunction and AsyncCachedFunction wrap a loader and
offer call, lookup, many, invalidate (one, many, all), update_field, key and stats;
and their bound forms, for decorated methods.

Both are thin: _wrapping.CachedBase builds each operation's flow; these hand it to
their driver. Twins for the type checker's sake (a call returns R or a coroutine of
R); each method is one step. The user's function itself is never modified.
"""

from __future__ import annotations

import warnings
from asyncio import _get_running_loop  # no exception when none: cheap on every call
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar, overload

from ._defaults import default_engine
from ._drivers import arun, aserve, no_seal, run, serve
from ._errors import BlockingCallWarning
from ._near import MISSING
from ._plan import Served
from ._reads import FIRST_STEPS, NEAR, as_joiner
from ._results import BulkOutcome, CacheResult, Outcome
from ._wrapping import Bound, CachedBase, Write

if TYPE_CHECKING:
    from ._engine import CacheEngine

__all__ = [
    "AsyncCachedFunction",
    "BoundAsyncCachedFunction",
    "BoundCachedFunction",
    "CachedFunction",
]

P = ParamSpec("P")
Q = ParamSpec("Q")
R = TypeVar("R")
S = TypeVar("S")  # the instance a decorated method is bound to
T = TypeVar("T")
Sync = TypeVar("Sync", bound="CachedFunction[Any, Any]")
Async = TypeVar("Async", bound="AsyncCachedFunction[Any, Any]")


class CachedFunction(CachedBase[P, R]):
    """A cached plain function. Call it like the loader."""

    _warned_of_loop = False

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        # _locate and _serve_at spelled out: the hit path, where each Python call costs ~0.1 µs.
        engine = self._engine or default_engine()
        if engine is not self._registered_with:
            self._register(engine)
        known_engine, known = self._keys
        key = (
            known.get(args[0])
            if known_engine is engine and len(args) == 1 and not kwargs and type(args[0]) is str
            else None
        ) or self._key_at(engine, args, kwargs)
        value: R
        near = self._near
        if near is not None:
            # _near_look spelled out, for the near hit
            if FIRST_STEPS[engine.outbox.active and engine.outbox.blocks(key)][True][False] is NEAR:
                value = near.get(key)
                if value is not MISSING:
                    self._plan.stats.near_hit()
                    return value
            value = self._serve_at(engine, key, args, kwargs)[0].value
            return value
        if _get_running_loop() is not None:
            self._on_event_loop()
        call = (self.__wrapped__, args, kwargs)
        served, _, joined = serve(self._plan, key, engine.sides.sync_side(), call)
        value = (as_joiner(self._plan, served) if joined else served).value
        return value

    def lookup(self, *args: P.args, **kwargs: P.kwargs) -> CacheResult[R]:
        """Like calling, but also tells how the value was served and the Redis time."""
        return self._result(*self._serve_at(*self._locate(args, kwargs), args, kwargs))

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> Outcome:
        """Delete the entry (value or negative sentinel) and fence loads in flight.

        Returns Outcome.DELETED, Outcome.ABSENT (nothing was cached), or
        Outcome.PENDING: Redis did not take it, so it waits in the engine's outbox,
        retried until it lands, and this process serves the key from the loader
        meanwhile. With fail_open=False, PENDING raises CacheUnavailableError instead.
        """
        return self._write(self._invalidation(args, kwargs))

    def refresh(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Load now and store, whatever is cached, and return the value: after a change
        you know of, or to warm a key. A load already under way elsewhere may have read
        the row before that change: its lease is revoked (its result is not stored)
        and this call loads; callers arriving meanwhile wait for this load. Refreshes
        of this process at once share one load begun after their calls; one arriving
        while a load of the key runs here waits for it to end, then loads."""
        if _get_running_loop() is not None:
            self._on_event_loop()
        runtime = self._engine_in_use().sides.sync_side()
        reloading = self._reload(args, kwargs, runtime)
        try:
            (served, _), joined = runtime.flights.reload(
                reloading.keys[0], self._plan.patience, run, *reloading.run_args(runtime)
            )
            value: R = (as_joiner(self._plan, served) if joined else served).value
            return value
        finally:
            self._written(runtime, reloading.keys)

    def set(self, *args: Any, value: Any, **kwargs: Any) -> Outcome:
        """`set(*loader_args, value=...)`: store `value` as the entry (a cache-put after
        a write you made to the primary), revoking the lease of any load in flight so
        its older result cannot overwrite it. `value` is what the loader would return
        (None: a cached "no such record"); cache_if applies. Returns Outcome.UPDATED,
        Outcome.DELETED/ABSENT when it was not storable as a value (cache_if said
        no, or None without negative caching, or Redis did not give it its tags'
        versions: the entry was invalidated instead), or Outcome.PENDING (Redis failed;
        the invalidation waits in the outbox)."""
        return self._write(self._put(args, kwargs, value))

    def update_field(
        self, *args: Any, field: str | None = None, value: Any = None, **kwargs: Any
    ) -> Outcome:
        """`update_field(*loader_args, field, value)`: change one field of a cached
        record (also `update_field(*loader_args, field=..., value=...)`).

        Hash mode only. Loads in flight are fenced as by invalidate(). Returns
        Outcome.UPDATED, Outcome.ABSENT (nothing cached: nothing written), or
        Outcome.PENDING: Redis failed, and the entry's invalidation waits in the outbox.
        With cache_if, it invalidates instead (DELETED or ABSENT): the predicate
        judges whole records.
        With tags=, the record keeps its stamp and its tags' versions are renewed.
        """
        return self._write(self._field_update(args, kwargs, field, value))

    def many(self, items: Iterable[Any]) -> list[R]:
        """Values for many calls at once, in the items' order.

        Each item is the loader's single argument, or a tuple of its positional
        arguments. The lookups go out in one pipeline (one round trip per Redis node);
        misses go to the decorator's batch_loader in one call when it has one, else
        through the loader one at a time, each under the single-flight lock.
        """
        if _get_running_loop() is not None:
            self._on_event_loop()
        call = self._many(items)
        runtime = call.engine.sides.sync_side()
        return call.values(run(call.flow(runtime), runtime, call.loads, no_seal)[0])

    def invalidate_many(self, items: Iterable[Any]) -> BulkOutcome:
        """Delete many entries in one pipeline. Items as for many(). Those Redis did
        not take wait in the outbox (`pending`), as for invalidate()."""
        return self._write(self._invalidations(items))

    def invalidate_all(self) -> BulkOutcome:
        """Delete every entry this function cached, on every node.

        Pages through the keys with SCAN and deletes them with UNLINK, so Redis is
        never blocked. If Redis fails part way, the rest waits in the outbox
        (`pending=1`) and this process serves the function from the loader meanwhile.
        """
        return self._write(self._invalidation_of_all())

    @overload
    def __get__(self: Sync, instance: None, owner: type | None = None) -> Sync: ...

    @overload
    def __get__(
        self: CachedFunction[Concatenate[S, Q], R], instance: S, owner: type | None = None
    ) -> BoundCachedFunction[Q, R]: ...

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        """Decorating a method: bind the instance like a function would."""
        return self if instance is None else BoundCachedFunction(self, instance)

    def _serve_at(
        self, engine: CacheEngine, key: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Served, float]:
        hit, ticket = self._near_look(engine, key)
        if hit is not None:
            return hit, 0.0
        if _get_running_loop() is not None:
            self._on_event_loop()
        runtime = engine.sides.sync_side()
        try:
            served, seconds, joined = serve(
                self._plan, key, runtime, (self.__wrapped__, args, kwargs)
            )
        except BaseException:
            self._forget_ticket(key, ticket)
            raise
        return self._answer(key, ticket, served, joined), seconds

    def _write(self, write: Write[T]) -> T:
        if _get_running_loop() is not None:
            self._on_event_loop()
        runtime = write.engine.sides.sync_side()
        try:
            return run(write.flow, runtime, write.loads, no_seal)[0]
        finally:
            self._written(runtime, write.keys)

    def _on_event_loop(self) -> None:
        """Warn once per function: on a thread running an event loop, a Redis round
        trip or a loader here stalls every task of that loop (and awaiting the result
        then fails with a bare TypeError)."""
        if self._warned_of_loop:
            return
        self._warned_of_loop = True
        name = self._plan.name
        warnings.warn(
            BlockingCallWarning(
                f"{name} is a plain (sync) cached function called on a thread whose event "
                "loop is running: its Redis round trip and its loader block every task of "
                f"that loop. Declare it `async def {name.rsplit('.', 1)[-1]}(...)` (with an "
                "async loader body) so that @cache_aside makes an AsyncCachedFunction you "
                f"await, or call it off the loop: `await asyncio.to_thread({name}, ...)`"
            ),
            stacklevel=3,
        )


class AsyncCachedFunction(CachedBase[P, R]):
    """A cached `async def` function. Await it like the loader; every method is a
    coroutine, as CachedFunction's."""

    async def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        # Spelled out, as in CachedFunction.__call__.
        engine = self._engine or default_engine()
        if engine is not self._registered_with:
            self._register(engine)
        known_engine, known = self._keys
        key = (
            known.get(args[0])
            if known_engine is engine and len(args) == 1 and not kwargs and type(args[0]) is str
            else None
        ) or self._key_at(engine, args, kwargs)
        value: R
        near = self._near
        if near is not None:
            # _near_look spelled out, for the near hit
            if FIRST_STEPS[engine.outbox.active and engine.outbox.blocks(key)][True][False] is NEAR:
                value = near.get(key)
                if value is not MISSING:
                    self._plan.stats.near_hit()
                    return value
            value = (await self._serve_at(engine, key, args, kwargs))[0].value
            return value
        call = (self.__wrapped__, args, kwargs)
        served, _, joined = await aserve(self._plan, key, engine.sides.async_side(), call)
        value = (as_joiner(self._plan, served) if joined else served).value
        return value

    async def lookup(self, *args: P.args, **kwargs: P.kwargs) -> CacheResult[R]:
        """Like calling, but also tells how the value was served and the Redis time."""
        return self._result(*(await self._serve_at(*self._locate(args, kwargs), args, kwargs)))

    async def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> Outcome:
        """Delete the entry and fence loads in flight; as CachedFunction.invalidate."""
        return await self._write(self._invalidation(args, kwargs))

    async def refresh(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Load now and store, whatever is cached; as CachedFunction.refresh."""
        runtime = self._engine_in_use().sides.async_side()
        reloading = self._reload(args, kwargs, runtime)
        try:
            (served, _), joined = await runtime.flights.reload(
                reloading.keys[0], self._plan.patience, arun, *reloading.run_args(runtime)
            )
            value: R = (as_joiner(self._plan, served) if joined else served).value
            return value
        finally:
            self._written(runtime, reloading.keys)

    async def set(self, *args: Any, value: Any, **kwargs: Any) -> Outcome:
        """Store `value` as the entry, fencing loads in flight; as CachedFunction.set."""
        return await self._write(self._put(args, kwargs, value))

    async def update_field(
        self, *args: Any, field: str | None = None, value: Any = None, **kwargs: Any
    ) -> Outcome:
        """Change one cached field; as CachedFunction.update_field."""
        return await self._write(self._field_update(args, kwargs, field, value))

    async def many(self, items: Iterable[Any]) -> list[R]:
        """Values for many calls at once; as CachedFunction.many, with the misses
        loaded concurrently (at most 32 at a time) when there is no batch_loader."""
        call = self._many(items)
        runtime = call.engine.sides.async_side()
        return call.values((await arun(call.flow(runtime), runtime, call.loads, no_seal))[0])

    async def invalidate_many(self, items: Iterable[Any]) -> BulkOutcome:
        """Delete many entries in one pipeline; as CachedFunction.invalidate_many."""
        return await self._write(self._invalidations(items))

    async def invalidate_all(self) -> BulkOutcome:
        """Delete every entry this function cached; as CachedFunction.invalidate_all."""
        return await self._write(self._invalidation_of_all())

    @overload
    def __get__(self: Async, instance: None, owner: type | None = None) -> Async: ...

    @overload
    def __get__(
        self: AsyncCachedFunction[Concatenate[S, Q], R], instance: S, owner: type | None = None
    ) -> BoundAsyncCachedFunction[Q, R]: ...

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        """Decorating a method: bind the instance like a function would."""
        return self if instance is None else BoundAsyncCachedFunction(self, instance)

    async def _serve_at(
        self, engine: CacheEngine, key: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Served, float]:
        hit, ticket = self._near_look(engine, key)
        if hit is not None:
            return hit, 0.0
        runtime = engine.sides.async_side()
        call = (self.__wrapped__, args, kwargs)
        try:
            served, seconds, joined = await aserve(self._plan, key, runtime, call)
        except BaseException:
            self._forget_ticket(key, ticket)
            raise
        return self._answer(key, ticket, served, joined), seconds

    async def _write(self, write: Write[T]) -> T:
        runtime = write.engine.sides.async_side()
        try:
            return (await arun(write.flow, runtime, write.loads, no_seal))[0]
        finally:
            self._written(runtime, write.keys)


class BoundCachedFunction(Bound[Q, R]):
    """A CachedFunction decorated as a method, bound to one instance: the same API,
    without the instance in the arguments."""

    def __init__(self, function: CachedFunction[..., R], instance: object) -> None:
        super().__init__(function, instance)
        self._function = function

    def __call__(self, *args: Q.args, **kwargs: Q.kwargs) -> R:
        """The cached value, as calling the method."""
        return self._function(self._instance, *args, **kwargs)

    def lookup(self, *args: Q.args, **kwargs: Q.kwargs) -> CacheResult[R]:
        """As CachedFunction.lookup, for this instance."""
        return self._function.lookup(self._instance, *args, **kwargs)

    def invalidate(self, *args: Q.args, **kwargs: Q.kwargs) -> Outcome:
        """As CachedFunction.invalidate, for this instance."""
        return self._function.invalidate(self._instance, *args, **kwargs)

    def refresh(self, *args: Q.args, **kwargs: Q.kwargs) -> R:
        """As CachedFunction.refresh, for this instance."""
        return self._function.refresh(self._instance, *args, **kwargs)

    def set(self, *args: Any, value: Any, **kwargs: Any) -> Outcome:
        """As CachedFunction.set, for this instance."""
        return self._function.set(self._instance, *args, value=value, **kwargs)

    def update_field(
        self, *args: Any, field: str | None = None, value: Any = None, **kwargs: Any
    ) -> Outcome:
        """As CachedFunction.update_field, for this instance."""
        return self._function.update_field(
            self._instance, *args, field=field, value=value, **kwargs
        )

    def many(self, items: Iterable[Any]) -> list[R]:
        """Items as for many(), without the instance: it is prepended to each."""
        return self._function.many(self._items(items))

    def invalidate_many(self, items: Iterable[Any]) -> BulkOutcome:
        """As CachedFunction.invalidate_many; the instance is prepended to each item."""
        return self._function.invalidate_many(self._items(items))

    def invalidate_all(self) -> BulkOutcome:
        """As CachedFunction.invalidate_all: every instance's entries."""
        return self._function.invalidate_all()


class BoundAsyncCachedFunction(Bound[Q, R]):
    """An AsyncCachedFunction decorated as a method, bound to one instance."""

    def __init__(self, function: AsyncCachedFunction[..., R], instance: object) -> None:
        super().__init__(function, instance)
        self._function = function

    async def __call__(self, *args: Q.args, **kwargs: Q.kwargs) -> R:
        """The cached value, as awaiting the method."""
        return await self._function(self._instance, *args, **kwargs)

    async def lookup(self, *args: Q.args, **kwargs: Q.kwargs) -> CacheResult[R]:
        """As AsyncCachedFunction.lookup, for this instance."""
        return await self._function.lookup(self._instance, *args, **kwargs)

    async def invalidate(self, *args: Q.args, **kwargs: Q.kwargs) -> Outcome:
        """As AsyncCachedFunction.invalidate, for this instance."""
        return await self._function.invalidate(self._instance, *args, **kwargs)

    async def refresh(self, *args: Q.args, **kwargs: Q.kwargs) -> R:
        """As AsyncCachedFunction.refresh, for this instance."""
        return await self._function.refresh(self._instance, *args, **kwargs)

    async def set(self, *args: Any, value: Any, **kwargs: Any) -> Outcome:
        """As AsyncCachedFunction.set, for this instance."""
        return await self._function.set(self._instance, *args, value=value, **kwargs)

    async def update_field(
        self, *args: Any, field: str | None = None, value: Any = None, **kwargs: Any
    ) -> Outcome:
        """As AsyncCachedFunction.update_field, for this instance."""
        return await self._function.update_field(
            self._instance, *args, field=field, value=value, **kwargs
        )

    async def many(self, items: Iterable[Any]) -> list[R]:
        """Items as for many(), without the instance: it is prepended to each."""
        return await self._function.many(self._items(items))

    async def invalidate_many(self, items: Iterable[Any]) -> BulkOutcome:
        """As AsyncCachedFunction.invalidate_many; the instance goes first in each item."""
        return await self._function.invalidate_many(self._items(items))

    async def invalidate_all(self) -> BulkOutcome:
        """As AsyncCachedFunction.invalidate_all: every instance's entries."""
        return await self._function.invalidate_all()
