"""NearCache: the configuration of the in-process tier in front of Redis, and the names
its parts share (MISSING, the tracking modes and states, what a reread found). The tier
itself is `_near_store`, its byte budget `_near_budget`. No redis or asyncio imports here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Final, Literal

from ._errors import ConfigurationError
from ._validate import Duration, flag, milliseconds, whole


class Near(enum.Enum):
    MISSING = "missing"


MISSING: Final = Near.MISSING
DEFAULT_MAX_ENTRIES = 10_000
Tracking = Literal["keys", "bcast"]
TRACKING_MODES: Final = ("keys", "bcast")
# What a reread of one key found: its value and the ms its Redis entry has left, or
# None when the key cannot be vouched for (gone, changed type, aged, a failure).
Reread = tuple[Any, int] | None


@dataclass(frozen=True, slots=True)
class NearCache:
    """Configuration of a function's in-process tier: `near=NearCache(...)`.

    Args:
        max_entries: what the tier keeps per function, at most: its values and the
            tickets of reads in flight together; tickets go first (the oldest), then
            the values W-TinyLFU ranks lowest.
        max_bytes: the most the tier's entries may take, counted as key + value +
            a fixed overhead per entry (see the near-cache docs). On the engine's
            `near=` it is one budget shared by every function using the engine's
            near cache; a function's own `near=NearCache(...)` has its own. None:
            bounded by max_entries only.
        ttl: the longest an entry lives in process (seconds or timedelta); never longer
            than what its Redis entry has left. None: only that bound.
        allow_untracked: where the server cannot track keys (fakeredis, some managed
            services), serve near entries anyway, accepting that another process's
            change is seen only when the entry expires. Needs a `ttl`.
        tracking: how Redis tells this process of changes. "bcast": of every change
            under the engine's prefix, whether or not this process holds the key.
            "keys": only of keys this process registered (a key's first read from
            Redis registers it and is not kept; the next one is). One engine's near
            caches all use the same mode.
    """

    max_entries: int = DEFAULT_MAX_ENTRIES
    ttl: Duration | None = None
    allow_untracked: bool = False
    max_bytes: int | None = None
    tracking: Tracking = "bcast"

    def __post_init__(self) -> None:
        if self.tracking not in TRACKING_MODES:
            raise ConfigurationError(
                f'NearCache(tracking=...) must be "keys" or "bcast", not {self.tracking!r}'
            )
        whole("NearCache(max_entries=...)", self.max_entries)
        if self.max_bytes is not None:
            whole("NearCache(max_bytes=...)", self.max_bytes)
        if self.ttl is not None:
            milliseconds("NearCache(ttl=...)", self.ttl)
        flag("NearCache(allow_untracked=...)", self.allow_untracked)
        if self.allow_untracked and self.ttl is None:
            raise ConfigurationError(
                "NearCache(allow_untracked=True) needs a ttl: without tracking, the ttl is "
                "the only bound on how long another process's change stays unseen"
            )

    @property
    def ttl_seconds(self) -> float | None:
        """`ttl` in seconds, or None when only the Redis entry's ttl bounds it."""
        return None if self.ttl is None else milliseconds("ttl", self.ttl) / 1000.0


TrackingState = Literal["starting", "tracking", "down", "unsupported"]
