"""Proto3 JSON for the common case, several times faster than ``json_format``.

Messages made only of scalars, enums, bytes, repeated fields, maps and nested messages of
the same kind are converted by a walk over ``ListFields()``; anything else (well-known
types, 32-bit floats, extensions) goes through ``json_format`` unchanged. Output and
accepted input follow the proto3 JSON mapping: lowerCamel names out, either name in,
unknown fields ignored, int64 as strings, bytes as base64, enums by name.

How each field is written and read is worked out once per message type (a :class:`_Plan`),
so a call does no descriptor lookups. Plans are built on first use; two threads may both
build one, and either result is the same.

Messages are written straight to JSON text (:func:`to_json`): for the small messages of a
typical call, building a dict and then encoding it costs twice as much.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Callable
from json.encoder import encode_basestring as _quote  # type: ignore[attr-defined]
from typing import Any, cast

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

_F = FieldDescriptor
_INT32 = {_F.TYPE_INT32, _F.TYPE_SINT32, _F.TYPE_SFIXED32}
_UINT32 = {_F.TYPE_UINT32, _F.TYPE_FIXED32}
_INT64 = {_F.TYPE_INT64, _F.TYPE_SINT64, _F.TYPE_SFIXED64}
_UINT64 = {_F.TYPE_UINT64, _F.TYPE_FIXED64}
_RANGES = {
    **{t: (-(2**31), 2**31 - 1) for t in _INT32},
    **{t: (0, 2**32 - 1) for t in _UINT32},
    **{t: (-(2**63), 2**63 - 1) for t in _INT64},
    **{t: (0, 2**64 - 1) for t in _UINT64},
}
_simple_cache: dict[str, bool] = {}


_SKIP = object()
"""An enum name this schema does not know: ignored, like an unknown field."""


class _Invalid(Exception):
    pass


def is_simple(descriptor: Descriptor) -> bool:
    """True when every message type reachable from ``descriptor`` has a plain JSON form."""
    name = descriptor.full_name
    cached = _simple_cache.get(name)
    if cached is None:
        cached = _simple_cache[name] = _all_plain(descriptor, set())
    return cached


def _all_plain(descriptor: Descriptor, seen: set[str]) -> bool:
    if descriptor.full_name in seen:
        return True  # already being checked further up
    seen.add(descriptor.full_name)
    if descriptor.full_name.startswith("google.protobuf.") or descriptor.extension_ranges:
        return False
    for field in descriptor.fields:
        if field.type == _F.TYPE_FLOAT or field.type == _F.TYPE_GROUP:
            return False
        entry = field.message_type  # None unless a message field
        if entry is not None and not _all_plain(entry, seen):
            return False
    return True


# --- per-type plans -------------------------------------------------------------------------

Writer = Callable[[Any], str]
"""``write(value)``: the JSON text of one field value."""
Reader = Callable[[Any, str], Any]
"""``read(value, key)``: the field value for JSON ``value`` (``key`` names it in errors)."""

_SCALAR, _MESSAGE, _LIST, _MESSAGE_LIST, _MAP = range(5)


class _In:
    """How one JSON member is read into its field."""

    __slots__ = ("name", "oneof", "kind", "read", "key_read", "value_is_message")

    def __init__(self, field: FieldDescriptor) -> None:
        self.name = field.name
        self.oneof = field.containing_oneof.name if field.containing_oneof is not None else None
        self.key_read: Reader | None = None
        self.value_is_message = False
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            self.kind = _MAP
            key_field, value_field = entry.fields_by_name["key"], entry.fields_by_name["value"]
            self.key_read = _map_key_reader(key_field)
            self.value_is_message = value_field.type == _F.TYPE_MESSAGE
            self.read = _reader(value_field)
        elif field.type == _F.TYPE_MESSAGE:
            self.kind = _MESSAGE_LIST if field.is_repeated else _MESSAGE
            self.read = _reader(field)
        else:
            self.kind = _LIST if field.is_repeated else _SCALAR
            self.read = _reader(field)


class _Plan:
    """One message type: whether it is simple, and how each of its fields is written and read."""

    __slots__ = ("simple", "out", "flat", "into")

    def __init__(self, descriptor: Descriptor) -> None:
        self.simple = is_simple(descriptor)
        self.out: dict[FieldDescriptor, tuple[str, Writer]] = {}
        """Field -> (its quoted JSON name and a colon, writer)."""
        self.flat: tuple[tuple[str, str, Writer], ...] | None = None
        """For a few plain scalars: (field name, quoted JSON name and colon, writer) by number."""
        self.into: dict[str, _In] = {}
        """Either spelling of a field's name -> how to read it."""
        if not self.simple:
            return
        for field in descriptor.fields:
            self.out[field] = (_quote(field.json_name) + ":", _writer(field))
        fields = sorted(descriptor.fields, key=lambda f: f.number)
        if len(fields) <= _FLAT_FIELDS and all(_is_plain_scalar(f) for f in fields):
            self.flat = tuple((f.name, *self.out[f]) for f in fields)
        for field in descriptor.fields:
            self.into[field.name] = _In(field)
        # The camelCase spelling wins where the two collide, as it always has.
        for name, field in descriptor.fields_by_camelcase_name.items():
            self.into[name] = _In(field)


_FLAT_FIELDS = 8
"""Up to this many fields, reading each costs less than ListFields() (see _write_fields)."""
_FLAT_TYPES = {_F.TYPE_STRING, _F.TYPE_BYTES, _F.TYPE_BOOL, _F.TYPE_ENUM, *_RANGES}


def _is_plain_scalar(field: FieldDescriptor) -> bool:
    """A singular scalar without presence: set exactly when not its default, which is falsy.

    Doubles are left out: -0.0 is falsy but set.
    """
    return not field.is_repeated and not field.has_presence and field.type in _FLAT_TYPES


class _Plans(dict[type[Message], _Plan]):
    """``_plans[message_type]``: the plan of a message type, made on first use.

    A dict subclass, so that finding a plan is one subscript and no Python call.
    """

    def __missing__(self, message_type: type[Message]) -> _Plan:
        plan = self[message_type] = _Plan(cast(Descriptor, message_type.DESCRIPTOR))
        return plan


_plans = _Plans()


# --- encoding -------------------------------------------------------------------------------


def to_json(message: Message) -> str:
    """Compact JSON text of ``message``, non-ASCII characters as they are (no ``\\u`` escapes)."""
    plan = _plans[type(message)]
    if not plan.simple:
        return _dumps(json_format.MessageToDict(message))
    return _write_fields(message, plan)


def to_dict(message: Message) -> dict[str, Any]:
    """``message`` as ``json_format.MessageToDict`` gives it; for tests and tools (slower)."""
    if not _plans[type(message)].simple:
        return json_format.MessageToDict(message)
    result: dict[str, Any] = json.loads(to_json(message))
    return result


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _write_message(message: Message) -> str:
    return _write_fields(message, _plans[type(message)])


def _write_fields(message: Message, plan: _Plan) -> str:
    """The fields that are set, in field number order (as ListFields() gives them)."""
    parts = []
    if plan.flat is not None:
        for name, key, write in plan.flat:
            value = getattr(message, name)
            if value:
                parts.append(key + write(value))
    else:
        for field, value in message.ListFields():
            out = plan.out.get(field)
            if out is None:  # an extension
                return _dumps(json_format.MessageToDict(message))
            key, write = out
            parts.append(key + write(value))
    return "{" + ",".join(parts) + "}"


def _writer(field: FieldDescriptor) -> Writer:
    entry = field.message_type
    if entry is not None and entry.GetOptions().map_entry:
        write_key = _map_key_writer(entry.fields_by_name["key"])
        write_value = _value_writer(entry.fields_by_name["value"])
        return lambda items: "{" + ",".join([write_key(k) + ":" + write_value(v) for k, v in items.items()]) + "}"
    write = _value_writer(field)
    if field.is_repeated:
        return lambda values: "[" + ",".join([write(v) for v in values]) + "]"
    return write


def _value_writer(field: FieldDescriptor) -> Writer:
    # The forms json.dumps gives the values json_format.MessageToDict makes: int64 as strings,
    # bytes as base64, enums by name (numbers this schema does not know as they are).
    t = field.type
    if t == _F.TYPE_STRING:
        return _quote
    if t == _F.TYPE_BOOL:
        return _write_bool
    if t in _INT32 or t in _UINT32:
        return str
    if t in _INT64 or t in _UINT64:
        return _write_quoted
    if t == _F.TYPE_MESSAGE:
        return _write_message
    if t == _F.TYPE_BYTES:
        return _write_bytes
    if t == _F.TYPE_ENUM:
        assert field.enum_type is not None
        names = {number: _quote(value.name) for number, value in field.enum_type.values_by_number.items()}
        return lambda number: names.get(number) or str(number)
    return _write_double


def _map_key_writer(field: FieldDescriptor) -> Writer:
    if field.type == _F.TYPE_BOOL:
        return lambda key: '"true"' if key else '"false"'
    return lambda key: _quote(str(key))


_write_bool = {True: "true", False: "false"}.__getitem__  # a C call, cheaper than a function


def _write_quoted(value: int) -> str:
    return f'"{value}"'


def _write_bytes(value: bytes) -> str:
    # The base64 alphabet needs no escaping in a JSON string.
    return f'"{binascii.b2a_base64(value, newline=False).decode()}"'


def _write_double(value: float) -> str:
    if math.isfinite(value):
        return repr(value)  # what json.dumps writes: the shortest text that reads back the same
    return '"NaN"' if math.isnan(value) else ('"Infinity"' if value > 0 else '"-Infinity"')


# --- decoding -------------------------------------------------------------------------------


def from_dict(obj: Any, message: Message) -> None:
    """Fill ``message`` from parsed JSON; raises ValueError with a readable reason."""
    if not _plans[type(message)].simple:
        try:
            json_format.ParseDict(obj, message, ignore_unknown_fields=True)
        except json_format.ParseError as e:
            raise ValueError(str(e)) from None
        return
    try:
        _decode_message(obj, message, 0)
    except _Invalid as e:
        raise ValueError(str(e)) from None


_MAX_DEPTH = 100
"""Nesting limit for messages, as json_format's default."""


def _decode_message(obj: Any, message: Message, depth: int) -> None:
    if not isinstance(obj, dict):
        raise _Invalid(f"{message.DESCRIPTOR.full_name} must be a JSON object")
    if depth >= _MAX_DEPTH:
        raise _Invalid(f"message nesting is deeper than {_MAX_DEPTH}")
    fields = _plans[type(message)].into
    oneofs: set[str] | None = None
    for key, value in obj.items():
        field = fields.get(key)
        if field is None or value is None:
            continue  # unknown fields are ignored; null means the default
        name = field.name
        if field.oneof is not None:
            if oneofs is None:
                oneofs = set()
            elif field.oneof in oneofs:
                raise _Invalid(f"more than one field of oneof {field.oneof!r} is set")
            oneofs.add(field.oneof)
        kind = field.kind
        if kind == _SCALAR:
            decoded = field.read(value, key)
            if decoded is not _SKIP:
                setattr(message, name, decoded)
        elif kind == _MESSAGE:
            sub = getattr(message, name)
            sub.SetInParent()
            _decode_message(value, sub, depth + 1)
        elif kind == _MAP:
            message.ClearField(name)  # named twice (both spellings): the last one wins
            if not isinstance(value, dict):
                raise _Invalid(f"field {key!r} must be a JSON object")
            target = getattr(message, name)
            read_key = field.key_read
            assert read_key is not None
            for k, v in value.items():
                map_key = read_key(k, "map key")
                if field.value_is_message:
                    _decode_message(v, target[map_key], depth + 1)
                else:
                    decoded = field.read(v, key)
                    if decoded is not _SKIP:
                        target[map_key] = decoded
        else:
            message.ClearField(name)  # named twice (both spellings): the last one wins
            if not isinstance(value, list):
                raise _Invalid(f"field {key!r} must be a JSON array")
            target = getattr(message, name)
            if kind == _MESSAGE_LIST:
                for item in value:
                    _decode_message(item, target.add(), depth + 1)
            else:
                read = field.read
                decoded_items = (read(item, key) for item in value)
                target.extend(d for d in decoded_items if d is not _SKIP)


def _map_key_reader(field: FieldDescriptor) -> Reader:
    if field.type == _F.TYPE_STRING:
        return lambda key, _: key
    if field.type == _F.TYPE_BOOL:
        return _read_bool_key
    return _reader(field)


def _read_bool_key(key: str, _: str) -> bool:
    if key not in ("true", "false"):
        raise _Invalid(f"map key {key!r} is not a bool")
    return key == "true"


def _reader(field: FieldDescriptor) -> Reader:
    """The reader of one value of ``field``: checks its JSON type and range."""
    t = field.type
    if t == _F.TYPE_STRING:
        return _read_string
    if t == _F.TYPE_BOOL:
        return _read_bool
    if t in _RANGES:
        return _int_reader(*_RANGES[t])
    if t == _F.TYPE_BYTES:
        return _read_bytes
    if t == _F.TYPE_ENUM:
        return _enum_reader(field)
    if t == _F.TYPE_DOUBLE:
        return _read_double
    return _read_nothing  # messages are read by _decode_message


def _invalid(value: Any, key: str) -> _Invalid:
    return _Invalid(f"invalid value {value!r} for field {key!r}")


def _read_nothing(value: Any, key: str) -> Any:
    raise _invalid(value, key)


def _read_string(value: Any, key: str) -> str:
    if isinstance(value, str):
        return value
    raise _invalid(value, key)


def _read_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    raise _invalid(value, key)


def _int_reader(low: int, high: int) -> Reader:
    def read(value: Any, key: str) -> int:
        number = _integer(value)
        if number is not None and low <= number <= high:
            return number
        raise _invalid(value, key)

    return read


def _read_bytes(value: Any, key: str) -> bytes:
    if isinstance(value, str):
        try:
            padded = value + "=" * (-len(value) % 4)
            if "-" in value or "_" in value:
                return base64.urlsafe_b64decode(padded)
            return base64.b64decode(padded, validate=True)
        except (binascii.Error, ValueError):
            pass
    raise _invalid(value, key)


def _enum_reader(field: FieldDescriptor) -> Reader:
    assert field.enum_type is not None
    numbers = {name: value.number for name, value in field.enum_type.values_by_name.items()}

    def read(value: Any, key: str) -> Any:
        if isinstance(value, str):
            number = numbers.get(value)
            if number is not None:
                return number
            return int(value) if _INT_TEXT.match(value) else _SKIP
        number = _integer(value)
        if number is not None and -(2**31) <= number < 2**31:
            return number
        raise _invalid(value, key)

    return read


def _read_double(value: Any, key: str) -> float:
    if isinstance(value, str):
        if value in _SPECIAL_DOUBLES:
            return float(value)
        value = float(value) if _FLOAT_TEXT.match(value) else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
        # Bare NaN/Infinity tokens, or numbers beyond a double, are not JSON numbers.
        if math.isfinite(number):
            return number
    raise _invalid(value, key)


def _integer(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str):
        if _INT_TEXT.match(value):
            return int(value)
        if _FLOAT_TEXT.match(value):
            number = float(value)
            return int(number) if number.is_integer() else None
    return None


_INT_TEXT = re.compile(r"-?\d+\Z")
_FLOAT_TEXT = re.compile(r"-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\Z")
_SPECIAL_DOUBLES = ("NaN", "Infinity", "-Infinity")
