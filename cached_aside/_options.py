"""Per-function options, validated once at decoration time.

Durations are kept as whole milliseconds because that is what Redis's PX and
PEXPIRE take; no conversion happens per call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta

from ._errors import ConfigurationError

Duration = int | float | timedelta

DEFAULT_LOCK_TTL_SECONDS = 10.0
# The longest duration Redis's PX and PEXPIRE take with room to spare (their limit
# is the largest 64-bit integer of milliseconds, minus the current time).
MAX_SECONDS = 100 * 365 * 24 * 3600
MAX_DEFAULT_NEGATIVE_TTL_SECONDS = 60.0
NEGATIVE_TTL_SHARE = 0.2


@dataclass(frozen=True, slots=True)
class Options:
    """Validated options of one decorated function."""

    ttl_ms: int
    negative_ttl_ms: int
    lock_ttl_ms: int
    as_hash: bool
    fail_open: bool
    refresh_ahead_ms: int = 0  # 0: off


def to_milliseconds(name: str, value: object, *, allow_zero: bool = False) -> int:
    """Convert seconds (int, float or timedelta) to milliseconds, rejecting nonsense early."""
    if isinstance(value, bool) or not isinstance(value, int | float | timedelta):
        raise ConfigurationError(
            f"{name} must be a number of seconds or a datetime.timedelta, got {value!r}"
        )
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if math.isnan(seconds) or math.isinf(seconds):
        raise ConfigurationError(f"{name} must be a finite duration, got {value!r}")
    if seconds > MAX_SECONDS:
        raise ConfigurationError(
            f"{name}={value!r} is longer than Redis can expire (at most {MAX_SECONDS} "
            "seconds, 100 years); for entries that should never expire use a long ttl"
        )
    if seconds < 0 or (seconds == 0 and not allow_zero):
        bound = ">= 0 (0 turns it off)" if allow_zero else "> 0"
        raise ConfigurationError(f"{name} must be {bound} seconds, got {value!r}")
    milliseconds = round(seconds * 1000)
    if seconds > 0 and milliseconds == 0:
        raise ConfigurationError(
            f"{name}={value!r} is below Redis's 1 ms resolution; use at least 0.001 seconds"
        )
    return milliseconds


def build_options(
    *,
    ttl: Duration,
    negative_ttl: Duration | None,
    lock_ttl: Duration | None,
    as_hash: bool,
    fail_open: bool,
    refresh_ahead: Duration | None = None,
) -> Options:
    """Validate the decorator's keyword options and derive the defaults."""
    ttl_ms = to_milliseconds("ttl", ttl)
    if negative_ttl is None:
        # A missing row is cheaper to re-check than a stale one is to serve, and a
        # row that appears soon after a probe should not stay hidden for a full ttl.
        share = min(ttl_ms * NEGATIVE_TTL_SHARE, MAX_DEFAULT_NEGATIVE_TTL_SECONDS * 1000)
        negative_ttl_ms = max(1, round(share))
    else:
        negative_ttl_ms = to_milliseconds("negative_ttl", negative_ttl, allow_zero=True)
    lock_ttl_ms = to_milliseconds(
        "lock_ttl", DEFAULT_LOCK_TTL_SECONDS if lock_ttl is None else lock_ttl
    )
    if not isinstance(as_hash, bool):
        raise ConfigurationError(f"as_hash must be True or False, got {as_hash!r}")
    if not isinstance(fail_open, bool):
        raise ConfigurationError(f"fail_open must be True or False, got {fail_open!r}")
    refresh_ahead_ms = 0
    if refresh_ahead is not None:
        refresh_ahead_ms = to_milliseconds("refresh_ahead", refresh_ahead)
        if refresh_ahead_ms >= ttl_ms:
            raise ConfigurationError(
                f"refresh_ahead ({refresh_ahead!r}) must be shorter than ttl ({ttl!r}): it "
                "is the window before expiry in which one caller reloads the entry"
            )
    return Options(
        refresh_ahead_ms=refresh_ahead_ms,
        ttl_ms=ttl_ms,
        negative_ttl_ms=negative_ttl_ms,
        lock_ttl_ms=lock_ttl_ms,
        as_hash=as_hash,
        fail_open=fail_open,
    )
