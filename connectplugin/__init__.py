"""connectplugin: remote-first plugins that talk Connect RPC over plain HTTP."""

from .host.platform import DependencyError, Platform, PluginSpec
from .host.pluginhost import HostConfig, PluginHost
from .host.ratelimit import Rate
from .host.registry import RegistryConfig
from .rpc import (
    App,
    Call,
    Client,
    ClientConfig,
    Code,
    ConnectError,
    Context,
    DevPKI,
    ErrorDetail,
    HTTPConfig,
    HTTPServer,
    Interceptor,
    KeyPair,
    Method,
    ResponseMetadata,
    ServerConfig,
    ServerStream,
    Service,
    TLSConfig,
    Trust,
    make_dev_pki,
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
    "DevPKI",
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
    "KeyPair",
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
    "Rate",
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
    "TLSConfig",
    "Trust",
    "make_dev_pki",
    "serve",
]
