"""What sync and async wrappers share: choosing the engine, rendering keys, building
each operation's flow, the near tier, and turning answers into what callers get.
No I/O happens here; _functions.py hands the flows to the drivers.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Generic, ParamSpec, TypeVar

from ._batches import invalidate_many, invalidate_pattern
from ._defaults import default_engine
from ._effects import Flow, PendingPattern
from ._engine import CacheEngine
from ._flows import bypass
from ._keys import KeyTemplate, glob_escape, split_entry_key
from ._loads import NO_LOADS, BatchLoader, Loads
from ._many_call import ManyCall
from ._near import MISSING, NearCache
from ._near_store import NearStore
from ._plan import Plan, Served
from ._reads import LOADER, NEAR, as_joiner, first_step, near_keeps
from ._results import HIT_SOURCES, BulkOutcome, CacheResult, Outcome, Source
from ._runtime import AsyncRuntime, Runtime, SyncRuntime
from ._stats import StatsSnapshot
from ._writes import invalidate, put, reload, update_field

P = ParamSpec("P")
Q = ParamSpec("Q")
R = TypeVar("R")
T = TypeVar("T")
# Keys remembered per function for str arguments (_key_at); past this many the memo
# starts over.
KEY_MEMO_SIZE = 4096

# Every decorated function alive, for integrations that instrument them all (an
# OpenTelemetry instrumentor swaps their class): a set the hit path never reads.
decorated: weakref.WeakSet[CachedBase[Any, Any]] = weakref.WeakSet()
# Called with each function as it is decorated, by such an integration while it is on.
on_decorated: list[Callable[[CachedBase[Any, Any]], None]] = []


def reset_loader_breakers_after_fork() -> None:
    """A child forked while a thread probed a loader breaker would wait for ever for
    that probe's verdict: no thread of its own is probing."""
    for function in list(decorated):
        breaker = function._plan.loader_breaker
        if breaker is not None:
            breaker.reset_after_fork()


class Write(Generic[T]):
    """An invalidation, field update or put, ready to run: its flow, the keys whose
    in-process state must be forgotten once it ran (None: every key), and the call's
    arguments, for the flow to render the entry's tags (TagsOf)."""

    __slots__ = ("engine", "flow", "keys", "loads")

    def __init__(
        self,
        engine: CacheEngine,
        flow: Flow[T],
        keys: Sequence[str] | None,
        loads: Loads = NO_LOADS,
    ) -> None:
        self.engine, self.flow, self.keys, self.loads = engine, flow, keys, loads


class Reload:
    """fn.refresh(), ready to run: its flow, its loads, and the key it rewrites."""

    __slots__ = ("flow", "keys", "loads")

    def __init__(self, flow: Flow[Served], loads: Loads, keys: Sequence[str]) -> None:
        self.flow, self.loads, self.keys = flow, loads, keys

    def run_args(self, runtime: Runtime) -> tuple[Flow[Served], Runtime, Loads]:
        """What a driver's run (or arun) takes, but the seal: the flights add it."""
        return self.flow, runtime, self.loads


class CachedBase(Generic[P, R]):
    """The parts shared by sync and async wrappers: keys, engine choice, the flow of
    every operation, the near tier, stats."""

    def __init__(
        self,
        loader: Callable[P, Any],
        template: KeyTemplate,
        plan: Plan,
        engine: CacheEngine | None,
        batch_loader: BatchLoader | None = None,
        near: NearCache | bool | None = None,
    ) -> None:
        functools.update_wrapper(self, loader)  # type: ignore[arg-type]  # callable subclasses
        self.__wrapped__ = loader
        self._template = template
        self._by_text = template.by_text
        self._plan = plan
        self._engine = engine
        self._batch_loader = batch_loader
        self._near_config = near
        self._near: NearStore | None = None  # this engine's near tier, when configured
        self._registered_with: CacheEngine | None = None
        # The keys of str arguments on the engine met last (the hit path's; _key_at).
        self._keys: tuple[CacheEngine | None, dict[str, str]] = (None, {})
        self._whole: PendingPattern | None = None  # every key of this function, there
        self._near_stores: weakref.WeakKeyDictionary[CacheEngine, NearStore]
        self._near_stores = weakref.WeakKeyDictionary()
        decorated.add(self)
        for hook in on_decorated:
            hook(self)

    # -- engine and keys -----------------------------------------------------------

    def _engine_in_use(self) -> CacheEngine:
        """The engine (given, else the default), met and registered with."""
        engine = self._engine or default_engine()
        if engine is not self._registered_with:
            self._register(engine)
        return engine

    def _locate(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[CacheEngine, str]:
        """The engine to use and the entry's key; the first step of every call."""
        engine = self._engine_in_use()
        return engine, self._key_at(engine, args, kwargs)

    def _key_at(self, engine: CacheEngine, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        """The entry's key on `engine`. A str argument's is remembered while `engine`
        is the one met last (the template's rule for by_text: one parameter, a key of
        bounded length): a call's key costs a dict lookup, not two concatenations and
        hashing a new string (3% of a sync hit's instructions)."""
        key = f"{engine.key_head}{self._template.render(args, kwargs)}}}"
        if len(args) == 1 and not kwargs and type(args[0]) is str and args[0] in self._by_text:
            known_engine, known = self._keys  # one read: the dict is that engine's
            if known_engine is engine:
                if len(known) >= KEY_MEMO_SIZE:
                    known.clear()
                known[args[0]] = key
        return key

    def _register(self, engine: CacheEngine) -> None:
        """Meet `engine`: its near tier for this function, and its stats. Once per
        engine, however many threads make their first call at once."""
        with engine.catalog.meeting:
            if engine is not self._registered_with:
                self._meet(engine)

    def _meet(self, engine: CacheEngine) -> None:
        config = engine.near if self._near_config is None else self._near_config
        self._near = None
        if isinstance(config, NearCache):  # first: it may refuse the engine
            if not self._plan.peek:  # the near tier needs the remaining ttl with the value
                self._plan = dataclasses.replace(self._plan, peek=True)
            plan = self._plan
            store = self._near_stores.get(engine)  # met before: the same tier again
            if store is None:
                store = self._near_stores[engine] = engine.nearby.store(
                    config, plan.codec, plan.name, plan
                )
            self._near = store
            self._plan.stats.watch_near(store)
        self._whole = self._every_key(engine)
        engine.catalog.join(
            name=self._plan.name,
            stats=self._plan.stats,
            tags=self._plan.tags,
            covers=self._whole,
            lock_ttl_ms=self._plan.options.lock_ttl_ms,
        )
        self._keys = (engine, {})
        self._registered_with = engine

    def _every_key(self, engine: CacheEngine) -> PendingPattern:
        """What covers every entry this function can have on `engine`: for
        invalidate_all, and for the outbox when it must collapse this function's keys."""
        head, template = engine.key_head, self._template

        def belongs(key: str) -> bool:
            parts = split_entry_key(key, head)
            return parts is not None and template.owns(parts[0])

        start = head + template.literal_head
        return PendingPattern(
            start, glob_escape(start) + "*", belongs, f"{self._plan.name}.invalidate_all()"
        )

    def key(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """The Redis key these arguments map to, for redis-cli and debugging."""
        return self._locate(args, kwargs)[1]

    # -- operations: each one's flow -----------------------------------------------

    def _invalidation(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Write[Outcome]:
        engine, key = self._locate(args, kwargs)
        flow = invalidate(self._plan, key, self._covering(engine))
        return Write(engine, flow, (key,))

    def _field_update(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], field: Any, value: Any
    ) -> Write[Outcome]:
        loader_args, field, value = split_update(self._plan.name, args, field, value)
        engine, key = self._locate(loader_args, kwargs)
        flow = update_field(self._plan, key, field, value, self._covering(engine))
        return Write(engine, flow, (key,), self._call_of(loader_args, kwargs))

    def _put(self, args: tuple[Any, ...], kwargs: dict[str, Any], value: Any) -> Write[Outcome]:
        engine, key = self._locate(args, kwargs)
        flow = put(self._plan, key, value, self._covering(engine))
        return Write(engine, flow, (key,), self._call_of(args, kwargs))

    def _call_of(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Loads:
        """One call's arguments, as a flow's TagsOf renders them (never loaded); a
        function without tags never asks."""
        if not self._plan.tags:
            return NO_LOADS
        return Loads(self._plan, self.__wrapped__, (args,), kwargs)

    def _reload(self, args: tuple[Any, ...], kwargs: dict[str, Any], runtime: Runtime) -> Reload:
        """fn.refresh()'s flow and loads: bypassing the cache, like a call, while the
        key's invalidation waits in the outbox."""
        engine, key = self._locate(args, kwargs)
        pending = engine.outbox.active and engine.outbox.blocks(key)
        if first_step(pending, False, False) is LOADER:
            flow = bypass(self._plan, key)
        else:
            flow = reload(self._plan, key, runtime.block_limit_ms, self._covering(engine))
        return Reload(flow, Loads(self._plan, self.__wrapped__, (args,), kwargs), (key,))

    def _invalidations(self, items: Iterable[Any]) -> Write[BulkOutcome]:
        engine, keys, _, _, _ = self._distinct(items)
        flow = invalidate_many(self._plan, keys, self._covering(engine))
        return Write(engine, flow, keys)

    def _invalidation_of_all(self) -> Write[BulkOutcome]:
        engine = self._engine_in_use()
        flow = invalidate_pattern(self._covering(engine), self._plan)
        return Write(engine, flow, None)

    def _written(self, runtime: SyncRuntime | AsyncRuntime, keys: Sequence[str] | None) -> None:
        """After a write: no read that starts now may join a read made before it, and
        this process's near tier forgets the keys (Redis's report comes later)."""
        if keys is None:
            runtime.flights.forget_all()
            if self._near is not None:
                self._near.clear()
            return
        for key in keys:
            runtime.flights.forget(key)
        if self._near is not None:
            self._near.drop(keys)

    def _covering(self, engine: CacheEngine) -> PendingPattern:
        """The pattern of every key of this function on `engine`, met already."""
        assert self._whole is not None
        assert engine is self._registered_with
        return self._whole

    def _many(self, items: Iterable[Any]) -> ManyCall:
        return ManyCall(self, *self._distinct(items))

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
        engine = self._engine_in_use()
        head = engine.key_head
        by_text, render = self._by_text, self._template.render
        every = items if type(items) is list else list(items)
        every_call = [item if type(item) is tuple else (item,) for item in every]
        # As a call renders its key: a str already seen skips render().
        every_key = [
            f"{head}{(by_text.get(item) if type(item) is str else None) or render(args, {})}}}"
            for item, args in zip(every, every_call, strict=True)
        ]
        if len(set(every_key)) == len(every_key):  # no item twice: each its own key
            return engine, every_key, every_call, every, list(range(len(every_key)))
        keys: list[str] = []
        calls: list[tuple[Any, ...]] = []
        distinct_items: list[Any] = []
        where: dict[str, int] = {}
        positions: list[int] = []
        for item, args, key in zip(every, every_call, every_key, strict=True):
            position = where.get(key)
            if position is None:
                position = where[key] = len(keys)
                keys.append(key)
                calls.append(args)
                distinct_items.append(item)
            positions.append(position)
        return engine, keys, calls, distinct_items, positions

    # -- answers and the near tier -------------------------------------------------

    def _near_look(self, engine: CacheEngine, key: str) -> tuple[Served | None, int | None]:
        """A near hit, or the ticket of a read that must go to Redis (taken before
        the read: a change reported meanwhile voids it); (None, None) with no tier,
        or while an invalidation of the key waits in the outbox (Redis never reported
        it, so another function's near tier may still hold the old value)."""
        store = self._near
        pending = engine.outbox.active and engine.outbox.blocks(key)
        if store is None or first_step(pending, True, False) is not NEAR:
            return None, None
        value = store.get(key)
        if value is not MISSING:
            self._plan.stats.near_hit()
            return Served(value, Source.NEAR), None
        return None, store.expect(key)

    def _answer(self, key: str, ticket: int | None, served: Served, joined: bool) -> Served:
        """The call's answer; a Redis hit is kept in the near tier, and any other read
        gives its ticket back."""
        near = self._near
        if ticket is not None and near is not None:
            if near_keeps(joined, served.ttl_ms):
                near.fill(key, ticket, served.value, served.ttl_ms)
            else:
                near.forget(key, ticket)
        return as_joiner(self._plan, served) if joined else served

    def _forget_ticket(self, key: str, ticket: int | None) -> None:
        """A read that raised keeps nothing in the near tier: its ticket goes back."""
        if ticket is not None and self._near is not None:
            self._near.forget(key, ticket)

    def _result(self, served: Served, seconds: float) -> CacheResult[R]:
        return CacheResult(
            served.value, served.source in HIT_SOURCES, served.source, seconds * 1000.0
        )

    # -- stats and the rest --------------------------------------------------------

    def stats(self) -> StatsSnapshot:
        """This function's counters since start or the last reset_stats()."""
        return self._plan.stats.snapshot()

    def error_kinds(self) -> dict[str, int]:
        """This function's Redis errors by exception type, e.g. {"TimeoutError": 2}."""
        return self._plan.stats.error_kinds()

    def reset_stats(self) -> None:
        """Set this function's counters back to zero."""
        self._plan.stats.reset()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._plan.name} key={self._template.text!r}>"


class Bound(Generic[Q, R]):
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
        """The method's counters (shared by every instance)."""
        return self._shared.stats()

    def error_kinds(self) -> dict[str, int]:
        """The method's Redis errors by exception type."""
        return self._shared.error_kinds()

    def reset_stats(self) -> None:
        """Set the method's counters back to zero."""
        self._shared.reset_stats()

    def __repr__(self) -> str:
        return f"<bound {self._shared!r} of {self._instance!r}>"


def split_update(
    name: str, args: tuple[Any, ...], field: Any, value: Any
) -> tuple[tuple[Any, ...], Any, Any]:
    """The loader's arguments, the field and the value of an update_field call:
    `field=` and `value=` keywords, or else its last two positional arguments.
    (None cannot be either: a hash field holds text.)"""
    given = (field is not None) + (value is not None)
    if given == 2:
        return args, field, value
    if given == 1:
        raise TypeError(
            f"{name}.update_field takes field= and value= together, or the "
            "field name and value as its last two positional arguments"
        )
    if len(args) < 2:
        raise TypeError(
            f"{name}.update_field(*loader_args, field, value) needs the "
            "field name and value after the loader's arguments"
        )
    return args[:-2], args[-2], args[-1]
