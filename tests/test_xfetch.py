"""refresh_ahead=XFetch(): the probabilistic rule with fixed draws, its invariants
(hypothesis), the load time carried beside the entry for every process, the early
reload through the same single flight, and 8 real processes refreshing hot keys once
per expiry window."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
import textwrap
import time
from typing import Any

import msgpack
import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from cached_aside import ConfigurationError, Source, XFetch, _reads, cache_aside
from cached_aside._codecs import MSGPACK_CODEC, MSGPACK_NEGATIVE
from cached_aside._effects import Signal, Spawn
from cached_aside._flows import after_miss
from cached_aside._keys import load_ms_key
from cached_aside._options import Options
from cached_aside._plan import Plan
from cached_aside._reads import Age, on_lookup, peeked, xfetch_due
from cached_aside._scripts import AcquireStatus, ScriptName
from cached_aside._stats import Stats

from .conftest import REDIS_URL, Harness, delete_prefix, eventually, unique_prefix
from .test_flows import KEY, Stepper

VALUE = msgpack.packb({"v": 1})
ONE = math.exp(-1.0)  # a draw whose -ln is 1: due exactly when left <= load_ms * beta


def xplan(**options: Any) -> Plan:
    settings: dict[str, Any] = {"ttl": 30, "lock_ttl": 10, "refresh_ahead": XFetch()}
    settings.update(options)
    decorator = cache_aside(key="product:<id>", **settings)
    return Plan("get_product", MSGPACK_CODEC, Options.of(decorator), Stats("x"), peek=True)


# -- the rule, with fixed draws ----------------------------------------------------


def test_the_rule_is_due_when_the_drawn_lead_reaches_the_time_left() -> None:
    assert xfetch_due(100, 100, 1.0, ONE)  # lead 100 ms, 100 ms left
    assert not xfetch_due(101, 100, 1.0, ONE)
    assert xfetch_due(200, 100, 2.0, ONE)  # beta scales the lead
    assert not xfetch_due(201, 100, 2.0, ONE)
    assert xfetch_due(460, 100, 1.0, 0.01)  # a small draw: far earlier (-ln 0.01 = 4.6)
    assert not xfetch_due(1, 100, 1.0, 1.0)  # the largest draw: only at expiry
    assert xfetch_due(0, 100, 1.0, 1.0)


def test_an_entry_whose_load_time_is_unknown_is_never_due_early() -> None:
    assert not xfetch_due(1, 0, 1.0, 1e-300)
    # A PEEK_TIMED reply with no load time (the entry was written by set(), or
    # before the function used XFetch): fresh until it expires.
    found, age, left = peeked(xplan(), [VALUE, 5, None, 1e-300])
    assert (found, age, left) == ({"v": 1}, Age.FRESH, 5)


def test_peeked_applies_the_rule_to_the_reply_and_its_draw() -> None:
    p = xplan()
    assert peeked(p, [VALUE, 100, b"100", ONE])[1] is Age.DUE
    assert peeked(p, [VALUE, 101, b"100", ONE])[1] is Age.FRESH
    assert on_lookup(p, [VALUE, 101, b"100", ONE]) is not None  # a plain hit
    assert on_lookup(p, [VALUE, 100, b"100", ONE]) is None  # to after_miss


def test_the_window_bounds_how_early_whatever_the_draw() -> None:
    p = xplan(refresh_ahead=XFetch(beta=1.0, window=10))
    assert peeked(p, [VALUE, 10_000, b"1000", 1e-300])[1] is Age.DUE
    assert peeked(p, [VALUE, 10_001, b"1000", 1e-300])[1] is Age.FRESH


def test_a_negative_entry_is_never_due() -> None:
    assert peeked(xplan(), [MSGPACK_NEGATIVE, 1, b"1000", 1e-300])[1] is Age.FRESH


def test_one_reply_is_judged_with_one_draw(monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver's lookup judgement, its routing and after_miss read the same reply:
    they must agree, so the draw is taken once and kept with the reply."""
    draws = iter([1.0 - ONE, 0.0])  # random() values: the draws e^-1, then 1.0

    class Source_:
        @staticmethod
        def random() -> float:
            return next(draws)

    monkeypatch.setattr(_reads, "random", Source_)
    reply = [VALUE, 100, b"100"]
    assert [peeked(xplan(), reply)[1] for _ in range(3)] == [Age.DUE] * 3
    assert reply[3] == pytest.approx(ONE)


def test_a_fixed_window_function_draws_nothing() -> None:
    p = Plan(
        "f",
        MSGPACK_CODEC,
        Options.of(cache_aside(key="p:<id>", ttl=30, refresh_ahead=5)),
        Stats("f"),
        peek=True,
    )
    reply = [VALUE, 4_000]
    assert peeked(p, reply)[1] is Age.DUE
    assert reply == [VALUE, 4_000]


@given(
    pttl=st.integers(min_value=-2, max_value=200_000),
    load_ms=st.integers(min_value=0, max_value=100_000),
    beta=st.floats(min_value=1e-3, max_value=1e3),
    draw=st.floats(min_value=1e-300, max_value=1.0),
    keep=st.sampled_from([0, 5_000]),
    window=st.sampled_from([None, 1, 20]),
)
def test_xfetch_is_due_only_inside_its_window_and_its_drawn_lead(
    pttl: int, load_ms: int, beta: float, draw: float, keep: int, window: int | None
) -> None:
    """Never due past the ttl (that is stale or a miss), never with more left than
    the window or the drawn lead, never without a known load time; and, with the
    same draw, due at any moment later than one it was due at."""
    p = xplan(
        ttl=60,
        grace=keep or None,
        refresh_ahead=XFetch(beta=beta, window=window),
    )
    _found, age, left = peeked(p, [VALUE, pttl, str(load_ms).encode(), draw])
    if age is Age.DUE:
        assert 0 <= left <= (60_000 if window is None else window * 1000)
        assert 0 < pttl - keep == left
        assert load_ms > 0
        assert left <= -load_ms * beta * math.log(draw)
        for later in (0, left // 2, left - 1):
            if later >= 1:
                assert peeked(p, [VALUE, later + keep, str(load_ms).encode(), draw])[1] is Age.DUE


def test_the_chance_of_being_due_is_exp_of_minus_left_over_the_lead() -> None:
    """With uniform draws, P(due) = exp(-left / (load_ms * beta)): spread, not a cliff."""
    draws = [(i + 0.5) / 10_000 for i in range(10_000)]  # an even grid of (0, 1)
    for left in (50, 100, 200, 400):
        share = sum(xfetch_due(left, 100, 1.0, u) for u in draws) / len(draws)
        assert share == pytest.approx(math.exp(-left / 100), abs=2e-3)


# -- options -------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0, -1.0, math.nan, math.inf, "1", True, None])
def test_beta_must_be_a_finite_positive_number(beta: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"refresh_ahead=XFetch\(beta=\.\.\.\)"):
        cache_aside(key="x:<id>", ttl=10, refresh_ahead=XFetch(beta=beta))


def test_the_class_itself_is_refused_with_the_fix() -> None:
    with pytest.raises(ConfigurationError, match=r"refresh_ahead=XFetch\(\)"):
        cache_aside(key="x:<id>", ttl=10, refresh_ahead=XFetch)


@pytest.mark.parametrize("window", [10, 11, -1, "5"])
def test_the_window_must_be_a_duration_shorter_than_ttl(window: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"refresh_ahead=XFetch\(window="):
        cache_aside(key="x:<id>", ttl=10, refresh_ahead=XFetch(window=window))


def test_xfetch_options() -> None:
    options = Options.of(cache_aside(key="x:<id>", ttl=10, refresh_ahead=XFetch(beta=2)))
    assert (options.refresh_ahead_ms, options.xfetch_beta) == (10_000, 2.0)
    options = Options.of(cache_aside(key="x:<id>", ttl=10, refresh_ahead=XFetch(window=3)))
    assert (options.refresh_ahead_ms, options.xfetch_beta) == (3_000, 1.0)
    assert Options.of(cache_aside(key="x:<id>", ttl=10, refresh_ahead=3)).xfetch_beta == 0.0


# -- the flow, stepped by hand -------------------------------------------------------


def due_refresh(p: Plan) -> Stepper:
    """after_miss given a due reply: it answers from the cache and spawns the reload,
    which is returned, stepped to its lock script."""
    flow = Stepper(after_miss(p, KEY, [VALUE, 900, b"1000", ONE], 500))
    spawn = flow.effect
    assert isinstance(spawn, Spawn)
    flow.reply(None)
    assert flow.result.source is Source.CACHE
    assert flow.result.value == {"v": 1}
    return Stepper(spawn.flow)


def test_a_due_entry_is_reloaded_under_the_lock_and_stored_with_its_load_time() -> None:
    refresh = due_refresh(xplan())
    acquire = refresh.effect
    assert acquire.script is ScriptName.ACQUIRE
    # The entry seen (900 ms left) counts as not cached; a newer one would be found.
    assert acquire.args[3:] == ("0", 900)
    assert refresh.reply([AcquireStatus.OWNED]) is Signal.LOAD
    assert refresh.reply({"v": 2}) is Signal.LOAD_TIME
    assert refresh.reply(42) is Signal.SEAL
    store = refresh.reply(None)
    assert store.script is ScriptName.STORE_TIMED
    assert store.keys[-1] == load_ms_key(KEY)
    assert store.args[4] == 42
    assert msgpack.unpackb(store.args[5]) == {"v": 2}
    refresh.reply(1)
    assert refresh.result is True
    assert refresh.holds == []


def test_a_reload_that_finds_a_newer_entry_does_not_load() -> None:
    """Another process's refresh stored between this lookup and this lock script."""
    refresh = due_refresh(xplan())
    refresh.reply([AcquireStatus.FOUND, msgpack.packb({"v": 2})])
    assert refresh.effect is None
    assert refresh.result is True
    assert refresh.holds == []  # nothing of this caller's left in Redis


def test_a_fixed_window_function_stores_as_before() -> None:
    refresh = due_refresh(xplan(refresh_ahead=5))
    refresh.reply([AcquireStatus.OWNED])
    assert refresh.reply({"v": 2}) is Signal.SEAL  # no LOAD_TIME asked
    store = refresh.reply(None)
    assert store.script is ScriptName.STORE
    assert len(store.keys) == 4


# -- against Redis (and fakeredis), sync and async ------------------------------------


async def test_the_load_time_is_kept_beside_the_entry_for_every_reader(
    h: Harness, twin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[str] = []

    def load(id: str) -> str:
        loads.append(id)
        time.sleep(0.05)
        return f"{id}{len(loads)}"

    fn = h.cached(load, key="x:<id>", ttl=3600, refresh_ahead=XFetch(beta=1000))
    other = h.cached(load, key="x:<id>", ttl=3600, refresh_ahead=5)
    assert await h.run(fn, "k") == "k1"
    held = int(h.raw.get(load_ms_key(fn.key("k"))))
    assert 50 <= held < 30_000  # the load's duration, in ms, at least its sleep
    assert 3_590_000 < h.raw.pttl(load_ms_key(fn.key("k"))) <= 3_600_000  # as the entry
    assert await h.run(other, "j") == "j2"  # a fixed window stores no load time
    assert h.raw.exists(load_ms_key(other.key("j"))) == 0

    # Another engine (another process) reads it with the entry: with the draw e^-1,
    # due once no more than 1000 * the load time is left.
    monkeypatch.setattr(_reads, "random", type("Fixed", (), {"random": lambda: 1.0 - ONE}))
    reader = Harness(h.mode, h.backend, twin(), h.raw).cached(
        load, key="x:<id>", ttl=3600, refresh_ahead=XFetch(beta=1000)
    )
    h.raw.pexpire(fn.key("k"), held * 1000 + 20_000)
    assert (await h.run(reader.lookup, "k")).source is Source.CACHE
    assert loads == ["k", "j"]  # not yet due
    h.raw.pexpire(fn.key("k"), held * 1000 - 20_000)
    answer = await h.run(reader.lookup, "k")
    assert (answer.value, answer.source) == ("k1", Source.CACHE)  # served at once
    assert await eventually(lambda: len(loads) == 3)  # and reloaded behind
    assert await eventually(lambda: h.raw.get(fn.key("k")) == msgpack.packb("k3"))
    assert h.raw.pttl(fn.key("k")) > 3_590_000


# -- 8 processes ---------------------------------------------------------------------

TTL_S = 1.0
WINDOW_S = 0.5  # never due with more left: a second load per expiry cannot be luck
RUN_S = 3.5
HOT_KEYS = 4
PROCESSES = 8

PROCESS_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import redis
    from cached_aside import CacheEngine, XFetch, cache_aside
    url, prefix, run_s, ttl, window, keys = sys.argv[1:7]
    # Timeouts and a lock far above any stall of a starved process: this is about
    # single flight and XFetch, not lease renewal; and a Redis failure raises here
    # (fail_open=False) instead of loading beside the lock.
    engine = CacheEngine.from_url(url, prefix=prefix, socket_timeout=10,
                                  socket_connect_timeout=10)
    raw = redis.Redis.from_url(url)

    @cache_aside(key="hot:<id>", ttl=float(ttl), lock_ttl=60, fail_open=False,
                 refresh_ahead=XFetch(beta=1.0, window=float(window)), engine=engine)
    def load(id):
        if raw.incr(f"{prefix}:inflight:{id}") != 1:
            raw.incr(f"{prefix}:overlaps")
        seconds, micros = raw.time()
        raw.rpush(f"{prefix}:loads:{id}", seconds * 1_000_000 + micros)
        time.sleep(0.02)
        raw.decr(f"{prefix}:inflight:{id}")
        return id

    print("ready", flush=True)  # started and imported: the test gives one start time
    start = float(sys.stdin.readline())
    time.sleep(max(0.0, start - time.time()))
    stop = time.time() + float(run_s)
    calls = 0
    while time.time() < stop:
        for i in range(int(keys)):
            assert load(f"k{i}") == f"k{i}"
            calls += 1
        time.sleep(0.002)
    engine.close()  # an orderly exit: no reload killed holding its key's lock
    print(calls)
    """
)


@pytest.mark.slow
def test_xfetch_refreshes_once_per_key_under_8_concurrent_processes() -> None:
    """Eight processes hammer four hot keys for over three ttls. Each key's loads never
    overlap, and two loads of a key start at least ttl - window apart: one load per
    key per expiry window, however the draws and the machine's load fall."""
    assert REDIS_URL is not None
    prefix = unique_prefix()
    argv = [
        sys.executable,
        "-c",
        PROCESS_SCRIPT,
        REDIS_URL,
        prefix,
        str(RUN_S),
        str(TTL_S),
        str(WINDOW_S),
        str(HOT_KEYS),
    ]
    processes = [
        subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(PROCESSES)
    ]
    raw = redis.Redis.from_url(REDIS_URL)
    try:
        # A barrier, not a guess at start-up time: every process has started when it
        # says so, and all are given one start a moment later.
        for process in processes:
            assert process.stdout is not None
            said = process.stdout.readline().strip()
            assert said == "ready", (said, process.communicate(timeout=120))
        start = time.time() + 0.05
        for process in processes:
            assert process.stdin is not None
            process.stdin.write(f"{start}\n")
            process.stdin.flush()
        outputs = [process.communicate(timeout=120) for process in processes]
        assert all(p.returncode == 0 for p in processes), outputs
        assert sum(int(out) for out, _ in outputs) > PROCESSES * HOT_KEYS
        starts = {
            i: [int(t) for t in raw.lrange(f"{prefix}:loads:k{i}", 0, -1)] for i in range(HOT_KEYS)
        }
        seen = (starts, [err for _, err in outputs])
        assert raw.get(f"{prefix}:overlaps") is None, seen  # never two loads of a key at once
        for i in range(HOT_KEYS):
            assert len(starts[i]) >= 2, seen  # refreshed over three ttls
            gaps = [(b - a) / 1e6 for a, b in itertools.pairwise(starts[i])]
            assert min(gaps) >= TTL_S - WINDOW_S, (gaps, seen)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
        delete_prefix(raw, prefix)
        raw.close()
