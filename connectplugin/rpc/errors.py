"""Connect error codes, the one exception type, and the HTTP tables that map between them.

See the Connect protocol specification, "Error Codes" and "HTTP to Error Code".
"""

from __future__ import annotations

import base64
import binascii
import builtins
import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from google.protobuf.message import Message

M = TypeVar("M", bound=Message)


class Code(str, enum.Enum):
    """The sixteen Connect error codes; the value is the wire name."""

    CANCELED = "canceled"
    UNKNOWN = "unknown"
    INVALID_ARGUMENT = "invalid_argument"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    PERMISSION_DENIED = "permission_denied"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    FAILED_PRECONDITION = "failed_precondition"
    ABORTED = "aborted"
    OUT_OF_RANGE = "out_of_range"
    UNIMPLEMENTED = "unimplemented"
    INTERNAL = "internal"
    UNAVAILABLE = "unavailable"
    DATA_LOSS = "data_loss"
    UNAUTHENTICATED = "unauthenticated"

    @property
    def http_status(self) -> int:
        """The status a server sends for a unary error with this code."""
        return _HTTP_STATUS[self]

    @classmethod
    def from_http_status(cls, status: int) -> Code:
        """The code a client infers from a response that carries no Connect error.

        This is the spec's own client table, not the inverse of ``http_status``.
        """
        return _CODE_FOR_HTTP.get(status, cls.UNKNOWN)

    @classmethod
    def parse(cls, name: object) -> Code:
        """The code for a wire name; an unrecognised name is ``unknown``."""
        try:
            return cls(name)
        except ValueError:
            return cls.UNKNOWN

    def __str__(self) -> str:
        return self.value


_HTTP_STATUS = {
    Code.CANCELED: 499,
    Code.UNKNOWN: 500,
    Code.INVALID_ARGUMENT: 400,
    Code.DEADLINE_EXCEEDED: 504,
    Code.NOT_FOUND: 404,
    Code.ALREADY_EXISTS: 409,
    Code.PERMISSION_DENIED: 403,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.FAILED_PRECONDITION: 400,
    Code.ABORTED: 409,
    Code.OUT_OF_RANGE: 400,
    Code.UNIMPLEMENTED: 501,
    Code.INTERNAL: 500,
    Code.UNAVAILABLE: 503,
    Code.DATA_LOSS: 500,
    Code.UNAUTHENTICATED: 401,
}

_CODE_FOR_HTTP = {
    400: Code.INTERNAL,
    401: Code.UNAUTHENTICATED,
    403: Code.PERMISSION_DENIED,
    404: Code.UNIMPLEMENTED,
    429: Code.UNAVAILABLE,
    502: Code.UNAVAILABLE,
    503: Code.UNAVAILABLE,
    504: Code.UNAVAILABLE,
}


_NAMES = frozenset(c.value for c in Code)


@dataclass(frozen=True)
class ErrorDetail:
    """A protobuf message attached to an error: its full type name and serialized bytes."""

    type: str
    value: bytes
    debug: Any = None

    @classmethod
    def pack(cls, message: Message) -> ErrorDetail:
        return cls(message.DESCRIPTOR.full_name, message.SerializeToString())

    def unpack(self, message_type: builtins.type[M]) -> M | None:
        """The detail as ``message_type``, or None if it holds another type."""
        if message_type.DESCRIPTOR.full_name != self.type:
            return None
        return message_type.FromString(self.value)

    def to_json(self) -> dict[str, Any]:
        # Details carry unpadded base64 (spec: "Error End-Stream" / unary errors).
        out: dict[str, Any] = {
            "type": self.type,
            "value": base64.b64encode(self.value).decode().rstrip("="),
        }
        if self.debug is not None:
            out["debug"] = self.debug
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> ErrorDetail:
        value = str(obj.get("value", ""))
        return cls(
            str(obj.get("type", "")),
            base64.b64decode(value + "=" * (-len(value) % 4)),
            obj.get("debug"),
        )


class ConnectError(Exception):
    """The error of a Connect call, raised on clients and by handlers alike.

    ``metadata`` holds the response headers and trailers that came with the error
    (on the client) or that the server should send with it (in a handler).
    """

    def __init__(
        self,
        code: Code,
        message: str = "",
        details: Iterable[ErrorDetail | Message] = (),
        metadata: Mapping[str, str | bytes] | None = None,
    ) -> None:
        super().__init__(f"{code.value}: {message}" if message else code.value)
        self.code = code
        self.message = message
        self.details = [d if isinstance(d, ErrorDetail) else ErrorDetail.pack(d) for d in details]
        self.metadata: dict[str, str | bytes] = dict(metadata or {})

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code.value}
        if self.message:
            out["message"] = self.message
        if self.details:
            out["details"] = [d.to_json() for d in self.details]
        return out

    @classmethod
    def from_json(
        cls, obj: object, fallback: Code, metadata: Mapping[str, str | bytes] | None = None
    ) -> ConnectError:
        """Build from a wire error object; ``fallback`` is used when it names no code."""
        if not isinstance(obj, dict):
            return cls(fallback, "malformed error body", metadata=metadata)
        # A missing, null or unrecognised code falls back to what the HTTP status implies.
        name = obj.get("code")
        code = Code(name) if isinstance(name, str) and name in _NAMES else fallback
        details = []
        raw_details = obj.get("details")
        for d in raw_details if isinstance(raw_details, list) else ():
            if isinstance(d, dict):
                try:
                    details.append(ErrorDetail.from_json(d))
                except (binascii.Error, ValueError):
                    pass  # an undecodable detail is dropped; the error itself still stands
        return cls(code, str(obj.get("message") or ""), details, metadata)

    def __repr__(self) -> str:
        return f"ConnectError({self.code.value!r}, {self.message!r})"
