"""The router: plugin-to-plugin calls through the host, at ``/services/{type}/{provider}/{Method}``.

The host checks the caller, picks the provider's address from the registry, and forwards
the Connect request as is. The caller's credentials stop here: the provider sees
``X-Plugin-Caller-ID`` and the host's own credential for it (``X-Plugin-Host-Secret``),
never the caller's token. Responses, streams included, pass through chunk by chunk.
"""

from __future__ import annotations

import functools
import io
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from ..rpc import _protocol
from ..rpc._metadata import environ_key
from ..rpc._transport import (
    CANCEL_CHECK_INTERVAL,
    ConnectionPool,
    Response,
    TransportCanceled,
    TransportError,
    TransportTimeout,
)
from ..rpc.client import DEFAULT_TIMEOUT
from ..rpc.errors import Code, ConnectError
from ..rpc.resilience import BreakerConfig, CircuitBreaker
from ..rpc.server import disconnection_check, error_response, read_body, refusal, unsupported_media
from ..rpc.tls import TLSConfig, peer_certificate
from ..runtime.credentials import CALLER_HEADER, HOST_SECRET_HEADER, RUNTIME_ID_HEADER
from .identities import Identities
from .registry import UNHEALTHY, Provider, Registry

if TYPE_CHECKING:
    from .metrics import CallCounts, Outcome

log = logging.getLogger("connectplugin.router")

ROUTE = "/services/<service_type>/<provider_id>/<path:method>"

_CALLER = environ_key(CALLER_HEADER)
_RUNTIME_ID = environ_key(RUNTIME_ID_HEADER)
_HOST_SECRET = environ_key(HOST_SECRET_HEADER)
_TIMEOUT = environ_key(_protocol.TIMEOUT_HEADER)
_VERSION = environ_key(_protocol.VERSION_HEADER)
_UNARY_ENCODING = environ_key(_protocol.UNARY_ENCODING_HEADER)
_STREAM_ENCODING = environ_key(_protocol.STREAM_ENCODING_HEADER)

_UNQUOTED = re.compile(r"[A-Za-z0-9_.~/-]*").fullmatch
"""A path that quoting leaves as it is."""

RELAY_CHUNK = 65536
"""Most bytes passed on at once; a response is relayed as it arrives, never whole."""

# Never forwarded: the caller's credentials, what only the host may say (who calls, and the
# host's own credential), and what belongs to one HTTP hop only.
_DROP = {
    "HTTP_AUTHORIZATION",
    _RUNTIME_ID,
    _CALLER,
    _HOST_SECRET,
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


@dataclass(frozen=True)
class RouterConfig:
    """How the host relays routed calls to providers."""

    unary_timeout: float | None = DEFAULT_TIMEOUT
    """Longest a routed unary call that carries no deadline may wait on its provider, in
    seconds: the clients' own default deadline. None: as long as the provider takes."""
    deadline_margin: float = 1.0
    """Seconds the host waits past a caller's deadline, so the provider's own answer
    (deadline_exceeded included) gets through rather than the host's."""
    connect_timeout: float = 5.0
    """Longest the host waits to open a connection to a provider, in seconds."""
    pool_size: int = 32
    """Idle keep-alive connections kept per provider address."""
    read_limit: int = _protocol.DEFAULT_READ_LIMIT
    """Largest request message relayed, in bytes (a stream's envelope header aside); a larger
    body is ``resource_exhausted`` before the host reads it."""
    breaker: BreakerConfig | None = field(default_factory=BreakerConfig)
    """The circuit breaker each (networked) provider gets: while open, calls to it fail at once
    with ``unavailable``. None: no breakers."""
    max_aliases: int = 32
    """Most former provider ids routed to one provider (its predecessors: one per blue-green
    replace or supervised restart). Beyond it the oldest are forgotten but for the first, the
    endpoint callers found before any of them; a call to a forgotten one is ``not_found``, and
    its caller discovers the provider again."""

    def __post_init__(self) -> None:
        if self.max_aliases < 2:
            raise ValueError(f"max_aliases must be at least 2 (the first and the last), not {self.max_aliases}")


class Router:
    """A WSGI app proxying routed calls to providers. Safe from any thread."""

    def __init__(
        self,
        registry: Registry,
        identities: Identities,
        config: RouterConfig | None = None,
        calls: CallCounts | None = None,
    ) -> None:
        """``calls``: where routed calls are counted (the host's metrics), None to count nothing."""
        self._registry = registry
        self._identities = identities
        self.config = config = config or RouterConfig()
        self._calls = calls
        # Keep-alive connections, one pool per provider address, shared by all calls.
        self._pools: dict[tuple[str, TLSConfig | None], ConnectionPool] = {}
        self._pools_lock = threading.Lock()
        self._lock = threading.Lock()  # guards _local, _aliases and _breakers
        self._local: dict[str, Callable[..., Iterable[bytes]]] = {}
        self._aliases: dict[str, str] = {}
        self._breakers: dict[str, CircuitBreaker] = {}
        # A unary error answer with one of these statuses is the provider failing.
        failures = config.breaker.failures if config.breaker else frozenset()
        self._failure_statuses = frozenset(code.http_status for code in failures)

    def attach_local(self, provider_id: str, app: Callable[..., Iterable[bytes]]) -> None:
        """Route to an in-process plugin by calling its WSGI app directly."""
        with self._lock:
            self._local[provider_id] = app

    def alias(self, old_provider_id: str, new_provider_id: str) -> None:
        """Send calls addressed to a replaced provider (or its predecessors) to its successor.

        ``alias(old, old)`` says a successor is coming: calls to ``old`` are ``unavailable``
        (not ``not_found``) until ``alias(old, new)``. At most ``config.max_aliases`` names lead
        to one provider: the first and the latest are kept."""
        with self._lock:
            for key, target in list(self._aliases.items()):
                if target == old_provider_id:
                    self._aliases[key] = new_provider_id
            self._aliases[old_provider_id] = new_provider_id
            # In the order they were first aliased (retargeting keeps a key's place).
            names = [key for key, target in self._aliases.items() if target == new_provider_id != key]
            for key in names[1 : len(names) - self.config.max_aliases + 1]:
                del self._aliases[key]

    def forget(self, provider_id: str) -> None:
        """``provider_id`` is gone for good: calls to the names that led to it (a successor's
        predecessors, or itself awaiting a successor) are no longer redirected."""
        with self._lock:
            for key, target in list(self._aliases.items()):
                if target == provider_id:
                    del self._aliases[key]

    def aliases(self) -> dict[str, str]:
        """Former provider id -> the provider its calls go to now (a copy)."""
        with self._lock:
            return dict(self._aliases)

    def detach_local(self, provider_id: str) -> None:
        with self._lock:
            self._local.pop(provider_id, None)

    def _call_local(
        self,
        app: Callable[..., Iterable[bytes]],
        path: str,
        caller_id: str,
        environ: dict,
        start_response: Callable[..., Any],
        outcome: Outcome | None,
    ) -> Iterable[bytes]:
        inner = {k: v for k, v in environ.items() if k not in _DROP}
        inner["PATH_INFO"] = path
        inner[_CALLER] = caller_id
        if outcome is None:
            return app(inner, start_response)

        unary = False

        def start(status: str, headers: list[tuple[str, str]], *exc_info: Any) -> Any:
            nonlocal unary
            lowered = {k.lower(): v for k, v in headers}
            unary = not _protocol.is_streaming(lowered.get("content-type", ""))
            outcome.respond(int(status[:3]), lowered, not unary)
            return start_response(status, headers, *exc_info)

        body = _observed(app(inner, start), outcome)
        if unary:
            # Counted whole before the caller has it, as a networked provider's unary answer.
            return [b"".join(body)]
        return body

    def __call__(self, environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:
        started = False

        def starting(*args: Any) -> Any:
            nonlocal started
            started = True
            return start_response(*args)

        try:
            return self._route(environ, starting)
        except Exception:
            log.exception("unhandled error routing %s", environ.get("PATH_INFO", ""))
            error = ConnectError(Code.INTERNAL, "internal error")
            if not started:
                return error_response(start_response, error)
            # Called already (and failed, or the error came after): WSGI's second call names the error.
            exc_info = sys.exc_info()
            return error_response(lambda status, headers: start_response(status, headers, exc_info), error)

    def _route(self, environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:
        # Counting costs a clock read, one dict lookup and a few counter updates per call.
        calls = self._calls
        started = time.perf_counter() if calls is not None else 0.0
        outcome: Outcome | None = None
        args = environ.get("connectplugin.route_args", {})
        content_type = environ.get("CONTENT_TYPE", "")
        streaming = _protocol.is_streaming(content_type)
        if environ.get("REQUEST_METHOD") not in ("GET", "POST"):
            start_response("405 Method Not Allowed", [("Allow", "GET, POST"), ("Content-Length", "0")])
            return [b""]
        types = _protocol.STREAM_TYPES if streaming else _protocol.UNARY_TYPES
        try:
            caller = self._identities.verify(_headers(environ), peer_certificate(environ))
            if environ["REQUEST_METHOD"] == "POST" and content_type not in types and not _protocol.codec_for(content_type, types):
                return unsupported_media(start_response, types)
            timeout = self._upstream_timeout(_check_headers(environ, streaming), streaming)
            # One deadline for everything the provider sends, however steadily it trickles.
            deadline = None if timeout is None else time.monotonic() + timeout
            body = read_body(environ, self.config.read_limit, _protocol.ENVELOPE_HEADER_SIZE if streaming else 0)
            headers = {_header_name(key): value for key, value in environ.items() if key.startswith("HTTP_") and key not in _DROP}
            if environ.get("CONTENT_TYPE"):
                headers["Content-Type"] = environ["CONTENT_TYPE"]
            headers[CALLER_HEADER] = caller.runtime_id
            headers["Content-Length"] = str(len(body))
            caller_gone = disconnection_check(environ)
            tried = ""
            while True:
                provider = self._resolve(args)
                if calls is not None:
                    outcome = calls.outcome(provider.provider_id, started)
                path = self._path(provider, args["method"])
                with self._lock:
                    local = self._local.get(provider.provider_id)
                if local is not None:
                    environ["wsgi.input"] = io.BytesIO(body)
                    return self._call_local(local, path, caller.runtime_id, environ, start_response, outcome)
                # PATH_INFO arrives decoded; quote it again for the next hop.
                target = path if _UNQUOTED(path) else quote(path, safe="/")
                if environ.get("QUERY_STRING"):
                    target += "?" + environ["QUERY_STRING"]
                identity = self._identities.get(provider.provider_id)
                if identity is None:
                    # Revoked since it was resolved: replaced (the successor takes the call,
                    # which the old instance never saw) or gone.
                    with self._lock:
                        successor = self._aliases.get(provider.provider_id)
                    if tried or successor is None:
                        raise ConnectError(Code.UNAVAILABLE, f"provider {provider.provider_id} is gone")
                    tried = provider.provider_id
                    continue
                pool = self._pool_for(provider.base_url, identity.client_tls)
                headers[HOST_SECRET_HEADER] = identity.host_secret
                try:
                    upstream = self._send(
                        provider.provider_id, pool, environ["REQUEST_METHOD"], target, headers, body, timeout, caller_gone, deadline
                    )
                    break
                except TransportCanceled:
                    # The provider saw its connection close; the answer goes nowhere.
                    raise ConnectError(Code.CANCELED, "the caller left before the provider answered") from None
                except TransportTimeout:
                    # Slow is not gone: the provider stays, the caller's time is up.
                    raise ConnectError(
                        Code.DEADLINE_EXCEEDED, f"provider {provider.provider_id} did not answer in time"
                    ) from None
                except TransportError as e:
                    # Refused, or the connection dropped without an answer (the pool already
                    # retried a stale keep-alive one): withdrawn now, before the caller hears
                    # of it, so its next discovery does not pick the same dead provider.
                    self._unreachable(provider.provider_id, e)
                    # Replaced while this call was on its way: the successor takes it. The
                    # old instance refused the connection, so it never saw the request.
                    with self._lock:
                        successor = self._aliases.get(provider.provider_id)
                    if tried or successor is None or not e.refused:
                        raise ConnectError(
                            Code.UNAVAILABLE, f"provider {provider.provider_id} is unreachable"
                        ) from None
                    tried = provider.provider_id
        except ConnectError as e:
            if outcome is not None:
                outcome.respond(e.code.http_status, {}, streaming)
                outcome.end(e.code.value)
            elif calls is not None:
                calls.refused(e.code.value)
            return refusal(start_response, content_type, e)
        out_headers = [(k, v) for k, v in upstream.header_items() if k.lower() not in _HOP_BY_HOP]
        status = f"{upstream.status} {upstream.reason or ''}".strip()
        streamed = _protocol.is_streaming(upstream.headers.get("content-type", ""))
        if outcome is not None:
            outcome.respond(upstream.status, upstream.headers, streamed)
        length = upstream.headers.get("content-length", "")
        if not streamed and length.isascii() and length.isdigit() and int(length) <= RELAY_CHUNK:
            # A unary answer of known, small length arrives with its headers: passed on
            # whole, and a provider that fails before its end is a Connect error, not a
            # cut-off body.
            try:
                whole = self._read_whole(upstream, provider.provider_id, int(length))
            except ConnectError as e:
                if outcome is not None:
                    outcome.end(e.code.value)
                return refusal(start_response, content_type, e)
            if outcome is not None:
                outcome.feed(whole)
                outcome.end()
            start_response(status, out_headers)
            return [whole]
        write = start_response(status, out_headers)
        if streamed:
            # The provider sent its headers at once; so do we, or a quiet stream leaves the
            # caller waiting for them (servers send headers with the first non-empty chunk).
            write(b"")
        return self._relay(upstream, provider.provider_id, streamed, caller_gone, deadline, outcome)

    def _send(
        self, provider_id: str, pool: ConnectionPool, method: str, target: str, headers: dict[str, str],
        body: bytes, timeout: float | None, caller_gone: Callable[[], bool] | None, deadline: float | None,
    ) -> Response:
        """Forward a call through the provider's circuit breaker, which hears how it went."""
        breaker = self.breaker(provider_id)
        ticket = breaker.admit() if breaker else 0
        failed = True
        try:
            upstream = pool.send(
                method, target, headers, body, self.config.connect_timeout, timeout, cancelled=caller_gone, deadline=deadline
            )
            failed = upstream.status in self._failure_statuses
            return upstream
        except TransportCanceled:
            failed = False  # the caller left; the provider did nothing wrong
            raise
        finally:
            if breaker:
                breaker.record(ticket, failed)

    def breaker(self, provider_id: str) -> CircuitBreaker | None:
        """The circuit breaker of a networked provider (made on first use), None without breakers."""
        if self.config.breaker is None:
            return None
        with self._lock:
            breaker = self._breakers.get(provider_id)
            if breaker is not None:
                return breaker
            stale = set(self._breakers)
        # Forget the breakers of providers gone for good, so restarts do not pile them up.
        stale -= {p.provider_id for p in self._registry.providers()}
        with self._lock:
            for gone in stale:
                self._breakers.pop(gone, None)
            return self._breakers.setdefault(provider_id, CircuitBreaker(self.config.breaker, name=f"provider {provider_id}"))

    def _upstream_timeout(self, caller_timeout: float | None, streaming: bool) -> float | None:
        """How long the host waits on the provider: the caller's deadline plus a margin;
        without one a unary call is still capped, a stream may stay quiet indefinitely."""
        if caller_timeout is not None:
            return caller_timeout + self.config.deadline_margin
        return None if streaming else self.config.unary_timeout

    def _read_whole(self, upstream: Response, provider_id: str, length: int) -> bytes:
        try:
            body = upstream.read(length)
        except TransportCanceled:
            raise ConnectError(Code.CANCELED, "the caller left before the provider answered") from None
        except TransportTimeout:
            raise ConnectError(Code.DEADLINE_EXCEEDED, f"provider {provider_id} did not answer in time") from None
        except TransportError as e:
            self._unreachable(provider_id, e)
            raise ConnectError(Code.UNAVAILABLE, f"provider {provider_id} went away") from None
        finally:
            upstream.close()
        return body

    def _relay(
        self,
        upstream: Response,
        provider_id: str,
        streamed: bool,
        caller_gone: Callable[[], bool] | None,
        deadline: float | None,
        outcome: Outcome | None = None,
    ) -> Iterator[bytes]:
        """Pass the body on as it arrives; a stream that breaks mid-way marks its provider.

        While the provider is quiet the caller is looked at every ``CANCEL_CHECK_INTERVAL``
        seconds: once it has gone the upstream connection is closed, which the provider
        sees (``Context.is_active``), so neither side holds a thread for nobody. Past the
        call's deadline the relay ends, however steadily the provider trickles.
        """
        try:
            while True:
                while caller_gone is not None and not upstream.wait(CANCEL_CHECK_INTERVAL):
                    if caller_gone():
                        raise TransportCanceled("the caller left")
                    if deadline is not None and time.monotonic() >= deadline:
                        raise TransportTimeout("the provider sent nothing in time")
                chunk = upstream.read1(RELAY_CHUNK)
                if not chunk:
                    break
                if outcome is not None:
                    outcome.feed(chunk)
                yield chunk
        except GeneratorExit:  # the server stopped sending: the caller left
            if outcome is not None:
                outcome.end(Code.CANCELED.value)
            raise
        except TransportCanceled:
            log.debug("caller of a response from %s left; closing it", provider_id)
            if outcome is not None:
                outcome.end(Code.CANCELED.value)
        except TransportTimeout:
            if outcome is not None:
                outcome.end(Code.DEADLINE_EXCEEDED.value)
            # Slow is not gone, as when waiting for the headers.
            if streamed:
                yield _protocol.end_stream(
                    ConnectError(Code.DEADLINE_EXCEEDED, f"provider {provider_id} did not answer in time")
                )
        except TransportError as e:
            if outcome is not None:
                outcome.end(Code.UNAVAILABLE.value)
            self._unreachable(provider_id, e)
            # The response has started: end the stream the Connect way if we can say so.
            if streamed:
                yield _protocol.end_stream(ConnectError(Code.UNAVAILABLE, f"provider {provider_id} went away"))
        finally:
            if outcome is not None:
                outcome.end()
            upstream.close()

    def _resolve(self, args: dict[str, str]) -> Provider:
        requested = args["provider_id"]
        # Twice: a blue-green replace names the successor before it withdraws the old
        # instance, so a lookup that finds the old one gone sees the successor on a second look.
        for _ in range(2):
            with self._lock:
                aliased = requested in self._aliases
                provider_id = self._aliases.get(requested, requested)
            provider = self._registry.provider(provider_id, args["service_type"])
            if provider is not None:
                break
        if provider is None and aliased:  # being replaced (a supervised restart): it may pass
            raise ConnectError(Code.UNAVAILABLE, f"provider {requested} has no instance up")
        if provider is None:
            raise ConnectError(Code.NOT_FOUND, f"no provider {args['provider_id']!r} of {args['service_type']!r}")
        if provider.health == UNHEALTHY:
            raise ConnectError(Code.UNAVAILABLE, f"provider {provider.provider_id} is unhealthy")
        return provider

    @staticmethod
    def _path(provider: Provider, method: str) -> str:
        """The provider-side path: only procedures of the registered service are reachable.

        "Get" is relative to the registered endpoint path (the Go reference's form);
        "kv.v1.KVService/Get" is a full procedure path, as generated clients send. Anything
        else (the provider's own control services above all) is not routed.
        """
        path = "/" + method if "/" in method else provider.endpoint_path + method
        rest = path[len(provider.endpoint_path):]
        if not path.startswith(provider.endpoint_path) or not rest or "/" in rest:
            raise ConnectError(Code.NOT_FOUND, f"{method!r} is not a method of {provider.endpoint_path!r}")
        return path

    def _unreachable(self, provider_id: str, error: BaseException) -> None:
        log.warning("provider %s unreachable: %s; marking it unhealthy", provider_id, error)
        self._registry.set_health(provider_id, UNHEALTHY)

    def _pool_for(self, base_url: str, tls: TLSConfig | None) -> ConnectionPool:
        # Keyed by both: a relaunch may reuse a port with new certificates.
        key = (base_url, tls)
        pool = self._pools.get(key)
        if pool is None:
            fresh = ConnectionPool(base_url, self.config.pool_size, tls)  # loads our key: not under the lock
            with self._pools_lock:
                pool = self._pools.setdefault(key, fresh)
        return pool

    def close(self) -> None:
        with self._pools_lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.close()


def _observed(body: Iterable[bytes], outcome: Outcome) -> Iterator[bytes]:
    """An in-process provider's response, counted as it passes."""
    try:
        for chunk in body:
            outcome.feed(chunk)
            yield chunk
    except GeneratorExit:
        outcome.end(Code.CANCELED.value)
        raise
    finally:
        outcome.end()
        close = getattr(body, "close", None)
        if close is not None:
            close()


def _check_headers(environ: dict, streaming: bool) -> float | None:
    """Check the Connect headers the way the provider's server will, so a bad call stops here.

    Returns the caller's timeout in seconds, None when it gave none.
    """
    if environ["REQUEST_METHOD"] == "POST":
        _protocol.check_version(environ.get(_VERSION))
        _protocol.check_encoding(environ.get(_STREAM_ENCODING if streaming else _UNARY_ENCODING))
    timeout_ms = environ.get(_TIMEOUT)
    return None if timeout_ms is None else _protocol.parse_timeout_ms(timeout_ms)


@functools.lru_cache(maxsize=256)
def _header_name(key: str) -> str:
    """The header an environ key carries, as forwarded: ``HTTP_USER_AGENT`` -> ``User-Agent``."""
    return key[5:].replace("_", "-").title()


def _headers(environ: dict) -> dict[str, str]:
    return {
        "authorization": environ.get("HTTP_AUTHORIZATION", ""),
        RUNTIME_ID_HEADER.lower(): environ.get(_RUNTIME_ID, ""),
    }
