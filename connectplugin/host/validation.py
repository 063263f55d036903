"""What the host accepts from plugins: the Go reference's rules (``validation.go``), plus paths.

Names and versions follow the Go host so a plugin refused by one is refused by the other;
every failure is ``invalid_argument``. Endpoint paths are stricter than Go's ("starts with
/"): a registration may only name a service's own prefix, ``/<package.Service>/``, and never
one of the host protocol's control services, so the router cannot be pointed at them.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from ..rpc.errors import Code, ConnectError

MAX_NAME_LEN = 128
"""Longest self id or service type (Go: ``MaxSelfIDLen``, ``MaxServiceTypeLen``)."""
MAX_VERSION_LEN = 64
MAX_PATH_LEN = 256

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]*")
_SEMVER = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+(-[A-Za-z0-9.\-]+)?")
_SERVICE_PATH = re.compile(r"/(?:[A-Za-z_][A-Za-z0-9_]*\.)*[A-Za-z_][A-Za-z0-9_]*/")
CONTROL_PACKAGES = ("connectplugin.", "grpc.health.")
"""Services of the plugin protocol itself (handshake, control, identity, health): no
registration may route to them."""


def _invalid(message: str) -> ConnectError:
    return ConnectError(Code.INVALID_ARGUMENT, message)


def check_name(value: str, what: str) -> None:
    """A self id or service type: a letter, then letters, digits, ``_ . -``; at most 128."""
    if not value:
        raise _invalid(f"{what} is required")
    if len(value) > MAX_NAME_LEN:
        raise _invalid(f"{what} is longer than {MAX_NAME_LEN} characters")
    if not _NAME.fullmatch(value) or ".." in value:
        raise _invalid(
            f"{what} {value!r} must start with a letter and hold only letters, digits, '_', '.', '-'"
        )


def check_version(value: str, what: str = "version") -> None:
    """Strict semantic version, ``1.2.3`` or ``1.2.3-rc.1`` (no ``v``, no build metadata)."""
    if not value:
        raise _invalid(f"{what} is required")
    if len(value) > MAX_VERSION_LEN or not _SEMVER.fullmatch(value):
        raise _invalid(
            f"{what} {value[:MAX_VERSION_LEN]!r} must be a semantic version such as 1.0.0 or 2.1.3-beta"
        )


def check_endpoint_path(value: str) -> None:
    """``/<package.Service>/`` of a service other than the protocol's own."""
    if len(value) > MAX_PATH_LEN or not _SERVICE_PATH.fullmatch(value):
        raise _invalid(
            f"endpoint_path {value[:MAX_PATH_LEN]!r} must be a service prefix such as /kv.v1.KVService/"
        )
    if value[1:].startswith(CONTROL_PACKAGES):
        raise ConnectError(
            Code.PERMISSION_DENIED,
            f"endpoint_path {value!r} is a control service of the plugin protocol",
        )


def check_base_url(value: str) -> str:
    """An absolute ``http(s)://host[:port][/prefix]`` with nothing else; returns it without a trailing /."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise _invalid(f"base_url {value[:MAX_PATH_LEN]!r} is not a URL") from None
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.username is not None
        or parts.password is not None
        or parts.query
        or parts.fragment
        or len(value) > MAX_PATH_LEN
    ):
        raise _invalid(
            f"base_url {value[:MAX_PATH_LEN]!r} must be http(s)://host:port with no user, query or fragment"
        )
    return value.rstrip("/")
