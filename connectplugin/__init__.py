"""connectplugin: remote-first plugins that talk Connect RPC over plain HTTP."""

from ._service import Method, Plugin, Service
from .client import Call, Client, ClientConfig, Interceptor, ResponseMetadata, ServerStream
from .errors import Code, ConnectError, ErrorDetail
from .httpserver import HTTPConfig, HTTPServer
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
    "Interceptor",
    "Method",
    "Plugin",
    "ResponseMetadata",
    "ServerConfig",
    "ServerStream",
    "Service",
]
