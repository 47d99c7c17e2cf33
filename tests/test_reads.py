"""The read path's rule (_reads.py), stepped by hand: each step's answer for every
combination of facts, and whole reads walked the way the drivers walk them. No Redis,
no event loop."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import pytest

from cached_aside._plan import Served
from cached_aside._reads import FIRST_STEPS as TABLE
from cached_aside._reads import (
    Step,
    as_joiner,
    batch_step,
    first_step,
    near_keeps,
    on_lookup,
    on_miss,
    served_aged,
)
from cached_aside._results import Source

from .test_flows import outage, plan

# (pending, near, shared) -> where a call's read begins
FIRST_STEPS = [
    ((True, True, True), Step.LOADER),
    ((True, True, False), Step.LOADER),
    ((True, False, True), Step.LOADER),
    ((True, False, False), Step.LOADER),
    ((False, True, True), Step.NEAR),
    ((False, True, False), Step.NEAR),
    ((False, False, True), Step.FLIGHT),
    ((False, False, False), Step.LOOK),
]


@pytest.mark.parametrize(("facts", "step"), FIRST_STEPS)
def test_where_a_read_begins(facts: tuple[bool, bool, bool], step: Step) -> None:
    assert first_step(*facts) is step
    pending, near, shared = facts
    assert TABLE[pending][near][shared] is step  # the hit path's copy of the rule


# (refreshing, aged) -> after a lookup that did not answer
MISS_STEPS = [
    ((True, False), Step.WAIT),
    ((True, True), Step.MISS),  # an aged entry is served at once: nothing to wait for
    ((False, False), Step.MISS),
    ((False, True), Step.MISS),
]


@pytest.mark.parametrize(("facts", "step"), MISS_STEPS)
def test_a_miss_waits_only_for_a_refresh_it_cannot_answer_without(
    facts: tuple[bool, bool], step: Step
) -> None:
    assert on_miss(*facts) is step


# (pending, hit, batched, aged) -> one entry of many()
BATCH_STEPS = [
    ((True, False, True, False), Step.LOADER),
    ((True, True, True, False), Step.LOADER),  # a reply read while blocked is never used
    ((False, True, True, False), Step.ANSWER),
    ((False, True, False, False), Step.ANSWER),
    ((False, False, True, False), Step.BATCH),
    ((False, False, True, True), Step.FLIGHT),  # aged: the single path serves and reloads
    ((False, False, False, False), Step.FLIGHT),
    ((False, False, False, True), Step.FLIGHT),
]


@pytest.mark.parametrize(("facts", "step"), BATCH_STEPS)
def test_where_each_entry_of_a_batch_goes(facts: tuple[bool, bool, bool, bool], step: Step) -> None:
    assert batch_step(*facts) is step


@pytest.mark.parametrize(
    ("joined", "ttl_ms", "keeps"),
    [(False, 5_000, True), (True, 5_000, False), (False, 0, False), (False, -1, False)],
)
def test_only_a_callers_own_read_with_a_known_ttl_fills_the_near_tier(
    joined: bool, ttl_ms: int, keeps: bool
) -> None:
    assert near_keeps(joined, ttl_ms) is keeps


def walk(
    *,
    pending: bool = False,
    near: bool = False,
    near_hit: bool = False,
    shared: bool = False,
    reply: Any = None,
    refreshing: bool = False,
    after_wait: Any = None,
) -> list[Step]:
    """The steps of one call's read, asked of the rule in the drivers' order, with the
    facts and Redis replies scripted (`reply`: the lookup's, `after_wait`: the one
    read after waiting for a refresh)."""
    p = dataclasses.replace(plan(refresh_ahead=5), peek=True)  # as the decorator makes it
    steps = [first_step(pending, near, shared)]
    if steps[-1] is Step.NEAR:
        if near_hit:
            return [*steps, Step.ANSWER]
        steps.append(first_step(pending, False, shared))
    if steps[-1] is not Step.LOOK:
        return steps  # the loader alone, or the flight's leader looks
    if on_lookup(p, reply) is not None:
        return [*steps, Step.ANSWER]
    steps.append(on_miss(refreshing, served_aged(p, reply)))
    if steps[-1] is Step.WAIT:
        steps.append(Step.ANSWER if on_lookup(p, after_wait) is not None else Step.MISS)
    return steps


PACKED = msgpack.packb({"id": 1})


@pytest.mark.parametrize(
    ("facts", "steps"),
    [
        ({"reply": [PACKED, 20_000]}, [Step.LOOK, Step.ANSWER]),
        ({"reply": []}, [Step.LOOK, Step.MISS]),
        ({"reply": outage()}, [Step.LOOK, Step.MISS]),  # the miss flow fails open
        ({"pending": True, "near": True}, [Step.LOADER]),
        ({"near": True, "near_hit": True}, [Step.NEAR, Step.ANSWER]),
        ({"near": True, "reply": [PACKED, 20_000]}, [Step.NEAR, Step.LOOK, Step.ANSWER]),
        ({"shared": True}, [Step.FLIGHT]),
        (
            {"refreshing": True, "reply": [], "after_wait": [PACKED, 30_000]},
            [Step.LOOK, Step.WAIT, Step.ANSWER],
        ),
        ({"refreshing": True, "reply": [], "after_wait": []}, [Step.LOOK, Step.WAIT, Step.MISS]),
        # An entry due for a refresh_ahead reload is served at once: no wait.
        ({"refreshing": True, "reply": [PACKED, 3_000]}, [Step.LOOK, Step.MISS]),
    ],
)
def test_a_read_walked_step_by_step(facts: dict[str, Any], steps: list[Step]) -> None:
    assert walk(**facts) == steps


@pytest.mark.parametrize(
    ("source", "counted_as", "becomes"),
    [
        (Source.CACHE, "hits", Source.CACHE),
        (Source.NEGATIVE, "negative_hits", Source.NEGATIVE),
        (Source.STALE, "stale", Source.STALE),
        (Source.LOADER, "stampedes_suppressed", Source.WAITED),
        (Source.WAITED, "stampedes_suppressed", Source.WAITED),
    ],
)
def test_a_joiner_is_counted_as_what_it_got_with_a_copy_of_its_own(
    source: Source, counted_as: str, becomes: Source
) -> None:
    p = plan()
    value = {"id": 1}
    joined = as_joiner(p, Served(value, source))
    assert joined.source is becomes
    assert joined.value == value
    assert joined.value is not value
    assert getattr(p.stats.snapshot(), counted_as) == 1
