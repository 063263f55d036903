"""Plugin definitions: a service bound to its generated client and handler under a name.

Generated code builds one per service (``KV_PLUGIN``); ``serve()`` mounts an implementation
by it and a host dispenses a typed client by it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ..rpc.service import Service

ClientT = TypeVar("ClientT")


@dataclass(frozen=True)
class Plugin(Generic[ClientT]):
    """Binds a service to its generated client and handler base class under a plugin name.

    ``serve()`` uses it to mount an implementation; a host uses it to dispense a
    typed client after the handshake: ``dispense(KV_PLUGIN)`` is a ``KVServiceClient``
    to a type checker too (generated definitions are ``Plugin[KVServiceClient]``).
    """

    name: str
    version: str
    service: Service
    client: type[ClientT]
    """The generated ``<Service>Client``; built around an ``rpc.Client``."""
    handler: type

    @property
    def service_path(self) -> str:
        return self.service.path


def plugin_name(plugin: Plugin[Any] | str, known: Mapping[str, Plugin[Any]]) -> str:
    """The name a dispense asks for, checked against the definitions a host was given.

    Raises ``KeyError`` for an unknown name and ``ValueError`` for a definition that is not
    the one known under its name (a client built from it could call another service).
    """
    name = plugin if isinstance(plugin, str) else plugin.name
    if name not in known:
        raise KeyError(f"unknown plugin {name!r}; known: {', '.join(sorted(known))}")
    if not isinstance(plugin, str) and known[name] != plugin:
        raise ValueError(f"{plugin!r} is not the definition this host knows as {name!r}")
    return name


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
