"""The lifecycle every part of an engine follows (close, aclose, busy, after_fork),
and the one fork hook: the single place that says what a forked child resets.
"""

from __future__ import annotations

import atexit
import logging
import os
from typing import Protocol

from . import _defaults, _leases, _loads, _wrapping
from ._catalog import Catalog
from ._deliveries import Deliveries
from ._engine import CLOSE_FLUSH_SECONDS, engines
from ._nearby import Nearby
from ._sides import Sides

logger = logging.getLogger("cached_aside")


class Part(Protocol):
    """One job of an engine, owning its own state from construction to close."""

    def close(self, timeout: float) -> None:
        """Release what the part holds (connections, threads), waiting at most `timeout`."""

    async def aclose(self, timeout: float) -> None:
        """close() for async code, on the running loop."""

    def busy(self) -> bool:
        """Whether background work of the part is still running."""

    def after_fork(self) -> None:
        """In a forked child: reset what fork() copied but cannot work there."""


# Checked by mypy: every part of an engine follows the protocol.
PARTS: tuple[type[Part], ...] = (Catalog, Deliveries, Nearby, Sides)


def _after_fork_in_child() -> None:
    """What a child resets. Module state first (locks and threads of the parent's
    loads, leases, configure() and loader breakers), then every engine, part by part."""
    for reset in (
        _loads.forget_abandoned_after_fork,
        _leases.forget_after_fork,
        _defaults.reset_lock_after_fork,
        _wrapping.reset_loader_breakers_after_fork,
    ):
        reset()
    for engine in engines():
        try:
            engine.after_fork()
        except Exception:  # one engine's trouble must not leave the others as they were
            logger.exception("resetting %r after fork() failed", engine)


os.register_at_fork(after_in_child=_after_fork_in_child)


def _at_exit() -> None:
    """Interpreter exit: daemon threads die with the interpreter, so an engine nobody
    closed would lose a reload's lock release (other processes then wait out the
    lock's ttl) and the invalidations its outbox holds. Each engine finishes or logs
    them (only those with such work wait, for up to CLOSE_FLUSH_SECONDS each)."""
    for engine in engines():
        try:
            engine._parts.at_exit(CLOSE_FLUSH_SECONDS)
        except Exception:  # one engine's trouble must not keep the others from theirs
            logger.exception("finishing %r at exit failed", engine)


atexit.register(_at_exit)
