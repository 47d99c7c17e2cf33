"""What the user holds: CachedFunction and AsyncCachedFunction wrap a loader and
offer call, lookup, many, invalidate (one, many, all), update_field, key and stats.

Both are thin: they render the key, pick the engine's sync or async side, and hand
a flow to its driver. The user's function itself is never modified.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ParamSpec, TypeVar

from .batch_drivers import serve_many_async, serve_many_sync
from .batches import invalidate_many
from .defaults import default_engine
from .drivers import no_load, no_load_async, no_seal, run_async, run_sync, serve_async, serve_sync
from .effects import CommandFailed, Flow
from .engine import CacheEngine
from .flows import Served, invalidate, update_field
from .near import MISSING
from .wrapping import HIT_SOURCES, BoundCachedFunction, CachedBase, CacheResult

__all__ = ["AsyncCachedFunction", "BoundCachedFunction", "CacheResult", "CachedFunction"]

P = ParamSpec("P")
R = TypeVar("R")


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
            self._plan, key, engine.sync_side(), self.__wrapped__, args, kwargs
        )
        return (self._as_joiner(served) if joined else served).value  # type: ignore[no-any-return]

    def lookup(self, *args: P.args, **kwargs: P.kwargs) -> CacheResult[R]:
        """Like calling, but also tells how the value was served and the Redis time."""
        served, seconds = self._serve(args, kwargs)
        return CacheResult(
            served.value, served.source in HIT_SOURCES, served.source, seconds * 1000.0
        )

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """Delete the entry (value or negative sentinel); True if one existed."""
        engine, key = self._locate(args, kwargs)
        return self._change(engine, key, invalidate(self._plan, key))

    def update_field(self, *args: Any, **kwargs: Any) -> bool:
        """`update_field(*loader_args, field, value)`: change one field of a cached record.

        Hash mode only. Returns False, and writes nothing, when no record is cached.
        """
        loader_args, field, value = self._split_update(args)
        engine, key = self._locate(loader_args, kwargs)
        return self._change(engine, key, update_field(self._plan, key, field, value))

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
            engine.sync_side(),
            self.__wrapped__,
            [calls[p] for p in rest],
            [items[p] for p in rest],
            self._batch_loader,
        )
        return self._spread(self._near_merge(keys, found, rest, tickets, answers), positions)

    def invalidate_many(self, items: Iterable[Any]) -> int:
        """Delete many entries in one pipeline; returns how many existed. Items as for
        many()."""
        engine, keys, _, _, _ = self._distinct(items)
        side = engine.sync_side()
        existed = run_sync(invalidate_many(self._plan, keys), side, no_load, no_seal)[0]
        for key in keys:
            side.flights.forget(key)
        self._near_drop(keys)
        return existed

    def invalidate_all(self) -> int:
        """Delete every entry this function cached, on every node; returns how many.

        Pages through the keys with SCAN and deletes them with UNLINK, so Redis is
        never blocked. Raises CacheUnavailableError if Redis fails part way.
        """
        engine = self._engine or default_engine()
        side = engine.sync_side()
        try:
            deleted = run_sync(self._everything(engine), side, no_load, no_seal)[0]
        except CommandFailed as failure:
            raise self._bulk_failed(failure) from failure.cause
        finally:
            side.flights.forget_all()
            self._near_clear()
        return deleted

    def _change(self, engine: CacheEngine, key: str, flow: Flow[bool]) -> bool:
        side = engine.sync_side()
        changed = run_sync(flow, side, no_load, no_seal)[0]
        # Only now: a read already sharing a lookup made before the change may finish
        # with it, but no read that starts after this call returns may join it.
        side.flights.forget(key)
        self._near_drop((key,))
        return changed

    def _serve(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Served, float]:
        engine, key = self._locate(args, kwargs)
        if self._near is not None:
            return self._near_serve(engine, key, args, kwargs)
        served, seconds, joined = serve_sync(
            self._plan, key, engine.sync_side(), self.__wrapped__, args, kwargs
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
            self._plan, key, engine.sync_side(), self.__wrapped__, args, kwargs
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
            self._plan, key, engine.async_side(), self.__wrapped__, args, kwargs
        )
        return (self._as_joiner(served) if joined else served).value  # type: ignore[no-any-return]

    async def lookup(self, *args: P.args, **kwargs: P.kwargs) -> CacheResult[R]:
        """Like calling, but also tells how the value was served and the Redis time."""
        served, seconds = await self._serve(args, kwargs)
        return CacheResult(
            served.value, served.source in HIT_SOURCES, served.source, seconds * 1000.0
        )

    async def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """Delete the entry (value or negative sentinel); True if one existed."""
        engine, key = self._locate(args, kwargs)
        return await self._change(engine, key, invalidate(self._plan, key))

    async def update_field(self, *args: Any, **kwargs: Any) -> bool:
        """`await update_field(*loader_args, field, value)`: change one cached field.

        Hash mode only. Returns False, and writes nothing, when no record is cached.
        """
        loader_args, field, value = self._split_update(args)
        engine, key = self._locate(loader_args, kwargs)
        return await self._change(engine, key, update_field(self._plan, key, field, value))

    async def many(self, items: Iterable[Any]) -> list[R]:
        """Values for many calls at once, in the items' order; as CachedFunction.many,
        with the misses loaded concurrently when there is no batch_loader."""
        engine, keys, calls, items, positions = self._distinct(items)
        found, rest, tickets = self._near_split(keys)
        answers = await serve_many_async(
            self._plan,
            [keys[p] for p in rest],
            engine.async_side(),
            self.__wrapped__,
            [calls[p] for p in rest],
            [items[p] for p in rest],
            self._batch_loader,
        )
        return self._spread(self._near_merge(keys, found, rest, tickets, answers), positions)

    async def invalidate_many(self, items: Iterable[Any]) -> int:
        """Delete many entries in one pipeline; returns how many existed."""
        engine, keys, _, _, _ = self._distinct(items)
        side = engine.async_side()
        if not side.ready:
            await side.prepare()
        flow = invalidate_many(self._plan, keys)
        existed = (await run_async(flow, side, no_load_async, no_seal))[0]
        for key in keys:
            side.flights.forget(key)
        self._near_drop(keys)
        return existed

    async def invalidate_all(self) -> int:
        """Delete every entry this function cached; as CachedFunction.invalidate_all."""
        engine = self._engine or default_engine()
        side = engine.async_side()
        if not side.ready:
            await side.prepare()
        try:
            deleted = (await run_async(self._everything(engine), side, no_load_async, no_seal))[0]
        except CommandFailed as failure:
            raise self._bulk_failed(failure) from failure.cause
        finally:
            side.flights.forget_all()
            self._near_clear()
        return deleted

    async def _change(self, engine: CacheEngine, key: str, flow: Flow[bool]) -> bool:
        side = engine.async_side()
        if not side.ready:
            await side.prepare()
        changed = (await run_async(flow, side, no_load_async, no_seal))[0]
        side.flights.forget(key)  # after the change, as in CachedFunction._change
        self._near_drop((key,))
        return changed

    async def _serve(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Served, float]:
        engine, key = self._locate(args, kwargs)
        if self._near is not None:
            return await self._near_serve(engine, key, args, kwargs)
        served, seconds, joined = await serve_async(
            self._plan, key, engine.async_side(), self.__wrapped__, args, kwargs
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
            self._plan, key, engine.async_side(), self.__wrapped__, args, kwargs
        )
        return self._near_keep(key, ticket, served, joined), seconds
