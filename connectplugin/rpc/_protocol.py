"""The Connect protocol: every wire fact (header names, content types, codecs, compression,
envelopes, the end-of-stream message, the error body, timeouts) written once.

Shared by the server, the client and the router so all read and write the same bytes.
References are to the Connect protocol specification (connectrpc.com/docs/protocol).
"""

from __future__ import annotations

import base64
import binascii
import gzip
import json
import re
import struct
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar
from urllib.parse import quote

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

from . import _json
from ._metadata import Value, from_pairs
from .errors import Code, ConnectError

M = TypeVar("M", bound=Message)

DEFAULT_READ_LIMIT = 4 * 1024 * 1024
"""Largest message accepted, before and after decompression (4 MiB, as gRPC)."""

COMPRESS_MIN_BYTES = 1024
"""Smaller payloads are sent uncompressed: gzip would cost more than it saves."""

# --- headers (spec: "Unary-Request", "Streaming-Request", "Unary-Response") -----------------

PROTOCOL_VERSION = "1"
VERSION_HEADER = "Connect-Protocol-Version"
TIMEOUT_HEADER = "Connect-Timeout-Ms"
UNARY_ENCODING_HEADER = "Content-Encoding"
UNARY_ACCEPT_ENCODING_HEADER = "Accept-Encoding"
STREAM_ENCODING_HEADER = "Connect-Content-Encoding"
STREAM_ACCEPT_ENCODING_HEADER = "Connect-Accept-Encoding"
TRAILER_PREFIX = "trailer-"

# HTTP/1.1 header syntax, held to by whatever reads a head it may pass on (RFC 9110/9112).
_TOKEN = r"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_ILLEGAL_TEXT = "\x00-\x08\x0a-\x1f\x7f"
is_header_name = re.compile(_TOKEN).fullmatch
"""Whether a string is a header name (a token)."""
HEADER_LINE = re.compile(f"({_TOKEN}):([^{_ILLEGAL_TEXT}]*)\r\n")
"""A well-formed header line with its CRLF: the name, and the value with the blanks around it."""
has_illegal_text = re.compile(f"[{_ILLEGAL_TEXT}]").search
"""Whether a header value, status or reason holds what it may not: a control character but
tab, above all a lone CR or LF that would split the line for whoever reads it next, or NUL."""
is_chunk_size = re.compile(rb"[0-9A-Fa-f]{1,16}").fullmatch
"""Whether bytes are a chunk size: hex digits only, no sign, prefix, underscore or blank (all
of which ``int(x, 16)`` takes), so both ends of a chunked body read the same framing."""
"""Unary trailers travel as headers with this prefix; stream trailers in the end-stream message."""


def check_version(version: str | None) -> None:
    """Connect-Protocol-Version may be absent (as connect-go allows); if sent, it must be 1."""
    if version is not None and version != PROTOCOL_VERSION:
        raise ConnectError(Code.INVALID_ARGUMENT, f"unsupported {VERSION_HEADER} {version!r}")


FLAG_COMPRESSED = 0x01
FLAG_END_STREAM = 0x02
_HEADER = struct.Struct(">BI")
ENVELOPE_HEADER_SIZE = _HEADER.size
"""Bytes before each envelope's payload: one of flags, four of length."""


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


# --- content types (spec: Content-Type in "Unary-Request" and "Streaming-Request") -----------

UNARY_PREFIX = "application/"
STREAM_PREFIX = "application/connect+"
UNARY_TYPES = {UNARY_PREFIX + name: name for name in CODECS}
STREAM_TYPES = {STREAM_PREFIX + name: name for name in CODECS}
ERROR_CONTENT_TYPE = UNARY_PREFIX + JsonCodec.name
"""Unary errors are always JSON, whatever the call's codec."""


def is_streaming(content_type: str) -> bool:
    return content_type.startswith(STREAM_PREFIX)


def codec_for(content_type: str, table: Mapping[str, str]) -> str:
    """The codec name a content type selects in ``table`` (UNARY_TYPES or STREAM_TYPES), or ""."""
    base, _, params = content_type.partition(";")
    name = table.get(base.strip().lower(), "")
    if name == JsonCodec.name and params:
        # Only UTF-8 JSON exists in Connect; any other charset is unsupported.
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key.lower() == "charset" and value.strip('"').lower() not in ("utf-8", "utf8"):
                return ""
    return name


def check_response_type(content_type: str, expected: str, metadata: Mapping[str, Value]) -> None:
    """A response must carry the content type of the request's codec.

    Another Connect codec is a protocol error (internal); anything else is not Connect at all
    (unknown), except on a stream, where only Connect answers with a 200.
    """
    base = content_type.split(";")[0].strip().lower()
    if base == expected:
        return
    code = Code.UNKNOWN if expected in UNARY_TYPES and base not in UNARY_TYPES else Code.INTERNAL
    raise ConnectError(code, f"unexpected response content type {base!r}", metadata=metadata)


# --- compression ----------------------------------------------------------------------------

IDENTITY = "identity"
GZIP = "gzip"
ENCODINGS = (GZIP, IDENTITY)


def check_encoding(encoding: str | None) -> str:
    """The compression a peer says it used: identity when unnamed, else one we support."""
    if not encoding:
        return IDENTITY
    if encoding not in ENCODINGS:
        raise unsupported_encoding(encoding)
    return encoding


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


# --- unary GET (spec: "Unary-Get-Request") ------------------------------------------------


def get_query(codec_name: str, data: bytes) -> str:
    """The query string of a GET call carrying the encoded message ``data`` (uncompressed)."""
    query = f"encoding={codec_name}&connect=v{PROTOCOL_VERSION}&"
    if codec_name == JsonCodec.name:
        return query + "message=" + quote(data.decode(), safe="")
    return query + "base64=1&message=" + base64.urlsafe_b64encode(data).decode().rstrip("=")


def get_codec(query: Mapping[str, list[str]]) -> str:
    """The codec name a parsed GET query names (empty if none)."""
    return _first(query, "encoding")


def get_payload(query: Mapping[str, list[str]], limit: int) -> bytes:
    """The message bytes a parsed GET query carries, decompressed, at most ``limit`` long."""
    if _first(query, "connect") not in ("", "v" + PROTOCOL_VERSION):
        raise ConnectError(Code.INVALID_ARGUMENT, f"connect query parameter must be v{PROTOCOL_VERSION}")
    message = _first(query, "message")
    if _first(query, "base64") == "1":
        try:
            data = base64.urlsafe_b64decode(message + "=" * (-len(message) % 4))
        except (binascii.Error, ValueError):
            raise ConnectError(Code.INVALID_ARGUMENT, "message is not valid base64") from None
    else:
        data = message.encode()
    encoding = check_encoding(_first(query, "compression"))
    if len(data) > limit:
        raise too_large(limit)
    return decompress(encoding, data, limit)


def _first(query: Mapping[str, list[str]], key: str) -> str:
    values = query.get(key)
    return values[0] if values else ""


# --- end of stream (spec: "Streaming-Response" / EndStreamResponse) ------------------------


def end_stream(error: ConnectError | None = None, metadata: Iterable[tuple[str, str]] = ()) -> bytes:
    """The end-of-stream envelope: the error, if any, and the trailers as wire (key, value) pairs."""
    trailers: dict[str, list[str]] = {}
    for key, value in metadata:
        trailers.setdefault(key, []).append(value)
    end: dict[str, Any] = {}
    if error is not None:
        end["error"] = error.to_json()
    if trailers:
        end["metadata"] = trailers
    return envelope(FLAG_END_STREAM, json.dumps(end, separators=(",", ":")).encode())


def read_end_stream(
    data: bytes, headers: Mapping[str, Value]
) -> tuple[dict[str, Value], ConnectError | None]:
    """The trailers and the error of an end-of-stream message's payload.

    The error carries ``headers`` and the trailers as its metadata. Entries that are not
    lists of strings are ignored; a payload that is not a JSON object is a protocol error.
    """
    try:
        end = json.loads(data)
        if not isinstance(end, dict):
            raise ValueError("not an object")
    except ValueError:
        raise ConnectError(Code.INTERNAL, "malformed end-of-stream message") from None
    metadata = end.get("metadata")
    if not isinstance(metadata, dict):
        metadata = {}
    pairs = [(k, v) for k, vs in metadata.items() if isinstance(vs, list) for v in vs if isinstance(v, str)]
    trailers = from_pairs(pairs)
    if end.get("error") is None:
        return trailers, None
    return trailers, ConnectError.from_json(end["error"], Code.UNKNOWN, {**headers, **trailers})


# --- unary errors (spec: "Unary-Response", Error) -------------------------------------------


def error_body(error: ConnectError) -> bytes:
    return json.dumps(error.to_json(), separators=(",", ":")).encode()


def read_error(
    status: int, reason: str | None, headers: Mapping[str, str], body: bytes, metadata: Mapping[str, Value]
) -> ConnectError:
    """The error a non-200 unary response stands for; ``headers`` are lower-cased.

    A Connect error body names its code; otherwise (or when it cannot be read) the code is the
    one the HTTP status implies (spec: "HTTP to Error Code").
    """
    fallback = Code.from_http_status(status)
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == ERROR_CONTENT_TYPE:
        try:
            encoding = headers.get(UNARY_ENCODING_HEADER.lower(), IDENTITY)
            body = decompress(encoding, body, len(body) * 64 + 1024)
            return ConnectError.from_json(json.loads(body), fallback, metadata)
        except (ValueError, ConnectError):
            pass
    message = f"HTTP {status} {reason or ''}".strip()
    if content_type == "text/plain" and body:
        # A proxy's or server's own words (e.g. "this server only speaks HTTPS on this port").
        message += ": " + body[:PLAIN_ERROR_CHARS].decode("utf-8", "replace").strip()
    return ConnectError(fallback, message, metadata=metadata)


PLAIN_ERROR_CHARS = 200
"""How much of a plain-text error body a non-Connect error message quotes."""


# --- timeouts (spec: Connect-Timeout-Ms, at most 10 digits) ---------------------------------


def parse_timeout_ms(value: str) -> float:
    """Seconds from a ``Connect-Timeout-Ms`` value."""
    if not (value.isascii() and value.isdigit()) or len(value) > 10:
        raise ConnectError(Code.INVALID_ARGUMENT, f"invalid {TIMEOUT_HEADER} {value!r}")
    return int(value) / 1000.0


def format_timeout_ms(seconds: float) -> str:
    return str(max(1, min(int(seconds * 1000), 9_999_999_999)))
