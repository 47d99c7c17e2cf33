"""The Lua scripts, with their KEYS/ARGV contracts.

Scripts receive keys and arguments only; their text is constant. Every key a script
touches belongs to one entry and shares its hash tag (or is one tag's version, alone),
so each script stays in one Redis Cluster slot (the waiters' wake-up lists, named
from the waiters set, too). The shared fragments (waking waiters, writing a value)
are text, not separate scripts, because EVAL scripts cannot call each other. Each
script's builder, just after it, is the one place that lays out its KEYS and ARGV.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from ._keys import EntryKeys


@dataclass(slots=True)
class RunScript:
    """Run a Lua script by name (EVALSHA, reloaded by redis-py after a flush). Made by
    the script's builder below, never by hand; flows yield it as an effect."""

    script: ScriptName
    keys: tuple[str, ...]
    args: tuple[Any, ...]


# Wake every registered waiter: one token on each waiter's own wake-up list (KEYS[4]
# .. ':' .. its token, in the entry's hash slot), which expires so a token nobody
# collected cannot linger. Per-waiter lists let a waiter that gives up take back
# exactly its own registration and token (LEAVE), whatever happened meanwhile.
_WAKE_WAITERS: Final = """
local function wake_waiters(waiters_key, wake_prefix, wake_ttl_ms)
  local waiting = redis.call('SMEMBERS', waiters_key)
  if #waiting == 0 then return end
  redis.call('DEL', waiters_key)
  for i = 1, #waiting do
    local wake_key = wake_prefix .. ':' .. waiting[i]
    redis.call('RPUSH', wake_key, '1')
    redis.call('PEXPIRE', wake_key, wake_ttl_ms)
  end
end
"""

ACQUIRE: Final = """
-- KEYS[1] value key, KEYS[2] lock key, KEYS[3] waiters set
-- ARGV[1] the caller's token, ARGV[2] lock ttl (ms), ARGV[3] expected type of the
-- value ('hash' or 'string'), ARGV[4] '1' to ignore a cached value (it was corrupt,
-- or is being replaced), ARGV[5] (optional) how long entries are kept past their
-- ttl (ms; grace, stale_if_error): a value with no more than that left is stale,
-- and counts as not cached here
-- returns {1, value} when a fresh value of the expected type is cached (HGETALL
-- pairs or GET bytes); {0} when the caller now holds the lock and must load; {2,
-- pttl} when another caller holds it: the caller's token joins the waiters set, and
-- it should wait for a token on its own wake-up list (KEYS[3]'s entry .. ':wake:' ..
-- token) for at most pttl ms. Found or owned, the caller is no waiter any more.
-- Idempotent: the same token asking again (a retry after a lost reply) gets the
-- same answer.
if ARGV[4] ~= '1' then
  local kind = redis.call('TYPE', KEYS[1]).ok
  local keep = tonumber(ARGV[5] or '0')
  local left = -1
  if kind == ARGV[3] and keep > 0 then left = redis.call('PTTL', KEYS[1]) end
  if kind == ARGV[3] and (left < 0 or left > keep) then
    redis.call('SREM', KEYS[3], ARGV[1])
    if kind == 'hash' then return {1, redis.call('HGETALL', KEYS[1])} end
    return {1, redis.call('GET', KEYS[1])}
  end
end
-- Sent again after a lost reply (a client's retry), the caller may hold it already.
local holder = redis.call('GET', KEYS[2])
if holder == ARGV[1] or (not holder and redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])) then
  redis.call('SREM', KEYS[3], ARGV[1])
  return {0}
end
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('PEXPIRE', KEYS[3], ARGV[2])
return {2, redis.call('PTTL', KEYS[2])}
"""


def acquire_call(
    keys: EntryKeys,
    *,
    token: str,
    lock_ttl_ms: int,
    redis_type: str,
    ignore_cached: bool,
    keep_ms: int | None = None,
) -> RunScript:
    """ACQUIRE for one entry; `keep_ms` left out, no cached value counts as stale."""
    args: tuple[Any, ...] = (token, lock_ttl_ms, redis_type, "1" if ignore_cached else "0")
    if keep_ms is not None:
        args += (keep_ms,)
    return RunScript(ScriptName.ACQUIRE, (keys.value, keys.lock, keys.waiters), args)


# Write an entry: 'string' (one payload argument) or 'hash' (field/value pairs from
# ARGV[first] on, replacing the whole record), with its ttl. Anything else writes
# nothing.
_WRITE_VALUE: Final = """
local function write_value(key, kind, ttl_ms, first)
  if kind == 'string' then
    redis.call('SET', key, ARGV[first], 'PX', ttl_ms)
  elseif kind == 'hash' then
    redis.call('DEL', key)
    -- in chunks: unpack() of a very large table overflows Lua's stack
    for at = first, #ARGV, 1000 do
      redis.call('HSET', key, unpack(ARGV, at, math.min(at + 999, #ARGV)))
    end
    redis.call('PEXPIRE', key, ttl_ms)
  elseif kind == 'drop' then
    redis.call('DEL', key)
  end
end
"""

STORE: Final = (
    _WAKE_WAITERS
    + _WRITE_VALUE
    + """
-- KEYS[1] value key, KEYS[2] lock key, KEYS[3] waiters set, KEYS[4] wake-up lists'
-- prefix (each waiter's list is KEYS[4] .. ':' .. its token)
-- ARGV[1] lock token, ARGV[2] what to do: 'string' or 'hash' to write, 'release' to
-- only give up the lock, 'drop' to delete what is cached and give it up,
-- ARGV[3] value ttl (ms), ARGV[4] wake-up list ttl (ms),
-- ARGV[5..] the payload: one string, or field/value pairs
-- returns 1 if the caller still held the lock (value written, waiters woken), 0 if
-- its lease was revoked by an invalidation or expiry: nothing is written, so a value
-- loaded before an invalidation can never be stored after it.
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
write_value(KEYS[1], ARGV[2], ARGV[3], 5)
redis.call('DEL', KEYS[2])
wake_waiters(KEYS[3], KEYS[4], ARGV[4])
return 1
"""
)

# STORE's ARGV[2] besides a Redis type: give up the lock only, or delete what is cached.
RELEASE_ONLY: Final = "release"
# Store nothing and delete what is cached (under the lease): a reload whose result is
# not to be cached must not leave the older value it was meant to replace.
DROP: Final = "drop"


def store_call(
    keys: EntryKeys,
    *,
    token: str,
    kind: str,
    ttl_ms: int,
    wake_ttl_ms: int,
    payload: Sequence[Any] = (),
) -> RunScript:
    """STORE: `kind` is a Redis type to write `payload`, RELEASE_ONLY or DROP."""
    return RunScript(ScriptName.STORE, tuple(keys), (token, kind, ttl_ms, wake_ttl_ms, *payload))


STORE_TIMED: Final = (
    _WAKE_WAITERS
    + _WRITE_VALUE
    + """
-- KEYS[1] value key, KEYS[2] lock key, KEYS[3] waiters set, KEYS[4] wake-up lists'
-- prefix, KEYS[5] the entry's load time key
-- ARGV[1] lock token, ARGV[2] what to do, as STORE's ARGV[2], ARGV[3] value ttl
-- (ms), ARGV[4] wake-up list ttl (ms), ARGV[5] how long the load took (ms),
-- ARGV[6..] the payload: one string, or field/value pairs
-- returns 1 or 0, as STORE. For refresh_ahead=XFetch(): a value written gets its load
-- time beside it, as long as it lives, for every process's PEEK_TIMED.
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
write_value(KEYS[1], ARGV[2], ARGV[3], 6)
if ARGV[2] == 'string' or ARGV[2] == 'hash' then
  redis.call('SET', KEYS[5], ARGV[5], 'PX', ARGV[3])
end
redis.call('DEL', KEYS[2])
wake_waiters(KEYS[3], KEYS[4], ARGV[4])
return 1
"""
)


def timed_store_call(
    keys: EntryKeys,
    *,
    token: str,
    kind: str,
    ttl_ms: int,
    wake_ttl_ms: int,
    load_ms: int,
    payload: Sequence[Any] = (),
) -> RunScript:
    """STORE_TIMED: store_call's, with how long the load took."""
    args = (token, kind, ttl_ms, wake_ttl_ms, load_ms, *payload)
    return RunScript(ScriptName.STORE_TIMED, (*keys, keys.load_ms), args)


INVALIDATE: Final = (
    _WAKE_WAITERS
    + """
-- KEYS[1] value key, KEYS[2] lock key, KEYS[3] waiters set, KEYS[4] wake-up lists'
-- prefix
-- ARGV[1] wake-up list ttl (ms)
-- returns 1 if a value or negative sentinel was deleted, else 0. Deleting the lock
-- revokes the lease of any load in flight, so its (older) result is refused; the
-- woken waiters look again and one of them loads afresh.
local existed = redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[2])
wake_waiters(KEYS[3], KEYS[4], ARGV[1])
return existed
"""
)


def invalidate_call(keys: EntryKeys, *, wake_ttl_ms: int) -> RunScript:
    return RunScript(ScriptName.INVALIDATE, tuple(keys), (wake_ttl_ms,))


UPDATE_FIELD: Final = (
    _WAKE_WAITERS
    + """
-- KEYS[1] value key, KEYS[2] lock key, KEYS[3] waiters set, KEYS[4] wake-up lists'
-- prefix
-- ARGV[1] the reserved meta field, ARGV[2] field, ARGV[3] value, ARGV[4] ttl (ms),
-- ARGV[5] wake-up list ttl (ms), ARGV[6] the time kept past the ttl (ms; grace,
-- stale_if_error)
-- returns 1 if a cached record was updated and its ttl refreshed; 0 if nothing, a
-- negative sentinel or foreign data is cached: no partial record is ever created.
-- A record already past its ttl (kept for grace or errors) is updated but not made
-- fresh: its other fields are as old as they were.
-- Either way the lock goes, as in INVALIDATE: a load in flight read the row before
-- this write, so its lease is revoked and its older result refused.
redis.call('DEL', KEYS[2])
wake_waiters(KEYS[3], KEYS[4], ARGV[5])
if redis.call('TYPE', KEYS[1]).ok ~= 'hash' then return 0 end
local count = tonumber(redis.call('HGET', KEYS[1], ARGV[1]))
if not count then return 0 end
if redis.call('HSET', KEYS[1], ARGV[2], ARGV[3]) == 1 then
  redis.call('HSET', KEYS[1], ARGV[1], count + 1)
end
local left = redis.call('PTTL', KEYS[1])
if left < 0 or left > tonumber(ARGV[6]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
return 1
"""
)


def update_field_call(
    keys: EntryKeys,
    *,
    meta_field: str,
    field: object,
    value: object,
    ttl_ms: int,
    wake_ttl_ms: int,
    keep_ms: int,
) -> RunScript:
    args = (meta_field, field, value, ttl_ms, wake_ttl_ms, keep_ms)
    return RunScript(ScriptName.UPDATE_FIELD, tuple(keys), args)


PUT: Final = (
    _WAKE_WAITERS
    + _WRITE_VALUE
    + """
-- KEYS[1] value key, KEYS[2] lock key, KEYS[3] waiters set, KEYS[4] wake-up lists'
-- prefix
-- ARGV[1] 'string' or 'hash', ARGV[2] value ttl (ms), ARGV[3] wake-up list ttl (ms),
-- ARGV[4..] the payload
-- returns 1. A cache-put after a write the caller made itself: the lock goes first,
-- as in INVALIDATE, so a load in flight (it read the row before this write) cannot
-- store its older result over this one; the woken waiters find the new value.
redis.call('DEL', KEYS[2])
write_value(KEYS[1], ARGV[1], ARGV[2], 4)
wake_waiters(KEYS[3], KEYS[4], ARGV[3])
return 1
"""
)


def put_call(
    keys: EntryKeys, *, kind: str, ttl_ms: int, wake_ttl_ms: int, payload: Sequence[Any]
) -> RunScript:
    return RunScript(ScriptName.PUT, tuple(keys), (kind, ttl_ms, wake_ttl_ms, *payload))


LEAVE: Final = """
-- KEYS[1] waiters set, KEYS[2] this waiter's wake-up list
-- ARGV[1] the waiter's token
-- returns 1. A caller that gives up (cancelled, failed) takes back exactly what the
-- lock script registered for it, and the token a store may have pushed for it:
-- nothing of it is left to wake, or to be woken for, later.
redis.call('SREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
return 1
"""


def leave_call(keys: EntryKeys, *, token: str) -> RunScript:
    return RunScript(ScriptName.LEAVE, (keys.waiters, keys.wake_list(token)), (token,))


RENEW: Final = """
-- KEYS[1] lock key, KEYS[2] waiters set (the entry's, in the same slot)
-- ARGV[1] the holder's token, ARGV[2] the lease (ms): the lock's ttl
-- returns 1 if the caller still holds the lock: it now lives ARGV[2] ms more, and so
-- does its waiters' registration; 0 if the lease was revoked (an invalidation) or
-- expired: nothing changes, and the holder renews no more. Sent every third of the
-- lease while the holder's loader runs, so that a holder that dies frees the key
-- within one lease however slow its loader.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""


def renew_call(keys: EntryKeys, *, token: str, lease_ms: int) -> RunScript:
    return RunScript(ScriptName.RENEW, (keys.lock, keys.waiters), (token, lease_ms))


TAG_RENEW: Final = """
-- KEYS[1] a tag's version key, whose version a load in flight was stamped with
-- ARGV[1] how long the version must live from now, at least (ms): TAG_STAMP's ARGV[2]
-- returns 1 if the version is still there (its life stretched to twice ARGV[1] if
-- less than ARGV[1] was left; never shortened), 0 if it is gone (invalidated,
-- expired): it is not made again, as a version is never made twice. Sent with the
-- load's lock renewals, so that a load longer than its tags' versions live does
-- not find them expired at its store (a miss, and a reload on every call).
local left = redis.call('PTTL', KEYS[1])
if left == -2 then return 0 end
if left >= 0 and left < tonumber(ARGV[1]) then
  redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[1]))
end
return 1
"""


def tag_renew_call(version_key: str, *, life_ms: int) -> RunScript:
    return RunScript(ScriptName.TAG_RENEW, (version_key,), (life_ms,))


PEEK: Final = """
-- KEYS[1] value key
-- ARGV[1] expected type of the value ('hash' or 'string')
-- returns {} when nothing is cached; {false} when the key holds another type;
-- {value, pttl} otherwise (HGETALL pairs or GET bytes, and the ms left to live).
-- The lookup of functions with refresh_ahead: one round trip tells value and age.
local kind = redis.call('TYPE', KEYS[1]).ok
if kind == 'none' then return {} end
if kind ~= ARGV[1] then return {false} end
if kind == 'hash' then return {redis.call('HGETALL', KEYS[1]), redis.call('PTTL', KEYS[1])} end
return {redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1])}
"""


def peek_call(value_key: str, *, redis_type: str) -> RunScript:
    return RunScript(ScriptName.PEEK, (value_key,), (redis_type,))


PEEK_TIMED: Final = """
-- KEYS[1] value key, KEYS[2] the entry's load time key
-- ARGV[1] expected type of the value ('hash' or 'string')
-- returns as PEEK, with the load time (ms) third: {value, pttl, load ms}, false for
-- it when unknown. The lookup of refresh_ahead=XFetch(): one round trip still.
local kind = redis.call('TYPE', KEYS[1]).ok
if kind == 'none' then return {} end
if kind ~= ARGV[1] then return {false} end
local read = 'GET'
if kind == 'hash' then read = 'HGETALL' end
return {redis.call(read, KEYS[1]), redis.call('PTTL', KEYS[1]), redis.call('GET', KEYS[2])}
"""


def timed_peek_call(value_key: str, load_ms_key: str, *, redis_type: str) -> RunScript:
    return RunScript(ScriptName.PEEK_TIMED, (value_key, load_ms_key), (redis_type,))


REVOKE: Final = (
    _WAKE_WAITERS
    + """
-- KEYS[1] value key (untouched), KEYS[2] lock key, KEYS[3] waiters set, KEYS[4]
-- wake-up lists' prefix
-- ARGV[1] wake-up list ttl (ms)
-- returns 1. Revokes the lease of a load in flight, keeping what is cached: that load
-- read the primary before a write the caller knows of, so its result is refused;
-- its waiters are woken to look again (fn.refresh() takes the lock next).
redis.call('DEL', KEYS[2])
wake_waiters(KEYS[3], KEYS[4], ARGV[1])
return 1
"""
)


def revoke_call(keys: EntryKeys, *, wake_ttl_ms: int) -> RunScript:
    return RunScript(ScriptName.REVOKE, tuple(keys), (wake_ttl_ms,))


TAG_STAMP: Final = """
-- KEYS[1] a tag's version key
-- ARGV[1] a new version (16 hex digits, never used before), ARGV[2] how long the
-- version must live from now, at least (ms): as long as an entry stamped with it
-- could. It is given twice that, so that it is renewed (a write, which empties near
-- caches) at most once in ARGV[2].
-- returns {version, 0}: the tag's version, made from ARGV[1] if there was none;
-- {version, 1} if the key held foreign data (another type, or not a version),
-- replaced. Run before a load reads the primary (or before set() writes): the entry
-- is stamped with the versions it returns, and read as a miss once any of them is
-- gone (invalidate_tags() deletes it; eviction and expiry do the same, harmlessly).
local kind = redis.call('TYPE', KEYS[1]).ok
local version = false
if kind == 'string' then
  version = redis.call('GET', KEYS[1])
  if #version ~= 16 or not string.match(version, '^%x+$') then version = false end
end
if not version then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', 2 * tonumber(ARGV[2]))
  if kind == 'none' then return {ARGV[1], 0} end
  return {ARGV[1], 1}
end
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[2]))
end
return {version, 0}
"""


def tag_stamp_call(version_key: str, *, version: str, life_ms: int) -> RunScript:
    return RunScript(ScriptName.TAG_STAMP, (version_key,), (version, life_ms))


class ScriptName(enum.Enum):
    """The scripts a flow can ask a driver to run."""

    ACQUIRE = ACQUIRE
    STORE = STORE
    STORE_TIMED = STORE_TIMED
    INVALIDATE = INVALIDATE
    UPDATE_FIELD = UPDATE_FIELD
    PEEK = PEEK
    PEEK_TIMED = PEEK_TIMED
    LEAVE = LEAVE
    RENEW = RENEW
    TAG_RENEW = TAG_RENEW
    PUT = PUT
    REVOKE = REVOKE
    TAG_STAMP = TAG_STAMP


class AcquireStatus(enum.IntEnum):
    """First element of ACQUIRE's reply."""

    OWNED = 0
    FOUND = 1
    HELD = 2
