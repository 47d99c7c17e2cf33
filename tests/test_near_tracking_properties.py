"""Per-key tracking against a model of Redis's tracking table: a hypothesis state
machine interleaves reads, writes, the registrar's requests and replies, reports,
table evictions, FLUSHALL and lost connections in any order Redis and the network
allow, then rereads what a reconnect set aside, and checks that the near cache never
holds a key Redis will not report."""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from cached_aside._codecs import MSGPACK_CODEC
from cached_aside._near import MISSING, NearCache
from cached_aside._near_store import NearStore

KEYS = ("a", "b")
MAX_ENTRIES = 2  # small: tickets and registrations pushed out too
TTL_MS = 60_000  # nothing expires during a run
FLUSHED = None  # a report of FLUSHALL, as Redis sends it (a null message)
# What empties everything happens at one step in RARE's range only: the rest of the
# steps get to build the interleavings that matter.
RARE = st.integers(0, 4)


class Tracking(RuleBasedStateMachine):
    """One store and the Redis it reads. Redis is one thread: a read, a write or a
    registration is processed at one step; what it sends back (a read's value, the
    registrar's reply, a report to the listener) arrives at a later step, each
    connection in order, the connections in any order among themselves."""

    def __init__(self) -> None:
        super().__init__()
        self.store = NearStore(
            NearCache(tracking="keys", max_entries=MAX_ENTRIES), MSGPACK_CODEC.freeze
        )
        assert self.store.registrations is not None
        self.store.registrations.register = self._submit
        self.store.switch(True)
        self.version = dict.fromkeys(KEYS, 0)  # what Redis holds
        self.tracked: set[str] = set()  # keys Redis tracks for the registrar
        self.queue: list[tuple[str, int]] = []  # registrations not yet sent
        self.replies: list[tuple[str, int, bool]] = []  # processed, reply on its way
        self.reports: list[str | None] = []  # on their way to the listener
        self.reads: list[tuple[str, int, int, bool]] = []  # (key, ticket, value read, a reread?)
        self.set_aside: list[str] = []  # keys to reread after a reconnect
        self.lost = False  # a connection is gone and the listener does not know yet

    def _submit(self, store: NearStore, key: str, number: int) -> None:
        self.queue.append((key, number))

    @initialize(warm=st.booleans())
    def start(self, warm: bool) -> None:
        """Cold, or every key kept and tracked already (the races start nearer)."""
        for key in KEYS if warm else ():
            self.read(key)
            self._fill(0)  # not kept: its registration is asked for
            self.registrar_sends(refused=False, answered=True)
            self.read(key)
            self._fill(0)

    # -- a reader ------------------------------------------------------------------

    @rule(key=st.sampled_from(KEYS))
    def read(self, key: str) -> None:
        """A ticket, then the read sent and answered (its value on its way back)."""
        ticket = self.store.expect(key)
        if ticket is not None:
            self.reads.append((key, ticket, self.version[key], False))

    @rule(key=st.sampled_from(KEYS))
    def read_then_a_write(self, key: str) -> None:
        """The race that matters most, in one step: a read answered, then another
        process changes the key before the read fills."""
        self.read(key)
        self.write(key, "theirs")

    @precondition(lambda self: self.reads)
    @rule(data=st.data())
    def a_read_fills(self, data: st.DataObject) -> None:
        self._fill(data.draw(st.integers(0, len(self.reads) - 1)))

    def _fill(self, index: int) -> None:
        key, ticket, value, reread = self.reads.pop(index)
        if reread:
            self.store.aside.restore(key, ticket, (value, TTL_MS))
        else:
            self.store.fill(key, ticket, value, TTL_MS)

    # -- Redis ---------------------------------------------------------------------

    def _untrack(self, key: str) -> None:
        """Redis reports a tracked key once, and stops tracking it."""
        if key in self.tracked:
            self.tracked.discard(key)
            if not self.lost:  # a broken redirect: RESP2 drops the report
                self.reports.append(key)

    @rule(key=st.sampled_from(KEYS), how=st.sampled_from(["theirs", "own", "table"]))
    def write(self, key: str, how: str) -> None:
        """A write by another process, or by this one (which drops its copy at once
        too); or none, but the key pushed out of Redis's tracking table
        (tracking-table-max-keys), which Redis reports as if it changed."""
        if how != "table":
            self.version[key] += 1
        self._untrack(key)
        if how == "own":
            self.store.drop([key])

    @precondition(lambda self: self.queue)
    @rule(refused=st.booleans(), answered=st.booleans())
    def registrar_sends(self, refused: bool, answered: bool) -> None:
        """Redis processes the oldest registration (or refuses it: MOVED, say); its
        reply arrives later, or at once (`answered`)."""
        key, number = self.queue.pop(0)
        if not refused and not self.lost:
            self.tracked.add(key)
        if not self.lost:
            self.replies.append((key, number, not refused))
            if answered:
                self.reply_arrives()

    @precondition(lambda self: self.replies)
    @rule()
    def reply_arrives(self) -> None:
        key, number, processed = self.replies.pop(0)
        self.store.registered([(key, number)], processed)

    @precondition(lambda self: self.reports)
    @rule()
    def report_arrives(self) -> None:
        report = self.reports.pop(0)
        if report is FLUSHED:
            self.store.clear(registrations=True)
        else:
            self.store.drop([report])

    @rule(what=st.sampled_from(["registrar", "listener", "flushall"]), rare=RARE)
    def everything_changes(self, what: str, rare: int) -> None:
        """A FLUSHALL (every key changed and untracked, one null report); or Redis
        closed a connection: the registrar's (its keys forgotten) or the listener's
        (reports dropped from now on), and nothing on its way arrives."""
        if rare:
            return
        if what == "flushall":
            for key in KEYS:
                self.version[key] += 1
            self.tracked.clear()
            if not self.lost:
                self.reports.append(FLUSHED)
            return
        if what == "registrar":
            self.tracked.clear()
        self.lost = True
        self.replies.clear()
        self.reports.clear()

    @precondition(lambda self: self.lost)
    @rule()
    def listener_notices(self) -> None:
        """As the listener's loop and the registrar's thread do it: entries set
        aside, what was queued abandoned, registrations forgotten; both connections
        anew, and the keys set aside to reread."""
        self.store.aside.suspend()
        queued, self.queue = self.queue, []
        self.store.registered(queued, processed=False)
        self.store.forget_registrations()
        self.tracked.clear()  # the old registrar's connection is closed
        self.lost = False
        self.set_aside = self.store.aside.resume()

    @precondition(lambda self: self.set_aside)
    @rule()
    def revalidation_registers(self) -> None:
        """Revalidation asks the new registrar to track what was set aside."""
        assert self.store.registrations is not None
        self.store.registrations.request(self.store, self.set_aside)

    @precondition(lambda self: self.set_aside)
    @rule(then_a_write=st.booleans())
    def revalidation_rereads(self, then_a_write: bool) -> None:
        """Its tickets, then the rereads sent and answered: when the replies came,
        or when it stopped waiting for them; and maybe another process's write
        right after them."""
        keys, self.set_aside = self.set_aside, []
        for key, ticket in self.store.aside.vouch(keys):
            self.reads.append((key, ticket, self.version[key], True))
            if then_a_write:
                self.write(key, "theirs")

    # -- the guarantee ---------------------------------------------------------------

    @invariant()
    def every_kept_key_will_be_reported(self) -> None:
        """Outside the window in which a lost connection goes unnoticed, a kept
        value is the current one or its report is on its way; and Redis tracks its
        key (or its report is on its way), so the next change will be reported."""
        if self.lost or FLUSHED in self.reports:
            return
        for key in KEYS:
            value = self.store.get(key)
            if value is MISSING or key in self.reports:
                continue
            assert value == self.version[key], f"{key}: stale {value}, Redis has a newer one"
            assert key in self.tracked, f"{key}: kept, but Redis would not report a change"

    @invariant()
    def bounded(self) -> None:
        registrations = self.store.registrations
        assert registrations is not None
        assert len(registrations) <= 2 * self.store.config.max_entries


Tracking.TestCase.settings = settings(
    max_examples=400,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_per_key_tracking_against_a_model_of_redis = Tracking.TestCase
