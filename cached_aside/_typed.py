"""Typed values: the loader's return annotation (or `returns=`) as the schema of its
entries, worked out once, at decoration.

This module decides whether a function is typed at all (an annotation made of
msgpack's own types keeps the untyped codec, its bytes and its speed), checks that
msgspec can encode and decode the type, and names its shape with a fingerprint.
Data only ever becomes the declared type: no class is ever named by the data.
No redis imports here.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import functools
import hashlib
import inspect
import sys
import types
import typing
import uuid
from collections.abc import (
    Callable,
    Collection,
    Iterable,
    Mapping,
    MutableMapping,
    MutableSequence,
    Sequence,
)
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Protocol, TypeGuard

import msgspec

from ._errors import ConfigurationError

# Bumped when the layout of typed entries changes: every fingerprint changes with it.
FORMAT_VERSION: Final = "1"
FINGERPRINT_LENGTH: Final = 8  # hex digits of the shape's sha256

_NATIVE_SCALARS: Final = frozenset({bool, int, float, str, bytes, type(None)})
_TYPED_SCALARS: Final = frozenset(
    {
        bytearray,
        datetime.datetime,
        datetime.date,
        datetime.time,
        datetime.timedelta,
        uuid.UUID,
        decimal.Decimal,
    }
)
_UNIONS: Final = (typing.Union, types.UnionType)
_CONTAINERS: Final = {
    list: "list",
    set: "set",
    frozenset: "frozenset",
    tuple: "tuple",
    dict: "dict",
    Sequence: "list",
    MutableSequence: "list",
    Collection: "list",
    Iterable: "list",
    Mapping: "dict",
    MutableMapping: "dict",
}
_SEQUENCES: Final = (list, Sequence, MutableSequence, Collection, Iterable)
_MAPPINGS: Final = (dict, Mapping, MutableMapping)


class _PydanticModel(Protocol):
    """What this module uses of a pydantic v2 model class (pydantic is optional)."""

    model_fields: ClassVar[dict[str, Any]]

    @classmethod
    def model_validate(cls, obj: Any) -> Any: ...


def pydantic_model(kind: object) -> TypeGuard[type[_PydanticModel]]:
    """True for a pydantic v2 model class (without importing pydantic)."""
    module = sys.modules.get("pydantic")
    return (
        module is not None
        and isinstance(kind, type)
        and issubclass(kind, module.BaseModel)
        and hasattr(kind, "model_validate")
    )


def encode_hook(value: Any) -> Any:
    """What msgspec cannot encode by itself: pydantic models, by alias, as the
    model's validate reads them."""
    if pydantic_model(type(value)):
        return value.model_dump(by_alias=True)
    raise NotImplementedError(f"cannot encode {type(value).__name__}")


def decode_hook(kind: type, data: Any) -> Any:
    """The declared pydantic model, validated from its fields; nothing else."""
    if pydantic_model(kind):
        return kind.model_validate(data)
    raise NotImplementedError(f"cannot decode {kind!r}")


@dataclass(frozen=True, slots=True)
class Schema:
    """The declared type of one entry's value, as the typed codecs use it.

    Attributes:
        kind: the type itself (None stripped from an Optional).
        fingerprint: FINGERPRINT_LENGTH hex digits naming the type's shape; an entry
            written under another fingerprint is a schema mismatch, not a value.
        lossless_direct: msgspec's encoder keeps every value of this type as is; when
            False (a datetime is inside), values go through `msgspec.to_builtins`
            first, which writes datetimes as RFC 3339 text with their offset.
        fields: for a record type, each field's name as stored and its type.
    """

    kind: Any
    fingerprint: str
    lossless_direct: bool
    fields: dict[str, Any] | None


def schema_of(
    returns: Any, loader: Callable[..., Any], batch_loader: Callable[..., Any] | None, name: str
) -> Schema | None:
    """The schema of a decorated function's entries, or None for an untyped one.

    `returns=` wins; else the loader's return annotation; else the element type of
    the batch loader's (`list[X]` or `dict[K, X]`). An annotation made only of
    msgpack's own types (or Any, or none) is untyped: stored as today.

    Raises:
        ConfigurationError: the annotation cannot be resolved, or names a type that
            cannot be stored and decoded exactly.
    """
    declared = returns
    if declared is None:
        declared = _return_annotation(loader, name)
        if declared is None and batch_loader is not None:
            declared = _element(_return_annotation(batch_loader, f"batch_loader of {name}"))
    if declared is None:
        return None
    kind = _without_none(declared)
    if native(kind):
        return None
    flags: set[str] = set()
    shape = _shape(kind, name, set(), flags)
    fingerprint = hashlib.sha256(f"{FORMAT_VERSION};{shape}".encode()).hexdigest()
    try:  # unions msgspec cannot tell apart are refused here, not at the first hit
        msgspec.msgpack.Decoder(kind, dec_hook=decode_hook)
    except TypeError as exc:
        raise ConfigurationError(
            f"{name}: the declared type {_name(kind)} cannot be decoded unambiguously "
            f"({exc}); declare one record type per function, tag the union's members "
            "(msgspec Struct tag=True), or pass returns=typing.Any for untyped msgpack"
        ) from None
    return Schema(
        kind,
        fingerprint[:FINGERPRINT_LENGTH],
        "datetime" not in flags,
        record_fields(kind),
    )


def native(kind: Any) -> bool:
    """True when msgpack alone gives back what a value of this type was: Any, None,
    bool, int, float, str, bytes, and lists, dicts and unions of them."""
    if kind is Any or kind is object or kind in _NATIVE_SCALARS or kind is None:
        return True
    if kind is list or kind is dict or isinstance(kind, typing.TypeVar):
        return True
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in _UNIONS:
        return all(native(arg) for arg in args)
    if origin is typing.Literal:
        return all(type(arg) in (str, int, bool) for arg in args)
    if origin in _SEQUENCES:
        return not args or native(args[0])
    if origin in _MAPPINGS:
        return not args or (args[0] in (str, int, Any) and native(args[1]))
    return False


def record_fields(kind: Any) -> dict[str, Any] | None:
    """A record type's fields, by the name they are stored under, and their types;
    None for a type that is not a record (a list, a scalar, a union)."""
    if not isinstance(kind, type):
        return None
    if pydantic_model(kind):
        return {info.alias or field: info.annotation for field, info in kind.model_fields.items()}
    if issubclass(kind, msgspec.Struct):
        return {info.encode_name: info.type for info in msgspec.structs.fields(kind)}
    if typing.is_typeddict(kind):
        return dict(typing.get_type_hints(kind))
    hints = _hints(kind)
    if dataclasses.is_dataclass(kind):
        return {field.name: hints[field.name] for field in dataclasses.fields(kind)}
    attributes = getattr(kind, "__attrs_attrs__", None)
    if attributes is not None:
        return {attribute.name: hints[attribute.name] for attribute in attributes}
    return None


def _return_annotation(function: Callable[..., Any], name: str) -> Any:
    """A function's resolved return annotation, or None when it has none.

    Only the return annotation is evaluated: a parameter annotated with a name
    imported under TYPE_CHECKING (a db session, say) must not break decoration.
    """
    target: Any = inspect.unwrap(function)
    if isinstance(target, functools.partial):
        target = inspect.unwrap(target.func)
    if not inspect.isfunction(target):
        target = getattr(getattr(target, "__call__", None), "__func__", None)  # noqa: B004
        if not inspect.isfunction(target):
            return None  # a builtin or an object inspect cannot read: untyped
    annotation = getattr(target, "__annotations__", {}).get("return", inspect.Signature.empty)
    if annotation is inspect.Signature.empty:
        return None
    # A function of the loader's module that carries the return annotation alone,
    # resolved as typing resolves annotations (nested forward references too).
    alone = types.FunctionType(_no_code.__code__, target.__globals__)
    alone.__annotations__ = {"return": annotation}
    try:
        return typing.get_type_hints(alone)["return"]
    except Exception as exc:  # NameError, SyntaxError, TypeError: eval of the text
        raise ConfigurationError(
            f"{name}: its return annotation {annotation!r} cannot be resolved ({exc}); "
            "define or import the type at module level, or pass returns=TheType "
            "(returns=typing.Any for untyped msgpack)"
        ) from None


def _no_code() -> None:
    """The code object of the stand-in that carries a return annotation alone."""


def _element(annotation: Any) -> Any:
    """The value type of a batch loader's `list[X]` or `dict[K, X]` annotation."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in _SEQUENCES and args:
        return args[0]
    if origin in _MAPPINGS and len(args) == 2:
        return args[1]
    return None


def _without_none(kind: Any) -> Any:
    """`X | None` is X: None is stored as the negative sentinel."""
    if typing.get_origin(kind) in _UNIONS:
        args = tuple(arg for arg in typing.get_args(kind) if arg is not type(None))
        if len(args) == 1:
            return args[0]
        return typing.Union[args]  # noqa: UP007  # a runtime-built union
    return kind


def _hints(kind: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(kind)
    except NameError as exc:
        raise ConfigurationError(
            f"the fields of {kind.__qualname__} cannot be resolved ({exc}); define or "
            "import their types at module level"
        ) from None


def _name(kind: Any) -> str:
    return getattr(kind, "__qualname__", None) or repr(kind)


def _shape(kind: Any, name: str, seen: set[Any], flags: set[str]) -> str:
    """A canonical text of a type's shape: field names and types, enum values,
    container kinds. Class names are left out, so renaming a class is no change."""
    if kind is Any or kind is object or isinstance(kind, typing.TypeVar):
        return "any"
    if kind is None or kind is type(None):
        return "none"
    if kind in _NATIVE_SCALARS or kind in _TYPED_SCALARS:
        if kind is datetime.datetime:
            flags.add("datetime")
        return str(kind.__name__)
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in _UNIONS:
        return "union(" + ",".join(_shape(arg, name, seen, flags) for arg in args) + ")"
    if origin is typing.Annotated:
        return _shape(args[0], name, seen, flags) + f"~{args[1:]!r}"
    if origin is typing.Literal:
        return f"literal{args!r}"
    if kind in _CONTAINERS:
        return _CONTAINERS[kind]
    if origin in _CONTAINERS:
        inner = ",".join("..." if a is Ellipsis else _shape(a, name, seen, flags) for a in args)
        return f"{_CONTAINERS[origin]}[{inner}]"
    supertype = getattr(kind, "__supertype__", None)  # a NewType
    if supertype is not None:
        return _shape(supertype, name, seen, flags)
    if isinstance(kind, type):
        return _class_shape(kind, name, seen, flags)
    raise ConfigurationError(
        f"{name}: cached_aside cannot store values of the declared type {kind!r}; declare "
        "dataclasses, pydantic models, attrs classes, msgspec Structs, TypedDicts, "
        "NamedTuples, enums, datetimes, UUIDs, Decimals and containers of them; or "
        "pass returns=typing.Any (untyped msgpack) or a serializer="
    )


def _class_shape(kind: type, name: str, seen: set[Any], flags: set[str]) -> str:
    if kind in seen:
        return "recursive"
    if issubclass(kind, enum.Enum):
        return "enum(" + ",".join(repr(member.value) for member in kind) + ")"
    if issubclass(kind, tuple) and hasattr(kind, "_fields"):  # a NamedTuple
        hints = _hints(kind)
        inner = ",".join(
            f"{field}:{_shape(hints.get(field, Any), name, seen | {kind}, flags)}"
            for field in kind._fields
        )
        return f"namedtuple({inner})"
    fields = record_fields(kind)
    if fields is None:
        raise ConfigurationError(
            f"{name}: cached_aside cannot store {kind.__qualname__} values: it is not a "
            "dataclass, pydantic model, attrs class, msgspec Struct, TypedDict, "
            "NamedTuple or enum, so its fields are unknown. Make it one, or pass a "
            "serializer="
        )
    inner = ",".join(
        f"{field}:{_shape(hint, name, seen | {kind}, flags)}" for field, hint in fields.items()
    )
    config = getattr(kind, "__struct_config__", None)
    extra = f";array_like={config.array_like};tag={config.tag!r}" if config else ""
    required = getattr(kind, "__required_keys__", None)  # a TypedDict
    if required is not None:
        extra += f";required={sorted(required)!r}"
    return f"record({inner}{extra})"
