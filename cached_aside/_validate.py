"""Checks of option values, each written once, each raising ConfigurationError with
a message that names the option and says what it takes. No I/O here."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

from ._errors import ConfigurationError

Duration = int | float | timedelta

# The longest duration Redis's PX and PEXPIRE take with room to spare (their limit
# is the largest 64-bit integer of milliseconds, minus the current time).
MAX_SECONDS = 100 * 365 * 24 * 3600


def flag(name: str, value: object) -> bool:
    """True or False, and nothing that merely looks like one (1, "yes", None)."""
    if not isinstance(value, bool):
        raise ConfigurationError(f"{name} must be True or False, got {value!r}")
    return value


def whole(name: str, value: object, *, least: int = 1) -> int:
    """A whole number >= `least` (a bool is not a number here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigurationError(f"{name} must be a whole number >= {least}, got {value!r}")
    return value


def seconds(name: str, value: object) -> float:
    """A positive number of seconds (int or float), e.g. a timeout."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigurationError(f"{name} must be a positive number of seconds, got {value!r}")
    if math.isinf(value):
        raise ConfigurationError(f"{name} must be finite, got {value!r}")
    return float(value)


def milliseconds(name: str, value: object, *, allow_zero: bool = False) -> int:
    """A duration (seconds as int or float, or a timedelta) as Redis's whole
    milliseconds, rejecting nonsense early."""
    if isinstance(value, bool) or not isinstance(value, int | float | timedelta):
        raise ConfigurationError(
            f"{name} must be a number of seconds or a datetime.timedelta, got {value!r}"
        )
    amount = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if math.isnan(amount) or math.isinf(amount):
        raise ConfigurationError(f"{name} must be a finite duration, got {value!r}")
    if amount > MAX_SECONDS:
        raise ConfigurationError(
            f"{name}={value!r} is longer than Redis can expire (at most {MAX_SECONDS} "
            "seconds, 100 years); for entries that should never expire use a long ttl"
        )
    if amount < 0 or (amount == 0 and not allow_zero):
        bound = ">= 0 (0 turns it off)" if allow_zero else "> 0"
        raise ConfigurationError(f"{name} must be {bound} seconds, got {value!r}")
    result = round(amount * 1000)
    if amount > 0 and result == 0:
        raise ConfigurationError(
            f"{name}={value!r} is below Redis's 1 ms resolution; use at least 0.001 seconds"
        )
    return result


def instance(name: str, value: Any, kind: type | tuple[type, ...], example: str) -> Any:
    """`value` if it is a `kind` (None passes: "use the default"), else an error
    with an example of what to give."""
    if value is not None and not isinstance(value, kind):
        raise ConfigurationError(f"{name} must be {example}, got {value!r}")
    return value
