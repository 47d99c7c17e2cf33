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
from ._validate import Duration, flag, milliseconds

# The lease of a load's lock, renewed every third of it while the loader runs: a
# holder that dies (an OOM-killed process) frees its keys within about this long.
DEFAULT_LOCK_TTL_SECONDS = 1.0
MAX_DEFAULT_NEGATIVE_TTL_SECONDS = 60.0
NEGATIVE_TTL_SHARE = 0.2
# XFetch's beta in Vattani, Chierichetti and Lowenstein (VLDB 2015): 1.0 is their
# default, larger values refresh earlier.
DEFAULT_XFETCH_BETA = 1.0


@dataclass(frozen=True, slots=True)
class XFetch:
    """Probabilistic early refresh (XFetch), given as `refresh_ahead=XFetch()`.

    Every hit draws a number u in (0, 1]: the entry is due for a reload behind the
    answer when `-load_time * beta * ln(u)` reaches the time it has left, where
    load_time is how long its last load took (stored with the entry, so every
    process knows it). Callers of a hot key thus refresh it at spread moments
    shortly before expiry, one of them at a time, instead of all at the edge of a
    fixed window.

    Args:
        beta: how early: the expected lead is load_time * beta. > 0 and finite;
            1.0 (the paper's default) suits most loaders, above 1 refreshes earlier.
        window: never refresh while more than this is left (seconds or timedelta,
            < ttl). None (default): no bound but the ttl.
    """

    beta: float = DEFAULT_XFETCH_BETA
    window: Duration | None = None


@dataclass(frozen=True, slots=True)
class Options:
    """Validated options of one decorated function, in milliseconds."""

    ttl_ms: int
    negative_ttl_ms: int
    lock_ttl_ms: int
    as_hash: bool
    fail_open: bool
    refresh_ahead_ms: int = 0  # 0: off; with XFetch, its window (the whole ttl by default)
    xfetch_beta: float = 0.0  # > 0: refresh_ahead is XFetch, inside refresh_ahead_ms
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
        refresh_ahead_ms, xfetch_beta = _refresh_ahead(
            decorator.refresh_ahead, decorator.ttl, ttl_ms
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
            xfetch_beta=xfetch_beta,
            grace_ms=grace_ms,
            stale_if_error_ms=stale_if_error_ms,
            loader_timeout_ms=loader_timeout_ms,
            ttl_jitter=float(jitter),
            cache_if=decorator.cache_if,
        )


def _optional_ms(name: str, value: object) -> int:
    """An optional duration in ms; None or 0 is off."""
    return 0 if value is None else milliseconds(name, value, allow_zero=True)


def _refresh_ahead(given: object, ttl: object, ttl_ms: int) -> tuple[int, float]:
    """refresh_ahead as (its window in ms, XFetch's beta or 0.0 for a fixed window)."""
    if given is None:
        return 0, 0.0
    if given is XFetch:
        raise ConfigurationError(
            "refresh_ahead=XFetch needs its parentheses: refresh_ahead=XFetch() (or "
            "XFetch(beta=1.0)) for probabilistic early refresh"
        )
    if not isinstance(given, XFetch):
        window_ms = milliseconds("refresh_ahead", given)
        if window_ms >= ttl_ms:
            raise ConfigurationError(
                f"refresh_ahead ({given!r}) must be shorter than ttl ({ttl!r}): it is the "
                "window before expiry in which one caller reloads the entry"
            )
        return window_ms, 0.0
    beta = given.beta
    if (
        isinstance(beta, bool)
        or not isinstance(beta, int | float)
        or not 0 < beta < math.inf  # NaN fails both
    ):
        raise ConfigurationError(
            f"refresh_ahead=XFetch(beta=...) must be a finite number > 0, e.g. 1.0 (the "
            f"paper's default; larger refreshes earlier); got {beta!r}"
        )
    if given.window is None:
        return ttl_ms, float(beta)
    window_ms = milliseconds("refresh_ahead=XFetch(window=...)", given.window)
    if window_ms >= ttl_ms:
        raise ConfigurationError(
            f"refresh_ahead=XFetch(window={given.window!r}) must be shorter than ttl "
            f"({ttl!r}): no entry is refreshed while more than the window is left; "
            "leave it out to bound by the ttl alone"
        )
    return window_ms, float(beta)
