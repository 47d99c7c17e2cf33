"""TrackedKeys: one near store's per-key registrations (`tracking="keys"`), the rule of
`_registrations` under the store's budget lock, and the hook that hands a registration
to the registrar. What the registrar and `_revalidation` ask of a store in per-key mode.
No I/O here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

from ._near_budget import NearBudget
from ._registrations import Registrations

Store = TypeVar("Store")


class TrackedKeys(Generic[Store]):
    """The keys Redis tracks for a store, and those on their way. The methods that
    say "under the lock" are the store's, called while it holds its budget's lock;
    the others take it themselves."""

    def __init__(self, numbers: Iterator[int], most: int, budget: NearBudget) -> None:
        self._rule = Registrations(numbers, most)
        self._budget = budget
        # How a registration reaches the registrar: set by the listener the store is
        # attached to; None (not attached) asks for none.
        self.register: Callable[[Store, str, int], None] | None = None

    def vouches(self, key: str, ticket: int) -> bool:
        """Whether Redis reports any change of `key` made after the read that took
        `ticket` was sent (its registration was processed before)."""
        return self._rule.vouches(key, ticket)

    def claim(self, key: str) -> int | None:
        """Under the lock: the number of a registration of `key` to `send`, if one
        is needed and can be sent."""
        return None if self.register is None else self._rule.request(key)

    def send(self, store: Store, key: str, number: int) -> None:
        """Outside the lock (the registrar's queue has its own): hand it over."""
        if self.register is not None:
            self.register(store, key, number)

    def request(self, store: Store, keys: Iterable[str]) -> None:
        """Ask Redis to track these keys, e.g. entries kept across a reconnect: a
        value read after the reply (`vouches`) may be kept."""
        if self.register is None:
            return
        with self._budget.lock:
            requests = [(key, self._rule.request(key)) for key in keys]
        for key, number in requests:
            if number is not None:
                self.send(store, key, number)

    def registered(self, keys: Iterable[tuple[str, int]], processed: bool) -> None:
        """The registrar's answer to these registrations (key, request number):
        processed, reads sent from now on may fill; or not (refused, never sent),
        the next fill asks again."""
        rule = self._rule
        answer = rule.confirm if processed else rule.abandon
        with self._budget.lock:
            for key, number in keys:
                answer(key, number)

    def awaiting(self, keys: Iterable[str]) -> bool:
        """Whether a registration of any of these keys is on its way."""
        with self._budget.lock:
            return self._rule.awaiting(keys)

    def forget(self, keys: Iterable[str]) -> None:
        """Under the lock: Redis reported these keys changed (and tracks them no more)."""
        self._rule.forget(keys)

    def clear(self) -> None:
        """Under the lock: Redis tracks none of them any more (a connection gone, a
        FLUSHALL, a fork)."""
        self._rule.clear()

    def forget_all(self) -> None:
        """The registrar's connection closed: Redis tracks none of its keys now."""
        with self._budget.lock:
            self._rule.clear()

    def __len__(self) -> int:
        return len(self._rule)
