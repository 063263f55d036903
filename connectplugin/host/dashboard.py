"""The host's live dashboard at ``/dashboard/``: plugins, their services, health and call rates.

The page is static (``host/static/``, no framework, nothing fetched from elsewhere). It holds
no data: the operator's token, given in the URL fragment or a form, stays in the page's
memory and goes with each request as ``Authorization: Bearer``. The page streams the
registry's ``WatchService`` for every service type (a Connect server stream with the JSON
codec, parsed in the browser) and polls ``/dashboard/api/plugins`` (the host's inventory,
as ``GET /plugins`` serves it, with call counts).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from importlib import resources
from typing import Any

from ..rpc.errors import ConnectError
from ..rpc.server import error_response
from .admission import Operators
from .inventory import PluginSummary
from .metrics import DIRECT, ROUTED, HostMetrics

ROUTES = ("/dashboard/", "/dashboard/<path:name>")
"""Where the host serves it (Werkzeug rules)."""

API = "api/plugins"
"""The page's JSON data, under ``/dashboard/``."""

_FILES = {
    "": ("index.html", "text/html; charset=utf-8"),
    "dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}

_HEADERS = [
    # Only our own script, style and same-origin requests; no framing (clickjacking), no
    # inline script (an injected string cannot run), no referrer to leak the URL.
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
]


class Dashboard:
    """The dashboard's WSGI app: its static files for anyone (they hold no data), the data
    for operators only. Safe from any thread (reads the inventory and metrics only)."""

    def __init__(
        self, inventory: Callable[[], Sequence[PluginSummary]], operators: Operators, metrics: HostMetrics | None
    ) -> None:
        """``inventory``: what operators see of the host's plugins (``PluginHost.inventory``)."""
        self._inventory = inventory
        self._operators = operators
        self._metrics = metrics

    def __call__(self, environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:
        name = environ.get("connectplugin.route_args", {}).get("name", "")
        if environ.get("REQUEST_METHOD") != "GET":
            start_response("405 Method Not Allowed", [("Allow", "GET"), ("Content-Length", "0")])
            return [b""]
        if name == "" and not environ.get("PATH_INFO", "").endswith("/"):
            # The page's URLs are relative (it may be mounted under a prefix): it must end in "/".
            start_response("308 Permanent Redirect", [("Location", "dashboard/"), ("Content-Length", "0")])
            return [b""]
        if name == API:
            return self._api(environ, start_response)
        if name not in _FILES:
            return _send(start_response, "404 Not Found", "text/plain", b"not found\n")
        filename, content_type = _FILES[name]
        body = (resources.files(__package__) / "static" / filename).read_bytes()
        return _send(start_response, "200 OK", content_type, body)

    def _api(self, environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:
        try:
            self._operators.check(environ.get("HTTP_AUTHORIZATION", ""))
        except ConnectError as e:
            return error_response(start_response, e)
        body = json.dumps(self.snapshot(), separators=(",", ":")).encode()
        return _send(start_response, "200 OK", "application/json", body)

    def snapshot(self) -> dict[str, Any]:
        """The host's inventory, each plugin with its call and error counts so far."""
        counts = self._metrics.calls() if self._metrics is not None else {}
        plugins = []
        for summary in self._inventory():
            entry = asdict(summary)
            for via in (ROUTED, DIRECT):
                calls, errors = counts.get((summary.self_id, via), (0.0, 0.0))
                entry.setdefault("calls", {})[via] = calls
                entry.setdefault("errors", {})[via] = errors
            plugins.append(entry)
        return {"metrics": self._metrics is not None, "plugins": plugins}


def _send(start_response: Callable[..., Any], status: str, content_type: str, body: bytes) -> list[bytes]:
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body))), *_HEADERS])
    return [body]
