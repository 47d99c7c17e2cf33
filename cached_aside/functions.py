"""What the user holds: CachedFunction and AsyncCachedFunction wrap a loader and
offer call, lookup, invalidate, update_field, key and stats.

Both are thin: they render the key, pick the engine's sync or async side, and hand
a flow to its driver. The user's function itself is never modified.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, ParamSpec, TypeVar

from .batch_drivers import BatchLoader, serve_many_async, serve_many_sync
from .batches import invalidate_many, invalidate_matching
from .drivers import no_load, no_load_async, no_seal, run_async, run_sync, serve_async, serve_sync
from .effects import CommandFailed, Flow
from .engine import CacheEngine, default_engine
from .errors import CacheUnavailableError
from .flows import Plan, Served, Source, invalidate, update_field
from .keys import KeyTemplate, glob_escape, split_entry_key
from .stats import StatsSnapshot

P = ParamSpec("P")
R = TypeVar("R")

_HIT_SOURCES = frozenset({Source.CACHE, Source.NEGATIVE})


@dataclass(frozen=True, slots=True)
class CacheResult(Generic[R]):
    """One call's value and how it was served.

    Attributes:
        value: what the call returns.
        hit: True when served from Redis (a value or a cached "none").
        source: "cache", "negative", "loader" (this call loaded) or "waited"
            (another caller's load).
        redis_ms: time spent waiting on Redis for this call, in milliseconds.
    """

    value: R
    hit: bool
    source: Source
    redis_ms: float


class _CachedBase(Generic[P, R]):
    """The parts shared by sync and async wrappers: keys, engine choice, stats."""

    def __init__(
        self,
        loader: Callable[P, Any],
        template: KeyTemplate,
        plan: Plan,
        engine: CacheEngine | None,
        batch_loader: BatchLoader | None = None,
    ) -> None:
        functools.update_wrapper(self, loader)  # type: ignore[arg-type]  # callable subclasses
        self.__wrapped__ = loader
        self._template = template
        self._plan = plan
        self._engine = engine
        self._batch_loader = batch_loader
        self._registered_with: CacheEngine | None = None

    def _register(self, engine: CacheEngine) -> None:
        engine.register(self._plan.stats)
        self._registered_with = engine

    def _locate(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[CacheEngine, str]:
        """The engine to use and the entry's key; the first step of every method."""
        engine = self._engine or default_engine()
        if engine is not self._registered_with:
            self._register(engine)
        return engine, f"{engine.key_head}{self._template.render(args, kwargs)}}}"

    def key(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """The Redis key these arguments map to, for redis-cli and debugging."""
        return self._locate(args, kwargs)[1]

    def stats(self) -> StatsSnapshot:
        """This function's counters since start or the last reset_stats()."""
        return self._plan.stats.snapshot()

    def error_kinds(self) -> dict[str, int]:
        """This function's Redis errors by exception type, e.g. {"TimeoutError": 2}."""
        return self._plan.stats.error_kinds()

    def reset_stats(self) -> None:
        self._plan.stats.reset()

    def _distinct(
        self, items: Iterable[Any]
    ) -> tuple[CacheEngine, list[str], list[tuple[Any, ...]], list[Any], list[int]]:
        """The engine, and the distinct keys of a batch with their arguments and items;
        plus, for each item, the position of its key."""
        if isinstance(items, str | bytes) or not isinstance(items, Iterable):
            raise TypeError(
                f"{self._plan.name}.many/invalidate_many take a list of items (one "
                f"argument, or a tuple of positional arguments, per call), got {items!r}"
            )
        engine = self._engine or default_engine()
        if engine is not self._registered_with:
            self._register(engine)
        head = engine.key_head
        keys: list[str] = []
        calls: list[tuple[Any, ...]] = []
        distinct_items: list[Any] = []
        where: dict[str, int] = {}
        positions: list[int] = []
        for item in items:
            args = item if type(item) is tuple else (item,)
            key = f"{head}{self._template.render(args, {})}}}"
            position = where.get(key)
            if position is None:
                position = where[key] = len(keys)
                keys.append(key)
                calls.append(args)
                distinct_items.append(item)
            positions.append(position)
        return engine, keys, calls, distinct_items, positions

    def _spread(self, answers: list[tuple[Served, bool]], positions: list[int]) -> list[Any]:
        """Each item's value; an item repeated in the batch gets its own copy."""
        values: list[Any] = []
        given: set[int] = set()
        for position in positions:
            served, joined = answers[position]
            if joined:
                served = self._as_joiner(served)
            if position in given:
                values.append(self._plan.codec.copy(served.value))
            else:
                given.add(position)
                values.append(served.value)
        return values

    def _everything(self, engine: CacheEngine) -> Flow[int]:
        """The flow that drops every entry this function's template can produce."""
        head, template = engine.key_head, self._template

        def belongs(key: str) -> bool:
            parts = split_entry_key(key, head)
            return parts is not None and template.owns(parts[0])

        return invalidate_matching(glob_escape(head + template.literal_head) + "*", belongs)

    def _bulk_failed(self, failure: CommandFailed) -> CacheUnavailableError:
        self._plan.stats.error(self._template.text, failure)
        return CacheUnavailableError(
            f"{self._plan.name}.invalidate_all stopped: Redis failed ({failure}); some "
            "entries may remain. Call it again once Redis answers"
        )

    def _as_joiner(self, served: Served) -> Served:
        """Account for a caller that shared another caller's read, and copy its value."""
        stats = self._plan.stats
        if served.source is Source.CACHE:
            stats.hit()
        elif served.source is Source.NEGATIVE:
            stats.negative_hit()
        else:
            stats.miss(suppressed=True)
            return Served(self._plan.codec.copy(served.value), Source.WAITED)
        return Served(self._plan.codec.copy(served.value), served.source)

    def _split_update(self, args: tuple[Any, ...]) -> tuple[tuple[Any, ...], Any, Any]:
        if len(args) < 2:
            raise TypeError(
                f"{self._plan.name}.update_field(*loader_args, field, value) needs the "
                "field name and value after the loader's arguments"
            )
        return args[:-2], args[-2], args[-1]

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        """Decorating a method: bind the instance like a function would."""
        if instance is None:
            return self
        return BoundCachedFunction(self, instance)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._plan.name} key={self._template.text!r}>"


class CachedFunction(_CachedBase[P, R]):
    """A cached plain function. Call it like the loader."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        # _serve spelled out: on the hit path every Python call costs microseconds.
        engine = self._engine or default_engine()
        if engine is not self._registered_with:
            self._register(engine)
        key = engine.key_head + self._template.render(args, kwargs) + "}"
        served, _, joined = serve_sync(
            self._plan, key, engine.sync_side(), self.__wrapped__, args, kwargs
        )
        return (self._as_joiner(served) if joined else served).value  # type: ignore[no-any-return]

    def lookup(self, *args: P.args, **kwargs: P.kwargs) -> CacheResult[R]:
        """Like calling, but also tells how the value was served and the Redis time."""
        served, seconds = self._serve(args, kwargs)
        return CacheResult(
            served.value, served.source in _HIT_SOURCES, served.source, seconds * 1000.0
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
        answers = serve_many_sync(
            self._plan,
            keys,
            engine.sync_side(),
            self.__wrapped__,
            calls,
            items,
            self._batch_loader,
        )
        return self._spread(answers, positions)

    def invalidate_many(self, items: Iterable[Any]) -> int:
        """Delete many entries in one pipeline; returns how many existed. Items as for
        many()."""
        engine, keys, _, _, _ = self._distinct(items)
        side = engine.sync_side()
        existed = run_sync(invalidate_many(self._plan, keys), side, no_load, no_seal)[0]
        for key in keys:
            side.flights.forget(key)
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
        side.flights.forget_all()
        return deleted

    def _change(self, engine: CacheEngine, key: str, flow: Flow[bool]) -> bool:
        side = engine.sync_side()
        changed = run_sync(flow, side, no_load, no_seal)[0]
        # Only now: a read already sharing a lookup made before the change may finish
        # with it, but no read that starts after this call returns may join it.
        side.flights.forget(key)
        return changed

    def _serve(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Served, float]:
        engine, key = self._locate(args, kwargs)
        served, seconds, joined = serve_sync(
            self._plan, key, engine.sync_side(), self.__wrapped__, args, kwargs
        )
        return (self._as_joiner(served) if joined else served), seconds


class AsyncCachedFunction(_CachedBase[P, R]):
    """A cached `async def` function. Await it like the loader."""

    async def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        # _serve spelled out: on the hit path every Python call costs microseconds.
        engine = self._engine or default_engine()
        if engine is not self._registered_with:
            self._register(engine)
        key = engine.key_head + self._template.render(args, kwargs) + "}"
        served, _, joined = await serve_async(
            self._plan, key, engine.async_side(), self.__wrapped__, args, kwargs
        )
        return (self._as_joiner(served) if joined else served).value  # type: ignore[no-any-return]

    async def lookup(self, *args: P.args, **kwargs: P.kwargs) -> CacheResult[R]:
        """Like calling, but also tells how the value was served and the Redis time."""
        served, seconds = await self._serve(args, kwargs)
        return CacheResult(
            served.value, served.source in _HIT_SOURCES, served.source, seconds * 1000.0
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
        answers = await serve_many_async(
            self._plan,
            keys,
            engine.async_side(),
            self.__wrapped__,
            calls,
            items,
            self._batch_loader,
        )
        return self._spread(answers, positions)

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
        side.flights.forget_all()
        return deleted

    async def _change(self, engine: CacheEngine, key: str, flow: Flow[bool]) -> bool:
        side = engine.async_side()
        if not side.ready:
            await side.prepare()
        changed = (await run_async(flow, side, no_load_async, no_seal))[0]
        side.flights.forget(key)  # after the change, as in CachedFunction._change
        return changed

    async def _serve(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Served, float]:
        engine, key = self._locate(args, kwargs)
        served, seconds, joined = await serve_async(
            self._plan, key, engine.async_side(), self.__wrapped__, args, kwargs
        )
        return (self._as_joiner(served) if joined else served), seconds


class BoundCachedFunction:
    """A cached function decorated as a method, bound to one instance."""

    __slots__ = ("_function", "_instance")

    def __init__(self, function: _CachedBase[..., Any], instance: object) -> None:
        self._function = function
        self._instance = instance

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._function(self._instance, *args, **kwargs)  # type: ignore[operator]

    def lookup(self, *args: Any, **kwargs: Any) -> Any:
        return self._function.lookup(self._instance, *args, **kwargs)  # type: ignore[attr-defined]

    def invalidate(self, *args: Any, **kwargs: Any) -> Any:
        return self._function.invalidate(self._instance, *args, **kwargs)  # type: ignore[attr-defined]

    def update_field(self, *args: Any, **kwargs: Any) -> Any:
        return self._function.update_field(self._instance, *args, **kwargs)  # type: ignore[attr-defined]

    def key(self, *args: Any, **kwargs: Any) -> str:
        return self._function.key(self._instance, *args, **kwargs)

    def many(self, items: Iterable[Any]) -> Any:
        """Items as for many(), without the instance: it is prepended to each."""
        bound = [(self._instance, *(i if type(i) is tuple else (i,))) for i in items]
        return self._function.many(bound)  # type: ignore[attr-defined]

    def invalidate_many(self, items: Iterable[Any]) -> Any:
        bound = [(self._instance, *(i if type(i) is tuple else (i,))) for i in items]
        return self._function.invalidate_many(bound)  # type: ignore[attr-defined]

    def invalidate_all(self) -> Any:
        return self._function.invalidate_all()  # type: ignore[attr-defined]

    def stats(self) -> StatsSnapshot:
        return self._function.stats()

    def reset_stats(self) -> None:
        self._function.reset_stats()
