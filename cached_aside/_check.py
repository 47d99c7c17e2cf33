"""The opt-in start-up check (`engine.check()`, `configure(check=True)`): it tries,
on scratch keys under the engine's prefix, every command each feature sends and every
command its scripts call, and raises one error naming what is wrong (no server, a bad
URL or password, a missing ACL permission) instead of failing open call after call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis

from ._errors import ConfigurationError

# What each feature sends itself, and what its scripts call inside Redis (an ACL
# checks both; a script's denied call fails the script). docs/security.md gives the
# same lists as one ACL SETUSER per feature; tests/test_acl.py runs the scenarios as a
# user with exactly that grant.
SCRIPT_CALLS = {
    "core": (
        "GET", "SET", "DEL", "TYPE", "PTTL", "PEXPIRE",
        "HGET", "HSET", "HGETALL", "SADD", "SMEMBERS", "SREM", "RPUSH",
    ),
    # Tags are version keys: TAG_STAMP calls TYPE, GET, SET, PTTL and PEXPIRE, and
    # invalidate_tags() sends DEL, all the core's (tests/test_acl.py compares this
    # list with what the scripts call).
    "tags": (),
}  # fmt: skip

# KEYS[1] - a scratch string key, KEYS[2] - a scratch hash, KEYS[3] - a scratch set,
# KEYS[4] - a scratch list (all under the prefix)
# ARGV - names of commands to try, each with fixed arguments on those keys
# returns {name, error, name, error, ...} for each call Redis refused
PROBE = """
local calls = {
  GET = function() return redis.pcall('GET', KEYS[1]) end,
  SET = function() return redis.pcall('SET', KEYS[1], '1', 'PX', 60000) end,
  DEL = function() return redis.pcall('DEL', KEYS[1]) end,
  TYPE = function() return redis.pcall('TYPE', KEYS[1]) end,
  PTTL = function() return redis.pcall('PTTL', KEYS[1]) end,
  PEXPIRE = function() return redis.pcall('PEXPIRE', KEYS[1], 60000) end,
  HGET = function() return redis.pcall('HGET', KEYS[2], 'f') end,
  HSET = function() return redis.pcall('HSET', KEYS[2], 'f', 'v') end,
  HGETALL = function() return redis.pcall('HGETALL', KEYS[2]) end,
  SADD = function() return redis.pcall('SADD', KEYS[3], 'm') end,
  SMEMBERS = function() return redis.pcall('SMEMBERS', KEYS[3]) end,
  SREM = function() return redis.pcall('SREM', KEYS[3], 'm') end,
  RPUSH = function() return redis.pcall('RPUSH', KEYS[4], '1') end,
}
local refused = {}
for _, name in ipairs(ARGV) do
  local reply = calls[name]()
  if type(reply) == 'table' and reply.err then
    table.insert(refused, name)
    table.insert(refused, reply.err)
  end
end
for _, key in ipairs(KEYS) do redis.pcall('DEL', key) end
return refused
"""

INVALIDATION_CHANNEL = "__redis__:invalidate"


def check(
    client: Any,
    prefix: str,
    *,
    tags: bool,
    near: bool,
    listener_connection: Callable[[], Any] | None,
) -> None:
    """Raise ConfigurationError naming every problem found; return if there is none."""
    scratch = f"{prefix}:{{cached_aside:check}}"  # one slot on a cluster
    keys = [f"{scratch}:{kind}" for kind in ("string", "hash", "set", "list")]
    user = _user(client)
    try:
        client.ping()
    except redis.AuthenticationError as exc:
        raise ConfigurationError(
            f"the start-up check could not log in as {user!r}: {exc} (check the user "
            "and password in the URL)"
        ) from exc
    except redis.RedisError as exc:
        raise ConfigurationError(
            f"the start-up check could not reach Redis ({type(exc).__name__}: {exc}); "
            "check the URL (CACHED_ASIDE_REDIS_URL, else REDIS_URL) and that the server runs"
        ) from exc
    refused: list[str] = []

    def attempt(grant: str, why: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except redis.ResponseError as exc:
            if "access one of the keys" in str(exc):  # the key pattern, not the command
                grant, why = f"~{prefix}:*", "keys under the prefix"
                if any(line.startswith(grant) for line in refused):
                    return None
            refused.append(f"{grant} ({why}: {exc})")
            return None

    attempt("+get", "a hit", lambda: client.get(keys[0]))
    attempt("+hgetall", "a hash hit", lambda: client.hgetall(keys[1]))
    attempt("+blpop", "a caller waiting for a load", lambda: client.blpop([keys[3]], 0.01))
    attempt("+scan", "invalidate_all", lambda: client.scan(0, match=f"{scratch}:*", count=10))
    attempt("+unlink", "invalidate_all", lambda: client.unlink(keys[0]))
    sha = attempt("+script|load", "loading the scripts", lambda: client.script_load(PROBE))
    names = [*SCRIPT_CALLS["core"], *(SCRIPT_CALLS["tags"] if tags else ())]
    if sha is not None:
        reply = attempt(
            "+evalsha", "running the scripts", lambda: client.evalsha(sha, len(keys), *keys, *names)
        )
        pairs = list(reply or [])
        for name, error in zip(pairs[0::2], pairs[1::2], strict=True):
            name = name.decode() if isinstance(name, bytes) else str(name)
            feature = "tags" if name in SCRIPT_CALLS["tags"] else "the scripts"
            refused.append(f"+{name.lower()} ({feature} call it: {_text(error)})")
    if near and listener_connection is not None:
        _check_near(listener_connection, prefix, refused)
    if refused:
        raise ConfigurationError(
            f"the start-up check found that Redis user {user!r} may not run what "
            f"cached_aside needs under the prefix {prefix!r}: " + "; ".join(refused) + ". "
            "Grant them with ACL SETUSER; the Security docs list a least-privilege grant"
        )


def _check_near(connect: Callable[[], Any], prefix: str, refused: list[str]) -> None:
    """The near cache's listener: its own connection, tracking and a subscription."""
    connection = connect()
    why = "the near cache's listener"

    def step(grant: str, *command: Any) -> Any:
        try:
            connection.send_command(*command)
            return connection.read_response()
        except redis.ResponseError as exc:
            refused.append(f"{grant} ({why}: {exc})")
            return None

    try:
        own_id = step("+client|id", "CLIENT", "ID")
        if own_id is not None:
            tracking = ("CLIENT", "TRACKING", "on", "REDIRECT", own_id, "BCAST", "PREFIX")
            step("+client|tracking", *tracking, f"{prefix}:{{")
        step(f"&{INVALIDATION_CHANNEL} +subscribe", "SUBSCRIBE", INVALIDATION_CHANNEL)
    except redis.RedisError as exc:
        refused.append(f"a connection for {why} ({exc})")
    finally:
        connection.disconnect()


def _user(client: Any) -> str:
    pool = getattr(client, "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", {}) or {}
    return str(kwargs.get("username") or "default")


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
