"""What the user holds: CachedFunction and AsyncCachedFunction wrap a loader and
offer call, lookup, invalidate, update_field, key and stats.

Both are thin: they render the key, pick the engine's sync or async side, and hand
a flow to its driver. The user's function itself is never modified.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, ParamSpec, TypeVar

from .drivers import no_seal, run_async, run_sync, serve_async, serve_sync
from .effects import Flow
from .engine import CacheEngine, default_engine
from .flows import Plan, Served, Source, invalidate, update_field
from .keys import KeyTemplate
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


def _no_load() -> Any:
    raise AssertionError("this flow never loads")


async def _no_async_load() -> Any:
    raise AssertionError("this flow never loads")


class _CachedBase(Generic[P, R]):
    """The parts shared by sync and async wrappers: keys, engine choice, stats."""

    def __init__(
        self,
        loader: Callable[P, Any],
        template: KeyTemplate,
        plan: Plan,
        engine: CacheEngine | None,
    ) -> None:
        functools.update_wrapper(self, loader)  # type: ignore[arg-type]  # callable subclasses
        self.__wrapped__ = loader
        self._template = template
        self._plan = plan
        self._engine = engine
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

    def _change(self, engine: CacheEngine, key: str, flow: Flow[bool]) -> bool:
        side = engine.sync_side()
        changed = run_sync(flow, side, _no_load, no_seal)[0]
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

    async def _change(self, engine: CacheEngine, key: str, flow: Flow[bool]) -> bool:
        side = engine.async_side()
        if not side.ready:
            await side.prepare()
        changed = (await run_async(flow, side, _no_async_load, no_seal))[0]
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

    def stats(self) -> StatsSnapshot:
        return self._function.stats()

    def reset_stats(self) -> None:
        self._function.reset_stats()
