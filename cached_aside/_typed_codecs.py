"""The codecs of typed functions: values of the declared type in standard msgpack (or
one hash field per attribute), behind the fingerprint of the type's shape.

A msgpack entry is the array `[fingerprint, value]`; a hash entry carries the
fingerprint in a reserved field. An entry under another fingerprint is
Found.MISMATCH: written by another shape of the type, so reloaded, never decoded
into wrong values. Everything is built once, at decoration. No redis imports here.
"""

from __future__ import annotations

import datetime
import decimal
import enum
import uuid
from typing import Any, Final

import msgpack
import msgspec

from ._codecs import (
    COMPRESSED_MARK,
    META_FIELD,
    META_FIELD_BYTES,
    MSGPACK_NEGATIVE,
    NEGATIVE_META_BYTES,
    Found,
    Frozen,
    HashCodec,
    RedisType,
    check_utf8,
    compressed,
    decompressed,
    same,
)
from ._errors import UnstorableValueError
from ._typed import Schema, decode_hook, encode_hook

# The reserved field of a typed hash record: the fingerprint of the type's shape. An
# untyped reader counts it as a field the meta count does not, so it never takes a
# typed record for its own.
SHAPE_FIELD: Final = "__cached_aside_shape__"
_SHAPE_FIELD_BYTES: Final = SHAPE_FIELD.encode()
_RESERVED: Final = frozenset({META_FIELD_BYTES, _SHAPE_FIELD_BYTES})
# What to_builtins leaves as it is: msgpack stores bytes natively.
_KEPT: Final = (bytes, bytearray)
# Field types whose value is text: stored as the text itself in a hash, readable.
_TEXT_KINDS: Final = frozenset(
    {str, datetime.datetime, datetime.date, datetime.time, datetime.timedelta}
    | {uuid.UUID, decimal.Decimal}
)
_TEXT, _BYTES, _FLOAT, _JSON = "text", "bytes", "float", "json"
_DECODE_ERRORS: Final = (msgspec.MsgspecError, ValueError, TypeError)


def _type_name(kind: Any) -> str:
    return getattr(kind, "__qualname__", None) or repr(kind)


def _mismatch(where: str, kind: Any, exc: Exception) -> UnstorableValueError:
    return UnstorableValueError(
        f"{where}: the loader's result is not a {_type_name(kind)}, the declared return "
        f"type ({exc}); return that type, or declare the type the loader returns. "
        "Conversions that lose nothing are made (a mapping to a record, a list to a "
        "tuple or set, an int to a float); no text is parsed into numbers"
    )


class TypedCodec:
    """Values of one declared type in one Redis string: `[fingerprint, value]` in
    standard msgpack; with `compress_over`, longer entries are stored
    zlib-compressed behind COMPRESSED_MARK, as by the untyped codec."""

    redis_type: RedisType = "string"
    read_command = "GET"

    def __init__(self, schema: Schema, compress_over: int = 0) -> None:
        self.schema = schema
        self.compress_over = compress_over
        self._head = b"\x92" + msgspec.msgpack.encode(schema.fingerprint)
        self._skip = len(self._head)
        self._encoder = msgspec.msgpack.Encoder(enc_hook=encode_hook)
        self._decoder = msgspec.msgpack.Decoder(schema.kind, dec_hook=decode_hook)
        self._direct = schema.lossless_direct

    def decode(self, raw: Any) -> Any:
        if raw is None:
            return Found.MISS
        if raw.startswith(self._head):
            try:
                return self._decoder.decode(raw[self._skip :])
            except _DECODE_ERRORS:
                return Found.CORRUPT  # this shape's fingerprint, yet unreadable: damaged
        if raw == MSGPACK_NEGATIVE:
            return Found.NEGATIVE
        if raw[:2] == COMPRESSED_MARK:
            packed = decompressed(raw)
            if packed is None or packed[:1] == MSGPACK_NEGATIVE:
                return Found.CORRUPT
            return self.decode(packed)
        try:  # well-formed msgpack: another shape's entry, or an untyped one
            msgpack.unpackb(raw, raw=False, strict_map_key=False)
        except Exception:  # msgpack raises several unrelated types for bad input
            return Found.CORRUPT
        return Found.MISMATCH

    def body(self, value: Any, where: str) -> bytes:
        """The msgpack of a value; datetimes as RFC 3339 text with their offset."""
        try:
            if self._direct:
                return self._encoder.encode(value)
            return self._encoder.encode(
                msgspec.to_builtins(value, builtin_types=_KEPT, enc_hook=encode_hook)
            )
        except (TypeError, ValueError, OverflowError, NotImplementedError) as exc:
            raise _mismatch(where, self.schema.kind, exc) from None

    def encode(self, value: Any, where: str) -> tuple[list[Any], Any]:
        body = self.body(value, where)
        try:
            # The caller gets what a later hit gives, and a value that does not fit
            # the declared type is refused here, before anything is stored.
            result = self._decoder.decode(body)
        except _DECODE_ERRORS as exc:
            raise _mismatch(where, self.schema.kind, exc) from None
        return [compressed(self._head + body, self.compress_over)], result

    def negative_payload(self) -> list[Any]:
        return [MSGPACK_NEGATIVE]

    def copy(self, value: Any) -> Any:
        if value is None:
            return None
        return self._decoder.decode(self.body(value, "copy"))

    def freeze(self, value: Any) -> Frozen:
        if value is None:
            return same, None
        return self._decoder.decode, self.body(value, "near cache")  # decoding: a deep copy


def _field_kind(kind: Any) -> str:
    """How a field's value is kept in a hash: as text, as bytes, or as JSON."""
    if kind in _TEXT_KINDS or (
        isinstance(kind, type)
        and issubclass(kind, enum.Enum)
        and all(isinstance(member.value, str) for member in kind)
    ):
        return _TEXT
    if kind is bytes:
        return _BYTES
    if kind is float:  # as repr() text: JSON has no inf
        return _FLOAT
    return _JSON


class TypedHashCodec(HashCodec):
    """A record type (dataclass, pydantic model, attrs class, Struct, TypedDict) as
    one hash field per attribute: text, dates, UUIDs and Decimals as their text,
    bytes as they are, floats as repr() text, anything else as JSON. Each field
    decodes to its declared type."""

    def __init__(self, schema: Schema) -> None:
        assert schema.fields is not None
        self.schema = schema
        self._fields = schema.fields
        self._kinds = {field: _field_kind(kind) for field, kind in schema.fields.items()}
        self._shape = schema.fingerprint.encode()
        self._json = msgspec.json.Decoder()
        self._json_encoder = msgspec.json.Encoder(enc_hook=encode_hook)
        self._whole = TypedCodec(schema)

    def decode(self, raw: Any) -> Any:
        if not raw:
            return Found.MISS
        if type(raw) is list:  # a Lua reply: HGETALL as a flat list
            raw = dict(zip(raw[::2], raw[1::2], strict=True))
        # Read, not popped: the flows may judge the same reply twice.
        meta = raw.get(META_FIELD_BYTES)
        if meta is None:
            return Found.CORRUPT
        if meta == NEGATIVE_META_BYTES:
            return Found.NEGATIVE if len(raw) == 1 else Found.CORRUPT
        if raw.get(_SHAPE_FIELD_BYTES) != self._shape:
            return Found.MISMATCH  # another shape's record, or an untyped one
        try:
            if int(meta) != len(raw) - 2:
                return Found.CORRUPT
            return self._record(
                {field.decode(): data for field, data in raw.items() if field not in _RESERVED}
            )
        except (*_DECODE_ERRORS, UnicodeDecodeError):
            return Found.CORRUPT

    def _record(self, fields: dict[str, Any]) -> Any:
        """The declared type, from each field's stored data (bytes, or str)."""
        record = {}
        kinds = self._kinds
        for field, data in fields.items():
            kind = kinds.get(field, _JSON)
            if kind is _TEXT:
                record[field] = data.decode() if type(data) is bytes else data
            elif kind is _BYTES:
                record[field] = data
            elif kind is _FLOAT:
                record[field] = float(data)
            else:
                record[field] = self._json.decode(data)
        return msgspec.convert(record, self.schema.kind, dec_hook=decode_hook)

    def _data(self, field: str, item: Any, where: str) -> Any:
        """What one field's builtin value is stored as."""
        kind = self._kinds.get(field)
        if kind is _TEXT and type(item) is str:
            check_utf8(item, where, f"field {field!r}")
            return item
        if kind is _BYTES and isinstance(item, bytes | bytearray):
            return bytes(item)
        if kind is _FLOAT and type(item) in (float, int) and float(item) == item:
            return repr(float(item))
        if kind is None:
            raise UnstorableValueError(
                f"{where}: {_type_name(self.schema.kind)} has no field {field!r}; its "
                f"fields are {', '.join(self._fields)}"
            )
        if kind is not _JSON:
            raise UnstorableValueError(
                f"{where}: field {field!r} is declared {_type_name(self._fields[field])}, "
                f"got {type(item).__name__} {item!r:.60}"
            )
        return self._json_encoder.encode(item)

    def encode(self, value: Any, where: str) -> tuple[list[Any], Any]:
        try:
            builtins = msgspec.to_builtins(value, builtin_types=_KEPT, enc_hook=encode_hook)
        except (TypeError, ValueError, OverflowError, NotImplementedError) as exc:
            raise _mismatch(where, self.schema.kind, exc) from None
        if not isinstance(builtins, dict):
            raise UnstorableValueError(
                f"{where}: as_hash=True stores a {_type_name(self.schema.kind)} as one "
                f"field per attribute, got {type(value).__name__}"
            )
        fields = {field: self._data(field, item, where) for field, item in builtins.items()}
        try:
            result = self._record(fields)
        except _DECODE_ERRORS as exc:
            raise _mismatch(where, self.schema.kind, exc) from None
        payload: list[Any] = [META_FIELD, len(fields), SHAPE_FIELD, self.schema.fingerprint]
        for field, data in fields.items():
            payload += (field, data)
        return payload, result

    def encode_field(self, field: object, value: object, where: str) -> Any:
        """One field's data for update_field(), checked against its declared type
        before anything is written."""
        if not isinstance(field, str) or field not in self._fields:
            raise UnstorableValueError(
                f"{where}: {_type_name(self.schema.kind)} has no field {field!r}; its "
                f"fields are {', '.join(self._fields)}"
            )
        declared = self._fields[field]
        try:
            builtin = msgspec.to_builtins(value, builtin_types=_KEPT, enc_hook=encode_hook)
            msgspec.convert(builtin, declared, dec_hook=decode_hook)
        except (*_DECODE_ERRORS, NotImplementedError) as exc:
            raise UnstorableValueError(
                f"{where}: field {field!r} is declared {_type_name(declared)}, got "
                f"{type(value).__name__} {value!r:.60} ({exc}); nothing was written"
            ) from None
        return self._data(field, builtin, where)

    def copy(self, value: Any) -> Any:
        return self._whole.copy(value)

    def freeze(self, value: Any) -> Frozen:
        return self._whole.freeze(value)
