"""What the flows need of a function's options: validated once, at decoration, and
kept as whole milliseconds because that is what Redis's PX and PEXPIRE take; no
conversion happens per call. The options themselves are declared once, as the
fields of `cache_aside`. No I/O here.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._errors import ConfigurationError
from ._validate import flag, milliseconds

# The lease of a load's lock, renewed every third of it while the loader runs: a
# holder that dies (an OOM-killed process) frees its keys within about this long.
DEFAULT_LOCK_TTL_SECONDS = 1.0
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
    grace_ms: int = 0  # stale-while-revalidate after ttl; 0: off
    stale_if_error_ms: int = 0  # a stale value answers a failed load; 0: off
    loader_timeout_ms: int = 0  # 0: the loader may take as long as it takes
    ttl_jitter: float = 0.0  # each store's ttl is cut by up to this fraction
    cache_if: Callable[[Any], object] | None = None  # False for a result: not stored

    @property
    def keep_ms(self) -> int:
        """How long Redis keeps an entry past its ttl: for grace, or for a stale answer
        when the loader fails. A kept entry is never served as fresh."""
        return max(self.grace_ms, self.stale_if_error_ms)

    def value_ttl_ms(self) -> int:
        """The PX of one store of a value: ttl, less up to `ttl_jitter` of it (never
        more: the ttl is a bound callers rely on), plus what is kept past it."""
        ttl_ms = self.ttl_ms
        if self.ttl_jitter:
            ttl_ms = max(1, ttl_ms - math.floor(ttl_ms * self.ttl_jitter * random.random()))
        return ttl_ms + self.keep_ms

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
        grace_ms = _optional_ms("grace", decorator.grace)
        stale_if_error_ms = _optional_ms("stale_if_error", decorator.stale_if_error)
        loader_timeout_ms = _optional_ms("loader_timeout", decorator.loader_timeout)
        jitter = decorator.ttl_jitter
        if (
            isinstance(jitter, bool)
            or not isinstance(jitter, int | float)
            or not 0 <= jitter < 1
            or math.isnan(jitter)
        ):
            raise ConfigurationError(
                f"ttl_jitter must be a fraction of the ttl in [0, 1), e.g. 0.1 to spread "
                f"expiries over the last 10% of it; got {jitter!r}"
            )
        if decorator.cache_if is not None and not callable(decorator.cache_if):
            raise ConfigurationError(
                "cache_if must be a function of the loader's result that returns whether "
                f"to store it, e.g. cache_if=lambda row: row['status'] == 'final'; got "
                f"{decorator.cache_if!r}"
            )
        return cls(
            ttl_ms=ttl_ms,
            negative_ttl_ms=negative_ttl_ms,
            lock_ttl_ms=lock_ttl_ms,
            as_hash=flag("as_hash", decorator.as_hash),
            fail_open=flag("fail_open", decorator.fail_open),
            refresh_ahead_ms=refresh_ahead_ms,
            grace_ms=grace_ms,
            stale_if_error_ms=stale_if_error_ms,
            loader_timeout_ms=loader_timeout_ms,
            ttl_jitter=float(jitter),
            cache_if=decorator.cache_if,
        )


def _optional_ms(name: str, value: object) -> int:
    """An optional duration in ms; None or 0 is off."""
    return 0 if value is None else milliseconds(name, value, allow_zero=True)
