"""Descriptions of services and methods, the link between generated code and the Connect layer.

Generated modules build these once at import; the server and client read them
instead of inspecting protobuf descriptors on every call.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from google.protobuf.message import Message

Req = TypeVar("Req", bound=Message)
Res = TypeVar("Res", bound=Message)


@dataclass(frozen=True)
class Method(Generic[Req, Res]):
    """One RPC: where it lives, its message types, and how it may be called."""

    service: str
    """Fully qualified service name, e.g. ``kv.v1.KVService``."""
    name: str
    """Method name as written in the proto, e.g. ``Get``."""
    input: type[Req]
    output: type[Res]
    server_streaming: bool = False
    idempotent: bool = False
    """``idempotency_level = NO_SIDE_EFFECTS``: the method may also be called with GET."""

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"

    @property
    def attr(self) -> str:
        """The Python name of the method on handlers and clients (snake_case)."""
        return snake_case(self.name)


@dataclass(frozen=True)
class Service:
    """A service: its fully qualified name and its methods keyed by proto name."""

    name: str
    methods: Mapping[str, Method] = field(default_factory=dict)

    @property
    def path(self) -> str:
        return f"/{self.name}/"


def snake_case(name: str) -> str:
    """``GetPluginInfo`` -> ``get_plugin_info``; ``KVService`` -> ``kv_service``."""
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()
