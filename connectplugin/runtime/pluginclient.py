"""The host's connection to one plugin: handshake once, then dispense typed clients."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

from ..gen.connectplugin.health.v1 import health_pb2
from ..gen.connectplugin.health.v1.health_connect import HealthServiceClient
from ..gen.connectplugin.v1 import handshake_pb2, lifecycle_pb2, plugininfo_pb2
from ..gen.connectplugin.v1.handshake_connect import HandshakeServiceClient
from ..gen.connectplugin.v1.lifecycle_connect import PluginControlClient
from ..gen.connectplugin.v1.plugininfo_connect import PluginIdentityClient
from ..rpc.client import Call, Client, ClientConfig, Interceptor, ServerStream
from ..rpc.errors import Code, ConnectError
from . import handshake as hs
from .credentials import HOST_SECRET_HEADER
from .health import HealthReport, ServingStatus, report_from_wire, status_from_wire
from .launcher import Running
from .plugin import ClientT, Plugin, plugin_name


class PluginNotServedError(LookupError):
    """The endpoint at ``url`` answered the handshake without plugins this client expects.

    ``plugin`` is the client's name, ``missing`` the expected plugins the answer left out,
    ``served`` the ones it listed. (The handshake itself succeeds, as a Go plugin answers
    it: only the caller knows that what it asked for is missing.)
    """

    def __init__(self, plugin: str, url: str, missing: Sequence[str], served: Sequence[str]) -> None:
        self.plugin = plugin
        self.url = url
        self.missing = tuple(missing)
        self.served = tuple(served)
        super().__init__(
            f"plugin {plugin!r} at {url} does not serve {', '.join(self.missing)} "
            f"(it serves {', '.join(self.served) or 'none of the plugins asked for'})"
        )


@dataclass(frozen=True)
class PluginClientConfig:
    """How a host's client of one plugin calls it."""

    rpc: ClientConfig = field(default_factory=ClientConfig)
    """The RPC client's settings (headers, interceptors, default timeout of dispensed clients)."""
    handshake_timeout: float = 10.0
    """Seconds for the handshake."""
    call_timeout: float = 5.0
    """Seconds for each of the plugin's control calls: health checks and plugin info."""


class PluginClient:
    """A connection to one plugin endpoint. Safe to share between threads.

    The handshake runs on first use (``dispense`` or ``handshake``); ``dispense(name)``
    returns the generated typed client for that plugin. With ``host_secret`` every call,
    dispensed clients' included, presents it as ``X-Plugin-Host-Secret``: our plugins refuse
    calls without it, and peers that do not check it (a Go plugin) ignore it.
    """

    def __init__(
        self,
        url: str,
        plugins: Mapping[str, Plugin],
        handshake: hs.HandshakeConfig,
        *,
        config: PluginClientConfig | None = None,
        session: Any = None,
        running: Running | None = None,
        name: str = "",
        host_secret: str = "",
    ) -> None:
        self.url = url
        self.name = name or next(iter(plugins), "plugin")
        self.running = running
        self.config = config = config or PluginClientConfig()
        self._plugins = dict(plugins)
        self._handshake_config = handshake
        self._exit_code: int | None = None
        self._host_secret = host_secret
        self.rpc = Client(url, self._rpc_config(config.rpc), session=session)
        self._lock = threading.Lock()  # guards _handshake and _dispensed
        self._handshake: handshake_pb2.HandshakeResponse | None = None
        self._dispensed: dict[str, Any] = {}

    def handshake(self) -> handshake_pb2.HandshakeResponse:
        """Handshake once (later calls return the first answer): cookie, versions, plugins.

        Callers racing on the first use may each send a handshake; the first accepted
        answer is kept, and the call itself runs outside the lock. Raises
        ``PluginNotServedError`` when the answer leaves out a plugin of this client's set.
        """
        with self._lock:
            if self._handshake is not None:
                return self._handshake
        config = self._handshake_config
        client = HandshakeServiceClient(self.rpc)
        response = hs.exchange(
            config,
            hs.request_for(config, self._plugins),
            lambda request: client.handshake(request, timeout=self.config.handshake_timeout),
            them=f"plugin {self.name!r}",
        )
        served = sorted({p.name for p in response.plugins})
        missing = sorted(set(self._plugins) - set(served))
        if missing:
            raise PluginNotServedError(self.name, self.url, missing, served)
        with self._lock:
            if self._handshake is None:
                self._handshake = response
            return self._handshake

    @property
    def app_protocol_version(self) -> int:
        return self.handshake().app_protocol_version

    @overload
    def dispense(
        self,
        plugin: Plugin[ClientT],
        *,
        config: ClientConfig | None = None,
        interceptors: Sequence[Interceptor] = (),
    ) -> ClientT: ...

    @overload
    def dispense(
        self, plugin: str, *, config: ClientConfig | None = None, interceptors: Sequence[Interceptor] = ()
    ) -> Any: ...

    def dispense(
        self,
        plugin: Plugin[Any] | str,
        *,
        config: ClientConfig | None = None,
        interceptors: Sequence[Interceptor] = (),
    ) -> Any:
        """The typed client of a plugin (the generated ``<Service>Client``).

        ``dispense(KV_PLUGIN)`` is typed as the definition's client (``KVServiceClient``);
        ``dispense("kv")`` returns the same object, untyped. A definition must be the one the
        host was given under its name. Without ``config`` or ``interceptors``, the one client
        made with ``PluginClientConfig.rpc``. With ``config`` (in place of that one: deadline,
        interceptors, codec...) or ``interceptors`` (run inside the config's, say ``Retry()``
        and ``CircuitBreaker()``), a new client over the same connections; either way it
        checks that the plugin runs and presents the host's secret.
        """
        name = plugin_name(plugin, self._plugins)
        self.handshake()
        if config is not None or interceptors:
            return self._plugins[name].client(self.rpc.derive(self._rpc_config(config or self.config.rpc, interceptors)))
        with self._lock:
            if name not in self._dispensed:
                self._dispensed[name] = self._plugins[name].client(self.rpc)
            return self._dispensed[name]

    def _rpc_config(self, config: ClientConfig, interceptors: Sequence[Interceptor] = ()) -> ClientConfig:
        """``config`` with what every call to this plugin needs: the liveness check first, the
        host's secret among the headers."""
        headers = {**config.headers, HOST_SECRET_HEADER: self._host_secret} if self._host_secret else config.headers
        chain = (self._check_alive, *config.interceptors, *interceptors)
        return dataclasses.replace(config, interceptors=chain, headers=headers)

    def check_health(self, service: str = "") -> ServingStatus:
        """The serving status of a service, or of the whole plugin with ``""``."""
        response = HealthServiceClient(self.rpc).check(
            health_pb2.HealthCheckRequest(service=service), timeout=self.config.call_timeout
        )
        return status_from_wire(response.status)

    def watch_health(self, service: str = "") -> ServerStream[health_pb2.HealthCheckResponse]:
        return HealthServiceClient(self.rpc).watch(health_pb2.HealthCheckRequest(service=service))

    def get_health(self) -> HealthReport:
        """The plugin's overall health: state, reason, and the dependencies it misses."""
        response = PluginControlClient(self.rpc).get_health(
            lifecycle_pb2.GetHealthRequest(), timeout=self.config.call_timeout
        )
        return report_from_wire(response)

    def plugin_info(self) -> plugininfo_pb2.GetPluginInfoResponse:
        return PluginIdentityClient(self.rpc).get_plugin_info(
            plugininfo_pb2.GetPluginInfoRequest(), timeout=self.config.call_timeout
        )

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
