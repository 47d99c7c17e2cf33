"""Tag versions and the stamps entries carry: the pure rules of tagged reads and writes.

An entry of a function with tags= carries its stamp, the versions its tags had when
its load began; a tag's invalidation deletes the tag's version, and a version is
never made twice, so an entry whose stamp differs from its tags' versions now (or
whose tags have no version) is a miss, whatever Redis kept or evicted.
The flows that read and take stamps live here too. No redis, asyncio or time
imports here.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Sequence
from typing import Any, Final, Protocol

from ._codecs import STAMP_FIELD, Codec, RedisType
from ._effects import Batch, Command, CommandFailed, Flow, RunScript
from ._keys import tag_key
from ._options import Options
from ._scripts import tag_renew_call, tag_stamp_call
from ._stats import Stats

# A version is 16 hex digits from os.urandom: a tag's version key that was deleted
# (invalidated, evicted, expired) and made again never gets the old value back.
VERSION_LENGTH: Final = 16
# Before the stamp of a string entry: 0xC1 (no msgpack value starts with it) "T", then
# one byte, how many versions follow (so that the command line can read it). The
# negative sentinel is 0xC1 alone, compressed values start 0xC1 "Z", serializer
# payloads "=": a tagged entry is never read as an untagged one, nor the other way.
STAMP_MARK: Final = b"\xc1T"
_STAMP_FIELD_BYTES: Final = STAMP_FIELD.encode()
TAG_REPLACED_FOREIGN: Final = 1  # TAG_STAMP's flag when it replaced foreign data


class Plan(Protocol):
    """What these flows need of a function's plan (flows.Plan)."""

    @property
    def peek(self) -> bool: ...
    @property
    def codec(self) -> Codec: ...
    @property
    def options(self) -> Options: ...
    @property
    def stats(self) -> Stats: ...


class Verdict(enum.Enum):
    """How an entry's stamp compares with its tags' versions read with it."""

    CURRENT = "current"  # the stamp is the versions read: the entry may be served
    OUTDATED = "outdated"  # a tag was invalidated (or its version lost) since the load
    FOREIGN = "foreign"  # no stamp where one must be: not written by a tagged function


def new_version() -> str:
    """A version no tag has had: what a tag gets when its version key is missing."""
    return os.urandom(VERSION_LENGTH // 2).hex()


def version_reads(entry_key: str, texts: Sequence[str]) -> list[Command]:
    """The GET of each tag's version key, sent with the entry's read."""
    return [Command(("GET", tag_key(entry_key, text))) for text in texts]


def version_reads_after(
    effects: Sequence[Command | RunScript], keys: Sequence[str], texts: Sequence[tuple[str, ...]]
) -> tuple[list[Command | RunScript], list[list[int]]]:
    """Effects of many entries (one each, `keys` and their tags' `texts` in the same
    order) followed by the GET of every distinct tag version they need, each read
    once; and for each effect, the positions of its reply and its versions' replies."""
    reads: list[Command | RunScript] = list(effects)
    seen: dict[str, int] = {}
    places = []
    for position, (key, tags) in enumerate(zip(keys, texts, strict=True)):
        place = [position]
        for text in tags:
            version_key = tag_key(key, text)
            if version_key not in seen:
                seen[version_key] = len(reads)
                reads.append(Command(("GET", version_key)))
            place.append(seen[version_key])
        places.append(place)
    return reads, places


def stamp_of(replies: Sequence[Any]) -> bytes | CommandFailed | None:
    """The stamp an entry must carry to be current, from its tags' version replies:
    None if a version is missing or foreign (no entry is current then), a failure
    if one could not be read."""
    parts = []
    for reply in replies:
        if type(reply) is CommandFailed:
            return reply
        if type(reply) is not bytes or len(reply) != VERSION_LENGTH:
            return None
        parts.append(reply)
    return b"".join(parts)


def stamped(redis_type: RedisType, payload: list[Any], stamp: bytes) -> list[Any]:
    """A store script's payload with the entry's stamp: ahead of the string, or in
    the reserved stamp field of the hash."""
    if redis_type == "string":
        packed = payload[0]
        head = STAMP_MARK + _count(stamp) + stamp
        return [head + (packed if type(packed) is bytes else packed.encode())]
    return [*payload, STAMP_FIELD, stamp]


def _count(stamp: bytes) -> bytes:
    """The byte that says how many versions a string entry's stamp holds."""
    return bytes([len(stamp) // VERSION_LENGTH & 0xFF])


def split_stamp(raw: bytes) -> tuple[list[bytes], bytes] | None:
    """A string entry's stamp (its versions) and the payload behind it, read without
    knowing its tags (the command line); None if it carries no stamp."""
    if raw[:2] != STAMP_MARK or len(raw) < 3:
        return None
    end = 3 + raw[2] * VERSION_LENGTH
    if len(raw) < end:
        return None
    stamp = raw[3:end]
    versions = [stamp[at : at + VERSION_LENGTH] for at in range(0, len(stamp), VERSION_LENGTH)]
    return versions, raw[end:]


def unstamped(raw: Any, stamp: bytes | None) -> tuple[Any, Verdict]:
    """An entry as read (GET bytes, HGETALL dict, or a script's flat hash list) less
    its stamp, and how the stamp compares with `stamp`. Nothing cached is CURRENT
    (a miss is a miss); an entry not CURRENT comes back as None."""
    if not raw:
        return raw, Verdict.CURRENT
    if type(raw) is bytes:
        if raw[:2] != STAMP_MARK or len(raw) < 3:
            return None, Verdict.FOREIGN
        if stamp is None or raw[2 : 3 + len(stamp)] != _count(stamp) + stamp:
            split = split_stamp(raw)
            return None, _mismatch(b"".join(split[0]) if split else b"", stamp)
        return raw[3 + len(stamp) :], Verdict.CURRENT
    if type(raw) is list:  # a script's reply: HGETALL as a flat list
        raw = dict(zip(raw[::2], raw[1::2], strict=True))
    elif type(raw) is dict:
        raw = dict(raw)
    else:
        return None, Verdict.FOREIGN
    found = raw.pop(_STAMP_FIELD_BYTES, None)
    if found is None:
        return None, Verdict.FOREIGN
    if found != stamp:
        return None, _mismatch(found, stamp)
    return raw, Verdict.CURRENT


def _mismatch(found: bytes, stamp: bytes | None) -> Verdict:
    """A stamp that is not the current one: OUTDATED if it is versions as TAG_STAMP
    makes them (as many as the tags, when they are known), else FOREIGN (damaged, or
    written by another definition of the function)."""
    if not found or len(found) % VERSION_LENGTH or (stamp and len(found) != len(stamp)):
        return Verdict.FOREIGN
    try:
        bytes.fromhex(found.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return Verdict.FOREIGN
    return Verdict.OUTDATED


def read_stamped(plan: Plan, replies: Sequence[Any]) -> Any:
    """A tagged function's lookup (the entry's read, then its tags' versions, in one
    pipeline) as an untagged lookup's reply: the entry less its stamp when the stamp
    is current, else nothing cached (the miss path finds it again, and judges it);
    a failure of any part, as the reply. The entry is read before the versions, so a
    current stamp means no invalidation of its tags ended before the versions were
    read."""
    return judge_stamped(plan, replies)[0]


def judge_stamped(plan: Plan, replies: Sequence[Any]) -> tuple[Any, Verdict]:
    """read_stamped(), and the verdict on the entry's stamp."""
    raw = replies[0]
    if type(raw) is CommandFailed:
        return raw, Verdict.CURRENT
    stamp = stamp_of(replies[1:])
    if isinstance(stamp, CommandFailed):
        return stamp, Verdict.CURRENT
    if plan.peek:
        if len(raw) < 2:
            return raw, Verdict.CURRENT  # nothing cached, or another type
        value, verdict = unstamped(raw[0], stamp)
        # raw[2:]: an XFetch entry's load time (and its draw), kept with the value
        return ([value, *raw[1:]] if verdict is Verdict.CURRENT else []), verdict
    value, verdict = unstamped(raw, stamp)
    if verdict is Verdict.CURRENT:
        return value, verdict
    return (None if plan.codec.redis_type == "string" else {}), verdict


def tagged_lookups(
    plan: Plan, lookups: Batch, keys: Sequence[str], texts: Sequence[tuple[str, ...]]
) -> Flow[tuple[list[Any], set[int]]]:
    """The `lookups` of many entries of a tagged function with their tags' versions,
    each version read once, in one pipeline after the entries; returns each entry's
    reply as an untagged lookup's (read_stamped), and the positions of the entries
    found with a stamp that is not current (foreign ones counted)."""
    reads, places = version_reads_after(lookups.effects, keys, texts)
    replies = yield Batch(reads)
    raws, outdated = [], set()
    for position, place in enumerate(places):
        raw, verdict = judge_stamped(plan, [replies[i] for i in place])
        raws.append(raw)
        if verdict is not Verdict.CURRENT:
            outdated.add(position)
            if verdict is Verdict.FOREIGN:
                plan.stats.corrupt(keys[position])
    return raws, outdated


def version_life_ms(options: Options) -> int:
    """How long a tag's version must live from now, at least: as long as an entry
    stamped with it now could (TAG_STAMP and TAG_RENEW give it twice that)."""
    return max(options.ttl_ms, options.negative_ttl_ms) + options.keep_ms + options.lock_ttl_ms


def version_renewals(
    plan: Plan, entries: Sequence[tuple[str, tuple[str, ...]]]
) -> tuple[tuple[RunScript, ...], ...]:
    """What a load in flight renews of its entries' tags (each entry key, its tags'
    texts): each version its entries were stamped with, a group of its own, so that
    a load slower than a version lives still stores a hit, and a version gone (its
    tag invalidated) stops only its own renewals."""
    life = version_life_ms(plan.options)
    tag_keys = dict.fromkeys(tag_key(key, text) for key, texts in entries for text in texts)
    return tuple((tag_renew_call(key, life_ms=life),) for key in tag_keys)


def take_stamps(
    plan: Plan, entries: Sequence[tuple[str, tuple[str, ...]]]
) -> Flow[list[bytes | CommandFailed]]:
    """The stamp of each (entry key, its tags' texts): its tags' versions, each made
    if missing (and its life stretched to cover the entry's), in one pipeline, one
    TAG_STAMP script per distinct tag. An entry whose tag Redis did not answer gets
    that failure instead: it must not be stored, as nothing could invalidate it."""
    alive_ms = version_life_ms(plan.options)
    tag_keys = list(dict.fromkeys(tag_key(key, text) for key, texts in entries for text in texts))
    replies = yield Batch(
        [tag_stamp_call(key, version=new_version(), life_ms=alive_ms) for key in tag_keys]
    )
    versions: dict[str, bytes | CommandFailed] = {}
    for key, reply in zip(tag_keys, replies, strict=True):
        if type(reply) is CommandFailed:
            versions[key] = reply
            continue
        if int(reply[1]) == TAG_REPLACED_FOREIGN:
            plan.stats.corrupt(key)
        version = reply[0]
        versions[key] = version if type(version) is bytes else str(version).encode()
    stamps: list[bytes | CommandFailed] = []
    for key, texts in entries:
        parts = [versions[tag_key(key, text)] for text in texts]
        failed = [part for part in parts if type(part) is CommandFailed]
        stamps.append(failed[0] if failed else b"".join(p for p in parts if type(p) is bytes))
    return stamps
