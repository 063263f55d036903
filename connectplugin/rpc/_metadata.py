"""Headers as Connect metadata: lower-case keys, ``-bin`` values base64 on the wire."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping

from .errors import Code, ConnectError

Value = str | bytes


def encode_value(key: str, value: Value) -> str:
    if isinstance(value, bytes):
        if not key.lower().endswith("-bin"):
            raise ValueError(f"binary metadata value needs a key ending in -bin, got {key!r}")
        return base64.b64encode(value).decode().rstrip("=")
    return value


def decode_value(key: str, value: str) -> Value:
    """Decode a ``-bin`` value (padded or not, standard or URL alphabet); other values as is."""
    if not key.endswith("-bin"):
        return value
    try:
        return base64.b64decode(value + "=" * (-len(value) % 4), altchars=b"-_" if ("-" in value or "_" in value) else None, validate=True)
    except (binascii.Error, ValueError):
        raise ConnectError(Code.INVALID_ARGUMENT, f"header {key!r} is not valid base64") from None


def environ_key(name: str) -> str:
    """Where WSGI puts a request header: ``Connect-Timeout-Ms`` is ``HTTP_CONNECT_TIMEOUT_MS``."""
    return "HTTP_" + name.upper().replace("-", "_")


def to_wire(items: Mapping[str, Value], prefix: str = "") -> list[tuple[str, str]]:
    return [(prefix + k, encode_value(k, v)) for k, v in items.items()]


def from_pairs(pairs: Iterable[tuple[str, str]], strip_prefix: str = "") -> dict[str, Value]:
    """Lower-cased metadata; repeated keys are joined with ", " as HTTP allows."""
    out: dict[str, Value] = {}
    for key, value in pairs:
        key = key.lower()
        if strip_prefix:
            if not key.startswith(strip_prefix):
                continue
            key = key[len(strip_prefix):]
        decoded = decode_value(key, value) if key.endswith("-bin") else value
        previous = out.get(key)
        if previous is not None and isinstance(decoded, str) and isinstance(previous, str):
            out[key] = f"{previous}, {decoded}"
        else:
            out[key] = decoded
    return out


def split_prefixed(metadata: Mapping[str, Value], prefix: str) -> tuple[dict[str, Value], dict[str, Value]]:
    """The entries without ``prefix``, and those with it under their names without it."""
    plain: dict[str, Value] = {}
    prefixed: dict[str, Value] = {}
    for key, value in metadata.items():
        if key.startswith(prefix):
            prefixed[key[len(prefix) :]] = value
        else:
            plain[key] = value
    return plain, prefixed
