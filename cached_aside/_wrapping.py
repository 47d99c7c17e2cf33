"""What sync and async wrappers share: choosing the engine, rendering keys, the
near tier, batch bookkeeping, stats, and binding to an instance when decorating a
method. No I/O happens here; functions.py hands flows to the drivers.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable
from typing import Any, Generic, ParamSpec, TypeVar

from ._batch_drivers import Answer, BatchLoader
from ._defaults import default_engine
from ._engine import CacheEngine
from ._flows import Plan, Served
from ._keys import KeyTemplate, glob_escape, split_entry_key
from ._near import MISSING, NearCache, NearStore
from ._outbox import PendingPattern
from ._results import Source
from ._stats import StatsSnapshot

P = ParamSpec("P")
R = TypeVar("R")

# update_field's keywords, when the field and value are not its last two arguments.
_NOT_GIVEN: Any = object()


class CachedBase(Generic[P, R]):
    """The parts shared by sync and async wrappers: keys, engine choice, stats."""

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
        self._plan = plan
        self._engine = engine
        self._batch_loader = batch_loader
        self._near_config = near
        self._near: NearStore | None = None  # this engine's near tier, when configured
        self._registered_with: CacheEngine | None = None
        self._whole: PendingPattern | None = None  # every key of this function, there

    def _register(self, engine: CacheEngine) -> None:
        config = engine.near if self._near_config is None else self._near_config
        self._near = None
        if isinstance(config, NearCache):  # first: it may refuse the engine
            if not self._plan.peek:  # the near tier needs the remaining ttl with the value
                self._plan = dataclasses.replace(self._plan, peek=True)
            plan = self._plan
            self._near = engine._near_store(config, plan.codec, plan.name)
        engine._register_stats(self._plan.stats)
        self._whole = self._every_key(engine)
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

    def _covering(self, engine: CacheEngine) -> PendingPattern:
        """The pattern of every key of this function on `engine` (registered first)."""
        if engine is not self._registered_with:
            self._register(engine)
        assert self._whole is not None
        return self._whole

    # -- the near tier ---------------------------------------------------------

    def _near_split(self, keys: list[str]) -> tuple[dict[int, Served], list[int], list[int | None]]:
        """Near hits by position; the positions that must ask Redis, with tickets."""
        store = self._near
        if store is None:
            return {}, list(range(len(keys))), []
        found: dict[int, Served] = {}
        rest: list[int] = []
        tickets: list[int | None] = []
        for position, key in enumerate(keys):
            value = store.get(key)
            if value is MISSING:
                rest.append(position)
                tickets.append(store.expect(key))
            else:
                self._plan.stats.near_hit()
                found[position] = Served(value, Source.NEAR)
        return found, rest, tickets

    def _near_merge(
        self,
        keys: list[str],
        found: dict[int, Served],
        rest: list[int],
        tickets: list[int | None],
        answers: list[Answer],
    ) -> list[Answer]:
        """All answers in order; Redis hits among them are kept in the near tier."""
        by_position: dict[int, Answer] = {p: (s, False) for p, s in found.items()}
        store = self._near
        for number, (position, answer) in enumerate(zip(rest, answers, strict=True)):
            by_position[position] = answer
            served, joined = answer
            if store is not None and not joined and served.ttl_ms > 0:
                store.fill(keys[position], tickets[number], served.value, served.ttl_ms)
        return [by_position[position] for position in range(len(keys))]

    def _near_look(self, key: str) -> tuple[Served | None, int | None]:
        """A near hit, or a ticket for the read that must go to Redis (taken before
        the read: a change reported meanwhile voids it)."""
        store = self._near
        assert store is not None
        value = store.get(key)
        if value is not MISSING:
            self._plan.stats.near_hit()
            return Served(value, Source.NEAR), None
        return None, store.expect(key)

    def _near_keep(self, key: str, ticket: int | None, served: Served, joined: bool) -> Served:
        """The call's answer; a Redis hit is kept in the near tier."""
        if joined:
            return self._as_joiner(served)
        if served.ttl_ms > 0 and self._near is not None:
            self._near.fill(key, ticket, served.value, served.ttl_ms)
        return served

    def _near_clear(self) -> None:
        if self._near is not None:
            self._near.clear()

    def _near_drop(self, keys: Iterable[str]) -> None:
        """Read-your-writes in this process: Redis's report of the change comes later."""
        if self._near is not None:
            self._near.drop(keys)

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

    def _split_update(
        self, args: tuple[Any, ...], field: Any, value: Any
    ) -> tuple[tuple[Any, ...], Any, Any]:
        """The loader's arguments, the field and the value of an update_field call:
        `field=` and `value=` keywords, or else its last two positional arguments."""
        given = (field is not _NOT_GIVEN) + (value is not _NOT_GIVEN)
        if given == 2:
            return args, field, value
        if given == 1:
            raise TypeError(
                f"{self._plan.name}.update_field takes field= and value= together, or the "
                "field name and value as its last two positional arguments"
            )
        if len(args) < 2:
            raise TypeError(
                f"{self._plan.name}.update_field(*loader_args, field, value) needs the "
                "field name and value after the loader's arguments"
            )
        return args[:-2], args[-2], args[-1]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._plan.name} key={self._template.text!r}>"
