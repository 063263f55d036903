"""The door of a plugin's socket: only its host (and its router) gets past it.

Every procedure a plugin serves over HTTP (its own services, the handshake, PluginControl,
PluginIdentity, health) answers only a call carrying ``X-Plugin-Host-Secret`` equal to the
secret its host gave it; anything else is ``unauthenticated`` before routing, so a stranger
learns nothing but that a connectplugin server listens. The probes stay open.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable
from typing import Any, Protocol

from ..rpc._metadata import environ_key
from ..rpc.errors import Code, ConnectError
from ..rpc.server import WSGIApp, refusal
from .credentials import CALLER_HEADER, HOST_SECRET_HEADER

log = logging.getLogger("connectplugin.plugin")

_HOST_SECRET = environ_key(HOST_SECRET_HEADER)
_CALLER = environ_key(CALLER_HEADER)


class HostCredential(Protocol):
    """Who holds the secret the host presents (``HostLink``)."""

    def is_host(self, secret: object) -> bool:
        """Whether ``secret`` is the current host's credential (constant time); False with none."""
        ...


class HostGate:
    """WSGI middleware in front of a plugin's app. Holds no state: safe from any thread.

    ``open_paths`` (the probes) pass untouched. With ``allow_unauthenticated`` (development
    only) every call passes, but ``X-Plugin-Caller-ID`` is stripped, since no host vouches
    for it. Otherwise a call passes only with the host's secret, which is then removed from
    what the handler sees.
    """

    def __init__(
        self,
        app: WSGIApp,
        credential: HostCredential,
        open_paths: Collection[str],
        allow_unauthenticated: bool = False,
    ) -> None:
        self._app = app
        self._credential = credential
        self._open = frozenset(open_paths)
        self.allow_unauthenticated = allow_unauthenticated

    def __call__(self, environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "") in self._open:
            return self._app(environ, start_response)
        secret = environ.pop(_HOST_SECRET, "")
        if self.allow_unauthenticated:
            environ.pop(_CALLER, None)
        elif not self._credential.is_host(secret):
            # The same answer for a missing, wrong or stale secret, and for every path.
            error = ConnectError(Code.UNAUTHENTICATED, f"only this plugin's host may call it ({HOST_SECRET_HEADER})")
            return refusal(start_response, environ.get("CONTENT_TYPE", ""), error)
        return self._app(environ, start_response)


def warn_unauthenticated(url: str) -> None:
    """The warning line of a plugin that serves anyone (development only)."""
    log.warning(
        "serving %s WITHOUT AUTHENTICATION: any process that can reach it may call, stop or "
        "reconfigure this plugin (development only)",
        url,
    )
