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
