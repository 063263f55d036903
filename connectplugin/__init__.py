"""connectplugin: remote-first plugins that talk Connect RPC over plain HTTP."""

from ._service import Method, Plugin, Service
from .client import Call, Client, ClientConfig, Interceptor, ResponseMetadata, ServerStream
from .errors import Code, ConnectError, ErrorDetail
from .handshake import HandshakeConfig
from .health import Health
from .host import HostConfig, PluginClient, PluginHost
from .hostlink import HostLink
from .httpserver import HTTPConfig, HTTPServer
from .launcher import (
    InProcessStrategy,
    LaunchContext,
    LaunchError,
    ProcessStrategy,
    Running,
    Strategy,
)
from .platform import DependencyError, Platform, PluginSpec, Requirement
from .plugin import PluginServer, ServeConfig, serve
from .registry import RegistryConfig
from .server import App, Context, ServerConfig

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
    "HTTPConfig",
    "HTTPServer",
    "HandshakeConfig",
    "Health",
    "HostConfig",
    "HostLink",
    "InProcessStrategy",
    "Interceptor",
    "LaunchContext",
    "LaunchError",
    "Method",
    "Platform",
    "Plugin",
    "PluginClient",
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
    "Service",
    "Strategy",
    "serve",
]
