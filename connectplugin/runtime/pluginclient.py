"""The host's connection to one plugin: handshake once, then dispense typed clients."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Mapping
from typing import Any

from ..gen.connectplugin.health.v1 import health_pb2
from ..gen.connectplugin.health.v1.health_connect import HealthServiceClient
from ..gen.connectplugin.v1 import handshake_pb2, lifecycle_pb2, plugininfo_pb2
from ..gen.connectplugin.v1.handshake_connect import HandshakeServiceClient
from ..gen.connectplugin.v1.lifecycle_connect import PluginControlClient
from ..gen.connectplugin.v1.plugininfo_connect import PluginIdentityClient
from ..rpc.client import Call, Client, ClientConfig, ServerStream
from ..rpc.errors import Code, ConnectError
from . import handshake as hs
from .launcher import Running
from .plugin import Plugin


class PluginClient:
    """A connection to one plugin endpoint. Safe to share between threads.

    The handshake runs on first use (``dispense`` or ``handshake``); ``dispense(name)``
    returns the generated typed client for that plugin.
    """

    def __init__(
        self,
        url: str,
        plugins: Mapping[str, Plugin],
        handshake: hs.HandshakeConfig,
        *,
        config: ClientConfig | None = None,
        session: Any = None,
        running: Running | None = None,
        name: str = "",
    ) -> None:
        self.url = url
        self.name = name or next(iter(plugins), "plugin")
        self.running = running
        self._plugins = dict(plugins)
        self._config = handshake
        self._exit_code: int | None = None
        base = config or ClientConfig()
        interceptors = (self._check_alive, *base.interceptors)
        self.rpc = Client(url, dataclasses.replace(base, interceptors=interceptors), session=session)
        self._lock = threading.Lock()
        self._handshake: handshake_pb2.HandshakeResponse | None = None
        self._dispensed: dict[str, Any] = {}

    def handshake(self) -> handshake_pb2.HandshakeResponse:
        """Handshake once (later calls return the first answer): cookie, versions, plugins."""
        with self._lock:
            if self._handshake is None:
                request = hs.request_for(self._config, self._plugins)
                response = HandshakeServiceClient(self.rpc).handshake(request, timeout=10)
                hs.check_response(self._config, response, them=f"plugin {self.name!r}")
                served = {p.name for p in response.plugins}
                missing = sorted(set(self._plugins) - served)
                if missing:
                    raise ConnectError(Code.NOT_FOUND, f"plugin {self.name!r} does not serve {', '.join(missing)}")
                self._handshake = response
            return self._handshake

    @property
    def app_protocol_version(self) -> int:
        return self.handshake().app_protocol_version

    def dispense(self, name: str) -> Any:
        """The typed client of plugin ``name`` (the generated ``<Service>Client``)."""
        if name not in self._plugins:
            raise KeyError(f"unknown plugin {name!r}; known: {', '.join(sorted(self._plugins))}")
        self.handshake()
        with self._lock:
            if name not in self._dispensed:
                self._dispensed[name] = self._plugins[name].client(self.rpc)
            return self._dispensed[name]

    def check_health(self, service: str = "") -> int:
        """The serving status (``connectplugin.health.v1.ServingStatus``) of a service or the plugin."""
        return HealthServiceClient(self.rpc).check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    def watch_health(self, service: str = "") -> ServerStream[health_pb2.HealthCheckResponse]:
        return HealthServiceClient(self.rpc).watch(health_pb2.HealthCheckRequest(service=service))

    def get_health(self) -> lifecycle_pb2.GetHealthResponse:
        return PluginControlClient(self.rpc).get_health(lifecycle_pb2.GetHealthRequest(), timeout=5)

    def plugin_info(self) -> plugininfo_pb2.GetPluginInfoResponse:
        return PluginIdentityClient(self.rpc).get_plugin_info(plugininfo_pb2.GetPluginInfoRequest(), timeout=5)

    @property
    def exit_code(self) -> int | None:
        return self._exit_code

    def _exited(self, code: int | None) -> None:
        self._exit_code = code

    def _check_alive(self, call: Call, proceed: Callable[[Call], Any]) -> Any:
        if self.running is not None and not self.running.alive():
            raise ConnectError(
                Code.UNAVAILABLE, f"plugin {self.name!r} is not running (exit status {self._exit_code})"
            )
        return proceed(call)

    def close(self) -> None:
        self.rpc.close()
