"""One many() call of a decorated function: its distinct keys, those the near tier
answered, the flow and the loads for the rest, and how the flow's answers become the
values its callers get (_wrapping.py's CachedBase makes one per call).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._batches import many
from ._effects import Flow
from ._loads import Loads
from ._plan import Served
from ._reads import LOADER, as_joiner, first_step
from ._runtime import Runtime

if TYPE_CHECKING:
    from ._engine import CacheEngine

Answer = tuple[Served, bool]  # and whether it was shared with another caller


class ManyCall:
    """One many() call: its distinct keys, those the near tier answered, the flow and
    the loads for the rest, and how answers become the values callers get."""

    def __init__(
        self,
        function: Any,  # the CachedBase that makes it (_wrapping.py imports this module)
        engine: CacheEngine,
        keys: list[str],
        calls: list[tuple[Any, ...]],
        items: list[Any],
        positions: list[int],
    ) -> None:
        self.function = function
        self.engine = engine
        self.keys = keys
        self.positions = positions  # each item's key
        self.found: dict[int, Served] = {}
        self.rest: list[int] = []  # positions that must ask Redis...
        self.tickets: list[int | None] = []  # ...with their near tickets
        if function._near is None:  # no tier to ask: every key asks Redis, no ticket
            self.rest = list(range(len(keys)))
            self.tickets = [None] * len(keys)
        else:
            for position, key in enumerate(keys):
                hit, ticket = function._near_look(engine, key)
                if hit is not None:
                    self.found[position] = hit
                else:
                    self.rest.append(position)
                    self.tickets.append(ticket)
        everything = not self.found
        self.loads = Loads(
            function._plan,
            function.__wrapped__,
            calls if everything else [calls[p] for p in self.rest],
            batch_loader=function._batch_loader,
            items=items if everything else [items[p] for p in self.rest],
        )

    def flow(self, runtime: Runtime) -> Flow[list[Answer]]:
        """The flow that serves what the near tier did not, on `runtime`."""
        keys = self.keys if not self.found else [self.keys[p] for p in self.rest]
        outbox = runtime.outbox
        blocked = (
            frozenset(
                p
                for p, key in enumerate(keys)
                if first_step(outbox.blocks(key), False, True) is LOADER
            )
            if outbox.active
            else frozenset()  # nothing waits in the outbox: no key is blocked
        )
        batched = self.function._batch_loader is not None
        return many(self.function._plan, keys, batched, blocked, runtime.block_limit_ms)

    def values(self, answers: list[Answer]) -> list[Any]:
        """Each item's value, in order; Redis hits are kept in the near tier, and an
        item repeated in the batch gets its own copy."""
        function = self.function
        if function._near is None and len(self.positions) == len(self.keys):
            # No near tier, no item twice: each answer is its item's, in order.
            plan = function._plan
            return [
                (as_joiner(plan, served) if joined else served).value for served, joined in answers
            ]
        served_at = dict(self.found)
        for number, (position, (served, joined)) in enumerate(zip(self.rest, answers, strict=True)):
            ticket = self.tickets[number]
            served_at[position] = function._answer(self.keys[position], ticket, served, joined)
        values: list[Any] = []
        given: set[int] = set()
        for position in self.positions:
            value = served_at[position].value
            values.append(function._plan.codec.copy(value) if position in given else value)
            given.add(position)
        return values
