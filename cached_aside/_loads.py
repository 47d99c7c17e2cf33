"""The loader calls a flow may ask for (Signal.LOAD, LoadOne, LoadSome): the call's
own, one item's of a many() call, or a batch through the batch loader; timed into
the function's loader-latency histogram, and bounded by its loader_timeout. No
Redis here.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeoutError
from contextlib import contextmanager
from time import perf_counter
from typing import Any

from ._batches import align
from ._effects import LoadOne, LoadSome, Signal
from ._errors import LoaderTimeoutError
from ._plan import Plan

BatchLoader = Callable[[list[Any]], Any]
NO_KWARGS: Mapping[str, Any] = {}


class Loads:
    """The loader, the arguments of each entry of an operation, and the batch loader;
    `last_ms` is how long the last load took.

    `position` is the entry Signal.LOAD loads: 0 for a single call, and the entry's
    own for each entry of a many() call served one by one (see `at`).
    """

    __slots__ = (
        "_batch_loader",
        "_calls",
        "_items",
        "_kwargs",
        "_loader",
        "_plan",
        "last_ms",
        "position",
    )

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
        self.last_ms = 0  # how long the last load took, in whole ms (Signal.LOAD_TIME)

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
                call: Callable[[], Any] = functools.partial(
                    self._loader, *self._calls[self.position], **self._kwargs
                )
            else:
                call = functools.partial(self._batching(), self._chosen(effect))
            timeout = self._timeout()
            returned = (
                call() if timeout is None else _within(call, timeout, self._name(), self._plan)
            )
        return returned if effect is Signal.LOAD else self._aligned(effect, returned)

    async def arun(self, effect: Signal | LoadOne | LoadSome) -> Any:
        """Perform a load effect with an `async def` loader."""
        with self._timed():
            if effect is Signal.LOAD:
                loading = self._loader(*self._calls[self.position], **self._kwargs)
            else:
                loading = self._batching()(self._chosen(effect))
            timeout = self._timeout()
            if timeout is None:
                returned = await loading
            else:
                started = perf_counter()
                try:
                    returned = await asyncio.wait_for(loading, timeout)
                except asyncio.TimeoutError:  # not yet TimeoutError itself on 3.10
                    if perf_counter() - started < timeout:
                        raise  # the loader's own (a driver's statement timeout, say)
                    raise _timed_out(self._name(), timeout) from None
        return returned if effect is Signal.LOAD else self._aligned(effect, returned)

    def tags(self, load: Signal | LoadOne) -> tuple[str, ...]:
        """The rendered tags of the entry `load` loads (TagsOf)."""
        if self._plan is None or not self._plan.tags:
            return ()
        if load is Signal.LOAD:
            args, kwargs = self._calls[self.position], self._kwargs
        else:
            assert isinstance(load, LoadOne)
            args, kwargs = self._calls[load.position], NO_KWARGS
        return tuple(tag.render_tag(args, kwargs) for tag in self._plan.tags)

    def _timeout(self) -> float | None:
        """The function's loader_timeout in seconds, if it has one."""
        if self._plan is None or not self._plan.options.loader_timeout_ms:
            return None
        return self._plan.options.loader_timeout_ms / 1000.0

    def _name(self) -> str:
        return "?" if self._plan is None else self._plan.name

    def _batching(self) -> BatchLoader:
        """The batch loader, which a LoadOne or LoadSome is only ever asked of."""
        assert self._batch_loader is not None
        return self._batch_loader

    def _chosen(self, effect: Any) -> list[Any]:
        """The items of a LoadOne or LoadSome, for the batch loader."""
        return [self._items[p] for p in effect.positions]

    def _aligned(self, effect: Any, returned: object) -> Any:
        values = align(self._name(), self._chosen(effect), returned)
        return values[0] if type(effect) is LoadOne else values

    @contextmanager
    def _timed(self) -> Iterator[None]:
        started = perf_counter()
        try:
            yield
        finally:
            took = perf_counter() - started
            self.last_ms = max(1, round(took * 1000))  # never 0, which means "unknown"
            if self._plan is not None:
                self._plan.stats.loaded_in(took)


# Loader threads left running past their loader_timeout, per function (by id of its
# Plan): a hung primary must not pile up a thread (and a database connection) per call.
MAX_ABANDONED_LOADS = 8
_abandoned: dict[int, int] = {}
_abandoned_lock = threading.Lock()


def forget_abandoned_after_fork() -> None:
    """A child has none of its parent's threads, so none of their abandoned loads."""
    global _abandoned_lock
    _abandoned.clear()
    _abandoned_lock = threading.Lock()


def _within(call: Callable[[], Any], timeout: float, name: str, owner: object) -> Any:
    """Run a sync loader in a thread of its own and wait at most `timeout` for it. A
    thread cannot be stopped: past the timeout it is abandoned (its result dropped),
    and the caller gets LoaderTimeoutError. While MAX_ABANDONED_LOADS of the function's
    loads still run so, a call fails at once rather than start another. It runs in a
    copy of the caller's contextvars, so context-bound state (a request id, a db
    session) goes along."""
    function = id(owner)
    with _abandoned_lock:
        if _abandoned.get(function, 0) >= MAX_ABANDONED_LOADS:
            raise LoaderTimeoutError(
                f"{name}: {MAX_ABANDONED_LOADS} of its loads still run past loader_timeout "
                f"({timeout:g} s); not starting another until one of them ends"
            )
    outcome: Future[Any] = Future()
    context = contextvars.copy_context()
    abandoned = [False]

    def target() -> None:
        try:
            outcome.set_result(context.run(call))
        except BaseException as exc:  # handed to the caller, who re-raises it
            outcome.set_exception(exc)
        finally:
            with _abandoned_lock:
                if abandoned[0]:
                    left = _abandoned.get(function, 1) - 1
                    if left > 0:
                        _abandoned[function] = left
                    else:
                        _abandoned.pop(function, None)

    threading.Thread(target=target, name=f"cached_aside loader {name}", daemon=True).start()
    try:
        return outcome.result(timeout)
    except FutureTimeoutError as exc:
        if outcome.done() and outcome.exception() is exc:
            raise  # the loader's own TimeoutError (3.11+: the same class), not ours
        with _abandoned_lock:
            if not outcome.done():
                abandoned[0] = True
                _abandoned[function] = _abandoned.get(function, 0) + 1
        raise _timed_out(name, timeout) from None


def _timed_out(name: str, timeout: float) -> LoaderTimeoutError:
    return LoaderTimeoutError(f"{name}: the loader ran past loader_timeout ({timeout:g} s)")


def _never(*_: object) -> Any:
    raise AssertionError("this flow never loads")


# The loads of flows that never load: writes, deliveries, bulk invalidations.
NO_LOADS = Loads(None, _never, ())
