"""cache_aside(): validate the options, compile the key template, pick the wrapper.

Everything that can be wrong with a decoration is reported here, once, before the
first call.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar, overload

from ._codecs import HASH_CODEC, MSGPACK_CODEC, Codec, Serializer, SerializerCodec
from ._engine import CacheEngine
from ._errors import ConfigurationError
from ._flows import Plan
from ._functions import AsyncCachedFunction, CachedFunction
from ._keys import KeyTemplate
from ._near import NearCache
from ._options import Duration, build_options
from ._stats import Stats

P = ParamSpec("P")
R = TypeVar("R")


class CacheAside:
    """The decorator returned by `cache_aside(...)`; apply it to a loader."""

    def __init__(
        self,
        key: str,
        engine: CacheEngine | None,
        serializer: Serializer | None,
        batch_loader: Callable[[list[Any]], Any] | None = None,
        near: NearCache | bool | None = None,
        **options: Any,
    ) -> None:
        if not isinstance(key, str):
            raise ConfigurationError(
                f"key must be a template string like 'product:<id>', got {key!r}"
            )
        if engine is not None and not isinstance(engine, CacheEngine):
            raise ConfigurationError(
                f"engine must be a CacheEngine (or None for the default), got {engine!r}"
            )
        if batch_loader is not None and not callable(batch_loader):
            raise ConfigurationError(
                f"batch_loader must be a function taking a list of items, got {batch_loader!r}"
            )
        if near is True:
            near = NearCache()
        if near is not None and near is not False and not isinstance(near, NearCache):
            raise ConfigurationError(
                f"near must be a NearCache, e.g. near=NearCache(max_entries=10_000, ttl=5), "
                f"True for the defaults, or False to opt out of the engine's; got {near!r}"
            )
        self._key = key
        self._engine = engine
        self._batch_loader = batch_loader
        self._near = near
        self._options = build_options(**options)
        self._codec: Codec = HASH_CODEC if self._options.as_hash else MSGPACK_CODEC
        if serializer is not None:
            if self._options.as_hash:
                raise ConfigurationError(
                    "serializer= applies to whole values; drop as_hash=True to use it"
                )
            if not (
                callable(getattr(serializer, "dumps", None))
                and callable(getattr(serializer, "loads", None))
            ):
                raise ConfigurationError(
                    f"serializer must have dumps(value) -> bytes and loads(bytes), got "
                    f"{serializer!r}"
                )
            self._codec = SerializerCodec(serializer)

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
        template = KeyTemplate(self._key, loader)
        # An engine-wide near cache turns peek on when the function first meets it.
        peek = self._options.refresh_ahead_ms > 0 or isinstance(self._near, NearCache)
        stats = Stats(name, fail_open=self._options.fail_open)
        plan = Plan(name, self._codec, self._options, stats, peek)
        is_async = inspect.iscoroutinefunction(loader)
        batch_loader = self._batch_loader
        if batch_loader is not None and inspect.iscoroutinefunction(batch_loader) != is_async:
            wanted = "an async def" if is_async else "a plain (non-async)"
            raise ConfigurationError(
                f"{name} is {'async' if is_async else 'not async'}, so its batch_loader "
                f"must be {wanted} function too; got {batch_loader!r}"
            )
        wrapper = AsyncCachedFunction if is_async else CachedFunction
        return wrapper(loader, template, plan, self._engine, batch_loader, self._near)


def cache_aside(
    *,
    key: str,
    ttl: Duration,
    as_hash: bool = False,
    negative_ttl: Duration | None = None,
    lock_ttl: Duration | None = None,
    engine: CacheEngine | None = None,
    fail_open: bool = True,
    refresh_ahead: Duration | None = None,
    serializer: Serializer | None = None,
    batch_loader: Callable[[list[Any]], Any] | None = None,
    near: NearCache | bool | None = None,
) -> CacheAside:
    """Cache a loader's results in Redis with the cache-aside pattern.

    Args:
        key: the entry's name, with `<param>` placeholders naming the loader's
            parameters, e.g. "user:<user_id>:orders:<page>". Parameters left out are
            not part of the identity (a db session, say).
        ttl: how long a value lives, in seconds (int/float) or a timedelta; > 0.
        as_hash: store a flat mapping as a Redis hash (values come back as str)
            instead of one msgpack string.
        negative_ttl: how long a None result is remembered; default 20% of ttl,
            at most 60 s; 0 turns negative caching off.
        lock_ttl: lifetime of the single-flight lock; must exceed the slowest load.
            Default 10 s.
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
            engine's keys, which drops the local copy in every process; see the
            README's "Near cache". None (default): the engine's `near`, if any;
            False: none, even if the engine has one.

    Raises:
        ConfigurationError: an option is invalid; KeyTemplateError for the key.
    """
    return CacheAside(
        key,
        engine,
        serializer,
        batch_loader,
        near,
        ttl=ttl,
        as_hash=as_hash,
        negative_ttl=negative_ttl,
        lock_ttl=lock_ttl,
        fail_open=fail_open,
        refresh_ahead=refresh_ahead,
    )
