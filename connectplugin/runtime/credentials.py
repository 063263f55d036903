"""How host and plugins prove who they are to each other: the headers and the secret checks.

A plugin calls its host with ``X-Plugin-Runtime-ID`` and ``Authorization: Bearer <token>``;
the host calls (or forwards a call to) a plugin with ``X-Plugin-Host-Secret``. Both sides
compare in constant time with the functions here.
"""

from __future__ import annotations

import hmac
import secrets

RUNTIME_ID_HEADER = "X-Plugin-Runtime-ID"
HOST_SECRET_HEADER = "X-Plugin-Host-Secret"
"""The credential the host presents on every call it makes or forwards to a plugin: the
secret it gave that plugin (at launch, or in the handshake of a plugin that joined by itself).
A header of its own, so it is never confused with the caller's ``Authorization``, which the
router strips."""
CALLER_HEADER = "X-Plugin-Caller-ID"
"""The runtime id of the plugin on whose behalf the host's router forwards a call; a plugin
believes it only beside a valid ``X-Plugin-Host-Secret``."""
HOST_SECRET_KEY = "connectplugin-host-secret"
"""Where a host puts a self-registering plugin's host secret: the handshake response's
``server_metadata``."""
SECRET_BYTES = 32
"""Randomness in every token and secret the host makes (256 bits)."""

_DUMMY = "-" * 43  # the length of a token_urlsafe(32), compared against when nothing is expected


def new_secret() -> str:
    """A fresh, unguessable secret or token (URL-safe text)."""
    return secrets.token_urlsafe(SECRET_BYTES)


def secret_matches(given: object, expected: str | None) -> bool:
    """Whether ``given`` is ``expected``, compared in constant time; never with no ``expected``.

    With no ``expected`` secret the comparison still runs (against a dummy), so the time
    taken does not tell an unknown id from a wrong secret.
    """
    ok = hmac.compare_digest(str(given).strip().encode(), (expected or _DUMMY).encode())
    return ok and bool(expected)


def bearer_matches(authorization: object, expected: str | None) -> bool:
    """Whether ``authorization`` is ``Bearer <expected>``, compared in constant time."""
    scheme, _, given = str(authorization).partition(" ")
    return secret_matches(given, expected) and scheme.lower() == "bearer"
