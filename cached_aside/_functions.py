"""What the user holds: CachedFunction and AsyncCachedFunction wrap a loader and
offer call, lookup, many, invalidate (one, many, all), update_field, key and stats.

Both are thin: they render the key, pick the engine's sync or async side, and hand
a flow to its driver. The user's function itself is never modified.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar, overload

from ._batch_drivers import serve_many_async, serve_many_sync
from ._batches import invalidate_many, invalidate_pattern
from ._defaults import default_engine
from ._drivers import no_load, no_load_async, no_seal, run_async, run_sync, serve_async, serve_sync
from ._effects import Flow
from ._engine import CacheEngine
from ._flows import Served, invalidate, update_field
from ._near import MISSING
from ._results import HIT_SOURCES, BulkOutcome, CacheResult, Outcome
from ._stats import StatsSnapshot
from ._wrapping import _NOT_GIVEN, CachedBase

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
Sync = TypeVar("Sync", bound="CachedFunction[Any, Any]")
Async = TypeVar("Async", bound="AsyncCachedFunction[Any, Any]")


class CachedFunction(CachedBase[P, R]):
    """A cached plain function. Call it like the loader."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        # _serve spelled out: on the hit path every Python call costs microseconds.
        engine = self._engine or default_engine()
        if engine is not self._registered_with:
            self._register(engine)
        key = engine.key_head + self._template.render(args, kwargs) + "}"
        near = self._near
        if near is not None:
            value = near.get(key)
            if value is not MISSING:
                self._plan.stats.near_hit()
                return value  # type: ignore[no-any-return]
            return self._near_serve(engine, key, args, kwargs)[0].value  # type: ignore[no-any-return]
        served, _, joined = serve_sync(
            self._plan, key, engine._sync_side(), self.__wrapped__, args, kwargs
        )
        return (self._as_joiner(served) if joined else served).value  # type: ignore[no-any-return]

    def lookup(self, *args: P.args, **kwargs: P.kwargs) -> CacheResult[R]:
        """Like calling, but also tells how the value was served and the Redis time."""
        served, seconds = self._serve(args, kwargs)
        return CacheResult(
            served.value, served.source in HIT_SOURCES, served.source, seconds * 1000.0
        )

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> Outcome:
        """Delete the entry (value or negative sentinel) and fence loads in flight.

        Returns Outcome.DELETED, Outcome.ABSENT (nothing was cached), or
        Outcome.PENDING: Redis did not take it, so it waits in the engine's outbox,
        retried until it lands, and this process serves the key from the loader
        meanwhile. With fail_open=False, PENDING raises CacheUnavailableError instead.
        """
        engine, key = self._locate(args, kwargs)
        return self._change(engine, key, invalidate(self._plan, key, self._covering(engine)))

    def update_field(
        self, *args: Any, field: Any = _NOT_GIVEN, value: Any = _NOT_GIVEN, **kwargs: Any
    ) -> Outcome:
        """`update_field(*loader_args, field, value)`: change one field of a cached
        record (also `update_field(*loader_args, field=..., value=...)`).

        Hash mode only. Loads in flight are fenced as by invalidate(). Returns
        Outcome.UPDATED, Outcome.ABSENT (nothing cached: nothing written), or
        Outcome.PENDING: Redis failed, and the entry's invalidation waits in the outbox.
        """
        loader_args, field, value = self._split_update(args, field, value)
        engine, key = self._locate(loader_args, kwargs)
        flow = update_field(self._plan, key, field, value, self._covering(engine))
        return self._change(engine, key, flow)

    def many(self, items: Iterable[Any]) -> list[R]:
        """Values for many calls at once, in the items' order.

        Each item is the loader's single argument, or a tuple of its positional
        arguments. The lookups go out in one pipeline (one round trip per Redis node);
        misses go to the decorator's batch_loader in one call when it has one, else
        through the loader one at a time, each under the single-flight lock.
        """
        engine, keys, calls, items, positions = self._distinct(items)
        found, rest, tickets = self._near_split(keys)
        answers = serve_many_sync(
            self._plan,
            [keys[p] for p in rest],
            engine._sync_side(),
            self.__wrapped__,
            [calls[p] for p in rest],
            [items[p] for p in rest],
            self._batch_loader,
        )
        return self._spread(self._near_merge(keys, found, rest, tickets, answers), positions)

    def invalidate_many(self, items: Iterable[Any]) -> BulkOutcome:
        """Delete many entries in one pipeline. Items as for many(). Those Redis did
        not take wait in the outbox (`pending`), as for invalidate()."""
        engine, keys, _, _, _ = self._distinct(items)
        side = engine._sync_side()
        flow = invalidate_many(self._plan, keys, self._covering(engine))
        try:
            return run_sync(flow, side, no_load, no_seal)[0]
        finally:
            for key in keys:
                side.flights.forget(key)
            self._near_drop(keys)

    def invalidate_all(self) -> BulkOutcome:
        """Delete every entry this function cached, on every node.

        Pages through the keys with SCAN and deletes them with UNLINK, so Redis is
        never blocked. If Redis fails part way, the rest waits in the outbox
        (`pending=1`) and this process serves the function from the loader meanwhile.
        """
        engine = self._engine or default_engine()
        side = engine._sync_side()
        flow = invalidate_pattern(self._covering(engine), self._plan)
        try:
            return run_sync(flow, side, no_load, no_seal)[0]
        finally:
            side.flights.forget_all()
            self._near_clear()

    @overload
    def __get__(self: Sync, instance: None, owner: type | None = None) -> Sync: ...

    @overload
    def __get__(
        self: CachedFunction[Concatenate[S, Q], R], instance: S, owner: type | None = None
    ) -> BoundCachedFunction[Q, R]: ...

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        """Decorating a method: bind the instance like a function would."""
        if instance is None:
            return self
        return BoundCachedFunction(self, instance)

    def _change(self, engine: CacheEngine, key: str, flow: Flow[Outcome]) -> Outcome:
        side = engine._sync_side()
        try:
            return run_sync(flow, side, no_load, no_seal)[0]
        finally:
            # Only now: a read already sharing a lookup made before the change may
            # finish with it, but no read that starts after this call returns joins it.
            side.flights.forget(key)
            self._near_drop((key,))

    def _serve(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Served, float]:
        engine, key = self._locate(args, kwargs)
        if self._near is not None:
            return self._near_serve(engine, key, args, kwargs)
        served, seconds, joined = serve_sync(
            self._plan, key, engine._sync_side(), self.__wrapped__, args, kwargs
        )
        return (self._as_joiner(served) if joined else served), seconds

    def _near_serve(
        self, engine: CacheEngine, key: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Served, float]:
        """The near tier first; on a near miss, Redis, and a hit there is kept."""
        hit, ticket = self._near_look(key)
        if hit is not None:
            return hit, 0.0
        served, seconds, joined = serve_sync(
            self._plan, key, engine._sync_side(), self.__wrapped__, args, kwargs
        )
        return self._near_keep(key, ticket, served, joined), seconds


class AsyncCachedFunction(CachedBase[P, R]):
    """A cached `async def` function. Await it like the loader."""

    async def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        # _serve spelled out: on the hit path every Python call costs microseconds.
        engine = self._engine or default_engine()
        if engine is not self._registered_with:
            self._register(engine)
        key = engine.key_head + self._template.render(args, kwargs) + "}"
        near = self._near
        if near is not None:
            value = near.get(key)
            if value is not MISSING:
                self._plan.stats.near_hit()
                return value  # type: ignore[no-any-return]
            return (await self._near_serve(engine, key, args, kwargs))[0].value  # type: ignore[no-any-return]
        served, _, joined = await serve_async(
            self._plan, key, engine._async_side(), self.__wrapped__, args, kwargs
        )
        return (self._as_joiner(served) if joined else served).value  # type: ignore[no-any-return]

    async def lookup(self, *args: P.args, **kwargs: P.kwargs) -> CacheResult[R]:
        """Like calling, but also tells how the value was served and the Redis time."""
        served, seconds = await self._serve(args, kwargs)
        return CacheResult(
            served.value, served.source in HIT_SOURCES, served.source, seconds * 1000.0
        )

    async def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> Outcome:
        """Delete the entry and fence loads in flight; as CachedFunction.invalidate."""
        engine, key = self._locate(args, kwargs)
        flow = invalidate(self._plan, key, self._covering(engine))
        return await self._change(engine, key, flow)

    async def update_field(
        self, *args: Any, field: Any = _NOT_GIVEN, value: Any = _NOT_GIVEN, **kwargs: Any
    ) -> Outcome:
        """`await update_field(*loader_args, field, value)`: change one cached field;
        as CachedFunction.update_field."""
        loader_args, field, value = self._split_update(args, field, value)
        engine, key = self._locate(loader_args, kwargs)
        flow = update_field(self._plan, key, field, value, self._covering(engine))
        return await self._change(engine, key, flow)

    async def many(self, items: Iterable[Any]) -> list[R]:
        """Values for many calls at once, in the items' order; as CachedFunction.many,
        with the misses loaded concurrently when there is no batch_loader."""
        engine, keys, calls, items, positions = self._distinct(items)
        found, rest, tickets = self._near_split(keys)
        answers = await serve_many_async(
            self._plan,
            [keys[p] for p in rest],
            engine._async_side(),
            self.__wrapped__,
            [calls[p] for p in rest],
            [items[p] for p in rest],
            self._batch_loader,
        )
        return self._spread(self._near_merge(keys, found, rest, tickets, answers), positions)

    async def invalidate_many(self, items: Iterable[Any]) -> BulkOutcome:
        """Delete many entries in one pipeline; as CachedFunction.invalidate_many."""
        engine, keys, _, _, _ = self._distinct(items)
        side = engine._async_side()
        if not side.ready:
            await side.prepare()
        flow = invalidate_many(self._plan, keys, self._covering(engine))
        try:
            return (await run_async(flow, side, no_load_async, no_seal))[0]
        finally:
            for key in keys:
                side.flights.forget(key)
            self._near_drop(keys)

    async def invalidate_all(self) -> BulkOutcome:
        """Delete every entry this function cached; as CachedFunction.invalidate_all."""
        engine = self._engine or default_engine()
        side = engine._async_side()
        if not side.ready:
            await side.prepare()
        flow = invalidate_pattern(self._covering(engine), self._plan)
        try:
            return (await run_async(flow, side, no_load_async, no_seal))[0]
        finally:
            side.flights.forget_all()
            self._near_clear()

    @overload
    def __get__(self: Async, instance: None, owner: type | None = None) -> Async: ...

    @overload
    def __get__(
        self: AsyncCachedFunction[Concatenate[S, Q], R], instance: S, owner: type | None = None
    ) -> BoundAsyncCachedFunction[Q, R]: ...

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        """Decorating a method: bind the instance like a function would."""
        if instance is None:
            return self
        return BoundAsyncCachedFunction(self, instance)

    async def _change(self, engine: CacheEngine, key: str, flow: Flow[Outcome]) -> Outcome:
        side = engine._async_side()
        if not side.ready:
            await side.prepare()
        try:
            return (await run_async(flow, side, no_load_async, no_seal))[0]
        finally:
            side.flights.forget(key)  # after the change, as in CachedFunction._change
            self._near_drop((key,))

    async def _serve(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Served, float]:
        engine, key = self._locate(args, kwargs)
        if self._near is not None:
            return await self._near_serve(engine, key, args, kwargs)
        served, seconds, joined = await serve_async(
            self._plan, key, engine._async_side(), self.__wrapped__, args, kwargs
        )
        return (self._as_joiner(served) if joined else served), seconds

    async def _near_serve(
        self, engine: CacheEngine, key: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Served, float]:
        """As CachedFunction._near_serve."""
        hit, ticket = self._near_look(key)
        if hit is not None:
            return hit, 0.0
        served, seconds, joined = await serve_async(
            self._plan, key, engine._async_side(), self.__wrapped__, args, kwargs
        )
        return self._near_keep(key, ticket, served, joined), seconds


class _Bound(Generic[Q, R]):
    """What bound sync and async methods share: the instance goes first."""

    def __init__(self, function: CachedBase[..., R], instance: object) -> None:
        self._shared = function
        self._instance = instance
        self.__name__: str = getattr(function, "__name__", type(function).__name__)
        self.__qualname__: str = getattr(function, "__qualname__", self.__name__)
        self.__doc__ = function.__doc__
        self.__wrapped__ = function.__wrapped__

    def key(self, *args: Q.args, **kwargs: Q.kwargs) -> str:
        """The Redis key these arguments map to, for redis-cli and debugging."""
        return self._shared.key(self._instance, *args, **kwargs)

    def _items(self, items: Iterable[Any]) -> list[tuple[Any, ...]]:
        """Batch items with the instance prepended to each."""
        return [(self._instance, *(i if type(i) is tuple else (i,))) for i in items]

    def stats(self) -> StatsSnapshot:
        return self._shared.stats()

    def error_kinds(self) -> dict[str, int]:
        return self._shared.error_kinds()

    def reset_stats(self) -> None:
        self._shared.reset_stats()

    def __repr__(self) -> str:
        return f"<bound {self._shared!r} of {self._instance!r}>"


class BoundCachedFunction(_Bound[Q, R]):
    """A CachedFunction decorated as a method, bound to one instance: the same API,
    without the instance in the arguments."""

    def __init__(self, function: CachedFunction[..., R], instance: object) -> None:
        super().__init__(function, instance)
        self._function = function

    def __call__(self, *args: Q.args, **kwargs: Q.kwargs) -> R:
        return self._function(self._instance, *args, **kwargs)

    def lookup(self, *args: Q.args, **kwargs: Q.kwargs) -> CacheResult[R]:
        return self._function.lookup(self._instance, *args, **kwargs)

    def invalidate(self, *args: Q.args, **kwargs: Q.kwargs) -> Outcome:
        return self._function.invalidate(self._instance, *args, **kwargs)

    def update_field(
        self, *args: Any, field: Any = _NOT_GIVEN, value: Any = _NOT_GIVEN, **kwargs: Any
    ) -> Outcome:
        return self._function.update_field(
            self._instance, *args, field=field, value=value, **kwargs
        )

    def many(self, items: Iterable[Any]) -> list[R]:
        """Items as for many(), without the instance: it is prepended to each."""
        return self._function.many(self._items(items))

    def invalidate_many(self, items: Iterable[Any]) -> BulkOutcome:
        return self._function.invalidate_many(self._items(items))

    def invalidate_all(self) -> BulkOutcome:
        return self._function.invalidate_all()


class BoundAsyncCachedFunction(_Bound[Q, R]):
    """An AsyncCachedFunction decorated as a method, bound to one instance."""

    def __init__(self, function: AsyncCachedFunction[..., R], instance: object) -> None:
        super().__init__(function, instance)
        self._function = function

    async def __call__(self, *args: Q.args, **kwargs: Q.kwargs) -> R:
        return await self._function(self._instance, *args, **kwargs)

    async def lookup(self, *args: Q.args, **kwargs: Q.kwargs) -> CacheResult[R]:
        return await self._function.lookup(self._instance, *args, **kwargs)

    async def invalidate(self, *args: Q.args, **kwargs: Q.kwargs) -> Outcome:
        return await self._function.invalidate(self._instance, *args, **kwargs)

    async def update_field(
        self, *args: Any, field: Any = _NOT_GIVEN, value: Any = _NOT_GIVEN, **kwargs: Any
    ) -> Outcome:
        return await self._function.update_field(
            self._instance, *args, field=field, value=value, **kwargs
        )

    async def many(self, items: Iterable[Any]) -> list[R]:
        return await self._function.many(self._items(items))

    async def invalidate_many(self, items: Iterable[Any]) -> BulkOutcome:
        return await self._function.invalidate_many(self._items(items))

    async def invalidate_all(self) -> BulkOutcome:
        return await self._function.invalidate_all()
