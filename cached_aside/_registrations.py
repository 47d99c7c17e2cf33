"""Which keys Redis tracks for a near cache in per-key mode (`tracking="keys"`), and
since when. The rule that keeps a value honest lives here; no I/O, no lock (the
store calls it under its budget's lock).

Redis reports a change only for keys registered with it (read by the registrar's
connection). A value read from Redis may be kept only if its key's registration was
processed before the read was sent: otherwise a write in between would go
unreported for good. The registrar's reply is that proof: its arrival takes a number
from the store's ticket counter (`confirmed`), and a read's ticket, taken before the
read was sent, vouches for its value only when it is the larger number.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator


class Registrations:
    """A store's registrations: those asked for (`pending`, each with the number of
    its request, so that a reply to a request voided since confirms nothing) and those
    Redis confirmed (`confirmed`, with the number taken when the reply arrived). Both
    hold at most `most` keys: a request over that is not made (the next fill asks
    again), a confirmation over that pushes out the oldest one."""

    def __init__(self, numbers: Iterator[int], most: int) -> None:
        self._numbers = numbers
        self._most = most
        self._pending: dict[str, int] = {}
        self._confirmed: dict[str, int] = {}

    def vouches(self, key: str, ticket: int) -> bool:
        """Whether a read that took `ticket` before it was sent came after Redis
        processed the key's registration (so any later change is reported)."""
        confirmed = self._confirmed.get(key)
        return confirmed is not None and confirmed < ticket

    def request(self, key: str) -> int | None:
        """The number of a new registration of `key` to send; None when one is on
        its way already, or too many are, or Redis tracks it already (a read sent
        before the confirmation is refused, but needs no new registration)."""
        pending = self._pending
        if key in pending or key in self._confirmed or len(pending) >= self._most:
            return None
        number = pending[key] = next(self._numbers)
        return number

    def confirm(self, key: str, number: int) -> None:
        """Redis processed request `number`: unless it was voided since (a change of
        the key reported, a clear), the key is tracked from now on."""
        if self._pending.get(key) != number:
            return
        del self._pending[key]
        confirmed = self._confirmed
        confirmed.pop(key, None)  # to the end: the oldest confirmations go first
        confirmed[key] = next(self._numbers)
        if len(confirmed) > self._most:
            del confirmed[next(iter(confirmed))]

    def abandon(self, key: str, number: int) -> None:
        """Request `number` was never processed (refused, or not sent): ask again
        at the next fill."""
        if self._pending.get(key) == number:
            del self._pending[key]

    def awaiting(self, keys: Iterable[str]) -> bool:
        """Whether the registration of any of these keys is on its way."""
        pending = self._pending
        return any(key in pending for key in keys)

    def forget(self, keys: Iterable[str]) -> None:
        """Redis reported these keys changed, and stopped tracking them when it did;
        a registration on its way may have been processed before the change."""
        for key in keys:
            self._pending.pop(key, None)
            self._confirmed.pop(key, None)

    def clear(self) -> None:
        """Everything forgotten: the registrar's or the listener's connection is
        gone (Redis forgot its keys with it), or a FLUSHALL, or a fork."""
        self._pending.clear()
        self._confirmed.clear()

    def __len__(self) -> int:
        return len(self._pending) + len(self._confirmed)
