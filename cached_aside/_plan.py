"""What the flows know of one decorated function (Plan) and what a read answers
(Served): plain data shared by flows, the read rule, flights and drivers. No I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ._breaker import CircuitBreaker
from ._codecs import Codec
from ._keys import KeyTemplate
from ._options import Options
from ._results import Source
from ._stats import Stats

# Seconds a joiner of this process waits for its leader beyond the lease and the
# loader_timeout: the leader renews its lease while it lives, so a long load is no
# sign of a dead leader; past this bound the joiner waits through Redis instead.
PATIENCE_FLOOR_S = 10.0


@dataclass(frozen=True, slots=True)
class Plan:
    """What the flows need to know about one decorated function."""

    name: str
    codec: Codec
    options: Options
    stats: Stats
    # Look up with the PEEK script (value and ttl): refresh_ahead, grace,
    # stale_if_error or a near cache is on.
    peek: bool = False
    # With stale_if_error: skips a loader that keeps failing, serving stale values.
    loader_breaker: CircuitBreaker | None = None
    # tags=: templates over the loader's arguments; each entry carries their versions.
    tags: tuple[KeyTemplate, ...] = ()
    # How long a caller waits for another caller of its process before it reads by
    # itself (and waits through Redis, as another process does). A leader renews its
    # lease while it lives, so this is not the lease: it waits as long as Redis
    # waiters would (the loader_timeout, if any), and at least PATIENCE_FLOOR_S, which
    # only keeps a stuck leader from holding its joiners for ever. Computed once: every
    # call reads it.
    patience: float = field(init=False, repr=False, compare=False)
    # The lookup (a Command) of each key lately read, made once per key rather than
    # per hit (_driving.lookup: making it cost 5% of a sync hit's instructions).
    lookups: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        options = self.options
        seconds = max(options.lock_ttl_ms, options.loader_timeout_ms) / 1000.0
        object.__setattr__(self, "patience", seconds + PATIENCE_FLOOR_S)


@dataclass(slots=True)
class Served:
    """A flow's answer.

    lease_kept is False when an invalidation revoked the load's lease. shareable is
    True when the value is fresh for anyone who joined this call before it was sealed:
    a load whose lease held until the store, or a read sent after the seal.
    """

    value: Any
    source: Source
    lease_kept: bool = True
    shareable: bool = False
    ttl_ms: int = -1  # the entry's remaining ttl, when the lookup told (PEEK)
