"""The router: plugin-to-plugin calls through the host, at ``/services/{type}/{provider}/{Method}``.

The host checks the caller, picks the provider's address from the registry, and forwards
the Connect request as is. The caller's credentials stop here: the provider sees only
``X-Plugin-Caller-ID``. Responses, streams included, pass through chunk by chunk.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import urllib3
from urllib3.exceptions import HTTPError as Urllib3Error

from ._codec import FLAG_END_STREAM, envelope
from .auth import RUNTIME_ID_HEADER, Identities
from .errors import Code, ConnectError
from .registry import UNHEALTHY, Registry
from .server import error_response

log = logging.getLogger("connectplugin.router")

CALLER_HEADER = "X-Plugin-Caller-ID"
ROUTE = "/services/<service_type>/<provider_id>/<path:method>"

# Never forwarded: the caller's credentials, and what belongs to one HTTP hop only.
_DROP = {
    "HTTP_AUTHORIZATION",
    "HTTP_" + RUNTIME_ID_HEADER.upper().replace("-", "_"),
    "HTTP_" + CALLER_HEADER.upper().replace("-", "_"),
    "HTTP_HOST",
    "HTTP_CONNECTION",
    "HTTP_KEEP_ALIVE",
    "HTTP_TE",
    "HTTP_TRAILER",
    "HTTP_TRANSFER_ENCODING",
    "HTTP_UPGRADE",
    "HTTP_PROXY_AUTHORIZATION",
}
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}


class Router:
    """A WSGI app proxying routed calls to providers. Safe from any thread."""

    def __init__(self, registry: Registry, identities: Identities, pool_size: int = 32) -> None:
        self._registry = registry
        self._identities = identities
        # Keep-alive connections to each provider, shared by all calls.
        self._pool = urllib3.PoolManager(num_pools=64, maxsize=pool_size, block=False, retries=False)
        self._local: dict[str, Callable[..., Iterable[bytes]]] = {}
        self._aliases: dict[str, str] = {}

    def attach_local(self, provider_id: str, app: Callable[..., Iterable[bytes]]) -> None:
        """Route to an in-process plugin by calling its WSGI app directly."""
        self._local[provider_id] = app

    def alias(self, old_provider_id: str, new_provider_id: str) -> None:
        """Send calls addressed to a replaced provider (or its predecessors) to its successor."""
        for key, target in list(self._aliases.items()):
            if target == old_provider_id:
                self._aliases[key] = new_provider_id
        self._aliases[old_provider_id] = new_provider_id

    def detach_local(self, provider_id: str) -> None:
        self._local.pop(provider_id, None)

    def _call_local(
        self, app: Callable[..., Iterable[bytes]], path: str, caller_id: str, environ: dict, start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        inner = {k: v for k, v in environ.items() if k not in _DROP}
        inner["PATH_INFO"] = path
        inner["HTTP_" + CALLER_HEADER.upper().replace("-", "_")] = caller_id
        return app(inner, start_response)

    def __call__(self, environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:
        args = environ.get("connectplugin.route_args", {})
        try:
            caller = self._identities.verify(_headers(environ))
            provider_id = args["provider_id"]
            provider_id = self._aliases.get(provider_id, provider_id)
            provider = self._registry.provider(provider_id, args["service_type"])
            if provider is None:
                raise ConnectError(
                    Code.NOT_FOUND, f"no provider {args['provider_id']!r} of {args['service_type']!r}"
                )
            if provider.health == UNHEALTHY:
                raise ConnectError(Code.UNAVAILABLE, f"provider {provider.provider_id} is unhealthy")
            method = args["method"]
            # "Get" is relative to the registered endpoint path (the Go reference's form);
            # "kv.v1.KVService/Get" is a full procedure path, as generated clients send.
            path = "/" + method if "/" in method else provider.endpoint_path + method
            local = self._local.get(provider.provider_id)
            if local is not None:
                return self._call_local(local, path, caller.runtime_id, environ, start_response)
            url = provider.base_url + path
            if environ.get("QUERY_STRING"):
                url += "?" + environ["QUERY_STRING"]
            headers = {
                key[5:].replace("_", "-").title(): value
                for key, value in environ.items()
                if key.startswith("HTTP_") and key not in _DROP
            }
            if environ.get("CONTENT_TYPE"):
                headers["Content-Type"] = environ["CONTENT_TYPE"]
            headers[CALLER_HEADER] = caller.runtime_id
            length = int(environ.get("CONTENT_LENGTH") or 0)
            body = environ["wsgi.input"].read(length) if length else environ["wsgi.input"].read()
            try:
                upstream = self._pool.urlopen(
                    environ["REQUEST_METHOD"], url, body=body or None, headers=headers,
                    preload_content=False, decode_content=False, redirect=False,
                    timeout=urllib3.Timeout(connect=5.0, read=None),
                )
            except (Urllib3Error, OSError) as e:
                self._unreachable(provider.provider_id, e)
                raise ConnectError(Code.UNAVAILABLE, f"provider {provider.provider_id} is unreachable") from None
        except ConnectError as e:
            return error_response(start_response, e)
        out_headers = [(k, v) for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP]
        start_response(f"{upstream.status} {upstream.reason or ''}".strip(), out_headers)
        return _relay(upstream, provider.provider_id, self)

    def _unreachable(self, provider_id: str, error: BaseException) -> None:
        log.warning("provider %s unreachable: %s; marking it unhealthy", provider_id, error)
        self._registry.set_health(provider_id, UNHEALTHY)

    def close(self) -> None:
        self._pool.clear()


def _relay(upstream: urllib3.BaseHTTPResponse, provider_id: str, router: Router) -> Iterator[bytes]:
    """Pass the body on as it arrives; a stream that breaks mid-way marks its provider."""
    try:
        chunks = upstream.read_chunked(decode_content=False) if upstream.chunked else upstream.stream(65536, decode_content=False)
        yield from chunks
    except (Urllib3Error, OSError) as e:
        router._unreachable(provider_id, e)
        # The response has started: end the stream the Connect way if we can say so.
        if upstream.headers.get("Content-Type", "").startswith("application/connect+"):
            end = {"error": {"code": Code.UNAVAILABLE.value, "message": f"provider {provider_id} went away"}}
            yield envelope(FLAG_END_STREAM, json.dumps(end).encode())
    finally:
        upstream.release_conn()


def _headers(environ: dict) -> dict[str, str]:
    return {
        "authorization": environ.get("HTTP_AUTHORIZATION", ""),
        RUNTIME_ID_HEADER.lower(): environ.get("HTTP_" + RUNTIME_ID_HEADER.upper().replace("-", "_"), ""),
    }
