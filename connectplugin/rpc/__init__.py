"""The Connect RPC layer: wire protocol, WSGI server, client and HTTP serving.

It knows nothing of plugins. Generated code imports its public names from here.
"""

from .client import (
    Call,
    CancelToken,
    Client,
    ClientConfig,
    Interceptor,
    ResponseMetadata,
    ServerStream,
)
from .errors import Code, ConnectError, ErrorDetail
from .httpserver import HTTPConfig, HTTPServer, PlaintextRefusedError
from .resilience import BreakerConfig, BreakerState, CircuitBreaker, Retry, RetryConfig
from .server import App, Context, ServerConfig
from .service import Method, Service
from .tls import DevPKI, KeyPair, PinList, RevocationList, TLSConfig, Trust, make_dev_pki

__all__ = [
    "App",
    "BreakerConfig",
    "BreakerState",
    "DevPKI",
    "KeyPair",
    "Call",
    "CancelToken",
    "CircuitBreaker",
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
    "PinList",
    "PlaintextRefusedError",
    "ResponseMetadata",
    "RevocationList",
    "Retry",
    "RetryConfig",
    "ServerConfig",
    "ServerStream",
    "Service",
    "TLSConfig",
    "Trust",
    "make_dev_pki",
]
