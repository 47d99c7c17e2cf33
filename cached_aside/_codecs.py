"""How values are laid out in Redis: a hash per record, or one msgpack string.

Each mode has a negative sentinel that no real value can be mistaken for, and a
decoder that reports foreign or damaged data as CORRUPT instead of trusting it.
No redis imports here.
"""

from __future__ import annotations

import enum
import zlib
from collections.abc import Callable, Mapping
from typing import Any, Final, Literal, Protocol

import msgpack
import msgspec

from ._errors import UnstorableValueError


class Found(enum.Enum):
    """What a lookup found when it found no usable value."""

    MISS = "miss"
    NEGATIVE = "negative"
    CORRUPT = "corrupt"
    # A typed entry written for another shape of the declared type (an older or newer
    # deploy), or an untyped one: a miss, reloaded and counted as schema_mismatch.
    MISMATCH = "schema mismatch"


# The reserved field of every hash record: the field count for a record, or "none"
# for the negative sentinel. It lets an empty dict be stored and a record that lost
# a field be recognised.
META_FIELD: Final = "__cached_aside__"
# The reserved field of a tagged function's record: its tags' versions (_stamps.py).
STAMP_FIELD: Final = "__cached_aside_tags__"
NEGATIVE_META: Final = "none"
META_FIELD_BYTES: Final = META_FIELD.encode()
NEGATIVE_META_BYTES: Final = NEGATIVE_META.encode()

# 0xC1 is the one byte the msgpack format never uses, so no packed value starts with it.
MSGPACK_NEGATIVE: Final = b"\xc1"
# A compressed value: 0xC1 "Z", then a zlib stream (whose checksum catches damage).
COMPRESSED_MARK: Final = b"\xc1Z"
COMPRESSION_LEVEL: Final = 6  # zlib's default: most of level 9's ratio at a third of its cost
# Foreign data behind the mark could be a decompression bomb: no cached value
# needs more than this, decompressed.
MAX_DECOMPRESSED_BYTES: Final = 64 * 1024 * 1024


def compressed(packed: bytes, compress_over: int) -> bytes:
    """`packed` as stored: zlib-compressed behind COMPRESSED_MARK when longer than
    `compress_over` (0: never). Past the cap a compressed value could not be read
    back (see decompressed): it goes plain."""
    if compress_over and compress_over < len(packed) <= MAX_DECOMPRESSED_BYTES:
        return COMPRESSED_MARK + zlib.compress(packed, COMPRESSION_LEVEL)
    return packed


def decompressed(raw: bytes) -> bytes | None:
    """The packed bytes behind COMPRESSED_MARK, or None if they are not a whole,
    intact zlib stream of at most MAX_DECOMPRESSED_BYTES."""
    inflater = zlib.decompressobj()
    try:
        packed = inflater.decompress(raw[2:], MAX_DECOMPRESSED_BYTES)
    except zlib.error:
        return None
    if not inflater.eof or inflater.unconsumed_tail or inflater.unused_data:
        return None
    return packed


RedisType = Literal["hash", "string"]
_IMMUTABLE: Final = frozenset({str, int, float, bool, bytes})


Frozen = tuple[Callable[[Any], Any], Any]
"""What the near cache keeps of a value: a copier and what it copies. A near hit
calls one on the other, so the choice of copy is made once, at the fill."""


def same(value: Any) -> Any:
    """The copy of an immutable value is the value."""
    return value


def _ext(code: int, data: memoryview) -> msgpack.ExtType:
    """An ext type msgspec does not know, as msgpack's unpackb hands it out."""
    return msgpack.ExtType(code, bytes(data))


_decode: Final = msgspec.msgpack.Decoder(ext_hook=_ext).decode
# How msgpack's timestamp ext (type -1, the byte 0xFF) begins: fixext 4, fixext 8, ext 8
# of 12 bytes. msgspec reads one as a datetime, where msgpack gives a Timestamp.
_TIMESTAMP_HEADS: Final = (b"\xd6\xff", b"\xd7\xff", b"\xc7\x0c\xff")


def _unpack(packed: bytes) -> Any:
    """What msgpack.unpackb(raw=False, strict_map_key=False) gives for `packed`, read
    by msgspec's decoder in half the time (an 8-field record: 320 against 690 ns).
    The two agree on every value encode() stores, ext types included (_ext), but a
    timestamp: bytes that may hold one (seldom: no text holds 0xFF) go to msgpack.
    Raises on damaged bytes (a ValueError, RecursionError, TypeError...)."""
    if 0xFF in packed and any(head in packed for head in _TIMESTAMP_HEADS):
        return msgpack.unpackb(packed, raw=False, strict_map_key=False)
    return _decode(packed)


class Codec(Protocol):
    """One storage mode: the command that reads it and how values become Redis data."""

    redis_type: RedisType
    read_command: str

    def decode(self, raw: Any) -> Any:
        """A stored value, or a Found member when there is none to serve."""

    def encode(self, value: Any, where: str) -> tuple[list[Any], Any]:
        """Script payload for `value` and the value a caller receives on a hit."""

    def negative_payload(self) -> list[Any]:
        """Script payload of the negative sentinel."""

    def copy(self, value: Any) -> Any:
        """An independent copy, for callers that share one in-process load."""

    def freeze(self, value: Any) -> Frozen:
        """What the near cache keeps of a value: each hit hands out a fresh copy,
        which callers may mutate freely."""


class HashCodec:
    """Flat str -> str records in a Redis hash: fields readable with HGETALL."""

    redis_type: RedisType = "hash"
    read_command = "HGETALL"

    def decode(self, raw: Any) -> Any:
        if not raw:
            return Found.MISS
        if type(raw) is list:  # a Lua reply: HGETALL as a flat list
            raw = dict(zip(raw[::2], raw[1::2], strict=True))
        meta = raw.pop(META_FIELD_BYTES, None)
        if meta is None:
            return Found.CORRUPT
        if meta == NEGATIVE_META_BYTES:
            return Found.NEGATIVE if not raw else Found.CORRUPT
        try:
            record = {field.decode(): value.decode() for field, value in raw.items()}
            complete = int(meta) == len(record)
        except (ValueError, UnicodeDecodeError):
            return Found.CORRUPT
        return record if complete else Found.CORRUPT

    def encode(self, value: Any, where: str) -> tuple[list[Any], Any]:
        if not isinstance(value, Mapping):
            raise UnstorableValueError(
                f"{where}: as_hash=True needs the loader to return a mapping (or None), "
                f"got {type(value).__name__}; return a dict or use as_hash=False for msgpack"
            )
        record = {}
        for field, item in value.items():
            record[check_field(field, where)] = field_text(field, item, where)
        payload: list[Any] = [META_FIELD, len(record)]
        for field, text in record.items():
            payload += (field, text)
        return payload, record

    def negative_payload(self) -> list[Any]:
        return [META_FIELD, NEGATIVE_META]

    def copy(self, value: Any) -> Any:
        return None if value is None else dict(value)

    def freeze(self, value: Any) -> Frozen:
        return (same, None) if value is None else (dict, dict(value))  # str -> str: flat

    def encode_field(self, field: object, value: object, where: str) -> str:
        """The text update_field() writes for one field."""
        return field_text(check_field(field, where), value, where)


def check_field(field: object, where: str) -> str:
    """A hash field name must be text and must not be the reserved meta field."""
    if not isinstance(field, str):
        raise UnstorableValueError(
            f"{where}: hash field names must be str, got {field!r}; convert the keys to str"
        )
    check_utf8(field, where, "field name")
    if field in (META_FIELD, STAMP_FIELD):
        raise UnstorableValueError(
            f"{where}: field {field!r} is reserved by cached_aside; rename it"
        )
    return field


def field_text(field: str, item: object, where: str) -> str:
    """Hash values are flat: str, int or float, stored and returned as str."""
    if type(item) is str:  # exactly str: a subclass (a StrEnum) is refused below
        check_utf8(item, where, f"field {field!r}")
        return item
    kind = type(item)
    if kind is int or kind is float:
        return repr(item)
    raise UnstorableValueError(
        f"{where}: field {field!r} holds {kind.__name__} {item!r:.60}; as_hash=True stores "
        "only str, int and float values (returned as str). Flatten or serialize that "
        "field, or use as_hash=False to store the whole value with msgpack"
    )


def check_utf8(text: str, where: str, what: str) -> None:
    """Redis receives UTF-8: a lone surrogate (as os.fsdecode makes of bad bytes)
    cannot be sent, and must be refused before the store, not inside redis-py."""
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError as exc:
            raise UnstorableValueError(
                f"{where}: the {what} holds {text!r:.60}, which is not valid text "
                f"({exc.reason}); decode the bytes it came from with errors='replace'"
            ) from None


class MsgpackCodec:
    """Any msgpack-encodable value in one Redis string; with `compress_over`, a
    packed value longer than that many bytes is stored zlib-compressed behind
    COMPRESSED_MARK. Every instance reads both forms, so turning compression on or
    off never strands what is already cached."""

    redis_type: RedisType = "string"
    read_command = "GET"

    def __init__(self, compress_over: int = 0) -> None:
        self.compress_over = compress_over  # 0: never compress

    def decode(self, raw: Any) -> Any:
        if raw is None:
            return Found.MISS
        if raw[:1] == MSGPACK_NEGATIVE:  # no msgpack value starts with it
            if raw == MSGPACK_NEGATIVE:
                return Found.NEGATIVE
            if raw[:2] != COMPRESSED_MARK:
                return Found.CORRUPT
            raw = decompressed(raw)
            if raw is None:
                return Found.CORRUPT
        try:
            return _unpack(raw)
        except Exception:  # msgpack and msgspec raise several unrelated types for bad input
            return Found.CORRUPT

    def encode(self, value: Any, where: str) -> tuple[list[Any], Any]:
        try:
            packed = msgpack.packb(value, use_bin_type=True)
            # The caller gets what a later hit would give (tuples become lists); a
            # value whose keys would come back unhashable ({(1, 2): ...}) fails here.
            result = msgpack.unpackb(packed, raw=False, strict_map_key=False)
        except (TypeError, ValueError, OverflowError) as exc:
            raise UnstorableValueError(
                f"{where}: msgpack cannot store the loader's result ({exc}); return "
                "dicts with str or int keys, lists, str, bytes, int, float, bool and None "
                "only, e.g. convert datetimes with .isoformat() and objects with a to_dict()"
            ) from exc
        return [compressed(packed, self.compress_over)], result

    def negative_payload(self) -> list[Any]:
        return [MSGPACK_NEGATIVE]

    def copy(self, value: Any) -> Any:
        if value is None or type(value) in (str, int, float, bool, bytes):
            return value
        return _unpack(msgpack.packb(value, use_bin_type=True))

    def freeze(self, value: Any) -> Frozen:
        kind = type(value)
        if value is None or kind in _IMMUTABLE:
            return same, value
        # A flat record (the common case) is fully copied by a shallow copy, which
        # costs a tenth of unpacking it again.
        if kind is dict and all(v is None or type(v) in _IMMUTABLE for v in value.values()):
            return dict, dict(value)
        if kind is list and all(v is None or type(v) in _IMMUTABLE for v in value):
            return list, list(value)
        return _unpack, msgpack.packb(value, use_bin_type=True)  # unpacking: a deep copy


class Serializer(Protocol):
    """What `serializer=` takes: bytes out, the value back."""

    def dumps(self, value: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


# Marks a payload of a user's serializer, so that no output of it can ever be read as
# the negative sentinel, and data written in another mode is recognised as foreign.
SERIALIZED_MARK: Final = b"="


class SerializerCodec:
    """A user's serializer in one Redis string. Its loads() runs on whatever Redis
    holds under the key: only plug in a serializer that is safe on untrusted bytes."""

    redis_type: RedisType = "string"
    read_command = "GET"

    def __init__(self, serializer: Serializer) -> None:
        self.serializer = serializer

    def decode(self, raw: Any) -> Any:
        if raw is None:
            return Found.MISS
        if raw == MSGPACK_NEGATIVE:
            return Found.NEGATIVE
        if raw[:1] != SERIALIZED_MARK:
            return Found.CORRUPT
        try:
            return self.serializer.loads(raw[1:])
        except Exception:
            return Found.CORRUPT

    def encode(self, value: Any, where: str) -> tuple[list[Any], Any]:
        try:
            payload = self.serializer.dumps(value)
            if not isinstance(payload, bytes):
                raise TypeError(f"dumps() returned {type(payload).__name__}, not bytes")
            result = self.serializer.loads(payload)
        except Exception as exc:
            raise UnstorableValueError(
                f"{where}: the serializer cannot store the loader's result ({exc})"
            ) from exc
        return [SERIALIZED_MARK + payload], result

    def negative_payload(self) -> list[Any]:
        return [MSGPACK_NEGATIVE]

    def copy(self, value: Any) -> Any:
        return None if value is None else self.serializer.loads(self.serializer.dumps(value))

    def freeze(self, value: Any) -> Frozen:
        return (
            (same, None) if value is None else (self.serializer.loads, self.serializer.dumps(value))
        )


HASH_CODEC: Final = HashCodec()
MSGPACK_CODEC: Final = MsgpackCodec()
