"""The operations command line: `python -m cached_aside ping|inspect|invalidate`.

Exit codes: 0 done; 1 nothing was cached under the key (inspect found nothing,
invalidate deleted nothing); 2 bad usage; 3 Redis unreachable or failing.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import sys
from typing import Any

import redis
from redis.exceptions import RedisClusterException

from ._codecs import (
    COMPRESSED_MARK,
    META_FIELD,
    MSGPACK_CODEC,
    MSGPACK_NEGATIVE,
    NEGATIVE_META,
    SERIALIZED_MARK,
    STAMP_FIELD,
    Found,
)
from ._defaults import (
    DEFAULT_URL,
    PREFIX_VARIABLE,
    URL_VARIABLES,
    prefix_from_environment,
    url_from_environment,
)
from ._engine import DEFAULT_PREFIX, CacheEngine
from ._errors import CachedAsideError
from ._keys import KeyTemplate, entry_keys, validate_prefix
from ._scripts import INVALIDATE
from ._stamps import VERSION_LENGTH, split_stamp
from ._typed_codecs import SHAPE_FIELD

NOT_FOUND, USAGE, UNAVAILABLE = 1, 2, 3
RAW_SHOWN = 200  # bytes of a custom serializer's payload shown by inspect
# Everything redis-py raises when Redis cannot be reached or fails: RedisError, a
# cluster's RedisClusterException (not a RedisError), and unwrapped socket errors.
REDIS_FAILURES = (redis.RedisError, RedisClusterException, OSError)

EPILOG = f"""\
environment:
  {" or ".join(URL_VARIABLES)}  the Redis URL when --url is not given
      (the first one set; else {DEFAULT_URL}); redis://, rediss://, unix://,
      redis+cluster:// (one node) and redis+sentinel:// (the service's master)
  {PREFIX_VARIABLE}  the key prefix when --prefix is not given (else "{DEFAULT_PREFIX}",
      the library's default); give the prefix your engine was built with

exit codes:
  0  done
  1  nothing cached under the key: inspect found nothing, invalidate deleted nothing
  2  bad usage (a template without its values, a bad prefix)
  3  Redis unreachable or failing
"""


def parse_argument(text: str) -> Any:
    """A JSON scalar where the text is one (42, 1.5, true, null, "42"), else the text."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, str | int | float | bool) or value is None else text


def resolve_key(prefix: str, key_or_template: str, arguments: list[str]) -> str:
    """A full key as given, or a template such as 'product:<id>' rendered like the library."""
    if "<" not in key_or_template:
        if arguments:
            raise CachedAsideError(f"{key_or_template!r} has no <placeholders> for {arguments}")
        return key_or_template
    names = KeyTemplate.placeholders(key_or_template)
    if len(names) != len(arguments):
        raise CachedAsideError(
            f"{key_or_template!r} has {len(names)} placeholder(s), got {len(arguments)} value(s)"
        )

    parameters = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
    template = KeyTemplate(key_or_template, _Placeholders(inspect.Signature(parameters)))
    rendered = template.render(tuple(parse_argument(a) for a in arguments), {})
    return f"{prefix}:{{{rendered}}}"


class _Placeholders:
    """A stand-in loader whose signature is the template's placeholders, in order:
    what a KeyTemplate binds the command line's values to."""

    def __init__(self, signature: inspect.Signature) -> None:
        self.__signature__ = signature
        self.__qualname__ = "key"  # how a KeyTemplate names its function in errors

    def __call__(self, *args: Any) -> None:
        """Never called: only its signature is read."""


def _text(data: bytes | str) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def describe(client: redis.Redis, key: str) -> dict[str, Any] | None:
    """What is stored under an entry's key, decoded as cached_aside reads it."""
    keys = entry_keys(key)
    kind = _text(client.type(key))
    lock_ms = client.pttl(keys.lock)
    report: dict[str, Any] = {
        "key": key,
        "type": kind,
        "ttl_ms": client.pttl(key) if kind != "none" else None,
        "lock": {
            "held": lock_ms > 0,
            "ttl_ms": lock_ms if lock_ms > 0 else None,
            # a set of the waiting callers' tokens (the ACQUIRE script adds them)
            "waiters": client.scard(keys.waiters),
        },
    }
    if kind == "string":
        raw = client.get(key) or b""
        raw = raw.encode() if isinstance(raw, str) else raw
        # A tagged function's entry: its tags' versions first.
        split = split_stamp(raw)
        if split is not None:
            report["stamp"] = [_text(version) for version in split[0]]
            raw = split[1]
        report.update(describe_string(raw))
    elif kind == "hash":
        fields = {_text(k): _text(v) for k, v in client.hgetall(key).items()}
        if STAMP_FIELD in fields:
            stamp = fields.pop(STAMP_FIELD)  # the versions, side by side: listed as a string's
            report["stamp"] = [
                stamp[i : i + VERSION_LENGTH] for i in range(0, len(stamp), VERSION_LENGTH)
            ]
        meta = fields.pop(META_FIELD, None)
        # A typed record's shape fingerprint is a reserved field, not one of the record's.
        shape = fields.pop(SHAPE_FIELD, None)
        if shape is not None:
            report["shape"] = shape
        if meta == NEGATIVE_META:
            report["entry"] = "negative sentinel (the loader returned None)"
        elif meta is not None and meta.isdigit() and int(meta) == len(fields):
            report["entry"] = "hash record" if shape is None else "typed hash record"
            report["value"] = fields
        else:
            report["entry"] = "hash without a valid field count: foreign or damaged"
            report["value"] = fields
    elif kind != "none":
        report["entry"] = f"a {kind}: not written by cached_aside"
    if kind == "none" and not report["lock"]["held"]:
        return None
    return report


def describe_string(raw: bytes) -> dict[str, Any]:
    """A string entry in each form the library writes: the negative sentinel, msgpack,
    compressed msgpack, or the output of a custom serializer (shown as raw bytes:
    only the application can decode it)."""
    if raw == MSGPACK_NEGATIVE:
        return {"entry": "negative sentinel (the loader returned None)"}
    compressed = raw[:2] == COMPRESSED_MARK
    value = MSGPACK_CODEC.decode(raw)
    if not isinstance(value, Found):
        entry = f"msgpack value, compressed ({len(raw)} bytes stored)" if compressed else None
        return {"entry": entry or "msgpack value", "value": value}
    if compressed:
        return {"entry": f"compressed msgpack whose zlib stream is damaged ({len(raw)} bytes)"}
    if raw[:1] == SERIALIZED_MARK:
        shown = raw[1 : 1 + RAW_SHOWN]
        return {
            "entry": f"written with a custom serializer ({len(raw) - 1} bytes): only the "
            "application's serializer can decode it; its raw bytes are shown",
            "raw": repr(shown) + ("..." if len(raw) - 1 > RAW_SHOWN else ""),
        }
    return {"entry": f"not msgpack: foreign or damaged ({len(raw)} bytes)"}


def command_ping(client: redis.Redis) -> int:
    info = client.info("server")
    scripts = client.eval("return 1", 0) == 1
    print(
        json.dumps(
            {
                "reachable": True,
                "redis_version": info.get("redis_version"),
                "mode": info.get("redis_mode") or info.get("server_mode"),  # Valkey 8
                "scripts": scripts,
            },
            indent=2,
        )
    )
    return 0


def command_inspect(client: redis.Redis, key: str) -> int:
    report = describe(client, key)
    if report is None:
        print(json.dumps({"key": key, "cached": False}, indent=2))
        return NOT_FOUND
    print(json.dumps(report, indent=2, default=repr))
    return 0


def command_invalidate(client: redis.Redis, key: str, lock_ttl_ms: int = 10_000) -> int:
    keys = entry_keys(key)
    existed = bool(client.register_script(INVALIDATE)(keys=list(keys), args=[lock_ttl_ms]))
    print(json.dumps({"key": key, "existed": existed}, indent=2))
    return 0 if existed else NOT_FOUND


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cached-aside",
        description="inspect and manage cached_aside entries in Redis",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--url",
        default=None,
        help=f"the Redis URL (default: ${', else $'.join(URL_VARIABLES)}, else {DEFAULT_URL})",
    )
    parser.add_argument(
        "--prefix",
        default=None,
        help=f"the engine's key prefix (default: ${PREFIX_VARIABLE}, else {DEFAULT_PREFIX!r})",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("ping", help="reachability, server version, script support")
    for name, text, nothing in (
        ("inspect", "show what is cached for a key", "nothing is cached there"),
        ("invalidate", "delete an entry and revoke loads in flight", "nothing was deleted"),
    ):
        sub = commands.add_parser(
            name,
            help=text,
            description=(
                f"{text}. Give a full key (cache:{{product:p-001}}) or a template and its "
                'values (product:<id> p-001); values that are JSON scalars (42, true, "42") '
                f"are read as such. Exits 1 when {nothing}."
            ),
        )
        sub.add_argument("key", help="a key, or a template with <placeholders>")
        sub.add_argument("values", nargs="*", help="values for the placeholders, in order")
    args = parser.parse_args(argv)
    engine: CacheEngine | None = None
    try:
        # Any URL an engine takes: redis://, rediss://, unix://, redis+cluster://,
        # redis+sentinel://.
        engine = CacheEngine.from_url(
            args.url or url_from_environment(), socket_timeout=2, socket_connect_timeout=2
        )
        return run_command(args, engine.client())
    except CachedAsideError as exc:
        print(f"cached-aside: {exc}", file=sys.stderr)
        return USAGE
    except REDIS_FAILURES as exc:
        print(f"cached-aside: Redis failed: {_one_line(exc)}", file=sys.stderr)
        return UNAVAILABLE
    finally:
        if engine is not None:
            with contextlib.suppress(*REDIS_FAILURES):
                engine.close()


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def run_command(args: argparse.Namespace, client: Any) -> int:
    if args.command == "ping":
        return command_ping(client)
    prefix = validate_prefix(prefix_from_environment() if args.prefix is None else args.prefix)
    key = resolve_key(prefix, args.key, args.values)
    if args.command == "inspect":
        code = command_inspect(client, key)
    else:
        code = command_invalidate(client, key)
    if code == NOT_FOUND and key != args.key:
        print(
            f"cached-aside: nothing under {key}; is {prefix!r} your engine's prefix? "
            f"(--prefix or ${PREFIX_VARIABLE})",
            file=sys.stderr,
        )
    return code
