"""connectplugin: remote-first plugins that talk Connect RPC over plain HTTP."""

from .host.platform import DependencyError, Platform, PluginSpec
from .host.pluginhost import HostConfig, PluginHost
from .host.registry import RegistryConfig
from .rpc import (
    App,
    Call,
    Client,
    ClientConfig,
    Code,
    ConnectError,
    Context,
    ErrorDetail,
    HTTPConfig,
    HTTPServer,
    Interceptor,
    Method,
    ResponseMetadata,
    ServerConfig,
    ServerStream,
    Service,
)
from .runtime.handshake import HandshakeConfig
from .runtime.health import Health, HealthReport, HealthState, ServingStatus
from .runtime.hostlink import HostLink, HostLinkConfig
from .runtime.launcher import (
    ForkedProcessError,
    InProcessStrategy,
    LaunchContext,
    LaunchError,
    LaunchFailure,
    ProcessStrategy,
    Running,
    Strategy,
)
from .runtime.plugin import Plugin, Requirement, ServiceDeclaration
from .runtime.pluginclient import PluginClient, PluginClientConfig
from .runtime.serving import PluginServer, ServeConfig, serve

__all__ = [
    "App",
    "Call",
    "Client",
    "ClientConfig",
    "Code",
    "ConnectError",
    "Context",
    "DependencyError",
    "ErrorDetail",
    "ForkedProcessError",
    "HTTPConfig",
    "HTTPServer",
    "HandshakeConfig",
    "Health",
    "HealthReport",
    "HealthState",
    "HostConfig",
    "HostLink",
    "HostLinkConfig",
    "InProcessStrategy",
    "Interceptor",
    "LaunchContext",
    "LaunchError",
    "LaunchFailure",
    "Method",
    "Platform",
    "Plugin",
    "PluginClient",
    "PluginClientConfig",
    "PluginHost",
    "PluginServer",
    "PluginSpec",
    "ProcessStrategy",
    "RegistryConfig",
    "Requirement",
    "ResponseMetadata",
    "Running",
    "ServeConfig",
    "ServerConfig",
    "ServerStream",
    "ServiceDeclaration",
    "ServingStatus",
    "Service",
    "Strategy",
    "serve",
]
