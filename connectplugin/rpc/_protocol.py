"""The Connect wire format: message codecs, compression, envelopes and timeouts.

Shared by the server and the client so both sides read and write the same bytes.
References are to the Connect protocol specification (connectrpc.com/docs/protocol).
"""

from __future__ import annotations

import gzip
import json
import struct
import zlib
from collections.abc import Callable
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

from . import _json
from .errors import Code, ConnectError

M = TypeVar("M", bound=Message)

DEFAULT_READ_LIMIT = 4 * 1024 * 1024
"""Largest message accepted, before and after decompression (4 MiB, as gRPC)."""

COMPRESS_MIN_BYTES = 1024
"""Smaller payloads are sent uncompressed: gzip would cost more than it saves."""

FLAG_COMPRESSED = 0x01
FLAG_END_STREAM = 0x02
_HEADER = struct.Struct(">BI")


# --- message codecs -------------------------------------------------------------------------


class ProtoCodec:
    name = "proto"

    @staticmethod
    def encode(message: Message) -> bytes:
        return message.SerializeToString()

    @staticmethod
    def decode(data: bytes, message_type: type[M]) -> M:
        try:
            return message_type.FromString(data)
        except (DecodeError, RuntimeError, ValueError) as e:
            raise ConnectError(Code.INVALID_ARGUMENT, f"malformed protobuf: {e}") from None


_decoder = json.JSONDecoder()
_scan = _decoder.scan_once  # type: ignore[attr-defined]  # set by JSONDecoder.__init__


def _load(text: str) -> Any:
    """``json.loads``, with a shortcut for text that is one value and nothing else.

    ``JSONDecoder.decode`` runs a whitespace regex before and after its scanner; text from
    any JSON encoder has no surrounding whitespace, so try the scanner alone first. All
    other text, and every error message, is the full decoder's.
    """
    try:
        obj, end = _scan(text, 0)
    except StopIteration:
        return _decoder.decode(text)
    if end != len(text):
        return _decoder.decode(text)
    return obj


class JsonCodec:
    """Proto3 JSON: camelCase field names out, either spelling in, unknown fields ignored."""

    name = "json"

    @staticmethod
    def encode(message: Message) -> bytes:
        return _json.to_json(message).encode()

    @staticmethod
    def decode(data: bytes, message_type: type[M]) -> M:
        message = message_type()
        try:
            _json.from_dict(_load(data.decode()) if data else {}, message)
        except (ValueError, TypeError, AttributeError, OverflowError, RecursionError, json_format.ParseError) as e:
            raise ConnectError(Code.INVALID_ARGUMENT, f"malformed JSON: {e}") from None
        return message


Codec = type[ProtoCodec] | type[JsonCodec]
CODECS: dict[str, Codec] = {"proto": ProtoCodec, "json": JsonCodec}


# --- compression ----------------------------------------------------------------------------

IDENTITY = "identity"
GZIP = "gzip"
ENCODINGS = (GZIP, IDENTITY)


def compress(encoding: str, data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=6, mtime=0) if encoding == GZIP else data


def decompress(encoding: str, data: bytes, limit: int) -> bytes:
    """Inflate at most ``limit`` bytes, so a small bomb cannot expand into a large buffer."""
    if encoding == IDENTITY or not data:  # zero-length content is never decompressed (spec)
        return data
    if encoding != GZIP:
        raise unsupported_encoding(encoding)
    inflater = zlib.decompressobj(wbits=31)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as e:
        raise ConnectError(Code.INVALID_ARGUMENT, f"malformed gzip data: {e}") from None
    if len(out) > limit:
        raise too_large(limit)
    if not inflater.eof or inflater.unused_data:
        raise ConnectError(Code.INVALID_ARGUMENT, "truncated gzip data, or data after its end")
    return out


def unsupported_encoding(encoding: str) -> ConnectError:
    return ConnectError(
        Code.UNIMPLEMENTED, f"unknown compression {encoding!r}: supported are gzip, identity"
    )


def too_large(limit: int) -> ConnectError:
    return ConnectError(Code.RESOURCE_EXHAUSTED, f"message is larger than the {limit} byte limit")


def negotiate(accept: str | None) -> str:
    """The response encoding: gzip when the peer accepts it, else identity."""
    if accept and GZIP in (part.split(";")[0].strip() for part in accept.split(",")):
        return GZIP
    return IDENTITY


# --- envelopes (spec: "Streaming-RPC" / Envelope) -------------------------------------------


def envelope(flags: int, data: bytes) -> bytes:
    return _HEADER.pack(flags, len(data)) + data


def read_envelope(
    read: Callable[[int], bytes], encoding: str, limit: int
) -> tuple[int, bytes] | None:
    """Read one envelope through ``read(n)``; None at a clean end of input.

    Returns the flags (compression cleared) and the decompressed payload.
    """
    head = _read_exact(read, 5, allow_eof=True)
    if head is None:
        return None
    flags, length = _HEADER.unpack(head)
    if flags & ~(FLAG_COMPRESSED | FLAG_END_STREAM):
        raise ConnectError(Code.INVALID_ARGUMENT, f"unknown envelope flags 0x{flags:02x}")
    if length > limit:
        raise too_large(limit)
    data = _read_exact(read, length, allow_eof=False) or b""
    if flags & FLAG_COMPRESSED:
        if encoding == IDENTITY:
            raise ConnectError(
                Code.INTERNAL, "compressed envelope without a Connect-Content-Encoding"
            )
        data = decompress(encoding, data, limit)
    return flags & FLAG_END_STREAM, data


def _read_exact(read: Callable[[int], bytes], n: int, allow_eof: bool) -> bytes | None:
    chunks = []
    remaining = n
    while remaining:
        chunk = read(remaining)
        if not chunk:
            if allow_eof and remaining == n:
                return None
            raise ConnectError(Code.INVALID_ARGUMENT, "truncated envelope")
        chunks.append(chunk)
        remaining -= len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


# --- timeouts (spec: Connect-Timeout-Ms, at most 10 digits) ---------------------------------


def parse_timeout_ms(value: str) -> float:
    """Seconds from a ``Connect-Timeout-Ms`` value."""
    if not (value.isascii() and value.isdigit()) or len(value) > 10:
        raise ConnectError(Code.INVALID_ARGUMENT, f"invalid Connect-Timeout-Ms {value!r}")
    return int(value) / 1000.0


def format_timeout_ms(seconds: float) -> str:
    return str(max(1, min(int(seconds * 1000), 9_999_999_999)))
