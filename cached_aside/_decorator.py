"""cache_aside: the options, declared once, validated at decoration, applied to a
loader.

Everything that can be wrong with a decoration is reported here, once, before the
first call, with a message that says what to change.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar, overload

from ._codecs import HASH_CODEC, MSGPACK_CODEC, Codec, Serializer, SerializerCodec
from ._engine import CacheEngine
from ._errors import ConfigurationError
from ._flows import Plan
from ._functions import AsyncCachedFunction, CachedFunction
from ._keys import KeyTemplate
from ._near import NearCache
from ._options import Options
from ._stats import Stats
from ._validate import Duration, instance

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True, kw_only=True, eq=False)
class cache_aside:  # lower case: a decorator, named and used like a function
    """Cache a loader's results in Redis with the cache-aside pattern.

    `@cache_aside(key="product:<id>", ttl=30)` above a function (sync or `async
    def`) returns a `CachedFunction` or `AsyncCachedFunction`: call it like the
    loader; it also offers `invalidate`, `update_field`, `many` and more.

    Args:
        key: the entry's name, with `<param>` placeholders naming the loader's
            parameters, e.g. "user:<user_id>:orders:<page>". Parameters left out are
            not part of the identity (a db session, say).
        ttl: how long a value lives, in seconds (int/float) or a timedelta; > 0.
        as_hash: store a flat mapping as a Redis hash (values come back as str)
            instead of one msgpack string.
        negative_ttl: how long a None result is remembered; default 20% of ttl,
            at most 60 s; 0 turns negative caching off.
        lock_ttl: lifetime of the single-flight lock; should exceed the slowest
            load (a slower load is fenced, not trusted). Default 10 s.
        engine: the CacheEngine to use; default: the one set by `configure()`.
        fail_open: when Redis fails, call the loader (True) or raise
            CacheUnavailableError (False).
        refresh_ahead: a window before expiry (seconds or timedelta, < ttl). A hit
            inside it still returns the cached value at once, and one caller reloads
            the entry in the background, so hot keys never expire into a miss. Costs
            a Lua lookup (value and ttl in one round trip) instead of a plain read.
        serializer: an object with dumps(value) -> bytes and loads(bytes), used instead
            of msgpack. Its loads() runs on whatever Redis holds: never plug in one that
            executes code (pickle) unless you trust everyone who can write to Redis.
        batch_loader: loads many entries in one primary query for `fn.many(items)`.
            It receives the missing items (as passed to many()) and returns a list
            with one value per item in order, or a dict keyed by item (absent means
            None). Must be async exactly when the loader is.
        near: a NearCache (or True for its defaults): keep hits in process too, for
            a couple of microseconds a hit. Redis reports every change to the
            engine's keys, which drops the local copy in every process. None
            (default): the engine's `near`, if any; False: none, even if the engine
            has one.

    Raises:
        ConfigurationError: an option is invalid; KeyTemplateError for the key.
    """

    key: str
    ttl: Duration
    as_hash: bool = False
    negative_ttl: Duration | None = None
    lock_ttl: Duration | None = None
    engine: CacheEngine | None = None
    fail_open: bool = True
    refresh_ahead: Duration | None = None
    serializer: Serializer | None = None
    batch_loader: Callable[[list[Any]], Any] | None = None
    near: NearCache | bool | None = None
    _options: Options = field(init=False, repr=False)
    _codec: Codec = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.key, str):
            raise ConfigurationError(
                f"key must be a template string like 'product:<id>', got {self.key!r}"
            )
        instance("engine", self.engine, CacheEngine, "a CacheEngine (or None for the default)")
        if self.batch_loader is not None and not callable(self.batch_loader):
            raise ConfigurationError(
                f"batch_loader must be a function taking a list of items, got {self.batch_loader!r}"
            )
        if self.near is not True and self.near is not False:
            instance(
                "near",
                self.near,
                NearCache,
                "a NearCache, e.g. near=NearCache(max_entries=10_000, ttl=5), True for the "
                "defaults, or False to opt out of the engine's",
            )
        options = Options.of(self)
        codec: Codec = HASH_CODEC if options.as_hash else MSGPACK_CODEC
        if self.serializer is not None:
            if options.as_hash:
                raise ConfigurationError(
                    "serializer= applies to whole values; drop as_hash=True to use it"
                )
            if not (
                callable(getattr(self.serializer, "dumps", None))
                and callable(getattr(self.serializer, "loads", None))
            ):
                raise ConfigurationError(
                    f"serializer must have dumps(value) -> bytes and loads(bytes), got "
                    f"{self.serializer!r}"
                )
            codec = SerializerCodec(self.serializer)
        object.__setattr__(self, "_options", options)
        object.__setattr__(self, "_codec", codec)

    @overload
    def __call__(  # type: ignore[overload-overlap]  # a coroutine function is also Callable[P, R]
        self, loader: Callable[P, Coroutine[Any, Any, R]]
    ) -> AsyncCachedFunction[P, R]: ...

    @overload
    def __call__(self, loader: Callable[P, R]) -> CachedFunction[P, R]: ...

    def __call__(self, loader: Callable[P, Any]) -> Any:
        if not callable(loader):
            raise ConfigurationError(f"@cache_aside(...) decorates a function, got {loader!r}")
        name = getattr(loader, "__qualname__", None) or type(loader).__qualname__
        if inspect.isgeneratorfunction(loader) or inspect.isasyncgenfunction(loader):
            raise ConfigurationError(
                f"{name} is a generator function; a generator cannot be cached. Return a "
                "list instead"
            )
        template = KeyTemplate(self.key, loader)
        near = NearCache() if self.near is True else self.near
        # An engine-wide near cache turns peek on when the function first meets it.
        peek = self._options.refresh_ahead_ms > 0 or isinstance(near, NearCache)
        stats = Stats(name, fail_open=self._options.fail_open)
        plan = Plan(name, self._codec, self._options, stats, peek)
        is_async = inspect.iscoroutinefunction(loader)
        batch_loader = self.batch_loader
        if batch_loader is not None and inspect.iscoroutinefunction(batch_loader) != is_async:
            wanted = "an async def" if is_async else "a plain (non-async)"
            raise ConfigurationError(
                f"{name} is {'async' if is_async else 'not async'}, so its batch_loader "
                f"must be {wanted} function too; got {batch_loader!r}"
            )
        wrapper = AsyncCachedFunction if is_async else CachedFunction
        return wrapper(loader, template, plan, self.engine, batch_loader, near)
