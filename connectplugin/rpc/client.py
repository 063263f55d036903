"""The Connect client: calls over a pooled ``requests`` session.

Requests go straight to the session's transport adapter for the base URL (skipping the
per-call settings merge of ``Session.request``), so an in-process adapter can stand in for
the network without changing anything above it. When that adapter is requests' own
``HTTPAdapter``, the client goes one step further down and calls the adapter's urllib3
connection pool itself: the same connections, TLS settings and retries, without building
a ``requests.Response`` (its cookie jar and bookkeeping cost as much as the rest of a call).
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import quote, urlsplit

import requests
import urllib3
from google.protobuf.message import Message
from requests.adapters import BaseAdapter, HTTPAdapter
from requests.structures import CaseInsensitiveDict
from urllib3.exceptions import (
    ClosedPoolError,
    ConnectTimeoutError,
    MaxRetryError,
    NewConnectionError,
    ReadTimeoutError,
)
from urllib3.exceptions import HTTPError as Urllib3Error

from . import _protocol
from ._metadata import Value, from_pairs, split_prefixed, to_wire
from .errors import Code, ConnectError
from .service import Method

Res = TypeVar("Res", bound=Message)

_USER_AGENT = "connectplugin-python/0.1"


@dataclass
class Call:
    """One outgoing call as interceptors see it; they may change headers and timeout."""

    method: Method
    request: Message
    headers: dict[str, Value]
    timeout: float | None
    response_headers: dict[str, Value] = field(default_factory=dict)
    response_trailers: dict[str, Value] = field(default_factory=dict)


Interceptor = Callable[[Call, Callable[[Call], Any]], Any]
"""``interceptor(call, proceed) -> result``: wraps every call a client makes.

``proceed(call)`` performs the call (or the next interceptor) and returns its result: the
response message for unary calls, a :class:`ServerStream` for streaming ones. Add headers
by changing ``call.headers``; retry by calling ``proceed`` again; fail by raising
:class:`ConnectError`. Interceptors run in the order given, the first outermost.
"""


@dataclass(frozen=True)
class ClientConfig:
    """How a client talks to one endpoint; the defaults suit most callers."""

    codec: str = "proto"
    """``proto`` or ``json``."""
    compression: str = _protocol.GZIP
    """Request compression (``gzip`` or ``identity``); gzip responses are always accepted."""
    compress_min_bytes: int = _protocol.COMPRESS_MIN_BYTES
    read_limit: int = _protocol.DEFAULT_READ_LIMIT
    timeout: float | None = None
    """Default per-call timeout in seconds; sent as Connect-Timeout-Ms and enforced here too."""
    connect_timeout: float = 5.0
    use_get: bool = False
    """Call side-effect-free unary methods with GET (cacheable) instead of POST."""
    pool_size: int = 16
    """Keep-alive connections kept per host."""
    interceptors: Sequence[Interceptor] = ()
    headers: Mapping[str, str] = field(default_factory=dict)
    """Sent with every call (before per-call headers)."""

    def __post_init__(self) -> None:
        if self.codec not in _protocol.CODECS:
            raise ValueError(f"codec must be one of {sorted(_protocol.CODECS)}, not {self.codec!r}")
        if self.compression not in _protocol.ENCODINGS:
            raise ValueError(f"compression must be one of {_protocol.ENCODINGS}, not {self.compression!r}")


class _Capture(threading.local):
    stack: list[ResponseMetadata]

    def __init__(self) -> None:
        self.stack = []


_capture = _Capture()


class ResponseMetadata:
    """Captures the headers and trailers of unary calls made inside a ``with`` block.

    >>> with ResponseMetadata() as md:
    ...     kv.get(GetRequest(key="a"))
    >>> md.headers, md.trailers
    """

    def __init__(self) -> None:
        self.headers: dict[str, Value] = {}
        self.trailers: dict[str, Value] = {}

    def __enter__(self) -> ResponseMetadata:
        _capture.stack.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _capture.stack.remove(self)


class Client:
    """A Connect client for one base URL. Safe to share between threads.

    ``session`` may be supplied to share a connection pool or mount a custom adapter
    (TLS settings, an in-process transport); the client then does not close it. The
    adapter for the base URL is looked up once, here, and the session's ``verify`` and
    ``cert`` apply. With requests' own HTTPAdapter the client keeps the adapter's
    connection pool for the base URL from its first call on; its idle connections are
    closed with the client when the client owns the session, else when it is collected.
    """

    def __init__(
        self,
        base_url: str,
        config: ClientConfig | None = None,
        *,
        session: requests.Session | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.config = config or ClientConfig()
        self._owns_session = session is None
        if session is None:
            session = requests.Session()
            adapter = HTTPAdapter(pool_connections=4, pool_maxsize=self.config.pool_size, max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
        self.session = session
        self._transport = _transport(session, self.base_url)
        codec = self.config.codec
        self._codec = _protocol.CODECS[codec]
        # The request headers of each kind of call, but for the per-call ones (see _send).
        base = [
            ("User-Agent", _USER_AGENT),
            ("Connect-Protocol-Version", "1"),
            *self.config.headers.items(),
        ]
        self._get_headers = _header_table([*base, ("Accept-Encoding", "gzip")])
        self._post_headers = _header_table(
            [*base, ("Accept-Encoding", "gzip"), ("Content-Type", "application/" + codec)]
        )
        self._stream_headers = _header_table(
            [*base, ("Content-Type", "application/connect+" + codec), ("Connect-Accept-Encoding", "gzip")]
        )
        self._unary_type = "application/" + codec
        self._stream_type = "application/connect+" + codec
        self._chain = self._build_chain()

    # --- public -------------------------------------------------------------------------------

    def call_unary(
        self,
        method: Method[Any, Res],
        request: Message,
        *,
        timeout: float | None = None,
        headers: Mapping[str, Value] | None = None,
    ) -> Res:
        call = Call(method, request, dict(headers or {}), timeout if timeout is not None else self.config.timeout)
        try:
            result: Res = self._chain(call)
        finally:
            for md in _capture.stack:
                md.headers.update(call.response_headers)
                md.trailers.update(call.response_trailers)
        return result

    def call_server_stream(
        self,
        method: Method[Any, Res],
        request: Message,
        *,
        timeout: float | None = None,
        headers: Mapping[str, Value] | None = None,
    ) -> ServerStream[Res]:
        call = Call(method, request, dict(headers or {}), timeout if timeout is not None else self.config.timeout)
        stream: ServerStream[Res] = self._chain(call)
        return stream

    def close(self) -> None:
        if self._owns_session:
            self.session.close()
            self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the call itself ----------------------------------------------------------------------

    def _build_chain(self) -> Callable[[Call], Any]:
        chain: Callable[[Call], Any] = self._invoke
        for interceptor in reversed(self.config.interceptors):
            chain = _bind(interceptor, chain)
        return chain

    def _invoke(self, call: Call) -> Any:
        if call.method.server_streaming:
            return self._stream(call)
        return self._unary(call)

    def _send(
        self, call: Call, http_method: str, path: str, headers: _HeaderTable, body: bytes | None
    ) -> tuple[_Response, float | None]:
        """Send a request to ``base_url + path``; ``headers`` is a copy this call may change."""
        deadline = time.monotonic() + call.timeout if call.timeout is not None else None
        if call.timeout is not None:
            headers["connect-timeout-ms"] = ("Connect-Timeout-Ms", _protocol.format_timeout_ms(call.timeout))
        for key, value in to_wire(call.headers):
            headers[key.lower()] = (key, value)
        if body is not None:
            headers["content-length"] = ("Content-Length", str(len(body)))
        read_timeout = call.timeout
        connect_timeout = self.config.connect_timeout
        if read_timeout is not None:
            connect_timeout = min(connect_timeout, read_timeout)
        try:
            response = self._transport.send(
                http_method, path, dict(headers.values()), body, connect_timeout, read_timeout
            )
        except (requests.exceptions.RequestException, Urllib3Error, OSError) as e:
            if _timed_out(e):
                raise _timeout_error(deadline, e) from None
            raise ConnectError(Code.UNAVAILABLE, f"cannot reach {self.base_url}: {_reason(e)}") from None
        return response, deadline

    def _unary(self, call: Call) -> Message:
        method = call.method
        data = self._codec.encode(call.request)
        if self.config.use_get and method.idempotent:
            query = f"?encoding={self.config.codec}&connect=v1&"
            if self.config.codec == "json":
                query += "message=" + quote(data.decode(), safe="")
            else:
                query += "base64=1&message=" + base64.urlsafe_b64encode(data).decode().rstrip("=")
            response, deadline = self._send(call, "GET", method.path + query, self._get_headers.copy(), None)
        else:
            headers = self._post_headers.copy()
            if self.config.compression != _protocol.IDENTITY and len(data) >= self.config.compress_min_bytes:
                data = _protocol.compress(self.config.compression, data)
                headers["content-encoding"] = ("Content-Encoding", self.config.compression)
            response, deadline = self._send(call, "POST", method.path, headers, data)
        try:
            body = self._read_all(response, deadline)
        finally:
            response.close()
        wire = from_pairs(response.headers.items())
        call.response_headers, call.response_trailers = split_prefixed(wire, "trailer-")
        if response.status != 200:
            raise _unary_error(response, body, _metadata(call))
        content_type = response.headers.get("content-type", "")
        if content_type != self._unary_type:  # the exact spelling is the common case
            content_type = content_type.split(";")[0].strip().lower()
            if content_type != self._unary_type:
                # Another Connect codec is a protocol error; anything else is not Connect at all.
                code = Code.INTERNAL if content_type in ("application/proto", "application/json") else Code.UNKNOWN
                raise ConnectError(code, f"unexpected response content type {content_type!r}", metadata=_metadata(call))
        encoding = response.headers.get("content-encoding", _protocol.IDENTITY)
        if encoding != _protocol.IDENTITY:
            try:
                body = _protocol.decompress(encoding, body, self.config.read_limit)
            except ConnectError as e:
                code = Code.RESOURCE_EXHAUSTED if e.code is Code.RESOURCE_EXHAUSTED else Code.INTERNAL
                raise ConnectError(code, e.message, metadata=_metadata(call)) from None
        return self._decode(body, method.output)

    def _read_all(self, response: _Response, deadline: float | None) -> bytes:
        limit = self.config.read_limit
        try:
            body = response.read(limit + 1)
        except requests.exceptions.Timeout as e:
            raise _timeout_error(deadline, e) from None
        except (Urllib3Error, OSError, requests.exceptions.RequestException) as e:
            raise _read_error(deadline, e) from None
        if len(body) > limit:
            raise _protocol.too_large(limit)
        return body

    def _decode(self, payload: bytes, message_type: type[Res]) -> Res:
        try:
            return self._codec.decode(payload, message_type)
        except ConnectError as e:
            raise ConnectError(Code.INTERNAL, f"cannot decode response: {e.message}") from None

    def _stream(self, call: Call) -> ServerStream[Any]:
        data = self._codec.encode(call.request)
        headers = self._stream_headers.copy()
        flags = 0
        if self.config.compression != _protocol.IDENTITY and len(data) >= self.config.compress_min_bytes:
            data = _protocol.compress(self.config.compression, data)
            headers["connect-content-encoding"] = ("Connect-Content-Encoding", self.config.compression)
            flags = _protocol.FLAG_COMPRESSED
        response, deadline = self._send(call, "POST", call.method.path, headers, _protocol.envelope(flags, data))
        meta = from_pairs(response.headers.items())
        call.response_headers = meta
        if response.status != 200:
            try:
                body = self._read_all(response, deadline)
            finally:
                response.close()
            raise _unary_error(response, body, meta)
        content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != self._stream_type:
            response.close()
            raise ConnectError(Code.INTERNAL, f"unexpected response content type {content_type!r}", metadata=meta)
        return ServerStream(self, call, response, deadline)


def _bind(interceptor: Interceptor, proceed: Callable[[Call], Any]) -> Callable[[Call], Any]:
    return lambda call: interceptor(call, proceed)


_HeaderTable = dict[str, tuple[str, str]]
"""Request headers by lower-cased name: (name as sent, value). Setting a name replaces any
spelling of it, as requests' CaseInsensitiveDict does, and keeps the first one's place."""


def _header_table(pairs: Sequence[tuple[str, str]]) -> _HeaderTable:
    table: _HeaderTable = {}
    for key, value in pairs:
        table[key.lower()] = (key, value)
    return table


def _metadata(call: Call) -> dict[str, Value]:
    """What an error carries: the response headers and trailers together."""
    return {**call.response_headers, **call.response_trailers}


# --- transports -----------------------------------------------------------------------------


class _Response:
    """An HTTP response as the calls see it, whichever transport produced it.

    ``headers`` are keyed by lower-cased name; a repeated field is one entry, its values
    joined by ", " (as both requests and urllib3 present it). ``read(n)`` reads the body as
    sent (still compressed). ``close()`` returns the connection to its pool for reuse when
    the body was read to its end, and drops it otherwise.
    """

    __slots__ = ("status", "reason", "headers", "read", "close")

    def __init__(
        self,
        status: int,
        reason: str | None,
        headers: dict[str, str],
        read: Callable[[int], bytes],
        close: Callable[[], None],
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.read = read
        self.close = close


def _transport(session: requests.Session, base_url: str) -> _AdapterTransport | _PoolTransport:
    adapter = session.get_adapter(base_url + "/")
    parts = urlsplit(base_url)
    if _is_stock(adapter) and not (parts.query or parts.fragment):
        assert isinstance(adapter, HTTPAdapter)
        return _PoolTransport(adapter, session, base_url, parts.path)
    return _AdapterTransport(adapter, session, base_url)


_SEND_STEPS = (
    "send",
    "get_connection_with_tls_context",
    "build_connection_pool_key_attributes",
    "cert_verify",
    "request_url",
    "add_headers",
    "build_response",
)
"""The methods HTTPAdapter.send is made of; _PoolTransport does what they do by default."""


def _is_stock(adapter: BaseAdapter) -> bool:
    """True for requests' HTTPAdapter and subclasses that change only its pool set-up
    (``init_poolmanager``, as TLS customisations do): calling their pool directly is the
    same as calling ``send``. A subclass that changes how a request is sent is called through
    ``send``, and so is any other adapter (the in-process WSGIAdapter)."""
    return isinstance(adapter, HTTPAdapter) and all(
        getattr(type(adapter), name) is getattr(HTTPAdapter, name) for name in _SEND_STEPS
    )


class _AdapterTransport:
    """Any transport adapter, called through ``send``."""

    def __init__(self, adapter: BaseAdapter, session: requests.Session, base_url: str) -> None:
        self._adapter = adapter
        self._session = session
        self._base_url = base_url

    def send(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes | None,
        connect_timeout: float,
        read_timeout: float | None,
    ) -> _Response:
        prepared = requests.PreparedRequest()
        prepared.method = method
        prepared.url = self._base_url + path
        prepared.headers = CaseInsensitiveDict(headers)
        prepared.body = body
        prepared.hooks = {"response": []}
        verify, cert = _tls_settings(self._session)
        response = self._adapter.send(
            prepared,
            stream=True,
            timeout=(connect_timeout, read_timeout),  # type: ignore[arg-type]  # read may be None
            verify=verify,
            cert=cert,
        )
        headers = {key.lower(): value for key, value in response.headers.items()}
        return _Response(response.status_code, response.reason, headers, response.raw.read, response.close)

    def close(self) -> None:
        pass  # the session closes its adapters


class _PoolTransport:
    """requests' HTTPAdapter, with its urllib3 pool for the base URL called directly.

    Does for our requests what ``HTTPAdapter.send`` does (no proxies, which calls never had):
    the pool and its TLS settings come from the adapter, with the session's ``verify`` and
    ``cert``, on the first call; the adapter's retry policy applies.
    """

    def __init__(self, adapter: HTTPAdapter, session: requests.Session, base_url: str, prefix: str) -> None:
        self._adapter = adapter
        self._session = session
        self._base_url = base_url
        self._prefix = prefix
        """The base URL's path, which every request target starts with."""
        # Set by one call or another; any thread may replace it with an equal pool.
        self._pool: urllib3.HTTPConnectionPool | None = None

    def send(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes | None,
        connect_timeout: float,
        read_timeout: float | None,
    ) -> _Response:
        pool = self._pool or self._connect()
        try:
            response = self._urlopen(pool, method, path, headers, body, connect_timeout, read_timeout)
        except ClosedPoolError:
            # The session closed the pool (Session.close(), or it was the least recently
            # used of too many); nothing was sent. Fetch the session's new pool and go again.
            pool = self._connect()
            response = self._urlopen(pool, method, path, headers, body, connect_timeout, read_timeout)

        def close() -> None:
            response.close()  # drops the connection, unless fully read (then already back)
            response.release_conn()  # either way the pool gets its slot back, as with requests

        headers = {key.lower(): value for key, value in response.headers.itermerged()}
        return _Response(response.status, response.reason, headers, response.read, close)

    def _urlopen(
        self,
        pool: urllib3.HTTPConnectionPool,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes | None,
        connect_timeout: float,
        read_timeout: float | None,
    ) -> urllib3.BaseHTTPResponse:
        # The arguments HTTPAdapter.send passes.
        return pool.urlopen(
            method,
            self._prefix + path,
            body=body,
            headers=headers,
            retries=self._adapter.max_retries,
            redirect=False,
            assert_same_host=False,
            preload_content=False,
            decode_content=False,
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
        )

    def close(self) -> None:
        """Close the pool's idle connections; a later call takes a new pool from the session."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def _connect(self) -> urllib3.HTTPConnectionPool:
        request = requests.PreparedRequest()
        request.url = self._base_url + "/"
        verify, cert = _tls_settings(self._session)
        pool = self._adapter.get_connection_with_tls_context(request, verify, cert=cert)
        self._adapter.cert_verify(pool, request.url, verify, cert)
        assert isinstance(pool, urllib3.HTTPConnectionPool)
        self._pool = pool
        return pool


def _tls_settings(session: requests.Session) -> tuple[bool | str, Any]:
    """The session's ``verify`` and ``cert``; a ``verify`` of None verifies, as by default."""
    verify = session.verify
    return (True if verify is None else verify), session.cert


# --- streams --------------------------------------------------------------------------------


class ServerStream(Generic[Res]):
    """The responses of a server-streaming call, as an iterator.

    ``close()`` (or leaving a ``with`` block) ends the call early and releases its
    connection. ``headers`` are known at once; ``trailers`` once the stream has ended.
    """

    def __init__(self, client: Client, call: Call, response: _Response, deadline: float | None) -> None:
        self._client = client
        self._call = call
        self._response = response
        self._deadline = deadline
        self._encoding = response.headers.get("connect-content-encoding", _protocol.IDENTITY)
        self._done = False
        if self._encoding not in _protocol.ENCODINGS:
            self.close()
            raise ConnectError(Code.INTERNAL, f"server used unknown compression {self._encoding!r}")

    @property
    def headers(self) -> Mapping[str, Value]:
        return self._call.response_headers

    @property
    def trailers(self) -> Mapping[str, Value]:
        return self._call.response_trailers

    def __iter__(self) -> ServerStream[Res]:
        return self

    def __next__(self) -> Res:
        if self._done:
            raise StopIteration
        try:
            envelope = self._next_envelope()
        except BaseException:
            self.close()
            raise
        if envelope is None:
            self.close()
            raise ConnectError(Code.INTERNAL, "stream ended without an end-of-stream message")
        flags, data = envelope
        if flags & _protocol.FLAG_END_STREAM:
            self.close()
            self._finish(data)
            raise StopIteration
        if self._deadline is not None and time.monotonic() > self._deadline:
            self.close()
            raise ConnectError(Code.DEADLINE_EXCEEDED, "the stream outlived its timeout")
        return self._client._decode(data, self._call.method.output)

    def _next_envelope(self) -> tuple[int, bytes] | None:
        try:
            return _protocol.read_envelope(self._response.read, self._encoding, self._client.config.read_limit)
        except ConnectError as e:
            if e.code is Code.RESOURCE_EXHAUSTED:
                raise
            raise ConnectError(Code.INTERNAL, f"malformed stream: {e.message}") from None
        except requests.exceptions.Timeout as e:
            raise _timeout_error(self._deadline, e) from None
        except (Urllib3Error, OSError, requests.exceptions.RequestException) as e:
            raise _read_error(self._deadline, e) from None

    def _finish(self, data: bytes) -> None:
        try:
            end = json.loads(data)
            if not isinstance(end, dict):
                raise ValueError("not an object")
        except ValueError:
            raise ConnectError(Code.INTERNAL, "malformed end-of-stream message") from None
        metadata = end.get("metadata")
        if not isinstance(metadata, dict):
            metadata = {}
        pairs = [(k, v) for k, vs in metadata.items() if isinstance(vs, list) for v in vs if isinstance(v, str)]
        self._call.response_trailers = from_pairs(pairs)
        if end.get("error") is not None:
            raise ConnectError.from_json(
                end["error"], Code.UNKNOWN, {**self._call.response_headers, **self._call.response_trailers}
            )

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._response.close()

    def __enter__(self) -> ServerStream[Res]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


# --- errors ---------------------------------------------------------------------------------


def _unary_error(response: _Response, body: bytes, meta: Mapping[str, Value]) -> ConnectError:
    fallback = Code.from_http_status(response.status)
    content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        try:
            body = _protocol.decompress(response.headers.get("content-encoding", _protocol.IDENTITY), body, len(body) * 64 + 1024)
            return ConnectError.from_json(json.loads(body), fallback, meta)
        except (ValueError, ConnectError):
            pass
    reason = response.reason or ""
    return ConnectError(fallback, f"HTTP {response.status} {reason}".strip(), metadata=meta)


def _timed_out(e: BaseException) -> bool:
    """Whether sending failed for a timeout, as requests' HTTPAdapter.send classifies it."""
    if isinstance(e, MaxRetryError):
        # urllib3 makes a refused connection (NewConnectionError) a ConnectTimeoutError too.
        return isinstance(e.reason, ConnectTimeoutError) and not isinstance(e.reason, NewConnectionError)
    return isinstance(e, (requests.exceptions.Timeout, ReadTimeoutError))


def _timeout_error(deadline: float | None, cause: Exception) -> ConnectError:
    if deadline is not None:
        return ConnectError(Code.DEADLINE_EXCEEDED, "the call outlived its timeout")
    return ConnectError(Code.UNAVAILABLE, f"timed out: {_reason(cause)}")


def _read_error(deadline: float | None, cause: Exception) -> ConnectError:
    if deadline is not None and time.monotonic() >= deadline:
        return ConnectError(Code.DEADLINE_EXCEEDED, "the call outlived its timeout")
    return ConnectError(Code.UNAVAILABLE, f"connection lost: {_reason(cause)}")


def _reason(e: BaseException) -> str:
    while e.args and isinstance(e.args[0], BaseException):
        e = e.args[0]
    return str(e) or type(e).__name__
