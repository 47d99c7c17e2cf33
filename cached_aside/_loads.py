"""The loader calls a flow may ask for (Signal.LOAD, LoadOne, LoadSome): the call's
own, one item's of a many() call, or a batch through the batch loader; timed into
the function's loader-latency histogram. No Redis here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from time import perf_counter
from typing import Any

from ._batches import align
from ._effects import LoadOne, LoadSome, Signal
from ._flows import Plan

BatchLoader = Callable[[list[Any]], Any]
NO_KWARGS: Mapping[str, Any] = {}


class Loads:
    """The loader, the arguments of each entry of an operation, and the batch loader.

    `position` is the entry Signal.LOAD loads: 0 for a single call, and the entry's
    own for each entry of a many() call served one by one (see `at`).
    """

    __slots__ = ("_batch_loader", "_calls", "_items", "_kwargs", "_loader", "_plan", "position")

    def __init__(
        self,
        plan: Plan | None,
        loader: Callable[..., Any],
        calls: Sequence[tuple[Any, ...]],
        kwargs: Mapping[str, Any] = NO_KWARGS,
        batch_loader: BatchLoader | None = None,
        items: Sequence[Any] = (),
        position: int = 0,
    ) -> None:
        self._plan = plan
        self._loader = loader
        self._calls = calls
        self._kwargs = kwargs
        self._batch_loader = batch_loader
        self._items = items
        self.position = position

    def at(self, position: int) -> Loads:
        """The same loads, with Signal.LOAD meaning entry `position`."""
        return Loads(
            self._plan,
            self._loader,
            self._calls,
            self._kwargs,
            self._batch_loader,
            self._items,
            position,
        )

    def run(self, effect: Signal | LoadOne | LoadSome) -> Any:
        """Perform a load effect with a plain loader."""
        with self._timed():
            if effect is Signal.LOAD:
                return self._loader(*self._calls[self.position], **self._kwargs)
            returned = self._batch_loader(self._chosen(effect))  # type: ignore[misc]
        return self._aligned(effect, returned)

    async def arun(self, effect: Signal | LoadOne | LoadSome) -> Any:
        """Perform a load effect with an `async def` loader."""
        with self._timed():
            if effect is Signal.LOAD:
                return await self._loader(*self._calls[self.position], **self._kwargs)
            returned = await self._batch_loader(self._chosen(effect))  # type: ignore[misc]
        return self._aligned(effect, returned)

    def _chosen(self, effect: Any) -> list[Any]:
        """The items of a LoadOne or LoadSome, for the batch loader."""
        return [self._items[p] for p in effect.positions]

    def _aligned(self, effect: Any, returned: object) -> Any:
        name = "?" if self._plan is None else self._plan.name
        values = align(name, self._chosen(effect), returned)
        return values[0] if type(effect) is LoadOne else values

    @contextmanager
    def _timed(self) -> Iterator[None]:
        started = perf_counter()
        try:
            yield
        finally:
            if self._plan is not None:
                self._plan.stats.loaded_in(perf_counter() - started)


def _never(*_: object) -> Any:
    raise AssertionError("this flow never loads")


# The loads of flows that never load: writes, deliveries, bulk invalidations.
NO_LOADS = Loads(None, _never, ())
