"""Proto3 JSON for the common case, several times faster than ``json_format``.

Messages made only of scalars, enums, bytes, repeated fields, maps and nested messages of
the same kind are converted by a walk over ``ListFields()``; anything else (well-known
types, 32-bit floats, extensions) goes through ``json_format`` unchanged. Output and
accepted input follow the proto3 JSON mapping: lowerCamel names out, either name in,
unknown fields ignored, int64 as strings, bytes as base64, enums by name.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from typing import Any

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
        if field.type == _F.TYPE_MESSAGE and not _all_plain(field.message_type, seen):
            return False
    return True


# --- encoding -------------------------------------------------------------------------------


def to_dict(message: Message) -> dict[str, Any]:
    if not is_simple(message.DESCRIPTOR):
        return json_format.MessageToDict(message)
    return _encode_message(message)


def _encode_message(message: Message) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field, value in message.ListFields():
        plan = _plans.get(field)
        if plan is None:
            if field.is_extension:
                return json_format.MessageToDict(message)
            plan = _plans[field] = _plan(field)
        name, kind, key_field, value_field = plan
        if kind == _MAP:
            out[name] = {_map_key(key_field, k): _encode_value(value_field, v) for k, v in value.items()}
        elif kind == _LIST:
            out[name] = [_encode_value(field, v) for v in value]
        else:
            out[name] = _encode_value(field, value)
    return out


_SINGLE, _LIST, _MAP = 0, 1, 2
_plans: dict[FieldDescriptor, tuple[str, int, Any, Any]] = {}


def _plan(field: FieldDescriptor) -> tuple[str, int, Any, Any]:
    """How a field is written, worked out once per field instead of on every message."""
    entry = field.message_type
    if entry is not None and entry.GetOptions().map_entry:
        return field.json_name, _MAP, entry.fields_by_name["key"], entry.fields_by_name["value"]
    return field.json_name, _LIST if field.is_repeated else _SINGLE, None, None


def _map_key(field: FieldDescriptor, key: Any) -> str:
    if field.type == _F.TYPE_BOOL:
        return "true" if key else "false"
    return str(key)


def _encode_value(field: FieldDescriptor, value: Any) -> Any:
    t = field.type
    if t == _F.TYPE_STRING or t == _F.TYPE_BOOL or t in _INT32 or t in _UINT32:
        return value
    if t == _F.TYPE_MESSAGE:
        return _encode_message(value)
    if t == _F.TYPE_BYTES:
        return base64.b64encode(value).decode()
    if t == _F.TYPE_ENUM:
        enum_value = field.enum_type.values_by_number.get(value)
        return enum_value.name if enum_value is not None else value
    if t in _INT64 or t in _UINT64:
        return str(value)
    # double
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


# --- decoding -------------------------------------------------------------------------------


def from_dict(obj: Any, message: Message) -> None:
    """Fill ``message`` from parsed JSON; raises ValueError with a readable reason."""
    if not is_simple(message.DESCRIPTOR):
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
    descriptor = message.DESCRIPTOR
    by_json = descriptor.fields_by_camelcase_name
    by_name = descriptor.fields_by_name
    oneofs: set[str] = set()
    for key, value in obj.items():
        field = by_json.get(key) or by_name.get(key)
        if field is None or value is None:
            continue  # unknown fields are ignored; null means the default
        name = field.name
        oneof = field.containing_oneof
        if oneof is not None:
            if oneof.name in oneofs:
                raise _Invalid(f"more than one field of oneof {oneof.name!r} is set")
            oneofs.add(oneof.name)
        if field.is_repeated:
            message.ClearField(name)  # named twice (both spellings): the last one wins
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            if not isinstance(value, dict):
                raise _Invalid(f"field {key!r} must be a JSON object")
            target = getattr(message, name)
            key_field = field.message_type.fields_by_name["key"]
            value_field = field.message_type.fields_by_name["value"]
            for k, v in value.items():
                map_key = _decode_map_key(key_field, k)
                if value_field.type == _F.TYPE_MESSAGE:
                    _decode_message(v, target[map_key], depth + 1)
                else:
                    decoded = _decode_scalar(value_field, v, key)
                    if decoded is not _SKIP:
                        target[map_key] = decoded
        elif field.is_repeated:
            if not isinstance(value, list):
                raise _Invalid(f"field {key!r} must be a JSON array")
            target = getattr(message, name)
            if field.type == _F.TYPE_MESSAGE:
                for item in value:
                    _decode_message(item, target.add(), depth + 1)
            else:
                decoded_items = (_decode_scalar(field, item, key) for item in value)
                target.extend(d for d in decoded_items if d is not _SKIP)
        elif field.type == _F.TYPE_MESSAGE:
            sub = getattr(message, name)
            sub.SetInParent()
            _decode_message(value, sub, depth + 1)
        else:
            decoded = _decode_scalar(field, value, key)
            if decoded is not _SKIP:
                setattr(message, name, decoded)


def _decode_map_key(field: FieldDescriptor, key: str) -> Any:
    if field.type == _F.TYPE_STRING:
        return key
    if field.type == _F.TYPE_BOOL:
        if key not in ("true", "false"):
            raise _Invalid(f"map key {key!r} is not a bool")
        return key == "true"
    return _decode_scalar(field, key, "map key")


def _decode_scalar(field: FieldDescriptor, value: Any, key: str) -> Any:
    t = field.type
    if t == _F.TYPE_STRING:
        if isinstance(value, str):
            return value
    elif t == _F.TYPE_BOOL:
        if isinstance(value, bool):
            return value
    elif t in _RANGES:
        number = _integer(value)
        low, high = _RANGES[t]
        if number is not None and low <= number <= high:
            return number
    elif t == _F.TYPE_BYTES:
        if isinstance(value, str):
            try:
                padded = value + "=" * (-len(value) % 4)
                if "-" in value or "_" in value:
                    return base64.urlsafe_b64decode(padded)
                return base64.b64decode(padded, validate=True)
            except (binascii.Error, ValueError):
                pass
    elif t == _F.TYPE_ENUM:
        if isinstance(value, str):
            enum_value = field.enum_type.values_by_name.get(value)
            if enum_value is not None:
                return enum_value.number
            return int(value) if _INT_TEXT.match(value) else _SKIP
        number = _integer(value)
        if number is not None and -(2**31) <= number < 2**31:
            return number
    elif t == _F.TYPE_DOUBLE:
        if isinstance(value, str):
            if value in _SPECIAL_DOUBLES:
                return float(value)
            value = float(value) if _FLOAT_TEXT.match(value) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
            # Bare NaN/Infinity tokens, or numbers beyond a double, are not JSON numbers.
            if math.isfinite(number):
                return number
    raise _Invalid(f"invalid value {value!r} for field {key!r}")


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
