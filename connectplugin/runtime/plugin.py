"""Plugin definitions: a service bound to its generated client and handler under a name.

Generated code builds one per service (``KV_PLUGIN``); ``serve()`` mounts an implementation
by it and a host dispenses a typed client by it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..rpc.service import Service


@dataclass(frozen=True)
class Plugin:
    """Binds a service to its generated client and handler base class under a plugin name.

    ``serve()`` uses it to mount an implementation; a host uses it to dispense a
    typed client after the handshake.
    """

    name: str
    version: str
    service: Service
    client: type
    handler: type

    @property
    def service_path(self) -> str:
        return self.service.path


@dataclass(frozen=True)
class ServiceDeclaration:
    """A service a plugin provides: its type, version, and the path its procedures live under."""

    service_type: str
    version: str = ""
    path: str = ""
    """The service's path prefix, e.g. ``KV_PLUGIN.service_path`` (``/kv.v1.KVService/``)."""


@dataclass(frozen=True)
class Requirement:
    """A service a plugin needs from another plugin."""

    service_type: str
    min_version: str = ""
    required_for_startup: bool = True
    """When True the plugin does not start until a provider is registered."""
