"""What the flows need of a function's options: validated once, at decoration, and
kept as whole milliseconds because that is what Redis's PX and PEXPIRE take; no
conversion happens per call. The options themselves are declared once, as the
fields of `cache_aside`. No I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._errors import ConfigurationError
from ._validate import flag, milliseconds

DEFAULT_LOCK_TTL_SECONDS = 10.0
MAX_DEFAULT_NEGATIVE_TTL_SECONDS = 60.0
NEGATIVE_TTL_SHARE = 0.2


@dataclass(frozen=True, slots=True)
class Options:
    """Validated options of one decorated function, in milliseconds."""

    ttl_ms: int
    negative_ttl_ms: int
    lock_ttl_ms: int
    as_hash: bool
    fail_open: bool
    refresh_ahead_ms: int = 0  # 0: off

    @classmethod
    def of(cls, decorator: Any) -> Options:
        """Validate a `cache_aside(...)`'s timing options and derive the defaults."""
        ttl_ms = milliseconds("ttl", decorator.ttl)
        if decorator.negative_ttl is None:
            # A missing row is cheaper to re-check than a stale one is to serve, and
            # a row that appears soon after a probe should not stay hidden for long.
            share = min(ttl_ms * NEGATIVE_TTL_SHARE, MAX_DEFAULT_NEGATIVE_TTL_SECONDS * 1000)
            negative_ttl_ms = max(1, round(share))
        else:
            negative_ttl_ms = milliseconds("negative_ttl", decorator.negative_ttl, allow_zero=True)
        lock_ttl = decorator.lock_ttl
        lock_ttl_ms = milliseconds(
            "lock_ttl", DEFAULT_LOCK_TTL_SECONDS if lock_ttl is None else lock_ttl
        )
        refresh_ahead_ms = 0
        if decorator.refresh_ahead is not None:
            refresh_ahead_ms = milliseconds("refresh_ahead", decorator.refresh_ahead)
            if refresh_ahead_ms >= ttl_ms:
                raise ConfigurationError(
                    f"refresh_ahead ({decorator.refresh_ahead!r}) must be shorter than ttl "
                    f"({decorator.ttl!r}): it is the window before expiry in which one "
                    "caller reloads the entry"
                )
        return cls(
            ttl_ms=ttl_ms,
            negative_ttl_ms=negative_ttl_ms,
            lock_ttl_ms=lock_ttl_ms,
            as_hash=flag("as_hash", decorator.as_hash),
            fail_open=flag("fail_open", decorator.fail_open),
            refresh_ahead_ms=refresh_ahead_ms,
        )
