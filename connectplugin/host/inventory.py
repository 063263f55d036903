"""What an operator sees of a host: its plugins, the services they provide, their health.

``PluginHost.inventory()`` builds it; ``GET /plugins`` serves it as JSON to a caller presenting
an operator token (``HostConfig.operator_tokens``), which is what ``connectplugin list`` reads.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..rpc.errors import ConnectError
from ..rpc.server import text_response
from .admission import Operators

ROUTE = "/plugins"


@dataclass(frozen=True)
class ServiceSummary:
    """One service a plugin provides, as registered."""

    service_type: str
    version: str
    endpoint_path: str
    health: str
    """The registration's health: ``HEALTHY``, ``DEGRADED`` or ``UNHEALTHY``."""
    registered: bool = True
    """In the registry (discoverable, routed); False for a plugin definition the host
    dispenses clients of (``PluginHost(..., plugins)``), which every launched plugin serves."""


@dataclass(frozen=True)
class PluginSummary:
    """One plugin the host knows: launched by it, or joined by itself with its services."""

    name: str
    """The launch name, or the self id of a plugin that joined by itself."""
    runtime_id: str
    self_id: str
    version: str
    launched: bool
    health: str
    """What it last reported (``HEALTHY``, ``DEGRADED``, ``UNHEALTHY``), or its services'
    worst when it reported nothing."""
    reason: str
    services: tuple[ServiceSummary, ...]


class InventoryEndpoint:
    """``GET /plugins``: the inventory as JSON, for operators only. A WSGI app; holds no state."""

    def __init__(self, inventory: Callable[[], Sequence[PluginSummary]], operators: Operators) -> None:
        self._inventory = inventory
        self._operators = operators

    def __call__(self, environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") != "GET":
            start_response("405 Method Not Allowed", [("Allow", "GET"), ("Content-Length", "0")])
            return [b""]
        try:
            self._operators.check(environ.get("HTTP_AUTHORIZATION", ""))
        except ConnectError as e:
            return text_response(start_response, 401, e.message)
        body = json.dumps({"plugins": [asdict(p) for p in self._inventory()]}).encode()
        start_response(
            "200 OK",
            [("Content-Type", "application/json"), ("Content-Length", str(len(body))), ("Cache-Control", "no-store")],
        )
        return [body]
