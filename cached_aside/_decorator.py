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

from ._breaker import CircuitBreaker
from ._codecs import (
    HASH_CODEC,
    MSGPACK_CODEC,
    Codec,
    MsgpackCodec,
    Serializer,
    SerializerCodec,
)
from ._engine import CacheEngine
from ._errors import ConfigurationError, KeyTemplateError
from ._functions import AsyncCachedFunction, CachedFunction
from ._keys import KeyTemplate
from ._near import NearCache
from ._options import Options, XFetch
from ._plan import Plan
from ._stats import Stats
from ._typed import schema_of
from ._typed_codecs import TypedCodec, TypedHashCodec
from ._validate import Duration, instance, whole

P = ParamSpec("P")
R = TypeVar("R")

# The loader breaker of functions with stale_if_error: this many failures in a row
# skip the loader for this long, then one call probes it.
LOADER_BREAKER_FAILURES = 5
LOADER_BREAKER_COOLDOWN_SECONDS = 1.0


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
        as_hash: store a record as a Redis hash, one field per attribute, instead of
            one msgpack string: a typed record (a dataclass, say) decodes each field
            to its declared type; an untyped mapping comes back as str values.
        negative_ttl: how long a None result is remembered; default 20% of ttl,
            at most 60 s; 0 turns negative caching off.
        lock_ttl: the lease of the single-flight lock, renewed every third of it
            while the loader runs (fenced by its token): a slow loader keeps it, and
            a holder that dies frees the key within one lease. Default 1 s.
        engine: the CacheEngine to use; default: the one set by `configure()`.
        fail_open: when Redis fails, call the loader (True) or raise
            CacheUnavailableError (False).
        refresh_ahead: a window before expiry (seconds or timedelta, < ttl). A hit
            inside it still returns the cached value at once, and one caller reloads
            the entry in the background, so hot keys never expire into a miss. Costs
            a Lua lookup (value and ttl in one round trip) instead of a plain read.
            `XFetch(beta=1.0)` instead: each hit is due with a probability that grows
            as expiry nears, scaled by how long the entry's last load took (stored
            beside it), so processes sharing a hot key refresh it at spread moments.
        serializer: an object with dumps(value) -> bytes and loads(bytes), used instead
            of msgpack. Its loads() runs on whatever Redis holds: never plug in one that
            executes code (pickle) unless you trust everyone who can write to Redis.
        batch_loader: loads many entries in one primary query for `fn.many(items)`.
            It receives the missing items (as passed to many()) and returns a list
            with one value per item in order, or a dict keyed by item (absent means
            None). Must be async exactly when the loader is.
        near: a NearCache (or True for its defaults): keep hits in process too, for
            a microsecond a hit. Redis reports every change to the engine's keys,
            which drops the local copy in every process. None (default): the
            engine's `near`, if any; False: none, even if the engine has one.
        grace: stale-while-revalidate (seconds or timedelta). For this long after
            `ttl` an entry is still served (source "stale") while one caller, across
            processes, reloads it in the background. invalidate() removes it at
            once: stale serving is for expiry only.
        stale_if_error: when a load fails (or passes `loader_timeout`), answer with
            the entry if it expired no longer ago than this (source "stale"); the
            failure is counted and logged once per burst, and after 5 failures in a
            row the loader is skipped for 1 s at a time (callers with no stale value
            get LoaderCircuitOpenError meanwhile). Without a stale value the error
            propagates.
        loader_timeout: seconds the loader may run; past it the call fails with
            LoaderTimeoutError (or is answered stale, with `stale_if_error`). Async
            loaders are cancelled; a sync loader runs in a worker thread (with a copy
            of the caller's contextvars) and is abandoned, not stopped. It bounds a
            loader that hangs, which otherwise keeps its renewed lease.
        cache_if: a predicate on the loader's result; False means return it but do
            not store it (e.g. `cache_if=lambda order: order["status"] == "final"`).
        ttl_jitter: a fraction in [0, 1): each store's ttl is shortened by a random
            part of it up to this share, so entries written together do not expire
            together. 0 (default): every entry lives exactly `ttl`.
        tags: templates over the loader's parameters, like `key`, e.g.
            `tags=("shop:<shop_id>", "catalog")`: `engine.invalidate_tags("shop:7")`
            makes every entry carrying one a miss, on every node, without a scan:
            each entry carries its tags' versions, read with it on every hit (in
            the same round trip), and invalidate_tags() retires the versions. A
            load (and set()) takes the versions first: one more round trip. Text
            arguments render as in keys, except that "7" and 7 give the same tag
            text ("shop:7").
        compress_over: bytes; a msgpack payload longer than this is stored
            zlib-compressed (marked, so foreign data never decodes as compressed).
            None (default): never. Not with as_hash or a serializer.
        returns: the type of the loader's values, for a loader without a return
            annotation (or to override it); by default the annotation is the schema.
            A typed function stores values of that type (dataclasses, pydantic
            models, attrs classes, msgspec Structs, datetimes, UUIDs, Decimals, sets,
            tuples...) and gives back that type on a hit. Annotations made only of
            msgpack's own types, and `returns=typing.Any`, store untyped msgpack.

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
    refresh_ahead: Duration | XFetch | None = None
    serializer: Serializer | None = None
    batch_loader: Callable[[list[Any]], Any] | None = None
    near: NearCache | bool | None = None
    grace: Duration | None = None
    stale_if_error: Duration | None = None
    loader_timeout: Duration | None = None
    cache_if: Callable[[Any], object] | None = None
    ttl_jitter: float = 0.0
    compress_over: int | None = None
    tags: tuple[str, ...] = ()
    returns: Any = None
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
        if self.compress_over is not None:
            threshold = whole("compress_over", self.compress_over)
            if codec is not MSGPACK_CODEC:
                raise ConfigurationError(
                    "compress_over= compresses msgpack values; with as_hash=True fields "
                    "stay readable text, and a serializer= can compress inside dumps()"
                )
            codec = MsgpackCodec(compress_over=threshold)
        object.__setattr__(self, "_options", options)
        object.__setattr__(self, "_codec", codec)

    @overload
    def __call__(  # type: ignore[overload-overlap]  # a coroutine function is also Callable[P, R]
        self, loader: Callable[P, Coroutine[Any, Any, R]]
    ) -> AsyncCachedFunction[P, R]: ...

    @overload
    def __call__(self, loader: Callable[P, R]) -> CachedFunction[P, R]: ...

    def __call__(self, loader: Callable[P, Any]) -> Any:
        if isinstance(loader, classmethod | staticmethod):
            kind = type(loader).__name__
            raise ConfigurationError(
                f"@cache_aside(...) is above @{kind} on {loader.__func__.__qualname__}; put "
                f"it below: @{kind} on top, @cache_aside(...) under it, next to the def"
            )
        if not callable(loader):
            raise ConfigurationError(f"@cache_aside(...) decorates a function, got {loader!r}")
        name = getattr(loader, "__qualname__", None) or type(loader).__qualname__
        if inspect.isgeneratorfunction(loader) or inspect.isasyncgenfunction(loader):
            raise ConfigurationError(
                f"{name} is a generator function; a generator cannot be cached. Return a "
                "list instead"
            )
        template = KeyTemplate(self.key, loader)
        tags = _tag_templates(self.tags, loader, name)
        near = NearCache() if self.near is True else self.near
        # An engine-wide near cache turns peek on when the function first meets it.
        options = self._options
        codec = self._typed_codec(loader, name)
        peek = options.refresh_ahead_ms > 0 or options.keep_ms > 0 or isinstance(near, NearCache)
        stats = Stats(name, fail_open=options.fail_open)
        breaker = (
            CircuitBreaker(LOADER_BREAKER_FAILURES, LOADER_BREAKER_COOLDOWN_SECONDS)
            if options.stale_if_error_ms
            else None
        )
        plan = Plan(name, codec, options, stats, peek, breaker, tags)
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

    def _typed_codec(self, loader: Callable[..., Any], name: str) -> Codec:
        """The codec of a typed function (see _typed), else the one chosen from the
        options: decided here, once, so no call inspects a type."""
        if self.serializer is not None:
            if self.returns is not None:
                raise ConfigurationError(
                    f"{name}: returns= types values stored with msgpack; a serializer= "
                    "decides the type of its values itself: drop one of the two"
                )
            return self._codec
        schema = schema_of(self.returns, loader, self.batch_loader, name)
        if schema is None:
            return self._codec
        if not self._options.as_hash:
            compress_over = getattr(self._codec, "compress_over", 0)
            return TypedCodec(schema, compress_over)
        if schema.fields is None:
            raise ConfigurationError(
                f"{name}: as_hash=True stores a record, one hash field per attribute, but "
                f"the declared type {schema.kind!r} is not a dataclass, pydantic model, "
                "attrs class, msgspec Struct or TypedDict; drop as_hash=True"
            )
        return TypedHashCodec(schema)


def _tag_templates(tags: object, loader: Callable[..., Any], name: str) -> tuple[KeyTemplate, ...]:
    """tags= as templates over the loader's parameters, checked like the key."""
    if isinstance(tags, str) or not isinstance(tags, tuple | list):
        raise ConfigurationError(
            f"tags must be a tuple of templates such as ('shop:<shop_id>', 'catalog'), got {tags!r}"
        )
    templates = []
    for text in tags:
        try:
            templates.append(KeyTemplate(text, loader))
        except KeyTemplateError as exc:
            raise ConfigurationError(f"tags of {name}: {exc}") from None
    if len({t.text for t in templates}) != len(templates):
        raise ConfigurationError(f"tags of {name} repeat a template: {tags!r}")
    return tuple(templates)
