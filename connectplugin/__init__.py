"""connectplugin: remote-first plugins that talk Connect RPC over plain HTTP."""

from ._service import Method, Plugin, Service
from .client import Call, Client, ClientConfig, Interceptor, ResponseMetadata, ServerStream
from .errors import Code, ConnectError, ErrorDetail
from .handshake import HandshakeConfig
from .health import Health
from .host import HostConfig, PluginClient, PluginHost
from .httpserver import HTTPConfig, HTTPServer
from .launcher import InProcessStrategy, LaunchError, ProcessStrategy, Strategy
from .plugin import PluginServer, ServeConfig, serve
from .server import App, Context, ServerConfig

__all__ = [
    "App",
    "Call",
    "Client",
    "ClientConfig",
    "Code",
    "ConnectError",
    "Context",
    "ErrorDetail",
    "HTTPConfig",
    "HTTPServer",
    "HandshakeConfig",
    "Health",
    "HostConfig",
    "InProcessStrategy",
    "LaunchError",
    "PluginClient",
    "PluginHost",
    "PluginServer",
    "ProcessStrategy",
    "ServeConfig",
    "Strategy",
    "serve",
    "Interceptor",
    "Method",
    "Plugin",
    "ResponseMetadata",
    "ServerConfig",
    "ServerStream",
    "Service",
]
